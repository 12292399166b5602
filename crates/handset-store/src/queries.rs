//! The SQL both stores run, written once: `$n` parameters, `RETURNING` and
//! `ON CONFLICT` mean the same on Postgres and SQLite. Postgres binds them
//! with sqlx, SQLite with rusqlite (`sqlite::bind` reads `$n` the same way).
//! Where the dialects differ (one-statement writes on Postgres, claim locks),
//! the store's own module says so.

/// Column lists as macros, so queries stay `const` through `concat!`.
macro_rules! partner_columns {
    () => {
        "id, name, products, active, webhook_secret, created_at"
    };
}

/// The ends of a partner's rotation overlaps, read after `partner_columns!` (`PartnerRecordRow`).
macro_rules! partner_rotations {
    () => {
        "previous_api_key_expires_at, previous_webhook_secret_expires_at"
    };
}

/// The transaction's 27 columns; `bind_transaction` binds them as $1-$27 in this order.
macro_rules! transaction_columns {
    () => {
        "id, verification_id, partner_id, product, provider, phone, birth_date, \
         status_code, created_at, updated_at, expires_at, attempts_used, max_attempts, code_hash, provider_ref, \
         redirect_url, redirect_uri, callback_url, name, metadata, result, provider_verification, next_poll_at, \
         poll_attempts, country, number_range, routing"
    };
}

macro_rules! outbox_columns {
    () => {
        "id, transaction_id, partner_id, callback_url, payload, created_at"
    };
}

macro_rules! outbox_select {
    () => {
        "id, transaction_id, partner_id, callback_url, payload, created_at, state, next_attempt_at, attempts"
    };
}

pub(crate) use outbox_columns;

pub(crate) const INSERT_PARTNER: &str =
    concat!("INSERT INTO partners (", partner_columns!(), ", api_key_hash) VALUES ($1, $2, $3, $4, $5, $6, $7)");

pub(crate) const UPSERT_PARTNER: &str = concat!(
    "INSERT INTO partners (",
    partner_columns!(),
    ", api_key_hash) VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, products = excluded.products, \
     api_key_hash = excluded.api_key_hash"
);

/// A partner by its current key, or by its previous one while that overlap lasts.
pub(crate) const PARTNER_BY_KEY: &str = concat!(
    "SELECT ",
    partner_columns!(),
    ", CASE WHEN api_key_hash = $1 THEN NULL ELSE previous_api_key_expires_at END AS key_expires_at \
     FROM partners WHERE api_key_hash = $1 OR (previous_api_key_hash = $1 AND previous_api_key_expires_at > $2)"
);

pub(crate) const PARTNERS: &str =
    concat!("SELECT ", partner_columns!(), ", ", partner_rotations!(), " FROM partners ORDER BY created_at, id");

pub(crate) const PARTNER: &str =
    concat!("SELECT ", partner_columns!(), ", ", partner_rotations!(), " FROM partners WHERE id = $1");

/// Sets the current key (`$2`); with an end (`$3`), the old one stays valid
/// until then, else any previous one is dropped. SET reads the row as it was.
pub(crate) const ROTATE_API_KEY: &str = "UPDATE partners SET previous_api_key_hash = CASE WHEN $3 IS NULL THEN NULL \
     ELSE api_key_hash END, previous_api_key_expires_at = $3, api_key_hash = $2 WHERE id = $1";

/// As `ROTATE_API_KEY`, for the webhook signing secret.
pub(crate) const ROTATE_WEBHOOK_SECRET: &str = "UPDATE partners SET previous_webhook_secret = CASE WHEN $3 IS NULL \
     THEN NULL ELSE webhook_secret END, previous_webhook_secret_expires_at = $3, webhook_secret = $2 WHERE id = $1";

pub(crate) const REQUEUE_FAILED: &str = "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = $3, \
     finished_at = NULL, lease_owner = NULL, lease_until = NULL \
     WHERE partner_id = $1 AND state = 'failed' AND finished_at >= $2 AND payload <> '' RETURNING id";

/// Failed callbacks in the replay's range whose bodies retention removed.
pub(crate) const COUNT_FAILED_PURGED: &str = "SELECT COUNT(*) FROM outbox WHERE partner_id = $1 AND state = 'failed' \
     AND finished_at >= $2 AND payload = ''";

