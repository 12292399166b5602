//! Adaptive routing over real HTTP, with `handset-sim` standing in for ID.me
//! and Veratad: a user who confirms only the codes that reached their inbox
//! makes each provider's conversion what the sim's delivery rate says, and
//! the adaptive rule moves US SMS starts to the provider that delivers, then
//! back when the other recovers. Also: every transaction says how it was routed.

use std::time::{Duration, Instant};

use handset_sim::delivery::DeliveryRates;
use handset_sim::idme::IdmeConfig;
use handset_sim::veratad::VeratadConfig;
use handset_sim::{Sim, SimConfig};
use handset_testkit::Kind;
use serde_json::json;
use tokio::sync::Mutex;

use crate::helpers::TestApp;

const VERATAD_USER: &str = "veratad-adaptive-user";
const VERATAD_PASS: &str = "veratad-adaptive-pass";

const ADAPTIVE_SMS: &str = r#"
[[routing.rules]]
product = "possession.sms"
providers = ["idme", "veratad"]
strategy = "adaptive"
"#;

/// Codes live a second, so undelivered ones end quickly; six-second windows
/// read again every half second; one start in ten explores.
const FAST_FEEDBACK: &[(&str, &str)] = &[
    ("HANDSET__POSSESSION__CODE_TTL", "1s"),
    ("HANDSET__WORKERS__POLL_INTERVAL", "100ms"),
    ("HANDSET__ROUTING__ADAPTIVE__WINDOW", "6s"),
    ("HANDSET__ROUTING__ADAPTIVE__MIN_SAMPLES", "5"),
    ("HANDSET__ROUTING__ADAPTIVE__EXPLORE", "0.1"),
    ("HANDSET__ROUTING__ADAPTIVE__SEED", "7"),
];

fn rates(idme: f64) -> DeliveryRates {
    DeliveryRates { idme, veratad: 0.95, seed: 11 }
}

async fn sim() -> Sim {
    let config = SimConfig {
        idme: IdmeConfig::default(),
        veratad: VeratadConfig { user: VERATAD_USER.into(), pass: VERATAD_PASS.into(), ..VeratadConfig::default() },
        delivery: rates(0.4),
        ..SimConfig::default()
    };
    Sim::start("127.0.0.1:0", config).await.unwrap()
}

/// The app routed to the sim; `extra` settings replace the ones above.
async fn app(kind: Kind, sim: &Sim, rules: &str, extra: &[(&str, &str)]) -> TestApp {
    let base = sim.base_url();
    let mut env = vec![
        ("HANDSET__PROVIDERS__IDME__BASE_URL", base.as_str()),
        ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
        ("HANDSET__PROVIDERS__VERATAD__BASE_URL", base.as_str()),
        ("HANDSET__PROVIDERS__VERATAD__USER", VERATAD_USER),
        ("HANDSET__PROVIDERS__VERATAD__PASS", VERATAD_PASS),
    ];
    env.extend_from_slice(FAST_FEEDBACK);
    env.retain(|(key, _)| !extra.iter().any(|(replaced, _)| replaced == key));
    env.extend_from_slice(extra);
    TestApp::spawn_with_config(kind, rules, &env).await
}

/// A distinct US mobile number per start (the sims' mock endings avoided).
fn number(i: u32) -> String {
    format!("+1212{:07}", 3_000_000 + i * 3 + 7)
}

/// What one start was routed to.
struct Routed {
    at: Instant,
    provider: String,
    reason: String,
}

/// Plays users for `run`: each of six sequential users starts an SMS check
/// about every 100 ms and enters the code only if it reached the inbox.
async fn users(app: &TestApp, sim: &Sim, next: &Mutex<u32>, run: Duration) -> Vec<Routed> {
    let until = Instant::now() + run;
    let one_user = || async {
        let mut routed = Vec::new();
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        while Instant::now() < until {
            pace.tick().await;
            let phone = {
                let mut next = next.lock().await;
                *next += 1;
                number(*next)
            };
            let started =
                app.post("/v1/possession", json!({"phone": phone, "name": {"first": "Ada", "last": "Lovelace"}})).await;
            assert_eq!(started.status, 201, "{}", started.text);
            let routing = &started.body["routing"];
            assert_eq!(routing["strategy"], "adaptive", "{routing}");
            assert_eq!(started.body["provider"], routing["order"][0], "{routing}");
            routed.push(Routed {
                at: Instant::now(),
                provider: started.body["provider"].as_str().unwrap().to_owned(),
                reason: routing["reason"].as_str().unwrap().to_owned(),
            });
            if let Some(message) = sim.delivery.inbox(&phone).last() {
                let confirmed = app.confirm(&started.id(), &message.code).await;
                assert_eq!(confirmed.body["status"]["code"], 200, "{}", confirmed.text);
            }
        }
        routed
    };
    let (a, b, c, d, e, f) = tokio::join!(one_user(), one_user(), one_user(), one_user(), one_user(), one_user());
    let mut all: Vec<Routed> = [a, b, c, d, e, f].into_iter().flatten().collect();
    all.sort_by_key(|r| r.at);
    all
}

