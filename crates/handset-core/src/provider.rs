//! The provider port: what handset asks of an upstream (ID.me, Veratad, DQE,
//! the sandbox). A provider offers any of three capabilities, one per product,
//! shaped after the providers' documents:
//! - `SmsCheck` (possession.sms): a code the provider (or handset) sends, then
//!   checks (ID.me, Veratad);
//! - `OperatorCheck` (possession.network): an operator redirect whose result is
//!   fetched later (DQE);
//! - `IdentityMatch` (identity): phone and birth date against carrier records,
//!   possibly answered later (ID.me answers 210, then a webhook or a poll).
//!
//! Routing only considers providers with the product's capability. An answer
//! may renew the provider's reference (`Renewed`), which the gateway stores
//! with the state change. Adapters know nothing of HTTP handlers or the database.

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
    /// The provider no longer knows the reference the check used: another
    /// confirm may have renewed it meanwhile (the gateway reads it again).
    Stale,
}

/// An answer about a pending check, with the reference to use from now on
/// when the provider renewed it (Veratad's continuation token may change on
/// every call; DQE's session token arrives with the user's return).
#[derive(Clone, PartialEq)]
pub struct Renewed<T> {
    pub answer: T,
    pub provider_ref: Option<String>,
}

/// The reference is a provider's session token: never printed.
impl<T: std::fmt::Debug> std::fmt::Debug for Renewed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewed").field("answer", &self.answer).field("renewed", &self.provider_ref.is_some()).finish()
    }
}

impl<T> Renewed<T> {
    /// An answer that keeps the reference the transaction has.
    pub fn same_ref(answer: T) -> Self {
        Renewed { answer, provider_ref: None }
    }
}

/// The cause of a provider error, kept for the operator's log.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a provider call did not produce a decision (the "four kinds" of answer in the README).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the input (e.g. 422 3101); the partner gets that error.
    #[error("rejected by the provider: {0}")]
    Rejected(ApiError),
    /// This provider cannot serve this number (operator or country it does not
    /// take): the next provider is tried, and the breaker is not told.
    /// `temporary`: a refusal that may pass later (DQE's "operator
    /// unreachable"); a chain that runs out on one answers 503, not 422.
    #[error("the provider cannot serve this number: {reason}")]
    Ineligible { reason: String, provider_code: Option<String>, temporary: bool },
    /// Nothing reached the user (refused connection, 502, 503, breaker open):
    /// the next provider is tried, and the breaker counts it.
    #[error("provider unavailable: {reason}")]
    Unavailable {
        reason: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The provider refused handset's own credentials or configuration: an
    /// operator problem, never the partner's.
    #[error("provider refused handset's credentials or configuration: {reason}")]
    Misconfigured {
        reason: String,
        #[source]
        cause: Option<Cause>,
    },
    /// No usable answer after the request may have reached the user (a
    /// timeout after a send, an unreadable answer): never tried elsewhere.
    #[error("provider call failed: {reason}")]
    Failed {
        reason: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl ProviderError {
    pub fn ineligible(reason: impl Into<String>) -> Self {
        ProviderError::Ineligible { reason: reason.into(), provider_code: None, temporary: false }
    }

    pub fn unavailable(reason: impl Into<String>) -> Self {
        ProviderError::Unavailable { reason: reason.into(), cause: None }
    }

    pub fn misconfigured(reason: impl Into<String>) -> Self {
        ProviderError::Misconfigured { reason: reason.into(), cause: None }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        ProviderError::Failed { reason: reason.into(), cause: None }
    }

    /// The error with its causes, `outer: inner: innermost`, for one log line.
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// The same error, keeping `source` as its cause.
    pub fn because(mut self, source: impl Into<Cause>) -> Self {
        if let ProviderError::Unavailable { cause, .. }
        | ProviderError::Misconfigured { cause, .. }
        | ProviderError::Failed { cause, .. } = &mut self
        {
            *cause = Some(source.into());
        }
        self
    }
}

/// A provider: its name and the capabilities it offers.
pub trait Provider: Send + Sync {
    fn name(&self) -> ProviderName;

    fn sms(&self) -> Option<&dyn SmsCheck> {
        None
    }

    fn operator(&self) -> Option<&dyn OperatorCheck> {
        None
    }

    fn identity(&self) -> Option<&dyn IdentityMatch> {
        None
    }

    /// Calls the provider makes to handset (`POST /providers/{name}/webhook`)
    /// or the user's browser brings back from it (`GET /providers/{name}/return`).
    fn inbound(&self) -> Option<&dyn Inbound> {
        None
    }
}

/// Which inbound route a call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundKind {
    /// `POST /providers/{name}/webhook`: the provider pushes a result.
    Webhook,
    /// `GET /providers/{name}/return`: the operator sends the user's browser back.
    Return,
}

/// An inbound call as the server received it, before its body is read.
#[derive(Clone, Copy)]
pub struct InboundCall<'a> {
    pub kind: InboundKind,
    /// The query string's pairs.
    pub query: &'a [(String, String)],
    /// The `Authorization: Bearer` token, if any.
    pub bearer: Option<&'a str>,
}

