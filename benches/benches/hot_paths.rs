//! Criterion benchmarks of the hot paths, on commerce data from the generator.
//!
//! `cargo bench -p medallion-benches` (all), or `-- csv` for one group. Sample counts are
//! small on purpose: each case takes a few seconds, and the whole suite about two minutes on
//! two cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::datasource::MemTable;
use datafusion::prelude::{DataFrame, SessionContext};
use medallion_connectors::files::{FileFormat, FilesSource};
use medallion_engine::dedup::DedupBuilder;
use medallion_engine::ops::{OverwriteBuilder, UpsertBuilder};
use medallion_engine::session::{SessionOptions, new_session};
use medallion_engine::udf::parse_timestamp_micros;
use medallion_jobs::generate::{GenerateOptions, generate};
use medallion_jobs::pipeline::Pipeline;
use medallion_quality::RuleSet;
use tokio::runtime::Runtime;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Rows in the table MERGE writes into.
const MERGE_TABLE_ROWS: usize = 1_000_000;
/// Rows of each MERGE: half replace stored rows, half are new keys.
const MERGE_BATCH_ROWS: usize = 20_000;

struct Landing {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// Commerce at scale 0.05 in one batch: 50,000 orders, 150,000 events.
fn landing() -> BenchResult<Landing> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("landing");
    generate(&GenerateOptions {
        scale: 0.05,
        batches: 1,
        seed: 42,
        out: root.clone(),
    })?;
    Ok(Landing { _dir: dir, root })
}

/// Each landed file of one entity: its path and its bytes.
fn landed_files(root: &Path, entity: &str) -> BenchResult<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for batch in std::fs::read_dir(root.join(entity))? {
        for file in std::fs::read_dir(batch?.path())? {
            let path = file?.path();
            out.push((path.display().to_string(), std::fs::read(&path)?));
        }
    }
    Ok(out)
}

fn source(
    root: &Path,
    entity: &str,
    format: FileFormat,
    columns: &[&str],
) -> BenchResult<FilesSource> {
    let url = url::Url::from_directory_path(root.join(entity))
        .map_err(|()| "landing path is not absolute")?;
    Ok(FilesSource::new(
        url,
        format,
        columns.iter().map(|c| c.to_string()).collect(),
    ))
}

const ORDER_COLUMNS: [&str; 9] = [
    "order_id",
    "customer_id",
    "product_id",
    "order_ts",
    "quantity",
    "unit_price",
    "currency",
    "status",
    "updated_at",
];

fn parse_all(source: &FilesSource, files: &[(String, Vec<u8>)]) -> BenchResult<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for (location, bytes) in files {
        batches.extend(source.parse(bytes, location)?);
    }
    Ok(batches)
}

fn bench_landed_to_arrow(c: &mut Criterion, landing: &Landing) -> BenchResult<()> {
    let mut group = c.benchmark_group("landed_to_arrow");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    let orders = landed_files(&landing.root, "orders")?;
    let csv = source(&landing.root, "orders", FileFormat::Csv, &ORDER_COLUMNS)?;
    group.throughput(Throughput::Bytes(
        orders.iter().map(|(_, b)| b.len() as u64).sum(),
    ));
    group.bench_function("csv_orders", |b| {
        b.iter(|| parse_all(&csv, &orders).map(|v| v.len()))
    });
    let events = landed_files(&landing.root, "events")?;
    let jsonl = source(&landing.root, "events", FileFormat::JsonLines, &[])?;
    group.throughput(Throughput::Bytes(
        events.iter().map(|(_, b)| b.len() as u64).sum(),
    ));
    group.bench_function("jsonl_events", |b| {
        b.iter(|| parse_all(&jsonl, &events).map(|v| v.len()))
    });
    group.finish();
    Ok(())
}

