//! One smart meter as an I/O-free state machine: the end-to-end session, the outbox of readings not
//! yet acknowledged, retransmission with backoff, handshake retry, rekeying, re-handshaking when
//! the core has gone silent, and (for a meter with a secure element) the credential lifecycle.
//!
//! ```text
//!  queue_reading ─▶ outbox (≤ outbox_cap) ─▶ poll_transmit ─▶ datagram ─▶ (caller sends it)
//!                    │  ≤ window in flight     ▲ HandshakeInit when needed
//!                    ▼                         │
//!  handle_datagram ◀─ (caller received it) ── acks remove readings ─▶ poll_event: Acked, ...
//!  poll_timeout: when to call poll_transmit again
//! ```
//!
//! Two kinds of meter:
//!
//! - **Pre-provisioned** ([`Meter::new`], [`Meter::with_session`]): one static key (from
//!   `fleet.keys`, or one element slot the caller picked), registered at the core beforehand.
//! - **With a secure element** ([`Meter::with_element`]): the device rule of the credential
//!   lifecycle (`docs/protocol.md`) picks the slot for every handshake; provisioning with the
//!   factory identity, credential updates on a `Rotate` notice, configuration, refusals and
//!   release to another operator are handled here. The element performs the key operations; this
//!   module decides which (see [the device rule](self#the-device-rule) below).
//!
//! # The device rule
//!
//! At every handshake (start, rekey, silence, retry):
//!
//! 1. `Next` holds a key: handshake with it; established → `commit(Next, Subscription)`.
//! 2. else (or refused): handshake with `Subscription` if it holds a key (carrying `NextKey`
//!    while a credential update is being announced).
//! 3. refused with a reason that [`RefusalReason::needs_factory`], or no subscription key: erase
//!    `Next`, generate a fresh one, handshake with `Factory` carrying `NextKey`; on `KeyAccepted`
//!    go to step 1. Nothing is ever sent on a session made with the factory key.
//! 4. refused `Released` with a [`Release`]: switch the core key and endpoint
//!    ([`MeterEvent::Released`] tells the caller to re-target), then 3.
//!
//! Suspended, Revoked, Unclaimed, NotActivated, NotPermitted: back off and try again later (no factory
//! fallback). A `Rotate` notice (on a handshake response or an acknowledgement) generates `Next`
//! and starts 2 with `NextKey`, then 1. Crash points ([`CrashPoint`]) let kill tests stop the
//! device between any two of these steps.
//!
//! Under load the core answers an initiation with a cookie challenge: the meter's next datagram
//! is then the `CookieInit` its session built, and the handshake stays pending. A device that
//! sleeps across restarts persists [`Meter::session_snapshot`] (with a counter lease) and installs
//! it again with [`Meter::resume_session`]: its next reading is its first datagram, no handshake.
//!
//! Nothing here reads a clock, touches a socket or needs tokio: `now: Instant` comes in with every
//! call, wall-clock time for handshake timestamps comes from a [`Timebase`] the caller anchors,
//! and randomness (session ids, jitter) from a seed the caller chooses. Tests drive a meter against
//! an in-memory core in virtual time. The secure element may write its own files (a software
//! element seals keys on disk); everything else the device must remember is handed out as
//! [`DeviceMemory`] for the caller to persist when [`MeterEvent::StateChanged`] says so.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay_protocol::frame::SessionId;
use relay_protocol::payload::{
    DeviceConfig, InitPayload, Message, Notices, ReadingSeq, RefusalReason, Release,
    ResponsePayload, MAX_READING,
};
use relay_protocol::secure_element::{KeySlot, SecureElement};
use relay_protocol::session::{
    DeviceEvent, DeviceSession, PublicKey, SessionError, SessionSnapshot, StaticKeypair,
};
use relay_protocol::stream::{StreamKeys, StreamOpen, UploadId};
use relay_protocol::DecodeError;

mod lifecycle;

pub use lifecycle::{CrashHook, CrashPoint, DeviceMemory, RefusalCounts};
use lifecycle::{Lifecycle, Step};

/// How many bits of a reading sequence number count readings within one run; the bits above hold
/// the run's start time in Unix milliseconds. See [`seq_base`].
pub const SEQ_RUN_BITS: u32 = 20;

/// The sequence number of reading 0 of a run that starts at `unix_ms` (milliseconds since the Unix
/// epoch): `unix_ms << 20`. Reading `i` of the run has sequence number `seq_base(start) + i`.
///
/// A device must never reuse a sequence number (the core stores a reading once per
/// `(device, seq)` and acknowledges a repeat without storing it), yet the simulator keeps no state
/// between runs. Deriving the base from the start time keeps numbers unique across restarts as
/// long as the wall clock does not go backwards and a run queues fewer than 2^20 (about a million)
/// readings per millisecond between its start and the next run's start.
pub fn seq_base(unix_ms: u64) -> u64 {
    unix_ms << SEQ_RUN_BITS
}

