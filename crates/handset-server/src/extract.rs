//! Extractors: the authenticated partner, and a JSON object body read with
//! handset's own limits and error codes (never axum's plain-text rejections).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use handset_core::{ApiError, ErrorCode, Partner};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::error::Failure;

/// Request bodies larger than this are refused with 413 3902.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The partner whose `Authorization: Bearer <api_key>` this request carries.
/// Authenticated once per request: the first extraction (the idempotency
/// guard's, or the handler's) keeps the partner in the request's extensions.
#[derive(Clone)]
pub struct AuthPartner(pub Partner);

/// Keys are 256-bit tokens; anything much longer is not one of ours.
const MAX_KEY_LEN: usize = 256;

impl FromRequestParts<AppState> for AuthPartner {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        if let Some(known) = parts.extensions.get::<AuthPartner>() {
            return Ok(known.clone());
        }
        let key = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
            .ok_or(ErrorCode::CredentialsUnknown)?;
        let partner = AuthPartner(state.gateway.authenticate(key).await?);
        tracing::Span::current().record("partner_id", tracing::field::display(partner.0.id));
        parts.extensions.insert(partner.clone());
        Ok(partner)
    }
}

/// The id in a route's path (`/v1/transactions/{id}`). Anything that is not
/// a UUID, including bytes that are not UTF-8, names nothing: 404 4100.
pub struct PathId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| not_found())?;
        Uuid::parse_str(&raw).map(PathId).map_err(|_| not_found())
    }
}

fn not_found() -> Failure {
    Failure::from(ErrorCode::NotFound)
}

/// A request body that is a JSON object. An empty body reads as `{}`; a
/// non-empty one must be `application/json`, at most 64 KiB, and an object.
pub struct JsonObject(pub Fields);

impl FromRequest<AppState> for JsonObject {
    type Rejection = Failure;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Failure> {
        let declared_len =
            request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
            return Err(ErrorCode::BodyTooLarge.into());
        }
        let is_json = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        let body = read_body(request.into_body(), state.body_read_timeout).await?;
        parse_object(&body, is_json).map(|map| JsonObject(Fields(map))).map_err(Failure)
    }
}

/// Reads a request body of at most 64 KiB (413 3902) within `deadline`
/// (408 3909), so a client sending slowly cannot hold the request open.
pub async fn read_body(body: Body, deadline: Duration) -> Result<Bytes, Failure> {
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) if is_length_limit(&error) => Err(ErrorCode::BodyTooLarge.into()),
        Ok(Err(_)) => Err(ApiError::with_message(ErrorCode::MalformedJson, "Request body could not be read").into()),
        Err(_) => Err(ErrorCode::BodyTimeout.into()),
    }
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = current.source();
    }
    false
}

fn parse_object(body: &Bytes, is_json: bool) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    if !is_json {
        return Err(ErrorCode::UnsupportedContentType.into());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::with_message(ErrorCode::MalformedJson, "Request body must be a JSON object")),
        Err(_) => Err(ErrorCode::MalformedJson.into()),
    }
}

/// A JSON object's fields, read one by one, each with the error code the
/// contract gives for it. `null` reads as absent.
pub struct Fields(Map<String, Value>);

impl Fields {
    /// 422 3903 naming the first field not in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(unknown_field(unknown)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// A string field; any other JSON type is refused with `code`.
    pub fn string(&self, key: &str, code: ErrorCode) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::with_message(code, format!("{} (`{key}` must be a string)", code.message()))),
        }
    }

    pub fn required_string(&self, key: &str, code: ErrorCode) -> Result<&str, ApiError> {
        self.string(key, code)?.ok_or_else(|| ApiError::new(code))
    }
}

/// 422 3903 naming the field (`name.middle` for a nested one).
pub fn unknown_field(path: &str) -> ApiError {
    ApiError::with_message(ErrorCode::UnknownField, format!("Unknown request field `{}`", truncate(path, 64)))
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}
