//! Secrets handset must recognise but never keep or print: partner API keys,
//! one-time codes, and configured credentials.
//!
//! API keys carry 256 random bits, so a fast hash is enough (no password
//! stretching needed). Codes are short (10^6 six-digit codes are searched in
//! a moment), so they are keyed with a server secret, `security.code_pepper`,
//! that the database never holds: a dump alone does not reveal them.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// The pepper of development and tests, published in the README. Production
/// refuses to start without its own `security.code_pepper`.
pub const DEVELOPMENT_CODE_PEPPER: &str = "handset-development-code-pepper";

/// A value that must never be printed: `Debug` shows only whether it is set.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() { "Secret(***)" } else { "Secret(unset)" })
    }
}

pub fn api_key_hash(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

/// HMAC-SHA256 of the transaction id and the code, keyed by the pepper.
pub fn code_hash(pepper: &[u8], transaction_id: Uuid, code: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(pepper).expect("HMAC takes a key of any length");
    mac.update(transaction_id.as_bytes());
    mac.update(b":");
    mac.update(code.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Equality in time independent of where the inputs differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_salted_and_keyed() {
        let (id, pepper) = (Uuid::nil(), b"pepper".as_slice());
        assert_eq!(code_hash(pepper, id, "123123"), code_hash(pepper, id, "123123"));
        assert_ne!(code_hash(pepper, id, "123123"), code_hash(pepper, Uuid::from_u128(1), "123123"));
        assert_ne!(code_hash(pepper, id, "123123"), code_hash(b"other", id, "123123"), "the pepper keys the hash");
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(api_key_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::from("hunter2")), "Secret(***)");
        assert_eq!(format!("{:?}", Secret::default()), "Secret(unset)");
    }
}
