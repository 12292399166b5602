-- The SMS pumping guard: each SMS transaction's number range, and the
-- ranges paused. Adding a nullable column rewrites nothing.
ALTER TABLE transactions ADD COLUMN number_range TEXT;
CREATE TABLE number_range_pauses (
    number_range TEXT PRIMARY KEY,
    paused_at    TIMESTAMPTZ NOT NULL,
    paused_until TIMESTAMPTZ NOT NULL,
    -- The window's sends and confirmations that caused the pause.
    sends        BIGINT NOT NULL,
    succeeded    BIGINT NOT NULL,
    -- Sends before this do not count (an operator lifted the pause then).
    released_at  TIMESTAMPTZ
);
