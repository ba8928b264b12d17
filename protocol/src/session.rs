//! The end-to-end session: `Noise_IK_25519_ChaChaPoly_BLAKE2s` between a device (initiator) and the
//! core (responder), then ChaCha20-Poly1305 under the handshake's split keys with explicit
//! counters and our replay window (`docs/protocol.md` §6): exactly Noise's transport phase, done
//! here rather than by snow so that a sleeping device can persist and resume a session
//! ([`SessionSnapshot`]).
//!
//! ```text
//!  DeviceSession                                   Responder
//!  start_handshake ── HandshakeInit ────────────▶  read_init ─▶ IncomingHandshake
//!                                                  (core checks the key)   │ accept
//!  handle_datagram ◀─ HandshakeResponse ─────────────────────────────────── ┘
//!        │ Established                                   Transport
//!  seal / handle_datagram ◀── Transport frames ──▶ Transport::open / seal
//! ```
//!
//! Nothing here touches a socket or a clock: time comes in as `now: Instant`, randomness for
//! session ids from the caller. Ephemeral keys come from snow's resolver. The device's static key
//! is either a [`StaticKeypair`] in memory or a slot of a [`SecureElement`] that the handshake
//! uses without reading the key ([`DeviceSession::with_key_store`]; design in
//! [`crate::secure_element`]).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use snow::params::NoiseParams;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::{Builder, HandshakeState};

use crate::admission::AdmissionKey;
use crate::frame::{
    DeviceFrame, SessionId, ADMISSION_TAG_LEN, MAX_TRANSPORT_PLAINTEXT, TAG_LEN, TRANSPORT_HEADER,
};
use crate::payload::{InitPayload, ResponsePayload, MAX_HANDSHAKE_PAYLOAD};
use crate::secure_element::{KeyHandle, KeySlot, KeyStoreError, SecureElement};
use crate::DecodeError;

/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

/// Mixed into every handshake hash: a session of another protocol or version cannot be spliced in.
pub const PROLOGUE: &[u8] = b"relay-gateway/e2e/1";

/// Length of a Curve25519 key.
pub const KEY_LEN: usize = 32;

/// After this many frames sent, the device starts a new handshake.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;

/// No frame is sealed or opened with a counter at or past this value.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

fn params() -> NoiseParams {
    // The constant parses; a failure here is a programming error caught by every test.
    NOISE_PATTERN
        .parse()
        .expect("NOISE_PATTERN is a valid Noise protocol name")
}

