//! `SessionTable` driven by real device sessions in memory, with virtual routes and an in-memory
//! [`LifecycleStore`]: no sockets, no SQLite.

use std::sync::Mutex;

use relay_protocol::session::{DeviceEvent, DeviceSession};
use relay_protocol::stream::{RefuseReason, StreamAck};
use relay_protocol::FrameType;

use super::*;

/// The store's side of the lifecycle, in memory, shared with the test for inspection.
#[derive(Debug, Default)]
struct FakeState {
    subs: Vec<IndexEntry>,
    devices: Vec<FactoryEntry>,
    calls: Vec<String>,
    versions: HashMap<SubscriptionId, u32>,
}

#[derive(Debug, Clone, Default)]
struct FakeStore(Arc<Mutex<FakeState>>);

impl FakeStore {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().expect("fake store")
    }

    fn sub(&self, id: SubscriptionId) -> IndexEntry {
        self.state()
            .subs
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .expect("subscription")
    }
}

impl LifecycleStore for FakeStore {
    fn provision(&mut self, serial: &str, key: &PublicKey) -> Result<IndexEntry, StoreError> {
        let mut s = self.state();
        s.calls.push(format!("provision {serial}"));
        let device = s
            .devices
            .iter()
            .find(|d| d.serial == serial)
            .cloned()
            .ok_or_else(|| StoreError::NotClaimed(serial.to_owned()))?;
        let next_id = SubscriptionId(s.subs.iter().map(|e| e.id.0).max().unwrap_or(0) + 1);
        let live = s
            .subs
            .iter_mut()
            .find(|e| e.serial == serial && e.status != SubscriptionStatus::Revoked);
        let entry = match live {
            Some(e) => {
                e.public_key = *key;
                e.next_key = None;
                e.flag = None;
                e.rotate_requested = false;
                e.status = SubscriptionStatus::Active;
                e.key_since_ms = now_ms();
                e.clone()
            }
            None => {
                let e = IndexEntry {
                    id: next_id,
                    public_key: *key,
                    status: SubscriptionStatus::Active,
                    serial: serial.to_owned(),
                    owner: device.owner.clone(),
                    next_key: None,
                    profile: device.profile.clone().unwrap_or_else(|| "default".into()),
                    config_version: None,
                    rotate_requested: false,
                    key_since_ms: now_ms(),
                    flag: None,
                };
                s.subs.push(e.clone());
                e
            }
        };
        Ok(entry)
    }

    fn set_next_key(&mut self, id: SubscriptionId, key: &PublicKey) -> Result<(), StoreError> {
        let mut s = self.state();
        s.calls.push(format!("set_next_key {}", id.0));
        let e = s.subs.iter_mut().find(|e| e.id == id).expect("known");
        e.next_key = Some(*key);
        Ok(())
    }

    fn promote_next_key(&mut self, id: SubscriptionId, key: &PublicKey) -> Result<(), StoreError> {
        let mut s = self.state();
        s.calls.push(format!("promote_next_key {}", id.0));
        let e = s.subs.iter_mut().find(|e| e.id == id).expect("known");
        assert_eq!(e.next_key, Some(*key));
        e.public_key = *key;
        e.next_key = None;
        e.rotate_requested = false;
        Ok(())
    }

    fn flag(
        &mut self,
        id: SubscriptionId,
        reason: &str,
        quarantine: bool,
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        s.calls.push(format!("flag {} {reason} {quarantine}", id.0));
        let e = s.subs.iter_mut().find(|e| e.id == id).expect("known");
        e.flag = Some(reason.to_owned());
        if quarantine {
            e.status = SubscriptionStatus::Quarantined;
        } else {
            e.rotate_requested = true;
        }
        Ok(())
    }

    fn record_config_version(&mut self, id: SubscriptionId, version: u32) {
        self.state().versions.insert(id, version);
    }

    fn index_entries(&mut self) -> Result<Vec<IndexEntry>, StoreError> {
        Ok(self.state().subs.clone())
    }
}

struct Rig {
    table: SessionTable,
    metrics: Metrics,
    core_public: PublicKey,
    /// The subscription keys of the statically provisioned subscriptions (id = index + 1).
    devices: Vec<StaticKeypair>,
    /// The factory keys of the claimed devices, in the order given.
    factory: Vec<StaticKeypair>,
    store: FakeStore,
}

fn policy() -> SessionConfig {
    SessionConfig {
        rekey_after_secs: 60,
        reject_after: Duration::from_secs(120),
        max_sessions: 100,
    }
}

/// The default quota of the rigs: distinct from any profile's in the tests.
const DEFAULT_QUOTA: Quota = Quota {
    frames: 6000,
    bytes: 7_200_000,
    interval_secs: 60,
};

/// Never a cookie: the rigs make many handshakes at one instant.
fn no_cookies() -> AdmissionPolicy {
    AdmissionPolicy {
        default_quota: DEFAULT_QUOTA,
        cookie_above_per_sec: u32::MAX,
    }
}

fn lifecycle(fraud_action: FraudAction) -> LifecyclePolicy {
    LifecyclePolicy {
        rotate_after_secs: 0,
        fraud_action,
    }
}

fn profile(version: u32) -> Profile {
    Profile {
        name: "default".into(),
        version,
        report_interval_secs: 60,
        report_bytes: 64,
        threshold: 0,
        gateways: Vec::new(),
        allow_direct: true,
        quota: None,
    }
}

/// A claimed device as the store lists it.
fn claimed(serial: &str, owner: &str, activated: bool, key: &StaticKeypair) -> FactoryEntry {
    FactoryEntry {
        serial: serial.into(),
        factory_key: *key.public(),
        owner: owner.into(),
        activated,
        profile: activated.then(|| "default".to_owned()),
        release: None,
    }
}

fn index_entry(i: usize, key: &PublicKey, status: SubscriptionStatus) -> IndexEntry {
    IndexEntry {
        id: SubscriptionId(i as i64 + 1),
        public_key: *key,
        status,
        serial: format!("meter-{i}"),
        owner: "operator".into(),
        next_key: None,
        profile: "default".into(),
        config_version: None,
        rotate_requested: false,
        key_since_ms: now_ms(),
        flag: None,
    }
}

fn rig(statuses: &[SubscriptionStatus], policy: SessionConfig) -> Rig {
    rig_with(statuses, policy, lifecycle(FraudAction::Quarantine), &[])
}

/// Statically provisioned subscriptions `meter-{i}` with `statuses`, and claimed devices
/// (`serial`, `owner`, `activated`) with fresh factory keys.
fn rig_with(
    statuses: &[SubscriptionStatus],
    policy: SessionConfig,
    lifecycle: LifecyclePolicy,
    claims: &[(&str, &str, bool)],
) -> Rig {
    rig_admission(statuses, policy, lifecycle, claims, no_cookies())
}

/// [`rig_with`] with an admission policy.
fn rig_admission(
    statuses: &[SubscriptionStatus],
    policy: SessionConfig,
    lifecycle: LifecyclePolicy,
    claims: &[(&str, &str, bool)],
    admission: AdmissionPolicy,
) -> Rig {
    let core = StaticKeypair::generate().expect("core key");
    let core_public = *core.public();
    let devices: Vec<_> = statuses
        .iter()
        .map(|_| StaticKeypair::generate().expect("device key"))
        .collect();
    let index: Vec<IndexEntry> = devices
        .iter()
        .zip(statuses)
        .enumerate()
        .map(|(i, (k, s))| index_entry(i, k.public(), *s))
        .collect();
    let factory: Vec<_> = claims
        .iter()
        .map(|_| StaticKeypair::generate().expect("factory key"))
        .collect();
    let claimed: Vec<FactoryEntry> = claims
        .iter()
        .zip(&factory)
        .map(|((serial, owner, activated), k)| claimed(serial, owner, *activated, k))
        .collect();
    let store = FakeStore::default();
    store.state().subs = index.clone();
    store.state().devices = claimed.clone();
    let metrics = Metrics::new().expect("metrics");
    let loaded = Loaded {
        index,
        devices: claimed,
        profiles: vec![profile(1)],
    };
    Rig {
        table: SessionTable::new(
            core,
            policy,
            lifecycle,
            admission,
            loaded,
            Box::new(store.clone()),
            metrics.clone(),
        )
        .expect("table"),
        metrics,
        core_public,
        devices,
        factory,
        store,
    }
}

fn copy(k: &StaticKeypair) -> StaticKeypair {
    StaticKeypair::from_private_hex(&k.private_hex_for_storage()).expect("copy key")
}

fn device(rig: &Rig, i: usize) -> DeviceSession {
    DeviceSession::new(copy(&rig.devices[i]), rig.core_public)
}

fn session_with(rig: &Rig, key: &StaticKeypair) -> DeviceSession {
    DeviceSession::new(copy(key), rig.core_public)
}

fn handshakes(m: &Metrics, result: HandshakeResult) -> u64 {
    m.handshakes_count(result)
}

fn dropped(m: &Metrics, reason: &str) -> u64 {
    m.frames_dropped_count(reason)
}

const A: Route = Route::Direct(SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    1000,
)));
const B: Route = Route::Gateway {
    conn: GatewayConnId(7),
    flow: FlowId(3),
};

fn ts(timestamp: u64) -> InitPayload {
    InitPayload {
        timestamp,
        ..InitPayload::default()
    }
}

