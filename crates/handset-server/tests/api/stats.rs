//! `GET /v1/stats` and `handset stats`: the verification funnel, counted
//! from real transactions started through the sandbox, on both stores.

use std::time::Duration;

use chrono::{DateTime, Utc};
use handset_core::Product;
use handset_core::model::{ProviderName, Status, Transaction, Verification};
use handset_core::store::Finalization;
use handset_testkit::Kind;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::TestApp;

/// A code stays valid this long, so the test can let one expire.
const CODE_TTL: &str = "2s";

/// Partner A's transactions: in the US, two SMS checks confirmed, one left
/// pending, one failed by wrong codes, one expired; in France one SMS check
/// confirmed; identity one matched and one refused (999: 1014). Partner B
/// has one confirmed check, which A never sees.
async fn funnel_fixture(kind: Kind) -> (TestApp, String, String) {
    let app = TestApp::spawn_with(kind, &[("HANDSET__POSSESSION__CODE_TTL", CODE_TTL)]).await;
    let all = [Product::PossessionSms, Product::Identity];
    let ((_, a), (_, b)) = (app.partner(&all).await, app.partner(&all).await);
    let start = |key: &str, phone: &str| {
        let (app, key, phone) = (&app, key.to_owned(), phone.to_owned());
        async move {
            let started = app.post_as(&key, "/v1/possession", json!({ "phone": phone })).await;
            assert_eq!(started.status, 201, "{}", started.text);
            started.id()
        }
    };
    let confirm = |key: &str, id: &str, code: &str| {
        let (app, key, path) = (&app, key.to_owned(), format!("/v1/possession/{id}/confirm"));
        let code = code.to_owned();
        async move { app.post_as(&key, &path, json!({ "code": code })).await }
    };

    let expiring = start(&a, "4155550101").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    confirm(&a, &expiring, "123123").await.assert_error(422, 3103);

    for phone in ["4155550102", "4155550103"] {
        let id = start(&a, phone).await;
        assert_eq!(confirm(&a, &id, "123123").await.status, 200);
    }
    start(&a, "4155550104").await;
    let failing = start(&a, "4155550105").await;
    for _ in 0..5 {
        confirm(&a, &failing, "000000").await;
    }
    let french = start(&a, "+33612345678").await;
    assert_eq!(confirm(&a, &french, "123123").await.status, 200);
    for phone in ["8885550000", "9995551014"] {
        let started = app.post_as(&a, "/v1/identity", json!({ "phone": phone, "birth_date": "1990-01-31" })).await;
        assert_eq!(started.status, 201, "{}", started.text);
    }
    let other = start(&b, "4155550106").await;
    assert_eq!(confirm(&b, &other, "123123").await.status, 200);
    (app, a, b)
}

/// A group's counts: (started, succeeded, failed, expired, pending).
fn counts(group: &Value) -> [i64; 5] {
    ["started", "succeeded", "failed", "expired", "pending"].map(|k| group[k].as_i64().unwrap_or(-1))
}

fn group(groups: &Value, provider: Value, country: Value, product: Value) -> &Value {
    groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["provider"] == provider && g["country"] == country && g["product"] == product)
        .unwrap_or_else(|| panic!("no group {provider} {country} {product} in {groups}"))
}

async fn funnel_counts_a_partners_own_transactions(kind: Kind) {
    let (app, a, _) = funnel_fixture(kind).await;
    let stats = app.get_as(&a, "/v1/stats").await;
    assert_eq!(stats.status, 200, "{}", stats.text);
    let body = &stats.body;
    assert_eq!(body["groups"].as_array().unwrap().len(), 3, "{body}");

    let us_sms = group(body, json!("sandbox"), json!("US"), json!("possession.sms"));
    assert_eq!(counts(us_sms), [5, 2, 1, 1, 1]);
    assert_eq!(us_sms["conversion"], json!(0.5), "2 of the 4 that ended");
    let median = us_sms["median_seconds_to_success"].as_f64().unwrap();
    assert!((0.0..2.0).contains(&median), "confirmed at once: {median}");

    let fr_sms = group(body, json!("sandbox"), json!("FR"), json!("possession.sms"));
    assert_eq!(counts(fr_sms), [1, 1, 0, 0, 0]);
    assert_eq!(fr_sms["conversion"], json!(1.0));

    let identity = group(body, json!("sandbox"), json!("US"), json!("identity"));
    assert_eq!(counts(identity), [2, 1, 1, 0, 0]);
    let decided = identity["median_seconds_to_success"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&decided), "decided in the start itself: {decided}");

    // Grouped by product only: the other dimensions read null.
    let by_product = app.get_as(&a, "/v1/stats?group_by=product").await.body;
    assert_eq!(by_product["groups"].as_array().unwrap().len(), 2, "{by_product}");
    let sms = group(&by_product, Value::Null, Value::Null, json!("possession.sms"));
    assert_eq!(counts(sms), [6, 3, 1, 1, 1]);
    assert_eq!(sms["conversion"], json!(0.6));

    let by_country = app.get_as(&a, "/v1/stats?group_by=country,provider").await.body;
    assert_eq!(counts(group(&by_country, json!("sandbox"), json!("US"), Value::Null)), [7, 3, 2, 1, 1]);

    // The range: `until` is exclusive, and a range before everything is empty.
    let before = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let empty = app.get_as(&a, &format!("/v1/stats?until={before}")).await;
    assert_eq!(empty.status, 200, "{}", empty.text);
    assert_eq!(empty.body["groups"], json!([]));
    assert_eq!(empty.body["until"].as_str().map(|u| u.starts_with(&before[..19])), Some(true), "{}", empty.text);
}

