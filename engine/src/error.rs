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

    /// A table's log names what its files do not hold (a data file, a deletion vector).
    #[error("cannot read {table}: {reason}")]
    UnreadableTable { table: String, reason: String },
}

/// How DataFusion's `ResourcesExhausted` error displays: delta-rs keeps a query error of a
/// write or MERGE as its text alone (`DeltaTableError::Generic`), so the text is what is left
/// to recognise it by.
const RESOURCES_EXHAUSTED: &str = "Resources exhausted: ";

/// Whether a query stopped because the memory pool (`--memory-limit`) refused an operator
/// that could not spill (a hash join's table, a sort's merge reserve): the same work fails
/// again under the same limit.
pub fn memory_exhausted(error: &DataFusionError) -> bool {
    matches!(error.find_root(), DataFusionError::ResourcesExhausted(_))
}

impl EngineError {
    /// [`memory_exhausted`], for the engine's errors: a query's, or a Delta operation's.
    pub fn is_memory_exhausted(&self) -> bool {
        match self {
            EngineError::DataFusion(e) => memory_exhausted(e),
            EngineError::Delta { source, .. } => source.to_string().contains(RESOURCES_EXHAUSTED),
            _ => false,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_exhaustion_is_recognised_through_delta_rs_and_datafusion_context() {
        let exhausted = || DataFusionError::ResourcesExhausted("Failed to allocate".into());
        let url = url::Url::parse("file:///lake/gold/t/").unwrap_or_else(|_| unreachable!());
        // delta-rs turns a DataFusion error into text (`Generic`); a sort adds its context.
        let through_delta = EngineError::delta(&url, DeltaTableError::from(exhausted()));
        assert!(through_delta.is_memory_exhausted(), "{through_delta}");
        let with_context = EngineError::from(exhausted().context("Not enough memory to sort"));
        assert!(with_context.is_memory_exhausted(), "{with_context}");
        let other = EngineError::delta(
            &url,
            DeltaTableError::from(DataFusionError::Plan("no such column".into())),
        );
        assert!(!other.is_memory_exhausted(), "{other}");
    }
}
