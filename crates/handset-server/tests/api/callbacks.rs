//! Callback delivery over real HTTP to a receiver on loopback: signing,
//! retries, failure, redirects, timeouts, forgery guards, the retry endpoint,
//! expiry and retention, on SQLite and Postgres.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use handset_server::dns::{HostLookup, Lookup};

use crate::helpers::TestApp;
use crate::receiver::{Receiver, Reply};
use handset_testkit::Kind;

const WAIT: Duration = Duration::from_secs(10);

/// The development partner's secret (config-independent: seeded by the app).
pub(crate) const DEV_WEBHOOK_SECRET: &str = "whsec_ZGV2ZWxvcG1lbnQtb25seS13ZWJob29rLXNlY3JldA==";

async fn app(kind: Kind, extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![
        ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"),
        ("HANDSET__CALLBACKS__RETRY_SCHEDULE", "100ms,100ms"),
        ("HANDSET__CALLBACKS__TIMEOUT", "2s"),
        ("HANDSET__WORKERS__POLL_INTERVAL", "25ms"),
    ];
    env.extend_from_slice(extra);
    TestApp::spawn_with(kind, &env).await
}

/// An identity check, final at once (sandbox), that owes a callback; its id.
async fn identity_with_callback(app: &TestApp, phone: &str, callback_url: &str) -> String {
    app.post("/v1/identity", json!({"phone": phone, "birth_date": "1968-05-27", "callback_url": callback_url}))
        .await
        .id()
}

async fn callbacks_of(app: &TestApp, id: &str) -> Vec<Value> {
    app.get(&format!("/v1/transactions/{id}/callbacks")).await.body["callbacks"].as_array().cloned().unwrap_or_default()
}

