//! `BirthDate`: a calendar date in strict `YYYY-MM-DD` form, with the age rule.

use chrono::{Datelike, NaiveDate};

use crate::error::{ApiError, ErrorCode};

/// Partners must be adults to be matched against carrier records.
pub const MINIMUM_AGE: u32 = 18;

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BirthDate(NaiveDate);

/// Personal data: never printed by `{:?}`.
impl std::fmt::Debug for BirthDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BirthDate(***)")
    }
}

impl BirthDate {
    /// Parses `YYYY-MM-DD` exactly (no time, no single-digit months) and checks
    /// the holder is at least 18 on `today` (the UTC date).
    pub fn parse(input: &str, today: NaiveDate) -> Result<BirthDate, ApiError> {
        let bad_format = || ApiError::new(ErrorCode::InvalidBirthDate);
        let shaped = input.len() == 10
            && input.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            });
        if !shaped {
            return Err(bad_format());
        }
        let date = NaiveDate::parse_from_str(input, "%Y-%m-%d").map_err(|_| bad_format())?;
        if date.year() < 1900 {
            return Err(ApiError::with_message(
                ErrorCode::InvalidBirthDate,
                "Transaction parameter birth_date is not a plausible date of birth",
            ));
        }
        let birth_date = BirthDate(date);
        // A date still to come is no adult's either.
        if date > today || birth_date.age_on(today) < MINIMUM_AGE {
            return Err(ApiError::new(ErrorCode::Minor));
        }
        Ok(birth_date)
    }

    /// Whole years completed on `today`; someone born on 29 February comes of
    /// age on 1 March in common years.
    pub fn age_on(&self, today: NaiveDate) -> u32 {
        let mut age = today.year() - self.0.year();
        if (today.month(), today.day()) < (self.0.month(), self.0.day()) {
            age -= 1;
        }
        age.max(0) as u32
    }

    pub fn date(&self) -> NaiveDate {
        self.0
    }
}

impl std::fmt::Display for BirthDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn strict_format() {
        let today = day("2026-11-22");
        assert!(BirthDate::parse("1968-05-27", today).is_ok());
        for bad in ["1968-5-27", "27/05/1968", "1968-02-30", "1968-05-27T00:00:00", "", "19680527"] {
            assert_eq!(BirthDate::parse(bad, today).unwrap_err().code, ErrorCode::InvalidBirthDate, "{bad}");
        }
        assert_eq!(BirthDate::parse("2030-01-01", today).unwrap_err().code, ErrorCode::Minor);
    }

    #[test]
    fn adults_only_counted_on_the_day() {
        let today = day("2026-11-22");
        assert!(BirthDate::parse("2008-11-22", today).is_ok());
        assert_eq!(BirthDate::parse("2008-11-23", today).unwrap_err().code, ErrorCode::Minor);
        let leapling = BirthDate(day("2008-02-29"));
        assert_eq!(leapling.age_on(day("2026-02-28")), 17);
        assert_eq!(leapling.age_on(day("2026-03-01")), 18);
    }
}
