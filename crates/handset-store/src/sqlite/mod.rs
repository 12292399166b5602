//! SQLite, the embedded default, on rusqlite (see `engine` for why not sqlx).
//! Writes go to one writer thread that commits them in groups; reads run on
//! reader connections beside it (WAL). The SQL is `queries.rs`'s, shared
//! with Postgres.

pub(crate) mod engine;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use handset_core::funnel::{Dimension, FunnelCounts, FunnelQuery};
use handset_core::model::{
    CallbackAttempt, CallbackRecord, ClaimedCallback, OutboxMessage, ProviderName, Status, Transaction,
    TransactionResult, Verification,
};
use handset_core::pumping::{NewPause, PausedRange, RangeTraffic};
use handset_core::store::{
    AfterAttempt, Claim, Finalization, IdempotencyBegin, IdempotencyClaim, LocalCodeAttempt, NewPartner, PartnerByKey,
    PartnerRecord, PoolUsage, Requeued, Store, StoreError,
};
use rusqlite::{Connection, ToSql};
use uuid::Uuid;

use self::engine::{Engine, Location, execute, get_opt_ts, get_ts, json, opt_ts, query, query_row, ts};
use crate::queries::{
    self as q, funnel_groups, funnel_histogram, funnel_range, funnel_rolled, funnel_rolled_range, recent_outcomes,
    roll_up_hour,
};
use crate::rows::{
    AttemptRow, FunnelRow, OutboxRow, PartnerByKeyRow, PartnerRecordRow, TransactionRow, VerificationRow,
};
use handset_core::adaptive::EndedCounts;

/// SQLite, the embedded default. SQLite has one writer at a time: every
/// write goes to one thread and connection, so writers take turns in a
/// queue instead of retrying against the file lock, and writes queued
/// together share one commit. Other processes on the same file (the CLI,
/// another replica) wait for the lock up to 10 s.
pub struct SqliteStore {
    engine: Engine,
}

impl SqliteStore {
    /// The store for a `sqlite:` URL; nothing is opened until first used.
    pub fn open(url: &str, max_readers: u32) -> Result<SqliteStore, StoreError> {
        let location = Location::of_url(url).map_err(|e| StoreError::Database(e.into()))?;
        let engine = Engine::new(location, usize::try_from(max_readers).unwrap_or(1))?;
        Ok(SqliteStore { engine })
    }

    /// The database file is still where the store opens it. An open SQLite
    /// connection goes on working on a file that was deleted or moved away,
    /// so `SELECT 1` alone would call ready a process whose writes no restart
    /// (and no other replica) will ever see.
    fn still_in_place(&self) -> Result<(), StoreError> {
        match self.engine.location() {
            Location::File(file) if !file.exists() => {
                Err(StoreError::Database(format!("the SQLite file {} is gone", file.display()).into()))
            }
            _ => Ok(()),
        }
    }

    async fn write_partner(&self, new: &NewPartner, sql: &'static str) -> Result<(), StoreError> {
        let p = &new.partner;
        let (id, name, active, created_at, key_hash) =
            (p.id, p.name.clone(), p.active, p.created_at, new.api_key_hash.clone());
        let products = json(&p.products.iter().map(|p| p.as_str()).collect::<Vec<_>>())?;
        let secret = p.webhook_secret.expose().to_owned();
        self.engine
            .write(move |c| {
                execute(c, sql, &[&id, &name, &products, &active, &secret, &ts(created_at), &key_hash])?;
                Ok(())
            })
            .await
    }

    async fn rotate(
        &self,
        sql: &'static str,
        id: Uuid,
        value: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let value = value.to_owned();
        self.engine.write(move |c| Ok(execute(c, sql, &[&id, &value, &opt_ts(previous_until)])? == 1)).await
    }

    async fn update(&self, sql: &'static str, args: Vec<Box<dyn ToSql + Send>>) -> Result<usize, StoreError> {
        self.engine
            .write(move |c| {
                let args: Vec<&dyn ToSql> = args.iter().map(|a| a.as_ref() as &dyn ToSql).collect();
                execute(c, sql, &args)
            })
            .await
    }
}

