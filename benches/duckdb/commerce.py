#!/usr/bin/env python3
"""The commerce pipeline as DuckDB SQL, every layer written as Parquet (as a dbt-duckdb
project would materialise bronze, silver and gold models as external Parquet tables).

The benchmark's DuckDB peer: the same rules, dedup, as-of join and aggregations as the
reference spec, in DuckDB's own dialect, reading the landing directly.

    python commerce.py LANDING OUT [--threads N]
"""
import argparse
import os
import time

import duckdb

TS_PATTERN = r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})| \d{2}:\d{2}:\d{2})"


def parse_ts(e):
    """The three spellings of the spec, strictly, as a UTC TIMESTAMP; else NULL. The offset is
    applied by hand: strptime's %z result depends on the session's time zone handling, and it
    rolls 2026-02-30 over to March where the date cast refuses it."""
    offset_ok = f"(length({e}) <> 25 OR (CAST(substr({e}, 21, 2) AS INT) <= 23 AND CAST(substr({e}, 24, 2) AS INT) <= 59))"
    offset = (f"CASE WHEN length({e}) = 25 THEN to_minutes(CAST((CASE WHEN substr({e}, 20, 1) = '-' THEN -1 ELSE 1 END)"
              f" * (CAST(substr({e}, 21, 2) AS INT) * 60 + CAST(substr({e}, 24, 2) AS INT)) AS BIGINT)) ELSE INTERVAL 0 MINUTE END")
    return f"""(CASE WHEN regexp_full_match({e}, '{TS_PATTERN}') AND try_cast(substr({e}, 1, 10) AS DATE) IS NOT NULL
                     AND {offset_ok} THEN
        try_strptime(replace(substr({e}, 1, 19), 'T', ' '), '%Y-%m-%d %H:%M:%S') - {offset} END)"""


