-- Rate limits: hits per scope (partner, partner+product, phone hash) per fixed
-- window, shared by every replica on this database.
CREATE TABLE rate_counters (
    scope        TEXT NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    hits         INTEGER NOT NULL,
    PRIMARY KEY (scope, window_start)
);
CREATE INDEX rate_counters_window ON rate_counters (window_start);
