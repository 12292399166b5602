//! The background job runner: delivers due callbacks, polls providers for
//! pending results, expires pending transactions past their deadline, and
//! purges personal data past the retention period. Work is claimed from the database with leases, so any
//! number of `handset serve` processes on one database share it and each
//! delivery attempt is made by one of them. Each round reports what it did
//! (`Tick`) in the debug log.

pub mod delivery;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use handset_core::Gateway;
use handset_core::model::{CallbackAttempt, ClaimedCallback};
use handset_core::store::{AfterAttempt, Claim, Store};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use self::delivery::Delivery;

#[derive(Debug, Clone)]
pub struct RunnerSettings {
    pub poll_interval: Duration,
    /// Delay before each retry; its length is the number of retries.
    pub retry_schedule: Vec<Duration>,
    /// How long a claimed callback stays this runner's before others may take it.
    pub lease: Duration,
    /// Callbacks claimed (and delivered concurrently) per round.
    pub batch_size: i64,
    /// Personal data older than this is purged; `None` keeps it.
    pub retention: Option<Duration>,
    /// Rate and range counters whose window began longer ago are purged.
    pub counter_lifetime: Duration,
    /// An hour is rolled up for the funnel this long after it ended: by
    /// then every start created in it has been recorded.
    pub funnel_hour_settles: Duration,
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tick {
    pub delivered: usize,
    pub retrying: usize,
    pub failed: usize,
    /// Attempts whose lease another runner took over meanwhile (not recorded).
    pub lease_lost: usize,
    pub expired: usize,
    /// Pending transactions that polling their provider made final.
    pub polled: usize,
    pub purged: u64,
    /// Hours the funnel's rollup counted.
    pub rolled_up: u32,
}

pub struct Runner {
    gateway: Arc<Gateway>,
    store: Arc<dyn Store>,
    delivery: Arc<Delivery>,
    settings: RunnerSettings,
    owner: String,
    /// When the funnel rollup was last tried.
    last_rollup: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The runner's independent loops.
#[derive(Debug, Clone, Copy)]
enum Job {
    Deliver,
    Poll,
    Upkeep,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Deliver => "deliver",
            Job::Poll => "poll",
            Job::Upkeep => "upkeep",
        }
    }
}

/// Runs the loop `start` makes until it returns; a loop that panics is
/// logged, counted (`job_runner_restarts_total`) and started again after
/// `pause`, so a bug in one round cannot silently end callback delivery.
/// Returns the number of restarts.
pub(crate) async fn keep_running<F, Fut>(
    name: &'static str,
    pause: Duration,
    shutdown: watch::Receiver<bool>,
    start: F,
) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut restarts = 0;
    loop {
        match tokio::spawn(start()).await {
            Ok(()) => return restarts,
            Err(error) if error.is_panic() && !*shutdown.borrow() => {
                tracing::error!(job = name, "a background loop panicked; starting it again");
                metrics::counter!("handset_job_runner_restarts_total", "job" => name).increment(1);
                restarts += 1;
                tokio::time::sleep(pause).await;
            }
            Err(_) => return restarts,
        }
    }
}

/// Pending transactions expired per round.
const EXPIRY_BATCH: i64 = 100;

/// Hours the rollup counts per try (a backlog catches up a day a minute).
const FUNNEL_HOURS_PER_ROUND: u32 = 24;
/// The upkeep loop tries to roll the funnel up every this many rounds (a
/// minute at the default `workers.poll_interval`; hours close once an hour).
const FUNNEL_ROLLUP_ROUNDS: u32 = 60;

