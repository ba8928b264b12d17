//! Test only: a minimal in-memory core built on `relay_protocol::session::Responder`, enough to
//! drive meters against. By default it accepts any device key, refuses initiations whose timestamp
//! does not grow, stores readings once per `(device, seq)` and acknowledges every reading it opens.
//!
//! Devices [`TestCore::register`]ed by their factory key run the credential lifecycle of the
//! design (a model of the core's engine, not `core-stub`): claim and activation, provisioning with
//! the factory key (`KeyAccepted` + `Config`, no session kept), two-phase credential updates,
//! `Rotate` and `Config` notices on handshake responses and piggybacked on acknowledgements,
//! suspension, quarantine, ownership change (`Reprovision`) and release (`Released` + `Release`).
//! Their readings are stored under the factory key, whatever subscription key carried them.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use relay_protocol::admission::AdmissionKey;
use relay_protocol::cookie::CookieJar;
use relay_protocol::frame::{DeviceFrame, SessionId};
use relay_protocol::payload::{
    DeviceConfig, InitPayload, Message, Notices, ReadingSeq, RefusalReason, Release,
    ResponsePayload, MAX_ACKS,
};
use relay_protocol::session::{IncomingHandshake, PublicKey, Responder, StaticKeypair, Transport};
use relay_protocol::stream::{StreamKeys, StreamOpen};

/// A registered device's subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Subscription {
    pub key: PublicKey,
    pub next: Option<PublicKey>,
    pub status: Status,
    pub rotate: bool,
    pub config_version: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Active,
    Suspended,
    Revoked,
    Quarantined,
    /// Revoked by an ownership change: the device re-provisions.
    Transferred,
}

/// A registered device (by its factory key).
#[derive(Clone, Debug)]
pub(crate) struct Registered {
    pub factory: PublicKey,
    pub claimed: bool,
    pub activated: bool,
    pub subscription: Option<Subscription>,
    pub retired: Vec<PublicKey>,
    pub released: Option<Release>,
    pub provisionings: u64,
    /// Its profile does not allow the path it uses: every handshake is refused `NotPermitted`.
    pub not_permitted: bool,
}

pub(crate) struct TestCore {
    key_hex: String,
    responder: Responder,
    /// Session → (transport, the device's identity: its key, or a registered device's factory
    /// key).
    sessions: HashMap<SessionId, (Transport, PublicKey)>,
    next_id: u32,
    /// The last accepted handshake timestamp per key; kept across restarts, as if persisted.
    last_timestamp: HashMap<PublicKey, u64>,
    pub store: HashMap<PublicKey, BTreeMap<u64, Vec<u8>>>,
    pub rekey_after_secs: u32,
    /// Hold acknowledgements until [`TestCore::flush_acks`] instead of answering each reading.
    pub batch_acks: bool,
    pending_acks: HashMap<SessionId, Vec<ReadingSeq>>,
    pub handshakes: u64,
    pub duplicates: u64,
    pub dropped: u64,
    /// Refuse (`UnknownKey`) keys that are neither registered nor a subscription's, instead of
    /// accepting any key.
    pub refuse_unknown: bool,
    /// Registered devices by serial.
    pub devices: BTreeMap<String, Registered>,
    /// The profile every registered device gets.
    pub profile: DeviceConfig,
    /// Refusals sent, by reason.
    pub refusals: HashMap<RefusalReason, u64>,
    /// Every authenticated initiation: the device key and its payload.
    pub inits: Vec<(PublicKey, InitPayload)>,
    /// Give every accepted session an admission key (the real core always does); the device
    /// then tags its frames (`AdmittedTransport`), and frames with a bad tag are dropped.
    pub admission: bool,
    /// Admission keys by session.
    admission_keys: HashMap<SessionId, AdmissionKey>,
    /// Answer plain initiations with a cookie challenge (the real core under load).
    pub demand_cookies: bool,
    jar: CookieJar,
    /// Cookie replies sent.
    pub cookie_replies: u64,
    /// `CookieInit`s whose MAC did not check.
    pub stale_cookies: u64,
    /// `AdmittedTransport` frames whose tag did not check.
    pub bad_tags: u64,
}

/// The path bytes the test core's cookies are bound to (one path: no addresses in memory).
const COOKIE_SOURCE: &[u8] = b"test";

