//! `Idempotency-Key`: replays, mismatches, requests in flight,
//! per-partner scope after authentication, no double effect of a retried
//! confirm, and no replay of answers that recorded nothing.

use handset_core::store::{IdempotencyBegin, IdempotencyClaim};
use handset_server::idempotency::{REPLAYED_HEADER, request_hash};
use handset_sim::faults::Faults;
use handset_sim::{Sim, SimConfig};
use handset_testkit::Kind;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Answer, DEV_KEY, TestApp};
use crate::on_both_stores;

on_both_stores!(
    same_key_same_request_answers_the_first_response,
    same_key_other_request_is_refused,
    a_request_in_flight_is_409,
    keys_belong_to_their_partner,
    retried_confirms_count_once,
    no_replay_after_the_partner_is_deactivated,
    answers_that_record_nothing_are_not_kept,
);

async fn post_with_key(app: &TestApp, api_key: &str, idem: &str, path: &str, body: &Value) -> Answer {
    app.send(app.client.post(app.url(path)).bearer_auth(api_key).header("idempotency-key", idem).json(body)).await
}

async fn same_key_same_request_answers_the_first_response(app: TestApp) {
    let body = json!({"phone": "4155550123", "metadata": {"order": 7}});
    let first = post_with_key(&app, DEV_KEY, "order-7", "/v1/possession", &body).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert!(first.headers.get(REPLAYED_HEADER).is_none());
    let again = post_with_key(&app, DEV_KEY, "order-7", "/v1/possession", &body).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.text, first.text, "the first response, byte for byte");
    assert_eq!(again.headers[REPLAYED_HEADER], "true");
    assert_eq!(app.count("transactions").await, 1, "one transaction for both requests");
    // Without the header every request is new.
    app.post("/v1/possession", body.clone()).await;
    assert_eq!(app.count("transactions").await, 2);
    // A refused request is kept too: the same answer again.
    let bad = json!({"phone": "12"});
    post_with_key(&app, DEV_KEY, "bad-1", "/v1/possession", &bad).await.assert_error(422, 3101);
    post_with_key(&app, DEV_KEY, "bad-1", "/v1/possession", &bad).await.assert_error(422, 3101);
    let long = "k".repeat(256);
    post_with_key(&app, DEV_KEY, &long, "/v1/possession", &body).await.assert_error(422, 3906);
    // Visible characters only, as the API document's pattern says.
    post_with_key(&app, DEV_KEY, "key with spaces", "/v1/possession", &body).await.assert_error(422, 3906);
    assert_eq!(post_with_key(&app, DEV_KEY, &"k".repeat(255), "/v1/possession", &body).await.status, 201);
}

async fn same_key_other_request_is_refused(app: TestApp) {
    let first = post_with_key(&app, DEV_KEY, "k-1", "/v1/possession", &json!({"phone": "4155550123"})).await;
    assert_eq!(first.status, 201);
    post_with_key(&app, DEV_KEY, "k-1", "/v1/possession", &json!({"phone": "4155550124"}))
        .await
        .assert_error(422, 3906);
    let identity = json!({"phone": "4155550123", "birth_date": "1968-05-27"});
    post_with_key(&app, DEV_KEY, "k-1", "/v1/identity", &identity).await.assert_error(422, 3906);
    assert_eq!(app.count("transactions").await, 1);
}

