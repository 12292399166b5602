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

use crate::adaptive::Scoreboard;
use crate::birth_date::BirthDate;
use crate::breaker::{BreakerSettings, CircuitBreaker};
use crate::error::{ApiError, ErrorCode};
use crate::model::{
    CallbackOut, CallbackRecord, CallbackState, OutboxMessage, Partner, PersonName, Product, ProviderName, ResultError,
    Status, Transaction, TransactionResult, Verification, VerificationOut,
};
use crate::partner_cache::PartnerCache;
use crate::phone::Phone;
use crate::provider::{CodeCheck, Outcome, Provider, ProviderError, Renewed, StartRequest, Started};
use crate::pumping::{NewPause, PumpingGuard, RangeTraffic};
use crate::rate_limit::{RateLimiter, RateLimits, Scope};
use crate::recent::RecentStarts;
use crate::routing::{Routing, RoutingDecision, RoutingReason, Strategy};
use crate::secret::{Secret, api_key_hash, code_hash, constant_time_eq};
use crate::store::{Finalization, LocalCodeAttempt, Store, StoreError};

pub use confirm::ToConfirm;
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
    /// How long a partner read by its key is reused (`security.partner_cache_ttl`).
    pub partner_cache_ttl: std::time::Duration,
    /// The SMS pumping guard (`fraud.*`); its ranges are recorded on every
    /// SMS transaction, and judged only when `pumping_guard_enabled`.
    pub pumping_guard: crate::pumping::PumpingGuard,
    pub pumping_guard_enabled: bool,
    /// `[routing.adaptive]`, used by rules with `strategy = "adaptive"`.
    pub adaptive: crate::adaptive::AdaptiveSettings,
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
    /// Present when some rule is adaptive.
    scoreboard: Option<Arc<Scoreboard>>,
    settings: GatewaySettings,
    limiter: RateLimiter,
    partners: PartnerCache,
    /// SMS checks started here, for their first confirm (`crate::recent`).
    recent: RecentStarts,
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
            scoreboard: routing.any_adaptive().then(|| Arc::new(Scoreboard::new(settings.adaptive.clone()))),
            routing,
            limiter: RateLimiter::new(settings.rate_limits),
            partners: PartnerCache::new(settings.partner_cache_ttl),
            recent: RecentStarts::new(crate::recent::RECENT_STARTS),
            settings,
            clock: Arc::new(SystemClock),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Each configured provider's circuit breaker: 0 closed, 1 open, 2 half-open.
    pub fn breaker_states(&self) -> Vec<(ProviderName, u8)> {
        let now = Instant::now();
        let mut states: Vec<_> = self.breakers.iter().map(|(name, b)| (*name, b.state_number(now))).collect();
        states.sort_by_key(|(name, _)| name.as_str());
        states
    }

    /// Follows partner changes for the cache until the store closes (see
    /// `crate::partner_cache`); returns at once when the cache is off.
    pub async fn follow_partner_changes(&self) {
        if self.partners.enabled() {
            self.store.follow_partner_changes(&self.partners).await;
        }
    }

    /// A configured provider, by name.
    pub fn provider_named(&self, name: ProviderName) -> Option<&Arc<dyn Provider>> {
        self.providers.get(&name)
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    pub(super) fn code_hash(&self, transaction_id: Uuid, code: &str) -> String {
        code_hash(self.settings.code_pepper.expose().as_bytes(), transaction_id, code)
    }

    pub(super) async fn limit(&self, scope: Scope<'_>) -> Result<(), ApiError> {
        self.limiter.hit(self.store.as_ref(), scope, self.now()).await
    }

    /// Moves `tx` to a final state with its callback; false when another
    /// request finalized it first.
    pub(super) async fn finish(
        &self,
        tx: &mut Transaction,
        status: Status,
        result: TransactionResult,
    ) -> Result<bool, GatewayError> {
        tx.status = status;
        tx.result = Some(result);
        tx.updated_at = self.now();
        let outbox = outbox_for(tx);
        let ended = self.store.finalize(Finalization { transaction: tx, outbox: outbox.as_ref() }).await?;
        if ended {
            crate::observe::finished(tx);
        }
        Ok(ended)
    }

    pub(super) async fn owned_transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, GatewayError> {
        let tx = self.store.transaction(id).await?.ok_or_else(not_found)?;
        if tx.partner_id != partner.id {
            return Err(ApiError::new(ErrorCode::TransactionNotOwned).into());
        }
        Ok(tx)
    }

    pub(super) fn provider(&self, name: ProviderName) -> Result<&Arc<dyn Provider>, GatewayError> {
        self.providers
            .get(&name)
            .ok_or_else(|| GatewayError::Internal(format!("provider {name} of a stored transaction is not configured")))
    }

    /// The same gateway reading the time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn now(&self) -> DateTime<Utc> {
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

pub(super) fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

/// How a gateway call ends when it does not answer: a refusal for the
/// partner, or a fault whose cause is kept. The HTTP edge maps each to its
/// answer and logs the faults, once (`handset-server`'s `error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// A rule of handset's own was broken (a stored transaction names a
    /// provider that is not configured, a write that never settles).
    #[error("internal: {0}")]
    Internal(String),
}

impl From<ErrorCode> for GatewayError {
    fn from(code: ErrorCode) -> Self {
        GatewayError::Api(ApiError::new(code))
    }
}
