//! handset's persistence: `handset_core::store::Store` for Postgres (production)
//! and SQLite (the embedded default), chosen by the URL scheme.
//!
//! Both stores run the same portable SQL (`$n` parameters, `RETURNING`,
//! `ON CONFLICT`), written once in `sql.rs`; each keeps its own schema in
//! `migrations/{postgres,sqlite}` so the types are natural to it (UUID,
//! TIMESTAMPTZ and JSONB on Postgres; blobs and text on SQLite). Where the
//! dialects must differ (job claiming), each store has its own method.

mod rows;
mod sql;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use handset_core::store::{Store, StoreError};
use sqlx::SqlitePool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use sql::{PgStore, SqliteStore};

/// Pool settings from config.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings { max_connections: 10, acquire_timeout: Duration::from_secs(5) }
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

/// Opens the store the URL's scheme names. The pool connects lazily, so a
/// database that is down at start makes `/ready` answer 503 instead of
/// stopping the process.
pub fn connect(url: &str, settings: &PoolSettings) -> Result<Arc<dyn Store>, StoreError> {
    let invalid = |e: sqlx::Error| StoreError::Database(Box::new(e));
    match Backend::of_url(url) {
        Some(Backend::Postgres) => {
            let options = PgConnectOptions::from_str(url).map_err(invalid)?;
            let pool = PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(settings.acquire_timeout)
                // Each connection is pinged before use (a round trip), so one
                // that a database restart closed is replaced instead of
                // failing a partner's request.
                .test_before_acquire(true)
                .connect_lazy_with(options);
            Ok(Arc::new(PgStore::new(pool)))
        }
        Some(Backend::Sqlite) => {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let (writer, readers) = sqlite_pools(url, settings, in_memory).map_err(invalid)?;
            Ok(Arc::new(SqliteStore::new(writer, readers, in_memory)))
        }
        None => Err(StoreError::Database(
            format!("database.url must start with postgres:// or sqlite: (got {:?})", redact(url)).into(),
        )),
    }
}

/// The writer (one connection) and the readers of a SQLite database.
fn sqlite_pools(url: &str, settings: &PoolSettings, in_memory: bool) -> Result<(SqlitePool, SqlitePool), sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        // Other processes (replicas, the CLI) write the same file: their
        // writes wait for each other instead of failing.
        .busy_timeout(Duration::from_secs(10));
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options.clone());
    if in_memory {
        // Each connection to `:memory:` is a database of its own.
        return Ok((writer.clone(), writer));
    }
    let readers = SqlitePoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options.create_if_missing(false).pragma("query_only", "ON"));
    Ok((writer, readers))
}

/// A database URL with its password masked, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