/// Why a session operation failed, sorted by who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The peer (or someone on the path) sent something malformed.
    #[error("malformed: {0}")]
    Malformed(#[from] DecodeError),
    /// A frame failed authentication: forged, altered, or for another session.
    #[error("authentication failed")]
    Authentication,
    /// A frame's counter was seen before or is too old.
    #[error("replay: {0}")]
    Replay(#[from] crate::replay::ReplayError),
    /// A frame names a session this side does not hold.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// A frame of a type this side never receives.
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(crate::frame::FrameType),
    /// Local: no established session to send on yet.
    #[error("no established session")]
    NoSession,
    /// Local: the plaintext does not fit in one frame.
    #[error("plaintext of {0} bytes does not fit in one frame")]
    TooLarge(usize),
    /// Local: the session's counter is used up; a new handshake is needed.
    #[error("session counter exhausted")]
    Exhausted,
    /// Local: snow refused an operation for another reason (key material, state).
    #[error("noise: {0}")]
    Noise(snow::Error),
    /// Local: the device's secure element refused or failed (an empty slot, its storage).
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
}

impl SessionError {
    /// Maps a snow error, blaming the secure element (not the peer) when it caused the failure.
    fn from_noise(e: snow::Error, key: Option<&KeyHandle>) -> Self {
        match key.and_then(KeyHandle::take_failure) {
            Some(failure) => Self::KeyStore(failure),
            None => e.into(),
        }
    }
}

impl From<snow::Error> for SessionError {
    fn from(e: snow::Error) -> Self {
        match e {
            snow::Error::Decrypt => Self::Authentication,
            // A bad ephemeral point or a message of the wrong length is the peer's doing.
            snow::Error::Input | snow::Error::Dh => Self::Authentication,
            other => Self::Noise(other),
        }
    }
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, DecodeError> {
        parse_hex32(s).map(Self)
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A short fingerprint: enough to tell keys apart in a test failure.
        write!(f, "PublicKey({}…)", &self.to_hex()[..8])
    }
}

/// A static Curve25519 key pair. `Debug` never prints the private half.
pub struct StaticKeypair {
    public: PublicKey,
    private: [u8; KEY_LEN],
}

impl StaticKeypair {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<Self, SessionError> {
        let kp = Builder::new(params()).generate_keypair()?;
        Self::from_private(&kp.private)
    }

    /// The key pair for a stored private key.
    pub fn from_private(private: &[u8]) -> Result<Self, SessionError> {
        let private: [u8; KEY_LEN] = private
            .try_into()
            .map_err(|_| SessionError::Noise(snow::Error::Input))?;
        let mut dh = DefaultResolver
            .resolve_dh(&snow::params::DHChoice::Curve25519)
            .ok_or(SessionError::Noise(snow::Error::Dh))?;
        dh.set(&private);
        let public: [u8; KEY_LEN] = dh
            .pubkey()
            .try_into()
            .map_err(|_| SessionError::Noise(snow::Error::Dh))?;
        Ok(Self {
            public: PublicKey(public),
            private,
        })
    }

    /// Parses a private key from 64 hex digits.
    pub fn from_private_hex(s: &str) -> Result<Self, SessionError> {
        Self::from_private(&parse_hex32(s)?)
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The private half as hex, for writing it to a protected key file. Never log it.
    pub fn private_hex_for_storage(&self) -> String {
        to_hex(&self.private)
    }

    pub(crate) fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("public", &self.public)
            .field("private", &"<redacted>")
            .finish()
    }
}

impl Drop for StaticKeypair {
    fn drop(&mut self) {
        self.private = [0; KEY_LEN];
    }
}

/// One established session's keys, counters and replay window: the same type on both sides.
pub struct Transport {
    local: SessionId,
    remote: SessionId,
    /// The sending direction's key, then the receiving one's (Noise's split).
    keys: Box<[[u8; KEY_LEN]; 2]>,
    next_counter: u64,
    replay: crate::replay::ReplayWindow,
    established: Instant,
    /// Device side: the session's admission key, once the core gave one.
    admission: Option<AdmissionKey>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("next_counter", &self.next_counter)
            .finish_non_exhaustive()
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        *self.keys = [[0; KEY_LEN]; 2];
    }
}

/// Noise's ChaChaPoly nonce: 32 zero bits, then the counter as 64-bit little-endian.
fn nonce(counter: u64) -> chacha20poly1305::Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n.into()
}

impl Transport {
    fn new(
        local: SessionId,
        remote: SessionId,
        mut hs: HandshakeState,
        now: Instant,
    ) -> Result<Self, SessionError> {
        if !hs.is_handshake_finished() {
            return Err(SessionError::Noise(snow::Error::State(
                snow::error::StateProblem::HandshakeNotFinished,
            )));
        }
        // k1 protects initiator → responder, k2 the other way (Noise §5.2 Split).
        let (k1, k2) = hs.dangerously_get_raw_split();
        let keys = if hs.is_initiator() {
            [k1, k2]
        } else {
            [k2, k1]
        };
        Ok(Self {
            local,
            remote,
            keys: Box::new(keys),
            next_counter: 0,
            replay: crate::replay::ReplayWindow::new(),
            established: now,
            admission: None,
        })
    }

    /// This side's id for the session: incoming frames carry it.
    pub fn local_id(&self) -> SessionId {
        self.local
    }

    /// The peer's id for the session: outgoing frames carry it.
    pub fn remote_id(&self) -> SessionId {
        self.remote
    }

