//! Test only: a minimal in-memory core built on `relay_protocol::session::Responder`, enough to
//! drive meters against: it accepts any device key, refuses initiations whose timestamp does not
//! grow, stores readings once per `(device, seq)` and acknowledges every reading it opens. It is
//! not `core-stub`.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use relay_protocol::frame::{DeviceFrame, SessionId};
use relay_protocol::payload::{Message, ReadingSeq, ResponsePayload, MAX_ACKS};
use relay_protocol::session::{PublicKey, Responder, StaticKeypair, Transport};

pub(crate) struct TestCore {
    key_hex: String,
    responder: Responder,
    sessions: HashMap<SessionId, (Transport, PublicKey)>,
    next_id: u32,
    /// The last accepted handshake timestamp per device; kept across restarts, as if persisted.
    last_timestamp: HashMap<PublicKey, u64>,
    pub store: HashMap<PublicKey, BTreeMap<u64, Vec<u8>>>,
    pub rekey_after_secs: u32,
    /// Hold acknowledgements until [`TestCore::flush_acks`] instead of answering each reading.
    pub batch_acks: bool,
    pending_acks: HashMap<SessionId, Vec<ReadingSeq>>,
    pub handshakes: u64,
    pub duplicates: u64,
    pub dropped: u64,
}

impl TestCore {
    pub fn new() -> Self {
        let kp = StaticKeypair::generate().expect("keypair");
        let key_hex = kp.private_hex_for_storage();
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
        }
    }

    pub fn public(&self) -> PublicKey {
        *self.responder.public()
    }

    /// A restart: every session is forgotten; the key, the store and the timestamps survive.
    pub fn restart(&mut self) {
        let kp = StaticKeypair::from_private_hex(&self.key_hex).expect("stored key");
        self.responder = Responder::new(kp);
        self.sessions.clear();
        self.pending_acks.clear();
        self.next_id += 0x1000;
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
            DeviceFrame::HandshakeInit { sender, noise } => {
                let incoming = self.responder.read_init(sender, noise).ok()?;
                let device = *incoming.device();
                let last = self.last_timestamp.get(&device).copied().unwrap_or(0);
                if incoming.timestamp() <= last {
                    return None;
                }
                self.last_timestamp.insert(device, incoming.timestamp());
                self.next_id += 1;
                let id = SessionId(self.next_id);
                let mut out = Vec::new();
                let policy = ResponsePayload {
                    rekey_after_secs: self.rekey_after_secs,
                };
                let transport = incoming.accept(id, policy, now, &mut out).ok()?;
                self.sessions.insert(id, (transport, device));
                self.handshakes += 1;
                Some(vec![out])
            }
            DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            } => {
                let (transport, device) = self.sessions.get_mut(&receiver)?;
                let mut plain = Vec::new();
                transport.open(counter, ciphertext, &mut plain).ok()?;
                let Message::Reading { seq, data } = Message::decode(&plain).ok()? else {
                    return Some(Vec::new());
                };
                let stored = self.store.entry(*device).or_default();
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
                Some(vec![self.seal_ack(receiver, vec![seq])?])
            }
            DeviceFrame::HandshakeResponse { .. } => None,
        }
    }

    /// Seals an acknowledgement of `seqs` on session `id`.
    pub fn seal_ack(&mut self, id: SessionId, seqs: Vec<ReadingSeq>) -> Option<Vec<u8>> {
        self.seal(id, &Message::Ack { seqs })
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

    /// The ids of the sessions the core holds.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }
}
