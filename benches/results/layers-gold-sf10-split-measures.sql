-- One row per (event_date, country, segment, event_type). Events whose customer is missing
-- from silver count under country = segment = 'UNKNOWN' (a left join, as in daily_sales).
WITH by_customer AS (
    SELECT event_date, event_type, customer_id, count(*) AS events
    FROM silver.events
    GROUP BY 1, 2, 3
),
customers AS (
    SELECT
        e.event_date,
        coalesce(c.country, 'UNKNOWN') AS country,
        CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
        e.event_type,
        CAST(sum(e.events) AS BIGINT) AS events,
        count(e.customer_id) AS customers
    FROM by_customer e
    LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
    GROUP BY 1, 2, 3, 4
),
per_session AS (
    SELECT
        e.event_date,
        coalesce(c.country, 'UNKNOWN') AS country,
        CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
        e.event_type,
        e.session_id
    FROM silver.events e
    LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
    GROUP BY 1, 2, 3, 4, 5
),
sessions AS (
    SELECT event_date, country, segment, event_type, count(session_id) AS sessions
    FROM per_session
    GROUP BY 1, 2, 3, 4
)
SELECT
    c.event_date,
    c.country,
    c.segment,
    c.event_type,
    c.events,
    c.customers,
    s.sessions
FROM customers c
JOIN sessions s
  ON s.event_date = c.event_date
 AND s.country = c.country
 AND (s.segment IS NOT DISTINCT FROM c.segment)
 AND s.event_type = c.event_type
