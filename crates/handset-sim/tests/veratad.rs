//! Veratad's PhoneMatch5.0.SMS over real HTTP: the send, the PIN check, the
//! mocks by number, the admin endpoints and injected faults.

use handset_sim::faults::Faults;
use handset_sim::{Sim, SimConfig};
use serde_json::{Value, json};

async fn sim() -> Sim {
    handset_sim::install_crypto_provider();
    Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap()
}

fn send_body(reference: &str, phone: &str, do_not_send_to_types: &[&str]) -> Value {
    json!({
        "user": "sim-user",
        "pass": "sim-pass",
        "service": "PhoneMatch5.0.SMS",
        "reference": reference,
        "options": {"outofband": {
            "message": "Hello {fn}, your one-time password is {pin}",
            "do_not_send_to_types": do_not_send_to_types,
        }},
        "target": {"fn": "John", "ln": "Smith", "phone": phone},
    })
}

async fn post(sim: &Sim, path: &str, body: &Value) -> (u16, Value) {
    let answer = reqwest::Client::new().post(format!("{}{path}", sim.base_url())).json(body).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

async fn send(sim: &Sim, body: &Value) -> (u16, Value) {
    post(sim, "/process/comprehensive/gateway", body).await
}

async fn check(sim: &Sim, token: &str, key: &str) -> (u16, Value) {
    post(sim, "/process/continue", &json!({"token": token, "codematch": {"key": key}})).await
}

fn result(answer: &Value) -> (&str, &str) {
    (answer["result"]["action"].as_str().unwrap(), answer["result"]["detail"].as_str().unwrap())
}

fn token(answer: &Value) -> String {
    answer["continuations"]["outofband"]["template"]["token"].as_str().unwrap().to_owned()
}

fn wrong(pin: &str) -> &'static str {
    if pin == "000000" { "111111" } else { "000000" }
}

