-- Asynchronous provider results: the provider's verification id, lookup by
-- the provider's transaction id (webhooks), and polling schedule.
ALTER TABLE transactions ADD COLUMN provider_verification TEXT;
ALTER TABLE transactions ADD COLUMN next_poll_at TIMESTAMPTZ;
ALTER TABLE transactions ADD COLUMN poll_attempts INTEGER NOT NULL DEFAULT 0;
CREATE INDEX transactions_provider_ref ON transactions (provider, provider_ref);
CREATE INDEX transactions_poll_due ON transactions (next_poll_at) WHERE status_code = 210;
