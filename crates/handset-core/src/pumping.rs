//! The SMS pumping guard: a number range (country calling code and the
//! next `prefix_digits` digits) that receives many SMS sends and almost no
//! confirmations is paused for a while (429 5301), because that is what
//! traffic pumping looks like (fraudulent sends to numbers whose operator
//! pays the fraudster per message).
//!
//! Counted from the database (every replica sees the same transactions):
//! the SMS transactions of the range created in the last `window` (since
//! the range was last released, if later), and how many of them succeeded.
//! A pause is a row of its own, so every replica and the CLI see it.

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

/// A range's traffic in the guard's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeTraffic {
    pub sends: i64,
    pub succeeded: i64,
    /// An active pause ends then.
    pub paused_until: Option<DateTime<Utc>>,
    /// Sends before this are not counted (the range was released then).
    pub released_at: Option<DateTime<Utc>>,
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
