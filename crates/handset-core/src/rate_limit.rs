//! Rate limits: per partner per product per minute (429 5100),
//! per partner per minute (5200), and sends per phone number per hour (5300,
//! against SMS pumping). Fixed windows, shared by every replica through the
//! database (`RateLimiter` says how exactly). A limit of 0 means none.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
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
    /// The database counter's key.
    fn key(&self) -> String {
        match self {
            Scope::Partner(partner) => format!("partner:{partner}"),
            Scope::Product(partner, product) => format!("product:{partner}:{product}"),
            Scope::Phone(phone) => format!("phone:{}", hex::encode(Sha256::digest(phone.e164().as_bytes()))),
        }
    }

    /// The key of a window counted in memory (every scope but the phone's).
    fn window_key(&self) -> Option<WindowKey> {
        match self {
            Scope::Partner(partner) => Some(WindowKey::Partner(*partner)),
            Scope::Product(partner, product) => Some(WindowKey::Product(*partner, *product)),
            Scope::Phone(_) => None,
        }
    }

    fn window(&self) -> chrono::Duration {
        match self {
            Scope::Phone(_) => chrono::Duration::hours(1),
            _ => chrono::Duration::minutes(1),
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

    /// The 429 for `scope`, with `Retry-After` set to the end of its window.
    fn refusal(scope: &Scope<'_>, start: DateTime<Utc>, now: DateTime<Utc>) -> ApiError {
        let wait = (start + scope.window() - now).to_std().unwrap_or_default();
        ApiError::new(scope.code()).retry_after(wait)
    }
}

/// A partner or product window counted in memory: a plain value, so a hit
/// builds no string (the database's key is written only to reconcile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WindowKey {
    Partner(Uuid),
    Product(Uuid, Product),
}

impl WindowKey {
    fn scope(self) -> Scope<'static> {
        match self {
            WindowKey::Partner(partner) => Scope::Partner(partner),
            WindowKey::Product(partner, product) => Scope::Product(partner, product),
        }
    }
}

/// Counted hits of one partner or product window in this process.
#[derive(Debug)]
struct Local {
    window_start: DateTime<Utc>,
    /// The database's count at the last reconciliation (every replica's hits).
    global: i64,
    /// This process's hits since then.
    unsynced: i64,
    /// Hits on their way to the database (a reconciliation not yet
    /// answered): still counted, or concurrent requests would be admitted
    /// in their place.
    reconciling: i64,
    synced_at: Option<Instant>,
}

impl Local {
    fn new(window_start: DateTime<Utc>) -> Self {
        Local { window_start, global: 0, unsynced: 0, reconciling: 0, synced_at: None }
    }
}

/// Reconcile a window with the database after this many local hits, or a
/// hundredth of its limit if more (a reconciliation is a write, on a row
/// every replica updates; with high limits, every 20 hits was a tenth of a
/// busy partner's commits)...
const SYNC_EVERY: i64 = 20;
const SYNC_SHARE_OF_LIMIT: i64 = 100;
/// ...or this long after the last reconciliation, whichever comes first.
const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// The limits as enforced. Per-partner and per-product windows are counted
/// in this process's memory and reconciled with the database's counter every
/// `SYNC_EVERY` hits (or 1% of the limit, if more) or `SYNC_INTERVAL`, so a
/// partner's requests no longer all update one database row (which
/// serialised them). One process is exact; with several, each may admit what
/// the others admitted since its last reconciliation: at most about
/// (replicas - 1) x (the larger of 20 hits and 1% of the limit, or 200 ms of
/// a replica's traffic) over the limit. The per-phone send limit guards money
/// and stays exact: every send is counted in the database first.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    local: Mutex<HashMap<WindowKey, Local>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        RateLimiter { limits, local: Mutex::new(HashMap::new()) }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Counts one hit; past the limit, the 429 to answer with `Retry-After`
    /// set to the end of the window (a refused hit is not counted).
    pub async fn hit(&self, store: &dyn Store, scope: Scope<'_>, now: DateTime<Utc>) -> Result<(), ApiError> {
        let limit = i64::from(self.limits.limit(&scope));
        if limit == 0 {
            return Ok(());
        }
        let start = now.duration_trunc(scope.window()).unwrap_or(now);
        let Some(key) = scope.window_key() else {
            let taken = store.take_rate_hit(&scope.key(), start, limit).await.map_err(|error| {
                tracing::error!(%error, "rate counter unavailable");
                ApiError::new(ErrorCode::Internal)
            })?;
            return if taken { Ok(()) } else { Err(RateLimits::refusal(&scope, start, now)) };
        };
        let due = {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            let entry = local.entry(key).or_insert_with(|| Local::new(start));
            if entry.window_start != start {
                *entry = Local::new(start);
            }
            if entry.global + entry.reconciling + entry.unsynced + 1 > limit {
                return Err(RateLimits::refusal(&scope, start, now));
            }
            entry.unsynced += 1;
            let every = SYNC_EVERY.max(limit / SYNC_SHARE_OF_LIMIT);
            let due = entry.unsynced >= every || entry.synced_at.is_none_or(|at| at.elapsed() >= SYNC_INTERVAL);
            due.then(|| {
                entry.synced_at = Some(Instant::now());
                let hits = std::mem::take(&mut entry.unsynced);
                entry.reconciling += hits;
                hits
            })
        };
        if let Some(hits) = due {
            self.reconcile(store, key, start, hits).await;
        }
        Ok(())
    }

    /// Adds this process's `hits` to the database's window and learns every
    /// replica's total; on a database error the hits wait for the next try.
    async fn reconcile(&self, store: &dyn Store, key: WindowKey, start: DateTime<Utc>, hits: i64) {
        let total = store.add_rate_hits(&key.scope().key(), start, hits).await;
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = local.get_mut(&key).filter(|e| e.window_start == start) else { return };
        entry.reconciling -= hits;
        match total {
            // The total includes these hits and every replica's reconciled ones.
            Ok(total) => entry.global = entry.global.max(total),
            Err(error) => {
                tracing::warn!(%error, "rate counters could not be reconciled; counting on locally");
                entry.unsynced += hits;
            }
        }
    }

    /// Forgets windows that have ended (keeps memory bounded by active partners).
    pub fn forget_before(&self, before: DateTime<Utc>) {
        self.local.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, entry| entry.window_start >= before);
    }
}
