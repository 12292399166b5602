-- The region of the phone (ISO 3166 alpha-2), for the verification funnel
-- (`GET /v1/stats`); transactions from before stay NULL (counted as an
-- unknown country). Adding a nullable column rewrites nothing.
ALTER TABLE transactions ADD COLUMN country TEXT;
