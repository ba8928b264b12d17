//! In-memory paired tests: a device and a core driven against each other with virtual time, and
//! the checked-in test vectors of `docs/protocol.md` §9.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::frame::{DeviceFrame, SessionId};
use crate::payload::{Message, ReadingSeq, ResponsePayload};
use crate::secure_element::{KeySlot, KeyStoreError, MemoryKeyStore, SecureElement};
use crate::session::{
    DeviceEvent, DeviceSession, PublicKey, Responder, SessionError, StaticKeypair, Transport,
};

fn policy() -> ResponsePayload {
    ResponsePayload::accept(60)
}

pub(crate) struct Pair {
    pub(crate) device: DeviceSession,
    core: Responder,
    pub(crate) core_session: Option<Transport>,
    now: Instant,
    next_ts: u64,
}

impl Pair {
    pub(crate) fn new() -> Self {
        Self::with_device(|core| DeviceSession::new(StaticKeypair::generate().unwrap(), core))
    }

    /// A pair whose device `make` builds, given the core's public key.
    fn with_device(make: impl FnOnce(PublicKey) -> DeviceSession) -> Self {
        let core = Responder::new(StaticKeypair::generate().unwrap());
        let device = make(*core.public());
        Self {
            device,
            core,
            core_session: None,
            now: Instant::now(),
            next_ts: 1,
        }
    }

    /// Runs one full handshake; returns the device's public key as the core saw it.
    pub(crate) fn handshake(&mut self, device_id: u32, core_id: u32) -> PublicKey {
        self.next_ts += 1;
        let init = self
            .device
            .start_handshake(SessionId(device_id), self.next_ts, self.now)
            .unwrap();
        let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(&init).unwrap()
        else {
            panic!("not an init")
        };
        let incoming = self.core.read_init(sender, noise).unwrap();
        let seen = *incoming.device();
        assert_eq!(incoming.timestamp(), self.next_ts);
        let mut resp = Vec::new();
        let t = incoming
            .accept(SessionId(core_id), &policy(), self.now, &mut resp)
            .unwrap();
        self.core_session = Some(t);
        let mut out = Vec::new();
        let ev = self
            .device
            .handle_datagram(&resp, self.now, &mut out)
            .unwrap();
        assert_eq!(ev, DeviceEvent::Established { response: policy() });
        seen
    }

    fn device_send(&mut self, msg: &Message<'_>) -> Vec<u8> {
        let mut frame = Vec::new();
        self.device.seal(&msg.to_vec(), &mut frame).unwrap();
        frame
    }

    fn core_open(&mut self, frame: &[u8]) -> Result<Vec<u8>, SessionError> {
        let (receiver, counter, ciphertext) = match DeviceFrame::decode(frame)? {
            DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            }
            | DeviceFrame::AdmittedTransport {
                receiver,
                counter,
                ciphertext,
                ..
            } => (receiver, counter, ciphertext),
            _ => panic!("not transport"),
        };
        let t = self.core_session.as_mut().unwrap();
        assert_eq!(t.local_id(), receiver);
        let mut out = Vec::new();
        t.open(counter, ciphertext, &mut out)?;
        Ok(out)
    }
}

#[test]
fn handshake_authenticates_both_sides_and_carries_readings_and_acks() {
    let mut p = Pair::new();
    let seen = p.handshake(7, 0x1000);
    assert_eq!(&seen, p.device.public());

    let frame = p.device_send(&Message::Reading {
        seq: ReadingSeq(1),
        data: b"kwh=12.5",
    });
    // The plaintext is nowhere in the frame.
    assert!(!frame.windows(8).any(|w| w == b"kwh=12.5"));
    let plain = p.core_open(&frame).unwrap();
    assert_eq!(
        Message::decode(&plain).unwrap(),
        Message::Reading {
            seq: ReadingSeq(1),
            data: b"kwh=12.5"
        }
    );

    let mut ack = Vec::new();
    let t = p.core_session.as_mut().unwrap();
    t.seal(&Message::ack(vec![ReadingSeq(1)]).to_vec(), &mut ack)
        .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        p.device.handle_datagram(&ack, p.now, &mut out).unwrap(),
        DeviceEvent::Plaintext
    );
    assert_eq!(
        Message::decode(&out).unwrap(),
        Message::ack(vec![ReadingSeq(1)])
    );
}

