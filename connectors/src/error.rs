//! The connectors' one error type.

/// Errors of sources and state stores.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A landed file could not be read at all (as opposed to rows that do not parse, which
    /// become `_corrupt_record` rows).
    #[error("cannot read landed file {file}: {source}")]
    Unreadable {
        file: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// Listing a landing location failed.
    #[error("cannot list {location}: {source}")]
    ListFailed {
        location: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// A conditional state write lost against another writer.
    #[error("state key {key} changed under us: expected version {expected:?}, found {found:?}")]
    StateConflict {
        key: String,
        expected: Option<u64>,
        found: Option<u64>,
    },

    /// The state store could not be read or written.
    #[error("state store {store}: {reason}")]
    StateStore { store: String, reason: String },

    #[error(transparent)]
    Engine(#[from] medallion_engine::EngineError),

    #[error("building record batch: {0}")]
    Arrow(Box<arrow::error::ArrowError>),
}

impl From<arrow::error::ArrowError> for ConnectorError {
    fn from(e: arrow::error::ArrowError) -> Self {
        ConnectorError::Arrow(Box::new(e))
    }
}