fn share(routed: &[Routed], provider: &str) -> f64 {
    routed.iter().filter(|r| r.provider == provider).count() as f64 / routed.len().max(1) as f64
}

fn reasons(routed: &[Routed]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for r in routed {
        *counts.entry(r.reason.as_str()).or_default() += 1;
    }
    format!("{counts:?}")
}

async fn traffic_follows_delivery(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, ADAPTIVE_SMS, &[]).await;
    let next = Mutex::new(0);

    // ID.me delivers 40 %, Veratad 95 %. Warm-up, then the measure.
    let warm_up = users(&app, &sim, &next, Duration::from_secs(8)).await;
    assert!(
        ["warming_up", "explore"].contains(&warm_up[0].reason.as_str()),
        "the listed order until both are measured: {}",
        warm_up[0].reason
    );
    let settled = users(&app, &sim, &next, Duration::from_secs(8)).await;
    let veratad = share(&settled, "veratad");
    assert!(veratad > 0.8, "{:.2} of {} starts went to Veratad ({})", veratad, settled.len(), reasons(&settled));
    assert!(settled.iter().any(|r| r.reason == "explore" && r.provider == "idme"), "ID.me is still measured");

    // ID.me recovers: within a few windows its share climbs back. Equal
    // again, it is first again, as listed.
    sim.delivery.set_rates(rates(0.95));
    users(&app, &sim, &next, Duration::from_secs(12)).await;
    let recovered = users(&app, &sim, &next, Duration::from_secs(8)).await;
    let idme = share(&recovered, "idme");
    assert!(
        idme > 0.6,
        "ID.me took {:.2} of {} starts after recovering, {:.2} before ({})",
        idme,
        recovered.len(),
        share(&settled, "idme"),
        reasons(&recovered)
    );

    // The decisions are kept on the transactions and counted.
    let last =
        app.post("/v1/possession", json!({"phone": number(0), "name": {"first": "Ada", "last": "Lovelace"}})).await;
    let stored = app.transaction(&last.id()).await;
    assert_eq!(stored.body["routing"], last.body["routing"]);
    let scores = stored.body["routing"]["scores"].as_array().expect("an adaptive decision shows its scores");
    assert_eq!(scores.len(), 2, "{scores:?}");
    for score in scores {
        assert!(score["samples"].as_i64().unwrap() > 0 && score["score"].as_f64().is_some(), "{score}");
    }
    let metrics = app.get("/metrics").await.text;
    assert!(
        metrics.lines().any(|l| l.starts_with("handset_routing_decisions_total")
            && l.contains("strategy=\"adaptive\"")
            && l.contains("reason=\"score\"")),
        "{metrics}"
    );
}