#[test]
fn wrong_core_key_never_establishes() {
    let core = Responder::new(StaticKeypair::generate().unwrap());
    let impostor = StaticKeypair::generate().unwrap();
    let mut device = DeviceSession::new(StaticKeypair::generate().unwrap(), *impostor.public());
    let init = device
        .start_handshake(SessionId(1), 1, Instant::now())
        .unwrap();
    let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(&init).unwrap() else {
        panic!()
    };
    assert!(matches!(
        core.read_init(sender, noise),
        Err(SessionError::Authentication)
    ));
}

#[test]
fn replayed_frames_are_refused_and_reordered_ones_accepted_once() {
    let mut p = Pair::new();
    p.handshake(1, 2);
    let frames: Vec<_> = (0..5)
        .map(|i| {
            p.device_send(&Message::Reading {
                seq: ReadingSeq(i),
                data: b"x",
            })
        })
        .collect();
    for i in [4, 0, 3, 1, 2] {
        p.core_open(&frames[i]).unwrap();
    }
    for f in &frames {
        assert!(matches!(p.core_open(f), Err(SessionError::Replay(_))));
    }
}

#[test]
fn tampered_frame_fails_and_the_session_survives() {
    let mut p = Pair::new();
    p.handshake(1, 2);
    let good = p.device_send(&Message::Keepalive);
    for bit in [0usize, 7, 100, 130] {
        let mut bad = good.clone();
        let byte = 14 + bit / 8 % (bad.len() - 14);
        bad[byte] ^= 1 << (bit % 8);
        assert!(matches!(
            p.core_open(&bad),
            Err(SessionError::Authentication)
        ));
    }
    // A changed counter changes the nonce: also refused, and it does not move the window.
    let mut bad = good.clone();
    bad[13] ^= 0x40;
    assert!(matches!(
        p.core_open(&bad),
        Err(SessionError::Authentication)
    ));
    assert!(p.core_open(&good).is_ok());
}

#[test]
fn forged_response_does_not_establish() {
    let mut p = Pair::new();
    let _init = p.device.start_handshake(SessionId(9), 1, p.now).unwrap();
    let forged = DeviceFrame::HandshakeResponse {
        receiver: SessionId(9),
        sender: SessionId(1),
        noise: &[0x55; 64],
    }
    .to_vec();
    let mut out = Vec::new();
    assert!(p.device.handle_datagram(&forged, p.now, &mut out).is_err());
    assert!(!p.device.is_established());
    // A response for an id the device never used.
    let other = DeviceFrame::HandshakeResponse {
        receiver: SessionId(10),
        sender: SessionId(1),
        noise: &[0x55; 64],
    }
    .to_vec();
    assert!(matches!(
        p.device.handle_datagram(&other, p.now, &mut out),
        Err(SessionError::UnknownSession(_))
    ));
}

#[test]
fn rekey_after_time_and_old_session_still_delivers_acks() {
    let mut p = Pair::new();
    p.handshake(1, 100);
    assert!(!p.device.needs_handshake(p.now));
    let mut old_core = None;
    // The core seals an ack on the old session before the rekey...
    let mut late_ack = Vec::new();
    p.core_session
        .as_mut()
        .unwrap()
        .seal(&Message::Keepalive.to_vec(), &mut late_ack)
        .unwrap();
    p.now += Duration::from_secs(61);
    assert!(p.device.needs_handshake(p.now));
    std::mem::swap(&mut old_core, &mut p.core_session);
    p.handshake(2, 101);
    assert!(!p.device.needs_handshake(p.now));
    assert_eq!(p.device.current().unwrap().remote_id(), SessionId(101));
    // ...and the device still opens it after the switch.
    let mut out = Vec::new();
    assert_eq!(
        p.device
            .handle_datagram(&late_ack, p.now, &mut out)
            .unwrap(),
        DeviceEvent::Plaintext
    );
    // New frames go on the new session only.
    let f = p.device_send(&Message::Keepalive);
    assert!(p.core_open(&f).is_ok());
}