/// One handshake; the device's reading of the answer, or `None` when the core sent nothing.
fn exchange(
    rig: &mut Rig,
    dev: &mut DeviceSession,
    init: InitPayload,
    route: Route,
    now: Instant,
) -> Option<DeviceEvent> {
    let frame = dev
        .start_handshake_with_payload(SessionId(init.timestamp as u32 + 1), &init, now)
        .expect("init");
    let mut out = Outputs::default();
    rig.table.handle_frame(&frame, route, now, &mut out);
    assert!(out.sends.len() <= 1, "one answer at most");
    let Outgoing {
        route: to,
        frame: response,
        ..
    } = out.sends.pop()?;
    assert_eq!(to, route);
    let mut pt = Vec::new();
    Some(
        dev.handle_datagram(&response, now, &mut pt)
            .expect("response"),
    )
}

/// The response of an established session.
fn established(ev: Option<DeviceEvent>) -> ResponsePayload {
    match ev {
        Some(DeviceEvent::Established { response }) => response,
        other => panic!("not established: {other:?}"),
    }
}

/// The reason of an authenticated refusal.
fn refused(ev: Option<DeviceEvent>) -> (RefusalReason, ResponsePayload) {
    match ev {
        Some(DeviceEvent::Refused { response }) => (response.refused.expect("reason"), response),
        other => panic!("not refused: {other:?}"),
    }
}

fn establish(rig: &mut Rig, dev: &mut DeviceSession, ts: u64, route: Route, now: Instant) {
    let response = established(exchange(rig, dev, self::ts(ts), route, now));
    assert_eq!(response.rekey_after_secs, 60);
}

fn reading(dev: &mut DeviceSession, seq: u64) -> Vec<u8> {
    let mut f = Vec::new();
    dev.seal(
        &Message::Reading {
            seq: ReadingSeq(seq),
            data: b"42",
        }
        .to_vec(),
        &mut f,
    )
    .expect("seal");
    f
}

/// A reading, its commit and the acknowledgement as the device opens it.
fn read_and_ack(
    rig: &mut Rig,
    dev: &mut DeviceSession,
    seq: u64,
    route: Route,
    now: Instant,
) -> (SubscriptionId, Vec<ReadingSeq>, Notices) {
    let mut out = Outputs::default();
    rig.table
        .handle_frame(&reading(dev, seq), route, now, &mut out);
    assert_eq!(out.readings.len(), 1, "reading accepted");
    let r = &out.readings[0];
    let subscription = r.subscription;
    let durable = vec![(r.slot, r.seq)];
    let mut out = Outputs::default();
    rig.table
        .handle_committed(Committed { durable }, now, &mut out);
    assert_eq!(out.sends.len(), 1, "one ack");
    let mut pt = Vec::new();
    dev.handle_datagram(&out.sends[0].frame, now, &mut pt)
        .expect("ack opens");
    match Message::decode(&pt).expect("message") {
        Message::Ack { seqs, notices } => (subscription, seqs, notices),
        other => panic!("{other:?}"),
    }
}

#[test]
fn core_session_is_compact() {
    // The per-device memory budget is 1 KiB all included; the session itself is most of it.
    assert!(
        std::mem::size_of::<CoreSession>() <= 512,
        "{}",
        std::mem::size_of::<CoreSession>()
    );
    assert!(
        std::mem::size_of::<SubscriptionEntry>() <= 48,
        "{}",
        std::mem::size_of::<SubscriptionEntry>()
    );
}

#[test]
fn handshake_reading_ack_and_roaming() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let mut dev = device(&rig, 0);
    let now = Instant::now();
    establish(&mut rig, &mut dev, 1, A, now);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Accepted), 1);

    // The device moves to a gateway: the reading comes from B, the ack goes to B.
    let mut out = Outputs::default();
    rig.table
        .handle_frame(&reading(&mut dev, 5), B, now, &mut out);
    assert!(out.sends.is_empty());
    assert_eq!(out.readings.len(), 1);
    let r = &out.readings[0];
    assert_eq!(
        (r.subscription, r.seq, r.data.as_slice()),
        (SubscriptionId(1), ReadingSeq(5), &b"42"[..])
    );
    let durable = vec![(r.slot, r.seq), (r.slot, r.seq)];
    let mut out = Outputs::default();
    rig.table
        .handle_committed(Committed { durable }, now, &mut out);
    assert_eq!(out.sends.len(), 1);
    assert_eq!(out.sends[0].route, B);
    let mut pt = Vec::new();
    dev.handle_datagram(&out.sends[0].frame, now, &mut pt)
        .expect("ack opens");
    assert_eq!(
        Message::decode(&pt).expect("message"),
        Message::ack(vec![ReadingSeq(5)])
    );
    // A device that reports no configuration version is never sent one.
    assert_eq!(rig.metrics.config_pushes_count(Via::Ack), 0);
}

#[test]
fn long_ack_lists_are_split() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let mut dev = device(&rig, 0);
    let now = Instant::now();
    establish(&mut rig, &mut dev, 1, A, now);
    let durable = (0..150).map(|s| (0, ReadingSeq(s))).collect();
    let mut out = Outputs::default();
    rig.table
        .handle_committed(Committed { durable }, now, &mut out);
    assert_eq!(out.sends.len(), 3);
    let mut total = 0;
    for Outgoing { frame: f, .. } in &out.sends {
        let mut pt = Vec::new();
        dev.handle_datagram(f, now, &mut pt).expect("ack");
        match Message::decode(&pt).expect("message") {
            Message::Ack { seqs, .. } => total += seqs.len(),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(total, 150);
}

#[test]
fn refusals_are_authenticated_and_counted() {
    let mut rig = rig_with(
        &[
            SubscriptionStatus::Active,
            SubscriptionStatus::Suspended,
            SubscriptionStatus::Revoked,
            SubscriptionStatus::Quarantined,
        ],
        policy(),
        // Flag only, so that the replays below leave the subscription active.
        lifecycle(FraudAction::Flag),
        &[],
    );
    let now = Instant::now();
    for (i, reason) in [
        (1, RefusalReason::Suspended),
        (2, RefusalReason::Revoked),
        (3, RefusalReason::Quarantined),
    ] {
        let mut dev = device(&rig, i);
        let (got, _) = refused(exchange(&mut rig, &mut dev, ts(1), A, now));
        assert_eq!(got, reason);
        assert_eq!(
            handshakes(&rig.metrics, HandshakeResult::Refused(reason)),
            1
        );
        assert!(!dev.is_established(), "a refusal installs no session");
    }
    let stranger = StaticKeypair::generate().expect("key");
    let mut dev = DeviceSession::new(stranger, rig.core_public);
    let (got, _) = refused(exchange(&mut rig, &mut dev, ts(1), A, now));
    assert_eq!(got, RefusalReason::UnknownKey);
    assert_eq!(
        handshakes(
            &rig.metrics,
            HandshakeResult::Refused(RefusalReason::UnknownKey)
        ),
        1
    );

    // Replay of an accepted initiation, and an older timestamp: dropped silently.
    let mut dev = device(&rig, 0);
    let init = dev.start_handshake(SessionId(9), 10, now).expect("init");
    let mut out = Outputs::default();
    rig.table.handle_frame(&init, A, now, &mut out);
    assert_eq!(out.sends.len(), 1);
    rig.table.handle_frame(&init, A, now, &mut out);
    let old = dev.start_handshake(SessionId(9), 9, now).expect("init");
    rig.table.handle_frame(&old, A, now, &mut out);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Replayed), 2);

    // A corrupted initiation fails authentication: nothing to answer.
    let mut bad = dev.start_handshake(SessionId(9), 11, now).expect("init");
    let last = bad.len() - 1;
    bad[last] ^= 1;
    rig.table.handle_frame(&bad, A, now, &mut out);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Failed), 1);
    assert_eq!(out.sends.len(), 1, "no answer to a replay or a forgery");
    assert_eq!(rig.table.session_count(), 1);
}

#[test]
fn refusals_for_suspended_revoked_transferred_and_released_devices() {
    let mut rig = rig_with(
        &[
            SubscriptionStatus::Suspended,
            SubscriptionStatus::Revoked,
            SubscriptionStatus::Revoked,
            SubscriptionStatus::Revoked,
        ],
        policy(),
        lifecycle(FraudAction::Quarantine),
        &[
            ("meter-1", "operator", true),
            ("meter-2", "operator", true),
            ("meter-3", "operator", true),
        ],
    );
    let now = Instant::now();
    // meter-2 was sold to another owner, meter-3 released to another operator.
    let release = Release {
        core: PublicKey([7; 32]),
        issued_ms: 1_700_000_000_000,
        endpoint: "core-b.example:5684".into(),
    };
    let mut sold = claimed("meter-2", "bob", true, &rig.factory[1]);
    sold.profile = None;
    let mut gone = claimed("meter-3", "operator", true, &rig.factory[2]);
    gone.release = Some(release.clone());
    rig.table.devices_changed(vec![sold, gone]);

    let expected = [
        (0, RefusalReason::Suspended),
        (1, RefusalReason::Revoked),
        (2, RefusalReason::Reprovision),
        (3, RefusalReason::Released),
    ];
    for (i, reason) in expected {
        let mut dev = device(&rig, i);
        let (got, response) = refused(exchange(&mut rig, &mut dev, ts(1), A, now));
        assert_eq!(got, reason, "meter-{i}");
        assert_eq!(
            response.notices.release.is_some(),
            reason == RefusalReason::Released
        );
        if reason == RefusalReason::Released {
            assert_eq!(response.notices.release, Some(release.clone()));
        }
    }
    // The released device's factory identity is refused the same way.
    let mut factory = session_with(&rig, &rig.factory[2]);
    let next = StaticKeypair::generate().expect("key");
    let init = InitPayload {
        timestamp: 5,
        next_key: Some(*next.public()),
        config_version: None,
    };
    let (got, response) = refused(exchange(&mut rig, &mut factory, init, B, now));
    assert_eq!(got, RefusalReason::Released);
    assert_eq!(response.notices.release, Some(release));
    assert_eq!(rig.table.session_count(), 0);
    assert!(rig.store.state().calls.is_empty(), "nothing written");
}

