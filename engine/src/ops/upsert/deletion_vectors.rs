//! Upsert by deletion vectors: a stored row that loses to its incoming version is marked
//! deleted in a deletion vector beside its file, and the incoming rows that win are appended,
//! in one commit. A copy-on-write MERGE rewrites every file that holds a match: a batch of
//! re-sent orders spread over every date rewrote all 9.9 M rows of silver orders at SF 10 to
//! update 12,768 of them. Here the stored files are only read, and only their key and
//! keep-rule columns.
//!
//! It reads data files as stored (a deletion vector counts rows as the file holds them), so
//! it stays off tables whose columns are mapped to other names in the files, and off keys or
//! keep-rule columns that are partition columns, which the files do not hold. The caller
//! falls back to delta-rs's MERGE there.

use std::sync::Arc;

use buoyant_kernel::actions::deletion_vector_writer::{
    KernelDeletionVector, StreamingDeletionVectorWriter,
};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray as _, BooleanArray, RecordBatch, UInt32Array,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::{DataFusionError, HashMap};
use datafusion::prelude::DataFrame;
use deltalake::DeltaTable;
use deltalake::delta_datafusion::DataFusionMixins as _;
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor, Remove, StorageType};
use deltalake::protocol::DeltaOperation;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};
use url::Url;

use super::super::{AppTransaction, AppendBuilder, CommitMetrics, DataPageVersion, FileLayout};
use crate::error::{EngineError, Result};
use crate::table::{FILES_READ_AT_ONCE, on_own_task};

/// Data files a partition may gather, on average, before an upsert compacts the table.
/// Marking adds a file to every partition a batch touches, where a MERGE rewrote the file
/// there: a batch of re-sent orders spread over 90 dates adds 90 small files. Compaction
/// rewrites them (and the rows their deletion vectors remove) once every few batches.
const FILES_PER_PARTITION_BEFORE_COMPACTION: usize = 8;

/// The table property that has delta-rs raise the protocol to the deletion vector feature.
const ENABLE_DELETION_VECTORS: &str = "delta.enableDeletionVectors";

/// What an upsert needs to know of the table and the rule, borrowed from its builder.
pub(super) struct MarkingUpsert<'a> {
    pub url: &'a Url,
    pub keys: &'a [String],
    pub winner_order: &'a [String],
    pub layout: FileLayout<'a>,
    pub txn: Option<&'a AppTransaction>,
}

/// Whether an upsert into `table` can mark rows deleted instead of rewriting files.
pub(super) fn applies(table: &DeltaTable, keys: &[String], winner_order: &[String]) -> bool {
    let read: Vec<String> = keys.iter().chain(winner_order).cloned().collect();
    !keys.is_empty() && crate::table::stored_as_named(table, &read)
}

/// A data file of the table that may hold a key of the batch.
struct Candidate {
    path: Path,
    size: u64,
    add: Add,
    remove: Remove,
    /// Rows its current deletion vector already removes, as row indexes in the file.
    deleted: Vec<u64>,
}

/// What a stored file's rows are looked up in: the incoming rows, by key, and their keep-rule
/// columns in row form (none without a rule). Owned, so that each file is read by a task of
/// its own: decoding a file is CPU work, and futures polled in one task share one core.
struct Probe {
    source: RecordBatch,
    keys: Vec<String>,
    winner_order: Vec<String>,
    by_key: KeyIndex,
    order: Option<(RowConverter, Rows)>,
}

/// The incoming rows by key, as stored keys are looked up in them. Every stored key is looked
/// up (the 9.9 M of silver orders at SF 10 for a batch of 120 K), so one text key, the usual
/// id, is looked up by its bytes as read: converting each stored key to the row format and
/// casting its column to the incoming type copied every key twice. A null key matches a null
/// key, as in the row format and in the MERGE's `IS NOT DISTINCT FROM`.
enum KeyIndex {
    Text {
        by_value: HashMap<Box<[u8]>, u32>,
        null: Option<u32>,
    },
    Rows {
        converter: RowConverter,
        by_row: HashMap<Box<[u8]>, u32>,
    },
}