pub(crate) const SET_PARTNER_ACTIVE: &str = "UPDATE partners SET active = $2 WHERE id = $1";

pub(crate) const VERIFICATION: &str = "SELECT id, partner_id, created_at FROM verifications WHERE id = $1";

pub(crate) const INSERT_VERIFICATION: &str =
    "INSERT INTO verifications (id, partner_id, created_at) VALUES ($1, $2, $3)";

pub(crate) const INSERT_TRANSACTION: &str = concat!(
    "INSERT INTO transactions (",
    transaction_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
     $22, $23, $24, $25, $26, $27)"
);

/// Postgres: the verification (`$28`-`$30`) and the transaction in one statement.
pub(crate) const INSERT_START: &str = concat!(
    "WITH verification AS (INSERT INTO verifications (id, partner_id, created_at) VALUES ($28, $29, $30)) \
     INSERT INTO transactions (",
    transaction_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
     $22, $23, $24, $25, $26, $27)"
);

pub(crate) const TRANSACTION: &str = concat!("SELECT ", transaction_columns!(), " FROM transactions WHERE id = $1");

pub(crate) const TRANSACTION_EXISTS: &str = "SELECT 1 FROM transactions WHERE id = $1";

pub(crate) const OUTBOX_EXISTS: &str = "SELECT 1 FROM outbox WHERE id = $1";

pub(crate) const TRANSACTION_FINALIZED_AS: &str =
    "SELECT 1 FROM transactions WHERE id = $1 AND status_code = $2 AND updated_at = $3";

pub(crate) const TRANSACTIONS_OF_VERIFICATION: &str =
    concat!("SELECT ", transaction_columns!(), " FROM transactions WHERE verification_id = $1 ORDER BY created_at, id");

pub(crate) const TRANSACTION_BY_PROVIDER_REF: &str =
    concat!("SELECT ", transaction_columns!(), " FROM transactions WHERE provider = $1 AND provider_ref = $2");

/// One statement: the row lock (Postgres) or the single writer (SQLite)
/// makes the check and the increment indivisible.
/// `$3`: the attempts the caller saw used, or NULL for any.
pub(crate) const USE_ATTEMPT: &str = "UPDATE transactions SET attempts_used = attempts_used + 1, updated_at = $2 \
     WHERE id = $1 AND status_code = 210 AND attempts_used < max_attempts \
     AND (expires_at IS NULL OR expires_at > $2) AND ($3 IS NULL OR attempts_used = $3) RETURNING attempts_used";

pub(crate) const REFUND_ATTEMPT: &str = "UPDATE transactions SET attempts_used = attempts_used - 1 \
     WHERE id = $1 AND status_code = 210 AND attempts_used > 0";

/// A code handset checked itself: the attempt and the verdict in one
/// conditional statement (the row lock on Postgres, the single writer on
/// SQLite make them indivisible); `RETURNING` says which state it left.
macro_rules! local_code_update {
    () => {
        concat!(
            "UPDATE transactions SET attempts_used = attempts_used + 1, updated_at = $2, \
             status_code = CASE WHEN $3 THEN 200 WHEN attempts_used + 1 >= max_attempts THEN 300 ELSE status_code END, \
             result = CASE WHEN $3 THEN $4 WHEN attempts_used + 1 >= max_attempts THEN $5 ELSE result END ",
            code_attempt_allowed!(),
            " RETURNING status_code, attempts_used"
        )
    };
}
pub(crate) use local_code_update;

/// Which row a code attempt may write: pending, an attempt left, before
/// its deadline, and (`$6`, unless NULL) with the attempts the caller saw
/// used. `$1`: the transaction, `$2`: now.
macro_rules! code_attempt_allowed {
    () => {
        "WHERE id = $1 AND status_code = 210 AND attempts_used < max_attempts \
         AND (expires_at IS NULL OR expires_at > $2) AND ($6 IS NULL OR attempts_used = $6)"
    };
}
pub(crate) use code_attempt_allowed;

pub(crate) const LOCAL_CODE_UPDATE: &str = local_code_update!();

/// The final state, only over a pending row (an expiry or a concurrent
/// confirm that decided first wins).
pub(crate) const FINALIZE: &str = "UPDATE transactions SET status_code = $2, result = $3, updated_at = $4, \
     attempts_used = $5, provider_ref = $6 WHERE id = $1 AND status_code = 210";

