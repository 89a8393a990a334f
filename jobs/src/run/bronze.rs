//! Bronze: append every landed file not yet ingested, exactly once.
//!
//! Two phases. First every table's new files are read and staged as data files that no
//! reader sees, with the intent (`pending`: the files and the sequence number) recorded in
//! the state store. Then each table commits its staged files with the transaction id
//! `(…/bronze/<table>, seq)` and the state moves the files to `ingested`. A file that cannot
//! be read fails the first phase, so every table stays as it was. A crash between a commit
//! and its state write is healed by the next run, which finds the transaction in the table.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Date32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::StreamExt as _;
use medallion_connectors::files::{FilesSource, LandedFile};
use medallion_connectors::state::{get_typed, put_typed};
use medallion_engine::ops::{AppendBuilder, DataPageVersion, StagedAppend};
use medallion_engine::table;
use serde::{Deserialize, Serialize};

use super::{Layer, RunContext, elapsed_ms};
use crate::error::JobError;
use crate::pipeline::BronzeSpec;
use crate::summary::TableSummary;

/// Bronze metadata columns added to every source row.
pub const INGEST_TS: &str = "_ingest_ts";
pub const INGEST_DATE: &str = "_ingest_date";
pub const SOURCE: &str = "_source";
pub const RUN_ID: &str = "_run_id";

