//! The adapter against a mock HTTP server on loopback: the form-encoded
//! requests, and every documented status and error id, whatever the HTTP
//! status (the body's `status` decides).

use std::time::Duration;

use handset_core::model::{Product, ProviderName, Transaction, TransactionResult};
use handset_core::provider::{
    Inbound, InboundCall, InboundEvent, InboundKind, OperatorCheck, Outcome, ProviderError, StartRequest,
};
use handset_core::{ErrorCode, Phone, Region};
use handset_dqe::{Dqe, DqeSettings};
use serde_json::{Value, json};
use wiremock::matchers::{body_string, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const RETURN: &str = "https://handset.example/providers/dqe/return?transaction_id=00000000-0000-0000-0000-000000000000";

fn dqe(base_url: String) -> Dqe {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = DqeSettings {
        base_url,
        licence: "LIC-42".into(),
        token: "api-token".into(),
        name: "handset".into(),
        timeout: Duration::from_secs(1),
        cost: 1.0,
    };
    Dqe::new(&settings).unwrap()
}

fn french() -> Phone {
    Phone::parse("+33612345678", Region::default()).unwrap()
}

fn request(phone: &Phone) -> StartRequest<'_> {
    StartRequest { transaction_id: uuid::Uuid::nil(), phone, name: None, provider_verification: None }
}

fn error(id: &str, kind: &str) -> Value {
    json!({"status": "error", "error_id": id, "error_type": kind})
}

async fn answering(status: u16, body: Value) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(status).set_body_json(body)).mount(&server).await;
    server
}

fn kept(session: Option<&str>) -> Transaction {
    let tx = Transaction::pending(
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        Product::PossessionNetwork,
        ProviderName::Dqe,
        "+33612345678",
        chrono::Utc::now(),
    );
    Transaction { provider_ref: session.map(str::to_owned), ..tx }
}

#[tokio::test]
async fn step_one_is_form_encoded_and_hands_out_the_operator_url() {
    let server = MockServer::start().await;
    let form = "licence=LIC-42&number=0612345678&token=api-token&name=handset&scope=numVerify&redirect_uri=\
        https%3A%2F%2Fhandset.example%2Fproviders%2Fdqe%2Freturn%3Ftransaction_id%3D00000000-0000-0000-0000-000000000000";
    Mock::given(method("POST"))
        .and(path("/IDMOBILE/"))
        .and(body_string(form))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "success", "operator": "SFR", "url": "https://operator.example/api/abc"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let number = french();
    let started = dqe(server.uri()).start(request(&number), RETURN).await.unwrap();
    assert_eq!(started.outcome, Outcome::Pending);
    assert_eq!(started.redirect_url.as_deref(), Some("https://operator.example/api/abc"));
}

