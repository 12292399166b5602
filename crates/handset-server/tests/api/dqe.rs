//! The gateway routed to DQE (network possession), with `handset-sim`
//! standing in for DQE and the operator: start, the operator page, the
//! browser's return with DQE's session token, the redirect to the partner,
//! polling, documented errors, routing, and finalising exactly once.

use std::time::Duration;

use handset_sim::{Sim, SimConfig};
use handset_testkit::Kind;
use reqwest::header::LOCATION;
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::receiver::Receiver;

async fn app(kind: Kind, sim: &Sim, extra: &[(&str, &str)]) -> TestApp {
    let base = sim.base_url();
    let mut env = vec![
        ("HANDSET__PROVIDERS__DQE__BASE_URL", base.as_str()),
        ("HANDSET__PROVIDERS__DQE__LICENCE", "sim-licence"),
        ("HANDSET__PROVIDERS__DQE__TOKEN", "sim-token"),
        ("HANDSET__PROVIDERS__DQE__NAME", "handset"),
        ("HANDSET__PROVIDERS__DQE__TIMEOUT", "2s"),
        ("HANDSET__CALLBACKS__ALLOW_PRIVATE_NETWORKS", "true"),
        ("HANDSET__WORKERS__POLL_INTERVAL", "25ms"),
        ("HANDSET__WORKERS__PROVIDER_POLL_MIN", "50ms"),
        ("HANDSET__WORKERS__PROVIDER_POLL_MAX", "200ms"),
    ];
    env.extend_from_slice(extra);
    TestApp::spawn_with(kind, &env).await
}

async fn sim() -> Sim {
    Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap()
}

/// Where a response redirects to.
fn location(response: &reqwest::Response) -> String {
    response.headers().get(LOCATION).expect("a redirect").to_str().unwrap().to_owned()
}

/// The browser on the operator's page: returns where the operator sends it back.
async fn visit_operator(app: &TestApp, url: &str) -> String {
    let visited = app.client.get(url).send().await.unwrap();
    assert!(visited.status().is_redirection(), "the operator page redirects: {}", visited.status());
    location(&visited)
}

async fn start(app: &TestApp, phone: &str, extra: Value) -> crate::helpers::Answer {
    let mut body = json!({"phone": phone, "channel": "network"});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    app.post("/v1/possession", body).await
}

async fn round_trip_through_the_operator(kind: Kind) {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    let app = app(kind, &sim, &[]).await;
    let extra = json!({"redirect_uri": receiver.url("/done"), "callback_url": receiver.url("/hook")});
    let started = start(&app, "+33612345678", extra).await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["provider"], "dqe", "FR network checks go to DQE by default");
    assert_eq!(started.body["status"]["code"], 210);
    assert_eq!(started.body["next_action"]["type"], "redirect");
    let operator_url = started.body["next_action"]["url"].as_str().unwrap().to_owned();
    assert!(operator_url.starts_with(&sim.base_url()), "the operator's URL: {operator_url}");
    let id = started.id();

    // Before the user comes back: still pending, also on an empty confirm.
    let early = app.post(&format!("/v1/possession/{id}/confirm"), json!({})).await;
    assert_eq!(early.status, 200, "{}", early.text);
    assert_eq!(early.body["status"]["code"], 210);

    let back = visit_operator(&app, &operator_url).await;
    assert!(back.starts_with(&format!("{}/providers/dqe/return?transaction_id={id}", app.address)), "{back}");
    assert!(back.contains("token="), "DQE's session token rides on the return: {back}");
    let returned = app.client.get(&back).send().await.unwrap();
    assert_eq!(returned.status(), 303);
    let partner = location(&returned);
    assert_eq!(partner, format!("{}?transaction_id={id}&status=success", receiver.url("/done")));
    assert!(!partner.contains("token") && !partner.contains("612345678"), "no token, no number: {partner}");

    let tx = app.transaction(&id).await.body;
    assert_eq!(tx["status"]["code"], 200, "{tx}");
    assert_eq!(tx["result"]["phone"], "+33612345678");
    let stored = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert!(stored.provider_ref.is_some_and(|t| back.contains(&t)), "the session token is kept");
    let hooks = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(hooks[0].json()["status"]["code"], 200);

    // The same return again: the same redirect, no second finalisation.
    let again = app.client.get(&back).send().await.unwrap();
    assert_eq!(location(&again), partner);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().iter().filter(|r| r.path.starts_with("/hook")).count(), 1);
}

