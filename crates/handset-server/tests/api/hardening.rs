//! Clients that cannot hold the server: slow headers and bodies are dropped
//! at their deadlines while others are served, connections are capped, a
//! request past `server.request_timeout` is answered yet still recorded,
//! and made-up methods and paths cannot grow `/metrics`.

use std::time::Duration;

use handset_sim::faults::Faults;
use handset_sim::{Sim, SimConfig};
use handset_testkit::{Kind, TestDatabase};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{DEV_KEY, TestApp, http_client};
use crate::processes::Server;

fn host_port(app: &TestApp) -> String {
    app.address.trim_start_matches("http://").to_owned()
}

/// Sends `header` one byte a second; returns how many bytes went out before
/// the server closed the connection (or answered), or `None` if it never did.
async fn trickle(addr: String, header: &'static [u8]) -> Option<usize> {
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 512];
    for (sent, byte) in header.iter().enumerate() {
        if stream.write_all(&[*byte]).await.is_err() {
            return Some(sent);
        }
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
            Err(_) => {}                    // still waiting for the rest: send the next byte
            Ok(_) => return Some(sent + 1), // closed, reset, or answered (408)
        }
    }
    None
}

const SLOW_HEADER: &[u8] = b"GET /health HTTP/1.1\r\nHost: handset\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_dropped_while_others_are_served() {
    let app = TestApp::spawn_with(Kind::Sqlite, &[("HANDSET__SERVER__HEADER_READ_TIMEOUT", "2s")]).await;
    let slow: Vec<_> = (0..4).map(|_| tokio::spawn(trickle(host_port(&app), SLOW_HEADER))).collect();
    for _ in 0..10 {
        let answer = app.send(app.client.get(app.url("/health"))).await;
        assert_eq!(answer.status, 200, "others are served while slow clients trickle");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for client in slow {
        let sent = client.await.unwrap().expect("the server dropped the slow client");
        assert!(sent < SLOW_HEADER.len(), "dropped before its header was complete ({sent} bytes)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_408() {
    let app = TestApp::spawn_with(Kind::Sqlite, &[("HANDSET__SERVER__BODY_READ_TIMEOUT", "1s")]).await;
    let mut stream = TcpStream::connect(host_port(&app)).await.unwrap();
    let head = format!(
        "POST /v1/possession HTTP/1.1\r\nHost: handset\r\nAuthorization: Bearer {DEV_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"phone\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "the server answered the stalled body");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("3909"), "{answer}");
    assert_eq!(app.count("transactions").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait() {
    let app = TestApp::spawn_with(
        Kind::Sqlite,
        &[("HANDSET__SERVER__MAX_CONNECTIONS", "1"), ("HANDSET__SERVER__HEADER_READ_TIMEOUT", "1m")],
    )
    .await;
    let idle = TcpStream::connect(host_port(&app)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    assert!(client.get(app.url("/health")).send().await.is_err(), "a second connection is not served yet");
    drop(idle);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    assert_eq!(client.get(app.url("/health")).send().await.unwrap().status(), 200);
}

/// A start still waiting for its provider at `server.request_timeout` gets
/// 500 5000, and the transaction is recorded when the provider answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_answered_and_still_recorded() {
    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    sim.set_faults(Faults { latency_ms: 1500, ..Faults::default() });
    let base = sim.base_url();
    let app = TestApp::spawn_with(
        Kind::Sqlite,
        &[
            ("HANDSET__PROVIDERS__IDME__BASE_URL", base.as_str()),
            ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
            ("HANDSET__PROVIDERS__IDME__TIMEOUT", "5s"),
            ("HANDSET__SERVER__REQUEST_TIMEOUT", "300ms"),
        ],
    )
    .await;
    let start = || {
        app.client
            .post(app.url("/v1/possession"))
            .bearer_auth(DEV_KEY)
            .header("idempotency-key", "slow-start")
            .json(&json!({"phone": "4155550123", "provider": "idme"}))
    };
    let late = app.send(start()).await;
    late.assert_error(500, 5000);
    assert!(late.text.contains("Idempotency-Key"), "the answer says how to get the result: {}", late.text);
    // Retrying as it says: 409 while the work goes on, then its answer.
    for _ in 0..100 {
        let retried = app.send(start()).await;
        match retried.status.as_u16() {
            409 => tokio::time::sleep(Duration::from_millis(100)).await,
            201 => {
                assert_eq!(retried.headers.get("idempotent-replayed").unwrap(), "true");
                assert_eq!(retried.body["provider"], "idme");
                assert_eq!(app.count("transactions").await, 1, "recorded once");
                return;
            }
            _ => panic!("unexpected answer to the retry: {}", retried.text),
        }
    }
    panic!("the start whose answer timed out was never recorded");
}

/// Each made-up method and path is one `other` method and one `unmatched`
/// route in `/metrics`, not a new series. A process of its own, so no other
/// test's requests move its counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_and_paths_do_not_grow_metrics() {
    let db = TestDatabase::sqlite();
    let server = Server::start(&db, &[]).await;
    let base = server.base.clone();
    let client = http_client();
    let series = |text: &str| text.lines().filter(|l| l.starts_with("http_request")).count();
    // Every label set the loop below can produce exists once before counting.
    let warm = reqwest::Method::from_bytes(b"WARM").unwrap();
    for i in 0..3 {
        client.get(format!("{base}/warmup-{i}")).send().await.unwrap();
        client.request(warm.clone(), format!("{base}/warmup-{i}")).send().await.unwrap();
        client.get(format!("{base}/metrics")).send().await.unwrap();
    }
    let before = series(&client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap());
    for i in 0..1000 {
        let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        client.request(method, format!("{base}/made-up/{i}")).send().await.unwrap();
    }
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let after = series(&text);
    assert!(after <= before + 5, "{before} -> {after} series:\n{text}");
    assert!(text.contains(r#"method="other""#) && text.contains(r#"route="unmatched""#), "{text}");
    assert!(!text.contains("M999X") && !text.contains("made-up"), "{text}");
}

/// SIGTERM with a request stuck on a provider that never answers: the
/// process stops taking work and exits once `server.shutdown_timeout` ends,
/// not when the provider's own (much longer) timeout would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_its_timeout() {
    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    sim.set_faults(Faults { hang: true, ..Faults::default() });
    let db = TestDatabase::sqlite();
    let sim_url = sim.base_url();
    let mut server = Server::start(
        &db,
        &[
            ("HANDSET__PROVIDERS__IDME__BASE_URL", sim_url.as_str()),
            ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
            ("HANDSET__PROVIDERS__IDME__TIMEOUT", "2m"),
            ("HANDSET__SERVER__REQUEST_TIMEOUT", "5m"),
            ("HANDSET__SERVER__SHUTDOWN_TIMEOUT", "1s"),
        ],
    )
    .await;
    let base = server.base.clone();
    let stuck = tokio::spawn(async move {
        http_client()
            .post(format!("{base}/v1/possession"))
            .bearer_auth(DEV_KEY)
            .json(&json!({"phone": "4155550123", "provider": "idme"}))
            .send()
            .await
    });
    // ID.me's start-up health probe (hanging too) and the send.
    while sim.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal("-TERM");
    let mut exited = None;
    // One deadline for everything (1 s), plus time to exit.
    for _ in 0..80 {
        exited = server.child.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if exited.is_none() {
        panic!("handset was still running 4 s after SIGTERM with shutdown_timeout = 1s");
    }
    assert!(stuck.await.unwrap().is_err(), "the stuck request's connection was closed");
}
