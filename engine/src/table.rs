//! Opening Delta tables and showing them to DataFusion under `<layer>.<table>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::TableReference;
use datafusion::prelude::{DataFrame, SessionContext};
use deltalake::{DeltaTable, DeltaTableBuilder};
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
    let provider = table.table_provider().await?;
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
/// `since` of `table` and its loaded version: the rows of the files added since that no
/// removed file holds, and the other way round. A MERGE rewrites whole files and an upsert
/// that marks rows gives a file a new deletion vector, so this reads those files (each side
/// through its version's vectors), not the table. One column named `column`; no rows when no data
/// file changed, and the rows those files hold. `None` when version `since` can no longer be
/// loaded or is not older, or when the changed files hold more than `max_rows` rows.
pub async fn values_changed_since(
    ctx: &SessionContext,
    table: &DeltaTable,
    since: u64,
    column: &str,
    max_rows: u64,
) -> Result<Option<(Vec<RecordBatch>, u64)>> {
    let Some(([removed, added], before)) = files_changed_since(table, since, "").await else {
        return Ok(None);
    };
    let rows: u64 = removed.iter().chain(&added).map(|(_, _, rows)| rows).sum();
    if rows > max_rows {
        return Ok(None);
    }
    // Each side is read through its version's provider, which drops the rows that version's
    // deletion vectors remove: a file whose vector changed is read once as it was and once
    // as it is.
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
        Ok(Some(ctx.read_table(Arc::new(provider))?))
    };
    let (removed, added) = (read(&before, &removed).await?, read(table, &added).await?);
    let differing = match (removed, added) {
        (None, None) => return Ok(Some((Vec::new(), 0))),
        (Some(only), None) | (None, Some(only)) => only,
        (Some(old), Some(new)) => new.clone().except(old.clone())?.union(old.except(new)?)?,
    };
    let values = differing
        .select_columns(&[column])?
        .distinct()?
        .collect()
        .await?;
    Ok(Some((values, rows)))
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
