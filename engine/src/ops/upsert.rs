//! Upsert by key: a deduplicated batch into a table, where a matched row is replaced only
//! when the incoming row wins the table's keep rule. Because the rule compares stored
//! columns, upserting the same batch twice, or batches in any order, gives the same table.
//! A replaced row is marked deleted in a deletion vector and the winners appended
//! ([`deletion_vectors`]); where that does not apply, delta-rs's MERGE rewrites the files
//! that hold a match. Under a memory limit that cannot hold the batch, the MERGE is joined by
//! sort-merge, whose sorts spill, instead of by hash ([`merge_session`]).

use std::sync::Arc;

use datafusion::arrow::compute::SortOptions;
use datafusion::common::Result as DfResult;
use datafusion::common::config::ConfigNonZeroUsize;
use datafusion::common::tree_node::{Transformed, TransformedResult as _, TreeNode as _};
use datafusion::config::ConfigOptions;
use datafusion::execution::SessionState;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{Operator, binary_expr};
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_expr::{LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, SortMergeJoinExec};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties as _};
use datafusion::prelude::{DataFrame, Expr, col};
use deltalake::DeltaTable;
use deltalake::protocol::SaveMode;
use url::Url;

use super::overwrite::write_dataframe;
use super::{AppTransaction, CommitMetrics, Compression, DEFAULT_COMPRESSION, FileLayout};
use crate::error::{EngineError, Result};
use crate::session::may_hold_rows;
use crate::table;

mod deletion_vectors;

/// Builds an upsert of `source` (at most one row per key) into the table at a URL.
#[derive(Debug)]
pub struct UpsertBuilder {
    url: Url,
    source: DataFrame,
    keys: Vec<String>,
    winner_order: Vec<String>,
    partition_columns: Vec<String>,
    stats_columns: Option<Vec<String>>,
    txn: Option<AppTransaction>,
    source_key_nulls: Option<bool>,
    source_rows: Option<u64>,
    target: Option<DeltaTable>,
    deletion_vectors: bool,
    compression: Compression,
}

impl UpsertBuilder {
    pub fn new(url: Url, source: DataFrame, keys: Vec<String>) -> Self {
        Self {
            url,
            source,
            keys,
            winner_order: Vec::new(),
            partition_columns: Vec::new(),
            stats_columns: None,
            txn: None,
            source_key_nulls: None,
            source_rows: None,
            target: None,
            deletion_vectors: true,
            compression: DEFAULT_COMPRESSION,
        }
    }

    /// Columns compared, most significant first, to decide whether an incoming row replaces
    /// the stored one: the greater tuple wins and a null is smaller than any value. Equal
    /// tuples keep the stored row.
    pub fn with_winner_order(mut self, columns: Vec<String>) -> Self {
        self.winner_order = columns;
        self
    }

    pub fn with_partition_columns(mut self, columns: Vec<String>) -> Self {
        self.partition_columns = columns;
        self
    }

    /// Only these columns and the key columns carry min/max statistics (all of them when
    /// never called): MERGE skips files by their key ranges, so the keys always keep theirs.
    pub fn with_stats_columns(mut self, columns: Vec<String>) -> Self {
        let mut with_keys = self.keys.clone();
        with_keys.extend(columns.into_iter().filter(|c| !self.keys.contains(c)));
        self.stats_columns = Some(with_keys);
        self
    }

    pub fn with_transaction(mut self, txn: AppTransaction) -> Self {
        self.txn = Some(txn);
        self
    }

    /// How the data files' pages are compressed ([`DEFAULT_COMPRESSION`] when never called).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Whether some source row has a null key, when the caller already knows; otherwise the
    /// source is read once more to find out.
    pub fn with_source_key_nulls(mut self, any_null: bool) -> Self {
        self.source_key_nulls = Some(any_null);
        self
    }

    /// At most how many rows the source holds, when the caller knows. Under a memory limit,
    /// a source the limit can hold as a hash join's table is joined that way; a larger one,
    /// or one of unknown size, by sort-merge (see [`merge_session`]).
    pub fn with_source_rows_at_most(mut self, rows: u64) -> Self {
        self.source_rows = Some(rows);
        self
    }