#[test]
fn provisioning_through_the_factory_key() {
    let mut rig = rig_with(
        &[SubscriptionStatus::Active],
        policy(),
        lifecycle(FraudAction::Quarantine),
        &[("sn-2", "acme", false), ("sn-3", "acme", true)],
    );
    let now = Instant::now();
    let next = StaticKeypair::generate().expect("next key");
    let with_next = |timestamp| InitPayload {
        timestamp,
        next_key: Some(*next.public()),
        config_version: None,
    };

    // A factory identity nobody claimed proposing a key.
    let unclaimed = StaticKeypair::generate().expect("key");
    let mut dev = session_with(&rig, &unclaimed);
    let (got, _) = refused(exchange(&mut rig, &mut dev, with_next(1), B, now));
    assert_eq!(got, RefusalReason::Unclaimed);

    // Claimed, not activated.
    let mut dev = session_with(&rig, &rig.factory[0]);
    let (got, _) = refused(exchange(&mut rig, &mut dev, with_next(1), B, now));
    assert_eq!(got, RefusalReason::NotActivated);

    // Activated, but no key proposed.
    let mut factory = session_with(&rig, &rig.factory[1]);
    let (got, _) = refused(exchange(&mut rig, &mut factory, ts(1), B, now));
    assert_eq!(got, RefusalReason::KeyRequired);
    assert!(rig.store.state().calls.is_empty());

    // Activated with a key: subscription created, key accepted, configuration given.
    let response = established(exchange(&mut rig, &mut factory, with_next(2), B, now));
    assert_eq!(response.key_accepted, Some(*next.public()));
    assert_eq!(response.notices.config, Some(profile(1).config()));
    assert_eq!(
        rig.table.session_count(),
        0,
        "no session for the factory key"
    );
    assert_eq!(rig.store.state().calls, ["provision sn-3"]);
    assert_eq!(rig.metrics.provisioned.get(), 1);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Provisioned), 1);
    assert_eq!(rig.metrics.config_pushes_count(Via::Handshake), 1);
    let id = SubscriptionId(2);
    assert_eq!(rig.store.sub(id).public_key, *next.public());
    assert_eq!(rig.store.state().versions.get(&id), Some(&1));

    // The same factory initiation again is a replay: dropped.
    let replay = factory
        .start_handshake_with_payload(SessionId(77), &with_next(2), now)
        .expect("init");
    let mut out = Outputs::default();
    rig.table.handle_frame(&replay, B, now, &mut out);
    assert!(out.sends.is_empty());
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Replayed), 1);

    // The new key works at once, and its readings are stored under the new subscription.
    let mut dev = session_with(&rig, &next);
    let init = InitPayload {
        timestamp: 3,
        next_key: None,
        config_version: Some(1),
    };
    let response = established(exchange(&mut rig, &mut dev, init, B, now));
    assert_eq!(
        response.notices,
        Notices::default(),
        "runs the current configuration"
    );
    let (subscription, seqs, notices) = read_and_ack(&mut rig, &mut dev, 1, B, now);
    assert_eq!(subscription, id);
    assert_eq!(seqs, [ReadingSeq(1)]);
    assert!(notices.is_empty());
}

#[test]
fn two_phase_key_update() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let next = StaticKeypair::generate().expect("next key");
    let mut old = device(&rig, 0);
    rig.table.request_rotation(SubscriptionId(1));
    let response = established(exchange(&mut rig, &mut old, ts(1), A, now));
    assert!(response.notices.rotate, "rotation requested");
    assert_eq!(rig.metrics.rotate_notices_count(Via::Handshake), 1);

    // Phase 1: the next key is stored; the session is a normal one.
    let init = InitPayload {
        timestamp: 2,
        next_key: Some(*next.public()),
        config_version: None,
    };
    let response = established(exchange(&mut rig, &mut old, init, A, now));
    assert_eq!(response.key_accepted, Some(*next.public()));
    assert!(
        !response.notices.rotate,
        "no notice while the update is under way"
    );
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::KeyAnnounced), 1);
    assert_eq!(rig.metrics.key_updates_count(KeyPhase::Announced), 1);
    assert_eq!(
        rig.store.sub(SubscriptionId(1)).next_key,
        Some(*next.public())
    );
    read_and_ack(&mut rig, &mut old, 1, A, now);

    // Between the phases the old key still works.
    let response = established(exchange(&mut rig, &mut old, ts(3), A, now));
    assert_eq!(response.key_accepted, None);
    read_and_ack(&mut rig, &mut old, 2, A, now);

    // Phase 2: the first handshake with the next key promotes it.
    let mut new = session_with(&rig, &next);
    let response = established(exchange(&mut rig, &mut new, ts(4), A, now));
    assert!(!response.notices.rotate, "the update is done");
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::KeyPromoted), 1);
    assert_eq!(rig.metrics.key_updates_count(KeyPhase::Promoted), 1);
    let stored = rig.store.sub(SubscriptionId(1));
    assert_eq!((stored.public_key, stored.next_key), (*next.public(), None));
    let (subscription, _, notices) = read_and_ack(&mut rig, &mut new, 3, A, now);
    assert_eq!(subscription, SubscriptionId(1));
    assert!(!notices.rotate);

    // The old key is retired.
    let (got, _) = refused(exchange(&mut rig, &mut old, ts(5), A, now));
    assert_eq!(got, RefusalReason::Superseded);
    assert_eq!(
        rig.store.state().calls,
        ["set_next_key 1", "promote_next_key 1"]
    );
}

#[test]
fn config_change_rides_on_the_next_ack_exactly_once() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let mut dev = device(&rig, 0);
    let init = InitPayload {
        timestamp: 1,
        next_key: None,
        config_version: Some(1),
    };
    let response = established(exchange(&mut rig, &mut dev, init, A, now));
    assert_eq!(response.notices.config, None, "already runs version 1");
    assert_eq!(rig.store.state().versions.get(&SubscriptionId(1)), Some(&1));
    let (_, _, notices) = read_and_ack(&mut rig, &mut dev, 1, A, now);
    assert!(notices.is_empty());

    rig.table.profile_changed(&profile(2));
    let (_, seqs, notices) = read_and_ack(&mut rig, &mut dev, 2, A, now);
    assert_eq!(seqs, [ReadingSeq(2)]);
    assert_eq!(notices.config, Some(profile(2).config()));
    assert_eq!(rig.metrics.config_pushes_count(Via::Ack), 1);
    assert_eq!(rig.store.state().versions.get(&SubscriptionId(1)), Some(&2));
    for seq in 3..6 {
        let (_, _, notices) = read_and_ack(&mut rig, &mut dev, seq, A, now);
        assert!(notices.is_empty(), "sent once");
    }
    assert_eq!(rig.metrics.config_pushes_count(Via::Ack), 1);

    // A device that still reports the old version at its next handshake gets it there.
    let init = InitPayload {
        timestamp: 2,
        next_key: None,
        config_version: Some(1),
    };
    let response = established(exchange(&mut rig, &mut dev, init, A, now));
    assert_eq!(response.notices.config, Some(profile(2).config()));
    assert_eq!(rig.metrics.config_pushes_count(Via::Handshake), 1);
}

#[test]
fn a_key_used_from_two_routes_is_a_clone_and_quarantined() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let mut genuine = device(&rig, 0);
    let mut clone = device(&rig, 0);
    establish(&mut rig, &mut genuine, 1, A, now);
    read_and_ack(&mut rig, &mut genuine, 1, A, now);
    establish(&mut rig, &mut clone, 2, B, now);
    read_and_ack(&mut rig, &mut clone, 1, B, now);
    assert_eq!(rig.table.live_sessions(SubscriptionId(1)), 2);

    // The genuine device goes on with its (now older) session from its own route.
    let mut out = Outputs::default();
    rig.table
        .handle_frame(&reading(&mut genuine, 2), A, now, &mut out);
    assert!(out.readings.is_empty());
    assert_eq!(dropped(&rig.metrics, "fraud"), 1);
    assert_eq!(rig.metrics.fraud_flags_count(FraudReason::Clone), 1);
    assert_eq!(out.revoked.len(), 2, "both sessions named to the gateways");
    assert_eq!(rig.table.live_sessions(SubscriptionId(1)), 0);
    assert_eq!(rig.store.state().calls, ["flag 1 clone true"]);

    let (got, _) = refused(exchange(&mut rig, &mut genuine, ts(3), A, now));
    assert_eq!(got, RefusalReason::Quarantined);
    let (got, _) = refused(exchange(&mut rig, &mut clone, ts(4), B, now));
    assert_eq!(got, RefusalReason::Quarantined);
}

#[test]
fn the_same_route_on_two_sessions_is_no_clone() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let mut dev = device(&rig, 0);
    establish(&mut rig, &mut dev, 1, A, now);
    let in_flight = reading(&mut dev, 1);
    establish(&mut rig, &mut dev, 2, A, now);
    read_and_ack(&mut rig, &mut dev, 2, A, now);
    let mut out = Outputs::default();
    rig.table.handle_frame(&in_flight, A, now, &mut out);
    assert_eq!(out.readings.len(), 1, "a frame in flight across a rekey");
    assert_eq!(rig.metrics.fraud_flags_count(FraudReason::Clone), 0);
}

