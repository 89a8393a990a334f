-- daily_engagement updated from the rows of silver.events and silver.customers that changed
-- (`changed.events`, `changed.customers`: old rows `delete`, new rows `insert`), without
-- reading every event. The affected events are the changed ones and every event of a
-- customer whose row changed (its events may move to other groups); all other events are
-- alike before and after, joined with the same customer. So, per group:
-- - events: as built, plus the affected events now, less the affected events before;
-- - customers and sessions (distinct counts): a (group, value) pair that the affected events
--   hold on one side only comes or goes, unless an unaffected event holds it too.
-- Each step is a table of its own so that it runs once: DataFusion runs a WITH query again
-- wherever it is read. (`IS NOT DISTINCT FROM` is in parentheses: the parser reads
-- `a IS NOT DISTINCT FROM b AND c` as `a IS NOT DISTINCT FROM (b AND c)`.)

-- Customers whose silver row changed.
CREATE TABLE de_moved AS
SELECT DISTINCT customer_id FROM changed.customers;

-- The affected events, once per side they are on (is_new: after the change), with their
-- customer's country and segment on that side.
CREATE TABLE de_affected AS
WITH sides AS (
    -- Every event of a moved customer: after, and before too unless it was inserted.
    SELECT e.event_date, e.event_type, e.customer_id, e.session_id, true AS moved,
           true AS after, i.event_id IS NULL AS before
    FROM silver.events e
    JOIN de_moved m ON m.customer_id = e.customer_id
    LEFT JOIN (SELECT event_id FROM changed.events WHERE _change_type = 'insert') i
      ON i.event_id = e.event_id
    UNION ALL
    -- Inserted events of other customers: after alone.
    SELECT c.event_date, c.event_type, c.customer_id, c.session_id, false, true, false
    FROM changed.events c
    WHERE c._change_type = 'insert'
      AND NOT EXISTS (SELECT 1 FROM de_moved m WHERE m.customer_id = c.customer_id)
    UNION ALL
    -- Deleted events: before alone.
    SELECT d.event_date, d.event_type, d.customer_id, d.session_id,
           m.customer_id IS NOT NULL, false, true
    FROM changed.events d
    LEFT JOIN de_moved m ON m.customer_id = d.customer_id
    WHERE d._change_type = 'delete'
),
attributed AS (
    -- A customer that did not move has the same row on both sides; a moved one had its
    -- deleted row before (none: missing), and has its current row after.
    SELECT s.event_date, s.event_type, s.customer_id, s.session_id, side.is_new,
           CASE WHEN side.is_new OR NOT s.moved THEN now.customer_id IS NOT NULL
                ELSE was.customer_id IS NOT NULL END AS known,
           CASE WHEN side.is_new OR NOT s.moved THEN now.country ELSE was.country END AS country,
           CASE WHEN side.is_new OR NOT s.moved THEN now.segment ELSE was.segment END AS segment
    FROM sides s
    CROSS JOIN (VALUES (true), (false)) AS side(is_new)
    LEFT JOIN silver.customers now ON now.customer_id = s.customer_id
    LEFT JOIN (SELECT customer_id, country, segment FROM changed.customers
               WHERE _change_type = 'delete') was
      ON was.customer_id = s.customer_id
    WHERE (side.is_new AND s.after) OR (NOT side.is_new AND s.before)
)
-- As daily_engagement.sql groups them: a missing customer counts under UNKNOWN.
SELECT event_date,
       CASE WHEN known THEN coalesce(country, 'UNKNOWN') ELSE 'UNKNOWN' END AS country,
       CASE WHEN known THEN segment ELSE 'UNKNOWN' END AS segment,
       event_type, customer_id, session_id, is_new
FROM attributed;

-- The (group, value) pairs of the affected events, each copy as daily_engagement.sql makes
-- them (its customer, its session), with the events that hold it after and before.
CREATE TABLE de_pairs AS
SELECT event_date, country, segment, event_type, k.is_customer,
       CASE WHEN k.is_customer THEN customer_id ELSE session_id END AS value,
       count(*) FILTER (WHERE is_new) AS after,
       count(*) FILTER (WHERE NOT is_new) AS before
