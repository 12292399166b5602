//! Rate limits from config: per phone (5300), per product (5100),
//! per partner (5200), each with `Retry-After`, recording nothing.

use std::time::Duration;

use handset_testkit::Kind;
use serde_json::json;

use crate::helpers::{Answer, TestApp};

/// Windows are whole minutes: start well inside one so a test never straddles two.
async fn fresh_minute() {
    let into_minute = chrono::Utc::now().timestamp_millis() % 60_000;
    if into_minute > 55_000 {
        tokio::time::sleep(Duration::from_millis((60_000 - into_minute + 100) as u64)).await;
    }
}

fn retry_after(answer: &Answer, at_most: u64) -> u64 {
    let seconds: u64 = answer.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=at_most).contains(&seconds), "{seconds}");
    seconds
}

async fn sends_per_phone(kind: Kind) {
    fresh_minute().await; // hours end on a minute boundary too
    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "2")]).await;
    for _ in 0..2 {
        assert_eq!(app.start_sms("4155550123").await.status, 201);
    }
    let before = app.count("transactions").await;
    let limited = app.start_sms("+1 415 555 0123").await;
    limited.assert_error(429, 5300);
    retry_after(&limited, 3600);
    assert_eq!(app.count("transactions").await, before, "a limited send records nothing");
    assert_eq!(app.start_sms("4155550124").await.status, 201, "other numbers are not limited");
    let identity = app.post("/v1/identity", json!({"phone": "4155550123", "birth_date": "1968-05-27"})).await;
    assert_eq!(identity.status, 201, "identity sends no SMS");
}

async fn per_product(kind: Kind) {
    fresh_minute().await;
    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PRODUCT_PER_MINUTE", "3")]).await;
    let id = app.start_sms("4155550123").await.id();
    app.confirm(&id, "000000").await.assert_error(422, 3102);
    assert_eq!(app.start_sms("4155550124").await.status, 201);
    let limited = app.start_sms("4155550125").await;
    limited.assert_error(429, 5100);
    retry_after(&limited, 60);
    app.confirm(&id, "123123").await.assert_error(429, 5100);
    let identity = app.post("/v1/identity", json!({"phone": "8885551234", "birth_date": "1968-05-27"})).await;
    assert_eq!(identity.status, 201, "another product has its own count");
}

async fn per_partner(kind: Kind) {
    fresh_minute().await;
    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE", "3")]).await;
    let (_, other) = app.partner(handset_core::Product::ALL).await;
    let id = app.start_sms("4155550123").await.id();
    assert_eq!(app.transaction(&id).await.status, 200);
    assert_eq!(app.get(&format!("/v1/transactions/{id}")).await.status, 200);
    let limited = app.get(&format!("/v1/transactions/{id}")).await;
    limited.assert_error(429, 5200);
    retry_after(&limited, 60);
    app.start_sms("4155550123").await.assert_error(429, 5200);
    let theirs = app.post_as(&other, "/v1/possession", json!({"phone": "4155550123"})).await;
    assert_eq!(theirs.status, 201, "each partner has its own count");
}

crate::on_both_kinds!(
    sends_per_phone,
    per_product,
    per_partner,
    replicas_share_the_partner_window,
    concurrent_requests_admit_exactly_the_limit,
    concurrent_requests_across_two_replicas,
);

/// Two replicas on one database share a partner's window: each counts in
/// memory and reconciles with the database every 20 hits (1% of a limit above
/// 2,000) or 200 ms, so the
/// second learns what the first admitted and refuses once the total is reached.
async fn read(app: &TestApp) -> Answer {
    app.get("/v1/transactions/00000000-0000-0000-0000-000000000000").await
}