/// A deterministic, human-recognisable reading body of exactly `size` bytes (at most
/// [`MAX_READING`]): `meter-00001|seq=…|kwh=…|` padded with `.` (or cut short). Tests search
/// captured traffic for it and compare stored readings with it.
pub fn reading_payload(serial: &str, seq: u64, size: usize) -> Vec<u8> {
    let size = size.min(MAX_READING);
    // A plausible, slowly growing meter register, derived from the sequence number only.
    let tenths = seq % 10_000_000;
    let mut v = format!("{serial}|seq={seq}|kwh={}.{}|", tenths / 10, tenths % 10).into_bytes();
    v.resize(size, b'.');
    v
}

/// Anchors wall-clock time to the monotonic clock, so a meter can derive handshake timestamps
/// (milliseconds since the Unix epoch, strictly increasing per device) from the `now: Instant` it
/// is given, without reading a clock itself.
#[derive(Clone, Copy, Debug)]
pub struct Timebase {
    instant: Instant,
    unix_ms: u64,
}

impl Timebase {
    /// `instant` and `unix_ms` name the same moment.
    pub fn new(instant: Instant, unix_ms: u64) -> Self {
        Self { instant, unix_ms }
    }

    /// Milliseconds since the Unix epoch at `now` (never before the anchor).
    pub fn unix_ms_at(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.instant).as_millis();
        self.unix_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }
}

/// A meter's limits and timers. The defaults suit a real deployment; tests shorten the timers.
#[derive(Clone, Debug)]
pub struct MeterConfig {
    /// Readings held until acknowledged, at most; a reading queued past it is refused.
    pub outbox_cap: usize,
    /// Readings sent and not yet acknowledged, at most.
    pub window: usize,
    /// The first retransmission of a reading waits this long after its first transmission.
    pub retransmit_initial: Duration,
    /// Retransmission intervals double up to this.
    pub retransmit_max: Duration,
    /// A handshake without a response is retried after this (plus jitter).
    pub handshake_retry_initial: Duration,
    /// Handshake retry intervals double up to this.
    pub handshake_retry_max: Duration,
    /// With readings outstanding and no authenticated frame from the core for this long, the
    /// session is presumed lost (the core restarted, say) and a new handshake starts.
    pub silence_timeout: Duration,
    /// After an authenticated refusal (suspended, not activated yet, …) the next handshake waits
    /// this long (plus jitter).
    pub refused_retry_initial: Duration,
    /// Refusal backoff doubles up to this.
    pub refused_retry_max: Duration,
    /// Handshakes with the `Next` key that may go unanswered in a row before the device rule
    /// moves on to the subscription (or factory) key for the rest of the contact.
    pub next_key_attempts: u32,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self {
            outbox_cap: 1024,
            window: 32,
            retransmit_initial: Duration::from_millis(500),
            retransmit_max: Duration::from_secs(8),
            handshake_retry_initial: Duration::from_secs(1),
            handshake_retry_max: Duration::from_secs(30),
            silence_timeout: Duration::from_secs(3),
            refused_retry_initial: Duration::from_secs(5),
            refused_retry_max: Duration::from_secs(300),
            next_key_attempts: 3,
        }
    }
}

/// What the meter tells its driver, drained with [`Meter::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeterEvent {
    /// A handshake completed on which readings flow (never one made with the factory key).
    Established {
        /// The core's rekey policy for the session.
        rekey_after: Duration,
    },
    /// The core acknowledged a reading: it is durably stored and has left the outbox.
    Acked {
        /// The reading.
        seq: ReadingSeq,
        /// From the reading's first transmission to its acknowledgement.
        latency: Duration,
    },
    /// The core refused a handshake (authenticated): no session.
    Refused {
        /// Why.
        reason: RefusalReason,
        /// The key slot the handshake used (`None` for a pre-provisioned meter).
        slot: Option<KeySlot>,
    },
    /// The core bound the proposed `Next` key (phase 1 of a switch).
    KeyAccepted {
        /// Provisioning with the factory identity (else a credential update).
        provisioning: bool,
    },
    /// A handshake with `Next` succeeded and the key is committed as the subscription key.
    KeyCommitted {
        /// It completed a provisioning (else a credential update).
        provisioning: bool,
    },
    /// A configuration arrived (handshake response or acknowledgement) and is now in force.
    ConfigApplied(DeviceConfig),
    /// The device was released to another operator: its core key is switched; from now on send
    /// to `endpoint` (`HOST:PORT`).
    Released {
        /// The new core's address.
        endpoint: String,
    },
    /// [`Meter::memory`] changed: persist it.
    StateChanged,
}

/// Why a reading was not queued. The caller's input or the meter's capacity: count it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// The outbox holds `cap` unacknowledged readings already.
    #[error("outbox full ({cap} readings unacknowledged)")]
    OutboxFull {
        /// The outbox capacity.
        cap: usize,
    },
    /// The reading does not fit in one frame.
    #[error("reading of {len} bytes exceeds {max}")]
    TooLarge {
        /// The reading's length.
        len: usize,
        /// [`MAX_READING`].
        max: usize,
    },
    /// A reading with this sequence number is still in the outbox.
    #[error("reading {0:?} is already queued")]
    DuplicateSeq(ReadingSeq),
}

