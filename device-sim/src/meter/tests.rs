//! A meter driven against an in-memory core over a simulated network with virtual time.

use std::collections::VecDeque;

use relay_protocol::frame::{DeviceFrame, FrameType};

use super::*;
use crate::test_core::TestCore;

const SERIAL: &str = "meter-00001";
const SIZE: usize = 48;
const ONE_WAY: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

type Filter = Box<dyn FnMut(&[u8]) -> bool>;

/// One meter, one core, a link with a fixed one-way delay and optional loss in each direction.
struct Sim {
    start: Instant,
    now: Instant,
    meter: Meter,
    core: TestCore,
    link: VecDeque<(Instant, Dir, Vec<u8>)>,
    /// Returns false to drop an upstream (meter → core) datagram.
    pass_up: Filter,
    /// Returns false to drop a downstream datagram.
    pass_down: Filter,
    events: Vec<(Instant, MeterEvent)>,
    /// Every datagram the meter sent, with the time.
    uplink: Vec<(Instant, Vec<u8>)>,
    next_seq: u64,
    max_in_flight: usize,
    /// The meter's private key, to make the same device again (a restart).
    key_hex: String,
}

fn fast_config() -> MeterConfig {
    MeterConfig::default()
}

impl Sim {
    fn new(config: MeterConfig) -> Self {
        let core = TestCore::new();
        let start = Instant::now();
        let keypair = StaticKeypair::generate().expect("keypair");
        let key_hex = keypair.private_hex_for_storage();
        let meter = Meter::new(
            SERIAL,
            keypair,
            core.public(),
            config,
            Timebase::new(start, 1_700_000_000_000),
            7,
        );
        Self {
            start,
            now: start,
            meter,
            core,
            link: VecDeque::new(),
            pass_up: Box::new(|_| true),
            pass_down: Box::new(|_| true),
            events: Vec::new(),
            uplink: Vec::new(),
            next_seq: seq_base(1_700_000_000_000),
            max_in_flight: 0,
            key_hex,
        }
    }

    /// The same device restarted at `self.now`: a new meter with the same key and clock, no
    /// session, an empty outbox.
    fn restart_meter(&mut self, config: MeterConfig) {
        self.meter = Meter::new(
            SERIAL,
            StaticKeypair::from_private_hex(&self.key_hex).expect("key"),
            self.core.public(),
            config,
            Timebase::new(self.start, 1_700_000_000_000),
            9,
        );
        self.uplink.clear();
        self.events.clear();
    }

    fn queue(&mut self, n: usize) {
        for _ in 0..n {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.meter
                .queue_reading(
                    ReadingSeq(seq),
                    reading_payload(SERIAL, seq, SIZE),
                    self.now,
                )
                .expect("queued");
        }
    }

    /// Everything that happens at `self.now`.
    fn settle(&mut self) {
        while self.link.front().is_some_and(|(at, _, _)| *at <= self.now) {
            let Some((_, dir, d)) = self.link.pop_front() else {
                break;
            };
            match dir {
                Dir::Up => {
                    for reply in self.core.handle(&d, self.now) {
                        if (self.pass_down)(&reply) {
                            self.link.push_back((self.now + ONE_WAY, Dir::Down, reply));
                        }
                    }
                }
                Dir::Down => {
                    let _ = self.meter.handle_datagram(&d, self.now);
                }
            }
        }
        while let Some(d) = self.meter.poll_transmit(self.now) {
            self.uplink.push((self.now, d.clone()));
            if (self.pass_up)(&d) {
                self.link.push_back((self.now + ONE_WAY, Dir::Up, d));
            }
        }
        self.max_in_flight = self.max_in_flight.max(self.meter.in_flight());
        while let Some(ev) = self.meter.poll_event() {
            self.events.push((self.now, ev));
        }
    }