#[test]
fn a_replayed_handshake_is_flagged_never_quarantined() {
    // Even with `fraud.action = "quarantine"`: anyone on the path can replay.
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let mut dev = device(&rig, 0);
    let init = dev.start_handshake(SessionId(5), 10, now).expect("init");
    let mut out = Outputs::default();
    rig.table.handle_frame(&init, A, now, &mut out);
    rig.table.handle_frame(&init, B, now, &mut out);
    rig.table.handle_frame(&init, B, now, &mut out);
    assert_eq!(out.sends.len(), 1, "the replay is not answered");
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Replayed), 2);
    assert_eq!(
        rig.metrics.fraud_flags_count(FraudReason::Replay),
        1,
        "once"
    );
    assert_eq!(rig.store.state().calls, ["flag 1 replay false"]);
    let stored = rig.store.sub(SubscriptionId(1));
    assert_eq!(stored.flag.as_deref(), Some("replay"));
    assert!(stored.rotate_requested);

    // The subscription keeps working and is asked to update its key.
    let response = established(exchange(&mut rig, &mut dev, ts(11), A, now));
    assert!(response.notices.rotate);

    // A clone found later still quarantines it.
    let mut clone = device(&rig, 0);
    read_and_ack(&mut rig, &mut dev, 1, A, now);
    establish(&mut rig, &mut clone, 12, B, now);
    read_and_ack(&mut rig, &mut clone, 1, B, now);
    let mut out = Outputs::default();
    rig.table
        .handle_frame(&reading(&mut dev, 2), A, now, &mut out);
    assert_eq!(rig.metrics.fraud_flags_count(FraudReason::Clone), 1);
    assert_eq!(
        rig.store.state().calls,
        ["flag 1 replay false", "flag 1 clone true"]
    );
    let (got, _) = refused(exchange(&mut rig, &mut dev, ts(13), A, now));
    assert_eq!(got, RefusalReason::Quarantined);
}

#[test]
fn flag_only_lets_a_clone_go_on_and_asks_for_a_new_key() {
    let mut rig = rig_with(
        &[SubscriptionStatus::Active],
        policy(),
        lifecycle(FraudAction::Flag),
        &[],
    );
    let now = Instant::now();
    let mut genuine = device(&rig, 0);
    let mut clone = device(&rig, 0);
    establish(&mut rig, &mut genuine, 1, A, now);
    read_and_ack(&mut rig, &mut genuine, 1, A, now);
    establish(&mut rig, &mut clone, 2, B, now);
    let (_, _, notices) = read_and_ack(&mut rig, &mut clone, 1, B, now);
    assert!(!notices.rotate);
    for seq in 2..5 {
        let mut out = Outputs::default();
        rig.table
            .handle_frame(&reading(&mut genuine, seq), A, now, &mut out);
        assert_eq!(out.readings.len(), 1, "flag only: still served");
    }
    assert_eq!(rig.metrics.fraud_flags_count(FraudReason::Clone), 1, "once");
    assert_eq!(rig.store.state().calls, ["flag 1 clone false"]);
    // The next acknowledgement asks for a new key, once per session.
    let (_, _, notices) = read_and_ack(&mut rig, &mut clone, 2, B, now);
    assert!(notices.rotate);
    let (_, _, notices) = read_and_ack(&mut rig, &mut clone, 3, B, now);
    assert!(!notices.rotate);
    assert_eq!(rig.metrics.rotate_notices_count(Via::Ack), 1);
}

#[test]
fn quarantine_then_recovery_with_the_factory_identity() {
    let mut rig = rig_with(
        &[],
        policy(),
        lifecycle(FraudAction::Quarantine),
        &[("sn-1", "acme", true)],
    );
    let now = Instant::now();
    let k1 = StaticKeypair::generate().expect("key");
    let k2 = StaticKeypair::generate().expect("key");
    let mut factory = session_with(&rig, &rig.factory[0]);
    let propose = |timestamp, k: &StaticKeypair| InitPayload {
        timestamp,
        next_key: Some(*k.public()),
        config_version: Some(0),
    };
    established(exchange(&mut rig, &mut factory, propose(1, &k1), B, now));
    let id = SubscriptionId(1);
    let mut dev = session_with(&rig, &k1);
    establish(&mut rig, &mut dev, 2, B, now);
    read_and_ack(&mut rig, &mut dev, 1, B, now);

    // The operator (or the fraud detector) quarantines it: the sessions go, the gateways hear.
    let mut out = Outputs::default();
    let dropped = rig
        .table
        .set_status(id, SubscriptionStatus::Quarantined, now, &mut out);
    assert_eq!(dropped, 1);
    assert_eq!(out.revoked.len(), 1);
    rig.store.state().subs[0].status = SubscriptionStatus::Quarantined;
    let (got, _) = refused(exchange(&mut rig, &mut dev, ts(3), B, now));
    assert_eq!(got, RefusalReason::Quarantined);

    // Recovery: the factory identity binds a new key to the same subscription.
    let response = established(exchange(&mut rig, &mut factory, propose(4, &k2), B, now));
    assert_eq!(response.key_accepted, Some(*k2.public()));
    assert_eq!(rig.metrics.provisioned.get(), 2);
    assert_eq!(rig.store.sub(id).public_key, *k2.public());
    let (got, _) = refused(exchange(&mut rig, &mut dev, ts(5), B, now));
    assert_eq!(got, RefusalReason::Superseded, "the old key died at once");
    let mut recovered = session_with(&rig, &k2);
    establish(&mut rig, &mut recovered, 6, B, now);
    let (subscription, _, _) = read_and_ack(&mut rig, &mut recovered, 2, B, now);
    assert_eq!(subscription, id);
}

#[test]
fn bad_frames_leave_the_session_working() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let mut dev = device(&rig, 0);
    let now = Instant::now();
    establish(&mut rig, &mut dev, 1, A, now);
    let mut out = Outputs::default();

    let good = reading(&mut dev, 1);
    let mut tampered = good.clone();
    tampered[relay_protocol::frame::TRANSPORT_HEADER] ^= 0x80;
    rig.table.handle_frame(&tampered, B, now, &mut out);
    assert_eq!(dropped(&rig.metrics, "authentication"), 1);
    rig.table.handle_frame(&good, A, now, &mut out);
    rig.table.handle_frame(&good, A, now, &mut out);
    assert_eq!(dropped(&rig.metrics, "replay"), 1);
    assert_eq!(out.readings.len(), 1);

    let mut unknown = good.clone();
    unknown[2..6].copy_from_slice(&0u32.to_be_bytes());
    rig.table.handle_frame(&unknown, A, now, &mut out);
    assert_eq!(dropped(&rig.metrics, "unknown_session"), 1);
    rig.table.handle_frame(&[1], A, now, &mut out);
    rig.table.handle_frame(&[9, 9, 9], A, now, &mut out);
    assert_eq!(dropped(&rig.metrics, "truncated"), 1);
    assert_eq!(dropped(&rig.metrics, "unknown_version"), 1);

    // A device never sends acks; the session survives that too.
    let mut f = Vec::new();
    dev.seal(&Message::ack(vec![ReadingSeq(1)]).to_vec(), &mut f)
        .expect("seal");
    rig.table.handle_frame(&f, A, now, &mut out);
    assert_eq!(dropped(&rig.metrics, "unexpected_message"), 1);
    rig.table
        .handle_frame(&reading(&mut dev, 2), A, now, &mut out);
    assert_eq!(out.readings.len(), 2);
    assert!(out.sends.is_empty());
}

#[test]
fn at_most_two_sessions_per_subscription_and_expiry() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let mut dev = device(&rig, 0);
    let t0 = Instant::now();
    establish(&mut rig, &mut dev, 1, A, t0);
    let first = reading(&mut dev, 1);
    establish(&mut rig, &mut dev, 2, A, t0);
    let second = reading(&mut dev, 2);
    establish(&mut rig, &mut dev, 3, A, t0);
    assert_eq!(rig.table.session_count(), 2);
    let mut out = Outputs::default();
    rig.table.handle_frame(&first, A, t0, &mut out);
    assert_eq!(
        dropped(&rig.metrics, "unknown_session"),
        1,
        "oldest dropped"
    );
    rig.table.handle_frame(&second, A, t0, &mut out);
    assert_eq!(out.readings.len(), 1, "previous session still opens");

    let late = t0 + Duration::from_secs(121);
    rig.table
        .handle_frame(&reading(&mut dev, 3), A, late, &mut out);
    assert_eq!(dropped(&rig.metrics, "expired"), 1);
    assert_eq!(rig.table.session_count(), 1);
    rig.table.sweep(late);
    assert_eq!(rig.table.session_count(), 0);
    assert_eq!(rig.metrics.sessions.get(), 0);
    assert!(out.revoked.is_empty(), "expiry is no revocation");
}