fn bench_timestamps(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_timestamp");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    let n = 100_000u32;
    // (name, date-time separator, zone suffix): the three spellings the landing may use.
    let spellings = [
        ("iso_utc_z", 'T', "Z"),
        ("iso_offset", 'T', "+05:30"),
        ("space_naive", ' ', ""),
    ];
    group.throughput(Throughput::Elements(u64::from(n)));
    for (name, separator, zone) in spellings {
        let values: Vec<String> = (0..n)
            .map(|i| {
                let (month, day, hour, minute, second) =
                    (1 + i % 12, 1 + i % 28, i % 24, i % 60, (i / 7) % 60);
                format!(
                    "2026-{month:02}-{day:02}{separator}{hour:02}:{minute:02}:{second:02}{zone}"
                )
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(name), &values, |b, values| {
            b.iter(|| {
                values
                    .iter()
                    .filter_map(|v| parse_timestamp_micros(v))
                    .count()
            })
        });
    }
    group.finish();
}

/// The two casts silver makes on every row, by arrow's kernel and by the engine's own, on the
/// same values: prices as text to `DECIMAL(18, 2)`, and UTC instants to their dates.
fn bench_casts(c: &mut Criterion) -> BenchResult<()> {
    use arrow::array::{ArrayRef, StringViewArray, TimestampMicrosecondArray};
    use arrow::compute::kernels::cast::cast;
    use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF};

    let mut group = c.benchmark_group("cast");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    let n = 100_000u32;
    group.throughput(Throughput::Elements(u64::from(n)));
    let prices: ArrayRef = Arc::new(StringViewArray::from_iter_values(
        (0..n).map(|i| format!("{}.{:02}", 1 + i % 5_000, i % 100)),
    ));
    let instants: ArrayRef = Arc::new(
        TimestampMicrosecondArray::from_iter_values(
            (0..n).map(|i| 1_767_225_600_000_000 + i64::from(i) * 77_760_000),
        )
        .with_timezone("UTC"),
    );
    let run = |udf: &ScalarUDF, input: &ArrayRef, to: DataType| -> BenchResult<ArrayRef> {
        Ok(udf
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(Arc::clone(input))],
                arg_fields: vec![Arc::new(Field::new("in", input.data_type().clone(), true))],
                number_rows: input.len(),
                return_field: Arc::new(Field::new("out", to, true)),
                config_options: Arc::default(),
            })?
            .into_array(input.len())?)
    };
    let decimal = DataType::Decimal128(18, 2);
    let text_to_decimal = medallion_engine::udf::text_to_decimal(18, 2, true);
    let utc_date = medallion_engine::udf::utc_date();
    // Both kernels must agree before they are timed.
    if cast(&prices, &decimal)?.as_ref()
        != run(&text_to_decimal, &prices, decimal.clone())?.as_ref()
        || cast(&instants, &DataType::Date32)?.as_ref()
            != run(&utc_date, &instants, DataType::Date32)?.as_ref()
    {
        return Err("the engine's casts differ from arrow's".into());
    }
    group.bench_function("text_to_decimal/arrow", |b| {
        b.iter(|| cast(&prices, &decimal))
    });
    group.bench_function("text_to_decimal/engine", |b| {
        b.iter(|| run(&text_to_decimal, &prices, decimal.clone()).map_err(|e| e.to_string()))
    });
    group.bench_function("utc_date/arrow", |b| {
        b.iter(|| cast(&instants, &DataType::Date32))
    });
    group.bench_function("utc_date/engine", |b| {
        b.iter(|| run(&utc_date, &instants, DataType::Date32).map_err(|e| e.to_string()))
    });
    group.finish();
    Ok(())
}

async fn memory_frame(
    ctx: &SessionContext,
    name: &str,
    batches: Vec<RecordBatch>,
) -> BenchResult<DataFrame> {
    let schema = batches.first().map(RecordBatch::schema).ok_or("no rows")?;
    let per_core = batches.len().div_ceil(2).max(1);
    let partitions: Vec<Vec<RecordBatch>> = batches.chunks(per_core).map(<[_]>::to_vec).collect();
    ctx.deregister_table(name)?;
    ctx.register_table(name, Arc::new(MemTable::try_new(schema, partitions)?))?;
    Ok(ctx.table(name).await?)
}

