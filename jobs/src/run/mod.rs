//! The layer runners.
//!
//! ```text
//!   landed files ──bronze──► bronze.<t> (append, txn per ingest)
//!                              │ rows with _ingest_ts in (watermark, upper]
//!                           silver: rules ─► <t>_quarantine (append, txn)
//!                                   │ valid ─► SQL ─► dedup by key ─► MERGE silver.<t> (txn)
//!                           gold: SQL models over silver ─► overwrite gold.<t> (txn)
//! ```
//!
//! Every write carries a Delta transaction id `(medallion/<pipeline>/<layer>/<table>, seq)`
//! and every step records its intent (`pending`) in the state store before writing, so a
//! crash at any point is followed by a rerun that either finds the commit made or makes it
//! once.

pub(crate) mod bronze;
mod gold;
pub(crate) use gold::tables_read;
pub(crate) mod silver;

use std::sync::Arc;
use std::time::Instant;

use datafusion::prelude::SessionContext;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use medallion_connectors::lease::LeaseBuilder;
use medallion_connectors::state::StateStore;
use medallion_engine::ops::AppTransaction;
use medallion_engine::session::{self, SessionOptions};
use medallion_engine::table;
use serde::Serialize;

use crate::error::{JobError, exit_code};
use crate::pipeline::Pipeline;
use crate::summary::{RunStatus, RunSummary, TableSummary};

/// The three layers, in the order a full run takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    Bronze,
    Silver,
    Gold,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Bronze, Layer::Silver, Layer::Gold];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
        }
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub layers: Vec<Layer>,
    pub run_id: String,
    pub state: Arc<dyn StateStore>,
    /// Show spinners on stderr (when it is a terminal).
    pub progress: bool,
    pub session: SessionOptions,
    /// How a run holds the lease of each layer it works on.
    pub lease: LeaseOptions,
    pub gold: GoldOptions,
}

/// How gold builds its models.
#[derive(Debug, Clone, Copy, Default)]
pub struct GoldOptions {
    /// A model rebuilt by partition (see [`crate::pipeline::RebuildBy`]) whose `from` inputs
    /// hold more rows than this in the partitions it builds is built a slice of partitions at
    /// a time, each slice reading at most about this many of those rows. `None`: see
    /// [`GoldOptions::slice_rows`].
    pub slice_rows: Option<u64>,
}

/// [`GoldOptions::slice_rows`] by default. At SF 10 it builds daily_engagement's 30.9 M
/// events in 15 slices of 6 dates: 9.0-9.8 s and 4 GB for gold's peak against 11.5-18.4 s
/// and 6.1-6.7 GB at once, and 9.1 s under `--memory-limit 2GiB`, where the whole build
/// spilled for 34-36 s. Slices of 4 Mi or 8 Mi rows took as long without a limit.
pub const DEFAULT_SLICE_ROWS: u64 = 2 << 20;

/// The fewest rows a slice is cut to by a memory limit: each slice reads its other inputs
/// whole (daily_engagement's customers), so very small slices repeat that work many times.
const MIN_SLICE_ROWS: u64 = 64 * 1024;

impl GoldOptions {
    /// The rows of a slice: `slice_rows` when set; otherwise [`DEFAULT_SLICE_ROWS`], lowered
    /// under the run's memory limit to the limit over
    /// [`medallion_engine::session::LIMIT_BYTES_PER_HELD_ROW`] (at least
    /// [`MIN_SLICE_ROWS`]).
    pub fn slice_rows(&self, memory_limit: Option<usize>) -> u64 {
        self.slice_rows.unwrap_or_else(|| match memory_limit {
            Some(limit) => (limit as u64
                / medallion_engine::session::LIMIT_BYTES_PER_HELD_ROW as u64)
                .clamp(MIN_SLICE_ROWS, DEFAULT_SLICE_ROWS),
            None => DEFAULT_SLICE_ROWS,
        })
    }
}

/// Leases on (pipeline, layer): how long one lives unrenewed (a killed run's lease is free
/// after this), and how long a run waits for a held one before giving up with
/// [`exit_code::BUSY`].
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    pub ttl: std::time::Duration,
    pub wait: std::time::Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            ttl: medallion_connectors::lease::DEFAULT_LEASE_TTL,
            wait: std::time::Duration::ZERO,
        }
    }
}

