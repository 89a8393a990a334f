-- One row per silver customer, with or without orders and events.
WITH orders AS (
    SELECT
        customer_id,
        min(order_date) AS first_order_date,
        max(order_date) AS last_order_date,
        count(*) FILTER (WHERE status IN ('PLACED', 'SHIPPED')) AS lifetime_orders,
        sum(CASE WHEN status IN ('PLACED', 'SHIPPED') THEN revenue_usd ELSE 0.0 END) AS lifetime_revenue_usd,
        count(*) FILTER (WHERE status = 'RETURNED') AS returned_orders
    FROM gold.orders_priced
    GROUP BY customer_id
),
events AS (
    -- Per session first, then per customer: one aggregation that counts distinct sessions
    -- (a null session_id makes one group, which count(session_id) skips). DataFusion plans
    -- count(DISTINCT) beside FILTERed counts on a slow path; this shape stays fast.
    SELECT
        customer_id,
        sum(page_views) AS page_views,
        sum(add_to_carts) AS add_to_carts,
        sum(checkouts) AS checkouts,
        count(session_id) AS sessions
    FROM (
        SELECT
            customer_id,
            session_id,
            count(*) FILTER (WHERE event_type = 'page_view') AS page_views,
            count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
            count(*) FILTER (WHERE event_type = 'checkout') AS checkouts
        FROM silver.events
        GROUP BY customer_id, session_id
    )
    GROUP BY customer_id
)
SELECT
    c.customer_id,
    c.country,
    c.segment,
    encode(sha256(c.email), 'hex') AS email_sha256,
    o.first_order_date,
    o.last_order_date,
    coalesce(o.lifetime_orders, 0) AS lifetime_orders,
    CAST(coalesce(o.lifetime_revenue_usd, 0.0) AS DECIMAL(18, 2)) AS lifetime_revenue_usd,
    coalesce(o.returned_orders, 0) AS returned_orders,
    coalesce(e.page_views, 0) AS page_views,
    coalesce(e.add_to_carts, 0) AS add_to_carts,
    coalesce(e.checkouts, 0) AS checkouts,
    coalesce(e.sessions, 0) AS sessions,
    CASE WHEN coalesce(e.sessions, 0) = 0 THEN NULL
         ELSE CAST(e.checkouts AS DOUBLE) / CAST(e.sessions AS DOUBLE) END AS conversion_rate
FROM silver.customers c
LEFT JOIN orders o ON o.customer_id = c.customer_id
LEFT JOIN events e ON e.customer_id = c.customer_id