fn insert_outbox(c: &Connection, m: &OutboxMessage) -> Result<(), StoreError> {
    execute(
        c,
        q::INSERT_OUTBOX,
        &[&m.id, &m.transaction_id, &m.partner_id, &m.callback_url, &m.payload, &ts(m.created_at)],
    )?;
    Ok(())
}

fn insert_transaction(c: &Connection, t: &Transaction) -> Result<(), StoreError> {
    let name = t.name.as_ref().map(json).transpose()?;
    let metadata = json(&t.metadata)?;
    let result = t.result.as_ref().map(json).transpose()?;
    let routing = t.routing.as_ref().map(json).transpose()?;
    execute(
        c,
        q::INSERT_TRANSACTION,
        &[
            &t.id,
            &t.verification_id,
            &t.partner_id,
            &t.product.as_str(),
            &t.provider.as_str(),
            &t.phone,
            &t.birth_date,
            &t.status.code(),
            &ts(t.created_at),
            &ts(t.updated_at),
            &opt_ts(t.expires_at),
            &t.attempts_used,
            &t.max_attempts,
            &t.code_hash,
            &t.provider_ref,
            &t.redirect_url,
            &t.redirect_uri,
            &t.callback_url,
            &name,
            &metadata,
            &result,
            &t.provider_verification,
            &opt_ts(t.next_poll_at),
            &t.poll_attempts,
            &t.country,
            &t.number_range,
            &routing,
        ],
    )?;
    Ok(())
}

/// Whole seconds from start to success below ten minutes, then 600 + whole
/// minutes (durations are never negative, so a cast truncates as `floor`).
/// Rounded to the millisecond first: `julianday`'s float arithmetic puts an
/// exact 30 s at 29.99999, which Postgres's bucket counts as 30.
macro_rules! sqlite_bucket {
    () => {
        "CASE WHEN ROUND((julianday(updated_at) - julianday(created_at)) * 86400.0, 3) < 600 \
         THEN CAST(ROUND((julianday(updated_at) - julianday(created_at)) * 86400.0, 3) AS INTEGER) \
         ELSE 600 + CAST(ROUND((julianday(updated_at) - julianday(created_at)) * 86400.0, 3) / 60 AS INTEGER) END"
    };
}

fn transactions(rows: Vec<TransactionRow>) -> Result<Vec<Transaction>, StoreError> {
    rows.into_iter().map(Transaction::try_from).collect()
}

/// `sqlx::migrate!`'s migrations, applied as sqlx would (the same
/// `_sqlx_migrations` table and checksums), so files written by earlier
/// versions and by sqlx's own tools agree with this one.
static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

