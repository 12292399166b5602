//! The gateway routed to ID.me, with `handset-sim` standing in for ID.me:
//! SMS possession, identity completed by webhook or by polling, the webhook's
//! authentication, rejected credentials, and ID.me down or hanging.

use std::time::Duration;

use handset_sim::faults::Faults;
use handset_sim::idme::IdmeConfig;
use handset_sim::{Sim, SimConfig};
use handset_testkit::Kind;
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::receiver::Receiver;

const WEBHOOK_SECRET: &str = "hook-secret";
const WAIT: Duration = Duration::from_secs(10);

async fn sim(push_webhooks: bool) -> Sim {
    let idme = IdmeConfig { identity_delay: Duration::from_millis(150), push_webhooks, ..IdmeConfig::default() };
    Sim::start("127.0.0.1:0", SimConfig { idme, ..SimConfig::default() }).await.unwrap()
}

async fn app_for(kind: Kind, sim: &Sim, extra: &[(&str, &str)]) -> TestApp {
    let base = sim.base_url();
    let mut env = vec![
        ("HANDSET__PROVIDERS__IDME__BASE_URL", base.as_str()),
        ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
        ("HANDSET__PROVIDERS__IDME__WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("HANDSET__PROVIDERS__IDME__TIMEOUT", "2s"),
        ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"),
        ("HANDSET__WORKERS__POLL_INTERVAL", "25ms"),
        ("HANDSET__WORKERS__PROVIDER_POLL_MIN", "50ms"),
        ("HANDSET__WORKERS__PROVIDER_POLL_MAX", "200ms"),
    ];
    env.extend_from_slice(extra);
    TestApp::spawn_with(kind, &env).await
}

/// An app routed by `rules` (TOML), with ID.me on the sim and a breaker that
/// opens after two failures for `open_for`.
async fn routed_app(kind: Kind, sim: &Sim, rules: &str, open_for: &str) -> TestApp {
    let base = sim.base_url();
    let env = [
        ("HANDSET__PROVIDERS__IDME__BASE_URL", base.as_str()),
        ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
        ("HANDSET__CIRCUIT_BREAKER__FAILURE_THRESHOLD", "2"),
        ("HANDSET__CIRCUIT_BREAKER__OPEN_FOR", open_for),
    ];
    TestApp::spawn_with_config(kind, rules, &env).await
}

async fn wait_final(app: &TestApp, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tx = app.transaction(id).await.body;
        if tx["status"]["code"] != 210 {
            return tx;
        }
        assert!(tokio::time::Instant::now() < deadline, "still pending: {tx}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn sms_possession_through_idme(kind: Kind) {
    let sim = sim(true).await;
    let app = app_for(kind, &sim, &[]).await;
    let started = app.post("/v1/possession", json!({"phone": "4155550123", "provider": "idme"})).await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["provider"], "idme");
    assert_eq!(started.body["next_action"]["type"], "enter_code");
    let id = started.id();
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    let idme_id = row.provider_ref.clone().expect("ID.me's transaction id is kept");
    assert_ne!(idme_id, id, "partners only see handset's ids");
    assert!(!started.text.contains(&idme_id));
    assert_eq!(row.code_hash, None, "ID.me checks its own codes");

    app.confirm(&id, "000000").await.assert_error(422, 3102);
    assert_eq!(sim.idme.transaction(&idme_id).unwrap().attempts, 1);
    let done = app.confirm(&id, "123123").await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.body["result"], json!({"phone": "+14155550123"}));

    // The same verification reuses ID.me's verification id.
    let verification_id = started.body["verification_id"].as_str().unwrap();
    let identity = app
        .post("/v1/identity", json!({"phone": "4155550123", "birth_date": "1968-05-27", "provider": "idme", "verification_id": verification_id}))
        .await;
    let identity_ref =
        app.store.transaction(identity.id().parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap();
    assert_eq!(
        sim.idme.transaction(&identity_ref).unwrap().verification_id,
        sim.idme.transaction(&idme_id).unwrap().verification_id
    );

    // Mock numbers: ID.me's errors come back as ours.
    app.post("/v1/possession", json!({"phone": "9995553101", "provider": "idme"})).await.assert_error(422, 3101);
    let limited = app.post("/v1/possession", json!({"phone": "9995555200", "provider": "idme"})).await;
    limited.assert_error(429, 5200);
    assert_eq!(limited.headers["retry-after"], "30");
    let failed = app.post("/v1/possession", json!({"phone": "9995551007", "provider": "idme"})).await;
    assert_eq!(failed.body["status"]["code"], 300);
    assert_eq!(failed.body["result"]["errors"][0]["provider_code"], "1007");
    // Outside NANP ID.me cannot serve.
    app.post("/v1/possession", json!({"phone": "+33612345678", "provider": "idme"})).await.assert_error(422, 3908);
}

/// Polling is pushed out of reach (its first look would be an hour away),
/// so only ID.me's webhook can finish the check.
async fn identity_completed_by_webhook(kind: Kind) {
    let sim = sim(true).await;
    let receiver = Receiver::start().await;
    let no_polling = [("HANDSET__WORKERS__PROVIDER_POLL_MIN", "1h"), ("HANDSET__WORKERS__PROVIDER_POLL_MAX", "1h")];
    let app = app_for(kind, &sim, &no_polling).await;
    let started = app
        .post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme", "callback_url": receiver.url("/hook")}))
        .await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["status"]["code"], 210);
    assert_eq!(started.body["next_action"], Value::Null);
    let id = started.id();
    let got = receiver.wait_for(1, WAIT).await;
    let body = got[0].json();
    assert_eq!(body["status"]["code"], 200);
    assert_eq!(body["result"]["address"]["line1"], "1 Simulated Way");
    let idme_id = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap();
    let at_idme = sim.idme.transaction(&idme_id).unwrap();
    assert_eq!(at_idme.pushes, 1, "completed by the webhook");
    assert_eq!(at_idme.reads, 0, "handset never polled");

    // A duplicate push changes nothing and sends no second callback.
    let again = crate::helpers::http_client()
        .put(format!("{}/_admin/idme/transactions/{idme_id}/push", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(again["webhook_status"], 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 1);

    let failed = app
        .post("/v1/identity", json!({"phone": "9995550000", "birth_date": "1968-05-27", "provider": "idme"}))
        .await
        .id();
    let tx = wait_final(&app, &failed).await;
    assert_eq!(tx["status"]["code"], 300);
    assert_eq!(tx["result"]["errors"][0]["code"], 1014);
    assert_eq!(tx["result"]["errors"][0]["additional_info"], "birth_date does not match data on file.");
}

async fn identity_completed_by_polling(kind: Kind) {
    let sim = sim(false).await;
    let receiver = Receiver::start().await;
    let app = app_for(kind, &sim, &[]).await;
    let id = app
        .post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme", "callback_url": receiver.url("/hook")}))
        .await
        .id();
    let tx = wait_final(&app, &id).await;
    assert_eq!(tx["status"]["code"], 200, "{tx}");
    let got = receiver.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["transaction_id"], id.as_str());
    let idme_id = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap();
    assert_eq!(sim.idme.transaction(&idme_id).unwrap().pushes, 0, "nothing was pushed: polling found it");
}

async fn identity_without_result_ends_at_its_deadline(kind: Kind) {
    let sim = sim(false).await;
    sim.idme.set_config(IdmeConfig {
        identity_delay: Duration::from_secs(3600),
        push_webhooks: false,
        ..IdmeConfig::default()
    });
    let app = app_for(kind, &sim, &[("HANDSET__IDENTITY__RESULT_TTL", "300ms")]).await;
    let id = app
        .post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme"}))
        .await
        .id();
    let tx = wait_final(&app, &id).await;
    assert_eq!(tx["status"]["code"], 300);
    assert_eq!(tx["result"]["errors"][0]["code"], 5001);
}

async fn webhook_is_authenticated(kind: Kind) {
    let sim = sim(false).await;
    let app = app_for(kind, &sim, &[]).await;
    let id = app
        .post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme"}))
        .await
        .id();
    let idme_id = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap();
    let result = json!({"transaction_id": idme_id, "status": {"code": 300}, "result": {"errors": [{"code": 1014, "message": "Could not find the user"}]}});
    let hook = |query: &str| app.client.post(app.url(&format!("/providers/idme/webhook{query}"))).json(&result);
    app.send(hook("")).await.assert_error(401, 1100);
    app.send(hook("?token=wrong")).await.assert_error(401, 1100);
    app.send(hook("").bearer_auth("wrong")).await.assert_error(401, 1100);
    assert_eq!(app.transaction(&id).await.body["status"]["code"], 210, "refused calls change nothing");
    let unknown = json!({"transaction_id": "nope", "status": {"code": 200}});
    app.send(app.client.post(app.url("/providers/idme/webhook?token=hook-secret")).json(&unknown))
        .await
        .assert_error(404, 4100);
    app.send(app.client.post(app.url("/providers/idme/webhook?token=hook-secret")).body("{"))
        .await
        .assert_error(400, 3900);
    // Inbound routes exist per provider that takes calls; ID.me has no operator return.
    for path in ["/providers/sandbox/webhook", "/providers/nobody/webhook", "/providers/dqe/webhook"] {
        app.send(app.client.post(app.url(path)).json(&result)).await.assert_error(404, 4100);
    }
    // A browser reads the return route: its refusals are pages.
    let back = format!("/providers/idme/return?token={WEBHOOK_SECRET}&transaction_id={id}");
    let page = app.send(app.client.get(app.url(&back))).await;
    assert_eq!(page.status, 404);
    assert!(page.text.contains("<p>"), "{}", page.text);

    let accepted = app.send(hook("").bearer_auth(WEBHOOK_SECRET)).await;
    assert_eq!(accepted.status, 200, "{}", accepted.text);
    let tx = app.transaction(&id).await.body;
    assert_eq!(tx["status"]["code"], 300);
    assert_eq!(tx["result"]["errors"][0]["provider_code"], "1014");
    // A late, different result for a final transaction changes nothing.
    let late = json!({"transaction_id": idme_id, "status": {"code": 200}, "result": {"address": {"line1": "x"}}});
    let answer = app.send(app.client.post(app.url("/providers/idme/webhook?token=hook-secret")).json(&late)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(app.transaction(&id).await.body["status"]["code"], 300);
}

/// Refused credentials are unavailability before anything reached the user:
/// the next provider is tried; alone, 503 5001 recorded as a
/// final 300. The operator learns why from the error log and the metric.
async fn rejected_credentials_are_our_error(kind: Kind) {
    let sim = sim(false).await;
    let app = app_for(kind, &sim, &[("HANDSET__PROVIDERS__IDME__SECRET", "not-the-secret")]).await;
    app.post("/v1/possession", json!({"phone": "4155550123", "provider": "idme"})).await.assert_error(503, 5001);
    app.post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme"}))
        .await
        .assert_error(503, 5001);
    let statuses = app.dump("transactions", "CAST(status_code AS TEXT)").await;
    assert_eq!(statuses.lines().filter(|s| *s == "300").count(), 2, "{statuses}");
    let metrics = app.send(app.client.get(app.url("/metrics"))).await.text;
    assert!(metrics.contains(r#"handset_provider_auth_failures_total{provider="idme"}"#), "{metrics}");
}

async fn idme_down_or_hanging(kind: Kind) {
    let sim = sim(false).await;
    let app = app_for(kind, &sim, &[("HANDSET__PROVIDERS__IDME__TIMEOUT", "300ms")]).await;
    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    app.post("/v1/possession", json!({"phone": "4155550123", "provider": "idme"})).await.assert_error(503, 5001);
    sim.set_faults(Faults { hang: true, ..Faults::default() });
    let hung = app.post("/v1/possession", json!({"phone": "4155550124", "provider": "idme"})).await;
    hung.assert_error(503, 5001);
    let message = hung.body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("may have been sent"), "a partner learns why no other provider was tried: {message}");
    app.post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme"}))
        .await
        .assert_error(503, 5001);
    // Each was recorded as final, so nothing waits forever.
    let pending = app.dump("transactions", "CAST(status_code AS TEXT)").await;
    assert_eq!(pending.lines().filter(|s| *s == "300").count(), 3, "{pending}");
    assert!(!pending.lines().any(|s| s == "210"));
}

async fn attempts_remaining(app: &TestApp, id: &str) -> Value {
    app.transaction(id).await.body["next_action"]["attempts_remaining"].clone()
}

/// A code ID.me could not check costs the user no attempt when nothing
/// reached ID.me; when the last attempt's check went unanswered, the check
/// ends (final 300 5001) rather than staying pending with nothing left.
async fn unchecked_codes_cost_no_attempt(kind: Kind) {
    let sim = sim(false).await;
    let app = app_for(
        kind,
        &sim,
        &[("HANDSET__PROVIDERS__IDME__TIMEOUT", "300ms"), ("HANDSET__POSSESSION__MAX_ATTEMPTS", "2")],
    )
    .await;
    let id = app.post("/v1/possession", json!({"phone": "4155550123", "provider": "idme"})).await.id();
    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    for _ in 0..3 {
        app.confirm(&id, "123123").await.assert_error(503, 5001);
    }
    assert_eq!(attempts_remaining(&app, &id).await, 2, "unavailable checks used no attempt");
    let metrics = app.send(app.client.get(app.url("/metrics"))).await.text;
    let counted = r#"handset_provider_errors_total{provider="idme",call="check_code",kind="unavailable"}"#;
    assert!(metrics.contains(counted), "{metrics}");
    sim.set_faults(Faults::default());
    app.confirm(&id, "000000").await.assert_error(422, 3102);
    assert_eq!(attempts_remaining(&app, &id).await, 1);
    // A check that timed out, or that ID.me refused to make (its rate
    // limit), is given back too (ID.me still counts its own attempts).
    sim.set_faults(Faults { hang: true, ..Faults::default() });
    app.confirm(&id, "123123").await.assert_error(503, 5001);
    assert_eq!(attempts_remaining(&app, &id).await, 1);
    sim.set_faults(Faults { error_rate: 1.0, error_status: Some(429), ..Faults::default() });
    assert_eq!(app.confirm(&id, "123123").await.status, 429);
    assert_eq!(attempts_remaining(&app, &id).await, 1);
    // The last attempt's check gets an answer that decides nothing (a 404
    // for a check ID.me should know): the attempt is spent, so the check ends.
    sim.set_faults(Faults { error_rate: 1.0, error_status: Some(404), ..Faults::default() });
    let unanswered = app.confirm(&id, "123123").await;
    unanswered.assert_error(503, 5001);
    let ended = app.transaction(&id).await.body;
    assert_eq!(ended["status"]["code"], 300, "{ended}");
    assert_eq!(ended["result"]["errors"][0]["code"], 5001, "{ended}");
}

/// Routing from config: ID.me first, the sandbox when ID.me is unavailable.
async fn routing_falls_back_when_idme_is_down(kind: Kind) {
    let sim = sim(false).await;
    let rules = r#"
[[routing.rules]]
product = "possession.sms"
providers = ["idme", "sandbox"]

[[routing.rules]]
product = "identity"
providers = ["idme"]

[[routing.rules]]
product = "possession.network"
providers = ["sandbox"]
"#;
    let app = routed_app(kind, &sim, rules, "1h").await;
    let routed = app.start_sms("4155550123").await;
    assert_eq!(routed.body["provider"], "idme", "{}", routed.text);
    let identity = app.post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27"})).await;
    assert_eq!(identity.body["provider"], "idme");
    // Non-NANP numbers skip ID.me.
    assert_eq!(app.start_sms("+33612345678").await.body["provider"], "sandbox");

    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let before = sim.requests();
    for phone in ["4155550124", "4155550125", "4155550126", "4155550127"] {
        let answer = app.start_sms(phone).await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.body["provider"], "sandbox", "skipped to the next provider");
    }
    assert_eq!(sim.requests() - before, 2, "the circuit opened after two failures: ID.me is not called meanwhile");
}

crate::on_both_kinds!(
    sms_possession_through_idme,
    identity_completed_by_webhook,
    identity_completed_by_polling,
    identity_without_result_ends_at_its_deadline,
    webhook_is_authenticated,
    rejected_credentials_are_our_error,
    idme_down_or_hanging,
    unchecked_codes_cost_no_attempt,
    routing_falls_back_when_idme_is_down,
    the_breaker_lets_one_probe_through_after_open_for,
    late_or_incomplete_results_do_not_succeed,
    the_webhook_reads_no_more_than_64_kib,
    an_ambiguous_send_is_replayed_not_sent_again,
);

/// After `open_for` exactly one call probes ID.me: its failure reopens the
/// breaker at once, and once ID.me is back a probe's success closes it.
async fn the_breaker_lets_one_probe_through_after_open_for(kind: Kind) {
    let sim = sim(false).await;
    let rules = r#"
[[routing.rules]]
product = "possession.sms"
providers = ["idme", "sandbox"]
"#;
    let app = routed_app(kind, &sim, rules, "1s").await;
    let provider_of = |answer: crate::helpers::Answer| {
        assert_eq!(answer.status, 201, "{}", answer.text);
        answer.body["provider"].as_str().unwrap().to_owned()
    };
    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let calls = sim.requests();
    for phone in ["4155550101", "4155550102", "4155550103"] {
        assert_eq!(provider_of(app.start_sms(phone).await), "sandbox");
    }
    assert_eq!(sim.requests() - calls, 2, "open after two failures");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let calls = sim.requests();
    assert_eq!(provider_of(app.start_sms("4155550104").await), "sandbox", "the probe failed over");
    assert_eq!(provider_of(app.start_sms("4155550105").await), "sandbox");
    assert_eq!(sim.requests() - calls, 1, "one probe, and its failure reopened the breaker at once");

    sim.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let calls = sim.requests();
    assert_eq!(provider_of(app.start_sms("4155550106").await), "idme", "the probe succeeded");
    assert_eq!(provider_of(app.start_sms("4155550107").await), "idme", "closed again");
    assert_eq!(sim.requests() - calls, 2);
}

/// A result that arrives after the transaction's deadline cannot succeed it,
/// and an identity "success" without an address is a 5000, not a success.
async fn late_or_incomplete_results_do_not_succeed(kind: Kind) {
    let sim = sim(false).await;
    // No job runner: nothing expires or polls the transactions behind the test's back.
    let app =
        app_for(kind, &sim, &[("HANDSET__IDENTITY__RESULT_TTL", "1s"), ("HANDSET__WORKERS__ENABLED", "false")]).await;
    let identity = json!({"phone": "8885551234", "birth_date": "1968-05-27", "provider": "idme"});
    let late = app.post("/v1/identity", identity.clone()).await;
    assert_eq!(late.body["status"]["code"], 210, "{}", late.text);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let idme_id = app.store.transaction(late.id().parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap();
    let hook = app.url(&format!("/providers/idme/webhook?token={WEBHOOK_SECRET}"));
    let matched = json!({
        "transaction_id": idme_id, "product": "telecom.identity", "status": {"code": 200},
        "result": {"address": {"line1": "1 Simulated Way", "city": "Austin", "state": "TX", "zip": "78701"}}
    });
    assert_eq!(app.send(app.client.post(&hook).json(&matched)).await.status, 200);
    let tx = app.transaction(&late.id()).await.body;
    assert_eq!(tx["status"]["code"], 300, "a late success does not succeed it: {tx}");
    assert_eq!(tx["result"]["errors"][0]["code"], 5001, "{tx}");

    let incomplete = app.post("/v1/identity", identity).await;
    let idme_id = app.store.transaction(incomplete.id().parse().unwrap()).await.unwrap().unwrap().provider_ref.unwrap();
    let body = json!({"transaction_id": idme_id, "status": {"code": 200}, "result": {"verified": true}});
    let answered = app.send(app.client.post(hook).json(&body)).await;
    assert_eq!(answered.status, 200, "{}", answered.text);
    let tx = app.transaction(&incomplete.id()).await.body;
    assert_eq!(tx["status"]["code"], 300, "no success without an address: {tx}");
    assert_eq!(tx["result"]["errors"][0]["code"], 5000, "{tx}");
}

/// The webhook checks its secret before reading the body, and reads 64 KiB at most.
async fn the_webhook_reads_no_more_than_64_kib(kind: Kind) {
    let sim = sim(false).await;
    let app = app_for(kind, &sim, &[]).await;
    let big = format!(r#"{{"transaction_id":"x","pad":"{}"}}"#, "a".repeat(70 * 1024));
    let hook = app.url(&format!("/providers/idme/webhook?token={WEBHOOK_SECRET}"));
    app.send(app.client.post(&hook).header("content-type", "application/json").body(big.clone()))
        .await
        .assert_error(413, 3902);
    let stranger = app.url("/providers/idme/webhook?token=wrong");
    app.send(app.client.post(stranger).header("content-type", "application/json").body(big))
        .await
        .assert_error(401, 1100);
}

/// A send that may have reached the user is answered 503 5001 and kept for
/// its `Idempotency-Key`: the retry replays it instead of sending again.
async fn an_ambiguous_send_is_replayed_not_sent_again(kind: Kind) {
    let sim = sim(false).await;
    let app = app_for(kind, &sim, &[("HANDSET__PROVIDERS__IDME__TIMEOUT", "300ms")]).await;
    sim.set_faults(Faults { hang: true, ..Faults::default() });
    let send = || {
        app.client
            .post(app.url("/v1/possession"))
            .bearer_auth(crate::helpers::DEV_KEY)
            .header("idempotency-key", "hung-send")
            .json(&json!({"phone": "4155550123", "provider": "idme"}))
    };
    let first = app.send(send()).await;
    first.assert_error(503, 5001);
    let calls = sim.requests();
    let retried = app.send(send()).await;
    retried.assert_error(503, 5001);
    assert_eq!(retried.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(sim.requests(), calls, "no second send");
    assert_eq!(app.count("transactions").await, 1);
}
