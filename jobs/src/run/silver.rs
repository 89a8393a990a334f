//! Silver: check, shape, deduplicate and upsert the bronze rows not yet processed.
//!
//! The batch is the bronze rows with `_ingest_ts` in `(watermark, upper]`, where `upper` is
//! fixed (and recorded as pending) before anything is written: a rerun after a crash redoes
//! exactly that batch, and the transaction ids of the quarantine append and the MERGE make
//! each write happen once.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::{ArrayRef, AsArray as _, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use futures::StreamExt as _;

use datafusion::common::ScalarValue;
use datafusion::prelude::{DataFrame, col, lit};
use medallion_connectors::state::{get_typed, put_typed};
use medallion_engine::dedup::{DedupBuilder, Deduplicated};
use medallion_engine::ops::{AppendBuilder, CommitMetrics, UpsertBuilder};
use medallion_engine::session::sql_with_table;
use medallion_engine::table;
use medallion_quality::{Action, DQ_RULE_COLUMN, RuleSet, RuleTally};
use serde::{Deserialize, Serialize};

use super::bronze::{INGEST_DATE, INGEST_TS, RUN_ID};
use super::{Layer, RunContext, elapsed_ms};
use crate::error::JobError;
use crate::pipeline::{Keep, SilverSpec};
use crate::summary::TableSummary;

/// Name under which the valid rows of the batch are visible to a table's SQL.
pub const INPUT_RELATION: &str = "input";
/// In quarantine rows, the bronze `_run_id` (the run that ingested the row).
pub const INGEST_RUN_ID: &str = "_ingest_run_id";
/// Tie-break columns every silver table that keeps the latest row carries, after its
/// `keep_latest_by` columns.
pub const TIE_BREAK: [&str; 2] = [
    medallion_connectors::files::SOURCE_FILE,
    medallion_connectors::files::SOURCE_LINE,
];

#[derive(Debug, Default, Serialize, Deserialize)]
struct SilverState {
    seq: i64,
    /// Greatest bronze `_ingest_ts` (microseconds) processed.
    watermark: Option<i64>,
    pending: Option<PendingBatch>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingBatch {
    seq: i64,
    upper: i64,
}

pub(crate) async fn run(run: &RunContext<'_>, out: &mut Vec<TableSummary>) -> Result<(), JobError> {
    for spec in &run.pipeline.spec.silver {
        let name = spec.table.get_ref().clone();
        let summary = run_table(run, spec)
            .await
            .map_err(|e| e.in_table("silver", &name))?;
        out.extend(summary);
    }
    Ok(())
}

fn ts_literal(micros: i64) -> datafusion::prelude::Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(micros),
        Some("UTC".into()),
    ))
}

