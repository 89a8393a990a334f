//! Gold: run each model's SQL over silver and replace its table, but only when a table the
//! model reads changed since it was last built: a rerun on the same input writes nothing, and
//! a batch that changes only some silver tables rebuilds only the models that read them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Column, JoinType, NullEquality, TableReference};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::functions::expr_fn::coalesce;
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalPlanBuilder, Operator, binary_expr, cast, col, lit, not,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::DataFrame;
use futures::{StreamExt as _, TryStreamExt as _};
use medallion_connectors::state::{get_typed, put_typed};
use medallion_engine::deltalake::DeltaTable;
use medallion_engine::ops::OverwriteBuilder;
use medallion_engine::{session, table};
use serde::{Deserialize, Serialize};

use super::{Layer, RunContext, elapsed_ms};
use crate::error::JobError;
use crate::pipeline::{
    CHANGED_ROWS, CHANGED_SCHEMA, DELETED, GoldKind, GoldSpec, Incremental, RebuildBy,
    RebuildThrough,
};
use crate::summary::TableSummary;

#[derive(Debug, Default, Serialize, Deserialize)]
struct GoldState {
    seq: i64,
    /// What the table was built by: see [`definition_of`]. A build recorded without one
    /// never matches, so it is rebuilt whole once.
    #[serde(default)]
    definition: String,
    /// Delta versions of the lake tables the last build read, by `layer.table`. (Builds
    /// before models tracked their own inputs recorded every silver table, unqualified:
    /// such a state never matches, so the first build after an upgrade runs once more.)
    inputs: BTreeMap<String, u64>,
}

pub(crate) async fn run(run: &RunContext<'_>, out: &mut Vec<TableSummary>) -> Result<(), JobError> {
    run.register_tables().await?;
    let mut opened = BTreeMap::new();
    let mut views = Vec::new();
    // Silver does not change while gold runs: a step of one model's incremental script over
    // the same changed rows is the same table in the next model's.
    let kept = session::KeptSteps::default();
    for spec in &run.pipeline.spec.gold {
        let name = spec.table.get_ref().clone();
        if let Some(summary) = run_model(run, spec, &mut opened, &mut views, &kept)
            .await
            .map_err(|e| e.in_table("gold", &name))?
        {
            out.push(summary);
        }
    }
    Ok(())
}