#[test]
fn suspension_drops_live_sessions_and_resume_allows_handshakes() {
    let mut rig = rig(
        &[SubscriptionStatus::Active, SubscriptionStatus::Active],
        policy(),
    );
    let now = Instant::now();
    let mut dev = device(&rig, 0);
    establish(&mut rig, &mut dev, 1, A, now);
    let mut other = device(&rig, 1);
    establish(&mut rig, &mut other, 1, A, now);
    assert_eq!(rig.table.live_sessions(SubscriptionId(1)), 1);
    let mut out = Outputs::default();
    assert_eq!(
        rig.table.set_status(
            SubscriptionId(1),
            SubscriptionStatus::Suspended,
            now,
            &mut out
        ),
        1
    );
    assert_eq!(out.revoked.len(), 1, "named to the gateways");
    assert_eq!(rig.table.live_sessions(SubscriptionId(1)), 0);
    let mut out = Outputs::default();
    rig.table
        .handle_frame(&reading(&mut dev, 1), A, now, &mut out);
    assert!(out.readings.is_empty());
    assert_eq!(dropped(&rig.metrics, "unknown_session"), 1);
    let (got, _) = refused(exchange(&mut rig, &mut dev, ts(2), A, now));
    assert_eq!(got, RefusalReason::Suspended);
    // The other device is untouched.
    rig.table
        .handle_frame(&reading(&mut other, 1), A, now, &mut out);
    assert_eq!(out.readings.len(), 1);

    rig.table
        .set_status(SubscriptionId(1), SubscriptionStatus::Active, now, &mut out);
    establish(&mut rig, &mut dev, 3, A, now);
    assert_eq!(
        rig.table.set_status(
            SubscriptionId(9),
            SubscriptionStatus::Revoked,
            now,
            &mut out
        ),
        0
    );
}

#[test]
fn max_sessions_is_respected() {
    let mut p = policy();
    p.max_sessions = 1;
    let mut rig = rig(&[SubscriptionStatus::Active, SubscriptionStatus::Active], p);
    let now = Instant::now();
    let mut d0 = device(&rig, 0);
    establish(&mut rig, &mut d0, 1, A, now);
    let mut d1 = device(&rig, 1);
    assert!(exchange(&mut rig, &mut d1, ts(1), A, now).is_none());
    assert_eq!(dropped(&rig.metrics, "session_limit"), 1);
    assert_eq!(rig.table.session_count(), 1);
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A figure, not an assertion on speed: run with
/// `cargo test -p core-stub --lib -- --ignored --nocapture memory_per_idle_device`.
#[test]
#[ignore = "measurement; prints RSS per idle device"]
fn memory_per_idle_device() {
    const N: usize = 20_000;
    let keys: Vec<StaticKeypair> = (0..N)
        .map(|_| StaticKeypair::generate().expect("key"))
        .collect();
    let core = StaticKeypair::generate().expect("core key");
    let core_public = *core.public();
    let inits: Vec<Vec<u8>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut d = DeviceSession::new(copy(k), core_public);
            d.start_handshake(SessionId(i as u32 + 1), 1, Instant::now())
                .expect("init")
        })
        .collect();
    let index: Vec<IndexEntry> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| index_entry(i, k.public(), SubscriptionStatus::Active))
        .collect();
    drop(keys);
    let metrics = Metrics::new().expect("metrics");
    let before = rss_bytes().expect("rss");
    let loaded = Loaded {
        index,
        devices: Vec::new(),
        profiles: vec![profile(1)],
    };
    let mut table = SessionTable::new(
        core,
        policy_with(N),
        lifecycle(FraudAction::Quarantine),
        no_cookies(),
        loaded,
        Box::new(FakeStore::default()),
        metrics,
    )
    .expect("table");
    let mut out = Outputs::default();
    for (i, init) in inits.iter().enumerate() {
        let route = Route::Direct(SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 5000)));
        table.handle_frame(init, route, Instant::now(), &mut out);
        out.sends.clear();
    }
    assert_eq!(table.session_count(), N);
    let after = rss_bytes().expect("rss");
    println!(
        "{N} idle devices: {} bytes of RSS each, subscriptions included (session {} B inline, \
         subscription {} B)",
        after.saturating_sub(before) / N as u64,
        std::mem::size_of::<CoreSession>(),
        std::mem::size_of::<SubscriptionEntry>(),
    );
}

fn policy_with(max_sessions: usize) -> SessionConfig {
    SessionConfig {
        max_sessions,
        ..policy()
    }
}

#[test]
fn junk_never_panics() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let mut out = Outputs::default();
    let mut x: u32 = 1;
    for len in 0..1300 {
        let mut b = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b.push(x as u8);
        }
        if len >= 2 {
            b[0] = 1;
            b[1] = (len % 4) as u8;
        }
        rig.table.handle_frame(&b, A, now, &mut out);
    }
    assert!(out.sends.is_empty());
    assert!(out.readings.is_empty());
}

#[test]
fn every_crash_point_has_a_distinct_name() {
    let names: std::collections::HashSet<_> = CrashPoint::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names.len(), CrashPoint::ALL.len());
    assert!(names.iter().all(|n| n.starts_with("core:")));
}

// Gateway policy (`docs/protocol.md` §11.9).

const GW_A: Route = Route::Gateway {
    conn: GatewayConnId(1),
    flow: FlowId(1),
};
const GW_B: Route = Route::Gateway {
    conn: GatewayConnId(2),
    flow: FlowId(1),
};
/// A gateway connection the engine was never told the name of.
const GW_UNNAMED: Route = Route::Gateway {
    conn: GatewayConnId(9),
    flow: FlowId(1),
};

/// A building's profile: only through gateway `gw-a`, no direct access.
fn building_a() -> Profile {
    Profile {
        name: "building-a".into(),
        gateways: vec!["gw-a".into()],
        allow_direct: false,
        ..profile(1)
    }
}

/// A rig with gateways `gw-a` (conn 1) and `gw-b` (conn 2) up, one legacy subscription
/// (`meter-0`, profile default) and one claimed device `sn-1` activated with `building-a`.
fn policy_rig() -> Rig {
    let mut rig = rig_with(
        &[SubscriptionStatus::Active],
        policy(),
        lifecycle(FraudAction::Quarantine),
        &[("sn-1", "acme", true)],
    );
    rig.table.profile_changed(&building_a());
    let mut device = rig.store.state().devices[0].clone();
    device.profile = Some("building-a".into());
    rig.store.state().devices[0] = device.clone();
    rig.table.devices_changed(vec![device]);
    rig.table.gateway_up(GatewayConnId(1), "gw-a".into());
    rig.table.gateway_up(GatewayConnId(2), "gw-b".into());
    rig
}

fn not_permitted(rig: &Rig) -> u64 {
    handshakes(
        &rig.metrics,
        HandshakeResult::Refused(RefusalReason::NotPermitted),
    )
}

#[test]
fn provisioning_is_refused_off_the_profiles_gateways_and_admitted_through_them() {
    let mut rig = policy_rig();
    let now = Instant::now();
    let next = StaticKeypair::generate().expect("next key");
    let with_next = |timestamp| InitPayload {
        timestamp,
        next_key: Some(*next.public()),
        config_version: None,
    };
    let mut factory = session_with(&rig, &rig.factory[0]);
    for (t, route) in [(1, GW_B), (2, A), (3, GW_UNNAMED)] {
        let (got, response) = refused(exchange(&mut rig, &mut factory, with_next(t), route, now));
        assert_eq!(got, RefusalReason::NotPermitted, "{route:?}");
        assert_eq!(response.key_accepted, None);
    }
    assert_eq!(not_permitted(&rig), 3);
    assert!(rig.store.state().calls.is_empty(), "nothing provisioned");
    assert_eq!(rig.table.session_count(), 0);

    let response = established(exchange(&mut rig, &mut factory, with_next(4), GW_A, now));
    assert_eq!(response.key_accepted, Some(*next.public()));
    assert_eq!(rig.store.state().calls, ["provision sn-1"]);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Provisioned), 1);
}

#[test]
fn a_subscription_handshake_is_refused_on_a_path_its_profile_does_not_allow() {
    let mut rig = policy_rig();
    let now = Instant::now();
    let next = StaticKeypair::generate().expect("next key");
    let mut factory = session_with(&rig, &rig.factory[0]);
    let init = InitPayload {
        timestamp: 1,
        next_key: Some(*next.public()),
        config_version: None,
    };
    established(exchange(&mut rig, &mut factory, init, GW_A, now));

    let mut dev = session_with(&rig, &next);
    // Through gateway A: a session, and its readings are stored.
    establish(&mut rig, &mut dev, 10, GW_A, now);
    assert_eq!(rig.table.session_count(), 1);
    let (_, seqs, _) = read_and_ack(&mut rig, &mut dev, 1, GW_A, now);
    assert_eq!(seqs, [ReadingSeq(1)]);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Accepted), 1);

    // Through gateway B, an unnamed gateway, or directly: refused, no new session.
    for (t, route) in [(11, GW_B), (12, GW_UNNAMED), (13, A)] {
        let mut dev = session_with(&rig, &next);
        let (got, _) = refused(exchange(&mut rig, &mut dev, ts(t), route, now));
        assert_eq!(got, RefusalReason::NotPermitted, "{route:?}");
    }
    assert_eq!(not_permitted(&rig), 3);
    assert_eq!(
        rig.table.session_count(),
        1,
        "the session through A is untouched"
    );
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Accepted), 1);

    // A gateway that went away loses its name: it is no longer on the list.
    rig.table.gateway_down(GatewayConnId(1));
    let mut dev2 = session_with(&rig, &next);
    let (got, _) = refused(exchange(&mut rig, &mut dev2, ts(14), GW_A, now));
    assert_eq!(got, RefusalReason::NotPermitted);
}