/// Why a datagram from the core was dropped: forged, altered, replayed, stale or malformed. The
/// peer's (or the path's) fault; the meter carries on unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    /// The frame failed at the session layer (parsing, authentication, replay, unknown session).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The frame authenticated but its plaintext is not a valid message.
    #[error("malformed message: {0}")]
    Message(DecodeError),
    /// The frame authenticated but carried a message the core never sends.
    #[error("unexpected message from the core: {0}")]
    Unexpected(&'static str),
}

impl DatagramError {
    /// A short, fixed label for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Session(SessionError::Malformed(_)) => "malformed",
            Self::Session(SessionError::Authentication) => "authentication",
            Self::Session(SessionError::Replay(_)) => "replay",
            Self::Session(SessionError::UnknownSession(_)) => "unknown_session",
            Self::Session(SessionError::UnexpectedFrame(_)) => "unexpected_frame",
            Self::Session(_) => "session",
            Self::Message(_) => "malformed_message",
            Self::Unexpected(_) => "unexpected_message",
        }
    }
}

/// A meter's counters, all monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MeterStats {
    /// Readings accepted into the outbox.
    pub queued: u64,
    /// Readings refused because the outbox was full.
    pub refused: u64,
    /// First transmissions of readings.
    pub sent: u64,
    /// Retransmissions of readings.
    pub retransmitted: u64,
    /// Datagrams handed out to send, of every kind: handshake initiations (retries and cookie
    /// echoes included), readings and retransmissions.
    pub frames_sent: u64,
    /// Readings acknowledged (each once).
    pub acked: u64,
    /// Acknowledgements for readings no longer (or never) in the outbox.
    pub duplicate_acks: u64,
    /// `HandshakeInit`s sent, retries included.
    pub handshakes_started: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Cookie challenges: the core, under load, answered a handshake with a cookie to echo.
    pub cookie_challenges: u64,
    /// Persisted sessions resumed (no handshake).
    pub resumptions: u64,
    /// Handshakes started because the core had gone silent.
    pub silence_rehandshakes: u64,
    /// Datagrams dropped as bad (see [`DatagramError`]).
    pub bad_datagrams: u64,
    /// Handshakes the core refused, every reason.
    pub refusals: u64,
    /// Refusals by reason.
    pub refusals_by_reason: RefusalCounts,
    /// Provisionings with the factory identity completed (a subscription key committed).
    pub provisionings: u64,
    /// Credential updates completed (a new subscription key committed after a `Rotate`, or
    /// after a restart in the middle of one).
    pub key_updates: u64,
    /// `Rotate` notices acted on.
    pub rotations: u64,
    /// Configurations applied (a new version, or the first).
    pub config_updates: u64,
    /// Releases to another operator followed.
    pub releases: u64,
    /// Stream connections opened ([`Meter::open_stream`]: one sealed `StreamOpen` each).
    pub streams_opened: u64,
}

#[derive(Debug)]
struct Outgoing {
    data: Vec<u8>,
    first_sent: Option<Instant>,
    next_retransmit: Instant,
    rto: Duration,
}

#[derive(Debug)]
struct HandshakeAttempt {
    retry_at: Instant,
    /// What the handshake in flight does (lifecycle meters); `None` while backing off after a
    /// refusal or before any attempt.
    step: Option<Step>,
}

/// One meter: see the [module docs](self).
#[derive(Debug)]
pub struct Meter {
    serial: String,
    session: DeviceSession,
    config: MeterConfig,
    timebase: Timebase,
    rng: StdRng,
    last_timestamp: u64,
    /// Every reading not yet acknowledged.
    outbox: HashMap<ReadingSeq, Outgoing>,
    /// Readings never sent, in queue order.
    unsent: VecDeque<ReadingSeq>,
    /// Readings sent and not acknowledged (at most `window`).
    in_flight: Vec<ReadingSeq>,
    handshake: Option<HandshakeAttempt>,
    /// The backoff the next handshake attempt starts with.
    next_handshake_backoff: Duration,
    /// When the core stopped answering: set by a transmission while nothing was expected, reset by
    /// every authenticated frame.
    silence_from: Option<Instant>,
    /// The core went silent: the current session is presumed lost, hold readings until a new one.
    suspect: bool,
    rekey_at: Option<Instant>,
    events: VecDeque<MeterEvent>,
    stats: MeterStats,
    plaintext: Vec<u8>,
    /// The current session may carry readings: established with a pre-provisioned or subscription
    /// key, and no refusal since. Never true for a session made with the factory key.
    usable: bool,
    /// Start a handshake at the next [`Meter::poll_transmit`] (a step of the device rule).
    want_handshake: bool,
    /// The backoff after the next refusal.
    next_refused_backoff: Duration,
    /// The configuration in force, reported in every handshake.
    device_config: Option<DeviceConfig>,
    /// The credential lifecycle, for a meter with a secure element.
    lifecycle: Option<Lifecycle>,
    crash_hook: Option<CrashHook>,
    /// A crash hook stopped the meter: it does nothing more.
    crashed: bool,
    /// The core answered the pending handshake with a cookie: the `CookieInit` to send at once.
    cookie_echo: Option<(Vec<u8>, Instant)>,
}

