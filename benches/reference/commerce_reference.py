#!/usr/bin/env python3
"""The commerce pipeline of the reference spec, computed without medallion.

An independent implementation to check medallion's gold tables against: Python's own csv and
json modules parse the landing and apply the silver rules (section 3 and 6 of the spec), and
DuckDB does the relational work (dedup by window, the as-of FX join with its native ASOF JOIN,
the gold aggregations). Gold tables are written as CSV files, one per table, sorted.

    python3 commerce_reference.py LANDING_DIR OUT_DIR
"""
import csv
import datetime as dt
import decimal
import glob
import json
import os
import re
import sys

import duckdb

TS_Z = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z")
TS_OFF = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})([+-])(\d{2}):(\d{2})")
TS_SPACE = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})")


def parse_ts(s):
    """One of the three spellings of a real instant, as a naive UTC datetime; else None."""
    if s is None:
        return None
    for pattern in (TS_Z, TS_OFF, TS_SPACE):
        m = pattern.fullmatch(s)
        if not m:
            continue
        g = m.groups()
        try:
            t = dt.datetime(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]))
        except ValueError:
            return None
        if pattern is TS_OFF:
            hours, minutes = int(g[7]), int(g[8])
            if hours > 23 or minutes > 59:
                return None
            offset = dt.timedelta(hours=hours, minutes=minutes)
            t = t - offset if g[6] == "+" else t + offset
        return t
    return None


def present(s):
    return s is not None and s.strip(" ") != ""


def fmt_ts(t):
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def files(landing, entity, ext):
    return sorted(glob.glob(os.path.join(landing, entity, "**", "*." + ext), recursive=True))


def location(path):
    return "file://" + os.path.abspath(path)


