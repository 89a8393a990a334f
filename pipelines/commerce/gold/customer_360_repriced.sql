-- The customers whose revenue a changed FX rate can move. A rate prices its currency's
-- orders from its hour until that currency's next rate, so the orders it can price are those
-- in its currency at or after its hour; `changed` holds the rates that differ (old and new).
SELECT DISTINCT o.customer_id
FROM silver.orders o
JOIN (
    SELECT currency, min(rate_hour) AS since
    FROM changed
    WHERE rate_hour IS NOT NULL
    GROUP BY currency
) r
  ON o.currency = r.currency
 AND o.order_ts >= r.since
