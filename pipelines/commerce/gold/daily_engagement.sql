-- One row per (event_date, country, segment, event_type). Events whose customer is missing
-- from silver count under country = segment = 'UNKNOWN' (a left join, as in daily_sales).
SELECT
    e.event_date,
    coalesce(c.country, 'UNKNOWN') AS country,
    CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
    e.event_type,
    count(*) AS events,
    count(DISTINCT e.customer_id) AS customers,
    count(DISTINCT e.session_id) AS sessions
FROM silver.events e
LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
GROUP BY 1, 2, 3, 4
