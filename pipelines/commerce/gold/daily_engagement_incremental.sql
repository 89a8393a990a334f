-- daily_engagement updated from the rows of silver.events and silver.customers that changed
-- (`changed.events`, `changed.customers`: old rows `delete`, new rows `insert`), without
-- aggregating every event (two steps, shared with customer_360's script, find the events it
-- needs, by customer and by session). The affected events are the changed ones and every
-- event of a customer whose row changed (its events may move to other groups); all other
-- events are alike before and after, joined with the same customer. So, per group:
-- - events: as built, plus the affected events now, less the affected events before;
-- - customers and sessions (distinct counts): a (group, value) pair that the affected events
--   hold on one side only comes or goes, unless an unaffected event holds it too.
-- Each step is a table of its own so that it runs once: DataFusion runs a WITH query again
-- wherever it is read. (`IS NOT DISTINCT FROM` is in parentheses: the parser reads
-- `a IS NOT DISTINCT FROM b AND c` as `a IS NOT DISTINCT FROM (b AND c)`.)

-- It runs after the steps of events_of_changes.sql (shared with customer_360's script):
-- events_of_changed_customers and events_of_changed_sessions.

-- Customers whose silver row changed.
CREATE TABLE de_moved AS
SELECT DISTINCT customer_id FROM changed.customers;

-- The affected events, with a count for each side (after the change, before it): every
-- affected row counts 1 on its side, and an inserted event of a moved customer counts -1
-- before, which takes back the 1 it has there as one of that customer's current events (so
-- the events are read without their ids). Then each side with its customer's country and
-- segment on that side (is_new: after).
CREATE TABLE de_sides AS
-- Every current event of a moved customer, after and before.
SELECT e.event_date, e.event_type, e.customer_id, e.session_id, true AS moved,
       1 AS after, 1 AS before
FROM events_of_changed_customers e
UNION ALL
-- Inserted events: after, for a customer that did not move; not before, for one that did.
SELECT i.event_date, i.event_type, i.customer_id, i.session_id, m.customer_id IS NOT NULL,
       CASE WHEN m.customer_id IS NULL THEN 1 ELSE 0 END,
       CASE WHEN m.customer_id IS NULL THEN 0 ELSE -1 END
FROM changed.events i
LEFT JOIN de_moved m ON m.customer_id = i.customer_id
WHERE i._change_type = 'insert'
UNION ALL
-- Deleted events: before.
SELECT d.event_date, d.event_type, d.customer_id, d.session_id,
       m.customer_id IS NOT NULL, 0, 1
FROM changed.events d
LEFT JOIN de_moved m ON m.customer_id = d.customer_id
WHERE d._change_type = 'delete';

-- Grouped as daily_engagement.sql groups them: a missing customer counts under UNKNOWN.
-- After, every customer has its current row; before, a moved one had its deleted row (none:
-- missing) and any other its current row.
CREATE TABLE de_affected AS
SELECT s.event_date, coalesce(now.country, 'UNKNOWN') AS country,
       CASE WHEN now.customer_id IS NULL THEN 'UNKNOWN' ELSE now.segment END AS segment,
       s.event_type, s.customer_id, s.session_id, true AS is_new, s.after AS n
FROM de_sides s
LEFT JOIN silver.customers now ON now.customer_id = s.customer_id
WHERE s.after <> 0
UNION ALL
SELECT s.event_date,
       CASE WHEN s.moved THEN coalesce(was.country, 'UNKNOWN') ELSE coalesce(now.country, 'UNKNOWN') END,
       CASE WHEN s.moved THEN (CASE WHEN was.customer_id IS NULL THEN 'UNKNOWN' ELSE was.segment END)
            ELSE (CASE WHEN now.customer_id IS NULL THEN 'UNKNOWN' ELSE now.segment END) END,
       s.event_type, s.customer_id, s.session_id, false, s.before
