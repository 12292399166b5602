//! handset's adapter for Veratad's PhoneMatch5.0.SMS
//! (Veratad's PhoneMatch 5.0 SMS document): an SMS one-time code that
//! Veratad sends and checks, in two calls.
//!
//! - `send_code`: `POST {base_url}/process/comprehensive/gateway` with the
//!   account's `user`/`pass` (in the body, never a URL), `reference` (handset's
//!   transaction id), `target` (`fn`, `ln`, `phone`) and `options.outofband`
//!   (message template, `do_not_send_to_types`, country lists) from config.
//!   PENDING keeps the continuation (token and path) server-side as the
//!   transaction's `provider_ref`; the partner never sees it.
//! - `check_code`: `POST {base_url}/process/continue` with the token and
//!   `codematch.key`. A token Veratad renews is handed back (`Renewed`) and
//!   stored by the gateway.
//! - Veratad needs the user's name (`needs_name`); a number whose country the
//!   configured lists exclude is ineligible before anything is sent.
//! - Every documented action and detail maps to the catalogue with
//!   `"{action}: {detail}"` kept as `provider_code` (`mapping`, and the table
//!   in `docs/providers/veratad.md`).

mod mapping;
mod reference;
pub mod wire;

use std::time::Duration;

use async_trait::async_trait;
use handset_core::model::{ProviderName, Transaction};
use handset_core::provider::{CodeCheck, Provider, ProviderError, Renewed, SmsCheck, StartRequest, Started};
use handset_core::secret::Secret;
use handset_core::{Phone, Region};
use serde::Deserialize;

pub use mapping::{check_of, started_of};
pub use reference::ContinuationRef;

/// Line types Veratad knows for `do_not_send_to_types`.
pub const LINE_TYPES: [&str; 3] = ["mobile", "landline", "voip"];

/// `[providers.veratad]`: documented in `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VeratadSettings {
    /// scheme://host:port; the documented paths are appended.
    pub base_url: String,
    /// The account's API user name and password; both set: Veratad is enabled.
    pub user: Secret,
    pub pass: Secret,
    /// Every call to Veratad gives up after this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Divides the provider's score under adaptive routing (`handset_core::adaptive`):
    /// 2.0 makes it need twice the conversion of a provider at 1.0 to go first.
    pub cost: f64,
    /// The SMS text; Veratad puts the code where `{pin}` stands.
    pub message: String,
    /// Line types that get no SMS (`mobile`, `landline`, `voip`).
    #[serde(deserialize_with = "handset_core::config::string_list")]
    pub do_not_send_to_types: Vec<String>,
    /// ISO 3166 alpha-2 countries not to send to, or the only ones to send to.
    #[serde(deserialize_with = "handset_core::config::string_list")]
    pub country_blacklist: Vec<String>,
    #[serde(deserialize_with = "handset_core::config::string_list")]
    pub country_whitelist: Vec<String>,
}

impl VeratadSettings {
    pub fn enabled(&self) -> bool {
        self.user.is_set() && self.pass.is_set()
    }

    /// What is wrong with these settings, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.message.contains("{pin}") {
            return Err("providers.veratad.message must contain {pin}, where the code goes".into());
        }
        if let Some(unknown) = self.do_not_send_to_types.iter().find(|t| !LINE_TYPES.contains(&t.as_str())) {
            return Err(format!("providers.veratad.do_not_send_to_types: {unknown:?} is not mobile, landline or voip"));
        }
        for (key, list) in
            [("country_blacklist", &self.country_blacklist), ("country_whitelist", &self.country_whitelist)]
        {
            if let Some(unknown) = list.iter().find(|c| Region::parse(c).is_none()) {
                return Err(format!("providers.veratad.{key}: {unknown:?} is not an ISO 3166 alpha-2 country"));
            }
        }
        Ok(())
    }
}

pub struct Veratad {
    client: reqwest::Client,
    base_url: String,
    user: Secret,
    pass: Secret,
    message: String,
    do_not_send_to_types: Vec<String>,
    country_blacklist: Vec<String>,
    country_whitelist: Vec<String>,
}

