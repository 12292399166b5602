//! The continuation handset keeps server-side as the transaction's
//! `provider_ref`: Veratad's token and the path to continue at.

use std::fmt;

use crate::wire::CONTINUE_PATH;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuationRef {
    pub token: String,
    /// A path on Veratad's own host; anything else is replaced by the
    /// documented `/process/continue`, so a token can never send handset's
    /// credentials to another host.
    pub path: String,
}

impl ContinuationRef {
    pub fn new(token: &str, url: &str) -> Self {
        let path = if url.starts_with('/') && !url.starts_with("//") { url } else { CONTINUE_PATH };
        ContinuationRef { token: token.to_owned(), path: path.to_owned() }
    }

    /// Reads `"{token} {path}"`; a bare token continues at the documented path.
    pub fn parse(stored: &str) -> Option<Self> {
        let (token, path) = stored.split_once(' ').unwrap_or((stored, CONTINUE_PATH));
        (!token.is_empty()).then(|| ContinuationRef::new(token, path))
    }
}

impl fmt::Display for ContinuationRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.token, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_stays_on_veratads_host() {
        let kept = ContinuationRef::new("tok", "/process/continue");
        assert_eq!(ContinuationRef::parse(&kept.to_string()), Some(kept));
        assert_eq!(ContinuationRef::new("tok", "https://elsewhere.example/x").path, CONTINUE_PATH);
        assert_eq!(ContinuationRef::new("tok", "//elsewhere.example/x").path, CONTINUE_PATH);
        assert_eq!(ContinuationRef::parse("bare").unwrap().path, CONTINUE_PATH);
        assert_eq!(ContinuationRef::parse(""), None);
    }
}
