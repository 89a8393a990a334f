//! Write operations, one module per verb. Each is a builder that resolves to
//! [`CommitMetrics`], and each can carry an [`AppTransaction`] so that a rerun after a crash
//! finds its commit already made and skips it instead of writing twice.

mod append;
mod overwrite;
mod upsert;

pub use append::{AppendBuilder, StagedAppend};
pub use overwrite::OverwriteBuilder;
pub use upsert::UpsertBuilder;

use std::num::NonZeroU64;

pub use datafusion::parquet::basic::Compression;
use datafusion::parquet::basic::Encoding;
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use datafusion::parquet::schema::types::ColumnPath;
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Transaction};
use deltalake::protocol::DeltaOperation;
use serde::Serialize;
use url::Url;

use crate::error::{EngineError, Result};
use crate::table;

/// Data files are cut at this size unless a table says otherwise; delta-rs lets a file grow
/// without bound when no target is set.
pub const DEFAULT_TARGET_FILE_SIZE: NonZeroU64 = match NonZeroU64::new(128 * 1024 * 1024) {
    Some(n) => n,
    None => NonZeroU64::MIN,
};

/// Bytes a column's dictionary may reach in a data file before the column falls back to
/// plain encoding. A partitioned write keeps a file open per partition value, each with a
/// dictionary per column: at parquet's 1 MiB default, a write of 90 date partitions held
/// about 1 GB in dictionaries of unique-valued columns (ids) that fell back to plain anyway.
/// Until it falls back, the writer hashes every value into the dictionary: at 128 KiB that
/// was a tenth of silver's CPU. Columns of few values (types, countries, statuses) stay far
/// below 16 KiB; at SF 1 the lake came out 2.6% smaller and the run 4-8% faster than at 128.
const DICTIONARY_PAGE_BYTES: usize = 16 * 1024;

/// Rows per Parquet row group (DuckDB writes 122,880). A writer holds its open row group,
/// encoded, until the group is full: at parquet's default of 1 Mi rows a write of 90 date
/// partitions held nearly the whole table in memory.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// How data files' pages are compressed unless a write says otherwise: Snappy, as Spark and
/// Delta write them, which every Parquet reader takes.
pub const DEFAULT_COMPRESSION: Compression = Compression::SNAPPY;

/// The layout of a data file's pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DataPageVersion {
    /// Version 1 pages, which every Parquet reader takes. The writer copies a page's values
    /// into a new buffer with its levels, then compresses that copy into a buffer it grows
    /// by copying again, and finally trims that buffer to the compressed size.
    #[default]
    V1,
    /// Version 2 pages: the writer compresses a page's values straight from the encoder's
    /// buffer, without the two copies of version 1 (bronze at SF 10: 8% less CPU in seven
    /// alternating runs each). But it keeps the compression buffer untrimmed, about the
    /// page's uncompressed size, until its row group is written: a write with a file open
    /// per partition holds that much more (silver at SF 10, 90 date partitions: 4.1-4.2
    /// against 3.5 GB peak). For writes that keep one file open at a time.
    V2,
}

/// How a write lays out its data files: the table's partition columns, the columns that
/// carry statistics (`None`: all of them), and the pages' compression.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileLayout<'a> {
    pub partition_columns: &'a [String],
    pub stats_columns: Option<&'a [String]>,
    pub compression: Compression,
}

impl FileLayout<'_> {
    /// Parquet settings of every data file the engine writes. With `stats_columns`, only
    /// those columns carry min/max statistics: the writer compares every value of a string
    /// column with its page's bounds, which was a tenth of the CPU of writing raw JSON text
    /// that nothing ever filters on (bronze at SF 10: 22.7 against 25.2 CPU seconds without
    /// any statistics).
    pub(crate) fn writer_properties(&self, pages: DataPageVersion) -> WriterProperties {
        let mut builder = WriterProperties::builder()
            .set_compression(self.compression)
            .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
        if pages == DataPageVersion::V2 {
            // PLAIN keeps version 1's fallback from a dictionary: under version 2 the writer
            // would fall back to the DELTA encodings, which cost more to write and to read.
            builder = builder
                .set_writer_version(WriterVersion::PARQUET_2_0)
                .set_encoding(Encoding::PLAIN);
        }
        if let Some(columns) = self.stats_columns {
            builder = builder.set_statistics_enabled(EnabledStatistics::None);
            for column in columns {
                builder = builder.set_column_statistics_enabled(
                    ColumnPath::from(column.as_str()),
                    EnabledStatistics::Page,
                );
            }
        }
        builder.build()
    }
}

