//! Append in two phases: stage data files (invisible to readers), then commit them in one
//! Delta transaction. A run stages every table before committing any, so a source that fails
//! half-way leaves every table as it was.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Scalar};
use datafusion::arrow::compute::kernels::cmp::not_distinct;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::scalars::ScalarExt;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use url::Url;

use super::{
    AppTransaction, CommitMetrics, Compression, DEFAULT_COMPRESSION, DEFAULT_TARGET_FILE_SIZE,
    DataPageVersion, FileLayout,
};
use crate::error::{EngineError, Result};
use crate::table;

/// Builds an append to the Delta table at a URL; the table is created on first commit.
#[derive(Debug, Clone)]
pub struct AppendBuilder {
    url: Url,
    schema: SchemaRef,
    partition_columns: Vec<String>,
    stats_columns: Option<Vec<String>>,
    target_file_size: u64,
    pages: DataPageVersion,
    compression: Compression,
}

impl AppendBuilder {
    pub fn new(url: Url, schema: SchemaRef) -> Self {
        Self {
            url,
            schema,
            partition_columns: Vec::new(),
            stats_columns: None,
            target_file_size: DEFAULT_TARGET_FILE_SIZE.get(),
            pages: DataPageVersion::default(),
            compression: DEFAULT_COMPRESSION,
        }
    }

    pub fn with_partition_columns(
        mut self,
        columns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.partition_columns = columns.into_iter().map(Into::into).collect();
        self
    }

    /// Only these columns carry min/max statistics (all of them when never called).
    pub fn with_stats_columns(mut self, columns: Vec<String>) -> Self {
        self.stats_columns = Some(columns);
        self
    }

    pub fn with_target_file_size(mut self, bytes: u64) -> Self {
        self.target_file_size = bytes;
        self
    }

    /// The data page layout of the files written (see [`DataPageVersion`] for when version 2
    /// pays).
    pub fn with_data_pages(mut self, pages: DataPageVersion) -> Self {
        self.pages = pages;
        self
    }

    /// How the data files' pages are compressed ([`DEFAULT_COMPRESSION`] when never called).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Opens a writer; data written to it stays invisible until [`StagedAppend::commit`].
    pub fn stage(self) -> Result<StagedAppend> {
        let partitions =
            (!self.partition_columns.is_empty()).then(|| self.partition_columns.clone());
        let writer = RecordBatchWriter::try_new(
            self.url.as_str(),
            Arc::clone(&self.schema),
            partitions,
            Some(crate::location::storage_options(&self.url)),
        )
        .map_err(|e| EngineError::delta(&self.url, e))?
        .with_target_file_size(self.target_file_size)
        .with_writer_properties(
            FileLayout {
                partition_columns: &self.partition_columns,
                stats_columns: self.stats_columns.as_deref(),
                compression: self.compression,
            }
            .writer_properties(self.pages),
        );
        Ok(StagedAppend {
            builder: self,
            writer,
            rows: 0,
            absorbed: Vec::new(),
        })
    }
}

/// Data files written but not yet committed.
pub struct StagedAppend {
    builder: AppendBuilder,
    writer: RecordBatchWriter,
    rows: u64,
    /// Files of other stagings folded into this one, committed with it.
    absorbed: Vec<deltalake::kernel::Add>,
}

/// The partition values of `batch` when all its rows share them; `None` when they differ or
/// the table is not partitioned.
fn single_partition_of<M, S>(batch: &RecordBatch, partition_columns: &[String]) -> Result<Option<M>>
where
    M: FromIterator<(String, S)>,
    S: ScalarExt,
{
    if partition_columns.is_empty() || batch.num_rows() == 0 {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(partition_columns.len());
    for name in partition_columns {
        let column = batch.column(batch.schema().index_of(name)?);
        let first = Scalar::new(column.slice(0, 1));
        if not_distinct(column, &first)?.true_count() != column.len() {
            return Ok(None);
        }
        let Some(value) = S::from_array(column.as_ref(), 0) else {
            return Ok(None);
        };
        values.push((name.clone(), value));
    }
    Ok(Some(values.into_iter().collect()))
}

impl std::fmt::Debug for StagedAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedAppend")
            .field("table", &self.builder.url.as_str())
            .field("rows", &self.rows)
            .finish()
    }
}

