//! The SQL both stores run. `portable_store!` writes the one `Store`
//! implementation for each pool type, so a query is written once and a fix
//! applies to both databases.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use handset_core::model::{
    CallbackAttempt, CallbackRecord, CallbackState, ClaimedCallback, OutboxMessage, Partner, ProviderName, Status,
    Transaction, TransactionResult, Verification,
};
use handset_core::partner_cache::PartnerCache;
use handset_core::store::{
    AfterAttempt, Claim, Finalization, IdempotencyBegin, IdempotencyClaim, LocalCodeAttempt, NewPartner, PartnerByKey,
    PartnerRecord, PoolUsage, Requeued, Store, StoreError,
};
use sqlx::types::Json;
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use crate::rows::{AttemptRow, OutboxRow, PartnerByKeyRow, PartnerRecordRow, TransactionRow, VerificationRow};

/// Postgres, the production store.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
}

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        PgStore { pool }
    }

    /// Postgres serves reads and writes from one pool.
    fn readers(&self) -> &PgPool {
        &self.pool
    }

    fn pools(&self) -> [(&'static str, &PgPool); 1] {
        [("main", &self.pool)]
    }

    /// Postgres answering `SELECT 1` is all readiness needs.
    fn still_in_place(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// SQLite, the embedded default. SQLite has one writer at a time: every
/// write goes through `pool`, a single connection whose queue is fair, so
/// writers take turns instead of retrying against the file lock; reads use
/// `readers`, any number at once (WAL lets them run beside the writer).
///
/// Starts and local-code confirms send a transaction as batches of
/// statements (each statement is a hop to the connection's thread); a batch
/// cut short by cancelling its future would leave the transaction open on
/// the writer, so callers must not cancel them (handset runs each request's
/// work in a task of its own, which a client hanging up does not cancel).
#[derive(Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    readers: SqlitePool,
    /// `sqlite::memory:`: no file to check for readiness.
    in_memory: bool,
}

impl SqliteStore {
    pub fn new(writer: SqlitePool, readers: SqlitePool, in_memory: bool) -> Self {
        SqliteStore { pool: writer, readers, in_memory }
    }

    fn readers(&self) -> &SqlitePool {
        &self.readers
    }

    fn pools(&self) -> [(&'static str, &SqlitePool); 2] {
        [("writer", &self.pool), ("readers", &self.readers)]
    }

    /// The database file is still where the pool opens it. An open SQLite
    /// connection goes on working on a file that was deleted or moved away,
    /// so `SELECT 1` alone would call ready a process whose writes no restart
    /// (and no other replica) will ever see.
    fn still_in_place(&self) -> Result<(), StoreError> {
        let options = self.pool.connect_options();
        let file = options.get_filename();
        if self.in_memory || file.exists() {
            return Ok(());
        }
        Err(StoreError::Database(format!("the SQLite file {} is gone", file.display()).into()))
    }
}

fn status_of(code: i32) -> Result<Status, StoreError> {
    Status::from_code(code).ok_or_else(|| StoreError::Corrupt(format!("status_code {code}")))
}

pub(crate) fn db(error: sqlx::Error) -> StoreError {
    if let Some(db_error) = error.as_database_error()
        && db_error.is_unique_violation()
    {
        return StoreError::Conflict(db_error.message().to_owned());
    }
    StoreError::Database(Box::new(error))
}

const PARTNER_COLUMNS: &str = "id, name, products, active, webhook_secret, created_at";
/// The ends of a partner's rotation overlaps, read after `PARTNER_COLUMNS` (`PartnerRecordRow`).
const PARTNER_ROTATIONS: &str = "previous_api_key_expires_at, previous_webhook_secret_expires_at";

const TRANSACTION_COLUMNS: &str = "id, verification_id, partner_id, product, provider, phone, birth_date, \
    status_code, created_at, updated_at, expires_at, attempts_used, max_attempts, code_hash, provider_ref, \
    redirect_url, redirect_uri, callback_url, name, metadata, result, provider_verification, next_poll_at, \
    poll_attempts";

const OUTBOX_COLUMNS: &str = "id, transaction_id, partner_id, callback_url, payload, created_at";

const OUTBOX_SELECT: &str =
    "id, transaction_id, partner_id, callback_url, payload, created_at, state, next_attempt_at, attempts";

fn product_names(partner: &Partner) -> Json<Vec<&'static str>> {
    Json(partner.products.iter().map(|p| p.as_str()).collect())
}

macro_rules! portable_store {
    // `$claim_lock`: how a claim skips rows another process is claiming
    // (Postgres row locks); SQLite's single writer needs nothing.
    ($store:ty, $migrations:literal, $claim_lock:literal) => {
        /// An outbox row's six values bound as $1-$6 (`outbox_insert`).
        fn bind_outbox<'q>(
            query: sqlx::query::Query<'q, <$store as StoreDb>::Db, <<$store as StoreDb>::Db as sqlx::Database>::Arguments<'q>>,
            m: &'q OutboxMessage,
        ) -> sqlx::query::Query<'q, <$store as StoreDb>::Db, <<$store as StoreDb>::Db as sqlx::Database>::Arguments<'q>> {
            query.bind(m.id).bind(m.transaction_id).bind(m.partner_id).bind(&m.callback_url).bind(&m.payload).bind(m.created_at)
        }

        /// The transaction's 24 columns bound as $1-$24, in `TRANSACTION_COLUMNS` order.
        fn bind_transaction<'q>(
            query: sqlx::query::Query<'q, <$store as StoreDb>::Db, <<$store as StoreDb>::Db as sqlx::Database>::Arguments<'q>>,
            t: &'q Transaction,
        ) -> sqlx::query::Query<'q, <$store as StoreDb>::Db, <<$store as StoreDb>::Db as sqlx::Database>::Arguments<'q>> {
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
        }

        impl $store {
            async fn write_partner(&self, new: &NewPartner, on_conflict: &str) -> Result<(), StoreError> {
                let p = &new.partner;
                sqlx::query(&format!(
                    "INSERT INTO partners ({PARTNER_COLUMNS}, api_key_hash) VALUES ($1, $2, $3, $4, $5, $6, $7) {on_conflict}"
                ))
                .bind(p.id)
                .bind(&p.name)
                .bind(product_names(p))
                .bind(p.active)
                .bind(p.webhook_secret.expose())
                .bind(p.created_at)
                .bind(&new.api_key_hash)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            /// Sets `current` to `value`; with `previous_until`, the old value
            /// moves to `previous`, valid until then (`until`), else any
            /// previous one is dropped. SET reads the row as it was.
            async fn rotate(
                &self,
                id: Uuid,
                [current, previous, until]: [&str; 3],
                value: &str,
                previous_until: Option<DateTime<Utc>>,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(&format!(
                    "UPDATE partners SET {previous} = CASE WHEN $3 IS NULL THEN NULL ELSE {current} END, \
                     {until} = $3, {current} = $2 WHERE id = $1"
                ))
                .bind(id)
                .bind(value)
                .bind(previous_until)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(done.rows_affected() == 1)
            }

            async fn insert_outbox<'c, E>(executor: E, message: &OutboxMessage) -> Result<(), StoreError>
            where
                E: sqlx::Executor<'c, Database = <$store as StoreDb>::Db>,
            {
                bind_outbox(sqlx::query(&outbox_insert()), message).execute(executor).await.map_err(db)?;
                Ok(())
            }
        }

        #[async_trait]
        impl Store for $store {
            async fn migrate(&self) -> Result<(), StoreError> {
                sqlx::migrate!($migrations)
                    .run(&self.pool)
                    .await
                    .map_err(|e| StoreError::Database(Box::new(e)))
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(self.readers()).await.map_err(db)?;
                self.still_in_place()
            }

            fn pool_usage(&self) -> Vec<PoolUsage> {
                self.pools().into_iter().map(|(name, pool)| usage(name, pool)).collect()
            }

            async fn follow_partner_changes(&self, cache: &PartnerCache) {
                self.follow_changes(cache).await
            }

            async fn insert_partner(&self, new: &NewPartner) -> Result<(), StoreError> {
                self.write_partner(new, "").await
            }

            async fn upsert_partner(&self, new: &NewPartner) -> Result<(), StoreError> {
                self.write_partner(
                    new,
                    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, products = excluded.products, \
                     api_key_hash = excluded.api_key_hash",
                )
                .await
            }

            async fn partner_by_key_hash(
                &self,
                api_key_hash: &str,
                now: DateTime<Utc>,
            ) -> Result<Option<PartnerByKey>, StoreError> {
                let row: Option<PartnerByKeyRow> = sqlx::query_as(&format!(
                    "SELECT {PARTNER_COLUMNS}, CASE WHEN api_key_hash = $1 THEN NULL \
                     ELSE previous_api_key_expires_at END AS key_expires_at FROM partners \
                     WHERE api_key_hash = $1 OR (previous_api_key_hash = $1 AND previous_api_key_expires_at > $2)"
                ))
                .bind(api_key_hash)
                .bind(now)
                .fetch_optional(self.readers())
                .await
                .map_err(db)?;
                row.map(PartnerByKey::try_from).transpose()
            }

            async fn partners(&self) -> Result<Vec<PartnerRecord>, StoreError> {
                let rows: Vec<PartnerRecordRow> =
                    sqlx::query_as(&format!("SELECT {PARTNER_COLUMNS}, {PARTNER_ROTATIONS} FROM partners ORDER BY created_at, id"))
                        .fetch_all(self.readers())
                        .await
                        .map_err(db)?;
                rows.into_iter().map(PartnerRecord::try_from).collect()
            }

            async fn partner(&self, id: Uuid) -> Result<Option<PartnerRecord>, StoreError> {
                let row: Option<PartnerRecordRow> =
                    sqlx::query_as(&format!("SELECT {PARTNER_COLUMNS}, {PARTNER_ROTATIONS} FROM partners WHERE id = $1"))
                        .bind(id)
                        .fetch_optional(self.readers())
                        .await
                        .map_err(db)?;
                row.map(PartnerRecord::try_from).transpose()
            }

            async fn rotate_api_key(
                &self,
                id: Uuid,
                api_key_hash: &str,
                previous_until: Option<DateTime<Utc>>,
            ) -> Result<bool, StoreError> {
                let columns = ["api_key_hash", "previous_api_key_hash", "previous_api_key_expires_at"];
                self.rotate(id, columns, api_key_hash, previous_until).await
            }

            async fn rotate_webhook_secret(
                &self,
                id: Uuid,
                webhook_secret: &str,
                previous_until: Option<DateTime<Utc>>,
            ) -> Result<bool, StoreError> {
                let columns = ["webhook_secret", "previous_webhook_secret", "previous_webhook_secret_expires_at"];
                self.rotate(id, columns, webhook_secret, previous_until).await
            }

            async fn requeue_failed_callbacks(
                &self,
                partner_id: Uuid,
                since: DateTime<Utc>,
                now: DateTime<Utc>,
            ) -> Result<Requeued, StoreError> {
                let ids: Vec<(Uuid,)> = sqlx::query_as(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = $3, finished_at = NULL, \
                     lease_owner = NULL, lease_until = NULL \
                     WHERE partner_id = $1 AND state = 'failed' AND finished_at >= $2 AND payload <> '' RETURNING id",
                )
                .bind(partner_id)
                .bind(since)
                .bind(now)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                let purged: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM outbox WHERE partner_id = $1 AND state = 'failed' AND finished_at >= $2 \
                     AND payload = ''",
                )
                .bind(partner_id)
                .bind(since)
                .fetch_one(self.readers())
                .await
                .map_err(db)?;
                Ok(Requeued { ids: ids.into_iter().map(|(id,)| id).collect(), purged: u64::try_from(purged).unwrap_or(0) })
            }

            async fn set_partner_active(&self, id: Uuid, active: bool) -> Result<bool, StoreError> {
                let done = sqlx::query("UPDATE partners SET active = $2 WHERE id = $1")
                    .bind(id)
                    .bind(active)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(done.rows_affected() == 1)
            }

            async fn verification(&self, id: Uuid) -> Result<Option<Verification>, StoreError> {
                let row: Option<VerificationRow> =
                    sqlx::query_as("SELECT id, partner_id, created_at FROM verifications WHERE id = $1")
                        .bind(id)
                        .fetch_optional(self.readers())
                        .await
                        .map_err(db)?;
                Ok(row.map(Verification::from))
            }

            async fn insert_transaction(
                &self,
                t: &Transaction,
                new_verification: Option<&Verification>,
                outbox: Option<&OutboxMessage>,
            ) -> Result<(), StoreError> {
                let insert = format!(
                    "INSERT INTO transactions ({TRANSACTION_COLUMNS}) VALUES \
                     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
                     $22, $23, $24)"
                );
                // A start (a new verification, nothing owed yet): one round trip.
                if let (Some(v), None) = (new_verification, outbox) {
                    return self.insert_start(&insert, t, v).await;
                }
                let mut db_tx = self.pool.begin().await.map_err(db)?;
                if let Some(v) = new_verification {
                    sqlx::query("INSERT INTO verifications (id, partner_id, created_at) VALUES ($1, $2, $3)")
                        .bind(v.id)
                        .bind(v.partner_id)
                        .bind(v.created_at)
                        .execute(&mut *db_tx)
                        .await
                        .map_err(db)?;
                }
                bind_transaction(sqlx::query(&insert), t).execute(&mut *db_tx).await.map_err(db)?;
                if let Some(message) = outbox {
                    Self::insert_outbox(&mut *db_tx, message).await?;
                }
                db_tx.commit().await.map_err(db)
            }

            async fn transaction(&self, id: Uuid) -> Result<Option<Transaction>, StoreError> {
                let row: Option<TransactionRow> =
                    sqlx::query_as(&format!("SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE id = $1"))
                        .bind(id)
                        .fetch_optional(self.readers())
                        .await
                        .map_err(db)?;
                row.map(Transaction::try_from).transpose()
            }

            async fn transactions_of_verification(&self, verification_id: Uuid) -> Result<Vec<Transaction>, StoreError> {
                let rows: Vec<TransactionRow> = sqlx::query_as(&format!(
                    "SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE verification_id = $1 ORDER BY created_at, id"
                ))
                .bind(verification_id)
                .fetch_all(self.readers())
                .await
                .map_err(db)?;
                rows.into_iter().map(Transaction::try_from).collect()
            }

            async fn use_attempt(&self, id: Uuid, now: DateTime<Utc>) -> Result<Option<i32>, StoreError> {
                // One statement: the row lock (Postgres) or the single writer
                // (SQLite) makes the check and the increment indivisible.
                sqlx::query_scalar(
                    "UPDATE transactions SET attempts_used = attempts_used + 1, updated_at = $2 \
                     WHERE id = $1 AND status_code = 210 AND attempts_used < max_attempts \
                     AND (expires_at IS NULL OR expires_at > $2) RETURNING attempts_used",
                )
                .bind(id)
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)
            }

            async fn refund_attempt(&self, id: Uuid) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE transactions SET attempts_used = attempts_used - 1 \
                     WHERE id = $1 AND status_code = 210 AND attempts_used > 0",
                )
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(done.rows_affected() == 1)
            }

            async fn attempt_local_code(
                &self,
                a: LocalCodeAttempt<'_>,
            ) -> Result<Option<(Status, i32)>, StoreError> {
                // Both messages share the transaction's partner and callback URL.
                if let Some(message) = a.on_success.or(a.on_exhausted) {
                    return self.local_code_with_callback(&a, message).await;
                }
                let row = local_code_update(sqlx::query_as::<_, (i32, i32)>(LOCAL_CODE_UPDATE), &a)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.map(|(code, used)| Ok((status_of(code)?, used))).transpose()
            }

            async fn finalize(&self, f: Finalization<'_>) -> Result<bool, StoreError> {
                let t = f.transaction;
                let mut db_tx = self.pool.begin().await.map_err(db)?;
                let done = sqlx::query(
                    "UPDATE transactions SET status_code = $2, result = $3, updated_at = $4, attempts_used = $5, \
                     provider_ref = $6 WHERE id = $1 AND status_code = 210",
                )
                .bind(t.id)
                .bind(t.status.code())
                .bind(t.result.as_ref().map(Json))
                .bind(t.updated_at)
                .bind(t.attempts_used)
                .bind(&t.provider_ref)
                .execute(&mut *db_tx)
                .await
                .map_err(db)?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                if let Some(message) = f.outbox {
                    Self::insert_outbox(&mut *db_tx, message).await?;
                }
                db_tx.commit().await.map_err(db)?;
                Ok(true)
            }

            async fn renew_provider_ref(
                &self,
                id: Uuid,
                old: Option<&str>,
                renewed: &str,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE transactions SET provider_ref = $3 WHERE id = $1 AND status_code = 210 \
                     AND (provider_ref = $2 OR (provider_ref IS NULL AND $2 IS NULL))",
                )
                .bind(id)
                .bind(old)
                .bind(renewed)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(done.rows_affected() == 1)
            }

            async fn insert_outbox_capped(&self, message: &OutboxMessage, max_pending: i64) -> Result<bool, StoreError> {
                let mut db_tx = self.pool.begin().await.map_err(db)?;
                // Locks the transaction's row so concurrent retries count one after another.
                sqlx::query("UPDATE transactions SET updated_at = updated_at WHERE id = $1")
                    .bind(message.transaction_id)
                    .execute(&mut *db_tx)
                    .await
                    .map_err(db)?;
                let pending: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE transaction_id = $1 AND state = 'pending'")
                        .bind(message.transaction_id)
                        .fetch_one(&mut *db_tx)
                        .await
                        .map_err(db)?;
                if pending >= max_pending {
                    return Ok(false);
                }
                Self::insert_outbox(&mut *db_tx, message).await?;
                db_tx.commit().await.map_err(db)?;
                Ok(true)
            }

            async fn callbacks_of_transaction(&self, transaction_id: Uuid) -> Result<Vec<CallbackRecord>, StoreError> {
                let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
                    "SELECT {OUTBOX_SELECT} FROM outbox WHERE transaction_id = $1 ORDER BY created_at, id"
                ))
                .bind(transaction_id)
                .fetch_all(self.readers())
                .await
                .map_err(db)?;
                let attempts: Vec<AttemptRow> = sqlx::query_as(
                    "SELECT a.outbox_id, a.attempted_at, a.status_code, a.error, a.latency_ms \
                     FROM callback_attempts a JOIN outbox o ON o.id = a.outbox_id \
                     WHERE o.transaction_id = $1 ORDER BY a.id",
                )
                .bind(transaction_id)
                .fetch_all(self.readers())
                .await
                .map_err(db)?;
                rows.into_iter()
                    .map(|row| {
                        let id = row.message().id;
                        let mine = attempts.iter().filter(|a| a.outbox_id == id);
                        row.into_record(mine.map(|a| CallbackAttempt::from(a.clone())).collect())
                    })
                    .collect()
            }

            async fn claim_due_callbacks(&self, claim: Claim<'_>) -> Result<Vec<ClaimedCallback>, StoreError> {
                let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
                    "UPDATE outbox SET lease_owner = $1, lease_until = $2 \
                     WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= $3 \
                     AND (lease_until IS NULL OR lease_until <= $3) ORDER BY next_attempt_at LIMIT $4 {}) \
                     RETURNING {OUTBOX_SELECT}",
                    $claim_lock
                ))
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
                            let (secret, previous): (String, Option<String>) = sqlx::query_as(
                                "SELECT webhook_secret, CASE WHEN previous_webhook_secret_expires_at > $2 \
                                 THEN previous_webhook_secret END FROM partners WHERE id = $1",
                            )
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
                let (state, next_attempt_at, finished_at) = match next {
                    AfterAttempt::Delivered => (CallbackState::Delivered, None, Some(attempt.attempted_at)),
                    AfterAttempt::RetryAt(at) => (CallbackState::Pending, Some(at), None),
                    AfterAttempt::GiveUp => (CallbackState::Failed, None, Some(attempt.attempted_at)),
                };
                let mut db_tx = self.pool.begin().await.map_err(db)?;
                let done = sqlx::query(
                    "UPDATE outbox SET state = $3, next_attempt_at = COALESCE($4, next_attempt_at), \
                     finished_at = $5, lease_owner = NULL, lease_until = NULL, attempts = attempts + 1 \
                     WHERE id = $1 AND lease_owner = $2 AND state = 'pending'",
                )
                .bind(id)
                .bind(owner)
                .bind(state.as_str())
                .bind(next_attempt_at)
                .bind(finished_at)
                .execute(&mut *db_tx)
                .await
                .map_err(db)?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                sqlx::query(
                    "INSERT INTO callback_attempts (outbox_id, attempted_at, status_code, error, latency_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
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
                sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND next_attempt_at <= $1")
                    .bind(now)
                    .fetch_one(self.readers())
                    .await
                    .map_err(db)
            }

            async fn transaction_by_provider_ref(
                &self,
                provider: ProviderName,
                provider_ref: &str,
            ) -> Result<Option<Transaction>, StoreError> {
                let row: Option<TransactionRow> = sqlx::query_as(&format!(
                    "SELECT {TRANSACTION_COLUMNS} FROM transactions WHERE provider = $1 AND provider_ref = $2"
                ))
                .bind(provider.as_str())
                .bind(provider_ref)
                .fetch_optional(self.readers())
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
                let rows: Vec<TransactionRow> = sqlx::query_as(&format!(
                    "UPDATE transactions SET next_poll_at = $2, poll_attempts = poll_attempts + 1 \
                     WHERE id IN (SELECT id FROM transactions WHERE status_code = 210 AND next_poll_at IS NOT NULL \
                     AND next_poll_at <= $1 ORDER BY next_poll_at LIMIT $3 {}) RETURNING {TRANSACTION_COLUMNS}",
                    $claim_lock
                ))
                .bind(now)
                .bind(lease_until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.into_iter().map(Transaction::try_from).collect()
            }

            async fn schedule_poll(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
                sqlx::query("UPDATE transactions SET next_poll_at = $2 WHERE id = $1 AND status_code = 210")
                    .bind(id)
                    .bind(at)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn begin_idempotent(&self, c: IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
                let inserted = sqlx::query(
                    "INSERT INTO idempotency_keys (scope, idem_key, request_hash, state, created_at, locked_until) \
                     VALUES ($1, $2, $3, 'in_flight', $4, $5) ON CONFLICT (scope, idem_key) DO NOTHING",
                )
                .bind(c.scope)
                .bind(c.key)
                .bind(c.request_hash)
                .bind(c.now)
                .bind(c.lock_until)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                if inserted.rows_affected() == 1 {
                    return Ok(IdempotencyBegin::Proceed);
                }
                // Taken over when expired (24 h) or when its request died holding it.
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET request_hash = $3, state = 'in_flight', status_code = NULL, \
                     response_body = NULL, created_at = $4, locked_until = $5 \
                     WHERE scope = $1 AND idem_key = $2 AND (created_at < $6 \
                     OR (state = 'in_flight' AND locked_until <= $4 AND request_hash = $3))",
                )
                .bind(c.scope)
                .bind(c.key)
                .bind(c.request_hash)
                .bind(c.now)
                .bind(c.lock_until)
                .bind(c.expired_before)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                if taken.rows_affected() == 1 {
                    return Ok(IdempotencyBegin::Proceed);
                }
                let row: Option<(String, String, Option<i32>, Option<String>)> = sqlx::query_as(
                    "SELECT request_hash, state, status_code, response_body FROM idempotency_keys \
                     WHERE scope = $1 AND idem_key = $2",
                )
                .bind(c.scope)
                .bind(c.key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                Ok(match row {
                    // Released meanwhile: the caller may simply try again.
                    None => IdempotencyBegin::InFlight,
                    Some((hash, _, _, _)) if hash != c.request_hash => IdempotencyBegin::Mismatch,
                    Some((_, state, Some(status), Some(body))) if state == "done" => {
                        IdempotencyBegin::Replay { status: u16::try_from(status).unwrap_or(500), body }
                    }
                    Some(_) => IdempotencyBegin::InFlight,
                })
            }

            async fn finish_idempotent(&self, scope: &str, key: &str, status: u16, body: &str) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE idempotency_keys SET state = 'done', status_code = $3, response_body = $4 \
                     WHERE scope = $1 AND idem_key = $2",
                )
                .bind(scope)
                .bind(key)
                .bind(i32::from(status))
                .bind(body)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn release_idempotent(&self, scope: &str, key: &str) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND state = 'in_flight'")
                    .bind(scope)
                    .bind(key)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn purge_idempotency(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(done.rows_affected())
            }

            async fn add_rate_hits(
                &self,
                scope: &str,
                window_start: DateTime<Utc>,
                hits: i64,
            ) -> Result<i64, StoreError> {
                let added = i32::try_from(hits).unwrap_or(i32::MAX);
                let hits: i32 = sqlx::query_scalar(
                    "INSERT INTO rate_counters (scope, window_start, hits) VALUES ($1, $2, $3) \
                     ON CONFLICT (scope, window_start) DO UPDATE SET hits = rate_counters.hits + $3 RETURNING hits",
                )
                .bind(scope)
                .bind(window_start)
                .bind(added)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
                Ok(i64::from(hits))
            }

            async fn take_rate_hit(
                &self,
                scope: &str,
                window_start: DateTime<Utc>,
                limit: i64,
            ) -> Result<bool, StoreError> {
                let taken: Option<i32> = sqlx::query_scalar(
                    "INSERT INTO rate_counters (scope, window_start, hits) VALUES ($1, $2, 1) \
                     ON CONFLICT (scope, window_start) DO UPDATE SET hits = rate_counters.hits + 1 \
                     WHERE rate_counters.hits < $3 RETURNING hits",
                )
                .bind(scope)
                .bind(window_start)
                .bind(i32::try_from(limit).unwrap_or(i32::MAX))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                Ok(taken.is_some())
            }

            async fn purge_rate_counters(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM rate_counters WHERE window_start < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(done.rows_affected())
            }

            async fn expired_pending(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Transaction>, StoreError> {
                let rows: Vec<TransactionRow> = sqlx::query_as(&format!(
                    "SELECT {TRANSACTION_COLUMNS} FROM transactions \
                     WHERE status_code = 210 AND expires_at IS NOT NULL AND expires_at <= $1 \
                     ORDER BY expires_at LIMIT $2"
                ))
                .bind(now)
                .bind(limit)
                .fetch_all(self.readers())
                .await
                .map_err(db)?;
                rows.into_iter().map(Transaction::try_from).collect()
            }

            async fn purge_personal_data(&self, created_before: DateTime<Utc>, now: DateTime<Utc>) -> Result<u64, StoreError> {
                let mut db_tx = self.pool.begin().await.map_err(db)?;
                sqlx::query(
                    "UPDATE outbox SET payload = '' WHERE state <> 'pending' AND payload <> '' AND created_at < $1",
                )
                .bind(created_before)
                .execute(&mut *db_tx)
                .await
                .map_err(db)?;
                let purged = sqlx::query(
                    "UPDATE transactions SET phone = NULL, birth_date = NULL, name = NULL, redirect_uri = NULL, \
                     metadata = $2, result = CASE WHEN status_code = 200 THEN $3 ELSE result END, purged_at = $4 \
                     WHERE created_at < $1 AND status_code <> 210 AND purged_at IS NULL",
                )
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
        }
    };
}

