-- customer_360 updated from the rows of its inputs that changed (`changed.customers`,
-- `changed.orders`, `changed.events`, `changed.fx_rates`: old rows `delete`, new rows
-- `insert`), without aggregating every order and event of the customers they name (one of
-- whom owns a quarter of both):
-- - a customer's order figures are computed again over all its orders, priced as
--   orders_priced.sql prices them, when one of its orders changed, when a changed rate prices
--   one of them, or when the customer is new to silver (the rounded revenue cannot take a
--   difference);
-- - its event figures are its built ones plus those of its changed events (+1 inserted, -1
--   deleted); a distinct session comes or goes with a (customer, session) pair that the
--   changed events hold on one side alone and no other event holds. A customer new to silver
--   counts all its events;
-- - its country, segment and email are its current silver row's; a customer gone from silver
--   has its row removed.
-- Each step is a table of its own so that it runs once: DataFusion runs a WITH query again
-- wherever it is read.

-- It runs after the steps of events_of_changes.sql (shared with daily_engagement's script):
-- events_of_changed_customers and events_of_changed_sessions.

-- Customers new to silver: they have no row as built.
CREATE TABLE c3_new AS
SELECT DISTINCT c.customer_id
FROM changed.customers c
WHERE c._change_type = 'insert'
  AND NOT EXISTS (SELECT 1 FROM gold.customer_360 b WHERE b.customer_id = c.customer_id);

-- Customers whose order figures are computed again. A rate prices its currency's orders
-- from its hour until the currency's next rate: those in its currency at or after its hour,
-- for the old rate and the new. Those orders are dated on or after the earliest changed
-- rate's day: the engine works that subquery out first, so the scan skips earlier dates.
CREATE TABLE c3_reordered AS
SELECT customer_id FROM changed.orders
UNION
SELECT o.customer_id
FROM silver.orders o
JOIN (
    SELECT currency, min(rate_hour) AS since
    FROM changed.fx_rates
    WHERE rate_hour IS NOT NULL
    GROUP BY currency
) r
  ON o.currency = r.currency
 AND o.order_ts >= r.since
WHERE o.order_date >= (SELECT CAST(min(rate_hour) AS DATE) FROM changed.fx_rates)
UNION
SELECT customer_id FROM c3_new;

-- Their order figures, as customer_360.sql computes them from orders_priced.sql's revenue.
CREATE TABLE c3_orders AS
SELECT
    o.customer_id,
    min(o.order_date) AS first_order_date,
    max(o.order_date) AS last_order_date,
    count(*) FILTER (WHERE o.status IN ('PLACED', 'SHIPPED')) AS lifetime_orders,
    sum(CASE WHEN o.status IN ('PLACED', 'SHIPPED') THEN coalesce(
            CAST(o.quantity AS DOUBLE) * CAST(o.unit_price AS DOUBLE)
                / CASE WHEN o.currency = 'USD' THEN 1.0 ELSE r.rate END,
            0.0) ELSE 0.0 END) AS lifetime_revenue_usd,
    count(*) FILTER (WHERE o.status = 'RETURNED') AS returned_orders
FROM gold.rate_by_hour r
RIGHT JOIN (
    SELECT * FROM silver.orders
    WHERE customer_id IN (SELECT customer_id FROM c3_reordered)
) o
    ON r.currency = o.currency
   AND r.hour = to_unixtime(o.order_ts) / 3600
GROUP BY o.customer_id;

-- By customer and session: the events counted, all of a new customer's and the changed ones
-- of the others (n: 1, or -1 for a deleted one), how many are current (after) and how many
-- were there before. An event without a customer counts for none.
CREATE TABLE c3_sessions AS
WITH counted AS (
    SELECT e.customer_id, e.session_id, e.event_type, 1 AS n, true AS is_new
    FROM events_of_changed_customers e
    JOIN c3_new m ON m.customer_id = e.customer_id
    UNION ALL
    SELECT c.customer_id, c.session_id, c.event_type,
           CASE WHEN c._change_type = 'insert' THEN 1 ELSE -1 END,
           c._change_type = 'insert'
    FROM changed.events c
    WHERE c.customer_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM c3_new m WHERE m.customer_id = c.customer_id)
)
SELECT
    customer_id,
    session_id,
    sum(CASE WHEN event_type = 'page_view' THEN n ELSE 0 END) AS page_views,
    sum(CASE WHEN event_type = 'add_to_cart' THEN n ELSE 0 END) AS add_to_carts,
    sum(CASE WHEN event_type = 'checkout' THEN n ELSE 0 END) AS checkouts,
    count(*) FILTER (WHERE is_new) AS after,
    count(*) FILTER (WHERE NOT is_new) AS before