    /// The table at the URL, when the caller has it open already; otherwise it is opened
    /// (loading its log) here.
    pub fn with_target(mut self, table: DeltaTable) -> Self {
        self.target = Some(table);
        self
    }

    /// Whether a stored row that an incoming one replaces may be marked deleted in a deletion
    /// vector, with the incoming rows appended (the default), instead of its file rewritten
    /// by delta-rs's MERGE. Marking raises the table's protocol to reader 3 and writer 7
    /// (Spark 3.4 with Delta 2.4, delta-rs 1.x and DuckDB read it). It applies when the
    /// batch's size is known ([`Self::with_source_rows_at_most`]) and fits the memory limit,
    /// and the key and keep-rule columns are stored in the files (not partition columns);
    /// other upserts MERGE.
    pub fn with_deletion_vectors(mut self, enabled: bool) -> Self {
        self.deletion_vectors = enabled;
        self
    }

    pub async fn execute(mut self) -> Result<CommitMetrics> {
        let layout = FileLayout {
            partition_columns: &self.partition_columns,
            stats_columns: self.stats_columns.as_deref(),
            compression: self.compression,
        };
        let target = match self.target.take() {
            Some(opened) => Some(opened),
            None => table::open_table(&self.url).await?,
        };
        let Some(target) = target else {
            // First write: every row is an insert, and a plain write is far cheaper than a MERGE.
            return write_dataframe(
                &self.url,
                None,
                self.source,
                SaveMode::Append,
                layout,
                None,
                self.txn.as_ref(),
            )
            .await;
        };
        if let Some(done) = AppTransaction::already_committed(self.txn.as_ref(), &target).await? {
            return Ok(done);
        }
        let pool = Arc::clone(&self.source.task_ctx().runtime_env().memory_pool);
        if self.deletion_vectors
            && self
                .source_rows
                .is_some_and(|rows| may_hold_rows(pool.as_ref(), rows))
            && deletion_vectors::applies(&target, &self.keys, &self.winner_order)
        {
            let metrics = deletion_vectors::MarkingUpsert {
                url: &self.url,
                keys: &self.keys,
                winner_order: &self.winner_order,
                layout,
                txn: self.txn.as_ref(),
            }
            .execute(target, self.source)
            .await?;
            deletion_vectors::compact_when_scattered(&self.url, layout).await?;
            return Ok(metrics);
        }
        let columns: Vec<String> = self
            .source
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        // `=` rather than `IS NOT DISTINCT FROM` when no incoming key is null: delta-rs turns an
        // equality on a column into `target.k BETWEEN min(source.k) AND max(source.k)` and
        // skips every file whose statistics fall outside, so a small batch whose keys are
        // close together (new events, say) rewrites a few files instead of the whole table.
        let any_null = match self.source_key_nulls {
            Some(known) => known,
            None => source_has_null_key(&self.source, &self.keys).await?,
        };
        let key_op = if any_null {
            Operator::IsNotDistinctFrom
        } else {
            Operator::Eq
        };
        let on = self
            .keys
            .iter()
            .map(|k| binary_expr(side("target", k), key_op, side("source", k)))
            .reduce(Expr::and)
            .ok_or_else(|| EngineError::InvalidWrite {
                table: self.url.to_string(),
                reason: "an upsert needs at least one key column".into(),
            })?;
        let wins = source_wins(&self.winner_order);
        let session = Arc::new(merge_session(
            self.source.clone().into_parts().0,
            self.source_rows,
        ));
        let url = self.url.clone();
        let (table, metrics) = target
            .merge(self.source, on)
            .with_source_alias("source")
            .with_target_alias("target")
            .with_session_state(session)
            .with_writer_properties(layout.writer_properties(super::DataPageVersion::V1))
            .with_commit_properties(AppTransaction::commit_properties(self.txn.as_ref()))
            .when_matched_update(|update| {
                columns.iter().fold(update.predicate(wins), |u, c| {
                    u.update(c.as_str(), side("source", c))
                })
            })
            .and_then(|m| {
                m.when_not_matched_insert(|insert| {
                    columns
                        .iter()
                        .fold(insert, |i, c| i.set(c.as_str(), side("source", c)))
                })
            })
            .map_err(|e| EngineError::delta(&url, e))?
            .await
            .map_err(|e| EngineError::delta(&url, e))?;
        Ok(CommitMetrics {
            version: table.version(),
            rows_inserted: metrics.num_target_rows_inserted as u64,
            rows_updated: metrics.num_target_rows_updated as u64,
            files_added: metrics.num_target_files_added as u64,
            // MERGE metrics carry no byte count; run summaries report the table's size.
            bytes_added: 0,
            already_committed: false,
        })
    }
}

