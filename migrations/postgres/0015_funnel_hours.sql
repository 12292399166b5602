-- The funnel rolled up by the hour (`GET /v1/stats`, `handset stats`): the
-- job runner counts each closed hour's transactions once all of them have
-- ended, and a query sums these rows for the whole hours it covers instead
-- of reading every transaction. `bucket` is the time-to-success bucket of
-- the successes (NULL for the others), as the funnel's histogram has it.
CREATE TABLE funnel_hours (
    hour        TIMESTAMPTZ NOT NULL,
    partner_id  UUID NOT NULL,
    provider    TEXT NOT NULL,
    country     TEXT,
    product     TEXT NOT NULL,
    bucket      DOUBLE PRECISION,
    started     BIGINT NOT NULL,
    succeeded   BIGINT NOT NULL,
    failed      BIGINT NOT NULL,
    expired     BIGINT NOT NULL
);
CREATE INDEX funnel_hours_hour ON funnel_hours (hour);

-- Every hour before `rolled_until` is in funnel_hours (NULL: none yet).
CREATE TABLE funnel_rollup (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    rolled_until  TIMESTAMPTZ
);
INSERT INTO funnel_rollup (id, rolled_until) VALUES (1, NULL);
