-- no-transaction
-- A partner's funnel over a time range (`GET /v1/stats`). Built CONCURRENTLY,
-- so a large table keeps taking writes while a new version migrates it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_partner_created ON transactions (partner_id, created_at);