    /// How long ago the handshake completed.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.established)
    }

    /// How many frames this side has sealed.
    pub fn sent(&self) -> u64 {
        self.next_counter
    }

    /// Device side: once set, [`Transport::seal`] writes `AdmittedTransport` frames tagged under
    /// `key` (`docs/protocol.md` §12).
    pub fn set_admission(&mut self, key: Option<AdmissionKey>) {
        self.admission = key;
    }

    /// The admission key frames are tagged with, if any.
    pub fn admission(&self) -> Option<&AdmissionKey> {
        self.admission.as_ref()
    }

    /// Seals `plaintext` into a complete transport frame appended to `out`: `Transport`, or
    /// `AdmittedTransport` with its tag when the session has an admission key.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SessionError> {
        if plaintext.len() > MAX_TRANSPORT_PLAINTEXT {
            return Err(SessionError::TooLarge(plaintext.len()));
        }
        let counter = self.next_counter;
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(SessionError::Exhausted);
        }
        let start = out.len();
        let kind = if self.admission.is_some() {
            crate::frame::FrameType::AdmittedTransport
        } else {
            crate::frame::FrameType::Transport
        };
        out.reserve(TRANSPORT_HEADER + plaintext.len() + TAG_LEN + ADMISSION_TAG_LEN);
        out.push(crate::frame::VERSION);
        out.push(kind as u8);
        out.extend_from_slice(&self.remote.0.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        let body = out.len();
        out.extend_from_slice(plaintext);
        let cipher = ChaCha20Poly1305::new((&self.keys[0]).into());
        match cipher.encrypt_in_place_detached(&nonce(counter), &[], &mut out[body..]) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => {
                out.truncate(start);
                return Err(SessionError::Exhausted);
            }
        }
        if let Some(key) = &self.admission {
            let tag = key.tag(&out[start..]);
            out.extend_from_slice(&tag);
        }
        self.next_counter += 1;
        Ok(())
    }

    /// Opens a transport frame's ciphertext (already parsed off the frame, without an admission
    /// tag) into `out`, which is cleared first. The counter enters the replay window only once the
    /// frame authenticated.
    pub fn open(
        &mut self,
        counter: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(SessionError::Exhausted);
        }
        self.replay.check(counter)?;
        let Some(split) = ciphertext.len().checked_sub(TAG_LEN) else {
            return Err(SessionError::Authentication);
        };
        let (body, tag) = ciphertext.split_at(split);
        out.clear();
        out.extend_from_slice(body);
        let cipher = ChaCha20Poly1305::new((&self.keys[1]).into());
        match cipher.decrypt_in_place_detached(&nonce(counter), &[], out, tag.into()) {
            Ok(()) => {
                self.replay.accept(counter)?;
                Ok(())
            }
            Err(_) => {
                out.clear();
                Err(SessionError::Authentication)
            }
        }
    }

    /// The keys of one stream connection (`docs/protocol.md` §13), derived from this session's
    /// transport keys, the connection's `salt` and the upload. On either side the result's sending
    /// key is this side's sending direction.
    pub fn stream_keys(
        &self,
        salt: &[u8; 16],
        upload: &crate::stream::UploadId,
    ) -> crate::stream::StreamKeys {
        crate::stream::StreamKeys::derive(&self.keys, salt, upload)
    }

    /// The session's state for a device that goes to sleep (`docs/protocol.md` §12.5). The
    /// snapshot's send counter is `sent + lease`: a device persists it before sending more, and
    /// persists again before it has sent `lease` frames, so that a crash never makes it reuse a
    /// counter (a nonce) after resuming.
    pub fn snapshot(
        &self,
        lease: u64,
        established_unix_ms: u64,
        rekey_after_secs: u32,
    ) -> SessionSnapshot {
        SessionSnapshot {
            local: self.local,
            remote: self.remote,
            keys: *self.keys,
            next_counter: self.next_counter.saturating_add(lease),
            receive_floor: self.replay.floor(),
            established_unix_ms,
            rekey_after_secs,
            admission: self.admission,
        }
    }

    fn resume(snapshot: &SessionSnapshot, established: Instant) -> Self {
        Self {
            local: snapshot.local,
            remote: snapshot.remote,
            keys: Box::new(snapshot.keys),
            next_counter: snapshot.next_counter,
            replay: crate::replay::ReplayWindow::resumed(snapshot.receive_floor),
            established,
            admission: snapshot.admission,
        }
    }
}

/// A device's persisted session: both keys, the counters and the admission key. It is as secret
/// as the session keys themselves: keep it in the device's sealed store, never in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    local: SessionId,
    remote: SessionId,
    keys: [[u8; KEY_LEN]; 2],
    next_counter: u64,
    receive_floor: u64,
    established_unix_ms: u64,
    rekey_after_secs: u32,
    admission: Option<AdmissionKey>,
}