impl Runner {
    pub fn new(gateway: Arc<Gateway>, delivery: Delivery, settings: RunnerSettings) -> Runner {
        let owner = format!("{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let last_rollup = std::sync::Mutex::new(None);
        Runner { store: gateway.store().clone(), gateway, delivery: Arc::new(delivery), settings, owner, last_rollup }
    }

    /// Whether to try the funnel rollup this round (the first, then every `FUNNEL_ROLLUP_ROUNDS`).
    fn rollup_due(&self) -> bool {
        let mut last = self.last_rollup.lock().unwrap_or_else(|e| e.into_inner());
        let every = self.settings.poll_interval.saturating_mul(FUNNEL_ROLLUP_ROUNDS);
        let due = last.is_none_or(|at| at.elapsed() >= every);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// Runs three loops, each every `poll_interval`, until `shutdown` turns
    /// true: callback delivery, provider polling, and upkeep (expiry,
    /// retention, the queue gauge). Separate loops keep a slow provider from
    /// holding up callbacks. Each loop finishes the round in progress (its
    /// deliveries included) before it stops.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        tracing::info!(owner = %self.owner, "job runner started");
        let runner = Arc::new(self);
        let loops = [Job::Deliver, Job::Poll, Job::Upkeep].map(|job| {
            let (runner, shutdown) = (runner.clone(), shutdown.clone());
            let pause = runner.settings.poll_interval;
            tokio::spawn(keep_running(job.name(), pause, shutdown.clone(), move || {
                let (runner, shutdown) = (runner.clone(), shutdown.clone());
                async move { runner.repeat(job, shutdown).await }
            }))
        });
        for task in loops {
            let _ = task.await;
        }
        tracing::info!(owner = %runner.owner, "job runner stopped");
    }

    async fn repeat(&self, job: Job, mut shutdown: watch::Receiver<bool>) {
        while !*shutdown.borrow() {
            let mut tick = Tick::default();
            match self.run_job(job, &mut tick).await {
                Ok(()) if tick != Tick::default() => tracing::debug!(?job, ?tick, "job runner round"),
                Ok(()) => {}
                Err(error) => tracing::warn!(?job, %error, "job runner round failed; retrying next round"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn run_job(&self, job: Job, tick: &mut Tick) -> Result<(), handset_core::store::StoreError> {
        let now = Utc::now();
        match job {
            Job::Deliver => self.deliver_due(tick).await?,
            Job::Poll => {
                tick.polled = self.gateway.poll_due(now, self.settings.batch_size).await.unwrap_or_else(|error| {
                    tracing::warn!(%error, "polling providers failed");
                    0
                });
            }
            Job::Upkeep => {
                tick.expired = self.gateway.expire_due(now, EXPIRY_BATCH).await.unwrap_or_else(|error| {
                    tracing::warn!(%error, "expiring pending transactions failed");
                    0
                });
                metrics::counter!("handset_transactions_expired_total").increment(tick.expired as u64);
                if let Some(retention) = self.settings.retention {
                    let cutoff = now - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
                    tick.purged = self.store.purge_personal_data(cutoff, now).await?;
                    metrics::counter!("handset_personal_data_purged_total").increment(tick.purged);
                }
                let lifetime =
                    chrono::Duration::from_std(crate::idempotency::KEY_LIFETIME).unwrap_or(chrono::Duration::MAX);
                self.store.purge_idempotency(now - lifetime).await?;
                let lifetime =
                    chrono::Duration::from_std(self.settings.counter_lifetime).unwrap_or(chrono::Duration::MAX);
                self.store.purge_rate_counters(now - lifetime).await?;
                self.gateway.forget_rate_windows(now - chrono::Duration::minutes(2));
                if self.rollup_due() {
                    let settled =
                        now - chrono::Duration::from_std(self.settings.funnel_hour_settles).unwrap_or_default();
                    tick.rolled_up =
                        self.store.roll_up_funnel(settled, FUNNEL_HOURS_PER_ROUND).await.unwrap_or_else(|error| {
                            tracing::warn!(%error, "rolling the funnel up failed; retrying later");
                            0
                        });
                }
                let due = self.store.due_callbacks(now).await?;
                metrics::gauge!("handset_callback_queue_due").set(due as f64);
            }
        }
        Ok(())
    }

    async fn deliver_due(&self, tick: &mut Tick) -> Result<(), handset_core::store::StoreError> {
        let now = Utc::now();
        let lease_until = now + chrono::Duration::from_std(self.settings.lease).unwrap_or(chrono::Duration::MAX);
        let claimed = self
            .store
            .claim_due_callbacks(Claim { now, lease_until, owner: &self.owner, limit: self.settings.batch_size })
            .await?;
        let mut deliveries = JoinSet::new();
        for callback in claimed {
            let (delivery, store, owner) = (self.delivery.clone(), self.store.clone(), self.owner.clone());
            let schedule = self.settings.retry_schedule.clone();
            let span = tracing::info_span!(
                "deliver_callback",
                transaction_id = %callback.message.transaction_id,
                webhook_id = %callback.message.webhook_id()
            );
            deliveries.spawn(
                async move { deliver_one(&delivery, store.as_ref(), &owner, &schedule, callback).await }
                    .instrument(span),
            );
        }
        while let Some(joined) = deliveries.join_next().await {
            match joined {
                Ok(Ok(Some(AfterAttempt::Delivered))) => tick.delivered += 1,
                Ok(Ok(Some(AfterAttempt::RetryAt(_)))) => tick.retrying += 1,
                Ok(Ok(Some(AfterAttempt::GiveUp))) => tick.failed += 1,
                Ok(Ok(None)) => tick.lease_lost += 1,
                Ok(Err(error)) => tracing::warn!(%error, "recording a callback attempt failed; it will be retried"),
                Err(error) => tracing::error!(%error, "a callback delivery task failed"),
            }
        }
        Ok(())
    }
}

/// Attempts one claimed callback and records the attempt and what follows.
/// `None`: another runner took the lease over, so nothing was recorded.
async fn deliver_one(
    delivery: &Delivery,
    store: &dyn Store,
    owner: &str,
    schedule: &[Duration],
    callback: ClaimedCallback,
) -> Result<Option<AfterAttempt>, handset_core::store::StoreError> {
    let attempt = delivery.attempt(&callback, Utc::now()).await;
    let next = after(&attempt, callback.attempts_before, schedule);
    let outcome = match next {
        AfterAttempt::Delivered => "delivered",
        AfterAttempt::RetryAt(_) => "retry",
        AfterAttempt::GiveUp => "failed",
    };
    metrics::counter!("handset_callback_deliveries_total", "outcome" => outcome).increment(1);
    metrics::histogram!("handset_callback_delivery_duration_seconds").record(attempt.latency_ms as f64 / 1000.0);
    if next != AfterAttempt::Delivered {
        tracing::info!(
            webhook_id = %callback.message.webhook_id(),
            transaction_id = %callback.message.transaction_id,
            status_code = attempt.status_code,
            error = attempt.error.as_deref().unwrap_or(""),
            outcome,
            "callback not delivered"
        );
    }
    let recorded = store.finish_callback_attempt(callback.message.id, owner, &attempt, next).await?;
    Ok(recorded.then_some(next))
}

/// 2xx is delivered; anything else is retried after the next delay of the
/// schedule (with up to 10% jitter, so retries from many callbacks spread
/// out), or given up once the schedule is used.
pub fn after(attempt: &CallbackAttempt, attempts_before: i32, schedule: &[Duration]) -> AfterAttempt {
    if attempt.status_code.is_some_and(|code| (200..300).contains(&code)) {
        return AfterAttempt::Delivered;
    }
    match schedule.get(attempts_before.max(0) as usize) {
        Some(delay) => AfterAttempt::RetryAt(attempt.attempted_at + jittered(*delay)),
        None => AfterAttempt::GiveUp,
    }
}

fn jittered(delay: Duration) -> chrono::Duration {
    let spread = delay.as_millis() as u64 / 10;
    let extra = if spread > 0 { rand::rng().random_range(0..=spread) } else { 0 };
    chrono::Duration::from_std(delay + Duration::from_millis(extra)).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(status: Option<i32>) -> CallbackAttempt {
        CallbackAttempt { attempted_at: Utc::now(), status_code: status, error: None, latency_ms: 1 }
    }

    #[tokio::test]
    async fn a_panicking_loop_is_started_again() {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (_stop, shutdown) = watch::channel(false);
        let counted = runs.clone();
        let restarts = keep_running("test", Duration::from_millis(1), shutdown, move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    panic!("a bug in a round");
                }
            }
        })
        .await;
        assert_eq!(restarts, 2);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3, "it ran again after each panic");
    }

    #[test]
    fn retries_follow_the_schedule_then_give_up() {
        let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
        assert_eq!(after(&attempt(Some(204)), 0, &schedule), AfterAttempt::Delivered);
        let first = attempt(Some(500));
        match after(&first, 0, &schedule) {
            AfterAttempt::RetryAt(at) => {
                let delay = (at - first.attempted_at).num_milliseconds();
                assert!((5000..=5500).contains(&delay), "{delay}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(after(&attempt(None), 1, &schedule), AfterAttempt::RetryAt(_)));
        assert_eq!(after(&attempt(Some(302)), 2, &schedule), AfterAttempt::GiveUp);
    }
}
