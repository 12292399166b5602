//! The error catalogue against the documents, not against itself: every
//! code with the HTTP status and message that ID.me's error list and the
//! design's own table give it (written out here by hand), and every code
//! that handset answers with produced over HTTP by some request. The only
//! codes no request produces are ID.me's document errors, which handset
//! passes through from ID.me (docs/providers/idme.md) and never makes itself.

use std::collections::BTreeMap;
use std::time::Duration;

use handset_core::ErrorCode;
use handset_core::model::Product;
use handset_testkit::Kind;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Answer, DEV_KEY, TestApp};

/// (code, HTTP status of a refused request or `None` for a result error,
/// message), from `idme-overview-errors.txt` and the design's table of
/// handset's own codes.
pub(crate) const SPEC: &[(u16, Option<u16>, &str)] = &[
    (1100, Some(401), "Credentials used are not associated with any account"),
    (1200, Some(401), "Credentials used are associated with an inactive account"),
    (2300, Some(403), "Referenced product is not enabled for this account"),
    (3200, Some(403), "Transaction is not owned by this account"),
    (3300, Some(403), "Verification is not owned by this account"),
    (4100, Some(404), "Resource not found"),
    (3100, Some(422), "Transaction parameter callback_url is invalid"),
    (3101, Some(422), "Transaction parameter phone is missing or invalid"),
    (3102, Some(422), "Transaction parameter code is missing or not valid"),
    (3103, Some(422), "Transaction parameter code is expired"),
    (3104, Some(422), "Transaction retry limit exceeded"),
    (3105, Some(422), "Transaction is not associated with a valid possession check"),
    (3107, Some(422), "Transaction parameter birth_date indicates user is a minor"),
    (3108, Some(422), "Transaction parameter birth_date is not in YYYY-MM-DD format"),
    (3109, Some(422), "The file size is too small. Uploaded files must be greater than 40KB and less than 16MB"),
    (3110, Some(422), "The file size is too large. Uploaded files must be greater than 40KB and less than 16MB"),
    (3111, Some(422), "Image type not supported. Please send .jpeg, .jpg, or .png files"),
    (5100, Some(429), "Rate limit exceeded for this product"),
    (5200, Some(429), "Rate limit exceeded for this account"),
    (5000, Some(500), "An error occurred for this account"),
    (3900, Some(400), "Request body is not a valid JSON object"),
    (3901, Some(415), "Content-Type must be application/json"),
    (3902, Some(413), "Request body is larger than 64 KiB"),
    (3903, Some(422), "Request contains an unknown field"),
    (3904, Some(422), "Transaction parameter metadata is longer than 500 characters"),
    (3905, Some(422), "Transaction parameter name is missing or invalid"),
    (3906, Some(422), "Idempotency-Key was already used with a different request"),
    (3907, Some(409), "A request with this Idempotency-Key is still in flight"),
    (3908, Some(422), "No configured provider serves this product for this phone number"),
    (3909, Some(408), "Request body was not received in time"),
    (5300, Some(429), "Send limit reached for this phone number"),
    // The design's SMS pumping guard.
    (5301, Some(429), "Sends to this number range are paused"),
    // handset's own, for `GET /v1/stats` (the README's table).
    (3910, Some(422), "Query parameter since, until or group_by is invalid"),
    (5001, Some(503), "Every eligible provider is unavailable"),
    (1001, None, "Phone number cannot receive SMS message"),
    (1002, None, "SMS could not be sent"),
    (1003, None, "The phone number you provided is blocked from receiving text messages"),
    (1004, None, "The phone number you provided has recently been deactivated"),
    (1005, None, "Something went wrong while delivering the text message. Please try again"),
    (1006, None, "The network was unable to route the text message to your phone"),
    (1007, None, "The text message failed to deliver due to an issue with the phone or cellular network"),
    (1008, None, "The phone number you provided has been flagged for fraudulent activity"),
    (1009, None, "The text message failed to deliver. Please make sure your phone is turned on"),
    (1010, None, "Text messaging is not supported by the phone, carrier, or data plan"),
    (1011, None, "Something went wrong when attempting to deliver the sign in code"),
    (1012, None, "Something went wrong when attempting to deliver the sign in code"),
    (1013, None, "Name attribute is invalid"),
    (1014, None, "Could not find the user"),
    (2001, None, "Cannot verify users under 18 years old"),
    (2002, None, "The document provided is expired. Please upload a valid document"),
    (2003, None, "The front of the document does not match to the back of the document"),
    (
        2004,
        None,
        "Please ensure your document’s information is clear and visible, taken on a contrasting background, and all four corners are shown",
    ),
    (2005, None, "We were unable to verify your document"),
];

