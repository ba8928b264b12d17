//! Session ids the core revoked (`UplinkMessage::Revoked`): device frames addressed to them are
//! dropped here instead of crossing the uplink, so a suspended or revoked device stops costing
//! uplink capacity at once.
//!
//! The set is bounded (past its size the oldest entries go first) and forgets an entry after its
//! time to live: by then the core has long forgotten the session too, and answers its frames
//! with nothing. A session id says nothing about a device's identity, so this is no per-device
//! state. The hot path (every device frame) costs one atomic load while the set is empty.
//!
//! The same type holds the admission negative set: session ids the core answered `NotAdmitted`
//! for (`[admission] not_admitted_ttl_secs`, `not_admitted_max`), so that frames for them are
//! dropped without asking again; installing an admission takes its id out.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use relay_protocol::SessionId;

/// The bounded, expiring set of revoked session ids.
#[derive(Debug)]
pub struct RevokedSessions {
    inner: Mutex<Inner>,
    /// `inner.by_id.len()`, readable without the lock.
    len: AtomicUsize,
    ttl: Duration,
    max: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each id with the time it was (last) revoked.
    by_id: HashMap<SessionId, Instant>,
    /// Insertion order, oldest first; an entry whose time differs from `by_id`'s is stale.
    order: VecDeque<(SessionId, Instant)>,
}

impl RevokedSessions {
    /// An empty set holding at most `max` ids, each for `ttl`.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            len: AtomicUsize::new(0),
            ttl,
            max: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing can be left half-done in a way worse than stopping the relay.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds ids the core revoked at `now`.
    pub fn insert(&self, sessions: &[SessionId], now: Instant) {
        let mut inner = self.lock();
        for id in sessions {
            inner.by_id.insert(*id, now);
            inner.order.push_back((*id, now));
        }
        self.evict(&mut inner, now);
        self.len.store(inner.by_id.len(), Ordering::Relaxed);
    }

    /// Takes `id` out of the set (it was admitted after all).
    pub fn remove(&self, id: SessionId) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut inner = self.lock();
        // Its entry in `order` is now stale and goes at the next eviction.
        inner.by_id.remove(&id);
        self.len.store(inner.by_id.len(), Ordering::Relaxed);
    }

    /// Whether frames for `id` are to be dropped.
    pub fn contains(&self, id: SessionId, now: Instant) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let inner = self.lock();
        inner
            .by_id
            .get(&id)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    /// Forgets expired ids (also done on every insert).
    pub fn expire(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        self.evict(&mut inner, now);
        let left = inner.by_id.len();
        self.len.store(left, Ordering::Relaxed);
        left
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn evict(&self, inner: &mut Inner, now: Instant) {
        while let Some(&(id, at)) = inner.order.front() {
            let expired = now.saturating_duration_since(at) >= self.ttl;
            let stale = inner.by_id.get(&id) != Some(&at);
            if !(expired
                || stale
                || inner.by_id.len() > self.max
                || inner.order.len() > 2 * self.max)
            {
                break;
            }
            inner.order.pop_front();
            if !stale {
                inner.by_id.remove(&id);
            }
        }
        if inner.order.capacity() > 64 && inner.order.len() < inner.order.capacity() / 4 {
            inner.order.shrink_to_fit();
        }
        if inner.by_id.capacity() > 64 && inner.by_id.len() < inner.by_id.capacity() / 4 {
            inner.by_id.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: std::ops::Range<u32>) -> Vec<SessionId> {
        r.map(SessionId).collect()
    }

    #[test]
    fn holds_ids_for_their_time_to_live() {
        let set = RevokedSessions::new(Duration::from_secs(600), 100);
        let t0 = Instant::now();
        assert!(!set.contains(SessionId(1), t0));
        set.insert(&ids(1..3), t0);
        assert!(set.contains(SessionId(1), t0));
        assert!(set.contains(SessionId(2), t0 + Duration::from_secs(599)));
        assert!(!set.contains(SessionId(3), t0));
        assert!(!set.contains(SessionId(1), t0 + Duration::from_secs(600)));
        assert_eq!(set.expire(t0 + Duration::from_secs(600)), 0);
        assert!(set.is_empty());
    }

    #[test]
    fn is_bounded_oldest_first() {
        let set = RevokedSessions::new(Duration::from_secs(600), 10);
        let t0 = Instant::now();
        for i in 0..100 {
            set.insert(&[SessionId(i)], t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(set.len(), 10);
        let now = t0 + Duration::from_secs(1);
        assert!(set.contains(SessionId(99), now));
        assert!(set.contains(SessionId(90), now));
        assert!(!set.contains(SessionId(89), now));
    }

    #[test]
    fn removed_ids_are_forgotten() {
        let set = RevokedSessions::new(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        set.remove(SessionId(1));
        set.insert(&ids(1..3), t0);
        set.remove(SessionId(1));
        assert!(!set.contains(SessionId(1), t0));
        assert!(set.contains(SessionId(2), t0));
        assert_eq!(set.len(), 1);
        // Inserted again later, its stale order entry does not cut its time short.
        set.insert(&ids(1..2), t0 + Duration::from_secs(5));
        assert_eq!(set.expire(t0 + Duration::from_secs(12)), 1);
        assert!(set.contains(SessionId(1), t0 + Duration::from_secs(12)));
    }

    #[test]
    fn a_repeated_id_is_renewed_not_duplicated() {
        let set = RevokedSessions::new(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        for k in 0..50 {
            set.insert(&[SessionId(7)], t0 + Duration::from_secs(k));
        }
        assert_eq!(set.len(), 1);
        assert!(set.contains(SessionId(7), t0 + Duration::from_secs(55)));
        assert!(set.lock().order.len() <= 8, "stale entries are trimmed");
    }
}
