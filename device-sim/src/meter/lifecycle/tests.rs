//! The credential lifecycle of a meter with a sealed key store, against in-memory cores running
//! the lifecycle (`crate::test_core`), over a simulated link in virtual time. A "restart" drops
//! the meter and its key store and rebuilds both from the device directory (sealed key files and
//! state file), as a rebooted device would.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use relay_protocol::frame::{DeviceFrame, HANDSHAKE_INIT_HEADER, HANDSHAKE_RESPONSE_HEADER};
use relay_protocol::payload::{INIT_PAYLOAD_LEN, RESPONSE_PAYLOAD_LEN};
use relay_protocol::session::KEY_LEN;

use super::*;
use crate::device_dir::{DeviceDir, DEFAULT_KEK_FILE};
use crate::meter::{reading_payload, seq_base};
use crate::test_core::{Status, TestCore};

const SERIAL: &str = "dev-000001";
const SIZE: usize = 32;
const ONE_WAY: Duration = Duration::from_millis(10);
const CORE_A: &str = "core-a.test:5684";
const CORE_B: &str = "core-b.test:5684";
const UNIX_START: u64 = 1_700_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

fn config() -> MeterConfig {
    MeterConfig {
        refused_retry_initial: Duration::from_secs(1),
        refused_retry_max: Duration::from_secs(4),
        ..MeterConfig::default()
    }
}

/// One device (directory, sealed store, meter), one or two cores, a link with a fixed delay.
struct Sim {
    _tmp: tempfile::TempDir,
    dir: DeviceDir,
    factory: PublicKey,
    start: Instant,
    now: Instant,
    meter: Meter,
    cores: Vec<(&'static str, TestCore)>,
    link: VecDeque<(Instant, Dir, usize, Vec<u8>)>,
    /// Every datagram each way, with the time.
    uplink: Vec<(Instant, Vec<u8>)>,
    downlink: Vec<(Instant, Vec<u8>)>,
    events: Vec<MeterEvent>,
    next_seq: u64,
    /// Where the crash hook stops the meter.
    crash_at: Arc<Mutex<Option<CrashPoint>>>,
    seed: u64,
}

impl Sim {
    /// A factory-fresh device, registered (claimed and activated) at core A.
    fn new() -> Self {
        Self::with(true, true)
    }

    fn with(claimed: bool, activated: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, factory) = DeviceDir::manufacture(
            &tmp.path().join(SERIAL),
            SERIAL,
            "m1",
            Path::new(DEFAULT_KEK_FILE),
        )
        .expect("manufacture");
        let mut a = TestCore::new();
        a.refuse_unknown = true;
        a.register(SERIAL, factory, claimed, activated);
        let start = Instant::now();
        let crash_at = Arc::new(Mutex::new(None));
        let meter = build(&dir, a.public(), start, start, &crash_at, 1);
        Self {
            _tmp: tmp,
            dir,
            factory,
            start,
            now: start,
            meter,
            cores: vec![(CORE_A, a)],
            link: VecDeque::new(),
            uplink: Vec::new(),
            downlink: Vec::new(),
            events: Vec::new(),
            next_seq: seq_base(UNIX_START),
            crash_at,
            seed: 1,
        }
    }

    fn core(&mut self, endpoint: &str) -> &mut TestCore {
        &mut self
            .cores
            .iter_mut()
            .find(|(e, _)| *e == endpoint)
            .expect("core")
            .1
    }

    fn a(&mut self) -> &mut TestCore {
        self.core(CORE_A)
    }

    /// The reboot: meter and key store dropped, rebuilt from the device directory.
    fn restart(&mut self) {
        self.link.clear();
        self.seed += 1;
        self.dir = DeviceDir::open(self.dir.path()).expect("reopen");
        let core = self.cores[0].1.public();
        self.meter = build(
            &self.dir,
            core,
            self.start,
            self.now,
            &self.crash_at,
            self.seed,
        );
    }

