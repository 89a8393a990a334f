//! Replace a table's content, or the rows of some of its partitions, with a query result in
//! one Delta version. A whole-table replacement takes the result's schema and the builder's
//! partition columns, whatever the table had: the query defines the table.

use std::sync::Arc;

use datafusion::prelude::DataFrame;
use deltalake::DeltaTable;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use url::Url;

use super::{
    AppTransaction, CommitMetrics, Compression, DEFAULT_COMPRESSION, DEFAULT_TARGET_FILE_SIZE,
    FileLayout,
};
use crate::error::{EngineError, Result};
use crate::table;

/// Builds an overwrite of the Delta table at a URL with the rows of a [`DataFrame`].
#[derive(Debug)]
pub struct OverwriteBuilder {
    url: Url,
    source: DataFrame,
    partition_columns: Vec<String>,
    stats_columns: Option<Vec<String>>,
    replace_where: Option<String>,
    txn: Option<AppTransaction>,
    compression: Compression,
}

impl OverwriteBuilder {
    pub fn new(url: Url, source: DataFrame) -> Self {
        Self {
            url,
            source,
            partition_columns: Vec::new(),
            stats_columns: None,
            replace_where: None,
            txn: None,
            compression: DEFAULT_COMPRESSION,
        }
    }

    /// Replaces only the rows matching `predicate` (SQL over the table's columns; Delta's
    /// `replaceWhere`), every one of which the source must match; the rest of the table stays.
    pub fn with_replace_where(mut self, predicate: impl Into<String>) -> Self {
        self.replace_where = Some(predicate.into());
        self
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

    pub fn with_transaction(mut self, txn: AppTransaction) -> Self {
        self.txn = Some(txn);
        self
    }

    /// How the data files' pages are compressed ([`DEFAULT_COMPRESSION`] when never called).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    pub async fn execute(self) -> Result<CommitMetrics> {
        let existing = table::open_table(&self.url).await?;
        if let Some(t) = &existing
            && let Some(done) = AppTransaction::already_committed(self.txn.as_ref(), t).await?
        {
            return Ok(done);
        }
        write_dataframe(
            &self.url,
            existing,
            self.source,
            SaveMode::Overwrite,
            FileLayout {
                partition_columns: &self.partition_columns,
                stats_columns: self.stats_columns.as_deref(),
                compression: self.compression,
            },
            self.replace_where.as_deref(),
            self.txn.as_ref(),
        )
        .await
    }
}

/// Writes `source` to the table at `url` with `mode`, creating the table when absent.
pub(crate) async fn write_dataframe(
    url: &Url,
    existing: Option<DeltaTable>,
    source: DataFrame,
    mode: SaveMode,
    layout: FileLayout<'_>,
    replace_where: Option<&str>,
    txn: Option<&AppTransaction>,
) -> Result<CommitMetrics> {
    let table = match existing {
        Some(t) => t,
        None => {
            table::ensure_location(url)?;
            DeltaTable::try_from_url_with_storage_options(
                url.clone(),
                crate::location::storage_options(url),
            )
            .await
            .map_err(|e| EngineError::delta(url, e))?
        }
    };
    let (session_state, plan) = source.into_parts();
    let mut builder = table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_session_state(Arc::new(session_state))
        .with_save_mode(mode)
        .with_target_file_size(Some(DEFAULT_TARGET_FILE_SIZE))
        .with_writer_properties(layout.writer_properties(super::DataPageVersion::V1))
        .with_configuration(super::table_properties(layout.stats_columns))
        .with_commit_properties(AppTransaction::commit_properties(txn));
    let partition_columns = layout.partition_columns;
    match (mode, replace_where) {
        (SaveMode::Overwrite, None) => {
            // Even no partition columns is a layout to take: omitted, delta-rs keeps the old.
            builder = builder
                .with_schema_mode(SchemaMode::Overwrite)
                .with_partition_columns(partition_columns.to_vec());
        }
        (_, predicate) => {
            if !partition_columns.is_empty() {
                builder = builder.with_partition_columns(partition_columns.to_vec());
            }
            if let Some(predicate) = predicate {
                builder = builder.with_replace_where(predicate.to_string());
            }
        }
    }
    let table = builder.await.map_err(|e| EngineError::delta(url, e))?;
    let (bytes, files) = table::data_files(&table);
    let rows = table::row_count(&table);
    Ok(CommitMetrics {
        version: table.version(),
        rows_inserted: rows,
        files_added: files,
        bytes_added: bytes,
        ..CommitMetrics::default()
    })
}
