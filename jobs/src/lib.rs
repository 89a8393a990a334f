//! # medallion-jobs
//!
//! Pipelines and the runs that carry them out. This crate owns the pipeline definition
//! ([`pipeline::Pipeline`]: a folder with `pipeline.toml` and SQL files), its validation
//! ([`validate::validate`]), the bronze, silver and gold layer runners
//! ([`run::run_pipeline`]), the run summary, the commerce data generator and the `medallion`
//! binary. It decides *what* runs in which order and records how far each table got; the
//! data work itself is DataFusion's and deltalake's, reached through `medallion-engine`.
//! No code here knows a table name of a particular pipeline, except the generator.
//!
//! ```text
//!   pipeline.toml + *.sql ──validate──► plans against declared schemas (no I/O)
//!                │
//!                └─run──► bronze ──► silver ──► gold      state store: watermarks, files,
//!                                                          intents, run records
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), medallion_jobs::JobError> {
//! use std::sync::Arc;
//! use medallion_jobs::pipeline::Pipeline;
//! use medallion_jobs::run::{run_pipeline, Layer, RunOptions};
//! let pipeline = Pipeline::load("commerce", &[("lake".into(), "/tmp/lake".into()), ("landing".into(), "/tmp/landing".into())])?;
//! let options = RunOptions {
//!     layers: Layer::ALL.to_vec(),
//!     run_id: "example".into(),
//!     state: Arc::new(medallion_connectors::state::LocalFileStateStore::new("/tmp/lake/_medallion_state")),
//!     progress: false,
//!     session: Default::default(),
//!     lease: Default::default(),
//!     gold: Default::default(),
//! };
//! let (summary, result) = run_pipeline(&pipeline, &options).await;
//! println!("{}", summary.to_json_line());
//! result
//! # }
//! ```

pub mod demo;
pub mod error;
pub mod generate;
pub mod pipeline;
pub mod query;
pub mod run;
pub mod summary;
pub mod validate;

pub use error::{JobError, exit_code};

use std::sync::Arc;

use medallion_connectors::dynamodb::DynamoDbStateStore;
use medallion_connectors::state::{LocalFileStateStore, StateStore};

/// The state store named by `--state`: `dynamodb://TABLE`, a folder or `file://` URL, or by
/// default the folder `_medallion_state` inside a local lake.
pub async fn state_store(
    spec: Option<&str>,
    pipeline: Option<&pipeline::Pipeline>,
) -> Result<Arc<dyn StateStore>, JobError> {
    let label = || spec.unwrap_or("--state").to_string();
    if let Some(table) = spec.and_then(|s| s.strip_prefix("dynamodb://")) {
        let table = table.trim_end_matches('/');
        // DynamoDB's own rule, checked here so a typo fails before any request.
        let valid = (3..=255).contains(&table.len())
            && table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Err(JobError::config(
                label(),
                None,
                format!(
                    "'{table}' is not a DynamoDB table name (3-255 characters: letters, digits, _ . -)"
                ),
            ));
        }
        return Ok(Arc::new(DynamoDbStateStore::new(table).await));
    }
    let dir = match spec {
        Some(s) => {
            let url = medallion_engine::location::parse_location(s)
                .map_err(|e| JobError::config(label(), None, e.to_string()))?;
            medallion_engine::location::local_path(&url).ok_or_else(|| {
                JobError::config(
                    label(),
                    None,
                    "the state store must be dynamodb://TABLE or a local folder",
                )
            })?
        }
        None => {
            let Some(pipeline) = pipeline else {
                return Err(JobError::config(
                    label(),
                    None,
                    "name a state store with --state",
                ));
            };
            medallion_engine::location::local_path(&pipeline.lake)
                .map(|p| p.join("_medallion_state"))
                .ok_or_else(|| {
                    JobError::config(
                        &pipeline.file_label,
                        None,
                        format!(
                            "the lake {} is not on local disk: name a state store with --state \
                             (dynamodb://TABLE)",
                            pipeline.lake
                        ),
                    )
                })?
        }
    };
    Ok(Arc::new(LocalFileStateStore::new(dir)))
}