/// What a run shares across its layers.
pub(crate) struct RunContext<'a> {
    pub pipeline: &'a Pipeline,
    /// Planned schemas of every table, for tables not written yet.
    pub validated: crate::validate::Validated,
    pub ctx: SessionContext,
    pub options: &'a RunOptions,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Spinners of tables worked on at once share one display.
    pub bars: MultiProgress,
}

impl RunContext<'_> {
    pub fn state(&self) -> &dyn StateStore {
        self.options.state.as_ref()
    }

    pub fn state_key(&self, layer: Layer, table: &str) -> String {
        format!("{}/{}/{}", self.pipeline.name(), layer.as_str(), table)
    }

    pub fn transaction(&self, layer: Layer, table: &str, seq: i64) -> AppTransaction {
        AppTransaction::new(
            format!(
                "medallion/{}/{}/{}",
                self.pipeline.name(),
                layer.as_str(),
                table
            ),
            seq,
        )
    }

    pub fn progress(&self, layer: Layer, table: &str) -> ProgressBar {
        if !self.options.progress {
            return ProgressBar::hidden();
        }
        let bar = self.bars.add(ProgressBar::new_spinner());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} {elapsed}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(format!("{} {}", layer.as_str(), table));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    }

    /// How evenly the hash repartitions run since the last call spread their rows; a table's
    /// runner calls it when it starts (to forget what came before) and when it ends.
    pub fn repartitions(&self) -> Vec<medallion_engine::skew::RepartitionImbalance> {
        session::skew_meter(&self.ctx)
            .map(|meter| meter.take())
            .unwrap_or_default()
    }

    /// (Re-)registers every table of the lake, so queries see latest versions.
    pub async fn register_tables(&self) -> Result<(), JobError> {
        register_lake(&self.ctx, self.pipeline, Some(&self.validated)).await
    }
}

