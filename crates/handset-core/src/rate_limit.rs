//! Rate limits (DESIGN §3): per partner per product per minute (429 5100),
//! per partner per minute (5200), and sends per phone number per hour (5300,
//! against SMS pumping). Fixed windows counted in the database, so every
//! replica on one database shares the counts. A limit of 0 means none.

use chrono::{DateTime, Duration, DurationRound, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::model::Product;
use crate::phone::Phone;
use crate::store::Store;

#[derive(Debug, Clone, Copy, Default)]
pub struct RateLimits {
    pub per_product_per_minute: u32,
    pub per_partner_per_minute: u32,
    pub per_phone_per_hour: u32,
}

/// What is being counted.
pub enum Scope<'a> {
    Partner(Uuid),
    Product(Uuid, Product),
    /// The number is hashed: the counter table keeps no phone numbers.
    Phone(&'a Phone),
}

impl Scope<'_> {
    fn key(&self) -> String {
        match self {
            Scope::Partner(partner) => format!("partner:{partner}"),
            Scope::Product(partner, product) => format!("product:{partner}:{product}"),
            Scope::Phone(phone) => format!("phone:{}", hex::encode(Sha256::digest(phone.e164().as_bytes()))),
        }
    }

    fn window(&self) -> Duration {
        match self {
            Scope::Phone(_) => Duration::hours(1),
            _ => Duration::minutes(1),
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            Scope::Partner(_) => ErrorCode::AccountRateLimited,
            Scope::Product(..) => ErrorCode::ProductRateLimited,
            Scope::Phone(_) => ErrorCode::PhoneRateLimited,
        }
    }
}

impl RateLimits {
    fn limit(&self, scope: &Scope<'_>) -> u32 {
        match scope {
            Scope::Partner(_) => self.per_partner_per_minute,
            Scope::Product(..) => self.per_product_per_minute,
            Scope::Phone(_) => self.per_phone_per_hour,
        }
    }

    /// Counts one hit; past the limit, the 429 to answer with `Retry-After`
    /// set to the end of the window.
    pub async fn hit(&self, store: &dyn Store, scope: Scope<'_>, now: DateTime<Utc>) -> Result<(), ApiError> {
        let limit = self.limit(&scope);
        if limit == 0 {
            return Ok(());
        }
        let window = scope.window();
        let start = now.duration_trunc(window).unwrap_or(now);
        let hits = store.hit_rate_counter(&scope.key(), start).await.map_err(|error| {
            tracing::error!(%error, "rate counter unavailable");
            ApiError::new(ErrorCode::Internal)
        })?;
        if hits <= i64::from(limit) {
            return Ok(());
        }
        let wait = (start + window - now).to_std().unwrap_or_default();
        Err(ApiError::new(scope.code()).retry_after(wait))
    }
}