impl KeyIndex {
    fn new(source: &RecordBatch, keys: &[String]) -> Result<Self> {
        if let [key] = keys
            && let Some(values) = text_bytes(source.column(source.schema().index_of(key)?))
        {
            let mut by_value = HashMap::with_capacity(values.len());
            let mut null = None;
            for (row, value) in values.into_iter().enumerate() {
                match value {
                    Some(bytes) => {
                        by_value.insert(bytes.into(), row as u32);
                    }
                    None => null = Some(row as u32),
                }
            }
            return Ok(Self::Text { by_value, null });
        }
        let converter = converter(source, keys)?;
        let rows = converter.convert_columns(&columns(source, keys)?)?;
        let by_row = (0..rows.num_rows())
            .map(|i| (rows.row(i).data().into(), i as u32))
            .collect();
        Ok(Self::Rows { converter, by_row })
    }

    /// The incoming row with the key of each row of `stored`, if any.
    fn incoming_rows(
        &self,
        stored: &RecordBatch,
        source: &RecordBatch,
        keys: &[String],
    ) -> Result<Vec<Option<u32>>> {
        match self {
            Self::Text { by_value, null } => {
                let column = stored.column(stored.schema().index_of(&keys[0])?);
                let cast_to_text;
                let values = match text_bytes(column) {
                    Some(values) => values,
                    None => {
                        // A dictionary, say: read as text.
                        cast_to_text = cast(column.as_ref(), &DataType::Utf8)?;
                        text_bytes(&cast_to_text).unwrap_or_default()
                    }
                };
                Ok(values
                    .into_iter()
                    .map(|v| match v {
                        Some(bytes) => by_value.get(bytes).copied(),
                        None => *null,
                    })
                    .collect())
            }
            Self::Rows { converter, by_row } => {
                let rows = converter.convert_columns(&cast_like(stored, source, keys)?)?;
                Ok((0..rows.num_rows())
                    .map(|i| by_row.get(rows.row(i).data()).copied())
                    .collect())
            }
        }
    }
}

/// Each value of a text column as bytes (`None`: null); `None` for a column of another type.
fn text_bytes(column: &ArrayRef) -> Option<Vec<Option<&[u8]>>> {
    fn bytes(v: Option<&str>) -> Option<&[u8]> {
        v.map(str::as_bytes)
    }
    match column.data_type() {
        DataType::Utf8View => Some(column.as_string_view().iter().map(bytes).collect()),
        DataType::Utf8 => Some(column.as_string::<i32>().iter().map(bytes).collect()),
        DataType::LargeUtf8 => Some(column.as_string::<i64>().iter().map(bytes).collect()),
        _ => None,
    }
}

/// A stored row with the key of an incoming row.
struct Match {
    source_row: u32,
    file: usize,
    row_index: u64,
    source_wins: bool,
}

