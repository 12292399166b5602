//! HTTP routes, one module per resource.

pub mod callbacks;
pub mod docs;
pub mod health;
pub mod identity;
pub mod possession;
pub mod providers;
pub mod sandbox;
pub mod transactions;

use handset_core::{ApiError, ErrorCode};
use uuid::Uuid;

/// A path id that is not a UUID names nothing: 404 4100.
pub fn path_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::new(ErrorCode::NotFound))
}