fn bench_rules_and_dedup(c: &mut Criterion, rt: &Runtime, landing: &Landing) -> BenchResult<()> {
    let ctx = new_session(&SessionOptions::default())?;
    let csv = source(&landing.root, "orders", FileFormat::Csv, &ORDER_COLUMNS)?;
    let batches = parse_all(&csv, &landed_files(&landing.root, "orders")?)?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let orders = rt.block_on(memory_frame(&ctx, "orders", batches))?;
    // The commerce pipeline's own order rules, less the one that reads another table.
    let pipeline = Pipeline::load("commerce", &[])?;
    let spec = pipeline
        .spec
        .silver
        .iter()
        .find(|s| s.table.get_ref() == "orders")
        .ok_or("no orders spec")?;
    let rules = RuleSet::new(
        spec.rules()
            .into_iter()
            .filter(|r| !r.check.contains("silver."))
            .collect(),
    )?;

    let mut group = c.benchmark_group("silver");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("rules_orders", |b| {
        b.iter(|| {
            rt.block_on(async {
                let checked = rules.apply(&ctx, orders.clone(), None).await?;
                Ok::<_, Box<dyn std::error::Error>>(checked.count().await?)
            })
        })
    });
    group.bench_function("dedup_orders_by_key", |b| {
        b.iter(|| {
            rt.block_on(async {
                let deduped = DedupBuilder::new(orders.clone(), vec!["order_id".into()])
                    .with_winner_order(vec![
                        "updated_at".into(),
                        medallion_connectors::files::SOURCE_LINE.into(),
                    ])
                    .execute(&ctx)
                    .await?;
                Ok::<_, Box<dyn std::error::Error>>(deduped.rows.count().await?)
            })
        })
    });
    group.finish();
    Ok(())
}

fn keyed_batch(ids: impl Iterator<Item = usize>, version: i64) -> BenchResult<RecordBatch> {
    let ids: Vec<usize> = ids.collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("updated_at", DataType::Int64, false),
        Field::new("payload", DataType::Utf8, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|i| format!("K{i:09}")),
            )),
            Arc::new(Int64Array::from_iter_values(ids.iter().map(|_| version))),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|i| format!("payload of {i} at {version}")),
            )),
        ],
    )?)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn bench_merge(c: &mut Criterion, rt: &Runtime) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base");
    let ctx = new_session(&SessionOptions::default())?;
    rt.block_on(async {
        let table = memory_frame(
            &ctx,
            "table_rows",
            vec![keyed_batch(0..MERGE_TABLE_ROWS, 1)?],
        )
        .await?;
        let url = url::Url::from_directory_path(&base).map_err(|()| "bad path")?;
        OverwriteBuilder::new(url, table).execute().await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    // Updates spread over the whole key range, inserts after its end.
    let step = MERGE_TABLE_ROWS / (MERGE_BATCH_ROWS / 2);
    let updates = keyed_batch((0..MERGE_BATCH_ROWS / 2).map(|i| i * step), 2)?;
    let inserts = keyed_batch(MERGE_TABLE_ROWS..MERGE_TABLE_ROWS + MERGE_BATCH_ROWS / 2, 2)?;

    let mut group = c.benchmark_group("merge");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(MERGE_BATCH_ROWS as u64));
    group.bench_function("20k_into_1m", |b| {
        b.iter_batched(
            || {
                let copy = dir.path().join(format!("run-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&copy);
                copy_dir(&base, &copy).map(|()| copy)
            },
            |copy| {
                rt.block_on(async {
                    let copy = copy?;
                    let source =
                        memory_frame(&ctx, "merge_source", vec![updates.clone(), inserts.clone()])
                            .await?;
                    let url = url::Url::from_directory_path(&copy).map_err(|()| "bad path")?;
                    let metrics = UpsertBuilder::new(url, source, vec!["id".into()])
                        .with_winner_order(vec!["updated_at".into()])
                        .execute()
                        .await?;
                    Ok::<_, Box<dyn std::error::Error>>(
                        metrics.rows_updated + metrics.rows_inserted,
                    )
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    Ok(())
}

fn hot_paths(c: &mut Criterion) {
    let outcome = (|| -> BenchResult<()> {
        let rt = Runtime::new()?;
        let landing = landing()?;
        bench_landed_to_arrow(c, &landing)?;
        bench_timestamps(c);
        bench_casts(c)?;
        bench_rules_and_dedup(c, &rt, &landing)?;
        bench_merge(c, &rt)?;
        Ok(())
    })();
    if let Err(e) = outcome {
        eprintln!("benchmark setup failed: {e}");
        std::process::exit(1);
    }
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