async fn run_table(run: &RunContext<'_>, spec: &SilverSpec) -> Result<Vec<TableSummary>, JobError> {
    let started = Instant::now();
    let name = spec.table.get_ref().clone();
    let quarantine_name = spec.quarantine_table();
    let mut summary = TableSummary {
        layer: "silver".into(),
        table: name.clone(),
        ..TableSummary::default()
    };
    // Rules and SQL may read other silver tables (written earlier in this run).
    run.register_tables().await?;
    run.repartitions();
    let bronze_url = run.pipeline.table_url("bronze", &spec.from)?;
    if table::open_table(&bronze_url).await?.is_none() {
        summary.skipped = Some(format!("bronze.{} has no data yet", spec.from));
        summary.duration_ms = elapsed_ms(started);
        return Ok(vec![summary]);
    }
    let key = run.state_key(Layer::Silver, &name);
    let (mut state, mut state_version) = get_typed::<SilverState>(run.state(), &key).await?;
    let bronze = run.ctx.table(format!("bronze.{}", spec.from)).await?;
    let watermark = state.watermark;
    let after_watermark = move |df: DataFrame| -> Result<DataFrame, JobError> {
        Ok(match watermark {
            // The date bound prunes whole `_ingest_date` partitions before the row filter.
            Some(w) => df.filter(col(INGEST_TS).gt(ts_literal(w)).and(col(INGEST_DATE).gt_eq(
                lit(ScalarValue::Date32(Some(
                    i32::try_from(w.div_euclid(86_400_000_000)).unwrap_or(0),
                ))),
            )))?,
            None => df,
        })
    };
    // The batch's row count sizes the dedup's index once; a rerun of a pending batch goes
    // without (0).
    let (seq, upper, expected_rows) = match &state.pending {
        Some(p) => (p.seq, p.upper, 0),
        None => {
            let max = after_watermark(bronze.clone())?
                .aggregate(
                    vec![],
                    vec![
                        datafusion::functions_aggregate::expr_fn::max(col(INGEST_TS)).alias("m"),
                        datafusion::functions_aggregate::expr_fn::count(lit(1)).alias("n"),
                    ],
                )?
                .collect()
                .await?;
            // One row: the greatest `_ingest_ts` (null when nothing is new) and the count.
            let totals = max.first();
            let rows = totals
                .and_then(|b| {
                    b.column(1)
                        .as_primitive_opt::<arrow::datatypes::Int64Type>()
                })
                .map_or(0, |n| usize::try_from(n.value(0)).unwrap_or(0));
            let upper = totals
                .map(|b| ScalarValue::try_from_array(b.column(0), 0))
                .transpose()?
                .and_then(|v| match v {
                    ScalarValue::TimestampMicrosecond(m, _) => m,
                    _ => None,
                });
            let Some(upper) = upper else {
                summary.skipped = Some("no new bronze rows".into());
                summary.duration_ms = elapsed_ms(started);
                return Ok(vec![summary]);
            };
            let seq = state.seq + 1;
            state.pending = Some(PendingBatch { seq, upper });
            state_version = Some(put_typed(run.state(), &key, &state, state_version).await?);
            (seq, upper, rows)
        }
    };
    let bar = run.progress(Layer::Silver, &name);
    bar.set_message("checking rules");

    let batch = with_derived(
        &run.ctx,
        after_watermark(bronze)?.filter(col(INGEST_TS).lt_eq(ts_literal(upper)))?,
        spec,
    )
    .await?;
    let rules = RuleSet::new(spec.rules())?;
    let checked = rules
        .apply(
            &run.ctx,
            batch,
            Some(medallion_connectors::files::CORRUPT_RECORD),
        )
        .await?;
    // One pass: the checked rows stream into the shaping SQL and the dedup, and on their way
    // the rows that failed a rule are counted and kept aside for quarantine. Nothing of the
    // batch is cached, and the rules (and a JSON parse) run once per row.
    let router = Arc::new(Mutex::new(Router::default()));
    let valid = route_checked_rows(&run.ctx, checked.clone(), Arc::clone(&router)).await?;
    bar.set_message("shaping and deduplicating");
    let url = run.pipeline.table_url("silver", &name)?;
    // A first write reads the winners once (a MERGE reads them twice), so the dedup can free
    // each bucket as the write takes its rows. The table opened here is the MERGE's target.
    let target = table::open_table(&url).await?;
    let deduped = shape_and_dedup(run, spec, valid, target.is_none(), expected_rows).await?;
    summary.spilled_bytes = deduped.spilled_bytes;
    // A first-arrival dedup runs the batch while the table is written, so the rules' tally and
    // the quarantined rows are complete only after that write: the table is committed before
    // its quarantine. If the run stops between the two, the rerun of the pending batch finds
    // the table's commit made (and skips it) and writes the quarantine.
    let rows = if deduped.streaming {
        bar.set_message("writing");
        // A streamed dedup is a first write's: there is no target.
        SilverRows::Written(upsert(run, spec, &url, deduped, None, seq).await?)
    } else {
        SilverRows::Held(deduped)
    };
    tracing::debug!(
        table = name,
        ms = elapsed_ms(started),
        "rules applied, valid rows shaped and deduplicated"
    );
    let Router { tally, quarantined } = std::mem::take(
        &mut *router
            .lock()
            .map_err(|_| JobError::Internal("the row router was poisoned".into()))?,
    );
    let mut results = rules.results_from_tally(&tally);
    if rules.has_warnings() {
        let counted = rules.results(&run.ctx, &checked).await?;
        for (r, c) in results.iter_mut().zip(counted) {
            if r.action == Action::Warn {
                r.failed_rows = c.failed_rows;
            }
        }
    }
    summary.rows_read = tally.rows();
    for r in &results {
        if r.action == Action::Fail && r.failed_rows > 0 {
            return Err(JobError::DataQuality {
                table: format!("silver.{name}"),
                rule: r.rule.clone(),
                rows: r.failed_rows,
            });
        }
        if r.action == Action::Warn && r.failed_rows > 0 {
            tracing::warn!(
                table = name,
                rule = r.rule,
                rows = r.failed_rows,
                "quality rule failed (warn)"
            );
        }
    }
    summary.rows_quarantined = results
        .iter()
        .filter(|r| r.action == Action::Quarantine)
        .map(|r| r.failed_rows)
        .sum();
    summary.rules = results;

    let mut quarantine_summary = TableSummary {
        layer: "silver".into(),
        table: quarantine_name.clone(),
        rows_read: summary.rows_quarantined,
        ..TableSummary::default()
    };
    let q_url = run.pipeline.table_url("silver", &quarantine_name)?;
    let derived: Vec<String> = spec
        .derive
        .iter()
        .map(|d| d.get_ref().name.clone())
        .collect();
    let quarantine =
        QuarantineShape::new(checked.schema().as_arrow(), &derived, &run.options.run_id);
    let q_exists = table::open_table(&q_url).await?.is_some();
    if summary.rows_quarantined > 0 || !q_exists {
        let mut staged_q = AppendBuilder::new(q_url.clone(), Arc::clone(&quarantine.schema))
            .with_partition_columns([INGEST_DATE])
            .with_target_file_size(run.pipeline.target_file_size())
            .with_compression(run.pipeline.compression())
            .stage()?;
        for rows in &quarantined {
            staged_q.write(quarantine.project(rows)?).await?;
        }
        // Readers find the quarantine table of every entity, empty until a row fails.
        let txn = (summary.rows_quarantined > 0)
            .then(|| run.transaction(Layer::Silver, &quarantine_name, seq));
        let metrics = staged_q.commit(txn.as_ref()).await?;
        quarantine_summary.rows_written = metrics.rows_inserted;
        quarantine_summary.files_written = metrics.files_added;
        quarantine_summary.delta_version = metrics.version;
        if let Some(t) = table::open_table(&q_url).await? {
            quarantine_summary.table_bytes = table::data_files(&t).0;
        }
    }
    if summary.rows_quarantined == 0 {
        quarantine_summary.skipped = Some("no quarantined rows".into());
    }

    tracing::debug!(table = name, ms = elapsed_ms(started), "quarantine written");
    let metrics = match rows {
        SilverRows::Written(metrics) => metrics,
        SilverRows::Held(deduped) => {
            bar.set_message("merging");
            upsert(run, spec, &url, deduped, target, seq).await?
        }
    };
    state.seq = seq;
    state.watermark = Some(upper);
    state.pending = None;
    put_typed(run.state(), &key, &state, state_version).await?;
    bar.finish_and_clear();

    summary.rows_written = metrics.rows_inserted;
    summary.rows_updated = metrics.rows_updated;
    summary.files_written = metrics.files_added;
    summary.delta_version = metrics.version;
    if let Some(t) = table::open_table(&url).await? {
        summary.table_bytes = table::data_files(&t).0;
    }
    if metrics.already_committed {
        summary.skipped = Some("already committed by an interrupted run".into());
    }
    summary.duration_ms = elapsed_ms(started);
    summary.repartitions = run.repartitions();
    quarantine_summary.duration_ms = summary.duration_ms;
    tracing::info!(
        table = name,
        read = summary.rows_read,
        quarantined = summary.rows_quarantined,
        inserted = summary.rows_written,
        updated = summary.rows_updated,
        "silver merged"
    );
    Ok(vec![summary, quarantine_summary])
}

