SELECT
    json_as_text(value, 'event_id') AS event_id,
    json_as_text(value, 'customer_id') AS customer_id,
    lower(json_as_text(value, 'event_type')) AS event_type,
    parse_timestamp(json_as_text(value, 'event_ts')) AS event_ts,
    CAST(parse_timestamp(json_as_text(value, 'event_ts')) AS DATE) AS event_date,
    json_as_text(value, 'session_id') AS session_id,
    json_as_text(value, 'properties') AS properties,
    _source_file,
    _source_line,
    _ingest_ts
FROM input