impl TestCore {
    pub fn new() -> Self {
        let kp = StaticKeypair::generate().expect("keypair");
        let key_hex = kp.private_hex_for_storage();
        let jar = CookieJar::new(kp.public(), Instant::now()).expect("cookie jar");
        Self {
            key_hex,
            responder: Responder::new(kp),
            sessions: HashMap::new(),
            next_id: 0x1000,
            last_timestamp: HashMap::new(),
            store: HashMap::new(),
            rekey_after_secs: 3600,
            batch_acks: false,
            pending_acks: HashMap::new(),
            handshakes: 0,
            duplicates: 0,
            dropped: 0,
            refuse_unknown: false,
            devices: BTreeMap::new(),
            profile: DeviceConfig {
                version: 1,
                report_interval_secs: 60,
                report_bytes: 64,
                threshold: 0,
            },
            refusals: HashMap::new(),
            inits: Vec::new(),
            admission: false,
            admission_keys: HashMap::new(),
            demand_cookies: false,
            jar,
            cookie_replies: 0,
            stale_cookies: 0,
            bad_tags: 0,
        }
    }

    pub fn public(&self) -> PublicKey {
        *self.responder.public()
    }

    /// A restart: every session is forgotten; the key, the store, the registry and the timestamps
    /// survive.
    pub fn restart(&mut self) {
        let kp = StaticKeypair::from_private_hex(&self.key_hex).expect("stored key");
        self.responder = Responder::new(kp);
        self.sessions.clear();
        self.admission_keys.clear();
        self.pending_acks.clear();
        self.next_id += 0x1000;
    }

    /// Registers a device by its factory key (the manifest import), claimed and activated as
    /// given.
    pub fn register(&mut self, serial: &str, factory: PublicKey, claimed: bool, activated: bool) {
        self.devices.insert(
            serial.to_owned(),
            Registered {
                factory,
                claimed,
                activated,
                subscription: None,
                retired: Vec::new(),
                released: None,
                provisionings: 0,
                not_permitted: false,
            },
        );
    }

    pub fn device(&mut self, serial: &str) -> &mut Registered {
        self.devices.get_mut(serial).expect("registered device")
    }

    pub fn subscription(&self, serial: &str) -> Option<&Subscription> {
        self.devices.get(serial)?.subscription.as_ref()
    }

    /// Asks for a credential update (operator or fraud detector).
    pub fn request_rotate(&mut self, serial: &str) {
        if let Some(s) = self.device(serial).subscription.as_mut() {
            s.rotate = true;
        }
    }

    /// Sets the subscription's status and drops the device's sessions.
    pub fn set_status(&mut self, serial: &str, status: Status) {
        if let Some(s) = self.device(serial).subscription.as_mut() {
            s.status = status;
        }
        if status != Status::Active {
            self.drop_sessions(serial);
        }
    }

    /// Releases the device to another operator; its sessions end.
    pub fn release(&mut self, serial: &str, release: Release) {
        self.device(serial).released = Some(release);
        self.drop_sessions(serial);
    }

    /// Forgets the device's sessions (as a core restart or a session's expiry would).
    pub fn drop_sessions(&mut self, serial: &str) {
        let factory = self.device(serial).factory;
        self.sessions.retain(|_, (_, id)| *id != factory);
    }

    /// The readings stored for a registered device.
    pub fn readings_of(&self, serial: &str) -> Option<&BTreeMap<u64, Vec<u8>>> {
        self.store.get(&self.devices.get(serial)?.factory)
    }

    /// Handles one datagram from a device; returns the datagrams to send back to it.
    pub fn handle(&mut self, datagram: &[u8], now: Instant) -> Vec<Vec<u8>> {
        match self.try_handle(datagram, now) {
            Some(out) => out,
            None => {
                self.dropped += 1;
                Vec::new()
            }
        }
    }

