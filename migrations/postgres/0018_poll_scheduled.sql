-- no-transaction
-- The due polls (`status_code = 210 AND next_poll_at <= now`) hold only the
-- pending transactions that have a poll scheduled: most never do (an SMS
-- code, the sandbox), and their NULL entries were written at every start.
-- Replaces `transactions_poll_due` (dropped by the next migration).
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_poll_scheduled ON transactions (next_poll_at)
    WHERE status_code = 210 AND next_poll_at IS NOT NULL;
