//! The records handset keeps (partners, verifications, transactions, outbox
//! messages) and the transaction resource partners read and receive.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ErrorCode;
use crate::routing::RoutingDecision;
use crate::secret::Secret;

/// `Debug` that prints only the listed fields: the others hold personal data
/// (phone, birth date, name, address, metadata), codes or secrets, which must
/// not reach a log line through `{:?}`.
#[macro_export]
macro_rules! debug_only {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl ::std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($ty))$(.field(stringify!($field), &self.$field))*.finish_non_exhaustive()
            }
        }
    };
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $( $variant:ident = $text:literal ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $( #[serde(rename = $text)] $variant, )* }

        // Written by hand: the derive cannot read a `rename` given through a
        // macro fragment and would document the Rust variant names.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$( $text ),*]))
                    .into()
            }
        }

        impl ToSchema for $name {}

        impl $name {
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )* ];

            pub fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $text, )* }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text { $( $text => Some($name::$variant), )* _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// What a transaction proves.
    Product {
        PossessionSms = "possession.sms",
        PossessionNetwork = "possession.network",
        Identity = "identity",
    }
}

impl Product {
    pub fn is_possession(self) -> bool {
        matches!(self, Product::PossessionSms | Product::PossessionNetwork)
    }
}

string_enum! {
    /// Who answers a transaction upstream.
    ProviderName {
        Sandbox = "sandbox",
        Idme = "idme",
        Veratad = "veratad",
        Dqe = "dqe",
    }
}

/// A transaction's state, with ID.me's codes: 210 pending, 200 success, 300 unsuccessful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Succeeded,
    Failed,
}

impl Status {
    pub fn code(self) -> i32 {
        match self {
            Status::Pending => 210,
            Status::Succeeded => 200,
            Status::Failed => 300,
        }
    }

    pub fn from_code(code: i32) -> Option<Status> {
        match code {
            210 => Some(Status::Pending),
            200 => Some(Status::Succeeded),
            300 => Some(Status::Failed),
            _ => None,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Status::Pending => "Transaction pending review",
            Status::Succeeded => "Transaction successfully completed",
            Status::Failed => "Transaction unsuccessful",
        }
    }

    pub fn is_final(self) -> bool {
        self != Status::Pending
    }
}

/// A partner account. The API key itself is never kept, only its hash.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: Uuid,
    pub name: String,
    pub products: Vec<Product>,
    pub active: bool,
    /// `whsec_...`: needed in clear to sign callbacks.
    pub webhook_secret: Secret,
    pub created_at: DateTime<Utc>,
}

impl Partner {
    pub fn enabled_for(&self, product: Product) -> bool {
        self.products.contains(&product)
    }
}

/// A group of transactions about one user.
#[derive(Debug, Clone)]
pub struct Verification {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// The user's name, which some providers need (Veratad).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonName {
    /// 1 to 100 characters, not only spaces, no control characters.
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    pub first: String,
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    pub last: String,
}

impl PersonName {
    /// The fields a request's `name` object may have.
    pub const FIELDS: &[&str] = &["first", "last"];
}

debug_only!(PersonName {});

/// A postal address returned by an identity match.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Address {
    pub line1: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub line2: Option<String>,
    pub city: String,
    pub region: String,
    pub postal_code: String,
    pub country: String,
}

debug_only!(Address { country });

/// One error in a final transaction's `result.errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResultError {
    pub code: u16,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub additional_info: Option<String>,
    /// The provider's own code, verbatim (`"09"`, `"3102"`, `"FAIL: ..."`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub provider_code: Option<String>,
}

impl ResultError {
    pub fn new(code: ErrorCode) -> Self {
        ResultError {
            code: code.code(),
            message: code.message().to_owned(),
            additional_info: None,
            provider_code: None,
        }
    }

    pub fn provider_code(mut self, code: impl Into<String>) -> Self {
        self.provider_code = Some(code.into());
        self
    }

    pub fn additional_info(mut self, info: impl Into<String>) -> Self {
        self.additional_info = Some(info.into());
        self
    }
}

/// A final transaction's outcome.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TransactionResult {
    /// Possession proven for this number.
    Phone {
        phone: String,
    },
    /// Identity matched; the carrier's address for the holder.
    Address {
        address: Address,
    },
    Errors {
        errors: Vec<ResultError>,
    },
    /// A success whose personal data (phone, address) the retention period removed.
    Purged {
        purged: bool,
    },
}