/// A digest of what a model's table is built by: its SQL, `other_sql` (the SQL of the views
/// declared before it, which it may read, of its `through` queries and of its `incremental`
/// key and query) and its partition columns. A table built by another definition is rebuilt
/// whole, even when no input changed.
fn definition_of(sql: &str, other_sql: &[String], partition_by: &[String]) -> String {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    for part in other_sql.iter().map(String::as_str).chain([sql]) {
        digest.update(part.len().to_le_bytes());
        digest.update(part.as_bytes());
    }
    digest.update(partition_by.join("\0").as_bytes());
    digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The lake tables (`layer.table`) that `plan` scans, looking through the views it reads and
/// into its subqueries.
pub(crate) fn tables_read(plan: &LogicalPlan) -> BTreeSet<String> {
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

/// What a build with `rebuild_by` replaces of its table.
enum Scope {
    /// The partitions whose `column` holds one of `values`.
    Partitions {
        column: String,
        values: BTreeSet<Option<String>>,
    },
    /// The rows whose `column` holds one of the values of `keys` (one column, [`KEY`]).
    Keys {
        column: String,
        keys: Vec<RecordBatch>,
        count: u64,
    },
}

/// The changed values in a [`Scope::Keys`], as a column of its own name.
const KEY: &str = "__medallion_rebuild_key";

impl Scope {
    fn is_empty(&self) -> bool {
        match self {
            Scope::Partitions { values, .. } => values.is_empty(),
            Scope::Keys { count, .. } => *count == 0,
        }
    }

    fn column(&self) -> &str {
        match self {
            Scope::Partitions { column, .. } | Scope::Keys { column, .. } => column,
        }
    }
}

/// What of a built gold table to rebuild, when only its `rebuild_by` inputs changed since
/// `built_from` and they changed at most half of it; `None` to rebuild the whole table.
async fn scope_of_rebuild(
    run: &RunContext<'_>,
    rebuild_by: &RebuildBy,
    model: &DataFrame,
    built: &DeltaTable,
    built_from: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    opened: &BTreeMap<String, Option<DeltaTable>>,
) -> Result<Option<Scope>, JobError> {
    let column = &rebuild_by.column;
    let same_inputs =
        built_from.len() == now.len() && now.keys().all(|t| built_from.contains_key(t));
    let changed: Vec<&String> = now
        .iter()
        .filter(|(t, v)| built_from.get(*t) != Some(v))
        .map(|(t, _)| t)
        .collect();
    let by_partition = built
        .snapshot()
        .is_ok_and(|s| s.metadata().partition_columns().contains(column));
    let through = |t: &String| {
        rebuild_by
            .through
            .iter()
            .find(|through| &through.table == t)
            .filter(|_| !by_partition)
    };
    if !same_inputs
        || changed
            .iter()
            .any(|t| !rebuild_by.from.contains(t) && through(t).is_none())
    {
        return Ok(None);
    }
    // Each changed input as its version in `now` was read: the model reads it, so it is open.
    let mut sources = Vec::new();
    for t in changed {
        let (Some(since), Some(Some(source))) = (built_from.get(t), opened.get(t)) else {
            return Ok(None);
        };
        sources.push((*since, source, through(t)));
    }
    if by_partition {
        let mut values = BTreeSet::new();
        for (since, source, _) in sources {
            let Some(changed) = table::partitions_changed_since(source, since, column).await?
            else {
                return Ok(None);
            };
            values.extend(changed);
        }
        // Past half of the table, one pass over everything costs less than a filtered one.
        let partitions = table::partition_values(built, column);
        return Ok(
            (values.len() * 2 <= partitions.len()).then(|| Scope::Partitions {
                column: column.clone(),
                values,
            }),
        );
    }
    let key_type = model
        .schema()
        .field_with_unqualified_name(column)?
        .data_type()
        .clone();
    let key_schema = Arc::new(Schema::new(vec![Field::new(KEY, key_type.clone(), true)]));
    // Reading the files the changed inputs rewrote (old and new) must cost at most a quarter
    // of reading the inputs: a batch that rewrote most of them (re-sent orders on every
    // date) is cheaper to rebuild whole than to diff first.
    let mut budget = rebuild_by
        .from
        .iter()
        .filter_map(|t| opened.get(t)?.as_ref())
        .map(table::row_count)
        .sum::<u64>()
        / 4;
    let mut changed = Vec::new();
    for (since, source, through) in sources {
        let read = match through {
            Some(through) => keys_through(run, through, source, since, budget).await,
            None => table::values_changed_since(&run.ctx, source, since, column, budget)
                .await
                .map_err(JobError::from),
        };
        let Some(batches) = charged(read, &mut budget, source) else {
            return Ok(None);
        };
        for b in batches {
            let values = arrow::compute::cast(b.column(0), &key_type)
                .and_then(|v| RecordBatch::try_new(Arc::clone(&key_schema), vec![v]))
                .map_err(datafusion::error::DataFusionError::from)?;
            changed.push(values);
        }
    }
    let keys = if changed.is_empty() {
        Vec::new()
    } else {
        run.ctx.read_batches(changed)?.distinct()?.collect().await?
    };
    let count: u64 = keys.iter().map(|b| b.num_rows() as u64).sum();
    Ok((count * 2 <= table::row_count(built)).then(|| Scope::Keys {
        column: column.clone(),
        keys,
        count,
    }))
}

/// What a read of the rows of `source` that changed since a build gave, its rows taken off
/// `budget`; `None` when it read nothing to go by (more rows than the budget, or a version
/// no longer loadable) or failed, which only means the table is rebuilt whole (a file
/// removed since may be gone already, after a VACUUM).
fn charged<T>(
    read: Result<Option<(T, u64)>, JobError>,
    budget: &mut u64,
    source: &DeltaTable,
) -> Option<T> {
    match read {
        Ok(Some((rows, count))) => {
            *budget -= count;
            Some(rows)
        }
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%error, table = %source.table_url(), "cannot read the rows that changed; rebuilding the whole table");
            None
        }
    }
}

