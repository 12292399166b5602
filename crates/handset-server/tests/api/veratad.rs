//! The gateway routed to Veratad, with `handset-sim` standing in for it (and
//! for ID.me in the failover chain): the code flow with its continuation kept
//! server-side, names, documented failures, country lists, failover from
//! ID.me, and credentials that never reach a log or a row.

use handset_sim::faults::Faults;
use handset_sim::veratad::VeratadConfig;
use handset_sim::{Sim, SimConfig};
use handset_testkit::{Kind, TestDatabase};
use serde_json::{Value, json};

use crate::helpers::TestApp;

const USER: &str = "veratad-api-user-7781";
const PASS: &str = "veratad-api-pass-7781";

async fn sim() -> Sim {
    let veratad = VeratadConfig { user: USER.into(), pass: PASS.into(), ..VeratadConfig::default() };
    Sim::start("127.0.0.1:0", SimConfig { veratad, ..SimConfig::default() }).await.unwrap()
}

fn veratad_env(sim: &Sim) -> Vec<(&'static str, String)> {
    vec![
        ("HANDSET__PROVIDERS__VERATAD__BASE_URL", sim.base_url()),
        ("HANDSET__PROVIDERS__VERATAD__USER", USER.into()),
        ("HANDSET__PROVIDERS__VERATAD__PASS", PASS.into()),
        ("HANDSET__PROVIDERS__VERATAD__TIMEOUT", "2s".into()),
    ]
}

async fn app(kind: Kind, sim: &Sim, rules: &str, extra: &[(&str, &str)]) -> TestApp {
    let env = veratad_env(sim);
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.extend_from_slice(extra);
    TestApp::spawn_with_config(kind, rules, &pairs).await
}

const SMS_TO_VERATAD: &str = r#"
[[routing.rules]]
product = "possession.sms"
providers = ["veratad"]
"#;

fn ada(phone: &str) -> Value {
    json!({"phone": phone, "name": {"first": "Ada", "last": "Lovelace"}})
}

async fn stored_ref(app: &TestApp, id: &str) -> String {
    app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap()
}

async fn code_flow(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, "", &[]).await;
    let forced = json!({"phone": "4155550123", "provider": "veratad", "name": {"first": "Ada", "last": "Lovelace"}});
    let started = app.post("/v1/possession", forced).await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["provider"], "veratad");
    assert_eq!(started.body["status"]["code"], 210);
    assert_eq!(started.body["next_action"]["type"], "enter_code");
    let id = started.id();
    let first = stored_ref(&app, &id).await;
    let token = first.split(' ').next().unwrap().to_owned();
    assert!(!started.text.contains(&token), "the continuation token stays with handset");

    app.confirm(&id, "000000").await.assert_error(422, 3102);
    let renewed = stored_ref(&app, &id).await;
    assert_ne!(renewed, first, "the token Veratad renewed is stored");
    assert_eq!(app.transaction(&id).await.body["next_action"]["attempts_remaining"], 4);
    let pin = sim.veratad.pin(&id).expect("the sim sent a PIN for our transaction");
    let confirmed = app.confirm(&id, &pin).await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    assert_eq!(confirmed.body["status"]["code"], 200);
    assert_eq!(confirmed.body["result"]["phone"], "+14155550123");
    assert!(!confirmed.text.contains(&token));

    // Forced without a name: 3905.
    let nameless = json!({"phone": "4155550124", "provider": "veratad"});
    app.post("/v1/possession", nameless).await.assert_error(422, 3905);
}