/// A batch's silver rows once deduplicated: already written (a streamed first load, whose
/// quarantine is known only after the write) or held for the write after the quarantine.
enum SilverRows {
    Written(CommitMetrics),
    Held(Deduplicated),
}

/// Upserts the deduplicated rows into the silver table (a first write appends them) under
/// the batch's transaction.
async fn upsert(
    run: &RunContext<'_>,
    spec: &SilverSpec,
    url: &url::Url,
    deduped: Deduplicated,
    target: Option<deltalake::DeltaTable>,
    seq: i64,
) -> Result<CommitMetrics, JobError> {
    let name = spec.table.get_ref();
    let rows_in = deduped.rows_in;
    let mut upsert = UpsertBuilder::new(url.clone(), deduped.rows, spec.key.clone())
        .with_source_key_nulls(deduped.has_null_key)
        .with_winner_order(winner_order(spec))
        .with_partition_columns(spec.partition_by.clone())
        .with_compression(run.pipeline.compression())
        .with_transaction(run.transaction(Layer::Silver, name, seq));
    if let Some(columns) = &spec.stats_columns {
        upsert = upsert.with_stats_columns(columns.clone());
    }
    if let Some(opened) = target {
        upsert = upsert.with_target(opened);
    }
    if let Some(rows) = rows_in {
        upsert = upsert.with_source_rows_at_most(rows);
    }
    Ok(upsert.execute().await?)
}