/// Rows per batch of a MERGE joined by sort-merge: DataFusion's default.
const MERGE_BATCH_ROWS: usize = 8 * 1024;

/// The session a MERGE is planned in. delta-rs joins source and target with a full outer
/// join, which DataFusion plans as a hash join whose table holds the whole source and cannot
/// spill. Under a memory limit that cannot hold the source at
/// [`LIMIT_BYTES_PER_HELD_ROW`](crate::session::LIMIT_BYTES_PER_HELD_ROW) a row (the share a
/// broadcast side may take), the join is a sort-merge join instead ([`SortMergeJoins`]): both
/// sides are sorted by key, and the sorts spill. A key is one row on each side, so the join
/// itself holds about a batch of each.
///
/// That plan runs in one partition. DataFusion 55's hash repartition can deadlock once it
/// spills under a memory limit (apache/datafusion#24883, fixed after 55; delta-rs#4614 is the
/// same hang in a MERGE): at SF 0.5, the second batch's MERGE into silver orders stopped with
/// every thread parked, under 128 MiB sort-merge joined in two partitions, and under 64 MiB
/// with the source hash-repartitioned into one. And its batches are
/// DataFusion's default 8 Ki rows: a sort reserves twice a batch before it can spill it, and
/// batches of the run's 64 Ki rows (27 MB of orders) outgrew a sort's share under 128 MiB.
fn merge_session(state: SessionState, source_rows: Option<u64>) -> SessionState {
    let pool = Arc::clone(&state.runtime_env().memory_pool);
    if may_hold_rows(pool.as_ref(), source_rows.unwrap_or(u64::MAX)) {
        return state;
    }
    tracing::debug!(
        source_rows,
        "MERGE joins by sort-merge: the memory limit cannot hold the source as a hash table"
    );
    let mut rules = Vec::new();
    for rule in state.physical_optimizers() {
        rules.push(Arc::clone(rule));
        if rule.name() == "EnsureRequirements" {
            rules.push(Arc::new(SortMergeJoins) as _);
        }
    }
    let mut state = SessionStateBuilder::new_from_existing(state)
        .with_physical_optimizer_rules(rules)
        .build();
    let options = state.config_mut().options_mut();
    options.execution.target_partitions = 1;
    if options.execution.batch_size.get() > MERGE_BATCH_ROWS
        && let Ok(rows) = ConfigNonZeroUsize::try_new(MERGE_BATCH_ROWS)
    {
        options.execution.batch_size = rows;
    }
    state
}

/// Plans every hash join as a sort-merge join on the same keys, each side sorted in one
/// partition. DataFusion's planner picks a sort-merge join only with more than one target
/// partition, and then hash-repartitions both sides. It runs after DataFusion's
/// `EnsureRequirements`, which would otherwise put the hash repartition back (into one
/// partition), so it adds the sorts itself.
#[derive(Debug)]
struct SortMergeJoins;

