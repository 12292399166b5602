//! `TestApp`: the real application on a random port over real HTTP, with a
//! fresh real database (SQLite file or Postgres database) per test.

use std::sync::Arc;

use handset_core::model::{Partner, Product};
use handset_core::secret::api_key_hash;
use handset_core::store::{NewPartner, Store};
use handset_server::dns::{HostLookup, SystemLookup};
use handset_server::{Application, Settings};
use handset_testkit::{Kind, TestDatabase};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

pub const DEV_KEY: &str = "hs_dev_sandbox_key";

pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub store: Arc<dyn Store>,
    pub db: TestDatabase,
    pub kind: Kind,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An answer: status, headers and the body parsed as JSON (`Null` if empty or not JSON).
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Answer {
    async fn read(response: Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("read body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, headers, text, body }
    }

    /// Asserts the documented error envelope with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: u64) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        let errors = self.body["errors"].as_array().unwrap_or_else(|| panic!("no envelope: {}", self.text));
        assert_eq!(errors.len(), 1, "{}", self.text);
        assert_eq!(errors[0]["code"].as_u64(), Some(code), "{}", self.text);
        assert!(errors[0]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.text);
    }

    pub fn id(&self) -> String {
        self.body["transaction_id"].as_str().unwrap_or_else(|| panic!("no transaction_id: {}", self.text)).to_owned()
    }
}