/// Query values and the bearer token carry secrets: only the names print.
impl std::fmt::Debug for InboundCall<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.query.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("InboundCall")
            .field("kind", &self.kind)
            .field("query", &names)
            .field("bearer", &self.bearer.is_some())
            .finish()
    }
}

impl InboundCall<'_> {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// What an inbound call says.
#[derive(Clone, PartialEq)]
pub enum InboundEvent {
    /// A result for the transaction the provider knows as `provider_ref`.
    Result { provider_ref: String, outcome: Outcome },
    /// The user is back from the operator step of handset's transaction
    /// `transaction_id`, with the provider's session token if it gave one.
    Returned { transaction_id: Uuid, token: Option<String> },
}

/// The session token is a credential: only whether there is one prints.
impl std::fmt::Debug for InboundEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InboundEvent::Result { provider_ref: _, outcome } => {
                f.debug_struct("Result").field("outcome", outcome).finish_non_exhaustive()
            }
            InboundEvent::Returned { transaction_id, token } => f
                .debug_struct("Returned")
                .field("transaction_id", transaction_id)
                .field("token", &token.is_some())
                .finish(),
        }
    }
}

/// A provider's inbound calls: its own authentication and its own format.
pub trait Inbound: Send + Sync {
    /// Whether the call carries the provider's credentials; checked before
    /// any of the body is read.
    fn authenticate(&self, call: &InboundCall<'_>) -> bool;

    /// Reads an authenticated call; the error says what is wrong with it.
    fn parse_inbound(&self, call: &InboundCall<'_>, body: &[u8]) -> Result<InboundEvent, String>;
}

impl dyn Provider {
    /// Whether this provider offers `product` at all.
    pub fn offers(&self, product: Product) -> bool {
        match product {
            Product::PossessionSms => self.sms().is_some(),
            Product::PossessionNetwork => self.operator().is_some(),
            Product::Identity => self.identity().is_some(),
        }
    }

    /// Whether this provider offers `product` and can take `phone` for it.
    pub fn serves(&self, product: Product, phone: &Phone) -> bool {
        match product {
            Product::PossessionSms => self.sms().is_some_and(|c| c.accepts(phone)),
            Product::PossessionNetwork => self.operator().is_some_and(|c| c.accepts(phone)),
            Product::Identity => self.identity().is_some_and(|c| c.accepts(phone)),
        }
    }

    /// Whether a pending `product` check gets its result by polling.
    pub fn polls(&self, product: Product) -> bool {
        match product {
            Product::PossessionSms => false,
            Product::PossessionNetwork => self.operator().is_some_and(OperatorCheck::polls),
            Product::Identity => self.identity().is_some_and(IdentityMatch::polls),
        }
    }

    /// Fetches a pending check's current result: the operator's (with the
    /// session `token` the user brought back, if any) or the identity match's.
    pub async fn fetch_result(
        &self,
        transaction: &Transaction,
        token: Option<&str>,
    ) -> Result<Renewed<Outcome>, ProviderError> {
        let unsupported = || ProviderError::misconfigured(format!("{} has no result to fetch", self.name()));
        match transaction.product {
            Product::PossessionNetwork => {
                self.operator().ok_or_else(unsupported)?.fetch_result(transaction, token).await
            }
            Product::Identity => self.identity().ok_or_else(unsupported)?.fetch_result(transaction).await,
            Product::PossessionSms => Err(unsupported()),
        }
    }
}

/// possession.sms: a code sent to the phone, then checked.
#[async_trait]
pub trait SmsCheck: Send + Sync {
    /// Whether it can send to this number at all (skipped by routing otherwise).
    fn accepts(&self, phone: &Phone) -> bool;

    /// Whether it needs the user's name (Veratad).
    fn needs_name(&self) -> bool {
        false
    }

    async fn send_code(&self, request: StartRequest<'_>) -> Result<Started, ProviderError>;

    /// Checks a code, for providers that check codes themselves (no `local_code`).
    async fn check_code(&self, transaction: &Transaction, code: &str) -> Result<Renewed<CodeCheck>, ProviderError>;
}

/// possession.network: a silent operator check the user's browser goes through.
#[async_trait]
pub trait OperatorCheck: Send + Sync {
    fn accepts(&self, phone: &Phone) -> bool;

    /// Whether a pending check is polled for its result.
    fn polls(&self) -> bool {
        false
    }

    /// Starts the check; `return_url` is where the operator sends the user back to handset.
    async fn start(&self, request: StartRequest<'_>, return_url: &str) -> Result<Started, ProviderError>;

    /// The current result; `token` is a session token the user brought back.
    async fn fetch_result(
        &self,
        transaction: &Transaction,
        token: Option<&str>,
    ) -> Result<Renewed<Outcome>, ProviderError>;
}

/// identity: phone and birth date against carrier records.
#[async_trait]
pub trait IdentityMatch: Send + Sync {
    fn accepts(&self, phone: &Phone) -> bool;

    /// Whether a pending match is polled for its result.
    fn polls(&self) -> bool {
        false
    }

    async fn start_identity(&self, request: StartRequest<'_>, birth_date: &BirthDate)
    -> Result<Started, ProviderError>;

    async fn fetch_result(&self, transaction: &Transaction) -> Result<Renewed<Outcome>, ProviderError>;
}