/// Veratad as the SMS default: names are required when it is the only
/// candidate, documented failures are final 300 with Veratad's words, and a
/// check Veratad has closed refuses every further code (even the right one)
/// until handset's own attempts end it.
async fn documented_outcomes(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, SMS_TO_VERATAD, &[]).await;
    app.start_sms("4155550123").await.assert_error(422, 3905);

    sim.veratad.set_line_type("4155550150", "landline");
    let landline = app.post("/v1/possession", ada("4155550150")).await;
    assert_eq!(landline.status, 201, "{}", landline.text);
    assert_eq!(landline.body["status"]["code"], 300);
    assert_eq!(landline.body["result"]["errors"][0]["code"], 1010);
    assert_eq!(landline.body["result"]["errors"][0]["provider_code"], "FAIL: SUPPRESSED SENDING CODE");
    let unsent = app.post("/v1/possession", ada("4155550001")).await;
    assert_eq!(unsent.body["result"]["errors"][0]["provider_code"], "FAIL: FAILED TO SEND TO NUMBER");
    let invalid = app.post("/v1/possession", ada("4155550000")).await;
    assert_eq!(invalid.body["result"]["errors"][0]["code"], 1001);

    sim.veratad.set_config(VeratadConfig { max_attempts: 2, ..sim.veratad.config() });
    let id = app.post("/v1/possession", ada("4155550160")).await.id();
    app.confirm(&id, "000000").await.assert_error(422, 3102);
    app.confirm(&id, "000001").await.assert_error(422, 3102);
    let pin = sim.veratad.pin(&id).unwrap();
    for _ in 0..2 {
        app.confirm(&id, &pin).await.assert_error(422, 3102);
    }
    app.confirm(&id, &pin).await.assert_error(422, 3104);
    let ended = app.transaction(&id).await.body;
    assert_eq!(ended["status"]["code"], 300, "{ended}");
    assert_eq!(ended["result"]["errors"][0]["code"], 3104);
}

/// A number the country lists exclude: Veratad cannot serve it, so with no
/// other provider the answer is 422 3908, recorded as a final 300.
async fn country_lists_make_it_ineligible(kind: Kind) {
    let sim = sim().await;
    let whitelist = ("HANDSET__PROVIDERS__VERATAD__COUNTRY_WHITELIST", "FR,DE");
    let limited = ("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "1");
    let app = app(kind, &sim, SMS_TO_VERATAD, &[whitelist, limited]).await;
    for _ in 0..2 {
        let refused = app.post("/v1/possession", ada("4155550123")).await;
        refused.assert_error(422, 3908);
    }
    let rows = app.dump("transactions", "CAST(status_code AS TEXT) || ' ' || provider").await;
    assert_eq!(rows.lines().collect::<Vec<_>>(), ["300 veratad", "300 veratad"], "each attempt is recorded");
    assert!(sim.veratad.transactions().is_empty(), "nothing was sent");

    // Ineligible and unavailable in one chain: the unavailability decides (503).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let closed_url = format!("http://127.0.0.1:{closed}");
    let chain = "[[routing.rules]]\nproduct = \"possession.sms\"\nproviders = [\"veratad\", \"idme\"]\n";
    let idme = [
        ("HANDSET__PROVIDERS__IDME__BASE_URL", closed_url.as_str()),
        ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
        whitelist,
    ];
    let app = crate::veratad::app(kind, &sim, chain, &idme).await;
    app.post("/v1/possession", ada("4155550123")).await.assert_error(503, 5001);
}

/// A US SMS chain `idme, veratad`: ID.me unavailable before anything reached
/// the user (503, connection refused, breaker open) fails over to Veratad;
/// a send ID.me may have made (hang, timeout) does not.
async fn idme_fails_over_to_veratad(kind: Kind) {
    let veratad_sim = sim().await;
    let idme_sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    let chain = r#"
[[routing.rules]]
product = "possession.sms"
providers = ["idme", "veratad"]
"#;
    let idme_url = idme_sim.base_url();
    let idme = [
        ("HANDSET__PROVIDERS__IDME__BASE_URL", idme_url.as_str()),
        ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
        ("HANDSET__PROVIDERS__IDME__TIMEOUT", "300ms"),
        ("HANDSET__CIRCUIT_BREAKER__FAILURE_THRESHOLD", "2"),
        ("HANDSET__CIRCUIT_BREAKER__OPEN_FOR", "1h"),
    ];
    let app = app(kind, &veratad_sim, chain, &idme).await;
    assert_eq!(app.post("/v1/possession", ada("4155550123")).await.body["provider"], "idme");

    for (status, phone) in [(503, "4155550124"), (502, "4155550125")] {
        idme_sim.set_faults(Faults { error_rate: 1.0, error_status: Some(status), ..Faults::default() });
        let answer = app.post("/v1/possession", ada(phone)).await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.body["provider"], "veratad", "{status} fails over");
    }
    let idme_calls = idme_sim.requests();
    let answer = app.post("/v1/possession", ada("4155550126")).await;
    assert_eq!(answer.body["provider"], "veratad");
    assert_eq!(idme_sim.requests(), idme_calls, "the breaker is open: ID.me is not called");
    // Without a name Veratad is skipped, and ID.me is paused: no provider is left.
    app.start_sms("4155550127").await.assert_error(503, 5001);

    // A fresh app: ID.me answering 500 or 504, or hanging, after the request
    // went out is not failed over (the code may be on its way).
    let patient = [idme[0], idme[1], idme[2], ("HANDSET__CIRCUIT_BREAKER__FAILURE_THRESHOLD", "10")];
    let app = crate::veratad::app(kind, &veratad_sim, chain, &patient).await;
    let sent_before = veratad_sim.veratad.transactions().len();
    for (faults, phone) in [
        (Faults { error_rate: 1.0, error_status: Some(500), ..Faults::default() }, "4155550128"),
        (Faults { error_rate: 1.0, error_status: Some(504), ..Faults::default() }, "4155550130"),
        (Faults { hang: true, ..Faults::default() }, "4155550131"),
    ] {
        idme_sim.set_faults(faults);
        app.post("/v1/possession", ada(phone)).await.assert_error(503, 5001);
    }
    assert_eq!(veratad_sim.veratad.transactions().len(), sent_before, "no second provider after an ambiguous send");

    // ID.me not listening at all: nothing was sent, Veratad takes it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let closed_url = format!("http://127.0.0.1:{closed}");
    let refused = [("HANDSET__PROVIDERS__IDME__BASE_URL", closed_url.as_str()), idme[1], idme[2]];
    let app = crate::veratad::app(kind, &veratad_sim, chain, &refused).await;
    assert_eq!(app.post("/v1/possession", ada("4155550129")).await.body["provider"], "veratad");
}