/// Adds the spec's derived columns to the bronze rows, in declared order.
pub(crate) async fn with_derived(
    ctx: &datafusion::prelude::SessionContext,
    bronze: DataFrame,
    spec: &SilverSpec,
) -> Result<DataFrame, JobError> {
    const BRONZE: &str = "__medallion_bronze";
    let mut df = bronze;
    for d in &spec.derive {
        let d = d.get_ref();
        let sql = format!(
            "SELECT *, {} AS \"{}\" FROM {BRONZE}",
            d.expr,
            d.name.replace('"', "\"\"")
        );
        df = sql_with_table(ctx, BRONZE, df, &sql).await?;
    }
    Ok(df)
}

/// What the checked rows left behind on their way to the shaping SQL.
#[derive(Debug, Default)]
struct Router {
    tally: RuleTally,
    /// Rows that failed a rule (all checked columns); a small share of a batch.
    quarantined: Vec<RecordBatch>,
}

/// A table over the checked rows without `_dq_rule`, streaming from `checked`'s execution:
/// every batch is tallied and its failed rows set aside in `router` as it passes. Each
/// partition can be read once. A table scan also fences the optimizer: no expression of the
/// rules (a `json_tuple` parse) is copied into the SQL that reads the rows.
async fn route_checked_rows(
    ctx: &datafusion::prelude::SessionContext,
    checked: DataFrame,
    router: Arc<Mutex<Router>>,
) -> Result<DataFrame, JobError> {
    use datafusion::catalog::streaming::StreamingTable;
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    let plan = checked.create_physical_plan().await?;
    let in_schema = plan.schema();
    let dq = in_schema
        .index_of(DQ_RULE_COLUMN)
        .map_err(datafusion::error::DataFusionError::from)?;
    let keep: Vec<usize> = (0..in_schema.fields().len()).filter(|i| *i != dq).collect();
    let out_schema: SchemaRef = Arc::new(
        in_schema
            .project(&keep)
            .map_err(datafusion::error::DataFusionError::from)?,
    );
    let streams = datafusion::physical_plan::execute_stream_partitioned(plan, ctx.task_ctx())?;
    let partitions = streams
        .into_iter()
        .map(|stream| {
            let (router, keep, schema) =
                (Arc::clone(&router), keep.clone(), Arc::clone(&out_schema));
            let valid = stream.map(move |batch| {
                let batch = batch?;
                let external = |e: String| datafusion::error::DataFusionError::Execution(e);
                let mut r = router
                    .lock()
                    .map_err(|_| external("the row router was poisoned".into()))?;
                let failed = r.tally.add(&batch).map_err(|e| external(e.to_string()))?;
                if failed.true_count() > 0 {
                    // Compacted: the few failed rows would otherwise hold every decoded page
                    // of the batch until the quarantine is written.
                    r.quarantined.push(medallion_engine::dedup::compact_views(
                        arrow::compute::filter_record_batch(&batch, &failed)?,
                    )?);
                }
                drop(r);
                let passed = arrow::compute::not(&failed)?;
                Ok(arrow::compute::filter_record_batch(&batch, &passed)?.project(&keep)?)
            });
            Arc::new(OneShotPartition {
                schema: Arc::clone(&schema),
                stream: Mutex::new(Some(Box::pin(RecordBatchStreamAdapter::new(schema, valid)))),
            }) as Arc<dyn datafusion::physical_plan::streaming::PartitionStream>
        })
        .collect();
    let table = StreamingTable::try_new(out_schema, partitions)?;
    Ok(ctx.read_table(Arc::new(table))?)
}

/// A partition of a [`StreamingTable`](datafusion::catalog::streaming::StreamingTable) that
/// yields an already running stream, once.
struct OneShotPartition {
    schema: SchemaRef,
    stream: Mutex<Option<datafusion::execution::SendableRecordBatchStream>>,
}

impl std::fmt::Debug for OneShotPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneShotPartition").finish_non_exhaustive()
    }
}

impl datafusion::physical_plan::streaming::PartitionStream for OneShotPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        _ctx: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::execution::SendableRecordBatchStream {
        let taken = self.stream.lock().ok().and_then(|mut s| s.take());
        taken.unwrap_or_else(|| {
            let schema = Arc::clone(&self.schema);
            let failed = futures::stream::once(async {
                Err(datafusion::error::DataFusionError::Internal(
                    "a one-shot partition was read twice".into(),
                ))
            });
            Box::pin(
                datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, failed),
            )
        })
    }
}

/// Quarantine rows: the bronze columns and `_dq_rule`, with `_run_id` naming the run that
/// quarantined them and the bronze run id kept as `_ingest_run_id`; derived columns dropped.
struct QuarantineShape {
    schema: SchemaRef,
    /// Index in the checked batch of each output column but the last (`_ingest_run_id`).
    sources: Vec<usize>,
    run_id_at: Option<usize>,
    run_id: String,
}