FROM counted
GROUP BY customer_id, session_id;

-- The pairs held on one side alone that an unchanged event holds too, so the session stays:
-- the pair's current events outnumber its current counted ones (after). A new customer's
-- current events are all counted, so none of its pairs is probed. The others' pairs are
-- changed events' sessions, whose events are all in events_of_changed_sessions.
CREATE TABLE c3_held AS
SELECT p.customer_id, p.session_id
FROM c3_sessions p
JOIN (
    SELECT e.customer_id, e.session_id, count(*) AS current
    FROM events_of_changed_sessions e
    JOIN (
        SELECT customer_id, session_id
        FROM c3_sessions s
        WHERE session_id IS NOT NULL AND (after > 0) <> (before > 0)
          AND NOT EXISTS (SELECT 1 FROM c3_new m WHERE m.customer_id = s.customer_id)
    ) f
      ON f.customer_id = e.customer_id
     AND f.session_id = e.session_id
    GROUP BY e.customer_id, e.session_id
) h
  ON h.customer_id = p.customer_id
 AND h.session_id = p.session_id
WHERE h.current > p.after;

-- Each counted customer's event figures, to add to its built ones.
CREATE TABLE c3_events AS
SELECT
    p.customer_id,
    sum(p.page_views) AS page_views,
    sum(p.add_to_carts) AS add_to_carts,
    sum(p.checkouts) AS checkouts,
    sum(CASE WHEN p.session_id IS NULL OR (p.after > 0) = (p.before > 0) OR h.customer_id IS NOT NULL THEN 0
             WHEN p.after > 0 THEN 1
             ELSE -1 END) AS sessions
FROM c3_sessions p
LEFT JOIN c3_held h
  ON h.customer_id = p.customer_id
 AND h.session_id = p.session_id
GROUP BY p.customer_id;

WITH touched AS (
    SELECT customer_id FROM changed.customers
    UNION
    SELECT customer_id FROM c3_reordered
    UNION
    SELECT customer_id FROM c3_events
),
figures AS (
    SELECT
        t.customer_id,
        c.customer_id IS NULL AS gone,
        c.country,
        c.segment,
        c.email,
        CASE WHEN r.customer_id IS NULL THEN b.first_order_date ELSE o.first_order_date END AS first_order_date,
        CASE WHEN r.customer_id IS NULL THEN b.last_order_date ELSE o.last_order_date END AS last_order_date,
        CASE WHEN r.customer_id IS NULL THEN b.lifetime_orders
             ELSE coalesce(o.lifetime_orders, 0) END AS lifetime_orders,
        CASE WHEN r.customer_id IS NULL THEN b.lifetime_revenue_usd
             ELSE CAST(coalesce(o.lifetime_revenue_usd, 0.0) AS DECIMAL(18, 2)) END AS lifetime_revenue_usd,
        CASE WHEN r.customer_id IS NULL THEN b.returned_orders
             ELSE coalesce(o.returned_orders, 0) END AS returned_orders,
        coalesce(b.page_views, 0) + coalesce(e.page_views, 0) AS page_views,
        coalesce(b.add_to_carts, 0) + coalesce(e.add_to_carts, 0) AS add_to_carts,
        coalesce(b.checkouts, 0) + coalesce(e.checkouts, 0) AS checkouts,
        coalesce(b.sessions, 0) + coalesce(e.sessions, 0) AS sessions
    FROM touched t
    LEFT JOIN silver.customers c ON c.customer_id = t.customer_id
    LEFT JOIN gold.customer_360 b ON b.customer_id = t.customer_id
    LEFT JOIN c3_reordered r ON r.customer_id = t.customer_id
    LEFT JOIN c3_orders o ON o.customer_id = t.customer_id
    LEFT JOIN c3_events e ON e.customer_id = t.customer_id
)
SELECT
    customer_id,
    country,
    segment,
    encode(sha256(email), 'hex') AS email_sha256,
    first_order_date,
    last_order_date,
    lifetime_orders,
    lifetime_revenue_usd,
    returned_orders,
    page_views,
    add_to_carts,
    checkouts,
    sessions,
    CASE WHEN sessions = 0 THEN NULL
         ELSE CAST(checkouts AS DOUBLE) / CAST(sessions AS DOUBLE) END AS conversion_rate,
    gone AS _deleted
FROM figures