#[test]
fn direct_access_is_refused_only_when_the_profile_forbids_it() {
    let mut rig = policy_rig();
    let now = Instant::now();
    // Every gateway allowed, direct access not.
    rig.table.profile_changed(&Profile {
        gateways: Vec::new(),
        ..building_a()
    });
    let next = StaticKeypair::generate().expect("next key");
    let mut factory = session_with(&rig, &rig.factory[0]);
    let init = InitPayload {
        timestamp: 1,
        next_key: Some(*next.public()),
        config_version: None,
    };
    established(exchange(&mut rig, &mut factory, init, GW_B, now));
    let mut dev = session_with(&rig, &next);
    let (got, _) = refused(exchange(&mut rig, &mut dev, ts(2), A, now));
    assert_eq!(got, RefusalReason::NotPermitted);
    establish(&mut rig, &mut dev, 3, GW_UNNAMED, now);
    // Direct access allowed again.
    rig.table.profile_changed(&Profile {
        allow_direct: true,
        gateways: Vec::new(),
        ..building_a()
    });
    let mut dev = session_with(&rig, &next);
    establish(&mut rig, &mut dev, 4, A, now);
    assert_eq!(not_permitted(&rig), 1);
}

#[test]
fn the_default_profile_allows_every_path_and_a_restriction_applies_at_the_next_handshake() {
    let mut rig = policy_rig();
    let now = Instant::now();
    // A legacy subscription (profile default): any gateway, named or not, and direct access.
    for (t, route) in [(1, A), (2, GW_A), (3, GW_B), (4, GW_UNNAMED)] {
        let mut dev = device(&rig, 0);
        establish(&mut rig, &mut dev, t, route, now);
    }
    let mut dev = device(&rig, 0);
    establish(&mut rig, &mut dev, 5, GW_B, now);
    assert_eq!(not_permitted(&rig), 0);

    // The operator restricts the default profile to gateway A: the open session through B keeps
    // working (nothing is dropped) ...
    rig.table.profile_changed(&Profile {
        gateways: vec!["gw-a".into()],
        ..profile(1)
    });
    let (_, seqs, _) = read_and_ack(&mut rig, &mut dev, 1, GW_B, now);
    assert_eq!(seqs, [ReadingSeq(1)]);
    // ... and its next handshake through B is refused, through A admitted.
    let mut again = device(&rig, 0);
    let (got, _) = refused(exchange(&mut rig, &mut again, ts(6), GW_B, now));
    assert_eq!(got, RefusalReason::NotPermitted);
    establish(&mut rig, &mut again, 7, GW_A, now);
    assert_eq!(not_permitted(&rig), 1);
}

#[test]
fn an_open_session_does_not_roam_onto_a_path_its_profile_forbids() {
    let mut rig = policy_rig();
    let now = Instant::now();
    let next = StaticKeypair::generate().expect("next key");
    let mut factory = session_with(&rig, &rig.factory[0]);
    let init = InitPayload {
        timestamp: 1,
        next_key: Some(*next.public()),
        config_version: None,
    };
    established(exchange(&mut rig, &mut factory, init, GW_A, now));
    let mut dev = session_with(&rig, &next);
    establish(&mut rig, &mut dev, 2, GW_A, now);

    // The same session's frames through gateway B and directly: authenticated, but dropped,
    // and the route stays on gateway A.
    for (seq, route) in [(1, GW_B), (2, A)] {
        let mut out = Outputs::default();
        rig.table
            .handle_frame(&reading(&mut dev, seq), route, now, &mut out);
        assert!(out.readings.is_empty(), "{route:?}: stored");
    }
    assert_eq!(dropped(&rig.metrics, "not_permitted"), 2);
    let (_, seqs, _) = read_and_ack(&mut rig, &mut dev, 3, GW_A, now);
    assert_eq!(seqs, [ReadingSeq(3)]);
}

// Admission (`docs/protocol.md` §12) and cookies.

/// One initiation datagram handled; what the core sent back (at most one frame).
fn answer(rig: &mut Rig, frame: &[u8], route: Route, now: Instant) -> Option<Outgoing> {
    let mut out = Outputs::default();
    rig.table.handle_frame(frame, route, now, &mut out);
    assert!(out.sends.len() <= 1, "one answer at most");
    out.sends.pop()
}

/// A handshake whose answer the device reads; the frame the core sent (with its admission for
/// the gateway) and the device's event.
fn exchange_out(
    rig: &mut Rig,
    dev: &mut DeviceSession,
    timestamp: u64,
    route: Route,
    now: Instant,
) -> (Outgoing, DeviceEvent) {
    let frame = dev
        .start_handshake(SessionId(timestamp as u32 + 1), timestamp, now)
        .expect("init");
    let sent = answer(rig, &frame, route, now).expect("an answer");
    assert_eq!(sent.route, route);
    let mut pt = Vec::new();
    let ev = dev
        .handle_datagram(&sent.frame, now, &mut pt)
        .expect("answer");
    (sent, ev)
}

/// Provisions `sn-1` of a [`policy_rig`] (profile `building-a`) through `route`; returns its
/// subscription key.
fn provision_building_device(rig: &mut Rig, route: Route, now: Instant) -> StaticKeypair {
    let next = StaticKeypair::generate().expect("next key");
    let mut factory = session_with(rig, &rig.factory[0]);
    let init = InitPayload {
        timestamp: 1,
        next_key: Some(*next.public()),
        config_version: None,
    };
    let frame = factory
        .start_handshake_with_payload(SessionId(100), &init, now)
        .expect("init");
    let sent = answer(rig, &frame, route, now).expect("answer");
    assert_eq!(
        sent.admission, None,
        "no session for a factory key, no admission"
    );
    let mut pt = Vec::new();
    match factory.handle_datagram(&sent.frame, now, &mut pt) {
        Ok(DeviceEvent::Established { response } | DeviceEvent::Refused { response }) => {
            assert_eq!(response.key_accepted, Some(*next.public()));
            assert_eq!(
                response.admission, None,
                "factory handshakes get no admission key"
            );
        }
        other => panic!("{other:?}"),
    }
    next
}

#[test]
fn an_accepted_handshake_hands_out_an_admission_key_and_through_a_gateway_its_admission() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();

    // Through a gateway: the key in the response, and the admission beside the frame.
    let mut dev = device(&rig, 0);
    let (sent, ev) = exchange_out(&mut rig, &mut dev, 1, B, now);
    let response = established(Some(ev));
    let key = response
        .admission
        .expect("an admission key in the response");
    let current = dev.current().expect("session");
    assert_eq!(current.admission(), Some(&key), "the device tags with it");
    let admission = sent.admission.expect("the gateway's admission");
    assert_eq!(
        admission,
        Admission {
            session: current.remote_id(),
            key,
            lifetime_secs: 120,
            quota: DEFAULT_QUOTA,
        }
    );
    // Never printed.
    assert!(!format!("{sent:?}").contains(&format!("{:?}", key.0)));
    assert!(format!("{sent:?}").contains("AdmissionKey(..)"));

    // Directly: the key for the device, nothing for a gateway; a fresh key every session.
    let mut dev2 = device(&rig, 0);
    let (sent, ev) = exchange_out(&mut rig, &mut dev2, 2, A, now);
    let key2 = established(Some(ev)).admission.expect("key");
    assert_eq!(sent.admission, None);
    assert_ne!(key2, key);

    // A refusal carries neither.
    let stranger = StaticKeypair::generate().expect("key");
    let mut dev3 = session_with(&rig, &stranger);
    let (sent, ev) = exchange_out(&mut rig, &mut dev3, 3, B, now);
    let (reason, response) = refused(Some(ev));
    assert_eq!(reason, RefusalReason::UnknownKey);
    assert_eq!((sent.admission, response.admission), (None, None));
}

#[test]
fn admitted_transport_frames_are_accepted_directly_and_through_gateways() {
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let now = Instant::now();
    let mut dev = device(&rig, 0);
    establish(&mut rig, &mut dev, 1, B, now);
    let key = *dev.current().expect("session").admission().expect("key");

    let frame = reading(&mut dev, 1);
    assert_eq!(frame[1], FrameType::AdmittedTransport as u8);
    assert!(key.verify(&frame));
    assert_eq!(store_frame(&mut rig, &frame, B, now), ReadingSeq(1));
    // Roaming to direct access with a tagged frame moves the route as before.
    let (_, seqs, _) = read_and_ack(&mut rig, &mut dev, 2, A, now);
    assert_eq!(seqs, [ReadingSeq(2)]);
    assert_eq!(
        rig.table.sessions[&dev.current().expect("s").remote_id()].route,
        A
    );

    // The tag is the gateways' to check: a wrong one does not matter to the core, the AEAD does.
    let mut frame = reading(&mut dev, 3);
    let last = frame.len() - 1;
    frame[last] ^= 1;
    assert!(!key.verify(&frame));
    assert_eq!(store_frame(&mut rig, &frame, A, now), ReadingSeq(3));

    // A plain transport frame (a device from before admission keys) still opens.
    let tagged = reading(&mut dev, 4);
    let mut plain = tagged[..tagged.len() - relay_protocol::frame::ADMISSION_TAG_LEN].to_vec();
    plain[1] = FrameType::Transport as u8;
    assert_eq!(store_frame(&mut rig, &plain, A, now), ReadingSeq(4));
    assert_eq!(dropped(&rig.metrics, "authentication"), 0);

    // A cookie reply from a device is not a device frame.
    let mut out = Outputs::default();
    let mut bogus = vec![1, FrameType::CookieReply as u8];
    bogus.resize(relay_protocol::frame::COOKIE_REPLY_LEN, 0);
    rig.table.handle_frame(&bogus, A, now, &mut out);
    assert_eq!(dropped(&rig.metrics, "unexpected_type"), 1);
}