/// The values of the rebuild's column that the rows of `source` changed since version
/// `since` can touch, as `through`'s query names them, and the rows it read of `source`;
/// `None` as [`table::rows_changed_since`].
async fn keys_through(
    run: &RunContext<'_>,
    through: &RebuildThrough,
    source: &DeltaTable,
    since: u64,
    max_rows: u64,
) -> Result<Option<(Vec<RecordBatch>, u64)>, JobError> {
    let Some((changed, rows)) =
        table::rows_changed_since(&run.ctx, source, since, max_rows).await?
    else {
        return Ok(None);
    };
    let sql = run.pipeline.sql(&through.sql)?;
    let changed = vec![(TableReference::bare(CHANGED_ROWS), changed)];
    let keys = session::with_tables(&run.ctx, changed, async || {
        Ok(run.ctx.sql(sql).await?.collect().await?)
    })
    .await?;
    Ok(Some((keys, rows)))
}

/// `plan` with every scan of one of `tables` (`layer.table`), also in the views it reads,
/// restricted to the rows whose `column` is one of the values of `keys` (a semi join).
fn restrict_scans(
    plan: LogicalPlan,
    tables: &[String],
    column: &str,
    keys: &LogicalPlan,
) -> datafusion::error::Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::TableScan(scan) = &node else {
            return Ok(Transformed::no(node));
        };
        if let Some(view) = scan.source.get_logical_plan() {
            if tables_read(&view).iter().all(|t| !tables.contains(t)) {
                return Ok(Transformed::no(node));
            }
            // The view is inlined under its own name, so the plan above reads the same
            // columns; a scan straight from SQL has no projection, filters or limit.
            if scan.projection.is_some() || !scan.filters.is_empty() || scan.fetch.is_some() {
                return Err(datafusion::error::DataFusionError::Plan(format!(
                    "cannot restrict the view {}: its scan was already optimized",
                    scan.table_name
                )));
            }
            let inner = restrict_scans(view.into_owned(), tables, column, keys)?;
            let aliased = LogicalPlanBuilder::from(inner)
                .alias(scan.table_name.clone())?
                .build()?;
            return Ok(Transformed::yes(aliased));
        }
        if !tables.contains(&scan.table_name.to_string()) {
            return Ok(Transformed::no(node));
        }
        let scanned = Column::new(Some(scan.table_name.clone()), column);
        let key_type = scan
            .projected_schema
            .field_with_unqualified_name(column)?
            .data_type()
            .clone();
        let right = LogicalPlanBuilder::from(keys.clone())
            .project(vec![cast(col(KEY), key_type).alias(KEY)])?
            .build()?;
        // A null key is a value like any other here: rows without one changed too.
        let restricted = LogicalPlanBuilder::from(node)
            .join_detailed(
                right,
                JoinType::LeftSemi,
                (vec![scanned], vec![Column::from_name(KEY)]),
                None,
                NullEquality::NullEqualsNull,
            )?
            .build()?;
        Ok(Transformed::yes(restricted))
    })
    .map(|t| t.data)
}

