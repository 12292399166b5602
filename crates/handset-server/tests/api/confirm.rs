//! Confirm's precedence, attempts and expiry, including under concurrency.

use handset_core::Product;
use serde_json::json;

use crate::helpers::TestApp;
use crate::on_both_stores;

on_both_stores!(
    wrong_codes_use_attempts_until_the_limit,
    malformed_codes_count_nothing,
    succeeded_transactions_answer_200_without_counting,
    concurrent_wrong_codes_count_exactly_the_limit,
    identity_transactions_are_not_possession_checks,
    foreign_and_unknown_transactions,
    attempts_used_on_another_replica_count_for_the_starting_one,
    a_check_ended_on_another_replica_stays_ended,
);

async fn remaining(app: &TestApp, id: &str) -> serde_json::Value {
    app.transaction(id).await.body["next_action"]["attempts_remaining"].clone()
}

async fn wrong_codes_use_attempts_until_the_limit(app: TestApp) {
    let id = app.start_sms("4155550123").await.id();
    for left in (1..=4).rev() {
        app.confirm(&id, "000000").await.assert_error(422, 3102);
        assert_eq!(remaining(&app, &id).await, left);
    }
    // The wrong code that uses the last attempt ends the transaction.
    app.confirm(&id, "000000").await.assert_error(422, 3104);
    let tx = app.transaction(&id).await;
    assert_eq!(tx.body["status"]["code"], 300);
    assert_eq!(tx.body["result"]["errors"][0]["code"], 3104);
    assert_eq!(tx.body["next_action"], json!(null));
    // Even the right code cannot revive it.
    app.confirm(&id, "123123").await.assert_error(422, 3104);
    assert_eq!(app.transaction(&id).await.body["status"]["code"], 300);
}

async fn malformed_codes_count_nothing(app: TestApp) {
    let id = app.start_sms("4155550123").await.id();
    for body in [
        json!({}),
        json!({"code": "12a456"}),
        json!({"code": "123"}),
        json!({"code": "12345678901"}),
        json!({"code": 123123}),
        json!({"code": null}),
    ] {
        app.post(&format!("/v1/possession/{id}/confirm"), body).await.assert_error(422, 3102);
    }
    assert_eq!(remaining(&app, &id).await, 5);
    assert_eq!(app.confirm(&id, "123123").await.status, 200);
}

async fn succeeded_transactions_answer_200_without_counting(app: TestApp) {
    let id = app.start_sms("4155550123").await.id();
    app.confirm(&id, "000000").await.assert_error(422, 3102);
    assert_eq!(app.confirm(&id, "123123").await.status, 200);
    let again = app.confirm(&id, "999999").await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["status"]["code"], 200);
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(row.attempts_used, 2, "the confirm after success counted nothing");
}

async fn concurrent_wrong_codes_count_exactly_the_limit(app: TestApp) {
    let id = app.start_sms("4155550123").await.id();
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.confirm(&id, "000000").await })
        })
        .collect();
    let mut codes = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 422, "{}", answer.text);
        codes.push(answer.body["errors"][0]["code"].as_u64().unwrap());
    }
    assert_eq!(codes.iter().filter(|&&c| c == 3102).count(), 4, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 3104).count(), 16, "{codes:?}");
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(row.attempts_used, 5);
    assert_eq!(app.transaction(&id).await.body["status"]["code"], 300);
}

async fn identity_transactions_are_not_possession_checks(app: TestApp) {
    let identity = app.post("/v1/identity", json!({ "phone": "8885551234", "birth_date": "1968-05-27" })).await;
    app.confirm(&identity.id(), "123123").await.assert_error(422, 3105);
}