impl StagedAppend {
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if batch.schema().fields() != self.builder.schema.fields() {
            return Err(EngineError::InvalidWrite {
                table: self.builder.url.to_string(),
                reason: format!(
                    "batch schema {:?} differs from the table's {:?}",
                    batch.schema(),
                    self.builder.schema
                ),
            });
        }
        self.rows += batch.num_rows() as u64;
        let written = match single_partition_of(&batch, &self.builder.partition_columns)? {
            // delta-rs splits every batch by partition with a sort and a copy of each column,
            // also when every row has the same partition values (a bronze ingest date).
            Some(values) => self
                .writer
                .write_partition(batch, &values, WriteMode::Default)
                .await
                .map(|_| ()),
            None => self.writer.write(batch).await,
        };
        written.map_err(|e| EngineError::delta(&self.builder.url, e))
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Folds another staging of the same table into this one, so that several writers can
    /// encode in parallel and still commit as one version.
    pub async fn absorb(&mut self, mut other: StagedAppend) -> Result<()> {
        if other.builder.url != self.builder.url {
            return Err(EngineError::InvalidWrite {
                table: self.builder.url.to_string(),
                reason: format!("cannot absorb files staged for {}", other.builder.url),
            });
        }
        let adds = other
            .writer
            .flush()
            .await
            .map_err(|e| EngineError::delta(&other.builder.url, e))?;
        self.absorbed.extend(adds);
        self.absorbed.append(&mut other.absorbed);
        self.rows += other.rows;
        Ok(())
    }

    /// Closes the staged files without committing them: their adds and rows, for a commit
    /// that carries other actions too.
    pub(crate) async fn finish(mut self) -> Result<(Vec<deltalake::kernel::Add>, u64)> {
        let mut adds = self
            .writer
            .flush()
            .await
            .map_err(|e| EngineError::delta(&self.builder.url, e))?;
        adds.append(&mut self.absorbed);
        Ok((adds, self.rows))
    }

    /// Commits the staged files as one Delta version (creating the table when absent). With a
    /// transaction that the table already holds, nothing is committed.
    pub async fn commit(self, txn: Option<&AppTransaction>) -> Result<CommitMetrics> {
        let builder = self.builder.clone();
        let url = &builder.url;
        let (adds, rows) = self.finish().await?;
        let table = match table::open_table(url).await? {
            Some(t) => t,
            None => {
                create_table(
                    url,
                    &builder.schema,
                    &builder.partition_columns,
                    builder.stats_columns.as_deref(),
                )
                .await?
            }
        };
        if let Some(done) = AppTransaction::already_committed(txn, &table).await? {
            return Ok(done);
        }
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!builder.partition_columns.is_empty())
                .then(|| builder.partition_columns.clone()),
            predicate: None,
        };
        let committed = super::commit_files(url, &table, Vec::new(), adds, txn, operation).await?;
        Ok(CommitMetrics {
            rows_inserted: rows,
            ..committed
        })
    }
}

/// Creates an empty Delta table with `schema` at `url`.
pub(crate) async fn create_table(
    url: &Url,
    schema: &SchemaRef,
    partition_columns: &[String],
    stats_columns: Option<&[String]>,
) -> Result<DeltaTable> {
    let kernel_schema: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| EngineError::delta(url, e.into()))?;
    table::ensure_location(url)?;
    let table = DeltaTable::try_from_url_with_storage_options(
        url.clone(),
        crate::location::storage_options(url),
    )
    .await
    .map_err(|e| EngineError::delta(url, e))?;
    table
        .create()
        .with_columns(kernel_schema.fields().cloned())
        .with_partition_columns(partition_columns.to_vec())
        .with_configuration(super::table_properties(stats_columns))
        .await
        .map_err(|e| EngineError::delta(url, e))
}
