SELECT
    message['event_id'] AS event_id,
    message['customer_id'] AS customer_id,
    lower(message['event_type']) AS event_type,
    parse_timestamp(message['event_ts']) AS event_ts,
    CAST(parse_timestamp(message['event_ts']) AS DATE) AS event_date,
    message['session_id'] AS session_id,
    message['properties'] AS properties,
    _source_file,
    _source_line,
    _ingest_ts
FROM input
