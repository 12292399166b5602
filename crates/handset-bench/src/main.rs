//! `handset-bench`: start+confirm flows per second and their p50/p99 latency
//! through the whole gateway (HTTP, auth, parsing, service, store) on SQLite
//! and Postgres, next to the database's own ceiling: the minimal SQL of one
//! flow (one transaction inserting the verification and the transaction; one
//! writing the final state and its callback row), as prepared statements with
//! nothing in front (on Postgres one statement each, on connections with no
//! pool checks). The gateway and the ceiling run in alternating rounds, so
//! a shared machine's slow spells fall on both; the ratio is the median of
//! the rounds'. Beside each path, the CPU per flow of the gateway's
//! threads, of the PostgreSQL server's processes and of the load (the
//! keep-alive HTTP/1 load generator, or the ceiling's SQL driver), and the
//! ratio of CPU per flow with the load generator left out; on Postgres,
//! the bytes of WAL per flow.
//! Then the gateway's latency at half its measured rate, beside the
//! ceiling's at half its own (the database's own tail when not saturated: a
//! disk sync that stalls shows in both), and a run with thousands of flows in flight
//! against a provider (`handset-sim` as ID.me) that answers slowly, with the
//! peak memory of the `handset serve` process.
//!
//! A measurement, not a test: nothing asserts a speed (see the README).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use handset_core::model::new_record_id;
use handset_core::secret::{DEVELOPMENT_CODE_PEPPER, code_hash};
use handset_server::app::DEV_PARTNER_ID;
use handset_server::{Application, Settings};
use handset_sim::faults::Faults;
use handset_sim::{Sim, SimConfig};
use handset_testkit::{Kind, TestDatabase};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sqlx::types::Json;
use uuid::Uuid;

/// The allocator `handset serve` runs with, so the in-process gateway measures the same.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The development partner's key (`dev.api_key`), as a header.
const AUTHORIZATION: &str = "Bearer hs_dev_sandbox_key";
/// The name of the benchmark's own runtime threads (the load).
const LOAD_THREADS: &str = "load";
/// A public address: the gateway writes the callback row a partner would
/// be owed (workers are off, so nothing is sent).
const CALLBACK_URL: &str = "https://93.184.215.14/hook";
/// The routing a sandbox start records (`transactions.routing`): the
/// ceiling writes the row the gateway writes, every column it fills.
const ROUTING: &str = r#"{"strategy":"ordered","order":["sandbox"],"reason":"configured"}"#;

#[derive(Debug, Parser)]
#[command(name = "handset-bench", about = "start+confirm flows through handset vs the database's own ceiling")]
struct Args {
    /// Flows per measurement.
    #[arg(long, default_value_t = 3000)]
    flows: usize,
    /// Rounds the flows of the gateway and ceiling rows are split into, run
    /// one after the other (gateway, ceiling, gateway, ...), so a machine
    /// that slows down for a while slows both; the ratio is the median of
    /// the rounds' own ratios.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Flows in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Databases to measure: sqlite, postgres (Postgres from HANDSET_TEST_POSTGRES_URL).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    stores: Vec<String>,
    /// Flows all in flight at once against the slow provider (0 skips that run).
    #[arg(long, default_value_t = 5000)]
    in_flight: usize,
    /// How long the simulated provider takes to answer each call.
    #[arg(long, default_value_t = 200)]
    provider_latency_ms: u64,
    /// `security.partner_cache_ttl` of the Postgres comparison row (the first
    /// row runs the shipped default; SQLite never caches partners).
    #[arg(long, default_value = "0s")]
    partner_cache_ttl: String,
    /// Transactions in the day the funnel query reads (Postgres only; 0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    stats_rows: i64,
}

/// One measurement: wall time, each flow's latency, and flows that failed.
struct Run {
    wall: Duration,
    latencies: Vec<Duration>,
    failures: usize,
}

impl Run {
    fn empty() -> Run {
        Run { wall: Duration::ZERO, latencies: Vec::new(), failures: 0 }
    }