/// A client for tests: no redirects followed (handset's own answers are checked as they are).
pub fn http_client() -> Client {
    handset_server::install_crypto_provider();
    Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Waits up to 10 s for `GET {base}/health` to answer 200.
pub async fn wait_healthy(base: &str) -> bool {
    let client = http_client();
    for _ in 0..200 {
        if client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

impl TestApp {
    pub async fn spawn(kind: Kind) -> TestApp {
        Self::spawn_with(kind, &[]).await
    }

    /// Starts the app with extra `HANDSET__...` settings (as environment
    /// variables would give them, but without touching the process environment).
    pub async fn spawn_with(kind: Kind, env: &[(&str, &str)]) -> TestApp {
        let db = TestDatabase::new(kind).await;
        Self::spawn_on(db, env, true).await
    }

    pub async fn spawn_on(db: TestDatabase, env: &[(&str, &str)], migrate: bool) -> TestApp {
        Self::spawn_configured(db, None, env, migrate, None).await
    }

    /// As `spawn_with`, resolving callback hosts with `lookup` instead of the system's resolver.
    pub async fn spawn_with_lookup(kind: Kind, env: &[(&str, &str)], lookup: Arc<dyn HostLookup>) -> TestApp {
        Self::spawn_configured(TestDatabase::new(kind).await, None, env, true, Some(lookup)).await
    }

    /// Starts the app with a configuration file (TOML text) layered under `env`.
    pub async fn spawn_with_config(kind: Kind, toml: &str, env: &[(&str, &str)]) -> TestApp {
        Self::spawn_on_config(TestDatabase::new(kind).await, toml, env).await
    }

    /// As `spawn_with_config`, on a given database.
    pub async fn spawn_on_config(db: TestDatabase, toml: &str, env: &[(&str, &str)]) -> TestApp {
        let file = std::env::temp_dir().join(format!("handset-test-{}.toml", Uuid::new_v4().simple()));
        std::fs::write(&file, toml).unwrap();
        let app = Self::spawn_configured(db, Some(&file), env, true, None).await;
        let _ = std::fs::remove_file(file);
        app
    }

    async fn spawn_configured(
        db: TestDatabase,
        file: Option<&std::path::Path>,
        env: &[(&str, &str)],
        migrate: bool,
        lookup: Option<Arc<dyn HostLookup>>,
    ) -> TestApp {
        let mut vars: Vec<(String, String)> = vec![
            ("HANDSET__SERVER__BIND".into(), "127.0.0.1:0".into()),
            ("HANDSET__DATABASE__URL".into(), db.url.clone()),
            ("HANDSET__DATABASE__MIGRATE_ON_START".into(), migrate.to_string()),
            // Generous: on two busy cores a fresh database's first connection can be slow.
            ("HANDSET__DATABASE__ACQUIRE_TIMEOUT".into(), "15s".into()),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let settings = Settings::load_with(file, Some(vars)).expect("test settings");
        let lookup = lookup.unwrap_or_else(|| Arc::new(SystemLookup));
        let app = Application::build_with_lookup(settings, lookup).await.expect("build the app");
        let address = format!("http://{}", app.local_addr());
        let server = tokio::spawn(async move {
            let _ = app.run_until(std::future::pending()).await;
        });
        let store = handset_store::connect(&db.url, &Default::default()).unwrap();
        let client = http_client();
        TestApp { address, client, store, kind: db.kind, db, server }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.post_as(DEV_KEY, path, body).await
    }

    pub async fn post_as(&self, key: &str, path: &str, body: Value) -> Answer {
        let response = self.client.post(self.url(path)).bearer_auth(key).json(&body).send().await.expect("POST");
        Answer::read(response).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.get_as(DEV_KEY, path).await
    }

    /// An SMS start (sandbox, 4155550123) with `key`.
    pub async fn start_as(&self, key: &str) -> Answer {
        self.post_as(key, "/v1/possession", serde_json::json!({"phone": "4155550123"})).await
    }

    /// Waits until a start with `key` answers `status`: a partner change
    /// takes milliseconds to reach a Postgres process's partner cache (never
    /// the cache's TTL).
    pub async fn soon_answers_as(&self, key: &str, status: u16) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let answer = self.start_as(key).await;
            if answer.status == status {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "still {}: {}", answer.status, answer.text);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub async fn get_as(&self, key: &str, path: &str) -> Answer {
        let response = self.client.get(self.url(path)).bearer_auth(key).send().await.expect("GET");
        Answer::read(response).await
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        Answer::read(request.send().await.expect("send")).await
    }

    pub async fn start_sms(&self, phone: &str) -> Answer {
        self.post("/v1/possession", json!({ "phone": phone })).await
    }

    pub async fn confirm(&self, id: &str, code: &str) -> Answer {
        self.post(&format!("/v1/possession/{id}/confirm"), json!({ "code": code })).await
    }

    /// Runs `handset ARGS` (the operator CLI) on this app's database; its
    /// JSON output, or its error output when it fails.
    pub fn cli(&self, args: &[&str]) -> Result<Value, String> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_handset"))
            .args(args)
            .env("HANDSET__DATABASE__URL", &self.db.url)
            .env_remove("RUST_LOG")
            .output()
            .expect("run the handset binary");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
    }

    pub async fn transaction(&self, id: &str) -> Answer {
        self.get(&format!("/v1/transactions/{id}")).await
    }

    /// A partner created in the real store; returns its id and API key.
    pub async fn partner(&self, products: &[Product]) -> (Uuid, String) {
        let (id, key, _) = self.partner_with_secret(products).await;
        (id, key)
    }

    /// As `partner`, also returning its webhook secret (random, `whsec_...`).
    pub async fn partner_with_secret(&self, products: &[Product]) -> (Uuid, String, String) {
        use base64::Engine;
        let key = format!("hs_test_{}", Uuid::new_v4().simple());
        let secret_bytes: [u8; 24] = rand::random();
        let webhook_secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(secret_bytes));
        let partner = Partner {
            id: Uuid::new_v4(),
            name: "test partner".into(),
            products: products.to_vec(),
            active: true,
            webhook_secret: webhook_secret.clone().into(),
            created_at: chrono::Utc::now(),
        };
        let id = partner.id;
        self.store.insert_partner(&NewPartner { partner, api_key_hash: api_key_hash(&key) }).await.unwrap();
        (id, key, webhook_secret)
    }

    /// Takes an `Idempotency-Key` of the development partner for a POST of
    /// `body` to `path`, as another replica answering it right now would.
    pub async fn hold_idempotency_key(&self, key: &str, path: &str, body: &Value) {
        use handset_core::store::{IdempotencyBegin, IdempotencyClaim};
        use handset_server::idempotency::{request_hash, scope};
        let hash = request_hash(&reqwest::Method::POST, path, &serde_json::to_vec(body).unwrap());
        let partner_scope = scope(handset_server::app::DEV_PARTNER_ID);
        let now = chrono::Utc::now();
        let claim = IdempotencyClaim {
            scope: &partner_scope,
            key,
            request_hash: &hash,
            now,
            expired_before: now - chrono::Duration::hours(24),
            lock_until: now + chrono::Duration::minutes(2),
        };
        assert_eq!(self.store.begin_idempotent(claim).await.unwrap(), IdempotencyBegin::Proceed);
    }

    /// Every row of every table, each rendered whole as text (blobs as hex),
    /// by table name: what a dump of the database would show.
    pub async fn dump_all(&self) -> Vec<(String, Vec<String>)> {
        let mut dump = Vec::new();
        match self.kind {
            Kind::Sqlite => {
                let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.db.url).await.unwrap();
                let tables: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                for table in tables {
                    let columns: Vec<String> =
                        sqlx::query_scalar(&format!(r#"SELECT name FROM pragma_table_info('{table}')"#))
                            .fetch_all(&mut conn)
                            .await
                            .unwrap();
                    let row =
                        columns.iter().map(|c| format!(r#"quote("{c}")"#)).collect::<Vec<_>>().join(" || '|' || ");
                    let rows: Vec<String> = sqlx::query_scalar(&format!(r#"SELECT {row} FROM "{table}""#))
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                    dump.push((table, rows));
                }
            }
            Kind::Postgres => {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.db.url).await.unwrap();
                let tables: Vec<String> =
                    sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                for table in tables {
                    let rows: Vec<String> = sqlx::query_scalar(&format!(r#"SELECT CAST(t AS text) FROM "{table}" t"#))
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                    dump.push((table, rows));
                }
            }
        }
        dump
    }

    /// Row count of a table, read straight from the database.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self.kind {
            Kind::Sqlite => {
                let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.db.url).await.unwrap();
                sqlx::query_scalar(&sql).fetch_one(&mut conn).await.unwrap()
            }
            Kind::Postgres => {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.db.url).await.unwrap();
                sqlx::query_scalar(&sql).fetch_one(&mut conn).await.unwrap()
            }
        }
    }

    /// Every text column of a table concatenated, to prove a secret is absent.
    pub async fn dump(&self, table: &str, columns: &str) -> String {
        let sql = format!("SELECT {columns} FROM {table}");
        let rows: Vec<(Option<String>,)> = match self.kind {
            Kind::Sqlite => {
                let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.db.url).await.unwrap();
                sqlx::query_as(&sql).fetch_all(&mut conn).await.unwrap()
            }
            Kind::Postgres => {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.db.url).await.unwrap();
                sqlx::query_as(&sql).fetch_all(&mut conn).await.unwrap()
            }
        };
        rows.into_iter().filter_map(|(s,)| s).collect::<Vec<_>>().join("\n")
    }
}

/// Runs each named scenario `async fn(TestApp)` on SQLite and on Postgres.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   super::$name($crate::helpers::TestApp::spawn(handset_testkit::Kind::Sqlite).await).await
               } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   super::$name($crate::helpers::TestApp::spawn(handset_testkit::Kind::Postgres).await).await
               } )*
        }
    };
}

/// Runs each named scenario `async fn(Kind)` on SQLite and on Postgres, for
/// scenarios that start their own app, database or processes.
#[macro_export]
macro_rules! on_both_kinds {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(handset_testkit::Kind::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(handset_testkit::Kind::Postgres).await } )*
        }
    };
}
