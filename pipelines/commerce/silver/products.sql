SELECT
    product_id,
    name,
    category,
    CASE WHEN regexp_like(list_price, '^[+-]?[0-9]+([.][0-9]+)?$')
         THEN try_cast(list_price AS DECIMAL(18, 2)) END AS list_price,
    currency,
    _source_file,
    _source_line,
    _ingest_ts
FROM input