impl fmt::Debug for SessionSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSnapshot")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("next_counter", &self.next_counter)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionSnapshot {
    fn drop(&mut self) {
        self.keys = [[0; KEY_LEN]; 2];
    }
}

/// The snapshot encoding's version byte.
const SNAPSHOT_VERSION: u8 = 1;
/// Encoded length: version, ids, keys, counters, time, rekey, admission flag and key.
const SNAPSHOT_LEN: usize = 1 + 4 + 4 + 2 * KEY_LEN + 8 + 8 + 8 + 4 + 1 + 16;

impl SessionSnapshot {
    /// A fixed-size encoding (126 bytes), for the device's store.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SNAPSHOT_LEN);
        b.push(SNAPSHOT_VERSION);
        b.extend_from_slice(&self.local.0.to_be_bytes());
        b.extend_from_slice(&self.remote.0.to_be_bytes());
        b.extend_from_slice(&self.keys[0]);
        b.extend_from_slice(&self.keys[1]);
        b.extend_from_slice(&self.next_counter.to_be_bytes());
        b.extend_from_slice(&self.receive_floor.to_be_bytes());
        b.extend_from_slice(&self.established_unix_ms.to_be_bytes());
        b.extend_from_slice(&self.rekey_after_secs.to_be_bytes());
        match &self.admission {
            Some(k) => {
                b.push(1);
                b.extend_from_slice(&k.0);
            }
            None => {
                b.push(0);
                b.extend_from_slice(&[0; 16]);
            }
        }
        b
    }

    /// Parses [`SessionSnapshot::encode`]'s output.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        use crate::frame::{split_u32, split_u64};
        if b.len() != SNAPSHOT_LEN {
            return Err(DecodeError::Invalid("session snapshot length"));
        }
        let [version, rest @ ..] = b else {
            return Err(DecodeError::Truncated);
        };
        if *version != SNAPSHOT_VERSION {
            return Err(DecodeError::UnknownVersion(*version));
        }
        let (local, rest) = split_u32(rest)?;
        let (remote, rest) = split_u32(rest)?;
        let (k0, rest) = rest.split_at(KEY_LEN);
        let (k1, rest) = rest.split_at(KEY_LEN);
        let (next_counter, rest) = split_u64(rest)?;
        let (receive_floor, rest) = split_u64(rest)?;
        let (established_unix_ms, rest) = split_u64(rest)?;
        let (rekey_after_secs, rest) = split_u32(rest)?;
        let [flag, key @ ..] = rest else {
            return Err(DecodeError::Truncated);
        };
        let admission = match flag {
            0 => None,
            1 => Some(AdmissionKey(
                key.try_into()
                    .map_err(|_| DecodeError::Invalid("admission key"))?,
            )),
            _ => return Err(DecodeError::Invalid("admission flag")),
        };
        let mut keys = [[0u8; KEY_LEN]; 2];
        keys[0].copy_from_slice(k0);
        keys[1].copy_from_slice(k1);
        Ok(Self {
            local: SessionId(local),
            remote: SessionId(remote),
            keys,
            next_counter,
            receive_floor,
            established_unix_ms,
            rekey_after_secs,
            admission,
        })
    }

    /// When the session's handshake completed, in milliseconds since the Unix epoch.
    pub fn established_unix_ms(&self) -> u64 {
        self.established_unix_ms
    }

    /// The core's rekey time for the session.
    pub fn rekey_after_secs(&self) -> u32 {
        self.rekey_after_secs
    }

    /// The first counter the resumed session sends with (the lease included).
    pub fn sent(&self) -> u64 {
        self.next_counter
    }

    /// The core's session id: the `receiver` of the device's frames.
    pub fn remote_id(&self) -> SessionId {
        self.remote
    }
}

/// Noise adds this much to a handshake payload in message 1 (e, s + tag, payload tag).
const INIT_NOISE_OVERHEAD: usize = 32 + 48 + 16;
/// Noise adds this much to a handshake payload in message 2 (e, payload tag).
const RESPONSE_NOISE_OVERHEAD: usize = 32 + 16;

