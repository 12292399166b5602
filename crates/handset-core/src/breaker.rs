//! A per-provider circuit breaker.
//!
//! Closed: calls go through; `failure_threshold` consecutive unavailable
//! answers open it. Open: calls are refused until `open_for` has passed.
//! Half-open: exactly one call (the probe) goes through while the others are
//! still refused; the probe's failure opens the breaker again at once, its
//! success closes it. A probe that never reports (its caller was cancelled)
//! is given up after another `open_for`, and a new probe is let through.
//!
//! Time is passed in (`now`), so tests drive the breaker with their own clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failure_threshold: 5, open_for: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out since `since`.
    HalfOpen {
        since: Instant,
    },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        CircuitBreaker { settings, state: Mutex::new(State::Closed { consecutive_failures: 0 }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call may go to the provider now. When the breaker has been
    /// open for `open_for`, the first caller gets `true` and is the probe.
    pub fn allows(&self, now: Instant) -> bool {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { since } if now >= since + self.settings.open_for => {
                *state = State::HalfOpen { since: now };
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    /// For the `handset_circuit_breaker_state` gauge: 0 closed, 1 open,
    /// 2 half-open (a probe is out, or due: `open_for` has passed and the
    /// next call will be let through).
    pub fn state_number(&self, now: Instant) -> u8 {
        match *self.state() {
            State::Closed { .. } => 0,
            State::Open { until } if now < until => 1,
            State::Open { .. } | State::HalfOpen { .. } => 2,
        }
    }

    /// The provider answered: the breaker closes (a probe's success included).
    pub fn record_success(&self) {
        *self.state() = State::Closed { consecutive_failures: 0 };
    }

    /// Counts an unavailable answer; returns true when this one opened the
    /// breaker (the threshold was reached, or the half-open probe failed).
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut state = self.state();
        let open = State::Open { until: now + self.settings.open_for };
        match *state {
            State::Closed { consecutive_failures } => {
                let failures = consecutive_failures + 1;
                if failures >= self.settings.failure_threshold.max(1) {
                    *state = open;
                    return true;
                }
                *state = State::Closed { consecutive_failures: failures };
                false
            }
            State::HalfOpen { .. } => {
                *state = open;
                true
            }
            // A call that started before the breaker opened: already open.
            State::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(10);

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerSettings { failure_threshold: 3, open_for: OPEN_FOR })
    }

    /// Opens `breaker` at `t0` by three failures.
    fn open(breaker: &CircuitBreaker, t0: Instant) {
        assert!(!breaker.record_failure(t0));
        assert!(!breaker.record_failure(t0));
        assert!(breaker.record_failure(t0), "the third failure opens it");
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let breaker = breaker();
        let t0 = Instant::now();
        assert!(!breaker.record_failure(t0));
        breaker.record_success();
        assert!(!breaker.record_failure(t0));
        assert!(!breaker.record_failure(t0));
        assert!(breaker.allows(t0), "success reset the count");
        assert!(breaker.record_failure(t0));
        assert!(!breaker.allows(t0 + OPEN_FOR - Duration::from_millis(1)));
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let breaker = breaker();
        let t0 = Instant::now();
        open(&breaker, t0);
        let t1 = t0 + OPEN_FOR;
        assert!(breaker.allows(t1), "the probe");
        assert!(!breaker.allows(t1), "others wait for the probe");
        assert!(!breaker.allows(t1 + Duration::from_secs(1)));
    }

    #[test]
    fn a_failed_probe_reopens_at_once() {
        let breaker = breaker();
        let t0 = Instant::now();
        open(&breaker, t0);
        let t1 = t0 + OPEN_FOR;
        assert!(breaker.allows(t1));
        assert!(breaker.record_failure(t1), "one failure of the probe reopens, not three");
        assert!(!breaker.allows(t1));
        assert!(!breaker.allows(t1 + OPEN_FOR - Duration::from_millis(1)));
        assert!(breaker.allows(t1 + OPEN_FOR), "the next probe after another open_for");
    }

    #[test]
    fn a_successful_probe_closes() {
        let breaker = breaker();
        let t0 = Instant::now();
        open(&breaker, t0);
        let t1 = t0 + OPEN_FOR;
        assert!(breaker.allows(t1));
        breaker.record_success();
        assert!(breaker.allows(t1) && breaker.allows(t1), "closed: every call goes through");
        assert!(!breaker.record_failure(t1), "closed with a fresh count");
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced() {
        let breaker = breaker();
        let t0 = Instant::now();
        open(&breaker, t0);
        let t1 = t0 + OPEN_FOR;
        assert!(breaker.allows(t1));
        assert!(!breaker.allows(t1 + OPEN_FOR - Duration::from_millis(1)));
        assert!(breaker.allows(t1 + OPEN_FOR), "a lost probe does not close the provider forever");
    }
}