impl Veratad {
    pub fn new(settings: &VeratadSettings) -> Result<Veratad, String> {
        settings.validate()?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("providers.veratad: {e}"))?;
        let upper = |list: &[String]| list.iter().map(|c| c.to_ascii_uppercase()).collect();
        Ok(Veratad {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            user: settings.user.clone(),
            pass: settings.pass.clone(),
            message: settings.message.clone(),
            do_not_send_to_types: settings.do_not_send_to_types.clone(),
            country_blacklist: upper(&settings.country_blacklist),
            country_whitelist: upper(&settings.country_whitelist),
        })
    }

    /// Veratad's form of a number: 10 digits for NANP, E.164 otherwise.
    pub fn phone_for(phone: &Phone) -> String {
        if phone.calling_code() == 1 && phone.national_digits().len() == 10 {
            phone.national_digits().to_owned()
        } else {
            phone.e164().to_owned()
        }
    }

    /// Whether the configured country lists let a code go to this number.
    fn country_allowed(&self, phone: &Phone) -> bool {
        let Some(region) = phone.region() else { return self.country_whitelist.is_empty() };
        !self.country_blacklist.iter().any(|c| c == region)
            && (self.country_whitelist.is_empty() || self.country_whitelist.iter().any(|c| c == region))
    }

    async fn post<B: serde::Serialize>(&self, path: &str, body: &B) -> Result<reqwest::Response, reqwest::Error> {
        self.client.post(format!("{}{path}", self.base_url)).json(body).send().await
    }
}

impl Provider for Veratad {
    fn name(&self) -> ProviderName {
        ProviderName::Veratad
    }

    fn sms(&self) -> Option<&dyn SmsCheck> {
        Some(self)
    }
}

#[async_trait]
impl SmsCheck for Veratad {
    /// Numbers whose country the configured lists let a code go to: others
    /// make Veratad ineligible before anything (breaker, per-phone limit,
    /// the call) is spent on them; a start none can take is recorded as a
    /// final 300 with 3908.
    fn accepts(&self, phone: &Phone) -> bool {
        self.country_allowed(phone)
    }

    fn needs_name(&self) -> bool {
        true
    }

    async fn send_code(&self, request: StartRequest<'_>) -> Result<Started, ProviderError> {
        // Routing never sends a nameless request here; the check keeps the call honest.
        let name = request.name.ok_or_else(|| ProviderError::ineligible("Veratad needs the user's name"))?;
        let phone = Self::phone_for(request.phone);
        let body = wire::GatewayIn {
            user: self.user.expose(),
            pass: self.pass.expose(),
            service: wire::SERVICE,
            reference: request.transaction_id.to_string(),
            target: wire::Target { first_name: &name.first, last_name: &name.last, phone: &phone },
            options: wire::Options {
                outofband: wire::OutOfBand {
                    message: &self.message,
                    do_not_send_to_types: &self.do_not_send_to_types,
                    country: wire::Countries { blacklist: &self.country_blacklist, whitelist: &self.country_whitelist },
                },
            },
        };
        let answer = mapping::read(self.post(wire::GATEWAY_PATH, &body).await, true).await?;
        started_of(&answer)
    }

    async fn check_code(&self, transaction: &Transaction, code: &str) -> Result<Renewed<CodeCheck>, ProviderError> {
        let continuation = transaction
            .provider_ref
            .as_deref()
            .and_then(ContinuationRef::parse)
            .ok_or_else(|| ProviderError::failed("no Veratad continuation token was kept"))?;
        let body = wire::ContinueIn { token: &continuation.token, codematch: wire::CodeMatch { key: code } };
        let sent = self.post(&continuation.path, &body).await;
        // Veratad no longer knows the token: renewed by a concurrent confirm,
        // or the check is closed on Veratad's side (the gateway tells which).
        if sent.as_ref().is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND) {
            return Ok(Renewed::same_ref(CodeCheck::Stale));
        }
        check_of(&mapping::read(sent, false).await?)
    }
}