#[test]
fn an_admitted_session_tags_every_frame_and_the_core_still_opens_it() {
    use crate::admission::AdmissionKey;
    let mut p = Pair::new();
    p.next_ts += 1;
    let init = p
        .device
        .start_handshake(SessionId(3), p.next_ts, p.now)
        .unwrap();
    let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(&init).unwrap() else {
        panic!("not an init")
    };
    let key = AdmissionKey([0x5a; 16]);
    let mut policy = policy();
    policy.admission = Some(key);
    let mut resp = Vec::new();
    let t = p
        .core
        .read_init(sender, noise)
        .unwrap()
        .accept(SessionId(0x77), &policy, p.now, &mut resp)
        .unwrap();
    p.core_session = Some(t);
    let mut out = Vec::new();
    let ev = p.device.handle_datagram(&resp, p.now, &mut out).unwrap();
    assert_eq!(ev, DeviceEvent::Established { response: policy });
    let frame = p.device_send(&Message::Reading {
        seq: ReadingSeq(1),
        data: b"kwh=1",
    });
    assert_eq!(frame[1], 4, "admitted frames are type 4");
    assert!(key.verify(&frame));
    assert!(!AdmissionKey([0; 16]).verify(&frame));
    assert!(p.core_open(&frame).is_ok());
}

#[test]
fn a_cookie_challenge_is_answered_with_the_same_initiation_and_completes() {
    use crate::cookie::CookieJar;
    let mut p = Pair::new();
    let mut jar = CookieJar::new(p.core.public(), p.now).unwrap();
    let init = p.device.start_handshake(SessionId(5), 10, p.now).unwrap();
    let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(&init).unwrap() else {
        panic!("not an init")
    };
    let mut reply = Vec::new();
    jar.reply(sender, noise, b"path", p.now, &mut reply)
        .unwrap();
    let mut out = Vec::new();
    let ev = p.device.handle_datagram(&reply, p.now, &mut out).unwrap();
    assert_eq!(ev, DeviceEvent::CookieChallenge);
    assert!(jar.check(&out, b"path", p.now));
    let DeviceFrame::CookieInit { sender, noise, .. } = DeviceFrame::decode(&out).unwrap() else {
        panic!("not a cookie init")
    };
    assert_eq!(noise, &init[6..], "the same Noise message 1");
    let mut resp = Vec::new();
    let t = p
        .core
        .read_init(sender, noise)
        .unwrap()
        .accept(SessionId(9), &policy(), p.now, &mut resp)
        .unwrap();
    p.core_session = Some(t);
    let ev = p.device.handle_datagram(&resp, p.now, &mut out).unwrap();
    assert!(matches!(ev, DeviceEvent::Established { .. }));
    // The next initiation within the cookie's life carries it from the start.
    let again = p.device.start_handshake(SessionId(6), 11, p.now).unwrap();
    assert_eq!(again[1], 6);
    assert!(jar.check(&again, b"path", p.now));
    // A cookie reply for a handshake that is not pending is refused.
    assert!(p.device.handle_datagram(&reply, p.now, &mut out).is_err());
}

