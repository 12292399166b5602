//! The adapter against a mock HTTP server on loopback: request shapes and
//! every documented status, code and result of ID.me's catalogue.

mod common;

use std::time::Duration;

use chrono::NaiveDate;
use handset_core::model::{Product, ResultError, TransactionResult};
use handset_core::provider::{CodeCheck, IdentityMatch, Outcome, Provider, ProviderError, SmsCheck, StartRequest};
use handset_core::{BirthDate, ErrorCode, Phone, Region};
use handset_idme::{Idme, IdmeSettings};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "s3cret";
// base64("s3cret")
const AUTHORIZATION: &str = "Bearer ID.me czNjcmV0";

fn idme(server: &MockServer, timeout: Duration) -> Idme {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings =
        IdmeSettings { base_url: server.uri(), secret: SECRET.into(), webhook_secret: "t".into(), timeout, cost: 1.0 };
    Idme::new(&settings, "https://handset.example").unwrap()
}

fn phone(number: &str) -> Phone {
    Phone::parse(number, Region::default()).unwrap()
}

fn request(phone: &Phone) -> StartRequest<'_> {
    StartRequest { transaction_id: uuid::Uuid::nil(), phone, name: None, provider_verification: None }
}

fn pending(id: &str) -> Value {
    json!({"transaction_id": id, "verification_id": "v-1", "product": "telecom.possession_send",
           "status": {"code": 210, "message": "Transaction pending review", "created": "2023-03-22T05:57:33.493Z", "updated": "2023-03-22T05:57:33.511Z"}})
}

fn envelope(code: ErrorCode) -> Value {
    json!({"errors": [{"code": code.code(), "message": code.message()}]})
}

#[tokio::test]
async fn send_uses_the_documented_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/telecom/possession/sms/send"))
        .and(header("authorization", AUTHORIZATION))
        .and(body_json(
            json!({"phone": "4155550123", "callback_url": "https://handset.example/providers/idme/webhook?token=t"}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(pending("t-1")))
        .expect(1)
        .mount(&server)
        .await;
    let idme = idme(&server, Duration::from_secs(2));
    let number = phone("+14155550123");
    let started = idme.send_code(request(&number)).await.unwrap();
    assert_eq!(started.provider_ref.as_deref(), Some("t-1"));
    assert_eq!(started.provider_verification.as_deref(), Some("v-1"));
    assert_eq!(started.outcome, Outcome::Pending);
    assert_eq!(started.local_code, None, "ID.me checks its own codes");
}

#[tokio::test]
async fn only_nanp_numbers_for_sms_and_identity() {
    let server = MockServer::start().await;
    let idme = idme(&server, Duration::from_secs(1));
    let provider: &dyn Provider = &idme;
    assert!(provider.serves(Product::PossessionSms, &phone("+14155550123")));
    assert!(provider.serves(Product::Identity, &phone("8885551234")));
    assert!(!provider.serves(Product::PossessionSms, &phone("+33612345678")));
    assert!(!provider.serves(Product::Identity, &phone("+33612345678")));
    assert!(!provider.serves(Product::PossessionNetwork, &phone("+14155550123")), "no operator check");
    assert!(provider.polls(Product::Identity) && !provider.polls(Product::PossessionSms));
}

/// Every HTTP error of the catalogue, on a send.
#[tokio::test]
async fn every_http_error_maps_to_the_catalogue() {
    for code in ErrorCode::ALL
        .iter()
        .copied()
        .filter(|c| c.http_status().is_some() && c.code() < 3900 || matches!(c.code(), 5000 | 5100 | 5200))
    {
        let server = MockServer::start().await;
        let status = code.http_status().unwrap();
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(envelope(code)))
            .mount(&server)
            .await;
        let idme = idme(&server, Duration::from_secs(2));
        let number = phone("+14155550123");
        let error = idme.send_code(request(&number)).await.unwrap_err();
        match (status, code.code(), &error) {
            (401, _, ProviderError::Misconfigured { .. }) => {}
            (403, 3200 | 3300, ProviderError::Failed { .. }) => {}
            (403, _, ProviderError::Misconfigured { .. }) => {}
            (404, _, ProviderError::Failed { .. }) => {}
            (422, 3100, ProviderError::Misconfigured { .. }) => {}
            (422, _, ProviderError::Rejected(api)) => assert_eq!(api.code, code),
            (429, _, ProviderError::Rejected(api)) => {
                assert_eq!(api.code, code);
                assert_eq!(api.retry_after, Some(Duration::from_secs(60)), "no Retry-After: the default");
            }
            // A 500 after a send may follow an SMS that went out: no failover.
            (500, _, ProviderError::Failed { .. }) => {}
            other => panic!("{code:?}: {other:?}"),
        }
    }
}