pub(crate) const RENEW_PROVIDER_REF: &str = "UPDATE transactions SET provider_ref = $3 WHERE id = $1 \
     AND status_code = 210 AND (provider_ref = $2 OR (provider_ref IS NULL AND $2 IS NULL))";

/// Locks the transaction's row so concurrent retries count one after another.
pub(crate) const LOCK_TRANSACTION: &str = "UPDATE transactions SET updated_at = updated_at WHERE id = $1";

pub(crate) const COUNT_PENDING_CALLBACKS: &str =
    "SELECT COUNT(*) FROM outbox WHERE transaction_id = $1 AND state = 'pending'";

/// A callback row, due at once (`$1`-`$6` as `outbox_columns!`).
pub(crate) const INSERT_OUTBOX: &str =
    concat!("INSERT INTO outbox (", outbox_columns!(), ", next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $6)");

pub(crate) const CALLBACKS_OF_TRANSACTION: &str =
    concat!("SELECT ", outbox_select!(), " FROM outbox WHERE transaction_id = $1 ORDER BY created_at, id");

pub(crate) const ATTEMPTS_OF_TRANSACTION: &str = "SELECT a.outbox_id, a.attempted_at, a.status_code, a.error, \
     a.latency_ms FROM callback_attempts a JOIN outbox o ON o.id = a.outbox_id \
     WHERE o.transaction_id = $1 ORDER BY a.id";

/// Leases due callbacks. `FOR UPDATE SKIP LOCKED` (Postgres) skips rows
/// another process is claiming; SQLite's single writer needs nothing.
macro_rules! claim_callbacks {
    ($lock:literal) => {
        concat!(
            "UPDATE outbox SET lease_owner = $1, lease_until = $2 \
             WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= $3 \
             AND (lease_until IS NULL OR lease_until <= $3) ORDER BY next_attempt_at LIMIT $4 ",
            $lock,
            ") RETURNING ",
            outbox_select!()
        )
    };
}
pub(crate) const CLAIM_CALLBACKS_PG: &str = claim_callbacks!("FOR UPDATE SKIP LOCKED");
pub(crate) const CLAIM_CALLBACKS_SQLITE: &str = claim_callbacks!("");

/// A partner's signing secret, and its previous one while a rotation overlaps.
pub(crate) const WEBHOOK_SECRETS: &str = "SELECT webhook_secret, CASE WHEN previous_webhook_secret_expires_at > $2 \
     THEN previous_webhook_secret END FROM partners WHERE id = $1";

pub(crate) const FINISH_CALLBACK: &str = "UPDATE outbox SET state = $3, next_attempt_at = COALESCE($4, \
     next_attempt_at), finished_at = $5, lease_owner = NULL, lease_until = NULL, attempts = attempts + 1 \
     WHERE id = $1 AND lease_owner = $2 AND state = 'pending'";

pub(crate) const INSERT_CALLBACK_ATTEMPT: &str = "INSERT INTO callback_attempts (outbox_id, attempted_at, \
     status_code, error, latency_ms) VALUES ($1, $2, $3, $4, $5)";

pub(crate) const COUNT_DUE_CALLBACKS: &str =
    "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND next_attempt_at <= $1";

/// Leases due provider polls (see `claim_callbacks!` for the lock).
macro_rules! claim_polls {
    ($lock:literal) => {
        concat!(
            "UPDATE transactions SET next_poll_at = $2, poll_attempts = poll_attempts + 1 \
             WHERE id IN (SELECT id FROM transactions WHERE status_code = 210 AND next_poll_at IS NOT NULL \
             AND next_poll_at <= $1 ORDER BY next_poll_at LIMIT $3 ",
            $lock,
            ") RETURNING ",
            transaction_columns!()
        )
    };
}
pub(crate) const CLAIM_POLLS_PG: &str = claim_polls!("FOR UPDATE SKIP LOCKED");
pub(crate) const CLAIM_POLLS_SQLITE: &str = claim_polls!("");

pub(crate) const SCHEDULE_POLL: &str = "UPDATE transactions SET next_poll_at = $2 WHERE id = $1 AND status_code = 210";

pub(crate) const INSERT_IDEMPOTENCY: &str = "INSERT INTO idempotency_keys (scope, idem_key, request_hash, state, \
     created_at, locked_until) VALUES ($1, $2, $3, 'in_flight', $4, $5) ON CONFLICT (scope, idem_key) DO NOTHING";