fn usage<DB: sqlx::Database>(name: &'static str, pool: &sqlx::Pool<DB>) -> PoolUsage {
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
    PoolUsage { pool: name, open: pool.size(), idle, max: pool.options().get_max_connections() }
}

/// Names each store's sqlx database type for the macro.
pub(crate) trait StoreDb {
    type Db: sqlx::Database;
}

impl StoreDb for PgStore {
    type Db = sqlx::Postgres;
}

impl StoreDb for SqliteStore {
    type Db = sqlx::Sqlite;
}

/// A callback row, due at once (see `bind_outbox`).
fn outbox_insert() -> String {
    format!("INSERT INTO outbox ({OUTBOX_COLUMNS}, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $6)")
}

/// A code handset checked itself: the attempt and the verdict in one
/// conditional statement (the row lock on Postgres, the single writer on
/// SQLite make them indivisible); `RETURNING` says which state it left.
const LOCAL_CODE_UPDATE: &str = "UPDATE transactions SET attempts_used = attempts_used + 1, updated_at = $2, \
     status_code = CASE WHEN $3 THEN 200 WHEN attempts_used + 1 >= max_attempts THEN 300 ELSE status_code END, \
     result = CASE WHEN $3 THEN $4 WHEN attempts_used + 1 >= max_attempts THEN $5 ELSE result END \
     WHERE id = $1 AND status_code = 210 AND attempts_used < max_attempts \
     AND (expires_at IS NULL OR expires_at > $2) RETURNING status_code, attempts_used";