async fn stats_queries_are_checked(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for query in [
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "since=2026-11-02T00:00:00Z&until=2026-11-01T00:00:00Z",
        "since=2026-01-01T00:00:00Z&until=2026-11-01T00:00:00Z",
        "group_by=provider,carrier",
        "group_by=",
        "partner=all",
        "since=2026-11-01T00:00:00Z&since=2026-11-02T00:00:00Z",
    ] {
        app.get(&format!("/v1/stats?{query}")).await.assert_error(422, 3910);
    }
    let unauthenticated = app.send(app.client.get(app.url("/v1/stats"))).await;
    assert_eq!(unauthenticated.status, 401);
    assert_eq!(app.get("/v1/stats?group_by=product,country").await.status, 200);
}

/// `handset stats` prints the same answer for one partner, and counts
/// every partner's transactions without `--partner`.
async fn operators_read_the_funnel_across_partners(kind: Kind) {
    let (app, a, b) = funnel_fixture(kind).await;
    let run = |args: &[&str]| {
        let args: Vec<&str> = ["stats"].iter().chain(args).copied().collect();
        app.cli(&args).unwrap_or_else(|error| panic!("handset {args:?}: {error}"))
    };
    let partner_id = |key: &str| {
        let (app, key) = (&app, key.to_owned());
        async move {
            let hash = handset_core::secret::api_key_hash(&key);
            app.store.partner_by_key_hash(&hash, chrono::Utc::now()).await.unwrap().unwrap().partner.id.to_string()
        }
    };
    let (a_id, b_id) = (partner_id(&a).await, partner_id(&b).await);

    let everyone = run(&["--since", "1h", "--group-by", "product"]);
    assert_eq!(counts(group(&everyone, Value::Null, Value::Null, json!("possession.sms"))), [7, 4, 1, 1, 1]);
    let only_b = run(&["--since", "1h", "--partner", &b_id]);
    assert_eq!(only_b["groups"].as_array().unwrap().len(), 1);
    assert_eq!(counts(group(&only_b, json!("sandbox"), json!("US"), json!("possession.sms"))), [1, 1, 0, 0, 0]);

    let until = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let printed = run(&["--since", &since, "--until", &until, "--partner", &a_id]);
    let query = format!("/v1/stats?since={}&until={}", urlencode(&since), urlencode(&until));
    assert_eq!(printed, app.get_as(&a, &query).await.body, "the CLI and the API agree");

    let refused = app.cli(&["stats", "--group-by", "carrier"]).expect_err("an unknown dimension");
    assert!(refused.contains("group_by"), "{refused}");
}

fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A transaction of `partner` created at `created`, ended (`status`) at `ended`.
fn recorded(
    partner: Uuid,
    product: Product,
    phone: &str,
    created: DateTime<Utc>,
    status: Status,
    ended: DateTime<Utc>,
) -> (Transaction, Verification) {
    let verification = Verification { id: Uuid::new_v4(), partner_id: partner, created_at: created };
    let parsed = handset_core::Phone::parse(phone, handset_core::Region::default()).unwrap();
    let mut tx = Transaction::pending(partner, verification.id, product, ProviderName::Sandbox, phone, created);
    tx.country = parsed.region().map(str::to_owned);
    tx.expires_at = Some(created + chrono::Duration::minutes(10));
    tx.status = status;
    tx.updated_at = ended;
    (tx, verification)
}

fn hour_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::DurationRound;
    t.duration_trunc(chrono::Duration::hours(1)).unwrap()
}