impl SortMergeJoins {
    fn rewrite(node: Arc<dyn ExecutionPlan>) -> DfResult<Transformed<Arc<dyn ExecutionPlan>>> {
        let Some(join) = node.downcast_ref::<HashJoinExec>() else {
            return Ok(Transformed::no(node));
        };
        // A sort-merge join has no null-aware anti join (`NOT IN` over a nullable subquery).
        if join.null_aware {
            return Ok(Transformed::no(node));
        }
        let sorted = |side: &Arc<dyn ExecutionPlan>,
                      keys: Vec<Arc<dyn PhysicalExpr>>|
         -> DfResult<Arc<dyn ExecutionPlan>> {
            let single: Arc<dyn ExecutionPlan> = if side.output_partitioning().partition_count() > 1
            {
                Arc::new(CoalescePartitionsExec::new(Arc::clone(side)))
            } else {
                Arc::clone(side)
            };
            let order = LexOrdering::new(keys.into_iter().map(PhysicalSortExpr::new_default))
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal("a join without keys".into())
                })?;
            Ok(Arc::new(SortExec::new(order, single)))
        };
        let (left_keys, right_keys) = join
            .on()
            .iter()
            .map(|(l, r)| (Arc::clone(l), Arc::clone(r)))
            .unzip();
        let merged: Arc<dyn ExecutionPlan> = Arc::new(SortMergeJoinExec::try_new(
            sorted(join.left(), left_keys)?,
            sorted(join.right(), right_keys)?,
            join.on().to_vec(),
            join.filter().cloned(),
            *join.join_type(),
            vec![SortOptions::default(); join.on().len()],
            join.null_equality(),
        )?);
        let Some(columns) = &join.projection else {
            return Ok(Transformed::yes(merged));
        };
        let schema = merged.schema();
        let kept: Vec<ProjectionExpr> = columns
            .iter()
            .map(|&i| {
                let name = schema.field(i).name();
                ProjectionExpr::new(Arc::new(PhysicalColumn::new(name, i)), name.clone())
            })
            .collect();
        Ok(Transformed::yes(Arc::new(ProjectionExec::try_new(
            kept, merged,
        )?)))
    }
}

