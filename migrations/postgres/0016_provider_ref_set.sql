-- no-transaction
-- The provider-reference lookup (`provider`, `provider_ref`) holds only the
-- transactions that have a reference: a code handset checks itself (the
-- sandbox) never gets one, and an entry with a NULL reference was written
-- at its start and again at its final write for nothing. `provider_ref = $2`
-- implies the index's condition, so the lookup uses it. Replaces
-- `transactions_provider_ref` (dropped by the next migration).
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_provider_ref_set ON transactions (provider, provider_ref)
    WHERE provider_ref IS NOT NULL;
