//! The SMS pumping guard: a number range (country calling code and the
//! next `prefix_digits` digits) that receives many SMS sends and almost no
//! confirmations is paused for a while (429 5301), because that is what
//! traffic pumping looks like (fraudulent sends to numbers whose operator
//! pays the fraudster per message).
//!
//! Counted in the database, so every replica judges the same numbers: each
//! SMS send to a range adds one to the range's counter for the current
//! fixed `window` (an atomic upsert before the provider is called, so
//! concurrent sends each see their own count), and the range's confirmed
//! checks are counted from its transactions. A pause is a row of its own,
//! so every replica and the CLI see it; after a pause ends or is lifted the
//! range counts afresh (a counter of its own).

use chrono::{DateTime, Duration, Utc};

use crate::phone::Phone;

#[derive(Debug, Clone, PartialEq)]
pub struct PumpingGuard {
    /// Digits after the country calling code that make a range.
    pub prefix_digits: usize,
    pub window: Duration,
    /// A range is judged only once it received more sends than this in the window.
    pub min_sends: i64,
    /// Below this share of confirmed sends, a judged range is paused.
    pub max_conversion: f64,
    pub cooldown: Duration,
}

impl PumpingGuard {
    /// The range of a number: `+` calling code, then the first
    /// `prefix_digits` digits of the national number (`+1415555`).
    pub fn range_of(phone: &Phone, prefix_digits: usize) -> String {
        let national = phone.national_digits();
        format!("+{}{}", phone.calling_code(), &national[..prefix_digits.min(national.len())])
    }

    /// Whether a range that received `sends` (this one included) of which
    /// `succeeded` were confirmed must be paused.
    pub fn pauses(&self, sends: i64, succeeded: i64) -> bool {
        sends > self.min_sends && (succeeded as f64) < self.max_conversion * sends as f64
    }
}

/// A range's state as the guard reads it before a send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeTraffic {
    /// Confirmed SMS checks of the range since the count began (see
    /// `Store::range_traffic`).
    pub succeeded: i64,
    /// The range's last pause ends (or ended) then.
    pub paused_until: Option<DateTime<Utc>>,
    /// An operator lifted its last pause then.
    pub released_at: Option<DateTime<Utc>>,
}

impl RangeTraffic {
    /// Since when the range's sends and successes count: its release, or
    /// the end of its last pause once that is over (`None`: always).
    pub fn counting_since(
        paused_until: Option<DateTime<Utc>>,
        released_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let ended = paused_until.filter(|until| *until <= now);
        ended.max(released_at)
    }
}

/// A pause to record: the range, until when, and the counts that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPause<'a> {
    pub range: &'a str,
    pub paused_at: DateTime<Utc>,
    pub paused_until: DateTime<Utc>,
    pub sends: i64,
    pub succeeded: i64,
    /// The release the guard saw: a pause is recorded only if no other
    /// release happened since (an operator's release is not undone by a
    /// start that counted before it).
    pub released_at_seen: Option<DateTime<Utc>>,
}

impl PumpingGuard {
    /// The start of the fixed window `now` is in (windows align to the epoch).
    pub fn window_start(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let length = self.window.num_seconds().max(1);
        let start = now.timestamp() - now.timestamp().rem_euclid(length);
        DateTime::from_timestamp(start, 0).unwrap_or(now)
    }

    /// The counter that holds a range's sends in a window, since it last
    /// became countable again (`RangeTraffic::counting_since`): a new pause
    /// or release starts a new counter, with nothing to clear.
    pub fn counter_scope(range: &str, since: Option<DateTime<Utc>>) -> String {
        format!("range:{range}@{}", since.map_or(0, |at| at.timestamp_millis()))
    }
}

/// A paused range, as `handset fraud list` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PausedRange {
    pub range: String,
    pub paused_at: DateTime<Utc>,
    pub paused_until: DateTime<Utc>,
    /// The window's sends and confirmations when it was paused.
    pub sends: i64,
    pub succeeded: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::Region;

    #[test]
    fn a_range_is_the_calling_code_and_the_next_digits() {
        let us = Phone::parse("4155550123", Region::default()).unwrap();
        assert_eq!(PumpingGuard::range_of(&us, 6), "+1415555");
        let fr = Phone::parse("+33612345678", Region::default()).unwrap();
        assert_eq!(PumpingGuard::range_of(&fr, 4), "+336123");
        assert_eq!(PumpingGuard::range_of(&fr, 40), "+33612345678");
    }

    #[test]
    fn judges_only_ranges_past_the_minimum() {
        let guard = PumpingGuard {
            prefix_digits: 6,
            window: Duration::hours(1),
            min_sends: 10,
            max_conversion: 0.2,
            cooldown: Duration::hours(1),
        };
        assert!(!guard.pauses(10, 0), "not past the minimum");
        assert!(guard.pauses(11, 2), "2 of 11 is under 20%");
        assert!(!guard.pauses(11, 3), "3 of 11 is not");
    }
}
