//! The real `handset` binary as separate processes on one database: crashes
//! (`kill -9`), graceful stops (SIGTERM) and two replicas sharing the work.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use handset_core::store::Store;
use handset_testkit::{Kind, TestDatabase};
use serde_json::{Value, json};

use crate::helpers::DEV_KEY;
use crate::receiver::{Receiver, Reply};

/// `handset serve` as a process of its own, on `db`, logging to a file.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    client: reqwest::Client,
    pub(crate) log: std::path::PathBuf,
}

impl Server {
    pub(crate) async fn start(db: &TestDatabase, extra: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::env::temp_dir().join(format!("handset-proc-{}.log", uuid::Uuid::new_v4().simple()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_handset"));
        command
            .arg("serve")
            .env("HANDSET__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("HANDSET__DATABASE__URL", &db.url)
            .env("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true")
            .env("HANDSET__CALLBACKS__TIMEOUT", "500ms")
            .env("HANDSET__WORKERS__POLL_INTERVAL", "25ms")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, value) in extra {
            command.env(key, value);
        }
        let base = format!("http://127.0.0.1:{port}");
        let server = Server { child: command.spawn().unwrap(), base, client: crate::helpers::http_client(), log };
        if crate::helpers::wait_healthy(&server.base).await {
            return server;
        }
        panic!("handset did not start: {}", std::fs::read_to_string(&server.log).unwrap_or_default());
    }

    /// A POST to this process as the development partner; the answer's JSON.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> Value {
        let request = self.client.post(format!("{}{path}", self.base)).json(body);
        request.bearer_auth(DEV_KEY).send().await.unwrap().json().await.unwrap_or(Value::Null)
    }

    /// A GET of this process as the development partner; the answer's JSON.
    pub(crate) async fn get(&self, path: &str) -> Value {
        let request = self.client.get(format!("{}{path}", self.base));
        request.bearer_auth(DEV_KEY).send().await.unwrap().json().await.unwrap_or(Value::Null)
    }

    pub(crate) fn signal(&self, signal: &str) {
        assert!(Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap().success());
    }

    async fn wait(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            let _ = std::fs::remove_file(&self.log);
            status
        })
        .await
        .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Starts `count` identity checks that are final at once, each owing a callback.
async fn final_transactions(servers: &[&Server], count: usize, callback_url: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        let server = servers[i % servers.len()];
        let body =
            json!({"phone": format!("888555{:04}", i), "birth_date": "1968-05-27", "callback_url": callback_url});
        let answer = server.post("/v1/identity", &body).await;
        ids.push(answer["transaction_id"].as_str().unwrap_or_else(|| panic!("{answer}")).to_owned());
    }
    ids
}

async fn all_delivered(store: &dyn Store, ids: &[String]) -> bool {
    for id in ids {
        let records = store.callbacks_of_transaction(id.parse().unwrap()).await.unwrap();
        if records.iter().any(|r| r.state != handset_core::model::CallbackState::Delivered) {
            return false;
        }
    }
    true
}