impl QuarantineShape {
    fn new(checked: &Schema, derived: &[String], run_id: &str) -> Self {
        let mut fields = Vec::new();
        let mut sources = Vec::new();
        let mut run_id_at = None;
        for (i, f) in checked.fields().iter().enumerate() {
            if derived.contains(f.name()) {
                continue;
            }
            if f.name() == RUN_ID {
                run_id_at = Some(i);
            }
            fields.push(f.as_ref().clone());
            sources.push(i);
        }
        if let Some(i) = run_id_at {
            fields.push(checked.field(i).clone().with_name(INGEST_RUN_ID));
        }
        Self {
            schema: Arc::new(Schema::new(fields)),
            sources,
            run_id_at,
            run_id: run_id.to_string(),
        }
    }

    fn project(&self, rows: &RecordBatch) -> Result<RecordBatch, JobError> {
        let n = rows.num_rows();
        let this_run = arrow::compute::cast(
            &StringArray::from_iter_values(std::iter::repeat_n(&self.run_id, n)),
            self.run_id_at
                .map_or(&DataType::Utf8, |i| rows.schema_ref().field(i).data_type()),
        )
        .map_err(datafusion::error::DataFusionError::from)?;
        let mut columns: Vec<ArrayRef> = self
            .sources
            .iter()
            .map(|i| {
                if Some(*i) == self.run_id_at {
                    Arc::clone(&this_run)
                } else {
                    Arc::clone(rows.column(*i))
                }
            })
            .collect();
        if let Some(i) = self.run_id_at {
            columns.push(Arc::clone(rows.column(i)));
        }
        // A plan may produce a string column as Utf8View where its schema says Utf8.
        for (column, field) in columns.iter_mut().zip(self.schema.fields()) {
            if column.data_type() != field.data_type() {
                *column = arrow::compute::cast(column, field.data_type())
                    .map_err(datafusion::error::DataFusionError::from)?;
            }
        }
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)
            .map_err(datafusion::error::DataFusionError::from)?)
    }
}

/// Runs the table's SQL over `valid` (as `input`) and keeps one row per key: the greatest
/// `keep_latest_by` (nulls lose), then the row seen last.
pub(crate) async fn shape_and_dedup(
    run: &RunContext<'_>,
    spec: &SilverSpec,
    valid: DataFrame,
    read_once: bool,
    expected_rows: usize,
) -> Result<Deduplicated, JobError> {
    let sql = run.pipeline.sql(&spec.sql)?;
    let shaped = sql_with_table(&run.ctx, INPUT_RELATION, valid, sql).await?;
    if tracing::enabled!(tracing::Level::TRACE) {
        let plan = shaped.clone().into_optimized_plan()?;
        tracing::trace!(table = spec.table.get_ref(), plan = %plan.display_indent(), "shaped plan");
    }
    dedup(&run.ctx, shaped, spec, read_once, expected_rows).await
}

/// The tie-break columns a table's SQL must select: [`TIE_BREAK`], or none under
/// `keep = "any"`, whose copies of a key are alike, so the table's row stays.
pub(crate) fn tie_break(spec: &SilverSpec) -> &'static [&'static str] {
    match spec.keep {
        Keep::Latest => &TIE_BREAK,
        Keep::Any => &[],
    }
}

/// The columns that decide which row a key keeps, in the batch and against the table alike:
/// `keep_latest_by` (empty under `keep = "any"`), then the tie-break.
fn winner_order(spec: &SilverSpec) -> Vec<String> {
    let mut order = spec.keep_latest_by.clone();
    order.extend(tie_break(spec).iter().map(|s| (*s).to_string()));
    order
}

/// Whether any row of a key may stay, and may be written before the rules' results are known:
/// `keep = "any"` and no `fail` rule, which must pass before anything is written.
fn any_copy(spec: &SilverSpec) -> bool {
    spec.keep == Keep::Any
        && spec
            .rules
            .iter()
            .all(|r| r.get_ref().action != Action::Fail)
}

pub(crate) async fn dedup(
    ctx: &datafusion::prelude::SessionContext,
    shaped: DataFrame,
    spec: &SilverSpec,
    read_once: bool,
    expected_rows: usize,
) -> Result<Deduplicated, JobError> {
    Ok(DedupBuilder::new(shaped, spec.key.clone())
        .with_winner_order(winner_order(spec))
        .with_cluster_by(spec.partition_by.clone())
        .with_output_partitions(ctx.copied_config().target_partitions())
        .with_read_once(read_once)
        .with_expected_rows(expected_rows)
        .with_first_arrival(any_copy(spec))
        .execute(ctx)
        .await?)
}
