//! Silver: check, shape, deduplicate and upsert the bronze rows not yet processed.
//!
//! The batch is the bronze rows with `_ingest_ts` in `(watermark, upper]`, where `upper` is
//! fixed (and recorded as pending) before anything is written: a rerun after a crash redoes
//! exactly that batch, and the transaction ids of the quarantine append and the MERGE make
//! each write happen once.

use std::time::Instant;

use datafusion::common::ScalarValue;
use datafusion::prelude::{DataFrame, col, lit};
use medallion_connectors::state::{get_typed, put_typed};
use medallion_engine::dedup::DedupBuilder;
use medallion_engine::ops::{AppendBuilder, UpsertBuilder};
use medallion_engine::session::sql_with_table;
use medallion_engine::table;
use medallion_quality::{Action, DQ_RULE_COLUMN, RuleSet};
use serde::{Deserialize, Serialize};

use super::bronze::{INGEST_DATE, INGEST_TS, RUN_ID};
use super::{Layer, RunContext, elapsed_ms};
use crate::error::JobError;
use crate::pipeline::SilverSpec;
use crate::summary::TableSummary;

/// Name under which the valid rows of the batch are visible to a table's SQL.
pub const INPUT_RELATION: &str = "input";
/// In quarantine rows, the bronze `_run_id` (the run that ingested the row).
pub const INGEST_RUN_ID: &str = "_ingest_run_id";
/// Tie-break columns every silver table carries, after its `keep_latest_by` columns.
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
    let (seq, upper) = match &state.pending {
        Some(p) => (p.seq, p.upper),
        None => {
            let max = after_watermark(bronze.clone())?
                .aggregate(
                    vec![],
                    vec![datafusion::functions_aggregate::expr_fn::max(col(INGEST_TS)).alias("m")],
                )?
                .collect()
                .await?;
            let upper = max
                .first()
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
            (seq, upper)
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
        .await?
        .cache()
        .await?;
    tracing::debug!(
        table = name,
        ms = elapsed_ms(started),
        "rules applied and batch cached"
    );
    let results = rules.results(&run.ctx, &checked).await?;
    summary.rows_read = checked.clone().count().await? as u64;
    tracing::debug!(
        table = name,
        ms = elapsed_ms(started),
        "rule results counted"
    );
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
    if summary.rows_quarantined > 0 {
        bar.set_message(format!("quarantining {} rows", summary.rows_quarantined));
        let quarantined = quarantine_rows(
            checked.clone().filter(col(DQ_RULE_COLUMN).is_not_null())?,
            spec,
            &run.options.run_id,
        )?;
        let schema = std::sync::Arc::new(quarantined.schema().as_arrow().clone());
        let mut staged = AppendBuilder::new(q_url.clone(), schema)
            .with_partition_columns([INGEST_DATE])
            .with_target_file_size(run.pipeline.target_file_size())
            .stage()?;
        for b in quarantined.collect().await? {
            staged.write(b).await?;
        }
        let metrics = staged
            .commit(Some(&run.transaction(Layer::Silver, &quarantine_name, seq)))
            .await?;
        quarantine_summary.rows_written = metrics.rows_inserted;
        quarantine_summary.files_written = metrics.files_added;
        quarantine_summary.delta_version = metrics.version;
        if let Some(t) = table::open_table(&q_url).await? {
            quarantine_summary.table_bytes = table::data_files(&t).0;
        }
    } else {
        quarantine_summary.skipped = Some("no quarantined rows".into());
        if table::open_table(&q_url).await?.is_none() {
            // Readers find the quarantine table of every entity, empty until a row fails.
            let empty = quarantine_rows(
                checked.clone().limit(0, Some(0))?,
                spec,
                &run.options.run_id,
            )?;
            let schema = std::sync::Arc::new(empty.schema().as_arrow().clone());
            let created = AppendBuilder::new(q_url.clone(), schema)
                .with_partition_columns([INGEST_DATE])
                .stage()?
                .commit(None)
                .await?;
            quarantine_summary.delta_version = created.version;
        }
    }

    tracing::debug!(table = name, ms = elapsed_ms(started), "quarantine written");
    bar.set_message("shaping and merging");
    let valid = checked
        .filter(col(DQ_RULE_COLUMN).is_null())?
        .drop_columns(&[DQ_RULE_COLUMN])?;
    let deduped = shape_and_dedup(run, spec, valid).await?;
    let url = run.pipeline.table_url("silver", &name)?;
    let mut winner_order = spec.keep_latest_by.clone();
    winner_order.extend(TIE_BREAK.iter().map(|s| (*s).to_string()));
    let metrics = UpsertBuilder::new(url.clone(), deduped, spec.key.clone())
        .with_winner_order(winner_order)
        .with_partition_columns(spec.partition_by.clone())
        .with_transaction(run.transaction(Layer::Silver, &name, seq))
        .execute()
        .await?;
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

/// Quarantine rows: the bronze columns and `_dq_rule`, with `_run_id` naming the run that
/// quarantined them and the bronze run id kept as `_ingest_run_id`.
fn quarantine_rows(
    failed: DataFrame,
    spec: &SilverSpec,
    run_id: &str,
) -> Result<DataFrame, JobError> {
    let derived: Vec<&str> = spec
        .derive
        .iter()
        .map(|d| d.get_ref().name.as_str())
        .collect();
    Ok(failed
        .drop_columns(&derived)?
        .with_column(INGEST_RUN_ID, col(RUN_ID))?
        .with_column(RUN_ID, lit(run_id))?)
}

/// Runs the table's SQL over `valid` (as `input`) and keeps one row per key: the greatest
/// `keep_latest_by` (nulls lose), then the row seen last.
pub(crate) async fn shape_and_dedup(
    run: &RunContext<'_>,
    spec: &SilverSpec,
    valid: DataFrame,
) -> Result<DataFrame, JobError> {
    let sql = run.pipeline.sql(&spec.sql)?;
    let shaped = sql_with_table(&run.ctx, INPUT_RELATION, valid, sql).await?;
    dedup(&run.ctx, shaped, spec).await
}

pub(crate) async fn dedup(
    ctx: &datafusion::prelude::SessionContext,
    shaped: DataFrame,
    spec: &SilverSpec,
) -> Result<DataFrame, JobError> {
    let mut order = spec.keep_latest_by.clone();
    order.extend(TIE_BREAK.iter().map(|s| (*s).to_string()));
    Ok(DedupBuilder::new(shaped, spec.key.clone())
        .with_winner_order(order)
        .with_cluster_by(spec.partition_by.clone())
        .with_output_partitions(ctx.copied_config().target_partitions())
        .execute(ctx)
        .await?)
}
