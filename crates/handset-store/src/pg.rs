//! Postgres, the production store, on sqlx. The SQL is `queries.rs`'s,
//! shared with SQLite; starts and local-code confirms are single statements
//! here (data-modifying `WITH`), one round trip each.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use handset_core::funnel::{Dimension, FunnelCounts, FunnelQuery};
use handset_core::model::{
    CallbackAttempt, CallbackRecord, ClaimedCallback, OutboxMessage, ProviderName, Status, Transaction,
    TransactionResult, Verification,
};
use handset_core::partner_cache::PartnerCache;
use handset_core::pumping::{NewPause, PausedRange, RangeTraffic};
use handset_core::store::{
    AfterAttempt, Claim, Finalization, IdempotencyBegin, IdempotencyClaim, LocalCodeAttempt, NewPartner, PartnerByKey,
    PartnerRecord, PoolUsage, Requeued, Store, StoreError,
};
use sqlx::Postgres;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgNotification};
use sqlx::query::Query;
use sqlx::types::Json;
use uuid::Uuid;

use crate::pg_pool::{Connections, breaks_connection};
use crate::queries::{
    self as q, code_attempt_allowed, funnel_groups, funnel_histogram, funnel_range, funnel_rolled, funnel_rolled_range,
    local_code_update, outbox_columns, recent_outcomes, roll_up_hour,
};
use crate::rows::{AttemptRow, OutboxRow, PartnerByKeyRow, PartnerRecordRow, TransactionRow, VerificationRow};
use handset_core::adaptive::EndedCounts;

/// Postgres, the production store: reads and writes share one pool
/// (`pg_pool`), connected as requests need it.
#[derive(Clone)]
pub struct PgStore {
    pool: Connections,
}

impl PgStore {
    pub fn new(options: PgConnectOptions, max_connections: u32, acquire_timeout: Duration) -> Self {
        PgStore { pool: Connections::new(options, max_connections, acquire_timeout) }
    }

    /// Runs a read once more if the connection it ran on turned out closed
    /// (a database restart closes every pooled connection at once; the
    /// pool then checks the others before use). A read is safe to repeat;
    /// so is a matching code's write (`attempt_local_code`).
    async fn read_again<T, F, Fut>(&self, read: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        match read().await {
            Err(error) if breaks_connection(&error) => read().await.map_err(db),
            done => done.map_err(db),
        }
    }
}

/// The pauses between the tries of a start's or a final write while the
/// database restarts: about 0.1, 0.2, 0.4, 0.8 and 1 s, each up to twice
/// that at random, so the writes of a restart do not all arrive together.
fn restart_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(5)
        .with_jitter()
}

pub(crate) fn db(error: sqlx::Error) -> StoreError {
    if let Some(db_error) = error.as_database_error()
        && db_error.is_unique_violation()
    {
        return StoreError::Conflict(db_error.message().to_owned());
    }
    StoreError::Database(Box::new(error))
}

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// An outbox row's six values bound as $1-$6 (`INSERT_OUTBOX`).
fn bind_outbox<'q>(query: PgQuery<'q>, m: &'q OutboxMessage) -> PgQuery<'q> {
    query.bind(m.id).bind(m.transaction_id).bind(m.partner_id).bind(&m.callback_url).bind(&m.payload).bind(m.created_at)
}

/// The transaction's 27 columns bound as $1-$27, in `transaction_columns!` order.
fn bind_transaction<'q>(query: PgQuery<'q>, t: &'q Transaction) -> PgQuery<'q> {
    query
        .bind(t.id)
        .bind(t.verification_id)
        .bind(t.partner_id)
        .bind(t.product.as_str())
        .bind(t.provider.as_str())
        .bind(&t.phone)
        .bind(&t.birth_date)
        .bind(t.status.code())
        .bind(t.created_at)
        .bind(t.updated_at)
        .bind(t.expires_at)
        .bind(t.attempts_used)
        .bind(t.max_attempts)
        .bind(&t.code_hash)
        .bind(&t.provider_ref)
        .bind(&t.redirect_url)
        .bind(&t.redirect_uri)
        .bind(&t.callback_url)
        .bind(t.name.as_ref().map(Json))
        .bind(Json(&t.metadata))
        .bind(t.result.as_ref().map(Json))
        .bind(&t.provider_verification)
        .bind(t.next_poll_at)
        .bind(t.poll_attempts)
        .bind(&t.country)
        .bind(&t.number_range)
        .bind(t.routing.as_ref().map(Json))
}

/// `LOCAL_CODE_UPDATE`'s parameters $1-$6.
fn bind_local_code<'q, O>(
    query: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
    a: &LocalCodeAttempt<'q>,
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    query.bind(a.id).bind(a.now).bind(a.matched).bind(Json(a.success)).bind(Json(a.exhausted)).bind(a.expected_attempts)
}

