-- no-transaction
-- The funnel across partners over a time range (`handset stats`).
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_created ON transactions (created_at);
