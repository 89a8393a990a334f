-- One row per (event_date, country, segment, event_type). Events whose customer is missing
-- from silver count under country = segment = 'UNKNOWN' (a left join, as in daily_sales).
--
-- Each event meets the join with customers itself. Grouping by (date, type, customer,
-- session) first turned SF 10's 29.7 M events into 21.4 M groups (a session is one
-- customer's day), and that four-key aggregation cost more than the join rows it spared:
-- gold alone, alternating, daily_engagement took a median 12.90 s against 15.15 s and
-- 11.13 s against 11.68 s (`benches/results/layers-gold-sf10-no-per-session-{a,b}.json`).
--
-- Distinct customers and sessions are counted as Spark plans two DISTINCT aggregates
-- (its Expand): each joined row goes out twice, once carrying its customer and once its
-- session, one grouping keeps each (group, value) once, and the outer grouping counts them.
-- DataFusion's own count(DISTINCT) on text keeps a hash set per output group, each sized
-- for 512 values up front: at SF 1 a slice of 45 dates (48,600 sets) held 1.33 GB against
-- 0.80-0.90 GB this way, and it cannot spill. Gold builds this model a slice of dates at a
-- time (`rebuild_by` below), so every grouping holds one slice's values.
WITH per_value AS (
    SELECT
        e.event_date,
        coalesce(c.country, 'UNKNOWN') AS country,
        CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
        e.event_type,
        k.is_customer,
        CASE WHEN k.is_customer THEN e.customer_id ELSE e.session_id END AS value,
        count(*) AS events
    FROM silver.events e
    LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
    CROSS JOIN (VALUES (true), (false)) AS k(is_customer)
    GROUP BY 1, 2, 3, 4, 5, 6
)
SELECT
    event_date,
    country,
    segment,
    event_type,
    -- Every event is counted once, in its customer's copy.
    CAST(sum(events) FILTER (WHERE is_customer) AS BIGINT) AS events,
    -- count(value) skips a null customer or session, as count(DISTINCT) does: a session is
    -- counted once in its group, whichever customers it was seen with.
    count(value) FILTER (WHERE is_customer) AS customers,
    count(value) FILTER (WHERE NOT is_customer) AS sessions
FROM per_value
GROUP BY 1, 2, 3, 4
