//! Keep one row per key: the row that is greatest on a list of columns (nulls smallest), the
//! row seen last on a tie.
//!
//! A `row_number() OVER (PARTITION BY key ORDER BY …)` does the same but sorts the whole batch
//! and walks it row by row; at 3 million events that window was the largest single cost of
//! silver. Here the rows are held as they arrive, and an index keeps, per key, the position of
//! the row that wins so far; the output is each held batch filtered to its winners, in arrival
//! order. No row is moved until it is output, and then once.
//!
//! Memory: the rows are held under a reservation of the session's memory pool. When the pool
//! refuses (a `--memory-limit`), the index is dropped and the rows go to buckets split by a
//! hash of the key, so that no key spans two buckets; every bucket held so far is written to
//! an Arrow IPC spill file and partitioning goes on. A bucket is read back whole when its turn
//! comes and reduced on its own (key and order columns encoded once in arrow's row format, the
//! winners found in one hash-table pass), so what the reduction holds at once is one bucket per
//! output partition, not the batch. The winners are never materialised: the output is a table
//! whose partitions filter or reduce as they are read, so a write consumes winners while the
//! next are found. Reading the output again (a MERGE reads its source twice) does that again.
//! Under a limit that cannot hold the rows, an output to be read more than once is written to
//! disk as winners first, so that it does not hold the pool while its reader (a MERGE's sorts)
//! needs it.
//!
//! Rows of one key that are copies of each other (re-delivered events) need no winner: with
//! [`DedupBuilder::with_first_arrival`], an output read once keeps the first row of each key
//! to arrive and lets the rows through as they come, holding only the keys.

use std::fs::File;
use std::io::BufReader;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryViewArray, BooleanArray, BooleanBufferBuilder, ByteView,
    GenericByteViewArray, MAX_INLINE_VIEW_LEN, RecordBatch, StringViewArray, UInt32Array,
    make_comparator, new_empty_array,
};
use datafusion::arrow::buffer::{BooleanBuffer, Buffer, ScalarBuffer};
use datafusion::arrow::compute::{
    BatchCoalescer, SortOptions, concat_batches, filter_record_batch, interleave_record_batch,
    take_record_batch,
};
use datafusion::arrow::datatypes::ByteViewType;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::hash_map::Entry;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::common::runtime::JoinSet;
use datafusion::common::{HashMap, HashSet};
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::DiskManager;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};
use datafusion::execution::spill_file::{SpillFile, SpillWriter};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, execute_stream_partitioned};
use datafusion::prelude::{DataFrame, SessionContext};
use futures::StreamExt as _;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry as SlotEntry;

use crate::error::Result;

mod seen;
use seen::KeySet;

/// Seed of every key hash, so that equal keys hash equal from batch to batch.
const KEY_HASH_SEED: u64 = 0x6d65_6461_6c6c;
/// Rows per output batch: the session's batch size, so that the operators after the dedup
/// take whole batches.
const OUTPUT_BATCH_ROWS: usize = crate::session::BATCH_ROWS;
/// Buckets the rows are split into. Enough that one bucket of a batch too large for memory
/// fits in it; few enough that every bucket of an ordinary batch still holds long runs.
const BUCKETS: usize = 64;
/// A bucket's small pieces (a bucket's share of one input batch) are joined once they reach
/// this many rows: fewer, larger arrays cost less to hold, spill and read back.
const COALESCE_ROWS: usize = 16 * 1024;

/// Builds a reduction of a [`DataFrame`] to one row per key.
#[derive(Debug)]
pub struct DedupBuilder {
    source: DataFrame,
    keys: Vec<String>,
    winner_order: Vec<String>,
    cluster_by: Vec<String>,
    output_partitions: usize,
    read_once: bool,
    expected_rows: usize,
    first_arrival: bool,
}

/// The result of a [`DedupBuilder`].
#[derive(Debug)]
pub struct Deduplicated {
    /// One row per key; may be read more than once unless built
    /// [`DedupBuilder::with_read_once`].
    pub rows: DataFrame,
    /// Whether some incoming row had a null in a key column (null keys are one key).
    pub has_null_key: bool,
    /// Rows the reduction took in, when it has run (`None` for a first-arrival reduction,
    /// which runs as its output is read): at least as many as it keeps.
    pub rows_in: Option<u64>,
    /// Rows and bytes written to spill files under a memory limit: because the pool was full,
    /// or because an output to be read more than once was too large to hold while read.
    pub spilled_rows: u64,
    pub spilled_bytes: u64,
    /// The source has not run yet: it runs as `rows` is read (a first-arrival reduction), so
    /// whatever it feeds on its way is complete only once `rows` has been read.
    pub streaming: bool,
}

impl DedupBuilder {
    pub fn new(source: DataFrame, keys: Vec<String>) -> Self {
        Self {
            source,
            keys,
            winner_order: Vec::new(),
            cluster_by: Vec::new(),
            output_partitions: 1,
            read_once: false,
            expected_rows: 0,
            first_arrival: false,
        }
    }

    /// Columns compared, most significant first, to pick the row a key keeps: the greater
    /// tuple wins, a null is smaller than any value, and of equal tuples the later row wins.
    pub fn with_winner_order(mut self, columns: Vec<String>) -> Self {
        self.winner_order = columns;
        self
    }

    /// Emit each bucket's winners ordered on these columns (a partitioned table's partition
    /// columns), so that a partitioned write receives runs of one partition. Rows held whole
    /// (no memory limit reached) come out in arrival order: a partitioned write splits each
    /// batch by partition itself, and interleaving every row by partition was silver's largest
    /// copy (13% of its CPU at SF 10).
    pub fn with_cluster_by(mut self, columns: Vec<String>) -> Self {
        self.cluster_by = columns;
        self
    }

    /// Split the output into this many partitions, so that a write can encode them in
    /// parallel.
    pub fn with_output_partitions(mut self, n: usize) -> Self {
        self.output_partitions = n.max(1);
        self
    }

    /// The output will be read once (a first write, not a MERGE): each bucket is freed as soon
    /// as its winners are out, so that the rows a write has encoded stop holding memory while
    /// it encodes the rest. A second read fails instead of returning nothing.
    pub fn with_read_once(mut self, once: bool) -> Self {
        self.read_once = once;
        self
    }

    /// About how many rows the source has (a count taken before the source is run). The
    /// index of winners is sized for them once: grown by doubling, each larger table was
    /// fresh memory that the kernel zeroed, and at 30 million rows the page faults of the
    /// tables outgrown were a twentieth of silver's CPU. A wrong guess costs memory or a
    /// doubling, never a wrong result.
    pub fn with_expected_rows(mut self, rows: usize) -> Self {
        self.expected_rows = rows;
        self
    }

    /// The rows of a key are copies of each other, so any one may stay: an output read once
    /// ([`Self::with_read_once`]) then keeps the first row of each key to arrive, ignores the
    /// winner order, and runs the source only as it is read, holding the keys seen (their
    /// row-format bytes and about 16 bytes of index each) instead of every row of the batch.
    /// Holding the rows was most of silver's memory (5.9 GB at SF 10 for 30 million events).
    /// Under a bounded memory pool the keys could outgrow it with nowhere to spill, so there,
    /// as for an output read twice, the rows are held and reduced as without it.
    pub fn with_first_arrival(mut self, any_copy: bool) -> Self {
        self.first_arrival = any_copy;
        self
    }

