//! The adapter against a mock HTTP server on loopback: the request shapes
//! and every documented action and detail, plus HTTP failures.

mod common;

use std::time::Duration;

use handset_core::model::{PersonName, Transaction, TransactionResult};
use handset_core::provider::{CodeCheck, Outcome, ProviderError, Renewed, SmsCheck, StartRequest};
use handset_core::{ErrorCode, Phone, Region};
use handset_veratad::{ContinuationRef, Veratad, VeratadSettings};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn settings(base_url: String) -> VeratadSettings {
    VeratadSettings {
        base_url,
        user: "api-user@example.com".into(),
        pass: "api-pass".into(),
        timeout: Duration::from_secs(1),
        cost: 1.0,
        message: "Hello {fn}, your code is {pin}".into(),
        do_not_send_to_types: vec!["landline".into(), "voip".into()],
        country_blacklist: vec!["fr".into()],
        country_whitelist: vec![],
    }
}

fn veratad(server: &MockServer) -> Veratad {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Veratad::new(&settings(server.uri())).unwrap()
}

fn phone(number: &str) -> Phone {
    Phone::parse(number, Region::default()).unwrap()
}

fn ada() -> PersonName {
    PersonName { first: "Ada".into(), last: "Lovelace".into() }
}

fn request<'a>(phone: &'a Phone, name: &'a PersonName) -> StartRequest<'a> {
    StartRequest { transaction_id: uuid::Uuid::nil(), phone, name: Some(name), provider_verification: None }
}

/// An answer with this action and detail, and a continuation token when given.
fn answer(action: &str, detail: &str, token: Option<&str>) -> Value {
    let mut body = json!({
        "output": {"outofband": {}},
        "meta": {"confirmation": 57984073, "reference": "x", "service": "PhoneMatch5.0.SMS"},
        "result": {"action": action, "detail": detail, "issues": []},
    });
    if let Some(token) = token {
        body["continuations"] = json!({"outofband": {"url": "/process/continue", "template": {"token": token, "codematch": {"key": null}}}});
    }
    body
}

async fn answering(status: u16, body: Value) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(status).set_body_json(body)).mount(&server).await;
    server
}

fn kept(reference: &str) -> Transaction {
    common::kept(uuid::Uuid::new_v4(), Some(reference))
}

#[tokio::test]
async fn the_initial_request_is_as_documented() {
    let server = MockServer::start().await;
    let expected = json!({
        "user": "api-user@example.com",
        "pass": "api-pass",
        "service": "PhoneMatch5.0.SMS",
        "reference": "00000000-0000-0000-0000-000000000000",
        "target": {"fn": "Ada", "ln": "Lovelace", "phone": "4155550123"},
        "options": {"outofband": {
            "message": "Hello {fn}, your code is {pin}",
            "do_not_send_to_types": ["landline", "voip"],
            "country": {"blacklist": ["FR"]},
        }},
    });
    Mock::given(method("POST"))
        .and(path("/process/comprehensive/gateway"))
        .and(body_json(&expected))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer(
            "PENDING",
            "MORE INFORMATION IS REQUIRED",
            Some("tok-1"),
        )))
        .expect(1)
        .mount(&server)
        .await;
    let number = phone("4155550123");
    let started = veratad(&server).send_code(request(&number, &ada())).await.unwrap();
    assert_eq!(started.outcome, Outcome::Pending);
    assert_eq!(started.provider_ref.as_deref(), Some("tok-1 /process/continue"), "the continuation stays with us");
    assert_eq!(started.local_code, None, "Veratad checks its own codes");
}

#[tokio::test]
async fn every_initial_failure_is_final_with_its_code() {
    for (detail, code) in [
        ("SUPPRESSED SENDING CODE", ErrorCode::SmsNotSupported),
        ("FAILED TO SEND TO NUMBER", ErrorCode::SmsNotSent),
        ("DATA CHECK FAILED", ErrorCode::CannotReceiveSms),
        ("SOMETHING UNDOCUMENTED", ErrorCode::Internal),
    ] {
        let server = answering(200, answer("FAIL", detail, None)).await;
        let number = phone("4155550123");
        let started = veratad(&server).send_code(request(&number, &ada())).await.unwrap();
        match started.outcome {
            Outcome::Failed(error) => {
                assert_eq!(error.code, code.code(), "{detail}");
                assert_eq!(error.provider_code, Some(format!("FAIL: {detail}")), "kept verbatim");
            }
            other => panic!("{detail}: {other:?}"),
        }
    }
    // Both documented PENDING details wait for the code.
    let server = answering(200, answer("PENDING", "TRANSACTION REQUIRES FURTHER ATTENTION", Some("t"))).await;
    let number = phone("4155550123");
    assert_eq!(veratad(&server).send_code(request(&number, &ada())).await.unwrap().outcome, Outcome::Pending);
}

#[tokio::test]
async fn answers_that_decide_nothing_after_a_send_are_not_failed_over() {
    let number = phone("4155550123");
    for body in [
        answer("PENDING", "MORE INFORMATION IS REQUIRED", None),
        answer("PASS", "ALL CHECKS PASSED", None),
        answer("MAYBE", "", None),
        json!("not an object"),
    ] {
        let server = answering(200, body.clone()).await;
        let sent = veratad(&server).send_code(request(&number, &ada())).await;
        assert!(matches!(sent, Err(ProviderError::Failed { .. })), "{body}: {sent:?}");
    }
}

