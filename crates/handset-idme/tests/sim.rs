//! The adapter against `handset-sim`'s ID.me: whole flows, the mock rules
//! and injected faults.

mod common;

use std::time::Duration;

use chrono::NaiveDate;
use handset_core::model::{Product, TransactionResult};
use handset_core::provider::{CodeCheck, IdentityMatch, Outcome, ProviderError, SmsCheck, StartRequest};
use handset_core::{BirthDate, ErrorCode, Phone, Region};
use handset_idme::{Idme, IdmeSettings};
use handset_sim::faults::Faults;
use handset_sim::idme::IdmeConfig;
use handset_sim::{Sim, SimConfig};

async fn sim() -> Sim {
    let config = SimConfig {
        idme: IdmeConfig { identity_delay: Duration::from_millis(100), push_webhooks: false, ..IdmeConfig::default() },
        ..SimConfig::default()
    };
    Sim::start("127.0.0.1:0", config).await.unwrap()
}

fn idme(sim: &Sim, secret: &str, timeout: Duration) -> Idme {
    let settings = IdmeSettings {
        base_url: sim.base_url(),
        secret: secret.into(),
        webhook_secret: Default::default(),
        timeout,
        cost: 1.0,
    };
    Idme::new(&settings, "http://127.0.0.1:8080").unwrap()
}

fn phone(number: &str) -> Phone {
    Phone::parse(number, Region::default()).unwrap()
}

fn born() -> BirthDate {
    BirthDate::parse("1968-05-27", NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()).unwrap()
}

fn request(phone: &Phone) -> StartRequest<'_> {
    StartRequest { transaction_id: uuid::Uuid::nil(), phone, name: None, provider_verification: None }
}

#[tokio::test]
async fn sms_possession_flow() {
    let sim = sim().await;
    let idme = idme(&sim, "sim-secret", Duration::from_secs(2));
    let number = phone("4155550123");
    let started = idme.send_code(request(&number)).await.unwrap();
    assert_eq!(started.outcome, Outcome::Pending);
    let tx = common::kept(Product::PossessionSms, started.provider_ref.clone());
    assert_eq!(idme.check_code(&tx, "000000").await.unwrap().answer, CodeCheck::Mismatched);
    assert!(matches!(
        idme.check_code(&tx, "123123").await.unwrap().answer,
        CodeCheck::Matched(TransactionResult::Phone { .. })
    ));
    assert_eq!(sim.idme.transaction(started.provider_ref.as_deref().unwrap()).unwrap().status, 200);

    let other = common::kept(Product::PossessionSms, idme.send_code(request(&number)).await.unwrap().provider_ref);
    for _ in 0..4 {
        assert_eq!(idme.check_code(&other, "000000").await.unwrap().answer, CodeCheck::Mismatched);
    }
    match idme.check_code(&other, "000000").await.unwrap().answer {
        CodeCheck::Failed(error) => assert_eq!(error.code, 3104),
        check => panic!("{check:?}"),
    }
}

#[tokio::test]
async fn identity_is_pending_then_final() {
    let sim = sim().await;
    let idme = idme(&sim, "sim-secret", Duration::from_secs(2));
    let born = born();
    for (number, expect_success) in [("8885551234", true), ("9995550000", false)] {
        let number = phone(number);
        let started = idme.start_identity(request(&number), &born).await.unwrap();
        assert_eq!(started.outcome, Outcome::Pending);
        let tx = common::kept(Product::Identity, started.provider_ref);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let outcome = loop {
            match IdentityMatch::fetch_result(&idme, &tx).await.unwrap().answer {
                Outcome::Pending if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                outcome => break outcome,
            }
        };
        match (expect_success, outcome) {
            (true, Outcome::Succeeded(TransactionResult::Address { address })) => assert_eq!(address.region, "VA"),
            (false, Outcome::Failed(error)) => {
                assert_eq!(error.code, 1014);
                assert_eq!(error.additional_info.as_deref(), Some("birth_date does not match data on file."));
            }
            (_, other) => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn mock_numbers_trigger_their_errors() {
    let sim = sim().await;
    let idme = idme(&sim, "sim-secret", Duration::from_secs(2));
    let send = |n: &'static str| {
        let idme = &idme;
        async move {
            let number = phone(n);
            idme.send_code(request(&number)).await
        }
    };
    assert!(matches!(send("9995553101").await, Err(ProviderError::Rejected(e)) if e.code == ErrorCode::InvalidPhone));
    assert!(matches!(send("9995551100").await, Err(ProviderError::Misconfigured { .. })));
    match send("9995555100").await {
        Err(ProviderError::Rejected(e)) => {
            assert_eq!(e.code, ErrorCode::ProductRateLimited);
            assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
        }
        other => panic!("{other:?}"),
    }
    // ID.me's 500 after a send may follow an SMS that went out: no failover.
    assert!(matches!(send("9995555000").await, Err(ProviderError::Failed { .. })));
    match send("9995551005").await.unwrap().outcome {
        Outcome::Failed(error) => assert_eq!((error.code, error.provider_code.as_deref()), (1005, Some("1005"))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn expired_codes() {
    let sim = sim().await;
    sim.idme.set_config(IdmeConfig { code_ttl: Duration::ZERO, push_webhooks: false, ..IdmeConfig::default() });
    let idme = idme(&sim, "sim-secret", Duration::from_secs(2));
    let number = phone("4155550123");
    let tx = common::kept(Product::PossessionSms, idme.send_code(request(&number)).await.unwrap().provider_ref);
    match idme.check_code(&tx, "123123").await.unwrap().answer {
        CodeCheck::Failed(error) => assert_eq!(error.code, 3103),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn wrong_credentials_and_faults() {
    let sim = sim().await;
    let number = phone("4155550123");
    let wrong = idme(&sim, "not-the-secret", Duration::from_secs(2));
    assert!(matches!(wrong.send_code(request(&number)).await, Err(ProviderError::Misconfigured { .. })));

    let idme = idme(&sim, "sim-secret", Duration::from_millis(300));
    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    assert!(matches!(idme.send_code(request(&number)).await, Err(ProviderError::Unavailable { .. })));
    sim.set_faults(Faults { hang: true, ..Faults::default() });
    assert!(matches!(idme.send_code(request(&number)).await, Err(ProviderError::Failed { .. })));
    sim.set_faults(Faults { latency_ms: 50, jitter_ms: 20, ..Faults::default() });
    let started = std::time::Instant::now();
    assert!(idme.send_code(request(&number)).await.is_ok());
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert!(idme.health().await);
}