/// A wrong and the right code at once: whichever reaches Veratad first, the
/// other uses a token that may have been renewed meanwhile, and the gateway
/// asks again with the stored one. A race never ends the check: at worst the
/// right code counts as a wrong one, and the user's next try passes.
async fn concurrent_confirms_settle_on_the_right_code(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, SMS_TO_VERATAD, &[]).await;
    for round in 0..4 {
        let id = app.post("/v1/possession", ada(&format!("415555{:04}", 100 + round))).await.id();
        let pin = sim.veratad.pin(&id).unwrap();
        let (wrong, right) = tokio::join!(app.confirm(&id, "000000"), app.confirm(&id, &pin));
        assert!(matches!(wrong.status.as_u16(), 200 | 422), "{}", wrong.text);
        if right.status != 200 {
            right.assert_error(422, 3102);
            let retried = app.confirm(&id, &pin).await;
            assert_eq!(retried.status, 200, "round {round}: {}", retried.text);
        }
        assert_eq!(app.transaction(&id).await.body["status"]["code"], 200);
    }
}

crate::on_both_kinds!(
    code_flow,
    documented_outcomes,
    country_lists_make_it_ineligible,
    idme_fails_over_to_veratad,
    concurrent_confirms_settle_on_the_right_code,
);

/// The real binary through a whole Veratad flow at debug level: the
/// account's user and password appear in no log line and no stored row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_logs_or_rows() {
    let sim = sim().await;
    let db = TestDatabase::sqlite();
    let env = veratad_env(&sim);
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("RUST_LOG", "debug"));
    let server = crate::processes::Server::start(&db, &extra).await;
    let forced = json!({"phone": "4155550123", "provider": "veratad", "name": {"first": "Ada", "last": "Lovelace"}});
    let started = server.post("/v1/possession", &forced).await;
    let id = started["transaction_id"].as_str().unwrap().to_owned();
    let pin = sim.veratad.pin(&id).unwrap();
    for code in ["000000", pin.as_str()] {
        server.post(&format!("/v1/possession/{id}/confirm"), &json!({"code": code})).await;
    }
    let confirmed = server.get(&format!("/v1/transactions/{id}")).await;
    assert_eq!(confirmed["status"]["code"], 200, "{confirmed}");
    let logs = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        logs.contains("/v1/possession/{transaction_id}/confirm") && logs.contains("DEBUG"),
        "the log is the debug log of the whole flow:\n{logs}"
    );
    for secret in [USER, PASS, pin.as_str()] {
        assert!(!logs.contains(secret), "{secret:?} leaked into the logs");
    }
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db.url).await.unwrap();
    let rows: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT provider_ref, CAST(result AS TEXT) FROM transactions")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let stored = format!("{rows:?}");
    assert!(!stored.contains(USER) && !stored.contains(PASS), "{stored}");
}
