//! Every rejection in the documented envelope, changing nothing; no input
//! makes the server panic or answer outside the envelope.

use handset_core::Product;
use serde_json::{Value, json};

use crate::helpers::{DEV_KEY, TestApp};
use crate::on_both_stores;

on_both_stores!(
    authorization_is_required_and_checked,
    inactive_partners_are_refused,
    bodies_must_be_small_json_objects,
    unknown_fields_are_named,
    hostile_input_never_breaks_the_envelope,
    unknown_routes_and_methods,
);

async fn authorization_is_required_and_checked(app: TestApp) {
    let body = json!({ "phone": "4155550123" });
    let no_header = app.send(app.client.post(app.url("/v1/possession")).json(&body)).await;
    no_header.assert_error(401, 1100);
    for header in
        ["Basic abc", "Bearer", "Bearer ", "bearer hs_dev_sandbox_key", "hs_dev_sandbox_key", "Bearer wrong-key"]
    {
        let answer =
            app.send(app.client.post(app.url("/v1/possession")).header("authorization", header).json(&body)).await;
        answer.assert_error(401, 1100);
    }
    let long = format!("Bearer {}", "k".repeat(10_000));
    app.send(app.client.get(app.url("/v1/transactions/x")).header("authorization", long)).await.assert_error(401, 1100);
    for path in ["/v1/transactions/abc", "/v1/verifications/abc"] {
        app.get_as("wrong", path).await.assert_error(401, 1100);
    }
    app.post_as("wrong", "/v1/identity", json!({})).await.assert_error(401, 1100);
    app.post_as("wrong", "/v1/possession/abc/confirm", json!({})).await.assert_error(401, 1100);
    assert_eq!(app.count("transactions").await, 0);
}

async fn inactive_partners_are_refused(app: TestApp) {
    let (id, key) = app.partner(Product::ALL).await;
    assert_eq!(app.post_as(&key, "/v1/possession", json!({ "phone": "4155550123" })).await.status, 201);
    app.store.set_partner_active(id, false).await.unwrap();
    let before = app.count("transactions").await;
    app.post_as(&key, "/v1/possession", json!({ "phone": "4155550123" })).await.assert_error(401, 1200);
    app.post_as(&key, "/v1/identity", json!({ "phone": "8885551234", "birth_date": "1968-05-27" }))
        .await
        .assert_error(401, 1200);
    assert_eq!(app.count("transactions").await, before);
}

async fn bodies_must_be_small_json_objects(app: TestApp) {
    let post = |body: &'static str, content_type: &'static str| {
        app.client.post(app.url("/v1/possession")).bearer_auth(DEV_KEY).header("content-type", content_type).body(body)
    };
    for bad in ["{", "{\"phone\": }", "[1,2]", "\"phone\"", "42", "null", "{\"phone\":\"4155550123\"} x"] {
        app.send(post(bad, "application/json")).await.assert_error(400, 3900);
    }
    app.send(post("{\"phone\":\"4155550123\"}", "text/plain")).await.assert_error(415, 3901);
    app.send(post("phone=4155550123", "application/x-www-form-urlencoded")).await.assert_error(415, 3901);
    app.send(app.client.post(app.url("/v1/possession")).bearer_auth(DEV_KEY).body("{\"phone\":\"4155550123\"}"))
        .await
        .assert_error(415, 3901);
    let ok = app.send(post("{\"phone\":\"4155550123\"}", "application/json; charset=utf-8")).await;
    assert_eq!(ok.status, 201, "{}", ok.text);

    let before = app.count("transactions").await;
    let huge = json!({ "phone": "4155550123", "metadata": "x".repeat(70 * 1024) });
    app.post("/v1/possession", huge).await.assert_error(413, 3902);
    // Without Content-Length (chunked), the limit holds while reading.
    let answer = chunked_post(&app, "/v1/possession", 100 * 1024).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("3902"), "{answer}");
    assert_eq!(app.count("transactions").await, before);
}

