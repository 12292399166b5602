//! The provider port: what handset asks of an upstream (ID.me, Veratad, DQE,
//! the sandbox), shaped for the three kinds of upstream the providers' documents
//! describe:
//! - an SMS code the provider sends and checks (ID.me, Veratad): `send_code` + `check_code`;
//! - an operator redirect whose result is fetched later (DQE): `start_network` + `fetch_result`;
//! - results that arrive asynchronously (ID.me identity answers 210, then a
//!   webhook or polling): `start_identity` answering `Outcome::Pending`, then `fetch_result`.
//!
//! Adapters know nothing of HTTP handlers or the database.

use async_trait::async_trait;
use uuid::Uuid;

use crate::birth_date::BirthDate;
use crate::error::ApiError;
use crate::model::{PersonName, Product, ProviderName, ResultError, Transaction, TransactionResult};
use crate::phone::Phone;

/// What handset tells a provider when it starts a check.
#[derive(Clone, Copy)]
pub struct StartRequest<'a> {
    /// handset's id; providers that echo a reference get this one.
    pub transaction_id: Uuid,
    pub phone: &'a Phone,
    pub name: Option<&'a PersonName>,
    pub birth_date: Option<&'a BirthDate>,
    /// The provider's own id for this verification, when an earlier
    /// transaction of the same verification went to the same provider.
    pub provider_verification: Option<&'a str>,
}

impl std::fmt::Debug for StartRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The name and birth date are personal data; `Phone` masks itself.
        f.debug_struct("StartRequest")
            .field("transaction_id", &self.transaction_id)
            .field("phone", &self.phone)
            .finish_non_exhaustive()
    }
}

/// Where a check stands after a provider answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Waiting for the user's code, the operator step, or an asynchronous result.
    Pending,
    Succeeded(TransactionResult),
    Failed(ResultError),
}

/// A provider's answer to a start.
#[derive(Clone, PartialEq)]
pub struct Started {
    /// The provider's own transaction id or session token, kept server-side.
    pub provider_ref: Option<String>,
    /// A code that handset checks itself (it is hashed before it is stored).
    pub local_code: Option<String>,
    /// The operator URL to send the user to (network possession).
    pub redirect_url: Option<String>,
    /// The provider's own verification id, to pass on for later transactions.
    pub provider_verification: Option<String>,
    pub outcome: Outcome,
}

// The code, the provider's session token and the operator link (which
// completes a check, like a password) stay out of logs.
crate::debug_only!(Started { outcome });

impl Started {
    pub fn outcome(outcome: Outcome) -> Self {
        Started { provider_ref: None, local_code: None, redirect_url: None, provider_verification: None, outcome }
    }
}

/// A provider's verdict on one submitted code.
#[derive(Debug, Clone, PartialEq)]
pub enum CodeCheck {
    Matched(TransactionResult),
    /// Wrong code; the user may try again while attempts remain.
    Mismatched,
    /// The provider ended the check (e.g. its own retry limit).
    Failed(ResultError),
}

/// Why a provider call did not produce an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the input (e.g. 422 3101); the partner gets that error.
    #[error("rejected by the provider: {0}")]
    Rejected(ApiError),
    /// Timeout, 5xx or unreachable *before* anything reached the user: safe to
    /// try the next provider.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused handset's own credentials or configuration: an
    /// operator problem, never the partner's.
    #[error("provider refused handset's credentials or configuration: {0}")]
    Misconfigured(String),
    /// Anything else that went wrong after the request may have reached the
    /// user (e.g. a timeout after a send): never retried elsewhere.
    #[error("provider call failed: {0}")]
    Failed(String),
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> ProviderName;

    /// Whether this provider can take `product` for `phone` at all (ID.me only
    /// takes NANP numbers); an ineligible provider is skipped by routing.
    fn accepts(&self, product: Product, phone: &Phone) -> bool;

    /// Whether the provider needs the user's name for `product` (Veratad).
    fn needs_name(&self, _product: Product) -> bool {
        false
    }

    /// Whether a pending `product` check gets its result by polling
    /// `fetch_result` (asynchronous identity results, operator checks).
    fn polls(&self, _product: Product) -> bool {
        false
    }

    /// possession.sms: sends a code to the phone.
    async fn send_code(&self, request: StartRequest<'_>) -> Result<Started, ProviderError>;

    /// possession.sms, for providers that check codes themselves (no `local_code`).
    async fn check_code(&self, transaction: &Transaction, code: &str) -> Result<CodeCheck, ProviderError>;

    /// possession.network: starts a silent operator check; `return_url` is
    /// where the operator sends the user back to handset.
    async fn start_network(&self, request: StartRequest<'_>, return_url: &str) -> Result<Started, ProviderError>;

    /// identity: matches phone and birth date against carrier records.
    async fn start_identity(&self, request: StartRequest<'_>) -> Result<Started, ProviderError>;

    /// Fetches the current result of a pending check (network result, or an
    /// asynchronous identity result); `token` is a session token the operator
    /// handed back, when there is one.
    async fn fetch_result(&self, transaction: &Transaction, token: Option<&str>) -> Result<Outcome, ProviderError>;
}