    fn crash_at(&self, point: Option<CrashPoint>) {
        *self.crash_at.lock().expect("lock") = point;
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

    /// The core the meter sends to now.
    fn target(&self) -> usize {
        let endpoint = self.meter.endpoint().unwrap_or(CORE_A);
        self.cores
            .iter()
            .position(|(e, _)| *e == endpoint)
            .expect("known endpoint")
    }

    fn settle(&mut self) {
        loop {
            while self.link.front().is_some_and(|(at, ..)| *at <= self.now) {
                let Some((_, dir, core, d)) = self.link.pop_front() else {
                    break;
                };
                match dir {
                    Dir::Up => {
                        for reply in self.cores[core].1.handle(&d, self.now) {
                            self.link
                                .push_back((self.now + ONE_WAY, Dir::Down, core, reply));
                        }
                    }
                    Dir::Down => {
                        self.downlink.push((self.now, d.clone()));
                        let _ = self.meter.handle_datagram(&d, self.now);
                    }
                }
            }
            // Events first (a release re-targets before the next datagram goes out), as the
            // fleet does.
            self.drain_events();
            let mut sent = false;
            while let Some(d) = self.meter.poll_transmit(self.now) {
                sent = true;
                self.uplink.push((self.now, d.clone()));
                let core = self.target();
                self.link.push_back((self.now + ONE_WAY, Dir::Up, core, d));
            }
            if !self.drain_events() && !sent {
                break;
            }
        }
    }

    fn drain_events(&mut self) -> bool {
        if self.meter.crashed() {
            // The process is gone: nothing it had not written yet gets written.
            return false;
        }
        let mut any = false;
        while let Some(ev) = self.meter.poll_event() {
            any = true;
            if ev == MeterEvent::StateChanged {
                self.dir
                    .save(&self.meter.memory(), self.next_seq)
                    .expect("save state");
            }
            self.events.push(ev);
        }
        any
    }

    fn run_until(&mut self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            self.settle();
            if done(self) {
                return true;
            }
            let next = [
                self.meter.poll_timeout(),
                self.link.front().map(|(at, ..)| *at),
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

    /// Queues one reading and runs until it is acknowledged and nothing else is under way.
    fn deliver_one(&mut self, limit: Duration) -> bool {
        self.queue(1);
        self.run_until(limit, |s| s.meter.is_idle())
    }

    fn slots(&self) -> Vec<KeySlot> {
        self.meter
            .lifecycle
            .as_ref()
            .expect("lifecycle")
            .element
            .slots()
    }

    fn key(&self, slot: KeySlot) -> Option<PublicKey> {
        self.meter
            .lifecycle
            .as_ref()
            .expect("lifecycle")
            .element
            .public(slot)
            .ok()
    }

    fn count(&self, f: impl Fn(&MeterEvent) -> bool) -> usize {
        self.events.iter().filter(|e| f(e)).count()
    }

    /// The device holds exactly one committed key, the one its core knows, and it works.
    fn assert_one_working_key(&mut self, endpoint: &str) {
        assert_eq!(
            self.slots(),
            vec![KeySlot::Factory, KeySlot::Subscription],
            "factory + one committed key, nothing pending"
        );
        let key = self.key(KeySlot::Subscription).expect("subscription key");
        let sub = self
            .core(endpoint)
            .subscription(SERIAL)
            .expect("sub")
            .clone();
        assert_eq!(sub.key, key, "the core's key is the device's");
        assert_eq!(sub.next, None, "no switch pending at the core");
        assert_eq!(sub.status, Status::Active);
        assert!(self.meter.has_working_session());
    }
}

fn build(
    dir: &DeviceDir,
    core: PublicKey,
    start: Instant,
    now: Instant,
    crash_at: &Arc<Mutex<Option<CrashPoint>>>,
    seed: u64,
) -> Meter {
    let store = dir.open_store().expect("store");
    // A restarted device's clock goes on; handshake timestamps keep growing.
    let timebase = Timebase::new(
        now,
        UNIX_START + u64::try_from((now - start).as_millis()).expect("ms"),
    );
    let mut meter = Meter::with_element(
        SERIAL,
        Arc::new(store),
        core,
        dir.memory(),
        config(),
        timebase,
        seed,
    )
    .expect("meter");
    let target = Arc::clone(crash_at);
    meter.set_crash_hook(CrashHook::new(move |point| {
        *target.lock().expect("lock") == Some(point)
    }));
    meter
}

fn frame_type(d: &[u8]) -> &'static str {
    match DeviceFrame::decode(d) {
        Ok(DeviceFrame::HandshakeInit { .. }) => "init",
        Ok(DeviceFrame::HandshakeResponse { .. }) => "response",
        Ok(DeviceFrame::Transport { .. } | DeviceFrame::AdmittedTransport { .. }) => "transport",
        Ok(DeviceFrame::CookieReply { .. }) => "cookie_reply",
        Ok(DeviceFrame::CookieInit { .. }) => "cookie_init",
        Err(_) => "bad",
    }
}

/// The Noise overhead around a payload: IK message 1 (e, s + tag, payload tag), message 2.
const NOISE_INIT: usize = 32 + 48 + 16;
const NOISE_RESPONSE: usize = 32 + 16;
const EXT: usize = 2;
const CONFIG_EXT: usize = EXT + relay_protocol::payload::CONFIG_LEN;

#[test]
fn provisions_in_two_round_trips_and_never_sends_on_the_factory_session() {
    let mut sim = Sim::new();
    sim.queue(3);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.outstanding() == 0));