async fn a_request_in_flight_is_409(app: TestApp) {
    // Another replica is answering this key right now.
    let body = json!({"phone": "4155550123"});
    let bytes = serde_json::to_vec(&body).unwrap();
    let hash = request_hash(&Method::POST, "/v1/possession", &bytes);
    let scope = handset_server::idempotency::scope(handset_server::app::DEV_PARTNER_ID);
    let now = chrono::Utc::now();
    let claim = IdempotencyClaim {
        scope: &scope,
        key: "busy",
        request_hash: &hash,
        now,
        expired_before: now - chrono::Duration::hours(24),
        lock_until: now + chrono::Duration::minutes(2),
    };
    assert_eq!(app.store.begin_idempotent(claim).await.unwrap(), IdempotencyBegin::Proceed);
    let busy = app
        .send(
            app.client
                .post(app.url("/v1/possession"))
                .bearer_auth(DEV_KEY)
                .header("idempotency-key", "busy")
                .body(bytes.clone())
                .header("content-type", "application/json"),
        )
        .await;
    busy.assert_error(409, 3907);
    assert_eq!(app.count("transactions").await, 0);
    // A holder that died: after its lock the key is taken over.
    let later = now + chrono::Duration::minutes(3);
    let takeover = IdempotencyClaim { now: later, lock_until: later + chrono::Duration::minutes(2), ..claim };
    assert_eq!(app.store.begin_idempotent(takeover).await.unwrap(), IdempotencyBegin::Proceed);
    // After 24 hours the key is free for any request.
    let next_day = now + chrono::Duration::hours(25);
    let other_hash = request_hash(&Method::POST, "/v1/identity", b"{}");
    let reuse = IdempotencyClaim {
        request_hash: &other_hash,
        now: next_day,
        expired_before: next_day - chrono::Duration::hours(24),
        lock_until: next_day + chrono::Duration::minutes(2),
        ..claim
    };
    assert_eq!(app.store.begin_idempotent(reuse).await.unwrap(), IdempotencyBegin::Proceed);
}

async fn keys_belong_to_their_partner(app: TestApp) {
    let (_, other) = app.partner(handset_core::Product::ALL).await;
    let body = json!({"phone": "4155550123"});
    let mine = post_with_key(&app, DEV_KEY, "shared", "/v1/possession", &body).await;
    let theirs = post_with_key(&app, &other, "shared", "/v1/possession", &body).await;
    assert_eq!(theirs.status, 201);
    assert_ne!(mine.id(), theirs.id());
    post_with_key(&app, "not-a-key", "shared", "/v1/possession", &body).await.assert_error(401, 1100);
}

async fn retried_confirms_count_once(app: TestApp) {
    let id = app.start_sms("4155550123").await.id();
    let path = format!("/v1/possession/{id}/confirm");
    let wrong = json!({"code": "000000"});
    for _ in 0..3 {
        post_with_key(&app, DEV_KEY, "confirm-1", &path, &wrong).await.assert_error(422, 3102);
    }
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(row.attempts_used, 1, "a retried request is not a new attempt");
    let right = post_with_key(&app, DEV_KEY, "confirm-2", &path, &json!({"code": "123123"})).await;
    assert_eq!(right.status, 200, "{}", right.text);
}

/// Authentication comes first: a partner deactivated since the first answer
/// (or a key that no longer exists) gets its 401, never the stored answer.
async fn no_replay_after_the_partner_is_deactivated(app: TestApp) {
    let (partner, key) = app.partner(handset_core::Product::ALL).await;
    let body = json!({"phone": "4155550123"});
    let first = post_with_key(&app, &key, "once", "/v1/possession", &body).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert!(app.store.set_partner_active(partner, false).await.unwrap());
    // On Postgres the change reaches the partner cache by NOTIFY, in milliseconds.
    app.soon_answers_as(&key, 401).await;
    let refused = post_with_key(&app, &key, "once", "/v1/possession", &body).await;
    refused.assert_error(401, 1200);
    assert!(!refused.headers.contains_key(REPLAYED_HEADER));
    post_with_key(&app, "hs_revoked_key", "once", "/v1/possession", &body).await.assert_error(401, 1100);
    // A malformed key is judged after authentication too.
    post_with_key(&app, "hs_revoked_key", " ", "/v1/possession", &body).await.assert_error(401, 1100);
}

