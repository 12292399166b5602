//! The built-in sandbox provider: ID.me's mock rules, no network.
//!
//! - Area code 999: the last four digits pick the error. A 31xx code of the
//!   catalogue is that 422; 1001-1014 a final 300 carrying that result error;
//!   5000/5100/5200 that status; any other digits 3101 (identity: 1014).
//! - Confirm code `123123` succeeds, anything else is a wrong code.
//! - Identity: 999 fails with 1014 and an `additional_info`, every other number
//!   succeeds with a sample address.
//! - Network: the user is sent to handset's own `/sandbox/operator/{id}`.

use std::time::Duration;

use async_trait::async_trait;

use crate::birth_date::BirthDate;
use crate::error::{ApiError, ErrorCode};
use crate::model::{Address, ProviderName, ResultError, Transaction, TransactionResult};
use crate::phone::Phone;
use crate::provider::{
    CodeCheck, IdentityMatch, OperatorCheck, Outcome, Provider, ProviderError, Renewed, SmsCheck, StartRequest, Started,
};

/// The code the sandbox "sends".
pub const SANDBOX_CODE: &str = "123123";

/// The area code that triggers mock failures.
pub const FAILURE_AREA_CODE: &str = "999";

/// The `additional_info` of the sandbox's failed identity match (from ID.me's list).
pub const IDENTITY_FAILURE_INFO: &str = "birth_date does not match data on file.";

/// `Retry-After` the sandbox suggests for its mock rate limits.
const MOCK_RETRY_AFTER: Duration = Duration::from_secs(60);

pub struct Sandbox {
    public_url: String,
}

impl Sandbox {
    /// `public_url`: handset's own base URL, for the operator page link.
    pub fn new(public_url: &str) -> Self {
        Sandbox { public_url: public_url.trim_end_matches('/').to_owned() }
    }

    pub fn operator_url(&self, transaction_id: uuid::Uuid) -> String {
        format!("{}/sandbox/operator/{transaction_id}", self.public_url)
    }
}

/// What area code 999 triggers.
enum Mock {
    Reject(ApiError),
    Fail(ResultError),
    /// Digits that pick no code a phone can cause.
    NoCode,
}

fn mock(phone: &Phone) -> Option<Mock> {
    if phone.nanp_area_code() != Some(FAILURE_AREA_CODE) {
        return None;
    }
    let digits = phone.last_four();
    let code = digits.parse().ok().and_then(ErrorCode::from_code);
    Some(match code {
        Some(code) if code.is_telecom_result() => Mock::Fail(ResultError::new(code).provider_code(digits)),
        Some(code) if (3100..3200).contains(&code.code()) => Mock::Reject(ApiError::new(code)),
        Some(code @ ErrorCode::Internal) => Mock::Reject(ApiError::new(code)),
        Some(code @ (ErrorCode::ProductRateLimited | ErrorCode::AccountRateLimited)) => {
            Mock::Reject(ApiError::new(code).retry_after(MOCK_RETRY_AFTER))
        }
        _ => Mock::NoCode,
    })
}

fn possession_outcome(phone: &Phone) -> Result<Outcome, ProviderError> {
    match mock(phone) {
        None => Ok(Outcome::Pending),
        Some(Mock::Fail(error)) => Ok(Outcome::Failed(error)),
        Some(Mock::Reject(error)) => Err(ProviderError::Rejected(error)),
        Some(Mock::NoCode) => Err(ProviderError::Rejected(ApiError::new(ErrorCode::InvalidPhone))),
    }
}

pub fn sample_address() -> Address {
    Address {
        line1: "123 Sandbox Street".into(),
        line2: Some("Apt 4".into()),
        city: "Springfield".into(),
        region: "VA".into(),
        postal_code: "22150".into(),
        country: "US".into(),
    }
}

impl Provider for Sandbox {
    fn name(&self) -> ProviderName {
        ProviderName::Sandbox
    }

    fn sms(&self) -> Option<&dyn SmsCheck> {
        Some(self)
    }

    fn operator(&self) -> Option<&dyn OperatorCheck> {
        Some(self)
    }

    fn identity(&self) -> Option<&dyn IdentityMatch> {
        Some(self)
    }
}

#[async_trait]
impl SmsCheck for Sandbox {
    fn accepts(&self, _phone: &Phone) -> bool {
        true
    }

    async fn send_code(&self, request: StartRequest<'_>) -> Result<Started, ProviderError> {
        let outcome = possession_outcome(request.phone)?;
        let local_code = (outcome == Outcome::Pending).then(|| SANDBOX_CODE.to_owned());
        Ok(Started { local_code, ..Started::outcome(outcome) })
    }

    /// Never called: the sandbox's code is checked by handset (`local_code`).
    async fn check_code(&self, transaction: &Transaction, code: &str) -> Result<Renewed<CodeCheck>, ProviderError> {
        Ok(Renewed::same_ref(if code == SANDBOX_CODE {
            CodeCheck::Matched(TransactionResult::Phone { phone: transaction.phone.clone().unwrap_or_default() })
        } else {
            CodeCheck::Mismatched
        }))
    }
}

