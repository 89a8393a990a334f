//! The one place a DataFusion session is made, so that every query of a run sees the same
//! functions, settings and catalog layout.

use std::sync::Arc;

use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::delta_datafusion::planner::DeltaPlanner;

use crate::error::Result;
use crate::skew::{
    BroadcastSmallBuildSide, CombineHotGroups, MeterHashRepartitions, SkewMeter, SkewOptions,
};
use crate::udf;

/// The schemas tables are registered under: `bronze.orders`, `silver.orders`, ...
pub const LAYER_SCHEMAS: [&str; 3] = ["bronze", "silver", "gold"];

/// Rows per batch of query execution (DataFusion's `datafusion.execution.batch_size`).
pub const BATCH_ROWS: usize = 64 * 1024;

/// Bytes of a memory limit per row that one operator is sized to hold whole, when the limit
/// sizes it: a gold slice's rows, a broadcast join's build side. Such an operator shares the
/// pool fairly with a dozen others of its plan, and a hash join's table cannot spill. At SF 10
/// under `--memory-limit 2GiB`, daily_engagement (an aggregation of 2.8 M groups per slice of
/// 2 Mi rows) spilled and took 57.2 s, against 13.7 s in slices of 1 Mi rows and 13.4-14.2 s
/// in slices of 2 Mi rows without a limit; at SF 1 under 128 MiB, broadcasting the 988 K
/// silver orders (under the 2 M-row default) to join the FX rates asked for 129 MB and
/// failed, where shuffling both sides builds on the 19 K rates.
pub const LIMIT_BYTES_PER_HELD_ROW: usize = 2 * 1024;

/// Whether an operator may hold `rows` rows whole in `pool`: always without a limit, and
/// under one when they fit at [`LIMIT_BYTES_PER_HELD_ROW`] a row.
pub fn may_hold_rows(pool: &dyn MemoryPool, rows: u64) -> bool {
    match pool.memory_limit() {
        MemoryLimit::Finite(limit) => {
            rows.saturating_mul(LIMIT_BYTES_PER_HELD_ROW as u64) <= limit as u64
        }
        _ => true,
    }
}

/// Settings of a session. Engine tuning passes through as DataFusion config keys rather than
/// new knobs of our own.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Broadcasting small join sides so that hot keys do not pile onto one partition.
    pub skew: SkewOptions,
    /// Partitions a plan is split into; defaults to the number of cores.
    pub target_partitions: Option<usize>,
    /// Bytes query execution may hold; beyond them operators that can spill (sort, hash
    /// aggregation, sort-merge join) write to local disk. `None`: unbounded.
    pub memory_limit: Option<usize>,
    /// Extra `datafusion.*` settings, applied last.
    pub datafusion_settings: Vec<(String, String)>,
}