impl std::fmt::Debug for TransactionResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransactionResult::Phone { .. } => f.write_str("Phone { .. }"),
            TransactionResult::Address { address } => f.debug_struct("Address").field("address", address).finish(),
            TransactionResult::Errors { errors } => f.debug_struct("Errors").field("errors", errors).finish(),
            TransactionResult::Purged { purged } => f.debug_struct("Purged").field("purged", purged).finish(),
        }
    }
}

impl TransactionResult {
    pub fn failure(error: ResultError) -> Self {
        TransactionResult::Errors { errors: vec![error] }
    }

    /// The first error's code, when the result is a failure.
    pub fn error_code(&self) -> Option<u16> {
        match self {
            TransactionResult::Errors { errors } => errors.first().map(|e| e.code),
            _ => None,
        }
    }
}

/// One check of one phone number, as stored.
#[derive(Clone)]
pub struct Transaction {
    pub id: Uuid,
    pub verification_id: Uuid,
    pub partner_id: Uuid,
    pub product: Product,
    pub provider: ProviderName,
    /// E.164; `None` once purged by retention.
    pub phone: Option<String>,
    /// ISO 3166 alpha-2 region of the phone, when its numbering plan tells
    /// it; kept after retention (the funnel counts by it).
    pub country: Option<String>,
    /// The number's range as the pumping guard reads it (`+1415555`), on
    /// SMS checks only.
    pub number_range: Option<String>,
    pub birth_date: Option<String>,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Deadline for a pending check (code entry or operator redirect).
    pub expires_at: Option<DateTime<Utc>>,
    pub attempts_used: i32,
    pub max_attempts: i32,
    /// Hash of a code handset itself checks (see `crate::secret::code_hash`); never the code.
    pub code_hash: Option<String>,
    /// The provider's own transaction id or session token.
    pub provider_ref: Option<String>,
    /// The provider's own verification id (ID.me links transactions by it).
    pub provider_verification: Option<String>,
    /// When the job runner next asks the provider for a pending result.
    pub next_poll_at: Option<DateTime<Utc>>,
    pub poll_attempts: i32,
    /// Operator URL the user is sent to (network possession).
    pub redirect_url: Option<String>,
    /// Where the user goes after the operator step (partner's page).
    pub redirect_uri: Option<String>,
    pub callback_url: Option<String>,
    pub name: Option<PersonName>,
    pub metadata: Value,
    pub result: Option<TransactionResult>,
    /// The order its providers were tried in, and why; `None` on
    /// transactions from before it was recorded.
    pub routing: Option<RoutingDecision>,
}

debug_only!(Transaction {
    id,
    verification_id,
    partner_id,
    product,
    provider,
    country,
    status,
    created_at,
    updated_at,
    expires_at,
    attempts_used,
    max_attempts,
    next_poll_at,
    poll_attempts,
    result,
    routing,
});

/// A callback to deliver, written in the same database transaction as the
/// state change that caused it (transactional outbox).
#[derive(Clone)]
pub struct OutboxMessage {
    /// Doubles as the Standard Webhooks `webhook-id`.
    pub id: Uuid,
    pub transaction_id: Uuid,
    pub partner_id: Uuid,
    pub callback_url: String,
    /// The exact body to POST: the transaction resource as `GET
    /// /v1/transactions/{id}` rendered it when the message was written.
    /// Empty once purged by retention.
    pub payload: String,
    pub created_at: DateTime<Utc>,
}

debug_only!(OutboxMessage { id, transaction_id, partner_id, created_at });

impl OutboxMessage {
    /// A callback of `transaction` as it is now, to `callback_url`.
    pub fn of(transaction: &Transaction, callback_url: String, created_at: DateTime<Utc>) -> OutboxMessage {
        OutboxMessage {
            id: new_record_id(),
            transaction_id: transaction.id,
            partner_id: transaction.partner_id,
            callback_url,
            payload: serde_json::to_string(&transaction.to_resource()).unwrap_or_default(),
            created_at,
        }
    }

    /// The Standard Webhooks `webhook-id`: the same for every attempt.
    pub fn webhook_id(&self) -> String {
        format!("msg_{}", self.id.simple())
    }
}

/// Where a callback's delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CallbackState {
    /// Not delivered yet; `next_attempt_at` says when it is tried (again).
    Pending,
    Delivered,
    /// Every attempt of the retry schedule failed.
    Failed,
}