/// The rows a [`Scope::Keys`] rebuild writes: `model` restricted to the changed keys, and
/// the built table's rows of every other key, cast to the model's columns.
async fn with_kept_rows(
    run: &RunContext<'_>,
    name: &str,
    model: DataFrame,
    rebuild_by: &RebuildBy,
    built: &DeltaTable,
    keys: &[RecordBatch],
) -> Result<DataFrame, JobError> {
    let column = rebuild_by.column.as_str();
    let keys_plan = run.ctx.read_batches(keys.to_vec())?.into_unoptimized_plan();
    let (state, plan) = model.into_parts();
    let restricted = restrict_scans(plan, &rebuild_by.from, column, &keys_plan)?;
    let rebuilt = DataFrame::new(state, restricted);
    table::register_table(&run.ctx, "gold", name, built).await?;
    let (state, built_plan) = run
        .ctx
        .table(TableReference::partial("gold", name))
        .await?
        .into_parts();
    let kept = DataFrame::new(
        state,
        LogicalPlanBuilder::from(built_plan)
            .join_detailed(
                keys_plan,
                JoinType::LeftAnti,
                (
                    vec![Column::from_name(column)],
                    vec![Column::from_name(KEY)],
                ),
                None,
                NullEquality::NullEqualsNull,
            )?
            .build()?,
    );
    let columns: Vec<Expr> = rebuilt
        .schema()
        .fields()
        .iter()
        .map(|f| cast(col(Column::from_name(f.name())), f.data_type().clone()).alias(f.name()))
        .collect();
    Ok(rebuilt.union(kept.select(columns)?)?)
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

/// The partition values of the `from` inputs of a model rebuilt by partition, in order, cut
/// into slices of at most about `slice_rows` input rows (a larger partition is a slice of its
/// own); `only` the values in `only` when given. `None` when that makes fewer than two
/// slices, or when an input is not open (it has no table yet).
fn partition_slices(
    rebuild_by: &RebuildBy,
    opened: &BTreeMap<String, Option<DeltaTable>>,
    only: Option<&BTreeSet<Option<String>>>,
    slice_rows: u64,
) -> Option<Vec<BTreeSet<Option<String>>>> {
    let mut rows: BTreeMap<Option<String>, u64> = BTreeMap::new();
    for t in &rebuild_by.from {
        let input = opened.get(t)?.as_ref()?;
        for (value, n) in table::rows_by_partition(input, &rebuild_by.column) {
            if only.is_none_or(|o| o.contains(&value)) {
                *rows.entry(value).or_insert(0) += n;
            }
        }
    }
    let mut slices: Vec<BTreeSet<Option<String>>> = Vec::new();
    let mut in_last = 0;
    for (value, n) in rows {
        if slices.is_empty() || (in_last > 0 && in_last + n > slice_rows) {
            slices.push(BTreeSet::new());
            in_last = 0;
        }
        slices.last_mut()?.insert(value);
        in_last += n;
    }
    (slices.len() > 1).then_some(slices)
}

/// `model`'s rows, built one slice of partitions after another: each slice is the model
/// filtered to its partitions, a filter that reaches the scans of the `rebuild_by` inputs
/// (the contract `rebuild_by` declares), so that the slice's joins and aggregations hold
/// its groups alone and the memory of one slice is reused by the next.
async fn built_in_slices(
    run: &RunContext<'_>,
    model: DataFrame,
    column: &str,
    slices: &[BTreeSet<Option<String>>],
) -> Result<DataFrame, JobError> {
    let predicates = slices
        .iter()
        .map(|values| model.parse_sql_expr(&partition_predicate(column, values)))
        .collect::<Result<Vec<_>, _>>()?;
    // The types the slices' plans produce (a string column may come out as Utf8View where
    // the logical schema says Utf8): every slice is the same plan but for its literals.
    let first = predicates.first().cloned().unwrap_or_else(|| lit(true));
    let schema = model
        .clone()
        .filter(first)?
        .create_physical_plan()
        .await?
        .schema();
    let partition = Arc::new(SlicedModel {
        model,
        predicates,
        schema: Arc::clone(&schema),
    });
    let table = StreamingTable::try_new(schema, vec![partition])?;
    Ok(run.ctx.read_table(Arc::new(table))?)
}

/// The one partition of [`built_in_slices`]'s table: runs the model once per slice, in turn.
struct SlicedModel {
    model: DataFrame,
    predicates: Vec<Expr>,
    schema: SchemaRef,
}

impl std::fmt::Debug for SlicedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlicedModel")
            .field("slices", &self.predicates.len())
            .finish_non_exhaustive()
    }
}

