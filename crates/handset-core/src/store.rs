//! The storage port. `handset-store` implements it for Postgres and SQLite; the
//! service depends only on this trait.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{
    CallbackAttempt, CallbackRecord, ClaimedCallback, OutboxMessage, Partner, ProviderName, Status, Transaction,
    TransactionResult, Verification,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A uniqueness rule was broken (e.g. a partner name or key already used).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored value could not be read back (corrupt or from a newer version).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A new partner: its API key is given as a hash only.
#[derive(Debug, Clone)]
pub struct NewPartner {
    pub partner: Partner,
    pub api_key_hash: String,
}

/// The final state a pending transaction moves to.
#[derive(Debug, Clone)]
pub struct Finalization<'a> {
    pub transaction: &'a Transaction,
    pub outbox: Option<&'a OutboxMessage>,
}

/// One code that handset checked itself, applied in one statement: the
/// attempt counted and, when the code decides the check, the final state
/// (and its callback, in the same database transaction).
#[derive(Debug, Clone)]
pub struct LocalCodeAttempt<'a> {
    pub id: Uuid,
    pub now: DateTime<Utc>,
    /// The code matched the stored hash: the check succeeds.
    pub matched: bool,
    /// The result of a match.
    pub success: &'a TransactionResult,
    /// The result when a wrong code uses the last attempt.
    pub exhausted: &'a TransactionResult,
    /// The callback each final state owes (the transaction has a
    /// `callback_url`); the gateway passes only the one this code can lead
    /// to (a match: `on_success`; a wrong code: `on_exhausted`).
    pub on_success: Option<&'a OutboxMessage>,
    pub on_exhausted: Option<&'a OutboxMessage>,
    /// Write only if exactly this many attempts were used before (as
    /// `use_attempt`'s `expected`).
    pub expected_attempts: Option<i32>,
}

/// What `requeue_failed_callbacks` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requeued {
    /// The callbacks back in the queue.
    pub ids: Vec<Uuid>,
    /// Failed callbacks in the window whose body retention already removed.
    pub purged: u64,
}

/// A partner found by an API key.
#[derive(Debug, Clone)]
pub struct PartnerByKey {
    pub partner: Partner,
    /// When this key stops working: set for a previous key during a
    /// rotation's overlap, `None` for the current key.
    pub key_expires_at: Option<DateTime<Utc>>,
}

/// A partner as operators see it (`handset partner list|show`).
#[derive(Debug, Clone)]
pub struct PartnerRecord {
    pub partner: Partner,
    /// Until when the previous API key still works, if a rotation overlaps.
    pub previous_key_expires_at: Option<DateTime<Utc>>,
    /// Until when callbacks are also signed with the previous secret.
    pub previous_webhook_secret_expires_at: Option<DateTime<Utc>>,
}

