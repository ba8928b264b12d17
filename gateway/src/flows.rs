//! The flow table: which device address each [`FlowId`] stands for, both ways.
//!
//! The only state the device link and the uplink share, behind one mutex with a narrow API. It is
//! bounded (a new address past the limit is refused, existing flows keep working) and forgets a
//! flow whose device has been silent for the idle timeout.
//!
//! Memory per flow: one `SocketAddr → (FlowId, last_seen)` entry (40 bytes) and one
//! `FlowId → SocketAddr` entry (36 bytes), plus a control byte each; with hash-table slack that is
//! about 90 to 180 bytes per flow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use relay_protocol::FlowId;

/// A new device address arrived while the table held its maximum number of flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("flow table full ({limit} flows)")]
pub struct FlowTableFull {
    /// The limit in force.
    pub limit: usize,
}

/// A flow looked up or created for a device datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// The device address's flow.
    pub flow: FlowId,
    /// Flows in the table afterwards.
    pub flows: usize,
}

/// The bidirectional, bounded, expiring map between device addresses and flow ids.
#[derive(Debug)]
pub struct FlowTable {
    inner: Mutex<Inner>,
    /// Seconds are counted from here, so a flow's last-seen time fits in a `u32`.
    epoch: Instant,
    idle_timeout_secs: u32,
}

#[derive(Debug)]
struct Inner {
    by_addr: HashMap<SocketAddr, Entry>,
    by_flow: HashMap<FlowId, SocketAddr>,
    next: u32,
    /// The configured maximum, lowered to what the core accepts once it has said so.
    limit: usize,
    configured: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    flow: FlowId,
    last_seen_secs: u32,
}