/// Taken over when expired (24 h) or when its request died holding it.
pub(crate) const TAKE_OVER_IDEMPOTENCY: &str = "UPDATE idempotency_keys SET request_hash = $3, \
     state = 'in_flight', status_code = NULL, response_body = NULL, created_at = $4, locked_until = $5 \
     WHERE scope = $1 AND idem_key = $2 AND (created_at < $6 \
     OR (state = 'in_flight' AND locked_until <= $4 AND request_hash = $3))";

pub(crate) const IDEMPOTENCY_RECORD: &str = "SELECT request_hash, state, status_code, response_body \
     FROM idempotency_keys WHERE scope = $1 AND idem_key = $2";

pub(crate) const FINISH_IDEMPOTENCY: &str = "UPDATE idempotency_keys SET state = 'done', status_code = $3, \
     response_body = $4 WHERE scope = $1 AND idem_key = $2";

pub(crate) const RELEASE_IDEMPOTENCY: &str =
    "DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND state = 'in_flight'";

pub(crate) const PURGE_IDEMPOTENCY: &str = "DELETE FROM idempotency_keys WHERE created_at < $1";

pub(crate) const ADD_RATE_HITS: &str = "INSERT INTO rate_counters (scope, window_start, hits) VALUES ($1, $2, $3) \
     ON CONFLICT (scope, window_start) DO UPDATE SET hits = rate_counters.hits + $3 RETURNING hits";

/// One hit, only while under the limit (`$3`): no row comes back when full.
pub(crate) const TAKE_RATE_HIT: &str = "INSERT INTO rate_counters (scope, window_start, hits) VALUES ($1, $2, 1) \
     ON CONFLICT (scope, window_start) DO UPDATE SET hits = rate_counters.hits + 1 \
     WHERE rate_counters.hits < $3 RETURNING hits";

pub(crate) const PURGE_RATE_COUNTERS: &str = "DELETE FROM rate_counters WHERE window_start < $1";

pub(crate) const EXPIRED_PENDING: &str = concat!(
    "SELECT ",
    transaction_columns!(),
    " FROM transactions WHERE status_code = 210 AND expires_at IS NOT NULL AND expires_at <= $1 \
     ORDER BY expires_at LIMIT $2"
);

/// Callback bodies that are no longer owed (`$1`: created before).
pub(crate) const PURGE_CALLBACK_BODIES: &str =
    "UPDATE outbox SET payload = '' WHERE state <> 'pending' AND payload <> '' AND created_at < $1";

/// Personal data of decided transactions created before `$1`.
pub(crate) const PURGE_TRANSACTIONS: &str = "UPDATE transactions SET phone = NULL, birth_date = NULL, name = NULL, \
     redirect_uri = NULL, metadata = $2, result = CASE WHEN status_code = 200 THEN $3 ELSE result END, \
     purged_at = $4 WHERE created_at < $1 AND status_code <> 210 AND purged_at IS NULL";

/// The funnel's grouping columns: `$3`-`$5` say whether to group by
/// provider, country and product (a column not grouped by reads NULL).
macro_rules! funnel_groups {
    () => {
        "CASE WHEN $3 THEN provider END AS provider, CASE WHEN $4 THEN country END AS country, \
         CASE WHEN $5 THEN product END AS product"
    };
}
pub(crate) use funnel_groups;

/// Transactions created in `[$1, $2)`, of partner `$6` (`_OF_PARTNER`) or of all.
macro_rules! funnel_range {
    (all) => {
        "created_at >= $1 AND created_at < $2"
    };
    (partner) => {
        "partner_id = $6 AND created_at >= $1 AND created_at < $2"
    };
}
pub(crate) use funnel_range;

