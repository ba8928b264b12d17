//! The admission table: which sessions the core admitted through this gateway, with the key their
//! frames are tagged under and the quota they are held to (`docs/protocol.md` §12).
//!
//! The core installs an entry with the handshake response that opens a session (an uplink datagram
//! of kind 2) or with an `Admit` message (the answer to an `AdmitQuery`, after a gateway restart or
//! a device moving here). For every `AdmittedTransport` frame the device link asks
//! [`AdmissionTable::check`]: one hash lookup, one SipHash-2-4 over the frame, one compare, and the
//! quota's counters; nothing allocates and nothing waits. A frame with a bad tag is dropped before
//! it costs uplink capacity or core CPU.
//!
//! The key authenticates frames and nothing else: it is drawn by the core independently of the
//! end-to-end keys, opens no ciphertext and names no device, so holding it tells the gateway no
//! more than it already sees (a session id, sizes, timing).
//!
//! Memory: one 36-byte entry per admitted session (key 16, expiry and quota counters in seconds
//! and `u32`s, the quota itself interned as a 2-byte index since sessions of one profile share it)
//! plus a control byte; with hash-table slack 40 to 80 bytes per session. The table is bounded
//! (`[admission] max_sessions`); expired entries go at the flow sweep, and at once when a frame
//! finds them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use relay_protocol::{Admission, AdmissionKey, Quota, SessionId};

/// The most frames held for one session while the core is asked about it.
pub const PENDING_PER_SESSION: usize = crate::pending::PER_SESSION;

/// What [`AdmissionTable::check`] found for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Admitted, the tag matches and the session is within its quota: forward it.
    Pass,
    /// The tag does not match the session's key (`admission_mac`).
    BadTag,
    /// The tag matches but the session used up its quota for this window (`quota`).
    OverQuota,
    /// The session's admission ran out; the entry is removed (`expired`).
    Expired,
    /// No admission for the session.
    Unknown,
}

/// An admission could not be installed: the table holds `max_sessions` live entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("admission table full ({limit} sessions)")]
pub struct AdmissionTableFull {
    /// The limit in force.
    pub limit: usize,
}

/// The bounded, expiring table of admitted sessions.
#[derive(Debug)]
pub struct AdmissionTable {
    inner: Mutex<Inner>,
    /// `inner.by_id.len()`, readable without the lock.
    len: AtomicUsize,
    /// Seconds are counted from here, so that times fit in a `u32`.
    epoch: Instant,
    max: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<SessionId, Entry, SeededIds>,
    quotas: Quotas,
    /// When a full table was last swept for room (seconds), so that a full table of live entries
    /// is not rescanned on every install.
    full_sweep_secs: Option<u32>,
}

/// Hashing for session ids: a multiply by an odd constant after mixing in a per-process random
/// seed. Session ids are chosen at random by the core, but forged frames carry ids an attacker
/// picks: the seed keeps those from being aimed at one bucket, and the hash costs a few
/// nanoseconds instead of SipHash's dozens on the per-frame path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SeededIds(u64);

impl Default for SeededIds {
    fn default() -> Self {
        Self(rand::random::<u64>() | 1)
    }
}

impl std::hash::BuildHasher for SeededIds {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

/// The hasher of [`SeededIds`].
#[derive(Debug)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `SessionId` (it writes a u32), but correct for anything.
        for b in bytes {
            self.write_u32(u32::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        let x = (u64::from(n) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29) ^ self.0.rotate_left(17);
    }

    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^ (x >> 31)
    }
}

/// One admitted session: 32 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: AdmissionKey,
    /// Seconds since the epoch at which the admission ends.
    expires_secs: u32,
    /// Frames and bytes counted in the current window.
    frames: u32,
    bytes: u32,
    /// The current window's number (seconds / interval), truncated to 16 bits; the sweep resets
    /// counters of old windows long before the number could come round again.
    window: u16,
    /// Index into [`Quotas`]; 0 is unlimited.
    quota: u16,
}

/// The distinct quotas in use, each stored once. Sessions of one profile share a quota, so there
/// are few; the list is bounded by `u16` indices and rebuilt from the entries when full.
#[derive(Debug)]
struct Quotas {
    list: Vec<Quota>,
    index: HashMap<(u32, u32, u16), u16>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            // Index 0: unlimited.
            list: vec![Quota::default()],
            index: HashMap::new(),
        }
    }
}

