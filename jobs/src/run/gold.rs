//! Gold: run each model's SQL over silver and replace its table, but only when a table the
//! model reads changed since it was last built: a rerun on the same input writes nothing, and
//! a batch that changes only some silver tables rebuilds only the models that read them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use datafusion::common::TableReference;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::LogicalPlan;
use medallion_connectors::state::{get_typed, put_typed};
use medallion_engine::deltalake::DeltaTable;
use medallion_engine::ops::OverwriteBuilder;
use medallion_engine::table;
use serde::{Deserialize, Serialize};

use super::{Layer, RunContext, elapsed_ms};
use crate::error::JobError;
use crate::pipeline::{GoldKind, GoldSpec, RebuildBy};
use crate::summary::TableSummary;

#[derive(Debug, Default, Serialize, Deserialize)]
struct GoldState {
    seq: i64,
    /// Delta versions of the lake tables the last build read, by `layer.table`. (Builds
    /// before models tracked their own inputs recorded every silver table, unqualified:
    /// such a state never matches, so the first build after an upgrade runs once more.)
    inputs: BTreeMap<String, u64>,
}

pub(crate) async fn run(run: &RunContext<'_>, out: &mut Vec<TableSummary>) -> Result<(), JobError> {
    run.register_tables().await?;
    let mut opened = BTreeMap::new();
    for spec in &run.pipeline.spec.gold {
        let name = spec.table.get_ref().clone();
        if let Some(summary) = run_model(run, spec, &mut opened)
            .await
            .map_err(|e| e.in_table("gold", &name))?
        {
            out.push(summary);
        }
    }
    Ok(())
}