/// Result errors of ID.me's document product: passed through when ID.me
/// reports one, never produced by handset.
const PASSED_THROUGH_FROM_IDME_ONLY: &[u16] = &[2001, 2002, 2003, 2004, 2005];

fn spec_status(code: u16) -> Option<u16> {
    SPEC.iter().find(|(c, ..)| *c == code).unwrap_or_else(|| panic!("{code} is not in the documents")).1
}

#[test]
fn the_catalogue_is_the_documents() {
    let documented: Vec<(u16, Option<u16>, &str)> = SPEC.to_vec();
    let mut catalogue: Vec<(u16, Option<u16>, &str)> =
        ErrorCode::ALL.iter().map(|c| (c.code(), c.http_status(), c.message())).collect();
    let mut sorted = documented.clone();
    sorted.sort();
    catalogue.sort();
    assert_eq!(catalogue, sorted, "catalogue and documents differ");
}

/// What `code` a refused answer carries, checked against the documented status.
#[track_caller]
fn refused(answer: &Answer, seen: &mut BTreeMap<u16, String>, how: &str) {
    let code = answer.body["errors"][0]["code"].as_u64().unwrap_or_else(|| panic!("{how}: {}", answer.text)) as u16;
    assert_eq!(Some(answer.status.as_u16()), spec_status(code), "{how}: {}", answer.text);
    seen.entry(code).or_insert_with(|| how.to_owned());
}

/// The result error of a transaction final at creation, checked against the documents.
#[track_caller]
fn result_error(answer: &Answer, seen: &mut BTreeMap<u16, String>, how: &str) {
    assert_eq!(answer.status, 201, "{how}: {}", answer.text);
    assert_eq!(answer.body["status"]["code"], 300, "{how}: {}", answer.text);
    let error = &answer.body["result"]["errors"][0];
    let code = error["code"].as_u64().unwrap() as u16;
    let (_, status, message) = SPEC.iter().find(|(c, ..)| *c == code).unwrap();
    assert_eq!(*status, None, "{how}: {code} is a result error");
    assert_eq!(error["message"], *message, "{how}");
    seen.entry(code).or_insert_with(|| how.to_owned());
}

async fn post_raw(app: &TestApp, content_type: &str, body: Vec<u8>) -> Answer {
    let request =
        app.client.post(app.url("/v1/possession")).bearer_auth(DEV_KEY).header("content-type", content_type).body(body);
    app.send(request).await
}

async fn post_keyed(app: &TestApp, key: &str, body: &Value) -> Answer {
    let request = app.client.post(app.url("/v1/possession")).bearer_auth(DEV_KEY).header("idempotency-key", key);
    app.send(request.json(body)).await
}

/// A body announced and never sent: 408 once `server.body_read_timeout` passes.
async fn stalled_body(app: &TestApp) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST /v1/possession HTTP/1.1\r\nHost: handset\r\nAuthorization: Bearer {DEV_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw)).await.expect("answered").unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).expect("a status line");
    let text = raw.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    let text = text.lines().find(|l| l.starts_with('{')).unwrap_or_default().to_owned();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer { status: reqwest::StatusCode::from_u16(status).unwrap(), headers: Default::default(), text, body }
}