/// A 429 or a validation error records nothing, so it is not kept: the
/// same key runs again (and may carry a corrected request).
async fn answers_that_record_nothing_are_not_kept(app: TestApp) {
    // The sandbox's 5100 mock number answers 429 with Retry-After.
    let limited = json!({"phone": "9995555100"});
    let first = post_with_key(&app, DEV_KEY, "after-429", "/v1/possession", &limited).await;
    first.assert_error(429, 5100);
    assert!(first.headers.contains_key("retry-after"));
    let again = post_with_key(&app, DEV_KEY, "after-429", "/v1/possession", &limited).await;
    again.assert_error(429, 5100);
    assert!(!again.headers.contains_key(REPLAYED_HEADER), "a 429 is never replayed");
    let corrected = post_with_key(&app, DEV_KEY, "after-429", "/v1/possession", &json!({"phone": "4155550123"})).await;
    assert_eq!(corrected.status, 201, "{}", corrected.text);

    let invalid = post_with_key(&app, DEV_KEY, "after-422", "/v1/possession", &json!({"phone": "12"})).await;
    invalid.assert_error(422, 3101);
    let fixed = post_with_key(&app, DEV_KEY, "after-422", "/v1/possession", &json!({"phone": "4155550124"})).await;
    assert_eq!(fixed.status, 201, "{}", fixed.text);
    let replayed = post_with_key(&app, DEV_KEY, "after-422", "/v1/possession", &json!({"phone": "4155550124"})).await;
    assert_eq!(replayed.headers.get(REPLAYED_HEADER).map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(replayed.id(), fixed.id());

    // A 500 is not kept either: the retry runs again, and the key is not
    // bound to the failed request's body.
    let failing = json!({"phone": "9995555000"});
    post_with_key(&app, DEV_KEY, "after-500", "/v1/possession", &failing).await.assert_error(500, 5000);
    let retried = post_with_key(&app, DEV_KEY, "after-500", "/v1/possession", &failing).await;
    retried.assert_error(500, 5000);
    assert!(!retried.headers.contains_key(REPLAYED_HEADER), "a 500 is never replayed");
    let after = post_with_key(&app, DEV_KEY, "after-500", "/v1/possession", &json!({"phone": "4155550125"})).await;
    assert_eq!(after.status, 201, "the key ran again with another body: {}", after.text);
}

/// The same key fired at once, many times, while the first request is held
/// open by a slow provider (ID.me on the sim, 400 ms): one transaction, one
/// send at the provider, and every other answer is 409 3907 or the first
/// answer replayed byte for byte.
async fn one_key_fired_concurrently_sends_once(kind: Kind) {
    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    let base = sim.base_url();
    let env = [
        ("HANDSET__PROVIDERS__IDME__BASE_URL", base.as_str()),
        ("HANDSET__PROVIDERS__IDME__SECRET", "sim-secret"),
        ("HANDSET__PROVIDERS__IDME__TIMEOUT", "5s"),
    ];
    let app = TestApp::spawn_with(kind, &env).await;
    sim.set_faults(Faults { latency_ms: 400, ..Faults::default() });
    let sent_before = sim.requests();
    let body = json!({"phone": "4155550123", "provider": "idme"});
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = app
            .client
            .post(app.url("/v1/possession"))
            .bearer_auth(DEV_KEY)
            .header("idempotency-key", "one-send")
            .json(&body);
        requests.spawn(async move {
            let response = request.send().await.unwrap();
            let (status, replayed) = (response.status().as_u16(), response.headers().contains_key(REPLAYED_HEADER));
            (status, replayed, response.text().await.unwrap())
        });
    }
    let answers = requests.join_all().await;
    let firsts: Vec<_> = answers.iter().filter(|(status, replayed, _)| *status == 201 && !replayed).collect();
    assert_eq!(firsts.len(), 1, "one request did the work: {answers:?}");
    let first = &firsts[0].2;
    let mut in_flight = 0;
    for (status, replayed, text) in &answers {
        match (status, replayed) {
            (201, false) => {}
            (201, true) => assert_eq!(text, first, "a replay is the first answer, byte for byte"),
            (409, _) => {
                assert!(text.contains("3907"), "{text}");
                in_flight += 1;
            }
            other => panic!("unexpected answer {other:?}: {text}"),
        }
    }
    assert!(in_flight > 0, "the others arrived while the first was held open: {answers:?}");
    assert_eq!(app.count("transactions").await, 1, "one transaction");
    assert_eq!(sim.requests() - sent_before, 1, "one send reached ID.me");
    let again = post_with_key(&app, DEV_KEY, "one-send", "/v1/possession", &body).await;
    assert_eq!(&again.text, first);
    assert_eq!(again.headers[REPLAYED_HEADER], "true");
}

mod concurrent {
    use handset_testkit::Kind;
    crate::on_both_kinds!(one_key_fired_concurrently_sends_once);
    async fn one_key_fired_concurrently_sends_once(kind: Kind) {
        super::one_key_fired_concurrently_sends_once(kind).await
    }
}
