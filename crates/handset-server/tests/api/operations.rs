//! What operators run and watch: health, readiness, metrics, the OpenAPI
//! document, the CLI, configuration layers and logs.

use std::process::{Command, Stdio};

use handset_testkit::{Kind, TestDatabase};
use serde_json::{Value, json};

use crate::helpers::{DEV_KEY, TestApp};
use crate::on_both_stores;

const HANDSET: &str = env!("CARGO_BIN_EXE_handset");

on_both_stores!(health_ready_and_metrics, openapi_documents_every_route, api_page_is_served_whole);

async fn health_ready_and_metrics(app: TestApp) {
    let health = app.send(app.client.get(app.url("/health"))).await;
    assert_eq!(health.status, 200);
    assert!(health.text.is_empty());
    assert_eq!(app.send(app.client.get(app.url("/ready"))).await.status, 200);

    let id = app.start_sms("4155550123").await.id();
    app.confirm(&id, "000000").await.assert_error(422, 3102);
    assert_eq!(app.confirm(&id, "123123").await.status, 200);
    let failed = app.start_sms("9995551005").await;
    assert_eq!(failed.status, 201, "{}", failed.text);
    let metrics = app.send(app.client.get(app.url("/metrics"))).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = metrics.text;
    assert!(
        text.contains(r#"handset_http_requests_total{method="POST",route="/v1/possession",status="201"}"#),
        "{text}"
    );
    assert!(text.contains(r#"route="/v1/possession/{transaction_id}/confirm",status="422""#), "{text}");
    assert!(text.contains("handset_http_request_duration_seconds_bucket{"), "{text}");
    assert!(text.contains("# TYPE handset_http_request_duration_seconds histogram"), "{text}");
    // What happened to verifications and providers, not only to HTTP.
    for series in [
        r#"handset_verifications_started_total{product="possession.sms",provider="sandbox"}"#,
        r#"handset_verifications_finished_total{product="possession.sms",provider="sandbox",outcome="succeeded",code=""}"#,
        r#"handset_verifications_finished_total{product="possession.sms",provider="sandbox",outcome="failed",code="1005"}"#,
        r#"handset_provider_call_duration_seconds_bucket{provider="sandbox",call="start",outcome="answered","#,
        r#"handset_circuit_breaker_state{provider="sandbox"} 0"#,
        r#"handset_db_pool_connections{pool="#,
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    // Every series is handset's own and every metric says what it is.
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        assert!(line.starts_with("handset_"), "{line}");
    }
    for typed in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = typed.split(' ').next().unwrap();
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP text");
    }

    // A request id given by the caller comes back; otherwise one is made.
    let tagged = app.send(app.client.get(app.url("/health")).header("x-request-id", "abc-123")).await;
    assert_eq!(tagged.headers["x-request-id"], "abc-123");
    assert!(!app.send(app.client.get(app.url("/health"))).await.headers["x-request-id"].is_empty());
    // Every error body names its request.
    let refused = app
        .send(app.client.get(app.url("/v1/transactions/nope")).bearer_auth(DEV_KEY).header("x-request-id", "err-1"))
        .await;
    refused.assert_error(404, 4100);
    assert_eq!(
        (refused.headers["x-request-id"].to_str().unwrap(), &refused.body["request_id"]),
        ("err-1", &json!("err-1"))
    );
    let unauthorised = app.send(app.client.post(app.url("/v1/possession")).json(&json!({}))).await;
    unauthorised.assert_error(401, 1100);
    assert_eq!(unauthorised.body["request_id"], unauthorised.headers["x-request-id"].to_str().unwrap());

    app.db.destroy().await;
    if app.kind == Kind::Postgres {
        assert_eq!(app.send(app.client.get(app.url("/ready"))).await.status, 503);
        assert_eq!(app.send(app.client.get(app.url("/health"))).await.status, 200);
        app.start_sms("4155550123").await.assert_error(500, 5000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_when_sqlite_cannot_be_opened() {
    let db = TestDatabase::sqlite();
    db.destroy().await; // its directory is gone: the file cannot be created
    // A database that cannot be reached answers quickly with a short wait for a connection.
    let app = TestApp::spawn_on(db, &[("HANDSET__DATABASE__ACQUIRE_TIMEOUT", "2s")], false).await;
    assert_eq!(app.send(app.client.get(app.url("/ready"))).await.status, 503);
    assert_eq!(app.send(app.client.get(app.url("/health"))).await.status, 200);
    app.get("/v1/transactions/00000000-0000-0000-0000-000000000000").await.assert_error(500, 5000);
}

async fn openapi_documents_every_route(app: TestApp) {
    let doc = app.send(app.client.get(app.url("/openapi.json"))).await.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for (path, method) in [
        ("/v1/possession", "post"),
        ("/v1/possession/{transaction_id}/confirm", "post"),
        ("/v1/identity", "post"),
        ("/v1/transactions/{transaction_id}", "get"),
        ("/v1/verifications/{verification_id}", "get"),
        ("/v1/transactions/{transaction_id}/callbacks", "get"),
        ("/v1/transactions/{transaction_id}/callbacks/retry", "post"),
        ("/v1/stats", "get"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/sandbox/operator/{transaction_id}", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is not documented");
    }
    // Every reference resolves.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 5);
    for reference in refs {
        let name = reference.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{reference}"));
        assert!(doc["components"]["schemas"][name].is_object(), "{reference} does not resolve");
    }
    // The documented request bodies are exactly the accepted fields.
    let fields = |schema: &str| -> Vec<String> {
        let mut keys: Vec<String> =
            doc["components"]["schemas"][schema]["properties"].as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let sorted = |list: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(fields("PossessionIn"), sorted(handset_server::input::PossessionIn::FIELDS));
    assert_eq!(fields("IdentityIn"), sorted(handset_server::input::IdentityIn::FIELDS));
    assert_eq!(fields("ConfirmIn"), sorted(handset_server::input::ConfirmIn::FIELDS));
    assert!(doc["components"]["schemas"]["TransactionOut"]["properties"]["next_action"].is_object());

    // Every answer the server can give is documented, by kind of operation.
    let operation_ids = operation_ids(&doc);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            let has = |status: &str| responses.contains_key(status);
            assert!(responses.values().all(|r| r["description"].as_str().is_some_and(|d| !d.is_empty())));
            if path.starts_with("/v1/") {
                for status in ["401", "429", "500"] {
                    assert!(has(status), "{method} {path} does not document {status}");
                }
                // A resource named in the path may not exist.
                if path.contains('{') {
                    assert!(has("404"), "{method} {path} does not document 404");
                }
            }
            if method == "post" && path.starts_with("/v1/") {
                let json_body = operation["requestBody"].is_object();
                let statuses: &[&str] =
                    if json_body { &["400", "408", "409", "413", "415", "422"] } else { &["408", "409", "413", "422"] };
                for status in statuses {
                    assert!(has(status), "{method} {path} does not document {status}");
                }
                let key = operation["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "Idempotency-Key");
                assert_eq!(key.unwrap()["schema"]["maxLength"], 255, "{path}");
            }
            for response in responses.values() {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    let target = link["operationId"].as_str().unwrap();
                    assert!(operation_ids.contains(&target.to_owned()), "a link to {target}, which is not documented");
                }
            }
        }
    }
    // A start links to its confirm and reads, with the ids of its answer.
    let links = &doc["paths"]["/v1/possession"]["post"]["responses"]["201"]["links"];
    assert_eq!(links["confirmPossession"]["parameters"]["transaction_id"], "$response.body#/transaction_id");
    assert_eq!(links["getVerification"]["parameters"]["verification_id"], "$response.body#/verification_id");
    assert_eq!(doc["components"]["schemas"]["PossessionIn"]["additionalProperties"], false);
    assert_eq!(doc["components"]["schemas"]["IdentityIn"]["properties"]["birth_date"]["format"], "date");

    // The committed copy is this document (`handset openapi > docs/openapi.json`).
    let committed: Value =
        serde_json::from_str(include_str!("../../../../docs/openapi.json")).expect("docs/openapi.json is JSON");
    assert!(committed == doc, "docs/openapi.json is stale: run `handset openapi > docs/openapi.json`");
}

fn operation_ids(doc: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            ids.push(operation["operationId"].as_str().expect("every operation has an id").to_owned());
        }
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "operation ids are unique");
    ids
}

/// `/docs` is a page whose every asset comes from handset itself.
async fn api_page_is_served_whole(app: TestApp) {
    let page = app.send(app.client.get(app.url("/docs"))).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text.contains("src=\"/docs/redoc.standalone.js\""), "{}", page.text);
    assert!(page.text.contains("spec-url=\"/openapi.json\""), "{}", page.text);
    assert!(!page.text.contains("http://") && !page.text.contains("https://"), "nothing from elsewhere: {}", page.text);
    let script = app.send(app.client.get(app.url("/docs/redoc.standalone.js"))).await;
    assert_eq!(script.status, 200);
    assert!(script.headers["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert!(script.text.len() > 500_000 && script.text.contains("Redoc"), "the vendored bundle");
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

fn handset(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(HANDSET)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run the handset binary")
}

async fn cli_manages_partners(kind: Kind) {
    let db = TestDatabase::new(kind).await;
    let env = [("HANDSET__DATABASE__URL", db.url.as_str())];
    let migrate = handset(&["migrate"], &env);
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

    let created = handset(&["partner", "create", "--name", "Acme", "--products", "identity,possession.sms"], &env);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let printed: Value = serde_json::from_slice(&created.stdout).expect("JSON on stdout");
    let key = printed["api_key"].as_str().unwrap().to_owned();
    let partner_id = printed["partner_id"].as_str().unwrap().to_owned();
    assert!(printed["webhook_secret"].as_str().unwrap().starts_with("whsec_"));
    assert!(uuid::Uuid::parse_str(&partner_id).is_ok());
    assert!(key.len() >= 32);

    let bad = handset(&["partner", "create", "--name", "X", "--products", "telepathy"], &env);
    assert!(!bad.status.success());

    let app = TestApp::spawn_on(db, &[], false).await;
    let identity =
        app.post_as(&key, "/v1/identity", json!({ "phone": "8885551234", "birth_date": "1968-05-27" })).await;
    assert_eq!(identity.status, 201, "{}", identity.text);
    app.post_as(&key, "/v1/possession", json!({ "phone": "4155550123", "channel": "network" }))
        .await
        .assert_error(403, 2300);

    let env = [("HANDSET__DATABASE__URL", app.db.url.as_str())];
    let deactivated = handset(&["partner", "deactivate", "--id", &partner_id], &env);
    assert!(deactivated.status.success(), "{}", String::from_utf8_lossy(&deactivated.stderr));
    // The change reaches a Postgres process's partner cache by notification, in milliseconds.
    app.soon_answers_as(&key, 401).await;
    app.post_as(&key, "/v1/possession", json!({ "phone": "4155550123" })).await.assert_error(401, 1200);
    assert!(handset(&["partner", "activate", "--id", &partner_id], &env).status.success());
    app.soon_answers_as(&key, 201).await;
}

mod cli {
    use super::*;
    crate::on_both_kinds!(cli_manages_partners);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real binary: `--config FILE` and environment overrides, JSON logs with
/// one line per request and no secrets, and a clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reads_config_layers_and_logs_without_secrets() {
    let db = TestDatabase::sqlite();
    let dir = std::env::temp_dir().join(format!("handset-bin-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("handset.toml");
    std::fs::write(&config, "[possession]\nmax_attempts = 2\ncode_ttl = \"1m\"\n").unwrap();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let child = Command::new(HANDSET)
        .args(["serve", "--config", config.to_str().unwrap(), "--log-format", "json"])
        .env("HANDSET__SERVER__BIND", &bind)
        .env("HANDSET__DATABASE__URL", &db.url)
        .env("HANDSET__POSSESSION__CODE_TTL", "2m")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://{bind}");
    let client = crate::helpers::http_client();
    assert!(crate::helpers::wait_healthy(&base).await, "the server did not start");
    let started: Value = client
        .post(format!("{base}/v1/possession"))
        .bearer_auth(DEV_KEY)
        .json(&json!({ "phone": "4155550123" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // max_attempts from the file, code_ttl from the environment (which wins over the file).
    assert_eq!(started["next_action"]["attempts_remaining"], 2, "{started}");
    let created = chrono::DateTime::parse_from_rfc3339(started["status"]["created"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(started["next_action"]["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_seconds(), 120);
    let id = started["transaction_id"].as_str().unwrap();
    let confirmed = client
        .post(format!("{base}/v1/possession/{id}/confirm"))
        .bearer_auth(DEV_KEY)
        .json(&json!({ "code": "123123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(confirmed.status(), 200);

    // SIGTERM: graceful shutdown and a zero exit.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(output.status.success(), "exit: {:?}", output.status);
    let logs = String::from_utf8_lossy(&output.stderr);
    let requests: Vec<Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == "request")
        .collect();
    let confirm_line = requests
        .iter()
        .find(|l| l["route"] == "/v1/possession/{transaction_id}/confirm")
        .unwrap_or_else(|| panic!("no request line for confirm in:\n{logs}"));
    assert_eq!(confirm_line["status"], 200);
    assert!(confirm_line["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(confirm_line["latency_ms"].is_number());
    assert_eq!(confirm_line["method"], "POST");
    assert!(
        logs.contains("provider disabled: no credentials configured"),
        "providers without credentials say so:\n{logs}"
    );
    for secret in ["4155550123", DEV_KEY, "123123"] {
        assert!(!logs.contains(secret), "{secret:?} leaked into the logs:\n{logs}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Closes every connection the app has to its database, as a restart does.
async fn terminate_connections(app: &TestApp) {
    assert!(app.db.close_connections().await > 0, "the app had connections to drop");
}

/// A start's write after a restart: its pooled connections are closed but
/// were used under a second ago, so none is pinged for its age. The partner
/// listener losing its own connection, or the partner read that follows
/// (the cache stops serving while the listener is down) meeting a closed
/// connection and running again, must make the pool check the others before
/// the write takes one. (Without both, this start answers 500.) The pause
/// gives the listener time to see its connection close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_write_after_a_restart_finds_a_live_connection() {
    // No job runner: its statements would meet a closed connection first.
    let app = TestApp::spawn_with(Kind::Postgres, &[("HANDSET__WORKERS__ENABLED", "false")]).await;
    app.start_sms("4155550123").await.id();
    terminate_connections(&app).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let started = app.start_sms("4155550124").await;
    assert_eq!(started.status, 201, "{}", started.text);
}

/// A database restart drops every connection: the next requests must work
/// on fresh connections, and the job runner must carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_loss_is_survived() {
    let receiver = crate::receiver::Receiver::start().await;
    let app = TestApp::spawn_with(
        Kind::Postgres,
        &[("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"), ("HANDSET__WORKERS__POLL_INTERVAL", "25ms")],
    )
    .await;
    let id = app.start_sms("4155550123").await.id();
    terminate_connections(&app).await;

    let confirmed = app.confirm(&id, "123123").await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    let with_callback = app
        .post(
            "/v1/identity",
            json!({"phone": "8885551234", "birth_date": "1968-05-27", "callback_url": receiver.url("/hook")}),
        )
        .await;
    assert_eq!(with_callback.status, 201, "{}", with_callback.text);
    receiver.wait_for(1, std::time::Duration::from_secs(10)).await;
    assert_eq!(app.send(app.client.get(app.url("/ready"))).await.status, 200);
}