FROM de_sides s
LEFT JOIN silver.customers now ON now.customer_id = s.customer_id
LEFT JOIN (SELECT customer_id, country, segment FROM changed.customers
           WHERE _change_type = 'delete') was
  ON was.customer_id = s.customer_id
WHERE s.before <> 0;

-- The (group, value) pairs of the affected events, each copy as daily_engagement.sql makes
-- them (its customer, its session), with the affected events that hold it after and before.
CREATE TABLE de_pairs AS
SELECT event_date, country, segment, event_type, k.is_customer,
       CASE WHEN k.is_customer THEN customer_id ELSE session_id END AS value,
       sum(CASE WHEN is_new THEN n ELSE 0 END) AS after,
       sum(CASE WHEN is_new THEN 0 ELSE n END) AS before
FROM de_affected
CROSS JOIN (VALUES (true), (false)) AS k(is_customer)
GROUP BY 1, 2, 3, 4, 5, 6;

-- The (date, type, customer) pairs probed below. A moved customer's events are all
-- affected: none of its pairs is probed. The others are pairs of changed events, so they
-- fall on the dates the batch touched.
CREATE TABLE de_probed_customers AS
SELECT DISTINCT event_date, event_type, value
FROM de_pairs p
WHERE is_customer AND value IS NOT NULL AND (after > 0) <> (before > 0)
  AND NOT EXISTS (SELECT 1 FROM de_moved m WHERE m.customer_id = p.value);

-- The pairs held on one side alone that an unaffected event holds too: those stay. The
-- current events of such a pair are its affected ones (`after`) and its unaffected ones,
-- so there is one of the latter when the current events outnumber `after`.
CREATE TABLE de_held AS
WITH probe AS (
    SELECT event_date, country, segment, event_type, is_customer, value, after
    FROM de_pairs
    WHERE value IS NOT NULL AND (after > 0) <> (before > 0)
),
-- One join per copy: a join of the events with both copies at once, on a key that picks
-- the copy's column (CASE), lost that condition in planning and matched every value.
by_customer AS (
    -- The engine works out the date bounds first, so the scan reads those dates alone.
    SELECT e.event_date, e.event_type, e.customer_id AS value, count(*) AS current
    FROM silver.events e
    JOIN de_probed_customers p
      ON p.event_date = e.event_date AND p.event_type = e.event_type AND p.value = e.customer_id
    WHERE e.event_date >= (SELECT min(event_date) FROM de_probed_customers)
      AND e.event_date <= (SELECT max(event_date) FROM de_probed_customers)
    GROUP BY 1, 2, 3
),
by_session AS (
    -- A session's events may have several customers, each in its own group. The sessions
    -- probed are those of affected events, whose events are all in events_of_changed_sessions.
    SELECT e.event_date, e.event_type, e.session_id AS value,
           coalesce(c.country, 'UNKNOWN') AS country,
           CASE WHEN c.customer_id IS NULL THEN 'UNKNOWN' ELSE c.segment END AS segment,
           count(*) AS current
    FROM events_of_changed_sessions e
    JOIN (SELECT DISTINCT event_date, event_type, value FROM probe WHERE NOT is_customer) p
      ON p.event_date = e.event_date AND p.event_type = e.event_type AND p.value = e.session_id
    LEFT JOIN silver.customers c ON c.customer_id = e.customer_id
    GROUP BY 1, 2, 3, 4, 5
)
SELECT p.event_date, p.country, p.segment, p.event_type, p.is_customer, p.value
FROM probe p
JOIN by_customer h
  ON h.event_date = p.event_date AND h.event_type = p.event_type AND h.value = p.value
WHERE p.is_customer AND h.current > p.after
UNION ALL
SELECT p.event_date, p.country, p.segment, p.event_type, p.is_customer, p.value
FROM probe p
JOIN by_session h
  ON h.event_date = p.event_date AND h.event_type = p.event_type AND h.value = p.value
 AND h.country = p.country AND (h.segment IS NOT DISTINCT FROM p.segment)
WHERE NOT p.is_customer AND h.current > p.after;

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
