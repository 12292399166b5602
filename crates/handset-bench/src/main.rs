//! `handset-bench`: start+confirm flows per second and their p50/p99 latency
//! through the whole gateway (HTTP, auth, parsing, service, store) on SQLite
//! and Postgres, next to the ceiling of the same SQL statements run bare
//! against the same database, as a ratio. A measurement, not a test: run it
//! with `cargo run --release -p handset-bench` (see the README).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use handset_core::model::{Product, ProviderName, Status, Transaction, TransactionResult, Verification};
use handset_core::secret::{DEVELOPMENT_CODE_PEPPER, api_key_hash, code_hash};
use handset_core::store::{Finalization, Store};
use handset_server::app::DEV_PARTNER_ID;
use handset_server::{Application, Settings};
use handset_testkit::{Kind, TestDatabase};
use serde_json::{Value, json};

const DEV_KEY: &str = "hs_dev_sandbox_key";

#[derive(Debug, Parser)]
#[command(name = "handset-bench", about = "start+confirm flows through handset vs the bare SQL ceiling")]
struct Args {
    /// Flows per measurement.
    #[arg(long, default_value_t = 2000)]
    flows: usize,
    /// Flows in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Databases to measure: sqlite, postgres (Postgres from HANDSET_TEST_POSTGRES_URL).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    stores: Vec<String>,
}

/// One measurement: wall time and each flow's latency.
struct Run {
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
    }
}

/// Runs `flows` calls of `flow` with `concurrency` in flight.
async fn measure<F, Fut>(flows: usize, concurrency: usize, flow: F) -> Run
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let flow = Arc::new(flow);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (flow, next) = (flow.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < flows {
                    let one = Instant::now();
                    flow().await;
                    latencies.push(one.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(flows);
    for worker in workers {
        latencies.extend(worker.await.expect("a flow panicked"));
    }
    Run { wall: started.elapsed(), latencies }
}

/// The whole gateway: POST /v1/possession, then POST .../confirm with the code.
async fn through_handset(db: &TestDatabase, args: &Args) -> Run {
    let vars = vec![
        ("HANDSET__SERVER__BIND".to_string(), "127.0.0.1:0".to_string()),
        ("HANDSET__DATABASE__URL".to_string(), db.url.clone()),
        ("HANDSET__DATABASE__MAX_CONNECTIONS".to_string(), args.concurrency.max(2).to_string()),
        ("HANDSET__WORKERS__ENABLED".to_string(), "false".to_string()),
        // Measure the flow, not the limiter's refusals (its counting still runs).
        ("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE".to_string(), "100000000".to_string()),
        ("HANDSET__RATE_LIMITS__PER_PRODUCT_PER_MINUTE".to_string(), "100000000".to_string()),
    ];
    let settings = Settings::load_with(None, Some(vars)).expect("settings");
    let app = Application::build(settings).await.expect("start handset");
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until(std::future::pending()));
    let client = reqwest::Client::new();
    measure(args.flows, args.concurrency, move || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let started: Value = client
                .post(format!("{base}/v1/possession"))
                .bearer_auth(DEV_KEY)
                .json(&json!({"phone": "4155550123"}))
                .send()
                .await
                .expect("start")
                .json()
                .await
                .expect("start body");
            let id = started["transaction_id"].as_str().expect("a transaction id");
            let confirmed = client
                .post(format!("{base}/v1/possession/{id}/confirm"))
                .bearer_auth(DEV_KEY)
                .json(&json!({"code": "123123"}))
                .send()
                .await
                .expect("confirm");
            assert_eq!(confirmed.status(), 200, "confirm failed");
        }
    })
    .await
}

/// The same SQL statements a flow makes, through the store with nothing in
/// front: two key lookups, the insert, one read, the attempt and the final
/// write. (Partner and product rate windows are counted in memory and
/// reconciled every 20 hits, so they add no statement per request.)
async fn bare_sql(db: &TestDatabase, args: &Args) -> Run {
    let pool = handset_store::PoolSettings { max_connections: args.concurrency.max(2) as u32, ..Default::default() };
    let store: Arc<dyn Store> = handset_store::connect(&db.url, &pool).expect("store");
    let key_hash = Arc::new(api_key_hash(DEV_KEY));
    measure(args.flows, args.concurrency, move || {
        let (store, key_hash) = (store.clone(), key_hash.clone());
        async move {
            let now = Utc::now();
            store.partner_by_key_hash(&key_hash).await.expect("partner").expect("the dev partner");
            let verification = Verification { id: uuid::Uuid::new_v4(), partner_id: DEV_PARTNER_ID, created_at: now };
            let tx = pending(&verification);
            store.insert_transaction(&tx, Some(&verification), None).await.expect("insert");
            store.partner_by_key_hash(&key_hash).await.expect("partner");
            let read = store.transaction(tx.id).await.expect("read").expect("the transaction");
            store.use_attempt(read.id, Utc::now()).await.expect("attempt");
            let done = Transaction {
                status: Status::Succeeded,
                result: Some(TransactionResult::Phone { phone: "+14155550123".into() }),
                updated_at: Utc::now(),
                ..read
            };
            store.finalize(Finalization { transaction: &done, outbox: None }).await.expect("finalize");
        }
    })
    .await
}

fn pending(verification: &Verification) -> Transaction {
    let now = Utc::now();
    let tx = Transaction::pending(
        verification.partner_id,
        verification.id,
        Product::PossessionSms,
        ProviderName::Sandbox,
        "+14155550123",
        now,
    );
    Transaction {
        expires_at: Some(now + chrono::Duration::minutes(10)),
        max_attempts: 5,
        code_hash: Some(code_hash(DEVELOPMENT_CODE_PEPPER.as_bytes(), tx.id, "123123")),
        ..tx
    }
}

fn row(store: &str, path: &str, run: &Run) {
    println!(
        "{store:<9} {path:<9} {:>7} {:>10.0} {:>9.2} {:>9.2}",
        run.latencies.len(),
        run.per_second(),
        run.percentile(0.50),
        run.percentile(0.99)
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!("start+confirm flows, {} per run, {} in flight", args.flows, args.concurrency);
    println!("{:<9} {:<9} {:>7} {:>10} {:>9} {:>9}", "store", "path", "flows", "flows/s", "p50 ms", "p99 ms");
    for name in &args.stores {
        let kind = match name.as_str() {
            "sqlite" => Kind::Sqlite,
            "postgres" => Kind::Postgres,
            other => panic!("unknown store {other:?}: sqlite or postgres"),
        };
        // One database per path, so neither measures the other's rows.
        let gateway_db = TestDatabase::new(kind).await;
        let gateway = through_handset(&gateway_db, &args).await;
        let bare_db = TestDatabase::new(kind).await;
        // The bare path needs the schema and the dev partner the app creates at start.
        let setup = Settings::load_with(
            None,
            Some(vec![
                ("HANDSET__SERVER__BIND".into(), "127.0.0.1:0".into()),
                ("HANDSET__DATABASE__URL".into(), bare_db.url.clone()),
                ("HANDSET__WORKERS__ENABLED".into(), "false".into()),
            ]),
        )
        .expect("settings");
        drop(Application::build(setup).await.expect("prepare the bare database"));
        let bare = bare_sql(&bare_db, &args).await;
        row(name, "handset", &gateway);
        row(name, "bare SQL", &bare);
        println!(
            "{name:<9} handset reaches {:.0}% of the bare SQL ceiling",
            100.0 * gateway.per_second() / bare.per_second()
        );
    }
}
