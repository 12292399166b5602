//! Fault injection shared by every simulated provider: fixed latency plus
//! random jitter, a rate of 500 answers, and hanging (never answering).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every answer.
    pub latency_ms: u64,
    /// Up to this much more, at random.
    pub jitter_ms: u64,
    /// Share of requests (0.0 to 1.0) answered with `error_status` and ID.me's 5000 envelope.
    pub error_rate: f64,
    /// The status of those answers; unset: 503.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
    /// Never answer (the caller's timeout decides).
    pub hang: bool,
}

/// The faults in force and how many provider requests arrived.
#[derive(Debug, Default)]
pub struct FaultState {
    pub faults: RwLock<Faults>,
    pub requests: AtomicU64,
}

pub type SharedFaults = Arc<FaultState>;

/// Middleware applying the current faults before the provider handles a request.
pub async fn inject(State(state): State<SharedFaults>, request: Request, next: Next) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let faults = state.faults.read().unwrap_or_else(|e| e.into_inner()).clone();
    if faults.hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let jitter = if faults.jitter_ms > 0 { rand::rng().random_range(0..=faults.jitter_ms) } else { 0 };
    if faults.latency_ms + jitter > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms + jitter)).await;
    }
    if faults.error_rate > 0.0 && rand::rng().random_bool(faults.error_rate.clamp(0.0, 1.0)) {
        let body = serde_json::json!({"errors": [{"code": 5000, "message": "An error occurred for this account"}]});
        let status =
            faults.error_status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return (status, Json(body)).into_response();
    }
    next.run(request).await
}