/// A session with the engine's functions (`parse_timestamp`, the `json_*` family) and one
/// empty schema per layer.
pub fn new_session(options: &SessionOptions) -> Result<SessionContext> {
    let mut config = SessionConfig::new()
        .with_information_schema(true)
        // Batches of 64 Ki rows, as bronze parses and silver's dedup emits them, instead of
        // DataFusion's 8 Ki: every operator pays a fixed cost per batch (the Parquet reader,
        // the hash repartition's split, the aggregations' interning setup, delta-rs's split
        // by partition value). At SF 10, each layer alone alternating with 8 Ki
        // (`benches/layers.py`): gold 22.0 s against 25.2 s, silver 38.8 s against 42.2 s.
        .with_batch_size(BATCH_ROWS)
        // Landed data sits in batch sub-folders; listing scans must descend into them.
        .set_bool(
            "datafusion.execution.listing_table_ignore_subdirectory",
            false,
        )
        // Identifiers keep their case, as Spark users expect of column names.
        .set_bool("datafusion.sql_parser.enable_ident_normalization", true)
        // Spans let `validate` point at the line of an unknown column or table.
        .set_bool("datafusion.sql_parser.collect_spans", true)
        // A partial aggregation that keeps more than one group in ten of its first rows is
        // skipped (DataFusion's default: four in five): grouping 30 million events by
        // customer and session into 21 million groups, the partial stage held a second copy
        // of the groups for little reduction. At SF 10 that DISTINCT took 3.5 s and 3.0 GB
        // skipped against 5.4 s and 4.6 GB, and gold 19.5 s against 23.8 s.
        .set_str(
            "datafusion.execution.skip_partial_aggregation_probe_ratio_threshold",
            "0.1",
        );
    if let Some(n) = options.target_partitions {
        config = config.with_target_partitions(n.max(1));
    }
    // DataFusion's own environment variables (`DATAFUSION_EXECUTION_BATCH_SIZE=4096`, the
    // setting's key upper-cased with `_` for `.`) override the defaults above, as they do in
    // datafusion-cli; settings a caller passes override both.
    let from_env: Vec<(String, String)> = config
        .options()
        .entries()
        .into_iter()
        .filter_map(|entry| {
            let value = std::env::var(entry.key.to_uppercase().replace('.', "_")).ok()?;
            Some((entry.key, value))
        })
        .collect();
    for (key, value) in from_env.iter().chain(&options.datafusion_settings) {
        config.options_mut().set(key, value)?;
    }

    let meter = SkewMeter::default();
    config = config.with_extension(Arc::new(meter.clone()));
    let mut runtime = RuntimeEnvBuilder::new();
    if let Some(limit) = options.memory_limit {
        // Fair shares between the spilling operators of a plan, so one sort cannot starve
        // another into failing; spill files go to the OS temp folder. The pool keeps count of
        // who holds what, so that a refusal names the five largest holders.
        use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
        let top = std::num::NonZeroUsize::new(5).unwrap_or(std::num::NonZeroUsize::MIN);
        runtime = runtime.with_memory_pool(Arc::new(TrackConsumersPool::new(
            FairSpillPool::new(limit),
            top,
        )));
    }
    let runtime = runtime.build_arc()?;
    // Delta's planner: writes, MERGE and overwrite plan their own nodes with this session, so
    // the tables, functions and settings of a run stay the same from read to commit.
    // DataFusion pushes struct field access (`message['id']`) below the projection that
    // builds the struct, substituting the struct's expression into every access: one
    // `json_tuple` parse per field instead of one per row. Those two rules are left out.
    // Last, projections' text-to-decimal and UTC date casts and `trim(x) <> ''` go to the
    // engine's kernels.
    let optimizer_rules = datafusion::optimizer::Optimizer::new()
        .rules
        .into_iter()
        .filter(|r| {
            !matches!(
                r.name(),
                "extract_leaf_expressions" | "push_down_leaf_projections"
            )
        })
        .chain([Arc::new(udf::FastKernels) as _])
        .collect();
    let mut physical_rules = Vec::new();
    for rule in datafusion::physical_optimizer::optimizer::PhysicalOptimizer::new().rules {
        let after_join_selection = rule.name() == "join_selection";
        physical_rules.push(rule);
        if after_join_selection {
            physical_rules.push(Arc::new(BroadcastSmallBuildSide::new(
                options
                    .skew
                    .within_memory_limit(options.memory_limit)
                    .broadcast_max_rows,
            )) as _);
        }
    }
    if options.skew.combine_hot_groups {
        physical_rules.push(Arc::new(CombineHotGroups) as _);
    }
    physical_rules.push(Arc::new(MeterHashRepartitions::new(meter)) as _);
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_optimizer_rules(optimizer_rules)
        .with_physical_optimizer_rules(physical_rules)
        .with_config(config)
        .with_runtime_env(runtime)
        .with_query_planner(DeltaPlanner::new())
        .build();
    let mut ctx = SessionContext::new_with_state(state);
    datafusion_functions_json::register_all(&mut ctx)?;
    ctx.register_udf(udf::parse_timestamp_udf());
    ctx.register_udf(udf::json_tuple_udf());
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| datafusion::error::DataFusionError::Internal("no default catalog".into()))?;
    for schema in LAYER_SCHEMAS {
        catalog.register_schema(
            schema,
            Arc::new(MemorySchemaProvider::new()) as Arc<dyn SchemaProvider>,
        )?;
    }
    Ok(ctx)
}

