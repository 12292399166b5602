//! `GET /sandbox/operator/{transaction_id}`: the sandbox's stand-in for a
//! mobile operator's page. Visiting it completes a pending sandbox network
//! check, then sends the user to the partner's `redirect_uri`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use handset_core::Status;

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::PathId;

/// Complete a sandbox network check (the user's browser lands here).
#[utoipa::path(
    get, path = "/sandbox/operator/{transaction_id}", tag = "sandbox",
    params(("transaction_id" = uuid::Uuid, Path)),
    responses(
        (status = 303, description = "Check complete; redirect to the partner's redirect_uri with transaction_id and status"),
        (status = 200, description = "Check complete; no redirect_uri was given", content_type = "text/html"),
        (status = 404, body = ErrorsOut),
    )
)]
pub async fn operator(State(state): State<AppState>, PathId(id): PathId) -> Result<Response, Failure> {
    let transaction = state.gateway.complete_sandbox_operator(id).await?;
    let status = if transaction.status == Status::Succeeded { "success" } else { "failure" };
    let Some(redirect_uri) = transaction.redirect_uri.as_deref().and_then(|u| url::Url::parse(u).ok()) else {
        let page = format!(
            "<!doctype html><title>handset sandbox</title><p>Verification {status}. You can close this window.</p>"
        );
        return Ok(Html(page).into_response());
    };
    let mut target = redirect_uri;
    target.query_pairs_mut().append_pair("transaction_id", &transaction.id.to_string()).append_pair("status", status);
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, target.to_string())]).into_response())
}