async fn admin_pin(sim: &Sim, reference: &str) -> String {
    let url = format!("{}/_admin/veratad/pin/{reference}", sim.base_url());
    let answer: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    answer["pin"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn pending_then_pass() {
    let sim = sim().await;
    let (status, sent) = send(&sim, &send_body("ref-pass", "2015106000", &["landline", "voip"])).await;
    assert_eq!(status, 200);
    assert_eq!(result(&sent), ("PENDING", "TRANSACTION REQUIRES FURTHER ATTENTION"));
    assert_eq!(sent["result"]["issues"], json!([]));
    assert_eq!(sent["output"], json!({"outofband": {}}));
    let meta = &sent["meta"];
    assert!(meta["confirmation"].is_u64());
    assert_eq!(meta["reference"], "ref-pass");
    assert_eq!(meta["service"], "PhoneMatch5.0.SMS");
    assert_eq!(meta["user"], "sim-user");
    let timestamp = meta["timestamp"].as_str().unwrap();
    assert!(chrono::NaiveDateTime::parse_from_str(timestamp, "%Y-%m-%d %H:%M:%S").is_ok(), "{timestamp}");
    let outofband = &sent["continuations"]["outofband"];
    assert_eq!(outofband["url"], "/process/continue");
    assert_eq!(outofband["template"]["codematch"], json!({"key": null}));
    assert!(outofband["instructions"].is_string());
    let token = token(&sent);
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{token}");

    let pin = admin_pin(&sim, "ref-pass").await;
    assert_eq!(pin.len(), 6);
    assert_eq!(sim.veratad.pin("ref-pass").as_deref(), Some(pin.as_str()));
    let tx = sim.veratad.transactions().into_iter().find(|t| t.reference.as_deref() == Some("ref-pass")).unwrap();
    assert_eq!(tx.message.as_deref(), Some(format!("Hello John, your one-time password is {pin}").as_str()));
    assert_eq!(tx.line_type.as_deref(), Some("mobile"));
    let listed: Value =
        reqwest::get(format!("{}/_admin/veratad/transactions", sim.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["pin"], pin.as_str());
    assert_eq!(listed[0]["token"], token.as_str());
    assert_eq!(listed[0]["action"], "PENDING");

    let (status, passed) = check(&sim, &token, &pin).await;
    assert_eq!(status, 200);
    assert_eq!(result(&passed), ("PASS", "ALL CHECKS PASSED"));
    assert_eq!(passed["output"]["codematch"]["key_matched"], true);
    assert_eq!(passed["final"]["url"], "/process/status");
    assert_eq!(passed["final"]["template"]["token"].as_str().unwrap().len(), 32);
    assert_eq!(passed["meta"]["reference"], "ref-pass");
    assert!(passed.get("continuations").is_none());
    // A retried continue answers the same PASS.
    assert_eq!(check(&sim, &token, &pin).await, (200, passed));
}

#[tokio::test]
async fn wrong_key_renews_the_token() {
    let sim = sim().await;
    let (_, sent) = send(&sim, &send_body("ref-wrong", "+12015106000", &[])).await;
    assert_eq!(result(&sent).0, "PENDING");
    let first = token(&sent);
    let pin = sim.veratad.pin("ref-wrong").unwrap();

    let (status, failed) = check(&sim, &first, wrong(&pin)).await;
    assert_eq!(status, 200);
    assert_eq!(result(&failed), ("FAIL", "FAILED OUT-OF-BAND CHECK"));
    assert_eq!(failed["output"]["codematch"]["key_matched"], false);
    assert_eq!(failed["meta"]["reference"], "ref-wrong");
    let second = token(&failed);
    assert_ne!(second, first);
    let (status, gone) = check(&sim, &first, &pin).await;
    assert_eq!(status, 404);
    assert!(gone["error"].is_string());

    let (_, passed) = check(&sim, &second, &pin).await;
    assert_eq!(result(&passed), ("PASS", "ALL CHECKS PASSED"));
    assert_eq!(passed["output"]["codematch"]["key_matched"], true);
}

#[tokio::test]
async fn wrong_keys_run_out() {
    let sim = sim().await;
    let (_, sent) = send(&sim, &send_body("ref-limit", "2015106000", &[])).await;
    let pin = sim.veratad.pin("ref-limit").unwrap();
    let mut current = token(&sent);
    for _ in 0..4 {
        let (_, failed) = check(&sim, &current, wrong(&pin)).await;
        assert_eq!(result(&failed), ("FAIL", "FAILED OUT-OF-BAND CHECK"));
        current = token(&failed);
    }
    let (_, last) = check(&sim, &current, wrong(&pin)).await;
    assert_eq!(result(&last), ("FAIL", "FAILED OUT-OF-BAND CHECK"));
    assert!(last.get("continuations").is_none());
    // Closed: even the right key fails now.
    let (status, after) = check(&sim, &current, &pin).await;
    assert_eq!(status, 200);
    assert_eq!(result(&after), ("FAIL", "FAILED OUT-OF-BAND CHECK"));
    assert!(after.get("continuations").is_none());
}

#[tokio::test]
async fn line_types_are_suppressed() {
    let sim = sim().await;
    let (status, landline) = send(&sim, &send_body("ref-landline", "2015551111", &["landline"])).await;
    assert_eq!(status, 200);
    assert_eq!(result(&landline), ("FAIL", "SUPPRESSED SENDING CODE"));
    assert!(landline.get("continuations").is_none());
    assert_eq!(sim.veratad.pin("ref-landline"), None);
    let (_, voip) = send(&sim, &send_body("ref-voip", "2015552222", &["voip"])).await;
    assert_eq!(result(&voip), ("FAIL", "SUPPRESSED SENDING CODE"));
    let (_, mobile) = send(&sim, &send_body("ref-mobile", "2015553333", &["landline", "voip"])).await;
    assert_eq!(result(&mobile).0, "PENDING");

    // The admin endpoint sets a number's line type.
    let set = reqwest::Client::new()
        .put(format!("{}/_admin/veratad/line-types/2015553333", sim.base_url()))
        .json(&json!({"line_type": "voip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let (_, now_voip) = send(&sim, &send_body("ref-set", "2015553333", &["voip"])).await;
    assert_eq!(result(&now_voip), ("FAIL", "SUPPRESSED SENDING CODE"));
    sim.veratad.set_line_type("2015554444", "landline");
    let (_, now_landline) = send(&sim, &send_body("ref-set-rust", "12015554444", &["landline"])).await;
    assert_eq!(result(&now_landline), ("FAIL", "SUPPRESSED SENDING CODE"));

    let (status, _) = send(&sim, &send_body("ref-bad-type", "2015553333", &["pager"])).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn countries_are_refused() {
    let sim = sim().await;
    let with_country = |reference: &str, country: Value| {
        let mut body = send_body(reference, "2015106000", &[]);
        body["options"]["outofband"]["country"] = country;
        body
    };
    let (_, blacklisted) = send(&sim, &with_country("ref-black", json!({"blacklist": ["US"]}))).await;
    assert_eq!(result(&blacklisted), ("FAIL", "SUPPRESSED SENDING CODE"));
    let (_, not_listed) = send(&sim, &with_country("ref-white", json!({"whitelist": ["CA"]}))).await;
    assert_eq!(result(&not_listed), ("FAIL", "SUPPRESSED SENDING CODE"));
    let (_, listed) = send(&sim, &with_country("ref-us", json!({"blacklist": ["CA"], "whitelist": ["US"]}))).await;
    assert_eq!(result(&listed).0, "PENDING");
}

#[tokio::test]
async fn invalid_numbers_fail_the_data_check() {
    let sim = sim().await;
    for phone in ["12345", "2015550000", "+442071838750", "201-510-6000"] {
        let (status, answer) = send(&sim, &send_body("ref-invalid", phone, &[])).await;
        assert_eq!(status, 200, "{phone}");
        assert_eq!(result(&answer), ("FAIL", "DATA CHECK FAILED"), "{phone}");
        assert!(answer.get("continuations").is_none());
    }
    let missing = reqwest::get(format!("{}/_admin/veratad/pin/ref-invalid", sim.base_url())).await.unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn sending_can_fail() {
    let sim = sim().await;
    let (status, answer) = send(&sim, &send_body("ref-unsent", "2015550001", &[])).await;
    assert_eq!(status, 200);
    assert_eq!(result(&answer), ("FAIL", "FAILED TO SEND TO NUMBER"));
    assert!(answer.get("continuations").is_none());
}

#[tokio::test]
async fn requests_are_checked() {
    let sim = sim().await;
    let mut wrong_pass = send_body("ref-auth", "2015106000", &[]);
    wrong_pass["pass"] = json!("nope");
    assert_eq!(send(&sim, &wrong_pass).await, (401, json!({"error": "invalid credentials"})));

    let mut wrong_service = send_body("ref-service", "2015106000", &[]);
    wrong_service["service"] = json!("IDMatch5.0");
    assert_eq!(send(&sim, &wrong_service).await.0, 400);

    let mut no_last_name = send_body("ref-name", "2015106000", &[]);
    no_last_name["target"].as_object_mut().unwrap().remove("ln");
    assert_eq!(send(&sim, &no_last_name).await.0, 400);

    let (status, answer) = check(&sim, "o76m3nvz94jvaatfsmespzgx3qkzjjl1", "123456").await;
    assert_eq!(status, 404);
    assert!(answer["error"].is_string());

    // The admin config changes the credentials at run time.
    let config = json!({"user": "other", "pass": "secret", "company": "Company ABC, Inc.", "max_attempts": 3});
    let set =
        reqwest::Client::new().put(format!("{}/_admin/veratad", sim.base_url())).json(&config).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let read: Value = reqwest::get(format!("{}/_admin/veratad", sim.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(read, config);
    assert_eq!(send(&sim, &send_body("ref-old", "2015106000", &[])).await.0, 401);
    let mut new_credentials = send_body("ref-new", "2015106000", &[]);
    new_credentials["user"] = json!("other");
    new_credentials["pass"] = json!("secret");
    let (status, answer) = send(&sim, &new_credentials).await;
    assert_eq!(status, 200);
    assert_eq!(answer["meta"]["company"], "Company ABC, Inc.");
    assert_eq!(answer["meta"]["user"], "other");
}

#[tokio::test]
async fn faults_apply_to_veratad() {
    let sim = sim().await;
    let (_, sent) = send(&sim, &send_body("ref-fault", "2015106000", &[])).await;
    let token = token(&sent);
    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    assert_eq!(send(&sim, &send_body("ref-fault", "2015106000", &[])).await.0, 503);
    assert_eq!(check(&sim, &token, "000000").await.0, 503);
    // Admin endpoints are not subject to faults.
    assert_eq!(admin_pin(&sim, "ref-fault").await.len(), 6);
    sim.set_faults(Faults::default());
    let pin = sim.veratad.pin("ref-fault").unwrap();
    assert_eq!(result(&check(&sim, &token, &pin).await.1), ("PASS", "ALL CHECKS PASSED"));
}