async fn wait_until_delivered(store: &dyn Store, ids: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !all_delivered(store, ids).await {
        assert!(tokio::time::Instant::now() < deadline, "callbacks still undelivered after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn crash_loses_no_callback(kind: Kind) {
    let db = TestDatabase::new(kind).await;
    let receiver = Receiver::start().await;
    receiver.default_reply(Reply::Status(500));
    let schedule =
        [("HANDSET__CALLBACKS__RETRY_SCHEDULE", "100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms")];
    let first = Server::start(&db, &schedule).await;
    let ids = final_transactions(&[&first], 20, &receiver.url("/hook")).await;
    receiver.wait_for(25, Duration::from_secs(15)).await; // deliveries due and failing
    first.signal("-KILL");
    first.wait().await;

    receiver.default_reply(Reply::Status(200));
    let second = Server::start(&db, &schedule).await;
    let store = handset_store::connect(&db.url, &Default::default()).unwrap();
    wait_until_delivered(store.as_ref(), &ids).await;
    let delivered: std::collections::HashSet<String> =
        receiver.received().iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(delivered.len(), 20, "every callback reached the partner");
    drop(second);
}

/// Callbacks queued while no worker runs are delivered once each by two
/// replicas started afterwards, and both replicas take part (each one's own
/// delivery counter is above zero; together they count every callback).
async fn replicas_share_the_work_once(kind: Kind) {
    const CALLBACKS: usize = 100;
    let db = TestDatabase::new(kind).await;
    let receiver = Receiver::start().await;
    // Slow answers keep the queue long enough for the second replica to join.
    receiver.default_reply(Reply::Slow(Duration::from_millis(150), 200));
    let filler = Server::start(&db, &[("HANDSET__WORKERS__ENABLED", "false")]).await;
    let ids = final_transactions(&[&filler], CALLBACKS, &receiver.url("/hook")).await;
    drop(filler);
    assert!(receiver.received().is_empty(), "nothing delivered before the replicas start");

    // Small batches, and a timeout far above the receiver's delay (an attempt
    // that timed out after reaching it would be delivered twice).
    let replica = [("HANDSET__WORKERS__BATCH_SIZE", "4"), ("HANDSET__CALLBACKS__TIMEOUT", "5s")];
    let (a, b) = tokio::join!(Server::start(&db, &replica), Server::start(&db, &replica));
    let store = handset_store::connect(&db.url, &Default::default()).unwrap();
    wait_until_delivered(store.as_ref(), &ids).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = receiver.received();
    let mut webhook_ids: Vec<String> = received.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(webhook_ids.len(), CALLBACKS, "one delivery per callback");
    webhook_ids.sort();
    webhook_ids.dedup();
    assert_eq!(webhook_ids.len(), CALLBACKS, "every webhook-id, none twice");
    let (by_a, by_b) = (delivered_by(&a).await, delivered_by(&b).await);
    assert!(by_a > 0 && by_b > 0, "both replicas delivered: {by_a} and {by_b}");
    assert_eq!(by_a + by_b, CALLBACKS as u64, "each delivery counted by the replica that made it");
}

/// `handset_callback_deliveries_total{outcome="delivered"}` of one process.
async fn delivered_by(server: &Server) -> u64 {
    let text = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(r#"handset_callback_deliveries_total{outcome="delivered"} "#))
        .map_or(0, |n| n.trim().parse().unwrap())
}

async fn sigterm_finishes_deliveries_in_flight(kind: Kind) {
    let db = TestDatabase::new(kind).await;
    let receiver = Receiver::start().await;
    receiver.script([Reply::Slow(Duration::from_millis(1500), 200)]);
    let server = Server::start(&db, &[("HANDSET__CALLBACKS__TIMEOUT", "5s")]).await;
    let ids = final_transactions(&[&server], 1, &receiver.url("/hook")).await;
    receiver.wait_for(1, Duration::from_secs(10)).await; // the slow delivery is in flight
    server.signal("-TERM");
    let status = server.wait().await;
    assert!(status.success(), "clean exit: {status:?}");
    let store = handset_store::connect(&db.url, &Default::default()).unwrap();
    assert!(all_delivered(store.as_ref(), &ids).await, "the delivery in flight was finished and recorded");
}

crate::on_both_kinds!(crash_loses_no_callback, replicas_share_the_work_once, sigterm_finishes_deliveries_in_flight);

/// After SIGTERM, with `server.drain_delay`, the process still answers while
/// `/ready` says 503 (so an orchestrator takes it out of rotation), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_ready_503() {
    let db = TestDatabase::new(Kind::Sqlite).await;
    let server = Server::start(&db, &[("HANDSET__SERVER__DRAIN_DELAY", "3s")]).await;
    let client = crate::helpers::http_client();
    let status = |path: &'static str| {
        let request = client.get(format!("{}{path}", server.base));
        async move { request.send().await.map(|r| r.status().as_u16()).ok() }
    };
    assert_eq!(status("/ready").await, Some(200));
    server.signal("-TERM");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while status("/ready").await != Some(503) {
        assert!(tokio::time::Instant::now() < deadline, "/ready never said 503 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status("/health").await, Some(200), "still alive while draining");
    let started = server.post("/v1/possession", &serde_json::json!({"phone": "4155550123"})).await;
    assert_eq!(started["status"]["code"], 210, "still serving while draining: {started}");
    let exit = server.wait().await;
    assert!(exit.success(), "clean exit after the drain: {exit:?}");
}

/// Each export a collector got: its content type and body.
type Exports = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A stand-in OpenTelemetry collector: keeps every OTLP/HTTP export it gets.
struct Collector {
    base: String,
    exports: Exports,
}

impl Collector {
    async fn start() -> Collector {
        use axum::http::HeaderMap;
        let exports: Exports = Default::default();
        let kept = exports.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
                    kept.lock().unwrap().push((content_type.to_owned(), body.to_vec()));
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { base, exports }
    }

    fn exports(&self) -> Vec<(String, Vec<u8>)> {
        self.exports.lock().unwrap().clone()
    }
}

/// Every span of OTLP/JSON exports, with its attributes as plain strings.
fn spans(exports: &[(String, Vec<u8>)]) -> Vec<(Value, std::collections::HashMap<String, String>)> {
    let mut found = Vec::new();
    for (_, body) in exports {
        let export: Value = serde_json::from_slice(body).expect("OTLP/JSON");
        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    let attributes = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            let value = &a["value"];
                            let text = value["stringValue"].as_str().map(str::to_owned).unwrap_or_else(|| {
                                value
                                    .as_object()
                                    .and_then(|o| o.values().next())
                                    .map(|v| v.to_string())
                                    .unwrap_or_default()
                            });
                            (a["key"].as_str().unwrap().to_owned(), text)
                        })
                        .collect();
                    found.push((span.clone(), attributes));
                }
            }
        }
    }
    found
}