/// A reading frame sealed already, handled; the sequence number of the reading to store.
fn store_frame(rig: &mut Rig, frame: &[u8], route: Route, now: Instant) -> ReadingSeq {
    let mut out = Outputs::default();
    rig.table.handle_frame(frame, route, now, &mut out);
    assert_eq!(out.readings.len(), 1, "reading accepted");
    out.readings[0].seq
}

#[test]
fn admission_queries_are_answered_by_session_state_and_profile_policy() {
    let mut rig = policy_rig();
    let now = Instant::now();
    // A building-a device (only through gw-a) and a legacy one (any gateway).
    let key = provision_building_device(&mut rig, GW_A, now);
    let mut building = session_with(&rig, &key);
    let (sent, _) = exchange_out(&mut rig, &mut building, 2, GW_A, now);
    let building_admission = sent.admission.expect("admission");
    let building_id = building.current().expect("s").remote_id();
    let mut legacy = device(&rig, 0);
    establish(&mut rig, &mut legacy, 3, GW_B, now);
    let legacy_id = legacy.current().expect("s").remote_id();
    let unknown = SessionId(0x0bad_0bad);

    // gw-a (a restarted gateway, say) asks about all three, one twice.
    let later = now + Duration::from_secs(30);
    let answer = rig.table.admit_query(
        GatewayConnId(1),
        &[building_id, legacy_id, unknown, building_id],
        later,
    );
    let mut admitted = answer.admitted.clone();
    admitted.sort_by_key(|a| a.session);
    let mut expected = vec![
        Admission {
            lifetime_secs: 90,
            ..building_admission
        },
        Admission {
            session: legacy_id,
            key: *legacy.current().expect("s").admission().expect("key"),
            lifetime_secs: 90,
            quota: DEFAULT_QUOTA,
        },
    ];
    expected.sort_by_key(|a| a.session);
    assert_eq!(admitted, expected, "remaining lifetime, quota, same key");
    assert_eq!(answer.not_admitted, [unknown]);

    // gw-b may carry the legacy device, not the building's.
    let answer = rig
        .table
        .admit_query(GatewayConnId(2), &[building_id, legacy_id], later);
    assert_eq!(
        answer
            .admitted
            .iter()
            .map(|a| a.session)
            .collect::<Vec<_>>(),
        [legacy_id]
    );
    assert_eq!(answer.not_admitted, [building_id]);
    // A gateway the engine has no name for is on no list.
    let answer = rig
        .table
        .admit_query(GatewayConnId(9), &[building_id], later);
    assert_eq!(answer.not_admitted, [building_id]);

    // Expired sessions are not admitted; nor are sessions of a suspended subscription.
    let answer = rig.table.admit_query(
        GatewayConnId(1),
        &[building_id, legacy_id],
        now + Duration::from_secs(121),
    );
    assert!(answer.admitted.is_empty());
    let answer = rig.table.admit_query(GatewayConnId(1), &[legacy_id], later);
    assert_eq!(answer.admitted.len(), 1);
    let mut out = Outputs::default();
    rig.table.set_status(
        SubscriptionId(1),
        SubscriptionStatus::Suspended,
        later,
        &mut out,
    );
    let answer = rig.table.admit_query(GatewayConnId(1), &[legacy_id], later);
    assert_eq!(answer.not_admitted, [legacy_id]);

    assert_eq!(
        (
            rig.metrics
                .admission_queries_count(AdmissionAnswer::Admitted),
            rig.metrics
                .admission_queries_count(AdmissionAnswer::NotAdmitted)
        ),
        (4, 6),
        "per id asked about, duplicates once"
    );
}

#[test]
fn a_profile_quota_replaces_the_default_and_a_change_applies_to_the_next_admission() {
    let mut rig = policy_rig();
    let now = Instant::now();
    let quota = crate::store::ProfileQuota {
        frames: 10,
        bytes: 0,
        interval_secs: 3600,
    };
    rig.table.profile_changed(&Profile {
        quota: Some(quota),
        ..building_a()
    });
    let key = provision_building_device(&mut rig, GW_A, now);
    let mut building = session_with(&rig, &key);
    let (sent, _) = exchange_out(&mut rig, &mut building, 2, GW_A, now);
    let expected = Quota {
        frames: 10,
        bytes: 0,
        interval_secs: 3600,
    };
    assert_eq!(sent.admission.expect("admission").quota, expected);
    // The legacy device's profile names none: the default.
    let mut legacy = device(&rig, 0);
    let (sent, _) = exchange_out(&mut rig, &mut legacy, 3, GW_A, now);
    assert_eq!(sent.admission.expect("admission").quota, DEFAULT_QUOTA);

    // The operator lifts the profile's quota: the next admission a gateway asks for has the
    // default.
    let id = building.current().expect("s").remote_id();
    rig.table.profile_changed(&building_a());
    let answer = rig.table.admit_query(GatewayConnId(1), &[id], now);
    assert_eq!(answer.admitted[0].quota, DEFAULT_QUOTA);
    rig.table.profile_changed(&Profile {
        quota: Some(crate::store::ProfileQuota {
            frames: 0,
            bytes: 0,
            interval_secs: 0,
        }),
        ..building_a()
    });
    let answer = rig.table.admit_query(GatewayConnId(1), &[id], now);
    assert!(answer.admitted[0].quota.is_unlimited());
}

fn cookie_rig(cookie_above_per_sec: u32) -> Rig {
    rig_admission(
        &[SubscriptionStatus::Active; 4],
        policy(),
        lifecycle(FraudAction::Quarantine),
        &[],
        AdmissionPolicy {
            default_quota: DEFAULT_QUOTA,
            cookie_above_per_sec,
        },
    )
}

/// The device's reading of a cookie reply: the `CookieInit` to send.
fn cookie_init(dev: &mut DeviceSession, reply: &Outgoing, now: Instant) -> Vec<u8> {
    assert_eq!(reply.admission, None, "a cookie reply carries no admission");
    assert_eq!(reply.frame.len(), relay_protocol::frame::COOKIE_REPLY_LEN);
    assert_eq!(reply.frame[1], FrameType::CookieReply as u8);
    let mut out = Vec::new();
    match dev.handle_datagram(&reply.frame, now, &mut out) {
        Ok(DeviceEvent::CookieChallenge) => out,
        other => panic!("not a cookie challenge: {other:?}"),
    }
}

#[test]
fn over_the_threshold_initiations_get_a_cookie_and_a_valid_cookie_init_is_a_handshake() {
    let mut rig = cookie_rig(2);
    let now = Instant::now();
    // Two initiations in the window: handshakes as usual.
    for i in 0..2 {
        let mut dev = device(&rig, i);
        establish(&mut rig, &mut dev, 1, B, now);
    }
    let accepted = handshakes(&rig.metrics, HandshakeResult::Accepted);
    assert_eq!(accepted, 2);

    // The third: a cookie, no Noise work, no session.
    let mut dev = device(&rig, 2);
    let init = dev.start_handshake(SessionId(9), 1, now).expect("init");
    let reply = answer(&mut rig, &init, B, now).expect("a cookie reply");
    assert_eq!(reply.route, B, "back the way a response would go");
    assert_eq!(rig.metrics.cookie_replies.get(), 1);
    assert_eq!(rig.table.session_count(), 2);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Failed), 0);

    // The device echoes it: a handshake even though the core is still loaded.
    let echo = cookie_init(&mut dev, &reply, now);
    assert_eq!(echo[1], FrameType::CookieInit as u8);
    let sent = answer(&mut rig, &echo, B, now).expect("response");
    let mut pt = Vec::new();
    let response = established(dev.handle_datagram(&sent.frame, now, &mut pt).ok());
    assert!(response.admission.is_some());
    assert!(sent.admission.is_some(), "admitted like any other session");
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Accepted), 3);
    assert_eq!(dropped(&rig.metrics, "stale_cookie"), 0);

    // A new window: plain initiations are handled again.
    let mut dev = device(&rig, 3);
    establish(&mut rig, &mut dev, 1, B, now + Duration::from_secs(1));
    assert_eq!(rig.metrics.cookie_replies.get(), 1);
}

#[test]
fn a_stale_or_misplaced_cookie_is_dropped_counted_and_answered_with_a_fresh_one() {
    // 0: every plain initiation costs a cookie first.
    let mut rig = cookie_rig(0);
    let t0 = Instant::now();
    let mut dev = device(&rig, 0);
    let init = dev.start_handshake(SessionId(9), 1, t0).expect("init");
    let reply = answer(&mut rig, &init, A, t0).expect("cookie");
    let echo = cookie_init(&mut dev, &reply, t0);

    // The cookie names the path: from another one it is stale.
    let fresh = answer(&mut rig, &echo, B, t0).expect("a fresh cookie");
    assert_eq!(fresh.route, B);
    assert_eq!(fresh.frame[1], FrameType::CookieReply as u8);
    assert_eq!(dropped(&rig.metrics, "stale_cookie"), 1);
    assert_eq!(rig.table.session_count(), 0);

    // Two secret rotations later it is stale on its own path too.
    let other = device(&rig, 1)
        .start_handshake(SessionId(3), 1, t0)
        .expect("init");
    let t1 = t0 + Duration::from_secs(121);
    answer(&mut rig, &other, A, t1).expect("cookie (first rotation)");
    let t2 = t1 + Duration::from_secs(121);
    let again = answer(&mut rig, &echo, A, t2).expect("a fresh cookie");
    assert_eq!(dropped(&rig.metrics, "stale_cookie"), 2);
    assert_eq!(rig.table.session_count(), 0);

    // With the fresh cookie the device gets its session.
    let mut dev = device(&rig, 0);
    let init = dev.start_handshake(SessionId(9), 2, t2).expect("init");
    let reply = answer(&mut rig, &init, A, t2).expect("cookie");
    let echo = cookie_init(&mut dev, &reply, t2);
    let sent = answer(&mut rig, &echo, A, t2).expect("response");
    let mut pt = Vec::new();
    established(dev.handle_datagram(&sent.frame, t2, &mut pt).ok());
    assert_eq!(rig.table.session_count(), 1);
    assert_eq!(rig.metrics.cookie_replies.get(), 5);
    assert_eq!(again.frame.len(), relay_protocol::frame::COOKIE_REPLY_LEN);

    // A forged CookieInit (random MAC) is stale too, and costs no handshake.
    let mut forged = echo.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    answer(&mut rig, &forged, A, t2).expect("a fresh cookie");
    assert_eq!(dropped(&rig.metrics, "stale_cookie"), 3);
    assert_eq!(handshakes(&rig.metrics, HandshakeResult::Failed), 0);
}

