//! Liveness, readiness and metrics: for operators, no authentication.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::app::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations", operation_id = "health", responses((status = 200, description = "Alive, empty body")))]
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Readiness: 200 when the database answers, else 503; 503 as well once
/// SIGTERM arrived (while the server drains).
#[utoipa::path(
    get, path = "/ready", tag = "operations", operation_id = "ready",
    responses(
        (status = 200, description = "Database answers"),
        (status = 503, description = "Database unreachable, or draining after SIGTERM")
    )
)]
pub async fn ready(State(state): State<AppState>) -> StatusCode {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match tokio::time::timeout(READY_TIMEOUT, state.gateway.store().ping()).await {
        Ok(Ok(())) => StatusCode::OK,
        Ok(Err(error)) => {
            tracing::warn!(%error, "not ready: database unreachable");
            StatusCode::SERVICE_UNAVAILABLE
        }
        Err(_) => {
            tracing::warn!("not ready: database did not answer in time");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    crate::telemetry::record_scrape_gauges(&state.gateway);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
