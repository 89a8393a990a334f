//! Which columns of a table's data files carry min/max statistics: bronze only its ingest
//! metadata that is not text, a silver or gold table with `stats_columns` only those (and
//! its key), any other table every column. The Parquet footers and the Delta log must agree.
//! Also which data page version each layer writes.

use std::collections::BTreeSet;
use std::path::Path;

use datafusion::parquet::column::page::Page;
use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use medallion_tests::{Scratch, run_all_ok};

/// The Parquet data files of a table (in its partition folders too); at least one.
fn parquet_files(table: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![table.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("read table folder")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("_delta_log") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "{} has no data files", table.display());
    files
}

fn open_parquet(path: &Path) -> SerializedFileReader<std::fs::File> {
    SerializedFileReader::new(std::fs::File::open(path).expect("open")).expect("a Parquet file")
}

/// The columns with min/max statistics in some row group of some data file of the table, and
/// those without them in at least one.
fn parquet_statistics(table: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut with, mut without) = (BTreeSet::new(), BTreeSet::new());
    for path in parquet_files(table) {
        for group in open_parquet(&path).metadata().row_groups() {
            for column in group.columns() {
                let name = column.column_path().string();
                if column
                    .statistics()
                    .is_some_and(|s| s.min_bytes_opt().is_some())
                {
                    with.insert(name);
                } else {
                    without.insert(name);
                }
            }
        }
    }
    (with, without)
}

/// The kinds of data page ("v1", "v2") in the table's data files.
fn data_page_versions(table: &Path) -> BTreeSet<String> {
    let mut versions = BTreeSet::new();
    for path in parquet_files(table) {
        let reader = open_parquet(&path);
        for g in 0..reader.num_row_groups() {
            let group = reader.get_row_group(g).expect("row group");
            for c in 0..group.num_columns() {
                let pages = group.get_column_page_reader(c).expect("page reader");
                for page in pages {
                    match page.expect("a page") {
                        Page::DataPage { .. } => versions.insert("v1".to_string()),
                        Page::DataPageV2 { .. } => versions.insert("v2".to_string()),
                        Page::DictionaryPage { .. } => false,
                    };
                }
            }
        }
    }
    versions
}

/// The columns with a minimum in the Delta log's statistics of the table's data files, and
/// the table's `delta.dataSkippingStatsColumns`.
fn log_statistics(table: &Path) -> (BTreeSet<String>, Option<String>) {
    let mut columns = BTreeSet::new();
    let mut property = None;
    for entry in std::fs::read_dir(table.join("_delta_log"))
        .expect("log")
        .flatten()
    {
        if entry.path().extension().is_none_or(|e| e != "json") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path())
            .expect("read log")
            .lines()
        {
            let action: serde_json::Value = serde_json::from_str(line).expect("a log action");
            if let Some(stats) = action["add"]["stats"].as_str() {
                let stats: serde_json::Value = serde_json::from_str(stats).expect("stats");
                if let Some(min) = stats["minValues"].as_object() {
                    columns.extend(min.keys().cloned());
                }
            }
            if let Some(p) =
                action["metaData"]["configuration"]["delta.dataSkippingStatsColumns"].as_str()
            {
                property = Some(p.to_string());
            }
        }
    }
    (columns, property)
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_columns_that_readers_filter_on_carry_statistics() {
    let s = Scratch::new();
    medallion_tests::generate_landing(&s.landing(), 0.001, 1, 5);
    run_all_ok(&s.landing(), &s.lake()).await;
    let lake = s.lake();

    // Bronze: the ingest metadata that is not text has statistics (silver selects its batch
    // by `_ingest_ts`); the raw text and the metadata's text (file, source, run id) do not.
    let (with, without) = parquet_statistics(&lake.join("bronze/events"));
    assert_eq!(with, set(&["_ingest_ts", "_source_line"]), "{without:?}");
    for text in ["value", "_source_file", "_source", "_run_id"] {
        assert!(without.contains(text), "{with:?} / {without:?}");
    }
    let (logged, property) = log_statistics(&lake.join("bronze/orders"));
    assert!(logged.contains("_ingest_ts"), "{logged:?}");
    for payload in ["order_id", "customer_id", "unit_price", "status"] {
        assert!(
            !logged.contains(payload),
            "bronze.orders logs stats of {payload}: {logged:?}"
        );
    }
    assert!(property.is_some_and(|p| p.contains("_ingest_ts") && !p.contains("order_id")));

    // Bronze (one file open per write) writes version 2 data pages; silver, with a file open
    // per date partition, version 1 (see `DataPageVersion`).
    assert_eq!(
        data_page_versions(&lake.join("bronze/events")),
        set(&["v2"])
    );
    assert_eq!(
        data_page_versions(&lake.join("silver/events")),
        set(&["v1"])
    );

    // Silver events declares `stats_columns = ["event_ts"]`: those and its key, nothing else.
    let (with, without) = parquet_statistics(&lake.join("silver/events"));
    assert_eq!(with, set(&["event_id", "event_ts"]));
    assert!(
        without.contains("properties") && without.contains("session_id"),
        "{without:?}"
    );
    let (logged, property) = log_statistics(&lake.join("silver/events"));
    assert_eq!(logged, set(&["event_id", "event_ts"]));
    assert_eq!(property.as_deref(), Some("event_id,event_ts"));

    // Silver orders declares none: every column keeps its statistics, as before.
    let (with, _) = parquet_statistics(&lake.join("silver/orders"));
    for column in [
        "order_id",
        "customer_id",
        "status",
        "order_ts",
        "unit_price",
    ] {
        assert!(
            with.contains(column),
            "silver.orders lacks stats of {column}: {with:?}"
        );
    }
}
