//! Adaptive routing: a rule with `strategy = "adaptive"` tries its providers
//! in the order of their recent score for the number's country and the
//! product, not in the order listed.
//!
//! The score of a provider is `succeeded / samples / cost` over the
//! transactions (all partners) that *ended* in the last `window`, plus the
//! unavailable answers that passed a start on to the next provider.
//! Counting by the end, not the start, keeps the score honest: a confirmed
//! code ends at once and an unconfirmed one only at its deadline, so a
//! window of recent starts would show their successes long before their
//! failures. Transactions that ended with "no provider can serve this
//! number" (3908) say nothing about a provider and are left out. Ambiguous
//! sends and chains that ran out end as failed transactions, so they count
//! against the provider that ended them. The ended transactions are read
//! again at most every `window / 10` (between 100 ms and a minute); the
//! unavailable answers are counted in this process (they leave no row).
//!
//! Providers are ranked by score, but one goes ahead of a provider listed
//! before it only when its score is higher beyond chance (95 %), so equal
//! providers keep the listed order rather than trade places on noise.
//! Until every provider of the rule has `min_samples` samples, the order
//! stays as listed (`warming_up`); once ranked, a provider that falls below
//! `min_samples` again leaves the last ranking in place (`held`) rather than
//! bouncing back to the listed order. A share `explore` of starts puts one
//! of the others first, drawn at random, so that every provider keeps being
//! measured and a recovered one wins its traffic back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{Product, ProviderName};
use crate::routing::{ProviderScore, RoutingDecision, RoutingReason, Strategy};
use crate::store::Store;

/// `[routing.adaptive]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveSettings {
    /// How far back outcomes count.
    pub window: Duration,
    /// Samples every provider of a rule needs before the rule is ranked.
    pub min_samples: u32,
    /// The share of starts that put one of the other providers first.
    pub explore: f64,
    /// Seeds the exploration draws (tests); `None` seeds from the OS.
    pub seed: Option<u64>,
    /// `providers.<name>.cost`: a score is divided by it (default 1).
    pub costs: HashMap<ProviderName, f64>,
    /// The longest a transaction takes to end after its start (its deadline
    /// and the expiry job's delay): transactions that ended in the window
    /// were created at most this long before it.
    pub longest_check: Duration,
}

impl AdaptiveSettings {
    /// How long one reading of the outcomes is used.
    pub fn refresh_every(&self) -> Duration {
        (self.window / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    fn cost(&self, provider: ProviderName) -> f64 {
        self.costs.get(&provider).copied().filter(|c| *c > 0.0).unwrap_or(1.0)
    }
}

/// What one provider did for one country and product in the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub succeeded: i64,
    /// Transactions that ended (succeeded, failed or expired).
    pub ended: i64,
}

/// Transactions that ended in a time range, per provider, country and
/// product, as the store counts them (`Store::recent_outcomes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedCounts {
    pub provider: String,
    pub country: Option<String>,
    pub product: String,
    pub succeeded: i64,
    pub ended: i64,
}

/// The transactions' outcomes are keyed by provider, country and product.
type Key = (ProviderName, Option<String>, Product);
/// A rule's held ranking is keyed by country and product.
type RuleKey = (Option<String>, Product);

struct Reading {
    /// When to read the outcomes again (`None`: now).
    next_at: Option<Instant>,
    outcomes: HashMap<Key, Outcomes>,
}

/// After a failed read, the next is tried this much later.
const RETRY_AFTER_FAILED_READ: Duration = Duration::from_secs(1);

/// The recent outcomes adaptive rules are ranked by, and their rankings.
pub struct Scoreboard {
    settings: AdaptiveSettings,
    reading: RwLock<Reading>,
    /// Set while a read of the outcomes runs; starts meanwhile use the
    /// reading they have rather than wait.
    reading_again: Arc<AtomicBool>,
    unavailable: Mutex<HashMap<Key, VecDeque<Instant>>>,
    rankings: Mutex<HashMap<RuleKey, Vec<ProviderName>>>,
    draws: Mutex<StdRng>,
}

