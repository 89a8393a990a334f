-- One row per (order_date, country, category) over PLACED and SHIPPED orders.
SELECT
    o.order_date,
    coalesce(c.country, 'UNKNOWN') AS country,
    coalesce(p.category, 'UNKNOWN') AS category,
    count(*) AS orders,
    CAST(sum(o.quantity) AS BIGINT) AS units,
    -- Summed in double precision, rounded to cents once at the end.
    CAST(sum(o.revenue_usd) AS DECIMAL(18, 2)) AS revenue_usd
FROM gold.orders_priced o
LEFT JOIN silver.customers c ON c.customer_id = o.customer_id
LEFT JOIN silver.products p ON p.product_id = o.product_id
WHERE o.status IN ('PLACED', 'SHIPPED')
GROUP BY o.order_date, coalesce(c.country, 'UNKNOWN'), coalesce(p.category, 'UNKNOWN')
