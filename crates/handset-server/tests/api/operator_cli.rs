//! The operator commands, run as the real binary against the database a
//! running app uses, on both stores: `partner list|show|rotate-key|
//! rotate-webhook-secret` and `callbacks replay`.

use std::process::Command;
use std::time::Duration;

use handset_testkit::{Kind, TestDatabase};
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::receiver::{Receiver, Reply};

fn ok(app: &TestApp, args: &[&str]) -> Value {
    app.cli(args).unwrap_or_else(|error| panic!("handset {args:?} failed: {error}"))
}

/// Nothing an operator command prints about a partner is a secret.
fn assert_no_secrets(printed: &Value) {
    let text = printed.to_string();
    for secret in ["api_key", "webhook_secret\"", "hash", "whsec_", "hs_"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

async fn partners_are_listed_shown_and_their_keys_rotated(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let created = ok(&app, &["partner", "create", "--name", "Acme", "--products", "possession.sms"]);
    let (id, first_key) = (created["partner_id"].as_str().unwrap().to_owned(), created["api_key"].as_str().unwrap());
    ok(&app, &["partner", "create", "--name", "Globex"]);

    let listed = ok(&app, &["partner", "list"]);
    assert_no_secrets(&listed);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(names.ends_with(&["Acme", "Globex"]), "oldest first: {names:?}");
    let shown = ok(&app, &["partner", "show", &id]);
    assert_no_secrets(&shown);
    assert_eq!(shown["name"], "Acme");
    assert_eq!(shown["products"], json!(["possession.sms"]));
    assert_eq!(shown["active"], true);
    assert_eq!(shown["previous_key_expires_at"], Value::Null);
    let unknown = uuid::Uuid::new_v4().to_string();
    assert!(app.cli(&["partner", "show", &unknown]).unwrap_err().contains("no partner"));
    assert!(app.cli(&["partner", "rotate-key", &unknown]).is_err());

    // With an overlap both keys work, until the overlap ends.
    app.soon_answers_as(first_key, 201).await;
    let rotated = ok(&app, &["partner", "rotate-key", &id, "--overlap", "1h"]);
    let second_key = rotated["api_key"].as_str().unwrap().to_owned();
    assert_ne!(second_key, first_key);
    assert!(rotated["previous_key_expires_at"].is_string(), "{rotated}");
    app.soon_answers_as(&second_key, 201).await;
    assert_eq!(app.start_as(first_key).await.status, 201, "the old key works during the overlap");
    assert!(ok(&app, &["partner", "show", &id])["previous_key_expires_at"].is_string());

    // Without one, the old keys (the current and the overlapping one) stop at once.
    let third = ok(&app, &["partner", "rotate-key", &id]);
    assert_eq!(third["previous_key_expires_at"], Value::Null);
    let third_key = third["api_key"].as_str().unwrap().to_owned();
    app.soon_answers_as(&second_key, 401).await;
    app.start_as(first_key).await.assert_error(401, 1100);
    assert_eq!(app.start_as(&third_key).await.status, 201);

    // A short overlap ends by itself.
    let fourth = ok(&app, &["partner", "rotate-key", &id, "--overlap", "2s"]);
    app.soon_answers_as(fourth["api_key"].as_str().unwrap(), 201).await;
    assert_eq!(app.start_as(&third_key).await.status, 201);
    assert!(ok(&app, &["partner", "show", &id])["previous_key_expires_at"].is_string());
    tokio::time::sleep(Duration::from_millis(2200)).await;
    app.start_as(&third_key).await.assert_error(401, 1100);
    assert_eq!(ok(&app, &["partner", "show", &id])["previous_key_expires_at"], Value::Null, "the overlap is over");
}

/// Standard Webhooks signatures: `v1,<base64>` entries, space-separated.
fn signatures(header: &str) -> Vec<String> {
    header.split(' ').map(str::to_owned).collect()
}

fn signed_with(secret: &str, received: &crate::receiver::Received) -> String {
    let timestamp: i64 = received.header("webhook-timestamp").parse().unwrap();
    handset_core::webhook::sign(secret, &received.header("webhook-id"), timestamp, received.body.as_bytes()).unwrap()
}

async fn callback_app(kind: Kind, retry_schedule: &str) -> TestApp {
    TestApp::spawn_with(
        kind,
        &[
            ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"),
            ("HANDSET__CALLBACKS__RETRY_SCHEDULE", retry_schedule),
            ("HANDSET__CALLBACKS__TIMEOUT", "2s"),
            ("HANDSET__WORKERS__POLL_INTERVAL", "25ms"),
        ],
    )
    .await
}

/// An identity match (final at once in the sandbox) owing a callback.
async fn identity_with_callback(app: &TestApp, key: &str, receiver: &Receiver) -> String {
    let body = json!({"phone": "8885551234", "birth_date": "1968-05-27", "callback_url": receiver.url("/hook")});
    let answer = app.post_as(key, "/v1/identity", body).await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    answer.id()
}

async fn webhook_secret_rotation_signs_with_both(kind: Kind) {
    let app = callback_app(kind, "100ms").await;
    let receiver = Receiver::start().await;
    let created = ok(&app, &["partner", "create", "--name", "Acme"]);
    let (id, key) = (created["partner_id"].as_str().unwrap(), created["api_key"].as_str().unwrap());
    let first_secret = created["webhook_secret"].as_str().unwrap().to_owned();

    let rotated = ok(&app, &["partner", "rotate-webhook-secret", id, "--overlap", "1h"]);
    let second_secret = rotated["webhook_secret"].as_str().unwrap().to_owned();
    assert!(second_secret.starts_with("whsec_") && second_secret != first_secret);
    assert!(rotated["previous_webhook_secret_expires_at"].is_string());
    app.soon_answers_as(key, 201).await;
    identity_with_callback(&app, key, &receiver).await;
    let during = receiver.wait_for(1, Duration::from_secs(10)).await[0].clone();
    let signed = signatures(&during.header("webhook-signature"));
    assert_eq!(signed, vec![signed_with(&second_secret, &during), signed_with(&first_secret, &during)]);

    let again = ok(&app, &["partner", "rotate-webhook-secret", id]);
    let third_secret = again["webhook_secret"].as_str().unwrap().to_owned();
    assert_eq!(again["previous_webhook_secret_expires_at"], Value::Null);
    identity_with_callback(&app, key, &receiver).await;
    let after = receiver.wait_for(2, Duration::from_secs(10)).await[1].clone();
    assert_eq!(signatures(&after.header("webhook-signature")), vec![signed_with(&third_secret, &after)]);
}

/// Waits until the transaction's callback is in `state`.
async fn wait_callback_state(app: &TestApp, key: &str, id: &str, state: &str) {
    let path = format!("/v1/transactions/{id}/callbacks");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let callback = app.get_as(key, &path).await.body["callbacks"][0].clone();
        if callback["state"] == state {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the callback never became {state}: {callback}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A partner (as `partner create` printed it) whose callback gave up after
/// its retry (the receiver answers 500), and that transaction's id.
async fn callback_that_gave_up(kind: Kind) -> (TestApp, Receiver, Value, String) {
    let app = callback_app(kind, "50ms").await;
    let receiver = Receiver::start().await;
    receiver.default_reply(Reply::Status(500));
    let created = ok(&app, &["partner", "create", "--name", "Acme"]);
    let key = created["api_key"].as_str().unwrap().to_owned();
    let id = identity_with_callback(&app, &key, &receiver).await;
    wait_callback_state(&app, &key, &id, "failed").await;
    (app, receiver, created, id)
}

async fn failed_callbacks_are_replayed(kind: Kind) {
    let (app, receiver, created, id) = callback_that_gave_up(kind).await;
    let (partner, key) = (created["partner_id"].as_str().unwrap(), created["api_key"].as_str().unwrap());
    let tried = receiver.received().len();
    assert_eq!(tried, 2, "the first try and one retry");

    assert!(app.cli(&["callbacks", "replay", "--partner", partner, "--since", "1h"]).unwrap_err().contains("--failed"));
    let other = uuid::Uuid::new_v4().to_string();
    assert!(app.cli(&["callbacks", "replay", "--partner", &other, "--failed", "--since", "1h"]).is_err());
    receiver.default_reply(Reply::Status(200));
    let replayed = ok(&app, &["callbacks", "replay", "--partner", partner, "--failed", "--since", "1h"]);
    assert_eq!((replayed["requeued"].clone(), replayed["not_replayable"].clone()), (json!(1), json!(0)), "{replayed}");
    let again = receiver.wait_for(tried + 1, Duration::from_secs(10)).await;
    assert_eq!(again[tried].header("webhook-id"), again[0].header("webhook-id"), "the same message, sent again");
    wait_callback_state(&app, key, &id, "delivered").await;
    let nothing = ok(&app, &["callbacks", "replay", "--partner", partner, "--failed", "--since", "1h"]);
    assert_eq!(nothing["requeued"], 0, "delivered callbacks are not replayed: {nothing}");
}

/// `--since` counts from when a callback gave up: older ones stay failed.
async fn replay_honours_since(kind: Kind) {
    let (app, _receiver, created, id) = callback_that_gave_up(kind).await;
    let (partner, key) = (created["partner_id"].as_str().unwrap(), created["api_key"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let none = ok(&app, &["callbacks", "replay", "--partner", partner, "--failed", "--since", "1s"]);
    assert_eq!(none["requeued"], 0, "{none}");
    let path = format!("/v1/transactions/{id}/callbacks");
    assert_eq!(app.get_as(key, &path).await.body["callbacks"][0]["state"], "failed");
}

crate::on_both_kinds!(
    partners_are_listed_shown_and_their_keys_rotated,
    webhook_secret_rotation_signs_with_both,
    failed_callbacks_are_replayed,
    replay_honours_since
);

/// The commands work on a database no server has touched (they migrate it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_need_no_running_server() {
    let db = TestDatabase::new(Kind::Sqlite).await;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_handset"))
            .args(args)
            .env("HANDSET__DATABASE__URL", &db.url)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let listed = run(&["partner", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&listed.stdout).unwrap(), json!([]));
}