impl FlowTable {
    /// An empty table holding at most `max` flows; a flow idle for `idle_timeout` is forgotten by
    /// the next [`expire_idle`](Self::expire_idle). `epoch` is the time origin (`Instant::now()`).
    pub fn new(max: usize, idle_timeout: Duration, epoch: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                by_addr: HashMap::new(),
                by_flow: HashMap::new(),
                next: 0,
                limit: max,
                configured: max,
            }),
            epoch,
            idle_timeout_secs: u32::try_from(idle_timeout.as_secs()).unwrap_or(u32::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that matters
        // more than stopping the relay would, so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// The flow of `addr`, created if new, and marks it active at `now`.
    pub fn flow_for(&self, addr: SocketAddr, now: Instant) -> Result<Assigned, FlowTableFull> {
        let secs = self.secs(now);
        let mut inner = self.lock();
        if let Some(entry) = inner.by_addr.get_mut(&addr) {
            entry.last_seen_secs = secs;
            let flow = entry.flow;
            return Ok(Assigned {
                flow,
                flows: inner.by_addr.len(),
            });
        }
        if inner.by_addr.len() >= inner.limit {
            return Err(FlowTableFull { limit: inner.limit });
        }
        // The table holds fewer than 2^32 flows (the limit is far below), so a free id is found
        // within `len + 1` steps.
        let mut flow = FlowId(inner.next);
        while inner.by_flow.contains_key(&flow) {
            flow = FlowId(flow.0.wrapping_add(1));
        }
        inner.next = flow.0.wrapping_add(1);
        inner.by_flow.insert(flow, addr);
        inner.by_addr.insert(
            addr,
            Entry {
                flow,
                last_seen_secs: secs,
            },
        );
        Ok(Assigned {
            flow,
            flows: inner.by_addr.len(),
        })
    }

    /// The device address of `flow`, if the flow is known.
    pub fn addr_of(&self, flow: FlowId) -> Option<SocketAddr> {
        self.lock().by_flow.get(&flow).copied()
    }

    /// Forgets every flow whose device has been silent for the idle timeout; returns how many
    /// were removed and how many remain.
    pub fn expire_idle(&self, now: Instant) -> (usize, usize) {
        let secs = self.secs(now);
        let timeout = self.idle_timeout_secs;
        let mut inner = self.lock();
        let before = inner.by_addr.len();
        let Inner {
            by_addr, by_flow, ..
        } = &mut *inner;
        by_addr.retain(|_, e| {
            let keep = secs.saturating_sub(e.last_seen_secs) < timeout;
            if !keep {
                by_flow.remove(&e.flow);
            }
            keep
        });
        let after = by_addr.len();
        // After a mass expiry give the memory back, but not on every small sweep.
        if by_addr.capacity() > 1024 && after * 4 < by_addr.capacity() {
            by_addr.shrink_to(after * 2);
            by_flow.shrink_to(after * 2);
        }
        (before - after, after)
    }

    /// Lowers the limit to what the core accepts (never above the configured maximum). Existing
    /// flows are kept.
    pub fn set_peer_limit(&self, peer_max: usize) {
        let mut inner = self.lock();
        inner.limit = inner.configured.min(peer_max);
    }

    /// The number of flows.
    pub fn len(&self) -> usize {
        self.lock().by_addr.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(test)]
    fn set_next(&self, next: u32) {
        self.lock().next = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn maps_both_ways_and_is_stable() {
        let t0 = Instant::now();
        let t = FlowTable::new(10, Duration::from_secs(60), t0);
        let a = t.flow_for(addr(1), t0).expect("room");
        let b = t.flow_for(addr(2), t0).expect("room");
        assert_ne!(a.flow, b.flow);
        assert_eq!(b.flows, 2);
        assert_eq!(t.flow_for(addr(1), t0).expect("known").flow, a.flow);
        assert_eq!(t.addr_of(a.flow), Some(addr(1)));
        assert_eq!(t.addr_of(b.flow), Some(addr(2)));
        assert_eq!(t.addr_of(FlowId(9999)), None);
        let v6: SocketAddr = "[2001:db8::1]:5683".parse().expect("addr");
        let c = t.flow_for(v6, t0).expect("room");
        assert_eq!(t.addr_of(c.flow), Some(v6));
    }

    #[test]
    fn is_bounded_but_serves_known_flows() {
        let t0 = Instant::now();
        let t = FlowTable::new(2, Duration::from_secs(60), t0);
        let a = t.flow_for(addr(1), t0).expect("room");
        t.flow_for(addr(2), t0).expect("room");
        assert_eq!(t.flow_for(addr(3), t0), Err(FlowTableFull { limit: 2 }));
        assert_eq!(t.flow_for(addr(1), t0).expect("known").flow, a.flow);
        assert_eq!(t.len(), 2);

        t.set_peer_limit(1);
        assert!(t.flow_for(addr(4), t0).is_err());
        assert!(t.flow_for(addr(2), t0).is_ok());
        t.set_peer_limit(usize::MAX);
        assert_eq!(t.flow_for(addr(3), t0), Err(FlowTableFull { limit: 2 }));
    }

    #[test]
    fn expires_idle_flows_in_both_directions() {
        let t0 = Instant::now();
        let t = FlowTable::new(10, Duration::from_secs(60), t0);
        let a = t.flow_for(addr(1), t0).expect("room");
        let b = t.flow_for(addr(2), t0).expect("room");
        // addr(2) stays active.
        t.flow_for(addr(2), t0 + Duration::from_secs(50))
            .expect("known");
        assert_eq!(t.expire_idle(t0 + Duration::from_secs(59)), (0, 2));
        assert_eq!(t.expire_idle(t0 + Duration::from_secs(61)), (1, 1));
        assert_eq!(t.addr_of(a.flow), None);
        assert_eq!(t.addr_of(b.flow), Some(addr(2)));
        // The expired address comes back as a new flow.
        let a2 = t
            .flow_for(addr(1), t0 + Duration::from_secs(62))
            .expect("room");
        assert_ne!(a2.flow, a.flow);
        assert_eq!(t.expire_idle(t0 + Duration::from_secs(200)), (2, 0));
        assert!(t.is_empty());
    }

    #[test]
    fn ids_wrap_and_skip_ids_in_use() {
        let t0 = Instant::now();
        let t = FlowTable::new(10, Duration::from_secs(60), t0);
        let zero = t.flow_for(addr(1), t0).expect("room");
        assert_eq!(zero.flow, FlowId(0));
        t.set_next(u32::MAX);
        assert_eq!(
            t.flow_for(addr(2), t0).expect("room").flow,
            FlowId(u32::MAX)
        );
        // Wrapped to 0, which addr(1) still holds.
        assert_eq!(t.flow_for(addr(3), t0).expect("room").flow, FlowId(1));
    }

    #[test]
    fn shrinks_after_mass_expiry() {
        let t0 = Instant::now();
        let t = FlowTable::new(100_000, Duration::from_secs(1), t0);
        for port in 0..5000 {
            t.flow_for(addr(port), t0).expect("room");
        }
        assert_eq!(t.expire_idle(t0 + Duration::from_secs(5)), (5000, 0));
        assert!(t.lock().by_addr.capacity() < 1024);
    }
}
