//! The lake on S3 and the state in DynamoDB (issue 5), against the S3 server and DynamoDB
//! Local that scripts/test.sh starts on loopback: end to end, stale writers, leases and
//! concurrent runs, SIGKILL at random points, injected S3 faults, and the errors a user
//! gets for a store that cannot be used.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medallion_connectors::ConnectorError;
use medallion_connectors::dynamodb::DynamoDbStateStore;
use medallion_connectors::lease::LeaseBuilder;
use medallion_connectors::state::StateStore;
use medallion_tests::faults::{Fault, FaultPlan, FaultRule, install_faulty_s3a};
use medallion_tests::{
    RunLayer as Layer, Scratch, dynamodb_state, generate_landing, gold_snapshot, gold_snapshot_at,
    land_batch, land_first_lines, medallion_bin, open_every_table, require_services, run_commerce,
    run_commerce_at, s3_location, table_lines_at, upload_tree,
};

/// The `medallion` binary with this process's environment (the services' AWS variables).
fn medallion_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(medallion_bin());
    // The Delta kernel logs a table not created yet as an error; the run's own errors stay.
    cmd.args(args)
        .env("MEDALLION_LOG", "warn,buoyant_kernel=off");
    cmd
}

fn run_bin(args: &[&str]) -> Output {
    medallion_cmd(args).output().expect("medallion runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `run commerce` arguments for a landing, lake and DynamoDB state table.
fn run_args<'a>(landing: &'a str, lake: &'a str, state: &'a str, layer: &'a str) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "commerce".to_string(),
        "--var".to_string(),
        format!("landing={landing}"),
        "--var".to_string(),
        format!("lake={lake}"),
        "--state".to_string(),
        format!("dynamodb://{state}"),
        "--target-partitions".to_string(),
        "2".to_string(),
    ];
    if !layer.is_empty() {
        args.push("--layer".to_string());
        args.push(layer.to_string());
    }
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A test's world on S3: generated batches on local disk, a landing and a lake under a
/// prefix of its own (`scheme://medallion-test/<name>…`), a DynamoDB state table, and a
/// local-disk landing and lake fed the same batches, as the reference.
struct S3World {
    local: Scratch,
    generated: PathBuf,
    landing: String,
    lake: String,
    state: Arc<dyn StateStore>,
    table: String,
}

impl S3World {
    async fn new(name: &str, scheme: &str, scale: f64, batches: u32, seed: u64) -> Self {
        let local = Scratch::new();
        let generated = local.dir.path().join("generated");
        generate_landing(&generated, scale, batches, seed);
        let prefix = s3_location(name).replacen("s3://", &format!("{scheme}://"), 1);
        let (state, table) = dynamodb_state(name).await;
        Self {
            local,
            generated,
            landing: format!("{prefix}/landing"),
            lake: format!("{prefix}/lake"),
            state,
            table,
        }
    }

    /// Lands `batch` on S3 and in the local reference landing.
    async fn land(&self, batch: &str) {
        land_batch_s3(&self.generated, batch, &self.landing).await;
        land_batch(&self.generated, &self.local.landing(), batch);
    }

    /// Runs every layer over the local reference landing and lake.
    async fn run_local(&self) {
        let (summary, result) =
            run_commerce(&self.local.landing(), &self.local.lake(), &Layer::ALL).await;
        assert!(result.is_ok(), "{result:?}\n{}", summary.to_json_line());
    }

    fn local_lake(&self) -> String {
        self.local.lake().display().to_string()
    }
}

/// Lands `batch` of the generated landing at `src` under the S3 landing `landing`.
async fn land_batch_s3(src: &Path, batch: &str, landing: &str) {
    let staging = tempfile::tempdir().expect("tmp");
    land_batch(src, staging.path(), batch);
    upload_tree(staging.path(), landing).await;
}

/// Rows per table and distinct keys of every silver table: what "nothing ingested twice,
/// nothing lost" means for the lake at `lake`.
async fn lake_counts(lake: &str) -> Vec<(String, String)> {
    // Every table must open, whatever else this finds.
    let _ = open_every_table(lake).await;
    let mut out = Vec::new();
    let tables = [
        ("orders", "order_id"),
        ("customers", "customer_id"),
        ("products", "product_id"),
        ("events", "event_id"),
        (
            "fx_rates",
            "concat(currency, '/', CAST(rate_hour AS VARCHAR))",
        ),
    ];
    for (t, key) in tables {
        for (layer, table, columns) in [
            ("bronze", t.to_string(), "count(*)".to_string()),
            (
                "silver",
                t.to_string(),
                format!("count(*), count(DISTINCT {key})"),
            ),
            ("silver", format!("{t}_quarantine"), "count(*)".to_string()),
        ] {
            let counts = table_lines_at(lake, layer, &table, &columns)
                .await
                .map_or_else(|| "absent".to_string(), |l| l.join(";"));
            if let Some((rows, keys)) = counts.split_once('|') {
                assert_eq!(rows, keys, "{layer}.{table} holds a key twice");
            }
            out.push((format!("{layer}.{table}"), counts));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn commerce_on_s3_with_state_in_dynamodb_equals_the_local_run() {
    require_services();
    let w = S3World::new("e2e", "s3", 0.002, 3, 5).await;
    let (landing, lake, state) = (w.landing.clone(), w.lake.clone(), Arc::clone(&w.state));
    for batch in ["batch-0001", "batch-0002", "batch-0003-events"] {
        if batch == "batch-0003-events" {
            // A micro-batch of events alone: customer_360 reads the rows that changed from
            // the files silver events rewrote on S3 and updates only their customers.
            let staging = tempfile::tempdir().expect("tmp");
            land_first_lines(&w.generated, staging.path(), "events", "batch-0003", 8);
            upload_tree(staging.path(), &landing).await;
            land_first_lines(&w.generated, &w.local.landing(), "events", "batch-0003", 8);
        } else {
            w.land(batch).await;
        }
        let (summary, result) =
            run_commerce_at(&landing, &lake, Arc::clone(&state), &Layer::ALL).await;
        assert!(result.is_ok(), "{result:?}\n{}", summary.to_json_line());
        if batch == "batch-0003-events" {
            let c360 = summary.tables.iter().find(|t| t.table == "customer_360");
            assert!(
                c360.and_then(|t| t.keys_updated)
                    .is_some_and(|k| (1..=8).contains(&k)),
                "{}",
                summary.to_json_line()
            );
        }
        w.run_local().await;
    }
    let on_s3 = gold_snapshot_at(&lake).await;
    assert!(on_s3.values().all(|rows| !rows.is_empty()), "{on_s3:?}");
    assert_eq!(on_s3, gold_snapshot(&w.local.lake()).await);
    assert_eq!(lake_counts(&lake).await, lake_counts(&w.local_lake()).await);

    // The state lives in DynamoDB: watermarks, ingested files and a run record per run.
    let bronze = state.get("commerce/bronze/orders").await.expect("state");
    assert!(
        bronze.is_some_and(|v| v.value["ingested"].as_array().is_some_and(|f| f.len() == 2)),
        "bronze orders should record its 2 ingested files"
    );
    let again = run_commerce_at(&landing, &lake, Arc::clone(&state), &Layer::ALL).await;
    assert!(again.1.is_ok());
    assert!(
        again.0.tables.iter().all(|t| t.rows_written == 0),
        "{}",
        again.0.to_json_line()
    );
    let record = state
        .get(&format!("commerce/runs/{}", again.0.run_id))
        .await
        .expect("state")
        .expect("run record");
    assert_eq!(record.value["status"], "succeeded");
    assert_eq!(
        record.version, 2,
        "a record is written at start and at the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn a_stale_watermark_write_is_refused_by_dynamodb() {
    require_services();
    let (store, _) = dynamodb_state("stale").await;
    let key = "commerce/silver/orders";
    let v1 = store
        .put(
            key,
            serde_json::json!({"watermark": "2026-01-01T00:00:00Z"}),
            None,
        )
        .await
        .expect("first write");
    // Two runs read version v1; the first moves the watermark forward.
    let v2 = store
        .put(
            key,
            serde_json::json!({"watermark": "2026-01-02T00:00:00Z"}),
            Some(v1),
        )
        .await
        .expect("second write");
    let stale = store
        .put(
            key,
            serde_json::json!({"watermark": "2026-01-01T12:00:00Z"}),
            Some(v1),
        )
        .await;
    assert!(
        matches!(&stale, Err(ConnectorError::StateConflict { expected: Some(e), found: Some(f), .. }) if *e == v1 && *f == v2),
        "{stale:?}"
    );
    let created_twice = store.put(key, serde_json::json!({}), None).await;
    assert!(matches!(
        created_twice,
        Err(ConnectorError::StateConflict { .. })
    ));
    let stored = store.get(key).await.expect("read").expect("value");
    assert_eq!(stored.value["watermark"], "2026-01-02T00:00:00Z");
    assert_eq!(stored.version, v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn a_layer_leased_to_another_run_stops_with_exit_code_5_or_waits() {
    require_services();
    let w = S3World::new("lease", "s3", 0.001, 1, 3).await;
    let (landing, lake, state, table) = (
        w.landing.clone(),
        w.lake.clone(),
        Arc::clone(&w.state),
        w.table.clone(),
    );
    w.land("batch-0001").await;

    let other = LeaseBuilder::new(Arc::clone(&state), "commerce/leases/bronze", "other-run")
        .with_ttl(Duration::from_secs(30))
        .acquire()
        .await
        .expect("lease");
    let busy = run_bin(&strs(&run_args(&landing, &lake, &table, "bronze")));
    assert_eq!(busy.status.code(), Some(5), "{}", stderr(&busy));
    assert!(
        stderr(&busy).contains("leased to run other-run"),
        "{}",
        stderr(&busy)
    );
    assert!(
        medallion_engine::table::open_table(
            &medallion_engine::location::parse_location(&format!("{lake}/bronze/orders"))
                .expect("url")
        )
        .await
        .expect("open")
        .is_none(),
        "the refused run wrote"
    );

    // With --lease-wait the run waits for the holder to let go, then does the work.
    let mut args = run_args(&landing, &lake, &table, "bronze");
    args.extend(["--lease-wait".to_string(), "60s".to_string()]);
    let child = medallion_cmd(&strs(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_secs(2)).await;
    other.release().await.expect("release");
    let waited = child.wait_with_output().expect("wait");
    assert_eq!(waited.status.code(), Some(0), "{}", stderr(&waited));

    // An orchestrator retrying with the same run id starts the run record over.
    let mut args = run_args(&landing, &lake, &table, "bronze");
    args.extend(["--run-id".to_string(), "retried".to_string()]);
    for attempt in 0..2 {
        let out = run_bin(&strs(&args));
        assert_eq!(
            out.status.code(),
            Some(0),
            "attempt {attempt}: {}",
            stderr(&out)
        );
    }
    let record = state
        .get("commerce/runs/retried")
        .await
        .expect("state")
        .expect("record");
    assert_eq!(record.value["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn two_runs_of_one_layer_started_together_do_the_work_once() {
    require_services();
    let w = S3World::new("together", "s3", 0.002, 1, 4).await;
    let (landing, lake, table) = (w.landing.clone(), w.lake.clone(), w.table.clone());
    w.land("batch-0001").await;
    w.run_local().await;

    let mut busy_seen = 0;
    for layer in ["bronze", "silver", "gold"] {
        let args = run_args(&landing, &lake, &table, layer);
        let spawn = || {
            medallion_cmd(&strs(&args))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let (a, b) = (spawn(), spawn());
        let outputs = [
            a.wait_with_output().expect("a"),
            b.wait_with_output().expect("b"),
        ];
        let mut codes: Vec<Option<i32>> = outputs.iter().map(|o| o.status.code()).collect();
        codes.sort();
        let written: Vec<u64> = outputs
            .iter()
            .filter(|o| o.status.code() == Some(0))
            .map(|o| {
                medallion_tests::summary_of(o)["tables"]
                    .as_array()
                    .map_or(0, |t| {
                        t.iter()
                            .map(|t| t["rows_written"].as_u64().unwrap_or(0))
                            .sum()
                    })
            })
            .collect();
        match codes.as_slice() {
            // One held the lease; the other stopped with "busy" and wrote nothing.
            [Some(0), Some(5)] => {
                busy_seen += 1;
                let refused = outputs
                    .iter()
                    .find(|o| o.status.code() == Some(5))
                    .expect("5");
                assert!(stderr(refused).contains("another run is doing this work"));
            }
            // The first finished before the second took the lease: the second found nothing
            // to do (gold recomputes, so only bronze and silver can tell).
            [Some(0), Some(0)] => {
                if layer != "gold" {
                    assert!(
                        written.contains(&0),
                        "{layer}: both runs wrote: {written:?}"
                    );
                }
            }
            other => panic!(
                "{layer}: unexpected exit codes {other:?}\n{}\n{}",
                stderr(&outputs[0]),
                stderr(&outputs[1])
            ),
        }
    }
    println!("runs refused by the lease: {busy_seen} of 3 layers");
    assert_eq!(lake_counts(&lake).await, lake_counts(&w.local_lake()).await);
    assert_eq!(
        gold_snapshot_at(&lake).await,
        gold_snapshot(&w.local.lake()).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn two_writers_committing_to_one_delta_table_lose_no_file() {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use medallion_engine::ops::{AppendBuilder, UpsertBuilder};

    require_services();
    let table_lake = s3_location("writers");
    let url =
        medallion_engine::location::parse_location(&format!("{table_lake}/bronze/t")).expect("url");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("writer", DataType::Utf8, false),
    ]));
    let batch = |writer: &str, ids: std::ops::Range<i64>| {
        let n = ids.clone().count();
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(ids)),
                Arc::new(StringArray::from(vec![writer; n])),
            ],
        )
        .expect("batch")
    };
    let append = |writer: String, ids: std::ops::Range<i64>| {
        let url = url.clone();
        let b = batch(&writer, ids);
        let schema = Arc::clone(&schema);
        async move {
            let mut staged = AppendBuilder::new(url, schema).stage()?;
            staged.write(b).await?;
            staged.commit(None).await
        }
    };
    append("seed".into(), 0..10).await.expect("create");

    // Rounds of four blind appends at once: Delta lets all of them commit, each at a
    // version of its own (the conditional PUT of the log entry decides who gets which).
    let mut versions = Vec::new();
    for round in 0..3_i64 {
        let writers: Vec<_> = (0..4_i64)
            .map(|w| {
                let first = 1_000 * (round + 1) + 100 * w;
                tokio::spawn(append(format!("r{round}w{w}"), first..first + 50))
            })
            .collect();
        for w in writers {
            match w.await.expect("task") {
                Ok(metrics) => versions.push(metrics.version),
                Err(e) => panic!("a blind append was refused: {e}"),
            }
        }
    }
    let mut distinct = versions.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        versions.len(),
        "two commits got one version: {versions:?}"
    );
    let count = |lines: Option<Vec<String>>| lines.map_or(0, |l| l.len());
    let rows = count(table_lines_at(&table_lake, "bronze", "t", "id").await);
    assert_eq!(
        rows,
        10 + 50 * versions.len(),
        "a committed file is missing"
    );

    // Two MERGEs of overlapping keys at once: a conflict error or a serial result, and
    // never a key twice.
    let ctx = medallion_engine::session::new_session(&Default::default()).expect("session");
    let merge = |writer: &str, ids: std::ops::Range<i64>| {
        let df = ctx.read_batch(batch(writer, ids)).expect("df");
        UpsertBuilder::new(url.clone(), df, vec!["id".into()]).execute()
    };
    let (a, b) = tokio::join!(merge("m1", 0..30), merge("m2", 20..60));
    println!(
        "concurrent MERGEs: {:?} / {:?}",
        a.as_ref().err(),
        b.as_ref().err()
    );
    assert!(a.is_ok() || b.is_ok(), "both MERGEs failed: {a:?} {b:?}");
    let ids = table_lines_at(&table_lake, "bronze", "t", "id")
        .await
        .expect("table");
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!(ids.len(), distinct.len(), "a key was written twice");
    let expected = 10
        + 50 * 12
        + match (a.is_ok(), b.is_ok()) {
            (true, true) => 50,
            (true, false) => 20,
            _ => 40,
        };
    assert_eq!(ids.len(), expected, "rows lost or doubled");
}

/// A small deterministic generator for kill delays (the seed is printed).
struct XorShift(u64);
impl XorShift {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn sigkill_at_random_points_then_rerun_equals_an_uninterrupted_run() {
    require_services();
    let seed = std::env::var("MEDALLION_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 | 1);
    println!("kill seed: {seed} (set MEDALLION_KILL_SEED to replay)");
    let mut rng = XorShift(seed);
    let w = S3World::new("kill", "s3", 0.002, 3, 8).await;
    let (landing, lake, table) = (w.landing.clone(), w.lake.clone(), w.table.clone());
    // An uninterrupted lake fed the same batches: the reference, and the measure of how
    // long each layer's run takes (the window kills are drawn from).
    let reference = lake.replace("/lake", "/ref");
    let (_, reference_table) = dynamodb_state("kill-ref").await;

    const KILLS_PER_LAYER: usize = 4;
    let mut kills = 0;
    for batch in ["batch-0001", "batch-0002", "batch-0003"] {
        land_batch_s3(&w.generated, batch, &landing).await;
        for layer in ["bronze", "silver", "gold"] {
            let started = Instant::now();
            let uninterrupted = run_bin(&strs(&run_args(
                &landing,
                &reference,
                &reference_table,
                layer,
            )));
            assert_eq!(
                uninterrupted.status.code(),
                Some(0),
                "{}",
                stderr(&uninterrupted)
            );
            let mut window = started.elapsed().as_secs_f64();

            let mut args = run_args(&landing, &lake, &table, layer);
            // A killed run's lease frees after 2 s; the next run waits for it.
            args.extend(["--lease-ttl", "2s", "--lease-wait", "60s"].map(String::from));
            let mut hits = 0;
            for _ in 0..KILLS_PER_LAYER * 4 {
                if hits == KILLS_PER_LAYER {
                    break;
                }
                let mut child = medallion_cmd(&strs(&args))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn");
                let delay = Duration::from_secs_f64(0.05 + rng.next_f64() * window);
                tokio::time::sleep(delay).await;
                if child.try_wait().expect("poll").is_none() {
                    // SIGKILL: no destructor, no flush, no lease release.
                    child.kill().expect("kill");
                    child.wait().expect("reap");
                    hits += 1;
                    println!(
                        "{batch} {layer}: killed after {delay:?} (uninterrupted: {window:.1} s)"
                    );
                    // Whatever the kill left behind, every table must still open.
                    let _ = open_every_table(&lake).await;
                } else {
                    // The run finished first (the work may be done, leaving short no-op
                    // runs): aim earlier.
                    window /= 2.0;
                }
            }
            kills += hits;
            let done = run_bin(&strs(&args));
            assert_eq!(
                done.status.code(),
                Some(0),
                "{batch} {layer}: {}",
                stderr(&done)
            );
        }
        assert_eq!(
            lake_counts(&lake).await,
            lake_counts(&reference).await,
            "after {batch}"
        );
    }
    println!("kill points: {kills}");
    assert_eq!(
        gold_snapshot_at(&lake).await,
        gold_snapshot_at(&reference).await
    );
    assert!(kills >= 30, "only {kills} kills hit a running process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn s3_faults_are_retried_and_a_run_that_cannot_finish_changes_nothing() {
    require_services();
    let plan = FaultPlan::default();
    install_faulty_s3a(&plan);
    let w = S3World::new("faults", "s3a", 0.001, 1, 6).await;
    let (landing, lake, state) = (w.landing.clone(), w.lake.clone(), Arc::clone(&w.state));
    w.land("batch-0001").await;
    w.run_local().await;

    // Transient faults on every kind of request: each is retried and the run succeeds.
    plan.add(FaultRule::new(Fault::Status(503)).every(4));
    plan.add(FaultRule::new(Fault::Status(500)).method("PUT").every(5));
    plan.add(FaultRule::new(Fault::CutBeforeSend).method("PUT").every(7));
    plan.add(FaultRule::new(Fault::CutAfterSend).method("GET").every(9));
    plan.add(FaultRule::new(Fault::Delay(Duration::from_millis(100))).every(11));
    let (summary, result) = run_commerce_at(&landing, &lake, Arc::clone(&state), &Layer::ALL).await;
    assert!(result.is_ok(), "{result:?}\n{}", summary.to_json_line());
    let injected = plan.injected();
    println!("faults injected and retried: {injected}");
    assert!(injected >= 20, "only {injected} faults were injected");
    assert_eq!(
        gold_snapshot_at(&lake).await,
        gold_snapshot(&w.local.lake()).await
    );

    // A new batch, and S3 refuses every commit to a Delta log for good: the run fails, and
    // every table stays at the version it had.
    plan.clear();
    let more = w.local.dir.path().join("more");
    generate_landing(&more, 0.001, 2, 6);
    land_batch_s3(&more, "batch-0002", &landing).await;
    let versions_before = lake_versions(&lake).await;
    plan.add(
        FaultRule::new(Fault::Status(503))
            .method("PUT")
            .path_contains("_delta_log/0"),
    );
    let (summary, failed) = run_commerce_at(&landing, &lake, Arc::clone(&state), &Layer::ALL).await;
    assert!(failed.is_err(), "{}", summary.to_json_line());
    assert_eq!(lake_versions(&lake).await, versions_before);
    // The store recovers; the rerun ingests the batch once.
    plan.clear();
    let (summary, result) = run_commerce_at(&landing, &lake, Arc::clone(&state), &Layer::ALL).await;
    assert!(result.is_ok(), "{result:?}\n{}", summary.to_json_line());
    land_batch(&more, &w.local.landing(), "batch-0002");
    w.run_local().await;
    assert_eq!(lake_counts(&lake).await, lake_counts(&w.local_lake()).await);
}

/// Version of every commerce table at `lake` (`None`: not created).
async fn lake_versions(lake: &str) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    for (layer, tables) in [
        (
            "bronze",
            &["orders", "customers", "products", "events", "fx_rates"][..],
        ),
        (
            "silver",
            &[
                "orders",
                "customers",
                "products",
                "events",
                "fx_rates",
                "orders_quarantine",
            ][..],
        ),
        (
            "gold",
            &["daily_sales", "customer_360", "daily_engagement"][..],
        ),
    ] {
        for t in tables {
            let url = medallion_engine::location::parse_location(&format!("{lake}/{layer}/{t}"))
                .expect("url");
            let version = medallion_engine::table::open_table(&url)
                .await
                .expect("open")
                .and_then(|t| t.version());
            out.push((format!("{layer}.{t}"), version));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn an_unusable_store_is_named_before_any_write() {
    require_services();
    let w = S3World::new("errors", "s3", 0.001, 1, 2).await;
    let (landing, lake, table) = (w.landing.clone(), w.lake.clone(), w.table.clone());
    w.land("batch-0001").await;
    let nothing_written = || async {
        let url = medallion_engine::location::parse_location(&lake).expect("url");
        let (store, path) = medallion_engine::location::object_store_for(&url).expect("store");
        use futures::TryStreamExt as _;
        let objects: Vec<_> = store.list(Some(&path)).try_collect().await.expect("list");
        assert!(
            objects.is_empty(),
            "a refused run wrote {} objects",
            objects.len()
        );
    };

    /// What is wrong, the run's arguments and environment, the exit code and message expected.
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>, i32, &'a str);
    let cases: [Case; 5] = [
        (
            "missing bucket",
            run_args("s3://no-such-bucket/landing", &lake, &table, ""),
            vec![],
            2,
            "bucket 'no-such-bucket' does not exist",
        ),
        (
            "wrong credentials",
            run_args(&landing, &lake, &table, ""),
            vec![("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
            2,
            "refused the credentials",
        ),
        (
            "unreachable S3 endpoint",
            run_args(&landing, &lake, &table, ""),
            vec![("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")],
            1,
            "cannot reach http://127.0.0.1:9",
        ),
        (
            "missing DynamoDB table",
            run_args(&landing, &lake, "no-such-state-table", ""),
            vec![],
            2,
            "table 'no-such-state-table' does not exist",
        ),
        (
            "unreachable DynamoDB endpoint",
            run_args(&landing, &lake, &table, ""),
            vec![("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")],
            1,
            "cannot reach http://127.0.0.1:9",
        ),
    ];
    for (what, args, env, code, message) in cases {
        let mut cmd = medallion_cmd(&strs(&args));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let out = cmd.output().expect("runs");
        assert_eq!(out.status.code(), Some(code), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{what}: {}", stderr(&out));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} took {:?}",
            started.elapsed()
        );
        nothing_written().await;
    }
    let init = run_bin(&["init", "--state", "dynamodb://x"]);
    assert_eq!(init.status.code(), Some(2), "{}", stderr(&init));
    assert!(stderr(&init).contains("not a DynamoDB table name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the S3 server and DynamoDB Local of scripts/services.sh (scripts/test.sh starts them)"]
async fn init_creates_the_state_table_once() {
    require_services();
    let table = format!("init-{}", std::process::id());
    for _ in 0..2 {
        let out = run_bin(&["init", "--state", &format!("dynamodb://{table}")]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let store = DynamoDbStateStore::new(table).await;
    store.check().await.expect("the table exists");
}
