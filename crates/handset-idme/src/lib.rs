//! handset's adapter for ID.me's Services API v2 telecom endpoints
//! (ID.me's telecom and error-code documents):
//! SMS possession (send, confirm), identity, transaction status, health.
//!
//! - Offers `SmsCheck` and `IdentityMatch`. Phones go out as ID.me's 10 NANP
//!   digits; other numbers make ID.me ineligible (`accepts`), so routing
//!   never sends it garbage.
//! - ID.me's own `transaction_id` / `verification_id` stay server-side as
//!   provider references; partners only see handset's ids.
//! - Every documented HTTP status, error code, transaction status and result
//!   error maps to handset's catalogue, keeping ID.me's code in
//!   `provider_code` (see `docs/providers/idme.md`).
//! - Every call has a timeout. Only idempotent calls (status, health) are
//!   retried; a send that may have reached the user is never resent.

mod mapping;
mod wire;

use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use handset_core::model::{ProviderName, Transaction};
use handset_core::provider::{
    CodeCheck, IdentityMatch, Inbound, InboundCall, InboundEvent, InboundKind, Outcome, Provider, ProviderError,
    Renewed, SmsCheck, StartRequest, Started,
};
use handset_core::secret::{Secret, constant_time_eq};
use handset_core::{BirthDate, Phone};
use serde::{Deserialize, Serialize};

pub use mapping::{outcome_of, webhook_result};
pub use wire::TelecomResponse;

pub const SEND_PATH: &str = "/api/v2/telecom/possession/sms/send";
pub const CONFIRM_PATH: &str = "/api/v2/telecom/possession/sms/confirm";
pub const IDENTITY_PATH: &str = "/api/v2/telecom/identity";
pub const STATUS_PATH: &str = "/api/v2/telecom/";
pub const HEALTH_PATH: &str = "/health";

/// `[providers.idme]`: documented in `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdmeSettings {
    /// scheme://host:port; the documented paths are appended.
    pub base_url: String,
    /// The account's API secret; sent as `Bearer ID.me <base64(secret)>`.
    /// Set: ID.me is enabled.
    pub secret: Secret,
    /// Authenticates ID.me's calls to handset's result webhook; empty: no
    /// webhook, results are polled.
    pub webhook_secret: Secret,
    /// Every call to ID.me gives up after this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Divides the provider's score under adaptive routing (`handset_core::adaptive`):
    /// 2.0 makes it need twice the conversion of a provider at 1.0 to go first.
    pub cost: f64,
}

impl IdmeSettings {
    pub fn enabled(&self) -> bool {
        self.secret.is_set()
    }
}

pub struct Idme {
    client: reqwest::Client,
    base_url: String,
    authorization: String,
    /// handset's webhook with its secret, given to ID.me as `callback_url`.
    webhook_url: Option<String>,
    webhook_secret: Option<Secret>,
}

/// Whether the call may have had an effect on the user when no answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// It may have sent an SMS: a timeout is not safe to fail over.
    ReachesUser,
    /// Nothing reaches the user: a timeout is just unavailability.
    None,
}

impl Idme {
    /// `public_url` is handset's own base URL: ID.me is given
    /// `{public_url}/providers/idme/webhook?token=<webhook_secret>` as its
    /// `callback_url` when a webhook secret is set.
    pub fn new(settings: &IdmeSettings, public_url: &str) -> Result<Idme, String> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("providers.idme: {e}"))?;
        let webhook_secret = settings.webhook_secret.is_set().then(|| settings.webhook_secret.clone());
        let webhook_url = match &webhook_secret {
            None => None,
            Some(secret) => {
                let mut url = url::Url::parse(&format!("{}/providers/idme/webhook", public_url.trim_end_matches('/')))
                    .map_err(|e| format!("server.public_url: {e}"))?;
                url.query_pairs_mut().append_pair("token", secret.expose());
                Some(url.to_string())
            }
        };
        Ok(Idme {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            authorization: format!("Bearer ID.me {}", STANDARD.encode(settings.secret.expose().as_bytes())),
            webhook_url,
            webhook_secret,
        })
    }

    /// ID.me's form of a number: the 10 NANP digits.
    pub fn phone_digits(phone: &Phone) -> Option<&str> {
        (phone.calling_code() == 1 && phone.national_digits().len() == 10).then(|| phone.national_digits())
    }

    async fn post<B: Serialize>(&self, path: &str, body: &B, effect: Effect) -> Result<TelecomResponse, ProviderError> {
        let sent = self
            .client
            .post(format!("{}{path}", self.base_url))
            .header("authorization", &self.authorization)
            .json(body)
            .send()
            .await;
        mapping::read(sent, effect == Effect::ReachesUser).await
    }

    async fn get_status(&self, transaction_ref: &str) -> Result<TelecomResponse, ProviderError> {
        let mut url = reqwest::Url::parse(&format!("{}{STATUS_PATH}", self.base_url))
            .map_err(|e| ProviderError::misconfigured(format!("providers.idme.base_url: {e}")))?;
        url.path_segments_mut()
            .map_err(|_| ProviderError::misconfigured("providers.idme.base_url cannot take a path"))?
            .pop_if_empty()
            .push(transaction_ref);
        let once = || async {
            let sent = self.client.get(url.clone()).header("authorization", &self.authorization).send().await;
            mapping::read(sent, false).await
        };
        // A status read changes nothing upstream, so it is retried.
        once.retry(ExponentialBuilder::default().with_min_delay(Duration::from_millis(200)).with_max_times(2))
            .sleep(tokio::time::sleep)
            .when(|e| matches!(e, ProviderError::Unavailable { .. }))
            .await
    }

    /// `GET /health`, retried like any idempotent call.
    pub async fn health(&self) -> bool {
        let url = format!("{}{HEALTH_PATH}", self.base_url);
        let once = || async { self.client.get(&url).send().await.and_then(|r| r.error_for_status()) };
        once.retry(ExponentialBuilder::default().with_min_delay(Duration::from_millis(200)).with_max_times(2))
            .sleep(tokio::time::sleep)
            .await
            .is_ok()
    }

    fn started(&self, answer: TelecomResponse) -> Result<Started, ProviderError> {
        let outcome = outcome_of(&answer)?;
        Ok(Started {
            provider_ref: answer.transaction_id.clone(),
            provider_verification: answer.verification_id.clone(),
            ..Started::outcome(outcome)
        })
    }
}

