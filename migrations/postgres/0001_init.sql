-- Partners, verifications, transactions and the callback outbox.
CREATE TABLE partners (
    id             UUID PRIMARY KEY,
    name           TEXT NOT NULL,
    -- SHA-256 of the API key; the key itself is never stored.
    api_key_hash   TEXT NOT NULL UNIQUE,
    products       JSONB NOT NULL,
    active         BOOLEAN NOT NULL DEFAULT TRUE,
    webhook_secret TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE verifications (
    id         UUID PRIMARY KEY,
    partner_id UUID NOT NULL REFERENCES partners (id),
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE transactions (
    id              UUID PRIMARY KEY,
    verification_id UUID NOT NULL REFERENCES verifications (id),
    partner_id      UUID NOT NULL REFERENCES partners (id),
    product         TEXT NOT NULL,
    provider        TEXT NOT NULL,
    phone           TEXT,
    birth_date      TEXT,
    status_code     INTEGER NOT NULL CHECK (status_code IN (200, 210, 300)),
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ,
    attempts_used   INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL DEFAULT 0,
    -- Salted hash of a code handset checks itself; never the code.
    code_hash       TEXT,
    provider_ref    TEXT,
    redirect_url    TEXT,
    redirect_uri    TEXT,
    callback_url    TEXT,
    name            JSONB,
    metadata        JSONB NOT NULL,
    result          JSONB
);
CREATE INDEX transactions_verification ON transactions (verification_id, created_at);
CREATE INDEX transactions_pending_expiry ON transactions (expires_at) WHERE status_code = 210;

-- Callbacks owed to partners, written in the same database transaction as the
-- state change that caused them.
CREATE TABLE outbox (
    id              UUID PRIMARY KEY,
    transaction_id  UUID NOT NULL REFERENCES transactions (id),
    partner_id      UUID NOT NULL REFERENCES partners (id),
    callback_url    TEXT NOT NULL,
    payload         JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_transaction ON outbox (transaction_id, created_at);