    /// Runs until `done` holds or virtual time passes `limit` from now; returns whether `done`.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            self.settle();
            if done(self) {
                return true;
            }
            let next = [
                self.meter.poll_timeout(),
                self.link.front().map(|(at, _, _)| *at),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= deadline => self.now = self.now.max(t),
                _ => {
                    self.now = deadline;
                    self.settle();
                    return done(self);
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    fn drained(&self) -> bool {
        self.meter.outstanding() == 0
    }

    fn acked(&self) -> Vec<ReadingSeq> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                MeterEvent::Acked { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn handshake_inits(&self) -> Vec<(Instant, SessionId)> {
        self.uplink
            .iter()
            .filter_map(|(at, d)| match DeviceFrame::decode(d) {
                Ok(DeviceFrame::HandshakeInit { sender, .. }) => Some((*at, sender)),
                _ => None,
            })
            .collect()
    }

    /// Every queued reading is in the core's store exactly as generated.
    fn assert_stored(&self, count: u64) {
        let stored = self
            .core
            .store
            .get(self.meter.public())
            .expect("stored readings");
        assert_eq!(stored.len() as u64, count);
        for (seq, data) in stored {
            assert_eq!(data, &reading_payload(SERIAL, *seq, SIZE));
        }
    }
}

fn is_transport(d: &[u8]) -> bool {
    matches!(DeviceFrame::decode(d), Ok(DeviceFrame::Transport { .. }))
}

#[test]
fn delivers_readings_and_reports_acks() {
    let mut sim = Sim::new(fast_config());
    sim.queue(100);
    assert!(sim.run_until(Duration::from_secs(10), Sim::drained));

    let s = *sim.meter.stats();
    assert_eq!(
        (s.queued, s.sent, s.acked, s.retransmitted),
        (100, 100, 100, 0)
    );
    assert_eq!(
        (s.handshakes_started, s.handshakes, s.bad_datagrams),
        (1, 1, 0)
    );
    assert!(
        sim.max_in_flight <= 32,
        "window exceeded: {}",
        sim.max_in_flight
    );
    sim.assert_stored(100);

    let mut acked = sim.acked();
    assert_eq!(acked.len(), 100);
    acked.sort();
    acked.dedup();
    assert_eq!(acked.len(), 100);
    assert!(matches!(sim.events[0].1, MeterEvent::Established { .. }));
    for (_, e) in &sim.events[1..] {
        let MeterEvent::Acked { latency, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(*latency, 2 * ONE_WAY);
    }
    // End to end: no plaintext on the wire.
    for (_, d) in &sim.uplink {
        assert!(!d.windows(SERIAL.len()).any(|w| w == SERIAL.as_bytes()));
    }
    // Nothing more to do once everything is acknowledged, until the rekey time.
    assert!(sim.meter.poll_transmit(sim.now).is_none());
    assert!(sim
        .meter
        .poll_timeout()
        .is_some_and(|t| t > sim.now + Duration::from_secs(3000)));
}

#[test]
fn retransmits_lost_frames_in_both_directions_until_acknowledged() {
    let mut sim = Sim::new(fast_config());
    let mut up = 0u32;
    sim.pass_up = Box::new(move |d| {
        up += 1;
        !is_transport(d) || up % 3 != 0
    });
    let mut down = 0u32;
    sim.pass_down = Box::new(move |d| {
        down += 1;
        !is_transport(d) || down % 4 != 0
    });
    sim.queue(200);
    assert!(sim.run_until(Duration::from_secs(120), Sim::drained));

    let s = *sim.meter.stats();
    assert_eq!((s.sent, s.acked), (200, 200));
    assert!(s.retransmitted > 50, "{s:?}");
    // A lost ack makes the core see the reading twice; it stores it once and acks again.
    assert!(sim.core.duplicates > 0);
    sim.assert_stored(200);
    assert_eq!(sim.acked().len(), 200);
}

#[test]
fn retransmission_backs_off_exponentially() {
    let mut sim = Sim::new(fast_config());
    sim.pass_up = Box::new(|d| !is_transport(d));
    sim.queue(1);
    sim.run_for(Duration::from_secs(20));
    let sends: Vec<Instant> = sim
        .uplink
        .iter()
        .filter(|(_, d)| is_transport(d))
        .map(|(at, _)| *at)
        .collect();
    let gaps: Vec<u64> = sends
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    // Silence after 3 s suspends sending and starts handshakes; before that: 500 ms, 1 s, …
    assert_eq!(&gaps[..2], &[500, 1000]);
}

#[test]
fn duplicate_replayed_and_forged_datagrams_are_harmless() {
    let mut sim = Sim::new(fast_config());
    // Keep a copy of every datagram from the core.
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let copy = seen.clone();
    sim.pass_down = Box::new(move |d| {
        copy.borrow_mut().push(d.to_vec());
        true
    });
    sim.queue(1);
    assert!(sim.run_until(Duration::from_secs(5), Sim::drained));
    let mut acks = seen.take();
    assert_eq!(sim.meter.stats().acked, 1);
    let ack = acks.pop().expect("an ack");

    // The same datagram again: a replay.
    let e = sim
        .meter
        .handle_datagram(&ack, sim.now)
        .expect_err("replay");
    assert_eq!(e.reason(), "replay");
    // Altered in flight (with a fresh counter, so that the replay window lets it through).
    let mut forged = ack.clone();
    forged[6..14].copy_from_slice(&1000u64.to_be_bytes());
    assert_eq!(
        sim.meter
            .handle_datagram(&forged, sim.now)
            .expect_err("forged")
            .reason(),
        "authentication"
    );
    // Garbage.
    assert_eq!(
        sim.meter
            .handle_datagram(&[1, 3, 0], sim.now)
            .expect_err("junk")
            .reason(),
        "malformed"
    );
    assert_eq!(sim.meter.stats().bad_datagrams, 3);

    // A genuine second acknowledgement of the same reading (the core saw a retransmission).
    let id = sim.core.session_ids()[0];
    let seq = ReadingSeq(seq_base(1_700_000_000_000));
    let dup = sim.core.seal_ack(id, vec![seq]).expect("sealed");
    sim.meter.handle_datagram(&dup, sim.now).expect("authentic");
    assert_eq!(sim.meter.stats().duplicate_acks, 1);
    assert_eq!(sim.meter.stats().acked, 1);
    while let Some(ev) = sim.meter.poll_event() {
        sim.events.push((sim.now, ev));
    }
    assert_eq!(sim.acked(), vec![seq]);

    // And the meter keeps working.
    sim.queue(5);
    assert!(sim.run_until(Duration::from_secs(5), Sim::drained));
    assert_eq!(sim.meter.stats().acked, 6);
}

#[test]
fn one_datagram_can_acknowledge_many_readings() {
    let mut sim = Sim::new(fast_config());
    sim.core.batch_acks = true;
    sim.queue(10);
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.meter.in_flight(), 10);
    let acks = sim.core.flush_acks();
    assert_eq!(acks.len(), 1);
    sim.meter.handle_datagram(&acks[0], sim.now).expect("ack");
    let mut n = 0;
    while let Some(ev) = sim.meter.poll_event() {
        assert!(matches!(ev, MeterEvent::Acked { .. }));
        n += 1;
    }
    assert_eq!(n, 10);
    assert_eq!(sim.meter.outstanding(), 0);
}

#[test]
fn a_full_outbox_refuses_readings() {
    let config = MeterConfig {
        outbox_cap: 4,
        ..fast_config()
    };
    let mut sim = Sim::new(config);
    sim.queue(4);
    let now = sim.now;
    let e = sim
        .meter
        .queue_reading(ReadingSeq(1), vec![0; 8], now)
        .expect_err("full");
    assert_eq!(e, QueueError::OutboxFull { cap: 4 });
    assert_eq!(sim.meter.stats().refused, 1);
    let first = ReadingSeq(seq_base(1_700_000_000_000));
    assert_eq!(
        sim.meter.queue_reading(first, vec![], now),
        Err(QueueError::DuplicateSeq(first))
    );
    assert!(matches!(
        sim.meter
            .queue_reading(ReadingSeq(2), vec![0; MAX_READING + 1], now),
        Err(QueueError::TooLarge { .. })
    ));
    assert!(sim.run_until(Duration::from_secs(5), Sim::drained));
    // Room again.
    sim.queue(4);
    assert!(sim.run_until(Duration::from_secs(5), Sim::drained));
    assert_eq!(sim.meter.stats().acked, 8);
}

#[test]
fn rehandshakes_after_a_core_restart_and_delivers_everything() {
    let mut sim = Sim::new(fast_config());
    sim.queue(20);
    assert!(sim.run_until(Duration::from_secs(5), Sim::drained));

    // The core restarts: its sessions are gone, frames on them are dropped unanswered.
    sim.core.restart();
    let restart = sim.now;
    for _ in 0..50 {
        sim.queue(1);
        sim.run_for(Duration::from_millis(200));
    }
    assert!(sim.run_until(Duration::from_secs(30), Sim::drained));

    let s = *sim.meter.stats();
    assert_eq!((s.handshakes, s.silence_rehandshakes), (2, 1), "{s:?}");
    assert_eq!(s.acked, 70);
    sim.assert_stored(70);
    let inits = sim.handshake_inits();
    assert_eq!(inits.len(), 2);
    let waited = inits[1].0 - restart;
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(sim.core.dropped > 0);
}

#[test]
fn silence_counts_only_while_readings_are_outstanding() {
    let mut sim = Sim::new(fast_config());
    sim.queue(1);
    assert!(sim.run_until(Duration::from_secs(5), Sim::drained));
    // A keepalive while idle, then a long quiet spell, then a reading on a slow path: no
    // re-handshake before the reading itself has waited the silence timeout.
    let id = sim.core.session_ids()[0];
    let keepalive = sim.core.seal(id, &Message::Keepalive).expect("sealed");
    sim.meter
        .handle_datagram(&keepalive, sim.now)
        .expect("authentic");
    sim.run_for(Duration::from_secs(60));
    let mut held = 0u32;
    sim.pass_up = Box::new(move |d| {
        held += 1;
        !is_transport(d) || held > 2
    });
    sim.queue(1);
    assert!(sim.run_until(Duration::from_secs(10), Sim::drained));
    let s = *sim.meter.stats();
    assert_eq!(
        (s.handshakes, s.silence_rehandshakes, s.retransmitted),
        (1, 0, 2),
        "{s:?}"
    );
}

#[test]
fn retries_handshakes_with_backoff_and_fresh_session_ids() {
    let mut sim = Sim::new(fast_config());
    sim.pass_up = Box::new(|_| false);
    sim.queue(3);
    sim.run_for(Duration::from_secs(140));
    let inits = sim.handshake_inits();
    let gaps: Vec<Duration> = inits.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let nominal = [1, 2, 4, 8, 16, 30, 30];
    assert!(gaps.len() >= nominal.len(), "{gaps:?}");
    for (gap, secs) in gaps.iter().zip(nominal) {
        let base = Duration::from_secs(secs);
        assert!(*gap >= base && *gap <= base.mul_f64(1.25), "{gaps:?}");
    }
    let mut ids: Vec<SessionId> = inits.iter().map(|(_, id)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), inits.len());
    assert_eq!(sim.meter.stats().sent, 0);

    // The core becomes reachable: the next retry gets through and the readings follow.
    sim.pass_up = Box::new(|_| true);
    assert!(sim.run_until(Duration::from_secs(40), Sim::drained));
    let s = *sim.meter.stats();
    assert_eq!((s.handshakes, s.acked, s.retransmitted), (1, 3, 0));
}

#[test]
fn rekeys_when_the_core_says_so_without_losing_readings() {
    let mut sim = Sim::new(fast_config());
    sim.core.rekey_after_secs = 60;
    for _ in 0..150 {
        sim.queue(1);
        sim.run_for(Duration::from_secs(1));
    }
    assert!(sim.run_until(Duration::from_secs(10), Sim::drained));
    let s = *sim.meter.stats();
    assert_eq!(s.handshakes, 3, "{s:?}");
    assert_eq!(
        (s.acked, s.retransmitted, s.silence_rehandshakes),
        (150, 0, 0)
    );
    sim.assert_stored(150);
    let inits = sim.handshake_inits();
    let at: Vec<u64> = inits
        .iter()
        .map(|(t, _)| (*t - sim.start).as_secs())
        .collect();
    assert_eq!(at, vec![0, 60, 120]);
}

#[test]
fn rekey_completes_while_acks_are_in_flight_on_the_old_session() {
    let mut sim = Sim::new(fast_config());
    sim.core.rekey_after_secs = 1;
    sim.core.batch_acks = true;
    sim.queue(5);
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.meter.in_flight(), 5);
    // Acks sealed on the first session, delivered after the second is established.
    let acks = sim.core.flush_acks();
    sim.run_until(Duration::from_secs(3), |s| s.meter.stats().handshakes == 2);
    for a in &acks {
        sim.meter
            .handle_datagram(a, sim.now)
            .expect("old session still opens");
    }
    assert_eq!(sim.meter.stats().acked, 5);
}

#[test]
fn handshake_timestamps_grow_even_when_the_clock_does_not() {
    // A timebase anchored after every `now` used: the wall clock reads 5 ms throughout.
    let core = TestCore::new();
    let now = Instant::now();
    let mut m = Meter::new(
        SERIAL,
        StaticKeypair::generate().expect("keypair"),
        core.public(),
        fast_config(),
        Timebase::new(now + Duration::from_secs(3600), 5),
        1,
    );
    let mut core = core;
    let a = m.poll_transmit(now).expect("init");
    assert_eq!(core.handle(&a, now).len(), 1);
    // The response is never delivered, so the meter retries.
    let later = now + Duration::from_secs(2);
    let b = m.poll_transmit(later).expect("retry");
    assert_eq!(core.handle(&b, later).len(), 1, "newer timestamp accepted");
}

#[test]
fn seq_base_and_payload() {
    assert_eq!(seq_base(1), 1 << 20);
    assert!(seq_base(1_700_000_000_000) + (1 << 20) <= seq_base(1_700_000_000_001));
    let p = reading_payload("meter-00001", 42, 40);
    assert_eq!(p.len(), 40);
    assert!(p.starts_with(b"meter-00001|seq=42|kwh=4.2|"));
    assert_eq!(p, reading_payload("meter-00001", 42, 40));
    assert_eq!(reading_payload("meter-00001", 42, 5), b"meter");
    assert_eq!(reading_payload("m", 1, 10_000).len(), MAX_READING);
}

fn frame_kind(d: &[u8]) -> Option<FrameType> {
    DeviceFrame::decode(d).ok().map(|f| f.frame_type())
}

#[test]
fn with_an_admission_key_every_reading_is_tagged() {
    let mut sim = Sim::new(fast_config());
    sim.core.admission = true;
    sim.queue(5);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.outstanding() == 0));
    let kinds: Vec<_> = sim.uplink.iter().map(|(_, d)| frame_kind(d)).collect();
    assert_eq!(kinds[0], Some(FrameType::HandshakeInit));
    assert!(
        kinds[1..]
            .iter()
            .all(|k| *k == Some(FrameType::AdmittedTransport)),
        "{kinds:?}"
    );
    assert_eq!((sim.core.bad_tags, sim.meter.stats().acked), (0, 5));
    // A frame altered after the tag was computed is stopped by the tag.
    let (_, frame) = sim.uplink.last().expect("a reading");
    let mut altered = frame.clone();
    altered[20] ^= 1;
    assert!(sim.core.handle(&altered, sim.now).is_empty());
    assert_eq!(sim.core.bad_tags, 1);
    assert_eq!(sim.meter.stats().frames_sent, 6);
}

