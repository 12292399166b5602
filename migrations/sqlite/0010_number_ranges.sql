-- The SMS pumping guard: each SMS transaction's number range, and the
-- ranges paused.
ALTER TABLE transactions ADD COLUMN number_range TEXT;
CREATE INDEX transactions_number_range ON transactions (number_range, created_at) WHERE number_range IS NOT NULL;
CREATE TABLE number_range_pauses (
    number_range TEXT PRIMARY KEY,
    paused_at    TEXT NOT NULL,
    paused_until TEXT NOT NULL,
    -- The window's sends and confirmations that caused the pause.
    sends        INTEGER NOT NULL,
    succeeded    INTEGER NOT NULL,
    -- Sends before this do not count (an operator lifted the pause then).
    released_at  TEXT
);