/// The most distinct quotas (indices are `u16`).
const MAX_QUOTAS: usize = 1 << 16;

fn quota_key(q: &Quota) -> (u32, u32, u16) {
    (q.frames, q.bytes, q.interval_secs)
}

impl Quotas {
    fn get(&self, index: u16) -> Quota {
        self.list
            .get(usize::from(index))
            .copied()
            .unwrap_or_default()
    }

    /// The index of `q`, added if new; `None` if the list is full.
    fn intern(&mut self, q: Quota) -> Option<u16> {
        if q.is_unlimited() {
            return Some(0);
        }
        if let Some(i) = self.index.get(&quota_key(&q)) {
            return Some(*i);
        }
        if self.list.len() >= MAX_QUOTAS {
            return None;
        }
        let i = u16::try_from(self.list.len()).ok()?;
        self.list.push(q);
        self.index.insert(quota_key(&q), i);
        Some(i)
    }

    /// Keeps only the quotas `entries` refer to, renumbering the entries.
    fn rebuild(&mut self, entries: &mut HashMap<SessionId, Entry, SeededIds>) {
        let old = std::mem::take(self);
        for e in entries.values_mut() {
            // Every quota in use fits again: there are no more of them than before.
            e.quota = self.intern(old.get(e.quota)).unwrap_or(0);
        }
    }
}