    // Up to the first reading: exactly two handshakes each way, nothing else.
    let first_transport = sim
        .uplink
        .iter()
        .position(|(_, d)| frame_type(d) == "transport")
        .expect("a reading sent");
    let before: Vec<_> = sim.uplink[..first_transport]
        .iter()
        .map(|(_, d)| (frame_type(d), d.len()))
        .collect();
    let at = sim.uplink[first_transport].0;
    let down: Vec<_> = sim
        .downlink
        .iter()
        .filter(|(t, _)| *t <= at)
        .map(|(_, d)| (frame_type(d), d.len()))
        .collect();
    let init_factory = HANDSHAKE_INIT_HEADER + NOISE_INIT + INIT_PAYLOAD_LEN + EXT + KEY_LEN;
    let response_accepted = HANDSHAKE_RESPONSE_HEADER
        + NOISE_RESPONSE
        + RESPONSE_PAYLOAD_LEN
        + EXT
        + KEY_LEN
        + CONFIG_EXT;
    let init_next = HANDSHAKE_INIT_HEADER + NOISE_INIT + INIT_PAYLOAD_LEN + EXT + 4;
    let response_plain = HANDSHAKE_RESPONSE_HEADER + NOISE_RESPONSE + RESPONSE_PAYLOAD_LEN;
    assert_eq!(before, [("init", init_factory), ("init", init_next)]);
    assert_eq!(
        down,
        [
            ("response", response_accepted),
            ("response", response_plain)
        ]
    );
    println!(
        "provisioning on the device link, 2 round trips: \
         HandshakeInit(factory, NextKey) {init_factory} B -> \
         HandshakeResponse(KeyAccepted, Config) {response_accepted} B; \
         HandshakeInit(new key, ConfigVersion) {init_next} B -> \
         HandshakeResponse {response_plain} B; total up {} B, down {} B",
        init_factory + init_next,
        response_accepted + response_plain
    );
    assert_eq!(
        (init_factory, response_accepted, init_next, response_plain),
        (145, 113, 117, 63)
    );