impl PartitionStream for SlicedModel {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let model = self.model.clone();
        let slices = futures::stream::iter(self.predicates.clone())
            .then(move |predicate| {
                let model = model.clone();
                async move { model.filter(predicate)?.execute_stream().await }
            })
            .try_flatten();
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            slices,
        ))
    }
}

/// The rows of an `incremental` update of a built table: its query's result (see
/// [`Incremental`]) over the rows of the model's inputs that changed since `built_from`.
/// `None` when it cannot apply, and the table is built as without it: the model reads other
/// tables than it did, or a changed input cannot be diffed (its old version is gone) or
/// changed more than a quarter of the inputs' rows.
async fn changes_applied(
    run: &RunContext<'_>,
    incremental: &Incremental,
    built_from: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    opened: &BTreeMap<String, Option<DeltaTable>>,
    kept: &session::KeptSteps,
) -> Result<Option<Vec<RecordBatch>>, JobError> {
    if built_from.len() != now.len() || now.keys().any(|t| !built_from.contains_key(t)) {
        return Ok(None);
    }
    let inputs = now
        .keys()
        .map(|t| match (t.split_once('.'), opened.get(t)) {
            (Some((layer, table)), Some(Some(source))) if layer == Layer::Silver.as_str() => {
                Some((t, table, source))
            }
            _ => None,
        })
        .collect::<Option<Vec<_>>>();
    let Some(inputs) = inputs else {
        return Ok(None);
    };
    let mut budget = inputs
        .iter()
        .map(|(_, _, source)| table::row_count(source))
        .sum::<u64>()
        / 4;
    let mut changed = Vec::new();
    // What identifies each table the script reads, for steps another script ran (see
    // `session::StepReuse`): a silver table by its version, its changed rows by both.
    let mut identities = BTreeMap::new();
    for (qualified, name, source) in inputs {
        let (since, version) = (built_from[qualified], now[qualified]);
        identities.insert(qualified.clone(), format!("version {version}"));
        identities.insert(
            format!("{CHANGED_SCHEMA}.{name}"),
            format!("{qualified} from version {since} to {version}"),
        );
        let rows = if since == version {
            let schema = run
                .ctx
                .table_provider(TableReference::partial(Layer::Silver.as_str(), name))
                .await?
                .schema();
            table::no_rows_changed(&run.ctx, &schema)?
        } else {
            let reading = Instant::now();
            let read = table::rows_changed_since(&run.ctx, source, since, budget).await;
            let Some(rows) = charged(read.map_err(JobError::from), &mut budget, source) else {
                return Ok(None);
            };
            tracing::debug!(
                table = qualified,
                ms = elapsed_ms(reading),
                "changed rows found"
            );
            rows
        };
        changed.push((TableReference::partial(CHANGED_SCHEMA, name), rows));
    }
    let script = run.pipeline.incremental_script(incremental)?;
    let reuse = session::StepReuse {
        kept,
        inputs: &identities,
    };
    let rows = session::with_tables(&run.ctx, changed, async || {
        Ok(
            session::sql_script_reusing(&run.ctx, &script.text, Some(reuse))
                .await?
                .collect()
                .await?,
        )
    })
    .await?;
    Ok(Some(rows))
}

/// The rows an `incremental` update writes: the built table's rows of every key `changes`
/// (see [`changes_applied`]) leaves out, and its rows that are not deleted, cast to the
/// model's columns.
async fn with_changes(
    run: &RunContext<'_>,
    name: &str,
    model: &DataFrame,
    incremental: &Incremental,
    built: &DeltaTable,
    changes: Vec<RecordBatch>,
) -> Result<DataFrame, JobError> {
    let changes = run.ctx.read_batches(changes)?;
    let key: Vec<&str> = incremental.key.iter().map(String::as_str).collect();
    let columns: Vec<Expr> = model
        .schema()
        .fields()
        .iter()
        .map(|f| cast(col(Column::from_name(f.name())), f.data_type().clone()).alias(f.name()))
        .collect();
    table::register_table(&run.ctx, "gold", name, built).await?;
    let kept = run
        .ctx
        .table(TableReference::partial("gold", name))
        .await?
        .join_on(
            changes.clone().select_columns(&key)?.select(
                key.iter()
                    .map(|k| col(Column::from_name(*k)).alias(format!("{KEY}{k}")))
                    .collect::<Vec<_>>(),
            )?,
            JoinType::LeftAnti,
            key.iter().map(|k| {
                binary_expr(
                    col(Column::from_name(*k)),
                    Operator::IsNotDistinctFrom,
                    col(Column::from_name(format!("{KEY}{k}"))),
                )
            }),
        )?;
    let written = changes
        .filter(not(coalesce(vec![
            col(Column::from_name(DELETED)),
            lit(false),
        ])))?
        .select(columns.clone())?;
    Ok(written.union(kept.select(columns)?)?)
}