/// Without a `redirect_uri` the user sees a short page; returns that name
/// nothing (malformed, unknown, another provider's check) get a page too.
async fn returns_without_a_partner_page_or_a_check(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, &[]).await;
    let started = start(&app, "+33612345679", json!({})).await;
    let back = visit_operator(&app, started.body["next_action"]["url"].as_str().unwrap()).await;
    let page = app.client.get(&back).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("success"));

    let sandbox = start(&app, "4155550123", json!({})).await.id();
    for query in [
        "transaction_id=nope",
        "transaction_id=00000000-0000-0000-0000-000000000000",
        &format!("transaction_id={sandbox}&token=x"),
        "",
    ] {
        let refused = app.client.get(app.url(&format!("/providers/dqe/return?{query}"))).send().await.unwrap();
        assert_eq!(refused.status(), 404, "{query}");
        assert!(refused.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    }
    assert_eq!(app.transaction(&sandbox).await.body["status"]["code"], 210, "another provider's check is untouched");
}

/// Documented errors: the operator's check failing ends the check; a bad
/// number is the partner's 3101; an operator DQE cannot serve lets the
/// chain go on (to the sandbox in the shipped config), and forced is 3908.
async fn documented_errors_and_routing(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, &[]).await;
    let failed = start(&app, "+33612340012", json!({})).await;
    assert_eq!(failed.status, 201, "{}", failed.text);
    assert_eq!(failed.body["status"]["code"], 300);
    assert_eq!(failed.body["result"]["errors"][0]["provider_code"], "12");
    start(&app, "+33612340009", json!({})).await.assert_error(422, 3101);
    let next = start(&app, "+33612340013", json!({})).await;
    assert_eq!(next.body["provider"], "sandbox", "DQE cannot serve this operator: {}", next.text);
    start(&app, "+33612340014", json!({"provider": "dqe"})).await.assert_error(422, 3908);
    start(&app, "+33612340016", json!({"provider": "dqe"})).await.assert_error(503, 5001);
    let codes = app.dump("transactions", "CAST(result AS TEXT)").await.replace(' ', "");
    assert!(codes.contains("\"provider_code\":\"16\""), "the operator-unreachable code is kept: {codes}");
    // The operator did not match the line.
    let mismatch = start(&app, "+33612340003", json!({})).await;
    let back = visit_operator(&app, mismatch.body["next_action"]["url"].as_str().unwrap()).await;
    app.client.get(&back).send().await.unwrap();
    let tx = app.transaction(&mismatch.id()).await.body;
    assert_eq!(tx["status"]["code"], 300, "{tx}");
    assert_eq!(tx["result"]["errors"][0]["code"], 1014);
    // US numbers are not DQE's.
    assert_eq!(start(&app, "4155550123", json!({})).await.body["provider"], "sandbox");
}

