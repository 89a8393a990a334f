-- One row per (event_date, country, segment, event_type). Events whose customer is missing
-- from silver count under country = segment = 'UNKNOWN' (a left join, as in daily_sales).
--
-- Distinct customers and sessions are counted as rows of grouped sets rather than with
-- count(DISTINCT): DataFusion keeps a count(DISTINCT) set per group in memory and cannot
-- spill it (at SF 10 one such aggregation asked for 1.5 GB), while GROUP BY spills. Each
-- count groups the events once, by its own value: grouping by customer and session together
-- first made one aggregation per count over nearly every event.
-- count(x) over the distinct values skips a null x, as count(DISTINCT x) does.
WITH engaged AS (
    SELECT
        e.event_date,
        coalesce(c.country, 'UNKNOWN') AS country,
        CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
        e.event_type,
        e.customer_id,
        e.session_id
    FROM silver.events e
    LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
),
by_customer AS (
    SELECT event_date, country, segment, event_type, sum(events) AS events, count(customer_id) AS customers
    FROM (
        SELECT event_date, country, segment, event_type, customer_id, count(*) AS events
        FROM engaged
        GROUP BY 1, 2, 3, 4, 5
    )
    GROUP BY 1, 2, 3, 4
),
by_session AS (
    SELECT event_date, country, segment, event_type, count(session_id) AS sessions
    FROM (SELECT DISTINCT event_date, country, segment, event_type, session_id FROM engaged)
    GROUP BY 1, 2, 3, 4
)
SELECT
    c.event_date,
    c.country,
    c.segment,
    c.event_type,
    CAST(c.events AS BIGINT) AS events,
    c.customers,
    s.sessions
FROM by_customer c
JOIN by_session s
    ON s.event_date = c.event_date
   AND s.country = c.country
   AND s.segment = c.segment
   AND s.event_type IS NOT DISTINCT FROM c.event_type