/// Every code handset answers with, each produced by a request over HTTP;
/// together with ID.me's pass-through codes they are the whole catalogue.
async fn every_code_is_answered_over_http(kind: Kind) {
    let env = [
        ("HANDSET__RATE_LIMITS__PER_PHONE_PER_HOUR", "1"),
        ("HANDSET__SERVER__BODY_READ_TIMEOUT", "300ms"),
        // ID.me configured where nothing listens: unavailable before anything was sent.
        ("HANDSET__PROVIDERS__IDME__BASE_URL", "http://127.0.0.1:9"),
        ("HANDSET__PROVIDERS__IDME__SECRET", "unused"),
    ];
    let app = TestApp::spawn_with(kind, &env).await;
    let mut seen = BTreeMap::new();
    let seen = &mut seen;

    // The sandbox's mock numbers: every 31xx and 5xxx a number can cause,
    // and every telecom result error.
    for (code, status, _) in SPEC {
        let sandbox_picks = (3100..3200).contains(code) || matches!(code, 5000 | 5100 | 5200 | 1001..=1014);
        if !sandbox_picks {
            continue;
        }
        let answer = app.start_sms(&format!("999555{code}")).await;
        match status {
            Some(_) => refused(&answer, seen, "sandbox mock number"),
            None => result_error(&answer, seen, "sandbox mock number"),
        }
    }

    // Partners and ownership.
    refused(
        &app.get_as("hs_unknown", "/v1/transactions/00000000-0000-4000-8000-000000000000").await,
        seen,
        "unknown key",
    );
    let (inactive, inactive_key) = app.partner(Product::ALL).await;
    assert!(app.store.set_partner_active(inactive, false).await.unwrap());
    refused(&app.post_as(&inactive_key, "/v1/possession", json!({"phone": "4155550100"})).await, seen, "inactive");
    let (_, identity_only) = app.partner(&[Product::Identity]).await;
    refused(&app.post_as(&identity_only, "/v1/possession", json!({"phone": "4155550101"})).await, seen, "product");
    let mine = app.start_sms("4155550102").await;
    let (_, other) = app.partner(Product::ALL).await;
    refused(&app.get_as(&other, &format!("/v1/transactions/{}", mine.id())).await, seen, "foreign transaction");
    let verification = mine.body["verification_id"].as_str().unwrap();
    refused(&app.get_as(&other, &format!("/v1/verifications/{verification}")).await, seen, "foreign verification");
    refused(&app.get("/v1/transactions/00000000-0000-4000-8000-000000000000").await, seen, "unknown id");

    // The request's own fields and body.
    refused(
        &app.post("/v1/possession", json!({"phone": "4155550103", "callback_url": "ftp://x"})).await,
        seen,
        "callback_url",
    );
    let minor = (chrono::Utc::now().date_naive() - chrono::Days::new(365 * 10)).to_string();
    refused(&app.post("/v1/identity", json!({"phone": "4155550104", "birth_date": minor})).await, seen, "minor");
    refused(&app.post("/v1/identity", json!({"phone": "4155550104", "birth_date": "27/05/1968"})).await, seen, "date");
    refused(&post_raw(&app, "application/json", b"{".to_vec()).await, seen, "broken JSON");
    refused(&post_raw(&app, "text/plain", b"phone=1".to_vec()).await, seen, "content type");
    refused(&post_raw(&app, "application/json", vec![b' '; 70 * 1024]).await, seen, "64 KiB");
    refused(&app.post("/v1/possession", json!({"phone": "4155550105", "colour": "blue"})).await, seen, "unknown field");
    let metadata = json!({"note": "x".repeat(600)});
    refused(&app.post("/v1/possession", json!({"phone": "4155550106", "metadata": metadata})).await, seen, "metadata");
    refused(&app.post("/v1/possession", json!({"phone": "4155550107", "name": 5})).await, seen, "name");
    refused(&app.post("/v1/possession", json!({"phone": "4155550108", "provider": "veratad"})).await, seen, "provider");
    refused(&stalled_body(&app).await, seen, "stalled body");

    // Idempotency-Key.
    assert_eq!(post_keyed(&app, "k", &json!({"phone": "4155550109"})).await.status, 201);
    refused(&post_keyed(&app, "k", &json!({"phone": "4155550110"})).await, seen, "key reused");
    let busy_body = json!({"phone": "4155550111"});
    app.hold_idempotency_key("busy", "/v1/possession", &busy_body).await;
    refused(&post_keyed(&app, "busy", &busy_body).await, seen, "key in flight");

    // Limits and providers.
    assert_eq!(app.start_sms("4155550112").await.status, 201);
    refused(&app.start_sms("4155550112").await, seen, "per-phone limit");
    refused(&app.post("/v1/possession", json!({"phone": "4155550113", "provider": "idme"})).await, seen, "ID.me down");
    refused(&app.get("/v1/stats?group_by=carrier").await, seen, "stats query");
    // The pumping guard, judging a range from its second send (an app of its
    // own: the sandbox's mock numbers above would trip it).
    let guard = [("HANDSET__FRAUD__ENABLED", "true"), ("HANDSET__FRAUD__MIN_SENDS", "1")];
    let guarded = TestApp::spawn_with(kind, &guard).await;
    assert_eq!(guarded.start_sms("4155550114").await.status, 201);
    refused(&guarded.start_sms("4155550115").await, seen, "paused range");

    let produced: Vec<u16> = seen.keys().copied().collect();
    let mut expected: Vec<u16> =
        SPEC.iter().map(|(c, ..)| *c).filter(|c| !PASSED_THROUGH_FROM_IDME_ONLY.contains(c)).collect();
    expected.sort();
    assert_eq!(produced, expected, "codes produced over HTTP (and how): {seen:?}");
}

crate::on_both_kinds!(every_code_is_answered_over_http);
