-- Idempotency-Key records: the first response to a key, per partner key, for 24 h.
CREATE TABLE idempotency_keys (
    -- SHA-256 of the API key the request carried: keys are per partner key.
    scope         TEXT NOT NULL,
    idem_key      TEXT NOT NULL,
    -- SHA-256 of method, path and body: the same key with another request is refused.
    request_hash  TEXT NOT NULL,
    -- 'in_flight' until the first request answered, then 'done'.
    state         TEXT NOT NULL,
    status_code   INTEGER,
    response_body TEXT,
    created_at    TEXT NOT NULL,
    -- An in-flight record whose request died is taken over after this.
    locked_until  TEXT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