impl Meter {
    /// A meter named `serial` with its key pair, the core's public key, its limits, a time anchor
    /// for handshake timestamps and a seed for session ids and jitter.
    pub fn new(
        serial: impl Into<String>,
        keypair: StaticKeypair,
        core: PublicKey,
        config: MeterConfig,
        timebase: Timebase,
        seed: u64,
    ) -> Self {
        Self::with_session(
            serial,
            DeviceSession::new(keypair, core),
            config,
            timebase,
            seed,
        )
    }

    /// The same, with a session made by the caller: for a key held in a secure element,
    /// [`DeviceSession::with_key_store`].
    pub fn with_session(
        serial: impl Into<String>,
        session: DeviceSession,
        config: MeterConfig,
        timebase: Timebase,
        seed: u64,
    ) -> Self {
        let next_handshake_backoff = config.handshake_retry_initial;
        let next_refused_backoff = config.refused_retry_initial;
        Self {
            serial: serial.into(),
            session,
            config,
            timebase,
            rng: StdRng::seed_from_u64(seed),
            last_timestamp: 0,
            outbox: HashMap::new(),
            unsent: VecDeque::new(),
            in_flight: Vec::new(),
            handshake: None,
            next_handshake_backoff,
            silence_from: None,
            suspect: false,
            rekey_at: None,
            events: VecDeque::new(),
            stats: MeterStats::default(),
            plaintext: Vec::new(),
            usable: false,
            want_handshake: false,
            next_refused_backoff,
            device_config: None,
            lifecycle: None,
            crash_hook: None,
            crashed: false,
            cookie_echo: None,
        }
    }

    /// A meter whose keys are in `element` and which runs the credential lifecycle (see the
    /// [module docs](self#the-device-rule)): factory-fresh (only the factory key), provisioned,
    /// or stopped in the middle of a switch, the slots decide. `memory` is what the device
    /// remembered (configuration, a release: then its core key replaces `core`). Fails if the
    /// element holds no key at all.
    pub fn with_element(
        serial: impl Into<String>,
        element: Arc<dyn SecureElement>,
        core: PublicKey,
        memory: DeviceMemory,
        config: MeterConfig,
        timebase: Timebase,
        seed: u64,
    ) -> Result<Self, SessionError> {
        let core = memory.release.as_ref().map_or(core, |r| r.core);
        let slots = element.slots();
        let slot = [KeySlot::Next, KeySlot::Subscription, KeySlot::Factory]
            .into_iter()
            .find(|s| slots.contains(s))
            .unwrap_or(KeySlot::Factory);
        let session = DeviceSession::with_key_store(Arc::clone(&element), slot, core)?;
        let mut meter = Self::with_session(serial, session, config, timebase, seed);
        meter.device_config = memory.config;
        meter.lifecycle = Some(Lifecycle::new(element, memory.release));
        Ok(meter)
    }

    /// Called at each [`CrashPoint`]; a hook that returns `true` stops the meter there (a test's
    /// simulated crash; a real device's hook aborts the process and never returns).
    pub fn set_crash_hook(&mut self, hook: CrashHook) {
        self.crash_hook = Some(hook);
    }

    /// Whether a crash hook stopped the meter.
    pub fn crashed(&self) -> bool {
        self.crashed
    }

    /// The configuration in force, if the core sent one.
    pub fn device_config(&self) -> Option<&DeviceConfig> {
        self.device_config.as_ref()
    }

    /// What the device must remember across restarts besides its keys.
    pub fn memory(&self) -> DeviceMemory {
        DeviceMemory {
            config: self.device_config,
            release: self.lifecycle.as_ref().and_then(|l| l.release.clone()),
        }
    }

    /// Where the device sends after a release (`HOST:PORT`); `None`: where it was configured to.
    pub fn endpoint(&self) -> Option<&str> {
        self.lifecycle
            .as_ref()
            .and_then(|l| l.release.as_ref())
            .map(|r| r.endpoint.as_str())
    }

    /// The core's static public key the meter talks to.
    pub fn core(&self) -> &PublicKey {
        self.session.core()
    }

    /// The element slot of the key the meter handshakes with now (`None`: a key in memory).
    pub fn slot(&self) -> Option<KeySlot> {
        self.session.slot()
    }

    /// Whether the device holds a subscription key (a pre-provisioned meter always does).
    pub fn is_provisioned(&self) -> bool {
        self.lifecycle
            .as_ref()
            .is_none_or(|l| l.element.public(KeySlot::Subscription).is_ok())
    }