    /// Adds a round of the same path: its flows, failures and wall time.
    fn absorb(&mut self, round: Run) {
        self.wall += round.wall;
        self.latencies.extend(round.latencies);
        self.failures += round.failures;
    }

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

type FlowResult = Result<(), String>;

/// Runs `flows` calls of `flow` with `concurrency` in flight (closed loop).
async fn measure<F, Fut>(flows: usize, concurrency: usize, flow: F) -> Run
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = FlowResult> + Send,
{
    let flow = Arc::new(flow);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (flow, next) = (flow.clone(), next.clone());
            tokio::spawn(async move {
                let (mut latencies, mut failures) = (Vec::new(), 0);
                while next.fetch_add(1, Ordering::Relaxed) < flows {
                    let one = Instant::now();
                    match flow().await {
                        Ok(()) => latencies.push(one.elapsed()),
                        Err(error) => {
                            failures += 1;
                            eprintln!("flow failed: {error}");
                        }
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let (mut latencies, mut failures) = (Vec::with_capacity(flows), 0);
    for worker in workers {
        let (done, failed) = worker.await.expect("a flow panicked");
        latencies.extend(done);
        failures += failed;
    }
    Run { wall: started.elapsed(), latencies, failures }
}

/// Starts `flows` flows at a steady `rate` per second (open loop), each on
/// its own, so a slow answer does not slow the arrivals.
async fn measure_paced<F, Fut>(flows: usize, rate: f64, flow: F) -> Run
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = FlowResult> + Send + 'static,
{
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut running = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..flows {
        ticker.tick().await;
        let one = flow();
        running.spawn(async move {
            let at = Instant::now();
            one.await.map(|()| at.elapsed())
        });
    }
    collect(running, started).await
}

/// Starts every flow at once and waits for all of them.
async fn measure_all_at_once<F, Fut>(flows: usize, flow: F) -> Run
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = FlowResult> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..flows {
        let one = flow();
        running.spawn(async move {
            let at = Instant::now();
            one.await.map(|()| at.elapsed())
        });
    }
    collect(running, started).await
}

async fn collect(mut running: tokio::task::JoinSet<Result<Duration, String>>, started: Instant) -> Run {
    let (mut latencies, mut failures) = (Vec::new(), 0);
    let mut first_errors = Vec::new();
    while let Some(done) = running.join_next().await {
        match done.expect("a flow panicked") {
            Ok(latency) => latencies.push(latency),
            Err(error) => {
                failures += 1;
                if first_errors.len() < 5 {
                    first_errors.push(error);
                }
            }
        }
    }
    for error in first_errors {
        eprintln!("flow failed: {error}");
    }
    Run { wall: started.elapsed(), latencies, failures }
}

/// One keep-alive HTTP/1 connection to the gateway carrying one request at
/// a time: the lightest load generator (hyper's client connection, with no
/// pool, redirect or URL layers), so it takes little of the cores it shares
/// with the gateway and the database, and what it takes is counted apart (`Cpu`).
struct Lane {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Lane {
    async fn open(addr: SocketAddr) -> Result<Lane, String> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Lane { sender })
    }

    /// Errors before the request went out are `Unsent`.
    async fn send(&mut self, method: Method, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), LaneError> {
        let unsent = |e: hyper::Error| LaneError::Unsent(format!("{path}: {e}"));
        self.sender.ready().await.map_err(unsent)?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "handset")
            .header(header::AUTHORIZATION, AUTHORIZATION)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| LaneError::Failed(format!("{path}: {e}")))?;
        let response = self.sender.send_request(request).await.map_err(|e| match e.is_canceled() {
            // hyper gives the request back untouched when the connection closed first.
            true => LaneError::Unsent(format!("{path}: {e}")),
            false => LaneError::Failed(format!("{path}: {e}")),
        })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| LaneError::Failed(format!("{path} body: {e}")))?
            .to_bytes();
        Ok((status, body))
    }

    /// One start (`start`: its JSON body) and its confirm with the sandbox's code.
    async fn flow(&mut self, start: Bytes) -> Result<(), LaneError> {
        #[derive(serde::Deserialize)]
        struct Started {
            transaction_id: Uuid,
        }
        let (status, body) = self.send(Method::POST, "/v1/possession", start).await?;
        let started: Started = serde_json::from_slice(&body)
            .map_err(|_| LaneError::Failed(format!("start answered {status}: {}", String::from_utf8_lossy(&body))))?;
        let confirm = format!("/v1/possession/{}/confirm", started.transaction_id);
        let confirmed = self.send(Method::POST, &confirm, Bytes::from_static(br#"{"code":"123123"}"#)).await;
        let (status, body) = confirmed.map_err(|e| LaneError::Failed(e.into()))?;
        match status.as_u16() {
            200 => Ok(()),
            other => Err(LaneError::Failed(format!("confirm answered {other}: {}", String::from_utf8_lossy(&body)))),
        }
    }
}

/// Why a lane's flow failed: `Unsent` if nothing of it reached the server.
enum LaneError {
    Unsent(String),
    Failed(String),
}

impl From<LaneError> for String {
    fn from(error: LaneError) -> String {
        match error {
            LaneError::Unsent(message) | LaneError::Failed(message) => message,
        }
    }
}

/// Idle lanes to one gateway, opened as flows need them (one per flow in flight).
#[derive(Clone)]
struct Lanes {
    addr: SocketAddr,
    idle: Arc<std::sync::Mutex<Vec<Lane>>>,
}

impl Lanes {
    fn new(addr: SocketAddr) -> Lanes {
        Lanes { addr, idle: Arc::default() }
    }

    async fn flow(self, start: Bytes) -> FlowResult {
        // The server closes connections left idle (a paced run leaves some): skip those.
        let idle = {
            let mut idle = self.idle.lock().expect("idle lanes");
            std::iter::from_fn(|| idle.pop()).find(|lane| !lane.sender.is_closed())
        };
        let reused = idle.is_some();
        let mut lane = match idle {
            Some(lane) => lane,
            None => Lane::open(self.addr).await?,
        };
        let mut flow = lane.flow(start.clone()).await;
        // The server may close an idle lane as the start goes out: once, a new lane.
        if reused && matches!(flow, Err(LaneError::Unsent(_))) {
            lane = Lane::open(self.addr).await?;
            flow = lane.flow(start).await;
        }
        // A lane that failed may be mid-response: it is dropped, not reused.
        if flow.is_ok() {
            self.idle.lock().expect("idle lanes").push(lane);
        }
        flow.map_err(String::from)
    }
}

fn sandbox_start() -> Bytes {
    Bytes::from(json!({"phone": "4155550123", "callback_url": CALLBACK_URL}).to_string())
}

/// The whole gateway in this process (sandbox provider), on `db`, on a
/// runtime of its own as `handset serve` has, its threads named
/// `gateway-<n>` (returned) so its CPU is told apart from the load
/// generator's and the other gateways'. Its database pool is the shipped
/// one (`database.max_connections`, 10): sized to the in-flight count (16)
/// it spread the same statements over more server processes, and the
/// database spent a fifth to a third more CPU per flow on this two-core
/// machine.
/// `partner_cache_ttl`: `None` keeps the shipped default.
async fn start_gateway(db: &TestDatabase, partner_cache_ttl: Option<&str>) -> (SocketAddr, String) {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let threads = format!("gateway-{}", STARTED.fetch_add(1, Ordering::Relaxed) + 1);
    let mut vars = vec![
        ("HANDSET__SERVER__BIND".to_string(), "127.0.0.1:0".to_string()),
        ("HANDSET__DATABASE__URL".to_string(), db.url.clone()),
        ("HANDSET__WORKERS__ENABLED".to_string(), "false".to_string()),
        // Measure the flow, not the limiter's refusals (its counting still runs).
        ("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE".to_string(), "100000000".to_string()),
        ("HANDSET__RATE_LIMITS__PER_PRODUCT_PER_MINUTE".to_string(), "100000000".to_string()),
    ];
    if let Some(ttl) = partner_cache_ttl {
        vars.push(("HANDSET__SECURITY__PARTNER_CACHE_TTL".to_string(), ttl.to_string()));
    }
    let settings = Settings::load_with(None, Some(vars)).expect("settings");
    let (started, addr) = tokio::sync::oneshot::channel();
    let name = threads.clone();
    std::thread::Builder::new()
        .name(threads.clone())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .thread_name(name)
                .enable_all()
                .build()
                .expect("the gateway's runtime");
            runtime.block_on(async move {
                let app = Application::build(settings).await.expect("start handset");
                let _ = started.send(app.local_addr());
                app.run_until(std::future::pending()).await
            })
        })
        .expect("the gateway's thread");
    (addr.await.expect("the gateway started"), threads)
}

