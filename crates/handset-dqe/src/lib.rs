//! handset's adapter for DQE's ID Mobile numVerify
//! (DQE's ID Mobile numVerify document): silent network possession.
//! The user opens the operator's link on the phone's own mobile data; the
//! operator recognises the line, sends the browser back to handset, and DQE
//! says whether the line is the number given.
//!
//! - Step 1 (`start`): `POST {base_url}/IDMOBILE/`, form-encoded so the
//!   licence and token stay out of URLs and access logs, with `licence`,
//!   `number` (French national digits, `0612345678`), `token`, `name`,
//!   `scope=numVerify` and `redirect_uri` = handset's own
//!   `/providers/dqe/return?transaction_id=...`.
//! - The return (`Inbound`): the browser brings DQE's session `token`; it is
//!   stored, and the result fetched.
//! - Step 2 (`fetch_result`): `POST {base_url}/GET/` with `Licence`, `token`
//!   (the session token, else the configured one) and `scope`; `pending` is
//!   polled by the job runner until final or the deadline.
//! - The body's `status` decides, never the HTTP status. Every
//!   error id is mapped with the id kept verbatim as `provider_code`
//!   (`docs/providers/dqe.md`).

pub mod mapping;

use std::time::Duration;

use async_trait::async_trait;
use handset_core::Phone;
use handset_core::model::{ProviderName, Transaction};
use handset_core::provider::{
    Inbound, InboundCall, InboundEvent, InboundKind, OperatorCheck, Outcome, Provider, ProviderError, Renewed,
    StartRequest, Started,
};
use handset_core::secret::Secret;
use serde::Deserialize;

pub const START_PATH: &str = "/IDMOBILE/";
pub const RESULT_PATH: &str = "/GET/";
pub const SCOPE: &str = "numVerify";

/// `[providers.dqe]`: documented in `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DqeSettings {
    /// scheme://host:port of the DQE server; the documented paths are appended.
    pub base_url: String,
    /// The licence code and the authentication token; both set: DQE is enabled.
    pub licence: Secret,
    pub token: Secret,
    /// The partner name DQE knows handset's account by.
    pub name: String,
    /// Every call to DQE gives up after this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Divides the provider's score under adaptive routing (`handset_core::adaptive`):
    /// 2.0 makes it need twice the conversion of a provider at 1.0 to go first.
    pub cost: f64,
}

impl DqeSettings {
    pub fn enabled(&self) -> bool {
        self.licence.is_set() && self.token.is_set()
    }

    /// What is wrong with these settings, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("providers.dqe.name is required: the partner name DQE knows the account by".into());
        }
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(format!("providers.dqe.base_url must be an http(s) URL, got {:?}", self.base_url));
        }
        Ok(())
    }
}

pub struct Dqe {
    client: reqwest::Client,
    base_url: String,
    licence: Secret,
    token: Secret,
    name: String,
}

impl Dqe {
    pub fn new(settings: &DqeSettings) -> Result<Dqe, String> {
        settings.validate()?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("providers.dqe: {e}"))?;
        Ok(Dqe {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            licence: settings.licence.clone(),
            token: settings.token.clone(),
            name: settings.name.clone(),
        })
    }

    /// DQE's form of a French number: the national digits with their 0
    /// (`0612345678`), as a French user writes it; `None` for other numbers.
    pub fn number_for(phone: &Phone) -> Option<String> {
        (phone.calling_code() == 33 && phone.national_digits().len() == 9)
            .then(|| format!("0{}", phone.national_digits()))
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<reqwest::Response, reqwest::Error> {
        self.client.post(format!("{}{path}", self.base_url)).form(form).send().await
    }
}

impl Provider for Dqe {
    fn name(&self) -> ProviderName {
        ProviderName::Dqe
    }

    fn operator(&self) -> Option<&dyn OperatorCheck> {
        Some(self)
    }

    fn inbound(&self) -> Option<&dyn Inbound> {
        Some(self)
    }
}

#[async_trait]
impl OperatorCheck for Dqe {
    /// French numbers: DQE serves French operators.
    fn accepts(&self, phone: &Phone) -> bool {
        Self::number_for(phone).is_some()
    }

    fn polls(&self) -> bool {
        true
    }

    async fn start(&self, request: StartRequest<'_>, return_url: &str) -> Result<Started, ProviderError> {
        let number =
            Self::number_for(request.phone).ok_or_else(|| ProviderError::ineligible("DQE serves French numbers"))?;
        let form = [
            ("licence", self.licence.expose()),
            ("number", number.as_str()),
            ("token", self.token.expose()),
            ("name", self.name.as_str()),
            ("scope", SCOPE),
            ("redirect_uri", return_url),
        ];
        // Nothing reaches the user before handset hands out the operator's
        // link, so a lost answer is plain unavailability.
        let answer = mapping::read(self.post(START_PATH, &form).await).await?;
        mapping::started_of(&answer)
    }

    async fn fetch_result(
        &self,
        transaction: &Transaction,
        token: Option<&str>,
    ) -> Result<Renewed<Outcome>, ProviderError> {
        // The session token kept from the first return wins over any later
        // one (a return is not authenticated); else the one the user brought
        // back; else the configured token.
        let stored = transaction.provider_ref.as_deref();
        let fresh = if stored.is_none() { token } else { None };
        let used = stored.or(fresh).unwrap_or(self.token.expose());
        let form = [("Licence", self.licence.expose()), ("token", used), ("scope", SCOPE)];
        let answer = mapping::read(self.post(RESULT_PATH, &form).await).await?;
        // Only a kept token's "expired" ends the check: a token that just
        // arrived in a URL and that DQE does not know is ignored, not trusted.
        let outcome = mapping::outcome_of(&answer, stored.is_some())?;
        let known = answer.status != "error";
        Ok(Renewed { answer: outcome, provider_ref: fresh.filter(|_| known).map(str::to_owned) })
    }
}

/// The operator sends the user's browser back with DQE's session `token`.
/// There is nothing to authenticate: a return only makes handset ask DQE,
/// server-side with its own licence, for the result. The first token a
/// transaction keeps is the only one used afterwards, a token another
/// transaction holds is refused, and an unknown token ends nothing. What a
/// return cannot prove is that its token belongs to this check's number
/// (DQE's step 2 names no number): see `docs/providers/dqe.md`.
impl Inbound for Dqe {
    fn authenticate(&self, _call: &InboundCall<'_>) -> bool {
        true
    }

    fn parse_inbound(&self, call: &InboundCall<'_>, _body: &[u8]) -> Result<InboundEvent, String> {
        if call.kind != InboundKind::Return {
            return Err("DQE sends no webhooks".into());
        }
        let transaction_id = call
            .query("transaction_id")
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
            .ok_or("the return names no transaction")?;
        let token = call.query("token").filter(|t| !t.is_empty() && t.len() <= 512).map(str::to_owned);
        Ok(InboundEvent::Returned { transaction_id, token })
    }
}
