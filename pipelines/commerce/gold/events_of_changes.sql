-- Steps that customer_360's and daily_engagement's incremental scripts both run first
-- (`steps` in pipeline.toml): the engine runs a step once a run, and the second script reads
-- the first one's rows (the same statement over the same changed rows). Each reads every
-- silver event, by customer and by session.

-- Every current event of a customer whose silver row changed (new ones included).
CREATE TABLE events_of_changed_customers AS
SELECT e.event_date, e.event_type, e.customer_id, e.session_id
FROM silver.events e
WHERE e.customer_id IN (SELECT customer_id FROM changed.customers);

-- Every current event of a session that a changed event holds, or an event above: all the
-- events of each session whose distinct count the change may move.
CREATE TABLE events_of_changed_sessions AS
SELECT e.event_date, e.event_type, e.customer_id, e.session_id
FROM silver.events e
WHERE e.session_id IN (
    SELECT session_id FROM changed.events
    UNION
    SELECT session_id FROM events_of_changed_customers
);
