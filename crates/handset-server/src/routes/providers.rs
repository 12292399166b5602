//! Endpoints providers (and users coming back from them) call, one pair for
//! every provider: `POST /providers/{name}/webhook` (a provider pushes a
//! result) and `GET /providers/{name}/return` (the operator sends the user's
//! browser back). Each dispatches to the provider's own `Inbound`: its own
//! authentication, checked before any of the body is read, and its own format.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use handset_core::model::ProviderName;
use handset_core::provider::{InboundCall, InboundEvent, InboundKind, Provider};
use handset_core::{ApiError, ErrorCode, GatewayError, Status, Transaction};
use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::{ErrorsOut, Failure};
use crate::extract::read_body;

/// A provider's result webhook (ID.me's: the secret as `?token=` or
/// `Authorization: Bearer`; the body a telecom transaction). Wrong
/// credentials are 401 and change nothing; the body may be 64 KiB at most
/// (413 3902). A result for a transaction that is already final (a
/// duplicate, or one that polling settled first) is accepted and ignored.
#[utoipa::path(
    post, path = "/providers/{name}/webhook", tag = "providers", operation_id = "providerWebhook",
    params(
        ("name" = String, Path, description = "The provider: `idme`"),
        ("token" = Option<String>, Query, description = "ID.me: the webhook secret (or send it as a bearer token)"),
    ),
    request_body(content = Object, description = "The provider's result, in its own format"),
    responses(
        (status = 200, description = "Accepted"),
        (status = 400, body = ErrorsOut), (status = 401, body = ErrorsOut), (status = 404, body = ErrorsOut),
        (status = 408, body = ErrorsOut), (status = 413, body = ErrorsOut),
    )
)]
pub async fn webhook(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, Failure> {
    let (provider, inbound) = inbound_of(&state, &name)?;
    let call = InboundCall { kind: InboundKind::Webhook, query: &query, bearer: bearer(&headers) };
    if !inbound.authenticate(&call) {
        tracing::warn!(provider = %name, "an inbound call with wrong or missing credentials was refused");
        return Err(ErrorCode::CredentialsUnknown.into());
    }
    let body = read_body(body, state.body_read_timeout).await?;
    let event = inbound.parse_inbound(&call, &body).map_err(|why| {
        ApiError::with_message(ErrorCode::MalformedJson, format!("Not a readable {} call: {why}", provider.name()))
    })?;
    let transaction = match event {
        InboundEvent::Result { provider_ref, outcome } => {
            state.gateway.provider_result(provider.name(), &provider_ref, outcome).await?.ok_or_else(|| {
                ApiError::with_message(ErrorCode::NotFound, "No transaction has this provider reference")
            })?
        }
        InboundEvent::Returned { transaction_id, token } => {
            state.gateway.operator_return(provider.name(), transaction_id, token.as_deref()).await?
        }
    };
    Ok(Json(json!({ "transaction_id": transaction.id, "status": transaction.status.code() })))
}

/// Where an operator sends the user's browser back after a network check:
/// the result is fetched (once), then the browser goes on to the partner's
/// `redirect_uri` (303, with `transaction_id` and `status`), or sees a short
/// page when there is none. A person is reading: every refusal is a short
/// page, never JSON; a result that cannot be fetched now sends the user on
/// as `pending` (the job runner keeps asking).
#[utoipa::path(
    get, path = "/providers/{name}/return", tag = "providers", operation_id = "providerReturn",
    params(
        ("name" = String, Path, description = "The provider of the network check: `dqe`"),
        ("transaction_id" = uuid::Uuid, Query, description = "handset's transaction, from the return URL handset gave"),
        ("token" = Option<String>, Query, description = "DQE: the session token DQE adds to the redirect"),
    ),
    responses(
        (status = 303, description = "Back to the partner's redirect_uri with transaction_id and status (success, failed, pending)"),
        (status = 200, description = "No redirect_uri was given: a short result page", content_type = "text/html"),
        (status = 404, description = "An unknown or malformed return", content_type = "text/html"),
    )
)]
pub async fn operator_return(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let unknown = || page(StatusCode::NOT_FOUND, "This link does not name a verification in progress.");
    let Ok((provider, inbound)) = inbound_of(&state, &name) else { return unknown() };
    let call = InboundCall { kind: InboundKind::Return, query: &query, bearer: bearer(&headers) };
    if !inbound.authenticate(&call) {
        return page(StatusCode::UNAUTHORIZED, "This link could not be verified.");
    }
    let Ok(InboundEvent::Returned { transaction_id, token }) = inbound.parse_inbound(&call, &[]) else {
        return unknown();
    };
    match state.gateway.operator_return(provider.name(), transaction_id, token.as_deref()).await {
        Ok(transaction) => back_to_partner(&transaction),
        Err(GatewayError::Api(refusal)) if refusal.code == ErrorCode::NotFound => unknown(),
        Err(error) => {
            // Logged once where faults become answers; the user goes on.
            let _ = Failure::from(error);
            match state.gateway.network_transaction(provider.name(), transaction_id).await {
                Ok(transaction) => back_to_partner(&transaction),
                Err(_) => page(StatusCode::SERVICE_UNAVAILABLE, "The verification could not be completed now."),
            }
        }
    }
}

/// A short page for a person.
fn page(status: StatusCode, text: &str) -> Response {
    (status, Html(format!("<!doctype html><title>handset</title><p>{text}</p>"))).into_response()
}

/// Sends the user's browser on after a network check: to the partner's
/// `redirect_uri` with `transaction_id` and `status` (`success`, `failed` or
/// `pending`), never the phone number or a token; without one, a short page.
pub fn back_to_partner(transaction: &Transaction) -> Response {
    let status = match transaction.status {
        Status::Succeeded => "success",
        Status::Failed => "failed",
        Status::Pending => "pending",
    };
    let Some(mut target) = transaction.redirect_uri.as_deref().and_then(|u| url::Url::parse(u).ok()) else {
        let page =
            format!("<!doctype html><title>handset</title><p>Verification {status}. You can close this window.</p>");
        return Html(page).into_response();
    };
    target.query_pairs_mut().append_pair("transaction_id", &transaction.id.to_string()).append_pair("status", status);
    (StatusCode::SEE_OTHER, [(header::LOCATION, target.to_string())]).into_response()
}

/// The named provider's inbound side; 404 for an unknown provider or one
/// that takes no inbound calls (e.g. ID.me without a webhook secret).
fn inbound_of<'a>(
    state: &'a AppState,
    name: &str,
) -> Result<(&'a Arc<dyn Provider>, &'a dyn handset_core::provider::Inbound), Failure> {
    let not_enabled = || ApiError::with_message(ErrorCode::NotFound, "This provider takes no calls here");
    let provider =
        ProviderName::parse(name).and_then(|name| state.gateway.provider_named(name)).ok_or_else(not_enabled)?;
    let inbound = provider.inbound().ok_or_else(not_enabled)?;
    Ok((provider, inbound))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}
