-- Callback delivery: worker leases, the attempt log, and retention
-- bookkeeping (the payload column is already text here).
ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
ALTER TABLE outbox ADD COLUMN lease_until TEXT;
ALTER TABLE outbox ADD COLUMN finished_at TEXT;

CREATE TABLE callback_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id    BLOB NOT NULL REFERENCES outbox (id),
    attempted_at TEXT NOT NULL,
    -- The partner's HTTP status, or NULL with `error` when there was no answer.
    status_code  INTEGER,
    error        TEXT,
    latency_ms   INTEGER NOT NULL
);
CREATE INDEX callback_attempts_outbox ON callback_attempts (outbox_id, id);

-- Set when retention removed the transaction's personal data.
ALTER TABLE transactions ADD COLUMN purged_at TEXT;
CREATE INDEX transactions_unpurged ON transactions (created_at) WHERE purged_at IS NULL AND status_code <> 210;