/// Waits until the transaction's first callback reaches `state`.
async fn wait_state(app: &TestApp, id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let callbacks = callbacks_of(app, id).await;
        if callbacks.first().is_some_and(|c| c["state"] == state) {
            return callbacks[0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "callback never {state}: {callbacks:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Verifies a Standard Webhooks signature with plain HMAC, independently of handset's code.
pub(crate) fn signature_is_valid(secret: &str, id: &str, timestamp: &str, body: &str, header: &str) -> bool {
    let key = STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    header.split(' ').any(|candidate| candidate == expected)
}

async fn signed_callback_is_the_transaction(kind: Kind) {
    let receiver = Receiver::start().await;
    let app = app(kind, &[]).await;
    let started =
        app.post("/v1/possession", json!({"phone": "4155550123", "callback_url": receiver.url("/hook")})).await;
    let id = started.id();
    assert!(receiver.received().is_empty(), "nothing is sent while pending");
    app.confirm(&id, "123123").await;
    let got = receiver.wait_for(1, WAIT).await;
    let callback = &got[0];
    assert_eq!(callback.path, "/hook");
    assert_eq!(callback.body, app.transaction(&id).await.text, "the body is exactly what GET answers");
    assert_eq!(callback.header("content-type"), "application/json");
    let webhook_id = callback.header("webhook-id");
    assert!(webhook_id.starts_with("msg_"), "{webhook_id}");
    let timestamp = callback.header("webhook-timestamp");
    let sent_at: i64 = timestamp.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - sent_at).abs() < 60);
    let signature = callback.header("webhook-signature");
    assert!(signature_is_valid(DEV_WEBHOOK_SECRET, &webhook_id, &timestamp, &callback.body, &signature), "{signature}");
    assert!(!signature_is_valid("whsec_b3RoZXI=", &webhook_id, &timestamp, &callback.body, &signature));

    let record = wait_state(&app, &id, "delivered").await;
    assert_eq!(record["webhook_id"], webhook_id.as_str());
    assert_eq!(record["url"], receiver.url("/hook"));
    assert_eq!(record["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(record["attempts"][0]["status_code"], 200);
    assert!(record["attempts"][0]["latency_ms"].is_number());
    assert_eq!(record["next_attempt_at"], Value::Null);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.received().len(), 1, "delivered once");
}

async fn failures_are_retried_then_given_up(kind: Kind) {
    let receiver = Receiver::start().await;
    receiver.script([Reply::Status(500), Reply::Status(503)]);
    let app = app(kind, &[]).await;
    let id = identity_with_callback(&app, "8885551234", &receiver.url("/a")).await;
    let got = receiver.wait_for(3, WAIT).await;
    let ids: Vec<String> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "the same webhook-id on every attempt: {ids:?}");
    let record = wait_state(&app, &id, "delivered").await;
    let codes: Vec<Value> = record["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].clone()).collect();
    assert_eq!(codes, vec![json!(500), json!(503), json!(200)]);

    // Always failing: one attempt plus one per retry of the schedule, then failed.
    let failing = Receiver::start().await;
    failing.default_reply(Reply::Status(500));
    let id = identity_with_callback(&app, "8885551235", &failing.url("/b")).await;
    let record = wait_state(&app, &id, "failed").await;
    assert_eq!(record["attempts"].as_array().unwrap().len(), 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failing.received().len(), 3, "nothing after the schedule is used up");
}

async fn redirects_and_slow_answers_are_failures(kind: Kind) {
    let receiver = Receiver::start().await;
    receiver.script([Reply::Redirect("/elsewhere"), Reply::Slow(Duration::from_secs(3), 200)]);
    let app = app(kind, &[("HANDSET__CALLBACKS__TIMEOUT", "300ms")]).await;
    let id = identity_with_callback(&app, "8885551234", &receiver.url("/hook")).await;
    let record = wait_state(&app, &id, "delivered").await;
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{record}");
    assert_eq!(attempts[0]["status_code"], 302);
    assert_eq!(attempts[1]["status_code"], Value::Null);
    assert!(attempts[1]["error"].as_str().unwrap().contains("timeout"), "{record}");
    assert!(!receiver.received().iter().any(|r| r.path == "/elsewhere"), "redirects are not followed");
}

async fn retry_endpoint_queues_the_current_state(kind: Kind) {
    let receiver = Receiver::start().await;
    let app = app(kind, &[]).await;
    let id = identity_with_callback(&app, "8885551234", &receiver.url("/hook")).await;
    receiver.wait_for(1, WAIT).await;
    let queued = app.post(&format!("/v1/transactions/{id}/callbacks/retry"), json!({})).await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    assert_eq!(queued.body["state"], "pending");
    let got = receiver.wait_for(2, WAIT).await;
    assert_ne!(got[0].header("webhook-id"), got[1].header("webhook-id"), "a new delivery has a new id");
    assert_eq!(got[1].header("webhook-id"), queued.body["webhook_id"].as_str().unwrap());
    assert_eq!(got[1].body, app.transaction(&id).await.text);
    assert_eq!(callbacks_of(&app, &id).await.len(), 2);

    let silent = app.post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27"})).await.id();
    app.post(&format!("/v1/transactions/{silent}/callbacks/retry"), json!({})).await.assert_error(422, 3100);
    let (_, other) = app.partner(handset_core::Product::ALL).await;
    app.post_as(&other, &format!("/v1/transactions/{id}/callbacks/retry"), json!({})).await.assert_error(403, 3200);
    app.get_as(&other, &format!("/v1/transactions/{id}/callbacks")).await.assert_error(403, 3200);
    app.get("/v1/transactions/00000000-0000-0000-0000-000000000000/callbacks").await.assert_error(404, 4100);
}

/// At most 10 deliveries of one transaction wait at a time; the 11th retry
/// request is 429 with `Retry-After` and queues nothing.
async fn retries_are_capped_per_transaction(kind: Kind) {
    // No job runner: queued deliveries stay pending.
    let app = app(kind, &[("HANDSET__WORKERS__ENABLED", "false")]).await;
    let id = identity_with_callback(&app, "8885551234", "http://127.0.0.1:9/hook").await;
    let retry = format!("/v1/transactions/{id}/callbacks/retry");
    for _ in 1..10 {
        assert_eq!(app.post(&retry, json!({})).await.status, 202);
    }
    let refused = app.post(&retry, json!({})).await;
    refused.assert_error(429, 5200);
    assert!(refused.headers.contains_key("retry-after"), "{:?}", refused.headers);
    assert_eq!(callbacks_of(&app, &id).await.len(), 10);
    assert_eq!(app.count("outbox").await, 10);
}

/// A URL that passed the check when the request came (e.g. a name that has
/// since been re-pointed) is checked again when the callback is sent.
async fn internal_addresses_are_refused_at_delivery(kind: Kind) {
    let receiver = Receiver::start().await;
    let app = app(kind, &[("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "false")]).await;
    let started = app.post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27"})).await;
    let tx = app.store.transaction(started.id().parse().unwrap()).await.unwrap().unwrap();
    let port = receiver.base.rsplit(':').next().unwrap().to_owned();
    for url in [format!("http://127.0.0.1:{port}/hook"), format!("http://localhost:{port}/hook")] {
        let message = handset_core::model::OutboxMessage::of(&tx, url, chrono::Utc::now());
        assert!(app.store.insert_outbox_capped(&message, 10).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let callbacks = callbacks_of(&app, &started.id()).await;
        if callbacks.len() == 2 && callbacks.iter().all(|c| c["state"] == "failed") {
            for callback in &callbacks {
                let error = callback["attempts"][0]["error"].as_str().unwrap();
                assert!(error.contains("internal"), "{callback}");
            }
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{callbacks:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(receiver.received().is_empty(), "nothing reached the internal address");
}

/// Answers for `rebind.example` only: `first` once (the check when the
/// request came), then `later` (every delivery), as a name re-pointed by its
/// owner would.
struct Rebinding {
    first: IpAddr,
    later: IpAddr,
    calls: AtomicUsize,
}

impl Rebinding {
    fn new(first: [u8; 4], later: [u8; 4]) -> Arc<Rebinding> {
        Arc::new(Rebinding { first: first.into(), later: later.into(), calls: AtomicUsize::new(0) })
    }
}

impl HostLookup for Rebinding {
    fn lookup(&self, host: &str) -> Lookup {
        let answer = if host != "rebind.example" {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: unknown to the test")))
        } else if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Ok(vec![self.first])
        } else {
            Ok(vec![self.later])
        };
        Box::pin(async move { answer })
    }
}

/// DNS rebinding: a callback host that resolved to a public address when the
/// partner gave it and resolves to 127.0.0.1 when the callback is sent is
/// refused at delivery, every attempt saying why, and nothing arrives.
async fn a_host_rebound_to_loopback_is_refused_at_delivery(kind: Kind) {
    let receiver = Receiver::start().await;
    let port = receiver.base.rsplit(':').next().unwrap().to_owned();
    let lookup = Rebinding::new([93, 184, 215, 14], [127, 0, 0, 1]);
    let env = [
        ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "false"),
        ("HANDSET__CALLBACKS__RETRY_SCHEDULE", "100ms,100ms"),
        ("HANDSET__WORKERS__POLL_INTERVAL", "25ms"),
    ];
    let app = TestApp::spawn_with_lookup(kind, &env, lookup.clone()).await;
    let hook = format!("http://rebind.example:{port}/hook");
    let id = identity_with_callback(&app, "8885551234", &hook).await;
    let record = wait_state(&app, &id, "failed").await;
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{record}");
    for attempt in attempts {
        let error = attempt["error"].as_str().unwrap_or_default();
        assert!(error.contains("rebind.example resolves only to internal addresses"), "{record}");
    }
    assert!(lookup.calls.load(Ordering::SeqCst) >= 4, "the request and each delivery asked the resolver");
    assert!(receiver.received().is_empty(), "nothing reached the loopback address");
}

/// The other half: the delivery connects to the address the guard resolved
/// (here, allowed because private networks are), not to one of its own lookup.
async fn deliveries_connect_where_the_guard_resolved(kind: Kind) {
    let receiver = Receiver::start().await;
    let port = receiver.base.rsplit(':').next().unwrap().to_owned();
    let app = TestApp::spawn_with_lookup(
        kind,
        &[("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"), ("HANDSET__WORKERS__POLL_INTERVAL", "25ms")],
        Rebinding::new([127, 0, 0, 1], [127, 0, 0, 1]),
    )
    .await;
    let id = identity_with_callback(&app, "8885551234", &format!("http://rebind.example:{port}/hook")).await;
    let got = receiver.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["transaction_id"], id.as_str());
    assert_eq!(got[0].header("host"), format!("rebind.example:{port}"));
}

async fn expired_checks_fire_their_callback(kind: Kind) {
    let receiver = Receiver::start().await;
    let app = app(kind, &[("HANDSET__POSSESSION__CODE_TTL", "200ms")]).await;
    let id =
        app.post("/v1/possession", json!({"phone": "4155550123", "callback_url": receiver.url("/hook")})).await.id();
    let got = receiver.wait_for(1, WAIT).await;
    let body = got[0].json();
    assert_eq!(body["transaction_id"], id.as_str());
    assert_eq!(body["status"]["code"], 300);
    assert_eq!(body["result"]["errors"][0]["code"], 3103);
    assert_eq!(app.transaction(&id).await.body["status"]["code"], 300);
}

async fn retention_purges_personal_data(kind: Kind) {
    let receiver = Receiver::start().await;
    let app = app(kind, &[("HANDSET__RETENTION__PERSONAL_DATA", "1ms")]).await;
    let id = app
        .post(
            "/v1/identity",
            json!({"phone": "8885551234", "birth_date": "1968-05-27", "metadata": {"user": "u-1"}, "callback_url": receiver.url("/hook")}),
        )
        .await
        .id();
    let deadline = tokio::time::Instant::now() + WAIT;
    let tx = loop {
        let tx = app.transaction(&id).await.body;
        if tx["phone"].is_null() {
            break tx;
        }
        assert!(tokio::time::Instant::now() < deadline, "never purged: {tx}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(tx["metadata"], json!({}));
    assert_eq!(tx["result"], json!({"purged": true}));
    assert_eq!(tx["status"]["code"], 200, "the outcome is kept");
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(row.birth_date, None);
}

async fn delivery_metrics(kind: Kind) {
    let receiver = Receiver::start().await;
    receiver.script([Reply::Status(500)]);
    let app = app(kind, &[]).await;
    let id = identity_with_callback(&app, "8885551234", &receiver.url("/hook")).await;
    wait_state(&app, &id, "delivered").await;
    let text = app.send(app.client.get(app.url("/metrics"))).await.text;
    assert!(text.contains(r#"handset_callback_deliveries_total{outcome="delivered"}"#), "{text}");
    assert!(text.contains(r#"handset_callback_deliveries_total{outcome="retry"}"#), "{text}");
    assert!(text.contains("handset_callback_delivery_duration_seconds_bucket"), "{text}");
    assert!(text.contains("handset_callback_queue_due"), "{text}");
}

crate::on_both_kinds!(
    signed_callback_is_the_transaction,
    failures_are_retried_then_given_up,
    redirects_and_slow_answers_are_failures,
    retry_endpoint_queues_the_current_state,
    retries_are_capped_per_transaction,
    internal_addresses_are_refused_at_delivery,
    a_host_rebound_to_loopback_is_refused_at_delivery,
    deliveries_connect_where_the_guard_resolved,
    expired_checks_fire_their_callback,
    retention_purges_personal_data,
    delivery_metrics,
);
