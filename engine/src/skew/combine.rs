//! Combining a hot group's rows before a hash aggregation shuffles them.
//!
//! DataFusion aggregates in two stages: every input partition pre-aggregates its rows
//! (`Partial`), a hash repartition on the group keys brings each group's partial states
//! together, and a final stage merges them. The partial stage gives up once its first rows
//! keep many groups per row (see `skip_partial_aggregation_probe_ratio_threshold` in
//! [`crate::session`]): from then on every row passes through as a state of its own. That is
//! right for a million customers seen a few times each, and wrong for the one customer that
//! holds a quarter of the orders: all of its rows reach one partition of the shuffle
//! (customer_360 of the reference pipeline at 16 partitions: 2.15 times the mean).
//!
//! [`CombineHotGroups`] puts a [`HotGroupCombineExec`] between such a partial aggregation and
//! its repartition. It samples about one row in eight as rows pass. A key that alone would
//! put its partition of the shuffle above 1.5 times the mean is hot: at `P` partitions, a
//! key with a share `f` of the rows gets `1 + f * (P - 1)` times the mean, so one row in
//! `2 * (P - 1)` (a quarter of the rows is 1.25 at 2 partitions, 4.75 at 16). A key that
//! fills half that share of a window of 1,024 samples becomes a candidate; a candidate is
//! hot as soon as its share since is twice the hot share, or after four windows at the hot
//! share. A hot key's rows are merged into one state per partition with the aggregation's
//! own accumulators (as a final stage would merge them, but keeping the state), emitted when
//! the input ends; every other row passes through, a window later. The final stage merges
//! one more state per hot key and partition, so results are unchanged.
//!
//! Splitting a batch copies its other rows once more: at SF 10 and 2 partitions, combining
//! the hot customer (a quarter of the rows, imbalance 1.25) made customer_360 0.3-1.4 s
//! slower. So a key is hot only where it would take its partition past the 1.5 at which
//! runs warn of skew.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Scalar, UInt32Array, new_empty_array,
};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::{
    and, concat, filter_record_batch, not, or, prep_null_mask_filter, take,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, Gauge, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, InputOrderMode,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use futures::StreamExt;
use hashbrown::HashMap;

/// One row in this many, on average, is sampled for hot keys. The gaps vary between 1 and
/// twice this less one, so that a key that recurs with a fixed period is not missed.
const SAMPLE_STRIDE: usize = 8;

/// Windows without a candidate after which the sample halves, down to one row in 256.
const QUIET_WINDOWS_PER_HALVING: usize = 4;

/// Input rows held at most before they pass on, whether or not their window has closed.
const MAX_HELD_ROWS: usize = 16 * 1024;

/// How sampled keys are hashed.
const KEY_HASHES: RandomState = RandomState::with_seed(0x5eed);

/// Sampled rows per window (8 Ki input rows). A key that fills a share of one window becomes
/// a candidate; a candidate's share of all rows sampled since decides whether it is hot.
const SAMPLE_WINDOW: usize = 1024;

/// Windows a candidate is watched before its share is judged: over one window, a key just
/// below the hot share is above it by chance too often.
const JUDGED_AFTER_WINDOWS: usize = 4;

/// Fewest sightings in a window that make a key a candidate, however many partitions the
/// shuffle has: below it a uniformly spread key would be one by chance.
const MIN_CANDIDATE_SIGHTINGS: usize = 16;

/// Most hot keys and candidates one partition keeps; each hot key costs a comparison per
/// row.
const MAX_HOT_KEYS: usize = 16;

/// Inserts a [`HotGroupCombineExec`] below every hash repartition that feeds a final
/// aggregation from a partial one.
#[derive(Debug, Default)]
pub struct CombineHotGroups;

impl PhysicalOptimizerRule for CombineHotGroups {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        super::rewrite_hash_repartitions(plan, |node, repartition, _, partitions| {
            if repartition.preserve_order() {
                return Ok(None);
            }
            let Some(combine) = HotGroupCombineExec::over(repartition.input(), partitions)? else {
                return Ok(None);
            };
            let combined = Arc::clone(node).replace_children(
                vec![Arc::new(combine)],
                ReplaceChildrenOptions::new(
                    datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
                ),
            )?;
            Ok(Some(combined))
        })
    }

    fn name(&self) -> &str {
        "combine_hot_groups"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Passes a partial aggregation's states through, merging the states of hot group keys into
/// one per key and partition, emitted last.
#[derive(Debug)]
pub struct HotGroupCombineExec {
    input: Arc<dyn ExecutionPlan>,
    /// The input's leading columns, which hold the group keys.
    group_columns: usize,
    /// Each aggregate and the input columns that hold its state.
    aggregates: Vec<(Arc<AggregateFunctionExpr>, Range<usize>)>,
    /// A key is hot when it holds at least 1 row in this many: `2 * (partitions - 1)`. Its
    /// partition of the shuffle then gets its share `f` plus a `1 / partitions` share of
    /// the rest, `1 + f * (partitions - 1)` times the mean, and `f` alone would put it above
    /// 1.5. (A quarter of the rows is 1.25 at 2 partitions and 4.75 at 16.)
    hot_share_inverse: usize,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl HotGroupCombineExec {
    /// The combiner over `input` when it is a partial aggregation whose states it can merge,
    /// for a shuffle into `partitions` partitions.
    pub fn over(input: &Arc<dyn ExecutionPlan>, partitions: usize) -> Result<Option<Self>> {
        let Some(aggregate) = input.downcast_ref::<AggregateExec>() else {
            return Ok(None);
        };
        // An unbounded input never ends, so the hot states would never be emitted.
        if partitions < 2 || input.boundedness().is_unbounded() {
            return Ok(None);
        }
        let groups = aggregate.group_expr();
        // Grouping sets, ordered input and a LIMIT change what a state row means; an
        // aggregate without a groups accumulator (DISTINCT, ordered-set) would need one
        // accumulator per key. None of them is worth it here.
        if *aggregate.mode() != AggregateMode::Partial
            || !groups.is_single()
            || groups.is_empty()
            || *aggregate.input_order_mode() != InputOrderMode::Linear
            || aggregate.limit_options().is_some()
            || !aggregate
                .aggr_expr()
                .iter()
                .all(|a| a.groups_accumulator_supported())
        {
            return Ok(None);
        }
        let schema = input.schema();
        let group_columns = groups.expr().len();
        if !schema.fields()[..group_columns]
            .iter()
            .all(|f| comparable_key(f.data_type()))
        {
            return Ok(None);
        }
        let mut aggregates = Vec::with_capacity(aggregate.aggr_expr().len());
        let mut next = group_columns;
        for a in aggregate.aggr_expr() {
            let width = a.state_fields()?.len();
            aggregates.push((Arc::clone(a), next..next + width));
            next += width;
        }
        if next != schema.fields().len() {
            return Ok(None);
        }
        let properties = PlanProperties::new(
            // Hot states come last, so no input order survives.
            EquivalenceProperties::new(Arc::clone(&schema)),
            input.output_partitioning().clone(),
            EmissionType::Both,
            Boundedness::Bounded,
        );
        Ok(Some(Self {
            input: Arc::clone(input),
            group_columns,
            aggregates,
            hot_share_inverse: 2 * (partitions - 1),
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }
}

/// Whether rows of a group key of this type are found by `=` exactly as the aggregation
/// groups them, and the key's value comes back from the row format in its own type. Floats
/// are not (`-0.0` and `0.0`), nor dictionaries (they come back as their values).
fn comparable_key(data_type: &DataType) -> bool {
    use DataType::*;
    matches!(
        data_type,
        Boolean
            | Int8
            | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Decimal32(..)
            | Decimal64(..)
            | Decimal128(..)
            | Decimal256(..)
            | Date32
            | Date64
            | Time32(_)
            | Time64(_)
            | Timestamp(..)
            | Utf8
            | LargeUtf8
            | Utf8View
            | Binary
            | LargeBinary
            | BinaryView
            | FixedSizeBinary(_)
    )
}

impl DisplayAs for HotGroupCombineExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "HotGroupCombineExec: hot_share=1/{}",
            self.hot_share_inverse
        )
    }
}

impl ExecutionPlan for HotGroupCombineExec {
    one_input_plan_methods!();

    fn name(&self) -> &str {
        "HotGroupCombineExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = children.swap_remove(0);
        Ok(Arc::new(Self {
            properties: Arc::new(
                self.properties
                    .as_ref()
                    .clone()
                    .with_partitioning(input.output_partitioning().clone()),
            ),
            input,
            group_columns: self.group_columns,
            aggregates: self.aggregates.clone(),
            hot_share_inverse: self.hot_share_inverse,
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let combiner = HotGroups::new(self, &schema, partition)?;
        let combined =
            futures::stream::unfold(Some((input, combiner, false)), |state| async move {
                let (mut input, mut combiner, mut ended) = state?;
                loop {
                    if let Some(batch) = combiner.ready.pop_front() {
                        return Some((Ok(batch), Some((input, combiner, ended))));
                    }
                    if ended {
                        return None;
                    }
                    let step = match input.next().await {
                        Some(Ok(batch)) => combiner.push(batch),
                        Some(Err(e)) => Err(e),
                        None => {
                            ended = true;
                            combiner.finish()
                        }
                    };
                    if let Err(e) = step {
                        return Some((Err(e), None));
                    }
                }
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, combined)))
    }
}

/// One partition's hot keys, their merged states, and the sample that finds them.
struct HotGroups {
    schema: SchemaRef,
    group_columns: usize,
    accumulators: Vec<(Box<dyn GroupsAccumulator>, Range<usize>)>,
    converter: RowConverter,
    /// The hot keys, in the order of their accumulators' groups.
    hot: Vec<HotKey>,
    candidates: Vec<Candidate>,
    /// Sightings in a window that make a key a candidate: a quarter of the hot share.
    candidate_sightings: usize,
    /// A candidate is hot once its share of the rows sampled since is 1 in this many.
    hot_share_inverse: usize,
    /// The current window's sighting counts, by the hash of the key's row encoding.
    window: HashMap<u64, usize>,
    /// Rows sampled in the current window, and in all.
    sampled: usize,
    sampled_in_all: usize,
    /// Offset of the next sampled row in the next batch, and the mean gap between sampled
    /// rows.
    next_sample: usize,
    stride: usize,
    /// Windows in a row without a candidate.
    quiet_windows: usize,
    /// Hashes of the sampled keys of one batch, kept for its buffer.
    hashes: Vec<u64>,
    /// State of the generator of sampling gaps.
    gaps: u64,
    /// Batches of the open window, held until it closes (or `MAX_HELD_ROWS`) so that a key
    /// found hot in a window is combined in all of it.
    pending: Vec<RecordBatch>,
    /// Batches ready to pass on.
    ready: VecDeque<RecordBatch>,
    combined_rows: Count,
    hot_keys: Gauge,
}

/// A key whose rows are merged.
struct HotKey {
    /// Its value as one-row arrays, one per group column.
    key: Vec<ArrayRef>,
    /// The hash sampling counts keys by; a hot key is no longer counted.
    hash: u64,
    /// Rows merged into its state.
    merged: u64,
}

/// A key that filled a window's share: watched until its share over several windows says
/// whether it is hot.
struct Candidate {
    key: Vec<ArrayRef>,
    hash: u64,
    /// `sampled_in_all` when it became a candidate, and its sightings since.
    since: usize,
    seen: usize,
}

impl HotGroups {
    fn new(exec: &HotGroupCombineExec, schema: &SchemaRef, partition: usize) -> Result<Self> {
        let accumulators = exec
            .aggregates
            .iter()
            .map(|(a, states)| Ok((a.create_groups_accumulator()?, states.clone())))
            .collect::<Result<_>>()?;
        let converter = RowConverter::new(
            schema.fields()[..exec.group_columns]
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let hot_share_inverse = exec.hot_share_inverse;
        Ok(Self {
            schema: Arc::clone(schema),
            group_columns: exec.group_columns,
            accumulators,
            converter,
            hot: Vec::new(),
            candidates: Vec::new(),
            candidate_sightings: (SAMPLE_WINDOW / (2 * hot_share_inverse))
                .max(MIN_CANDIDATE_SIGHTINGS),
            hot_share_inverse,
            window: HashMap::with_capacity(SAMPLE_WINDOW),
            sampled: 0,
            sampled_in_all: 0,
            next_sample: 0,
            stride: SAMPLE_STRIDE,
            quiet_windows: 0,
            hashes: Vec::new(),
            gaps: 0x9E37_79B9_7F4A_7C15 ^ partition as u64,
            pending: Vec::new(),
            ready: VecDeque::new(),
            combined_rows: MetricBuilder::new(&exec.metrics).counter("combined_rows", partition),
            hot_keys: MetricBuilder::new(&exec.metrics).gauge("hot_keys", partition),
        })
    }

    /// Takes one input batch; the rows that pass through go to `ready` once its window
    /// closes.
    fn push(&mut self, batch: RecordBatch) -> Result<()> {
        let window_closed = self.hot.len() >= MAX_HOT_KEYS || self.sample(&batch)?;
        self.pending.push(batch);
        let held: usize = self.pending.iter().map(RecordBatch::num_rows).sum();
        if window_closed || held >= MAX_HELD_ROWS {
            self.release()?;
        }
        Ok(())
    }

    /// Splits the held batches into their hot rows, merged, and the rest, made ready.
    fn release(&mut self) -> Result<()> {
        for batch in std::mem::take(&mut self.pending) {
            if let Some(cold) = self.split(batch)? {
                self.ready.push_back(cold);
            }
        }
        Ok(())
    }

    /// Merges `batch`'s rows of hot keys into their states; returns the others.
    fn split(&mut self, batch: RecordBatch) -> Result<Option<RecordBatch>> {
        if self.hot.is_empty() || batch.num_rows() == 0 {
            return Ok(Some(batch));
        }
        let matches = self
            .hot
            .iter()
            .map(|hot| self.matches(&batch, &hot.key))
            .collect::<Result<Vec<_>>>()?;
        let mut any = matches[0].clone();
        for m in &matches[1..] {
            any = or(&any, m)?;
        }
        if any.true_count() == 0 {
            return Ok(Some(batch));
        }
        // Each hot row's key index, in the order `filter` keeps the rows.
        let group_indices: Vec<usize> = if matches.len() == 1 {
            vec![0; any.true_count()]
        } else {
            let mut key_of_row = vec![0usize; batch.num_rows()];
            for (key, m) in matches.iter().enumerate() {
                for row in m.values().set_indices() {
                    key_of_row[row] = key;
                }
            }
            any.values()
                .set_indices()
                .map(|row| key_of_row[row])
                .collect()
        };
        for (hot, m) in self.hot.iter_mut().zip(&matches) {
            hot.merged += m.true_count() as u64;
        }
        let hot_rows = filter_record_batch(&batch, &any)?;
        for (accumulator, states) in &mut self.accumulators {
            accumulator.merge_batch(
                &hot_rows.columns()[states.clone()],
                &group_indices,
                self.hot.len(),
            )?;
        }
        self.combined_rows.add(hot_rows.num_rows());
        let cold = filter_record_batch(&batch, &not(&any)?)?;
        Ok((cold.num_rows() > 0).then_some(cold))
    }

    /// Which rows of `batch` have the group key `key` (never null: null keys are not hot).
    fn matches(&self, batch: &RecordBatch, key: &[ArrayRef]) -> Result<BooleanArray> {
        let mut all: Option<BooleanArray> = None;
        for (column, value) in batch.columns()[..self.group_columns].iter().zip(key) {
            let equal = eq(column, &Scalar::new(Arc::clone(value)))?;
            all = Some(match all {
                None => equal,
                Some(previous) => and(&previous, &equal)?,
            });
        }
        let all = all.unwrap_or_else(|| BooleanArray::from(vec![false; batch.num_rows()]));
        Ok(match all.nulls() {
            Some(_) => prep_null_mask_filter(&all),
            None => all,
        })
    }

    /// Counts about every `stride`th row's key, and judges the candidates at the end of each
    /// window. Returns whether a window closed.
    fn sample(&mut self, batch: &RecordBatch) -> Result<bool> {
        let rows = batch.num_rows();
        if self.next_sample >= rows {
            self.next_sample -= rows;
            return Ok(false);
        }
        let mut picks = Vec::with_capacity(rows / self.stride + 1);
        let mut next = self.next_sample;
        while next < rows {
            picks.push(next as u32);
            next += self.gap();
        }
        self.next_sample = next - rows;
        let picks = UInt32Array::from(picks);
        let keys = batch.columns()[..self.group_columns]
            .iter()
            .map(|c| take(c.as_ref(), &picks, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        hashes.resize(picks.len(), 0);
        // Counted by hash: a collision at worst makes a cold key hot, which costs a
        // comparison per row and changes no result.
        create_hashes(&keys, &KEY_HASHES, &mut hashes)?;
        let mut closed = false;
        for (pick, &hash) in hashes.iter().enumerate() {
            if let Some(candidate) = self.candidates.iter_mut().find(|c| c.hash == hash) {
                candidate.seen += 1;
            } else if !self.hot.iter().any(|hot| hot.hash == hash) {
                let seen = self.window.entry(hash).or_default();
                *seen += 1;
                if *seen == self.candidate_sightings
                    && self.hot.len() + self.candidates.len() < MAX_HOT_KEYS
                {
                    // A copy of its own, not a slice that keeps the batch's buffers.
                    let one: Vec<ArrayRef> = keys.iter().map(|k| k.slice(pick, 1)).collect();
                    let key = self
                        .converter
                        .convert_rows(&self.converter.convert_columns(&one)?)?;
                    if key.iter().all(|k| k.null_count() == 0) {
                        self.candidates.push(Candidate {
                            key,
                            hash,
                            since: self.sampled_in_all,
                            seen: 0,
                        });
                    }
                }
            }
            self.sampled += 1;
            self.sampled_in_all += 1;
            if self.sampled == SAMPLE_WINDOW {
                self.close_window();
                closed = true;
            }
        }
        self.hashes = hashes;
        Ok(closed)
    }

    /// Judges the candidates, and samples more thinly after windows without any: a stream
    /// whose keys are spread evenly pays for its sample only at first.
    fn close_window(&mut self) {
        self.window.clear();
        self.sampled = 0;
        self.judge_candidates();
        self.quiet_windows = if self.candidates.is_empty() {
            self.quiet_windows + 1
        } else {
            0
        };
        self.stride = SAMPLE_STRIDE << (self.quiet_windows / QUIET_WINDOWS_PER_HALVING).min(5);
    }

    /// Promotes the candidates whose share is hot: at once when it is twice the hot share,
    /// else once watched long enough; drops those whose share fell below a candidate's.
    fn judge_candidates(&mut self) {
        let mut kept = Vec::with_capacity(self.candidates.len());
        for candidate in std::mem::take(&mut self.candidates) {
            let sampled = self.sampled_in_all - candidate.since;
            let scaled = candidate.seen * self.hot_share_inverse;
            let judged = sampled >= JUDGED_AFTER_WINDOWS * SAMPLE_WINDOW;
            let clearly = sampled >= SAMPLE_WINDOW / 2 && scaled >= 2 * sampled;
            if clearly || (judged && scaled >= sampled) {
                tracing::debug!(
                    hot_keys = self.hot.len() + 1,
                    share = candidate.seen as f64 / sampled as f64,
                    "combining a hot group's states before the shuffle"
                );
                self.hot.push(HotKey {
                    key: candidate.key,
                    hash: candidate.hash,
                    merged: 0,
                });
                self.hot_keys.set(self.hot.len());
            } else if !judged || 2 * scaled >= sampled {
                kept.push(candidate);
            }
        }
        self.candidates = kept;
    }

    /// The distance to the next sampled row, from a xorshift generator.
    fn gap(&mut self) -> usize {
        self.gaps ^= self.gaps << 13;
        self.gaps ^= self.gaps >> 7;
        self.gaps ^= self.gaps << 17;
        1 + (self.gaps % (2 * self.stride as u64 - 1)) as usize
    }

    /// Releases the held batches, then the merged states of the hot keys that met any rows
    /// as one batch.
    fn finish(&mut self) -> Result<()> {
        self.release()?;
        let keys = self.hot.len();
        if !self.hot.iter().any(|hot| hot.merged > 0) {
            return Ok(());
        }
        let mut columns: Vec<ArrayRef> = (0..self.group_columns)
            .map(|c| {
                let values: Vec<&dyn Array> =
                    self.hot.iter().map(|hot| hot.key[c].as_ref()).collect();
                concat(&values)
            })
            .collect::<std::result::Result<_, _>>()?;
        for (accumulator, states) in &mut self.accumulators {
            // Grow every accumulator to all hot keys, including those no row has met yet.
            let empty: Vec<ArrayRef> = self.schema.fields()[states.clone()]
                .iter()
                .map(|f| new_empty_array(f.data_type()))
                .collect();
            accumulator.merge_batch(&empty, &[], keys)?;
            columns.extend(accumulator.state(EmitTo::All)?);
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        let met = BooleanArray::from_iter(self.hot.iter().map(|hot| Some(hot.merged > 0)));
        self.ready.push_back(filter_record_batch(&batch, &met)?);
        Ok(())
    }
}