/// Per group and, for successes, per bucket of time to success (`$bucket`,
/// the dialect's: whole seconds below 600, then 600 + whole minutes): the
/// transactions started, succeeded, failed, expired (final without success
/// at or after the deadline) and pending. One pass over the range; the
/// median is read from the buckets (`rows::funnel_counts`).
macro_rules! funnel_histogram {
    ($bucket:expr, $range:tt) => {
        concat!(
            "SELECT ",
            funnel_groups!(),
            ", CASE WHEN status_code = 200 THEN ",
            $bucket,
            " END AS bucket, COUNT(*), COUNT(CASE WHEN status_code = 200 THEN 1 END), \
             COUNT(CASE WHEN status_code = 300 AND NOT (expires_at IS NOT NULL AND updated_at >= expires_at) THEN 1 END), \
             COUNT(CASE WHEN status_code = 300 AND expires_at IS NOT NULL AND updated_at >= expires_at THEN 1 END), \
             COUNT(CASE WHEN status_code = 210 THEN 1 END) FROM transactions WHERE ",
            funnel_range!($range),
            " GROUP BY 1, 2, 3, 4"
        )
    };
}
pub(crate) use funnel_histogram;

/// The funnel's whole hours from the rollup (`$1`-`$2` hours, `$3`-`$5` the
/// grouping, `$6` the partner with `partner`): the same columns as
/// `funnel_histogram!`, pending always 0 (only ended hours are rolled up).
macro_rules! funnel_rolled {
    ($range:tt) => {
        concat!(
            "SELECT ",
            funnel_groups!(),
            ", bucket, CAST(SUM(started) AS BIGINT), CAST(SUM(succeeded) AS BIGINT), CAST(SUM(failed) AS BIGINT), \
             CAST(SUM(expired) AS BIGINT), CAST(0 AS BIGINT) FROM funnel_hours WHERE ",
            funnel_rolled_range!($range),
            " GROUP BY 1, 2, 3, 4"
        )
    };
}
pub(crate) use funnel_rolled;

macro_rules! funnel_rolled_range {
    (all) => {
        "hour >= $1 AND hour < $2"
    };
    (partner) => {
        "partner_id = $6 AND hour >= $1 AND hour < $2"
    };
}
pub(crate) use funnel_rolled_range;

/// Counts the hour `[$1, $2)` into `funnel_hours` (`$bucket` is the dialect's).
macro_rules! roll_up_hour {
    ($bucket:expr) => {
        concat!(
            "INSERT INTO funnel_hours (hour, partner_id, provider, country, product, bucket, started, succeeded, \
             failed, expired) SELECT $1, partner_id, provider, country, product, CASE WHEN status_code = 200 THEN ",
            $bucket,
            " END, COUNT(*), COUNT(CASE WHEN status_code = 200 THEN 1 END), \
             COUNT(CASE WHEN status_code = 300 AND NOT (expires_at IS NOT NULL AND updated_at >= expires_at) THEN 1 END), \
             COUNT(CASE WHEN status_code = 300 AND expires_at IS NOT NULL AND updated_at >= expires_at THEN 1 END) \
             FROM transactions WHERE created_at >= $1 AND created_at < $2 GROUP BY 2, 3, 4, 5, 6"
        )
    };
}
pub(crate) use roll_up_hour;

/// Transactions created since `$2` that ended since `$1`, per provider,
/// country and product, less "no provider" endings (`$no_provider`, the
/// dialect's test of the result's first error code for 3908).
macro_rules! recent_outcomes {
    ($no_provider:expr) => {
        concat!(
            "SELECT provider, country, product, CAST(COUNT(CASE WHEN status_code = 200 THEN 1 END) AS BIGINT), \
             CAST(COUNT(*) AS BIGINT) FROM transactions WHERE created_at >= $2 AND updated_at >= $1 \
             AND status_code <> 210 AND NOT COALESCE(",
            $no_provider,
            ", FALSE) GROUP BY 1, 2, 3"
        )
    };
}
pub(crate) use recent_outcomes;

/// Where the rollup stands.
pub(crate) const ROLLED_UNTIL: &str = "SELECT rolled_until FROM funnel_rollup WHERE id = 1";

/// Postgres: where the rollup stands, locked until the transaction ends.
pub(crate) const LOCK_ROLLED_UNTIL: &str = "SELECT rolled_until FROM funnel_rollup WHERE id = 1 FOR UPDATE";

/// The first transaction created at or after `$1`.
pub(crate) const NEXT_CREATED: &str = "SELECT MIN(created_at) FROM transactions WHERE created_at >= $1";

/// Whether the hour `[$1, $2)` still has a pending transaction.
pub(crate) const PENDING_IN_HOUR: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM transactions WHERE created_at >= $1 AND created_at < $2 \
     AND status_code = 210 LIMIT 1) AS pending";