/// A chunked POST of `size` bytes of whitespace over a raw socket; returns
/// what the server answered.
async fn chunked_post(app: &TestApp, path: &str, size: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = app.address.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {DEV_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    for _ in 0..size / 1024 {
        // The server may answer and close before the whole body is sent.
        if socket.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn unknown_fields_are_named(app: TestApp) {
    let answer = app.post("/v1/possession", json!({ "phone": "4155550123", "colour": "blue" })).await;
    answer.assert_error(422, 3903);
    assert!(answer.body["errors"][0]["message"].as_str().unwrap().contains("colour"));
    let id = app.start_sms("4155550123").await.id();
    app.post(&format!("/v1/possession/{id}/confirm"), json!({ "code": "123123", "extra": 1 }))
        .await
        .assert_error(422, 3903);
    app.post("/v1/identity", json!({ "phone": "8885551234", "birth_date": "1968-05-27", "channel": "sms" }))
        .await
        .assert_error(422, 3903);
    // Unknown fields are refused before anything else is looked at.
    app.post("/v1/possession", json!({ "phone": "bad", "x": 1 })).await.assert_error(422, 3903);
}

/// Odd but well-formed requests: each must answer in the envelope (or succeed),
/// never with a 5xx, and the server must stay healthy.
async fn hostile_input_never_breaks_the_envelope(app: TestApp) {
    let deep = (0..300).fold(json!(1), |v, _| json!([v]));
    let cases: Vec<(&str, Value)> = vec![
        ("/v1/possession", json!({ "phone": "+1".to_string() + &"9".repeat(40) })),
        ("/v1/possession", json!({ "phone": "٤١٥٥٥٥٠١٢٣" })),
        ("/v1/possession", json!({ "phone": "\u{0000}4155550123" })),
        ("/v1/possession", json!({ "phone": ["4155550123"] })),
        ("/v1/possession", json!({ "phone": {"n": 1} })),
        ("/v1/possession", json!({ "phone": 1e308 })),
        ("/v1/possession", json!({ "phone": "4155550123", "channel": 5 })),
        ("/v1/possession", json!({ "phone": "4155550123", "provider": ["sandbox"] })),
        ("/v1/possession", json!({ "phone": "4155550123", "verification_id": 12 })),
        ("/v1/possession", json!({ "phone": "4155550123", "redirect_uri": "javascript:alert(1)" })),
        ("/v1/possession", json!({ "phone": "4155550123", "callback_url": "http://[::1" })),
        ("/v1/possession", json!({ "phone": "4155550123", "metadata": deep })),
        ("/v1/possession", json!({ "phone": "4155550123", "name": {"first": "\u{0007}", "last": "x"} })),
        ("/v1/identity", json!({ "phone": "8885551234", "birth_date": "0000-00-00" })),
        ("/v1/identity", json!({ "phone": "8885551234", "birth_date": "+10000-01-01" })),
        ("/v1/identity", json!({ "phone": "8885551234", "birth_date": "1899-12-31" })),
        ("/v1/possession/00000000-0000-0000-0000-000000000000/confirm", json!({ "code": "1".repeat(1000) })),
        ("/v1/possession/%00/confirm", json!({})),
    ];
    for (path, body) in cases {
        let answer = app.post(path, body.clone()).await;
        assert!(answer.status.as_u16() < 500, "{path} {body}: {} {}", answer.status, answer.text);
        if !answer.status.is_success() {
            assert!(answer.body["errors"][0]["code"].is_u64(), "{path} {body}: {}", answer.text);
        }
    }
    let deep_text = format!("{{\"phone\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let answer = app
        .send(
            app.client
                .post(app.url("/v1/possession"))
                .bearer_auth(DEV_KEY)
                .header("content-type", "application/json")
                .body(deep_text),
        )
        .await;
    answer.assert_error(400, 3900);
    assert_eq!(app.send(app.client.get(app.url("/health"))).await.status, 200);
}

async fn unknown_routes_and_methods(app: TestApp) {
    app.get("/v2/anything").await.assert_error(404, 4100);
    let wrong_method = app.send(app.client.delete(app.url("/v1/possession")).bearer_auth(DEV_KEY)).await;
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.body["errors"][0]["code"].is_u64(), "{}", wrong_method.text);
}

/// Partners are cached on Postgres, where a trigger announces each change
/// and every replica forgets what it read; SQLite reads them every time.
/// Either way a partner deactivated by another process (here straight
/// through the store, as the CLI does) is refused at once.
mod partner_cache {
    use std::time::Duration;

    use handset_core::Product;
    use handset_testkit::Kind;
    use serde_json::json;
    use sqlx::Connection;

    use crate::helpers::TestApp;

    /// The app's session listening for partner changes, once it is.
    async fn listener_pid(admin: &mut sqlx::PgConnection) -> i32 {
        for _ in 0..200 {
            let pid: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .fetch_optional(&mut *admin)
            .await
            .unwrap();
            if let Some(pid) = pid {
                // `set_following` runs just after LISTEN returns.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the app never listened for partner changes");
    }

    async fn set_trigger(admin: &mut sqlx::PgConnection, on: bool) {
        let verb = if on { "ENABLE" } else { "DISABLE" };
        sqlx::query(&format!("ALTER TABLE partners {verb} TRIGGER partners_changed"))
            .execute(&mut *admin)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_caches_partners_and_forgets_them_when_announced() {
        let app = TestApp::spawn(Kind::Postgres).await;
        let mut admin = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
        let listener = listener_pid(&mut admin).await;
        let (partner, key) = app.partner(Product::ALL).await;
        app.soon_answers_as(&key, 201).await;

        // Announced: refused within milliseconds, though the entry had 60 s to live.
        assert!(app.store.set_partner_active(partner, false).await.unwrap());
        app.soon_answers_as(&key, 401).await;
        assert!(app.store.set_partner_active(partner, true).await.unwrap());
        app.soon_answers_as(&key, 201).await;

        // Not announced (trigger off): the cached partner keeps being served,
        // which shows the cache is in use.
        set_trigger(&mut admin, false).await;
        assert!(app.store.set_partner_active(partner, false).await.unwrap());
        for _ in 0..3 {
            let cached = app.start_as(&key).await;
            assert_eq!(cached.status, 201, "served from the cache: {}", cached.text);
        }

        // Losing the listener empties the cache and reads partners again,
        // before a new listener is up (it reconnects after a 1 s pause).
        let _: (bool,) =
            sqlx::query_as("SELECT pg_terminate_backend($1)").bind(listener).fetch_one(&mut admin).await.unwrap();
        app.soon_answers_as(&key, 401).await;
        let listening: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert_eq!(listening, 0, "the cache was bypassed while no listener was up");
        set_trigger(&mut admin, true).await;
        let again = listener_pid(&mut admin).await;
        assert_ne!(again, listener, "the listener came back on a new session");
        assert!(app.store.set_partner_active(partner, true).await.unwrap());
        app.soon_answers_as(&key, 201).await;
        assert!(app.store.set_partner_active(partner, false).await.unwrap());
        app.soon_answers_as(&key, 401).await;
    }

    /// A TCP proxy to Postgres that can silence the one connection that
    /// sent `LISTEN` (sockets stay open, nothing passes): a listening
    /// connection that died without a word, as a dropped NAT entry leaves it.
    struct Proxy {
        addr: std::net::SocketAddr,
        silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Proxy {
        async fn start(upstream: String) -> Proxy {
            use std::sync::atomic::Ordering;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let silence = silent.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let listening = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let (up_listening, up_silence) = (listening.clone(), silence.clone());
                    let quiet = move |listening: &std::sync::atomic::AtomicBool,
                                      silence: &std::sync::atomic::AtomicBool| {
                        listening.load(Ordering::SeqCst) && silence.load(Ordering::SeqCst)
                    };
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = client_read.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if buf[..n].windows(6).any(|w| w == b"LISTEN") {
                                up_listening.store(true, Ordering::SeqCst);
                            }
                            if quiet(&up_listening, &up_silence) {
                                continue;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    let silence = silence.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = server_read.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if quiet(&listening, &silence) {
                                continue;
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Proxy { addr, silent }
        }
    }

    /// A listening connection that goes silent is found by the heartbeat:
    /// the replica stops serving cached partners within about 15 s, although
    /// the announcement of a deactivation never reached it (the cache's TTL
    /// alone would have kept the partner 60 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_notices_a_silent_listener() {
        let db = handset_testkit::TestDatabase::new(Kind::Postgres).await;
        let mut url = url::Url::parse(&db.url).unwrap();
        let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let proxy = Proxy::start(upstream).await;
        url.set_port(Some(proxy.addr.port())).unwrap();
        // Plain text through the proxy, so it can tell the listening connection.
        url.query_pairs_mut().append_pair("sslmode", "disable");
        let proxied = url.to_string();
        let app = TestApp::spawn_on(db, &[("HANDSET__DATABASE__URL", proxied.as_str())], true).await;
        let mut admin = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
        listener_pid(&mut admin).await;
        let (partner, key) = app.partner(Product::ALL).await;
        app.soon_answers_as(&key, 201).await;

        proxy.silent.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(app.store.set_partner_active(partner, false).await.unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cached = app.start_as(&key).await;
        assert_eq!(cached.status, 201, "the announcement was lost with the silent connection: {}", cached.text);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answer = app.start_as(&key).await;
            if answer.status == 401 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the silent listener was never noticed: {}", answer.text);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_reads_partners_every_time() {
        let app = TestApp::spawn(Kind::Sqlite).await;
        let (partner, key) = app.partner(Product::ALL).await;
        for _ in 0..3 {
            assert_eq!(app.start_as(&key).await.status, 201);
            assert!(app.store.set_partner_active(partner, false).await.unwrap());
            app.start_as(&key).await.assert_error(401, 1200);
            assert!(app.store.set_partner_active(partner, true).await.unwrap());
        }
    }

    /// An unknown key is never cached: a key given to a partner just after
    /// it was refused works at once.
    async fn unknown_keys_are_not_cached(kind: Kind) {
        let app = TestApp::spawn(kind).await;
        let fresh = "hs_test_issued_later";
        app.post_as(fresh, "/v1/possession", json!({"phone": "4155550124"})).await.assert_error(401, 1100);
        let partner = handset_core::Partner {
            id: uuid::Uuid::new_v4(),
            name: "issued later".into(),
            products: Product::ALL.to_vec(),
            active: true,
            webhook_secret: "whsec_dGVzdA==".into(),
            created_at: chrono::Utc::now(),
        };
        let api_key_hash = handset_core::secret::api_key_hash(fresh);
        app.store.insert_partner(&handset_core::store::NewPartner { partner, api_key_hash }).await.unwrap();
        assert_eq!(app.post_as(fresh, "/v1/possession", json!({"phone": "4155550124"})).await.status, 201);
    }

    crate::on_both_kinds!(unknown_keys_are_not_cached);
}
