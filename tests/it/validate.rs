//! `medallion validate` reports a broken pipeline with file and line, before any I/O.

use medallion_tests::{Scratch, commerce_dir, copy_tree, medallion, replace_in_file as replace};

fn broken_pipeline(edit: impl FnOnce(&std::path::Path)) -> Scratch {
    let s = Scratch::new();
    copy_tree(&commerce_dir(), s.dir.path());
    edit(s.dir.path());
    s
}

fn validate(dir: &std::path::Path) -> (Option<i32>, String) {
    let out = medallion(&["validate", dir.to_str().unwrap()]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn line_of(path: &std::path::Path, needle: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

#[test]
fn the_commerce_pipeline_is_valid() {
    let out = medallion(&["validate", commerce_dir().to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("gold.daily_sales: order_date Date32"),
        "{stdout}"
    );
    let builtin = medallion(&["validate", "commerce"]);
    assert_eq!(builtin.status.code(), Some(0));
}

/// Replaces `from` with `to` in pipeline.toml and asserts that validate fails with `message`
/// at the line of the `table = "<table>"` declaration followed by `from`.
fn assert_column_reported(from: &str, to: &str, table: &str, message: &str) {
    let s = broken_pipeline(|d| replace(&d.join("pipeline.toml"), from, to));
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    let line = line_of(
        &s.dir.path().join("pipeline.toml"),
        &format!("table = \"{table}\"\nfrom"),
    );
    assert!(
        stderr.contains(&format!("pipeline.toml:{line}: {message}")),
        "{stderr}"
    );
}

#[test]
fn an_unknown_key_column_is_reported_with_its_line() {
    assert_column_reported(
        "key = [\"order_id\"]",
        "key = [\"order_idx\"]",
        "orders",
        "silver table 'orders': key column 'order_idx' is not produced by",
    );
}

#[test]
fn an_unknown_stats_column_is_reported_with_its_line() {
    assert_column_reported(
        "stats_columns = [\"event_ts\"]",
        "stats_columns = [\"event_time\"]",
        "events",
        "silver table 'events': stats column 'event_time' is not produced by",
    );
}

#[test]
fn sql_that_does_not_parse_is_reported_with_its_file() {
    let s = broken_pipeline(|d| {
        std::fs::write(
            d.join("silver/products.sql"),
            "SELECT product_id,\n  upper(name FROM input",
        )
        .unwrap()
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("silver/products.sql:2:"), "{stderr}");
}

#[test]
fn a_duplicate_rule_name_is_reported_with_its_line() {
    let s = broken_pipeline(|d| {
        replace(
            &d.join("pipeline.toml"),
            "{ name = \"quantity_positive\"",
            "{ name = \"order_ts_parseable\"",
        )
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    let line = line_of(
        &s.dir.path().join("pipeline.toml"),
        "{ name = \"order_ts_parseable\", check = \"regexp_like(quantity",
    );
    assert!(stderr.contains(&format!("pipeline.toml:{line}: silver table 'orders': rule name 'order_ts_parseable' is used twice")), "{stderr}");
}

#[test]
fn several_problems_are_reported_at_once_and_unknown_keys_are_refused() {
    let s = broken_pipeline(|d| {
        replace(
            &d.join("pipeline.toml"),
            "key = [\"customer_id\"]",
            "key = [\"nope\"]",
        );
        replace(
            &d.join("pipeline.toml"),
            "from = \"products\"",
            "from = \"product\"",
        );
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("key column 'nope'")
            && stderr.contains("bronze table 'product', which is not declared"),
        "{stderr}"
    );

    let s = broken_pipeline(|d| {
        replace(
            &d.join("pipeline.toml"),
            "[lake]\nroot",
            "[lake]\nroots = \"x\"\nroot",
        )
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("pipeline.toml:") && stderr.contains("roots"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_column_in_sql_is_reported_with_its_line() {
    let s = broken_pipeline(|d| {
        replace(
            &d.join("gold/daily_sales.sql"),
            "sum(o.quantity)",
            "sum(o.quantityy)",
        )
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    let line = line_of(
        &s.dir.path().join("gold/daily_sales.sql"),
        "sum(o.quantityy)",
    );
    assert!(
        stderr.contains(&format!("gold/daily_sales.sql:{line}:")) && stderr.contains("quantityy"),
        "{stderr}"
    );
}

/// An incremental script runs its `steps` files first, as one script: an unknown column in a
/// steps file, or in the script after it, is reported with that file and its own line.
#[test]
fn an_unknown_column_in_an_incremental_scripts_steps_is_reported_with_its_file_and_line() {
    for (file, column) in [
        ("gold/events_of_changes.sql", "e.event_type"),
        ("gold/customer_360_incremental.sql", "c.session_id"),
    ] {
        let s = broken_pipeline(|d| replace(&d.join(file), column, &format!("{column}x")));
        let (code, stderr) = validate(s.dir.path());
        assert_eq!(code, Some(2), "{stderr}");
        let line = line_of(&s.dir.path().join(file), &format!("{column}x"));
        assert!(
            stderr.contains(&format!("{file}:{line}:")) && stderr.contains(&format!("{column}x")),
            "{file}: {stderr}"
        );
    }
}

#[test]
fn a_rebuild_by_that_cannot_scope_the_rebuild_is_reported() {
    let s = broken_pipeline(|d| {
        let toml = d.join("pipeline.toml");
        replace(
            &toml,
            "rebuild_by = { column = \"event_date\", from = \"silver.events\" }",
            "rebuild_by = { column = \"event_date\", from = [\"silver.events\", \"silver.customers\"] }",
        );
        replace(
            &toml,
            "rebuild_by = { column = \"customer_id\", from = [\"silver.customers\", \"silver.orders\", \"silver.events\"]",
            "rebuild_by = { column = \"customer_idd\", from = [\"silver.orders\", \"silver.nope\", \"silver.events\"]",
        )
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        // By partition: every source must be partitioned by the column.
        "gold table 'daily_engagement': rebuild_by from 'silver.customers' must be partitioned by 'event_date', as the table is",
        // By key: the column must be one of the model's and a data column of every source.
        "gold table 'customer_360': rebuild_by column 'customer_idd' is neither one of its partition_by columns nor produced by",
        "gold table 'customer_360': rebuild_by from 'silver.orders' must have 'customer_idd' as a column that is not a partition column",
        "gold table 'customer_360': rebuild_by from 'silver.nope' must name a silver table (silver.<table>)",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
    assert!(
        !stderr.contains("'daily_engagement': rebuild_by from 'silver.events'"),
        "silver.events is partitioned by event_date: {stderr}"
    );
}

#[test]
fn a_through_query_that_cannot_name_the_keys_is_reported() {
    let s = broken_pipeline(|d| {
        let toml = d.join("pipeline.toml");
        replace(
            &toml,
            "rebuild_by = { column = \"event_date\", from = \"silver.events\" }",
            "rebuild_by = { column = \"event_date\", from = \"silver.events\", through = [{ table = \"silver.customers\", sql = \"gold/customer_360_repriced.sql\" }] }",
        );
        replace(
            &toml,
            "through = [{ table = \"silver.fx_rates\", sql = \"gold/customer_360_repriced.sql\" }]",
            "through = [{ table = \"silver.fx_rates\", sql = \"gold/customer_360_repriced.sql\" }, { table = \"silver.nope\", sql = \"gold/customer_360_repriced.sql\" }, { table = \"silver.orders\", sql = \"gold/customer_360_repriced.sql\" }]",
        );
        std::fs::write(
            d.join("gold/customer_360_repriced.sql"),
            "SELECT DISTINCT customer_id, currency FROM silver.orders WHERE currency IN (SELECT currency FROM changed)",
        )
        .unwrap();
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "gold table 'daily_engagement': rebuild_by through 'silver.customers' applies to a rebuild by key, and 'event_date' is a partition column",
        "gold table 'customer_360': rebuild_by through 'silver.nope' must name a silver table (silver.<table>)",
        "gold table 'customer_360': rebuild_by through 'silver.orders' is listed in from as well",
        "gold table 'customer_360': rebuild_by through 'silver.fx_rates' has a query (",
        "customer_360_repriced.sql) that returns 2 columns, not one: the values of 'customer_id'",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
}

#[test]
fn an_incremental_query_that_cannot_update_its_table_is_reported() {
    let s = broken_pipeline(|d| {
        let toml = d.join("pipeline.toml");
        replace(
            &toml,
            "key = [\"event_date\", \"country\", \"segment\", \"event_type\"], steps",
            "key = [\"event_date\", \"nope\"], steps",
        );
        replace(
            &toml,
            "sql = \"gold/daily_sales.sql\"",
            "sql = \"gold/daily_sales.sql\"\nincremental = { key = [\"order_date\"], sql = \"gold/missing.sql\" }",
        );
        replace(
            &toml,
            "sql = \"gold/orders_priced.sql\"",
            "sql = \"gold/orders_priced.sql\"\nincremental = { key = [\"order_id\"], sql = \"gold/orders_priced.sql\" }",
        );
        // A first step that plans, then a query that leaves columns and `_deleted` out.
        std::fs::write(
            d.join("gold/customer_360_incremental.sql"),
            "CREATE TABLE c360_moved AS SELECT DISTINCT customer_id FROM changed.customers;\n\
             SELECT customer_id, country FROM gold.customer_360\n\
             WHERE customer_id IN (SELECT customer_id FROM c360_moved)",
        )
        .unwrap();
        std::fs::write(
            d.join("gold/daily_engagement_incremental.sql"),
            "CREATE TABLE step AS SELECT * FROM changed.events;\nSELECT * FROM changed.nope",
        )
        .unwrap();
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "gold table 'daily_engagement': incremental key 'nope' is not produced by",
        "daily_engagement_incremental.sql:2: ",
        "changed.nope",
        "gold table 'daily_sales': incremental names SQL file '",
        "missing.sql', which is not found",
        "gold view 'orders_priced': incremental applies to tables, and a view is never written",
        "customer_360_incremental.sql) that does not return the columns segment, email_sha256,",
        "customer_360_incremental.sql) that does not return a boolean column _deleted",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
}

#[test]
fn datafusion_settings_come_from_its_environment_over_medallions_defaults() {
    let key = "datafusion.execution.skip_partial_aggregation_probe_ratio_threshold";
    let setting = |env: &[(&str, &str)]| {
        let lake = Scratch::new();
        let pipeline = commerce_dir().join("pipeline.toml");
        let sql = format!("SELECT value FROM information_schema.df_settings WHERE name = '{key}'");
        let out = std::process::Command::new(medallion_tests::medallion_bin())
            .args([
                "query",
                pipeline.to_str().unwrap(),
                "--format",
                "csv",
                "--var",
            ])
            .arg(format!("lake={}", lake.lake().display()))
            .arg(sql)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(setting(&[]), "value\n0.1");
    let overridden = [(
        "DATAFUSION_EXECUTION_SKIP_PARTIAL_AGGREGATION_PROBE_RATIO_THRESHOLD",
        "0.8",
    )];
    assert_eq!(setting(&overridden), "value\n0.8");
}

#[test]
fn keep_any_with_keep_latest_by_is_refused() {
    let s = broken_pipeline(|d| {
        replace(
            &d.join("pipeline.toml"),
            "keep = \"any\"",
            "keep = \"any\"\nkeep_latest_by = [\"event_ts\"]",
        )
    });
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("silver table 'events': `keep = \"any\"` keeps any copy of a key, so it takes no `keep_latest_by`"),
        "{stderr}"
    );
}

#[test]
fn a_table_keeping_the_latest_row_must_select_the_tie_break_columns() {
    // events (`keep = "any"`) selects neither and is valid; orders drops one.
    let s = broken_pipeline(|d| replace(&d.join("silver/orders.sql"), "    _source_line,\n", ""));
    let (code, stderr) = validate(s.dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("silver table 'orders': ")
            && stderr.contains("must select '_source_line' (the keep rule's tie-break)"),
        "{stderr}"
    );
    assert!(!stderr.contains("'events'"), "{stderr}");
}
