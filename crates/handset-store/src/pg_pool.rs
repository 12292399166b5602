//! The Postgres store's connections: sqlx connections kept in a `deadpool`
//! pool that checks them only when there is reason to.
//!
//! Why not sqlx's own pool: sqlx 0.8 pings every connection when it is
//! returned, and (as the store set it) again when it is taken. A start or a
//! confirm is one statement, so those were two more round trips, and two
//! more wake-ups of a Postgres backend, around each statement: on a small
//! machine a third of what the gateway cost the database.
//!
//! Here a connection is pinged before use only when
//! - it has not been used for `IDLE_CHECK` (a connection can die quietly), or
//! - it was last taken before a connection was seen lost (a database restart
//!   or a terminated backend closes them all at once).
//!
//! A connection is seen lost when a statement or a ping fails with an I/O or
//! protocol error or Postgres's shutdown codes (classes 08 and 57P), and when
//! the partner-change listener loses its own. Such a connection is closed,
//! not returned, as is one whose caller stopped waiting mid-statement.
//!
//! The most recently used connection is handed out first, so a quiet
//! replica's others stay idle; idle ones are closed after ten minutes and any
//! after thirty (sqlx's defaults).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, Object, QueueMode, RecycleError, RecycleResult};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use handset_core::store::PoolUsage;
use sqlx::postgres::{PgConnectOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Connection, Describe, Either, Execute, Executor, PgConnection, Postgres};

/// A connection unused this long is pinged before it is used again.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Idle connections are closed after this long unused, and any after this
/// long open (sqlx's pool defaults), so a quiet replica gives back its
/// Postgres backends and none lives forever.
const IDLE_LIMIT: Duration = Duration::from_secs(10 * 60);
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// How often a lease looks for connections past those limits.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// When a connection was last seen lost, as nanoseconds after `origin` (0: never).
struct LostMark {
    origin: Instant,
    at: AtomicU64,
}

impl LostMark {
    fn since_origin(&self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    fn mark(&self) {
        // The latest loss wins, whichever thread records it last.
        self.at.fetch_max(self.since_origin(Instant::now()), Ordering::AcqRel);
    }

    /// Whether a connection last taken at `taken` predates the last loss.
    fn predates_loss(&self, taken: Instant) -> bool {
        let lost = self.at.load(Ordering::Acquire);
        lost != 0 && self.since_origin(taken) <= lost
    }
}

struct Manager {
    options: PgConnectOptions,
    lost: Arc<LostMark>,
}

impl managed::Manager for Manager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.options).await
    }

    async fn recycle(&self, conn: &mut PgConnection, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if metrics.age() >= MAX_LIFETIME {
            return Err(RecycleError::message("past its lifetime"));
        }
        // When it was last taken (deadpool's `recycled`): its last use began then.
        let taken = metrics.recycled.unwrap_or(metrics.created);
        if (taken.elapsed() >= IDLE_CHECK || self.lost.predates_loss(taken))
            && let Err(error) = conn.ping().await
        {
            self.lost.mark();
            return Err(error.into());
        }
        Ok(())
    }
}

/// Whether an error means the connection is gone (or cannot be trusted).
pub(crate) fn breaks_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        // 08: connection exceptions; 57P: the server shutting down or restarting.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// The request pool. Cloning shares it.
#[derive(Clone)]
pub(crate) struct Connections {
    pool: managed::Pool<Manager>,
    lost: Arc<LostMark>,
    /// When idle connections were last looked over, as nanoseconds after `lost.origin`.
    swept: Arc<AtomicU64>,
    options: PgConnectOptions,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").field("status", &self.pool.status()).finish_non_exhaustive()
    }
}

impl Connections {
    /// Opens nothing yet: connections are made as requests need them.
    pub(crate) fn new(options: PgConnectOptions, max_connections: u32, acquire_timeout: Duration) -> Self {
        let lost = Arc::new(LostMark { origin: Instant::now(), at: AtomicU64::new(0) });
        let manager = Manager { options: options.clone(), lost: lost.clone() };
        let pool = managed::Pool::builder(manager)
            .max_size(usize::try_from(max_connections.max(1)).unwrap_or(1))
            // The most recently used first: the others stay idle (and are
            // closed after `IDLE_LIMIT`) instead of each going a second
            // unused and needing a ping.
            .queue_mode(QueueMode::Lifo)
            .build()
            // Only fails for timeouts set without a runtime; none are set.
            .expect("a pool without timeouts builds");
        Connections { pool, lost, swept: Arc::new(AtomicU64::new(0)), options, acquire_timeout }
    }

    pub(crate) fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// Connections open, idle, and the most there may be.
    pub(crate) fn usage(&self) -> PoolUsage {
        let status = self.pool.status();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        PoolUsage { pool: "main", open: count(status.size), idle: count(status.available), max: count(status.max_size) }
    }

