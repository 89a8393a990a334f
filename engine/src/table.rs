//! Opening Delta tables and showing them to DataFusion under `<layer>.<table>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use buoyant_kernel::table_features::ColumnMappingMode;
use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::{DataFusionError, TableReference};
use datafusion::datasource::MemTable;
use datafusion::datasource::TableType;
use datafusion::execution::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use datafusion::physical_plan::ExecutionPlan;
// Deprecated in parquet 59 in favour of a reader of one's own; it is still the one that
// reads a projection of a file by ranges from any object store.
#[allow(deprecated)]
use datafusion::parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStream};
use datafusion::parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use datafusion::prelude::{DataFrame, SessionContext, lit};
use deltalake::{DeltaTable, DeltaTableBuilder};
use futures::{StreamExt as _, TryStreamExt as _};
use url::Url;

use crate::error::{EngineError, Result};

/// Opens the Delta table at `url`, or `None` when no table has been written there yet.
pub async fn open_table(url: &Url) -> Result<Option<DeltaTable>> {
    let mut table = DeltaTableBuilder::from_url(url.clone())
        .and_then(|b| {
            b.with_storage_options(crate::location::storage_options(url))
                .build()
        })
        .map_err(|e| EngineError::delta(url, e))?;
    if !table
        .verify_deltatable_existence()
        .await
        .map_err(|e| EngineError::delta(url, e))?
    {
        return Ok(None);
    }
    table.load().await.map_err(|e| EngineError::delta(url, e))?;
    Ok(Some(table))
}

/// Registers `table` as `<schema>.<name>` in `ctx`, replacing an earlier registration so that
/// queries see the version just loaded.
pub async fn register_table(
    ctx: &SessionContext,
    schema: &str,
    name: &str,
    table: &DeltaTable,
) -> Result<()> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| EngineError::delta(table.table_url(), e))?;
    let provider = scan_provider(table, ctx.state().config().target_partitions()).await?;
    let reference = TableReference::partial(schema, name);
    ctx.deregister_table(reference.clone())?;
    ctx.register_table(reference, provider)?;
    Ok(())
}

