//! Partners by API key hash, kept in memory so a request does not read the
//! partner row every time.
//!
//! The cache serves entries only while the store announces every change to
//! partners, made by any process (`Store::follow_partner_changes`: Postgres
//! notifies through a trigger): each announcement empties it, so a partner
//! deactivated, reactivated or given a new key is refused or accepted as soon
//! as the announcement arrives. While the announcements are not being
//! received (SQLite, which cannot announce across processes; a Postgres
//! listener reconnecting) nothing is served from it and every request reads
//! the partner. `security.partner_cache_ttl` bounds an entry's life (a
//! listener that died silently misses changes for at most that long); zero
//! turns the cache off. A key the cache does not hold is always read.

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
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Changes are being announced: entries may be served.
    following: bool,
    /// Bumped by every announcement, so a read that began before a change
    /// cannot put what it read after the change emptied the cache.
    generation: u64,
    /// Each entry with the instant it stops being served.
    entries: HashMap<String, (Instant, Partner)>,
}

/// What `PartnerCache::before_read` hands the reader: the cache's generation
/// when the read began.
#[derive(Debug, Clone, Copy)]
pub struct ReadTicket(u64);

impl PartnerCache {
    pub fn new(ttl: Duration) -> Self {
        PartnerCache { ttl, state: Mutex::new(State::default()) }
    }

    /// The cache can serve at all (a non-zero TTL).
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partner read for this key hash less than the TTL ago, with no
    /// change announced since.
    pub fn get(&self, key_hash: &str) -> Option<Partner> {
        let state = self.state();
        if !state.following {
            return None;
        }
        state.entries.get(key_hash).filter(|(until, _)| Instant::now() < *until).map(|(_, p)| p.clone())
    }

    /// Taken before reading a partner from the store, and given back to `put`.
    pub fn before_read(&self) -> ReadTicket {
        ReadTicket(self.state().generation)
    }

    /// Keeps what was read, unless a change was announced since the ticket
    /// was taken (the read may predate it) or changes are not being followed.
    /// `key_expires_in`: the key was a previous one, valid this much longer
    /// (the entry lives no longer than the key).
    pub fn put(&self, key_hash: &str, partner: &Partner, key_expires_in: Option<Duration>, ticket: ReadTicket) {
        if !self.enabled() {
            return;
        }
        let mut state = self.state();
        if !state.following || state.generation != ticket.0 {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES {
            state.entries.clear();
        }
        let lifetime = key_expires_in.map_or(self.ttl, |left| left.min(self.ttl));
        state.entries.insert(key_hash.to_owned(), (Instant::now() + lifetime, partner.clone()));
    }

    /// A partner changed somewhere: forget everything read so far.
    pub fn changed(&self) {
        let mut state = self.state();
        state.generation += 1;
        state.entries.clear();
    }

    /// Changes are (or are no longer) being announced. Either way the
    /// entries go: any change made while not following was missed.
    pub fn set_following(&self, following: bool) {
        let mut state = self.state();
        state.following = following;
        state.generation += 1;
        state.entries.clear();
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

    fn following(ttl: Duration) -> PartnerCache {
        let cache = PartnerCache::new(ttl);
        cache.set_following(true);
        cache
    }

    #[test]
    fn entries_expire_and_zero_keeps_nothing() {
        let cache = following(Duration::from_millis(1000));
        let p = partner();
        let put_at = Instant::now();
        cache.put("h", &p, None, cache.before_read());
        let hit = cache.get("h").map(|c| c.id);
        if put_at.elapsed() < Duration::from_millis(900) {
            assert_eq!(hit, Some(p.id));
        }
        assert!(cache.get("other").is_none());
        std::thread::sleep(Duration::from_millis(1000).saturating_sub(put_at.elapsed()) + Duration::from_millis(10));
        assert!(cache.get("h").is_none(), "expired");
        let off = following(Duration::ZERO);
        off.put("h", &p, None, off.before_read());
        assert!(off.get("h").is_none());
    }

    #[test]
    fn nothing_is_served_unless_changes_are_followed() {
        let cache = PartnerCache::new(Duration::from_secs(60));
        cache.put("h", &partner(), None, cache.before_read());
        assert!(cache.get("h").is_none(), "not following: nothing kept");
        cache.set_following(true);
        cache.put("h", &partner(), None, cache.before_read());
        assert!(cache.get("h").is_some());
        cache.set_following(false);
        assert!(cache.get("h").is_none(), "the listener was lost: entries go");
        cache.set_following(true);
        assert!(cache.get("h").is_none(), "and do not come back");
    }

    #[test]
    fn a_previous_key_is_kept_no_longer_than_it_works() {
        let cache = following(Duration::from_secs(60));
        cache.put("old", &partner(), Some(Duration::ZERO), cache.before_read());
        assert!(cache.get("old").is_none(), "expired with its key");
        cache.put("old", &partner(), Some(Duration::from_secs(30)), cache.before_read());
        assert!(cache.get("old").is_some());
    }

    #[test]
    fn a_change_empties_the_cache_and_refuses_reads_that_began_before_it() {
        let cache = following(Duration::from_secs(60));
        cache.put("h", &partner(), None, cache.before_read());
        let ticket = cache.before_read();
        cache.changed();
        assert!(cache.get("h").is_none(), "emptied");
        cache.put("h", &partner(), None, ticket);
        assert!(cache.get("h").is_none(), "a read older than the change is not kept");
        cache.put("h", &partner(), None, cache.before_read());
        assert!(cache.get("h").is_some(), "a read after it is");
    }
}