/// With `telemetry.otlp_endpoint`, each request is a span (request id, route,
/// partner id) and its provider call a child span (provider, product,
/// outcome); what is buffered is sent when the process stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp() {
    let collector = Collector::start().await;
    let db = TestDatabase::new(Kind::Sqlite).await;
    let server = Server::start(
        &db,
        &[
            ("HANDSET__TELEMETRY__OTLP_ENDPOINT", collector.base.as_str()),
            ("HANDSET__TELEMETRY__OTLP_PROTOCOL", "http/json"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let client = crate::helpers::http_client();
    let started = client
        .post(format!("{}/v1/possession", server.base))
        .bearer_auth(DEV_KEY)
        .header("x-request-id", "trace-me-1")
        .json(&serde_json::json!({"phone": "4155550123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 201);
    server.signal("-TERM");
    assert!(server.wait().await.success());

    let exports = collector.exports();
    assert!(exports.iter().all(|(content_type, _)| content_type.starts_with("application/json")), "{exports:?}");
    let spans = spans(&exports);
    let (request, attributes) = spans
        .iter()
        .find(|(span, a)| span["name"] == "request" && a.get("request_id").map(String::as_str) == Some("trace-me-1"))
        .unwrap_or_else(|| panic!("no request span in {spans:?}"));
    assert_eq!(attributes["route"], "/v1/possession");
    assert_eq!(attributes["partner_id"], handset_server::app::DEV_PARTNER_ID.to_string(), "{attributes:?}");
    let (call, call_attributes) = spans
        .iter()
        .find(|(span, _)| span["name"] == "provider_call" && span["traceId"] == request["traceId"])
        .unwrap_or_else(|| panic!("no provider call in the request's trace: {spans:?}"));
    assert_eq!(call["parentSpanId"], request["spanId"], "a child of the request");
    assert_eq!(call_attributes["provider"], "sandbox");
    assert_eq!(call_attributes["product"], "possession.sms");
    assert_eq!(call_attributes["outcome"], "answered");
    let body = String::from_utf8_lossy(&exports.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<_>>()).into_owned();
    assert!(!body.contains("4155550123") && !body.contains("hs_dev_sandbox_key"), "no phone or key in spans");
}

/// The default protocol is OTLP's protobuf over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_default_to_otlp_protobuf() {
    let collector = Collector::start().await;
    let db = TestDatabase::new(Kind::Sqlite).await;
    let server =
        Server::start(&db, &[("HANDSET__TELEMETRY__OTLP_ENDPOINT", collector.base.as_str()), ("RUST_LOG", "info")])
            .await;
    server.post("/v1/possession", &serde_json::json!({"phone": "4155550123"})).await;
    server.signal("-TERM");
    assert!(server.wait().await.success());
    let exports = collector.exports();
    assert!(!exports.is_empty(), "spans were sent");
    assert!(exports.iter().all(|(content_type, body)| content_type == "application/x-protobuf" && !body.is_empty()));
}