async fn foreign_and_unknown_transactions(app: TestApp) {
    let id = app.start_sms("4155550123").await.id();
    let (_, other) = app.partner(Product::ALL).await;
    let path = format!("/v1/possession/{id}/confirm");
    app.post_as(&other, &path, json!({"code": "123123"})).await.assert_error(403, 3200);
    app.get_as(&other, &format!("/v1/transactions/{id}")).await.assert_error(403, 3200);
    assert_eq!(remaining(&app, &id).await, 5, "a foreign confirm counts nothing");
    let unknown = uuid::Uuid::new_v4();
    app.confirm(&unknown.to_string(), "123123").await.assert_error(404, 4100);
    // Which transaction is decided before the body is looked at.
    let bad_body = json!({"code": "123123", "extra": 1});
    app.post(&format!("/v1/possession/{unknown}/confirm"), bad_body.clone()).await.assert_error(404, 4100);
    app.post_as(&other, &path, bad_body.clone()).await.assert_error(403, 3200);
    app.post(&format!("/v1/possession/{id}/confirm"), bad_body).await.assert_error(422, 3903);
    app.get("/v1/transactions/%FF%FE").await.assert_error(404, 4100);
    app.confirm("not-a-uuid", "123123").await.assert_error(404, 4100);
    app.get(&format!("/v1/transactions/{unknown}")).await.assert_error(404, 4100);
    app.get("/v1/transactions/nope").await.assert_error(404, 4100);
}

/// Expiry needs a short code lifetime, so it runs on an app of its own.
mod expiry {
    use super::*;
    use handset_testkit::Kind;

    async fn expired_codes_end_the_transaction(kind: Kind) {
        let app = TestApp::spawn_with(kind, &[("HANDSET__POSSESSION__CODE_TTL", "300ms")]).await;
        let id = app.start_sms("4155550123").await.id();
        let network = app.post("/v1/possession", json!({"phone": "4155550124", "channel": "network"})).await.id();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        app.confirm(&id, "123123").await.assert_error(422, 3103);
        let tx = app.transaction(&id).await;
        assert_eq!(tx.body["status"]["code"], 300);
        assert_eq!(tx.body["result"]["errors"][0]["code"], 3103);
        // Expired earlier: still 3103, whatever the code.
        app.confirm(&id, "000000").await.assert_error(422, 3103);
        let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(row.attempts_used, 0);
        // The operator step past its deadline fails the network check too.
        app.post(&format!("/v1/possession/{network}/confirm"), json!({})).await.assert_error(422, 3103);
        assert_eq!(app.transaction(&network).await.body["status"]["code"], 300);
    }

    crate::on_both_kinds!(expired_codes_end_the_transaction);
}

/// A second replica: another gateway on `app`'s database. (Its own `db` and
/// `store` are an unused empty database: read through `app`.)
async fn replica_of(app: &TestApp) -> TestApp {
    TestApp::spawn_with(app.kind, &[("HANDSET__DATABASE__URL", app.db.url.as_str())]).await
}

/// The starting replica keeps a copy of the check for its first confirm;
/// a wrong code given on another replica since makes that copy stale, and
/// the confirm still counts both attempts.
async fn attempts_used_on_another_replica_count_for_the_starting_one(app: TestApp) {
    let other = replica_of(&app).await;
    let id = app.start_sms("4155550123").await.id();
    other.confirm(&id, "000000").await.assert_error(422, 3102);
    let confirmed = app.confirm(&id, "123123").await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    assert_eq!(confirmed.body["status"]["code"], 200);
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(row.attempts_used, 2, "the other replica's attempt and this one");
    assert_eq!(other.transaction(&id).await.body["status"]["code"], 200);
}

/// A check whose attempts ran out on another replica is not revived by the
/// right code on the replica that started it (and still holds it pending).
async fn a_check_ended_on_another_replica_stays_ended(app: TestApp) {
    let other = replica_of(&app).await;
    let id = app.start_sms("4155550123").await.id();
    for _ in 0..4 {
        other.confirm(&id, "000000").await.assert_error(422, 3102);
    }
    other.confirm(&id, "000000").await.assert_error(422, 3104);
    app.confirm(&id, "123123").await.assert_error(422, 3104);
    let row = app.store.transaction(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!((row.status.code(), row.attempts_used), (300, 5));
}