/// `LOCAL_CODE_UPDATE`'s parameters $1-$5.
fn local_code_update<'q, DB, O>(
    query: sqlx::query::QueryAs<'q, DB, O, <DB as sqlx::Database>::Arguments<'q>>,
    a: &LocalCodeAttempt<'q>,
) -> sqlx::query::QueryAs<'q, DB, O, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Json<&'q TransactionResult>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    query.bind(a.id).bind(a.now).bind(a.matched).bind(Json(a.success)).bind(Json(a.exhausted))
}

/// The callback a local code's verdict owes, by the status it left.
fn owed<'a>(a: &LocalCodeAttempt<'a>, status: Status) -> Option<&'a OutboxMessage> {
    match status {
        Status::Succeeded => a.on_success,
        Status::Failed => a.on_exhausted,
        Status::Pending => None,
    }
}

mod pg {
    use std::time::Duration;

    use super::*;
    portable_store!(PgStore, "../../migrations/postgres", "FOR UPDATE SKIP LOCKED");

    async fn listen(pool: &PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.eager_reconnect(false);
        listener.listen(PARTNER_CHANNEL).await?;
        Ok(listener)
    }

    /// The channel the `partners` table's trigger notifies (migration 0006).
    const PARTNER_CHANNEL: &str = "handset_partners";
    /// The payload of the listener's own heartbeat (the trigger's is empty).
    const PING: &str = "ping";