    /// Runs the source into buckets and returns a table that reduces them as it is read.
    pub async fn execute(self, ctx: &SessionContext) -> Result<Deduplicated> {
        let task_ctx = ctx.task_ctx();
        let plan = self.source.create_physical_plan().await?;
        let schema = plan.schema();
        let bounded = matches!(
            task_ctx.memory_pool().memory_limit(),
            MemoryLimit::Finite(_)
        );
        if self.first_arrival && self.read_once && !bounded {
            let keys = self
                .keys
                .iter()
                .map(|c| schema.index_of(c))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            return first_arrivals(ctx, plan, keys, self.expected_rows);
        }
        let columns = |names: &[String]| -> Result<Vec<usize>> {
            Ok(names
                .iter()
                .map(|c| schema.index_of(c))
                .collect::<std::result::Result<_, _>>()?)
        };
        let reduction = Arc::new(Reduction {
            keys: columns(&self.keys)?,
            order: columns(&self.winner_order)?,
            cluster: columns(&self.cluster_by)?,
            schema: Arc::clone(&schema),
        });
        let intake = Arc::new(Mutex::new(Intake::new(
            &reduction,
            MemoryConsumer::new("DedupRows")
                .with_can_spill(true)
                .register(task_ctx.memory_pool()),
            Arc::clone(&task_ctx.runtime_env().disk_manager),
            self.expected_rows,
        )));
        let rows_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for mut stream in execute_stream_partitioned(plan, Arc::clone(&task_ctx))? {
            let (intake, reduction) = (Arc::clone(&intake), Arc::clone(&reduction));
            let rows_in = Arc::clone(&rows_in);
            tasks.spawn(async move {
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    if batch.num_rows() == 0 {
                        continue;
                    }
                    rows_in.fetch_add(
                        batch.num_rows() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    // Compacted (so that what is reserved is what is held) and hashed outside
                    // the lock, which the other partitions' batches wait on.
                    let batch = compact_views(batch)?;
                    let hashes = reduction.hash_keys(&batch)?;
                    lock(&intake)?.add(batch, hashes, &reduction)?;
                }
                Ok::<_, DataFusionError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| DataFusionError::Execution(format!("dedup task failed: {e}")))??;
        }
        let intake = Arc::try_unwrap(intake)
            .map_err(|_| DataFusionError::Internal("dedup rows still shared".into()))?
            .into_inner()
            .map_err(|_| DataFusionError::Internal("dedup rows poisoned".into()))?;
        let (mut parts, reservation, mut stats) = match intake {
            Intake::Held(held) => held.finish(),
            Intake::Buckets(store) => store.finish()?,
        };
        let rows_in = rows_in.load(std::sync::atomic::Ordering::Relaxed);
        // An output read more than once (a MERGE's source) is held while the reader runs: its
        // rows would take the pool from the reader's own operators, which need it most when
        // the output is large. Under a limit that cannot hold the rows, they go to disk first.
        if !self.read_once
            && !crate::session::may_hold_rows(task_ctx.memory_pool().as_ref(), rows_in)
        {
            parts = write_winners(
                parts,
                &reduction,
                &reservation,
                &task_ctx.runtime_env().disk_manager,
                &mut stats,
            )?;
        }
        let reservation = Arc::new(reservation);
        if stats.spilled_rows > 0 {
            tracing::info!(
                rows = stats.spilled_rows,
                bytes = stats.spilled_bytes,
                "dedup spilled to disk under the memory limit"
            );
        }
        let n = self.output_partitions;
        let partitions = (0..n)
            .map(|p| {
                Arc::new(ReducedPartition {
                    reduction: Arc::clone(&reduction),
                    parts: Mutex::new(Some(parts.iter().skip(p).step_by(n).cloned().collect())),
                    read_once: self.read_once,
                    reservation: Arc::clone(&reservation),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        let table = StreamingTable::try_new(schema, partitions)?;
        Ok(Deduplicated {
            rows: ctx.read_table(Arc::new(table))?,
            has_null_key: stats.has_null_key,
            rows_in: Some(rows_in),
            spilled_rows: stats.spilled_rows,
            spilled_bytes: stats.spilled_bytes,
            streaming: false,
        })
    }
}

/// A table over `plan` whose partitions let through the first row of each key to arrive.
fn first_arrivals(
    ctx: &SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    keys: Vec<usize>,
    expected_rows: usize,
) -> Result<Deduplicated> {
    let schema = plan.schema();
    let fields = keys
        .iter()
        .map(|i| SortField::new(schema.field(*i).data_type().clone()))
        .collect();
    let converter = Arc::new(RowConverter::new(fields)?);
    let reservation = MemoryConsumer::new("DedupKeys").register(ctx.task_ctx().memory_pool());
    let seen = Arc::new(Mutex::new(SeenKeys::new(expected_rows, reservation)));
    let partitions = (0..plan.properties().partitioning.partition_count())
        .map(|partition| {
            Arc::new(FirstArrivalPartition {
                plan: Arc::clone(&plan),
                schema: Arc::clone(&schema),
                partition,
                keys: keys.clone(),
                converter: Arc::clone(&converter),
                seen: Arc::clone(&seen),
                started: std::sync::atomic::AtomicBool::new(false),
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    let table = StreamingTable::try_new(schema, partitions)?;
    Ok(Deduplicated {
        rows: ctx.read_table(Arc::new(table))?,
        // Not known before the rows are read; only a MERGE asks, and it reads twice.
        has_null_key: true,
        rows_in: None,
        spilled_rows: 0,
        spilled_bytes: 0,
        streaming: true,
    })
}

/// Every key let through so far, in arrow's row format (a null equals a null).
struct SeenKeys {
    keys: KeySet<RandomState>,
    reservation: MemoryReservation,
}

impl SeenKeys {
    fn new(expected_rows: usize, reservation: MemoryReservation) -> Self {
        let mut seen = Self {
            keys: KeySet::with_capacity(expected_rows, RandomState::with_seed(KEY_HASH_SEED)),
            reservation,
        };
        seen.count();
        seen
    }

    /// Sets the reservation to what the key set holds.
    fn count(&mut self) {
        self.reservation.resize(self.keys.allocated_bytes());
    }

    /// Which rows of `rows` carry a key not seen before (the first of equal keys among them
    /// too); their keys are kept.
    fn admit(&mut self, rows: &Rows) -> std::result::Result<BooleanBuffer, DataFusionError> {
        let kept = self
            .keys
            .insert_new(rows.num_rows(), |r| rows.row(r).data())?;
        self.count();
        Ok(kept)
    }
}

/// A first-arrival partition while it is read: the source's batches filtered to new keys
/// and joined into output batches.
struct FirstArrivals {
    source: SendableRecordBatchStream,
    keys: Vec<usize>,
    converter: Arc<RowConverter>,
    seen: Arc<Mutex<SeenKeys>>,
    out: BatchCoalescer,
    done: bool,
}

impl FirstArrivals {
    async fn next(&mut self) -> Option<std::result::Result<RecordBatch, DataFusionError>> {
        loop {
            if let Some(batch) = self.out.next_completed_batch() {
                return Some(Ok(batch));
            }
            if self.done {
                return None;
            }
            let step = match self.source.next().await {
                Some(Ok(batch)) => self.push(batch),
                Some(Err(e)) => Err(e),
                None => {
                    self.done = true;
                    self.out.finish_buffered_batch().map_err(Into::into)
                }
            };
            if let Err(e) = step {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    fn push(&mut self, batch: RecordBatch) -> std::result::Result<(), DataFusionError> {
        // Encoded outside the lock, which the other partitions' batches wait on.
        let columns: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|i| Arc::clone(batch.column(*i)))
            .collect();
        let rows = self.converter.convert_columns(&columns)?;
        let mask = lock(&self.seen)?.admit(&rows)?;
        if mask.count_set_bits() == batch.num_rows() {
            self.out.push_batch(batch)?;
        } else {
            self.out
                .push_batch_with_filter(batch, &BooleanArray::new(mask, None))?;
        }
        Ok(())
    }
}

/// One partition of a first-arrival reduction: a partition of the source, filtered to the
/// rows whose key no partition has let through before.
struct FirstArrivalPartition {
    plan: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    partition: usize,
    keys: Vec<usize>,
    converter: Arc<RowConverter>,
    seen: Arc<Mutex<SeenKeys>>,
    /// Read once only: a second read would find every key seen and let nothing through.
    started: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for FirstArrivalPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstArrivalPartition")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl PartitionStream for FirstArrivalPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let source = if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Err(DataFusionError::Internal(
                "a first-arrival dedup output was read twice".into(),
            ))
        } else {
            self.plan.execute(self.partition, ctx)
        };
        let source = match source {
            Ok(stream) => stream,
            Err(e) => return failed_stream(schema, e),
        };
        let state = FirstArrivals {
            source,
            keys: self.keys.clone(),
            converter: Arc::clone(&self.converter),
            seen: Arc::clone(&self.seen),
            // A partitioned write splits each batch by partition: batches of a scan's size,
            // thinned by the filter, gave it runs too short to encode well.
            out: BatchCoalescer::new(Arc::clone(&schema), OUTPUT_BATCH_ROWS),
            done: false,
        };
        let kept = futures::stream::unfold(state, |mut state| async move {
            let next = state.next().await;
            next.map(|batch| (batch, state))
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, kept))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::result::Result<std::sync::MutexGuard<'_, T>, DataFusionError> {
    m.lock()
        .map_err(|_| DataFusionError::Internal("dedup buckets poisoned".into()))
}

/// Which columns key, order and cluster the rows.
#[derive(Debug)]
struct Reduction {
    keys: Vec<usize>,
    order: Vec<usize>,
    cluster: Vec<usize>,
    schema: SchemaRef,
}

impl Reduction {
    /// The hash of every row's key; equal keys hash equal (nulls included).
    fn hash_keys(&self, batch: &RecordBatch) -> std::result::Result<Vec<u64>, DataFusionError> {
        let keys: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|i| Arc::clone(batch.column(*i)))
            .collect();
        let mut hashes = vec![0u64; batch.num_rows()];
        create_hashes(&keys, &RandomState::with_seed(KEY_HASH_SEED), &mut hashes)?;
        Ok(hashes)
    }

    fn has_null_key(&self, batch: &RecordBatch) -> bool {
        self.keys.iter().any(|i| batch.column(*i).null_count() > 0)
    }

    /// Whether two held rows have the same key (a null equals a null: null keys are one key).
    fn same_key(&self, batches: &[RecordBatch], a: Slot, b: Slot) -> bool {
        self.compare(&self.keys, batches, a, b)
            .is_ok_and(|o| o == std::cmp::Ordering::Equal)
    }

    /// Whether held row `a`, seen after `b`, replaces it: greater on the order columns, or
    /// equal on them.
    fn replaces(&self, batches: &[RecordBatch], a: Slot, b: Slot) -> bool {
        self.compare(&self.order, batches, a, b)
            .is_ok_and(|o| o != std::cmp::Ordering::Less)
    }

    /// Two held rows compared on `columns` in turn (ascending, nulls first). Called only for
    /// rows whose keys hash equal, so building a comparator per call costs little; rows are
    /// held only when every such column has one (`Intake::new`), so it does not fail.
    fn compare(
        &self,
        columns: &[usize],
        batches: &[RecordBatch],
        a: Slot,
        b: Slot,
    ) -> std::result::Result<std::cmp::Ordering, DataFusionError> {
        let options = SortOptions {
            descending: false,
            nulls_first: true,
        };
        let (left, right) = (&batches[a.batch as usize], &batches[b.batch as usize]);
        for c in columns {
            let cmp =
                make_comparator(left.column(*c).as_ref(), right.column(*c).as_ref(), options)?;
            let ordering = cmp(a.row as usize, b.row as usize);
            if ordering.is_ne() {
                return Ok(ordering);
            }
        }
        Ok(std::cmp::Ordering::Equal)
    }

    /// A batch's rows by bucket: `(bucket, rows)`, rows in their input order.
    fn split(
        &self,
        batch: &RecordBatch,
        hashes: &[u64],
    ) -> std::result::Result<Pieces, DataFusionError> {
        let has_null_key = self.has_null_key(batch);
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); BUCKETS];
        for (r, h) in hashes.iter().enumerate() {
            rows[(*h % BUCKETS as u64) as usize].push(r as u32);
        }
        let mut pieces = Vec::new();
        for (bucket, indices) in rows.into_iter().enumerate() {
            if indices.is_empty() {
                continue;
            }
            let taken = take_record_batch(batch, &UInt32Array::from(indices))?;
            pieces.push((bucket, compact_views(taken)?));
        }
        Ok(Pieces {
            pieces,
            has_null_key,
        })
    }

    /// The winners among `batches` (all rows of some buckets), in output batches.
    fn winners(&self, batches: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let keys = encode(batches, &self.keys)?;
        // No order columns (`keep = "any"`): every row ties, so the later one wins, as it
        // does among held rows. Encoding no columns would give rows of nothing to compare.
        let order = if self.order.is_empty() {
            None
        } else {
            Some(encode(batches, &self.order)?)
        };
        let mut winners: HashMap<&[u8], (u32, u32)> =
            HashMap::with_capacity(batches.iter().map(RecordBatch::num_rows).sum::<usize>());
        for (b, key_rows) in keys.iter().enumerate() {
            for r in 0..key_rows.num_rows() {
                let at = (b as u32, r as u32);
                match winners.entry(key_rows.row(r).data()) {
                    Entry::Vacant(v) => {
                        v.insert(at);
                    }
                    Entry::Occupied(mut o) => {
                        let (wb, wr) = *o.get();
                        let later_wins = order.as_ref().is_none_or(|order| {
                            order[b].row(r) >= order[wb as usize].row(wr as usize)
                        });
                        if later_wins {
                            o.insert(at);
                        }
                    }
                }
            }
        }
        let mut picked: Vec<(u32, u32)> = winners.into_values().collect();
        drop(keys);
        drop(order);
        if self.cluster.is_empty() {
            picked.sort_unstable();
        } else {
            // Rank the distinct cluster values once, then sort plain integers: comparing
            // encoded rows in the sort itself cost more than the whole hash pass.
            let cluster = encode(batches, &self.cluster)?;
            let mut distinct: Vec<&[u8]> = {
                let mut seen: HashSet<&[u8]> = Default::default();
                for (b, r) in &picked {
                    seen.insert(cluster[*b as usize].row(*r as usize).data());
                }
                seen.into_iter().collect()
            };
            distinct.sort_unstable();
            let rank: HashMap<&[u8], u32> = distinct
                .iter()
                .enumerate()
                .map(|(i, v)| (*v, i as u32))
                .collect();
            let mut ranked: Vec<(u32, u32, u32)> = picked
                .iter()
                .map(|(b, r)| {
                    let value = cluster[*b as usize].row(*r as usize).data();
                    (rank.get(value).copied().unwrap_or(0), *b, *r)
                })
                .collect();
            ranked.sort_unstable();
            picked = ranked.into_iter().map(|(_, b, r)| (b, r)).collect();
        }
        let sources: Vec<&RecordBatch> = batches.iter().collect();
        picked
            .chunks(OUTPUT_BATCH_ROWS)
            .map(|chunk| {
                let indices: Vec<(usize, usize)> = chunk
                    .iter()
                    .map(|(b, r)| (*b as usize, *r as usize))
                    .collect();
                Ok(interleave_record_batch(&sources, &indices)?)
            })
            .collect()
    }
}

/// One input batch split by bucket.
struct Pieces {
    pieces: Vec<(usize, RecordBatch)>,
    has_null_key: bool,
}

/// Copies the string-view columns of `batch` into buffers of their own. A view column taken,
/// filtered or sliced from a larger batch still points into every data buffer of that batch
/// (for a Parquet scan: every decoded page): holding a few of its rows holds them all, and
/// spilling them writes them all.
///
/// Unlike arrow's `gc`, a value that the row before already pointed at is copied once: a
/// column decoded from a Parquet dictionary (a file name on every row) stays one value, not
/// one copy per row.
pub fn compact_views(batch: RecordBatch) -> std::result::Result<RecordBatch, DataFusionError> {
    if !batch
        .columns()
        .iter()
        .any(|c| matches!(c.data_type(), DataType::Utf8View | DataType::BinaryView))
    {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .map(|c| -> ArrayRef {
            if let Some(s) = c.as_any().downcast_ref::<StringViewArray>() {
                Arc::new(compact_view_array(s))
            } else if let Some(b) = c.as_any().downcast_ref::<BinaryViewArray>() {
                Arc::new(compact_view_array(b))
            } else {
                Arc::clone(c)
            }
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

fn compact_view_array<T: ByteViewType + ?Sized>(
    array: &GenericByteViewArray<T>,
) -> GenericByteViewArray<T> {
    let old_buffers = array.data_buffers();
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut views: Vec<u128> = Vec::with_capacity(array.len());
    // The last long view copied, and its copy.
    let mut last: Option<(u128, u128)> = None;
    for (i, &view) in array.views().iter().enumerate() {
        let length = view as u32;
        if length <= MAX_INLINE_VIEW_LEN {
            views.push(view);
            continue;
        }
        if array.is_null(i) {
            views.push(0);
            continue;
        }
        if let Some((old, new)) = last
            && old == view
        {
            views.push(new);
            continue;
        }
        let long = ByteView::from(view);
        if data.len() + length as usize > u32::MAX as usize {
            buffers.push(Buffer::from_vec(std::mem::take(&mut data)));
        }
        let start = long.offset as usize;
        data.extend_from_slice(
            &old_buffers[long.buffer_index as usize][start..start + length as usize],
        );
        let copied = ByteView {
            buffer_index: buffers.len() as u32,
            offset: (data.len() - length as usize) as u32,
            ..long
        }
        .as_u128();
        views.push(copied);
        last = Some((view, copied));
    }
    if !data.is_empty() {
        buffers.push(Buffer::from_vec(data));
    }
    // SAFETY: every long view points at a copy of the bytes it pointed at before (so they are
    // valid for `T`), in a buffer of `buffers`; short views and nulls are as they were.
    unsafe {
        GenericByteViewArray::new_unchecked(
            ScalarBuffer::from(views),
            buffers,
            array.nulls().cloned(),
        )
    }
}

/// The rows while they come in: held whole and indexed by key until the memory pool refuses,
/// then split into buckets that can spill.
enum Intake {
    Held(HeldRows),
    Buckets(BucketStore),
}

impl Intake {
    /// Held rows when arrow can compare every key and order column value by value (decided
    /// once, from the schema); otherwise buckets from the start, whose row format can.
    fn new(
        reduction: &Reduction,
        reservation: MemoryReservation,
        disk: Arc<DiskManager>,
        expected_rows: usize,
    ) -> Self {
        let schema = Arc::clone(&reduction.schema);
        let comparable = reduction.keys.iter().chain(&reduction.order).all(|c| {
            let empty = new_empty_array(schema.field(*c).data_type());
            make_comparator(empty.as_ref(), empty.as_ref(), SortOptions::default()).is_ok()
        });
        if comparable {
            Intake::Held(HeldRows::new(schema, reservation, disk, expected_rows))
        } else {
            Intake::Buckets(BucketStore::new(schema, reservation, disk))
        }
    }

    fn add(
        &mut self,
        batch: RecordBatch,
        hashes: Vec<u64>,
        reduction: &Reduction,
    ) -> std::result::Result<(), DataFusionError> {
        match self {
            Intake::Held(held) => {
                if held.admit(&batch) {
                    return held.add(batch, hashes, reduction);
                }
                tracing::info!(
                    rows = held
                        .batches
                        .iter()
                        .map(RecordBatch::num_rows)
                        .sum::<usize>(),
                    "dedup: the memory pool is full; the rows held so far move to buckets that spill"
                );
                let mut store = held.move_to_buckets(reduction)?;
                store.add(reduction.split(&batch, &hashes)?)?;
                *self = Intake::Buckets(store);
                Ok(())
            }
            Intake::Buckets(store) => store.add(reduction.split(&batch, &hashes)?),
        }
    }
}

/// A held row: its batch and row. Its key's hash is in [`HeldRows::hashes`], read only when
/// the index grows or two keys share hashbrown's 7-bit tag: 8 bytes per row held in order,
/// where a hash in the slot took 8 bytes per bucket (up to 2.3 buckets per row).
#[derive(Debug, Clone, Copy)]
struct Slot {
    batch: u32,
    row: u32,
}

/// Every row so far, in arrival order, and per key the slot of the row that wins so far.
struct HeldRows {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    /// The key hash of every row of `batches`.
    hashes: Vec<Vec<u64>>,
    index: HashTable<Slot>,
    /// What `index` is reserved at.
    index_bytes: usize,
    /// Rows the index is sized for at once (see [`DedupBuilder::with_expected_rows`]).
    expected_rows: usize,
    reservation: MemoryReservation,
    disk: Arc<DiskManager>,
    has_null_key: bool,
}

impl HeldRows {
    fn new(
        schema: SchemaRef,
        reservation: MemoryReservation,
        disk: Arc<DiskManager>,
        expected_rows: usize,
    ) -> Self {
        Self {
            schema,
            batches: Vec::new(),
            hashes: Vec::new(),
            index: HashTable::new(),
            index_bytes: 0,
            expected_rows,
            reservation,
            disk,
            has_null_key: false,
        }
    }

    /// Keys the index must have room for once `rows` more are added.
    fn capacity_for(&self, rows: usize) -> usize {
        (self.index.len() + rows).max(self.expected_rows)
    }

    /// Reserves memory for `batch`, its hashes and the index's growth; false when the pool
    /// refuses.
    fn admit(&mut self, batch: &RecordBatch) -> bool {
        let rows = self.capacity_for(batch.num_rows());
        let index_bytes = if rows > self.index.capacity() {
            // hashbrown doubles to the next power of two buckets at 7/8 load; a byte of
            // control per bucket.
            (rows * 8 / 7).next_power_of_two() * (std::mem::size_of::<Slot>() + 1)
        } else {
            self.index_bytes
        };
        let wanted = batch.get_array_memory_size()
            + batch.num_rows() * std::mem::size_of::<u64>()
            + index_bytes.saturating_sub(self.index_bytes);
        if self.reservation.try_grow(wanted).is_err() {
            return false;
        }
        self.index_bytes = self.index_bytes.max(index_bytes);
        true
    }

    fn add(
        &mut self,
        batch: RecordBatch,
        hashes: Vec<u64>,
        reduction: &Reduction,
    ) -> std::result::Result<(), DataFusionError> {
        self.has_null_key |= reduction.has_null_key(&batch);
        let b = u32::try_from(self.batches.len())
            .map_err(|_| DataFusionError::Internal("too many dedup batches".into()))?;
        let room = self.capacity_for(hashes.len()) - self.index.len();
        self.batches.push(batch);
        self.hashes.push(hashes);
        let (batches, held_hashes) = (&self.batches, &self.hashes);
        let hash_of = |s: &Slot| held_hashes[s.batch as usize][s.row as usize];
        self.index.reserve(room, hash_of);
        for (r, &hash) in held_hashes[b as usize].iter().enumerate() {
            let here = Slot {
                batch: b,
                row: r as u32,
            };
            let entry = self.index.entry(
                hash,
                |s| hash_of(s) == hash && reduction.same_key(batches, *s, here),
                hash_of,
            );
            match entry {
                SlotEntry::Vacant(v) => {
                    v.insert(here);
                }
                SlotEntry::Occupied(mut o) => {
                    if reduction.replaces(batches, here, *o.get()) {
                        *o.get_mut() = here;
                    }
                }
            }
        }
        Ok(())
    }

    /// The pool refused: the index goes, and the rows held so far go to buckets (spilling as
    /// the pool requires), in the order they came.
    fn move_to_buckets(
        &mut self,
        reduction: &Reduction,
    ) -> std::result::Result<BucketStore, DataFusionError> {
        self.index = HashTable::new();
        self.index_bytes = 0;
        self.reservation.free();
        let hashes = std::mem::take(&mut self.hashes);
        let mut store = BucketStore::new(
            Arc::clone(&self.schema),
            self.reservation.new_empty(),
            Arc::clone(&self.disk),
        );
        store.stats.has_null_key = self.has_null_key;
        for (batch, hashes) in std::mem::take(&mut self.batches).into_iter().zip(hashes) {
            store.add(reduction.split(&batch, &hashes)?)?;
        }
        Ok(store)
    }

    /// The held batches with the mask of their winners, in runs of about
    /// [`OUTPUT_BATCH_ROWS`] winners; the index is freed.
    fn finish(mut self) -> (Vec<Arc<Part>>, MemoryReservation, SpillStats) {
        let mut masks: Vec<BooleanBufferBuilder> = self
            .batches
            .iter()
            .map(|b| {
                let mut mask = BooleanBufferBuilder::new(b.num_rows());
                mask.append_n(b.num_rows(), false);
                mask
            })
            .collect();
        let mut winners = vec![0usize; self.batches.len()];
        for slot in std::mem::take(&mut self.index) {
            masks[slot.batch as usize].set_bit(slot.row as usize, true);
            winners[slot.batch as usize] += 1;
        }
        let hashes: usize = self.hashes.iter().map(Vec::len).sum();
        self.hashes = Vec::new();
        self.reservation
            .shrink(self.index_bytes + hashes * std::mem::size_of::<u64>());
        let mut parts = Vec::new();
        let mut chunk = Chunk::default();
        let mut chunk_winners = 0;
        for ((batch, mask), n) in self.batches.into_iter().zip(&mut masks).zip(winners) {
            chunk.bytes += batch.get_array_memory_size();
            chunk.batches.push((batch, mask.finish()));
            chunk_winners += n;
            if chunk_winners >= OUTPUT_BATCH_ROWS {
                parts.push(Arc::new(Part::Chunk(std::mem::take(&mut chunk))));
                chunk_winners = 0;
            }
        }
        if !chunk.batches.is_empty() {
            parts.push(Arc::new(Part::Chunk(chunk)));
        }
        let stats = SpillStats {
            has_null_key: self.has_null_key,
            ..SpillStats::default()
        };
        (parts, self.reservation, stats)
    }
}

/// Consecutive held batches and which of their rows win.
#[derive(Default)]
struct Chunk {
    batches: Vec<(RecordBatch, BooleanBuffer)>,
    /// What `batches` holds, as reserved.
    bytes: usize,
}

/// What an output partition reads one at a time.
enum Part {
    Chunk(Chunk),
    Bucket(Bucket),
    /// Winners already found, in a spill file.
    Written(Arc<dyn SpillFile>),
}

impl Part {
    fn bytes(&self) -> usize {
        match self {
            Part::Chunk(c) => c.bytes,
            Part::Bucket(b) => b.bytes,
            Part::Written(_) => 0,
        }
    }

    /// The part's winners, in output batches.
    fn winners(&self, reduction: &Reduction) -> Result<Vec<RecordBatch>> {
        match self {
            Part::Chunk(chunk) => {
                let kept = chunk
                    .batches
                    .iter()
                    .map(|(batch, mask)| {
                        filter_record_batch(batch, &BooleanArray::new(mask.clone(), None))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                // One batch per part: a partitioned write splits each batch by partition, and
                // larger batches give it longer runs to encode.
                Ok(vec![concat_batches(&reduction.schema, &kept)?])
            }
            Part::Bucket(bucket) => reduction.winners(&bucket.load()?),
            Part::Written(file) => read_spill_file(file),
        }
    }
}

/// Writes the winners of every part to a spill file of its own and frees the memory the
/// parts held, one part at a time.
fn write_winners(
    parts: Vec<Arc<Part>>,
    reduction: &Reduction,
    reservation: &MemoryReservation,
    disk: &Arc<DiskManager>,
    stats: &mut SpillStats,
) -> Result<Vec<Arc<Part>>> {
    let mut written = Vec::with_capacity(parts.len());
    for part in parts {
        let file = disk.create_tmp_file("medallion dedup winners")?;
        let mut writer = StreamWriter::try_new(file.open_writer()?, &reduction.schema)?;
        for batch in part.winners(reduction)? {
            stats.spilled_rows += batch.num_rows() as u64;
            writer.write(&batch)?;
        }
        writer.finish()?;
        writer.into_inner()?.finish()?;
        stats.spilled_bytes += file.size().unwrap_or(0);
        let _ = reservation.try_shrink(part.bytes());
        drop(part);
        written.push(Arc::new(Part::Written(file)));
    }
    Ok(written)
}

/// Every batch of an Arrow IPC spill file.
fn read_spill_file(file: &Arc<dyn SpillFile>) -> Result<Vec<RecordBatch>> {
    let path = file
        .path()
        .ok_or_else(|| DataFusionError::Internal("a dedup spill file has no local path".into()))?;
    let reader = StreamReader::try_new(
        BufReader::new(File::open(path).map_err(DataFusionError::IoError)?),
        None,
    )?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Statistics of a finished partitioning.
#[derive(Debug, Default)]
struct SpillStats {
    has_null_key: bool,
    spilled_rows: u64,
    spilled_bytes: u64,
}

/// The buckets while rows come in.
struct BucketStore {
    schema: SchemaRef,
    buckets: Vec<FillingBucket>,
    reservation: MemoryReservation,
    disk: Arc<DiskManager>,
    stats: SpillStats,
}

#[derive(Default)]
struct FillingBucket {
    /// Small pieces not yet joined.
    pieces: Vec<RecordBatch>,
    piece_rows: usize,
    batches: Vec<RecordBatch>,
    spill: Option<SpillSink>,
}

struct SpillSink {
    file: Arc<dyn SpillFile>,
    writer: StreamWriter<Box<dyn SpillWriter>>,
}

impl BucketStore {
    fn new(schema: SchemaRef, reservation: MemoryReservation, disk: Arc<DiskManager>) -> Self {
        Self {
            schema,
            buckets: (0..BUCKETS).map(|_| FillingBucket::default()).collect(),
            reservation,
            disk,
            stats: SpillStats::default(),
        }
    }

    fn add(&mut self, pieces: Pieces) -> std::result::Result<(), DataFusionError> {
        self.stats.has_null_key |= pieces.has_null_key;
        let incoming: usize = pieces
            .pieces
            .iter()
            .map(|(_, b)| b.get_array_memory_size())
            .sum();
        if self.reservation.try_grow(incoming).is_err() {
            self.spill_all()?;
            // One batch's pieces are admitted even over the limit: refusing them would fail
            // the run, which a spilling operator must not do.
            self.reservation.grow(incoming);
        }
        for (b, piece) in pieces.pieces {
            let bucket = &mut self.buckets[b];
            bucket.piece_rows += piece.num_rows();
            bucket.pieces.push(piece);
            if bucket.piece_rows >= COALESCE_ROWS {
                let joined = concat_batches(&self.schema, &bucket.pieces)?;
                let before: usize = bucket
                    .pieces
                    .iter()
                    .map(|p| p.get_array_memory_size())
                    .sum();
                let after = joined.get_array_memory_size();
                bucket.pieces.clear();
                bucket.piece_rows = 0;
                bucket.batches.push(joined);
                if after > before {
                    self.reservation.grow(after - before);
                } else {
                    self.reservation.shrink(before - after);
                }
            }
        }
        Ok(())
    }

    /// Writes every bucket's rows to its spill file and frees their memory.
    fn spill_all(&mut self) -> std::result::Result<(), DataFusionError> {
        for bucket in &mut self.buckets {
            if bucket.pieces.is_empty() && bucket.batches.is_empty() {
                continue;
            }
            let sink = match &mut bucket.spill {
                Some(sink) => sink,
                None => {
                    let file = self.disk.create_tmp_file("medallion dedup bucket")?;
                    let writer = StreamWriter::try_new(file.open_writer()?, &self.schema)?;
                    bucket.spill.insert(SpillSink { file, writer })
                }
            };
            for batch in bucket.batches.drain(..).chain(bucket.pieces.drain(..)) {
                self.stats.spilled_rows += batch.num_rows() as u64;
                sink.writer.write(&batch)?;
            }
            bucket.piece_rows = 0;
        }
        self.reservation.free();
        Ok(())
    }

    /// The buckets, the reservation that still accounts for the rows they hold in memory,
    /// and what was spilled.
    fn finish(
        mut self,
    ) -> std::result::Result<(Vec<Arc<Part>>, MemoryReservation, SpillStats), DataFusionError> {
        let mut out = Vec::with_capacity(self.buckets.len());
        for mut bucket in std::mem::take(&mut self.buckets) {
            if !bucket.pieces.is_empty() {
                bucket
                    .batches
                    .push(concat_batches(&self.schema, &bucket.pieces)?);
            }
            let spilled = match bucket.spill {
                Some(SpillSink { file, mut writer }) => {
                    writer.finish()?;
                    writer.into_inner()?.finish()?;
                    self.stats.spilled_bytes += file.size().unwrap_or(0);
                    Some(file)
                }
                None => None,
            };
            if spilled.is_some() || !bucket.batches.is_empty() {
                out.push(Arc::new(Part::Bucket(Bucket {
                    bytes: bucket
                        .batches
                        .iter()
                        .map(RecordBatch::get_array_memory_size)
                        .sum(),
                    in_memory: bucket.batches,
                    spilled,
                })));
            }
        }
        // The buckets stay in memory, and reserved, for as long as the output can be read.
        Ok((out, self.reservation, self.stats))
    }
}

/// A bucket's rows: those still in memory and those spilled.
struct Bucket {
    in_memory: Vec<RecordBatch>,
    /// What `in_memory` holds, as reserved.
    bytes: usize,
    spilled: Option<Arc<dyn SpillFile>>,
}

impl Bucket {
    fn load(&self) -> Result<Vec<RecordBatch>> {
        let mut batches = match &self.spilled {
            Some(file) => read_spill_file(file)?,
            None => Vec::new(),
        };
        batches.extend(self.in_memory.iter().cloned());
        Ok(batches)
    }
}

/// One output partition: its parts (held chunks or buckets), one at a time as it is read.
struct ReducedPartition {
    reduction: Arc<Reduction>,
    /// `None` once a read-once partition has been read.
    parts: Mutex<Option<Vec<Arc<Part>>>>,
    read_once: bool,
    /// Released with the last partition: the pool sees the parts until nothing can read them
    /// (a read-once partition gives back each part's share as it frees it).
    reservation: Arc<MemoryReservation>,
}

impl std::fmt::Debug for ReducedPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReducedPartition")
            .field("read_once", &self.read_once)
            .finish_non_exhaustive()
    }
}

impl PartitionStream for ReducedPartition {
    fn schema(&self) -> &SchemaRef {
        &self.reduction.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.reduction.schema);
        // Parts come out in batches of about the dedup's own size (a held part's winners are
        // one batch); only a session that asks for smaller batches has them split.
        let batch_rows = ctx.session_config().batch_size().max(1);
        let split_to = (batch_rows < OUTPUT_BATCH_ROWS).then_some(batch_rows);
        let taken = lock(&self.parts).and_then(|mut held| {
            if self.read_once {
                held.take()
            } else {
                held.clone()
            }
            .ok_or_else(|| {
                DataFusionError::Internal("a read-once dedup output was read twice".into())
            })
        });
        let parts = match taken {
            Ok(parts) => parts,
            Err(e) => return failed_stream(schema, e),
        };
        let reduction = Arc::clone(&self.reduction);
        let (reservation, read_once) = (Arc::clone(&self.reservation), self.read_once);
        let winners = futures::stream::iter(parts)
            .map(move |part| {
                let reduced = part
                    .winners(&reduction)
                    .map_err(|e| DataFusionError::External(Box::new(e)));
                if read_once {
                    // This was the part's last holder; its winners share its buffers until
                    // the write has encoded them.
                    let _ = reservation.try_shrink(part.bytes());
                }
                drop(part);
                futures::stream::iter(match reduced {
                    Ok(batches) => batches
                        .into_iter()
                        .flat_map(|b| match split_to {
                            Some(rows) => split_copied(b, rows),
                            None => vec![Ok(b)],
                        })
                        .collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
            })
            .flatten();
        Box::pin(RecordBatchStreamAdapter::new(schema, winners))
    }
}

/// `batch` as is when it has at most `rows` rows, else in copies of `rows` rows each. A session
/// with smaller batches than the dedup's (a MERGE joined by sort-merge under a memory limit)
/// gets them: a sort reserves twice the memory of a batch before it can spill it, and its
/// share of the pool may be smaller than that for a batch of the default size. Slices would
/// not do, as each would count the whole batch's buffers; nor would a `take` alone, whose
/// text views still point into them.
fn split_copied(
    batch: RecordBatch,
    rows: usize,
) -> Vec<std::result::Result<RecordBatch, DataFusionError>> {
    let n = batch.num_rows();
    if n <= rows {
        return vec![Ok(batch)];
    }
    (0..n)
        .step_by(rows)
        .map(|start| {
            let end = (start + rows).min(n) as u32;
            let indices = UInt32Array::from_iter_values(start as u32..end);
            compact_views(take_record_batch(&batch, &indices)?)
        })
        .collect()
}

/// A stream that fails with `e` when read: a partition's `execute` cannot return an error.
fn failed_stream(schema: SchemaRef, e: DataFusionError) -> SendableRecordBatchStream {
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::once(async move { Err(e) }),
    ))
}

/// The named columns of every batch in arrow's row format (ascending, nulls first, so that a
/// null compares smallest).
fn encode(batches: &[RecordBatch], indices: &[usize]) -> Result<Vec<Rows>> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let schema = first.schema();
    let fields = indices
        .iter()
        .map(|i| {
            SortField::new_with_options(
                schema.field(*i).data_type().clone(),
                datafusion::arrow::compute::SortOptions {
                    descending: false,
                    nulls_first: true,
                },
            )
        })
        .collect();
    let converter = RowConverter::new(fields)?;
    batches
        .iter()
        .map(|b| {
            let cols: Vec<ArrayRef> = indices.iter().map(|i| Arc::clone(b.column(*i))).collect();
            Ok(converter.convert_columns(&cols)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(keys: &[&str], ts: &[Option<i64>], line: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("ts", DataType::Int64, true),
            Field::new("line", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(ts.to_vec())),
                Arc::new(Int64Array::from(line.to_vec())),
            ],
        )
        .unwrap()
    }

    /// The `line` column (the third) of every row, sorted.
    fn lines(batches: &[RecordBatch]) -> Vec<i64> {
        let mut v: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let a = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
                a.values().to_vec()
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[tokio::test]
    async fn keeps_the_greatest_row_per_key_with_nulls_losing_and_ties_to_the_later() {
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        let a = batch(
            &["x", "y", "z", "w"],
            &[Some(5), None, Some(1), Some(7)],
            &[1, 2, 3, 4],
        );
        let b = batch(
            &["x", "y", "z", "w"],
            &[Some(3), Some(0), Some(1), Some(7)],
            &[5, 6, 7, 8],
        );
        let df = ctx.read_batches(vec![a, b]).unwrap();
        let out = DedupBuilder::new(df, vec!["k".into()])
            .with_winner_order(vec!["ts".into()])
            .with_cluster_by(vec!["k".into()])
            .with_output_partitions(2)
            .execute(&ctx)
            .await
            .unwrap()
            .rows
            .collect()
            .await
            .unwrap();
        let mut rows = Vec::new();
        for b in &out {
            let k = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let line = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                rows.push((k.value(i).to_string(), line.value(i)));
            }
        }
        // x: ts 5 beats 3; y: 0 beats null; z, w: tie, later line.
        rows.sort();
        assert_eq!(
            rows,
            vec![
                ("w".into(), 8),
                ("x".into(), 1),
                ("y".into(), 6),
                ("z".into(), 7)
            ]
        );
    }

    /// A read-once output gives the same winners, frees its buckets' reservation as it goes,
    /// and refuses a second read rather than returning nothing.
    #[tokio::test]
    async fn a_read_once_output_frees_its_buckets_and_refuses_a_second_read() {
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        let keys: Vec<String> = (0..3000).map(|i| format!("k{}", i % 1000)).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let ts: Vec<Option<i64>> = (0..3000).map(|i| Some(i % 7)).collect();
        let line: Vec<i64> = (0..3000).collect();
        let input = batch(&key_refs, &ts, &line);
        let reduce = |once: bool| {
            DedupBuilder::new(ctx.read_batch(input.clone()).unwrap(), vec!["k".into()])
                .with_winner_order(vec!["ts".into(), "line".into()])
                .with_output_partitions(2)
                .with_read_once(once)
                .execute(&ctx)
        };
        let expected = lines(&reduce(false).await.unwrap().rows.collect().await.unwrap());
        let once = reduce(true).await.unwrap();
        assert!(ctx.runtime_env().memory_pool.reserved() > 0);
        let got = lines(&once.rows.clone().collect().await.unwrap());
        assert_eq!(got.len(), 1000);
        assert_eq!(got, expected);
        assert_eq!(ctx.runtime_env().memory_pool.reserved(), 0);
        let again = once.rows.collect().await;
        assert!(again.is_err(), "a second read must fail");
    }

    /// A long value repeated on consecutive rows (a file name decoded from a Parquet
    /// dictionary) is copied once; every other long value once per row; nulls and short
    /// values as they were.
    #[test]
    fn compacting_views_copies_a_repeated_value_once() {
        let file = "s3://landing/events/batch-0001/part-00000.jsonl";
        let values: Vec<Option<String>> = (0..1000)
            .map(|i| match i % 10 {
                0 => None,
                1 => Some(format!("short-{i}")),
                2 => Some(format!("a long value of its own, row {i:04}")),
                _ => Some(file.to_string()),
            })
            .collect();
        let mut builder =
            datafusion::arrow::array::StringViewBuilder::new().with_deduplicate_strings();
        for v in &values {
            builder.append_option(v.as_deref());
        }
        let wide = builder.finish();
        // A slice still points into every buffer of the whole array.
        let sliced = wide.slice(100, 500);
        let compacted = compact_view_array(&sliced);
        let expected: Vec<Option<&str>> = values[100..600].iter().map(|v| v.as_deref()).collect();
        assert_eq!(compacted.iter().collect::<Vec<_>>(), expected);
        let data: usize = compacted.data_buffers().iter().map(|b| b.len()).sum();
        let own_rows = 50 * "a long value of its own, row 0000".len();
        // The file name runs 7 rows at a time (rows 3-9 of every 10): one copy per run.
        let file_runs = 50 * file.len();
        assert_eq!(data, own_rows + file_runs);
    }

    /// The winners' lines of `batches` reduced by `k` on `order` under a memory limit, with
    /// the index sized for `expected_rows`, read twice as a MERGE does (the same rows both
    /// times), and the rows spilled.
    async fn reduce_under(
        batches: Vec<RecordBatch>,
        order: &[&str],
        partitions: usize,
        limit: Option<usize>,
        expected_rows: usize,
    ) -> (Vec<i64>, u64) {
        let ctx = crate::session::new_session(&crate::session::SessionOptions {
            memory_limit: limit,
            ..Default::default()
        })
        .unwrap();
        let out = DedupBuilder::new(ctx.read_batches(batches).unwrap(), vec!["k".into()])
            .with_winner_order(order.iter().map(|c| (*c).to_string()).collect())
            .with_output_partitions(partitions)
            .with_expected_rows(expected_rows)
            .execute(&ctx)
            .await
            .unwrap();
        let first = out.rows.clone().collect().await.unwrap();
        let second = out.rows.collect().await.unwrap();
        assert_eq!(lines(&first), lines(&second));
        (lines(&first), out.spilled_rows)
    }

    /// Batches that arrive one after another under a limit that holds the first few: the rows
    /// held so far move to buckets when the pool refuses, and the winners are those of a run
    /// without a limit, read twice alike.
    #[tokio::test]
    async fn rows_held_before_the_pool_refuses_move_to_buckets_and_keep_the_same_winners() {
        let n = 60_000;
        let keys: Vec<String> = (0..n)
            .map(|i| format!("key-{:06}", (i * 7) % 25_000))
            .collect();
        let ts: Vec<Option<i64>> = (0..n)
            .map(|i| (i % 11 != 0).then_some((i as i64 * 7919) % 13))
            .collect();
        let line: Vec<i64> = (0..n as i64).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        // Batches of their own, not slices of one (a slice is charged for the whole buffer):
        // about 200 KB each, so the first two are held and the third finds the pool full.
        let batches: Vec<RecordBatch> = (0..10)
            .map(|i| {
                let rows = i * 6_000..(i + 1) * 6_000;
                batch(&key_refs[rows.clone()], &ts[rows.clone()], &line[rows])
            })
            .collect();
        let reduce = |limit, expected| reduce_under(batches.clone(), &["ts"], 2, limit, expected);
        let (held, spilled_none) = reduce(None, 0).await;
        let (moved, spilled_rows) = reduce(Some(1024 * 1024), 0).await;
        assert_eq!(held.len(), 25_000);
        assert_eq!(spilled_none, 0);
        assert!(spilled_rows > 0, "a 1 MiB limit must spill 60,000 rows");
        assert_eq!(held, moved);
        // The index sized for the rows, for too few (it grows) or for too many (no limit:
        // held; under the limit its 9 MB reservation is refused at once: buckets that spill).
        for expected in [n, 10, 10 * n] {
            assert_eq!(reduce(None, expected).await, (held.clone(), 0));
        }
        let (sized_too_large, spilled) = reduce(Some(1024 * 1024), 10 * n).await;
        assert_eq!(sized_too_large, held);
        assert!(spilled > 0);
        // The winner of each key, computed here: greatest ts (nulls smallest), then last line.
        let mut best: std::collections::HashMap<&str, (Option<i64>, i64)> = Default::default();
        for i in 0..n {
            let here = (ts[i], line[i]);
            let e = best.entry(key_refs[i]).or_insert(here);
            if here >= *e {
                *e = here;
            }
        }
        let mut expected: Vec<i64> = best.values().map(|(_, l)| *l).collect();
        expected.sort_unstable();
        assert_eq!(held, expected);
    }

    /// No order columns (`keep = "any"`): one row per key, the one that came last, whether
    /// the rows are held or spilled to buckets.
    #[tokio::test]
    async fn without_order_columns_each_key_keeps_its_last_row_held_or_spilled() {
        let n = 200_000;
        let keys: Vec<String> = (0..n).map(|i| format!("key-{:06}", i % 20_000)).collect();
        let ts: Vec<Option<i64>> = vec![None; n];
        let line: Vec<i64> = (0..n as i64).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let input = batch(&key_refs, &ts, &line);
        let reduce = |limit| reduce_under(vec![input.clone()], &[], 3, limit, 0);
        let (held, spilled_none) = reduce(None).await;
        let (spilled, spilled_rows) = reduce(Some(64 * 1024)).await;
        assert_eq!(spilled_none, 0);
        assert!(spilled_rows > 0, "a 64 KiB limit must spill 200,000 rows");
        let last: Vec<i64> = (180_000..200_000).collect();
        assert_eq!(held, last);
        assert_eq!(spilled, last);
    }

    /// Many keys, each sent several times, reduced with and without a memory limit far below
    /// the batch: the spilled run must read its buckets back and pick the same winners.
    #[tokio::test]
    async fn a_batch_larger_than_the_memory_limit_spills_and_keeps_the_same_winners() {
        // More rows than a session batch (64 Ki): the pieces of one batch are admitted even
        // over the limit, so it is the next batch that finds the pool full and spills.
        let n = 200_000;
        let keys: Vec<String> = (0..n).map(|i| format!("key-{:06}", i % 20_000)).collect();
        let ts: Vec<Option<i64>> = (0..n).map(|i| Some((i as i64 * 7919) % 13)).collect();
        let line: Vec<i64> = (0..n as i64).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let input = batch(&key_refs, &ts, &line);
        let reduce = |limit| reduce_under(vec![input.clone()], &["ts", "line"], 3, limit, 0);
        let (in_memory, spilled_none) = reduce(None).await;
        let (spilled, spilled_rows) = reduce(Some(64 * 1024)).await;
        assert_eq!(in_memory.len(), 20_000);
        assert_eq!(spilled_none, 0);
        assert!(
            spilled_rows > 0,
            "a 64 KiB limit must spill a 200,000-row batch"
        );
        assert_eq!(in_memory, spilled);
    }

    /// Keys sent several times over two partitions, one key null twice: a first-arrival
    /// output keeps one row per key (the nulls are one key), the first of each key within a
    /// partition, runs the source only as it is read, and refuses a second read.
    #[tokio::test]
    async fn first_arrival_keeps_the_first_row_of_each_key_as_the_rows_stream() {
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        let keys: Vec<Option<String>> = (0..20_000)
            .map(|i| (i != 7 && i != 15_007).then(|| format!("key-{:05}", (i * 13) % 6_000)))
            .collect();
        let make = |rows: std::ops::Range<usize>| {
            let schema = Arc::new(Schema::new(vec![
                Field::new("k", DataType::Utf8, true),
                Field::new("ts", DataType::Int64, true),
                Field::new("line", DataType::Int64, false),
            ]));
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(keys[rows.clone()].to_vec())),
                    Arc::new(Int64Array::from(vec![None; rows.len()])),
                    Arc::new(Int64Array::from_iter_values(rows.map(|r| r as i64))),
                ],
            )
            .unwrap()
        };
        let (a, b) = (make(0..10_000), make(10_000..20_000));
        let schema = a.schema();
        let table = Arc::new(
            datafusion::datasource::MemTable::try_new(
                schema,
                vec![vec![a.slice(0, 5_000), a.slice(5_000, 5_000)], vec![b]],
            )
            .unwrap(),
        );
        let reduce = |once: bool, first: bool| {
            DedupBuilder::new(
                ctx.read_table(Arc::clone(&table) as _).unwrap(),
                vec!["k".into()],
            )
            .with_read_once(once)
            .with_first_arrival(first)
            .execute(&ctx)
        };
        let out = reduce(true, true).await.unwrap();
        assert!(out.streaming);
        let got = lines(&out.rows.clone().collect().await.unwrap());
        // 6,000 keys and the null key.
        assert_eq!(got.len(), 6_001);
        let mut seen = std::collections::HashSet::new();
        for line in &got {
            assert!(
                seen.insert(keys[*line as usize].clone()),
                "key of line {line} kept twice"
            );
        }
        // Each kept row is its key's first in one of the partitions, whichever came first.
        let first_in = |rows: std::ops::Range<usize>| {
            let mut first = std::collections::HashMap::new();
            for r in rows {
                first.entry(keys[r].clone()).or_insert(r as i64);
            }
            first
        };
        let (first_a, first_b) = (first_in(0..10_000), first_in(10_000..20_000));
        for line in &got {
            let key = &keys[*line as usize];
            assert!(
                first_a.get(key) == Some(line) || first_b.get(key) == Some(line),
                "line {line} is not the first of its key in its partition"
            );
        }
        assert!(out.rows.collect().await.is_err(), "a second read must fail");
        // Read twice (a MERGE), the rows are held and reduced to the last seen, as without it.
        let held = reduce(false, true).await.unwrap();
        assert!(!held.streaming);
        let last = lines(&held.rows.collect().await.unwrap());
        assert_eq!(last.len(), 6_001);
        assert!(
            last.iter()
                .all(|l| *l >= 14_000 || (4_000..10_000).contains(l))
        );
    }

    /// Under a bounded memory pool a first-arrival output is held and reduced (its keys could
    /// outgrow the pool with nowhere to spill), spilling as any other.
    #[tokio::test]
    async fn first_arrival_under_a_memory_limit_holds_and_spills_instead() {
        let ctx = crate::session::new_session(&crate::session::SessionOptions {
            memory_limit: Some(64 * 1024),
            ..Default::default()
        })
        .unwrap();
        // More rows than a session batch, as above.
        let n = 200_000;
        let keys: Vec<String> = (0..n).map(|i| format!("key-{:06}", i % 20_000)).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let line: Vec<i64> = (0..n as i64).collect();
        let input = batch(&key_refs, &vec![None; n], &line);
        let out = DedupBuilder::new(ctx.read_batch(input).unwrap(), vec!["k".into()])
            .with_winner_order(vec!["line".into()])
            .with_read_once(true)
            .with_first_arrival(true)
            .execute(&ctx)
            .await
            .unwrap();
        assert!(!out.streaming);
        assert!(out.spilled_rows > 0);
        let got = lines(&out.rows.collect().await.unwrap());
        assert_eq!(got, (180_000..200_000).collect::<Vec<i64>>());
    }
}