    // The core kept no factory session: nothing it could not open was sent.
    assert_eq!(sim.a().dropped, 0);
    assert_eq!(sim.a().readings_of(SERIAL).expect("stored").len(), 3);
    sim.assert_one_working_key(CORE_A);
    let s = *sim.meter.stats();
    assert_eq!((s.provisionings, s.key_updates, s.refusals), (1, 0, 0));
    assert_eq!(
        sim.count(|e| *e == MeterEvent::KeyCommitted { provisioning: true }),
        1
    );
    // The configuration came with the acceptance, is in force, remembered and reported.
    let profile = sim.a().profile;
    assert_eq!(sim.meter.device_config(), Some(&profile));
    assert_eq!(
        DeviceDir::open(sim.dir.path())
            .expect("open")
            .memory()
            .config,
        Some(profile)
    );
    let inits: Vec<_> = sim.a().inits.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        inits[0].config_version, None,
        "factory-fresh: no configuration yet"
    );
    assert!(inits[0].next_key.is_some());
    assert_eq!(inits[1].config_version, Some(profile.version));
    assert_eq!(inits[1].next_key, None);
}

#[test]
fn rotation_notice_on_an_ack_switches_to_a_new_key_in_two_handshakes() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let old = sim.key(KeySlot::Subscription).expect("provisioned");
    let handshakes = sim.a().handshakes;

    sim.a().request_rotate(SERIAL);
    assert!(sim.deliver_one(Duration::from_secs(10)));
    sim.assert_one_working_key(CORE_A);
    let new = sim.key(KeySlot::Subscription).expect("key");
    assert_ne!(new, old);
    assert!(sim.a().device(SERIAL).retired.contains(&old));
    assert_eq!(sim.meter.stats().key_updates, 1);
    assert_eq!(sim.meter.stats().rotations, 1);
    // Old key announcing the new one, then the new one: two handshakes.
    assert_eq!(sim.a().handshakes, handshakes + 2);
    // And readings keep flowing on the new key.
    assert!(sim.deliver_one(Duration::from_secs(10)));
    assert_eq!(sim.a().readings_of(SERIAL).expect("stored").len(), 3);
    assert_eq!(sim.a().dropped, 0);
}

#[test]
fn rotation_notice_on_a_handshake_response() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let old = sim.key(KeySlot::Subscription).expect("provisioned");
    // The notice reaches the device at its next contact: here a restart (a sleepy device's
    // reboot, or a rekey).
    sim.a().request_rotate(SERIAL);
    sim.a().restart();
    sim.restart();
    assert!(sim.deliver_one(Duration::from_secs(20)));
    sim.assert_one_working_key(CORE_A);
    assert_ne!(sim.key(KeySlot::Subscription), Some(old));
}

/// Kill the device at `point` of a credential update (or a provisioning), restart it from its
/// directory: it ends with exactly one committed key, the one the core knows, and it works.
fn crash_and_recover(point: CrashPoint, provisioning: bool) {
    let mut sim = Sim::new();
    if !provisioning {
        assert!(sim.deliver_one(Duration::from_secs(10)));
        sim.a().request_rotate(SERIAL);
    }
    sim.crash_at(Some(point));
    sim.queue(1);
    assert!(
        sim.run_until(Duration::from_secs(20), |s| s.meter.crashed()),
        "{point} reached"
    );
    let before = sim.key(KeySlot::Subscription);
    sim.crash_at(None);
    sim.restart();
    assert!(
        sim.deliver_one(Duration::from_secs(60)),
        "{point}: working again ({:?})",
        sim.meter
    );
    sim.assert_one_working_key(CORE_A);
    let profile = sim.a().profile;
    assert_eq!(
        sim.meter.device_config(),
        Some(&profile),
        "{point}: the configuration is in force (again)"
    );
    if !provisioning {
        assert_ne!(
            sim.key(KeySlot::Subscription),
            before,
            "{point}: the update completed"
        );
    }
    // Every reading queued before and after the crash is stored (the one queued before the crash
    // was lost with the process; the outbox is not persisted).
    assert!(!sim.a().readings_of(SERIAL).expect("stored").is_empty());
    // The old key no longer works: a handshake with it is refused.
    if let Some(old) = before.filter(|_| !provisioning) {
        assert!(sim.a().device(SERIAL).retired.contains(&old), "{point}");
    }
}

#[test]
fn a_crash_at_every_point_of_a_credential_update_leaves_one_working_key() {
    for point in CrashPoint::ALL {
        crash_and_recover(point, false);
    }
}

