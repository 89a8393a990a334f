//! Bad input never stops the pipeline nor loses a row; a file that cannot be read fails the
//! run with its path and leaves every table as it was.

use std::os::unix::fs::PermissionsExt as _;

use medallion_tests::{
    Scratch, commerce_dir, copy_tree, count, fixture, gold_snapshot, local_run_args, medallion,
    medallion_ok, summary_of, versions,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_fails_the_run_and_changes_no_table() {
    let s = Scratch::new();
    copy_tree(&fixture("handmade"), s.dir.path());
    let args = local_run_args(&commerce_dir(), &s.landing(), &s.lake());

    assert_eq!(medallion_ok(&args)["status"], "succeeded");
    let before = versions(&s.lake()).await;
    let gold_before = gold_snapshot(&s.lake()).await;

    // A second batch: a readable orders file, and a customers file nobody may read.
    s.land_orders_again();
    let locked_dir = s.landing().join("customers/batch-0002");
    std::fs::create_dir_all(&locked_dir).unwrap();
    let locked = locked_dir.join("part-00000.csv");
    std::fs::write(
        &locked,
        "customer_id,name,email,country,segment,created_at,updated_at\r\nC7,G,g@x.com,US,smb,,\r\n",
    )
    .unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();

    let failed = medallion(&args);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "stderr: {stderr}");
    let summary = summary_of(&failed);
    assert_eq!(summary["status"], "failed");
    assert!(
        summary["error"]
            .as_str()
            .unwrap_or_default()
            .contains("customers/batch-0002/part-00000.csv"),
        "{summary}"
    );
    assert!(
        stderr.contains("customers/batch-0002/part-00000.csv"),
        "{stderr}"
    );
    assert_eq!(
        versions(&s.lake()).await,
        before,
        "a failed run changed a table"
    );
    assert_eq!(gold_snapshot(&s.lake()).await, gold_before);

    // Once readable, the rerun ingests both new files, once.
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bronze_orders = count(&s.lake(), "bronze", "orders").await;
    medallion_ok(&args);
    assert_eq!(
        count(&s.lake(), "bronze", "orders").await,
        bronze_orders * 2
    );
    assert_eq!(count(&s.lake(), "bronze", "customers").await, 11);
    let again = medallion(&args);
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(
        count(&s.lake(), "bronze", "orders").await,
        bronze_orders * 2,
        "a rerun ingested a file twice"
    );
}