impl MarkingUpsert<'_> {
    pub(super) async fn execute(
        &self,
        mut table: DeltaTable,
        source: DataFrame,
    ) -> Result<CommitMetrics> {
        let url = self.url;
        let session = source.clone().into_parts().0;
        let declared: SchemaRef = Arc::new(source.schema().as_arrow().clone());
        let batches = source.collect().await?;
        let source = self.source_batch(&table, declared, batches)?;
        let by_key = KeyIndex::new(&source, self.keys)?;
        // No keep rule (`keep = "any"`: the copies of a key are alike): the stored row stays.
        let order = match self.winner_order {
            [] => None,
            order => {
                let converter = converter(&source, order)?;
                let rows = converter.convert_columns(&columns(&source, order)?)?;
                Some((converter, rows))
            }
        };

        let candidates = self.candidates(&table, &source, &session).await?;
        let store = table.log_store().object_store(None);
        let probe = Arc::new(Probe {
            source,
            keys: self.keys.to_vec(),
            winner_order: self.winner_order.to_vec(),
            by_key,
            order,
        });
        let found: Vec<Vec<Match>> = futures::stream::iter(candidates.iter().enumerate())
            .map(|(file, candidate)| {
                let (store, probe) = (Arc::clone(&store), Arc::clone(&probe));
                let (path, size, deleted) = (
                    candidate.path.clone(),
                    candidate.size,
                    candidate.deleted.clone(),
                );
                on_own_task(matches_in(store, path, size, deleted, file, probe))
            })
            .buffer_unordered(FILES_READ_AT_ONCE)
            .try_collect()
            .await?;
        let source = &probe.source;

        // An incoming row replaces what it matches only when it beats every stored row with
        // its key (one, unless the table already held duplicates).
        let mut beaten = vec![true; source.num_rows()];
        let mut matched = vec![false; source.num_rows()];
        for m in found.iter().flatten() {
            matched[m.source_row as usize] = true;
            beaten[m.source_row as usize] &= m.source_wins;
        }
        let mut deletions: Vec<Vec<u64>> = vec![Vec::new(); candidates.len()];
        for m in found.iter().flatten() {
            if beaten[m.source_row as usize] {
                deletions[m.file].push(m.row_index);
            }
        }
        let rows_updated = (0..source.num_rows())
            .filter(|&i| matched[i] && beaten[i])
            .count() as u64;
        let written = filter_record_batch(source, &BooleanArray::from(beaten))?;

        let mut staged = AppendBuilder::new(url.clone(), source.schema())
            .with_partition_columns(self.layout.partition_columns.iter().cloned())
            .with_compression(self.layout.compression);
        if let Some(columns) = self.layout.stats_columns {
            staged = staged.with_stats_columns(columns.to_vec());
        }
        let mut staged = staged.stage()?;
        staged.write(written).await?;
        let (adds, rows_written) = staged.finish().await?;

        let mut actions: Vec<Action> = Vec::new();
        if deletions.iter().any(|d| !d.is_empty()) {
            table = enable_deletion_vectors(table, url).await?;
            actions.extend(
                mark_deleted(
                    url,
                    table.log_store().object_store(None),
                    candidates,
                    deletions,
                )
                .await?,
            );
        }
        let operation = DeltaOperation::Merge {
            predicate: None,
            merge_predicate: Some(format!("keys: {}", self.keys.join(", "))),
            matched_predicates: Vec::new(),
            not_matched_predicates: Vec::new(),
            not_matched_by_source_predicates: Vec::new(),
        };
        let committed =
            super::super::commit_files(url, &table, actions, adds, self.txn, operation).await?;
        Ok(CommitMetrics {
            rows_inserted: rows_written - rows_updated,
            rows_updated,
            ..committed
        })
    }

    /// The incoming rows as one batch (none: an empty one of the declared schema), each
    /// column cast to the table's type of it.
    fn source_batch(
        &self,
        table: &DeltaTable,
        declared: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<RecordBatch> {
        let state = table
            .snapshot()
            .map_err(|e| EngineError::delta(self.url, e))?;
        let stored = state.snapshot().input_schema();
        let incoming = batches.first().map_or(declared, RecordBatch::schema);
        let mut fields = Vec::with_capacity(incoming.fields().len());
        for field in incoming.fields() {
            let Ok(target) = stored.field_with_name(field.name()) else {
                return Err(EngineError::InvalidWrite {
                    table: self.url.to_string(),
                    reason: format!("column '{}' is not in the table", field.name()),
                });
            };
            fields.push(Field::new(
                field.name(),
                target.data_type().clone(),
                field.is_nullable() || target.is_nullable(),
            ));
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let whole = concat_batches(&incoming, &batches)?;
        let cast_columns = whole
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(schema, cast_columns)?)
    }

    /// The data files that may hold a key of `source`: every file, less those whose key
    /// statistics put all their keys outside the batch's range (one text key).
    async fn candidates(
        &self,
        table: &DeltaTable,
        source: &RecordBatch,
        session: &datafusion::execution::SessionState,
    ) -> Result<Vec<Candidate>> {
        let state = table
            .snapshot()
            .map_err(|e| EngineError::delta(self.url, e))?;
        let range = key_range(source, self.keys);
        let mut candidates = Vec::new();
        let mut log_paths = Vec::new();
        for file in state.log_data().iter() {
            if let (Some((low, high)), Some(stats)) = (&range, file.stats())
                && outside(&stats, &self.keys[0], low, high)
            {
                continue;
            }
            log_paths.push(file.path().into_owned());
            #[allow(deprecated)] // the Add of a file is what a commit re-adds with its new DV
            let add = file.add_action();
            candidates.push(Candidate {
                path: file.object_store_path(),
                size: u64::try_from(file.size()).unwrap_or(0),
                remove: file.remove_action(true),
                add,
                deleted: Vec::new(),
            });
        }
        // The rows a file's current deletion vector removes.
        let wanted = log_paths.iter().cloned().collect();
        let mut masks = crate::table::keep_masks(session, table, &wanted).await?;
        for (candidate, path) in candidates.iter_mut().zip(&log_paths) {
            if let Some(mask) = masks.remove(path) {
                candidate.deleted = mask
                    .iter()
                    .enumerate()
                    .filter(|(_, keep)| !**keep)
                    .map(|(row, _)| row as u64)
                    .collect();
            }
        }
        Ok(candidates)
    }
}

