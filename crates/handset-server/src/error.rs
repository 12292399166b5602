//! Every rejection as the documented envelope:
//! `{"errors":[{"code":3101,"message":"..."}]}` with the catalogue's status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use handset_core::provider::ProviderError;
use handset_core::{ApiError, ErrorCode, GatewayError};
use serde::Serialize;
use utoipa::ToSchema;

/// The error envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorsOut {
    pub errors: Vec<ErrorOut>,
    /// This request's id (also in the `x-request-id` header): quote it when
    /// reporting the error. Added to every error answer on its way out
    /// (`telemetry::observe`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub request_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorOut {
    pub code: u16,
    pub message: String,
}

/// Marks a refusal given after the request changed stored state, so the
/// idempotency guard keeps it for replay (see `ApiError::recorded`).
#[derive(Debug, Clone, Copy)]
pub struct Recorded;

/// `ApiError` as an HTTP answer (a local type, so axum's trait can be implemented).
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Failure(error)
    }
}

/// The one place a gateway fault becomes an answer, and is logged (once,
/// with its cause chain): provider refusals pass through, unavailability is
/// 503 5001, and everything of handset's own is 500 5000.
impl From<GatewayError> for Failure {
    fn from(error: GatewayError) -> Self {
        Failure(match error {
            GatewayError::Api(refusal) => refusal,
            GatewayError::Provider(ProviderError::Rejected(refusal)) => refusal,
            GatewayError::Provider(ProviderError::Ineligible { reason, .. }) => {
                tracing::info!(%reason, "the provider cannot serve this number");
                ApiError::new(ErrorCode::NoProvider)
            }
            GatewayError::Provider(error @ ProviderError::Unavailable { .. }) => {
                tracing::warn!(error = %causes(&error), "provider unavailable");
                ApiError::new(ErrorCode::ProvidersUnavailable)
            }
            GatewayError::Provider(error @ ProviderError::Misconfigured { .. }) => {
                tracing::error!(error = %causes(&error), "a provider refused handset's credentials or configuration");
                ApiError::new(ErrorCode::Internal)
            }
            fault => {
                tracing::error!(error = %causes(&fault), "internal error");
                ApiError::new(ErrorCode::Internal)
            }
        })
    }
}

/// An error with its causes, `outer: inner: innermost`, for one log line.
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<ErrorCode> for Failure {
    fn from(code: ErrorCode) -> Self {
        Failure(ApiError::new(code))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

pub fn error_response(error: &ApiError) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorsOut {
        errors: vec![ErrorOut { code: error.code.code(), message: error.message.to_string() }],
        request_id: None,
    };
    let mut response = (status, Json(body)).into_response();
    if error.recorded {
        response.extensions_mut().insert(Recorded);
    }
    if let Some(after) = error.retry_after {
        // Whole seconds, rounded up so a client never retries early.
        let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}