    fn try_handle(&mut self, datagram: &[u8], now: Instant) -> Option<Vec<Vec<u8>>> {
        match DeviceFrame::decode(datagram).ok()? {
            DeviceFrame::HandshakeInit { sender, noise } if self.demand_cookies => {
                let mut out = Vec::new();
                self.jar
                    .reply(sender, noise, COOKIE_SOURCE, now, &mut out)
                    .ok()?;
                self.cookie_replies += 1;
                Some(vec![out])
            }
            DeviceFrame::CookieInit { sender, noise, .. }
                if !self.jar.check(datagram, COOKIE_SOURCE, now) =>
            {
                self.stale_cookies += 1;
                let mut out = Vec::new();
                self.jar
                    .reply(sender, noise, COOKIE_SOURCE, now, &mut out)
                    .ok()?;
                self.cookie_replies += 1;
                Some(vec![out])
            }
            DeviceFrame::HandshakeInit { sender, noise }
            | DeviceFrame::CookieInit { sender, noise, .. } => {
                let incoming = self.responder.read_init(sender, noise).ok()?;
                let device = *incoming.device();
                let last = self.last_timestamp.get(&device).copied().unwrap_or(0);
                if incoming.timestamp() <= last {
                    return None;
                }
                self.last_timestamp.insert(device, incoming.timestamp());
                self.inits.push((device, *incoming.init()));
                let mut out = Vec::new();
                match self.decide(&incoming) {
                    Decision::Accept {
                        identity,
                        mut policy,
                    } => {
                        self.next_id += 1;
                        let id = SessionId(self.next_id);
                        if self.admission {
                            let key = AdmissionKey(rand::random());
                            policy.admission = Some(key);
                            self.admission_keys.insert(id, key);
                        }
                        let transport = incoming.accept(id, &policy, now, &mut out).ok()?;
                        self.sessions.insert(id, (transport, identity));
                        self.handshakes += 1;
                    }
                    Decision::Answer(policy) => {
                        if let Some(r) = policy.refused {
                            *self.refusals.entry(r).or_default() += 1;
                        }
                        incoming.refuse(&policy, &mut out).ok()?;
                    }
                }
                Some(vec![out])
            }
            DeviceFrame::AdmittedTransport {
                receiver,
                counter,
                ciphertext,
                ..
            } => {
                if !self
                    .admission_keys
                    .get(&receiver)
                    .is_some_and(|k| k.verify(datagram))
                {
                    self.bad_tags += 1;
                    return None;
                }
                self.transport(receiver, counter, ciphertext)
            }
            DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            } => self.transport(receiver, counter, ciphertext),
            DeviceFrame::HandshakeResponse { .. } | DeviceFrame::CookieReply { .. } => None,
        }
    }

    /// A transport frame's ciphertext on session `receiver`: a reading is stored (once) and
    /// acknowledged.
    fn transport(
        &mut self,
        receiver: SessionId,
        counter: u64,
        ciphertext: &[u8],
    ) -> Option<Vec<Vec<u8>>> {
        let (transport, device) = self.sessions.get_mut(&receiver)?;
        let device = *device;
        let mut plain = Vec::new();
        transport.open(counter, ciphertext, &mut plain).ok()?;
        let Message::Reading { seq, data } = Message::decode(&plain).ok()? else {
            return Some(Vec::new());
        };
        let stored = self.store.entry(device).or_default();
        match stored.entry(seq.0) {
            std::collections::btree_map::Entry::Occupied(_) => self.duplicates += 1,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(data.to_vec());
            }
        }
        if self.batch_acks {
            self.pending_acks.entry(receiver).or_default().push(seq);
            return Some(Vec::new());
        }
        let notices = self.ack_notices(&device);
        let ack = Message::Ack {
            seqs: vec![seq],
            notices,
        };
        Some(vec![self.seal(receiver, &ack)?])
    }

    /// What rides on the next acknowledgement to the device `identity`: a rotation notice while
    /// one is requested, the configuration when the device runs another version (then recorded
    /// as delivered).
    fn ack_notices(&mut self, identity: &PublicKey) -> Notices {
        let profile = self.profile;
        let Some(sub) = self
            .devices
            .values_mut()
            .find(|d| d.factory == *identity)
            .and_then(|d| d.subscription.as_mut())
        else {
            return Notices::default();
        };
        let mut notices = Notices {
            rotate: sub.rotate,
            ..Notices::default()
        };
        if sub.config_version != Some(profile.version) {
            notices.config = Some(profile);
            sub.config_version = Some(profile.version);
        }
        notices
    }

    /// The engine's decision on an authenticated initiation.
    fn decide(&mut self, incoming: &IncomingHandshake) -> Decision {
        let key = *incoming.device();
        let init = *incoming.init();
        let profile = self.profile;
        let rekey = self.rekey_after_secs;
        let refuse_unknown = self.refuse_unknown;
        let refuse = |reason| Decision::Answer(ResponsePayload::refuse(reason));
        let Some(d) = self.devices.values_mut().find(|d| {
            d.factory == key
                || d.retired.contains(&key)
                || d.subscription
                    .as_ref()
                    .is_some_and(|s| s.key == key || s.next == Some(key))
        }) else {
            return if refuse_unknown {
                refuse(RefusalReason::UnknownKey)
            } else {
                Decision::Accept {
                    identity: key,
                    policy: ResponsePayload::accept(rekey),
                }
            };
        };
        if d.not_permitted {
            return refuse(RefusalReason::NotPermitted);
        }
        if let Some(release) = &d.released {
            let mut policy = ResponsePayload::refuse(RefusalReason::Released);
            policy.notices.release = Some(release.clone());
            return Decision::Answer(policy);
        }
        if d.factory == key {
            // Provisioning with the factory identity.
            if !d.claimed {
                return refuse(RefusalReason::Unclaimed);
            }
            if !d.activated {
                return refuse(RefusalReason::NotActivated);
            }
            let Some(next) = init.next_key else {
                return refuse(RefusalReason::KeyRequired);
            };
            if d.subscription
                .as_ref()
                .is_some_and(|s| s.status == Status::Suspended)
            {
                return refuse(RefusalReason::Suspended);
            }
            if let Some(old) = d.subscription.take() {
                if old.key != next {
                    d.retired.push(old.key);
                }
            }
            d.subscription = Some(Subscription {
                key: next,
                next: None,
                status: Status::Active,
                rotate: false,
                config_version: Some(profile.version),
            });
            d.provisionings += 1;
            let mut policy = ResponsePayload::accept(rekey);
            policy.key_accepted = Some(next);
            policy.notices.config = Some(profile);
            return Decision::Answer(policy);
        }
        if d.retired.contains(&key) {
            return refuse(RefusalReason::Superseded);
        }
        let identity = d.factory;
        let Some(sub) = d.subscription.as_mut() else {
            return refuse(RefusalReason::UnknownKey);
        };
        match sub.status {
            Status::Active => {}
            Status::Suspended => return refuse(RefusalReason::Suspended),
            Status::Revoked => return refuse(RefusalReason::Revoked),
            Status::Quarantined => return refuse(RefusalReason::Quarantined),
            Status::Transferred => return refuse(RefusalReason::Reprovision),
        }
        let mut policy = ResponsePayload::accept(rekey);
        if sub.next == Some(key) {
            // Phase 2: the new key is used; the old one retires.
            d.retired.push(sub.key);
            sub.key = key;
            sub.next = None;
            sub.rotate = false;
        } else if let Some(next) = init.next_key {
            // Phase 1: the old key still works until the new one is used.
            sub.next = Some(next);
            policy.key_accepted = Some(next);
        } else if sub.rotate {
            policy.notices.rotate = true;
        }
        sub.config_version = init.config_version;
        if init.config_version != Some(profile.version) {
            policy.notices.config = Some(profile);
            sub.config_version = Some(profile.version);
        }
        Decision::Accept { identity, policy }
    }

    /// Seals an acknowledgement of `seqs` on session `id`.
    pub fn seal_ack(&mut self, id: SessionId, seqs: Vec<ReadingSeq>) -> Option<Vec<u8>> {
        self.seal(id, &Message::ack(seqs))
    }

    /// Seals any message on session `id`.
    pub fn seal(&mut self, id: SessionId, message: &Message<'_>) -> Option<Vec<u8>> {
        let (transport, _) = self.sessions.get_mut(&id)?;
        let mut out = Vec::new();
        transport.seal(&message.to_vec(), &mut out).ok()?;
        Some(out)
    }

    /// The acknowledgements held in batch mode, one datagram per session.
    pub fn flush_acks(&mut self) -> Vec<Vec<u8>> {
        let pending: Vec<_> = self.pending_acks.drain().collect();
        let mut out = Vec::new();
        for (id, seqs) in pending {
            for chunk in seqs.chunks(MAX_ACKS) {
                out.extend(self.seal_ack(id, chunk.to_vec()));
            }
        }
        out
    }

    /// The first frame of a stream connection: a transport frame on a live session (with a good
    /// admission tag if it is admitted) whose plaintext is a `StreamOpen`. Returns the device's
    /// identity, the open and the connection's keys (the core's side).
    pub fn open_stream(&mut self, frame: &[u8]) -> Option<(PublicKey, StreamOpen, StreamKeys)> {
        let (receiver, counter, ciphertext) = match DeviceFrame::decode(frame).ok()? {
            DeviceFrame::AdmittedTransport {
                receiver,
                counter,
                ciphertext,
                ..
            } => {
                if !self
                    .admission_keys
                    .get(&receiver)
                    .is_some_and(|k| k.verify(frame))
                {
                    self.bad_tags += 1;
                    return None;
                }
                (receiver, counter, ciphertext)
            }
            DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            } => (receiver, counter, ciphertext),
            _ => return None,
        };
        let (transport, device) = self.sessions.get_mut(&receiver)?;
        let mut plain = Vec::new();
        transport.open(counter, ciphertext, &mut plain).ok()?;
        let Message::StreamOpen(open) = Message::decode(&plain).ok()? else {
            return None;
        };
        let keys = transport.stream_keys(&open.salt, &open.upload);
        Some((*device, open, keys))
    }

    /// The ids of the sessions the core holds.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }
}

enum Decision {
    /// Establish a session for the device `identity`.
    Accept {
        identity: PublicKey,
        policy: ResponsePayload,
    },
    /// Answer without keeping a session (a refusal, or a provisioning's `KeyAccepted`).
    Answer(ResponsePayload),
}
