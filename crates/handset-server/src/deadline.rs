//! The whole-request deadline (`server.request_timeout`), and why hitting it
//! (or the client hanging up) never cuts a state change in half: the rest of
//! the request runs in its own task. A start whose provider already sent the
//! SMS is recorded even if nobody is left to read the answer; a retry with
//! the same `Idempotency-Key` then gets it.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use handset_core::{ApiError, ErrorCode};

use tracing::Instrument;

use crate::app::AppState;
use crate::error::Failure;

const TOO_SLOW: &str = "The request took longer than the server allows; a change it started still completes. \
    Retry with the same Idempotency-Key to get its answer";

pub async fn detach(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // The task carries the request's span, so its logs and provider calls stay under it.
    let work = state.in_flight.spawn(next.run(request).instrument(tracing::Span::current()));
    match tokio::time::timeout(state.request_timeout, work).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            tracing::error!(panicked = error.is_panic(), "a request handler failed");
            Failure::from(ErrorCode::Internal).into_response()
        }
        Err(_) => {
            tracing::warn!(timeout = ?state.request_timeout, "request answered at server.request_timeout");
            Failure(ApiError::with_message(ErrorCode::Internal, TOO_SLOW)).into_response()
        }
    }
}