#[test]
fn a_cookie_challenge_is_echoed_at_once_and_the_handshake_completes() {
    let mut sim = Sim::new(fast_config());
    sim.core.demand_cookies = true;
    sim.queue(2);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.outstanding() == 0));
    let kinds: Vec<_> = sim.uplink.iter().map(|(_, d)| frame_kind(d)).collect();
    assert_eq!(
        kinds[..2],
        [Some(FrameType::HandshakeInit), Some(FrameType::CookieInit)]
    );
    // The echo left as soon as the cookie came: one round trip after the initiation.
    assert_eq!(sim.uplink[1].0 - sim.uplink[0].0, 2 * ONE_WAY);
    let stats = sim.meter.stats();
    assert_eq!(
        (
            stats.cookie_challenges,
            stats.handshakes,
            stats.handshakes_started
        ),
        (1, 1, 2)
    );
    assert_eq!((sim.core.cookie_replies, sim.core.stale_cookies), (1, 0));
    assert_eq!(stats.bad_datagrams, 0);
    // A forged cookie reply (wrong receiver, or not sealed for this initiation) is dropped.
    let forged = [1u8, 5, 0, 0, 0, 1]
        .into_iter()
        .chain([0u8; 56])
        .collect::<Vec<u8>>();
    assert!(sim.meter.handle_datagram(&forged, sim.now).is_err());
}