/// Whole hours whose transactions all ended are read from the hourly
/// rollup: the answers stay the same, an hour with a pending transaction
/// waits for it, and the job runner rolls hours up by itself.
async fn whole_hours_are_read_from_the_rollup(kind: Kind) {
    let app = TestApp::spawn_with(kind, &[("HANDSET__WORKERS__ENABLED", "false")]).await;
    let (partner, key) = app.partner(&[Product::PossessionSms, Product::Identity]).await;
    let now = Utc::now();
    let base = hour_floor(now) - chrono::Duration::hours(5);
    let at = |minutes: i64| base + chrono::Duration::minutes(minutes);
    let seconds = chrono::Duration::seconds;
    let sms = Product::PossessionSms;
    let mut pending = None;
    for (product, phone, created, status, ended) in [
        // Before the first whole hour of the query: read from the transactions.
        (sms, "4155550101", at(-20), Status::Succeeded, at(-20) + seconds(12)),
        (sms, "4155550102", at(5), Status::Succeeded, at(5) + seconds(30)),
        (sms, "4155550103", at(17), Status::Succeeded, at(17) + seconds(30)),
        (sms, "4155550104", at(40), Status::Succeeded, at(40) + seconds(200)),
        (sms, "4155550105", at(50), Status::Failed, at(51)),
        (sms, "4155550106", at(55), Status::Failed, at(55) + chrono::Duration::minutes(10)),
        (Product::Identity, "4155550107", at(70), Status::Succeeded, at(70) + seconds(3)),
        (Product::Identity, "4155550108", at(80), Status::Pending, at(80)),
        (sms, "+33612345678", at(200), Status::Succeeded, at(200) + seconds(45)),
    ] {
        let (mut tx, verification) = recorded(partner, product, phone, created, status, ended);
        if status == Status::Pending {
            tx.expires_at = Some(now + chrono::Duration::days(1));
            pending = Some(tx.clone());
        }
        app.store.insert_transaction(&tx, Some(&verification), None).await.unwrap();
    }
    let since = (base - chrono::Duration::minutes(30)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let until = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let query = format!("/v1/stats?since={}&until={}", urlencode(&since), urlencode(&until));
    let from_transactions = app.get_as(&key, &query).await;
    assert_eq!(from_transactions.status, 200, "{}", from_transactions.text);
    let us_sms = group(&from_transactions.body, json!("sandbox"), json!("US"), json!("possession.sms"));
    assert_eq!(counts(us_sms), [6, 4, 1, 1, 0], "{us_sms}");
    // Successes after 12, 30, 30 and 200 seconds: the middle is in the 30 s bucket.
    assert_eq!(us_sms["median_seconds_to_success"], 30.5, "{us_sms}");

    // The hour before the query's first whole hour (the query still reads
    // its part from the transactions) and that first hour are rolled up;
    // the next waits for its pending identity match.
    let before = now - chrono::Duration::minutes(15);
    assert_eq!(app.store.roll_up_funnel(before, 24).await.unwrap(), 2);
    assert_eq!(app.store.roll_up_funnel(before, 24).await.unwrap(), 0, "the pending hour waits");
    assert!(app.count("funnel_hours").await > 0);
    assert_eq!(app.get_as(&key, &query).await.body, from_transactions.body, "the same answer from the rollup");

    // Once it ends, the rest is rolled up; empty hours are passed over.
    let mut ended = pending.unwrap();
    ended.status = Status::Failed;
    ended.updated_at = at(85);
    assert!(app.store.finalize(Finalization { transaction: &ended, outbox: None }).await.unwrap());
    let rolled = app.store.roll_up_funnel(before, 24).await.unwrap();
    assert_eq!(rolled, 2, "the identity hour and the French one");
    let whole = app.get_as(&key, &query).await;
    let identity = group(&whole.body, json!("sandbox"), json!("US"), json!("identity"));
    assert_eq!(counts(identity), [2, 1, 1, 0, 0], "{identity}");
    let mut expected = from_transactions.body.clone();
    for group in expected["groups"].as_array_mut().unwrap() {
        if group["product"] == "identity" {
            group["failed"] = json!(1);
            group["pending"] = json!(0);
            group["conversion"] = json!(0.5);
        }
    }
    assert_eq!(whole.body, expected, "rollup and transactions together");
    // Nothing left to roll up before the last settled hour.
    assert_eq!(app.store.roll_up_funnel(before, 24).await.unwrap(), 0);
}

/// The job runner rolls closed hours up by itself (it tries every 60 polls:
/// here every 6 s).
async fn the_runner_rolls_hours_up(kind: Kind) {
    let app = TestApp::spawn_with(kind, &[("HANDSET__WORKERS__POLL_INTERVAL", "100ms")]).await;
    let (partner, _) = app.partner(&[Product::PossessionSms]).await;
    let created = hour_floor(Utc::now()) - chrono::Duration::hours(3);
    let (tx, verification) = recorded(
        partner,
        Product::PossessionSms,
        "4155550109",
        created,
        Status::Succeeded,
        created + chrono::Duration::seconds(9),
    );
    app.store.insert_transaction(&tx, Some(&verification), None).await.unwrap();
    for _ in 0..200 {
        if app.count("funnel_hours").await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the runner did not roll the hour up");
}

crate::on_both_kinds!(
    funnel_counts_a_partners_own_transactions,
    stats_queries_are_checked,
    operators_read_the_funnel_across_partners,
    whole_hours_are_read_from_the_rollup,
    the_runner_rolls_hours_up
);