#[async_trait]
impl OperatorCheck for Sandbox {
    fn accepts(&self, _phone: &Phone) -> bool {
        true
    }

    async fn start(&self, request: StartRequest<'_>, _return_url: &str) -> Result<Started, ProviderError> {
        let outcome = possession_outcome(request.phone)?;
        let redirect_url = (outcome == Outcome::Pending).then(|| self.operator_url(request.transaction_id));
        Ok(Started { redirect_url, ..Started::outcome(outcome) })
    }

    /// The sandbox operator step is completed by handset's own operator page,
    /// so a fetched result is always still pending.
    async fn fetch_result(
        &self,
        _transaction: &Transaction,
        _token: Option<&str>,
    ) -> Result<Renewed<Outcome>, ProviderError> {
        Ok(Renewed::same_ref(Outcome::Pending))
    }
}

#[async_trait]
impl IdentityMatch for Sandbox {
    fn accepts(&self, _phone: &Phone) -> bool {
        true
    }

    async fn start_identity(
        &self,
        request: StartRequest<'_>,
        _birth_date: &BirthDate,
    ) -> Result<Started, ProviderError> {
        let outcome = match mock(request.phone) {
            None => Outcome::Succeeded(TransactionResult::Address { address: sample_address() }),
            Some(Mock::Reject(error)) => return Err(ProviderError::Rejected(error)),
            Some(Mock::Fail(error)) if error.code == ErrorCode::UserNotFound.code() => {
                Outcome::Failed(error.additional_info(IDENTITY_FAILURE_INFO))
            }
            Some(Mock::Fail(error)) => Outcome::Failed(error),
            Some(Mock::NoCode) => Outcome::Failed(
                ResultError::new(ErrorCode::UserNotFound)
                    .provider_code(ErrorCode::UserNotFound.code().to_string())
                    .additional_info(IDENTITY_FAILURE_INFO),
            ),
        };
        Ok(Started::outcome(outcome))
    }

    /// Sandbox matches are final at once.
    async fn fetch_result(&self, _transaction: &Transaction) -> Result<Renewed<Outcome>, ProviderError> {
        Ok(Renewed::same_ref(Outcome::Pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::Region;

    fn start(phone: &str) -> StartRequest<'static> {
        let phone = Box::leak(Box::new(Phone::parse(phone, Region::default()).unwrap()));
        StartRequest { transaction_id: uuid::Uuid::nil(), phone, name: None, provider_verification: None }
    }

    fn born() -> BirthDate {
        BirthDate::parse("1968-05-27", chrono::Utc::now().date_naive()).unwrap()
    }

    #[tokio::test]
    async fn area_999_picks_the_error() {
        let sandbox = Sandbox::new("http://localhost:8080/");
        let rejected = |r: Result<Started, ProviderError>| match r {
            Err(ProviderError::Rejected(e)) => e.code.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(rejected(sandbox.send_code(start("9995553104")).await), 3104);
        assert_eq!(rejected(sandbox.send_code(start("9995555200")).await), 5200);
        assert_eq!(rejected(sandbox.send_code(start("9995550042")).await), 3101);
        assert_eq!(rejected(sandbox.send_code(start("9995551100")).await), 3101);
        let failed = sandbox.send_code(start("9995551005")).await.unwrap();
        assert_eq!(
            failed.outcome,
            Outcome::Failed(ResultError::new(ErrorCode::DeliveryFailedRetry).provider_code("1005"))
        );
        let sent = sandbox.send_code(start("8885551234")).await.unwrap();
        assert_eq!(sent.local_code.as_deref(), Some(SANDBOX_CODE));
        assert_eq!(sent.outcome, Outcome::Pending);
    }

    #[tokio::test]
    async fn identity_mocks() {
        let sandbox = Sandbox::new("http://localhost:8080");
        let ok = sandbox.start_identity(start("8885551234"), &born()).await.unwrap();
        assert!(matches!(ok.outcome, Outcome::Succeeded(TransactionResult::Address { .. })));
        for phone in ["9995550042", "9995551014"] {
            match sandbox.start_identity(start(phone), &born()).await.unwrap().outcome {
                Outcome::Failed(e) => {
                    assert_eq!(e.code, 1014);
                    assert_eq!(e.additional_info.as_deref(), Some(IDENTITY_FAILURE_INFO));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(sandbox.start_identity(start("9995553108"), &born()).await, Err(ProviderError::Rejected(_))));
    }

    #[tokio::test]
    async fn network_points_at_the_operator_page() {
        let sandbox = Sandbox::new("http://localhost:8080/");
        let started = OperatorCheck::start(&sandbox, start("4155550123"), "unused").await.unwrap();
        assert_eq!(
            started.redirect_url.as_deref(),
            Some("http://localhost:8080/sandbox/operator/00000000-0000-0000-0000-000000000000")
        );
    }
}