def csv_rows(landing, entity, columns):
    """(file, line, {column: value or None}) per record; a record with the wrong field count
    yields None for its fields (malformed)."""
    for path in files(landing, entity, "csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        reader = csv.reader(text.splitlines(keepends=True))
        header = None
        line_no = 1
        for record in reader:
            start = line_no
            line_no = reader.line_num + 1
            if header is None:
                header = [h.strip() for h in record]
                continue
            if len(record) != len(header):
                yield location(path), start, None
                continue
            values = dict(zip(header, record))
            yield location(path), start, {c: (values.get(c) or None) for c in columns}


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def half_up(text, places=2):
    return decimal.Decimal(text).quantize(decimal.Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_UP)


def main(landing, out):
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "_work")
    os.makedirs(work, exist_ok=True)
    quarantined = {}

    # fx_rates: one row per currency per document.
    fx = []
    q = 0
    for path in files(landing, "fx_rates", "json"):
        try:
            doc = json.load(open(path, encoding="utf-8-sig"))
            rates = doc["rates"]
            assert isinstance(doc, dict) and isinstance(rates, dict)
        except Exception:
            q += 1
            continue
        ts = parse_ts(doc.get("timestamp") if isinstance(doc.get("timestamp"), str) else None)
        for i, (cur, rate) in enumerate(rates.items(), start=1):
            ok = isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0
            if not ok:
                q += 1
                continue
            hour = None if ts is None else ts.replace(minute=0, second=0)
            fx.append((cur, fmt_ts(hour), repr(float(rate)), fmt_ts(ts), location(path), i))
    quarantined["fx_rates"] = q
    write_csv(os.path.join(work, "fx.csv"), ["currency", "rate_hour", "rate", "ts", "file", "line"], fx)
    known = {r[0] for r in fx}

    customers, q = [], 0
    for file, line, r in csv_rows(landing, "customers", ["customer_id", "name", "email", "country", "segment", "created_at", "updated_at"]):
        country = None if r is None or r["country"] is None else r["country"].strip(" ").upper()
        if r is None or not present(r["customer_id"]) or country is None or not re.fullmatch(r"[A-Z]{2}", country):
            q += 1
            continue
        email = None if r["email"] is None else r["email"].strip(" ").lower()
        customers.append((r["customer_id"], country, None if r["segment"] is None else r["segment"].lower(), email, fmt_ts(parse_ts(r["updated_at"])), file, line))
    quarantined["customers"] = q
    write_csv(os.path.join(work, "customers.csv"), ["customer_id", "country", "segment", "email", "updated_at", "file", "line"], customers)

    products, q = [], 0
    for file, line, r in csv_rows(landing, "products", ["product_id", "category"]):
        if r is None or not present(r["product_id"]):
            q += 1
            continue
        products.append((r["product_id"], r["category"], file, line))
    quarantined["products"] = q
    write_csv(os.path.join(work, "products.csv"), ["product_id", "category", "file", "line"], products)

    orders, q = [], 0
    statuses = {"PLACED", "SHIPPED", "CANCELLED", "RETURNED"}
    for file, line, r in csv_rows(landing, "orders", ["order_id", "customer_id", "product_id", "order_ts", "quantity", "unit_price", "currency", "status", "updated_at"]):
        if r is None or not present(r["order_id"]) or not present(r["customer_id"]):
            q += 1
            continue
        ts = parse_ts(r["order_ts"])
        if ts is None:
            q += 1
            continue
        qty = r["quantity"]
        if qty is None or not re.fullmatch(r"[+-]?[0-9]+", qty) or not (0 < int(qty) <= 2**31 - 1):
            q += 1
            continue
        price = r["unit_price"]
        if price is None or not re.fullmatch(r"[+-]?[0-9]+(\.[0-9]+)?", price) or half_up(price) < 0:
            q += 1
            continue
        if not (r["currency"] == "USD" or r["currency"] in known):
            q += 1
            continue
        status = None if r["status"] is None else r["status"].strip(" ").upper()
        if status not in statuses:
            q += 1
            continue
        orders.append((r["order_id"], r["customer_id"], r["product_id"], fmt_ts(ts), int(qty), str(half_up(price)), r["currency"], status, fmt_ts(parse_ts(r["updated_at"])), file, line))
    quarantined["orders"] = q
    write_csv(os.path.join(work, "orders.csv"), ["order_id", "customer_id", "product_id", "order_ts", "quantity", "unit_price", "currency", "status", "updated_at", "file", "line"], orders)

    events, q = [], 0
    types = {"page_view", "add_to_cart", "checkout"}

    def text(v):
        if v is None:
            return None
        if isinstance(v, str):
            return v
        return json.dumps(v, separators=(",", ":"))

    for path in files(landing, "events", "jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, raw in enumerate(f.read().split("\n"), start=1):
                raw = raw[:-1] if raw.endswith("\r") else raw
                if raw.strip() == "":
                    continue
                try:
                    e = json.loads(raw)
                except ValueError:
                    e = None
                if not isinstance(e, dict):
                    q += 1
                    continue
                eid, cid, etype = text(e.get("event_id")), text(e.get("customer_id")), text(e.get("event_type"))
                ts = parse_ts(text(e.get("event_ts")))
                if not present(eid) or not present(cid) or ts is None or etype is None or etype.lower() not in types:
                    q += 1
                    continue
                events.append((eid, cid, etype.lower(), fmt_ts(ts), text(e.get("session_id")), location(path), i))
    quarantined["events"] = q
    write_csv(os.path.join(work, "events.csv"), ["event_id", "customer_id", "event_type", "event_ts", "session_id", "file", "line"], events)

    con = duckdb.connect()
    def load(name, types):
        cols = ", ".join(f"'{c}': '{t}'" for c, t in types.items())
        con.execute(f"CREATE TABLE {name}_valid AS SELECT * FROM read_csv('{work}/{name}.csv', header=true, columns={{{cols}}}, nullstr='')")

    load("fx", {"currency": "VARCHAR", "rate_hour": "TIMESTAMP", "rate": "DOUBLE", "ts": "TIMESTAMP", "file": "VARCHAR", "line": "BIGINT"})
    load("customers", {"customer_id": "VARCHAR", "country": "VARCHAR", "segment": "VARCHAR", "email": "VARCHAR", "updated_at": "TIMESTAMP", "file": "VARCHAR", "line": "BIGINT"})
    load("products", {"product_id": "VARCHAR", "category": "VARCHAR", "file": "VARCHAR", "line": "BIGINT"})
    load("orders", {"order_id": "VARCHAR", "customer_id": "VARCHAR", "product_id": "VARCHAR", "order_ts": "TIMESTAMP", "quantity": "INTEGER", "unit_price": "DECIMAL(18,2)", "currency": "VARCHAR", "status": "VARCHAR", "updated_at": "TIMESTAMP", "file": "VARCHAR", "line": "BIGINT"})
    load("events", {"event_id": "VARCHAR", "customer_id": "VARCHAR", "event_type": "VARCHAR", "event_ts": "TIMESTAMP", "session_id": "VARCHAR", "file": "VARCHAR", "line": "BIGINT"})

    def dedup(name, key, order):
        con.execute(f"CREATE TABLE {name} AS SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY {order}) AS rn FROM {name}_valid) WHERE rn = 1")

    dedup("fx", "currency, rate_hour", "ts DESC NULLS LAST, file DESC, line DESC")
    dedup("customers", "customer_id", "updated_at DESC NULLS LAST, file DESC, line DESC")
    dedup("products", "product_id", "file DESC, line DESC")
    dedup("orders", "order_id", "updated_at DESC NULLS LAST, file DESC, line DESC")
    dedup("events", "event_id", "file DESC, line DESC")

    con.execute("""
        CREATE TABLE priced AS
        SELECT o.*, CAST(o.order_ts AS DATE) AS order_date,
               coalesce(o.quantity * CAST(o.unit_price AS DOUBLE) / CASE WHEN o.currency = 'USD' THEN 1.0 ELSE f.rate END, 0.0) AS rev
        FROM (SELECT *, date_trunc('hour', order_ts) AS order_hour FROM orders) o
        ASOF LEFT JOIN (SELECT * FROM fx WHERE rate_hour IS NOT NULL) f
          ON o.currency = f.currency AND o.order_hour >= f.rate_hour
    """)
    gold = {
        "daily_sales": """
            SELECT strftime(p.order_date, '%Y-%m-%d') AS order_date, coalesce(c.country, 'UNKNOWN') AS country,
                   coalesce(pr.category, 'UNKNOWN') AS category, count(*) AS orders, sum(p.quantity) AS units,
                   printf('%.2f', round(sum(p.rev), 2)) AS revenue_usd
            FROM priced p LEFT JOIN customers c USING (customer_id) LEFT JOIN products pr USING (product_id)
            WHERE p.status IN ('PLACED', 'SHIPPED') GROUP BY ALL""",
        "customer_360": """
            WITH o AS (SELECT customer_id, min(order_date) f, max(order_date) l,
                          count(*) FILTER (WHERE status IN ('PLACED','SHIPPED')) n,
                          sum(CASE WHEN status IN ('PLACED','SHIPPED') THEN rev ELSE 0 END) rev,
                          count(*) FILTER (WHERE status = 'RETURNED') r
                       FROM priced GROUP BY customer_id),
                 e AS (SELECT customer_id, count(*) FILTER (WHERE event_type='page_view') pv,
                          count(*) FILTER (WHERE event_type='add_to_cart') ac,
                          count(*) FILTER (WHERE event_type='checkout') co,
                          count(DISTINCT session_id) s FROM events GROUP BY customer_id)
            SELECT c.customer_id, c.country, c.segment, sha256(c.email) AS email_sha256,
                   coalesce(strftime(o.f, '%Y-%m-%d'), '') AS first_order_date, coalesce(strftime(o.l, '%Y-%m-%d'), '') AS last_order_date,
                   coalesce(o.n, 0) AS lifetime_orders, printf('%.2f', round(coalesce(o.rev, 0), 2)) AS lifetime_revenue_usd,
                   coalesce(o.r, 0) AS returned_orders, coalesce(e.pv, 0) AS page_views, coalesce(e.ac, 0) AS add_to_carts,
                   coalesce(e.co, 0) AS checkouts, coalesce(e.s, 0) AS sessions,
                   CASE WHEN coalesce(e.s, 0) = 0 THEN NULL ELSE e.co / e.s END AS conversion_rate
            FROM customers c LEFT JOIN o USING (customer_id) LEFT JOIN e USING (customer_id)""",
        "daily_engagement": """
            SELECT strftime(CAST(e.event_ts AS DATE), '%Y-%m-%d') AS event_date, coalesce(c.country, 'UNKNOWN') AS country,
                   CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment, e.event_type,
                   count(*) AS events, count(DISTINCT e.customer_id) AS customers, count(DISTINCT e.session_id) AS sessions
            FROM events e LEFT JOIN customers c USING (customer_id) GROUP BY ALL""",
    }
    for name, sql in gold.items():
        rel = con.execute(f"SELECT * FROM ({sql}) ORDER BY ALL")
        header = [d[0] for d in rel.description]
        rows = rel.fetchall()
        write_csv(os.path.join(out, f"{name}.csv"), header, [["" if v is None else v for v in r] for r in rows])
    json.dump({"quarantined": quarantined}, open(os.path.join(out, "counts.json"), "w"))
    print(json.dumps({"gold_rows": {n: sum(1 for _ in open(os.path.join(out, f"{n}.csv"))) - 1 for n in gold}, "quarantined": quarantined}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