/// The minimal SQL of one flow, prepared, on Postgres, with the fewest round
/// trips: a start is one statement (the verification and the transaction
/// inserted together), a confirm is one (the conditional update of the
/// transaction and its callback row together). Each is a transaction of its
/// own, so a flow costs two commits, as in the gateway. The rows are the
/// gateway's, every column a sandbox start fills (the number range feeds an
/// index of its own).
async fn minimal_flow(conn: &mut sqlx::PgConnection) -> FlowResult {
    let now = Utc::now();
    let (verification, id) = (new_record_id(), new_record_id());
    sqlx::query(
        "WITH verification AS (INSERT INTO verifications (id, partner_id, created_at) VALUES ($2, $3, $4)) \
         INSERT INTO transactions (id, verification_id, partner_id, product, provider, phone, status_code, \
             created_at, updated_at, expires_at, max_attempts, code_hash, callback_url, metadata, country, \
             number_range, routing) \
             VALUES ($1, $2, $3, 'possession.sms', 'sandbox', '+14155550123', 210, $4, $4, $5, 5, $6, $7, $8, 'US', \
             '+1415555', $9::jsonb)",
    )
    .bind(id)
    .bind(verification)
    .bind(DEV_PARTNER_ID)
    .bind(now)
    .bind(now + chrono::Duration::minutes(10))
    .bind(code_hash(DEVELOPMENT_CODE_PEPPER.as_bytes(), id, "123123"))
    .bind(CALLBACK_URL)
    .bind(Json(json!({})))
    .bind(ROUTING)
    .execute(&mut *conn)
    .await
    .map_err(|e| e.to_string())?;

    let now = Utc::now();
    let written = sqlx::query(
        "WITH t AS (UPDATE transactions SET status_code = 200, attempts_used = attempts_used + 1, result = $2, \
             updated_at = $3 WHERE id = $1 AND status_code = 210 AND attempts_used < max_attempts RETURNING id) \
         INSERT INTO outbox (id, transaction_id, partner_id, callback_url, payload, created_at, next_attempt_at) \
             SELECT $4, t.id, $5, $6, $7, $3, $3 FROM t",
    )
    .bind(id)
    .bind(Json(json!({"phone": "+14155550123"})))
    .bind(now)
    .bind(new_record_id())
    .bind(DEV_PARTNER_ID)
    .bind(CALLBACK_URL)
    .bind(r#"{"status":{"code":200}}"#)
    .execute(&mut *conn)
    .await
    .map_err(|e| e.to_string())?;
    if written.rows_affected() == 1 { Ok(()) } else { Err("the confirm wrote nothing".into()) }
}

/// The funnel (`GET /v1/stats`) over a day of `rows` transactions on
/// Postgres: one partner's day grouped by provider, country and product,
/// and every partner's, through the store as the API calls it (best of three).
async fn funnel_run(rows: i64) {
    use handset_core::funnel::FunnelQuery;
    let db = TestDatabase::new(Kind::Postgres).await;
    prepare(&db).await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let day_start = Utc::now() - chrono::Duration::days(1);
    let loaded = Instant::now();
    // A day of traffic: every 86,400,000 / rows ms, mixed providers,
    // countries, products and outcomes, each verification of its own.
    sqlx::query(
        "INSERT INTO verifications (id, partner_id, created_at) SELECT md5(i::text)::uuid, $1, \
         $2 + i * ($4 * interval '1 millisecond') FROM generate_series(1, $3) AS i",
    )
    .bind(DEV_PARTNER_ID)
    .bind(day_start)
    .bind(rows)
    .bind(86_400_000.0 / rows as f64)
    .execute(&pool)
    .await
    .expect("verifications");
    sqlx::query(
        "INSERT INTO transactions (id, verification_id, partner_id, product, provider, phone, country, status_code, \
         created_at, updated_at, expires_at, attempts_used, max_attempts, metadata) \
         SELECT gen_random_uuid(), md5(i::text)::uuid, $1, \
         CASE WHEN i % 10 = 0 THEN 'identity' ELSE 'possession.sms' END, \
         CASE WHEN i % 3 = 0 THEN 'veratad' ELSE 'idme' END, '+14155550123', \
         CASE WHEN i % 7 = 0 THEN 'FR' ELSE 'US' END, \
         CASE WHEN i % 5 = 0 THEN 300 WHEN i % 11 = 0 AND t > $5 THEN 210 WHEN i % 11 = 0 THEN 300 ELSE 200 END, \
         t, CASE WHEN i % 5 <> 0 AND i % 11 = 0 THEN t + interval '10 minutes' \
         ELSE t + (i % 60) * interval '1 second' END, t + interval '10 minutes', 1, 5, '{}' \
         FROM (SELECT i, $2 + i * ($4 * interval '1 millisecond') AS t FROM generate_series(1, $3) AS i) AS s",
    )
    .bind(DEV_PARTNER_ID)
    .bind(day_start)
    .bind(rows)
    .bind(86_400_000.0 / rows as f64)
    // Checks left unconfirmed are pending for their 10 minutes, then expired
    // (as the job runner leaves them).
    .bind(Utc::now() - chrono::Duration::minutes(10))
    .execute(&pool)
    .await
    .expect("transactions");
    sqlx::query("ANALYZE transactions").execute(&pool).await.expect("analyze");
    let loaded = loaded.elapsed();
    let store = handset_store::connect(&db.url, &handset_store::PoolSettings::default()).expect("store");
    let until = Utc::now();
    let best_of_three = async |query: &FunnelQuery| {
        let mut best = Duration::MAX;
        let mut groups = 0;
        for _ in 0..3 {
            let at = Instant::now();
            groups = store.funnel(query).await.expect("funnel").len();
            best = best.min(at.elapsed());
        }
        (best, groups)
    };
    let queries =
        [("one partner's day", Some(DEV_PARTNER_ID)), ("every partner's day", None)].map(|(label, partner)| {
            let query =
                FunnelQuery::parse(partner, Some(&day_start.to_rfc3339()), Some(&until.to_rfc3339()), None, until);
            (label, query.expect("query"))
        });
    // First from the transactions alone, then as the job runner leaves it:
    // the day's closed hours rolled up.
    for (label, query) in &queries {
        let (best, groups) = best_of_three(query).await;
        println!(
            "postgres  funnel of {label}, from the transactions: {rows} transactions, {groups} groups, {:.0} ms \
             (loaded in {:.0} s)",
            best.as_secs_f64() * 1000.0,
            loaded.as_secs_f64()
        );
    }
    let rolling = Instant::now();
    let hours = store.roll_up_funnel(Utc::now() - chrono::Duration::minutes(15), 48).await.expect("roll up");
    let rolling = rolling.elapsed();
    for (label, query) in &queries {
        let (best, groups) = best_of_three(query).await;
        println!(
            "postgres  funnel of {label}, {hours} hours rolled up: {groups} groups, {:.0} ms (rolled up in {:.1} s)",
            best.as_secs_f64() * 1000.0,
            rolling.as_secs_f64()
        );
    }
}

/// The schema and the development partner, as the app creates them at start.
async fn prepare(db: &TestDatabase) {
    let setup = Settings::load_with(
        None,
        Some(vec![
            ("HANDSET__SERVER__BIND".into(), "127.0.0.1:0".into()),
            ("HANDSET__DATABASE__URL".into(), db.url.clone()),
            ("HANDSET__WORKERS__ENABLED".into(), "false".into()),
        ]),
    )
    .expect("settings");
    drop(Application::build(setup).await.expect("prepare the database"));
}

/// The database's ceiling: the minimal SQL of a flow, ready to run in rounds.
enum Ceiling {
    /// A connection per flow in flight (`BareConnections`).
    Postgres(Arc<BareConnections>),
    /// SQLite allows one writer: its least work is one rusqlite connection
    /// on a thread of its own running the flows one after another, with
    /// nothing in between (no async runtime, no driver thread to hand
    /// statements to). The database file's path.
    Sqlite(String),
}

impl Ceiling {
    async fn new(db: &TestDatabase, args: &Args) -> Ceiling {
        prepare(db).await;
        match db.kind {
            Kind::Postgres => {
                let connections = args.concurrency.max(2);
                let mut idle = Vec::with_capacity(connections);
                for _ in 0..connections {
                    idle.push(<sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.expect("connect"));
                }
                Ceiling::Postgres(Arc::new(BareConnections {
                    free: tokio::sync::Semaphore::new(connections),
                    idle: std::sync::Mutex::new(idle),
                }))
            }
            Kind::Sqlite => {
                Ceiling::Sqlite(db.url.trim_start_matches("sqlite://").split('?').next().unwrap_or_default().to_owned())
            }
        }
    }

    /// `flows` flows of minimal SQL, `concurrency` at a time (Postgres).
    async fn run(&self, flows: usize, concurrency: usize) -> Run {
        match self {
            Ceiling::Postgres(connections) => {
                let connections = connections.clone();
                measure(flows, concurrency, move || connections.clone().flow()).await
            }
            Ceiling::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || direct_flows(&path, flows, None)).await.expect("the direct run")
            }
        }
    }

    /// `flows` flows started at `rate` per second: the database's own
    /// latency when not saturated.
    async fn run_paced(&self, flows: usize, rate: f64) -> Run {
        match self {
            Ceiling::Postgres(connections) => {
                let connections = connections.clone();
                measure_paced(flows, rate, move || connections.clone().flow()).await
            }
            Ceiling::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || direct_flows(&path, flows, Some(rate)))
                    .await
                    .expect("the direct run")
            }
        }
    }
}