#[test]
fn a_crash_at_every_point_of_provisioning_leaves_one_working_key() {
    for point in [
        CrashPoint::NextGenerated,
        CrashPoint::KeyAccepted,
        CrashPoint::NextEstablished,
    ] {
        crash_and_recover(point, true);
    }
}

#[test]
fn a_crash_between_the_two_steps_of_the_commit_is_finished_on_restart() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    sim.a().request_rotate(SERIAL);
    sim.crash_at(Some(CrashPoint::NextEstablished));
    sim.queue(1);
    assert!(sim.run_until(Duration::from_secs(20), |s| s.meter.crashed()));
    // Half a commit: the key written to the subscription slot, not yet removed from Next.
    let store = sim.dir.open_store().expect("store");
    let next = store.public(KeySlot::Next).expect("next");
    store
        .copy_sealed(KeySlot::Next, KeySlot::Subscription)
        .expect("first step");
    drop(store);
    sim.crash_at(None);
    sim.restart();
    assert_eq!(sim.key(KeySlot::Subscription), Some(next));
    assert_eq!(sim.key(KeySlot::Next), Some(next));
    assert!(sim.deliver_one(Duration::from_secs(20)));
    sim.assert_one_working_key(CORE_A);
    assert_eq!(sim.key(KeySlot::Subscription), Some(next));
}

#[test]
fn a_configuration_change_rides_on_the_next_ack_and_is_reported() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let handshakes = sim.a().handshakes;
    let uplink = sim.uplink.len();
    let v2 = DeviceConfig {
        version: 2,
        report_interval_secs: 900,
        report_bytes: 48,
        threshold: 10,
    };
    sim.a().profile = v2;
    assert!(sim.deliver_one(Duration::from_secs(10)));
    // Zero extra messages: one reading up, one ack down, no handshake.
    assert_eq!(sim.uplink.len(), uplink + 1);
    assert_eq!(sim.a().handshakes, handshakes);
    assert_eq!(sim.meter.device_config(), Some(&v2));
    assert_eq!(sim.meter.stats().config_updates, 2);
    assert!(sim.events.contains(&MeterEvent::ConfigApplied(v2)));
    assert_eq!(
        DeviceDir::open(sim.dir.path())
            .expect("open")
            .memory()
            .config,
        Some(v2),
        "persisted"
    );

    // After a restart the device reports the version it runs; a newer one comes back in the
    // handshake response.
    let v3 = DeviceConfig { version: 3, ..v2 };
    sim.a().profile = v3;
    sim.a().restart();
    sim.restart();
    assert_eq!(sim.meter.device_config(), Some(&v2));
    assert!(sim.deliver_one(Duration::from_secs(20)));
    let last = sim.a().inits.last().expect("init").1;
    assert_eq!(last.config_version, Some(2));
    assert_eq!(sim.meter.device_config(), Some(&v3));
}

#[test]
fn not_activated_and_unclaimed_back_off_until_the_owner_acts() {
    let mut sim = Sim::with(false, false);
    sim.queue(1);
    sim.run_for(Duration::from_secs(6));
    let unclaimed = sim
        .meter
        .stats()
        .refusals_by_reason
        .get(RefusalReason::Unclaimed);
    // 1 s, 2 s, 4 s apart (plus jitter): a handful, not a flood.
    assert!((2..=4).contains(&unclaimed), "{unclaimed}");
    assert!(!sim.meter.has_working_session());
    assert!(!sim.meter.is_provisioned());

    sim.a().device(SERIAL).claimed = true;
    sim.run_for(Duration::from_secs(6));
    assert!(
        sim.meter
            .stats()
            .refusals_by_reason
            .get(RefusalReason::NotActivated)
            >= 1
    );
    sim.a().device(SERIAL).activated = true;
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.is_idle()));
    sim.assert_one_working_key(CORE_A);
    // Every refusal was of the factory handshake, each with the same proposed key.
    let proposed: std::collections::HashSet<_> = sim
        .a()
        .inits
        .iter()
        .filter_map(|(_, p)| p.next_key)
        .collect();
    assert_eq!(
        proposed.len(),
        1,
        "the same Next key proposed on every retry"
    );
}