    /// Whether the meter has a working subscription now: a session readings flow on,
    /// established with a pre-provisioned or subscription key, no refusal since.
    pub fn has_working_session(&self) -> bool {
        self.usable && self.session.is_established()
    }

    /// The current session as a snapshot for a device going to sleep (see
    /// [`DeviceSession::snapshot`]: its send counter is the current one plus `lease`), if it has
    /// a working session and no key switch is under way (a switch must finish with a handshake).
    pub fn session_snapshot(&self, lease: u64, now: Instant) -> Option<SessionSnapshot> {
        if !self.has_working_session() || !self.lifecycle.as_ref().is_none_or(Lifecycle::is_settled)
        {
            return None;
        }
        self.session
            .snapshot(lease, now, self.timebase.unix_ms_at(now))
    }

    /// The current session: this side's id and how many frames it has sealed.
    pub fn session_counter(&self) -> Option<(SessionId, u64)> {
        self.session.current().map(|t| (t.local_id(), t.sent()))
    }

    /// Installs a persisted session (a sleepy device waking after a restart): readings flow on it
    /// at once, with no handshake. Refused (`false`, nothing changed) when the session is past
    /// its rekey time, when the meter already has a session or a handshake under way, or when
    /// its element is in the middle of a key switch or holds no subscription key.
    pub fn resume_session(&mut self, snapshot: &SessionSnapshot, now: Instant) -> bool {
        let now_unix_ms = self.timebase.unix_ms_at(now);
        let age_ms = now_unix_ms.saturating_sub(snapshot.established_unix_ms());
        let rekey_ms = u64::from(snapshot.rekey_after_secs()).saturating_mul(1000);
        if age_ms >= rekey_ms
            || self.crashed
            || self.session.is_established()
            || self.handshake.is_some()
            || self.want_handshake
        {
            return false;
        }
        if let Some(l) = &self.lifecycle {
            if !l.is_settled()
                || l.element.public(KeySlot::Next).is_ok()
                || l.element.public(KeySlot::Subscription).is_err()
                || self.session.slot() != Some(KeySlot::Subscription)
            {
                return false;
            }
        }
        self.session.resume(snapshot, now, now_unix_ms);
        self.usable = true;
        self.suspect = false;
        self.silence_from = None;
        self.rekey_at = now.checked_add(Duration::from_millis(rekey_ms - age_ms));
        self.stats.resumptions += 1;
        true
    }

    /// Whether nothing is left to do before the device may sleep: every reading acknowledged,
    /// no handshake under way or due, no key switch in progress, a working session.
    pub fn is_idle(&self) -> bool {
        self.outbox.is_empty()
            && self.handshake.is_none()
            && !self.want_handshake
            && self.has_working_session()
            && self.lifecycle.as_ref().is_none_or(Lifecycle::is_settled)
    }

    /// The meter's serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The meter's static public key.
    pub fn public(&self) -> &PublicKey {
        self.session.public()
    }

    /// The counters.
    pub fn stats(&self) -> &MeterStats {
        &self.stats
    }