#[test]
fn cookie_sources_name_the_path() {
    let (g, n) = cookie_source(Route::Gateway {
        conn: GatewayConnId(0x0102_0304_0506_0708),
        flow: FlowId(0x0a0b_0c0d),
    });
    assert_eq!(
        &g[..n],
        [b'g', 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d]
    );
    let (d, n) = cookie_source(A);
    assert_eq!(&d[..n], [b'd', 127, 0, 0, 1, 0x03, 0xe8]);
    let v6: SocketAddr = "[::1]:5684".parse().expect("addr");
    let (d, n) = cookie_source(Route::Direct(v6));
    assert_eq!(n, 19);
    assert_eq!(
        (d[0], d[16], &d[17..19]),
        (b'd', 1, &5684u16.to_be_bytes()[..])
    );
}

/// A StreamOpen for `upload`, sealed on the device's session: the frame, the device's stream
/// keys, and the message.
fn stream_open(
    dev: &mut DeviceSession,
    upload: u8,
) -> (
    Vec<u8>,
    relay_protocol::stream::StreamKeys,
    relay_protocol::stream::StreamOpen,
) {
    let open = relay_protocol::stream::StreamOpen {
        salt: [upload ^ 0x5a; 16],
        upload: relay_protocol::stream::UploadId([upload; 16]),
        chunk_size: 4096,
        total_size: 10_000,
        meta: "crash".into(),
    };
    let mut frame = Vec::new();
    dev.seal(&Message::StreamOpen(open.clone()).to_vec(), &mut frame)
        .expect("seal");
    let keys = dev
        .current()
        .expect("session")
        .stream_keys(&open.salt, &open.upload);
    (frame, keys, open)
}

const STREAM_FROM: StreamOrigin = StreamOrigin::Direct(SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 2000),
));

#[test]
fn a_stream_open_authenticates_like_a_transport_frame_and_leaves_the_route_alone() {
    use relay_protocol::stream::{CoreStream, DeviceStream};
    let mut rig = rig(&[SubscriptionStatus::Active], policy());
    let mut dev = device(&rig, 0);
    let now = Instant::now();
    establish(&mut rig, &mut dev, 1, B, now);

    let (frame, keys, open) = stream_open(&mut dev, 1);
    let grant = rig
        .table
        .open_stream(&frame, STREAM_FROM, now)
        .expect("granted");
    assert_eq!(grant.open, open);
    assert_eq!(grant.owner.subscription, SubscriptionId(1));
    assert_eq!(grant.owner.serial, None, "a subscription without a device");
    // Both ends hold the same stream keys.
    let device_end = DeviceStream::new(keys);
    let core_end = CoreStream::new(grant.keys);
    let mut sealed = Vec::new();
    device_end
        .seal_chunk(0, false, &[7; 4096], &mut sealed)
        .expect("seal");
    let mut plain = Vec::new();
    let chunk = core_end
        .open_chunk(&sealed[4..], &mut plain)
        .expect("opens");
    assert_eq!((chunk.index, chunk.last, plain.len()), (0, false, 4096));

    // The datagram route stays where the device's datagrams come from.
    let session = rig.table.sessions.values().next().expect("session");
    assert_eq!(session.route, B);
    // The same frame again is a replay; a reading is not an open; nor is a handshake.
    assert_eq!(
        rig.table
            .open_stream(&frame, STREAM_FROM, now)
            .err()
            .map(|d| d.reason()),
        Some(DropReason::Replay)
    );
    assert_eq!(
        rig.table
            .open_stream(&reading(&mut dev, 1), STREAM_FROM, now)
            .err()
            .map(|d| d.reason()),
        Some(DropReason::UnexpectedMessage)
    );
    let mut other = device(&rig, 0);
    let init = other.start_handshake(SessionId(9), 99, now).expect("init");
    assert_eq!(
        rig.table
            .open_stream(&init, STREAM_FROM, now)
            .err()
            .map(|d| d.reason()),
        Some(DropReason::UnexpectedType)
    );
    // (Byte 20 is ciphertext; the last 8 bytes are the gateways' admission tag.)
    let mut bad = stream_open(&mut dev, 2).0;
    bad[20] ^= 1;
    assert_eq!(
        rig.table
            .open_stream(&bad, STREAM_FROM, now)
            .err()
            .map(|d| d.reason()),
        Some(DropReason::Authentication)
    );
    bad[2..6].copy_from_slice(&0x0bad_0badu32.to_be_bytes());
    assert_eq!(
        rig.table
            .open_stream(&bad, STREAM_FROM, now)
            .err()
            .map(|d| d.reason()),
        Some(DropReason::UnknownSession)
    );

    // A StreamOpen as a datagram is dropped; nothing stored, the session works on.
    let before = dropped(&rig.metrics, "unexpected_message");
    let mut out = Outputs::default();
    let (frame, _, _) = stream_open(&mut dev, 3);
    rig.table.handle_frame(&frame, B, now, &mut out);
    assert!(out.readings.is_empty() && out.sends.is_empty());
    assert_eq!(dropped(&rig.metrics, "unexpected_message"), before + 1);
    let (_, seqs, _) = read_and_ack(&mut rig, &mut dev, 2, B, now);
    assert_eq!(seqs, [ReadingSeq(2)]);
}

#[test]
fn a_stream_open_obeys_the_path_policy_and_names_the_device() {
    let mut rig = policy_rig();
    let now = Instant::now();
    let next = StaticKeypair::generate().expect("next key");
    let mut factory = session_with(&rig, &rig.factory[0]);
    let init = InitPayload {
        timestamp: 1,
        next_key: Some(*next.public()),
        config_version: None,
    };
    established(exchange(&mut rig, &mut factory, init, GW_A, now));
    let mut dev = session_with(&rig, &next);
    establish(&mut rig, &mut dev, 10, GW_A, now);

    // building-a allows gateway gw-a only: a stream is judged by the gateway's certificate
    // name (gw-b is connected, gw-c is not: neither is on the list).
    for origin in [
        STREAM_FROM,
        StreamOrigin::Gateway("gw-b".into()),
        StreamOrigin::Gateway("gw-c".into()),
        StreamOrigin::Gateway("gw-a.evil".into()),
    ] {
        let (frame, device_keys, _) = stream_open(&mut dev, 1);
        let denied = rig.table.open_stream(&frame, origin.clone(), now).err();
        let Some(StreamDenied::NotPermitted(core_keys)) = denied else {
            panic!("{origin:?}: {denied:?}, not a not_permitted refusal");
        };
        // The refusal is sealed under the stream's keys: the device opens it, learns why, and
        // stops instead of retrying.
        let refusal = StreamAck::refused(RefuseReason::NotPermitted);
        let mut sealed = Vec::new();
        relay_protocol::stream::CoreStream::new(core_keys)
            .seal_ack(&refusal, &mut sealed)
            .expect("seal");
        let opened = relay_protocol::stream::DeviceStream::new(device_keys)
            .open_ack(&sealed[relay_protocol::stream::LENGTH_PREFIX..])
            .expect("the device opens the refusal");
        assert_eq!(opened, refusal);
    }
    let (frame, _, _) = stream_open(&mut dev, 1);
    let grant = rig
        .table
        .open_stream(&frame, StreamOrigin::Gateway("gw-a".into()), now)
        .expect("through gw-a");
    assert_eq!(grant.owner.serial.as_deref(), Some("sn-1"));

    // A bulk connection has no control connection behind it: the name alone decides, even
    // once gw-a's control connection is down.
    rig.table.gateway_down(GatewayConnId(1));
    let (frame, _, _) = stream_open(&mut dev, 1);
    rig.table
        .open_stream(&frame, StreamOrigin::Gateway("gw-a".into()), now)
        .expect("through gw-a's bulk connection");
    let (frame, _, _) = stream_open(&mut dev, 1);
    assert_eq!(
        rig.table
            .open_stream(&frame, StreamOrigin::Gateway("gw-b".into()), now)
            .err()
            .map(|d| d.reason()),
        Some(DropReason::NotPermitted)
    );

    // A profile without a list lets its devices stream through any gateway.
    let mut legacy = device(&rig, 0);
    establish(&mut rig, &mut legacy, 11, GW_B, now);
    let (frame, _, _) = stream_open(&mut legacy, 1);
    rig.table
        .open_stream(&frame, StreamOrigin::Gateway("gw-c".into()), now)
        .expect("any gateway");
}
