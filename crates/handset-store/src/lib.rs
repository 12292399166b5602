//! handset's persistence: `handset_core::store::Store` for Postgres (production)
//! and SQLite (the embedded default), chosen by the URL scheme.
//!
//! Both stores run the same portable SQL (`$n` parameters, `RETURNING`,
//! `ON CONFLICT`), written once in `queries.rs`; each keeps its own schema in
//! `migrations/{postgres,sqlite}` so the types are natural to it (UUID,
//! TIMESTAMPTZ and JSONB on Postgres; blobs and text on SQLite). Postgres is
//! driven by sqlx connections in a `deadpool` pool that pings them only when
//! there is reason to (`pg.rs`, `pg_pool.rs`); SQLite by rusqlite with one
//! writer thread that commits writes in groups (`sqlite/`).

mod queries;

mod pg;
mod pg_pool;
mod rows;
mod sqlite;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use handset_core::store::{Store, StoreError};
use sqlx::postgres::PgConnectOptions;

pub use pg::PgStore;
pub use sqlite::SqliteStore;

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
            Ok(Arc::new(PgStore::new(options, settings.max_connections, settings.acquire_timeout)))
        }
        // SQLite keeps up to `max_connections` idle readers; the writer is one.
        Some(Backend::Sqlite) => Ok(Arc::new(SqliteStore::open(url, settings.max_connections)?)),
        None => Err(StoreError::Database(
            format!("database.url must start with postgres:// or sqlite: (got {:?})", redact(url)).into(),
        )),
    }
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
