-- Each currency's rate by UTC hour (hours since the epoch), for every hour it is in force:
-- from its rate_hour until the currency's next rate, or the end of the last order's day. A
-- missing hour takes the last earlier rate. It turns the as-of lookup of orders_priced.sql
-- into an equi-join on (currency, hour), and has at most currencies x hours rows, whatever
-- the number of orders.
-- The last order's day is its greatest order_date (an order's date is the UTC day of its
-- hour): a partition column, answered from the table's log, where the greatest order_ts read
-- the timestamp of every order (9.9 M at SF 10) each time a model priced orders.
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
    SELECT to_unixtime(CAST(max(order_date) AS TIMESTAMP)) / 3600 + 23 AS hour FROM silver.orders
)
SELECT
    currency,
    rate,
    unnest(generate_series(from_hour, coalesce(next_hour - 1, greatest(from_hour, last_order.hour)))) AS hour
FROM rates CROSS JOIN last_order