/// The repartition row counts of a session made by [`new_session`].
pub fn skew_meter(ctx: &SessionContext) -> Option<Arc<SkewMeter>> {
    ctx.state().config().get_extension::<SkewMeter>()
}

/// Plans `sql` with `df` visible as the table `name`, then removes the name: the returned
/// plan keeps what it read, so callers can hand rows to a SQL text without naming clashes
/// outliving the statement.
pub async fn sql_with_table(
    ctx: &SessionContext,
    name: &str,
    df: datafusion::prelude::DataFrame,
    sql: &str,
) -> Result<datafusion::prelude::DataFrame> {
    let table = vec![(datafusion::common::TableReference::bare(name), df)];
    with_tables(ctx, table, async || Ok(ctx.sql(sql).await?)).await
}

/// Tables that steps of [`sql_script_reusing`] created, kept so that a later script of the
/// same run that creates a table by the same statement over the same inputs reads them
/// instead of working them out again. Two gold models' incremental scripts that both need
/// every event of the customers that changed, say, read silver's events once.
#[derive(Clone, Default)]
pub struct KeptSteps(
    Arc<
        std::sync::Mutex<
            std::collections::HashMap<String, Arc<dyn datafusion::catalog::TableProvider>>,
        >,
    >,
);

impl std::fmt::Debug for KeptSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps = self.0.lock().map_or(0, |kept| kept.len());
        f.debug_struct("KeptSteps").field("steps", &steps).finish()
    }
}

/// What lets a script reuse steps of earlier scripts: the steps kept, and what identifies the
/// rows of each table a step may read, by the name it is read by (`changed.events`: which
/// table, between which versions). A step is reused when its statement's text and every table
/// it reads are those of a kept one; one that reads a table not named here (a gold table,
/// which a run rewrites) or a view is neither reused nor kept.
#[derive(Clone, Copy, Debug)]
pub struct StepReuse<'a> {
    pub kept: &'a KeptSteps,
    pub inputs: &'a std::collections::BTreeMap<String, String>,
}

/// Plans `sql`, a script of statements separated by `;`: [`sql_script_reusing`] without
/// reusing steps of other scripts.
pub async fn sql_script(
    ctx: &SessionContext,
    sql: &str,
) -> datafusion::error::Result<datafusion::prelude::DataFrame> {
    sql_script_reusing(ctx, sql, None).await
}

/// What identifies the rows of table `creates`, made by a statement: its text and, for every
/// other table it names (`named`), `inputs`' entry or the key of the step of this script that
/// made it. `None` when it reads another table.
fn step_key(
    statement: &str,
    creates: &datafusion::common::TableReference,
    named: &[datafusion::common::TableReference],
    inputs: &std::collections::BTreeMap<String, String>,
    made_here: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    let read: std::collections::BTreeSet<String> = named
        .iter()
        .filter(|t| *t != creates)
        .map(|t| t.to_string())
        .collect();
    let mut key = statement.to_string();
    for table in read {
        let identity = inputs.get(&table).or_else(|| made_here.get(&table))?;
        key.push_str(&format!("\n{table} = {identity}"));
    }
    Some(key)
}

