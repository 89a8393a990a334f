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

    /// Another run holds the lease on the work this run was to do.
    #[error("{key} is leased to run {owner} until {expires_at}: another run is doing this work")]
    LeaseHeld {
        key: String,
        owner: String,
        expires_at: String,
    },

    /// The state store is not set up for use: its table is missing or the credentials are
    /// refused. Retrying will not help; the message says what to do.
    #[error("state store {store}: {reason}")]
    StateStoreSetup { store: String, reason: String },

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
