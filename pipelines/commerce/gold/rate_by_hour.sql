-- Each currency's rate by UTC hour (hours since the epoch), for every hour it is in force:
-- from its rate_hour until the currency's next rate, or the last order's hour. A missing hour
-- takes the last earlier rate. It turns the as-of lookup of orders_priced.sql into an equi-join
-- on (currency, hour), and has at most currencies x hours rows, whatever the number of orders.
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
)
SELECT
    currency,
    rate,
    unnest(generate_series(from_hour, coalesce(next_hour - 1, greatest(from_hour, last_order.hour)))) AS hour
FROM rates CROSS JOIN last_order