/// Moves the rollup from `$1` (as read) to `$2`; no row changes if another
/// process moved it meanwhile (Postgres also holds the row's lock).
pub(crate) const ADVANCE_ROLLUP: &str =
    "UPDATE funnel_rollup SET rolled_until = $2 WHERE id = 1 AND rolled_until IS NOT DISTINCT FROM $1";

/// A range's last pause and release.
pub(crate) const RANGE_PAUSE: &str =
    "SELECT paused_until, released_at FROM number_range_pauses WHERE number_range = $1";

/// A range's confirmed SMS checks created since `$2`.
pub(crate) const RANGE_SUCCEEDED: &str =
    "SELECT COUNT(*) FROM transactions WHERE number_range = $1 AND created_at >= $2 AND status_code = 200";

/// A pause, unless the range was released since the guard read it (`$6`).
pub(crate) const PAUSE_RANGE: &str = "INSERT INTO number_range_pauses (number_range, paused_at, paused_until, sends, \
     succeeded, released_at) VALUES ($1, $2, $3, $4, $5, NULL) ON CONFLICT (number_range) DO UPDATE SET \
     paused_at = excluded.paused_at, paused_until = excluded.paused_until, sends = excluded.sends, \
     succeeded = excluded.succeeded WHERE number_range_pauses.released_at IS NOT DISTINCT FROM $6";

pub(crate) const PAUSED_RANGES: &str = "SELECT number_range, paused_at, paused_until, sends, succeeded \
     FROM number_range_pauses WHERE paused_until > $1 ORDER BY paused_at, number_range";

pub(crate) const RELEASE_RANGE: &str = "UPDATE number_range_pauses SET paused_until = $2, released_at = $2 \
     WHERE number_range = $1 AND paused_until > $2";

/// Postgres: indexes of handset's schema that a failed `CREATE INDEX
/// CONCURRENTLY` left invalid.
pub(crate) const INVALID_INDEXES: &str = "SELECT c.relname::text FROM pg_index i \
     JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE NOT i.indisvalid AND n.nspname = current_schema() ORDER BY 1";

#[cfg(test)]
mod tests {
    //! The lookups served by partial indexes: a query uses one only when its
    //! own conditions imply the index's, which an edit of either can break
    //! without any result changing (only the table scans would show it).
    use handset_testkit::TestDatabase;

    use super::*;

    async fn migrated(db: &TestDatabase) {
        let store = crate::connect(&db.url, &crate::PoolSettings::default()).expect("store");
        store.migrate().await.expect("migrate");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_lookups_use_the_partial_indexes() {
        let db = TestDatabase::postgres().await;
        migrated(&db).await;
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.expect("connect");
        // The plan the store's prepared statements settle on, and no table
        // scan to fall back to on an empty table.
        let setup = format!(
            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
             PREPARE by_ref AS {TRANSACTION_BY_PROVIDER_REF}; PREPARE claim_polls AS {CLAIM_POLLS_PG}"
        );
        sqlx::raw_sql(&setup).execute(&mut conn).await.expect("prepare");
        for (statement, index) in [
            ("EXPLAIN EXECUTE by_ref('idme', 'ref')", "transactions_provider_ref_set"),
            ("EXPLAIN EXECUTE claim_polls(now(), now(), 10)", "transactions_poll_scheduled"),
        ] {
            let plan: Vec<String> = sqlx::query_scalar(statement).fetch_all(&mut conn).await.expect("explain");
            assert!(plan.iter().any(|line| line.contains(index)), "{statement}: {plan:#?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_lookups_use_the_partial_indexes() {
        let db = TestDatabase::sqlite();
        migrated(&db).await;
        let conn = rusqlite::Connection::open(db.url.trim_start_matches("sqlite://")).expect("open");
        for (query, index) in [
            (TRANSACTION_BY_PROVIDER_REF, "transactions_provider_ref_set"),
            (CLAIM_POLLS_SQLITE, "transactions_poll_scheduled"),
        ] {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {query}")).expect("explain");
            let unbound =
                rusqlite::params_from_iter(std::iter::repeat_n(rusqlite::types::Null, explain.parameter_count()));
            let plan: Vec<String> =
                explain.query_map(unbound, |row| row.get(3)).expect("plan").collect::<Result<_, _>>().expect("rows");
            assert!(plan.iter().any(|line| line.contains(index)), "{query}: {plan:#?}");
        }
    }
}