/// The ceiling's Postgres connections, one per flow in flight, taken and
/// put back without a pool's checks (sqlx's pool pings a connection when
/// it is returned): the database's work and nothing else. A flow that
/// finds them all busy waits for one, as the gateway's wait for its pool.
struct BareConnections {
    free: tokio::sync::Semaphore,
    idle: std::sync::Mutex<Vec<sqlx::PgConnection>>,
}

impl BareConnections {
    async fn flow(self: Arc<Self>) -> FlowResult {
        let _turn = self.free.acquire().await.map_err(|e| e.to_string())?;
        let mut conn = self.idle.lock().expect("idle connections").pop().ok_or("no idle connection")?;
        let flow = minimal_flow(&mut conn).await;
        self.idle.lock().expect("idle connections").push(conn);
        flow
    }
}

/// `flows` flows of minimal SQL one after another on one connection. With
/// a `rate`, each starts when due at that pace; one that had to wait for
/// the flow before it counts its latency from when it was due, so a flow
/// that stalls delays the next ones as a queue would.
fn direct_flows(path: &str, flows: usize, rate: Option<f64>) -> Run {
    let conn = rusqlite::Connection::open(path).expect("open the database");
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;")
        .expect("pragmas");
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(flows);
    let mut failures = 0;
    for i in 0..flows {
        let due = match rate {
            Some(rate) => {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                // On time: from its start (a sleep's overshoot is not the database's).
                if now < due {
                    std::thread::sleep(due - now);
                    Instant::now()
                } else {
                    due
                }
            }
            None => Instant::now(),
        };
        match direct_flow(&conn) {
            Ok(()) => latencies.push(due.elapsed()),
            Err(_) => {
                failures += 1;
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
    }
    Run { wall: started.elapsed(), latencies, failures }
}

/// One flow of minimal SQL on SQLite: the start's transaction, then the confirm's.
fn direct_flow(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    use rusqlite::params;
    let time = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (id, verification, now) = (new_record_id(), new_record_id(), Utc::now());
    conn.execute_batch("BEGIN IMMEDIATE")?;
    conn.prepare_cached("INSERT INTO verifications (id, partner_id, created_at) VALUES (?1, ?2, ?3)")?
        .execute(params![verification.as_bytes(), DEV_PARTNER_ID.as_bytes(), time(now)])?;
    conn.prepare_cached(
        "INSERT INTO transactions (id, verification_id, partner_id, product, provider, phone, status_code, \
         created_at, updated_at, expires_at, max_attempts, code_hash, callback_url, metadata, country, number_range, \
         routing) VALUES (?1, ?2, ?3, 'possession.sms', 'sandbox', '+14155550123', 210, ?4, ?4, ?5, 5, ?6, ?7, '{}', \
         'US', '+1415555', ?8)",
    )?
    .execute(params![
        id.as_bytes(),
        verification.as_bytes(),
        DEV_PARTNER_ID.as_bytes(),
        time(now),
        time(now + chrono::Duration::minutes(10)),
        code_hash(DEVELOPMENT_CODE_PEPPER.as_bytes(), id, "123123"),
        CALLBACK_URL,
        ROUTING
    ])?;
    conn.execute_batch("COMMIT")?;
    let now = Utc::now();
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let _: (Option<String>, i32) = conn
        .prepare_cached("SELECT code_hash, attempts_used FROM transactions WHERE id = ?1")?
        .query_row(params![id.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))?;
    conn.prepare_cached(
        "UPDATE transactions SET status_code = 200, attempts_used = attempts_used + 1, result = ?2, \
         updated_at = ?3 WHERE id = ?1",
    )?
    .execute(params![id.as_bytes(), r#"{"phone":"+14155550123"}"#, time(now)])?;
    conn.prepare_cached(
        "INSERT INTO outbox (id, transaction_id, partner_id, callback_url, payload, created_at, next_attempt_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![
        new_record_id().as_bytes(),
        id.as_bytes(),
        DEV_PARTNER_ID.as_bytes(),
        CALLBACK_URL,
        r#"{"status":{"code":200}}"#,
        time(now)
    ])?;
    conn.execute_batch("COMMIT")
}

/// `handset serve` as a process of its own (its memory is measured), with
/// ID.me on `sim` as the SMS provider.
fn spawn_serve(db: &TestDatabase, sim: &Sim, port: u16) -> std::process::Child {
    let binary = handset_binary();
    std::process::Command::new(&binary)
        .arg("serve")
        .env("HANDSET__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("HANDSET__SERVER__MAX_CONNECTIONS", "20000")
        .env("HANDSET__DATABASE__URL", &db.url)
        .env("HANDSET__WORKERS__ENABLED", "false")
        .env("HANDSET__PROVIDERS__IDME__BASE_URL", sim.base_url())
        .env("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret")
        .env("HANDSET__PROVIDERS__IDME__TIMEOUT", "30s")
        .env("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE", "100000000")
        .env("HANDSET__RATE_LIMITS__PER_PRODUCT_PER_MINUTE", "100000000")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e} (build it: cargo build --release --bins)", binary.display()))
}

/// The `handset` binary built beside this one.
fn handset_binary() -> PathBuf {
    let me = std::env::current_exe().expect("this binary's path");
    me.with_file_name("handset")
}

/// Peak resident memory of a process (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Every flow in flight at once against ID.me on the sim answering after
/// `provider_latency_ms`: how many complete, how fast, and the peak memory.
async fn in_flight_run(kind: Kind, args: &Args) -> (Run, Option<f64>) {
    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.expect("start handset-sim");
    sim.set_faults(Faults { latency_ms: args.provider_latency_ms, ..Faults::default() });
    let db = TestDatabase::new(kind).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port();
    let mut child = spawn_serve(&db, &sim, port);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(mut lane) = Lane::open(addr).await
            && lane.send(Method::GET, "/health", Bytes::new()).await.is_ok_and(|(status, _)| status == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "handset serve did not start");
    let start =
        Bytes::from(json!({"phone": "4155550123", "provider": "idme", "callback_url": CALLBACK_URL}).to_string());
    let lanes = Lanes::new(addr);
    let run = measure_all_at_once(args.in_flight, || lanes.clone().flow(start.clone())).await;
    let peak = peak_rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (run, peak)
}

/// The median of the rounds' ratios, and their range.
fn spread(ratios: &mut [f64]) -> String {
    ratios.sort_by(f64::total_cmp);
    match (ratios.first(), ratios.get(ratios.len() / 2), ratios.last()) {
        (Some(low), Some(median), Some(high)) => format!("{median:.2}x (rounds {low:.2}x to {high:.2}x)"),
        _ => "no round".to_owned(),
    }
}

fn row(store: &str, path: &str, run: &Run) {
    println!(
        "{store:<9} {path:<22} {:>7} {:>6} {:>10.0} {:>9.2} {:>9.2}",
        run.latencies.len(),
        run.failures,
        run.per_second(),
        run.percentile(0.50),
        run.percentile(0.99)
    );
}

/// CPU time spent by the three parties of a run: the measured gateway's
/// threads (its runtime, and SQLite's threads on SQLite), the load's (the
/// benchmark's own runtime: the load generator, or the ceiling's SQL driver),
/// and the PostgreSQL server's processes (`None` when they cannot be read,
/// e.g. a server on another machine).
#[derive(Clone, Copy, Default)]
struct Cpu {
    gateway: Duration,
    load: Duration,
    database: Option<Duration>,
    /// Bytes of write-ahead log the PostgreSQL server inserted.
    wal_bytes: Option<u64>,
}

impl Cpu {
    fn add(&mut self, other: Cpu) {
        self.gateway += other.gateway;
        self.load += other.load;
        self.database = sum(self.database, other.database);
        self.wal_bytes = sum(self.wal_bytes, other.wal_bytes);
    }
}

/// Whose CPU a measurement counts: the threads of one gateway (named
/// `gateway_threads` by `start_gateway`; other gateways are left out),
/// SQLite's threads or not, and the PostgreSQL server whose postmaster this is.
struct CpuProbe {
    gateway_threads: String,
    sqlite: bool,
    postmaster: Option<u32>,
    /// The Postgres server whose WAL is counted.
    postgres_url: Option<String>,
}

/// Either or both, added.
fn sum<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// The CPU each thread and server process had spent at one moment (on-CPU
/// nanoseconds from `/proc/.../schedstat`), by id: a thread or process that
/// ends between two samples then takes away only its own time, not its share
/// of the total.
struct CpuSample {
    gateway: HashMap<u32, Duration>,
    load: HashMap<u32, Duration>,
    database: Option<HashMap<u32, Duration>>,
}

fn on_cpu(dir: &std::path::Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
    stat.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
}

/// The parent of a process, from `/proc/<pid>/stat` (after the name in parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Where the PostgreSQL server at `url` inserts its next WAL record, in
/// bytes: exact at once, where `pg_stat_wal` lags up to a second per
/// backend (the whole server: the benchmark is its only user).
async fn wal_position(url: &str) -> Option<u64> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.ok()?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint")
        .fetch_one(&mut conn)
        .await
        .ok()?;
    u64::try_from(bytes).ok()
}

/// Writes out what earlier runs left dirty (Postgres's buffers by a
/// checkpoint, then the kernel's page cache), so a paced run does not meet
/// the kernel writing back the rounds before it: that writeback, 30 s after
/// the data was dirtied, stretches the log's syncs for whichever run comes
/// next. A server that refuses `CHECKPOINT` (no privilege) is left as it is.
async fn settle_disk(db: &TestDatabase) {
    if db.kind == Kind::Postgres
        && let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await
    {
        let _ = sqlx::query("CHECKPOINT").execute(&mut conn).await;
    }
    let _ = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status()).await;
}

/// The postmaster of the PostgreSQL server at `url`, if it runs here.
async fn postmaster_of(url: &str) -> Option<u32> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.ok()?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await.ok()?;
    parent_of(u32::try_from(backend).ok()?)
}

