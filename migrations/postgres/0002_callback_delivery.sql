-- Callback delivery: the exact body as text, worker leases, the attempt log,
-- and retention bookkeeping.
ALTER TABLE outbox ALTER COLUMN payload TYPE TEXT USING payload::text;
ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
ALTER TABLE outbox ADD COLUMN lease_until TIMESTAMPTZ;
ALTER TABLE outbox ADD COLUMN finished_at TIMESTAMPTZ;

CREATE TABLE callback_attempts (
    id           BIGSERIAL PRIMARY KEY,
    outbox_id    UUID NOT NULL REFERENCES outbox (id),
    attempted_at TIMESTAMPTZ NOT NULL,
    -- The partner's HTTP status, or NULL with `error` when there was no answer.
    status_code  INTEGER,
    error        TEXT,
    latency_ms   BIGINT NOT NULL
);
CREATE INDEX callback_attempts_outbox ON callback_attempts (outbox_id, id);

-- Set when retention removed the transaction's personal data.
ALTER TABLE transactions ADD COLUMN purged_at TIMESTAMPTZ;
CREATE INDEX transactions_unpurged ON transactions (created_at) WHERE purged_at IS NULL AND status_code <> 210;