def present(expr):
    return f"({expr} IS NOT NULL AND trim({expr}, ' ') <> '')"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("landing")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    landing, out = os.path.abspath(args.landing), os.path.abspath(args.out)
    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = true")
    started = time.time()

    def write(layer, name, sql, partition_by=None):
        path = os.path.join(out, layer, name)
        con.execute(f"CREATE OR REPLACE TABLE {layer}_{name} AS {sql}")
        target = path if partition_by else path + ".parquet"
        options = f"FORMAT parquet, COMPRESSION snappy{', PARTITION_BY (' + partition_by + '), OVERWRITE_OR_IGNORE' if partition_by else ''}"
        con.execute(f"COPY {layer}_{name} TO '{target}' ({options})")

    os.makedirs(os.path.join(out, "bronze"), exist_ok=True)
    os.makedirs(os.path.join(out, "silver"), exist_ok=True)
    os.makedirs(os.path.join(out, "gold"), exist_ok=True)

    # ---------------------------------------------------------------- bronze: as received
    meta = "now() AS _ingest_ts, '{src}' AS _source, CAST(now() AS DATE) AS _ingest_date"
    for entity in ("orders", "customers", "products"):
        write("bronze", entity, f"""
            SELECT * EXCLUDE (filename), filename AS _source_file,
                   row_number() OVER () AS _source_line, {meta.format(src='files:' + entity)}
            FROM read_csv('{landing}/{entity}/**/*.csv', all_varchar = true, header = true,
                          filename = true, union_by_name = true)""")
    write("bronze", "events", f"""
        SELECT CAST(json AS VARCHAR) AS value, filename AS _source_file,
               row_number() OVER () AS _source_line, {meta.format(src='files:events')}
        FROM read_ndjson_objects('{landing}/events/**/*.jsonl', filename = true)""")
    write("bronze", "fx_rates", f"""
        WITH docs AS (
            SELECT json, filename FROM read_json_objects('{landing}/fx_rates/**/*.json', filename = true))
        SELECT json ->> '$.base' AS base, json ->> '$.timestamp' AS "timestamp", k AS currency,
               json -> '$.rates' ->> k AS rate, filename AS _source_file,
               row_number() OVER () AS _source_line, {meta.format(src='files:fx_rates')}
        FROM docs, unnest(json_keys(json -> '$.rates')) AS t(k)""")

    # ---------------------------------------------------------------- silver: valid, typed, one row per key
    def split(entity, rules):
        """Rows failing a rule (the first, in order) go to quarantine; the rest are valid."""
        case = " ".join(f"WHEN NOT coalesce({check}, false) THEN '{name}'" for name, check in rules)
        con.execute(f"CREATE OR REPLACE TABLE checked_{entity} AS SELECT *, CASE {case} END AS _dq_rule FROM bronze_{entity}")
        con.execute(f"COPY (SELECT * FROM checked_{entity} WHERE _dq_rule IS NOT NULL) TO '{out}/silver/{entity}_quarantine.parquet' (FORMAT parquet)")

    split("fx_rates", [("rate_positive", "regexp_full_match(rate, '[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?') AND try_cast(rate AS DOUBLE) > 0")])
    write("silver", "fx_rates", f"""
        SELECT currency, rate_hour, rate FROM (
            SELECT currency, date_trunc('hour', {parse_ts('"timestamp"')}) AS rate_hour, CAST(rate AS DOUBLE) AS rate,
                   {parse_ts('"timestamp"')} AS fx_timestamp, _source_file, _source_line
            FROM checked_fx_rates WHERE _dq_rule IS NULL)
        QUALIFY row_number() OVER (PARTITION BY currency, rate_hour
                                   ORDER BY fx_timestamp DESC NULLS LAST, _source_file DESC, _source_line DESC) = 1""")

    split("products", [("product_id_present", present("product_id"))])
    write("silver", "products", """
        SELECT product_id, name, category, CAST(list_price AS DECIMAL(18,2)) AS list_price, currency
        FROM checked_products WHERE _dq_rule IS NULL
        QUALIFY row_number() OVER (PARTITION BY product_id ORDER BY _source_file DESC, _source_line DESC) = 1""")

    split("customers", [("customer_id_present", present("customer_id")),
                        ("country_iso2", "regexp_full_match(upper(trim(country, ' ')), '[A-Z]{2}')")])
    write("silver", "customers", f"""
        SELECT * EXCLUDE (_source_file, _source_line) FROM (
            SELECT customer_id, trim(name, ' ') AS name, lower(trim(email, ' ')) AS email,
                   upper(trim(country, ' ')) AS country, lower(segment) AS segment,
                   {parse_ts('created_at')} AS created_at, {parse_ts('updated_at')} AS updated_at,
                   _source_file, _source_line
            FROM checked_customers WHERE _dq_rule IS NULL)
        QUALIFY row_number() OVER (PARTITION BY customer_id
                                   ORDER BY updated_at DESC NULLS LAST, _source_file DESC, _source_line DESC) = 1""")

    split("orders", [
        ("order_id_present", present("order_id")),
        ("customer_id_present", present("customer_id")),
        ("order_ts_parseable", f"{parse_ts('order_ts')} IS NOT NULL"),
        ("quantity_positive", "regexp_full_match(quantity, '[+-]?[0-9]+') AND try_cast(quantity AS INTEGER) > 0"),
        ("unit_price_non_negative", "regexp_full_match(unit_price, '[+-]?[0-9]+([.][0-9]+)?') AND try_cast(unit_price AS DECIMAL(18,2)) >= 0"),
        ("currency_known", "currency = 'USD' OR currency IN (SELECT currency FROM silver_fx_rates)"),
        ("status_valid", "upper(trim(status, ' ')) IN ('PLACED', 'SHIPPED', 'CANCELLED', 'RETURNED')"),
    ])
    write("silver", "orders", f"""
        SELECT * EXCLUDE (_source_file, _source_line) FROM (
            SELECT order_id, customer_id, product_id, {parse_ts('order_ts')} AS order_ts,
                   CAST({parse_ts('order_ts')} AS DATE) AS order_date, CAST(quantity AS INTEGER) AS quantity,
                   CAST(unit_price AS DECIMAL(18,2)) AS unit_price, currency, upper(trim(status, ' ')) AS status,
                   {parse_ts('updated_at')} AS updated_at, _source_file, _source_line
            FROM checked_orders WHERE _dq_rule IS NULL)
        QUALIFY row_number() OVER (PARTITION BY order_id
                                   ORDER BY updated_at DESC NULLS LAST, _source_file DESC, _source_line DESC) = 1""",
          partition_by="order_date")

    split("events", [
        ("event_id_present", present("value ->> '$.event_id'")),
        ("customer_id_present", present("value ->> '$.customer_id'")),
        ("event_ts_parseable", f"{parse_ts(chr(40) + 'value ->> ' + chr(39) + '$.event_ts' + chr(39) + chr(41))} IS NOT NULL"),
        ("event_type_valid", "lower(value ->> '$.event_type') IN ('page_view', 'add_to_cart', 'checkout')"),
    ])
    write("silver", "events", f"""
        SELECT value ->> '$.event_id' AS event_id, value ->> '$.customer_id' AS customer_id,
               lower(value ->> '$.event_type') AS event_type,
               {parse_ts("(value ->> '$.event_ts')")} AS event_ts,
               CAST({parse_ts("(value ->> '$.event_ts')")} AS DATE) AS event_date,
               value ->> '$.session_id' AS session_id, value -> '$.properties' AS properties
        FROM checked_events WHERE _dq_rule IS NULL
        QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY _source_file DESC, _source_line DESC) = 1""",
          partition_by="event_date")

    # ---------------------------------------------------------------- gold
    con.execute("""
        CREATE OR REPLACE TABLE priced AS
        SELECT o.*, coalesce(o.quantity * CAST(o.unit_price AS DOUBLE)
                             / CASE WHEN o.currency = 'USD' THEN 1.0 ELSE f.rate END, 0.0) AS revenue
        FROM (SELECT *, date_trunc('hour', order_ts) AS order_hour FROM silver_orders) o
        ASOF LEFT JOIN silver_fx_rates f ON o.currency = f.currency AND o.order_hour >= f.rate_hour""")
    write("gold", "daily_sales", """
        SELECT p.order_date, coalesce(c.country, 'UNKNOWN') AS country, coalesce(pr.category, 'UNKNOWN') AS category,
               count(*) AS orders, sum(p.quantity)::BIGINT AS units, CAST(round(sum(p.revenue), 2) AS DECIMAL(18,2)) AS revenue_usd
        FROM priced p LEFT JOIN silver_customers c USING (customer_id) LEFT JOIN silver_products pr USING (product_id)
        WHERE p.status IN ('PLACED', 'SHIPPED') GROUP BY ALL""")
    write("gold", "customer_360", """
        WITH o AS (SELECT customer_id, min(order_date) AS f, max(order_date) AS l,
                          count(*) FILTER (WHERE status IN ('PLACED', 'SHIPPED')) AS n,
                          sum(CASE WHEN status IN ('PLACED', 'SHIPPED') THEN revenue ELSE 0 END) AS rev,
                          count(*) FILTER (WHERE status = 'RETURNED') AS r
                   FROM priced GROUP BY customer_id),
             e AS (SELECT customer_id, count(*) FILTER (WHERE event_type = 'page_view') AS pv,
                          count(*) FILTER (WHERE event_type = 'add_to_cart') AS ac,
                          count(*) FILTER (WHERE event_type = 'checkout') AS co,
                          count(DISTINCT session_id) AS s
                   FROM silver_events GROUP BY customer_id)
        SELECT c.customer_id, c.country, c.segment, sha256(c.email) AS email_sha256,
               o.f AS first_order_date, o.l AS last_order_date, coalesce(o.n, 0) AS lifetime_orders,
               CAST(round(coalesce(o.rev, 0), 2) AS DECIMAL(18,2)) AS lifetime_revenue_usd,
               coalesce(o.r, 0) AS returned_orders, coalesce(e.pv, 0) AS page_views, coalesce(e.ac, 0) AS add_to_carts,
               coalesce(e.co, 0) AS checkouts, coalesce(e.s, 0) AS sessions,
               CASE WHEN coalesce(e.s, 0) = 0 THEN NULL ELSE e.co / e.s END AS conversion_rate
        FROM silver_customers c LEFT JOIN o USING (customer_id) LEFT JOIN e USING (customer_id)""")
    write("gold", "daily_engagement", """
        SELECT e.event_date, coalesce(c.country, 'UNKNOWN') AS country,
               CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
               e.event_type, count(*) AS events, count(DISTINCT e.customer_id) AS customers,
               count(DISTINCT e.session_id) AS sessions
        FROM silver_events e LEFT JOIN silver_customers c USING (customer_id) GROUP BY ALL""")
    print(f"duckdb commerce: {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
