//! `environment = "production"`: no sandbox, no development partner, codes
//! keyed by the server's pepper, and a start refused (naming the key) when
//! what production needs is missing. Also the per-phone send limit, which
//! counts only sends that were attempted.

use std::process::{Command, Stdio};

use handset_core::Product;
use handset_core::secret::api_key_hash;
use handset_sim::{Sim, SimConfig};
use handset_testkit::{Kind, TestDatabase};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::helpers::{DEV_KEY, TestApp};

const HANDSET: &str = env!("CARGO_BIN_EXE_handset");
const PEPPER: &str = "test-production-pepper-0123456789abcdef";

/// A complete production configuration: ID.me (on `idme_base_url`) for SMS
/// and identity, nothing routed to the sandbox.
fn production_config(idme_base_url: &str) -> String {
    format!(
        r#"
environment = "production"

[server]
public_url = "https://handset.test"

[security]
code_pepper = "{PEPPER}"

[rate_limits]
per_phone_per_hour = 5

[providers.idme]
base_url = "{idme_base_url}"
secret = "sim-secret"

[[routing.rules]]
product = "possession.sms"
providers = ["idme"]

[[routing.rules]]
product = "identity"
providers = ["idme"]
"#
    )
}

/// A development run leaves the development partner and a pending sandbox
/// network check in the database; production on that database must honour
/// neither.
async fn production_has_no_sandbox_and_no_development_partner(kind: Kind) {
    let development = TestApp::spawn(kind).await;
    let network = development.post("/v1/possession", json!({"phone": "4155550123", "channel": "network"})).await;
    assert_eq!(network.status, 201, "{}", network.text);
    let pending_id = network.id();
    let (_, key) = development.partner(Product::ALL).await;

    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    let production = TestApp::spawn_on_config(
        TestDatabase::new(kind).await,
        &production_config(&sim.base_url()),
        &[("HANDSET__DATABASE__URL", development.db.url.as_str()), ("HANDSET__DEV__API_KEY", "a-new-dev-key")],
    )
    .await;

    // The operator page is gone, and the check it would have completed stays pending.
    let page = production.send(production.client.get(production.url(&format!("/sandbox/operator/{pending_id}")))).await;
    page.assert_error(404, 4100);
    let row = development.store.transaction(pending_id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(row.status, handset_core::Status::Pending);

    // The development partner is refused by id: its row still holds the old
    // key, which config no longer names.
    production.start_sms("4155550123").await.assert_error(401, 1100);
    let retired = development
        .store
        .partner_by_key_hash(&api_key_hash(DEV_KEY), chrono::Utc::now())
        .await
        .unwrap()
        .unwrap()
        .partner;
    assert!(!retired.active, "serve deactivated the development partner's row");

    // Nothing reaches the sandbox, even forced; real partners go to ID.me.
    let forced = json!({"phone": "4155550123", "provider": "sandbox"});
    production.post_as(&key, "/v1/possession", forced).await.assert_error(422, 3908);
    let identity = json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "sandbox"});
    production.post_as(&key, "/v1/identity", identity).await.assert_error(422, 3908);
    let routed = production.post_as(&key, "/v1/possession", json!({"phone": "4155550123"})).await;
    assert_eq!(routed.status, 201, "{}", routed.text);
    assert_eq!(routed.body["provider"], "idme");
}

