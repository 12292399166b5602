//! `GET /v1/transactions/{transaction_id}` and `GET /v1/verifications/{verification_id}`.

use axum::Json;
use axum::extract::State;
use handset_core::{TransactionOut, VerificationOut};

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::{AuthPartner, PathId};

/// Read a transaction.
#[utoipa::path(
    get, path = "/v1/transactions/{transaction_id}", tag = "transactions", operation_id = "getTransaction",
    params(("transaction_id" = uuid::Uuid, Path)),
    responses(
        (status = 200, body = TransactionOut),
        (status = 401, body = ErrorsOut), (status = 403, description = "3200: another partner's", body = ErrorsOut),
        (status = 404, body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn get_transaction(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    PathId(id): PathId,
) -> Result<Json<TransactionOut>, Failure> {
    let transaction = state.gateway.transaction(&partner, id).await?;
    Ok(Json(transaction.to_resource()))
}

/// Read a verification and all its transactions.
#[utoipa::path(
    get, path = "/v1/verifications/{verification_id}", tag = "transactions", operation_id = "getVerification",
    params(("verification_id" = uuid::Uuid, Path)),
    responses(
        (status = 200, body = VerificationOut),
        (status = 401, body = ErrorsOut), (status = 403, description = "3300: another partner's", body = ErrorsOut),
        (status = 404, body = ErrorsOut),
    ),
    security(("bearer" = []))
)]
pub async fn get_verification(
    State(state): State<AppState>,
    AuthPartner(partner): AuthPartner,
    PathId(id): PathId,
) -> Result<Json<VerificationOut>, Failure> {
    Ok(Json(state.gateway.verification(&partner, id).await?))
}
