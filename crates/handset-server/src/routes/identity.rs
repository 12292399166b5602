//! `POST /v1/identity`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use handset_core::{BirthDate, ErrorCode, StartIdentity, TransactionOut};

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::{AuthPartner, JsonObject};
use crate::input::{self, IdentityIn};

/// Match a phone number and birth date against carrier records.
#[utoipa::path(
    post, path = "/v1/identity", tag = "identity", operation_id = "startIdentity",
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and request within 24 h: the first response again")),
    request_body = IdentityIn,
    responses(
        (status = 201, description = "Match started (or already final)", body = TransactionOut),
        (status = 401, body = ErrorsOut), (status = 403, body = ErrorsOut), (status = 404, body = ErrorsOut),
        (status = 408, description = "3909: the body did not arrive within server.body_read_timeout", body = ErrorsOut),
        (status = 422, description = "3101 phone, 3107 minor, 3108 birth_date format, ...", body = ErrorsOut),
        (status = 429, body = ErrorsOut), (status = 503, body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn start(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    JsonObject(fields): JsonObject,
) -> Result<(StatusCode, Json<TransactionOut>), Failure> {
    fields.only(IdentityIn::FIELDS)?;
    let phone = input::phone(&fields, state.default_region)?;
    let today = chrono::Utc::now().date_naive();
    let birth_date = BirthDate::parse(fields.required_string("birth_date", ErrorCode::InvalidBirthDate)?, today)?;
    let common = input::common(&fields, &state.callbacks).await?;
    let request = StartIdentity {
        phone,
        birth_date,
        provider: common.provider,
        verification_id: common.verification_id,
        callback_url: common.callback_url,
        metadata: common.metadata,
    };
    let transaction = state.gateway.start_identity(&partner, request).await?;
    Ok((StatusCode::CREATED, Json(transaction.to_resource())))
}
