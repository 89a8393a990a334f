-- Every silver order with its revenue in USD. The rate is the currency's rate at the greatest
-- valid rate_hour at or before the order's UTC hour (a missing hour takes the last earlier
-- rate); USD is 1; an order with no earlier rate adds 0.
--
-- An as-of join without an ASOF operator: each rate is spread over the hours it stays in
-- force (until the currency's next rate, or the last order's hour), which turns the as-of
-- lookup into an equi-join on (currency, hour). The spread table has at most
-- currencies x hours rows, whatever the number of orders.
--
-- The spread rates come first, as the join's build side: a hash join builds its table from
-- the left input and keeps it so unless statistics say the right is smaller, and the spread
-- table has none. With the orders on the left, SF 10 hashed 9.9 M orders (1.55 GB, 2.3 s)
-- to probe them with 19 K rates.
WITH rates AS (
    SELECT
        currency,
        rate,
        to_unixtime(rate_hour) / 3600 AS from_hour,
        lead(to_unixtime(rate_hour) / 3600) OVER (PARTITION BY currency ORDER BY rate_hour) AS next_hour
    FROM silver.fx_rates
    WHERE rate_hour IS NOT NULL
),
last_order AS (
    SELECT max(to_unixtime(order_ts) / 3600) AS hour FROM silver.orders
),
rate_by_hour AS (
    SELECT
        currency,
        rate,
        unnest(generate_series(from_hour, coalesce(next_hour - 1, greatest(from_hour, last_order.hour)))) AS hour
    FROM rates CROSS JOIN last_order
)
SELECT
    o.order_id,
    o.customer_id,
    o.product_id,
    o.order_date,
    o.quantity,
    o.status,
    coalesce(
        CAST(o.quantity AS DOUBLE) * CAST(o.unit_price AS DOUBLE)
            / CASE WHEN o.currency = 'USD' THEN 1.0 ELSE r.rate END,
        0.0
    ) AS revenue_usd
FROM rate_by_hour r
RIGHT JOIN silver.orders o
    ON r.currency = o.currency
   AND r.hour = to_unixtime(o.order_ts) / 3600