/// Runs `handset serve` and returns its exit status and stderr; a serve
/// that starts is stopped once it answers, and `None` says it started.
pub(crate) async fn serve_once(config: Option<&str>, env: &[(&str, &str)]) -> Option<String> {
    let dir = std::env::temp_dir().join(format!("handset-prod-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(HANDSET);
    command.arg("serve");
    if let Some(toml) = config {
        let file = dir.join("production.toml");
        std::fs::write(&file, toml).unwrap();
        command.arg("--config").arg(file);
    }
    let database = format!("sqlite://{}", dir.join("handset.db").display());
    let mut child = command
        .env("HANDSET__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("HANDSET__DATABASE__URL", &database)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = crate::helpers::http_client();
    let mut outcome = None;
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "a refused start exits non-zero");
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            outcome = Some(stderr);
            break;
        }
        if client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_incomplete_production_configuration() {
    // The shipped defaults route everything to the sandbox and lack the rest.
    let refused = serve_once(None, &[("HANDSET__ENVIRONMENT", "production")]).await.expect("serve refused");
    for key in ["routing.rules", "sandbox", "server.public_url", "security.code_pepper"] {
        assert!(refused.contains(key), "{key} is named:\n{refused}");
    }

    // Complete but for the per-phone limit while ID.me sends SMS.
    let config = production_config("http://127.0.0.1:9");
    let no_limit = serve_once(Some(&config), &[("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "0")]).await;
    let refused = no_limit.expect("serve refused without a per-phone limit");
    assert!(refused.contains("rate_limits.per_phone_per_hour"), "{refused}");
    assert!(!refused.contains("server.public_url"), "only what is missing is named:\n{refused}");

    // The published development pepper is not a production secret.
    let dev_pepper = [("HANDSET__SECURITY__CODE_PEPPER", handset_core::secret::DEVELOPMENT_CODE_PEPPER)];
    let refused = serve_once(Some(&config), &dev_pepper).await.expect("serve refused the development pepper");
    assert!(refused.contains("security.code_pepper"), "{refused}");

    assert_eq!(serve_once(Some(&config), &[]).await, None, "a complete production configuration starts");
}

/// The stored hash of a sandbox code is HMAC-SHA256 keyed by the pepper:
/// neither the unkeyed hash nor the development pepper finds the code.
async fn codes_are_keyed_by_the_pepper(kind: Kind) {
    let app = TestApp::spawn_with(kind, &[("HANDSET__SECURITY__CODE_PEPPER", PEPPER)]).await;
    let id = app.start_sms("4155550123").await.id();
    let stored = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().code_hash.unwrap();
    let tx_id = uuid::Uuid::parse_str(&id).unwrap();
    let keyed = |pepper: &str| {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(pepper.as_bytes()).unwrap();
        mac.update(tx_id.as_bytes());
        mac.update(b":123123");
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(stored, keyed(PEPPER));
    assert_ne!(stored, keyed(handset_core::secret::DEVELOPMENT_CODE_PEPPER));
    let unkeyed = hex::encode(Sha256::digest([tx_id.as_bytes().as_slice(), b":123123"].concat()));
    assert_ne!(stored, unkeyed, "a dump alone cannot be searched for the code");
    assert_eq!(app.confirm(&id, "123123").await.status, 200);
}

/// Only sends that are attempted count against a number: requests refused
/// for their verification, product or routing cost it nothing.
async fn per_phone_limit_counts_attempted_sends_only(kind: Kind) {
    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "2")]).await;
    let (_, identity_only) = app.partner(&[Product::Identity]).await;
    let (_, stranger) = app.partner(Product::ALL).await;
    let foreign = app.post_as(&stranger, "/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27"}));
    let foreign_verification = foreign.await.body["verification_id"].as_str().unwrap().to_owned();
    let phone = "4155550199";
    for _ in 0..3 {
        let unknown = json!({"phone": phone, "verification_id": uuid::Uuid::new_v4()});
        app.post("/v1/possession", unknown).await.assert_error(404, 4100);
        let theirs = json!({"phone": phone, "verification_id": foreign_verification});
        app.post("/v1/possession", theirs).await.assert_error(403, 3300);
        app.post("/v1/possession", json!({"phone": phone, "provider": "veratad"})).await.assert_error(422, 3908);
        app.post_as(&identity_only, "/v1/possession", json!({"phone": phone})).await.assert_error(403, 2300);
    }
    assert_eq!(app.start_sms(phone).await.status, 201);
    assert_eq!(app.start_sms(phone).await.status, 201);
    let limited = app.start_sms(phone).await;
    limited.assert_error(429, 5300);
    assert!(limited.headers.contains_key("retry-after"));
}

crate::on_both_kinds!(
    production_has_no_sandbox_and_no_development_partner,
    codes_are_keyed_by_the_pepper,
    per_phone_limit_counts_attempted_sends_only,
);