/// 5xx: a send fails over only on 502/503; a lookup that reaches no user on any 5xx.
#[tokio::test]
async fn server_errors_fail_over_only_when_safe() {
    let born = BirthDate::parse("1968-05-27", NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()).unwrap();
    let number = phone("+14155550123");
    for (status, send_fails_over) in [(500, false), (502, true), (503, true), (504, false)] {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(status)).mount(&server).await;
        let idme = idme(&server, Duration::from_secs(2));
        let send = idme.send_code(request(&number)).await;
        assert_eq!(matches!(send, Err(ProviderError::Unavailable { .. })), send_fails_over, "{status}: {send:?}");
        assert!(matches!(send, Err(ProviderError::Unavailable { .. } | ProviderError::Failed { .. })));
        let lookup = idme.start_identity(request(&number), &born).await;
        assert!(matches!(lookup, Err(ProviderError::Unavailable { .. })), "{status}: {lookup:?}");
    }
}

#[tokio::test]
async fn sends_must_leave_a_pending_transaction() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"transaction_id": "t", "status": {"code": 200}})))
        .mount(&server)
        .await;
    let idme = idme(&server, Duration::from_secs(2));
    let number = phone("+14155550123");
    assert!(
        matches!(idme.send_code(request(&number)).await, Err(ProviderError::Failed { .. })),
        "a send proves nothing"
    );
    let identity = json!({"transaction_id": "t", "product": "telecom.identity", "status": {"code": 200}, "result": {"verified": true}});
    // No address: no address is invented; the gateway refuses an identity success without one (5000).
    let read = handset_idme::outcome_of(&serde_json::from_value(identity).unwrap()).unwrap();
    assert!(matches!(read, Outcome::Succeeded(handset_core::model::TransactionResult::Phone { .. })), "{read:?}");
    let plural =
        json!({"transaction_id": "t", "results": {"errors": [{"code": 1014, "message": "Could not find the user"}]}});
    assert!(
        matches!(handset_idme::outcome_of(&serde_json::from_value(plural).unwrap()).unwrap(), Outcome::Failed(e) if e.code == 1014)
    );
}

#[tokio::test]
async fn rate_limits_keep_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "17")
                .set_body_json(envelope(ErrorCode::ProductRateLimited)),
        )
        .mount(&server)
        .await;
    let idme = idme(&server, Duration::from_secs(2));
    let number = phone("+14155550123");
    match idme.send_code(request(&number)).await {
        Err(ProviderError::Rejected(api)) => {
            assert_eq!(api.code, ErrorCode::ProductRateLimited);
            assert_eq!(api.retry_after, Some(Duration::from_secs(17)));
        }
        other => panic!("{other:?}"),
    }
}