FROM de_affected
CROSS JOIN (VALUES (true), (false)) AS k(is_customer)
GROUP BY 1, 2, 3, 4, 5, 6;

-- The pairs held on one side alone, that an unaffected event holds too: those stay. An
-- unaffected event is a current one that was not inserted and whose customer did not move
-- (so its customer's row is the current one on both sides).
CREATE TABLE de_held AS
WITH probe AS (
    SELECT DISTINCT event_date, event_type, is_customer, value
    FROM de_pairs
    WHERE value IS NOT NULL AND (after > 0) <> (before > 0)
),
hits AS (
    -- One join per copy: a join of the events with both copies at once, on a key that picks
    -- the copy's column (CASE), lost that condition in planning and matched every value.
    SELECT e.event_id, e.event_date, e.event_type, e.customer_id, true AS is_customer, p.value
    FROM silver.events e
    JOIN probe p
      ON p.event_date = e.event_date AND p.event_type = e.event_type AND p.value = e.customer_id
    WHERE p.is_customer
    UNION ALL
    SELECT e.event_id, e.event_date, e.event_type, e.customer_id, false, p.value
    FROM silver.events e
    JOIN probe p
      ON p.event_date = e.event_date AND p.event_type = e.event_type AND p.value = e.session_id
    WHERE NOT p.is_customer
)
SELECT DISTINCT h.event_date, coalesce(c.country, 'UNKNOWN') AS country,
       CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
       h.event_type, h.is_customer, h.value
FROM hits h
LEFT JOIN silver.customers c ON c.customer_id = h.customer_id
WHERE NOT EXISTS (SELECT 1 FROM changed.events i
                  WHERE i._change_type = 'insert' AND i.event_id = h.event_id)
  AND NOT EXISTS (SELECT 1 FROM de_moved m WHERE m.customer_id = h.customer_id);

WITH events AS (
    -- Every affected group: each event counts once, in its customer's copy.
    SELECT event_date, country, segment, event_type, sum(after) - sum(before) AS events
    FROM de_pairs
    WHERE is_customer
    GROUP BY 1, 2, 3, 4
),
counted AS (
    SELECT p.event_date, p.country, p.segment, p.event_type,
           sum(CASE WHEN p.after > 0 THEN 1 ELSE -1 END) FILTER (WHERE p.is_customer) AS customers,
           sum(CASE WHEN p.after > 0 THEN 1 ELSE -1 END) FILTER (WHERE NOT p.is_customer) AS sessions
    FROM de_pairs p
    WHERE p.value IS NOT NULL AND (p.after > 0) <> (p.before > 0)
      AND NOT EXISTS (SELECT 1 FROM de_held h
                      WHERE h.event_date = p.event_date
                        AND (h.country IS NOT DISTINCT FROM p.country)
                        AND (h.segment IS NOT DISTINCT FROM p.segment)
                        AND h.event_type = p.event_type
                        AND h.is_customer = p.is_customer
                        AND h.value = p.value)
    GROUP BY 1, 2, 3, 4
)
SELECT e.event_date, e.country, e.segment, e.event_type,
       coalesce(b.events, 0) + e.events AS events,
       coalesce(b.customers, 0) + coalesce(c.customers, 0) AS customers,
       coalesce(b.sessions, 0) + coalesce(c.sessions, 0) AS sessions,
       coalesce(b.events, 0) + e.events = 0 AS _deleted
FROM events e
LEFT JOIN counted c
  ON c.event_date = e.event_date
 AND (c.country IS NOT DISTINCT FROM e.country)
 AND (c.segment IS NOT DISTINCT FROM e.segment)
 AND c.event_type = e.event_type
LEFT JOIN gold.daily_engagement b
  ON b.event_date = e.event_date
 AND (b.country IS NOT DISTINCT FROM e.country)
 AND (b.segment IS NOT DISTINCT FROM e.segment)
 AND b.event_type = e.event_type