    impl PgStore {
        /// Listens on `PARTNER_CHANNEL` over a connection of its own (outside
        /// the request pool). The cache is followed only while the listener
        /// is connected and listening; a lost connection stops that at once
        /// and is re-opened after a pause.
        pub(crate) async fn follow_changes(&self, cache: &PartnerCache) {
            let options = (*self.pool.connect_options()).clone();
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
        /// NAT entry, a pooler that does not keep LISTEN): after
        /// `HEARTBEAT` of quiet, a ping is announced through the request pool
        /// and must be heard within `ECHO_WAIT`, else the listener counts as lost.
        async fn hear_changes(&self, listener: &mut sqlx::postgres::PgListener, cache: &PartnerCache) {
            const HEARTBEAT: Duration = Duration::from_secs(10);
            const ECHO_WAIT: Duration = Duration::from_secs(5);
            let heard = |notification: sqlx::postgres::PgNotification| {
                if notification.payload() != PING {
                    cache.changed();
                }
            };
            loop {
                match tokio::time::timeout(HEARTBEAT, listener.try_recv()).await {
                    // `Ok(None)`: the connection was lost (the listener is
                    // set not to reconnect by itself, so nothing is missed unseen).
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

        /// The verification and the transaction in one statement.
        async fn insert_start(&self, insert: &str, t: &Transaction, v: &Verification) -> Result<(), StoreError> {
            let sql = format!(
                "WITH verification AS (INSERT INTO verifications (id, partner_id, created_at) VALUES ($25, $26, $27)) \
                 {insert}"
            );
            let query = bind_transaction(sqlx::query(&sql), t).bind(v.id).bind(v.partner_id).bind(v.created_at);
            query.execute(&self.pool).await.map_err(db)?;
            Ok(())
        }

        /// The attempt, the verdict and the callback it owes in one statement:
        /// the outbox row is inserted only for the status the update left.
        async fn local_code_with_callback(
            &self,
            a: &LocalCodeAttempt<'_>,
            message: &OutboxMessage,
        ) -> Result<Option<(Status, i32)>, StoreError> {
            let sql = format!(
                "WITH t AS ({LOCAL_CODE_UPDATE}), owed AS (INSERT INTO outbox ({OUTBOX_COLUMNS}, next_attempt_at) \
                 SELECT m.id, $1, $6, $7, m.payload, m.created_at, m.created_at FROM t JOIN (VALUES \
                 ($8::uuid, 200, $9::text, $10::timestamptz), ($11::uuid, 300, $12::text, $13::timestamptz)) \
                 AS m (id, status_code, payload, created_at) ON m.status_code = t.status_code WHERE m.id IS NOT NULL) \
                 SELECT status_code, attempts_used FROM t"
            );
            let row = local_code_update(sqlx::query_as::<_, (i32, i32)>(&sql), a)
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
                .map_err(db)?;
            row.map(|(code, used)| Ok((status_of(code)?, used))).transpose()
        }
    }
}

mod sqlite {
    use sqlx::SqliteConnection;

    use super::*;
    portable_store!(SqliteStore, "../../migrations/sqlite", "");

    /// Rolls back what a multi-statement write left open when it failed
    /// (the writer connection goes back to the pool clean), then fails with `error`.
    async fn rolled_back<T>(conn: &mut SqliteConnection, error: StoreError) -> Result<T, StoreError> {
        if let Err(rollback) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
            tracing::debug!(%rollback, "nothing to roll back");
        }
        Err(error)
    }

    impl SqliteStore {
        /// SQLite cannot tell another process's writes as they happen, so the
        /// partner cache is never followed: every request reads its partner.
        pub(crate) async fn follow_changes(&self, _cache: &PartnerCache) {}

        /// The verification and the transaction in one transaction, sent as
        /// one batch: each statement is a hop to the connection's thread.
        async fn insert_start(&self, insert: &str, t: &Transaction, v: &Verification) -> Result<(), StoreError> {
            let sql = format!(
                "BEGIN; INSERT INTO verifications (id, partner_id, created_at) VALUES ($25, $26, $27); {insert}; COMMIT"
            );
            let mut conn = self.pool.acquire().await.map_err(db)?;
            let query = bind_transaction(sqlx::query(&sql), t).bind(v.id).bind(v.partner_id).bind(v.created_at);
            match query.execute(&mut *conn).await {
                Ok(_) => Ok(()),
                Err(error) => rolled_back(&mut conn, db(error)).await,
            }
        }

        /// The attempt and the verdict, then the callback it owes and the
        /// commit: one transaction sent as two batches.
        async fn local_code_with_callback(
            &self,
            a: &LocalCodeAttempt<'_>,
            _message: &OutboxMessage,
        ) -> Result<Option<(Status, i32)>, StoreError> {
            let mut conn = self.pool.acquire().await.map_err(db)?;
            let sql = format!("BEGIN; {LOCAL_CODE_UPDATE}");
            let decided = match local_code_update(sqlx::query_as::<_, (i32, i32)>(&sql), a).fetch_all(&mut *conn).await
            {
                Ok(rows) => rows.first().map(|&(code, used)| status_of(code).map(|status| (status, used))).transpose(),
                Err(error) => Err(db(error)),
            };
            let decided = match decided {
                Ok(decided) => decided,
                Err(error) => return rolled_back(&mut conn, error).await,
            };
            let written = match decided.and_then(|(status, _)| owed(a, status)) {
                Some(m) => {
                    let sql = format!("{}; COMMIT", outbox_insert());
                    bind_outbox(sqlx::query(&sql), m).execute(&mut *conn).await
                }
                None => sqlx::query("COMMIT").execute(&mut *conn).await,
            };
            match written {
                Ok(_) => Ok(decided),
                Err(error) => rolled_back(&mut conn, db(error)).await,
            }
        }
    }
}