impl AdmissionTable {
    /// An empty table holding at most `max` sessions; `epoch` is the time origin
    /// (`Instant::now()`).
    pub fn new(max: usize, epoch: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            len: AtomicUsize::new(0),
            epoch,
            max: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Entries are plain values updated field by field: a panic elsewhere cannot leave one in
        // a state worse than stopping the relay would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// Installs (or renews) `admission` at `now`. A renewed session keeps its quota counters.
    pub fn install(&self, admission: &Admission, now: Instant) -> Result<(), AdmissionTableFull> {
        let secs = self.secs(now);
        let mut inner = self.lock();
        let Inner {
            by_id,
            quotas,
            full_sweep_secs,
        } = &mut *inner;
        if !by_id.contains_key(&admission.session) && by_id.len() >= self.max {
            // Make room from expired entries, at most once a second while the table stays full.
            if *full_sweep_secs != Some(secs) {
                *full_sweep_secs = Some(secs);
                by_id.retain(|_, e| e.expires_secs > secs);
            }
            if by_id.len() >= self.max {
                self.len.store(by_id.len(), Ordering::Relaxed);
                return Err(AdmissionTableFull { limit: self.max });
            }
        }
        let quota = match quotas.intern(admission.quota) {
            Some(i) => i,
            None => {
                quotas.rebuild(by_id);
                quotas
                    .intern(admission.quota)
                    .ok_or(AdmissionTableFull { limit: self.max })?
            }
        };
        let expires_secs = secs.saturating_add(admission.lifetime_secs);
        by_id
            .entry(admission.session)
            .and_modify(|e| {
                e.key = admission.key;
                e.expires_secs = expires_secs;
                e.quota = quota;
            })
            .or_insert(Entry {
                key: admission.key,
                expires_secs,
                frames: 0,
                bytes: 0,
                window: 0,
                quota,
            });
        self.len.store(by_id.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Checks `frame`, a whole `AdmittedTransport` datagram whose receiver is `session`, at `now`,
    /// and counts it against the session's quota if it passes. Frames that fail the tag, or are
    /// over the quota, are not counted.
    pub fn check(&self, session: SessionId, frame: &[u8], now: Instant) -> Check {
        if self.len.load(Ordering::Relaxed) == 0 {
            return Check::Unknown;
        }
        let secs = self.secs(now);
        let mut inner = self.lock();
        let Inner { by_id, quotas, .. } = &mut *inner;
        let Some(entry) = by_id.get_mut(&session) else {
            return Check::Unknown;
        };
        if secs >= entry.expires_secs {
            by_id.remove(&session);
            self.len.store(by_id.len(), Ordering::Relaxed);
            return Check::Expired;
        }
        if !entry.key.verify(frame) {
            return Check::BadTag;
        }
        if entry.quota == 0 {
            return Check::Pass;
        }
        let quota = quotas.get(entry.quota);
        let window = window_of(secs, quota.interval_secs);
        if window != entry.window {
            entry.window = window;
            entry.frames = 0;
            entry.bytes = 0;
        }
        let frames = entry.frames.saturating_add(1);
        let bytes = entry
            .bytes
            .saturating_add(u32::try_from(frame.len()).unwrap_or(u32::MAX));
        if (quota.frames != 0 && frames > quota.frames) || (quota.bytes != 0 && bytes > quota.bytes)
        {
            return Check::OverQuota;
        }
        entry.frames = frames;
        entry.bytes = bytes;
        Check::Pass
    }

    /// Checks `frame`'s tag like [`check`](Self::check) but counts nothing against the quota and
    /// removes nothing: for the first frame of a device stream, which opens a stream rather than
    /// carrying a reading. An expired admission reads as [`Check::Expired`]; never
    /// [`Check::OverQuota`].
    pub fn verify(&self, session: SessionId, frame: &[u8], now: Instant) -> Check {
        if self.len.load(Ordering::Relaxed) == 0 {
            return Check::Unknown;
        }
        let secs = self.secs(now);
        let inner = self.lock();
        let Some(entry) = inner.by_id.get(&session) else {
            return Check::Unknown;
        };
        if secs >= entry.expires_secs {
            Check::Expired
        } else if entry.key.verify(frame) {
            Check::Pass
        } else {
            Check::BadTag
        }
    }

    /// Whether `session` holds an admission that has not expired at `now`.
    pub fn contains(&self, session: SessionId, now: Instant) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let secs = self.secs(now);
        self.lock()
            .by_id
            .get(&session)
            .is_some_and(|e| secs < e.expires_secs)
    }

    /// Forgets `sessions` (the core revoked them).
    pub fn remove(&self, sessions: &[SessionId]) -> usize {
        if self.len.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let mut inner = self.lock();
        for id in sessions {
            inner.by_id.remove(id);
        }
        let left = inner.by_id.len();
        self.len.store(left, Ordering::Relaxed);
        left
    }

    /// Forgets every expired admission, resets the counters of windows that are over (so that a
    /// 16-bit window number never comes round to a stale count), and gives memory back after a
    /// mass expiry. Returns how many were removed and how many remain.
    pub fn sweep(&self, now: Instant) -> (usize, usize) {
        let secs = self.secs(now);
        let mut inner = self.lock();
        let Inner { by_id, quotas, .. } = &mut *inner;
        let before = by_id.len();
        by_id.retain(|_, e| {
            if secs >= e.expires_secs {
                return false;
            }
            if e.quota != 0 {
                let window = window_of(secs, quotas.get(e.quota).interval_secs);
                if window != e.window {
                    e.window = window;
                    e.frames = 0;
                    e.bytes = 0;
                }
            }
            true
        });
        let after = by_id.len();
        if by_id.capacity() > 1024 && after * 4 < by_id.capacity() {
            by_id.shrink_to(after * 2);
        }
        // Quotas no session uses any more are dropped once they make up most of the list.
        if quotas.list.len() > 64 && after < quotas.list.len() {
            quotas.rebuild(by_id);
        }
        self.len.store(after, Ordering::Relaxed);
        (before - after, after)
    }

    /// How many sessions are admitted (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no session is admitted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The fixed window `secs` falls in, for an interval of `interval_secs` (never 0 for a limited
/// quota), truncated to 16 bits.
fn window_of(secs: u32, interval_secs: u16) -> u16 {
    (secs / u32::from(interval_secs.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admission(id: u32, lifetime_secs: u32, quota: Quota) -> Admission {
        Admission {
            session: SessionId(id),
            key: AdmissionKey([id as u8; 16]),
            lifetime_secs,
            quota,
        }
    }

    /// An `AdmittedTransport` frame for `id`, tagged under `key`, `len` bytes in all.
    fn frame(id: u32, key: &AdmissionKey, counter: u64, len: usize) -> Vec<u8> {
        let mut f = vec![1, 4];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&counter.to_be_bytes());
        f.resize(len - 8, 0xa5);
        let tag = key.tag(&f);
        f.extend_from_slice(&tag);
        f
    }

    const UNLIMITED: Quota = Quota {
        frames: 0,
        bytes: 0,
        interval_secs: 0,
    };

    #[test]
    fn entries_stay_compact() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
        assert_eq!(std::mem::size_of::<(SessionId, Entry)>(), 36);
    }

    #[test]
    fn a_good_tag_passes_and_a_bad_one_does_not() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(10, t0);
        assert_eq!(t.check(SessionId(5), &[1, 4], t0), Check::Unknown);
        let a = admission(5, 60, UNLIMITED);
        t.install(&a, t0).expect("room");
        assert_eq!(t.len(), 1);
        let good = frame(5, &a.key, 1, 60);
        assert_eq!(t.check(SessionId(5), &good, t0), Check::Pass);
        for i in [0, 5, 20, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert_eq!(t.check(SessionId(5), &bad, t0), Check::BadTag, "byte {i}");
        }
        let forged = frame(5, &AdmissionKey([9; 16]), 2, 60);
        assert_eq!(t.check(SessionId(5), &forged, t0), Check::BadTag);
        assert_eq!(t.check(SessionId(5), &good[..4], t0), Check::BadTag);
        assert_eq!(t.check(SessionId(6), &good, t0), Check::Unknown);
        assert!(t.contains(SessionId(5), t0));
        assert!(!t.contains(SessionId(6), t0));
    }

    #[test]
    fn verify_checks_the_tag_and_counts_nothing() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(10, t0);
        let quota = Quota {
            frames: 1,
            bytes: 0,
            interval_secs: 60,
        };
        let a = admission(5, 30, quota);
        assert_eq!(t.verify(SessionId(5), &[1, 4], t0), Check::Unknown);
        t.install(&a, t0).expect("room");
        let good = frame(5, &a.key, 1, 60);
        for _ in 0..3 {
            assert_eq!(t.verify(SessionId(5), &good, t0), Check::Pass);
        }
        let mut bad = good.clone();
        bad[20] ^= 1;
        assert_eq!(t.verify(SessionId(5), &bad, t0), Check::BadTag);
        assert_eq!(t.verify(SessionId(6), &good, t0), Check::Unknown);
        // The quota is untouched: the one frame allowed still passes.
        assert_eq!(t.check(SessionId(5), &good, t0), Check::Pass);
        assert_eq!(t.check(SessionId(5), &good, t0), Check::OverQuota);
        assert_eq!(
            t.verify(SessionId(5), &good, t0 + Duration::from_secs(30)),
            Check::Expired
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn quota_is_a_fixed_window_counting_only_tagged_frames() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(10, t0);
        let quota = Quota {
            frames: 3,
            bytes: 1000,
            interval_secs: 10,
        };
        let a = admission(7, 3600, quota);
        t.install(&a, t0).expect("room");
        let f = frame(7, &a.key, 1, 100);
        let mut bad = f.clone();
        bad[30] ^= 1;
        // Bad frames do not use the quota up.
        for _ in 0..10 {
            assert_eq!(t.check(SessionId(7), &bad, t0), Check::BadTag);
        }
        for _ in 0..3 {
            assert_eq!(t.check(SessionId(7), &f, t0), Check::Pass);
        }
        assert_eq!(t.check(SessionId(7), &f, t0), Check::OverQuota);
        assert_eq!(
            t.check(SessionId(7), &f, t0 + Duration::from_secs(9)),
            Check::OverQuota
        );
        // The next window starts afresh.
        let next = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(t.check(SessionId(7), &f, next), Check::Pass);
        }
        assert_eq!(t.check(SessionId(7), &f, next), Check::OverQuota);

        // Bytes: 1020 per window, so nine 110-byte frames and not a tenth.
        let by_bytes = Quota {
            frames: 0,
            bytes: 1020,
            interval_secs: 1,
        };
        let b = admission(8, 3600, by_bytes);
        t.install(&b, t0).expect("room");
        let g = frame(8, &b.key, 1, 110);
        for _ in 0..9 {
            assert_eq!(t.check(SessionId(8), &g, t0), Check::Pass);
        }
        assert_eq!(t.check(SessionId(8), &g, t0), Check::OverQuota);
        // A smaller frame that still fits passes (990 + 30).
        let small = frame(8, &b.key, 2, 30);
        assert_eq!(t.check(SessionId(8), &small, t0), Check::Pass);
        assert_eq!(
            t.check(SessionId(8), &g, t0 + Duration::from_secs(1)),
            Check::Pass
        );
        // Both sessions share nothing; quotas are interned once each.
        assert_eq!(t.lock().quotas.list.len(), 3);
    }

    #[test]
    fn the_sweep_resets_old_windows() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(10, t0);
        let a = admission(
            3,
            u32::MAX,
            Quota {
                frames: 1,
                bytes: 0,
                interval_secs: 1,
            },
        );
        t.install(&a, t0).expect("room");
        let f = frame(3, &a.key, 1, 40);
        assert_eq!(t.check(SessionId(3), &f, t0), Check::Pass);
        t.sweep(t0 + Duration::from_secs(1));
        // 65536 windows later the truncated window number is the same again; the sweep in between
        // cleared the count.
        assert_eq!(
            t.check(SessionId(3), &f, t0 + Duration::from_secs(65536)),
            Check::Pass
        );
    }