fn migrate(c: &Connection) -> Result<(), StoreError> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, \
         checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
    )
    .map_err(engine::db)?;
    let applied: Vec<(i64, bool, Vec<u8>)> =
        query(c, "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version", &[], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    let known =
        |version: i64| MIGRATIONS.iter().find(|m| m.version == version && !m.migration_type.is_down_migration());
    for (version, success, checksum) in &applied {
        let refused = match known(*version) {
            _ if !success => format!("migration {version} was left half-applied; repair the database by hand"),
            None => format!("the database has migration {version}, which this build does not know (a newer handset?)"),
            Some(m) if *m.checksum != **checksum => format!("migration {version} was changed after it was applied"),
            Some(_) => continue,
        };
        return Err(StoreError::Database(refused.into()));
    }
    for m in MIGRATIONS.iter().filter(|m| !m.migration_type.is_down_migration()) {
        if applied.iter().any(|(version, ..)| *version == m.version) {
            continue;
        }
        c.execute_batch(&m.sql).map_err(engine::db)?;
        execute(
            c,
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, TRUE, $3, -1)",
            &[&m.version, &m.description.as_ref(), &m.checksum.as_ref()],
        )?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    /// All pending migrations in one transaction: a failure leaves none applied.
    async fn migrate(&self) -> Result<(), StoreError> {
        self.engine.write(migrate).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.engine.read(|c| query_row(c, "SELECT 1", &[], |row| row.get::<_, i64>(0))).await?;
        self.still_in_place()
    }

    fn pool_usage(&self) -> Vec<PoolUsage> {
        let (idle, max) = self.engine.reader_usage();
        vec![
            PoolUsage { pool: "writer", open: 1, idle: 1, max: 1 },
            PoolUsage { pool: "readers", open: idle, idle, max },
        ]
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
        let key_hash = api_key_hash.to_owned();
        let row = self
            .engine
            .read(move |c| query_row(c, q::PARTNER_BY_KEY, &[&key_hash, &ts(now)], PartnerByKeyRow::from_sqlite))
            .await?;
        row.map(PartnerByKey::try_from).transpose()
    }

    async fn partners(&self) -> Result<Vec<PartnerRecord>, StoreError> {
        let rows = self.engine.read(|c| query(c, q::PARTNERS, &[], PartnerRecordRow::from_sqlite)).await?;
        rows.into_iter().map(PartnerRecord::try_from).collect()
    }

    async fn partner(&self, id: Uuid) -> Result<Option<PartnerRecord>, StoreError> {
        let row = self.engine.read(move |c| query_row(c, q::PARTNER, &[&id], PartnerRecordRow::from_sqlite)).await?;
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
        self.engine
            .write(move |c| {
                let ids = query(c, q::REQUEUE_FAILED, &[&partner_id, &ts(since), &ts(now)], |row| row.get(0))?;
                let purged: Option<i64> =
                    query_row(c, q::COUNT_FAILED_PURGED, &[&partner_id, &ts(since)], |row| row.get(0))?;
                Ok(Requeued { ids, purged: u64::try_from(purged.unwrap_or(0)).unwrap_or(0) })
            })
            .await
    }

    async fn set_partner_active(&self, id: Uuid, active: bool) -> Result<bool, StoreError> {
        Ok(self.update(q::SET_PARTNER_ACTIVE, vec![Box::new(id), Box::new(active)]).await? == 1)
    }

    async fn verification(&self, id: Uuid) -> Result<Option<Verification>, StoreError> {
        let row =
            self.engine.read(move |c| query_row(c, q::VERIFICATION, &[&id], VerificationRow::from_sqlite)).await?;
        Ok(row.map(Verification::from))
    }

    async fn insert_transaction(
        &self,
        t: &Transaction,
        new_verification: Option<&Verification>,
        outbox: Option<&OutboxMessage>,
    ) -> Result<(), StoreError> {
        let (t, verification, outbox) = (t.clone(), new_verification.cloned(), outbox.cloned());
        self.engine
            .write(move |c| {
                if let Some(v) = verification {
                    execute(c, q::INSERT_VERIFICATION, &[&v.id, &v.partner_id, &ts(v.created_at)])?;
                }
                insert_transaction(c, &t)?;
                if let Some(message) = outbox {
                    insert_outbox(c, &message)?;
                }
                Ok(())
            })
            .await
    }

    async fn transaction(&self, id: Uuid) -> Result<Option<Transaction>, StoreError> {
        let row = self.engine.read(move |c| query_row(c, q::TRANSACTION, &[&id], TransactionRow::from_sqlite)).await?;
        row.map(Transaction::try_from).transpose()
    }

    async fn transactions_of_verification(&self, verification_id: Uuid) -> Result<Vec<Transaction>, StoreError> {
        let rows = self
            .engine
            .read(move |c| query(c, q::TRANSACTIONS_OF_VERIFICATION, &[&verification_id], TransactionRow::from_sqlite))
            .await?;
        transactions(rows)
    }

    async fn use_attempt(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        expected: Option<i32>,
    ) -> Result<Option<i32>, StoreError> {
        self.engine.write(move |c| query_row(c, q::USE_ATTEMPT, &[&id, &ts(now), &expected], |row| row.get(0))).await
    }

    async fn refund_attempt(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.update(q::REFUND_ATTEMPT, vec![Box::new(id)]).await? == 1)
    }

    /// The attempt, the verdict and the callback it owes in one write.
    async fn attempt_local_code(&self, a: LocalCodeAttempt<'_>) -> Result<Option<(Status, i32)>, StoreError> {
        let (id, now, matched, expected) = (a.id, a.now, a.matched, a.expected_attempts);
        let (success, exhausted) = (json(a.success)?, json(a.exhausted)?);
        let (on_success, on_exhausted) = (a.on_success.cloned(), a.on_exhausted.cloned());
        self.engine
            .write(move |c| {
                let row: Option<(i32, i32)> = query_row(
                    c,
                    q::LOCAL_CODE_UPDATE,
                    &[&id, &ts(now), &matched, &success, &exhausted, &expected],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                let Some((code, used)) = row else { return Ok(None) };
                let status = crate::rows::status_of(code)?;
                let owed = match status {
                    Status::Succeeded => on_success.as_ref(),
                    Status::Failed => on_exhausted.as_ref(),
                    Status::Pending => None,
                };
                if let Some(message) = owed {
                    insert_outbox(c, message)?;
                }
                Ok(Some((status, used)))
            })
            .await
    }

    async fn finalize(&self, f: Finalization<'_>) -> Result<bool, StoreError> {
        let t = f.transaction;
        let (id, code, updated_at, attempts_used, provider_ref) =
            (t.id, t.status.code(), t.updated_at, t.attempts_used, t.provider_ref.clone());
        let result = t.result.as_ref().map(json).transpose()?;
        let outbox = f.outbox.cloned();
        self.engine
            .write(move |c| {
                let args: [&dyn ToSql; 6] = [&id, &code, &result, &ts(updated_at), &attempts_used, &provider_ref];
                if execute(c, q::FINALIZE, &args)? == 0 {
                    return Ok(false);
                }
                if let Some(message) = outbox {
                    insert_outbox(c, &message)?;
                }
                Ok(true)
            })
            .await
    }

    async fn renew_provider_ref(&self, id: Uuid, old: Option<&str>, renewed: &str) -> Result<bool, StoreError> {
        let args: Vec<Box<dyn ToSql + Send>> =
            vec![Box::new(id), Box::new(old.map(str::to_owned)), Box::new(renewed.to_owned())];
        Ok(self.update(q::RENEW_PROVIDER_REF, args).await? == 1)
    }

    async fn insert_outbox_capped(&self, message: &OutboxMessage, max_pending: i64) -> Result<bool, StoreError> {
        let message = message.clone();
        self.engine
            .write(move |c| {
                // The single writer counts concurrent retries one after another.
                let pending: Option<i64> =
                    query_row(c, q::COUNT_PENDING_CALLBACKS, &[&message.transaction_id], |row| row.get(0))?;
                if pending.unwrap_or(0) >= max_pending {
                    return Ok(false);
                }
                insert_outbox(c, &message)?;
                Ok(true)
            })
            .await
    }

    async fn callbacks_of_transaction(&self, transaction_id: Uuid) -> Result<Vec<CallbackRecord>, StoreError> {
        let (rows, attempts) = self
            .engine
            .read(move |c| {
                let rows = query(c, q::CALLBACKS_OF_TRANSACTION, &[&transaction_id], OutboxRow::from_sqlite)?;
                let attempts = query(c, q::ATTEMPTS_OF_TRANSACTION, &[&transaction_id], AttemptRow::from_sqlite)?;
                Ok((rows, attempts))
            })
            .await?;
        crate::rows::callback_records(rows, &attempts)
    }

    async fn claim_due_callbacks(&self, claim: Claim<'_>) -> Result<Vec<ClaimedCallback>, StoreError> {
        let (owner, lease_until, now, limit) = (claim.owner.to_owned(), claim.lease_until, claim.now, claim.limit);
        self.engine
            .write(move |c| {
                let rows = query(
                    c,
                    q::CLAIM_CALLBACKS_SQLITE,
                    &[&owner, &ts(lease_until), &ts(now), &limit],
                    OutboxRow::from_sqlite,
                )?;
                let mut claimed = Vec::with_capacity(rows.len());
                for row in rows {
                    let secrets: Option<(String, Option<String>)> =
                        query_row(c, q::WEBHOOK_SECRETS, &[&row.partner_id(), &ts(now)], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })?;
                    let Some((secret, previous)) = secrets else {
                        return Err(StoreError::Corrupt(format!("outbox {} has no partner", row.message().id)));
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
            })
            .await
    }

    async fn finish_callback_attempt(
        &self,
        id: Uuid,
        owner: &str,
        attempt: &CallbackAttempt,
        next: AfterAttempt,
    ) -> Result<bool, StoreError> {
        let (state, next_attempt_at, finished_at) = crate::rows::after_attempt(next, attempt.attempted_at);
        let (owner, attempt) = (owner.to_owned(), attempt.clone());
        self.engine
            .write(move |c| {
                let args: [&dyn ToSql; 5] =
                    [&id, &owner, &state.as_str(), &opt_ts(next_attempt_at), &opt_ts(finished_at)];
                if execute(c, q::FINISH_CALLBACK, &args)? == 0 {
                    return Ok(false);
                }
                let args: [&dyn ToSql; 5] =
                    [&id, &ts(attempt.attempted_at), &attempt.status_code, &attempt.error, &attempt.latency_ms];
                execute(c, q::INSERT_CALLBACK_ATTEMPT, &args)?;
                Ok(true)
            })
            .await
    }

    async fn due_callbacks(&self, now: DateTime<Utc>) -> Result<i64, StoreError> {
        let count =
            self.engine.read(move |c| query_row(c, q::COUNT_DUE_CALLBACKS, &[&ts(now)], |row| row.get(0))).await?;
        Ok(count.unwrap_or(0))
    }

    async fn transaction_by_provider_ref(
        &self,
        provider: ProviderName,
        provider_ref: &str,
    ) -> Result<Option<Transaction>, StoreError> {
        let provider_ref = provider_ref.to_owned();
        let row = self
            .engine
            .read(move |c| {
                query_row(
                    c,
                    q::TRANSACTION_BY_PROVIDER_REF,
                    &[&provider.as_str(), &provider_ref],
                    TransactionRow::from_sqlite,
                )
            })
            .await?;
        row.map(Transaction::try_from).transpose()
    }

    async fn claim_due_polls(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Transaction>, StoreError> {
        let rows = self
            .engine
            .write(move |c| {
                query(c, q::CLAIM_POLLS_SQLITE, &[&ts(now), &ts(lease_until), &limit], TransactionRow::from_sqlite)
            })
            .await?;
        transactions(rows)
    }

    async fn schedule_poll(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.update(q::SCHEDULE_POLL, vec![Box::new(id), Box::new(ts(at))]).await?;
        Ok(())
    }

    async fn begin_idempotent(&self, claim: IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError> {
        let (scope, key, hash) = (claim.scope.to_owned(), claim.key.to_owned(), claim.request_hash.to_owned());
        let (now, lock_until, expired_before) = (ts(claim.now), ts(claim.lock_until), ts(claim.expired_before));
        self.engine
            .write(move |c| {
                if execute(c, q::INSERT_IDEMPOTENCY, &[&scope, &key, &hash, &now, &lock_until])? == 1 {
                    return Ok(IdempotencyBegin::Proceed);
                }
                let args: [&dyn ToSql; 6] = [&scope, &key, &hash, &now, &lock_until, &expired_before];
                if execute(c, q::TAKE_OVER_IDEMPOTENCY, &args)? == 1 {
                    return Ok(IdempotencyBegin::Proceed);
                }
                let row: Option<(String, String, Option<i32>, Option<String>)> =
                    query_row(c, q::IDEMPOTENCY_RECORD, &[&scope, &key], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })?;
                Ok(crate::rows::idempotency_begin(row, &hash))
            })
            .await
    }

    async fn finish_idempotent(&self, scope: &str, key: &str, status: u16, body: &str) -> Result<(), StoreError> {
        let args: Vec<Box<dyn ToSql + Send>> = vec![
            Box::new(scope.to_owned()),
            Box::new(key.to_owned()),
            Box::new(i32::from(status)),
            Box::new(body.to_owned()),
        ];
        self.update(q::FINISH_IDEMPOTENCY, args).await?;
        Ok(())
    }

    async fn release_idempotent(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        self.update(q::RELEASE_IDEMPOTENCY, vec![Box::new(scope.to_owned()), Box::new(key.to_owned())]).await?;
        Ok(())
    }

    async fn purge_idempotency(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let purged = self.update(q::PURGE_IDEMPOTENCY, vec![Box::new(ts(before))]).await?;
        Ok(u64::try_from(purged).unwrap_or(0))
    }

    async fn add_rate_hits(&self, scope: &str, window_start: DateTime<Utc>, hits: i64) -> Result<i64, StoreError> {
        let scope = scope.to_owned();
        let added = i32::try_from(hits).unwrap_or(i32::MAX);
        let total: Option<i64> = self
            .engine
            .write(move |c| query_row(c, q::ADD_RATE_HITS, &[&scope, &ts(window_start), &added], |row| row.get(0)))
            .await?;
        total.ok_or_else(|| StoreError::Corrupt("rate counter upsert returned no row".into()))
    }

    async fn take_rate_hit(&self, scope: &str, window_start: DateTime<Utc>, limit: i64) -> Result<bool, StoreError> {
        let scope = scope.to_owned();
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let taken: Option<i64> = self
            .engine
            .write(move |c| query_row(c, q::TAKE_RATE_HIT, &[&scope, &ts(window_start), &limit], |row| row.get(0)))
            .await?;
        Ok(taken.is_some())
    }

    async fn purge_rate_counters(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let purged = self.update(q::PURGE_RATE_COUNTERS, vec![Box::new(ts(before))]).await?;
        Ok(u64::try_from(purged).unwrap_or(0))
    }

    async fn expired_pending(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Transaction>, StoreError> {
        let rows = self
            .engine
            .read(move |c| query(c, q::EXPIRED_PENDING, &[&ts(now), &limit], TransactionRow::from_sqlite))
            .await?;
        transactions(rows)
    }

    async fn purge_personal_data(&self, created_before: DateTime<Utc>, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let emptied = json(&serde_json::json!({}))?;
        let purged_result = json(&TransactionResult::Purged { purged: true })?;
        self.engine
            .write(move |c| {
                execute(c, q::PURGE_CALLBACK_BODIES, &[&ts(created_before)])?;
                let purged =
                    execute(c, q::PURGE_TRANSACTIONS, &[&ts(created_before), &emptied, &purged_result, &ts(now)])?;
                Ok(u64::try_from(purged).unwrap_or(0))
            })
            .await
    }

    async fn funnel(&self, funnel: &FunnelQuery) -> Result<Vec<FunnelCounts>, StoreError> {
        let (raw_sql, rolled_sql) = match funnel.partner_id {
            Some(_) => (funnel_histogram!(sqlite_bucket!(), partner), funnel_rolled!(partner)),
            None => (funnel_histogram!(sqlite_bucket!(), all), funnel_rolled!(all)),
        };
        let f = funnel.clone();
        let rows: Vec<FunnelRow> = self
            .engine
            .read_apart(move |c| {
                let rolled_until = query_row(c, q::ROLLED_UNTIL, &[], |r| get_opt_ts(r, 0))?.flatten();
                let plan = crate::rows::funnel_plan(f.since, f.until, rolled_until);
                let mut rows = Vec::new();
                for (sql, since, until) in plan.queries(rolled_sql, raw_sql) {
                    let args: [&dyn ToSql; 6] = [
                        &ts(since),
                        &ts(until),
                        &f.groups_by(Dimension::Provider),
                        &f.groups_by(Dimension::Country),
                        &f.groups_by(Dimension::Product),
                        &f.partner_id,
                    ];
                    rows.extend(query(c, sql, &args, |r| {
                        let counts = [r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?];
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, counts))
                    })?);
                }
                Ok(rows)
            })
            .await?;
        Ok(crate::rows::funnel_counts(rows))
    }

    async fn recent_outcomes(
        &self,
        ended_since: DateTime<Utc>,
        created_since: DateTime<Utc>,
    ) -> Result<Vec<EndedCounts>, StoreError> {
        const RECENT_OUTCOMES: &str = recent_outcomes!("json_extract(result, '$.errors[0].code') = 3908");
        self.engine
            .read_apart(move |c| {
                query(c, RECENT_OUTCOMES, &[&ts(ended_since), &ts(created_since)], |r| {
                    Ok(EndedCounts {
                        provider: r.get(0)?,
                        country: r.get(1)?,
                        product: r.get(2)?,
                        succeeded: r.get(3)?,
                        ended: r.get(4)?,
                    })
                })
            })
            .await
    }

    async fn roll_up_funnel(&self, before: DateTime<Utc>, max_hours: u32) -> Result<u32, StoreError> {
        let mut rolled = 0;
        while rolled < max_hours {
            // One hour per write: the writer is exclusive, so the mark it
            // reads is the one it moves.
            let moved = self
                .engine
                .write(move |c| {
                    use crate::rows::RollupStep;
                    let mark = query_row(c, q::ROLLED_UNTIL, &[], |r| get_opt_ts(r, 0))?.flatten();
                    let origin = ts(mark.unwrap_or(crate::rows::ROLLUP_ORIGIN));
                    let next = query_row(c, q::NEXT_CREATED, &[&origin], |r| get_opt_ts(r, 0))?.flatten();
                    let advance = |to: DateTime<Utc>| execute(c, q::ADVANCE_ROLLUP, &[&opt_ts(mark), &ts(to)]);
                    let hour = match crate::rows::rollup_step(mark, next, before) {
                        RollupStep::Stop => return Ok(false),
                        RollupStep::Skip(to) => {
                            advance(to)?;
                            return Ok(false);
                        }
                        RollupStep::Roll(hour) => hour,
                    };
                    let end = hour + chrono::Duration::hours(1);
                    let pending = query_row(c, q::PENDING_IN_HOUR, &[&ts(hour), &ts(end)], |r| r.get::<_, i64>(0))?;
                    if pending.unwrap_or(0) > 0 {
                        if mark.is_none_or(|mark| mark < hour) {
                            advance(hour)?;
                        }
                        return Ok(false);
                    }
                    const ROLL_UP_HOUR: &str = roll_up_hour!(sqlite_bucket!());
                    execute(c, ROLL_UP_HOUR, &[&ts(hour), &ts(end)])?;
                    advance(end)?;
                    Ok(true)
                })
                .await?;
            if !moved {
                break;
            }
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
        let range = range.to_owned();
        self.engine
            .read(move |c| {
                let pause = query_row(c, q::RANGE_PAUSE, &[&range], |r| Ok((get_ts(r, 0)?, get_opt_ts(r, 1)?)))?;
                let (paused_until, released_at) =
                    pause.map_or((None, None), |(until, released)| (Some(until), released));
                let from = crate::rows::counts_from(since, paused_until, released_at, now);
                let succeeded: Option<i64> = query_row(c, q::RANGE_SUCCEEDED, &[&range, &ts(from)], |r| r.get(0))?;
                Ok(RangeTraffic { succeeded: succeeded.unwrap_or(0), paused_until, released_at })
            })
            .await
    }

    async fn pause_range(&self, pause: &NewPause<'_>) -> Result<bool, StoreError> {
        let args: Vec<Box<dyn ToSql + Send>> = vec![
            Box::new(pause.range.to_owned()),
            Box::new(ts(pause.paused_at)),
            Box::new(ts(pause.paused_until)),
            Box::new(pause.sends),
            Box::new(pause.succeeded),
            Box::new(opt_ts(pause.released_at_seen)),
        ];
        Ok(self.update(q::PAUSE_RANGE, args).await? == 1)
    }

    async fn paused_ranges(&self, now: DateTime<Utc>) -> Result<Vec<PausedRange>, StoreError> {
        let rows = self
            .engine
            .read(move |c| {
                query(c, q::PAUSED_RANGES, &[&ts(now)], |r| {
                    Ok((r.get(0)?, get_ts(r, 1)?, get_ts(r, 2)?, r.get(3)?, r.get(4)?))
                })
            })
            .await?;
        Ok(rows.into_iter().map(crate::rows::paused_range).collect())
    }

    async fn release_range(&self, range: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        Ok(self.update(q::RELEASE_RANGE, vec![Box::new(range.to_owned()), Box::new(ts(now))]).await? == 1)
    }
}