/// The stored rows of the file at `path` (`size` bytes) whose key an incoming row has, each
/// with whether the incoming row beats it. Rows its deletion vector removes (`deleted`, row
/// indexes in order) are not looked at.
async fn matches_in(
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    deleted: Vec<u64>,
    file: usize,
    probe: Arc<Probe>,
) -> Result<Vec<Match>> {
    let Probe {
        source,
        keys: key_names,
        winner_order,
        by_key,
        order,
    } = probe.as_ref();
    let wanted = key_names.iter().chain(winner_order).map(String::as_str);
    let mut stream = crate::table::read_stored_columns(store, &path, size, wanted, None).await?;
    let mut deleted = deleted.into_iter().peekable();
    let mut matches = Vec::new();
    let mut offset = 0u64;
    while let Some(batch) = stream.try_next().await.map_err(DataFusionError::from)? {
        let incoming = by_key.incoming_rows(&batch, source, key_names)?;
        let mut hits: Vec<(u32, u64, u32)> = Vec::new();
        for (i, found) in incoming.into_iter().enumerate() {
            let row_index = offset + i as u64;
            while deleted.next_if(|&d| d < row_index).is_some() {}
            if deleted.next_if_eq(&row_index).is_some() {
                continue;
            }
            if let Some(source_row) = found {
                hits.push((source_row, row_index, i as u32));
            }
        }
        offset += batch.num_rows() as u64;
        if hits.is_empty() {
            continue;
        }
        let Some((order_converter, source_order)) = order else {
            matches.extend(hits.into_iter().map(|(source_row, row_index, _)| Match {
                source_row,
                file,
                row_index,
                source_wins: false,
            }));
            continue;
        };
        let at = UInt32Array::from_iter_values(hits.iter().map(|h| h.2));
        let stored_order = cast_like(&batch, source, winner_order)?
            .iter()
            .map(|c| take(c.as_ref(), &at, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let stored_order = order_converter.convert_columns(&stored_order)?;
        for (n, (source_row, row_index, _)) in hits.into_iter().enumerate() {
            matches.push(Match {
                source_row,
                file,
                row_index,
                // Equal tuples keep the stored row.
                source_wins: source_order.row(source_row as usize) > stored_order.row(n),
            });
        }
    }
    Ok(matches)
}

/// A row converter over `names` of `batch`, ordering nulls before any value, as the keep
/// rule does.
fn converter(batch: &RecordBatch, names: &[String]) -> Result<RowConverter> {
    let fields = names
        .iter()
        .map(|n| {
            let field = batch.schema().field_with_name(n).cloned()?;
            Ok(SortField::new(field.data_type().clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RowConverter::new(fields)?)
}

fn columns(batch: &RecordBatch, names: &[String]) -> Result<Vec<ArrayRef>> {
    names
        .iter()
        .map(|n| Ok(Arc::clone(batch.column(batch.schema().index_of(n)?))))
        .collect()
}

/// Columns `names` of a stored batch, cast to their types in the incoming batch (a file
/// read as written may spell a type differently, a dictionary or a view).
fn cast_like(
    stored: &RecordBatch,
    incoming: &RecordBatch,
    names: &[String],
) -> Result<Vec<ArrayRef>> {
    names
        .iter()
        .map(|n| {
            let column = stored.column(stored.schema().index_of(n)?);
            let to = incoming.schema().field_with_name(n)?.data_type().clone();
            Ok(cast(column.as_ref(), &to)?)
        })
        .collect()
}

/// The least and greatest key of a batch with one text key and no null one.
fn key_range(source: &RecordBatch, keys: &[String]) -> Option<(String, String)> {
    let [key] = keys else { return None };
    let column = source.column(source.schema().index_of(key).ok()?);
    if column.null_count() > 0 || !column.data_type().is_string() {
        return None;
    }
    let text = cast(
        column.as_ref(),
        &datafusion::arrow::datatypes::DataType::Utf8,
    )
    .ok()?;
    let text = text
        .as_any()
        .downcast_ref::<datafusion::arrow::array::StringArray>()?;
    let low = datafusion::arrow::compute::min_string(text)?;
    let high = datafusion::arrow::compute::max_string(text)?;
    Some((low.to_owned(), high.to_owned()))
}

/// Whether a file's statistics put every value of text column `key` outside `[low, high]`.
fn outside(stats: &str, key: &str, low: &str, high: &str) -> bool {
    let Ok(stats) = serde_json::from_str::<serde_json::Value>(stats) else {
        return false;
    };
    let bound = |side: &str| {
        stats
            .get(side)
            .and_then(|v| v.get(key))
            .and_then(|v| v.as_str())
    };
    match (bound("minValues"), bound("maxValues")) {
        (Some(min), Some(max)) => min > high || max < low,
        _ => false,
    }
}

/// Compacts the table (delta-rs's OPTIMIZE, bin-packing each partition's small files into
/// files of the target size) once its partitions hold more than
/// [`FILES_PER_PARTITION_BEFORE_COMPACTION`] files on average. A commit of its own that
/// changes no row: a crash before it leaves the upsert committed and the files to compact
/// next time.
pub(super) async fn compact_when_scattered(url: &Url, layout: FileLayout<'_>) -> Result<()> {
    let Some(table) = crate::table::open_table(url).await? else {
        return Ok(());
    };
    let (files, partitions) = {
        let state = table.snapshot().map_err(|e| EngineError::delta(url, e))?;
        let mut partitions = std::collections::HashSet::new();
        let mut files = 0usize;
        for file in state.log_data().iter() {
            files += 1;
            let mut values: Vec<_> = file.partition_values_map().into_iter().collect();
            values.sort();
            partitions.insert(values);
        }
        (files, partitions.len().max(1))
    };
    if files <= FILES_PER_PARTITION_BEFORE_COMPACTION * partitions {
        return Ok(());
    }
    let (_, metrics) = table
        .optimize()
        .with_target_size(super::super::DEFAULT_TARGET_FILE_SIZE)
        .with_writer_properties(layout.writer_properties(DataPageVersion::V1))
        .await
        .map_err(|e| EngineError::delta(url, e))?;
    tracing::info!(
        table = %url,
        files_before = files,
        partitions,
        files_removed = metrics.num_files_removed,
        files_added = metrics.num_files_added,
        "compacted the files upserts added"
    );
    Ok(())
}

/// Raises the table's protocol to deletion vectors, once.
async fn enable_deletion_vectors(table: DeltaTable, url: &Url) -> Result<DeltaTable> {
    let enabled = table
        .snapshot()
        .is_ok_and(|s| s.snapshot().table_properties().enable_deletion_vectors == Some(true));
    if enabled {
        return Ok(table);
    }
    table
        .set_tbl_properties()
        .with_properties(std::collections::HashMap::from([(
            ENABLE_DELETION_VECTORS.to_string(),
            "true".to_string(),
        )]))
        .await
        .map_err(|e| EngineError::delta(url, e))
}

/// Writes one deletion vector file holding each touched file's vector (its earlier deletions
/// and the new ones) and returns, per file, the remove of its old entry and the add of it
/// with the new vector.
async fn mark_deleted(
    url: &Url,
    store: Arc<dyn ObjectStore>,
    candidates: Vec<Candidate>,
    deletions: Vec<Vec<u64>>,
) -> Result<Vec<Action>> {
    let kernel = |e: buoyant_kernel::Error| EngineError::delta(url, e.into());
    let id = uuid::Uuid::new_v4();
    let mut bytes = Vec::new();
    let mut actions = Vec::new();
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
        for (candidate, new) in candidates.into_iter().zip(deletions) {
            if new.is_empty() {
                continue;
            }
            let mut vector = KernelDeletionVector::new();
            vector.add_deleted_row_indexes(candidate.deleted.iter().chain(&new));
            let written = writer.write_deletion_vector(vector).map_err(kernel)?;
            let mut add = candidate.add;
            add.deletion_vector = Some(DeletionVectorDescriptor {
                storage_type: StorageType::UuidRelativePath,
                path_or_inline_dv: z85::encode(id.as_bytes()),
                offset: Some(written.offset),
                size_in_bytes: written.size_in_bytes,
                cardinality: written.cardinality,
            });
            add.stats = add.stats.map(|s| loose_bounds(&s));
            actions.push(Action::Remove(candidate.remove));
            actions.push(Action::Add(add));
        }
        writer.finalize().map_err(kernel)?;
    }
    let path = Path::from(format!("deletion_vector_{id}.bin"));
    store
        .put(&path, bytes.into())
        .await
        .map_err(|e| EngineError::ObjectStore {
            location: format!("{url}{path}"),
            source: Box::new(e),
        })?;
    Ok(actions)
}

/// Statistics of a file some of whose rows are deleted: its minimum and maximum may now be
/// wider than its live rows (Delta's `tightBounds`).
fn loose_bounds(stats: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(stats) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("tightBounds".into(), serde_json::Value::Bool(false));
            serde_json::Value::Object(map).to_string()
        }
        _ => stats.to_string(),
    }
}