async fn replicas_share_the_partner_window(kind: Kind) {
    fresh_minute().await;
    let limit = [("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE", "30")];
    let first = TestApp::spawn_with(kind, &limit).await;
    let url = first.db.url.clone();
    let shared = [limit[0], ("HANDSET__DATABASE__URL", url.as_str())];
    let second = TestApp::spawn_on(handset_testkit::TestDatabase::new(kind).await, &shared, false).await;
    for _ in 0..25 {
        read(&first).await.assert_error(404, 4100);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    read(&first).await.assert_error(404, 4100); // reconciles: the database holds 26
    let mut admitted = 0;
    loop {
        let answer = read(&second).await;
        if answer.status == 429 {
            answer.assert_error(429, 5200);
            break;
        }
        admitted += 1;
        assert!(admitted <= 5, "the second replica admitted {admitted}: it did not learn the first one's count");
    }
    assert!(admitted >= 1, "the window still had room");
}

/// Sends `count` requests at once (`request(i)` builds the i-th on one of
/// `apps`, round robin, as the development partner); how many were admitted
/// (answered anything but a 429, and not a 5xx). Every 429 must carry `code`.
async fn admitted_of_concurrent(
    apps: &[&TestApp],
    count: usize,
    code: u64,
    request: impl Fn(&TestApp, usize) -> reqwest::RequestBuilder,
) -> usize {
    // The whole burst in one window.
    fresh_minute().await;
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..count {
        let request = request(apps[i % apps.len()], i).bearer_auth(crate::helpers::DEV_KEY);
        requests.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        });
    }
    let mut admitted = 0;
    for (status, text) in requests.join_all().await {
        match status {
            429 => assert!(text.contains(&format!(r#""code":{code}"#)), "{text}"),
            200..=499 => admitted += 1,
            other => panic!("unexpected {other}: {text}"),
        }
    }
    admitted
}

fn start(app: &TestApp, phone: String) -> reqwest::RequestBuilder {
    app.client.post(app.url("/v1/possession")).json(&json!({ "phone": phone }))
}

/// N concurrent requests against a limit of K admit exactly K on one
/// replica, for each window.
async fn concurrent_requests_admit_exactly_the_limit(kind: Kind) {
    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "4")]).await;
    let admitted = admitted_of_concurrent(&[&app], 20, 5300, |app, _| start(app, "4155550123".into())).await;
    assert_eq!(admitted, 4, "per phone");

    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PRODUCT_PER_MINUTE", "7")]).await;
    let admitted = admitted_of_concurrent(&[&app], 20, 5100, |app, i| start(app, format!("41555501{i:02}"))).await;
    assert_eq!(admitted, 7, "per product");

    let app = TestApp::spawn_with(kind, &[("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE", "9")]).await;
    let admitted = admitted_of_concurrent(&[&app], 20, 5200, |app, _| app.client.get(app.url(UNKNOWN))).await;
    assert_eq!(admitted, 9, "per partner (every /v1 request counts, a 404 too)");
}

/// The same across two replicas on one database: the per-phone window is
/// exact; the per-product and per-partner windows admit at least the limit
/// and at most the documented bound, limit + (replicas - 1) x 20.
async fn concurrent_requests_across_two_replicas(kind: Kind) {
    let pair = |limit: &'static str, value: &'static str| async move {
        let first = TestApp::spawn_with(kind, &[(limit, value)]).await;
        let url = first.db.url.clone();
        let shared = [(limit, value), ("HANDSET__DATABASE__URL", url.as_str())];
        let second = TestApp::spawn_on(handset_testkit::TestDatabase::new(kind).await, &shared, false).await;
        (first, second)
    };

    let (a, b) = pair("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "5").await;
    let admitted = admitted_of_concurrent(&[&a, &b], 24, 5300, |app, _| start(app, "4155550123".into())).await;
    assert_eq!(admitted, 5, "per phone, exact across replicas");

    let (a, b) = pair("HANDSET__RATE_LIMITS__PER_PRODUCT_PER_MINUTE", "10").await;
    let admitted = admitted_of_concurrent(&[&a, &b], 40, 5100, |app, i| start(app, format!("41555502{i:02}"))).await;
    assert!((10..=30).contains(&admitted), "per product: {admitted} admitted of 40 against 10");

    let (a, b) = pair("HANDSET__RATE_LIMITS__PER_PARTNER_PER_MINUTE", "10").await;
    let admitted = admitted_of_concurrent(&[&a, &b], 40, 5200, |app, _| app.client.get(app.url(UNKNOWN))).await;
    assert!((10..=30).contains(&admitted), "per partner: {admitted} admitted of 40 against 10");
}

const UNKNOWN: &str = "/v1/verifications/00000000-0000-4000-8000-000000000000";