/// What a datagram meant to a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The handshake completed: the device can send on the new session.
    Established {
        /// The core's answer: rekey policy, accepted key, notices.
        response: ResponsePayload,
    },
    /// The core answered the handshake with an authenticated refusal: no session was installed
    /// (`response.refused` says why).
    Refused {
        /// The core's answer.
        response: ResponsePayload,
    },
    /// A transport frame opened; its plaintext is in the caller's buffer.
    Plaintext,
    /// The core is under load and answered the pending handshake with a cookie
    /// (`docs/protocol.md` §12.6): the caller's buffer holds the `CookieInit` datagram (the same
    /// Noise message 1 with the cookie's MAC) to send now. The handshake stays pending, and the
    /// device's initiations in the next two minutes carry the cookie too.
    CookieChallenge,
}

struct PendingHandshake {
    hs: HandshakeState,
    /// The `HandshakeInit` datagram, to re-send with a cookie.
    init: Vec<u8>,
    local: SessionId,
    started: Instant,
    /// The secure element's binding, to tell its failures from the peer's.
    key: Option<Arc<KeyHandle>>,
}

/// Where a device's static private key is.
enum DeviceKey {
    /// In process memory.
    Keypair(StaticKeypair),
    /// In a secure element's slot, never read out.
    Element {
        store: Arc<dyn SecureElement>,
        slot: KeySlot,
        public: PublicKey,
    },
}

/// The device's side: initiates handshakes, holds the current session and the one before it
/// (so acknowledgements still in flight across a rekey are not lost).
pub struct DeviceSession {
    key: DeviceKey,
    core: PublicKey,
    pending: Option<PendingHandshake>,
    current: Option<Transport>,
    rekey_after: Duration,
    previous: Option<Transport>,
    /// The core's last cookie and when it came.
    cookie: Option<(crate::cookie::Cookie, Instant)>,
}