/// Unavailable answers kept per key: a bound on memory whatever the traffic.
const MAX_UNAVAILABLE_KEPT: usize = 10_000;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scoreboard {
    pub fn new(settings: AdaptiveSettings) -> Scoreboard {
        let draws = match settings.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Scoreboard {
            settings,
            reading: RwLock::new(Reading { next_at: None, outcomes: HashMap::new() }),
            reading_again: Arc::new(AtomicBool::new(false)),
            unavailable: Mutex::new(HashMap::new()),
            rankings: Mutex::new(HashMap::new()),
            draws: Mutex::new(draws),
        }
    }

    /// Reads the outcomes of the last window again, in the background, when
    /// the reading in hand is older than `refresh_every`: no start waits for
    /// it (they use the reading in hand), and one read runs at a time. A
    /// failed read keeps the old reading and is retried a second later:
    /// routing never fails a start.
    pub fn refresh_soon(self: &Arc<Self>, store: &Arc<dyn Store>, now: DateTime<Utc>) {
        let fresh =
            self.reading.read().unwrap_or_else(|e| e.into_inner()).next_at.is_some_and(|at| Instant::now() < at);
        if fresh || self.reading_again.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Clears the flag however the read ends (a panic included).
        struct Done(Arc<AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let (board, store) = (self.clone(), store.clone());
        tokio::spawn(async move {
            let _done = Done(board.reading_again.clone());
            board.read_outcomes(store.as_ref(), now).await;
        });
    }

    async fn read_outcomes(&self, store: &dyn Store, now: DateTime<Utc>) {
        let back = |d: Duration| now.checked_sub_signed(chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
        let ended_since = back(self.settings.window).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let created_since =
            back(self.settings.window + self.settings.longest_check).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let (outcomes, next_in) = match store.recent_outcomes(ended_since, created_since).await {
            Ok(counts) => {
                let outcomes = counts
                    .into_iter()
                    .filter_map(|c| {
                        let provider = ProviderName::parse(&c.provider)?;
                        let product = Product::parse(&c.product)?;
                        Some(((provider, c.country, product), Outcomes { succeeded: c.succeeded, ended: c.ended }))
                    })
                    .collect();
                (Some(outcomes), self.settings.refresh_every())
            }
            Err(error) => {
                tracing::warn!(%error, "adaptive routing could not read recent outcomes; keeping the last reading");
                (None, RETRY_AFTER_FAILED_READ)
            }
        };
        let mut reading = self.reading.write().unwrap_or_else(|e| e.into_inner());
        reading.next_at = Some(Instant::now() + next_in);
        if let Some(outcomes) = outcomes {
            reading.outcomes = outcomes;
        }
    }

    /// A provider answered unavailable and the start went on to the next one.
    pub fn record_unavailable(&self, provider: ProviderName, country: Option<&str>, product: Product) {
        let mut unavailable = lock(&self.unavailable);
        let seen = unavailable.entry((provider, country.map(str::to_owned), product)).or_default();
        if seen.len() >= MAX_UNAVAILABLE_KEPT {
            seen.pop_front();
        }
        seen.push_back(Instant::now());
    }

    fn unavailable_in_window(&self, key: &Key) -> i64 {
        let mut unavailable = lock(&self.unavailable);
        let Some(seen) = unavailable.get_mut(key) else { return 0 };
        while seen.front().is_some_and(|t| t.elapsed() > self.settings.window) {
            seen.pop_front();
        }
        seen.len() as i64
    }

    /// The order in which to try `providers` (a rule's, already limited to
    /// the configured ones offering `product`) for a number of `country`.
    pub fn order(&self, providers: &[ProviderName], country: Option<&str>, product: Product) -> RoutingDecision {
        let scores: Vec<ProviderScore> = {
            let reading = self.reading.read().unwrap_or_else(|e| e.into_inner());
            providers
                .iter()
                .map(|&provider| {
                    let key = (provider, country.map(str::to_owned), product);
                    let outcomes = reading.outcomes.get(&key).copied().unwrap_or_default();
                    let samples = outcomes.ended + self.unavailable_in_window(&key);
                    let score = (samples > 0)
                        .then(|| outcomes.succeeded as f64 / samples as f64 / self.settings.cost(provider));
                    ProviderScore { provider, samples, succeeded: outcomes.succeeded, score }
                })
                .collect()
        };
        let rule_key = (country.map(str::to_owned), product);
        let (mut order, mut reason) = rank(&scores, self.settings.min_samples, |p| self.settings.cost(p));
        let mut rankings = lock(&self.rankings);
        match reason {
            RoutingReason::Score => {
                rankings.insert(rule_key, order.clone());
            }
            _ => {
                if let Some(held) = rankings.get(&rule_key).filter(|held| same_providers(held, providers)) {
                    order = held.clone();
                    reason = RoutingReason::Held;
                }
            }
        }
        drop(rankings);
        if order.len() > 1 {
            let mut draws = lock(&self.draws);
            if draws.random_bool(self.settings.explore.clamp(0.0, 1.0)) {
                let other = draws.random_range(1..order.len());
                let explored = order.remove(other);
                order.insert(0, explored);
                reason = RoutingReason::Explore;
            }
        }
        RoutingDecision { strategy: Strategy::Adaptive, order, reason, scores }
    }
}

/// Once every provider has `min_samples` samples: by score, but a provider
/// goes ahead of one listed before it only when its score is higher beyond
/// chance, so that equal providers keep the listed order instead of trading
/// places on noise. Otherwise the listed order, warming up.
pub fn rank(
    scores: &[ProviderScore],
    min_samples: u32,
    costs: impl Fn(ProviderName) -> f64,
) -> (Vec<ProviderName>, RoutingReason) {
    if scores.iter().any(|s| s.samples < i64::from(min_samples.max(1))) {
        return (scores.iter().map(|s| s.provider).collect(), RoutingReason::WarmingUp);
    }
    // Each place goes to the first listed of the providers left that none
    // of the others clearly beats. There is always one: clearly beating
    // implies a higher score, and the highest is beaten by none. ("Clearly
    // beats" is not transitive, so swapping neighbours would not do.)
    let mut left: Vec<&ProviderScore> = scores.iter().collect();
    let mut ranked = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let next =
            (0..left.len()).find(|&i| !left.iter().any(|other| clearly_beats(other, left[i], &costs))).unwrap_or(0);
        ranked.push(left.remove(next).provider);
    }
    (ranked, RoutingReason::Score)
}

/// Whether `a`'s conversion per cost beats `b`'s at 95 % confidence (one
/// sided: the question is only whether `a` is ahead), by the
/// Agresti-Caffo interval for a difference of proportions (one success and
/// one failure added to each side, which keeps small or perfect samples
/// from looking certain).
fn clearly_beats(a: &ProviderScore, b: &ProviderScore, cost: &impl Fn(ProviderName) -> f64) -> bool {
    const Z_95: f64 = 1.645;
    let adjusted = |s: &ProviderScore| {
        let n = s.samples as f64 + 2.0;
        let p = (s.succeeded as f64 + 1.0) / n;
        let c = cost(s.provider);
        (p / c, p * (1.0 - p) / n / (c * c))
    };
    let ((score_a, variance_a), (score_b, variance_b)) = (adjusted(a), adjusted(b));
    score_a - score_b > Z_95 * (variance_a + variance_b).sqrt()
}

fn same_providers(held: &[ProviderName], providers: &[ProviderName]) -> bool {
    held.len() == providers.len() && providers.iter().all(|p| held.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderName::{Idme, Veratad};

    fn score(provider: ProviderName, succeeded: i64, samples: i64, cost: f64) -> ProviderScore {
        let score = (samples > 0).then(|| succeeded as f64 / samples as f64 / cost);
        ProviderScore { provider, samples, succeeded, score }
    }

    fn board(explore: f64, costs: &[(ProviderName, f64)]) -> Scoreboard {
        Scoreboard::new(AdaptiveSettings {
            window: Duration::from_secs(60),
            min_samples: 10,
            explore,
            seed: Some(7),
            costs: costs.iter().copied().collect(),
            longest_check: Duration::from_secs(600),
        })
    }

    fn read(board: &Scoreboard, outcomes: &[(ProviderName, i64, i64)]) {
        let mut reading = board.reading.write().unwrap();
        reading.next_at = Some(Instant::now() + Duration::from_secs(60));
        reading.outcomes = outcomes
            .iter()
            .map(|&(p, succeeded, ended)| {
                ((p, Some("US".to_owned()), Product::PossessionSms), Outcomes { succeeded, ended })
            })
            .collect();
    }

    fn unit_cost(_: ProviderName) -> f64 {
        1.0
    }

    #[test]
    fn below_min_samples_the_listed_order_stays() {
        let (order, reason) = rank(&[score(Idme, 1, 9, 1.0), score(Veratad, 50, 50, 1.0)], 10, unit_cost);
        assert_eq!((order, reason), (vec![Idme, Veratad], RoutingReason::WarmingUp));
    }

    #[test]
    fn a_clearly_better_score_goes_first_and_a_close_one_keeps_the_listed_order() {
        let (order, reason) = rank(&[score(Idme, 8, 20, 1.0), score(Veratad, 19, 20, 1.0)], 10, unit_cost);
        assert_eq!((order, reason), (vec![Veratad, Idme], RoutingReason::Score));
        // Higher, but not beyond chance on ten samples each.
        let (order, reason) = rank(&[score(Idme, 7, 10, 1.0), score(Veratad, 9, 10, 1.0)], 10, unit_cost);
        assert_eq!((order, reason), (vec![Idme, Veratad], RoutingReason::Score));
        // The same gap on a thousand samples each is beyond chance.
        let (order, _) = rank(&[score(Idme, 700, 1000, 1.0), score(Veratad, 900, 1000, 1.0)], 10, unit_cost);
        assert_eq!(order, vec![Veratad, Idme]);
        // Three providers, each clearly beaten by the next.
        let dqe = ProviderName::Dqe;
        let three = [score(Idme, 10, 100, 1.0), score(Veratad, 50, 100, 1.0), score(dqe, 95, 100, 1.0)];
        assert_eq!(rank(&three, 10, unit_cost).0, vec![dqe, Veratad, Idme]);
        // The last clearly beats the first, and neither is clearly apart
        // from the middle one (too few samples): the first cannot stay
        // first, the middle one is listed before the last.
        let uneven = [score(Idme, 5000, 10000, 1.0), score(Veratad, 28, 50, 1.0), score(dqe, 6500, 10000, 1.0)];
        assert_eq!(rank(&uneven, 10, unit_cost).0, vec![Veratad, dqe, Idme]);
    }

    #[test]
    fn cost_divides_the_score() {
        let board = board(0.0, &[(Veratad, 3.0)]);
        read(&board, &[(Idme, 40, 100), (Veratad, 90, 100)]);
        let decision = board.order(&[Idme, Veratad], Some("US"), Product::PossessionSms);
        assert_eq!(decision.order, vec![Idme, Veratad], "0.4 is not beaten by 0.9 / 3");
        assert_eq!(decision.reason, RoutingReason::Score);
        assert_eq!(decision.scores[1].score, Some(0.3));
    }

    #[test]
    fn unavailable_answers_count_against_a_provider() {
        let board = board(0.0, &[]);
        read(&board, &[(Idme, 60, 60), (Veratad, 58, 60)]);
        assert_eq!(board.order(&[Idme, Veratad], Some("US"), Product::PossessionSms).order, vec![Idme, Veratad]);
        for _ in 0..40 {
            board.record_unavailable(Idme, Some("US"), Product::PossessionSms);
        }
        let decision = board.order(&[Idme, Veratad], Some("US"), Product::PossessionSms);
        assert_eq!(decision.order, vec![Veratad, Idme], "60 of 100 is below 58 of 60: {decision:?}");
        assert_eq!(decision.scores[0].samples, 100);
        // Another country is judged apart.
        read(&board, &[]);
        assert_eq!(board.order(&[Idme, Veratad], Some("CA"), Product::PossessionSms).reason, RoutingReason::WarmingUp);
    }

    #[test]
    fn a_ranking_is_held_while_a_provider_has_too_few_samples() {
        let board = board(0.0, &[]);
        read(&board, &[(Idme, 4, 20), (Veratad, 19, 20)]);
        assert_eq!(board.order(&[Idme, Veratad], Some("US"), Product::PossessionSms).order, vec![Veratad, Idme]);
        read(&board, &[(Idme, 1, 3), (Veratad, 19, 20)]);
        let decision = board.order(&[Idme, Veratad], Some("US"), Product::PossessionSms);
        assert_eq!((decision.order, decision.reason), (vec![Veratad, Idme], RoutingReason::Held));
    }

    #[test]
    fn a_share_of_starts_explores_the_others() {
        let board = board(0.25, &[]);
        read(&board, &[(Idme, 4, 20), (Veratad, 19, 20)]);
        let explored = (0..4000)
            .filter(|_| {
                let decision = board.order(&[Idme, Veratad], Some("US"), Product::PossessionSms);
                assert_eq!(decision.order.len(), 2);
                decision.reason == RoutingReason::Explore && decision.order[0] == Idme
            })
            .count();
        assert!((800..1200).contains(&explored), "about a quarter: {explored}");
        // A single provider has nothing to explore.
        let alone = board.order(&[Veratad], Some("US"), Product::PossessionSms);
        assert_eq!((alone.order, alone.reason), (vec![Veratad], RoutingReason::Score));
    }
}
