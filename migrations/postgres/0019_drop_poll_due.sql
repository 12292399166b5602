-- no-transaction
-- Superseded by `transactions_poll_scheduled`.
DROP INDEX CONCURRENTLY IF EXISTS transactions_poll_due;
