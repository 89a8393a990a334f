-- No lineage columns: the copies of an event are alike (keep = "any"), so no tie-break needs
-- them, and bronze keeps each copy's file and line. At SF 10 they were about half of each
-- row's bytes through silver's filters, split by date and Parquet encoding.
SELECT
    message['event_id'] AS event_id,
    message['customer_id'] AS customer_id,
    lower(message['event_type']) AS event_type,
    parse_timestamp(message['event_ts']) AS event_ts,
    CAST(parse_timestamp(message['event_ts']) AS DATE) AS event_date,
    message['session_id'] AS session_id,
    message['properties'] AS properties
FROM input
