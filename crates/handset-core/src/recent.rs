//! SMS checks this process has just started, kept in memory so that their
//! first confirm does not read them back from the database.
//!
//! A copy may be out of date: another replica may have confirmed, or the
//! job runner expired, the check since. So the confirm acts on a copy only
//! through writes conditioned on the state it shows (pending, with exactly
//! the attempts it shows used); when such a write matches nothing, or the
//! copy calls for anything else (expired, no attempt left, a malformed
//! code), the confirm reads the transaction as it always did. Each copy
//! serves one confirm: taking it removes it.
//!
//! A copy's provider reference stays current for the same reason: an SMS
//! check's reference is renewed only by a confirm that keeps the attempt it
//! used, so a renewed reference always comes with a changed count. A path
//! that renewed an SMS check's reference without using an attempt would
//! have to condition `finalize` on the reference too.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use uuid::Uuid;

use crate::model::{Product, Status, Transaction};

/// How many started checks are kept. Past it the oldest go first: a check
/// confirmed later than 10,000 starts after its own is read from the
/// database, as on any other replica. Copies past their deadline go too,
/// so a quiet process keeps no abandoned check's number for long.
pub const RECENT_STARTS: usize = 10_000;

#[derive(Default)]
struct Kept {
    by_id: HashMap<Uuid, Transaction>,
    /// Ids in the order they came; may name copies already taken.
    order: VecDeque<Uuid>,
}

pub struct RecentStarts {
    kept: Mutex<Kept>,
    capacity: usize,
}

impl RecentStarts {
    pub fn new(capacity: usize) -> RecentStarts {
        RecentStarts { kept: Mutex::new(Kept::default()), capacity }
    }

    /// Keeps a copy of a check just stored, if a confirm will follow it: a
    /// pending SMS check with a deadline.
    pub fn remember(&self, tx: &Transaction) {
        if self.capacity == 0
            || tx.status != Status::Pending
            || tx.product != Product::PossessionSms
            || tx.expires_at.is_none()
        {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Kept { by_id, order } = &mut *kept;
        // Checks come in start order, so deadlines mostly do too: the front
        // holds the taken and the expired, up to the first still useful.
        while let Some(oldest) = order.front() {
            match by_id.get(oldest) {
                Some(copy) if copy.expires_at.is_some_and(|at| at > tx.created_at) => break,
                _ => {
                    let oldest = *oldest;
                    order.pop_front();
                    by_id.remove(&oldest);
                }
            }
        }
        by_id.insert(tx.id, tx.clone());
        order.push_back(tx.id);
        // `order` also holds ids already taken; bounding it bounds both.
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                by_id.remove(&oldest);
            }
        }
    }

    /// The copy of check `id`, if this process started it and no confirm
    /// has taken it yet.
    pub fn take(&self, id: Uuid) -> Option<Transaction> {
        self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).by_id.remove(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProviderName;

    fn sms() -> Transaction {
        let now = chrono::Utc::now();
        let tx = Transaction::pending(
            Uuid::nil(),
            Uuid::nil(),
            Product::PossessionSms,
            ProviderName::Sandbox,
            "+14155550123",
            now,
        );
        Transaction { expires_at: Some(now + chrono::Duration::minutes(10)), max_attempts: 3, ..tx }
    }

    #[test]
    fn a_copy_serves_one_confirm() {
        let recent = RecentStarts::new(4);
        let tx = sms();
        recent.remember(&tx);
        assert_eq!(recent.take(tx.id).map(|t| t.id), Some(tx.id));
        assert!(recent.take(tx.id).is_none());
    }

    #[test]
    fn only_pending_sms_checks_with_a_deadline_are_kept() {
        let recent = RecentStarts::new(4);
        let ended = Transaction { status: Status::Succeeded, ..sms() };
        let network = Transaction { product: Product::PossessionNetwork, ..sms() };
        let open_ended = Transaction { expires_at: None, ..sms() };
        for tx in [&ended, &network, &open_ended] {
            recent.remember(tx);
            assert!(recent.take(tx.id).is_none());
        }
    }

    #[test]
    fn copies_past_their_deadline_go_with_the_next_start() {
        let recent = RecentStarts::new(4);
        let old = sms();
        recent.remember(&old);
        let later = Transaction { created_at: old.expires_at.unwrap(), ..sms() };
        recent.remember(&later);
        assert!(recent.take(old.id).is_none(), "its deadline had passed when the next check started");
        assert!(recent.take(later.id).is_some());
    }

    #[test]
    fn the_oldest_go_past_the_capacity() {
        let recent = RecentStarts::new(2);
        let (a, b, c) = (sms(), sms(), sms());
        for tx in [&a, &b, &c] {
            recent.remember(tx);
        }
        assert!(recent.take(a.id).is_none(), "the oldest went");
        assert!(recent.take(b.id).is_some() && recent.take(c.id).is_some());
    }
}