#[tokio::test]
async fn every_step_one_error_is_mapped_whatever_the_http_status() {
    let number = french();
    for (id, http) in [("01", 400), ("02", 401), ("04", 200), ("05", 400), ("06", 400), ("30", 401)] {
        let server = answering(http, error(id, "ours")).await;
        let started = dqe(server.uri()).start(request(&number), RETURN).await;
        assert!(matches!(started, Err(ProviderError::Misconfigured { .. })), "{id}: {started:?}");
    }
    for id in ["09", "10", "11"] {
        let server = answering(200, error(id, "number")).await;
        match dqe(server.uri()).start(request(&number), RETURN).await {
            Err(ProviderError::Rejected(e)) => assert_eq!(e.code, ErrorCode::InvalidPhone, "{id}"),
            other => panic!("{id}: {other:?}"),
        }
    }
    for (id, temporary) in [("07", false), ("13", false), ("14", false), ("15", false), ("17", false), ("16", true)] {
        let server = answering(200, error(id, "operator SFR")).await;
        match dqe(server.uri()).start(request(&number), RETURN).await {
            Err(ProviderError::Ineligible { provider_code, temporary: t, .. }) => {
                assert_eq!(provider_code.as_deref(), Some(id));
                assert_eq!(t, temporary, "{id}");
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    let server = answering(500, error("12", "phone check failed")).await;
    match dqe(server.uri()).start(request(&number), RETURN).await.unwrap().outcome {
        Outcome::Failed(e) => assert_eq!((e.code, e.provider_code.as_deref()), (1014, Some("12"))),
        other => panic!("{other:?}"),
    }
    // A success without a usable URL, an unknown status, garbage: unavailable.
    for body in [json!({"status": "success"}), json!({"status": "maybe"}), json!("x")] {
        let server = answering(200, body.clone()).await;
        let started = dqe(server.uri()).start(request(&number), RETURN).await;
        assert!(matches!(started, Err(ProviderError::Unavailable { .. })), "{body}: {started:?}");
    }
}

#[tokio::test]
async fn step_two_uses_the_session_token_and_maps_every_answer() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/GET/"))
        .and(body_string("Licence=LIC-42&token=session-1&scope=numVerify"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"status": "success", "scope": "numVerify", "numVerify": true})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let fetched = dqe(server.uri()).fetch_result(&kept(None), Some("session-1")).await.unwrap();
    assert!(matches!(fetched.answer, Outcome::Succeeded(TransactionResult::Phone { .. })));
    assert_eq!(fetched.provider_ref.as_deref(), Some("session-1"), "the session token is kept");

    let cases: [(u16, Value, &str); 6] = [
        (200, json!({"status": "pending", "scope": "numVerify"}), "pending"),
        (200, json!({"status": "success", "scope": "numVerify", "numVerify": false}), "1014"),
        (500, error("18", "failed to retrieve data from operator"), "5000"),
        (200, error("20", "OTP process failed"), "1014"),
        (403, error("21", "access denied"), "1014"),
        (401, error("30", "invalid or expired token"), "3103"),
    ];
    for (http, body, expected) in cases {
        let server = answering(http, body.clone()).await;
        let fetched = dqe(server.uri()).fetch_result(&kept(Some("session-1")), None).await.unwrap();
        let got = match fetched.answer {
            Outcome::Pending => "pending".to_owned(),
            Outcome::Failed(e) => e.code.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(got, expected, "{body}");
        assert_eq!(fetched.provider_ref, None, "the kept token was used, nothing renewed");
    }
    // Before the user's return only the configured token is known: an expired-token answer waits.
    let server = answering(401, error("30", "invalid or expired token")).await;
    assert_eq!(dqe(server.uri()).fetch_result(&kept(None), None).await.unwrap().answer, Outcome::Pending);
    for (body, misconfigured) in
        [(error("02", "invalid licence key"), true), (error("99", "internal server error"), false)]
    {
        let server = answering(500, body.clone()).await;
        let fetched = dqe(server.uri()).fetch_result(&kept(Some("s")), None).await;
        let kind = if misconfigured {
            matches!(fetched, Err(ProviderError::Misconfigured { .. }))
        } else {
            matches!(fetched, Err(ProviderError::Unavailable { .. }))
        };
        assert!(kind, "{body}: {fetched:?}");
    }
}

#[tokio::test]
async fn the_return_names_our_transaction_and_brings_the_token() {
    let adapter = dqe("http://127.0.0.1:9".into());
    let id = uuid::Uuid::new_v4();
    let query = vec![("transaction_id".to_owned(), id.to_string()), ("token".to_owned(), "sess".to_owned())];
    let call = InboundCall { kind: InboundKind::Return, query: &query, bearer: None };
    assert!(adapter.authenticate(&call));
    assert_eq!(
        adapter.parse_inbound(&call, &[]).unwrap(),
        InboundEvent::Returned { transaction_id: id, token: Some("sess".into()) }
    );
    let malformed = vec![("transaction_id".to_owned(), "nope".to_owned())];
    assert!(adapter.parse_inbound(&InboundCall { query: &malformed, ..call }, &[]).is_err());
    assert!(adapter.parse_inbound(&InboundCall { kind: InboundKind::Webhook, ..call }, b"{}").is_err());
    assert!(adapter.accepts(&french()));
    assert!(!adapter.accepts(&Phone::parse("4155550123", Region::default()).unwrap()), "French operators only");
    assert_eq!(
        Dqe::number_for(&Phone::parse("0612345678", Region::parse("FR").unwrap()).unwrap()).as_deref(),
        Some("0612345678")
    );
}

#[test]
fn settings_are_checked_and_never_print_secrets() {
    let settings = DqeSettings {
        base_url: "https://dqe.example".into(),
        licence: "LIC-42".into(),
        token: "api-token".into(),
        name: String::new(),
        timeout: Duration::from_secs(1),
        cost: 1.0,
    };
    assert!(settings.validate().unwrap_err().contains("providers.dqe.name"));
    let printed = format!("{settings:?}");
    assert!(!printed.contains("LIC-42") && !printed.contains("api-token"), "{printed}");
}
