-- The provider-reference lookup and the due polls index only the rows they
-- can find: a transaction with a provider reference, a pending one with a
-- poll scheduled. The NULL entries of every other transaction were written
-- at its start (and the reference's again at its final write) for nothing.
-- `provider_ref = ?` and `next_poll_at <= ?` imply the conditions, so the
-- queries use the indexes.
DROP INDEX transactions_provider_ref;
CREATE INDEX transactions_provider_ref_set ON transactions (provider, provider_ref) WHERE provider_ref IS NOT NULL;
DROP INDEX transactions_poll_due;
CREATE INDEX transactions_poll_scheduled ON transactions (next_poll_at) WHERE status_code = 210 AND next_poll_at IS NOT NULL;
