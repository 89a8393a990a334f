//! The jobs' one error type, and the exit code each kind maps to.

use medallion_connectors::ConnectorError;
use medallion_engine::EngineError;
use medallion_quality::QualityError;

/// Exit codes an orchestrator can act on.
pub mod exit_code {
    pub const SUCCESS: i32 = 0;
    /// An unexpected failure: retrying may help.
    pub const FAILURE: i32 = 1;
    /// The pipeline or command line is wrong: retrying will not help.
    pub const CONFIG: i32 = 2;
    /// A `fail` quality rule caught rows: the data needs a look.
    pub const DATA_QUALITY: i32 = 3;
    /// Another run changed the state under this one.
    pub const CONFLICT: i32 = 4;
    /// Another run holds the lease on this work: it is being done; retry later.
    pub const BUSY: i32 = 5;
    /// The run needed more memory than `--memory-limit` gives an operator that cannot spill:
    /// the same run fails again under the same limit; retry with a larger one.
    pub const MEMORY: i32 = 6;
}

/// One configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// File the problem is in.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Errors of pipeline loading, validation and runs.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("invalid pipeline:\n{}", .issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Config { issues: Vec<ConfigIssue> },

    #[error("data quality: rule '{rule}' of {table} failed on {rows} rows (action = fail)")]
    DataQuality {
        table: String,
        rule: String,
        rows: u64,
    },

    /// A failure of medallion itself (a task that panicked), not of the data or the stack.
    #[error("internal error: {0}")]
    Internal(String),

    #[error("{layer} {table}: {source}")]
    Table {
        layer: String,
        table: String,
        #[source]
        source: Box<JobError>,
    },

    #[error(transparent)]
    Engine(#[from] EngineError),

    #[error(transparent)]
    Connector(#[from] ConnectorError),

    #[error(transparent)]
    Quality(#[from] QualityError),

    #[error("query failed: {0}")]
    DataFusion(Box<datafusion::error::DataFusionError>),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl JobError {
    pub fn config(
        file: impl Into<String>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        JobError::Config {
            issues: vec![ConfigIssue {
                file: file.into(),
                line,
                message: message.into(),
            }],
        }
    }

    pub(crate) fn in_table(self, layer: &str, table: &str) -> Self {
        JobError::Table {
            layer: layer.to_string(),
            table: table.to_string(),
            source: Box::new(self),
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            JobError::Config { .. } => exit_code::CONFIG,
            JobError::DataQuality { .. } => exit_code::DATA_QUALITY,
            JobError::Table { source, .. } => source.exit_code(),
            JobError::Connector(ConnectorError::StateConflict { .. }) => exit_code::CONFLICT,
            JobError::Connector(ConnectorError::LeaseHeld { .. }) => exit_code::BUSY,
            JobError::Engine(EngineError::Unreachable {
                retryable: false, ..
            })
            | JobError::Connector(ConnectorError::Engine(EngineError::Unreachable {
                retryable: false,
                ..
            }))
            | JobError::Connector(ConnectorError::StateStoreSetup { .. }) => exit_code::CONFIG,
            JobError::Engine(EngineError::InvalidLocation { .. }) => exit_code::CONFIG,
            JobError::Engine(e) | JobError::Connector(ConnectorError::Engine(e))
                if e.is_memory_exhausted() =>
            {
                exit_code::MEMORY
            }
            JobError::DataFusion(e) | JobError::Quality(QualityError::DataFusion(e))
                if medallion_engine::error::memory_exhausted(e) =>
            {
                exit_code::MEMORY
            }
            _ => exit_code::FAILURE,
        }
    }
}

impl From<datafusion::error::DataFusionError> for JobError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        JobError::DataFusion(Box::new(e))
    }
}