/// Plans `sql`, a script of statements separated by `;`. Every statement but the last creates
/// a table (`CREATE TABLE t AS SELECT …`, which runs its query and holds the rows in memory)
/// or a view, that the statements after it read; the last is the query planned. DataFusion
/// runs a common table expression again wherever it is read: a table created first is a
/// step worked out once, and with `reuse`, once a run (see [`StepReuse`]). What the script
/// created is dropped before this returns (the plan keeps what it reads), also when it fails.
pub async fn sql_script_reusing(
    ctx: &SessionContext,
    sql: &str,
    reuse: Option<StepReuse<'_>>,
) -> datafusion::error::Result<datafusion::prelude::DataFrame> {
    use datafusion::logical_expr::{DdlStatement, LogicalPlan};
    use datafusion::sql::parser::DFParserBuilder;
    use datafusion::sql::sqlparser::dialect::dialect_from_str;

    let state = ctx.state();
    let options = &state.config().options().sql_parser;
    let dialect = dialect_from_str(options.dialect).ok_or_else(|| {
        datafusion::error::DataFusionError::Plan(format!(
            "unsupported SQL dialect {}",
            options.dialect
        ))
    })?;
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(dialect.as_ref())
        .with_recursion_limit(options.recursion_limit.get())
        .build()?
        .parse_statements()?;
    let last = statements.pop_back().ok_or_else(|| {
        datafusion::error::DataFusionError::Plan("the SQL holds no statement".into())
    })?;
    let mut created = Vec::new();
    let mut made_here = std::collections::BTreeMap::new();
    let planned = async {
        for statement in statements {
            let text = statement.to_string();
            // By name, as the statement reads them: a view is inlined in its plan.
            let read = state.resolve_table_references(&statement)?;
            let plan = state.statement_to_plan(statement).await?;
            let name = match &plan {
                LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) => create.name.clone(),
                LogicalPlan::Ddl(DdlStatement::CreateView(create)) => create.name.clone(),
                other => {
                    return Err(datafusion::error::DataFusionError::Plan(format!(
                        "only the last statement may be a query; those before it create a table or view, and this one is {}",
                        other.display()
                    )));
                }
            };
            let key = match (&plan, reuse) {
                (LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(_)), Some(reuse)) => {
                    step_key(&text, &name, &read, reuse.inputs, &made_here)
                }
                _ => None,
            };
            let kept = key.as_ref().zip(reuse).and_then(|(key, reuse)| {
                let kept = reuse.kept.0.lock().ok()?;
                kept.get(key).cloned()
            });
            if let Some(table) = kept {
                ctx.register_table(name.clone(), table)?;
                tracing::debug!(step = %name, "SQL script step reused from an earlier script");
            } else {
                let plan = fold_scalar_subqueries(&state, plan).await?;
                if let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) = &plan {
                    analyze(&state, &name.to_string(), create.input.as_ref()).await?;
                }
                let started = std::time::Instant::now();
                ctx.execute_logical_plan(plan).await?;
                tracing::debug!(step = %name, ms = started.elapsed().as_millis() as u64, "SQL script step run");
                if let (Some(key), Some(reuse)) = (&key, reuse) {
                    let table = ctx.table_provider(name.clone()).await?;
                    if let Ok(mut kept) = reuse.kept.0.lock() {
                        kept.insert(key.clone(), table);
                    }
                }
            }
            if let Some(key) = key {
                made_here.insert(name.to_string(), key);
            }
            created.push(name);
        }
        let plan = state.statement_to_plan(last).await?;
        let plan = fold_scalar_subqueries(&state, plan).await?;
        analyze(&state, "the last statement", &plan).await?;
        ctx.execute_logical_plan(plan).await
    }
    .await;
    for name in created {
        ctx.deregister_table(name)?;
    }
    planned
}