/// The attempt, the verdict and the callback it owes in one statement: the
/// outbox row is inserted only for the status the update left.
const LOCAL_CODE_WITH_CALLBACK: &str = concat!(
    "WITH t AS (",
    local_code_update!(),
    "), owed AS (INSERT INTO outbox (",
    outbox_columns!(),
    ", next_attempt_at) SELECT m.id, $1, $7, $8, m.payload, m.created_at, m.created_at FROM t JOIN (VALUES \
     ($9::uuid, 200, $10::text, $11::timestamptz), ($12::uuid, 300, $13::text, $14::timestamptz)) \
     AS m (id, status_code, payload, created_at) ON m.status_code = t.status_code WHERE m.id IS NOT NULL) \
     SELECT status_code, attempts_used FROM t"
);

/// A code that matched, with the callback its success owes: the attempt,
/// the success and the callback row in one statement, with nothing to
/// decide in SQL (the general statement above also weighs a wrong code).
/// `$3`: the success's result, `$4`-`$5`, `$7`-`$9`: the callback's id,
/// partner, URL, body and time.
const MATCHED_CODE_WITH_CALLBACK: &str = concat!(
    "WITH t AS (UPDATE transactions SET attempts_used = attempts_used + 1, updated_at = $2, status_code = 200, \
     result = $3 ",
    code_attempt_allowed!(),
    " RETURNING status_code, attempts_used), owed AS (INSERT INTO outbox (",
    outbox_columns!(),
    ", next_attempt_at) SELECT $4, $1, $5, $7, $8, $9, $9 FROM t) SELECT status_code, attempts_used FROM t"
);

/// Whole seconds from start to success below ten minutes, then 600 + whole minutes.
macro_rules! pg_bucket {
    () => {
        "CASE WHEN date_part('epoch', updated_at - created_at) < 600 \
         THEN floor(date_part('epoch', updated_at - created_at)) \
         ELSE 600 + floor(date_part('epoch', updated_at - created_at) / 60) END"
    };
}

/// The funnel query's parameters: `$1`-`$5`, and `$6` for one partner.
fn bind_funnel<'q, O>(
    query: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
    f: &FunnelQuery,
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    let query = query
        .bind(f.since)
        .bind(f.until)
        .bind(f.groups_by(Dimension::Provider))
        .bind(f.groups_by(Dimension::Country))
        .bind(f.groups_by(Dimension::Product));
    match f.partner_id {
        Some(id) => query.bind(id),
        None => query,
    }
}

impl PgStore {
    /// `REINDEX INDEX CONCURRENTLY` of every index of handset's schema marked invalid.
    async fn rebuild_invalid_indexes(&self) -> Result<(), StoreError> {
        let invalid: Vec<String> = sqlx::query_scalar(q::INVALID_INDEXES).fetch_all(&self.pool).await.map_err(db)?;
        for index in invalid {
            tracing::warn!(index = %index, "rebuilding an index left invalid by an interrupted migration");
            // The name comes from the catalogue, quoted as an identifier.
            let rebuild = format!("REINDEX INDEX CONCURRENTLY \"{}\"", index.replace('"', "\"\""));
            sqlx::query(&rebuild).execute(&self.pool).await.map_err(db)?;
        }
        Ok(())
    }

    /// Runs `write` (told whether an earlier try ran) again, after the
    /// pauses of `restart_backoff`, while its error says the connection
    /// was lost: a write that must not be lost to a database restart and
    /// that can tell an earlier try's commit from nothing written.
    async fn through_restarts<T, F, Fut>(&self, transaction_id: Uuid, what: &str, write: F) -> Result<T, StoreError>
    where
        F: Fn(bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let tries = AtomicU32::new(0);
        (|| write(tries.fetch_add(1, Ordering::Relaxed) > 0))
            .retry(restart_backoff())
            .sleep(tokio::time::sleep)
            .when(breaks_connection)
            .notify(|error, wait| {
                tracing::warn!(%transaction_id, %error, ?wait, "{what} met a closed database connection; writing again");
            })
            .await
            .map_err(db)
    }

    /// One try of `insert_transaction`.
    async fn write_transaction(
        &self,
        t: &Transaction,
        new_verification: Option<&Verification>,
        outbox: Option<&OutboxMessage>,
    ) -> Result<(), sqlx::Error> {
        // A start (a new verification, nothing owed yet): one statement.
        if let (Some(v), None) = (new_verification, outbox) {
            let query =
                bind_transaction(sqlx::query(q::INSERT_START), t).bind(v.id).bind(v.partner_id).bind(v.created_at);
            query.execute(&self.pool).await?;
            return Ok(());
        }
        let mut db_tx = self.pool.begin().await?;
        let written = async {
            if let Some(v) = new_verification {
                sqlx::query(q::INSERT_VERIFICATION)
                    .bind(v.id)
                    .bind(v.partner_id)
                    .bind(v.created_at)
                    .execute(&mut *db_tx)
                    .await?;
            }
            bind_transaction(sqlx::query(q::INSERT_TRANSACTION), t).execute(&mut *db_tx).await?;
            if let Some(message) = outbox {
                bind_outbox(sqlx::query(q::INSERT_OUTBOX), message).execute(&mut *db_tx).await?;
            }
            Ok(())
        }
        .await;
        match written {
            Ok(()) => db_tx.commit().await,
            Err(error) => Err(db_tx.fail(error)),
        }
    }

