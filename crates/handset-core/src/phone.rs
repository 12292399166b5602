//! `Phone`: a phone number that has passed handset's shape check. Its only
//! constructor validates, so every `Phone` in the program is E.164.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use phonenumber::{PhoneNumber, Type, country, metadata::DATABASE};

use crate::error::{ApiError, ErrorCode};

/// A region (ISO 3166 alpha-2) used to read national numbers, e.g. `US`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(country::Id);

impl Region {
    pub fn parse(code: &str) -> Option<Region> {
        code.trim().to_ascii_uppercase().parse().ok().map(Region)
    }

    pub fn as_str(&self) -> &'static str {
        // Borrow the code from the static metadata so it outlives `self`.
        DATABASE.by_id(self.0.as_ref()).map(|m| m.id()).unwrap_or("ZZ")
    }
}

impl Default for Region {
    fn default() -> Self {
        Region(country::Id::US)
    }
}

/// A phone number in E.164 form (`+14155550123`).
///
/// The check is of length and shape only, never of carrier validity: the
/// sandbox numbers (area code 999) are not assigned anywhere but must be accepted.
#[derive(Clone, PartialEq, Eq)]
pub struct Phone {
    e164: String,
    calling_code: u16,
    national: String,
    region: Option<&'static str>,
}

const MAX_INPUT_LEN: usize = 32;

impl Phone {
    /// Reads E.164 (`+33612345678`) or national digits in `default_region`
    /// (`8885551234` in `US`). Separators `space - . ( )` are allowed.
    pub fn parse(input: &str, default_region: Region) -> Result<Phone, ApiError> {
        let invalid = || ApiError::new(ErrorCode::InvalidPhone);
        // The parser also reads phone numbers out of prose ("call 555..."); we
        // want exactly a number, so restrict the alphabet first (spaces around
        // it included, nothing else: the API document's pattern).
        let input = input.trim_matches(' ');
        if input.is_empty()
            || input.len() > MAX_INPUT_LEN
            || !input.chars().all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '.' | '(' | ')'))
            || input.chars().skip(1).any(|c| c == '+')
        {
            return Err(invalid());
        }
        let number = phonenumber::parse(Some(default_region.0), input).map_err(|_| invalid())?;
        if number.extension().is_some() {
            return Err(invalid());
        }
        let calling_code = number.code().value();
        let national = national_digits(&number);
        if !has_possible_length(calling_code, national.len()) {
            return Err(invalid());
        }
        // NANP: NXX-NXX-XXXX, an area code and exchange never start with 0 or 1.
        if calling_code == 1 {
            let bytes = national.as_bytes();
            if bytes.len() != 10 || bytes[0] < b'2' || bytes[3] < b'2' {
                return Err(invalid());
            }
        }
        let region = region_of(&number, calling_code, default_region);
        // E.164 is `+`, the country code and the national significant number.
        Ok(Phone { e164: format!("+{calling_code}{national}"), calling_code, national, region })
    }

    pub fn e164(&self) -> &str {
        &self.e164
    }

    pub fn calling_code(&self) -> u16 {
        self.calling_code
    }

    /// The national significant number, digits only (`4155550123`).
    pub fn national_digits(&self) -> &str {
        &self.national
    }

    /// ISO 3166 alpha-2 region of the number, when the numbering plan tells it.
    pub fn region(&self) -> Option<&'static str> {
        self.region
    }

    /// NANP numbers only: the three-digit area code.
    pub fn nanp_area_code(&self) -> Option<&str> {
        (self.calling_code == 1).then(|| &self.national[..3])
    }

    /// The last four digits, as ID.me's mock rules read them.
    pub fn last_four(&self) -> &str {
        &self.national[self.national.len().saturating_sub(4)..]
    }

    /// For logs: the country code and the last two digits only.
    pub fn masked(&self) -> String {
        let tail = &self.national[self.national.len().saturating_sub(2)..];
        format!("+{}****{}", self.calling_code, tail)
    }
}

/// `Debug` masks the number so that a stray `{:?}` cannot leak it into logs.
impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phone({})", self.masked())
    }
}

fn national_digits(number: &PhoneNumber) -> String {
    let zeros = "0".repeat(number.national().zeros() as usize);
    format!("{zeros}{}", number.national().value())
}

fn has_possible_length(calling_code: u16, len: usize) -> bool {
    // E.164 caps a number at 15 digits, country code included.
    let code_digits = calling_code.checked_ilog10().map_or(1, |log| log as usize + 1);
    if code_digits + len > 15 {
        return false;
    }
    match POSSIBLE_LENGTHS.get(&calling_code) {
        None => false,
        // No length data for this plan: fall back to E.164's own bounds.
        Some(lengths) if lengths.is_empty() => (4..=14).contains(&len),
        Some(lengths) => lengths.contains(&(len as u16)),
    }
}