#[test]
fn a_resumed_session_sends_at_once_past_its_counter_lease() {
    let mut sim = Sim::new(fast_config());
    sim.core.admission = true;
    sim.queue(3);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.outstanding() == 0));
    let (_, sent) = sim.meter.session_counter().expect("session");
    assert_eq!(sent, 3);
    let snapshot = sim
        .meter
        .session_snapshot(1024, sim.now)
        .expect("a working session");
    assert_eq!(snapshot.sent(), sent + 1024);
    let bytes = snapshot.encode();
    let snapshot = SessionSnapshot::decode(&bytes).expect("round trip");
    assert_eq!(snapshot.sent(), 1027);

    // The device sleeps a minute, restarts, and resumes: one datagram, no handshake.
    sim.now += Duration::from_secs(60);
    sim.restart_meter(fast_config());
    assert!(sim.meter.resume_session(&snapshot, sim.now));
    assert!(sim.meter.has_working_session());
    assert!(
        !sim.meter.resume_session(&snapshot, sim.now),
        "not over a session"
    );
    sim.queue(1);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.outstanding() == 0));
    assert_eq!(sim.uplink.len(), 1);
    let Ok(DeviceFrame::AdmittedTransport { counter, .. }) = DeviceFrame::decode(&sim.uplink[0].1)
    else {
        panic!("not a tagged transport frame");
    };
    assert_eq!(counter, 1027, "the lease is skipped");
    let stats = sim.meter.stats();
    assert_eq!(
        (
            stats.handshakes_started,
            stats.frames_sent,
            stats.resumptions
        ),
        (0, 1, 1)
    );
    assert_eq!(sim.core.handshakes, 1, "only the first run's");

    // Past its rekey time a snapshot is not resumed.
    let mut sim = Sim::new(fast_config());
    sim.core.rekey_after_secs = 2;
    sim.queue(1);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.outstanding() == 0));
    let short = sim.meter.session_snapshot(1024, sim.now).expect("snapshot");
    assert_eq!(short.rekey_after_secs(), 2);
    sim.now += Duration::from_secs(3);
    sim.restart_meter(fast_config());
    assert!(!sim.meter.resume_session(&short, sim.now));
    assert!(!sim.meter.has_working_session());
}
