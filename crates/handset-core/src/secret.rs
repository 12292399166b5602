//! One-way hashes for the secrets handset must recognise but never keep:
//! partner API keys and one-time codes.
//!
//! API keys carry 256 random bits, so a fast hash is enough (no password
//! stretching needed). Codes are short; they are salted with their transaction
//! id and live at most `possession.code_ttl`, and a hash never leaves the database.

use sha2::{Digest, Sha256};
use uuid::Uuid;

pub fn api_key_hash(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

pub fn code_hash(transaction_id: Uuid, code: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(transaction_id.as_bytes());
    hasher.update(b":");
    hasher.update(code.as_bytes());
    hex::encode(hasher.finalize())
}

/// Equality in time independent of where the inputs differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_salted() {
        let id = Uuid::nil();
        assert_eq!(code_hash(id, "123123"), code_hash(id, "123123"));
        assert_ne!(code_hash(id, "123123"), code_hash(Uuid::from_u128(1), "123123"));
        assert_eq!(api_key_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