#[test]
fn a_resumed_session_sends_past_its_lease_and_refuses_old_frames() {
    use crate::session::SessionSnapshot;
    let mut p = Pair::new();
    p.handshake(1, 2);
    let old = p.device_send(&Message::Keepalive);
    assert!(p.core_open(&old).is_ok());
    // The core's acknowledgement so that the device's receive window has moved.
    let mut ack = Vec::new();
    let acked = Message::Ack {
        seqs: vec![ReadingSeq(1)],
        notices: Default::default(),
    };
    p.core_session
        .as_mut()
        .unwrap()
        .seal(&acked.to_vec(), &mut ack)
        .unwrap();
    let mut out = Vec::new();
    p.device.handle_datagram(&ack, p.now, &mut out).unwrap();

    let snap = p.device.snapshot(1024, p.now, 1_000_000).unwrap();
    assert_eq!(snap.sent(), 1 + 1024);
    let bytes = snap.encode();
    let back = SessionSnapshot::decode(&bytes).unwrap();
    assert_eq!(back, snap);
    assert!(!format!("{back:?}").contains(&format!("{:?}", p.core.public())));

    // A new device process: same key, no handshake.
    let later = p.now + Duration::from_secs(30);
    let mut resumed = DeviceSession::new(StaticKeypair::generate().unwrap(), *p.core.public());
    resumed.resume(&back, later, 1_030_000);
    assert!(resumed.is_established());
    assert!(!resumed.needs_handshake(later));
    assert!(
        resumed.needs_handshake(later + Duration::from_secs(31)),
        "rekey policy holds"
    );
    let mut frame = Vec::new();
    resumed
        .seal(&Message::Keepalive.to_vec(), &mut frame)
        .unwrap();
    let DeviceFrame::Transport { counter, .. } = DeviceFrame::decode(&frame).unwrap() else {
        panic!("not transport")
    };
    assert_eq!(counter, 1025, "the lease is skipped");
    assert!(p.core_open(&frame).is_ok());
    // The acknowledgement seen before the snapshot cannot be replayed to the resumed device.
    assert!(resumed.handle_datagram(&ack, later, &mut out).is_err());
    // Corrupt snapshots are refused, not misread.
    assert!(SessionSnapshot::decode(&bytes[..bytes.len() - 1]).is_err());
    let mut bad = bytes.clone();
    bad[0] = 9;
    assert!(SessionSnapshot::decode(&bad).is_err());
}

#[test]
fn session_state_is_small() {
    // The core holds one Transport per idle device; docs/protocol.md §8 counts on this.
    let size = std::mem::size_of::<Transport>();
    assert!(size <= 320, "Transport is {size} bytes");
}

/// Fixed keys for the test vectors (docs/protocol.md §9).
mod vectors {
    use super::*;

    const DEVICE_STATIC: &str = "e8a9b3f0c8b8f5c0d1b2a39485766778899aabbccddeeff00112233445566778";
    const CORE_STATIC: &str = "48c1d2e3f405162738495a6b7c8d9eafb0c1d2e3f405162738495a6b7c8d9e6f";
    const DEVICE_EPHEMERAL: &str =
        "70e1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e5f";
    const CORE_EPHEMERAL: &str = "d8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e4f";

    fn key(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// Produces every vector from the fixed inputs, as `name = hex` lines.
    fn compute() -> String {
        compute_with(DeviceSession::new)
    }

    /// The same, with the device's session made by `make` from its key pair and the core's key.
    fn compute_with(make: impl FnOnce(StaticKeypair, PublicKey) -> DeviceSession) -> String {
        let now = Instant::now();
        let device_kp = StaticKeypair::from_private_hex(DEVICE_STATIC).unwrap();
        let core_kp = StaticKeypair::from_private_hex(CORE_STATIC).unwrap();
        let core_pub = *core_kp.public();
        let device_pub = *device_kp.public();
        let mut device = make(device_kp, core_pub);
        let core = Responder::new(core_kp);
        let init = device
            .start_handshake_with(
                SessionId(0x0000_0007),
                &crate::payload::InitPayload {
                    timestamp: 1_700_000_000_000,
                    ..Default::default()
                },
                now,
                Some(&key(DEVICE_EPHEMERAL)),
            )
            .unwrap();
        let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(&init).unwrap()
        else {
            panic!()
        };
        let incoming = core
            .read_init_with(sender, noise, Some(&key(CORE_EPHEMERAL)))
            .unwrap();
        let mut resp = Vec::new();
        let mut core_t = incoming
            .accept(
                SessionId(0x0100_0001),
                &ResponsePayload::accept(3600),
                now,
                &mut resp,
            )
            .unwrap();
        let mut out = Vec::new();
        device.handle_datagram(&resp, now, &mut out).unwrap();
        let mut reading = Vec::new();
        device
            .seal(
                &Message::Reading {
                    seq: ReadingSeq(1),
                    data: b"kwh=000123.4",
                }
                .to_vec(),
                &mut reading,
            )
            .unwrap();
        let mut ack = Vec::new();
        core_t
            .seal(&Message::ack(vec![ReadingSeq(1)]).to_vec(), &mut ack)
            .unwrap();
        // The device side must open what the core sealed, and vice versa.
        device.handle_datagram(&ack, now, &mut out).unwrap();
        let DeviceFrame::Transport {
            counter,
            ciphertext,
            ..
        } = DeviceFrame::decode(&reading).unwrap()
        else {
            panic!()
        };
        core_t.open(counter, ciphertext, &mut out).unwrap();
        [
            ("device_static_private", DEVICE_STATIC.to_string()),
            ("device_static_public", device_pub.to_hex()),
            ("core_static_private", CORE_STATIC.to_string()),
            ("core_static_public", core_pub.to_hex()),
            ("device_ephemeral_private", DEVICE_EPHEMERAL.to_string()),
            ("core_ephemeral_private", CORE_EPHEMERAL.to_string()),
            ("handshake_init", hex::encode(&init)),
            ("handshake_response", hex::encode(&resp)),
            ("transport_reading_seq1", hex::encode(&reading)),
            ("transport_ack_seq1", hex::encode(&ack)),
        ]
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
    }

    #[test]
    fn match_checked_in_vectors() {
        let got = compute();
        if std::env::var_os("RELAY_WRITE_VECTORS").is_some() {
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/vectors.txt"),
                &got,
            )
            .unwrap();
        }
        let want = include_str!("../testdata/vectors.txt");
        assert_eq!(
            got, want,
            "the wire format changed: update docs/protocol.md §9 on purpose"
        );
    }

