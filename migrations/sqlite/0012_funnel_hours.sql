-- The funnel rolled up by the hour (`GET /v1/stats`, `handset stats`): the
-- job runner counts each closed hour's transactions once all of them have
-- ended, and a query sums these rows for the whole hours it covers instead
-- of reading every transaction. `bucket` is the time-to-success bucket of
-- the successes (NULL for the others), as the funnel's histogram has it.
CREATE TABLE funnel_hours (
    hour        TEXT NOT NULL,
    partner_id  BLOB NOT NULL,
    provider    TEXT NOT NULL,
    country     TEXT,
    product     TEXT NOT NULL,
    bucket      REAL,
    started     INTEGER NOT NULL,
    succeeded   INTEGER NOT NULL,
    failed      INTEGER NOT NULL,
    expired     INTEGER NOT NULL
);
CREATE INDEX funnel_hours_hour ON funnel_hours (hour);

-- Every hour before `rolled_until` is in funnel_hours (NULL: none yet).
CREATE TABLE funnel_rollup (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    rolled_until  TEXT
);
INSERT INTO funnel_rollup (id, rolled_until) VALUES (1, NULL);
