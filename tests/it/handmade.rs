//! A small hand-made landing whose gold tables were worked out by hand: every rule, every
//! tie-break and each timestamp spelling (see tests/data/handmade/landing).

use medallion_tests::{Scratch, copy_tree, count, fixture, run_all_ok, table_lines};

fn lines(rows: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|s| (*s).to_string()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gold_tables_equal_the_hand_worked_results() {
    let s = Scratch::new();
    copy_tree(&fixture("handmade"), s.dir.path());
    let summary = run_all_ok(&s.landing(), &s.lake()).await;
    let lake = s.lake();

    assert_eq!(
        table_lines(&lake, "gold", "daily_sales", "CAST(order_date AS VARCHAR), country, category, orders, units, CAST(revenue_usd AS VARCHAR)").await.unwrap(),
        lines(&[
            "2025-12-31|US|books|1|1|0.00",
            "2026-01-01|US|books|2|3|46.68",
            "2026-01-01|DE|books|2|2|14.00",
            "2026-01-01|UNKNOWN|UNKNOWN|1|2|5.00",
            "2026-01-01|FR|UNKNOWN|1|1|3.50",
            "2026-01-02|US|UNKNOWN|1|2|2.02",
        ]),
    );

    assert_eq!(
        table_lines(
            &lake,
            "gold",
            "customer_360",
            "customer_id, country, segment, email_sha256, CAST(first_order_date AS VARCHAR) AS f, CAST(last_order_date AS VARCHAR) AS l, lifetime_orders, CAST(lifetime_revenue_usd AS VARCHAR) AS rev, returned_orders, page_views, add_to_carts, checkouts, sessions, conversion_rate"
        )
        .await
        .unwrap(),
        lines(&[
            "C1|US|consumer|71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476|2025-12-31|2026-01-02|4|48.70|1|1|1|1|2|0.5",
            "C2|DE|smb|581d5f1930c81e73906dfbae2d46df90e4a1221064763a4e55ee85dab8312938|2026-01-01|2026-01-01|2|14.00|0|1|0|0|0|",
            "C4|FR|enterprise|c74481ea3298c0c906ad4a96c6fedc8561a41701be598adbce69dca8fa93933e|2026-01-01|2026-01-01|1|3.50|0|0|0|0|0|",
            "C5|JP|consumer|2ea21fabb5dafeef3459fa4cf5cf39d0165a1555bfbf5eddf9d3103ee2e31ce5|||0|0.00|0|0|0|0|0|",
            "C6|CA|consumer|c29331a4a70764af812e1aa3f38bd0e23038995a03ca3e0f499c55296142f8f5|||0|0.00|0|0|0|0|0|",
        ]),
    );

    assert_eq!(
        table_lines(
            &lake,
            "gold",
            "daily_engagement",
            "CAST(event_date AS VARCHAR), country, segment, event_type, events, customers, sessions"
        )
        .await
        .unwrap(),
        lines(&[
            "2026-01-01|US|consumer|page_view|1|1|1",
            "2026-01-01|US|consumer|checkout|1|1|1",
            "2026-01-01|US|consumer|add_to_cart|1|1|1",
            "2026-01-01|DE|smb|page_view|1|1|0",
            "2026-01-02|UNKNOWN|UNKNOWN|page_view|1|1|1",
        ]),
    );

    // Each rule caught exactly the rows planted for it, and each row went to quarantine
    // under the first rule it fails.
    assert_eq!(
        table_lines(&lake, "silver", "orders_quarantine", "_dq_rule, order_id")
            .await
            .unwrap(),
        lines(&[
            "customer_id_present|O7",
            "order_ts_parseable|O8",
            "quantity_positive|O9",
            "unit_price_non_negative|O10",
            "currency_known|O11",
            "currency_known|O12",
            "status_valid|O13",
            "malformed_record|",
            "quantity_positive|O18",
        ]),
    );
    let malformed = table_lines(
        &lake,
        "silver",
        "orders_quarantine",
        "_corrupt_record, _source_file, _source_line",
    )
    .await
    .unwrap();
    assert!(
        malformed
            .iter()
            .any(|l| l.contains("O14,C1,P1,2026-01-01T00:00:00Z,1")
                && l.contains("orders/batch-0001/part-00000.csv")
                && l.ends_with("|16")),
        "{malformed:?}"
    );
    assert_eq!(
        table_lines(
            &lake,
            "silver",
            "events_quarantine",
            "_dq_rule, _source_line"
        )
        .await
        .unwrap(),
        lines(&[
            "customer_id_present|6",
            "event_type_valid|7",
            "event_ts_parseable|8",
            "event_id_present|10",
            "event_type_valid|12",
            "event_id_present|13",
        ]),
    );
    assert_eq!(
        table_lines(&lake, "silver", "fx_rates_quarantine", "_dq_rule, currency")
            .await
            .unwrap(),
        lines(&["rate_positive|GBP", "malformed_record|"]),
    );
    assert_eq!(
        table_lines(
            &lake,
            "silver",
            "customers_quarantine",
            "_dq_rule, customer_id"
        )
        .await
        .unwrap(),
        lines(&["country_iso2|C3", "customer_id_present|"]),
    );

    // Silver: keep rules (greatest updated_at, null loses, ties to the later line) and
    // normalisation.
    let customers = table_lines(
        &lake,
        "silver",
        "customers",
        "customer_id || '/' || name || '/' || email || '/' || country || '/' || segment AS c",
    )
    .await
    .unwrap();
    assert_eq!(
        customers,
        vec![
            "C1/Ann/ann@example.com/US/consumer",
            "C2/Bob, Jr./bob@x.com/DE/smb",
            "C4/Dee2/d2@x.com/FR/enterprise",
            "C5/Eve2/eve2@x.com/JP/consumer",
            "C6/Quote \"Q\"/q@x.com/CA/consumer"
        ]
    );
    let orders = table_lines(&lake, "silver", "orders", "order_id || '/' || status || '/' || CAST(quantity AS VARCHAR) || '/' || CAST(unit_price AS VARCHAR) AS o").await.unwrap();
    for expected in [
        "O1/PLACED/2/10.00",
        "O3/CANCELLED/3/4.00",
        "O16/SHIPPED/1/10.00",
        "O17/PLACED/1/7.00",
        "O19/PLACED/2/1.01",
        "O2/SHIPPED/1/3.34",
    ] {
        assert!(
            orders.contains(&expected.to_string()),
            "{expected} not in {orders:?}"
        );
    }
    assert_eq!(orders.len(), 10, "{orders:?}");
    assert_eq!(count(&lake, "silver", "events").await, 5);
    assert_eq!(count(&lake, "silver", "products").await, 2);
    assert_eq!(
        table_lines(&lake, "silver", "fx_rates", "currency || '@' || CAST(extract(hour FROM rate_hour) AS VARCHAR) || '=' || CAST(rate AS VARCHAR) AS r").await.unwrap(),
        vec!["EUR@0=0.5", "EUR@2=0.4", "EUR@3=2.0", "GBP@0=0.25", "JPY@0=100.0", "JPY@2=200.0"]
    );

    // The summary accounts for every row.
    let silver_orders = summary
        .tables
        .iter()
        .find(|t| t.layer == "silver" && t.table == "orders")
        .unwrap();
    assert_eq!(
        (silver_orders.rows_read, silver_orders.rows_quarantined),
        (23, 9)
    );
}