    /// Readings not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.outbox.len()
    }

    /// Readings sent at least once and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a session is established.
    pub fn is_established(&self) -> bool {
        self.session.is_established()
    }

    /// The sequence numbers still in the outbox, in no particular order.
    pub fn unacked(&self) -> impl Iterator<Item = ReadingSeq> + '_ {
        self.outbox.keys().copied()
    }

    /// Queues a reading for delivery. It stays in the outbox, retransmitted as needed, until the
    /// core acknowledges it.
    pub fn queue_reading(
        &mut self,
        seq: ReadingSeq,
        data: Vec<u8>,
        now: Instant,
    ) -> Result<(), QueueError> {
        if data.len() > MAX_READING {
            return Err(QueueError::TooLarge {
                len: data.len(),
                max: MAX_READING,
            });
        }
        if self.outbox.contains_key(&seq) {
            return Err(QueueError::DuplicateSeq(seq));
        }
        if self.outbox.len() >= self.config.outbox_cap {
            self.stats.refused += 1;
            return Err(QueueError::OutboxFull {
                cap: self.config.outbox_cap,
            });
        }
        // The timer fields are set when the reading is first sent.
        self.outbox.insert(
            seq,
            Outgoing {
                data,
                first_sent: None,
                next_retransmit: now,
                rto: self.config.retransmit_initial,
            },
        );
        self.unsent.push_back(seq);
        self.stats.queued += 1;
        Ok(())
    }

    /// The first frame of a new stream connection (`docs/protocol.md` §13) for chunk-by-chunk
    /// upload `upload` of `total_size` bytes cut in chunks of `chunk_size`, with `meta` (at
    /// most 200 bytes of UTF-8, cut beyond): a `StreamOpen` with a fresh random salt, sealed on
    /// the current session like a reading (its counter, its admission tag), and the keys of the
    /// connection it opens. `None` without a working session (none yet, refused, presumed lost,
    /// the core silent past the silence timeout, or its counter used up). The frame goes on the
    /// stream socket, not in a datagram.
    pub fn open_stream(
        &mut self,
        upload: UploadId,
        chunk_size: u32,
        total_size: u64,
        meta: &str,
        now: Instant,
    ) -> Option<(Vec<u8>, StreamKeys)> {
        // A core silent past the timeout has probably lost the session: a stream opened on it
        // would only be refused.
        if !self.can_send() || self.silent(now) {
            return None;
        }
        // The salt only has to be new for every connection on a session; drawn from the OS
        // generator (not the meter's seeded one), so that a resumed session on a restarted
        // device never repeats one.
        let open = StreamOpen {
            salt: rand::random(),
            upload,
            chunk_size,
            total_size,
            meta: meta.to_owned(),
        };
        let transport = self.session.current()?;
        let keys = transport.stream_keys(&open.salt, &open.upload);
        self.plaintext.clear();
        Message::StreamOpen(open).encode(&mut self.plaintext);
        let mut frame = Vec::new();
        if let Err(e) = self.session.seal(&self.plaintext, &mut frame) {
            tracing::warn!(serial = %self.serial, error = %e, "cannot seal a stream open");
            return None;
        }
        self.stats.streams_opened += 1;
        Some((frame, keys))
    }

    /// Handles one datagram from the core. Events it causes are queued for
    /// [`Meter::poll_event`]. A bad datagram is counted and returned as an error; the meter's
    /// state is as before.
    pub fn handle_datagram(&mut self, datagram: &[u8], now: Instant) -> Result<(), DatagramError> {
        if self.crashed {
            return Ok(());
        }
        let result = self.handle_datagram_inner(datagram, now);
        if result.is_err() {
            self.stats.bad_datagrams += 1;
        }
        result
    }

    fn handle_datagram_inner(
        &mut self,
        datagram: &[u8],
        now: Instant,
    ) -> Result<(), DatagramError> {
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let event = self.session.handle_datagram(datagram, now, &mut plaintext);
        let result = match event {
            Ok(DeviceEvent::Established { response }) => {
                self.on_response(response, true, now);
                Ok(())
            }
            Ok(DeviceEvent::Refused { response }) => {
                self.on_response(response, false, now);
                Ok(())
            }
            Ok(DeviceEvent::Plaintext) => {
                let result = self.on_message(&plaintext, now);
                self.heard(now);
                result
            }
            Ok(DeviceEvent::CookieChallenge) => {
                self.on_cookie(&plaintext, now);
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
        self.plaintext = plaintext;
        result
    }

    /// A handshake response: `established` a session, or refused.
    fn on_response(&mut self, response: ResponsePayload, established: bool, now: Instant) {
        let step = self.handshake.take().and_then(|a| a.step);
        self.next_handshake_backoff = self.config.handshake_retry_initial;
        if established {
            self.stats.handshakes += 1;
            self.next_refused_backoff = self.config.refused_retry_initial;
        }
        if let Some(reason) = response.refused {
            self.stats.refusals += 1;
            self.stats.refusals_by_reason.add(reason);
            self.events.push_back(MeterEvent::Refused {
                reason,
                slot: self.session.slot(),
            });
        }
        match (self.lifecycle.is_some(), step) {
            (true, Some(step)) => self.lifecycle_response(step, &response, now),
            (true, None) => {
                // The answer to an initiation the device rule has moved on from (its retry could
                // not start): which key made it is not known here, so nothing is sent on it and
                // the rule starts again.
                self.usable = false;
                match response.refused {
                    None => self.want_handshake = true,
                    Some(_) => self.back_off(now),
                }
                return;
            }
            (false, _) => match response.refused {
                None => self.on_usable(response.rekey_after_secs, now),
                Some(_) => {
                    self.usable = false;
                    self.back_off(now);
                }
            },
        }
        if self.crashed {
            return;
        }
        if established {
            self.on_notices(&response.notices, now);
        } else if let (Some(RefusalReason::Released), Some(release)) =
            (response.refused, &response.notices.release)
        {
            self.on_release(release.clone(), now);
        }
    }

    /// The core is under load and answered the pending handshake with a cookie: echo it at once
    /// (the `CookieInit` in `echo`), and give the echo at least one initial retry interval before
    /// the handshake is retried (a retry would carry the cookie too).
    fn on_cookie(&mut self, echo: &[u8], now: Instant) {
        self.stats.cookie_challenges += 1;
        self.cookie_echo = Some((echo.to_vec(), now));
        if let Some(attempt) = self.handshake.as_mut() {
            attempt.retry_at = attempt
                .retry_at
                .max(now + self.config.handshake_retry_initial);
        }
    }

    /// A session readings may flow on is established.
    fn on_usable(&mut self, rekey_after_secs: u32, now: Instant) {
        let rekey_after = Duration::from_secs(u64::from(rekey_after_secs));
        self.usable = true;
        self.rekey_at = now.checked_add(rekey_after);
        if self.suspect || self.silent(now) {
            // The old session is presumed gone with everything sent on it: resend at once rather
            // than after each reading's (possibly long) backoff.
            for seq in &self.in_flight {
                if let Some(r) = self.outbox.get_mut(seq) {
                    r.next_retransmit = now;
                    r.rto = self.config.retransmit_initial;
                }
            }
            self.suspect = false;
        }
        self.silence_from = None;
        self.events
            .push_back(MeterEvent::Established { rekey_after });
    }

    /// Waits before the next handshake after a refusal, doubling each time.
    fn back_off(&mut self, now: Instant) {
        let backoff = self.next_refused_backoff;
        self.next_refused_backoff = (backoff * 2).min(self.config.refused_retry_max);
        let jitter = backoff.mul_f64(self.rng.gen_range(0.0..0.25));
        self.handshake = Some(HandshakeAttempt {
            retry_at: now + backoff + jitter,
            step: None,
        });
    }

    /// Configuration, update notice, release: from a handshake response or an acknowledgement.
    fn on_notices(&mut self, notices: &Notices, now: Instant) {
        if let Some(config) = notices.config {
            self.apply_config(config);
        }
        if notices.rotate {
            self.on_rotate(now);
        }
        if let Some(release) = &notices.release {
            self.on_release(release.clone(), now);
        }
    }

    /// An authenticated frame arrived: the core is alive. Silence counts afresh from here, for
    /// the readings still unacknowledged.
    fn heard(&mut self, now: Instant) {
        self.suspect = false;
        self.silence_from = (!self.in_flight.is_empty()).then_some(now);
    }

    fn on_message(&mut self, plaintext: &[u8], now: Instant) -> Result<(), DatagramError> {
        match Message::decode(plaintext).map_err(DatagramError::Message)? {
            Message::Ack { seqs, notices } => {
                for seq in seqs {
                    self.ack(seq, now);
                }
                // The piggyback: configuration, update notice, release ride on acknowledgements.
                if !notices.is_empty() {
                    self.on_notices(&notices, now);
                }
                Ok(())
            }
            Message::Keepalive => Ok(()),
            Message::Reading { .. } => Err(DatagramError::Unexpected("reading")),
            // Only ever the first frame of a stream, device to core: never on a datagram.
            Message::StreamOpen(_) => Err(DatagramError::Unexpected("stream open")),
        }
    }

    fn ack(&mut self, seq: ReadingSeq, now: Instant) {
        let Some(reading) = self.outbox.remove(&seq) else {
            self.stats.duplicate_acks += 1;
            return;
        };
        match reading.first_sent {
            Some(_) => self.in_flight.retain(|s| *s != seq),
            // The core cannot know a sequence number never sent; believe the authenticated ack all
            // the same, the reading is stored.
            None => self.unsent.retain(|s| *s != seq),
        }
        self.stats.acked += 1;
        let latency = reading
            .first_sent
            .map_or(Duration::ZERO, |first| now.saturating_duration_since(first));
        self.events.push_back(MeterEvent::Acked { seq, latency });
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<MeterEvent> {
        self.events.pop_front()
    }

    /// The next datagram to send, if any is due at `now`. Call it until it returns `None`, then
    /// wait until [`Meter::poll_timeout`], a datagram arrives or a reading is queued.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let datagram = self.poll_transmit_inner(now);
        if datagram.is_some() {
            self.stats.frames_sent += 1;
        }
        datagram
    }

    fn poll_transmit_inner(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.crashed {
            return None;
        }
        if let Some((echo, _)) = self.cookie_echo.take() {
            self.stats.handshakes_started += 1;
            return Some(echo);
        }
        if let Some(init) = self.poll_handshake(now) {
            return Some(init);
        }
        if !self.can_send() {
            return None;
        }
        if let Some(seq) = self.due_retransmission(now) {
            return self.send_reading(seq, now);
        }
        if self.in_flight.len() < self.config.window {
            if let Some(seq) = self.unsent.pop_front() {
                return self.send_reading(seq, now);
            }
        }
        None
    }

    fn can_send(&self) -> bool {
        self.usable && self.session.is_established() && !self.suspect && !self.crashed
    }

    fn silent(&self, now: Instant) -> bool {
        !self.in_flight.is_empty()
            && self
                .silence_from
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.silence_timeout)
    }

    fn poll_handshake(&mut self, now: Instant) -> Option<Vec<u8>> {
        match &self.handshake {
            Some(attempt) if now < attempt.retry_at => return None,
            Some(attempt) => {
                // The attempt went unanswered (or a refusal's backoff is over).
                let step = attempt.step;
                if let (Some(l), Some(step)) = (self.lifecycle.as_mut(), step) {
                    l.unanswered(step);
                }
            }
            None => {
                if self.want_handshake {
                    // A step of the device rule: at once.
                } else if self.usable && !self.session.needs_handshake(now) {
                    if !self.silent(now) {
                        return None;
                    }
                    self.suspect = true;
                    self.silence_from = None;
                    self.stats.silence_rehandshakes += 1;
                    tracing::debug!(serial = %self.serial, "core silent; new handshake");
                    self.new_contact();
                } else if self.usable {
                    // A rekey: a new contact, where the device rule starts from the top.
                    self.new_contact();
                }
            }
        }
        self.want_handshake = false;
        self.start_handshake(now)
    }

    fn new_contact(&mut self) {
        if let Some(l) = self.lifecycle.as_mut() {
            l.new_contact();
        }
    }

    fn start_handshake(&mut self, now: Instant) -> Option<Vec<u8>> {
        let backoff = self.next_handshake_backoff;
        self.next_handshake_backoff = (backoff * 2).min(self.config.handshake_retry_max);
        // Up to a quarter more, so meters that failed together do not retry together.
        let jitter = backoff.mul_f64(self.rng.gen_range(0.0..0.25));
        self.handshake = Some(HandshakeAttempt {
            retry_at: now + backoff + jitter,
            step: None,
        });
        let mut payload = InitPayload {
            // The core refuses an initiation not newer than the last it accepted from this key.
            timestamp: self.timebase.unix_ms_at(now).max(self.last_timestamp + 1),
            next_key: None,
            config_version: self.device_config.map(|c| c.version),
        };
        if self.lifecycle.is_some() {
            // The device rule picks the key (and may generate one, or stop at a crash point).
            let step = self.choose_step(now)?;
            if let Err(e) = self.session.set_slot(step.slot()) {
                tracing::warn!(serial = %self.serial, error = %e, "key slot unusable");
                return None;
            }
            payload.next_key = step.proposed();
            // The factory handshake's answer always carries the configuration; every other
            // handshake reports the version in force, 0 for none (profiles start at 1), so that
            // a device that lost its configuration gets it again.
            payload.config_version = match step {
                Step::Factory { .. } => None,
                _ => Some(self.device_config.map_or(0, |c| c.version)),
            };
            if let Some(attempt) = self.handshake.as_mut() {
                attempt.step = Some(step);
            }
        }
        self.last_timestamp = payload.timestamp;
        let id = SessionId(self.rng.gen());
        match self.session.start_handshake_with_payload(id, &payload, now) {
            Ok(init) => {
                self.stats.handshakes_started += 1;
                Some(init)
            }
            Err(e) => {
                // Local key material refused by snow, or the element failed: nothing a retry can
                // fix quickly, but the retry timer is set, so the meter keeps trying rather than
                // stalling.
                tracing::warn!(serial = %self.serial, error = %e, "cannot start handshake");
                None
            }
        }
    }

    fn due_retransmission(&self, now: Instant) -> Option<ReadingSeq> {
        self.in_flight
            .iter()
            .filter_map(|seq| self.outbox.get(seq).map(|r| (r.next_retransmit, *seq)))
            .filter(|(at, _)| *at <= now)
            .min()
            .map(|(_, seq)| seq)
    }

    fn send_reading(&mut self, seq: ReadingSeq, now: Instant) -> Option<Vec<u8>> {
        let reading = self.outbox.get_mut(&seq)?;
        self.plaintext.clear();
        Message::Reading {
            seq,
            data: &reading.data,
        }
        .encode(&mut self.plaintext);
        let mut datagram = Vec::new();
        if let Err(e) = self.session.seal(&self.plaintext, &mut datagram) {
            // Only a used-up session counter gets here; it also makes a new handshake due.
            tracing::warn!(serial = %self.serial, error = %e, "cannot seal reading");
            if reading.first_sent.is_none() {
                self.unsent.push_front(seq);
            }
            return None;
        }
        match reading.first_sent {
            None => {
                reading.first_sent = Some(now);
                reading.rto = self.config.retransmit_initial;
                self.in_flight.push(seq);
                self.stats.sent += 1;
            }
            Some(_) => {
                reading.rto = (reading.rto * 2).min(self.config.retransmit_max);
                self.stats.retransmitted += 1;
            }
        }
        reading.next_retransmit = now + reading.rto;
        if self.silence_from.is_none() {
            self.silence_from = Some(now);
        }
        Some(datagram)
    }

    /// When [`Meter::poll_transmit`] may have something to send next, if ever without new input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        if self.crashed {
            return None;
        }
        consider(self.cookie_echo.as_ref().map(|(_, at)| *at));
        match &self.handshake {
            Some(attempt) => consider(Some(attempt.retry_at)),
            None => {
                consider(self.rekey_at);
                if !self.in_flight.is_empty() {
                    consider(self.silence_from.map(|t| t + self.config.silence_timeout));
                }
            }
        }
        if self.can_send() {
            consider(
                self.in_flight
                    .iter()
                    .filter_map(|s| self.outbox.get(s))
                    .map(|r| r.next_retransmit)
                    .min(),
            );
        }
        at
    }
}

#[cfg(test)]
mod tests;
