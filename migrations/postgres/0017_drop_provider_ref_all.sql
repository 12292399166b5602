-- no-transaction
-- Superseded by `transactions_provider_ref_set`.
DROP INDEX CONCURRENTLY IF EXISTS transactions_provider_ref;
