//! The adapter against `handset-sim`'s Veratad: whole flows over real HTTP.

mod common;

use std::time::Duration;

use handset_core::model::PersonName;
use handset_core::provider::{CodeCheck, Outcome, ProviderError, SmsCheck, StartRequest};
use handset_core::{ErrorCode, Phone, Region};
use handset_sim::faults::Faults;
use handset_sim::{Sim, SimConfig};
use handset_veratad::{Veratad, VeratadSettings};

async fn sim_and_adapter(user: &str) -> (Sim, Veratad) {
    let sim = Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap();
    let settings = VeratadSettings {
        base_url: sim.base_url(),
        user: user.into(),
        pass: "sim-pass".into(),
        timeout: Duration::from_secs(2),
        cost: 1.0,
        message: "Your code is {pin}".into(),
        do_not_send_to_types: vec!["landline".into()],
        country_blacklist: vec![],
        country_whitelist: vec![],
    };
    (sim, Veratad::new(&settings).unwrap())
}

fn start<'a>(id: uuid::Uuid, phone: &'a Phone, name: &'a PersonName) -> StartRequest<'a> {
    StartRequest { transaction_id: id, phone, name: Some(name), provider_verification: None }
}

#[tokio::test]
async fn a_code_is_sent_then_checked_with_renewed_tokens() {
    let (sim, veratad) = sim_and_adapter("sim-user").await;
    let name = PersonName { first: "Ada".into(), last: "Lovelace".into() };
    let number = Phone::parse("4155550123", Region::default()).unwrap();
    let id = uuid::Uuid::new_v4();
    let started = veratad.send_code(start(id, &number, &name)).await.unwrap();
    assert_eq!(started.outcome, Outcome::Pending);
    let pin = sim.veratad.pin(&id.to_string()).expect("the sim sent a PIN for our reference");
    assert!(sim.veratad.transactions()[0].message.as_deref().unwrap().contains(&pin), "the template was used");

    let mut tx = common::kept(id, started.provider_ref.as_deref());
    let wrong = veratad.check_code(&tx, "000000").await.unwrap();
    assert_eq!(wrong.answer, CodeCheck::Mismatched);
    let renewed = wrong.provider_ref.expect("a wrong code renews the token");
    assert_ne!(Some(&renewed), started.provider_ref.as_ref());
    // The old token is gone at Veratad; the renewed one works.
    assert_eq!(veratad.check_code(&tx, &pin).await.unwrap().answer, CodeCheck::Stale);
    tx.provider_ref = Some(renewed);
    assert!(matches!(veratad.check_code(&tx, &pin).await.unwrap().answer, CodeCheck::Matched(_)));
}

#[tokio::test]
async fn line_types_and_bad_numbers_end_the_check() {
    let (sim, veratad) = sim_and_adapter("sim-user").await;
    let name = PersonName { first: "Ada".into(), last: "Lovelace".into() };
    sim.veratad.set_line_type("4155550123", "landline");
    for (number, code) in [
        ("4155550123", ErrorCode::SmsNotSupported),
        ("4155550001", ErrorCode::SmsNotSent),
        ("4155550000", ErrorCode::CannotReceiveSms),
    ] {
        let phone = Phone::parse(number, Region::default()).unwrap();
        match veratad.send_code(start(uuid::Uuid::new_v4(), &phone, &name)).await.unwrap().outcome {
            Outcome::Failed(error) => assert_eq!(error.code, code.code(), "{number}"),
            other => panic!("{number}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn refused_credentials_and_faults_are_unavailability() {
    let (sim, veratad) = sim_and_adapter("not-the-user").await;
    let name = PersonName { first: "Ada".into(), last: "Lovelace".into() };
    let phone = Phone::parse("4155550123", Region::default()).unwrap();
    let refused = veratad.send_code(start(uuid::Uuid::new_v4(), &phone, &name)).await;
    assert!(matches!(refused, Err(ProviderError::Misconfigured { .. })), "{refused:?}");
    let (sim2, veratad) = sim_and_adapter("sim-user").await;
    sim2.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let down = veratad.send_code(start(uuid::Uuid::new_v4(), &phone, &name)).await;
    assert!(matches!(down, Err(ProviderError::Unavailable { .. })), "{down:?}");
    drop(sim);
}