impl CpuProbe {
    fn sample(&self) -> CpuSample {
        let ids = |dir: &str| {
            std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|entry| {
                let id = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((id, entry.path()))
            })
        };
        let me = std::process::id();
        let (mut gateway, mut load) = (HashMap::new(), HashMap::new());
        for (tid, dir) in ids("/proc/self/task") {
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let name = name.trim_end();
            let spent = on_cpu(&dir).unwrap_or_default();
            if name == self.gateway_threads || (self.sqlite && name.starts_with("handset-sqlite")) {
                gateway.insert(tid, spent);
            } else if name == LOAD_THREADS || tid == me {
                load.insert(tid, spent);
            }
        }
        let database = self.postmaster.map(|postmaster| {
            ids("/proc")
                .filter(|(pid, _)| *pid == postmaster || parent_of(*pid) == Some(postmaster))
                .map(|(pid, dir)| (pid, on_cpu(&dir).unwrap_or_default()))
                .collect()
        });
        CpuSample { gateway, load, database }
    }
}

impl CpuSample {
    /// What was spent from `before` to this sample.
    fn since(&self, before: &CpuSample) -> Cpu {
        let spent = |now: &HashMap<u32, Duration>, then: &HashMap<u32, Duration>| {
            now.iter().map(|(id, d)| d.saturating_sub(then.get(id).copied().unwrap_or_default())).sum()
        };
        Cpu {
            gateway: spent(&self.gateway, &before.gateway),
            load: spent(&self.load, &before.load),
            database: self.database.as_ref().zip(before.database.as_ref()).map(|(now, then)| spent(now, then)),
            wal_bytes: None,
        }
    }
}

