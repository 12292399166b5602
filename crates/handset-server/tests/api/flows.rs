//! The README quick start, end to end.

use handset_core::secret::DEVELOPMENT_CODE_PEPPER;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::helpers::{DEV_KEY, TestApp};
use crate::on_both_stores;

on_both_stores!(
    sms_possession_then_identity_on_one_verification,
    network_possession_through_the_sandbox_operator,
    final_transactions_owe_their_callback,
);

mod at_rest {
    use handset_testkit::Kind;

    use crate::helpers::TestApp;
    use crate::receiver::Receiver;

    async fn codes_and_keys_are_stored_hashed(kind: Kind) {
        let receiver = Receiver::start().await;
        let env = [("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"), ("HANDSET__WORKERS__POLL_INTERVAL", "25ms")];
        let app = TestApp::spawn_with(kind, &env).await;
        super::codes_and_keys_are_stored_hashed(app, receiver).await
    }

    crate::on_both_kinds!(codes_and_keys_are_stored_hashed);
}

async fn sms_possession_then_identity_on_one_verification(app: TestApp) {
    let started = app.start_sms("8885551234").await;
    assert_eq!(started.status, 201, "{}", started.text);
    let tx = &started.body;
    assert_eq!(tx["product"], "possession.sms");
    assert_eq!(tx["provider"], "sandbox");
    assert_eq!(tx["phone"], "+18885551234");
    assert_eq!(tx["status"]["code"], 210);
    assert_eq!(tx["status"]["message"], "Transaction pending review");
    assert_eq!(tx["next_action"]["type"], "enter_code");
    assert_eq!(tx["next_action"]["attempts_remaining"], 5);
    assert!(tx["next_action"]["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(tx.get("result").is_none(), "no result while pending");
    assert_eq!(tx["metadata"], json!({}));
    let id = started.id();
    let verification_id = tx["verification_id"].as_str().unwrap().to_owned();

    let confirmed = app.confirm(&id, "123123").await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    assert_eq!(confirmed.body["status"]["code"], 200);
    assert_eq!(confirmed.body["result"], json!({ "phone": "+18885551234" }));
    assert_eq!(confirmed.body["next_action"], json!(null));

    let read = app.transaction(&id).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body, confirmed.body);

    let identity = app
        .post(
            "/v1/identity",
            json!({ "phone": "8885551234", "birth_date": "1968-05-27", "verification_id": verification_id, "metadata": {"ref": "A1"} }),
        )
        .await;
    assert_eq!(identity.status, 201, "{}", identity.text);
    assert_eq!(identity.body["product"], "identity");
    assert_eq!(identity.body["status"]["code"], 200);
    assert_eq!(identity.body["verification_id"], verification_id.as_str());
    assert_eq!(identity.body["metadata"], json!({"ref": "A1"}));
    let address = &identity.body["result"]["address"];
    for field in ["line1", "city", "region", "postal_code", "country"] {
        assert!(address[field].is_string(), "address.{field}: {}", identity.text);
    }

    let verification = app.get(&format!("/v1/verifications/{verification_id}")).await;
    assert_eq!(verification.status, 200, "{}", verification.text);
    assert_eq!(verification.body["verification_id"], verification_id.as_str());
    assert_eq!(verification.body["possession_verified"], true);
    assert_eq!(verification.body["identity_verified"], true);
    assert!(verification.body["created"].is_string());
    let transactions = verification.body["transactions"].as_array().unwrap();
    assert_eq!(transactions.len(), 2);
    assert_eq!(transactions[0]["transaction_id"], id.as_str());
    assert_eq!(transactions[1]["product"], "identity");
}

async fn network_possession_through_the_sandbox_operator(app: TestApp) {
    let started = app
        .post(
            "/v1/possession",
            json!({ "phone": "+14155550123", "channel": "network", "redirect_uri": "https://partner.example/done?step=2" }),
        )
        .await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["product"], "possession.network");
    assert_eq!(started.body["next_action"]["type"], "redirect");
    let id = started.id();
    let operator_url = started.body["next_action"]["url"].as_str().unwrap().to_owned();
    assert_eq!(operator_url, app.url(&format!("/sandbox/operator/{id}")));

    // Before the user visits the operator, confirm answers the pending state.
    let pending = app.post(&format!("/v1/possession/{id}/confirm"), json!({})).await;
    assert_eq!(pending.status, 200, "{}", pending.text);
    assert_eq!(pending.body["status"]["code"], 210);

    let operator = app.client.get(&operator_url).send().await.unwrap();
    assert_eq!(operator.status(), 303);
    let location = url::Url::parse(operator.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(location.host_str(), Some("partner.example"));
    assert_eq!(location.path(), "/done");
    let query: Vec<(String, String)> = location.query_pairs().into_owned().collect();
    assert!(query.contains(&("step".into(), "2".into())));
    assert!(query.contains(&("transaction_id".into(), id.clone())));
    assert!(query.contains(&("status".into(), "success".into())));

    let done = app.transaction(&id).await;
    assert_eq!(done.body["status"]["code"], 200);
    assert_eq!(done.body["result"], json!({ "phone": "+14155550123" }));
    // No body at all is a valid network confirm too.
    let confirm = app
        .send(app.client.post(app.url(&format!("/v1/possession/{id}/confirm"))).bearer_auth(crate::helpers::DEV_KEY))
        .await;
    assert_eq!(confirm.status, 200, "{}", confirm.text);
    assert_eq!(confirm.body["status"]["code"], 200);

    // Without a redirect_uri the operator page says it is done.
    let bare = app.post("/v1/possession", json!({ "phone": "+14155550124", "channel": "network" })).await;
    let page = app.client.get(app.url(&format!("/sandbox/operator/{}", bare.id()))).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("success"));

    // The operator page only serves pending sandbox network checks.
    let sms = app.start_sms("4155550125").await;
    let refused = app.send(app.client.get(app.url(&format!("/sandbox/operator/{}", sms.id())))).await;
    refused.assert_error(404, 4100);
}

