//! Reading partners' request fields into domain values, each with the error
//! code the contract gives it. The request structs here document the bodies
//! in OpenAPI; their field lists are what `Fields::only` accepts.

use std::time::Duration;

use handset_core::callback::{CallbackUrl, is_forbidden_ip};
use handset_core::model::{PersonName, ProviderName};
use handset_core::{ApiError, ErrorCode, Phone, Region};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::dns::CallbackGuard;
use crate::extract::{Fields, unknown_field};

/// `metadata` may be any JSON up to this many characters, serialised compactly.
pub const MAX_METADATA_CHARS: usize = 500;

/// How long a callback host's name may take to resolve at request time.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

// The request structs below document the bodies (the handlers read them
// field by field, each rule with its own error code); their constraints
// are the ones those rules enforce, so a body the document calls valid
// passes every shape check and one it calls invalid is refused.

// A phone is written with digits, `+`, spaces, `-`, `.` and parentheses
// (`Phone::parse` checks the number itself); URLs are http(s).

/// `POST /v1/possession`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // documents the body; the handler reads it field by field
pub struct PossessionIn {
    /// E.164 (`+14155550123`) or national digits in the configured default region.
    #[schema(example = "+14155550123", min_length = 1, max_length = 32, pattern = "^[0-9+ ().-]+$")]
    phone: String,
    /// `sms` (default) or `network`.
    #[schema(nullable = false, value_type = Option<Channel>)]
    channel: Option<String>,
    /// Forces one provider.
    #[schema(nullable = false)]
    provider: Option<ProviderName>,
    /// Joins an existing verification; absent: a new one is created.
    #[schema(nullable = false)]
    verification_id: Option<Uuid>,
    /// Where the final result is POSTed, signed (http or https).
    #[schema(nullable = false, format = "uri", max_length = 2048, pattern = "^[hH][tT][tT][pP][sS]?://")]
    callback_url: Option<String>,
    /// network: where the user is sent after the operator step (http or https).
    #[schema(nullable = false, format = "uri", max_length = 2048, pattern = "^[hH][tT][tT][pP][sS]?://")]
    redirect_uri: Option<String>,
    /// Needed by some providers (Veratad).
    #[schema(nullable = false)]
    name: Option<PersonName>,
    /// Any JSON, at most 500 characters serialised; echoed back.
    metadata: Option<Value>,
}

/// A possession check's channel.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum Channel {
    /// A one-time code by SMS.
    Sms,
    /// A silent check through the mobile operator.
    Network,
}

impl PossessionIn {
    pub const FIELDS: &[&str] =
        &["phone", "channel", "provider", "verification_id", "callback_url", "redirect_uri", "name", "metadata"];
}

/// `POST /v1/possession/{transaction_id}/confirm`: `code` for sms; no body or `{}` for network.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ConfirmIn {
    /// The code the user received (4 to 10 digits).
    #[schema(example = "123123", nullable = false, pattern = "^[0-9]{4,10}$")]
    code: Option<String>,
}

impl ConfirmIn {
    pub const FIELDS: &[&str] = &["code"];
}

/// `POST /v1/identity`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct IdentityIn {
    /// E.164 or national digits in the configured default region.
    #[schema(example = "8885551234", min_length = 1, max_length = 32, pattern = "^[0-9+ ().-]+$")]
    phone: String,
    /// `YYYY-MM-DD`; the holder must be 18 or older.
    #[schema(example = "1968-05-27", format = Date)]
    birth_date: String,
    /// Forces one provider.
    #[schema(nullable = false)]
    provider: Option<ProviderName>,
    /// Joins an existing verification; absent: a new one is created.
    #[schema(nullable = false)]
    verification_id: Option<Uuid>,
    /// Where the final result is POSTed, signed (http or https).
    #[schema(nullable = false, format = "uri", max_length = 2048, pattern = "^[hH][tT][tT][pP][sS]?://")]
    callback_url: Option<String>,
    /// Any JSON, at most 500 characters serialised; echoed back.
    metadata: Option<Value>,
}

impl IdentityIn {
    pub const FIELDS: &[&str] = &["phone", "birth_date", "provider", "verification_id", "callback_url", "metadata"];
}

/// The fields every start request shares.
pub struct Common {
    pub provider: Option<ProviderName>,
    pub verification_id: Option<Uuid>,
    pub callback_url: Option<String>,
    pub metadata: Value,
}

pub async fn common(fields: &Fields, callbacks: &CallbackGuard) -> Result<Common, ApiError> {
    Ok(Common {
        provider: provider(fields)?,
        verification_id: verification_id(fields)?,
        callback_url: callback_url(fields, callbacks).await?,
        metadata: metadata(fields)?,
    })
}

