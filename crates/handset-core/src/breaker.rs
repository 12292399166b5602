//! A per-provider circuit breaker: after `failure_threshold` consecutive
//! unavailable answers, the provider is skipped for `open_for`; then one call
//! is let through, and its answer closes the breaker or opens it again.

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

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        CircuitBreaker { settings, state: Mutex::new(State::default()) }
    }

    /// Whether a call may go to the provider now.
    pub fn allows(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open_until.is_none_or(|until| now >= until)
    }

    pub fn record_success(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = State::default();
    }

    /// Counts an unavailable answer; returns true when this one opened the breaker.
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.consecutive_failures += 1;
        if state.consecutive_failures >= self.settings.failure_threshold.max(1) {
            state.consecutive_failures = 0;
            state.open_until = Some(now + self.settings.open_for);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_cooldown() {
        let breaker = CircuitBreaker::new(BreakerSettings { failure_threshold: 3, open_for: Duration::from_secs(10) });
        let t0 = Instant::now();
        assert!(!breaker.record_failure(t0));
        breaker.record_success();
        assert!(!breaker.record_failure(t0));
        assert!(!breaker.record_failure(t0));
        assert!(breaker.allows(t0), "success reset the count");
        assert!(breaker.record_failure(t0));
        assert!(!breaker.allows(t0 + Duration::from_secs(9)));
        assert!(breaker.allows(t0 + Duration::from_secs(10)), "one call goes through after the cooldown");
    }
}