#[derive(Serialize)]
struct SendBody<'a> {
    phone: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification_id: Option<&'a str>,
}

#[derive(Serialize)]
struct ConfirmBody<'a> {
    transaction_id: &'a str,
    code: &'a str,
}

#[derive(Serialize)]
struct IdentityBody<'a> {
    phone: &'a str,
    birth_date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification_id: Option<&'a str>,
}

fn ineligible() -> ProviderError {
    ProviderError::ineligible("ID.me takes NANP numbers only")
}

fn reference(transaction: &Transaction) -> Result<&str, ProviderError> {
    transaction.provider_ref.as_deref().ok_or_else(|| ProviderError::failed("no ID.me transaction id was kept"))
}

impl Provider for Idme {
    fn name(&self) -> ProviderName {
        ProviderName::Idme
    }

    fn sms(&self) -> Option<&dyn SmsCheck> {
        Some(self)
    }

    fn identity(&self) -> Option<&dyn IdentityMatch> {
        Some(self)
    }

    fn inbound(&self) -> Option<&dyn Inbound> {
        self.webhook_secret.is_some().then_some(self as &dyn Inbound)
    }
}

/// ID.me's result webhook: the secret as `?token=` or `Authorization:
/// Bearer`, compared in constant time; the body is a telecom transaction.
impl Inbound for Idme {
    fn authenticate(&self, call: &InboundCall<'_>) -> bool {
        let presented = call.query("token").or(call.bearer).unwrap_or_default();
        self.webhook_secret.as_ref().is_some_and(|secret| constant_time_eq(presented, secret.expose()))
    }

    fn parse_inbound(&self, call: &InboundCall<'_>, body: &[u8]) -> Result<InboundEvent, String> {
        if call.kind != InboundKind::Webhook {
            return Err("ID.me sends no users back to handset".into());
        }
        let (provider_ref, outcome) = webhook_result(body)?;
        Ok(InboundEvent::Result { provider_ref, outcome })
    }
}

#[async_trait]
impl SmsCheck for Idme {
    fn accepts(&self, phone: &Phone) -> bool {
        Self::phone_digits(phone).is_some()
    }

    async fn send_code(&self, request: StartRequest<'_>) -> Result<Started, ProviderError> {
        let phone = Self::phone_digits(request.phone).ok_or_else(ineligible)?;
        let body = SendBody {
            phone,
            callback_url: self.webhook_url.as_deref(),
            verification_id: request.provider_verification,
        };
        let answer = self.post(SEND_PATH, &body, Effect::ReachesUser).await?;
        let started = self.started(answer)?;
        // A send proves nothing by itself, and without ID.me's id the code cannot be checked.
        if matches!(started.outcome, Outcome::Succeeded(_)) || started.provider_ref.is_none() {
            return Err(ProviderError::failed("ID.me answered the send without a pending transaction id"));
        }
        Ok(started)
    }

    async fn check_code(&self, transaction: &Transaction, code: &str) -> Result<Renewed<CodeCheck>, ProviderError> {
        let body = ConfirmBody { transaction_id: reference(transaction)?, code };
        let check = match self.post(CONFIRM_PATH, &body, Effect::None).await {
            Ok(answer) => match outcome_of(&answer)? {
                Outcome::Succeeded(result) => CodeCheck::Matched(result),
                Outcome::Failed(error) => CodeCheck::Failed(error),
                Outcome::Pending => CodeCheck::Mismatched,
            },
            Err(error) => mapping::code_check_of(error)?,
        };
        Ok(Renewed::same_ref(check))
    }
}

#[async_trait]
impl IdentityMatch for Idme {
    fn accepts(&self, phone: &Phone) -> bool {
        Self::phone_digits(phone).is_some()
    }

    /// ID.me may answer 210 and finish later (webhook, or this poll).
    fn polls(&self) -> bool {
        true
    }

    async fn start_identity(
        &self,
        request: StartRequest<'_>,
        birth_date: &BirthDate,
    ) -> Result<Started, ProviderError> {
        let phone = Self::phone_digits(request.phone).ok_or_else(ineligible)?;
        let body = IdentityBody {
            phone,
            birth_date: birth_date.to_string(),
            callback_url: self.webhook_url.as_deref(),
            verification_id: request.provider_verification,
        };
        let answer = self.post(IDENTITY_PATH, &body, Effect::None).await?;
        self.started(answer)
    }

    async fn fetch_result(&self, transaction: &Transaction) -> Result<Renewed<Outcome>, ProviderError> {
        let answer = self.get_status(reference(transaction)?).await?;
        Ok(Renewed::same_ref(outcome_of(&answer)?))
    }
}