impl CallbackState {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackState::Pending => "pending",
            CallbackState::Delivered => "delivered",
            CallbackState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<CallbackState> {
        [CallbackState::Pending, CallbackState::Delivered, CallbackState::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One delivery attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackAttempt {
    pub attempted_at: DateTime<Utc>,
    /// The partner's HTTP status, when it answered.
    pub status_code: Option<i32>,
    /// Why the attempt failed without an HTTP answer (timeout, refused, ...).
    pub error: Option<String>,
    pub latency_ms: i64,
}

/// A callback with its delivery history.
#[derive(Debug, Clone)]
pub struct CallbackRecord {
    pub message: OutboxMessage,
    pub state: CallbackState,
    pub next_attempt_at: DateTime<Utc>,
    pub attempts: Vec<CallbackAttempt>,
}

/// A due callback that one worker holds a lease on.
#[derive(Debug, Clone)]
pub struct ClaimedCallback {
    pub message: OutboxMessage,
    /// Attempts made before this one.
    pub attempts_before: i32,
    /// The partner's `whsec_...` signing secret.
    pub webhook_secret: Secret,
    /// Its previous secret while a rotation's overlap lasts: callbacks carry
    /// a signature with each (Standard Webhooks allows several).
    pub previous_webhook_secret: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CallbackAttemptOut {
    pub attempted_at: String,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: i64,
}

/// `GET /v1/transactions/{id}/callbacks`: one callback and its attempts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CallbackOut {
    /// Sent as `webhook-id`, the same on every attempt: deduplicate on it.
    pub webhook_id: String,
    pub url: String,
    pub state: CallbackState,
    pub created: String,
    /// When the next attempt is due (pending callbacks only).
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<CallbackAttemptOut>,
}

impl CallbackRecord {
    pub fn to_resource(&self) -> CallbackOut {
        CallbackOut {
            webhook_id: self.message.webhook_id(),
            url: self.message.callback_url.clone(),
            state: self.state,
            created: format_time(self.message.created_at),
            next_attempt_at: (self.state == CallbackState::Pending).then(|| format_time(self.next_attempt_at)),
            attempts: self
                .attempts
                .iter()
                .map(|a| CallbackAttemptOut {
                    attempted_at: format_time(a.attempted_at),
                    status_code: a.status_code,
                    error: a.error.clone(),
                    latency_ms: a.latency_ms,
                })
                .collect(),
        }
    }
}

/// A new id for a stored record (verification, transaction, callback):
/// UUID version 7, its first 48 bits the creation time in milliseconds and
/// the other 74 random. Ids made close in time sit side by side in the
/// primary-key and foreign-key indexes, so a write touches the few index pages
/// already in memory instead of a random page of each index (with version 4,
/// every insert dirtied a page of its own per index: in SQLite a whole page
/// written per index per commit, in Postgres a full-page image after each
/// checkpoint). No counter: within a millisecond ids are not ordered, and
/// every id keeps 74 unguessable bits. The time they reveal is the
/// record's `created_at`, which the API shows anyway.
pub fn new_record_id() -> Uuid {
    Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext))
}

/// Timestamps as partners see them: RFC 3339, UTC, milliseconds.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusOut {
    /// 210 pending, 200 success, 300 unsuccessful (final).
    pub code: i32,
    pub message: String,
    pub created: String,
    pub updated: String,
}

/// What the user must do next for a pending possession check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NextAction {
    EnterCode { attempts_remaining: i32, expires_at: String },
    Redirect { url: String },
}

/// The transaction resource: every endpoint's answer and every callback's body.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct TransactionOut {
    pub transaction_id: Uuid,
    pub verification_id: Uuid,
    pub product: Product,
    pub provider: ProviderName,
    /// E.164; null after the retention period purged it.
    pub phone: Option<String>,
    pub status: StatusOut,
    pub next_action: Option<NextAction>,
    /// Present once the transaction is final.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<TransactionResult>,
    /// The partner's own JSON, as given at the start.
    pub metadata: Value,
    pub callback_url: Option<String>,
    /// The order handset tried providers in, and why (`docs/routing.md`);
    /// null on transactions from before it was recorded.
    #[serde(default)]
    pub routing: Option<RoutingDecision>,
}

debug_only!(TransactionOut { transaction_id, verification_id, product, provider, result });

impl Transaction {
    /// A new pending transaction, with no deadline, attempts or provider
    /// state yet (callers set what their product needs).
    pub fn pending(
        partner_id: Uuid,
        verification_id: Uuid,
        product: Product,
        provider: ProviderName,
        phone: &str,
        now: DateTime<Utc>,
    ) -> Transaction {
        Transaction {
            id: new_record_id(),
            verification_id,
            partner_id,
            product,
            provider,
            phone: Some(phone.to_owned()),
            country: None,
            number_range: None,
            birth_date: None,
            status: Status::Pending,
            created_at: now,
            updated_at: now,
            expires_at: None,
            attempts_used: 0,
            max_attempts: 0,
            code_hash: None,
            provider_ref: None,
            provider_verification: None,
            next_poll_at: None,
            poll_attempts: 0,
            redirect_url: None,
            redirect_uri: None,
            callback_url: None,
            name: None,
            metadata: Value::Object(Default::default()),
            result: None,
            routing: None,
        }
    }

    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    pub fn attempts_remaining(&self) -> i32 {
        (self.max_attempts - self.attempts_used).max(0)
    }