/// The schema of a bronze table: the source's columns, then the ingest metadata.
pub(crate) fn bronze_schema(source: &FilesSource) -> SchemaRef {
    let mut fields: Vec<Field> = source
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend([
        Field::new(
            INGEST_TS,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(RUN_ID, DataType::Utf8, false),
        Field::new(INGEST_DATE, DataType::Date32, false),
    ]);
    Arc::new(Schema::new(fields))
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct BronzeState {
    /// Sequence number of the last committed ingest.
    seq: i64,
    /// Locations of every file committed so far.
    ingested: BTreeSet<String>,
    /// An ingest staged but not known to be committed.
    pending: Option<PendingIngest>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingIngest {
    seq: i64,
    files: Vec<String>,
}

struct Staged {
    spec_table: String,
    summary: TableSummary,
    started: Instant,
    staged: StagedAppend,
    state: BronzeState,
    state_version: Option<u64>,
    seq: i64,
    files: Vec<String>,
}

pub(crate) async fn run(run: &RunContext<'_>, out: &mut Vec<TableSummary>) -> Result<(), JobError> {
    // Tables are staged concurrently, so one table's parsing and Parquet encoding overlap
    // with another's. Nothing is committed until every table is staged.
    let staging = run.pipeline.spec.bronze.iter().map(|spec| async move {
        let name = spec.table.get_ref().clone();
        stage_table(run, spec)
            .await
            .map_err(|e| e.in_table("bronze", &name))
    });
    let mut staged = Vec::new();
    for result in futures::future::try_join_all(staging).await? {
        match result {
            Ok(s) => staged.push(s),
            Err(summary) => out.push(summary),
        }
    }
    for s in staged {
        let name = s.spec_table.clone();
        out.push(
            commit_table(run, s)
                .await
                .map_err(|e| e.in_table("bronze", &name))?,
        );
    }
    Ok(())
}

/// Reads and stages one table's new files; `Err(summary)` when there is nothing to ingest.
async fn stage_table(
    run: &RunContext<'_>,
    spec: &BronzeSpec,
) -> Result<Result<Staged, TableSummary>, JobError> {
    let started = Instant::now();
    let name = spec.table.get_ref().clone();
    let url = run.pipeline.table_url("bronze", &name)?;
    let key = run.state_key(Layer::Bronze, &name);
    let (mut state, mut version) = get_typed::<BronzeState>(run.state(), &key).await?;
    if let Some(pending) = state.pending.take() {
        let txn = run.transaction(Layer::Bronze, &name, pending.seq);
        let committed = match table::open_table(&url).await? {
            Some(t) => txn.is_committed(&t).await?,
            None => false,
        };
        if committed {
            tracing::info!(
                table = name,
                seq = pending.seq,
                "found the ingest of an interrupted run committed"
            );
            state.ingested.extend(pending.files);
            state.seq = pending.seq;
        }
        version = Some(put_typed(run.state(), &key, &state, version).await?);
    }

    let source = run.pipeline.files_source(spec)?;
    let new_files: Vec<LandedFile> = source
        .list()
        .await?
        .into_iter()
        .filter(|f| !state.ingested.contains(&f.location))
        .collect();
    let mut summary = TableSummary {
        layer: "bronze".into(),
        table: name.clone(),
        ..TableSummary::default()
    };
    if new_files.is_empty() {
        summary.skipped = Some("no new files".into());
        summary.duration_ms = elapsed_ms(started);
        return Ok(Err(summary));
    }

    let seq = state.seq + 1;
    let files: Vec<String> = new_files.iter().map(|f| f.location.clone()).collect();
    state.pending = Some(PendingIngest {
        seq,
        files: files.clone(),
    });
    let state_version = Some(put_typed(run.state(), &key, &state, version).await?);

    let schema = bronze_schema(&source);
    let source = Arc::new(source);
    // Statistics on the ingest metadata alone: silver selects its batch by `_ingest_ts`, and
    // nothing filters on the raw text of the source's columns. Not on the metadata's text
    // (file, source, run id, corrupt record) either: nothing filters on it, and the writer
    // compares every value with its page's bounds, a file path per row (2.7% of bronze's
    // CPU at SF 10 in `memcmp`).
    let payload = source.data_columns();
    let builder = AppendBuilder::new(url, Arc::clone(&schema))
        .with_partition_columns([INGEST_DATE])
        .with_stats_columns(
            schema
                .fields()
                .iter()
                .filter(|f| !payload.contains(f.name()) && f.data_type() != &DataType::Utf8)
                .map(|f| f.name().clone())
                .collect(),
        )
        .with_target_file_size(run.pipeline.target_file_size())
        .with_compression(run.pipeline.compression())
        // A run's rows all fall in its one `_ingest_date`: one file is open at a time.
        .with_data_pages(DataPageVersion::V2);
    let metadata = Arc::new(IngestMetadata {
        ingest_ts: run.started_at.timestamp_micros(),
        ingest_date: i32::try_from(
            (run.started_at.date_naive() - chrono::NaiveDate::default()).num_days(),
        )
        .unwrap_or(0),
        source: format!("files:{name}"),
        run_id: run.options.run_id.clone(),
    });
    let bar = run.progress(Layer::Bronze, &name);
    // Parquet encoding is the costly part and one writer encodes on one core: the files are
    // dealt out to one writer task per core, and their staged files commit together.
    let writers = run
        .ctx
        .copied_config()
        .target_partitions()
        .clamp(1, new_files.len());
    let mut groups: Vec<Vec<LandedFile>> = vec![Vec::new(); writers];
    for (i, file) in new_files.into_iter().enumerate() {
        groups[i % writers].push(file);
    }
    let total_files = files.len();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks = groups.into_iter().map(|group| {
        let (builder, source, metadata, schema) = (
            builder.clone(),
            Arc::clone(&source),
            Arc::clone(&metadata),
            Arc::clone(&schema),
        );
        let (bar, done) = (bar.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut staged = builder.stage()?;
            let mut part = TableSummary::default();
            // A file is parsed on a blocking thread a few batches ahead of its encoding; no
            // file is held parsed whole, and one file's bytes at a time per writer.
            for file in group {
                let batches = source.read_batches(&file);
                let i = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                bar.set_message(format!("file {i}/{total_files}: {}", file.location));
                let mut batches = std::pin::pin!(batches);
                while let Some(batch) = batches.next().await {
                    let batch = batch?;
                    part.rows_read += batch.num_rows() as u64;
                    staged.write(metadata.attach(&batch, &schema)?).await?;
                }
                part.files_read += 1;
                part.bytes_read += file.size;
            }
            Ok::<_, JobError>((staged, part))
        })
    });
    let mut staged: Option<StagedAppend> = None;
    for joined in futures::future::join_all(tasks).await {
        let (part_staged, part) = joined
            .map_err(|e| JobError::Internal(format!("a bronze writer task failed: {e}")))??;
        summary.rows_read += part.rows_read;
        summary.files_read += part.files_read;
        summary.bytes_read += part.bytes_read;
        match staged.as_mut() {
            None => staged = Some(part_staged),
            Some(s) => s.absorb(part_staged).await?,
        }
    }
    let staged = match staged {
        Some(s) => s,
        None => builder.stage()?,
    };
    bar.finish_and_clear();
    Ok(Ok(Staged {
        spec_table: name,
        summary,
        started,
        staged,
        state,
        state_version,
        seq,
        files,
    }))
}

async fn commit_table(run: &RunContext<'_>, s: Staged) -> Result<TableSummary, JobError> {
    let Staged {
        spec_table,
        mut summary,
        started,
        staged,
        mut state,
        state_version,
        seq,
        files,
    } = s;
    let txn = run.transaction(Layer::Bronze, &spec_table, seq);
    let metrics = staged.commit(Some(&txn)).await?;
    state.ingested.extend(files);
    state.seq = seq;
    state.pending = None;
    put_typed(
        run.state(),
        &run.state_key(Layer::Bronze, &spec_table),
        &state,
        state_version,
    )
    .await?;
    summary.rows_written = metrics.rows_inserted;
    summary.files_written = metrics.files_added;
    summary.delta_version = metrics.version;
    if let Some(t) = table::open_table(&run.pipeline.table_url("bronze", &spec_table)?).await? {
        summary.table_bytes = table::data_files(&t).0;
    }
    if metrics.already_committed {
        summary.skipped = Some("already committed by an interrupted run".into());
    }
    summary.duration_ms = elapsed_ms(started);
    tracing::info!(table = spec_table, rows = summary.rows_written, files = summary.files_read, version = ?summary.delta_version, "bronze committed");
    Ok(summary)
}

struct IngestMetadata {
    ingest_ts: i64,
    ingest_date: i32,
    source: String,
    run_id: String,
}

impl IngestMetadata {
    fn attach(&self, batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, JobError> {
        let n = batch.num_rows();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_value(self.ingest_ts, n).with_timezone("UTC"),
        ));
        // Built at their final size: collected from an iterator, their text grew by doubling
        // (1.7% of bronze's CPU at SF 10 in those copies).
        columns.push(Arc::new(StringArray::new_repeated(&self.source, n)));
        columns.push(Arc::new(StringArray::new_repeated(&self.run_id, n)));
        columns.push(Arc::new(Date32Array::from_value(self.ingest_date, n)));
        RecordBatch::try_new(Arc::clone(schema), columns)
            .map_err(|e| JobError::from(datafusion::error::DataFusionError::from(e)))
    }
}