/// The table properties a table is created with: the target file size, so that writes
/// without a setter of their own (MERGE reads it from the table) cut files at the same size,
/// and the columns with statistics (Delta's `delta.dataSkippingStatsColumns`), so that other
/// writers of the table (Spark, delta-rs) collect the same ones.
pub(crate) fn table_properties(
    stats_columns: Option<&[String]>,
) -> Vec<(&'static str, Option<String>)> {
    let mut properties = vec![(
        "delta.targetFileSize",
        Some(DEFAULT_TARGET_FILE_SIZE.get().to_string()),
    )];
    if let Some(columns) = stats_columns {
        let quoted: Vec<String> = columns
            .iter()
            .map(|c| {
                if c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                    c.clone()
                } else {
                    format!("`{}`", c.replace('`', "``"))
                }
            })
            .collect();
        properties.push(("delta.dataSkippingStatsColumns", Some(quoted.join(","))));
    }
    properties
}

/// An application transaction: `(app_id, version)` recorded in the Delta log with a commit.
/// A commit whose `app_id` already reached `version` is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTransaction {
    pub app_id: String,
    pub version: i64,
}

impl AppTransaction {
    pub fn new(app_id: impl Into<String>, version: i64) -> Self {
        Self {
            app_id: app_id.into(),
            version,
        }
    }

    fn commit_properties(txn: Option<&Self>) -> CommitProperties {
        let props = CommitProperties::default();
        match txn {
            Some(t) => props.with_application_transaction(Transaction::new(&t.app_id, t.version)),
            None => props,
        }
    }

    /// The metrics of a write whose transaction an earlier attempt already committed to
    /// `table`, or `None` when the write is still to be made.
    pub(crate) async fn already_committed(
        txn: Option<&Self>,
        table: &DeltaTable,
    ) -> Result<Option<CommitMetrics>> {
        let Some(txn) = txn else { return Ok(None) };
        Ok(txn.is_committed(table).await?.then(|| CommitMetrics {
            version: table.version(),
            already_committed: true,
            ..CommitMetrics::default()
        }))
    }

    /// Whether `table` already holds this transaction's commit.
    pub async fn is_committed(&self, table: &DeltaTable) -> Result<bool> {
        Ok(table::app_transaction_version(table, &self.app_id)
            .await?
            .is_some_and(|v| v >= self.version))
    }
}

/// Commits `actions` and the data files `adds` to `table` as one version under `txn`. The
/// metrics carry the version and the files and bytes added; rows are the caller's to fill.
/// With no action, no file and no transaction there is nothing to record: nothing is
/// committed and the loaded version is reported.
pub(crate) async fn commit_files(
    url: &Url,
    table: &DeltaTable,
    mut actions: Vec<Action>,
    adds: Vec<Add>,
    txn: Option<&AppTransaction>,
    operation: DeltaOperation,
) -> Result<CommitMetrics> {
    if actions.is_empty() && adds.is_empty() && txn.is_none() {
        return Ok(CommitMetrics {
            version: table.version(),
            ..CommitMetrics::default()
        });
    }
    let files_added = adds.len() as u64;
    let bytes_added = adds
        .iter()
        .map(|a| u64::try_from(a.size).unwrap_or(0))
        .sum();
    actions.extend(adds.into_iter().map(Action::Add));
    let snapshot = table.snapshot().map_err(|e| EngineError::delta(url, e))?;
    let finalized = CommitBuilder::from(AppTransaction::commit_properties(txn))
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await
        .map_err(|e| EngineError::delta(url, e))?;
    Ok(CommitMetrics {
        version: Some(finalized.version()),
        files_added,
        bytes_added,
        ..CommitMetrics::default()
    })
}

/// What a write did, as recorded in a run summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CommitMetrics {
    /// The table version after the write (unchanged when skipped or empty).
    pub version: Option<u64>,
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub files_added: u64,
    pub bytes_added: u64,
    /// The transaction was already committed by an earlier attempt; nothing was written.
    pub already_committed: bool,
}