impl fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSession")
            .field("core", &self.core)
            .field("pending", &self.pending.as_ref().map(|p| p.local))
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// A device with its static key pair and the core's static public key.
    pub fn new(keypair: StaticKeypair, core: PublicKey) -> Self {
        Self::with_key(DeviceKey::Keypair(keypair), core)
    }

    /// A device whose static key is the one in `slot` of its secure element, and the core's static
    /// public key. Handshakes ask `store` for Diffie-Hellman results; the private key never leaves
    /// it. Fails if the slot is empty.
    pub fn with_key_store(
        store: Arc<dyn SecureElement>,
        slot: KeySlot,
        core: PublicKey,
    ) -> Result<Self, SessionError> {
        let public = store.public(slot)?;
        Ok(Self::with_key(
            DeviceKey::Element {
                store,
                slot,
                public,
            },
            core,
        ))
    }

    fn with_key(key: DeviceKey, core: PublicKey) -> Self {
        Self {
            key,
            core,
            pending: None,
            current: None,
            rekey_after: Duration::MAX,
            previous: None,
            cookie: None,
        }
    }

    /// The device's static public key.
    pub fn public(&self) -> &PublicKey {
        match &self.key {
            DeviceKey::Keypair(keypair) => keypair.public(),
            DeviceKey::Element { public, .. } => public,
        }
    }

    /// Which secure-element slot later handshakes use (an element-backed session only); the
    /// sessions already established stay. Fails if the slot is empty or the key is in memory.
    pub fn set_slot(&mut self, slot: KeySlot) -> Result<(), SessionError> {
        match &mut self.key {
            DeviceKey::Element {
                store,
                slot: current,
                public,
            } => {
                *public = store.public(slot)?;
                *current = slot;
                Ok(())
            }
            DeviceKey::Keypair(_) => Err(SessionError::KeyStore(KeyStoreError::Backend(
                "a key in memory has no slots".into(),
            ))),
        }
    }

    /// The slot later handshakes use, for an element-backed session.
    pub fn slot(&self) -> Option<KeySlot> {
        match &self.key {
            DeviceKey::Element { slot, .. } => Some(*slot),
            DeviceKey::Keypair(_) => None,
        }
    }

    /// Replaces the core's static public key (a release to another operator). The sessions with
    /// the old core are dropped.
    pub fn set_core(&mut self, core: PublicKey) {
        self.core = core;
        self.pending = None;
        self.current = None;
        self.previous = None;
    }

    /// The core's static public key.
    pub fn core(&self) -> &PublicKey {
        &self.core
    }

    /// Starts a handshake and returns the `HandshakeInit` datagram. `local` is a fresh random id;
    /// `timestamp` must exceed every earlier handshake's. A handshake already pending is dropped.
    pub fn start_handshake(
        &mut self,
        local: SessionId,
        timestamp: u64,
        now: Instant,
    ) -> Result<Vec<u8>, SessionError> {
        let payload = InitPayload {
            timestamp,
            ..InitPayload::default()
        };
        self.start_handshake_with(local, &payload, now, None)
    }

    /// [`DeviceSession::start_handshake`] with extensions in the payload (a proposed key, the
    /// configuration version).
    pub fn start_handshake_with_payload(
        &mut self,
        local: SessionId,
        payload: &InitPayload,
        now: Instant,
    ) -> Result<Vec<u8>, SessionError> {
        self.start_handshake_with(local, payload, now, None)
    }

    pub(crate) fn start_handshake_with(
        &mut self,
        local: SessionId,
        init: &InitPayload,
        now: Instant,
        fixed_ephemeral: Option<&[u8]>,
    ) -> Result<Vec<u8>, SessionError> {
        // An element's key goes into snow as a handle its resolver maps back to the slot.
        let mut key = None;
        let builder = match &self.key {
            DeviceKey::Keypair(keypair) => {
                Builder::new(params()).local_private_key(&keypair.private)?
            }
            DeviceKey::Element {
                store,
                slot,
                public,
            } => {
                let handle = key.insert(KeyHandle::new(Arc::clone(store), *slot, *public)?);
                Builder::with_resolver(params(), handle.resolver())
                    .local_private_key(handle.handle())?
            }
        };
        let mut builder = builder
            .remote_public_key(&self.core.0)?
            .prologue(PROLOGUE)?;
        if let Some(e) = fixed_ephemeral {
            builder = builder.fixed_ephemeral_key_for_testing_only(e);
        }
        let mut hs = builder.build_initiator()?;
        let mut payload = Vec::with_capacity(init.encoded_len());
        init.encode(&mut payload);
        if payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(SessionError::TooLarge(payload.len()));
        }
        let mut noise = [0u8; MAX_HANDSHAKE_PAYLOAD + INIT_NOISE_OVERHEAD];
        let n = hs
            .write_message(&payload, &mut noise)
            .map_err(|e| SessionError::from_noise(e, key.as_deref()))?;
        let init = DeviceFrame::HandshakeInit {
            sender: local,
            noise: &noise[..n],
        }
        .to_vec();
        let datagram = match &self.cookie {
            Some((cookie, at))
                if now.saturating_duration_since(*at) < crate::cookie::COOKIE_LIFETIME =>
            {
                crate::cookie::init_with_cookie(&init, cookie)?
            }
            _ => init.clone(),
        };
        self.pending = Some(PendingHandshake {
            hs,
            init,
            local,
            started: now,
            key,
        });
        Ok(datagram)
    }

    /// Installs a persisted session as the current one, with no handshake (`docs/protocol.md`
    /// §12.5). Its age runs from the snapshot's handshake time (`now_unix_ms` is the wall clock
    /// at `now`), so the rekey policy holds across the sleep.
    pub fn resume(&mut self, snapshot: &SessionSnapshot, now: Instant, now_unix_ms: u64) {
        let age = Duration::from_millis(now_unix_ms.saturating_sub(snapshot.established_unix_ms));
        let established = now.checked_sub(age).unwrap_or(now);
        self.previous = None;
        self.pending = None;
        self.current = Some(Transport::resume(snapshot, established));
        self.rekey_after = Duration::from_secs(u64::from(snapshot.rekey_after_secs));
    }

    /// The current session as a snapshot to persist (see [`Transport::snapshot`] for `lease`).
    pub fn snapshot(&self, lease: u64, now: Instant, now_unix_ms: u64) -> Option<SessionSnapshot> {
        let t = self.current.as_ref()?;
        let age = u64::try_from(t.age(now).as_millis()).unwrap_or(u64::MAX);
        let rekey = u32::try_from(self.rekey_after.as_secs()).unwrap_or(u32::MAX);
        Some(t.snapshot(lease, now_unix_ms.saturating_sub(age), rekey))
    }

    /// When the pending handshake started, if one is pending.
    pub fn handshake_started(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.started)
    }

    /// Whether the device has a session to send on.
    pub fn is_established(&self) -> bool {
        self.current.is_some()
    }

    /// Whether a new handshake is due: no session yet, or the current one is past the core's
    /// rekey time or counter limit. A pending handshake does not count; see
    /// [`DeviceSession::handshake_started`] for retrying one.
    pub fn needs_handshake(&self, now: Instant) -> bool {
        match &self.current {
            None => true,
            Some(t) => t.age(now) >= self.rekey_after || t.sent() >= REKEY_AFTER_MESSAGES,
        }
    }

    /// The current session, if any.
    pub fn current(&self) -> Option<&Transport> {
        self.current.as_ref()
    }

    /// Seals `plaintext` on the current session into a transport datagram appended to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SessionError> {
        self.current
            .as_mut()
            .ok_or(SessionError::NoSession)?
            .seal(plaintext, out)
    }

    /// Handles one datagram from the core (through any path). On `Plaintext` the opened message is
    /// in `out`. A bad datagram leaves the established sessions as they were.
    pub fn handle_datagram(
        &mut self,
        datagram: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<DeviceEvent, SessionError> {
        match DeviceFrame::decode(datagram)? {
            DeviceFrame::HandshakeResponse {
                receiver,
                sender,
                noise,
            } => {
                let local = self.pending.as_ref().map(|p| p.local);
                if local != Some(receiver) {
                    return Err(SessionError::UnknownSession(receiver));
                }
                let mut pending = self
                    .pending
                    .take()
                    .ok_or(SessionError::UnknownSession(receiver))?;
                let mut payload = [0u8; MAX_HANDSHAKE_PAYLOAD + RESPONSE_NOISE_OVERHEAD];
                let n = pending
                    .hs
                    .read_message(noise, &mut payload)
                    .map_err(|e| SessionError::from_noise(e, pending.key.as_deref()))?;
                let response = ResponsePayload::decode(&payload[..n])?;
                if response.refused.is_some() {
                    return Ok(DeviceEvent::Refused { response });
                }
                let mut transport = Transport::new(receiver, sender, pending.hs, now)?;
                transport.set_admission(response.admission);
                self.previous = self.current.replace(transport);
                self.rekey_after = Duration::from_secs(u64::from(response.rekey_after_secs));
                Ok(DeviceEvent::Established { response })
            }
            DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            } => {
                let session = [self.current.as_mut(), self.previous.as_mut()]
                    .into_iter()
                    .flatten()
                    .find(|t| t.local == receiver)
                    .ok_or(SessionError::UnknownSession(receiver))?;
                session.open(counter, ciphertext, out)?;
                Ok(DeviceEvent::Plaintext)
            }
            DeviceFrame::CookieReply {
                receiver,
                nonce,
                sealed,
            } => {
                let pending = self
                    .pending
                    .as_ref()
                    .filter(|p| p.local == receiver)
                    .ok_or(SessionError::UnknownSession(receiver))?;
                let noise = pending
                    .init
                    .get(crate::frame::HANDSHAKE_INIT_HEADER..)
                    .unwrap_or_default();
                let cookie = crate::cookie::open_reply(&self.core, noise, nonce, sealed)?;
                let datagram = crate::cookie::init_with_cookie(&pending.init, &cookie)?;
                self.cookie = Some((cookie, now));
                out.clear();
                out.extend_from_slice(&datagram);
                Ok(DeviceEvent::CookieChallenge)
            }
            other @ (DeviceFrame::HandshakeInit { .. }
            | DeviceFrame::AdmittedTransport { .. }
            | DeviceFrame::CookieInit { .. }) => {
                Err(SessionError::UnexpectedFrame(other.frame_type()))
            }
        }
    }
}

