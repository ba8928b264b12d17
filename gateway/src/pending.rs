//! Frames held for sessions the gateway holds no admission for, until the core answers whether
//! they may pass (`AdmitQuery` → `Admit` or `NotAdmitted`).
//!
//! Owned by the device-link task alone. Bounded three ways: `[admission] pending_frames` frames in
//! all, [`PER_SESSION`] per session, and `[admission] pending_timeout_ms` from the query (frames
//! held while the uplink is down are queried, and their time starts, when it comes up). Frames past
//! a bound, or whose time ran out, are dropped by the caller (`unadmitted`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_protocol::SessionId;

/// The most frames held for one session (a sleepy meter's wake-up sends one).
pub const PER_SESSION: usize = 4;

/// One held device datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldFrame {
    /// Where it came from (its flow is assigned when it is released).
    pub from: SocketAddr,
    /// The whole `AdmittedTransport` datagram.
    pub frame: Bytes,
}

#[derive(Debug)]
struct Held {
    frames: Vec<HeldFrame>,
    /// When the query's answer is given up on; `None` until the query is sent.
    deadline: Option<Instant>,
}

/// What [`PendingAdmissions::hold`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Held behind earlier frames of the same session (already queried or waiting to be).
    Added,
    /// Held as the session's first frame: the session needs a query.
    New,
    /// Not held: a bound was reached.
    Refused,
}

/// The held frames, by session.
#[derive(Debug)]
pub(crate) struct PendingAdmissions {
    by_id: HashMap<SessionId, Held>,
    /// Queried sessions, oldest deadline first; an entry whose deadline differs from its
    /// session's (released, or queried again) is stale and skipped.
    deadlines: VecDeque<(Instant, SessionId)>,
    /// Sessions to name in the next `AdmitQuery`.
    to_query: Vec<SessionId>,
    frames: usize,
    max_frames: usize,
    timeout: Duration,
}

impl PendingAdmissions {
    /// An empty holder of at most `max_frames` frames, each waiting at most `timeout` for its
    /// query's answer.
    pub fn new(max_frames: usize, timeout: Duration) -> Self {
        Self {
            by_id: HashMap::new(),
            deadlines: VecDeque::new(),
            to_query: Vec::new(),
            frames: 0,
            max_frames,
            timeout,
        }
    }

    /// Holds a copy of `frame` from `from` for `id` if the bounds allow (nothing is copied
    /// otherwise). `may_add_session` is asked before a session that has nothing held yet is added
    /// (the query budget).
    pub fn hold(
        &mut self,
        id: SessionId,
        from: SocketAddr,
        frame: &[u8],
        may_add_session: impl FnOnce() -> bool,
    ) -> Hold {
        let copy = || HeldFrame {
            from,
            frame: Bytes::copy_from_slice(frame),
        };
        if self.frames >= self.max_frames {
            return Hold::Refused;
        }
        if let Some(held) = self.by_id.get_mut(&id) {
            if held.frames.len() >= PER_SESSION {
                return Hold::Refused;
            }
            held.frames.push(copy());
            self.frames += 1;
            return Hold::Added;
        }
        if !may_add_session() {
            return Hold::Refused;
        }
        self.by_id.insert(
            id,
            Held {
                frames: vec![copy()],
                deadline: None,
            },
        );
        self.frames += 1;
        Hold::New
    }

    /// Marks `id` as queried at `now` (its time starts) and puts it in the next query.
    pub fn queried(&mut self, id: SessionId, now: Instant) {
        let deadline = now + self.timeout;
        if let Some(held) = self.by_id.get_mut(&id) {
            held.deadline = Some(deadline);
            self.deadlines.push_back((deadline, id));
            self.to_query.push(id);
        }
    }

    /// Queries every held session again (the uplink came up: earlier queries, if any, went to a
    /// connection that is gone).
    pub fn requery_all(&mut self, now: Instant) {
        self.deadlines.clear();
        self.to_query.clear();
        let deadline = now + self.timeout;
        for (id, held) in &mut self.by_id {
            held.deadline = Some(deadline);
            self.deadlines.push_back((deadline, *id));
            self.to_query.push(*id);
        }
    }

    /// Stops every session's time (the uplink went down: the answers will not come, and the
    /// sessions are asked about again when it is back up).
    pub fn unquery_all(&mut self) {
        self.deadlines.clear();
        self.to_query.clear();
        for held in self.by_id.values_mut() {
            held.deadline = None;
        }
    }

