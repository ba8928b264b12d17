//! Per-source token buckets for handshake initiations (`[handshakes]`): a device address that
//! sends more HandshakeInits than `per_source_per_sec` (with bursts of `per_source_burst`) has the
//! excess dropped here, counted as `gateway_frames_dropped_total{reason="handshake_rate"}`, so a
//! flooding source costs neither uplink capacity nor core CPU. Transport frames are not limited
//! here: they never reach this code.
//!
//! A source is a device address (IP and port), the same unit as a flow. A real meter handshakes
//! once per rekey period and retries with a backoff of 1 s doubling, far below the defaults. The
//! table is bounded (`max_sources`): buckets that have refilled completely carry no information
//! and are forgotten first; if the table is still full, a new source is let through unlimited
//! rather than refused, since refusing would let a flood from many spoofed sources lock real
//! devices out (the core's own limits are the backstop).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::config::HandshakeLimits;

/// One source's bucket: 8 bytes, so that even a table full of flooding sources stays small.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f32,
    /// Milliseconds since the limiter's epoch at the last refill (wrapping; a bucket is forgotten
    /// within seconds of refilling, long before a wrap could matter).
    at_ms: u32,
}

/// A source address as 8 bytes: IPv4 address and port exactly, IPv6 by a hash (two IPv6 sources
/// that collide share a bucket, which errs on the strict side for them only).
fn source_key(source: SocketAddr) -> u64 {
    match source {
        SocketAddr::V4(a) => u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port()),
        SocketAddr::V6(a) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            a.hash(&mut h);
            h.finish() | 1 << 63
        }
    }
}

/// Whether a handshake initiation may pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the source's rate.
    Pass,
    /// Over the source's rate: drop it.
    Drop,
    /// The table is full and could not make room: passed unlimited.
    Untracked,
}

/// The per-source buckets.
#[derive(Debug)]
pub struct HandshakeLimiter {
    limits: HandshakeLimits,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<u64, Bucket>,
    epoch: Instant,
    last_sweep_ms: u32,
}

impl Table {
    fn ms(&self, now: Instant) -> u32 {
        // Wrapping on purpose (see `Bucket::at_ms`).
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }
}

impl Table {
    /// Forgets every bucket that has refilled (it would start full anyway), and gives memory
    /// back when most of the table went: an idle device costs nothing here.
    fn sweep(&mut self, now_ms: u32, full_after_ms: u32) {
        self.buckets
            .retain(|_, b| now_ms.wrapping_sub(b.at_ms) < full_after_ms);
        if self.buckets.capacity() > 64 && self.buckets.len() < self.buckets.capacity() / 4 {
            self.buckets.shrink_to_fit();
        }
        self.last_sweep_ms = now_ms;
    }
}

impl HandshakeLimiter {
    /// An empty table with `limits`.
    pub fn new(limits: HandshakeLimits) -> Self {
        Self {
            limits,
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                epoch: Instant::now(),
                last_sweep_ms: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A bucket is two plain fields: nothing can be left torn by a panic elsewhere.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a token from `source`'s bucket at `now`.
    pub fn check(&self, source: SocketAddr, now: Instant) -> Verdict {
        let HandshakeLimits {
            per_source_per_sec: rate,
            per_source_burst: burst,
            max_sources,
        } = self.limits;
        let (rate, burst) = (rate as f32, burst as f32);
        // Whole milliseconds until an empty bucket is full again (at least 1).
        let full_after_ms = ((burst / rate) * 1000.0).ceil().max(1.0) as u32;
        let key = source_key(source);
        let mut table = self.lock();
        let now_ms = table.ms(now);
        // Once per refill time, and whenever the table is full.
        let due = now_ms.wrapping_sub(table.last_sweep_ms) >= full_after_ms;
        let full = |t: &Table| !t.buckets.contains_key(&key) && t.buckets.len() >= max_sources;
        if due || full(&table) {
            table.sweep(now_ms, full_after_ms);
            if full(&table) {
                return Verdict::Untracked;
            }
        }
        let bucket = table.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.wrapping_sub(bucket.at_ms) as f32 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Verdict::Pass
        } else {
            Verdict::Drop
        }
    }

    /// How many sources are tracked.
    pub fn sources(&self) -> usize {
        self.lock().buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(rate: u32, burst: u32, max_sources: usize) -> HandshakeLimiter {
        HandshakeLimiter::new(HandshakeLimits {
            per_source_per_sec: rate,
            per_source_burst: burst,
            max_sources,
        })
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let l = limiter(2, 4, 10);
        let t0 = Instant::now();
        let passed = (0..10)
            .filter(|_| l.check(addr(1), t0) == Verdict::Pass)
            .count();
        assert_eq!(passed, 4, "the burst");
        // Half a second later: one more token (2/s).
        assert_eq!(
            l.check(addr(1), t0 + Duration::from_millis(500)),
            Verdict::Pass
        );
        assert_eq!(
            l.check(addr(1), t0 + Duration::from_millis(500)),
            Verdict::Drop
        );
        // Another source is not affected by the first one's flood.
        assert_eq!(l.check(addr(2), t0), Verdict::Pass);
        // Long idle: back to a full burst, never more.
        let later = t0 + Duration::from_secs(3600);
        let passed = (0..10)
            .filter(|_| l.check(addr(1), later) == Verdict::Pass)
            .count();
        assert_eq!(passed, 4);
        // The sweep at that check forgot the other, refilled source: nothing stays per device.
        assert_eq!(l.sources(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_buckets_first() {
        let l = limiter(1, 2, 3);
        let t0 = Instant::now();
        for p in 1..=3 {
            assert_eq!(l.check(addr(p), t0), Verdict::Pass);
        }
        // Full, and every bucket still refilling: a new source passes untracked.
        assert_eq!(l.check(addr(4), t0), Verdict::Untracked);
        assert_eq!(l.sources(), 3);
        // Two seconds on, the old buckets are full again and make room.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(l.check(addr(4), later), Verdict::Pass);
        assert!(l.sources() <= 3);
    }
}
