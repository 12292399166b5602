//! Throwaway databases for tests: a fresh Postgres database (created on the
//! server named by `HANDSET_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`) or a fresh SQLite file, removed
//! when the `TestDatabase` is dropped.
//!
//! The Postgres suite is required: when no server answers, creating a
//! database panics with a message saying so, and the test fails (never skips).

use std::path::PathBuf;

use sqlx::{Connection, Executor, PgConnection};

pub const POSTGRES_URL_VAR: &str = "HANDSET_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Sqlite,
}

pub struct TestDatabase {
    pub kind: Kind,
    /// The URL handset should use.
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    DropPostgres { admin_url: String, name: String },
    RemoveDir(PathBuf),
}

fn admin_url() -> String {
    std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

impl TestDatabase {
    pub async fn new(kind: Kind) -> TestDatabase {
        match kind {
            Kind::Postgres => Self::postgres().await,
            Kind::Sqlite => Self::sqlite(),
        }
    }

    pub async fn postgres() -> TestDatabase {
        let admin_url = admin_url();
        let name = format!("handset_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "the Postgres test suite needs a server: could not connect to {admin_url} ({e}). \
                 Start PostgreSQL or set {POSTGRES_URL_VAR}."
            )
        });
        admin.execute(format!(r#"CREATE DATABASE "{name}""#).as_str()).await.expect("create the test database");
        let url = replace_database(&admin_url, &name);
        TestDatabase { kind: Kind::Postgres, url, cleanup: Cleanup::DropPostgres { admin_url, name } }
    }

    pub fn sqlite() -> TestDatabase {
        let dir = std::env::temp_dir().join(format!("handset-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        let url = format!("sqlite://{}", dir.join("handset.db").display());
        TestDatabase { kind: Kind::Sqlite, url, cleanup: Cleanup::RemoveDir(dir) }
    }

    /// Closes every connection to this Postgres database, as a restart
    /// does; returns how many there were (0 for SQLite).
    pub async fn close_connections(&self) -> usize {
        let Cleanup::DropPostgres { admin_url, name } = &self.cleanup else { return 0 };
        let mut admin = PgConnection::connect(admin_url).await.expect("connect as admin");
        let closed: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .fetch_all(&mut admin)
        .await
        .expect("close the connections");
        closed.len()
    }

    /// Makes the database unreachable for the app (readiness tests).
    pub async fn destroy(&self) {
        match &self.cleanup {
            Cleanup::DropPostgres { admin_url, name } => drop_postgres(admin_url, name).await,
            Cleanup::RemoveDir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

async fn drop_postgres(admin_url: &str, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(admin_url).await {
        let _ = admin.execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str()).await;
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::DropPostgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop may run inside a runtime; do the async work on a thread of its own.
                let _ = std::thread::spawn(move || {
                    if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        runtime.block_on(drop_postgres(&admin_url, &name));
                    }
                })
                .join();
            }
            Cleanup::RemoveDir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// `postgres://u@h:p/old?x` -> `postgres://u@h:p/new?x`.
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{host_part}/{database}?{query}"),
        None => format!("{host_part}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_name() {
        assert_eq!(super::replace_database("postgres://p@h:5432/test", "x"), "postgres://p@h:5432/x");
        assert_eq!(
            super::replace_database("postgres://p@h/test?sslmode=disable", "x"),
            "postgres://p@h/x?sslmode=disable"
        );
        assert_eq!(super::replace_database("postgres://p@h", "x"), "postgres://p@h/x");
    }
}