    /// The static key used through the secure element gives byte-identical handshakes: snow's
    /// static DH goes to the element, the (fixed) ephemeral stays snow's own.
    #[test]
    fn key_store_handshake_matches_checked_in_vectors() {
        let got = compute_with(|keypair, core| {
            let store = MemoryKeyStore::new();
            store.import(KeySlot::Factory, keypair).unwrap();
            DeviceSession::with_key_store(Arc::new(store), KeySlot::Factory, core).unwrap()
        });
        assert_eq!(got, include_str!("../testdata/vectors.txt"));
    }
}

/// A secure element that counts DH calls and can be told to fail them.
struct CountingStore {
    inner: MemoryKeyStore,
    dh_calls: AtomicUsize,
    fail_from_call: usize,
}

impl CountingStore {
    fn new(fail_from_call: usize) -> Arc<Self> {
        let store = Arc::new(Self {
            inner: MemoryKeyStore::new(),
            dh_calls: AtomicUsize::new(0),
            fail_from_call,
        });
        store.generate(KeySlot::Factory).unwrap();
        store
    }
}

impl SecureElement for CountingStore {
    fn slots(&self) -> Vec<KeySlot> {
        self.inner.slots()
    }
    fn public(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError> {
        self.inner.public(slot)
    }
    fn generate(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError> {
        self.inner.generate(slot)
    }
    fn commit(&self, from: KeySlot, to: KeySlot) -> Result<(), KeyStoreError> {
        self.inner.commit(from, to)
    }
    fn erase(&self, slot: KeySlot) -> Result<(), KeyStoreError> {
        self.inner.erase(slot)
    }
    fn dh(&self, slot: KeySlot, peer: &[u8; 32], out: &mut [u8; 32]) -> Result<(), KeyStoreError> {
        if self.dh_calls.fetch_add(1, Ordering::SeqCst) + 1 >= self.fail_from_call {
            return Err(KeyStoreError::Backend("element unplugged".into()));
        }
        self.inner.dh(slot, peer, out)
    }
}

#[test]
fn key_generated_inside_the_element_handshakes_and_rekeys() {
    let store = CountingStore::new(usize::MAX);
    let public = store.public(KeySlot::Factory).unwrap();
    let element: Arc<dyn SecureElement> = store.clone();
    let mut p = Pair::with_device(|core| {
        DeviceSession::with_key_store(element, KeySlot::Factory, core).unwrap()
    });
    assert_eq!(p.device.public(), &public);
    assert_eq!(
        p.handshake(1, 2),
        public,
        "the core authenticated the element's key"
    );
    // IK's two static-key DHs of the initiator (`ss` in message 1, `se` in message 2) ran inside.
    assert_eq!(store.dh_calls.load(Ordering::SeqCst), 2);
    let f = p.device_send(&Message::Keepalive);
    assert!(p.core_open(&f).is_ok());
    p.now += Duration::from_secs(61);
    assert!(p.device.needs_handshake(p.now));
    assert_eq!(p.handshake(3, 4), public);
    assert_eq!(store.dh_calls.load(Ordering::SeqCst), 4);
}

#[test]
fn element_failures_are_reported_as_local_not_blamed_on_the_peer() {
    // Fails the first DH: the HandshakeInit cannot be written.
    let store = CountingStore::new(1);
    let mut device = DeviceSession::with_key_store(
        store,
        KeySlot::Factory,
        *StaticKeypair::generate().unwrap().public(),
    )
    .unwrap();
    assert!(matches!(
        device.start_handshake(SessionId(1), 1, Instant::now()),
        Err(SessionError::KeyStore(KeyStoreError::Backend(_)))
    ));

    // Fails the second: the core's genuine response cannot be read.
    let store = CountingStore::new(2);
    let mut p = Pair::with_device(|core| {
        DeviceSession::with_key_store(store, KeySlot::Factory, core).unwrap()
    });
    let init = p.device.start_handshake(SessionId(1), 1, p.now).unwrap();
    let DeviceFrame::HandshakeInit { sender, noise } = DeviceFrame::decode(&init).unwrap() else {
        panic!()
    };
    let mut resp = Vec::new();
    let incoming = p.core.read_init(sender, noise).unwrap();
    incoming
        .accept(SessionId(2), &policy(), p.now, &mut resp)
        .unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        p.device.handle_datagram(&resp, p.now, &mut out),
        Err(SessionError::KeyStore(_))
    ));
    assert!(!p.device.is_established());
}

