//! `POST /v1/possession` and `POST /v1/possession/{transaction_id}/confirm`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use handset_core::model::Product;
use handset_core::{ApiError, ErrorCode, StartPossession, TransactionOut};

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::{AuthPartner, JsonObject, PathId};
use crate::input::{self, ConfirmIn, PossessionIn};

/// Start a possession check.
#[utoipa::path(
    post, path = "/v1/possession", tag = "possession", operation_id = "startPossession",
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and request within 24 h: the first response again")),
    request_body = PossessionIn,
    responses(
        (status = 201, description = "Check started (or already final)", body = TransactionOut),
        (status = 401, body = ErrorsOut), (status = 403, body = ErrorsOut), (status = 404, body = ErrorsOut),
        (status = 408, description = "3909: the body did not arrive within server.body_read_timeout", body = ErrorsOut),
        (status = 422, body = ErrorsOut),
        (status = 429, description = "5100, 5200: rate limits; 5300: the number's send limit; 5301: sends to this number range are paused (SMS pumping guard). Each with Retry-After", body = ErrorsOut),
        (status = 503, body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn start(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    JsonObject(fields): JsonObject,
) -> Result<(StatusCode, Json<TransactionOut>), Failure> {
    input::known_possession_fields(&fields)?;
    let phone = input::phone(&fields, state.default_region)?;
    let channel = match fields.string("channel", ErrorCode::NotPossessionCheck)? {
        None | Some("sms") => Product::PossessionSms,
        Some("network") => Product::PossessionNetwork,
        Some(_) => {
            return Err(ApiError::with_message(
                ErrorCode::NotPossessionCheck,
                "Transaction is not associated with a valid possession check: channel must be `sms` or `network`",
            )
            .into());
        }
    };
    let common = input::common(&fields, &state.callbacks).await?;
    let request = StartPossession {
        phone,
        channel,
        provider: common.provider,
        verification_id: common.verification_id,
        callback_url: common.callback_url,
        redirect_uri: input::redirect_uri(&fields)?,
        name: input::name(&fields)?,
        metadata: common.metadata,
    };
    let transaction = state.gateway.start_possession(&partner, request).await?;
    Ok((StatusCode::CREATED, Json(transaction.to_resource())))
}

/// Check the user's code (sms) or fetch the operator's result (network).
#[utoipa::path(
    post, path = "/v1/possession/{transaction_id}/confirm", tag = "possession", operation_id = "confirmPossession",
    params(("transaction_id" = uuid::Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Same key and request within 24 h: the first response again")),
    request_body(content = ConfirmIn, description = "`code` for sms; no body or `{}` for network"),
    responses(
        (status = 200, description = "The transaction after the check", body = TransactionOut),
        (status = 401, body = ErrorsOut), (status = 403, body = ErrorsOut), (status = 404, body = ErrorsOut),
        (status = 408, description = "3909: the body did not arrive within server.body_read_timeout", body = ErrorsOut),
        (status = 422, description = "3102 wrong code, 3103 expired, 3104 attempts used up, 3105 not a possession check", body = ErrorsOut),
        (status = 503, description = "5001: the provider that sent the code cannot check it now; retry", body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn confirm(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    PathId(id): PathId,
    body: Result<JsonObject, Failure>,
) -> Result<Json<TransactionOut>, Failure> {
    // Which transaction comes first (404, 403 3200, 422 3105), then the body.
    let loaded = state.gateway.transaction_to_confirm(&partner, id).await?;
    let JsonObject(fields) = body?;
    fields.only(ConfirmIn::FIELDS)?;
    // A code of the wrong JSON type is a malformed code, checked (without
    // counting an attempt) after the transaction's own state.
    let code = fields.string("code", ErrorCode::InvalidCode).unwrap_or(Some(""));
    let transaction = state.gateway.confirm_possession(&partner, loaded, code).await?;
    Ok(Json(transaction.to_resource()))
}