pub fn phone(fields: &Fields, region: Region) -> Result<Phone, ApiError> {
    Phone::parse(fields.required_string("phone", ErrorCode::InvalidPhone)?, region)
}

/// A forced provider; one handset does not know cannot serve anything (3908).
fn provider(fields: &Fields) -> Result<Option<ProviderName>, ApiError> {
    let Some(name) = fields.string("provider", ErrorCode::NoProvider)? else {
        return Ok(None);
    };
    ProviderName::parse(name).map(Some).ok_or_else(|| {
        ApiError::with_message(ErrorCode::NoProvider, format!("Unknown provider `{}`", name.escape_default()))
    })
}

/// An id that is not a UUID names no verification: 404 4100.
fn verification_id(fields: &Fields) -> Result<Option<Uuid>, ApiError> {
    match fields.string("verification_id", ErrorCode::NotFound)? {
        None => Ok(None),
        Some(raw) => Uuid::parse_str(raw).map(Some).map_err(|_| ApiError::new(ErrorCode::NotFound)),
    }
}

fn metadata(fields: &Fields) -> Result<Value, ApiError> {
    let Some(value) = fields.get("metadata") else {
        return Ok(Value::Object(Default::default()));
    };
    let chars = serde_json::to_string(value).map(|s| s.chars().count()).unwrap_or(usize::MAX);
    if chars > MAX_METADATA_CHARS {
        return Err(ErrorCode::MetadataTooLong.into());
    }
    Ok(value.clone())
}

/// 422 3903 for the first field `PossessionIn` does not have, at the top
/// level or inside `name` (named `name.middle`): checked before any other rule.
pub fn known_possession_fields(fields: &Fields) -> Result<(), ApiError> {
    fields.only(PossessionIn::FIELDS)?;
    let name = fields.get("name").and_then(Value::as_object);
    match name.and_then(|o| o.keys().find(|k| !PersonName::FIELDS.contains(&k.as_str()))) {
        Some(unknown) => Err(unknown_field(&format!("name.{unknown}"))),
        None => Ok(()),
    }
}

pub fn name(fields: &Fields) -> Result<Option<PersonName>, ApiError> {
    let Some(value) = fields.get("name") else {
        return Ok(None);
    };
    let name: PersonName = serde_json::from_value(value.clone()).map_err(|_| ApiError::new(ErrorCode::InvalidName))?;
    let valid = |s: &str| !s.trim().is_empty() && s.chars().count() <= 100 && !s.chars().any(char::is_control);
    if !valid(&name.first) || !valid(&name.last) {
        return Err(ErrorCode::InvalidName.into());
    }
    Ok(Some(name))
}

/// Where a network check sends the user back: an absolute http(s) URL.
pub fn redirect_uri(fields: &Fields) -> Result<Option<String>, ApiError> {
    let invalid =
        || ApiError::with_message(ErrorCode::InvalidCallbackUrl, "Transaction parameter redirect_uri is invalid");
    let Some(raw) = fields.string("redirect_uri", ErrorCode::InvalidCallbackUrl)? else {
        return Ok(None);
    };
    let url = url::Url::parse(raw).map_err(|_| invalid())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || raw.len() > 2048 {
        return Err(invalid());
    }
    Ok(Some(url.to_string()))
}

/// A callback URL, refused (3100) when it is not http(s) or, unless private
/// networks are allowed, when its host is or resolves to an internal address.
/// A name that does not resolve now is accepted: the delivery checks again.
async fn callback_url(fields: &Fields, callbacks: &CallbackGuard) -> Result<Option<String>, ApiError> {
    let Some(raw) = fields.string("callback_url", ErrorCode::InvalidCallbackUrl)? else {
        return Ok(None);
    };
    let url = CallbackUrl::parse(raw)?;
    if callbacks.allow_private_networks {
        return Ok(Some(url.as_str().to_owned()));
    }
    let internal = || {
        ApiError::with_message(
            ErrorCode::InvalidCallbackUrl,
            "Transaction parameter callback_url is invalid: it points to a local or private network address",
        )
    };
    if url.names_local_host() {
        return Err(internal());
    }
    if let Some(ip) = url.ip() {
        return if is_forbidden_ip(ip) { Err(internal()) } else { Ok(Some(url.as_str().to_owned())) };
    }
    let domain = url.domain().unwrap_or_default().to_owned();
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, callbacks.resolve(&domain)).await;
    if let Ok(Ok(addresses)) = resolved
        && addresses.into_iter().any(is_forbidden_ip)
    {
        return Err(internal());
    }
    Ok(Some(url.as_str().to_owned()))
}
