//! The SMS pumping guard over real HTTP on both stores: a burst of
//! never-confirmed sends to one number range pauses it (429 5301) while
//! another range keeps working; `handset fraud list|release` see and lift it.

use handset_testkit::Kind;
use serde_json::json;

use crate::helpers::{DEV_KEY, TestApp};

/// Five sends judge a range; under half confirmed pauses it for an hour.
const GUARD: &[(&str, &str)] = &[
    ("HANDSET__FRAUD__ENABLED", "true"),
    ("HANDSET__FRAUD__PREFIX_DIGITS", "6"),
    ("HANDSET__FRAUD__MIN_SENDS", "5"),
    ("HANDSET__FRAUD__MAX_CONVERSION", "0.5"),
    ("HANDSET__FRAUD__WINDOW", "1h"),
    ("HANDSET__FRAUD__COOLDOWN", "1h"),
];

async fn a_pumped_range_is_paused_and_others_keep_working(kind: Kind) {
    let app = TestApp::spawn_with(kind, GUARD).await;
    // +1 415 555: five sends, none confirmed. The sixth tips it over.
    for last in 10..15 {
        let started = app.start_sms(&format!("41555501{last}")).await;
        assert_eq!(started.status, 201, "{}", started.text);
    }
    let refused = app.start_sms("4155550199").await;
    refused.assert_error(429, 5301);
    let wait: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&wait), "the cooldown: {wait}");
    app.start_sms("4155550120").await.assert_error(429, 5301);
    let before = app.count("transactions").await;

    // Another range, and the same range's other products, are not paused.
    let elsewhere = app.start_sms("2125550100").await;
    assert_eq!(elsewhere.status, 201, "{}", elsewhere.text);
    assert_eq!(app.confirm(&elsewhere.id(), "123123").await.status, 200);
    let identity = app.post("/v1/identity", json!({ "phone": "4155550123", "birth_date": "1990-01-31" })).await;
    assert_eq!(identity.status, 201, "{}", identity.text);
    app.start_sms("4155550121").await.assert_error(429, 5301);
    assert_eq!(app.count("transactions").await, before + 2, "a refused start records nothing");

    // Counters are per process, shared with the tests running beside this one.
    let metrics = app.get("/metrics").await.text;
    let counted = |name: &str| {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}: {metrics}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    assert!(counted("handset_number_range_pauses_total") >= 1.0);
    assert!(counted("handset_number_range_refusals_total") >= 3.0);

    // The operator sees the range (never a full number) and lifts the pause:
    // the range starts afresh.
    let listed = app.cli(&["fraud", "list"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["range"], "+1415555");
    assert_eq!((listed[0]["sends"].as_i64(), listed[0]["succeeded"].as_i64()), (Some(6), Some(0)));
    assert!(!listed.to_string().contains("4155550"), "no full number: {listed}");
    assert_eq!(app.cli(&["fraud", "release", "+1415555"]).unwrap()["released"], true);
    assert_eq!(app.cli(&["fraud", "list"]).unwrap(), json!([]));
    assert!(app.cli(&["fraud", "release", "+1415555"]).unwrap_err().contains("not paused"));
    let again = app.start_sms("4155550122").await;
    assert_eq!(again.status, 201, "released: {}", again.text);
}

/// Sends fired together are each counted before the provider is called:
/// a burst cannot slip past the guard by arriving at once.
async fn a_simultaneous_burst_is_stopped(kind: Kind) {
    let app = TestApp::spawn_with(kind, GUARD).await;
    let mut burst = tokio::task::JoinSet::new();
    for last in 10..30 {
        let (client, url) = (app.client.clone(), app.url("/v1/possession"));
        burst.spawn(async move {
            let body = json!({ "phone": format!("41555501{last}") });
            client.post(url).bearer_auth(DEV_KEY).json(&body).send().await.expect("POST").status().as_u16()
        });
    }
    let statuses = burst.join_all().await;
    let sent = statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(sent + statuses.iter().filter(|s| **s == 429).count(), 20, "201 or 429 only: {statuses:?}");
    // Each send has its own count: the five under the minimum go, the rest are refused.
    assert_eq!(sent, 5, "{statuses:?}");
}

/// A pause lasts `fraud.cooldown`; then the range counts afresh (its sends
/// before the pause do not pause it again at once).
async fn a_pause_ends_after_its_cooldown(kind: Kind) {
    let mut env = GUARD.to_vec();
    env.retain(|(key, _)| *key != "HANDSET__FRAUD__COOLDOWN");
    env.push(("HANDSET__FRAUD__COOLDOWN", "1s"));
    let app = TestApp::spawn_with(kind, &env).await;
    for last in 10..15 {
        assert_eq!(app.start_sms(&format!("41555501{last}")).await.status, 201);
    }
    app.start_sms("4155550115").await.assert_error(429, 5301);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for last in 16..21 {
        let again = app.start_sms(&format!("41555501{last}")).await;
        assert_eq!(again.status, 201, "counted afresh: {}", again.text);
    }
    app.start_sms("4155550121").await.assert_error(429, 5301);
}

/// A range whose sends are confirmed is never paused, however many there are.
async fn a_converting_range_is_never_paused(kind: Kind) {
    let app = TestApp::spawn_with(kind, GUARD).await;
    for last in 10..22 {
        let started = app.start_sms(&format!("41555501{last}")).await;
        assert_eq!(started.status, 201, "{}", started.text);
        if last % 3 != 0 {
            assert_eq!(app.confirm(&started.id(), "123123").await.status, 200);
        }
    }
    assert_eq!(app.cli(&["fraud", "list"]).unwrap(), json!([]));
}

/// Off in development unless enabled: the same burst goes through.
async fn the_guard_is_off_in_development_by_default(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for last in 10..20 {
        assert_eq!(app.start_sms(&format!("41555501{last}")).await.status, 201);
    }
}

crate::on_both_kinds!(
    a_pumped_range_is_paused_and_others_keep_working,
    a_simultaneous_burst_is_stopped,
    a_pause_ends_after_its_cooldown,
    a_converting_range_is_never_paused,
    the_guard_is_off_in_development_by_default
);
