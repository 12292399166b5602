-- The region of the phone (ISO 3166 alpha-2), for the verification funnel
-- (`GET /v1/stats`, `handset stats`), and the indexes its time ranges use.
ALTER TABLE transactions ADD COLUMN country TEXT;
CREATE INDEX transactions_partner_created ON transactions (partner_id, created_at);
CREATE INDEX transactions_created ON transactions (created_at);