async fn final_transactions_owe_their_callback(app: TestApp) {
    let hook = "https://partner.example/hook";
    let started = app.post("/v1/possession", json!({ "phone": "4155550123", "callback_url": hook })).await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["callback_url"], hook);
    let id = started.id();
    let tx_id: uuid::Uuid = id.parse().unwrap();
    assert!(app.store.callbacks_of_transaction(tx_id).await.unwrap().is_empty(), "pending: no callback yet");

    let done = app.confirm(&id, "123123").await;
    let outbox = app.store.callbacks_of_transaction(tx_id).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].message.callback_url, hook);
    assert_eq!(outbox[0].message.payload, done.text, "the callback body is the transaction as it became final");

    // A transaction final at creation owes its callback too; one without a callback_url owes nothing.
    let failed = app.post("/v1/possession", json!({ "phone": "9995551005", "callback_url": hook })).await;
    assert_eq!(app.store.callbacks_of_transaction(failed.id().parse().unwrap()).await.unwrap().len(), 1);
    let silent = app.start_sms("9995551005").await;
    assert!(app.store.callbacks_of_transaction(silent.id().parse().unwrap()).await.unwrap().is_empty());
}

/// After a start and a confirm (with an `Idempotency-Key`, and a callback
/// delivered), a dump of every table holds neither the code nor the API key,
/// in plain or in a common encoding; the webhook secret only in the one
/// column that signs with it; and the code's hash is the HMAC keyed by the pepper.
async fn codes_and_keys_are_stored_hashed(app: TestApp, receiver: crate::receiver::Receiver) {
    let (_, key, webhook_secret) = app.partner_with_secret(&[handset_core::Product::PossessionSms]).await;
    let start = json!({ "phone": "4155550123", "callback_url": receiver.url("/hook") });
    let started = app.post_as(&key, "/v1/possession", start).await;
    assert_eq!(started.status, 201, "{}", started.text);
    let id = started.id();
    let confirmed = app
        .send(
            app.client
                .post(app.url(&format!("/v1/possession/{id}/confirm")))
                .bearer_auth(&key)
                .header("idempotency-key", "confirm-once")
                .json(&json!({ "code": "123123" })),
        )
        .await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    receiver.wait_for(1, std::time::Duration::from_secs(10)).await; // its attempt is logged too
    receiver.wait_for(1, std::time::Duration::from_secs(10)).await; // its attempt is logged too

    let tx_id = uuid::Uuid::parse_str(&id).unwrap();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(DEVELOPMENT_CODE_PEPPER.as_bytes()).unwrap();
    mac.update(tx_id.as_bytes());
    mac.update(b":123123");
    let expected = hex::encode(mac.finalize().into_bytes());
    let row = app.store.transaction(tx_id).await.unwrap().unwrap();
    assert_eq!(row.code_hash.as_deref(), Some(expected.as_str()), "HMAC-SHA256 keyed by the pepper");

    let dump = app.dump_all().await;
    let tables: Vec<&str> = dump.iter().map(|(t, _)| t.as_str()).collect();
    for expected in ["partners", "transactions", "outbox", "callback_attempts", "idempotency_keys"] {
        assert!(tables.iter().any(|t| t.starts_with(expected)), "{expected} dumped: {tables:?}");
    }
    assert!(dump.iter().map(|(_, rows)| rows.len()).sum::<usize>() > 5, "rows were dumped: {dump:?}");
    // Keys are kept as their SHA-256 (256-bit random keys need no stretching).
    let key_hash = hex::encode(Sha256::digest(key.as_bytes()));
    assert!(dump.iter().any(|(t, rows)| t == "partners" && rows.iter().any(|r| r.contains(&key_hash))));
    // Neither the code's unkeyed hash nor that of what its HMAC covers is stored.
    let unkeyed_code = [
        hex::encode(Sha256::digest(b"123123")),
        hex::encode(Sha256::digest([tx_id.as_bytes().as_slice(), b":123123"].concat())),
    ];
    for (table, rows) in &dump {
        for row in rows {
            let row = row.to_lowercase();
            for (what, secret) in [("code", "123123"), ("API key", key.as_str()), ("API key", DEV_KEY)] {
                for form in encodings(secret) {
                    assert!(!row.contains(&form.to_lowercase()), "{what} ({form}) in {table}: {row}");
                }
            }
            for form in &unkeyed_code {
                assert!(!row.contains(form), "the code's unkeyed hash in {table}: {row}");
            }
            // The webhook secret must be kept to sign callbacks: once, in its partner's row.
            let allowed = usize::from(table == "partners" && row.contains(&webhook_secret.to_lowercase()));
            for form in encodings(&webhook_secret) {
                let found = row.matches(&form.to_lowercase()).count();
                let expected = if form == webhook_secret { allowed } else { 0 };
                assert!(found <= expected, "webhook secret ({form}) in {table}: {row}");
            }
        }
    }
}

/// A secret as it might be written down: plain, hex, base64 (standard and
/// URL-safe, with and without padding).
fn encodings(secret: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let bytes = secret.as_bytes();
    vec![
        secret.to_owned(),
        hex::encode(bytes),
        STANDARD.encode(bytes),
        STANDARD_NO_PAD.encode(bytes),
        URL_SAFE.encode(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
    ]
}