#[test]
fn memory_store_slots_are_generated_once_and_never_printed() {
    let store = MemoryKeyStore::new();
    assert!(store.slots().is_empty());
    assert!(matches!(
        DeviceSession::with_key_store(
            Arc::new(MemoryKeyStore::new()),
            KeySlot::Factory,
            PublicKey([9; 32])
        ),
        Err(SessionError::KeyStore(KeyStoreError::Empty(
            KeySlot::Factory
        )))
    ));
    let factory = store.generate(KeySlot::Factory).unwrap();
    assert!(matches!(
        store.generate(KeySlot::Factory),
        Err(KeyStoreError::Occupied(KeySlot::Factory))
    ));
    assert_eq!(store.public(KeySlot::Factory).unwrap(), factory);
    assert!(matches!(
        store.public(KeySlot::Subscription),
        Err(KeyStoreError::Empty(KeySlot::Subscription))
    ));
    let known = StaticKeypair::generate().unwrap();
    let private_hex = known.private_hex_for_storage();
    let subscription = store.import(KeySlot::Subscription, known).unwrap();
    assert_ne!(factory, subscription);
    assert_eq!(store.slots(), vec![KeySlot::Factory, KeySlot::Subscription]);
    let debug = format!("{store:?}");
    assert!(
        debug.contains("Subscription") && !debug.contains(&private_hex),
        "{debug}"
    );

    // DH through the store agrees with the peer's side of the exchange.
    let peer = StaticKeypair::generate().unwrap();
    let mut ours = [0; 32];
    store
        .dh(KeySlot::Subscription, &peer.public().0, &mut ours)
        .unwrap();
    let other = MemoryKeyStore::new();
    other.import(KeySlot::Factory, peer).unwrap();
    let mut theirs = [0; 32];
    other
        .dh(KeySlot::Factory, &subscription.0, &mut theirs)
        .unwrap();
    assert_eq!(ours, theirs);
    assert!(store.remove(KeySlot::Subscription));
    assert_eq!(store.slots(), vec![KeySlot::Factory]);
}