/// The core's side of the handshake. Stateless between messages: IK completes in one round trip,
/// so the core holds no pending handshakes.
pub struct Responder {
    keypair: StaticKeypair,
    params: NoiseParams,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("public", self.keypair.public())
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// The core with its static key pair.
    pub fn new(keypair: StaticKeypair) -> Self {
        Self {
            keypair,
            params: params(),
        }
    }

    /// The core's static public key, which devices must know.
    pub fn public(&self) -> &PublicKey {
        self.keypair.public()
    }

    /// Reads a `HandshakeInit`'s Noise message. On success the device's static key is known and
    /// authenticated; the caller decides whether to [`IncomingHandshake::accept`] it.
    pub fn read_init(
        &self,
        sender: SessionId,
        noise: &[u8],
    ) -> Result<IncomingHandshake, SessionError> {
        self.read_init_with(sender, noise, None)
    }

    pub(crate) fn read_init_with(
        &self,
        sender: SessionId,
        noise: &[u8],
        fixed_ephemeral: Option<&[u8]>,
    ) -> Result<IncomingHandshake, SessionError> {
        let mut builder = Builder::new(self.params.clone())
            .local_private_key(&self.keypair.private)?
            .prologue(PROLOGUE)?;
        if let Some(e) = fixed_ephemeral {
            builder = builder.fixed_ephemeral_key_for_testing_only(e);
        }
        let mut hs = builder.build_responder()?;
        let mut payload = [0u8; MAX_HANDSHAKE_PAYLOAD + INIT_NOISE_OVERHEAD];
        let n = hs.read_message(noise, &mut payload)?;
        let init = InitPayload::decode(&payload[..n])?;
        let remote: [u8; KEY_LEN] = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or(SessionError::Authentication)?;
        Ok(IncomingHandshake {
            hs,
            sender,
            device: PublicKey(remote),
            init,
        })
    }
}

