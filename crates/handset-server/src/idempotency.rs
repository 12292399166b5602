//! `Idempotency-Key` on POST routes: the same key with the same
//! request within 24 hours answers the first response again; with a
//! different request 422 3906; while the first is still being answered 409
//! 3907.
//!
//! The guard runs after authentication: keys belong to the partner (by id),
//! so an unknown or revoked key, or a deactivated partner, gets its 401 and
//! never a replay. Only answers that recorded something are kept: every 2xx,
//! and refusals after a change (a wrong code that used an attempt). A 429, a
//! validation error or a 5xx records nothing, so a retry with the same key
//! runs again.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use handset_core::store::{IdempotencyBegin, IdempotencyClaim};
use handset_core::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::error::{Failure, Recorded};
use crate::extract::{AuthPartner, read_body};

pub const HEADER: &str = "idempotency-key";
/// Set on a response that was answered again from a stored first response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
const MAX_KEY_LEN: usize = 255;
/// How long a key remembers its first response.
pub const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The hash that tells "the same request": method, path and body.
pub fn request_hash(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [method.as_str().as_bytes(), b"\n", path.as_bytes(), b"\n", body] {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Whose keys these are: a partner's, whichever of its API keys sent them.
pub fn scope(partner_id: uuid::Uuid) -> String {
    format!("partner:{partner_id}")
}

fn refuse(code: ErrorCode, message: &'static str) -> Response {
    Failure(ApiError::with_message(code, message)).into_response()
}

/// One or more printable ASCII characters, no space (the OpenAPI document's pattern).
fn visible_ascii(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !request.headers().contains_key(HEADER) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let partner = match AuthPartner::from_request_parts(&mut parts, &state).await {
        Ok(AuthPartner(partner)) => partner,
        Err(refused) => return refused.into_response(),
    };
    let key = match parts.headers.get(HEADER).map(HeaderValue::to_str) {
        Some(Ok(key)) if visible_ascii(key) && key.len() <= MAX_KEY_LEN => key.to_owned(),
        _ => return refuse(ErrorCode::IdempotencyKeyReused, "Idempotency-Key must be 1 to 255 visible characters"),
    };
    let scope = scope(partner.id);
    let body = match read_body(body, state.body_read_timeout).await {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let hash = request_hash(&parts.method, parts.uri.path(), &body);
    let store = state.gateway.store().clone();
    let now = Utc::now();
    let claim = IdempotencyClaim {
        scope: &scope,
        key: &key,
        request_hash: &hash,
        now,
        expired_before: now - chrono::Duration::from_std(KEY_LIFETIME).unwrap_or(chrono::Duration::MAX),
        lock_until: now + chrono::Duration::from_std(state.idempotency_lock).unwrap_or(chrono::Duration::MAX),
    };
    match store.begin_idempotent(claim).await {
        Err(error) => {
            tracing::error!(%error, "idempotency record could not be read");
            Failure::from(ErrorCode::Internal).into_response()
        }
        Ok(IdempotencyBegin::Mismatch) => Failure::from(ErrorCode::IdempotencyKeyReused).into_response(),
        Ok(IdempotencyBegin::InFlight) => Failure::from(ErrorCode::IdempotencyKeyInFlight).into_response(),
        Ok(IdempotencyBegin::Replay { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let mut response = (status, [(CONTENT_TYPE, "application/json")], body).into_response();
            response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            response
        }
        Ok(IdempotencyBegin::Proceed) => {
            let response = next.run(Request::from_parts(parts, Body::from(body))).await;
            let status = response.status();
            let keep = status.is_success() || response.extensions().get::<Recorded>().is_some();
            let (response_parts, response_body) = response.into_parts();
            let bytes = axum::body::to_bytes(response_body, usize::MAX).await.unwrap_or_else(|_| Bytes::new());
            let kept = if keep {
                store.finish_idempotent(&scope, &key, status.as_u16(), &String::from_utf8_lossy(&bytes)).await
            } else {
                store.release_idempotent(&scope, &key).await
            };
            if let Err(error) = kept {
                tracing::error!(%error, "idempotency record could not be written");
            }
            Response::from_parts(response_parts, Body::from(bytes))
        }
    }
}