    /// Makes every connection taken before now be pinged before its next use.
    pub(crate) fn mark_lost(&self) {
        self.lost.mark();
    }

    /// A connection for a caller's statements, within `acquire_timeout`
    /// (waiting for a free one and connecting included).
    pub(crate) async fn lease(&self) -> Result<Lease, sqlx::Error> {
        self.sweep_now_and_then();
        match tokio::time::timeout(self.acquire_timeout, self.pool.get()).await {
            Ok(Ok(object)) => Ok(Lease { object: Some(object), lost: self.lost.clone() }),
            Ok(Err(managed::PoolError::Backend(error))) => {
                if breaks_connection(&error) {
                    self.mark_lost();
                }
                Err(error)
            }
            Ok(Err(managed::PoolError::Closed)) => Err(sqlx::Error::PoolClosed),
            Ok(Err(other)) => Err(sqlx::Error::Protocol(format!("connection pool: {other}"))),
            Err(_elapsed) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    /// Closes idle connections past `IDLE_LIMIT` or `MAX_LIFETIME`, at most
    /// once per `SWEEP_EVERY` (one lease does it; the others go on).
    fn sweep_now_and_then(&self) {
        let now = self.lost.since_origin(Instant::now());
        let last = self.swept.load(Ordering::Relaxed);
        let due = u64::try_from(SWEEP_EVERY.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) < due
            || self.swept.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        // The connections removed are closed as they are dropped.
        drop(self.pool.retain(|_, metrics| metrics.last_used() < IDLE_LIMIT && metrics.age() < MAX_LIFETIME));
    }

    /// A connection inside `BEGIN`. Commit it with [`Lease::commit`] or end
    /// it with [`Lease::rollback`]; dropped otherwise, it is closed, which
    /// rolls the transaction back.
    pub(crate) async fn begin(&self) -> Result<Lease, sqlx::Error> {
        let mut lease = self.lease().await?;
        if let Err(error) = lease.conn().execute("BEGIN").await {
            return lease.settle(Err(error));
        }
        Ok(lease)
    }
}

/// One connection taken from the pool. Given back by [`Lease::settle`]
/// (unless the connection broke) or [`Lease::release`]; dropped without
/// either (its caller stopped waiting, or returned early with an error), it
/// is closed instead, as its state is unknown.
pub(crate) struct Lease {
    object: Option<Object<Manager>>,
    lost: Arc<LostMark>,
}

impl Lease {
    fn conn(&mut self) -> &mut PgConnection {
        self.object.as_mut().expect("a lease holds its connection until it ends")
    }

    /// Gives the connection back.
    pub(crate) fn release(mut self) {
        self.object.take();
    }

    /// Passes `result` on; gives the connection back unless the error says
    /// the connection is gone (then the pool checks the others).
    pub(crate) fn settle<T>(self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        match &result {
            Err(error) if breaks_connection(error) => self.lost.mark(),
            _ => self.release(),
        }
        result
    }

    /// Ends a lease whose transaction failed before `COMMIT`: the connection
    /// is closed (which rolls the transaction back), and when the error says
    /// it was gone, the pool checks the others before use.
    pub(crate) fn fail(self, error: sqlx::Error) -> sqlx::Error {
        if breaks_connection(&error) {
            self.lost.mark();
        }
        error
    }

    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        let done = self.conn().execute("COMMIT").await.map(|_| ());
        self.settle(done)
    }

    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        let done = self.conn().execute("ROLLBACK").await.map(|_| ());
        self.settle(done)
    }
}

impl std::ops::Deref for Lease {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.object.as_ref().expect("a lease holds its connection until it ends")
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            drop(Object::take(object));
        }
    }
}

/// Statements on the pool, as on sqlx's: each takes a connection for itself.
impl<'p> Executor<'p> for &'_ Connections {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let pool = self.clone();
        // The rows are collected before the connection is given back; the
        // store's results are small.
        let all = async move {
            let mut lease = pool.lease().await?;
            let items: Result<Vec<_>, sqlx::Error> = lease.conn().fetch_many(query).try_collect().await;
            lease.settle(items)
        };
        Box::pin(futures_util::stream::once(all).flat_map(|all| {
            let items: Vec<_> = match all {
                Ok(items) => items.into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            };
            futures_util::stream::iter(items)
        }))
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut lease = pool.lease().await?;
            let row = lease.conn().fetch_optional(query).await;
            lease.settle(row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>> {
        let pool = self.clone();
        Box::pin(async move {
            let mut lease = pool.lease().await?;
            let statement = lease.conn().prepare_with(sql, parameters).await;
            lease.settle(statement)
        })
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>> {
        let pool = self.clone();
        Box::pin(async move {
            let mut lease = pool.lease().await?;
            let described = lease.conn().describe(sql).await;
            lease.settle(described)
        })
    }
}