/// Runs `work` and adds the CPU it took to `total`.
/// The WAL is read outside the CPU samples, so reading it is not counted.
async fn counting<T>(total: &mut Cpu, probe: &CpuProbe, work: impl std::future::Future<Output = T>) -> T {
    let wal_before = match &probe.postgres_url {
        Some(url) => wal_position(url).await,
        None => None,
    };
    let before = probe.sample();
    let out = work.await;
    let mut spent = probe.sample().since(&before);
    if let (Some(url), Some(before)) = (&probe.postgres_url, wal_before) {
        spent.wal_bytes = wal_position(url).await.map(|after| after.saturating_sub(before));
    }
    total.add(spent);
    out
}

/// CPU milliseconds per flow of one path.
fn cpu_row(store: &str, path: &str, cpu: &Cpu, flows: usize, load_label: &str) {
    let per_flow = |d: Duration| d.as_secs_f64() * 1000.0 / flows.max(1) as f64;
    let database = cpu.database.map_or("-".to_owned(), |d| format!("{:.3}", per_flow(d)));
    let wal = cpu.wal_bytes.map_or("-".to_owned(), |bytes| format!("{:.0}", bytes as f64 / flows.max(1) as f64));
    println!(
        "{store:<9} {path:<22} {:>10.3} {database:>11} {:>9.3} {wal:>10}  ({load_label})",
        per_flow(cpu.gateway),
        per_flow(cpu.load)
    );
}

