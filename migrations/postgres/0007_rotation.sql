-- Rotating a partner's API key or webhook secret may keep the previous one
-- working for an overlap (`handset partner rotate-key ID --overlap 24h`):
-- the previous key still authenticates, and callbacks are signed with both
-- secrets, until the given time.
ALTER TABLE partners ADD COLUMN previous_api_key_hash TEXT UNIQUE;
ALTER TABLE partners ADD COLUMN previous_api_key_expires_at TIMESTAMPTZ;
ALTER TABLE partners ADD COLUMN previous_webhook_secret TEXT;
ALTER TABLE partners ADD COLUMN previous_webhook_secret_expires_at TIMESTAMPTZ;
