-- One row per (event_date, country, segment, event_type). Events whose customer is missing
-- from silver count under country = segment = 'UNKNOWN' (a left join, as in daily_sales).
--
-- The events are grouped by (date, type, customer, session) before the join with customers,
-- whose country and segment are one per customer: the join meets one row per group instead
-- of one per event, and it is made once for the three measures. Distinct customers and
-- sessions are counted with count(DISTINCT), whose sets DataFusion holds in memory: gold
-- builds this model a slice of dates at a time (`rebuild_by` below), so a set holds one
-- slice's values. At SF 10 that took 11.1-11.9 s against 12.7-13.7 s for a grouping per
-- measure, each joined with customers (three alternating runs each).
WITH per_session AS (
    SELECT event_date, event_type, customer_id, session_id, count(*) AS events
    FROM silver.events
    GROUP BY 1, 2, 3, 4
)
SELECT
    e.event_date,
    coalesce(c.country, 'UNKNOWN') AS country,
    CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
    e.event_type,
    CAST(sum(e.events) AS BIGINT) AS events,
    count(DISTINCT e.customer_id) AS customers,
    -- A session is counted once in its group, whichever customers it was seen with; a null
    -- session_id is not counted.
    count(DISTINCT e.session_id) AS sessions
FROM per_session e
LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
GROUP BY 1, 2, 3, 4
