//! The engine's one error type.

use datafusion::error::DataFusionError;
use deltalake::DeltaTableError;

/// Result alias for engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Errors raised by the engine. User errors (a location that does not parse) are separate
/// variants from failures of the stack underneath.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A lake or landing location that is neither a path nor a supported URL.
    #[error("invalid location '{location}': {reason}")]
    InvalidLocation { location: String, reason: String },

    /// A Delta table operation failed.
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: Box<DeltaTableError>,
    },

    /// A query failed while planning or executing. Boxed, as every large source here: errors
    /// travel through every `?` of a run and should stay a few words wide.
    #[error(transparent)]
    DataFusion(Box<DataFusionError>),

    /// An object store request failed.
    #[error("object store request for {location} failed: {source}")]
    ObjectStore {
        location: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// A lake or landing location on an object store that cannot be used at all: the bucket
    /// is missing, the credentials are refused or the endpoint does not answer.
    #[error("cannot use {location}: {hint} ({source})")]
    Unreachable {
        location: String,
        hint: String,
        /// The endpoint did not answer: trying again later may work. A missing bucket or
        /// refused credentials will not mend themselves.
        retryable: bool,
        #[source]
        source: Box<object_store::Error>,
    },

    /// The data handed to a write does not fit the table it goes to.
    #[error("write to {table} rejected: {reason}")]
    InvalidWrite { table: String, reason: String },
}

impl EngineError {
    pub(crate) fn delta(table: &url::Url, source: DeltaTableError) -> Self {
        EngineError::Delta {
            table: table.to_string(),
            source: Box::new(source),
        }
    }
}

impl From<DataFusionError> for EngineError {
    fn from(e: DataFusionError) -> Self {
        EngineError::DataFusion(Box::new(e))
    }
}

impl From<datafusion::arrow::error::ArrowError> for EngineError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        EngineError::DataFusion(Box::new(DataFusionError::ArrowError(Box::new(e), None)))
    }
}