#[tokio::test]
async fn http_failures_follow_the_four_kinds() {
    let number = phone("4155550123");
    for (status, unavailable) in [(502, true), (503, true), (500, false), (504, false)] {
        let server = answering(status, json!({})).await;
        let sent = veratad(&server).send_code(request(&number, &ada())).await;
        let expected = if unavailable {
            matches!(sent, Err(ProviderError::Unavailable { .. }))
        } else {
            matches!(sent, Err(ProviderError::Failed { .. }))
        };
        assert!(expected, "{status}: {sent:?}");
    }
    for status in [401, 403, 400] {
        let server = answering(status, json!({"error": "invalid credentials"})).await;
        let sent = veratad(&server).send_code(request(&number, &ada())).await;
        assert!(matches!(sent, Err(ProviderError::Misconfigured { .. })), "{status}: {sent:?}");
    }
    // Nothing listening: nothing was sent.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let closed = Veratad::new(&settings(format!("http://127.0.0.1:{port}"))).unwrap();
    let sent = closed.send_code(request(&number, &ada())).await;
    assert!(matches!(sent, Err(ProviderError::Unavailable { .. })), "{sent:?}");
    // No answer after the request was written: the code may be on its way.
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
        .mount(&slow)
        .await;
    let sent = veratad(&slow).send_code(request(&number, &ada())).await;
    assert!(matches!(sent, Err(ProviderError::Failed { .. })), "{sent:?}");
}

#[tokio::test]
async fn names_and_country_lists_make_it_ineligible_before_sending() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&server).await;
    let adapter = veratad(&server);
    assert!(adapter.needs_name());
    let french = phone("+33612345678");
    assert!(!adapter.accepts(&french), "FR is blacklisted: routing never sends it");
    let number = phone("4155550123");
    assert!(adapter.accepts(&number));
    let name = ada();
    let nameless = StartRequest { name: None, ..request(&number, &name) };
    assert!(matches!(adapter.send_code(nameless).await, Err(ProviderError::Ineligible { .. })));

    let mut only_us = settings(server.uri());
    only_us.country_whitelist = vec!["US".into()];
    only_us.country_blacklist = vec![];
    let adapter = Veratad::new(&only_us).unwrap();
    assert!(!adapter.accepts(&french) && adapter.accepts(&number));
}

#[tokio::test]
async fn the_validation_request_and_its_answers() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/process/continue"))
        .and(body_json(json!({"token": "tok-1", "codematch": {"key": "111111"}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "final": {"template": {"token": "final-tok"}, "url": "/process/status"},
            "output": {"codematch": {"key_matched": true}},
            "result": {"action": "PASS", "detail": "ALL CHECKS PASSED", "issues": []},
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/process/continue"))
        .and(body_json(json!({"token": "tok-1", "codematch": {"key": "222222"}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer(
            "FAIL",
            "FAILED OUT-OF-BAND CHECK",
            Some("tok-2"),
        )))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/process/continue"))
        .and(body_json(json!({"token": "tok-last", "codematch": {"key": "222222"}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer("FAIL", "FAILED OUT-OF-BAND CHECK", None)))
        .mount(&server)
        .await;
    let adapter = veratad(&server);
    let tx = kept("tok-1 /process/continue");
    let passed = adapter.check_code(&tx, "111111").await.unwrap();
    assert!(matches!(passed.answer, CodeCheck::Matched(TransactionResult::Phone { .. })));
    assert_eq!(passed.provider_ref, None, "nothing more is asked of the final token");

    let wrong = adapter.check_code(&tx, "222222").await.unwrap();
    assert_eq!(
        wrong,
        Renewed { answer: CodeCheck::Mismatched, provider_ref: Some("tok-2 /process/continue".into()) },
        "a wrong code renews the token"
    );
    // No new continuation: still a wrong code, and the same token is used next time.
    let last = adapter.check_code(&kept("tok-last /process/continue"), "222222").await.unwrap();
    assert_eq!(last, Renewed::same_ref(CodeCheck::Mismatched));
}

#[tokio::test]
async fn a_continuation_veratad_no_longer_knows_is_stale() {
    let server = answering(404, json!({"error": "unknown token"})).await;
    let gone = veratad(&server).check_code(&kept("tok /process/continue"), "123456").await.unwrap();
    assert_eq!(gone.answer, CodeCheck::Stale, "the gateway decides: renewed meanwhile, or closed");
    let server = answering(503, json!({})).await;
    let down = veratad(&server).check_code(&kept("tok /process/continue"), "123456").await;
    assert!(matches!(down, Err(ProviderError::Unavailable { .. })), "{down:?}");
}

#[test]
fn settings_are_checked() {
    let good = settings("http://127.0.0.1:9".into());
    assert!(good.validate().is_ok());
    let no_pin = VeratadSettings { message: "no code here".into(), ..good.clone() };
    assert!(no_pin.validate().unwrap_err().contains("providers.veratad.message"));
    let bad_type = VeratadSettings { do_not_send_to_types: vec!["pager".into()], ..good.clone() };
    assert!(bad_type.validate().unwrap_err().contains("do_not_send_to_types"));
    let bad_country = VeratadSettings { country_whitelist: vec!["Narnia".into()], ..good.clone() };
    assert!(bad_country.validate().unwrap_err().contains("country_whitelist"));
    let printed = format!("{good:?}");
    assert!(!printed.contains("api-pass") && !printed.contains("api-user"), "credentials never print: {printed}");
    assert_eq!(ContinuationRef::parse("t /process/continue").unwrap().token, "t");
}
