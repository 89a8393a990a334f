SELECT
    customer_id,
    trim(name) AS name,
    lower(trim(email)) AS email,
    upper(trim(country)) AS country,
    lower(segment) AS segment,
    parse_timestamp(created_at) AS created_at,
    parse_timestamp(updated_at) AS updated_at,
    _source_file,
    _source_line,
    _ingest_ts
FROM input