/// Each numbering plan's possible national lengths, over its regions and
/// the kinds of number handset accepts: read once from the metadata rather
/// than gathered again at every start (it was a few percent of a start's CPU).
static POSSIBLE_LENGTHS: LazyLock<HashMap<u16, Vec<u16>>> = LazyLock::new(|| {
    let kinds = [Type::FixedLine, Type::Mobile, Type::TollFree, Type::PremiumRate, Type::Voip, Type::PersonalNumber];
    let mut plans: HashMap<u16, Vec<u16>> = HashMap::new();
    for code in 1..=999u16 {
        let Some(regions) = DATABASE.by_code(&code) else { continue };
        let mut lengths: Vec<u16> = regions
            .iter()
            .flat_map(|m| {
                let descriptors = m.descriptors();
                std::iter::once(descriptors.general())
                    .chain(kinds.iter().filter_map(|kind| descriptors.get(*kind)))
                    .flat_map(|d| d.possible_length().iter().copied())
            })
            .collect();
        lengths.sort_unstable();
        lengths.dedup();
        plans.insert(code, lengths);
    }
    plans
});

/// Loads the numbering plans' metadata (and builds its patterns) now, so the
/// first number a process reads does not pay for it: it took a quarter
/// of a second of CPU on the benchmark's machine.
pub fn load_numbering_plans() {
    let _ = Phone::parse("+14155550123", Region::default());
    LazyLock::force(&POSSIBLE_LENGTHS);
}

fn region_of(number: &PhoneNumber, calling_code: u16, default: Region) -> Option<&'static str> {
    if let Some(id) = number.country().id() {
        return Some(Region(id).as_str());
    }
    // Numbers outside any assigned range (the sandbox's 999) still belong to a
    // plan; read them in the default region when it shares the plan, else in
    // the plan's main country.
    if DATABASE.by_id(default.as_str()).map(|m| m.country_code()) == Some(calling_code) {
        return Some(default.as_str());
    }
    DATABASE
        .by_code(&calling_code)?
        .into_iter()
        .find(|m| m.is_main_country_for_code())
        .and_then(|m| Region::parse(m.id()))
        .map(|r| r.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(input: &str) -> Result<Phone, ApiError> {
        Phone::parse(input, Region::default())
    }

    #[test]
    fn reads_e164_and_national_numbers() {
        assert_eq!(us("+14155550123").unwrap().e164(), "+14155550123");
        assert_eq!(us("8885551234").unwrap().e164(), "+18885551234");
        assert_eq!(us("(415) 555-0123").unwrap().e164(), "+14155550123");
        let fr = Phone::parse("0612345678", Region::parse("FR").unwrap()).unwrap();
        assert_eq!(fr.e164(), "+33612345678");
        assert_eq!(fr.region(), Some("FR"));
        assert_eq!(us("+33612345678").unwrap().national_digits(), "612345678");
    }

    #[test]
    fn accepts_sandbox_area_codes() {
        let p = us("9995553101").unwrap();
        assert_eq!(p.nanp_area_code(), Some("999"));
        assert_eq!(p.last_four(), "3101");
        assert_eq!(p.region(), Some("US"));
        assert!(us("8885551234").is_ok());
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            "",
            "abc",
            "12345",
            "415555012",
            "41555501234",
            "+1415555012",
            "1234567890",
            "call 4155550123",
            "+1 415 555 0123 ext 5",
            "++14155550123",
            "4155550123+",
            "+999123456789",
            "+3361234567890123",
        ] {
            assert_eq!(us(bad).unwrap_err().code, ErrorCode::InvalidPhone, "{bad:?}");
        }
    }

    #[test]
    fn e164_is_what_the_parser_formats() {
        for (input, region) in [
            ("+14155550123", "US"),
            ("0612345678", "FR"),
            ("+390612345678", "IT"),
            ("+442079460958", "GB"),
            ("+8613800138000", "CN"),
            ("9995553101", "US"),
        ] {
            let parsed = Phone::parse(input, Region::parse(region).unwrap()).unwrap();
            let number = phonenumber::parse(Region::parse(region).map(|r| r.0), input).unwrap();
            assert_eq!(parsed.e164(), number.format().mode(phonenumber::Mode::E164).to_string(), "{input}");
        }
        assert_eq!(us("+390612345678").unwrap().national_digits(), "0612345678");
    }

    #[test]
    fn debug_masks_the_number() {
        let p = us("+14155550123").unwrap();
        assert_eq!(format!("{p:?}"), "Phone(+1****23)");
    }
}