    pub fn next_action(&self) -> Option<NextAction> {
        if self.is_final() {
            return None;
        }
        match self.product {
            Product::PossessionSms => Some(NextAction::EnterCode {
                attempts_remaining: self.attempts_remaining(),
                expires_at: self.expires_at.map(format_time).unwrap_or_default(),
            }),
            Product::PossessionNetwork => self.redirect_url.clone().map(|url| NextAction::Redirect { url }),
            Product::Identity => None,
        }
    }

    pub fn to_resource(&self) -> TransactionOut {
        TransactionOut {
            transaction_id: self.id,
            verification_id: self.verification_id,
            product: self.product,
            provider: self.provider,
            phone: self.phone.clone(),
            status: StatusOut {
                code: self.status.code(),
                message: self.status.message().to_owned(),
                created: format_time(self.created_at),
                updated: format_time(self.updated_at),
            },
            next_action: self.next_action(),
            result: if self.is_final() { self.result.clone() } else { None },
            metadata: self.metadata.clone(),
            callback_url: self.callback_url.clone(),
            routing: self.routing.clone(),
        }
    }
}

/// `GET /v1/verifications/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerificationOut {
    pub verification_id: Uuid,
    pub created: String,
    /// Some possession transaction of this verification succeeded.
    pub possession_verified: bool,
    /// Some identity transaction of this verification succeeded.
    pub identity_verified: bool,
    pub transactions: Vec<TransactionOut>,
}

impl VerificationOut {
    pub fn new(verification: &Verification, transactions: &[Transaction]) -> Self {
        let succeeded = |possession: bool| {
            transactions.iter().any(|t| t.status == Status::Succeeded && t.product.is_possession() == possession)
        };
        VerificationOut {
            verification_id: verification.id,
            created: format_time(verification.created_at),
            possession_verified: succeeded(true),
            identity_verified: succeeded(false),
            transactions: transactions.iter().map(Transaction::to_resource).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_follow_the_clock_and_stay_random() {
        let first = new_record_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = new_record_id();
        assert_eq!(first.get_version_num(), 7);
        assert!(later > first, "an id made later sorts after: {first} {later}");
        // Ids of one millisecond share the time bits and differ in the rest.
        let (a, b) = (new_record_id(), new_record_id());
        assert_ne!(a.as_bytes()[8..], b.as_bytes()[8..], "the random bits repeat");
        let at = |id: Uuid| id.get_timestamp().map(|t| t.to_unix()).expect("a v7 timestamp");
        let now = Utc::now().timestamp() as u64;
        assert!(at(a).0.abs_diff(now) <= 1, "the id's time is now");
    }

    #[test]
    fn debug_output_holds_no_personal_data_or_secret() {
        let now = Utc::now();
        let mut tx =
            Transaction::pending(Uuid::nil(), Uuid::nil(), Product::Identity, ProviderName::Idme, "+14155550123", now);
        tx.birth_date = Some("1968-05-27".into());
        tx.name = Some(PersonName { first: "Ada".into(), last: "Lovelace".into() });
        tx.metadata = serde_json::json!({"email": "ada@example.org"});
        tx.code_hash = Some("c0dehash".into());
        tx.provider_ref = Some("session-token".into());
        tx.result = Some(TransactionResult::Address {
            address: Address {
                line1: "12 Analytical Row".into(),
                line2: None,
                city: "London".into(),
                region: "LDN".into(),
                postal_code: "N1".into(),
                country: "GB".into(),
            },
        });
        let partner = Partner {
            id: Uuid::nil(),
            name: "acme".into(),
            products: Product::ALL.to_vec(),
            active: true,
            webhook_secret: Secret::from("whsec_c2VjcmV0"),
            created_at: now,
        };
        let outbox = OutboxMessage::of(&tx, "https://partner.example/hook".into(), now);
        let printed = format!("{tx:?} {partner:?} {outbox:?} {:?}", tx.to_resource());
        for private in [
            "4155550123",
            "1968-05-27",
            "Lovelace",
            "ada@example.org",
            "c0dehash",
            "session-token",
            "Analytical",
            "whsec_",
        ] {
            assert!(!printed.contains(private), "{private} printed: {printed}");
        }
        assert!(printed.contains("Identity") && printed.contains("acme"), "what helps debugging stays: {printed}");
    }
}
