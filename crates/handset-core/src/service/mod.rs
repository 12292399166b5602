//! The gateway service: every decision about partners' requests. Handlers call
//! it with parsed input; it calls providers and the store through their traits.
//! One file per flow, each its own `impl Gateway` block: `start`, `confirm`,
//! `results` (answers that arrive later), `jobs` (the runner's steps) and
//! `reads` (authentication, reads, callback administration).

mod confirm;
mod jobs;
mod reads;
mod results;
mod start;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::birth_date::BirthDate;
use crate::breaker::{BreakerSettings, CircuitBreaker};
use crate::error::{ApiError, ErrorCode};
use crate::model::{
    CallbackOut, CallbackRecord, CallbackState, OutboxMessage, Partner, PersonName, Product, ProviderName, ResultError,
    Status, Transaction, TransactionResult, Verification, VerificationOut,
};
use crate::phone::Phone;
use crate::provider::{CodeCheck, Outcome, Provider, ProviderError, StartRequest, Started};
use crate::rate_limit::{RateLimits, Scope};
use crate::routing::Routing;
use crate::secret::{Secret, api_key_hash, code_hash, constant_time_eq};
use crate::store::{Finalization, Store};

pub use start::{StartIdentity, StartPossession};
// Shared by the flows' files (they `use super::*`).
use results::{checked, deadline_error, possession_result};

/// Service settings taken from config.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub code_ttl: Duration,
    pub max_attempts: i32,
    /// handset's absolute base URL, for links it hands out.
    pub public_url: String,
    /// A partner that must never authenticate, whatever key it holds (the
    /// development partner in production).
    pub refused_partner: Option<Uuid>,
    /// Keys the hashes of codes handset checks itself (`security.code_pepper`).
    pub code_pepper: Secret,
    /// Callback deliveries a transaction may have pending before a partner's
    /// retry request is refused (429).
    pub max_pending_callbacks: i64,
    /// How long an identity match may wait for an asynchronous result.
    pub identity_ttl: Duration,
    /// Polling a provider for a pending result: first delay, doubled up to the max.
    pub poll_min: std::time::Duration,
    pub poll_max: std::time::Duration,
    pub breaker: BreakerSettings,
    pub rate_limits: RateLimits,
}

/// Where the gateway reads the time: rules compare against one `now`, and
/// tests can set it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

pub struct Gateway {
    store: Arc<dyn Store>,
    providers: HashMap<ProviderName, Arc<dyn Provider>>,
    breakers: HashMap<ProviderName, CircuitBreaker>,
    routing: Routing,
    settings: GatewaySettings,
    clock: Arc<dyn Clock>,
}

impl Gateway {
    pub fn new(
        store: Arc<dyn Store>,
        providers: Vec<Arc<dyn Provider>>,
        routing: Routing,
        settings: GatewaySettings,
    ) -> Self {
        Gateway {
            store,
            breakers: providers.iter().map(|p| (p.name(), CircuitBreaker::new(settings.breaker))).collect(),
            providers: providers.into_iter().map(|p| (p.name(), p)).collect(),
            routing,
            settings,
            clock: Arc::new(SystemClock),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    pub(super) fn code_hash(&self, transaction_id: Uuid, code: &str) -> String {
        code_hash(self.settings.code_pepper.expose().as_bytes(), transaction_id, code)
    }

    pub(super) async fn limit(&self, scope: Scope<'_>) -> Result<(), ApiError> {
        self.settings.rate_limits.hit(self.store.as_ref(), scope, self.now()).await
    }

    /// Moves `tx` to a final state with its callback; false when another
    /// request finalized it first.
    pub(super) async fn finish(
        &self,
        tx: &mut Transaction,
        status: Status,
        result: TransactionResult,
    ) -> Result<bool, ApiError> {
        tx.status = status;
        tx.result = Some(result);
        tx.updated_at = self.now();
        let outbox = outbox_for(tx);
        self.store.finalize(Finalization { transaction: tx, outbox: outbox.as_ref() }).await.map_err(internal)
    }

    pub(super) async fn owned_transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, ApiError> {
        let tx = self.store.transaction(id).await.map_err(internal)?.ok_or_else(not_found)?;
        if tx.partner_id != partner.id {
            return Err(ApiError::new(ErrorCode::TransactionNotOwned));
        }
        Ok(tx)
    }

    pub(super) fn provider(&self, name: ProviderName) -> Result<&Arc<dyn Provider>, ApiError> {
        self.providers
            .get(&name)
            .ok_or_else(|| internal(format!("provider {name} of a stored transaction is not configured")))
    }

    /// The same gateway reading the time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// The callback a final transaction owes its partner, if it has a callback URL.
pub(super) fn outbox_for(tx: &Transaction) -> Option<OutboxMessage> {
    let callback_url = tx.callback_url.clone()?;
    tx.is_final().then(|| OutboxMessage::of(tx, callback_url, tx.updated_at))
}

pub(super) fn chrono_delay(delay: std::time::Duration) -> Duration {
    Duration::from_std(delay).unwrap_or(Duration::MAX)
}

pub(super) fn provider_failure(error: ProviderError) -> ApiError {
    match error {
        ProviderError::Rejected(api_error) => api_error,
        ProviderError::Unavailable(why) => {
            tracing::warn!(%why, "provider unavailable");
            ApiError::new(ErrorCode::ProvidersUnavailable)
        }
        ProviderError::Misconfigured(why) => {
            tracing::error!(%why, "a provider refused handset's credentials: check the provider configuration");
            ApiError::new(ErrorCode::Internal)
        }
        ProviderError::Failed(why) => internal(why),
    }
}

pub(super) fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

/// Logs the cause for operators; the partner sees only 500 5000.
pub(super) fn internal(cause: impl std::fmt::Display) -> ApiError {
    tracing::error!(%cause, "internal error");
    ApiError::new(ErrorCode::Internal)
}