/// Transaction statuses 200/210/300 and every telecom result error.
#[tokio::test]
async fn transaction_statuses_and_result_errors() {
    let ok = json!({"transaction_id": "t", "status": {"code": 200}, "result": {"phone": "4155550123"}});
    assert_eq!(
        handset_idme::outcome_of(&serde_json::from_value(ok).unwrap()).unwrap(),
        Outcome::Succeeded(TransactionResult::Phone { phone: String::new() })
    );
    let pending = json!({"transaction_id": "t", "status": {"code": 210}});
    assert_eq!(handset_idme::outcome_of(&serde_json::from_value(pending).unwrap()).unwrap(), Outcome::Pending);
    let failed = json!({"transaction_id": "t", "status": {"code": 300}});
    match handset_idme::outcome_of(&serde_json::from_value(failed).unwrap()).unwrap() {
        Outcome::Failed(error) => assert_eq!(error.provider_code.as_deref(), Some("300")),
        other => panic!("{other:?}"),
    }
    let address = json!({"transaction_id": "t", "status": {"code": 200}, "result": {"address": {"street": "1 Main St", "city": "Reston", "state": "VA", "zip": "20190"}}});
    match handset_idme::outcome_of(&serde_json::from_value(address).unwrap()).unwrap() {
        Outcome::Succeeded(TransactionResult::Address { address }) => {
            assert_eq!(
                (address.line1.as_str(), address.region.as_str(), address.postal_code.as_str()),
                ("1 Main St", "VA", "20190")
            );
        }
        other => panic!("{other:?}"),
    }
    let infos = [
        "Phone cannot be reached.",
        "Mobile data for phone number is inaccessible.",
        "No data available for mobile subscriber.",
        "Carrier information received does not match the information on file.",
        "Cannot reach third party data provider.",
        "Invalid phone number, review number and retry.",
        "birth_date does not match data on file.",
        "ssn does not match data on file.",
    ];
    for code in 1001..=1014u16 {
        let info = infos[code as usize % infos.len()];
        // The documented failed identity answer carries no status at all.
        let body = json!({"transaction_id": "t", "product": "telecom.identity",
                          "result": {"errors": [{"code": code, "message": "upstream words", "additional_info": info}]}});
        let expected =
            ResultError::new(ErrorCode::from_code(code).unwrap()).provider_code(code.to_string()).additional_info(info);
        assert_eq!(
            handset_idme::outcome_of(&serde_json::from_value(body).unwrap()).unwrap(),
            Outcome::Failed(expected)
        );
    }
    // ID.me's document errors are passed through as they come (handset never makes them).
    for code in 2001..=2005u16 {
        let body = json!({"transaction_id": "t", "result": {"errors": [{"code": code, "message": "upstream words"}]}});
        let expected = ResultError::new(ErrorCode::from_code(code).unwrap()).provider_code(code.to_string());
        assert_eq!(
            handset_idme::outcome_of(&serde_json::from_value(body).unwrap()).unwrap(),
            Outcome::Failed(expected)
        );
    }
    let unknown = json!({"transaction_id": "t", "result": {"errors": [{"code": 1099, "message": "New failure"}]}});
    match handset_idme::outcome_of(&serde_json::from_value(unknown).unwrap()).unwrap() {
        Outcome::Failed(error) => {
            assert_eq!(
                (error.code, error.message.as_str(), error.provider_code.as_deref()),
                (5000, "New failure", Some("1099"))
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn confirm_verdicts() {
    let server = MockServer::start().await;
    let cases = [
        ("111111", ResponseTemplate::new(422).set_body_json(envelope(ErrorCode::InvalidCode))),
        ("222222", ResponseTemplate::new(422).set_body_json(envelope(ErrorCode::RetryLimitExceeded))),
        ("333333", ResponseTemplate::new(422).set_body_json(envelope(ErrorCode::CodeExpired))),
        ("444444", ResponseTemplate::new(422).set_body_json(envelope(ErrorCode::NotPossessionCheck))),
        (
            "123123",
            ResponseTemplate::new(200).set_body_json(
                json!({"transaction_id": "t-1", "status": {"code": 200}, "result": {"phone": "4155550123"}}),
            ),
        ),
    ];
    for (code, reply) in cases {
        Mock::given(method("POST"))
            .and(path("/api/v2/telecom/possession/sms/confirm"))
            .and(body_json(json!({"transaction_id": "t-1", "code": code})))
            .respond_with(reply)
            .mount(&server)
            .await;
    }
    let idme = idme(&server, Duration::from_secs(2));
    let tx = common::kept(Product::PossessionSms, Some("t-1".into()));
    assert_eq!(idme.check_code(&tx, "111111").await.unwrap().answer, CodeCheck::Mismatched);
    for (code, expected) in [("222222", 3104), ("333333", 3103), ("444444", 3105)] {
        match idme.check_code(&tx, code).await.unwrap().answer {
            CodeCheck::Failed(error) => {
                assert_eq!(error.code, expected);
                assert_eq!(error.provider_code, Some(expected.to_string()));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        idme.check_code(&tx, "123123").await.unwrap().answer,
        CodeCheck::Matched(TransactionResult::Phone { .. })
    ));
}

#[tokio::test]
async fn identity_sends_phone_and_birth_date() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/telecom/identity"))
        .and(body_json(json!({"phone": "8885551234", "birth_date": "1968-05-27",
                              "callback_url": "https://handset.example/providers/idme/webhook?token=t", "verification_id": "v-9"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(pending("t-2")))
        .expect(1)
        .mount(&server)
        .await;
    let idme = idme(&server, Duration::from_secs(2));
    let number = phone("8885551234");
    let born = BirthDate::parse("1968-05-27", NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()).unwrap();
    let started = idme
        .start_identity(StartRequest { provider_verification: Some("v-9"), ..request(&number) }, &born)
        .await
        .unwrap();
    assert_eq!(started.outcome, Outcome::Pending);
    assert_eq!(started.provider_ref.as_deref(), Some("t-2"));
}

#[tokio::test]
async fn status_reads_are_retried_but_sends_are_not() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/telecom/t-3"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/telecom/t-3"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"transaction_id": "t-3", "status": {"code": 210}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_json(envelope(ErrorCode::Internal)))
        .expect(1)
        .mount(&server)
        .await;
    let idme = idme(&server, Duration::from_secs(2));
    assert_eq!(
        IdentityMatch::fetch_result(&idme, &common::kept(Product::Identity, Some("t-3".into()))).await.unwrap().answer,
        Outcome::Pending
    );
    let number = phone("+14155550123");
    assert!(matches!(idme.send_code(request(&number)).await, Err(ProviderError::Unavailable { .. })));
}

#[tokio::test]
async fn timeouts_after_a_send_are_not_safe_to_fail_over() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pending("t")).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let idme = idme(&server, Duration::from_millis(300));
    let number = phone("+14155550123");
    assert!(
        matches!(idme.send_code(request(&number)).await, Err(ProviderError::Failed { .. })),
        "the SMS may have gone"
    );
    let born = BirthDate::parse("1968-05-27", NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()).unwrap();
    assert!(
        matches!(idme.start_identity(request(&number), &born).await, Err(ProviderError::Unavailable { .. })),
        "an identity lookup reaches no user"
    );
}

#[tokio::test]
async fn unreachable_is_unavailable() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let settings = IdmeSettings {
        base_url: format!("http://127.0.0.1:{port}"),
        secret: SECRET.into(),
        webhook_secret: Default::default(),
        timeout: Duration::from_secs(1),
        cost: 1.0,
    };
    let idme = Idme::new(&settings, "http://127.0.0.1:8080").unwrap();
    let number = phone("+14155550123");
    assert!(matches!(idme.send_code(request(&number)).await, Err(ProviderError::Unavailable { .. })));
    assert!(!idme.health().await);
}

#[test]
fn webhook_bodies() {
    let (reference, outcome) = handset_idme::webhook_result(br#"{"transaction_id":"t-9","status":{"code":200},"result":{"address":{"line1":"1 A St","city":"X","region":"VA","postal_code":"1","country":"US"}}}"#).unwrap();
    assert_eq!(reference, "t-9");
    assert!(matches!(outcome, Outcome::Succeeded(TransactionResult::Address { .. })));
    assert!(handset_idme::webhook_result(b"{}").is_err());
    assert!(handset_idme::webhook_result(b"nope").is_err());
}