/// One connection pool's use, for the `handset_db_pool_connections` gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// `main` (Postgres), `writer` or `readers` (SQLite).
    pub pool: &'static str,
    /// Connections open, idle among them, and the most it may open.
    pub open: u32,
    pub idle: u32,
    pub max: u32,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Each of the store's connection pools, as it is now.
    fn pool_usage(&self) -> Vec<PoolUsage> {
        Vec::new()
    }

    /// Applies the pending schema migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip for `/ready`.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn insert_partner(&self, partner: &NewPartner) -> Result<(), StoreError>;

    /// Creates the partner or, when one with this id exists, sets its key hash,
    /// products and name (used for the development partner).
    async fn upsert_partner(&self, partner: &NewPartner) -> Result<(), StoreError>;

    /// The partner this key belongs to: its current key, or its previous
    /// one while a rotation's overlap lasts (after `now`).
    async fn partner_by_key_hash(
        &self,
        api_key_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<PartnerByKey>, StoreError>;

    /// Every partner, oldest first, with the state of its rotations.
    async fn partners(&self) -> Result<Vec<PartnerRecord>, StoreError>;

    async fn partner(&self, id: Uuid) -> Result<Option<PartnerRecord>, StoreError>;

    /// Gives the partner a new API key hash. With `previous_until`, the key
    /// it had keeps working until then (replacing any earlier previous key);
    /// without, the old key stops at once. False when no such partner exists.
    async fn rotate_api_key(
        &self,
        id: Uuid,
        api_key_hash: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError>;

    /// Gives the partner a new webhook secret; with `previous_until`,
    /// callbacks are signed with the old one too until then.
    async fn rotate_webhook_secret(
        &self,
        id: Uuid,
        webhook_secret: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError>;

    /// Puts the partner's callbacks that gave up (`failed`) since `since`
    /// back in the queue, due at `now`, with a fresh retry schedule (their
    /// attempt log is kept; a body retention emptied cannot be sent and is
    /// left alone, and counted).
    async fn requeue_failed_callbacks(
        &self,
        partner_id: Uuid,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Requeued, StoreError>;

    /// Keeps `cache` told of every change to partners made by any process
    /// (`PartnerCache::changed`) and of whether changes are being followed
    /// at all (`set_following`); runs until its task is aborted (the server
    /// does so at shutdown). A store that cannot announce changes across
    /// processes returns at once, so the cache serves nothing.
    async fn follow_partner_changes(&self, _cache: &crate::partner_cache::PartnerCache) {}

    /// Returns false when no such partner exists.
    async fn set_partner_active(&self, id: Uuid, active: bool) -> Result<bool, StoreError>;

    async fn verification(&self, id: Uuid) -> Result<Option<Verification>, StoreError>;

    /// Inserts a transaction, the verification it opens (if new) and, for a
    /// transaction that is already final, its callback, in one database transaction.
    async fn insert_transaction(
        &self,
        transaction: &Transaction,
        new_verification: Option<&Verification>,
        outbox: Option<&OutboxMessage>,
    ) -> Result<(), StoreError>;

    async fn transaction(&self, id: Uuid) -> Result<Option<Transaction>, StoreError>;

    async fn transactions_of_verification(&self, verification_id: Uuid) -> Result<Vec<Transaction>, StoreError>;

    /// Atomically uses one code attempt of a pending, unexpired transaction.
    /// Returns the attempts used after this one, or `None` when the transaction
    /// is not pending, is past `now`'s expiry, or has no attempt left: the
    /// database, not the caller, guarantees the limit under concurrency. With
    /// `expected`, also `None` (nothing written) unless exactly that many
    /// attempts were used before: the caller's copy of the transaction is
    /// still the stored one.
    async fn use_attempt(&self, id: Uuid, now: DateTime<Utc>, expected: Option<i32>)
    -> Result<Option<i32>, StoreError>;

    /// Gives back an attempt `use_attempt` took, when the code it was taken
    /// for never reached the provider; false when the transaction is no
    /// longer pending (nothing written).
    async fn refund_attempt(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Uses one attempt of a pending, unexpired transaction and applies what
    /// the code decides, as one conditional write: success, the last wrong
    /// code (final 300), or a wrong code with attempts left (still pending).
    /// Returns the status and attempts used after it, or `None` (nothing
    /// written) under the same conditions as `use_attempt`.
    async fn attempt_local_code(&self, attempt: LocalCodeAttempt<'_>) -> Result<Option<(Status, i32)>, StoreError>;

    /// Moves a *pending* transaction to its final status and result (with its
    /// `provider_ref`, which the provider may have renewed), and writes its
    /// callback, in one database transaction. Returns false (and writes
    /// nothing) when the transaction was no longer pending.
    async fn finalize(&self, finalization: Finalization<'_>) -> Result<bool, StoreError>;

    /// Replaces the reference `old` by the one a provider renewed, for a
    /// transaction that is still pending and still holds `old`; false
    /// (nothing written) otherwise, so a late answer never overwrites a newer
    /// reference.
    async fn renew_provider_ref(&self, id: Uuid, old: Option<&str>, renewed: &str) -> Result<bool, StoreError>;

    /// Queues a callback outside a state change (a partner's retry request),
    /// unless its transaction already has `max_pending` callbacks pending:
    /// then writes nothing and returns false. Concurrent calls for one
    /// transaction are serialised, so the cap holds on any number of replicas.
    async fn insert_outbox_capped(&self, message: &OutboxMessage, max_pending: i64) -> Result<bool, StoreError>;

    /// A transaction's callbacks with their attempts, oldest first.
    async fn callbacks_of_transaction(&self, transaction_id: Uuid) -> Result<Vec<CallbackRecord>, StoreError>;

    /// Leases up to `limit` pending callbacks due at `now` whose lease (if
    /// any) has run out, to `owner` until `lease_until`. Each row is handed
    /// to one claimer at a time, across processes.
    async fn claim_due_callbacks(&self, claim: Claim<'_>) -> Result<Vec<ClaimedCallback>, StoreError>;

    /// Records one attempt and what follows it, if `owner` still holds the
    /// lease; returns false (recording nothing) when the lease was lost.
    async fn finish_callback_attempt(
        &self,
        id: Uuid,
        owner: &str,
        attempt: &CallbackAttempt,
        next: AfterAttempt,
    ) -> Result<bool, StoreError>;

    /// Pending callbacks due at `now` (a gauge for operators).
    async fn due_callbacks(&self, now: DateTime<Utc>) -> Result<i64, StoreError>;

    /// The transaction a provider knows as `provider_ref`.
    async fn transaction_by_provider_ref(
        &self,
        provider: ProviderName,
        provider_ref: &str,
    ) -> Result<Option<Transaction>, StoreError>;

    /// Leases up to `limit` pending transactions whose provider poll is due
    /// (their next poll moves to `lease_until` and their poll count goes up).
    async fn claim_due_polls(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Transaction>, StoreError>;

    /// Sets when a pending transaction is next polled.
    async fn schedule_poll(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Claims an `Idempotency-Key` for a request, or says why not.
    async fn begin_idempotent(&self, claim: IdempotencyClaim<'_>) -> Result<IdempotencyBegin, StoreError>;

    /// Keeps the first response to a claimed key.
    async fn finish_idempotent(&self, scope: &str, key: &str, status: u16, body: &str) -> Result<(), StoreError>;

    /// Forgets a claimed key (its request failed in a way worth retrying).
    async fn release_idempotent(&self, scope: &str, key: &str) -> Result<(), StoreError>;

    /// Deletes idempotency records created before `before`; returns how many.
    async fn purge_idempotency(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Adds `hits` to `scope`'s window starting at `window_start` and returns
    /// the window's hits so far (atomic across replicas).
    async fn add_rate_hits(&self, scope: &str, window_start: DateTime<Utc>, hits: i64) -> Result<i64, StoreError>;

    /// Counts one hit in `scope`'s window if it holds fewer than `limit`;
    /// false (nothing counted) once it is full. One conditional statement,
    /// exact across replicas.
    async fn take_rate_hit(&self, scope: &str, window_start: DateTime<Utc>, limit: i64) -> Result<bool, StoreError>;

    /// Deletes rate windows that started before `before`.
    async fn purge_rate_counters(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Pending transactions whose deadline is at or before `now`.
    async fn expired_pending(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Transaction>, StoreError>;

    /// Removes personal data (phone, birth date, name, metadata, successful
    /// results, finished callback bodies) from final transactions created
    /// before `created_before`, keeping statuses, codes and times. Returns the
    /// number of transactions purged.
    async fn purge_personal_data(&self, created_before: DateTime<Utc>, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// A number range's pause, and its confirmed SMS checks created since
    /// `since` or, if later, since its last pause ended or its release.
    async fn range_traffic(
        &self,
        range: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<crate::pumping::RangeTraffic, StoreError>;

    /// Records a pause; false (nothing written) if the range was released
    /// since the guard read it.
    async fn pause_range(&self, pause: &crate::pumping::NewPause<'_>) -> Result<bool, StoreError>;

    /// The ranges paused at `now`, the longest paused first.
    async fn paused_ranges(&self, now: DateTime<Utc>) -> Result<Vec<crate::pumping::PausedRange>, StoreError>;

    /// Lifts a pause (the range counts afresh from `now`). False if it was not paused.
    async fn release_range(&self, range: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// The funnel of the transactions the query names, one entry per group
    /// (ordered by provider, country, product).
    async fn funnel(&self, query: &crate::funnel::FunnelQuery) -> Result<Vec<crate::funnel::FunnelCounts>, StoreError>;

    /// Rolls the funnel up by the hour, oldest hour first, so that queries
    /// over whole hours read one row per group and hour instead of every
    /// transaction: at most `max_hours` hours that ended at or before
    /// `before` and whose transactions have all ended (an hour with a
    /// pending one waits). Returns how many hours it rolled up. Several
    /// processes may call it at once; each hour is counted once.
    async fn roll_up_funnel(&self, before: DateTime<Utc>, max_hours: u32) -> Result<u32, StoreError>;

    /// Transactions (all partners) created since `created_since` that ended
    /// since `ended_since`, per provider, country and product, less those
    /// that ended because no provider could serve the number (3908): what
    /// adaptive routing scores providers by (`crate::adaptive`).
    async fn recent_outcomes(
        &self,
        ended_since: DateTime<Utc>,
        created_since: DateTime<Utc>,
    ) -> Result<Vec<crate::adaptive::EndedCounts>, StoreError>;
}

/// A request's claim on an `Idempotency-Key`.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyClaim<'a> {
    /// `partner:{id}`: keys belong to the partner, whichever of its API keys sent them.
    pub scope: &'a str,
    pub key: &'a str,
    /// Hash of method, path and body.
    pub request_hash: &'a str,
    pub now: DateTime<Utc>,
    /// Records created before this are expired and may be reused.
    pub expired_before: DateTime<Utc>,
    /// How long this request holds the key before another may take it over.
    pub lock_until: DateTime<Utc>,
}

/// What a claimed `Idempotency-Key` means for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// Go ahead; the response is kept when done.
    Proceed,
    /// Answer this stored response again.
    Replay { status: u16, body: String },
    /// The first request with this key is still being answered.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
}

/// A claim of due callbacks.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    pub owner: &'a str,
    pub limit: i64,
}

/// What follows a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    Delivered,
    RetryAt(DateTime<Utc>),
    /// The retry schedule is used up.
    GiveUp,
}