#[test]
fn suspension_backs_off_without_falling_back_to_the_factory_identity() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let key = sim.key(KeySlot::Subscription);
    sim.a().set_status(SERIAL, Status::Suspended);
    sim.queue(1);
    sim.run_for(Duration::from_secs(20));
    let refused: Vec<_> = sim
        .events
        .iter()
        .filter_map(|e| match e {
            MeterEvent::Refused { reason, slot } => Some((*reason, *slot)),
            _ => None,
        })
        .collect();
    assert!(!refused.is_empty());
    assert!(
        refused
            .iter()
            .all(|r| *r == (RefusalReason::Suspended, Some(KeySlot::Subscription))),
        "{refused:?}"
    );
    assert_eq!(sim.a().device(SERIAL).provisionings, 1);
    assert!(!sim.meter.has_working_session());

    sim.a().set_status(SERIAL, Status::Active);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.meter.is_idle()));
    assert_eq!(sim.key(KeySlot::Subscription), key, "same key after resume");
    sim.assert_one_working_key(CORE_A);
}

#[test]
fn a_path_not_permitted_backs_off_without_falling_back_to_the_factory_identity() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let key = sim.key(KeySlot::Subscription);
    // A policy change leaves the open session alone; the next handshake is refused.
    sim.a().device(SERIAL).not_permitted = true;
    sim.a().drop_sessions(SERIAL);
    sim.queue(1);
    sim.run_for(Duration::from_secs(30));
    let refused = sim
        .meter
        .stats()
        .refusals_by_reason
        .get(RefusalReason::NotPermitted);
    assert!((3..=10).contains(&refused), "backs off: {refused}");
    assert_eq!(sim.meter.stats().refusals, refused);
    assert_eq!(
        sim.a().device(SERIAL).provisionings,
        1,
        "no factory fallback"
    );
    assert!(!sim.meter.has_working_session());
    assert_eq!(sim.key(KeySlot::Subscription), key, "the key is kept");

    // Allowed again (another path, or the policy changed): it delivers with the same key.
    sim.a().device(SERIAL).not_permitted = false;
    assert!(sim.run_until(Duration::from_secs(30), |s| s.meter.is_idle()));
    assert_eq!(sim.key(KeySlot::Subscription), key);
    sim.assert_one_working_key(CORE_A);
}

#[test]
fn revocation_backs_off_and_never_reprovisions() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    sim.a().set_status(SERIAL, Status::Revoked);
    sim.queue(1);
    sim.run_for(Duration::from_secs(30));
    let revoked = sim
        .meter
        .stats()
        .refusals_by_reason
        .get(RefusalReason::Revoked);
    assert!((3..=10).contains(&revoked), "{revoked}");
    assert_eq!(sim.meter.stats().refusals, revoked);
    assert_eq!(sim.a().device(SERIAL).provisionings, 1);
    assert!(!sim.meter.has_working_session());
    assert!(sim.meter.is_provisioned(), "the key is kept");
}

#[test]
fn quarantine_and_ownership_change_reprovision_with_the_factory_identity() {
    for (status, reason) in [
        (Status::Quarantined, RefusalReason::Quarantined),
        (Status::Transferred, RefusalReason::Reprovision),
    ] {
        let mut sim = Sim::new();
        assert!(sim.deliver_one(Duration::from_secs(10)));
        let old = sim.key(KeySlot::Subscription);
        sim.a().set_status(SERIAL, status);
        assert!(
            sim.deliver_one(Duration::from_secs(30)),
            "{reason:?}: recovered"
        );
        sim.assert_one_working_key(CORE_A);
        assert_ne!(sim.key(KeySlot::Subscription), old);
        assert_eq!(sim.meter.stats().refusals_by_reason.get(reason), 1);
        assert_eq!(sim.a().device(SERIAL).provisionings, 2);
        assert_eq!(sim.meter.stats().provisionings, 2);
    }
}