/// Registers every table of `pipeline`'s lake in `ctx` as `<layer>.<table>`. A table not
/// written yet is registered empty with its planned schema when `validated` has it, so that
/// SQL reading it still plans.
pub async fn register_lake(
    ctx: &SessionContext,
    pipeline: &Pipeline,
    validated: Option<&crate::validate::Validated>,
) -> Result<(), JobError> {
    let p = &pipeline.spec;
    let names = p
        .bronze
        .iter()
        .map(|b| (Layer::Bronze, b.table.get_ref().clone()))
        .chain(p.silver.iter().flat_map(|s| {
            [
                (Layer::Silver, s.table.get_ref().clone()),
                (Layer::Silver, s.quarantine_table()),
            ]
        }))
        .chain(
            p.gold
                .iter()
                .filter(|g| g.kind == crate::pipeline::GoldKind::Table)
                .map(|g| (Layer::Gold, g.table.get_ref().clone())),
        );
    for (layer, name) in names {
        let url = pipeline.table_url(layer.as_str(), &name)?;
        match table::open_table(&url).await? {
            Some(t) => table::register_table(ctx, layer.as_str(), &name, &t).await?,
            None => {
                let planned = validated.and_then(|v| {
                    v.tables
                        .iter()
                        .find(|(l, n, _)| l == layer.as_str() && *n == name)
                });
                if let Some((_, _, schema)) = planned {
                    let empty = datafusion::datasource::MemTable::try_new(
                        Arc::clone(schema),
                        vec![vec![]],
                    )?;
                    let reference =
                        datafusion::common::TableReference::partial(layer.as_str(), name.as_str());
                    ctx.deregister_table(reference.clone())?;
                    ctx.register_table(reference, Arc::new(empty))?;
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Runs the chosen layers of `pipeline` in order. Always returns a summary; the error, if
/// any, is also recorded in it.
pub async fn run_pipeline(
    pipeline: &Pipeline,
    options: &RunOptions,
) -> (RunSummary, Result<(), JobError>) {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mut tables = Vec::new();
    let result = run_layers(pipeline, options, started_at, &mut tables).await;
    let (status, code, error) = match &result {
        Ok(()) => (RunStatus::Succeeded, exit_code::SUCCESS, None),
        Err(e) => (RunStatus::Failed, e.exit_code(), Some(e.to_string())),
    };
    let summary = RunSummary {
        pipeline: pipeline.name().to_string(),
        run_id: options.run_id.clone(),
        status,
        exit_code: code,
        error,
        started_at: started_at.to_rfc3339(),
        duration_ms: elapsed_ms(started),
        layers: options
            .layers
            .iter()
            .map(|l| l.as_str().to_string())
            .collect(),
        tables,
    };
    let record = serde_json::to_value(&summary).unwrap_or_default();
    let key = run_record_key(pipeline, options);
    let written = match options.state.get(&key).await {
        Ok(started) => {
            options
                .state
                .put(&key, record, started.map(|s| s.version))
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, key, "could not record the run");
    }
    (summary, result)
}

fn run_record_key(pipeline: &Pipeline, options: &RunOptions) -> String {
    format!("{}/runs/{}", pipeline.name(), options.run_id)
}

/// Checks every store the run will touch, so that a missing bucket or state table, refused
/// credentials or an unreachable endpoint stop the run before anything is written.
async fn preflight(pipeline: &Pipeline, options: &RunOptions) -> Result<(), JobError> {
    options.state.check().await?;
    let mut locations = vec![pipeline.lake.clone()];
    if options.layers.contains(&Layer::Bronze) {
        for bronze in &pipeline.spec.bronze {
            locations.push(pipeline.files_source(bronze)?.root().clone());
        }
    }
    let mut checked = std::collections::HashSet::new();
    for location in locations {
        // One request per bucket tells whether it exists and the credentials work.
        let mut bucket = location.clone();
        bucket.set_path("/");
        if checked.insert(bucket.clone()) {
            medallion_engine::location::check_reachable(&location).await?;
        }
    }
    Ok(())
}

async fn run_layers(
    pipeline: &Pipeline,
    options: &RunOptions,
    started_at: chrono::DateTime<chrono::Utc>,
    tables: &mut Vec<TableSummary>,
) -> Result<(), JobError> {
    // Bad configuration and unusable stores fail here, before anything is written.
    let validated = crate::validate::validate(pipeline).await?;
    preflight(pipeline, options).await?;
    let started = serde_json::json!({
        "pipeline": pipeline.name(),
        "run_id": options.run_id,
        "status": "running",
        "started_at": started_at.to_rfc3339(),
        "layers": options.layers,
    });
    // An orchestrator's retry may reuse its run id: the record then starts over.
    let key = run_record_key(pipeline, options);
    let earlier = options.state.get(&key).await?.map(|r| r.version);
    options.state.put(&key, started, earlier).await?;
    // The lease owner is this process, not the run id: two processes given one run id (an
    // orchestrator retrying while the first attempt still runs) must not share a lease.
    let lease_owner = format!("{}#{}", options.run_id, uuid::Uuid::new_v4().simple());
    let ctx = session::new_session(&options.session)?;
    let run = RunContext {
        pipeline,
        validated,
        ctx,
        options,
        started_at,
        bars: MultiProgress::new(),
    };
    for layer in Layer::ALL
        .into_iter()
        .filter(|l| options.layers.contains(l))
    {
        // One run per layer at a time: a second run stops here (or waits) instead of
        // racing the first to the same commits.
        let lease = LeaseBuilder::new(
            Arc::clone(&options.state),
            format!("{}/leases/{}", pipeline.name(), layer.as_str()),
            &lease_owner,
        )
        .with_ttl(options.lease.ttl)
        .with_wait(options.lease.wait)
        .acquire()
        .await?;
        tracing::info!(
            layer = layer.as_str(),
            run_id = options.run_id,
            "layer started"
        );
        let outcome = match layer {
            Layer::Bronze => bronze::run(&run, tables).await,
            Layer::Silver => silver::run(&run, tables).await,
            Layer::Gold => gold::run(&run, tables).await,
        };
        let held = lease.ensure_held().await;
        // Released on failure too: a retry by the orchestrator need not wait out the lease.
        // A release that fails is not the run's failure: the lease then expires by itself.
        if let Err(e) = lease.release().await {
            tracing::warn!(layer = layer.as_str(), error = %e, "could not release the lease");
        }
        outcome?;
        held?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{DEFAULT_SLICE_ROWS, GoldOptions, MIN_SLICE_ROWS};

    #[test]
    fn a_memory_limit_lowers_the_default_slice_but_not_a_given_one() {
        let gib = 1024 * 1024 * 1024;
        let default = GoldOptions::default();
        assert_eq!(default.slice_rows(None), DEFAULT_SLICE_ROWS);
        assert_eq!(default.slice_rows(Some(8 * gib)), DEFAULT_SLICE_ROWS);
        assert_eq!(default.slice_rows(Some(2 * gib)), 1 << 20);
        assert_eq!(default.slice_rows(Some(1 << 20)), MIN_SLICE_ROWS);
        let given = GoldOptions {
            slice_rows: Some(5000),
        };
        assert_eq!(given.slice_rows(Some(2 * gib)), 5000);
    }
}