    /// The sessions to query since the last call.
    pub fn take_queries(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.to_query)
    }

    /// Whether sessions wait to be named in a query.
    pub fn has_queries(&self) -> bool {
        !self.to_query.is_empty()
    }

    /// Takes the frames held for `id` (the core answered).
    pub fn release(&mut self, id: SessionId) -> Vec<HeldFrame> {
        match self.by_id.remove(&id) {
            Some(held) => {
                self.frames -= held.frames.len();
                held.frames
            }
            None => Vec::new(),
        }
    }

    /// The sessions whose answer did not come by `now`, with their frames, removed.
    pub fn expire(&mut self, now: Instant) -> Vec<(SessionId, Vec<HeldFrame>)> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let current = self
                .by_id
                .get(&id)
                .is_some_and(|h| h.deadline == Some(deadline));
            if current {
                out.push((id, self.release(id)));
            }
        }
        if self.by_id.is_empty() {
            self.deadlines.clear();
            if self.by_id.capacity() > 64 {
                self.by_id.shrink_to_fit();
                self.deadlines.shrink_to_fit();
            }
        }
        out
    }

    /// The earliest deadline, if a queried session waits.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        // Stale entries at the front would only wake the task early for nothing.
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if self
                .by_id
                .get(&id)
                .is_some_and(|h| h.deadline == Some(deadline))
            {
                return Some(deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames
    }

    /// Whether `id` has frames held.
    #[cfg(test)]
    pub fn contains(&self, id: SessionId) -> bool {
        self.by_id.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(n: u8) -> HeldFrame {
        HeldFrame {
            from: SocketAddr::from(([192, 0, 2, 1], 1000 + u16::from(n))),
            frame: Bytes::from(vec![1, 4, n]),
        }
    }

    #[test]
    fn holds_and_releases_in_order() {
        let t0 = Instant::now();
        let mut p = PendingAdmissions::new(16, Duration::from_secs(2));
        assert_eq!(
            p.hold(SessionId(1), held(1).from, &held(1).frame, || true),
            Hold::New
        );
        p.queried(SessionId(1), t0);
        assert_eq!(
            p.hold(
                SessionId(1),
                held(2).from,
                &held(2).frame,
                || unreachable!()
            ),
            Hold::Added
        );
        assert_eq!(
            p.hold(SessionId(2), held(3).from, &held(3).frame, || true),
            Hold::New
        );
        p.queried(SessionId(2), t0);
        assert_eq!(p.take_queries(), [SessionId(1), SessionId(2)]);
        assert!(!p.has_queries());
        assert_eq!(p.len(), 3);
        assert_eq!(p.release(SessionId(1)), [held(1), held(2)]);
        assert_eq!(p.len(), 1);
        assert!(p.release(SessionId(1)).is_empty());
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(p.release(SessionId(2)), [held(3)]);
        assert_eq!(p.next_deadline(), None);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn bounded_per_session_in_all_and_by_the_query_budget() {
        let mut p = PendingAdmissions::new(6, Duration::from_secs(2));
        assert_eq!(
            p.hold(SessionId(1), held(0).from, &held(0).frame, || true),
            Hold::New
        );
        for i in 1..PER_SESSION as u8 {
            assert_eq!(
                p.hold(SessionId(1), held(i).from, &held(i).frame, || true),
                Hold::Added
            );
        }
        assert_eq!(
            p.hold(SessionId(1), held(9).from, &held(9).frame, || true),
            Hold::Refused
        );
        // No budget for a new session's query: not held.
        assert_eq!(
            p.hold(SessionId(2), held(1).from, &held(1).frame, || false),
            Hold::Refused
        );
        assert!(!p.contains(SessionId(2)));
        assert_eq!(
            p.hold(SessionId(2), held(1).from, &held(1).frame, || true),
            Hold::New
        );
        assert_eq!(
            p.hold(SessionId(2), held(2).from, &held(2).frame, || true),
            Hold::Added
        );
        assert_eq!(p.len(), 6);
        // Full in all: even a known session's frame is refused, and nothing asks the budget.
        assert_eq!(
            p.hold(SessionId(2), held(3).from, &held(3).frame, || true),
            Hold::Refused
        );
        assert_eq!(
            p.hold(
                SessionId(3),
                held(3).from,
                &held(3).frame,
                || unreachable!()
            ),
            Hold::Refused
        );
        let mut none = PendingAdmissions::new(0, Duration::from_secs(2));
        assert_eq!(
            none.hold(SessionId(1), held(0).from, &held(0).frame, || true),
            Hold::Refused
        );
    }

    #[test]
    fn queried_sessions_time_out_unqueried_ones_wait() {
        let t0 = Instant::now();
        let mut p = PendingAdmissions::new(16, Duration::from_secs(2));
        // Held while the uplink is down: no deadline yet.
        assert_eq!(
            p.hold(SessionId(1), held(1).from, &held(1).frame, || true),
            Hold::New
        );
        assert_eq!(p.next_deadline(), None);
        assert!(p.expire(t0 + Duration::from_secs(60)).is_empty());
        // Queried when it comes up.
        p.requery_all(t0 + Duration::from_secs(60));
        assert_eq!(p.take_queries(), [SessionId(1)]);
        assert_eq!(
            p.hold(SessionId(2), held(2).from, &held(2).frame, || true),
            Hold::New
        );
        p.queried(SessionId(2), t0 + Duration::from_secs(61));
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(62)));
        assert!(p.expire(t0 + Duration::from_millis(61_999)).is_empty());
        assert_eq!(
            p.expire(t0 + Duration::from_secs(62)),
            [(SessionId(1), vec![held(1)])]
        );
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(63)));
        // The uplink goes down: no time runs out while it is.
        p.unquery_all();
        assert_eq!(p.next_deadline(), None);
        assert!(p.expire(t0 + Duration::from_secs(100)).is_empty());
        // Queried again (a new connection): the old deadline no longer applies.
        p.requery_all(t0 + Duration::from_secs(62));
        assert!(p.expire(t0 + Duration::from_secs(63)).is_empty());
        assert_eq!(
            p.expire(t0 + Duration::from_secs(64)),
            [(SessionId(2), vec![held(2)])]
        );
        assert_eq!(p.len(), 0);
        assert_eq!(p.next_deadline(), None);
    }
}