    /// One try of `finalize`.
    async fn write_final(&self, f: &Finalization<'_>) -> Result<bool, sqlx::Error> {
        let t = f.transaction;
        let mut db_tx = self.pool.begin().await?;
        let written = async {
            let done = sqlx::query(q::FINALIZE)
                .bind(t.id)
                .bind(t.status.code())
                .bind(t.result.as_ref().map(Json))
                .bind(t.updated_at)
                .bind(t.attempts_used)
                .bind(&t.provider_ref)
                .execute(&mut *db_tx)
                .await?;
            if done.rows_affected() == 0 {
                return Ok(false);
            }
            if let Some(message) = f.outbox {
                bind_outbox(sqlx::query(q::INSERT_OUTBOX), message).execute(&mut *db_tx).await?;
            }
            Ok(true)
        }
        .await;
        match written {
            Ok(true) => db_tx.commit().await.map(|()| true),
            Ok(false) => db_tx.rollback().await.map(|()| false),
            Err(error) => Err(db_tx.fail(error)),
        }
    }

    /// Whether an earlier try of `f` committed: its callback row is stored
    /// (its id is this write's own), or, when it owes none, the transaction
    /// is stored in the final state and at the time `f` carries.
    async fn finalized_as(&self, f: &Finalization<'_>) -> Result<bool, sqlx::Error> {
        let t = f.transaction;
        let found: Option<i32> = match f.outbox {
            Some(message) => sqlx::query_scalar(q::OUTBOX_EXISTS).bind(message.id).fetch_optional(&self.pool).await?,
            None => {
                sqlx::query_scalar(q::TRANSACTION_FINALIZED_AS)
                    .bind(t.id)
                    .bind(t.status.code())
                    .bind(t.updated_at)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        Ok(found.is_some())
    }

    /// Whether the transaction `id` is stored.
    async fn stored(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        let found: Option<i32> = sqlx::query_scalar(q::TRANSACTION_EXISTS).bind(id).fetch_optional(&self.pool).await?;
        Ok(found.is_some())
    }

    async fn execute(&self, query: PgQuery<'_>) -> Result<u64, StoreError> {
        Ok(query.execute(&self.pool).await.map_err(db)?.rows_affected())
    }

    async fn write_partner(&self, new: &NewPartner, sql: &'static str) -> Result<(), StoreError> {
        let p = &new.partner;
        let products = Json(p.products.iter().map(|p| p.as_str()).collect::<Vec<_>>());
        self.execute(
            sqlx::query(sql)
                .bind(p.id)
                .bind(&p.name)
                .bind(products)
                .bind(p.active)
                .bind(p.webhook_secret.expose())
                .bind(p.created_at)
                .bind(&new.api_key_hash),
        )
        .await?;
        Ok(())
    }

    async fn rotate(
        &self,
        sql: &'static str,
        id: Uuid,
        value: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        Ok(self.execute(sqlx::query(sql).bind(id).bind(value).bind(previous_until)).await? == 1)
    }

    async fn insert_outbox<'c, E>(executor: E, message: &OutboxMessage) -> Result<(), StoreError>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        bind_outbox(sqlx::query(q::INSERT_OUTBOX), message).execute(executor).await.map_err(db)?;
        Ok(())
    }

    /// Listens on `PARTNER_CHANNEL` over a connection of its own (outside
    /// the request pool). The cache is followed only while the listener is
    /// connected and listening; a lost connection stops that at once and is
    /// re-opened after a pause.
    async fn follow_changes(&self, cache: &PartnerCache) {
        let options = self.pool.connect_options().clone();
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let mut pause = Duration::from_secs(1);
        loop {
            match listen(&own).await {
                Ok(mut listener) => {
                    cache.set_following(true);
                    pause = Duration::from_secs(1);
                    tracing::debug!("following partner changes");
                    self.hear_changes(&mut listener, cache).await;
                    cache.set_following(false);
                    // Most often a restart, which closed the pool's connections too.
                    self.pool.mark_lost();
                    tracing::warn!(
                        "lost the partner-change listener; partners are read from the database until it is back"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for partner changes yet; partners are read from the database");
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Empties the cache at each announced change until the listening
    /// connection is lost. A connection can die without a word (a dropped
    /// NAT entry, a pooler that does not keep LISTEN): after `HEARTBEAT` of
    /// quiet, a ping is announced through the request pool and must be heard
    /// within `ECHO_WAIT`, else the listener counts as lost.
    async fn hear_changes(&self, listener: &mut PgListener, cache: &PartnerCache) {
        const HEARTBEAT: Duration = Duration::from_secs(10);
        const ECHO_WAIT: Duration = Duration::from_secs(5);
        let heard = |notification: PgNotification| {
            if notification.payload() != PING {
                cache.changed();
            }
        };
        loop {
            match tokio::time::timeout(HEARTBEAT, listener.try_recv()).await {
                // `Ok(None)`: the connection was lost (the listener is set not
                // to reconnect by itself, so nothing is missed unseen).
                Ok(Ok(Some(notification))) => heard(notification),
                Ok(_) => return,
                Err(_quiet) => {
                    let ping = sqlx::query("SELECT pg_notify($1, $2)").bind(PARTNER_CHANNEL).bind(PING);
                    if !matches!(tokio::time::timeout(ECHO_WAIT, ping.execute(&self.pool)).await, Ok(Ok(_))) {
                        return;
                    }
                    match tokio::time::timeout(ECHO_WAIT, listener.try_recv()).await {
                        Ok(Ok(Some(notification))) => heard(notification),
                        _ => return,
                    }
                }
            }
        }
    }
}

/// The channel the `partners` table's trigger notifies (migration 0006).
const PARTNER_CHANNEL: &str = "handset_partners";
/// The payload of the listener's own heartbeat (the trigger's is empty).
const PING: &str = "ping";

async fn listen(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(PARTNER_CHANNEL).await?;
    Ok(listener)
}

#[async_trait]
impl Store for PgStore {
    /// Applies pending migrations, rebuilding any index an interrupted
    /// `CREATE INDEX CONCURRENTLY` left invalid (`IF NOT EXISTS` would skip
    /// it on every later run, and Postgres would never use it) both before
    /// them, so that a migration dropping the index it replaces never
    /// leaves a lookup with only an invalid one, and after.
    async fn migrate(&self) -> Result<(), StoreError> {
        self.rebuild_invalid_indexes().await?;
        let mut lease = self.pool.lease().await.map_err(db)?;
        sqlx::migrate!("../../migrations/postgres")
            .run_direct(&mut *lease)
            .await
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        lease.release();
        self.rebuild_invalid_indexes().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read_again(|| sqlx::query("SELECT 1").execute(&self.pool)).await?;
        Ok(())
    }

    fn pool_usage(&self) -> Vec<PoolUsage> {
        vec![self.pool.usage()]
    }

    async fn follow_partner_changes(&self, cache: &PartnerCache) {
        self.follow_changes(cache).await
    }

    async fn insert_partner(&self, new: &NewPartner) -> Result<(), StoreError> {
        self.write_partner(new, q::INSERT_PARTNER).await
    }

    async fn upsert_partner(&self, new: &NewPartner) -> Result<(), StoreError> {
        self.write_partner(new, q::UPSERT_PARTNER).await
    }

    async fn partner_by_key_hash(
        &self,
        api_key_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<PartnerByKey>, StoreError> {
        let row: Option<PartnerByKeyRow> = self
            .read_again(|| sqlx::query_as(q::PARTNER_BY_KEY).bind(api_key_hash).bind(now).fetch_optional(&self.pool))
            .await?;
        row.map(PartnerByKey::try_from).transpose()
    }

    async fn partners(&self) -> Result<Vec<PartnerRecord>, StoreError> {
        let rows: Vec<PartnerRecordRow> = sqlx::query_as(q::PARTNERS).fetch_all(&self.pool).await.map_err(db)?;
        rows.into_iter().map(PartnerRecord::try_from).collect()
    }

    async fn partner(&self, id: Uuid) -> Result<Option<PartnerRecord>, StoreError> {
        let row: Option<PartnerRecordRow> =
            sqlx::query_as(q::PARTNER).bind(id).fetch_optional(&self.pool).await.map_err(db)?;
        row.map(PartnerRecord::try_from).transpose()
    }

    async fn rotate_api_key(
        &self,
        id: Uuid,
        api_key_hash: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        self.rotate(q::ROTATE_API_KEY, id, api_key_hash, previous_until).await
    }

    async fn rotate_webhook_secret(
        &self,
        id: Uuid,
        webhook_secret: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        self.rotate(q::ROTATE_WEBHOOK_SECRET, id, webhook_secret, previous_until).await
    }

    async fn requeue_failed_callbacks(
        &self,
        partner_id: Uuid,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Requeued, StoreError> {
        let ids: Vec<(Uuid,)> = sqlx::query_as(q::REQUEUE_FAILED)
            .bind(partner_id)
            .bind(since)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let purged: i64 = sqlx::query_scalar(q::COUNT_FAILED_PURGED)
            .bind(partner_id)
            .bind(since)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(Requeued { ids: ids.into_iter().map(|(id,)| id).collect(), purged: u64::try_from(purged).unwrap_or(0) })
    }

    async fn set_partner_active(&self, id: Uuid, active: bool) -> Result<bool, StoreError> {
        Ok(self.execute(sqlx::query(q::SET_PARTNER_ACTIVE).bind(id).bind(active)).await? == 1)
    }

    async fn verification(&self, id: Uuid) -> Result<Option<Verification>, StoreError> {
        let row: Option<VerificationRow> =
            self.read_again(|| sqlx::query_as(q::VERIFICATION).bind(id).fetch_optional(&self.pool)).await?;
        Ok(row.map(Verification::from))
    }

    /// Writes a started transaction (a start whose provider may already
    /// have sent a code). A database restart that closes the connection
    /// under it (or refuses new ones for a moment) is waited out with a
    /// few more tries, over 2.5 to 5 s: the ids are fixed, so a later try
    /// either writes the rows or, if an earlier try committed and only its
    /// answer was lost, finds them written (a unique violation on the
    /// transaction's own id), which counts as written.
    async fn insert_transaction(
        &self,
        t: &Transaction,
        new_verification: Option<&Verification>,
        outbox: Option<&OutboxMessage>,
    ) -> Result<(), StoreError> {
        self.through_restarts(t.id, "a start's write", |again| async move {
            match self.write_transaction(t, new_verification, outbox).await {
                Err(error)
                    if again
                        && error.as_database_error().is_some_and(|e| e.is_unique_violation())
                        && self.stored(t.id).await? =>
                {
                    Ok(())
                }
                written => written,
            }
        })
        .await
    }

    async fn transaction(&self, id: Uuid) -> Result<Option<Transaction>, StoreError> {
        let row: Option<TransactionRow> =
            self.read_again(|| sqlx::query_as(q::TRANSACTION).bind(id).fetch_optional(&self.pool)).await?;
        row.map(Transaction::try_from).transpose()
    }

    async fn transactions_of_verification(&self, verification_id: Uuid) -> Result<Vec<Transaction>, StoreError> {
        let rows: Vec<TransactionRow> = sqlx::query_as(q::TRANSACTIONS_OF_VERIFICATION)
            .bind(verification_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.into_iter().map(Transaction::try_from).collect()
    }

    async fn use_attempt(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        expected: Option<i32>,
    ) -> Result<Option<i32>, StoreError> {
        sqlx::query_scalar(q::USE_ATTEMPT)
            .bind(id)
            .bind(now)
            .bind(expected)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn refund_attempt(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.execute(sqlx::query(q::REFUND_ATTEMPT).bind(id)).await? == 1)
    }

    async fn attempt_local_code(&self, a: LocalCodeAttempt<'_>) -> Result<Option<(Status, i32)>, StoreError> {
        let attempt = || async {
            match a.on_success.or(a.on_exhausted) {
                // The commonest confirm: a matching code, a callback owed.
                Some(message) if a.matched && a.on_success.is_some() => {
                    sqlx::query_as::<_, (i32, i32)>(MATCHED_CODE_WITH_CALLBACK)
                        .bind(a.id)
                        .bind(a.now)
                        .bind(Json(a.success))
                        .bind(message.id)
                        .bind(message.partner_id)
                        .bind(a.expected_attempts)
                        .bind(&message.callback_url)
                        .bind(message.payload.as_str())
                        .bind(message.created_at)
                        .fetch_optional(&self.pool)
                        .await
                }
                // Both messages share the transaction's partner and callback URL.
                Some(message) => {
                    bind_local_code(sqlx::query_as::<_, (i32, i32)>(LOCAL_CODE_WITH_CALLBACK), &a)
                        .bind(message.partner_id)
                        .bind(&message.callback_url)
                        .bind(a.on_success.map(|m| m.id))
                        .bind(a.on_success.map(|m| m.payload.as_str()))
                        .bind(a.on_success.map(|m| m.created_at))
                        .bind(a.on_exhausted.map(|m| m.id))
                        .bind(a.on_exhausted.map(|m| m.payload.as_str()))
                        .bind(a.on_exhausted.map(|m| m.created_at))
                        .fetch_optional(&self.pool)
                        .await
                }
                None => {
                    bind_local_code(sqlx::query_as::<_, (i32, i32)>(q::LOCAL_CODE_UPDATE), &a)
                        .fetch_optional(&self.pool)
                        .await
                }
            }
        };
        // A matching code's write is safe to repeat on another connection
        // when its own turned out closed (a confirm that starts from the
        // start's copy writes before it reads anything): it only moves a
        // pending row to succeeded, so run twice it writes once, and a
        // second run that finds the row already succeeded writes nothing
        // (the caller then reads the transaction). A wrong code's write is
        // not repeated: it would count the attempt twice if the first did.
        let row = if a.matched { self.read_again(attempt).await? } else { attempt().await.map_err(db)? };
        row.map(|(code, used)| Ok((crate::rows::status_of(code)?, used))).transpose()
    }

    /// Like a start's write, tried again while the database restarts: it
    /// only moves a pending transaction, so a later try that finds nothing
    /// to move and finds what an earlier try would have left
    /// (`finalized_as`) counts that commit as its own.
    async fn finalize(&self, f: Finalization<'_>) -> Result<bool, StoreError> {
        let f = &f;
        self.through_restarts(f.transaction.id, "a final write", |again| async move {
            let ended = self.write_final(f).await?;
            if !ended && again {
                return self.finalized_as(f).await;
            }
            Ok(ended)
        })
        .await
    }

    async fn renew_provider_ref(&self, id: Uuid, old: Option<&str>, renewed: &str) -> Result<bool, StoreError> {
        Ok(self.execute(sqlx::query(q::RENEW_PROVIDER_REF).bind(id).bind(old).bind(renewed)).await? == 1)
    }

    async fn insert_outbox_capped(&self, message: &OutboxMessage, max_pending: i64) -> Result<bool, StoreError> {
        let mut db_tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(q::LOCK_TRANSACTION).bind(message.transaction_id).execute(&mut *db_tx).await.map_err(db)?;
        let pending: i64 = sqlx::query_scalar(q::COUNT_PENDING_CALLBACKS)
            .bind(message.transaction_id)
            .fetch_one(&mut *db_tx)
            .await
            .map_err(db)?;
        if pending >= max_pending {
            db_tx.rollback().await.map_err(db)?;
            return Ok(false);
        }
        Self::insert_outbox(&mut *db_tx, message).await?;
        db_tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn callbacks_of_transaction(&self, transaction_id: Uuid) -> Result<Vec<CallbackRecord>, StoreError> {
        let rows: Vec<OutboxRow> =
            sqlx::query_as(q::CALLBACKS_OF_TRANSACTION).bind(transaction_id).fetch_all(&self.pool).await.map_err(db)?;
        let attempts: Vec<AttemptRow> =
            sqlx::query_as(q::ATTEMPTS_OF_TRANSACTION).bind(transaction_id).fetch_all(&self.pool).await.map_err(db)?;
        crate::rows::callback_records(rows, &attempts)
    }

    async fn claim_due_callbacks(&self, claim: Claim<'_>) -> Result<Vec<ClaimedCallback>, StoreError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(q::CLAIM_CALLBACKS_PG)
            .bind(claim.owner)
            .bind(claim.lease_until)
            .bind(claim.now)
            .bind(claim.limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        // Each partner's secret, and its previous one while a rotation overlaps.
        let mut secrets: Vec<(Uuid, String, Option<String>)> = Vec::new();
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let partner_id = row.partner_id();
            let (secret, previous) = match secrets.iter().find(|(id, ..)| *id == partner_id) {
                Some((_, secret, previous)) => (secret.clone(), previous.clone()),
                None => {
                    let (secret, previous): (String, Option<String>) = sqlx::query_as(q::WEBHOOK_SECRETS)
                        .bind(partner_id)
                        .bind(claim.now)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(db)?;
                    secrets.push((partner_id, secret.clone(), previous.clone()));
                    (secret, previous)
                }
            };
            // Attempts are counted when recorded, so a claim lost to a crash costs no retry.
            claimed.push(ClaimedCallback {
                message: row.message(),
                attempts_before: row.attempts,
                webhook_secret: secret.into(),
                previous_webhook_secret: previous.map(Into::into),
            });
        }
        Ok(claimed)
    }

    async fn finish_callback_attempt(
        &self,
        id: Uuid,
        owner: &str,
        attempt: &CallbackAttempt,
        next: AfterAttempt,
    ) -> Result<bool, StoreError> {
        let (state, next_attempt_at, finished_at) = crate::rows::after_attempt(next, attempt.attempted_at);
        let mut db_tx = self.pool.begin().await.map_err(db)?;
        let done = sqlx::query(q::FINISH_CALLBACK)
            .bind(id)
            .bind(owner)
            .bind(state.as_str())
            .bind(next_attempt_at)
            .bind(finished_at)
            .execute(&mut *db_tx)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            db_tx.rollback().await.map_err(db)?;
            return Ok(false);
        }
        sqlx::query(q::INSERT_CALLBACK_ATTEMPT)
            .bind(id)
            .bind(attempt.attempted_at)
            .bind(attempt.status_code)
            .bind(&attempt.error)
            .bind(attempt.latency_ms)
            .execute(&mut *db_tx)
            .await
            .map_err(db)?;
        db_tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn due_callbacks(&self, now: DateTime<Utc>) -> Result<i64, StoreError> {
        sqlx::query_scalar(q::COUNT_DUE_CALLBACKS).bind(now).fetch_one(&self.pool).await.map_err(db)
    }

    async fn transaction_by_provider_ref(
        &self,
        provider: ProviderName,
        provider_ref: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        let row: Option<TransactionRow> = sqlx::query_as(q::TRANSACTION_BY_PROVIDER_REF)
            .bind(provider.as_str())
            .bind(provider_ref)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(Transaction::try_from).transpose()
    }

    async fn claim_due_polls(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Transaction>, StoreError> {
        let rows: Vec<TransactionRow> = sqlx::query_as(q::CLAIM_POLLS_PG)
            .bind(now)
            .bind(lease_until)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.into_iter().map(Transaction::try_from).collect()
    }

    async fn schedule_poll(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.execute(sqlx::query(q::SCHEDULE_POLL).bind(id).bind(at)).await?;
        Ok(())
    }

    async fn begin_idempotent(&self, c: IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        let inserted = self
            .execute(
                sqlx::query(q::INSERT_IDEMPOTENCY)
                    .bind(c.scope)
                    .bind(c.key)
                    .bind(c.request_hash)
                    .bind(c.now)
                    .bind(c.lock_until),
            )
            .await?;
        if inserted == 1 {
            return Ok(IdempotencyBegin::Proceed);
        }
        let taken = self
            .execute(
                sqlx::query(q::TAKE_OVER_IDEMPOTENCY)
                    .bind(c.scope)
                    .bind(c.key)
                    .bind(c.request_hash)
                    .bind(c.now)
                    .bind(c.lock_until)
                    .bind(c.expired_before),
            )
            .await?;
        if taken == 1 {
            return Ok(IdempotencyBegin::Proceed);
        }
        let row: Option<(String, String, Option<i32>, Option<String>)> = sqlx::query_as(q::IDEMPOTENCY_RECORD)
            .bind(c.scope)
            .bind(c.key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(crate::rows::idempotency_begin(row, c.request_hash))
    }

    async fn finish_idempotent(&self, scope: &str, key: &str, status: u16, body: &str) -> Result<(), StoreError> {
        let query = sqlx::query(q::FINISH_IDEMPOTENCY).bind(scope).bind(key).bind(i32::from(status)).bind(body);
        self.execute(query).await?;
        Ok(())
    }

    async fn release_idempotent(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        self.execute(sqlx::query(q::RELEASE_IDEMPOTENCY).bind(scope).bind(key)).await?;
        Ok(())
    }

    async fn purge_idempotency(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(sqlx::query(q::PURGE_IDEMPOTENCY).bind(before)).await
    }

    async fn add_rate_hits(&self, scope: &str, window_start: DateTime<Utc>, hits: i64) -> Result<i64, StoreError> {
        let added = i32::try_from(hits).unwrap_or(i32::MAX);
        let hits: i32 = sqlx::query_scalar(q::ADD_RATE_HITS)
            .bind(scope)
            .bind(window_start)
            .bind(added)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(i64::from(hits))
    }

    async fn take_rate_hit(&self, scope: &str, window_start: DateTime<Utc>, limit: i64) -> Result<bool, StoreError> {
        let taken: Option<i32> = sqlx::query_scalar(q::TAKE_RATE_HIT)
            .bind(scope)
            .bind(window_start)
            .bind(i32::try_from(limit).unwrap_or(i32::MAX))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(taken.is_some())
    }

    async fn purge_rate_counters(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(sqlx::query(q::PURGE_RATE_COUNTERS).bind(before)).await
    }

    async fn expired_pending(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Transaction>, StoreError> {
        let rows: Vec<TransactionRow> =
            sqlx::query_as(q::EXPIRED_PENDING).bind(now).bind(limit).fetch_all(&self.pool).await.map_err(db)?;
        rows.into_iter().map(Transaction::try_from).collect()
    }

    async fn purge_personal_data(&self, created_before: DateTime<Utc>, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut db_tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(q::PURGE_CALLBACK_BODIES).bind(created_before).execute(&mut *db_tx).await.map_err(db)?;
        let purged = sqlx::query(q::PURGE_TRANSACTIONS)
            .bind(created_before)
            .bind(Json(serde_json::json!({})))
            .bind(Json(TransactionResult::Purged { purged: true }))
            .bind(now)
            .execute(&mut *db_tx)
            .await
            .map_err(db)?;
        db_tx.commit().await.map_err(db)?;
        Ok(purged.rows_affected())
    }

    async fn funnel(&self, query: &FunnelQuery) -> Result<Vec<FunnelCounts>, StoreError> {
        let (raw_sql, rolled_sql) = match query.partner_id {
            Some(_) => (funnel_histogram!(pg_bucket!(), partner), funnel_rolled!(partner)),
            None => (funnel_histogram!(pg_bucket!(), all), funnel_rolled!(all)),
        };
        let rolled_until: Option<DateTime<Utc>> =
            sqlx::query_scalar(q::ROLLED_UNTIL).fetch_one(&self.pool).await.map_err(db)?;
        let plan = crate::rows::funnel_plan(query.since, query.until, rolled_until);
        let mut rows = Vec::new();
        for (sql, since, until) in plan.queries(rolled_sql, raw_sql) {
            let part = FunnelQuery { since, until, ..query.clone() };
            let found: Vec<(Option<String>, Option<String>, Option<String>, Option<f64>, i64, i64, i64, i64, i64)> =
                bind_funnel(sqlx::query_as(sql), &part).fetch_all(&self.pool).await.map_err(db)?;
            rows.extend(found.into_iter().map(|(p, c, pr, b, n, s, f, e, w)| (p, c, pr, b, [n, s, f, e, w])));
        }
        Ok(crate::rows::funnel_counts(rows))
    }

    async fn recent_outcomes(
        &self,
        ended_since: DateTime<Utc>,
        created_since: DateTime<Utc>,
    ) -> Result<Vec<EndedCounts>, StoreError> {
        const RECENT_OUTCOMES: &str = recent_outcomes!("(result->'errors'->0->>'code') = '3908'");
        let rows: Vec<(String, Option<String>, String, i64, i64)> = sqlx::query_as(RECENT_OUTCOMES)
            .bind(ended_since)
            .bind(created_since)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(provider, country, product, succeeded, ended)| EndedCounts {
                provider,
                country,
                product,
                succeeded,
                ended,
            })
            .collect())
    }

    async fn roll_up_funnel(&self, before: DateTime<Utc>, max_hours: u32) -> Result<u32, StoreError> {
        use crate::rows::RollupStep;
        let mut rolled = 0;
        while rolled < max_hours {
            // One hour per transaction, holding the mark's row: another
            // process rolling up waits, then reads the mark this one left.
            let mut db_tx = self.pool.begin().await.map_err(db)?;
            let mark: Option<DateTime<Utc>> =
                sqlx::query_scalar(q::LOCK_ROLLED_UNTIL).fetch_one(&mut *db_tx).await.map_err(db)?;
            let next: Option<DateTime<Utc>> = sqlx::query_scalar(q::NEXT_CREATED)
                .bind(mark.unwrap_or(crate::rows::ROLLUP_ORIGIN))
                .fetch_one(&mut *db_tx)
                .await
                .map_err(db)?;
            let advance = |to: DateTime<Utc>| sqlx::query(q::ADVANCE_ROLLUP).bind(mark).bind(to);
            let hour = match crate::rows::rollup_step(mark, next, before) {
                RollupStep::Stop => {
                    db_tx.rollback().await.map_err(db)?;
                    break;
                }
                RollupStep::Skip(to) => {
                    advance(to).execute(&mut *db_tx).await.map_err(db)?;
                    db_tx.commit().await.map_err(db)?;
                    break;
                }
                RollupStep::Roll(hour) => hour,
            };
            let end = hour + chrono::Duration::hours(1);
            let pending: i64 =
                sqlx::query_scalar(q::PENDING_IN_HOUR).bind(hour).bind(end).fetch_one(&mut *db_tx).await.map_err(db)?;
            if pending > 0 {
                if mark.is_none_or(|mark| mark < hour) {
                    advance(hour).execute(&mut *db_tx).await.map_err(db)?;
                    db_tx.commit().await.map_err(db)?;
                } else {
                    db_tx.rollback().await.map_err(db)?;
                }
                break;
            }
            const ROLL_UP_HOUR: &str = roll_up_hour!(pg_bucket!());
            sqlx::query(ROLL_UP_HOUR).bind(hour).bind(end).execute(&mut *db_tx).await.map_err(db)?;
            advance(end).execute(&mut *db_tx).await.map_err(db)?;
            db_tx.commit().await.map_err(db)?;
            rolled += 1;
        }
        Ok(rolled)
    }

    async fn range_traffic(
        &self,
        range: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<RangeTraffic, StoreError> {
        let pause: Option<(DateTime<Utc>, Option<DateTime<Utc>>)> =
            sqlx::query_as(q::RANGE_PAUSE).bind(range).fetch_optional(&self.pool).await.map_err(db)?;
        let (paused_until, released_at) = pause.map_or((None, None), |(until, released)| (Some(until), released));
        let from = crate::rows::counts_from(since, paused_until, released_at, now);
        let succeeded: i64 =
            sqlx::query_scalar(q::RANGE_SUCCEEDED).bind(range).bind(from).fetch_one(&self.pool).await.map_err(db)?;
        Ok(RangeTraffic { succeeded, paused_until, released_at })
    }

    async fn pause_range(&self, pause: &NewPause<'_>) -> Result<bool, StoreError> {
        let query = sqlx::query(q::PAUSE_RANGE)
            .bind(pause.range)
            .bind(pause.paused_at)
            .bind(pause.paused_until)
            .bind(pause.sends)
            .bind(pause.succeeded)
            .bind(pause.released_at_seen);
        Ok(self.execute(query).await? == 1)
    }

    async fn paused_ranges(&self, now: DateTime<Utc>) -> Result<Vec<PausedRange>, StoreError> {
        let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>, i64, i64)> =
            sqlx::query_as(q::PAUSED_RANGES).bind(now).fetch_all(&self.pool).await.map_err(db)?;
        Ok(rows.into_iter().map(crate::rows::paused_range).collect())
    }

    async fn release_range(&self, range: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        Ok(self.execute(sqlx::query(q::RELEASE_RANGE).bind(range).bind(now)).await? == 1)
    }
}
