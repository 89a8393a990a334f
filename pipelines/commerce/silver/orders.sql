SELECT
    order_id,
    customer_id,
    product_id,
    parse_timestamp(order_ts) AS order_ts,
    CAST(parse_timestamp(order_ts) AS DATE) AS order_date,
    CAST(quantity AS INT) AS quantity,
    CAST(unit_price AS DECIMAL(18, 2)) AS unit_price,
    currency,
    upper(trim(status)) AS status,
    parse_timestamp(updated_at) AS updated_at,
    _source_file,
    _source_line,
    _ingest_ts
FROM input
