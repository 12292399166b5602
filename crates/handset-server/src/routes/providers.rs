//! Endpoints providers call: `POST /providers/idme/webhook`, where ID.me
//! pushes telecom results (the body of `GET /api/v2/telecom/:id`).

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use handset_core::model::ProviderName;
use handset_core::secret::constant_time_eq;
use handset_core::{ApiError, ErrorCode};
use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::read_body;

/// ID.me's result webhook. Authenticated by the configured shared secret,
/// as `?token=` or `Authorization: Bearer`, before any of the body is read;
/// anything else is 401 and changes nothing. The body may be 64 KiB at most
/// (413 3902). A result for a transaction that is already final (a duplicate or
/// a late arrival after polling) is accepted and ignored.
#[utoipa::path(
    post, path = "/providers/idme/webhook", tag = "providers",
    params(("token" = Option<String>, Query, description = "The webhook secret (or send it as a bearer token)")),
    request_body(content = Object, description = "An ID.me telecom transaction"),
    responses(
        (status = 200, description = "Accepted"),
        (status = 400, body = ErrorsOut), (status = 401, body = ErrorsOut), (status = 404, body = ErrorsOut),
        (status = 408, body = ErrorsOut), (status = 413, body = ErrorsOut),
    )
)]
pub async fn idme_webhook(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, Failure> {
    let Some(secret) = state.idme_webhook_secret.as_deref() else {
        return Err(ApiError::with_message(ErrorCode::NotFound, "The ID.me webhook is not enabled").into());
    };
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let presented = query.get("token").map(String::as_str).or(bearer).unwrap_or_default();
    if !constant_time_eq(presented, secret) {
        tracing::warn!("ID.me webhook call with a wrong or missing secret refused");
        return Err(ErrorCode::CredentialsUnknown.into());
    }
    let body = read_body(body, state.body_read_timeout).await?;
    let (reference, outcome) = handset_idme::webhook_result(&body)
        .map_err(|why| ApiError::with_message(ErrorCode::MalformedJson, format!("Not an ID.me transaction: {why}")))?;
    match state.gateway.provider_result(ProviderName::Idme, &reference, outcome).await? {
        Some(tx) => Ok(Json(json!({ "transaction_id": tx.id, "status": tx.status.code() }))),
        None => Err(ApiError::with_message(ErrorCode::NotFound, "No transaction has this ID.me transaction_id").into()),
    }
}