/// ID.me unreachable: each start fails over to Veratad, and ID.me's
/// unavailable answers count against it until Veratad goes first.
async fn unavailable_answers_count_against_a_provider(kind: Kind) {
    let sim = sim().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let extra = [
        ("HANDSET__PROVIDERS__IDME__BASE_URL", unreachable.as_str()),
        ("HANDSET__ROUTING__ADAPTIVE__EXPLORE", "0"),
        // Every answer reaches ID.me: its breaker never skips it here.
        ("HANDSET__CIRCUIT_BREAKER__FAILURE_THRESHOLD", "1000"),
    ];
    let app = app(kind, &sim, ADAPTIVE_SMS, &extra).await;
    sim.delivery.set_rates(DeliveryRates { idme: 1.0, veratad: 1.0, seed: 11 });
    let mut last = serde_json::Value::Null;
    for i in 0..30 {
        let phone = number(100 + i);
        let started =
            app.post("/v1/possession", json!({"phone": phone, "name": {"first": "Ada", "last": "Lovelace"}})).await;
        assert_eq!(started.status, 201, "{}", started.text);
        assert_eq!(started.body["provider"], "veratad", "failed over: {}", started.text);
        let code = sim.delivery.inbox(&phone).last().expect("Veratad delivers everything").code.clone();
        assert_eq!(app.confirm(&started.id(), &code).await.body["status"]["code"], 200);
        last = started.body["routing"].clone();
        if last["order"][0] == "veratad" {
            break;
        }
        // A fresh reading of the outcomes comes every window / 10.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(last["order"], json!(["veratad", "idme"]), "{last}");
    assert_eq!(last["reason"], "score", "{last}");
    let idme = &last["scores"][0];
    assert_eq!((idme["provider"].as_str(), idme["succeeded"].as_i64()), (Some("idme"), Some(0)), "{last}");
    assert!(idme["samples"].as_i64().unwrap() >= 5, "its unavailable answers are its samples: {last}");
}

/// The scores read what ended in the window: not what ended before it, not
/// what is pending, not "no provider can serve this number" (3908).
async fn scores_count_what_ended_in_the_window(kind: Kind) {
    use handset_core::error::ErrorCode;
    use handset_core::model::{ProviderName, ResultError, Status, Transaction, TransactionResult, Verification};
    let app = TestApp::spawn_with(kind, &[("HANDSET__WORKERS__ENABLED", "false")]).await;
    let (partner, _) = app.partner(&[handset_core::Product::PossessionSms]).await;
    let now = chrono::Utc::now();
    let ago = |minutes: i64| now - chrono::Duration::minutes(minutes);
    let succeeded = || Some(TransactionResult::Phone { phone: "+14155550100".into() });
    let failed = |code| Some(TransactionResult::failure(ResultError::new(code)));
    for (i, (created, status, ended, result)) in [
        (ago(30), Status::Succeeded, ago(20), succeeded()),
        (ago(12), Status::Failed, ago(2), failed(ErrorCode::CodeExpired)),
        (ago(1), Status::Succeeded, now, succeeded()),
        (ago(1), Status::Failed, ago(1), failed(ErrorCode::NoProvider)),
        (ago(1), Status::Pending, ago(1), None),
    ]
    .into_iter()
    .enumerate()
    {
        let verification = Verification { id: uuid::Uuid::new_v4(), partner_id: partner, created_at: created };
        let phone = number(500 + i as u32);
        let mut tx = Transaction::pending(
            partner,
            verification.id,
            handset_core::Product::PossessionSms,
            ProviderName::Idme,
            &phone,
            created,
        );
        (tx.country, tx.status, tx.updated_at, tx.result) = (Some("US".into()), status, ended, result);
        app.store.insert_transaction(&tx, Some(&verification), None).await.unwrap();
    }
    let outcomes = app.store.recent_outcomes(ago(15), ago(26)).await.unwrap();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let idme = &outcomes[0];
    assert_eq!(
        (idme.provider.as_str(), idme.country.as_deref(), idme.product.as_str()),
        ("idme", Some("US"), "possession.sms")
    );
    assert_eq!((idme.succeeded, idme.ended), (1, 2), "{outcomes:?}");
}

/// An ordered rule, and a request that names its provider, say so too.
async fn ordered_and_requested_routes_are_recorded(kind: Kind) {
    let sim = sim().await;
    let ordered = r#"
[[routing.rules]]
product = "possession.sms"
providers = ["idme", "veratad"]
"#;
    let app = app(kind, &sim, ordered, &[]).await;
    let named = json!({"phone": number(1), "name": {"first": "Ada", "last": "Lovelace"}});
    let started = app.post("/v1/possession", named).await;
    assert_eq!(started.status, 201, "{}", started.text);
    let expected = json!({"strategy": "ordered", "order": ["idme", "veratad"], "reason": "configured"});
    assert_eq!(started.body["routing"], expected);
    assert_eq!(app.transaction(&started.id()).await.body["routing"], expected);

    let forced = json!({"phone": number(2), "provider": "veratad", "name": {"first": "Ada", "last": "Lovelace"}});
    let started = app.post("/v1/possession", forced).await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["routing"], json!({"strategy": "ordered", "order": ["veratad"], "reason": "requested"}));

    // Without a name, Veratad is skipped within the order the rule chose.
    let nameless = app.post("/v1/possession", json!({"phone": number(3)})).await;
    assert_eq!(nameless.body["provider"], "idme");
    assert_eq!(nameless.body["routing"]["order"], json!(["idme", "veratad"]));
}

/// `handset serve` refuses adaptive settings it cannot use, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_bad_adaptive_settings() {
    for (key, value, named) in [
        ("HANDSET__ROUTING__ADAPTIVE__EXPLORE", "1.5", "routing.adaptive.explore"),
        ("HANDSET__ROUTING__ADAPTIVE__MIN_SAMPLES", "0", "routing.adaptive.min_samples"),
        ("HANDSET__ROUTING__ADAPTIVE__WINDOW", "0s", "routing.adaptive.window"),
        ("HANDSET__ROUTING__ADAPTIVE__WINDOW", "30days", "routing.adaptive.window"),
        ("HANDSET__PROVIDERS__VERATAD__COST", "0", "providers.veratad.cost"),
        ("HANDSET__PROVIDERS__SANDBOX__COST", "-1", "providers.sandbox.cost"),
    ] {
        let refused = crate::production::serve_once(None, &[(key, value)]).await;
        let refused = refused.unwrap_or_else(|| panic!("{key}={value} was accepted"));
        assert!(refused.contains(named), "{key}={value} names {named}:\n{refused}");
    }
    let unknown = "[[routing.rules]]\nproduct = \"possession.sms\"\nproviders = [\"sandbox\"]\nstrategy = \"greedy\"\n";
    let refused = crate::production::serve_once(Some(unknown), &[]).await.expect("an unknown strategy is refused");
    assert!(refused.contains("greedy") || refused.contains("strategy"), "{refused}");
}

crate::on_both_kinds!(
    traffic_follows_delivery,
    unavailable_answers_count_against_a_provider,
    scores_count_what_ended_in_the_window,
    ordered_and_requested_routes_are_recorded
);
