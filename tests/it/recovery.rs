//! Invariant 3 without killing a process: the state store is put back to what a run that
//! died at a given point leaves behind, and the rerun must neither double nor lose rows.
//! (Kill tests against S3 come with the S3 milestone.)

use std::path::Path;

use medallion_tests::{Scratch, copy_tree, count, fixture, gold_snapshot, run_all_ok, versions};

fn state_file(lake: &Path, layer: &str, table: &str) -> std::path::PathBuf {
    lake.join("_medallion_state/commerce")
        .join(layer)
        .join(format!("{table}.json"))
}

/// Rewrites the state document of a table, as an earlier run would have left it.
fn rewrite_state(lake: &Path, layer: &str, table: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = state_file(lake, layer, table);
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut doc["value"]);
    std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_died_between_commit_and_state_write_is_not_redone() {
    let s = Scratch::new();
    copy_tree(&fixture("handmade"), s.dir.path());
    run_all_ok(&s.landing(), &s.lake()).await;
    let before = versions(&s.lake()).await;
    let gold = gold_snapshot(&s.lake()).await;
    let bronze_orders = count(&s.lake(), "bronze", "orders").await;

    // Bronze: the commit of seq 1 landed, the state still says nothing was ingested.
    rewrite_state(&s.lake(), "bronze", "orders", |v| {
        let files = v["ingested"].clone();
        v["ingested"] = serde_json::json!([]);
        v["seq"] = serde_json::json!(0);
        v["pending"] = serde_json::json!({"seq": 1, "files": files});
    });
    // Silver: the MERGE and the quarantine append of seq 1 landed, the watermark did not move.
    rewrite_state(&s.lake(), "silver", "orders", |v| {
        let upper = v["watermark"].clone();
        v["watermark"] = serde_json::Value::Null;
        v["seq"] = serde_json::json!(0);
        v["pending"] = serde_json::json!({"seq": 1, "upper": upper});
    });

    let summary = run_all_ok(&s.landing(), &s.lake()).await;
    assert_eq!(
        versions(&s.lake()).await,
        before,
        "the rerun wrote again what was committed"
    );
    assert_eq!(count(&s.lake(), "bronze", "orders").await, bronze_orders);
    assert_eq!(gold_snapshot(&s.lake()).await, gold);
    let silver = summary
        .tables
        .iter()
        .find(|t| t.layer == "silver" && t.table == "orders")
        .unwrap();
    assert_eq!(
        silver.skipped.as_deref(),
        Some("already committed by an interrupted run"),
        "{silver:?}"
    );

    // The bookkeeping is finished: a further run has nothing pending and nothing to do.
    let again = run_all_ok(&s.landing(), &s.lake()).await;
    assert!(again.tables.iter().all(|t| t.rows_written == 0));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(state_file(&s.lake(), "bronze", "orders")).unwrap(),
    )
    .unwrap();
    assert!(
        state["value"]["pending"].is_null() && state["value"]["seq"] == 1,
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_died_before_its_commit_is_redone_once() {
    let s = Scratch::new();
    copy_tree(&fixture("handmade"), s.dir.path());
    run_all_ok(&s.landing(), &s.lake()).await;
    let bronze_orders = count(&s.lake(), "bronze", "orders").await;

    // A second orders file lands; a run records its intent and dies before committing.
    let new_orders = s.land_orders_again();
    let new_file = format!("file://{}", new_orders.display());
    rewrite_state(&s.lake(), "bronze", "orders", |v| {
        v["pending"] = serde_json::json!({"seq": 2, "files": [new_file]});
    });

    run_all_ok(&s.landing(), &s.lake()).await;
    assert_eq!(
        count(&s.lake(), "bronze", "orders").await,
        bronze_orders * 2,
        "the file was lost or doubled"
    );
    run_all_ok(&s.landing(), &s.lake()).await;
    assert_eq!(
        count(&s.lake(), "bronze", "orders").await,
        bronze_orders * 2,
        "a rerun ingested the file again"
    );
    // Same orders re-sent: silver keeps one row per key.
    assert_eq!(count(&s.lake(), "silver", "orders").await, 10);
}