/// A handshake initiation that authenticated, waiting for the core's decision.
pub struct IncomingHandshake {
    hs: HandshakeState,
    sender: SessionId,
    device: PublicKey,
    init: InitPayload,
}

impl fmt::Debug for IncomingHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingHandshake")
            .field("sender", &self.sender)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl IncomingHandshake {
    /// The device's static public key, proven by the handshake.
    pub fn device(&self) -> &PublicKey {
        &self.device
    }

    /// The initiation's timestamp (must exceed the last one accepted from this device).
    pub fn timestamp(&self) -> u64 {
        self.init.timestamp
    }

    /// The whole initiation payload (proposed key, configuration version).
    pub fn init(&self) -> &InitPayload {
        &self.init
    }

    /// Answers with an authenticated refusal (`policy.refused` should be set) appended to `out`,
    /// keeping no session: the device learns why, and nobody on the path can forge the answer.
    pub fn refuse(
        mut self,
        policy: &ResponsePayload,
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        self.write_response(SessionId(0), policy, out)
    }

    fn write_response(
        &mut self,
        local: SessionId,
        policy: &ResponsePayload,
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        let mut payload = Vec::with_capacity(policy.encoded_len());
        policy.encode(&mut payload);
        if payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(SessionError::TooLarge(payload.len()));
        }
        let mut noise = [0u8; MAX_HANDSHAKE_PAYLOAD + RESPONSE_NOISE_OVERHEAD];
        let n = self.hs.write_message(&payload, &mut noise)?;
        DeviceFrame::HandshakeResponse {
            receiver: self.sender,
            sender: local,
            noise: &noise[..n],
        }
        .encode(out);
        Ok(())
    }

    /// The device's session id.
    pub fn sender(&self) -> SessionId {
        self.sender
    }

    /// Completes the handshake: appends the `HandshakeResponse` datagram to `out` and returns the
    /// established session, known to devices as `local`.
    pub fn accept(
        mut self,
        local: SessionId,
        policy: &ResponsePayload,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Transport, SessionError> {
        self.write_response(local, policy, out)?;
        Transport::new(local, self.sender, self.hs, now)
    }
}

fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], DecodeError> {
    let s = s.trim().as_bytes();
    if s.len() != 2 * KEY_LEN {
        return Err(DecodeError::Invalid("a key is 64 hex digits"));
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0]).ok_or(DecodeError::Invalid("not a hex digit"))?;
        let lo = hex_val(pair[1]).ok_or(DecodeError::Invalid("not a hex digit"))?;
        out[i] = hi << 4 | lo;
    }
    Ok(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}
