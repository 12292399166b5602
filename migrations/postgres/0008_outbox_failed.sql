-- no-transaction
-- Replaying a partner's failed callbacks finds them by when they gave up.
-- Built CONCURRENTLY (outside a transaction), so a large outbox keeps taking
-- writes while a new version migrates it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_failed ON outbox (partner_id, finished_at) WHERE state = 'failed';