async fn run_model(
    run: &RunContext<'_>,
    spec: &GoldSpec,
    opened: &mut BTreeMap<String, Option<DeltaTable>>,
    views: &mut Vec<String>,
    kept: &session::KeptSteps,
) -> Result<Option<TableSummary>, JobError> {
    let started = Instant::now();
    let name = spec.table.get_ref().clone();
    let sql = run.pipeline.sql(&spec.sql)?;
    let df = run.ctx.sql(sql).await?;
    if spec.kind == GoldKind::View {
        views.push(sql.to_string());
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
    // A `through` query decides which keys a rebuild recomputes: one that missed some would
    // leave their rows stale until they changed again, so a new one rebuilds whole.
    let mut other_sql = views.clone();
    for through in spec.rebuild_by.iter().flat_map(|r| &r.through) {
        other_sql.push(run.pipeline.sql(&through.sql)?.to_string());
    }
    // So does an incremental query: the rows it got wrong would stay wrong.
    if let Some(incremental) = &spec.incremental {
        other_sql.push(incremental.key.join("\0"));
        other_sql.push(run.pipeline.incremental_script(incremental)?.text);
    }
    let definition = definition_of(sql, &other_sql, &spec.partition_by);
    // A table built by other SQL can be neither kept nor rebuilt in part.
    let same_definition = state.definition == definition;
    if existing.is_some() && same_definition && state.inputs == inputs {
        summary.skipped = Some(format!(
            "unchanged since last build: {}",
            read.into_iter().collect::<Vec<_>>().join(", ")
        ));
        summary.delta_version = existing.as_ref().and_then(table::version);
        summary.duration_ms = elapsed_ms(started);
        return Ok(Some(summary));
    }
    // Cheapest first: a rebuild of some partitions reads those alone; an incremental update
    // reads the changed rows and what its script reads; a rebuild by key reads every row of
    // its `from` tables.
    let rebuilt_by = |by_partition: bool| {
        spec.rebuild_by
            .as_ref()
            .filter(|r| spec.partition_by.contains(&r.column) == by_partition)
            .zip(existing.as_ref())
            .filter(|_| same_definition)
    };
    let mut scope = match rebuilt_by(true) {
        Some((rebuild_by, built)) => {
            scope_of_rebuild(run, rebuild_by, &df, built, &state.inputs, &inputs, opened).await?
        }
        None => None,
    };
    let changes = match (&spec.incremental, &existing, &scope) {
        (Some(incremental), Some(_), None) if same_definition => {
            changes_applied(run, incremental, &state.inputs, &inputs, opened, kept)
                .await?
                .map(|rows| (incremental, rows))
        }
        _ => None,
    };
    if let (Some((rebuild_by, built)), None) = (rebuilt_by(false), &changes) {
        scope =
            scope_of_rebuild(run, rebuild_by, &df, built, &state.inputs, &inputs, opened).await?;
    }
    let nothing_changed = match (&changes, &scope) {
        (Some((_, rows)), _) => rows
            .iter()
            .all(|b| b.num_rows() == 0)
            .then(|| "the changed rows of its inputs touch no key".to_string()),
        (None, Some(scope)) => scope
            .is_empty()
            .then(|| format!("no {} of its inputs changed", scope.column())),
        (None, None) => None,
    };
    if let Some(why) = nothing_changed {
        // The changed inputs' new versions changed no row (a commit of metadata alone).
        state.inputs = inputs;
        put_typed(run.state(), &key, &state, version).await?;
        summary.skipped = Some(why);
        summary.delta_version = existing.as_ref().and_then(table::version);
        summary.duration_ms = elapsed_ms(started);
        return Ok(Some(summary));
    }
    let bar = run.progress(Layer::Gold, &name);
    bar.set_message("building");
    run.repartitions();
    let seq = state.seq + 1;
    let mut keys_updated = None;
    let (source, replace_where) = match (changes, &scope, &spec.rebuild_by, &existing) {
        (Some((incremental, changes)), _, _, Some(built)) => {
            let keys = changes.iter().map(|b| b.num_rows() as u64).sum::<u64>();
            tracing::info!(
                table = name,
                keys,
                "updating only the keys its inputs' changed rows touched"
            );
            keys_updated = Some(keys);
            (
                with_changes(run, &name, &df, incremental, built, changes).await?,
                None,
            )
        }
        (_, Some(Scope::Partitions { column, values }), _, _) => {
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
        (
            _,
            Some(Scope::Keys {
                column,
                keys,
                count,
            }),
            Some(rebuild_by),
            Some(built),
        ) => {
            tracing::info!(
                table = name,
                column,
                keys = count,
                "rebuilding only the keys its changed inputs touched"
            );
            (
                with_kept_rows(run, &name, df, rebuild_by, built, keys).await?,
                None,
            )
        }
        _ => (df, None),
    };
    // A model rebuilt by partition (whole, or the partitions in scope) is built in slices of
    // those partitions; a rebuild by key keeps rows of every partition, so it never slices.
    let in_scope = match &scope {
        Some(Scope::Partitions { values, .. }) => Some(values),
        _ => None,
    };
    let slices = spec
        .rebuild_by
        .as_ref()
        .filter(|r| spec.partition_by.contains(&r.column))
        .filter(|_| keys_updated.is_none() && !matches!(scope, Some(Scope::Keys { .. })))
        .and_then(|r| {
            let slices = partition_slices(
                r,
                opened,
                in_scope,
                run.options
                    .gold
                    .slice_rows(run.options.session.memory_limit),
            )?;
            Some((&r.column, slices))
        });
    let source = match slices {
        Some((column, slices)) => {
            tracing::info!(
                table = name,
                slices = slices.len(),
                column,
                "building a slice of partitions at a time"
            );
            summary.partition_slices = Some(slices.len() as u64);
            built_in_slices(run, source, column, &slices).await?
        }
        None => source,
    };
    let mut overwrite = OverwriteBuilder::new(url.clone(), source)
        .with_partition_columns(spec.partition_by.clone())
        .with_compression(run.pipeline.compression())
        .with_transaction(run.transaction(Layer::Gold, &name, seq));
    if let Some(columns) = &spec.stats_columns {
        overwrite = overwrite.with_stats_columns(columns.clone());
    }
    if let Some(predicate) = replace_where {
        overwrite = overwrite.with_replace_where(predicate);
    }
    let metrics = overwrite.execute().await?;
    state.seq = seq;
    state.inputs = inputs;
    state.definition = definition;
    put_typed(run.state(), &key, &state, version).await?;
    bar.finish_and_clear();
    let mut rows_written = metrics.rows_inserted;
    if let Some(t) = table::open_table(&url).await? {
        table::register_table(&run.ctx, "gold", &name, &t).await?;
        summary.table_bytes = table::data_files(&t).0;
        match &scope {
            Some(Scope::Partitions { column, values }) => {
                rows_written = table::rows_in_partitions(&t, column, values);
                summary.partitions_rebuilt = Some(values.len() as u64);
            }
            Some(Scope::Keys { count, .. }) => summary.keys_rebuilt = Some(*count),
            None => {}
        }
        summary.keys_updated = keys_updated;
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