    #[test]
    fn admissions_expire() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(10, t0);
        let a = admission(1, 30, UNLIMITED);
        let b = admission(2, 90, UNLIMITED);
        t.install(&a, t0).expect("room");
        t.install(&b, t0).expect("room");
        let f = frame(1, &a.key, 1, 40);
        assert_eq!(
            t.check(SessionId(1), &f, t0 + Duration::from_secs(29)),
            Check::Pass
        );
        assert!(!t.contains(SessionId(1), t0 + Duration::from_secs(30)));
        // The frame that finds it expired removes it; the next one finds nothing.
        assert_eq!(
            t.check(SessionId(1), &f, t0 + Duration::from_secs(30)),
            Check::Expired
        );
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.check(SessionId(1), &f, t0 + Duration::from_secs(31)),
            Check::Unknown
        );
        // The sweep removes the rest; renewing extends.
        t.install(&admission(2, 200, UNLIMITED), t0 + Duration::from_secs(60))
            .expect("renewed");
        assert_eq!(t.sweep(t0 + Duration::from_secs(100)), (0, 1));
        assert_eq!(t.sweep(t0 + Duration::from_secs(260)), (1, 0));
        assert!(t.is_empty());
    }

    #[test]
    fn is_bounded_and_makes_room_from_expired_entries() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(2, t0);
        t.install(&admission(1, 10, UNLIMITED), t0).expect("room");
        t.install(&admission(2, 100, UNLIMITED), t0).expect("room");
        assert_eq!(
            t.install(&admission(3, 100, UNLIMITED), t0),
            Err(AdmissionTableFull { limit: 2 })
        );
        // Renewing a known session needs no room.
        t.install(&admission(2, 100, UNLIMITED), t0).expect("known");
        // Once session 1 expired, it makes room.
        t.install(&admission(3, 100, UNLIMITED), t0 + Duration::from_secs(11))
            .expect("room after expiry");
        assert_eq!(t.len(), 2);
        assert!(t.contains(SessionId(3), t0 + Duration::from_secs(11)));
        assert_eq!(t.remove(&[SessionId(3), SessionId(9)]), 1);
    }

    #[test]
    fn quotas_are_interned_and_rebuilt_when_unused() {
        let t0 = Instant::now();
        let t = AdmissionTable::new(1000, t0);
        for i in 1..=200u32 {
            let q = Quota {
                frames: i,
                bytes: 0,
                interval_secs: 60,
            };
            t.install(&admission(i, if i <= 190 { 5 } else { 100 }, q), t0)
                .expect("room");
        }
        assert_eq!(t.lock().quotas.list.len(), 201);
        assert_eq!(t.sweep(t0 + Duration::from_secs(10)), (190, 10));
        assert_eq!(t.lock().quotas.list.len(), 11);
        // The survivors kept their own quota: session 195 passes 195 frames and not one more.
        let a = admission(195, 0, UNLIMITED);
        let f = frame(195, &a.key, 1, 40);
        let now = t0 + Duration::from_secs(10);
        for _ in 0..195 {
            assert_eq!(t.check(SessionId(195), &f, now), Check::Pass);
        }
        assert_eq!(t.check(SessionId(195), &f, now), Check::OverQuota);
    }
}