/// The lake tables (`layer.table`) that `plan` scans, looking through the views it reads and
/// into its subqueries.
fn tables_read(plan: &LogicalPlan) -> BTreeSet<String> {
    fn walk(plan: &LogicalPlan, into: &mut BTreeSet<String>) {
        // The closure never fails; a walk of a plan cannot either.
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                match scan.source.get_logical_plan() {
                    Some(view) => walk(&view, into),
                    None => {
                        into.insert(scan.table_name.to_string());
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    let mut tables = BTreeSet::new();
    walk(plan, &mut tables);
    tables
}

/// The Delta version of each of `tables` (`layer.table`) that exists in the lake. Tables
/// outside gold, which no model writes, are opened once a run and kept in `opened`.
async fn versions_of(
    run: &RunContext<'_>,
    tables: &BTreeSet<String>,
    opened: &mut BTreeMap<String, Option<DeltaTable>>,
) -> Result<BTreeMap<String, u64>, JobError> {
    let version_of = |t: &Option<DeltaTable>| t.as_ref().map(|t| table::version(t).unwrap_or(0));
    let mut versions = BTreeMap::new();
    for qualified in tables {
        let Some((layer, name)) = qualified.split_once('.') else {
            continue;
        };
        let version = match opened.get(qualified) {
            Some(t) => version_of(t),
            None => {
                let t = table::open_table(&run.pipeline.table_url(layer, name)?).await?;
                let v = version_of(&t);
                if layer != Layer::Gold.as_str() {
                    opened.insert(qualified.clone(), t);
                }
                v
            }
        };
        if let Some(v) = version {
            versions.insert(qualified.clone(), v);
        }
    }
    Ok(versions)
}

/// The partitions (`column`, values) of a built gold table to rebuild, when its
/// `rebuild_by` input is the only one that changed since `built_from` and it changed few of
/// them; `None` to rebuild the whole table.
async fn partitions_to_rebuild(
    rebuild_by: &RebuildBy,
    built: &DeltaTable,
    built_from: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    opened: &BTreeMap<String, Option<DeltaTable>>,
) -> Result<Option<(String, BTreeSet<Option<String>>)>, JobError> {
    let column = &rebuild_by.column;
    let others_unchanged = built_from.len() == now.len()
        && now
            .iter()
            .all(|(t, v)| t == &rebuild_by.from || built_from.get(t) == Some(v));
    let partitioned = built
        .snapshot()
        .is_ok_and(|s| s.metadata().partition_columns().contains(column));
    // The source as its version in `now` was read: the model reads it, so it is open.
    let (Some(since), Some(Some(source))) = (
        built_from.get(&rebuild_by.from),
        opened.get(&rebuild_by.from),
    ) else {
        return Ok(None);
    };
    if !others_unchanged || !partitioned {
        return Ok(None);
    }
    let Some(changed) = table::partitions_changed_since(source, *since, column).await? else {
        return Ok(None);
    };
    // Past half of the table, one pass over everything costs less than a filtered one.
    let partitions = table::partition_values(built, column);
    Ok((changed.len() * 2 <= partitions.len()).then(|| (column.clone(), changed)))
}

/// `column IN (values…)` in SQL, with `OR column IS NULL` for a null partition.
fn partition_predicate(column: &str, values: &BTreeSet<Option<String>>) -> String {
    let column = format!("\"{}\"", column.replace('"', "\"\""));
    let listed: Vec<String> = values
        .iter()
        .flatten()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect();
    let mut terms = Vec::new();
    if !listed.is_empty() {
        terms.push(format!("{column} IN ({})", listed.join(", ")));
    }
    if values.contains(&None) {
        terms.push(format!("{column} IS NULL"));
    }
    terms.join(" OR ")
}

async fn run_model(
    run: &RunContext<'_>,
    spec: &GoldSpec,
    opened: &mut BTreeMap<String, Option<DeltaTable>>,
) -> Result<Option<TableSummary>, JobError> {
    let started = Instant::now();
    let name = spec.table.get_ref().clone();
    let df = run.ctx.sql(run.pipeline.sql(&spec.sql)?).await?;
    if spec.kind == GoldKind::View {
        let reference = TableReference::partial("gold", name.as_str());
        run.ctx.deregister_table(reference.clone())?;
        run.ctx.register_table(reference, df.into_view())?;
        return Ok(None);
    }
    let mut summary = TableSummary {
        layer: "gold".into(),
        table: name.clone(),
        ..TableSummary::default()
    };
    let url = run.pipeline.table_url("gold", &name)?;
    let key = run.state_key(Layer::Gold, &name);
    let (mut state, version) = get_typed::<GoldState>(run.state(), &key).await?;
    let existing = table::open_table(&url).await?;
    let read = tables_read(df.logical_plan());
    let inputs = versions_of(run, &read, opened).await?;
    if existing.is_some() && state.inputs == inputs {
        summary.skipped = Some(format!(
            "unchanged since last build: {}",
            read.into_iter().collect::<Vec<_>>().join(", ")
        ));
        summary.delta_version = existing.as_ref().and_then(table::version);
        summary.duration_ms = elapsed_ms(started);
        return Ok(Some(summary));
    }
    let scope = match (&spec.rebuild_by, &existing) {
        (Some(rebuild_by), Some(built)) => {
            partitions_to_rebuild(rebuild_by, built, &state.inputs, &inputs, opened).await?
        }
        _ => None,
    };
    if let Some((column, values)) = &scope
        && values.is_empty()
    {
        // The input's new version changed no file (a commit of metadata alone).
        state.inputs = inputs;
        put_typed(run.state(), &key, &state, version).await?;
        summary.skipped = Some(format!("no {column} partition of its input changed"));
        summary.delta_version = existing.as_ref().and_then(table::version);
        summary.duration_ms = elapsed_ms(started);
        return Ok(Some(summary));
    }
    let bar = run.progress(Layer::Gold, &name);
    bar.set_message("building");
    run.repartitions();
    let seq = state.seq + 1;
    let (source, replace_where) = match &scope {
        Some((column, values)) => {
            let predicate = partition_predicate(column, values);
            tracing::info!(
                table = name,
                partitions = values.len(),
                predicate,
                "rebuilding only the partitions its changed input touched"
            );
            let filter = df.parse_sql_expr(&predicate)?;
            (df.filter(filter)?, Some(predicate))
        }
        None => (df, None),
    };
    let mut overwrite = OverwriteBuilder::new(url.clone(), source)
        .with_partition_columns(spec.partition_by.clone())
        .with_transaction(run.transaction(Layer::Gold, &name, seq));
    if let Some(predicate) = replace_where {
        overwrite = overwrite.with_replace_where(predicate);
    }
    let metrics = overwrite.execute().await?;
    state.seq = seq;
    state.inputs = inputs;
    put_typed(run.state(), &key, &state, version).await?;
    bar.finish_and_clear();
    let mut rows_written = metrics.rows_inserted;
    if let Some(t) = table::open_table(&url).await? {
        table::register_table(&run.ctx, "gold", &name, &t).await?;
        summary.table_bytes = table::data_files(&t).0;
        if let Some((column, values)) = &scope {
            rows_written = table::rows_in_partitions(&t, column, values);
            summary.partitions_rebuilt = Some(values.len() as u64);
        }
    }
    summary.rows_read = rows_written;
    summary.rows_written = rows_written;
    summary.files_written = metrics.files_added;
    summary.delta_version = metrics.version;
    summary.duration_ms = elapsed_ms(started);
    summary.repartitions = run.repartitions();
    tracing::info!(table = name, rows = summary.rows_written, version = ?summary.delta_version, "gold written");
    Ok(Some(summary))
}
