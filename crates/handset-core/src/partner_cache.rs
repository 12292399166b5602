//! Partners by API key hash, kept in memory for a short time so a request
//! does not read the partner row every time (`security.partner_cache_ttl`;
//! zero turns it off). A partner deactivated, reactivated or given a new key
//! is seen within that time; a key the cache does not hold is always read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Partner;

/// More keys than any deployment has partners; beyond it the cache starts over
/// (random keys are never cached, so this bounds only honest traffic).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug)]
pub struct PartnerCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Partner)>>,
}

impl PartnerCache {
    pub fn new(ttl: Duration) -> Self {
        PartnerCache { ttl, entries: Mutex::new(HashMap::new()) }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The partner read for this key hash less than the TTL ago.
    pub fn get(&self, key_hash: &str) -> Option<Partner> {
        if !self.enabled() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(key_hash).filter(|(read_at, _)| read_at.elapsed() < self.ttl).map(|(_, partner)| partner.clone())
    }

    pub fn put(&self, key_hash: &str, partner: &Partner) {
        if !self.enabled() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key_hash.to_owned(), (Instant::now(), partner.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Product;

    fn partner() -> Partner {
        Partner {
            id: uuid::Uuid::new_v4(),
            name: "p".into(),
            products: vec![Product::PossessionSms],
            active: true,
            webhook_secret: "whsec_dGVzdA==".into(),
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn entries_expire_and_zero_keeps_nothing() {
        let cache = PartnerCache::new(Duration::from_millis(1000));
        let p = partner();
        let put_at = Instant::now();
        cache.put("h", &p);
        let hit = cache.get("h").map(|c| c.id);
        if put_at.elapsed() < Duration::from_millis(900) {
            assert_eq!(hit, Some(p.id));
        }
        assert!(cache.get("other").is_none());
        std::thread::sleep(Duration::from_millis(1000).saturating_sub(put_at.elapsed()) + Duration::from_millis(10));
        assert!(cache.get("h").is_none(), "expired");
        let off = PartnerCache::new(Duration::ZERO);
        off.put("h", &p);
        assert!(off.get("h").is_none());
    }
}
