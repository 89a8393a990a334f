-- One row per currency per FX document; rate_hour is the document's hour.
SELECT
    currency,
    date_trunc('hour', parse_timestamp("timestamp")) AS rate_hour,
    CAST(rate AS DOUBLE) AS rate,
    base,
    parse_timestamp("timestamp") AS fx_timestamp,
    _source_file,
    _source_line,
    _ingest_ts
FROM input