fn main() {
    // The load's runtime; the gateway's has its own threads (`start_gateway`).
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(LOAD_THREADS)
        .enable_all()
        .build()
        .expect("the load's runtime")
        .block_on(run(Args::parse()));
}

async fn run(args: Args) {
    handset_server::install_crypto_provider();
    // The gateway logs as `handset serve` does by default, into a sink.
    let shipped = Settings::load_with(None, Some(Vec::new())).expect("the shipped settings");
    handset_server::telemetry::init_logging_to(shipped.log.format, &shipped.log.level, std::io::sink);
    println!(
        "start+confirm flows: {} per run, {} in flight; the ceiling is the minimal SQL of a flow run bare",
        args.flows, args.concurrency
    );
    println!(
        "{:<9} {:<22} {:>7} {:>6} {:>10} {:>9} {:>9}",
        "store", "path", "flows", "failed", "flows/s", "p50 ms", "p99 ms"
    );
    for name in &args.stores {
        let kind = match name.as_str() {
            "sqlite" => Kind::Sqlite,
            "postgres" => Kind::Postgres,
            other => panic!("unknown store {other:?}: sqlite or postgres"),
        };
        let flow_on = |addr: SocketAddr| {
            let (lanes, start) = (Lanes::new(addr), sandbox_start());
            move || lanes.clone().flow(start.clone())
        };
        // One database per path, kept for the whole run, so no path measures another's rows.
        let (shipped_db, compared_db) = (TestDatabase::new(kind).await, TestDatabase::new(kind).await);
        let postmaster = match kind {
            Kind::Postgres => postmaster_of(&shipped_db.url).await,
            Kind::Sqlite => None,
        };
        let postgres_url = (kind == Kind::Postgres).then(|| shipped_db.url.clone());
        let probe = |gateway_threads: String| CpuProbe {
            gateway_threads,
            sqlite: kind == Kind::Sqlite,
            postmaster,
            postgres_url: postgres_url.clone(),
        };
        let (addr, threads) = start_gateway(&shipped_db, None).await;
        let (shipped, shipped_probe) = (flow_on(addr), probe(threads));
        // Postgres caches partners by default: show what the cache is worth.
        let other = match kind {
            Kind::Postgres => {
                let (addr, threads) = start_gateway(&compared_db, Some(&args.partner_cache_ttl)).await;
                Some((flow_on(addr), probe(threads)))
            }
            Kind::Sqlite => None,
        };
        // The ceiling runs on the load's threads: no gateway's count.
        let ceiling_probe =
            CpuProbe { gateway_threads: String::new(), sqlite: false, postmaster, postgres_url: postgres_url.clone() };
        let ceiling_db = TestDatabase::new(kind).await;
        let bare = Ceiling::new(&ceiling_db, &args).await;
        let rounds = args.rounds.max(1);
        let per_round = args.flows.div_ceil(rounds);
        let (mut gateway, mut compared, mut ceiling) =
            (Run::empty(), other.as_ref().map(|_| Run::empty()), Run::empty());
        let (mut ratios, mut compared_ratios) = (Vec::new(), Vec::new());
        let (mut gateway_cpu, mut compared_cpu, mut ceiling_cpu) = (Cpu::default(), Cpu::default(), Cpu::default());
        for _ in 0..rounds {
            let round =
                counting(&mut gateway_cpu, &shipped_probe, measure(per_round, args.concurrency, shipped.clone())).await;
            let compared_round = match &other {
                Some((other, probe)) => {
                    Some(counting(&mut compared_cpu, probe, measure(per_round, args.concurrency, other.clone())).await)
                }
                None => None,
            };
            let ceiling_round = counting(&mut ceiling_cpu, &ceiling_probe, bare.run(per_round, args.concurrency)).await;
            ratios.push(round.per_second() / ceiling_round.per_second());
            gateway.absorb(round);
            if let (Some(run), Some(total)) = (compared_round, compared.as_mut()) {
                compared_ratios.push(run.per_second() / ceiling_round.per_second());
                total.absorb(run);
            }
            ceiling.absorb(ceiling_round);
        }
        let half = gateway.per_second() / 2.0;
        settle_disk(&shipped_db).await;
        let paced = measure_paced(args.flows, half, shipped).await;
        let ceiling_half = ceiling.per_second() / 2.0;
        settle_disk(&ceiling_db).await;
        let ceiling_paced = bare.run_paced(args.flows, ceiling_half).await;
        row(name, "handset", &gateway);
        if let Some(compared) = &compared {
            row(name, &format!("handset, cache {}", args.partner_cache_ttl), compared);
        }
        row(name, "minimal SQL (ceiling)", &ceiling);
        row(name, &format!("handset at {half:.0}/s"), &paced);
        row(name, &format!("minimal SQL at {ceiling_half:.0}/s"), &ceiling_paced);
        match compared {
            Some(_) => println!(
                "{name:<9} handset reaches {} of the ceiling ({} with cache {})",
                spread(&mut ratios),
                spread(&mut compared_ratios),
                args.partner_cache_ttl
            ),
            None => println!("{name:<9} handset reaches {} of the ceiling", spread(&mut ratios)),
        }
        println!(
            "{:<9} {:<22} {:>10} {:>11} {:>9} {:>10}",
            "", "CPU ms per flow", "gateway", "database", "load", "WAL bytes"
        );
        cpu_row(name, "handset", &gateway_cpu, gateway.latencies.len(), "the HTTP load generator");
        if let Some(compared) = &compared {
            cpu_row(
                name,
                &format!("handset, cache {}", args.partner_cache_ttl),
                &compared_cpu,
                compared.latencies.len(),
                "the HTTP load generator",
            );
        }
        cpu_row(name, "minimal SQL (ceiling)", &ceiling_cpu, ceiling.latencies.len(), "its SQL driver");
        // What the ratio would be on these cores if the load came from elsewhere,
        // as a partner's does: the gateway's and its database's CPU per flow
        // against the ceiling's (its SQL driver included: that is its client).
        let per_flow = |d: Duration, flows: usize| d.as_secs_f64() * 1000.0 / flows.max(1) as f64;
        let served = per_flow(gateway_cpu.gateway + gateway_cpu.database.unwrap_or_default(), gateway.latencies.len());
        let bare_work = per_flow(ceiling_cpu.load + ceiling_cpu.database.unwrap_or_default(), ceiling.latencies.len());
        let ratio = if served > 0.0 { format!("{:.2}x", bare_work / served) } else { "unknown".to_owned() };
        println!(
            "{name:<9} by CPU per flow, load generator left out: handset {served:.3} ms, ceiling {bare_work:.3} ms: {ratio}"
        );
        if kind == Kind::Postgres && args.stats_rows > 0 {
            funnel_run(args.stats_rows).await;
        }
        if args.in_flight > 0 {
            let (run, peak) = in_flight_run(kind, &args).await;
            row(name, &format!("{} at once, ID.me {}ms", args.in_flight, args.provider_latency_ms), &run);
            let peak = peak.map_or("unknown".to_owned(), |mib| format!("{mib:.0} MiB"));
            println!("{name:<9} handset serve peak RSS {peak}; {} of {} flows failed", run.failures, args.in_flight);
        }
    }
}