/// Makes sure a new table can be created at `url`: delta-rs refuses a local folder that
/// does not exist yet, while object stores have no folders to make.
pub(crate) fn ensure_location(url: &Url) -> Result<()> {
    if let Some(path) = crate::location::local_path(url) {
        std::fs::create_dir_all(&path).map_err(|e| EngineError::InvalidLocation {
            location: url.to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// The loaded version of `table`, if it has one.
pub fn version(table: &DeltaTable) -> Option<u64> {
    table.version()
}

/// Each data file of the loaded version of `table`: its path, its value of partition column
/// `column` (a null partition as `None`) and its live rows, from the log's statistics less
/// those its deletion vector removes.
fn files_in_partitions(table: &DeltaTable, column: &str) -> Vec<FileEntry> {
    file_entries(table, column).into_values().collect()
}

/// Each data file of the loaded version of `table` by its entry in the log: its path and
/// deletion vector (a file whose vector changed holds other rows), to its path, its value of
/// partition column `column` and its live rows.
fn file_entries(table: &DeltaTable, column: &str) -> HashMap<String, FileEntry> {
    table.snapshot().map_or_else(
        |_| HashMap::new(),
        |s| {
            s.log_data()
                .iter()
                .map(|f| {
                    let dv = f.deletion_vector_descriptor();
                    let deleted = dv
                        .as_ref()
                        .map_or(0, |dv| u64::try_from(dv.cardinality).unwrap_or(0));
                    let entry = match &dv {
                        Some(dv) => {
                            format!("{}#{}@{:?}", f.path(), dv.path_or_inline_dv, dv.offset)
                        }
                        None => f.path().into_owned(),
                    };
                    let value = f.partition_values_map().remove(column).flatten();
                    let rows = f.num_records().map_or(0, |n| n as u64);
                    (
                        entry,
                        (f.path().into_owned(), value, rows.saturating_sub(deleted)),
                    )
                })
                .collect()
        },
    )
}

/// A data file: its path, its value of a partition column and its rows.
type FileEntry = (String, Option<String>, u64);

/// The data files (path, value of partition column `column`, live rows) that were removed
/// and added between version `since` of `table` and its loaded version, with the table at
/// version `since`. A file whose deletion vector changed is both. `None` when version
/// `since` can no longer be loaded (its log was cleaned up) or is not older than the loaded
/// one.
async fn files_changed_since(
    table: &DeltaTable,
    since: u64,
    column: &str,
) -> Option<([Vec<FileEntry>; 2], DeltaTable)> {
    if table.version().is_none_or(|now| since >= now) {
        return None;
    }
    let mut before = table.clone();
    before.load_version(since).await.ok()?;
    let (old, new) = (file_entries(&before, column), file_entries(table, column));
    let only_in = |a: &HashMap<String, FileEntry>, b: &HashMap<String, FileEntry>| {
        a.iter()
            .filter(|(entry, _)| !b.contains_key(*entry))
            .map(|(_, file)| file.clone())
            .collect()
    };
    Some(([only_in(&old, &new), only_in(&new, &old)], before))
}

/// The values of partition column `column` (a null partition as `None`) of every data file
/// that was added or removed between version `since` of `table` and its loaded version: the
/// partitions whose rows may differ. `None` when version `since` can no longer be loaded
/// (its log was cleaned up) or is not older than the loaded one.
pub async fn partitions_changed_since(
    table: &DeltaTable,
    since: u64,
    column: &str,
) -> Result<Option<BTreeSet<Option<String>>>> {
    Ok(files_changed_since(table, since, column)
        .await
        .map(|([removed, added], _)| {
            removed
                .into_iter()
                .chain(added)
                .map(|(_, value, _)| value)
                .collect()
        }))
}

/// The distinct values of data column `column` over the rows that differ between version
/// `since` of `table` and its loaded version (see [`rows_changed_since`]). One column named
/// `column`; no rows when no data file changed, and the rows read. `None` when version
/// `since` can no longer be loaded or is not older, or when the rows to read are more than
/// `max_rows`.
pub async fn values_changed_since(
    ctx: &SessionContext,
    table: &DeltaTable,
    since: u64,
    column: &str,
    max_rows: u64,
) -> Result<Option<(Vec<RecordBatch>, u64)>> {
    let Some((rows, read)) = changed_rows(ctx, table, since, max_rows, Some(column)).await? else {
        return Ok(None);
    };
    Ok(Some((
        rows.select_columns(&[column])?
            .distinct()?
            .collect()
            .await?,
        read,
    )))
}

/// The column of [`rows_changed_since`] that tells a row's side, as Delta's change data feed
/// names it: [`CHANGE_INSERT`] for a row of the loaded version, [`CHANGE_DELETE`] for one of
/// version `since`.
pub const CHANGE_TYPE: &str = "_change_type";
/// A row that the loaded version holds and version `since` did not.
pub const CHANGE_INSERT: &str = "insert";
/// A row that version `since` held and the loaded version does not.
pub const CHANGE_DELETE: &str = "delete";

/// `schema` with [`CHANGE_TYPE`] after its columns: the rows of [`rows_changed_since`].
fn with_change_type(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(CHANGE_TYPE, DataType::Utf8, false)));
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// No rows, as [`rows_changed_since`] gives them for a table of columns `schema`: what a query
/// over the changed rows reads of a table that did not change, or is planned against.
pub fn no_rows_changed(ctx: &SessionContext, schema: &SchemaRef) -> Result<DataFrame> {
    let empty = MemTable::try_new(with_change_type(schema), vec![vec![]])?;
    Ok(ctx.read_table(Arc::new(empty))?)
}

/// The rows that differ between version `since` of `table` and its loaded version, each
/// with its side in [`CHANGE_TYPE`]: the rows of the files added since that no removed file
/// holds (inserts), and the other way round (deletes). A MERGE rewrites whole files, so this
/// reads those files (each side through its version's vectors), not the table. An upsert
/// that marks rows only gives a file a new deletion vector: of such a file, only the rows
/// one vector removes and the other keeps are read, when a query scans them and only the
/// columns it reads (when the table maps no column to another name; a partition column's
/// value comes from the log). The rows to read with them; `None` when
/// version `since` can no longer be loaded or is not older, or when the rows to read are
/// more than `max_rows`.
pub async fn rows_changed_since(
    ctx: &SessionContext,
    table: &DeltaTable,
    since: u64,
    max_rows: u64,
) -> Result<Option<(DataFrame, u64)>> {
    changed_rows(ctx, table, since, max_rows, None).await
}

/// [`rows_changed_since`], with `column` alone (and [`CHANGE_TYPE`]) when given.
async fn changed_rows(
    ctx: &SessionContext,
    table: &DeltaTable,
    since: u64,
    max_rows: u64,
    column: Option<&str>,
) -> Result<Option<(DataFrame, u64)>> {
    let Some(([mut removed, mut added], before)) = files_changed_since(table, since, "").await
    else {
        return Ok(None);
    };
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| EngineError::delta(table.table_url(), e))?;
    let mut schema =
        datafusion::catalog::TableProvider::schema(&table.table_provider().build().await?);
    if let Some(column) = column {
        schema = Arc::new(schema.project(&[schema.index_of(column)?])?);
    }
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let remarked: BTreeSet<String> = if unmapped(table) {
        let was: BTreeSet<&String> = removed.iter().map(|(path, _, _)| path).collect();
        added
            .iter()
            .map(|(path, _, _)| path)
            .filter(|path| was.contains(path))
            .cloned()
            .collect()
    } else {
        BTreeSet::new()
    };
    removed.retain(|(path, _, _)| !remarked.contains(path));
    added.retain(|(path, _, _)| !remarked.contains(path));
    let [unmarked, marked] = flipped_rows(ctx, &before, table, &remarked).await?;
    let rows: u64 = removed
        .iter()
        .chain(&added)
        .map(|(_, _, rows)| *rows)
        .chain(
            unmarked
                .values()
                .chain(marked.values())
                .map(|positions| positions.len() as u64),
        )
        .sum();
    if rows > max_rows {
        return Ok(None);
    }
    let flipped = RowsAtPositions::new(
        table,
        [(unmarked, CHANGE_INSERT), (marked, CHANGE_DELETE)],
        Arc::clone(&schema),
    )?;
    let flipped = ctx.read_table(Arc::new(flipped))?;
    let differing = match differing_rows(ctx, &before, table, &removed, &added, &names).await? {
        Some(whole) => whole.union(flipped)?,
        None => flipped,
    };
    Ok(Some((differing, rows)))
}

/// Whether the data files of `table` hold `columns` under their names: none is a partition
/// column (which files do not hold) and the table maps no column to another name.
pub(crate) fn stored_as_named(table: &DeltaTable, columns: &[String]) -> bool {
    let Ok(state) = table.snapshot() else {
        return false;
    };
    let partition_columns = state.metadata().partition_columns();
    unmapped(table) && columns.iter().all(|c| !partition_columns.contains(c))
}

/// Whether `table` maps no column to another name: its files hold each column that is not
/// a partition column under its own name, and the log the partition values.
fn unmapped(table: &DeltaTable) -> bool {
    table.snapshot().is_ok_and(|state| {
        state
            .snapshot()
            .table_properties()
            .column_mapping_mode
            .is_none_or(|mode| mode == ColumnMappingMode::None)
    })
}

/// The rows of the `added` files (read at `now`) that no `removed` file holds (read at
/// `before`), tagged [`CHANGE_INSERT`], and the other way round, tagged [`CHANGE_DELETE`];
/// columns `names` and [`CHANGE_TYPE`]. `None` when both lists are empty. Each side is read
/// through its version's provider, which drops the rows that version's deletion vectors
/// remove.
async fn differing_rows(
    ctx: &SessionContext,
    before: &DeltaTable,
    now: &DeltaTable,
    removed: &[FileEntry],
    added: &[FileEntry],
    names: &[String],
) -> Result<Option<DataFrame>> {
    let read = async |at: &DeltaTable, files: &[FileEntry]| -> Result<Option<DataFrame>> {
        if files.is_empty() {
            return Ok(None);
        }
        at.update_datafusion_session(&ctx.state())
            .map_err(|e| EngineError::delta(at.table_url(), e))?;
        let provider = at
            .table_provider()
            .with_file_paths(files.iter().map(|(path, _, _)| path.clone()))
            .build()
            .await?;
        let columns: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(Some(
            ctx.read_table(Arc::new(provider))?
                .select_columns(&columns)?,
        ))
    };
    let tag = |rows: DataFrame, side: &str| rows.with_column(CHANGE_TYPE, lit(side));
    Ok(
        match (read(before, removed).await?, read(now, added).await?) {
            (None, None) => None,
            (Some(old), None) => Some(tag(old, CHANGE_DELETE)?),
            (None, Some(new)) => Some(tag(new, CHANGE_INSERT)?),
            (Some(old), Some(new)) => Some(
                tag(new.clone().except(old.clone())?, CHANGE_INSERT)?
                    .union(tag(old.except(new)?, CHANGE_DELETE)?)?,
            ),
        },
    )
}

/// For each of `paths` (data files in both `before` and `now`, whose deletion vector
/// changed), the positions of the rows that `now`'s vector keeps and `before`'s removed
/// (unmarked), then of those `now`'s removes and `before`'s kept (marked), in order.
async fn flipped_rows(
    ctx: &SessionContext,
    before: &DeltaTable,
    now: &DeltaTable,
    paths: &BTreeSet<String>,
) -> Result<[BTreeMap<String, Vec<u64>>; 2]> {
    if paths.is_empty() {
        return Ok([BTreeMap::new(), BTreeMap::new()]);
    }
    let session = ctx.state();
    let (old, new) = (
        keep_masks(&session, before, paths).await?,
        keep_masks(&session, now, paths).await?,
    );
    let none = Vec::new();
    let mut sides = [BTreeMap::new(), BTreeMap::new()];
    for path in paths {
        let (old, new) = (
            old.get(path).unwrap_or(&none),
            new.get(path).unwrap_or(&none),
        );
        // A row past the end of a mask is kept.
        let kept = |mask: &Vec<bool>, row: usize| mask.get(row).copied().unwrap_or(true);
        let (mut unmarked, mut marked) = (Vec::new(), Vec::new());
        for row in 0..old.len().max(new.len()) {
            match (kept(old, row), kept(new, row)) {
                (false, true) => unmarked.push(row as u64),
                (true, false) => marked.push(row as u64),
                _ => {}
            }
        }
        sides[0].insert(path.clone(), unmarked);
        sides[1].insert(path.clone(), marked);
    }
    Ok(sides)
}

/// The keep masks of the deletion vectors of the files `paths` (as the log names them) of
/// the loaded version of `table`, by path; a file without a vector has none.
pub(crate) async fn keep_masks(
    session: &SessionState,
    table: &DeltaTable,
    paths: &BTreeSet<String>,
) -> Result<HashMap<String, Vec<bool>>> {
    let with_vectors: Vec<String> = table.snapshot().map_or_else(
        |_| Vec::new(),
        |s| {
            s.log_data()
                .iter()
                .filter(|f| f.deletion_vector_descriptor().is_some())
                .map(|f| f.path().into_owned())
                .filter(|path| paths.contains(path))
                .collect()
        },
    );
    if with_vectors.is_empty() {
        return Ok(HashMap::new());
    }
    table
        .update_datafusion_session(session)
        .map_err(|e| EngineError::delta(table.table_url(), e))?;
    let provider = table
        .table_provider()
        .with_file_paths(with_vectors.clone())
        .build()
        .await?;
    let mut by_url: HashMap<String, Vec<bool>> = provider
        .deletion_vectors(session)
        .await?
        .into_iter()
        .map(|selection| (selection.filepath, selection.keep_mask))
        .collect();
    let root = table.table_url();
    with_vectors
        .into_iter()
        .map(|path| {
            let mask = root
                .join(&path)
                .ok()
                .and_then(|url| by_url.remove(url.as_str()))
                .ok_or_else(|| EngineError::UnreadableTable {
                    table: root.to_string(),
                    reason: format!("no deletion vector was read for {path}, which has one"),
                })?;
            Ok((path, mask))
        })
        .collect()
}

/// What a query reads `table` through. delta-rs reads a table with deletion vectors in one
/// partition (its scan numbers rows per partition, so it keeps all files in one group): once
/// an upsert had marked rows in each file of silver orders, every query read its 9.9 M rows
/// on one core. Such a table is read as `partitions` scans of a share of its files each (by
/// size), side by side: [`SplitScan`].
async fn scan_provider(table: &DeltaTable, partitions: usize) -> Result<Arc<dyn TableProvider>> {
    let whole = table.table_provider().await?;
    let Ok(state) = table.snapshot() else {
        return Ok(whole);
    };
    let mut files: Vec<(u64, String)> = Vec::new();
    let mut marked = false;
    for f in state.log_data().iter() {
        marked |= f.deletion_vector_descriptor().is_some();
        files.push((u64::try_from(f.size()).unwrap_or(0), f.path().into_owned()));
    }
    let shares = partitions.min(files.len());
    if !marked || shares < 2 {
        return Ok(whole);
    }
    // Largest first, each to the share that holds the fewest bytes so far.
    files.sort_unstable_by(|a, b| b.cmp(a));
    let mut groups: Vec<(u64, Vec<String>)> = vec![(0, Vec::new()); shares];
    for (size, path) in files {
        if let Some(group) = groups.iter_mut().min_by_key(|(bytes, _)| *bytes) {
            group.0 += size;
            group.1.push(path);
        }
    }
    let mut parts = Vec::with_capacity(shares);
    for (_, paths) in groups {
        let part = table
            .table_provider()
            .with_file_paths(paths)
            .build()
            .await?;
        parts.push(Arc::new(part) as Arc<dyn TableProvider>);
    }
    Ok(Arc::new(SplitScan { whole, parts }))
}

/// A Delta table read as the union of scans of disjoint sets of its files (see
/// [`scan_provider`]); its schema, filter pushdown and statistics are the whole table's.
#[derive(Debug)]
struct SplitScan {
    whole: Arc<dyn TableProvider>,
    parts: Vec<Arc<dyn TableProvider>>,
}

#[async_trait::async_trait]
impl TableProvider for SplitScan {
    fn schema(&self) -> SchemaRef {
        self.whole.schema()
    }

    fn table_type(&self) -> TableType {
        self.whole.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>>
    {
        self.whole.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<datafusion::common::Statistics> {
        self.whole.statistics()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let mut scans = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            scans.push(part.scan(state, projection, filters, limit).await?);
        }
        datafusion::physical_plan::union::UnionExec::try_new(scans)
    }
}

/// A data file as [`RowsAtPositions`] reads it: its location, size and partition values
/// (which the log holds, not the file).
type StoredFile = (
    object_store::path::Path,
    u64,
    HashMap<String, Option<String>>,
);

/// Data files read at once, each by a task of its own ([`on_own_task`]).
pub(crate) const FILES_READ_AT_ONCE: usize = 8;

/// Runs `work` as a task of its own and waits for it. Decoding a file is CPU work, and
/// futures polled in one task (as `buffered` polls them) share one core.
pub(crate) async fn on_own_task<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    SpawnedTask::spawn(work)
        .join_unwind()
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
}

/// Rows of data files picked by position (see [`flipped_rows`]), each side tagged with its
/// [`CHANGE_TYPE`]. They are read when a query's scan of them is planned, and then only the
/// columns it reads: a batch of re-sent orders flips rows in every file of silver orders, and
/// a query that reads their customers alone need not decode their other columns.
#[derive(Debug)]
struct RowsAtPositions {
    url: String,
    store: Arc<dyn object_store::ObjectStore>,
    files: Arc<HashMap<String, StoredFile>>,
    partition_columns: Arc<Vec<String>>,
    sides: [(BTreeMap<String, Vec<u64>>, &'static str); 2],
    /// The table's columns and [`CHANGE_TYPE`], last.
    schema: SchemaRef,
}

impl RowsAtPositions {
    fn new(
        table: &DeltaTable,
        sides: [(BTreeMap<String, Vec<u64>>, &'static str); 2],
        schema: SchemaRef,
    ) -> Result<Self> {
        let state = table
            .snapshot()
            .map_err(|e| EngineError::delta(table.table_url(), e))?;
        let files = state
            .log_data()
            .iter()
            .filter(|f| {
                sides
                    .iter()
                    .any(|(side, _)| side.contains_key(f.path().as_ref()))
            })
            .map(|f| {
                let size = u64::try_from(f.size()).unwrap_or(0);
                let values = f.partition_values_map().into_iter().collect();
                (f.path().into_owned(), (f.object_store_path(), size, values))
            })
            .collect();
        Ok(Self {
            url: table.table_url().to_string(),
            store: table.log_store().object_store(None),
            files: Arc::new(files),
            partition_columns: Arc::new(state.metadata().partition_columns().to_vec()),
            sides,
            schema: with_change_type(&schema),
        })
    }

    /// The rows at `positions` of each file they name, as `schema` (a projection of the
    /// table's columns, read by name from the files and cast to its types).
    async fn read(
        &self,
        positions: &BTreeMap<String, Vec<u64>>,
        schema: &SchemaRef,
    ) -> Result<Vec<RecordBatch>> {
        let reads = positions
            .iter()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(path, rows)| {
                let Some(file) = self.files.get(path).cloned() else {
                    return Err(EngineError::UnreadableTable {
                        table: self.url.clone(),
                        reason: format!("{path} is not a data file of the table"),
                    });
                };
                let read = read_file_rows(
                    Arc::clone(&self.store),
                    self.url.clone(),
                    path.clone(),
                    file,
                    rows.clone(),
                    Arc::clone(&self.partition_columns),
                    Arc::clone(schema),
                );
                Ok(on_own_task(read))
            });
        let read: Vec<Vec<RecordBatch>> = futures::stream::iter(reads.collect::<Result<Vec<_>>>()?)
            .buffered(FILES_READ_AT_ONCE)
            .try_collect()
            .await?;
        Ok(read.into_iter().flatten().collect())
    }
}

#[async_trait::async_trait]
impl TableProvider for RowsAtPositions {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let side_at = self.schema.fields().len() - 1;
        let wanted: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        let mut data: Vec<usize> = wanted.iter().copied().filter(|&i| i != side_at).collect();
        data.sort_unstable();
        data.dedup();
        // A count of rows reads one column: rows are read by column.
        if data.is_empty() {
            data.push(0);
        }
        let data_schema = Arc::new(self.schema.project(&data)?);
        let read_schema = with_change_type(&data_schema);
        let mut batches = Vec::new();
        for (positions, side) in &self.sides {
            let read = self.read(positions, &data_schema).await;
            for batch in read.map_err(|e| DataFusionError::External(Box::new(e)))? {
                let mut columns = batch.columns().to_vec();
                columns.push(Arc::new(StringArray::from(vec![*side; batch.num_rows()])));
                batches.push(RecordBatch::try_new(Arc::clone(&read_schema), columns)?);
            }
        }
        let indices: Vec<usize> = wanted
            .iter()
            .map(|&i| {
                if i == side_at {
                    data.len()
                } else {
                    data.iter().position(|&d| d == i).unwrap_or_default()
                }
            })
            .collect();
        MemTable::try_new(read_schema, vec![batches])?
            .scan(state, Some(&indices), filters, limit)
            .await
    }
}

/// The rows `rows` (positions, in order) of the data file `path` of the table at `url`, as
/// `schema`: its columns read by name from the file, a partition column's value from the log,
/// each cast to the schema's type.
async fn read_file_rows(
    store: Arc<dyn object_store::ObjectStore>,
    url: String,
    path: String,
    (location, size, values): StoredFile,
    rows: Vec<u64>,
    partition_columns: Arc<Vec<String>>,
    schema: SchemaRef,
) -> Result<Vec<RecordBatch>> {
    let mut selectors = Vec::new();
    let mut next = 0u64;
    for row in rows {
        selectors.push(RowSelector::skip((row - next) as usize));
        selectors.push(RowSelector::select(1));
        next = row + 1;
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|c| !partition_columns.iter().any(|p| p == c));
    let read: Vec<RecordBatch> = read_stored_columns(
        store,
        &location,
        size,
        columns,
        Some(RowSelection::from(selectors)),
    )
    .await?
    .try_collect()
    .await
    .map_err(DataFusionError::from)?;
    read.into_iter()
        .map(|batch| {
            let columns = schema
                .fields()
                .iter()
                .map(|f| {
                    let stored = if partition_columns.contains(f.name()) {
                        let value = values.get(f.name()).cloned().flatten();
                        Arc::new(StringArray::from(vec![value; batch.num_rows()])) as _
                    } else {
                        Arc::clone(batch.column_by_name(f.name()).ok_or_else(|| {
                            EngineError::UnreadableTable {
                                table: url.clone(),
                                reason: format!("{path} holds no column {}", f.name()),
                            }
                        })?)
                    };
                    Ok(cast(&stored, f.data_type()).map_err(DataFusionError::from)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(
                RecordBatch::try_new(Arc::clone(&schema), columns)
                    .map_err(DataFusionError::from)?,
            )
        })
        .collect()
}

/// Columns `columns` of the data file at `location` (`size` bytes), as the file stores them,
/// of the rows `rows` alone when given.
#[allow(deprecated)]
pub(crate) async fn read_stored_columns<'a>(
    store: Arc<dyn object_store::ObjectStore>,
    location: &object_store::path::Path,
    size: u64,
    columns: impl IntoIterator<Item = &'a str>,
    rows: Option<RowSelection>,
) -> Result<ParquetRecordBatchStream<ParquetObjectReader>> {
    let reader = ParquetObjectReader::new(store, location.clone()).with_file_size(size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(DataFusionError::from)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns);
    let mut builder = builder.with_projection(mask);
    if let Some(rows) = rows {
        builder = builder.with_row_selection(rows);
    }
    Ok(builder.build().map_err(DataFusionError::from)?)
}

/// Rows, from the Delta log's per-file statistics, by value of partition column `column` (a
/// null partition as `None`) across the data files of the loaded version of `table`.
pub fn rows_by_partition(table: &DeltaTable, column: &str) -> BTreeMap<Option<String>, u64> {
    let mut rows = BTreeMap::new();
    for (_, value, n) in files_in_partitions(table, column) {
        *rows.entry(value).or_insert(0) += n;
    }
    rows
}

/// The values of partition column `column` (a null partition as `None`) across the data
/// files of the loaded version of `table`.
pub fn partition_values(table: &DeltaTable, column: &str) -> BTreeSet<Option<String>> {
    rows_by_partition(table, column).into_keys().collect()
}

/// Rows, from the Delta log's per-file statistics, in the files of the loaded version of
/// `table` whose partition column `column` holds one of `values`.
pub fn rows_in_partitions(
    table: &DeltaTable,
    column: &str,
    values: &BTreeSet<Option<String>>,
) -> u64 {
    rows_by_partition(table, column)
        .into_iter()
        .filter(|(value, _)| values.contains(value))
        .map(|(_, rows)| rows)
        .sum()
}

/// Live rows of the loaded version of `table`, from the Delta log's per-file statistics less
/// the rows deletion vectors remove.
pub fn row_count(table: &DeltaTable) -> u64 {
    files_in_partitions(table, "")
        .into_iter()
        .map(|(_, _, rows)| rows)
        .sum()
}

/// Bytes and count of the data files in the loaded version of `table`.
pub fn data_files(table: &DeltaTable) -> (u64, u64) {
    table.snapshot().map_or((0, 0), |s| {
        s.log_data().iter().fold((0u64, 0u64), |(bytes, files), f| {
            (bytes + u64::try_from(f.size()).unwrap_or(0), files + 1)
        })
    })
}

/// The last version an application committed to `table` under `app_id` (a Delta `txn`
/// action), the basis of idempotent reruns.
pub async fn app_transaction_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>> {
    let snapshot = table
        .snapshot()
        .map_err(|e| EngineError::delta(table.table_url(), e))?;
    snapshot
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(|e| EngineError::delta(table.table_url(), e))
}