#[test]
fn a_release_switches_core_and_endpoint_and_reprovisions_there() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let mut b = TestCore::new();
    b.refuse_unknown = true;
    // The new operator imported the signed release: the device is claimed (and activated) there.
    b.register(SERIAL, sim.factory, true, true);
    let release = Release {
        core: b.public(),
        issued_ms: UNIX_START + 1,
        endpoint: CORE_B.into(),
    };
    sim.cores.push((CORE_B, b));
    sim.a().release(SERIAL, release.clone());

    assert!(sim.deliver_one(Duration::from_secs(30)));
    assert_eq!(sim.meter.endpoint(), Some(CORE_B));
    assert_eq!(*sim.meter.core(), release.core);
    assert!(sim.events.contains(&MeterEvent::Released {
        endpoint: CORE_B.into()
    }));
    assert_eq!(
        sim.meter
            .stats()
            .refusals_by_reason
            .get(RefusalReason::Released),
        1
    );
    sim.assert_one_working_key(CORE_B);
    assert_eq!(
        sim.core(CORE_B).readings_of(SERIAL).map(|r| r.len()),
        Some(1),
        "the reading after the release went to the new core"
    );
    assert_eq!(
        DeviceDir::open(sim.dir.path())
            .expect("open")
            .memory()
            .release,
        Some(release),
        "the release is remembered"
    );

    // A restart goes straight to the new core.
    let a_inits = sim.a().inits.len();
    sim.restart();
    assert!(sim.deliver_one(Duration::from_secs(20)));
    assert_eq!(sim.a().inits.len(), a_inits, "nothing more to the old core");
    assert_eq!(
        sim.core(CORE_B).readings_of(SERIAL).map(|r| r.len()),
        Some(2)
    );
}

#[test]
fn a_release_piggybacked_on_an_ack_is_followed_too() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let mut b = TestCore::new();
    b.refuse_unknown = true;
    b.register(SERIAL, sim.factory, true, true);
    let release = Release {
        core: b.public(),
        issued_ms: 1,
        endpoint: CORE_B.into(),
    };
    sim.cores.push((CORE_B, b));
    let id = sim.a().session_ids()[0];
    let ack = sim
        .a()
        .seal(
            id,
            &Message::Ack {
                seqs: Vec::new(),
                notices: Notices {
                    release: Some(release),
                    ..Notices::default()
                },
            },
        )
        .expect("sealed");
    sim.meter.handle_datagram(&ack, sim.now).expect("ack");
    assert!(sim.deliver_one(Duration::from_secs(20)));
    sim.assert_one_working_key(CORE_B);
}

#[test]
fn a_clone_without_the_factory_key_cannot_recover_from_quarantine() {
    let mut sim = Sim::new();
    assert!(sim.deliver_one(Duration::from_secs(10)));
    let clone = sim.dir.clone_subscription().expect("clone");
    let store = clone.open_store().expect("store");
    let mut meter = Meter::with_element(
        SERIAL,
        Arc::new(store),
        sim.cores[0].1.public(),
        clone.memory(),
        config(),
        Timebase::new(sim.now, UNIX_START + 100_000),
        9,
    )
    .expect("clone meter");
    sim.a().set_status(SERIAL, Status::Quarantined);
    // Drive the clone by hand for a while: it is refused, backs off, never handshakes with a
    // factory key (it has none) and never gets a session.
    let mut now = sim.now;
    for _ in 0..200 {
        while let Some(up) = meter.poll_transmit(now) {
            for down in sim.a().handle(&up, now) {
                let _ = meter.handle_datagram(&down, now);
            }
        }
        now += Duration::from_millis(100);
    }
    assert!(!meter.has_working_session());
    let q = meter
        .stats()
        .refusals_by_reason
        .get(RefusalReason::Quarantined);
    assert!((2..=8).contains(&q), "backs off: {q}");
    assert_eq!(meter.stats().provisionings, 0);
}