/// Works out each uncorrelated scalar subquery in a filter of `plan` and puts its value in its
/// place, as Spark runs such a subquery before the query that reads it. DataFusion plans it as
/// a join instead, so `WHERE order_date >= (SELECT min(day) FROM changed)` pruned nothing and
/// read every partition; as a literal, the filter reaches the table's scan, which skips the
/// partitions before it. A subquery of no rows is NULL; one of several rows is an error, as in
/// Spark. `validate` runs these subqueries too, over no changed rows.
async fn fold_scalar_subqueries(
    state: &SessionState,
    plan: datafusion::logical_expr::LogicalPlan,
) -> datafusion::error::Result<datafusion::logical_expr::LogicalPlan> {
    use datafusion::common::ScalarValue;
    use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, Filter, LogicalPlan, Subquery};

    let mut subqueries: Vec<Subquery> = Vec::new();
    plan.apply(|node| {
        if let LogicalPlan::Filter(filter) = node {
            filter.predicate.apply(|expr| {
                if let Expr::ScalarSubquery(subquery) = expr
                    && subquery.outer_ref_columns.is_empty()
                    && !subqueries.contains(subquery)
                {
                    subqueries.push(subquery.clone());
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if subqueries.is_empty() {
        return Ok(plan);
    }
    let mut values = Vec::with_capacity(subqueries.len());
    for subquery in &subqueries {
        let batches =
            datafusion::prelude::DataFrame::new(state.clone(), subquery.subquery.as_ref().clone())
                .collect()
                .await?;
        let mut rows = batches.iter().filter(|b| b.num_rows() > 0);
        let value = match (rows.next(), rows.next()) {
            (None, _) => ScalarValue::try_from(subquery.subquery.schema().field(0).data_type())?,
            (Some(batch), None) if batch.num_rows() == 1 => {
                ScalarValue::try_from_array(batch.column(0), 0)?
            }
            _ => {
                return Err(datafusion::error::DataFusionError::Execution(format!(
                    "a scalar subquery returned more than one row: {}",
                    subquery.subquery.display()
                )));
            }
        };
        values.push(value);
    }
    plan.transform_up(|node| {
        let LogicalPlan::Filter(filter) = node else {
            return Ok(Transformed::no(node));
        };
        let predicate = filter.predicate.clone().transform_up(|expr| {
            let position = match &expr {
                Expr::ScalarSubquery(subquery) => subqueries.iter().position(|s| s == subquery),
                _ => None,
            };
            Ok(match position {
                Some(i) => Transformed::yes(Expr::Literal(values[i].clone(), None)),
                None => Transformed::no(expr),
            })
        })?;
        if !predicate.transformed {
            return Ok(Transformed::no(LogicalPlan::Filter(filter)));
        }
        Filter::try_new(predicate.data, filter.input)
            .map(|f| Transformed::yes(LogicalPlan::Filter(f)))
    })
    .map(|folded| folded.data)
}

/// At trace level, runs `plan` (a step of [`sql_script`]) once more under EXPLAIN ANALYZE and
/// logs its physical plan with each operator's rows and time: where a step's time goes.
async fn analyze(
    state: &SessionState,
    step: &str,
    plan: &datafusion::logical_expr::LogicalPlan,
) -> datafusion::error::Result<()> {
    if !tracing::enabled!(tracing::Level::TRACE) {
        return Ok(());
    }
    let explained = datafusion::prelude::DataFrame::new(state.clone(), plan.clone())
        .explain(false, true)?
        .collect()
        .await?;
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&explained)?;
    tracing::trace!(step, plan = %text, "SQL script step analyzed");
    Ok(())
}

/// Runs `body` with each of `tables` registered under its name (making its schema when the
/// catalog has none by that name), then removes those names, also when `body` fails: rows
/// handed to SQL text for one statement, whose names must not outlive it.
pub async fn with_tables<T>(
    ctx: &SessionContext,
    tables: Vec<(
        datafusion::common::TableReference,
        datafusion::prelude::DataFrame,
    )>,
    body: impl AsyncFnOnce() -> Result<T>,
) -> Result<T> {
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| datafusion::error::DataFusionError::Internal("no default catalog".into()))?;
    let mut names = Vec::new();
    for (name, rows) in tables {
        if let Some(schema) = name.schema()
            && catalog.schema(schema).is_none()
        {
            catalog.register_schema(
                schema,
                Arc::new(MemorySchemaProvider::new()) as Arc<dyn SchemaProvider>,
            )?;
        }
        ctx.deregister_table(name.clone())?;
        ctx.register_table(name.clone(), rows.into_view())?;
        names.push(name);
    }
    let result = body().await;
    for name in names {
        ctx.deregister_table(name)?;
    }
    result
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, Int64Array};

    use super::{
        KeptSteps, SessionOptions, StepReuse, new_session, sql_script, sql_script_reusing,
    };

    /// The values of the script's one 64-bit integer column, and its logical plan.
    async fn run(sql: &str) -> datafusion::error::Result<(Vec<Option<i64>>, String)> {
        let ctx = new_session(&SessionOptions::default()).unwrap();
        ctx.sql("CREATE TABLE t AS VALUES (1), (2), (3), (4)")
            .await?
            .collect()
            .await?;
        let df = sql_script(&ctx, sql).await?;
        let plan = df.logical_plan().display_indent().to_string();
        let mut values = Vec::new();
        for batch in df.collect().await? {
            let column = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            values.extend((0..column.len()).map(|i| column.is_valid(i).then(|| column.value(i))));
        }
        values.sort();
        Ok((values, plan))
    }

    #[tokio::test]
    async fn a_filters_scalar_subquery_is_worked_out_first() {
        let (values, plan) = run("CREATE TABLE bounds AS VALUES (3), (9); \
             SELECT column1 FROM t WHERE column1 >= (SELECT min(column1) FROM bounds)")
        .await
        .unwrap();
        assert_eq!(values, [Some(3), Some(4)]);
        // The filter compares with a literal: no subquery or join is left to plan.
        assert!(plan.contains("t.column1 >= Int64(3)"), "{plan}");
        assert!(
            !plan.contains("Subquery") && !plan.contains("Join"),
            "{plan}"
        );

        // A correlated subquery is left to DataFusion.
        let (values, plan) = run("SELECT column1 FROM t o \
             WHERE column1 * 2 = (SELECT max(i.column1) FROM t i WHERE i.column1 = o.column1 * 2)")
        .await
        .unwrap();
        assert_eq!(values, [Some(1), Some(2)]);
        assert!(plan.contains("Subquery"), "{plan}");
    }

    #[tokio::test]
    async fn a_scalar_subquery_of_no_rows_is_null_and_of_several_an_error() {
        let (values, _) = run(
            "CREATE TABLE none AS SELECT column1 FROM t WHERE column1 > 9; \
             SELECT column1 FROM t WHERE column1 >= (SELECT column1 FROM none)",
        )
        .await
        .unwrap();
        assert_eq!(values, []);
        let error = run("SELECT column1 FROM t WHERE column1 >= (SELECT column1 FROM t)")
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than one row"), "{error}");
    }

    /// A step whose statement and inputs a kept step had is read from it, not run again: the
    /// script's `changed.t` holds other rows under the same identity, and the count is the
    /// first one's. The step after it, which reads it, is reused as well. Another identity,
    /// or an input without one, runs the steps.
    #[tokio::test]
    async fn a_step_of_the_statement_and_inputs_of_a_kept_one_is_not_run_again() {
        let ctx = new_session(&SessionOptions::default()).unwrap();
        let kept = KeptSteps::default();
        let script = "CREATE TABLE counted AS SELECT count(*) AS n FROM changed.t; \
                      CREATE TABLE scaled AS SELECT n * 10 AS n FROM counted; \
                      SELECT n FROM scaled";
        let run = async |rows: i64, identity: Option<&str>| -> i64 {
            let t = ctx
                .sql(&format!("SELECT value FROM generate_series(1, {rows})"))
                .await
                .unwrap();
            let inputs = identity
                .map(|i| [("changed.t".to_string(), i.to_string())].into())
                .unwrap_or_default();
            let reuse = StepReuse {
                kept: &kept,
                inputs: &inputs,
            };
            let table = datafusion::common::TableReference::partial("changed", "t");
            let batches = super::with_tables(&ctx, vec![(table, t)], async || {
                Ok(sql_script_reusing(&ctx, script, Some(reuse))
                    .await?
                    .collect()
                    .await?)
            })
            .await
            .unwrap();
            batches[0]
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!(run(2, Some("versions 1 to 2")).await, 20);
        assert_eq!(run(3, Some("versions 1 to 2")).await, 20, "reused");
        assert_eq!(run(3, Some("versions 1 to 3")).await, 30);
        assert_eq!(run(4, None).await, 40, "an input without identity");
        // The scripts dropped what they created.
        assert!(ctx.table_provider("counted").await.is_err());
    }
}
