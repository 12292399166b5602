//! `GET /sandbox/operator/{transaction_id}`: the sandbox's stand-in for a
//! mobile operator's page. Visiting it completes a pending sandbox network
//! check, then sends the user to the partner's `redirect_uri`.

use axum::extract::State;
use axum::response::Response;

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::PathId;
use crate::routes::providers::back_to_partner;

/// Complete a sandbox network check (the user's browser lands here).
#[utoipa::path(
    get, path = "/sandbox/operator/{transaction_id}", tag = "sandbox", operation_id = "sandboxOperator",
    params(("transaction_id" = uuid::Uuid, Path)),
    responses(
        (status = 303, description = "Check complete; redirect to the partner's redirect_uri with transaction_id and status"),
        (status = 200, description = "Check complete; no redirect_uri was given", content_type = "text/html"),
        (status = 404, body = ErrorsOut),
    )
)]
pub async fn operator(State(state): State<AppState>, PathId(id): PathId) -> Result<Response, Failure> {
    let transaction = state.gateway.complete_sandbox_operator(id).await?;
    Ok(back_to_partner(&transaction))
}