/// Nobody comes back: the check is polled, stays pending, and ends at its
/// deadline with 3103.
async fn a_check_nobody_finishes_expires(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, &[("HANDSET__POSSESSION__CODE_TTL", "1s")]).await;
    let id = start(&app, "+33612345670", json!({})).await.id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tx = app.transaction(&id).await.body;
        if tx["status"]["code"] == 300 {
            assert_eq!(tx["result"]["errors"][0]["code"], 3103, "{tx}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still pending: {tx}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let polled = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().poll_attempts;
    assert!(polled > 0, "the job runner asked DQE meanwhile");
}

/// Two returns (a double-clicked link), a confirm and the job runner's
/// polls at once: one final state, one callback.
async fn return_confirm_and_poll_finalise_once(kind: Kind) {
    let sim = sim().await;
    let receiver = Receiver::start().await;
    let app = app(kind, &sim, &[]).await;
    for round in 0..3 {
        let extra = json!({"callback_url": receiver.url(&format!("/hook-{round}"))});
        let started = start(&app, &format!("+3361234{:04}", 5000 + round), extra).await;
        let id = started.id();
        let back = visit_operator(&app, started.body["next_action"]["url"].as_str().unwrap()).await;
        let confirm = format!("/v1/possession/{id}/confirm");
        let (first, second, confirmed) =
            tokio::join!(app.client.get(&back).send(), app.client.get(&back).send(), app.post(&confirm, json!({})));
        assert_eq!(first.unwrap().status(), 200, "no redirect_uri: the result page");
        assert_eq!(second.unwrap().status(), 200);
        assert_eq!(confirmed.status, 200, "{}", confirmed.text);
        assert_eq!(app.transaction(&id).await.body["status"]["code"], 200);
    }
    receiver.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 3, "one callback per check");
}

/// Returns are not authenticated: a made-up token, or another check's, ends
/// nothing and is not kept; the real return then completes the check. A
/// token that arrives while DQE cannot be asked is kept for the job runner.
async fn forged_returns_and_a_dqe_outage(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, &[]).await;
    let mine = start(&app, "+33612345601", json!({})).await;
    let id = mine.id();
    let other = start(&app, "+33612345602", json!({})).await;
    let other_back = visit_operator(&app, other.body["next_action"]["url"].as_str().unwrap()).await;
    assert_eq!(app.client.get(&other_back).send().await.unwrap().status(), 200);
    let other_token = other_back.split("token=").nth(1).unwrap().split('&').next().unwrap().to_owned();

    for token in ["made-up-token", other_token.as_str()] {
        let forged = app.url(&format!("/providers/dqe/return?transaction_id={id}&token={token}"));
        assert_eq!(app.client.get(&forged).send().await.unwrap().status(), 200);
        let tx = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(tx.status, handset_core::Status::Pending, "{token}: a forged return ends nothing");
        assert_eq!(tx.provider_ref, None, "{token}: and is not kept");
    }

    let back = visit_operator(&app, mine.body["next_action"]["url"].as_str().unwrap()).await;
    sim.set_faults(handset_sim::faults::Faults { error_rate: 1.0, ..Default::default() });
    let during_outage = app.client.get(&back).send().await.unwrap();
    assert_eq!(during_outage.status(), 200);
    assert!(during_outage.text().await.unwrap().contains("pending"), "the user goes on as pending");
    assert!(app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap().provider_ref.is_some(), "token kept");
    sim.set_faults(handset_sim::faults::Faults::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.transaction(&id).await.body["status"]["code"] != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the job runner finished it with the kept token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `phone.default_region = "FR"`, French national numbers are DQE's
/// too, sent to DQE in that national form.
async fn french_national_numbers(kind: Kind) {
    let sim = sim().await;
    let app = app(kind, &sim, &[("HANDSET__PHONE__DEFAULT_REGION", "FR")]).await;
    let started = start(&app, "0612345678", json!({})).await;
    assert_eq!(started.status, 201, "{}", started.text);
    assert_eq!(started.body["provider"], "dqe");
    assert_eq!(started.body["phone"], "+33612345678");
    let sessions = sim.dqe.sessions();
    assert_eq!(sessions.last().unwrap().number, "0612345678", "DQE gets the national form");
}

crate::on_both_kinds!(
    forged_returns_and_a_dqe_outage,
    french_national_numbers,
    round_trip_through_the_operator,
    returns_without_a_partner_page_or_a_check,
    documented_errors_and_routing,
    a_check_nobody_finishes_expires,
    return_confirm_and_poll_finalise_once,
);
