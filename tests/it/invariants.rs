//! Invariants 1, 2 and 4 of the reference pipeline on generated data.

use medallion_jobs::generate::{GenerateOptions, generate};
use medallion_tests::{
    RunLayer, Scratch, commerce_dir, copy_tree, files_in, gold_snapshot, lake_session, land_batch,
    land_first_lines, local_run_args, medallion, medallion_ok, replace_in_file, run_all_ok,
    run_commerce, scalar, summary_of, versions,
};

fn generated(batches: u32) -> Scratch {
    let s = Scratch::new();
    generate(&GenerateOptions {
        scale: 0.002,
        batches,
        seed: 7,
        out: s.landing(),
    })
    .expect("generate");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_equals_full_and_reruns_change_nothing() {
    let source = generated(3);

    // One run over all three batches.
    let full = Scratch::new();
    copy_tree(&source.landing(), &full.landing());
    run_all_ok(&full.landing(), &full.lake()).await;
    let full_gold = gold_snapshot(&full.lake()).await;
    for (table, rows) in &full_gold {
        assert!(rows.len() > 3, "gold.{table} has {} rows", rows.len());
    }

    // The same batches landed one at a time, with a run after each (invariant 1).
    let inc = Scratch::new();
    for batch in ["batch-0001", "batch-0002", "batch-0003"] {
        land_batch(&source.landing(), &inc.landing(), batch);
        run_all_ok(&inc.landing(), &inc.lake()).await;
    }
    let inc_gold = gold_snapshot(&inc.lake()).await;
    for table in full_gold.keys() {
        assert_eq!(
            inc_gold[table], full_gold[table],
            "gold.{table}: incremental differs from full"
        );
    }

    // A rerun of every layer changes no table and ingests nothing (invariant 2).
    let before = versions(&inc.lake()).await;
    let summary = run_all_ok(&inc.landing(), &inc.lake()).await;
    assert_eq!(
        versions(&inc.lake()).await,
        before,
        "a rerun made new table versions"
    );
    assert_eq!(gold_snapshot(&inc.lake()).await, inc_gold);
    for t in &summary.tables {
        assert_eq!(
            (t.rows_written, t.rows_updated),
            (0, 0),
            "{}.{} wrote on a rerun",
            t.layer,
            t.table
        );
        assert!(
            t.skipped.is_some(),
            "{}.{} was not skipped on a rerun",
            t.layer,
            t.table
        );
    }
    // Each layer on its own, too.
    for layer in RunLayer::ALL {
        let (_, result) = run_commerce(&inc.landing(), &inc.lake(), &[layer]).await;
        result.expect("rerun of one layer");
    }
    assert_eq!(
        versions(&inc.lake()).await,
        before,
        "a single-layer rerun made new table versions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_micro_batch_rebuilds_only_the_gold_models_dates_and_customers_it_touches() {
    let source = generated(10);
    let lake = Scratch::new();
    for b in 1..=9 {
        land_batch(&source.landing(), &lake.landing(), &format!("batch-{b:04}"));
    }
    run_all_ok(&lake.landing(), &lake.lake()).await;
    // A Kafka micro-batch: a dozen of batch 10's events (some of them late), no orders,
    // customers, products or rates.
    land_first_lines(
        &source.landing(),
        &lake.landing(),
        "events",
        "batch-0010",
        12,
    );
    let summary = run_all_ok(&lake.landing(), &lake.lake()).await;

    let gold = |table: &str| gold_table(&summary, table);
    // daily_sales reads orders (through the orders_priced view), fx_rates, customers and
    // products: none of them changed.
    let sales = gold("daily_sales");
    assert_eq!(sales.rows_written, 0, "daily_sales was rebuilt");
    let why = sales.skipped.as_deref().unwrap_or_default();
    for input in [
        "silver.orders",
        "silver.fx_rates",
        "silver.customers",
        "silver.products",
    ] {
        assert!(why.contains(input), "daily_sales skipped for: {why}");
    }
    assert!(
        !why.contains("silver.events"),
        "daily_sales skipped for: {why}"
    );
    for table in ["customer_360", "daily_engagement"] {
        let t = gold(table);
        assert!(
            t.skipped.is_none() && t.rows_written > 0,
            "gold.{table} read new events but was not rebuilt: {:?}",
            t.skipped
        );
    }
    // daily_engagement (rebuild_by event_date from silver.events) rebuilt the dates of the
    // batch's events alone; customer_360 (incremental) updated the customers of its events
    // alone: some, not all, and it still holds one row per customer.
    let rebuilt = gold("daily_engagement").partitions_rebuilt;
    assert!(
        rebuilt.is_some_and(|n| (1..=12).contains(&n)),
        "daily_engagement rebuilt {rebuilt:?} date partitions"
    );
    let c360 = gold("customer_360");
    assert_eq!((c360.partitions_rebuilt, c360.keys_rebuilt), (None, None));
    let keys = c360.keys_updated.expect("customer_360 was rebuilt");
    assert!(
        (1..=12).contains(&keys),
        "customer_360 updated {keys} of {} customers",
        c360.rows_written
    );
    assert_gold_equals_a_fresh_build(&lake).await;

    // A few changed customers alone: every model reading silver.customers is rebuilt, and
    // customer_360 only for the customers whose silver row changed (a MERGE rewrote the
    // file that holds them all).
    land_first_lines(
        &source.landing(),
        &lake.landing(),
        "customers",
        "batch-0010",
        6,
    );
    let summary = run_all_ok(&lake.landing(), &lake.lake()).await;
    let c360 = gold_table(&summary, "customer_360");
    let keys = c360.keys_updated.expect("customer_360 was rebuilt");
    assert!(
        (1..=6).contains(&keys),
        "customer_360 updated {keys} customers"
    );
    // Their events may move to other groups, on every date they fall on, so `rebuild_by`
    // cannot scope daily_engagement's rebuild: `incremental` updated those groups.
    let engagement = gold_table(&summary, "daily_engagement");
    assert!(
        engagement.keys_updated.is_some() && engagement.partitions_rebuilt.is_none(),
        "daily_engagement was rebuilt: {engagement:?}"
    );
    assert_gold_equals_a_fresh_build(&lake).await;

    // One FX hour sent again, later and with another EUR rate (customer_360 reads the rates
    // whole): only the customers with an order, in a currency that hour rates, at or after
    // it, have their order figures computed again.
    let hour = resend_an_fx_hour(&source, &lake);
    let summary = run_all_ok(&lake.landing(), &lake.lake()).await;
    let ctx = lake_session(&lake.lake()).await;
    let repriced = repriced_customers(&lake, &hour).await;
    let customers = scalar(&ctx, "SELECT count(*) FROM silver.customers").await;
    assert!(
        repriced > 0 && repriced * 2 <= customers,
        "{repriced} of {customers} customers have orders the rates of {hour} price"
    );
    let c360 = gold_table(&summary, "customer_360");
    assert_eq!(
        c360.keys_updated,
        Some(u64::try_from(repriced).unwrap()),
        "customer_360 updated other customers than the {repriced} repriced"
    );
    assert_gold_equals_a_fresh_build(&lake).await;

    // The rest of batch 10, a tenth of the data: late events, new customers and re-sent
    // ones (some moving to another country or segment), whose events span every date.
    // (Under a folder of its own: the files landed above are not written again.)
    for entity in files_in(&source.landing()) {
        let batch = entity.join("batch-0010");
        if batch.is_dir() {
            let to = lake.landing().join(entity.file_name().expect("entity"));
            std::fs::create_dir_all(to.join("batch-0011")).expect("mkdir");
            copy_tree(&batch, &to.join("batch-0011"));
        }
    }
    let summary = run_all_ok(&lake.landing(), &lake.lake()).await;
    for table in ["daily_engagement", "customer_360"] {
        let t = gold_table(&summary, table);
        assert!(
            t.keys_updated.is_some_and(|n| n > 12),
            "gold.{table} was not updated from the batch's changes: {t:?}"
        );
    }
    assert_gold_equals_a_fresh_build(&lake).await;
}

/// Lands one FX hour of batch 9 again in batch 10, half an hour later and with another EUR
/// rate, and returns that hour (`2026-03-21 05:00:00`).
fn resend_an_fx_hour(source: &Scratch, lake: &Scratch) -> String {
    let hours = files_in(&source.landing().join("fx_rates").join("batch-0009"));
    let hour_file = &hours[hours.len() - 24];
    let name = hour_file.file_name().expect("file name").to_string_lossy();
    let resent = std::fs::read_to_string(hour_file)
        .expect("read")
        .replacen(":00:00Z\"", ":30:00Z\"", 1)
        .replacen("\"EUR\": ", "\"EUR\": 1", 1);
    let to = lake.landing().join("fx_rates").join("batch-0010");
    std::fs::create_dir_all(&to).expect("mkdir");
    std::fs::write(to.join(&*name), resent).expect("write");
    // fx-2026-03-21T05.json is the rates of 2026-03-21 05:00 UTC.
    name[3..16].replacen('T', " ", 1) + ":00:00"
}

/// The customers with an order, in a currency the rates of `hour` list, at or after it.
async fn repriced_customers(lake: &Scratch, hour: &str) -> i64 {
    scalar(
        &lake_session(&lake.lake()).await,
        &format!(
            "SELECT count(DISTINCT o.customer_id) FROM silver.orders o \
             JOIN silver.fx_rates r ON r.currency = o.currency AND r.rate_hour = TIMESTAMP '{hour}' \
             WHERE o.order_ts >= r.rate_hour"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_incremental_a_keyed_rebuild_takes_a_changed_rate_through_its_query() {
    let source = generated(10);
    let pipeline_dir = Scratch::new();
    copy_tree(&commerce_dir(), pipeline_dir.dir.path());
    let pipeline = pipeline_dir.dir.path().join("pipeline.toml");
    replace_in_file(
        &pipeline,
        "incremental = { key = [\"customer_id\"], steps = [\"gold/events_of_changes.sql\"], sql = \"gold/customer_360_incremental.sql\" }",
        "",
    );
    let lake = Scratch::new();
    for b in 1..=9 {
        land_batch(&source.landing(), &lake.landing(), &format!("batch-{b:04}"));
    }
    let run = || medallion_ok(&local_run_args(&pipeline, &lake.landing(), &lake.lake()));
    run();
    // customer_360 reads the rates whole: its `through` query names the customers a changed
    // hour can reprice, and only they are rebuilt.
    let hour = resend_an_fx_hour(&source, &lake);
    let summary = run();
    let repriced = repriced_customers(&lake, &hour).await;
    let c360 = summary["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["layer"] == "gold" && t["table"] == "customer_360")
        .cloned()
        .expect("customer_360 in the summary");
    assert!(
        repriced > 0,
        "no customer has an order the rates of {hour} price"
    );
    assert_eq!(
        (c360["keys_rebuilt"].as_i64(), c360["keys_updated"].as_i64()),
        (Some(repriced), None),
        "{c360}"
    );
    assert_gold_equals_a_fresh_build(&lake).await;
}

/// The summary of gold table `table` in a run's `summary`.
fn gold_table<'a>(
    summary: &'a medallion_jobs::summary::RunSummary,
    table: &str,
) -> &'a medallion_jobs::summary::TableSummary {
    summary
        .tables
        .iter()
        .find(|t| t.layer == "gold" && t.table == table)
        .unwrap_or_else(|| panic!("gold.{table} is not in the summary"))
}

/// What was kept in `lake` equals a build from scratch over the same landing.
async fn assert_gold_equals_a_fresh_build(lake: &Scratch) {
    let fresh = Scratch::new();
    copy_tree(&lake.landing(), &fresh.landing());
    run_all_ok(&fresh.landing(), &fresh.lake()).await;
    assert_eq!(
        gold_snapshot(&lake.lake()).await,
        gold_snapshot(&fresh.lake()).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_row_is_lost_between_bronze_and_silver() {
    let s = generated(2);
    run_all_ok(&s.landing(), &s.lake()).await;
    let ctx = lake_session(&s.lake()).await;
    // (entity, the key as computed from bronze columns)
    let entities = [
        ("orders", "order_id"),
        ("customers", "customer_id"),
        ("products", "product_id"),
        ("events", "json_as_text(value, 'event_id')"),
        ("fx_rates", "currency"),
    ];
    for (entity, key) in entities {
        let bronze = scalar(&ctx, &format!("SELECT count(*) FROM bronze.{entity}")).await;
        let quarantined = scalar(
            &ctx,
            &format!("SELECT count(*) FROM silver.{entity}_quarantine"),
        )
        .await;
        let valid = scalar(
            &ctx,
            &format!(
                "SELECT count(*) FROM bronze.{entity} b WHERE NOT EXISTS (SELECT 1 FROM silver.{entity}_quarantine q WHERE q._source_file = b._source_file AND q._source_line = b._source_line)"
            ),
        )
        .await;
        if matches!(entity, "orders" | "events") {
            assert!(
                quarantined > 0,
                "{entity}: the generator plants dirt, yet nothing was quarantined"
            );
        }
        assert_eq!(
            bronze,
            valid + quarantined,
            "{entity}: bronze = valid + quarantined"
        );
        // Every valid row's key reached silver.
        if entity != "fx_rates" {
            let silver_key = if entity == "events" { "event_id" } else { key };
            let missing = scalar(
                &ctx,
                &format!(
                    "SELECT count(*) FROM bronze.{entity} b WHERE NOT EXISTS (SELECT 1 FROM silver.{entity}_quarantine q WHERE q._source_file = b._source_file AND q._source_line = b._source_line) AND NOT EXISTS (SELECT 1 FROM silver.{entity} s WHERE s.{silver_key} = {key})"
                ),
            )
            .await;
            assert_eq!(
                missing, 0,
                "{entity}: valid rows whose key is missing from silver"
            );
        }
    }
    // Dedup really happened: the generator re-sends orders and re-delivers events.
    assert!(
        scalar(&ctx, "SELECT count(*) FROM bronze.orders").await
            > scalar(&ctx, "SELECT count(*) FROM silver.orders").await
                + scalar(&ctx, "SELECT count(*) FROM silver.orders_quarantine").await
    );
    assert_eq!(
        scalar(
            &ctx,
            "SELECT count(*) - count(DISTINCT order_id) FROM silver.orders"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_sql_changed_is_rebuilt_though_its_inputs_did_not() {
    let source = generated(1);
    let pipeline_dir = Scratch::new();
    copy_tree(&commerce_dir(), pipeline_dir.dir.path());
    let run = |lake: &Scratch| {
        let pipeline = pipeline_dir.dir.path().join("pipeline.toml");
        medallion_ok(&local_run_args(&pipeline, &source.landing(), &lake.lake()))
    };
    let lake = Scratch::new();
    run(&lake);
    let sql = pipeline_dir.dir.path().join("gold").join("daily_sales.sql");
    replace_in_file(
        &sql,
        "WHERE o.status IN ('PLACED', 'SHIPPED')",
        "WHERE o.status IN ('SHIPPED')",
    );
    // A new `through` query rebuilds its model whole: the old one may have missed keys.
    replace_in_file(
        &pipeline_dir
            .dir
            .path()
            .join("gold")
            .join("customer_360_repriced.sql"),
        "SELECT DISTINCT",
        "-- edited\nSELECT DISTINCT",
    );

    // No input changed: only the models whose SQL did are rebuilt, by the new SQL.
    let summary = run(&lake);
    let gold = |table: &str| {
        summary["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["layer"] == "gold" && t["table"] == table)
            .cloned()
            .unwrap_or_else(|| panic!("gold.{table} is not in {summary}"))
    };
    for table in ["daily_sales", "customer_360"] {
        assert!(gold(table)["skipped"].is_null(), "{summary}");
        assert!(gold(table)["rows_written"].as_u64() > Some(0));
        assert!(gold(table)["keys_rebuilt"].is_null(), "{summary}");
        assert!(gold(table)["keys_updated"].is_null(), "{summary}");
    }
    assert!(gold("daily_engagement")["skipped"].is_string(), "{summary}");
    let fresh = Scratch::new();
    run(&fresh);
    assert_eq!(
        gold_snapshot(&lake.lake()).await,
        gold_snapshot(&fresh.lake()).await
    );

    // A new column and a new partitioning: the rebuild takes both, as Spark's overwrite
    // with overwriteSchema would.
    replace_in_file(
        &sql,
        "count(*) AS orders,",
        "count(*) AS orders, max(o.quantity) AS max_quantity,",
    );
    let declared = "sql = \"gold/daily_sales.sql\"\n";
    replace_in_file(
        &pipeline_dir.dir.path().join("pipeline.toml"),
        declared,
        &format!("{declared}partition_by = [\"order_date\"]\n"),
    );
    run(&lake);
    let ctx = lake_session(&lake.lake()).await;
    assert!(
        scalar(
            &ctx,
            "SELECT CAST(max(max_quantity) AS BIGINT) FROM gold.daily_sales"
        )
        .await
            > 0
    );
    let partitions = std::fs::read_dir(lake.lake().join("gold").join("daily_sales"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("order_date="))
        .count();
    assert!(
        partitions > 1,
        "gold.daily_sales has {partitions} date partitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_built_a_slice_of_partitions_at_a_time_equals_one_built_at_once() {
    let source = generated(3);
    let lake = Scratch::new();
    for b in 1..=2 {
        land_batch(&source.landing(), &lake.landing(), &format!("batch-{b:04}"));
    }
    let run = |slice_rows: &str| {
        let mut args = local_run_args(
            std::path::Path::new("commerce"),
            &lake.landing(),
            &lake.lake(),
        );
        args.extend(["--slice-rows", slice_rows].map(String::from));
        let summary = medallion_ok(&args);
        summary["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["layer"] == "gold" && t["table"] == "daily_engagement")
            .cloned()
            .unwrap_or_else(|| panic!("gold.daily_engagement is not in {summary}"))
    };
    // daily_engagement is rebuilt by event_date from silver.events: its first build reads
    // the 4,000 events of two batches, in slices of dates that hold at most 500 of them.
    let engagement = run("500");
    let slices = engagement["partition_slices"].as_u64().unwrap_or(1);
    assert!(slices >= 4, "built in {slices} slices: {engagement}");
    assert_gold_equals_a_fresh_build(&lake).await;

    // A micro-batch of events: the dates it touched, a date per slice.
    land_first_lines(
        &source.landing(),
        &lake.landing(),
        "events",
        "batch-0003",
        12,
    );
    let engagement = run("1");
    let rebuilt = engagement["partitions_rebuilt"].as_u64();
    assert!(
        rebuilt.is_some_and(|n| (2..=12).contains(&n)),
        "rebuilt {rebuilt:?} dates: {engagement}"
    );
    assert_eq!(engagement["partition_slices"].as_u64(), rebuilt);
    assert_gold_equals_a_fresh_build(&lake).await;
}

/// Under a memory limit silver holds and reduces the events instead of streaming them
/// (`keep = "any"`: no order columns), on the first load and on a later one (a MERGE that
/// keeps the table's row of a re-delivered event), and gold equals that of runs without a
/// limit. Bronze and silver run under the limit, gold after them without one. (The spilled
/// path with no order columns is `dedup`'s own test: at this scale a limit small enough to
/// make the events spill starves silver orders' MERGE join, which cannot spill.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_under_a_memory_limit_gives_the_same_gold_on_first_and_later_loads() {
    let source = generated(2);
    let run = |landing: &std::path::Path, lake: &std::path::Path, limit: Option<&str>| {
        let mut args = local_run_args(&commerce_dir(), landing, lake);
        if let Some(limit) = limit {
            args.extend(
                [
                    "--memory-limit",
                    limit,
                    "--layer",
                    "bronze",
                    "--layer",
                    "silver",
                ]
                .map(String::from),
            );
        }
        medallion_ok(&args)
    };
    let (limited, unlimited) = (Scratch::new(), Scratch::new());
    for (n, batch) in ["batch-0001", "batch-0002"].into_iter().enumerate() {
        for lake in [&limited, &unlimited] {
            land_batch(&source.landing(), &lake.landing(), batch);
        }
        let summary = run(&limited.landing(), &limited.lake(), Some("64MiB"));
        assert_eq!(summary["status"], "succeeded", "{summary}");
        for lake in [&limited, &unlimited] {
            run(&lake.landing(), &lake.lake(), None);
        }
        assert_eq!(
            gold_snapshot(&limited.lake()).await,
            gold_snapshot(&unlimited.lake()).await,
            "load {}: gold under a memory limit differs",
            n + 1
        );
    }
}

/// A limit too small for an operator that cannot spill stops the run with exit code 6 (the
/// same run would fail again; a larger limit is the remedy), names the pool's largest
/// holders, and commits nothing of the table it was building; a rerun with room builds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_too_small_for_a_join_or_sort_stops_with_exit_code_6_and_writes_nothing() {
    let source = generated(1);
    let lake = Scratch::new();
    land_batch(&source.landing(), &lake.landing(), "batch-0001");
    let mut args = local_run_args(&commerce_dir(), &lake.landing(), &lake.lake());
    let starved = medallion(&[args.as_slice(), &["--memory-limit".into(), "1MiB".into()]].concat());
    let stderr = String::from_utf8_lossy(&starved.stderr);
    assert_eq!(starved.status.code(), Some(6), "stderr: {stderr}");
    assert!(stderr.contains("top memory consumers"), "stderr: {stderr}");
    assert!(
        stderr.contains("--memory-limit (1.0 MiB)"),
        "stderr: {stderr}"
    );
    let summary = summary_of(&starved);
    assert_eq!(summary["status"], "failed", "{summary}");
    assert_eq!(summary["exit_code"], 6, "{summary}");
    // The error names the table ("gold daily_sales: ..."): it has no commit.
    let error = summary["error"].as_str().unwrap_or_default();
    let mut words = error.split([' ', ':']);
    let (layer, table) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    assert!(["bronze", "silver", "gold"].contains(&layer), "{error}");
    let log = lake.lake().join(layer).join(table).join("_delta_log");
    assert!(
        !log.join(format!("{:020}.json", 0)).exists(),
        "{layer}.{table} was committed: {error}"
    );

    args.extend(["--memory-limit", "256MiB"].map(String::from));
    let summary = medallion_ok(&args);
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert!(
        log.join(format!("{:020}.json", 0)).exists(),
        "{layer}.{table}"
    );
}