impl PhysicalOptimizerRule for SortMergeJoins {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan.transform_up(Self::rewrite).data()
    }

    fn name(&self) -> &str {
        "sort_merge_joins"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

async fn source_has_null_key(source: &DataFrame, keys: &[String]) -> Result<bool> {
    let Some(any_null) = keys
        .iter()
        .map(|k| col(datafusion::common::Column::from_name(k.as_str())).is_null())
        .reduce(Expr::or)
    else {
        return Ok(false);
    };
    Ok(source
        .clone()
        .filter(any_null)?
        .limit(0, Some(1))?
        .count()
        .await?
        > 0)
}

fn side(alias: &str, column: &str) -> Expr {
    col(datafusion::common::Column::new(Some(alias), column))
}

/// `source` beats `target` on the lexicographic order of `order`, nulls smallest.
fn source_wins(order: &[String]) -> Expr {
    use datafusion::prelude::lit;
    order.iter().rev().fold(lit(false), |rest, c| {
        let (s, t) = (side("source", c), side("target", c));
        let greater = s
            .clone()
            .is_not_null()
            .and(t.clone().is_null().or(s.clone().gt(t.clone())));
        let equal = binary_expr(s, Operator::IsNotDistinctFrom, t);
        greater.or(equal.and(rest))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::UpsertBuilder;

    fn batch(keys: &[&str], ts: &[i64], value: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("v", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(ts.to_vec())),
                Arc::new(StringArray::from(value.to_vec())),
            ],
        )
        .unwrap()
    }

    /// A new, empty folder for a test's table, and its URL.
    fn table_dir(name: &str) -> (std::path::PathBuf, url::Url) {
        let dir = std::env::temp_dir().join(format!("medallion-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = url::Url::from_directory_path(&dir).unwrap();
        (dir, url)
    }

    /// Runs `sql` over the table at `url`, registered as `silver.t`.
    async fn query_table(
        ctx: &datafusion::prelude::SessionContext,
        url: &url::Url,
        sql: &str,
    ) -> Vec<RecordBatch> {
        let table = crate::table::open_table(url).await.unwrap().unwrap();
        crate::table::register_table(ctx, "silver", "t", &table)
            .await
            .unwrap();
        sql_rows(ctx, sql).await
    }

    /// The rows of `sql` run in `ctx`.
    async fn sql_rows(ctx: &datafusion::prelude::SessionContext, sql: &str) -> Vec<RecordBatch> {
        ctx.sql(sql).await.unwrap().collect().await.unwrap()
    }

    /// Column `column` of every row of `batches`, as text.
    fn texts(batches: &[RecordBatch], column: usize) -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let text =
                    datafusion::arrow::compute::cast(b.column(column), &DataType::Utf8).unwrap();
                let text = text.as_any().downcast_ref::<StringArray>().unwrap();
                text.iter()
                    .map(|s| s.unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The first row's value of 64-bit integer column `column` (a one-row aggregate).
    fn first_i64(batches: &[RecordBatch], column: usize) -> i64 {
        batches[0]
            .column(column)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    }

    /// Merges `first`, then `second`, into a new table by key column `key`, marking replaced
    /// rows in deletion vectors or rewriting their files (delta-rs's MERGE); returns its `k=v`
    /// rows, sorted (a null `k` as `null`).
    async fn merged(
        key: &str,
        order: &[&str],
        first: RecordBatch,
        second: RecordBatch,
        marking: bool,
    ) -> Vec<String> {
        let (dir, url) = table_dir(&format!("upsert-{key}-{}-{marking}", order.join("-")));
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        for rows in [first, second] {
            let n = rows.num_rows() as u64;
            UpsertBuilder::new(url.clone(), ctx.read_batch(rows).unwrap(), vec![key.into()])
                .with_winner_order(order.iter().map(|c| (*c).to_string()).collect())
                .with_source_rows_at_most(n)
                .with_deletion_vectors(marking)
                .execute()
                .await
                .unwrap();
        }
        let out = query_table(
            &ctx,
            &url,
            "SELECT coalesce(k, 'null') || '=' || v AS kv FROM silver.t ORDER BY kv",
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        texts(&out, 0)
    }

    #[tokio::test]
    async fn an_incoming_row_replaces_a_stored_one_only_when_it_wins_the_order() {
        let first = || batch(&["a", "b"], &[5, 5], &["old", "old"]);
        let second = || batch(&["a", "b", "c"], &[4, 6, 1], &["new", "new", "new"]);
        for marking in [true, false] {
            assert_eq!(
                merged("k", &["ts"], first(), second(), marking).await,
                ["a=old", "b=new", "c=new"],
                "marking: {marking}"
            );
            // No order (`keep = "any"`: the copies of a key are alike): the stored row stays.
            assert_eq!(
                merged("k", &[], first(), second(), marking).await,
                ["a=old", "b=old", "c=new"],
                "marking: {marking}"
            );
        }
    }

    /// Marking looks a text key up by its bytes and any other key in row form: either way it
    /// matches what the MERGE matches, a null key included (`IS NOT DISTINCT FROM`).
    #[tokio::test]
    async fn marking_matches_a_text_key_a_null_key_and_a_number_key_as_the_merge_does() {
        let rows = |k: &[Option<&str>], n: &[i64], ts: &[i64], v: &str| {
            let schema = Arc::new(Schema::new(vec![
                Field::new("k", DataType::Utf8, true),
                Field::new("n", DataType::Int64, false),
                Field::new("ts", DataType::Int64, false),
                Field::new("v", DataType::Utf8, false),
            ]));
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(k.to_vec())),
                    Arc::new(Int64Array::from(n.to_vec())),
                    Arc::new(Int64Array::from(ts.to_vec())),
                    Arc::new(StringArray::from(vec![v; k.len()])),
                ],
            )
            .unwrap()
        };
        for key in ["k", "n"] {
            let mut results = Vec::new();
            for marking in [true, false] {
                let first = rows(&[None, Some("a"), Some("b")], &[1, 2, 3], &[5, 5, 5], "old");
                let second = rows(&[None, Some("a"), Some("c")], &[1, 2, 4], &[6, 4, 5], "new");
                results.push(merged(key, &["ts"], first, second, marking).await);
            }
            // The null key's row is replaced (ts 6 beats 5), a's stays (4 loses), c is new.
            assert_eq!(
                results[0],
                ["a=old", "b=old", "c=new", "null=new"],
                "key {key}"
            );
            assert_eq!(results[0], results[1], "key {key}: marking against MERGE");
        }
    }

    /// Every data file an upsert writes, by marking or by MERGE, has the codec it was given.
    #[tokio::test]
    async fn an_upsert_writes_its_files_with_the_compression_given() {
        use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};

        for marking in [true, false] {
            let (dir, url) = table_dir(&format!("upsert-lz4-{marking}"));
            let ctx = crate::session::new_session(&Default::default()).unwrap();
            for rows in [
                batch(&["a", "b"], &[1, 1], &["old", "old"]),
                batch(&["b", "c"], &[2, 2], &["new", "new"]),
            ] {
                let n = rows.num_rows() as u64;
                UpsertBuilder::new(url.clone(), ctx.read_batch(rows).unwrap(), vec!["k".into()])
                    .with_winner_order(vec!["ts".into()])
                    .with_source_rows_at_most(n)
                    .with_deletion_vectors(marking)
                    .with_compression(super::Compression::LZ4_RAW)
                    .execute()
                    .await
                    .unwrap();
            }
            let mut codecs = Vec::new();
            let mut files = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "parquet") {
                    files += 1;
                    let reader =
                        SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
                    for group in reader.metadata().row_groups() {
                        codecs.extend(group.columns().iter().map(|c| c.compression()));
                        codecs.dedup();
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            assert!(files >= 2, "marking: {marking}, {files} files");
            assert_eq!(codecs, [super::Compression::LZ4_RAW], "marking: {marking}");
        }
    }

    /// Replaced rows are marked in deletion vectors, never rewritten: the first batch's file
    /// stays, a second vector of the same file keeps the first one's rows deleted, a batch
    /// merged again changes nothing, and the rows counted and diffed are the live ones.
    #[tokio::test]
    async fn replaced_rows_are_marked_deleted_and_their_file_is_kept() {
        let (dir, url) = table_dir("upsert-marking");
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        let upsert = |rows: RecordBatch| {
            let n = rows.num_rows() as u64;
            UpsertBuilder::new(url.clone(), ctx.read_batch(rows).unwrap(), vec!["k".into()])
                .with_winner_order(vec!["ts".into()])
                .with_source_rows_at_most(n)
                .execute()
        };
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i:04}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        upsert(batch(&keys, &[1; 1000], &["v1"; 1000]))
            .await
            .unwrap();
        let files = |t: &deltalake::DeltaTable| -> Vec<String> {
            t.snapshot()
                .unwrap()
                .log_data()
                .iter()
                .map(|f| f.path().into_owned())
                .collect()
        };
        let first_files = files(&crate::table::open_table(&url).await.unwrap().unwrap());

        let second = upsert(batch(&["k0001", "k0002", "new1"], &[2, 0, 1], &["v2"; 3]))
            .await
            .unwrap();
        assert_eq!((second.rows_updated, second.rows_inserted), (1, 1));
        let third = batch(&["k0003", "k0001", "new2"], &[2, 3, 1], &["v3"; 3]);
        let third_metrics = upsert(third.clone()).await.unwrap();
        assert_eq!(
            (third_metrics.rows_updated, third_metrics.rows_inserted),
            (2, 1)
        );
        let again = upsert(third).await.unwrap();
        assert_eq!((again.rows_updated, again.rows_inserted), (0, 0));
        let nothing = upsert(batch(&[], &[], &[])).await.unwrap();
        assert_eq!((nothing.rows_updated, nothing.rows_inserted), (0, 0));

        let table = crate::table::open_table(&url).await.unwrap().unwrap();
        let now = files(&table);
        assert!(
            first_files.iter().all(|f| now.contains(f)),
            "{first_files:?} in {now:?}"
        );
        assert_eq!(crate::table::row_count(&table), 1002);
        let since_first = table.version().unwrap() - 3;
        let (changed, rows_read) =
            crate::table::values_changed_since(&ctx, &table, since_first, "k", u64::MAX)
                .await
                .unwrap()
                .unwrap();
        let mut changed = texts(&changed, 0);
        changed.sort();
        assert_eq!(changed, ["k0001", "k0003", "new1", "new2"]);
        // Of the first file, only its two rows marked since: not its 1,000 rows twice.
        assert!(rows_read < 10, "{rows_read} rows read");
        // The rows a vector flipped are read when scanned, only the columns read: here the
        // side alone, then the key of one side.
        let (rows, _) = crate::table::rows_changed_since(&ctx, &table, since_first, u64::MAX)
            .await
            .unwrap()
            .unwrap();
        ctx.register_table("changed_t", rows.into_view()).unwrap();
        let sides = sql_rows(
            &ctx,
            "SELECT side FROM (SELECT _change_type || '=' || CAST(count(*) AS VARCHAR) AS side \
             FROM changed_t GROUP BY _change_type) ORDER BY side",
        )
        .await;
        assert_eq!(texts(&sides, 0), ["delete=2", "insert=4"]);
        let deleted = sql_rows(
            &ctx,
            "SELECT k FROM changed_t WHERE _change_type = 'delete' ORDER BY k",
        )
        .await;
        assert_eq!(texts(&deleted, 0), ["k0001", "k0003"]);
        ctx.deregister_table("changed_t").unwrap();

        // delta-rs reads a table with vectors in one partition; it is registered as a scan of
        // a share of its files per target partition, which read the same rows.
        let split = crate::session::new_session(&crate::session::SessionOptions {
            target_partitions: Some(4),
            ..Default::default()
        })
        .unwrap();
        let plan = query_table(&split, &url, "EXPLAIN SELECT k FROM silver.t").await;
        let plan = datafusion::arrow::util::pretty::pretty_format_batches(&plan)
            .unwrap()
            .to_string();
        assert!(now.len() >= 2, "{now:?}");
        assert_eq!(
            plan.matches("DeltaScanExec").count(),
            now.len().min(4),
            "{plan}"
        );
        let counted = query_table(
            &split,
            &url,
            "SELECT count(*), count(DISTINCT k) FROM silver.t",
        )
        .await;
        assert_eq!(
            (first_i64(&counted, 0), first_i64(&counted, 1)),
            (1002, 1002)
        );

        let out = query_table(
            &ctx,
            &url,
            "SELECT count(*) AS n, count(DISTINCT k) AS keys, \
                    string_agg(k || '=' || v, ',' ORDER BY k) FILTER (WHERE v <> 'v1') AS changed \
             FROM silver.t",
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let (n, distinct) = (first_i64(&out, 0), first_i64(&out, 1));
        let changed = texts(&out, 2).concat();
        assert_eq!((n, distinct), (1002, 1002));
        assert_eq!(changed, "k0001=v3,k0003=v3,new1=v2,new2=v3");
    }

    /// Every upsert that marks adds a file to each partition it touches; once the partitions
    /// hold more than 8 files on average, the table is compacted, and no row changes.
    #[tokio::test]
    async fn files_that_marking_upserts_add_are_compacted_once_partitions_gather_many() {
        let (dir, url) = table_dir("upsert-compaction");
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("p", DataType::Utf8, false),
        ]));
        let rows = |keys: Vec<String>, ts: i64| {
            let n = keys.len();
            let parts: Vec<&str> = keys
                .iter()
                .map(|k| if k.ends_with('0') { "a" } else { "b" })
                .collect();
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(keys.clone())),
                    Arc::new(Int64Array::from(vec![ts; n])),
                    Arc::new(StringArray::from(parts)),
                ],
            )
            .unwrap()
        };
        let files = async || {
            let table = crate::table::open_table(&url).await.unwrap().unwrap();
            crate::table::data_files(&table).1
        };
        // Keys 0-99 in two partitions, then per batch: keys 0 and 1 again (each beating the
        // stored row) and two new keys, one per partition.
        let mut batches = vec![rows((0..100).map(|i| format!("k{i:03}")).collect(), 0)];
        for b in 1..=8 {
            let keys = vec![
                "k000".into(),
                "k001".into(),
                format!("n{b}0"),
                format!("n{b}1"),
            ];
            batches.push(rows(keys, b));
        }
        let mut counted = Vec::new();
        for batch in batches {
            let n = batch.num_rows() as u64;
            UpsertBuilder::new(
                url.clone(),
                ctx.read_batch(batch).unwrap(),
                vec!["k".into()],
            )
            .with_winner_order(vec!["ts".into()])
            .with_partition_columns(vec!["p".into()])
            .with_source_rows_at_most(n)
            .execute()
            .await
            .unwrap();
            counted.push(files().await);
        }
        // 2 files, then 2 more per batch; the eighth batch's 18 files exceed 8 per partition.
        assert_eq!(counted, [2, 4, 6, 8, 10, 12, 14, 16, 2]);
        let out = query_table(
            &ctx,
            &url,
            "SELECT count(*), count(DISTINCT k), sum(ts) FROM silver.t",
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let value = |c: usize| first_i64(&out, c);
        // 100 + 16 new keys; k000 and k001 carry the last batch's ts 8, new keys their own.
        assert_eq!((value(0), value(1)), (116, 116));
        assert_eq!(value(2), 2 * 8 + 2 * (1..=8).sum::<i64>());
    }

    /// `rows` keys `k0000000`.. with timestamp `ts` and a 100-byte value starting `tag`, in
    /// batches of 8 Ki rows.
    fn wide_rows(rows: usize, ts: i64, tag: &str) -> Vec<RecordBatch> {
        let padded = format!("{tag:-<100}");
        (0..rows)
            .step_by(8192)
            .map(|start| {
                let keys: Vec<String> = (start..(start + 8192).min(rows))
                    .map(|i| format!("k{i:07}"))
                    .collect();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                batch(
                    &keys,
                    &vec![ts; keys.len()],
                    &vec![padded.as_str(); keys.len()],
                )
            })
            .collect()
    }

    /// Under a memory limit that cannot hold the source as a hash join's table, the MERGE is
    /// joined by sort-merge, whose sorts spill. The same MERGE told its source is small (so
    /// joined by hash) must fail under the limit, or the test proves nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_whose_source_outgrows_the_memory_limit_sorts_instead_of_aborting() {
        const ROWS: usize = 500_000;
        let (dir, url) = table_dir("upsert-limit");
        let options = crate::session::SessionOptions {
            target_partitions: Some(2),
            memory_limit: Some(48 * 1024 * 1024),
            ..Default::default()
        };
        let ctx = crate::session::new_session(&options).unwrap();
        let load = |rows: Vec<RecordBatch>, claimed_rows: usize| {
            UpsertBuilder::new(
                url.clone(),
                ctx.read_batches(rows).unwrap(),
                vec!["k".into()],
            )
            .with_winner_order(vec!["ts".into()])
            .with_source_rows_at_most(claimed_rows as u64)
            // The MERGE's spill path is what is tested: a batch the limit holds would mark.
            .with_deletion_vectors(false)
            .execute()
        };
        load(wide_rows(ROWS, 1, "old"), ROWS).await.unwrap();
        let by_hash = load(wide_rows(ROWS, 2, "new"), 0).await;
        let message = by_hash
            .expect_err("a hash join of the whole source fits in 48 MiB")
            .to_string();
        assert!(message.contains("Resources exhausted"), "{message}");
        load(wide_rows(ROWS, 2, "new"), ROWS).await.unwrap();

        let counts = query_table(
            &ctx,
            &url,
            "SELECT count(*), count(DISTINCT k), count(*) FILTER (WHERE v LIKE 'new%') FROM silver.t",
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let row: Vec<i64> = (0..3).map(|c| first_i64(&counts, c)).collect();
        assert_eq!(row, [ROWS as i64; 3], "rows, keys, rows replaced");
    }
}
