//! `GET /v1/transactions/{id}/callbacks` and `POST .../callbacks/retry`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use handset_core::model::CallbackOut;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::{AuthPartner, JsonObject, PathId};

#[derive(Debug, Serialize, ToSchema)]
pub struct CallbacksOut {
    pub callbacks: Vec<CallbackOut>,
}

/// Every callback of a transaction and each of its delivery attempts.
#[utoipa::path(
    get, path = "/v1/transactions/{transaction_id}/callbacks", tag = "callbacks", operation_id = "listCallbacks",
    params(("transaction_id" = uuid::Uuid, Path)),
    responses(
        (status = 200, body = CallbacksOut),
        (status = 401, body = ErrorsOut), (status = 403, body = ErrorsOut), (status = 404, body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    PathId(id): PathId,
) -> Result<Json<CallbacksOut>, Failure> {
    let callbacks = state.gateway.callbacks(&partner, id).await?;
    Ok(Json(CallbacksOut { callbacks }))
}

/// Queue a new delivery of the transaction's current state (new `webhook-id`).
#[utoipa::path(
    post, path = "/v1/transactions/{transaction_id}/callbacks/retry", tag = "callbacks", operation_id = "retryCallback",
    params(("transaction_id" = uuid::Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Same key and request within 24 h: the first response again")),
    responses(
        (status = 202, description = "Queued", body = CallbackOut),
        (status = 401, body = ErrorsOut), (status = 403, body = ErrorsOut), (status = 404, body = ErrorsOut),
        (status = 422, description = "3100: the transaction has no callback_url", body = ErrorsOut),
        (status = 429, description = "5200: 10 deliveries of this transaction are already pending (see Retry-After)", body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    PathId(id): PathId,
    JsonObject(fields): JsonObject,
) -> Result<(StatusCode, Json<CallbackOut>), Failure> {
    fields.only(&[])?;
    let callback = state.gateway.retry_callback(&partner, id).await?;
    Ok((StatusCode::ACCEPTED, Json(callback)))
}
