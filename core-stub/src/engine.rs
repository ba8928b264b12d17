//! The session engine: one task that owns every device session, the in-memory subscription
//! index, the device (factory identity) index and the route back to each device. No locks:
//! everything reaches it through one bounded channel, and it alone decides.
//!
//! ```text
//!  direct.rs ──┐                     ┌─────────────── Engine (one task) ───────────────┐
//!  uplink.rs ──┴─EngineInput──▶      │ SessionTable: handshakes, open, route updates    │──PendingReading──▶ store writer
//!   (frames, gateway up/down)        │ gateways: GatewayConnId → quinn::Connection      │◀──Committed──────  (own thread)
//!  admin_api ───EngineControl──▶     │ lifecycle: provision, key update, fraud, notices │──LifecycleStore──▶ SQLite (own
//!                                    └── seal Ack (+ notices) on the newest session ────┘   connection; versions deferred)
//!  gateways ◀── UplinkMessage::Revoked { sessions } when sessions are dropped for a status change
//! ```
//!
//! `SessionTable` is the I/O-free part (frames and `now` in, frames to send, readings to store and
//! revoked session ids out; the rare lifecycle writes through the `LifecycleStore` trait), driven
//! by `Engine`, which owns the sockets and channels.
//!
//! # The credential lifecycle (`docs/protocol.md`, issue 4)
//!
//! - **Factory-key handshake** = provisioning or recovery: the device must be claimed and
//!   activated and propose a `NextKey`; the subscription is created (or its key replaced, the old
//!   one retired at once) in one store transaction committed before the response (`KeyAccepted` +
//!   `Config`) goes out. No session is kept for the factory key.
//! - **Two-phase key update**: a subscription-key handshake carrying `NextKey` stores it (phase 1:
//!   old and new key both accepted); the first handshake made with the next key promotes it
//!   (phase 2: the old key is retired, its later handshakes are refused `Superseded`).
//! - **Notices** ride on the handshake response and on acknowledgements, never on messages of
//!   their own: `Config` when the device runs another version than its profile's, `Rotate` when an
//!   update is requested or the key is older than `credentials.rotate_after_secs`, `Release` when
//!   the device went to another operator.
//! - **Fraud**: a frame on a subscription's older session after its newer session already had
//!   one, from another route ("clone"), or a replayed handshake ("replay"), flags the
//!   subscription and asks for a credential update; a clone is quarantined instead when
//!   `fraud.action = "quarantine"` (a replay never is: anyone on the path can replay).
//! - **Revocation reach**: sessions dropped for a status change are named to every connected
//!   gateway (`UplinkMessage::Revoked`) before the admin API answers.
//!
//! # Gateway policy
//!
//! A profile may name the gateways its devices may use (by the name in the gateway's verified
//! client certificate, which the uplink acceptor hands over with `GatewayUp`) and forbid direct
//! access. Every handshake, with the subscription key or the factory key, is checked against the
//! policy of the device's profile for the path it arrived on, and refused `NotPermitted` (no
//! session, nothing stored) when the path is not allowed. A policy change therefore applies at
//! each device's next handshake; sessions already open are left alone. A device stream's open is
//! checked against the policy too, each time: a gateway stream by the name in the certificate of
//! the connection it came on (a gateway's bulk connection has no `GatewayUp` of its own). A
//! refused open is authenticated, so the core answers it with a sealed `not_permitted` ack
//! (`StreamDenied::NotPermitted`) and the device stops instead of retrying.
//!
//! Every refused handshake gets an authenticated refusal (`Refused` + reason), except a replayed
//! one (dropped silently) and one refused for `session.max_sessions`.
//!
//! # Admission (`docs/protocol.md` §12)
//!
//! Every accepted subscription handshake gets a fresh random 16-byte admission key, kept in the
//! session and sent to the device in the response payload. Through a gateway the response leaves
//! as a kind-2 uplink datagram carrying the session's [`Admission`] (id, key, remaining lifetime,
//! quota: the profile's, else `[admission]`), so the gateway can check the device's first tagged
//! frame; when that does not fit in a QUIC datagram, an `Admit` control message goes first and
//! the frame follows on the control stream. A gateway that lost its table (a restart, a device
//! that moved to it) asks with `AdmitQuery`: each live session its profile lets use that gateway
//! is answered `Admit`, every other id `NotAdmitted`. The core does not check admission tags
//! itself (the AEAD authenticates every frame), and accepts `Transport` and `AdmittedTransport`
//! alike. The key is never logged (its `Debug` is redacted).
//!
//! # Cookies under load
//!
//! The engine counts initiations (`HandshakeInit` and `CookieInit`) per 1-second window. Above
//! `handshakes.cookie_above_per_sec`, a plain `HandshakeInit` is answered with a `CookieReply`
//! and costs no Diffie-Hellman. A `CookieInit` whose MAC checks under the cookie of its path
//! (gateway connection and flow, or UDP address) is handled as a handshake, loaded or not; one
//! whose MAC does not is dropped (`stale_cookie`) and answered with a fresh cookie. Cookie replies
//! go back on the route a handshake response would take, without admission.
//!
//! # Crash points
//!
//! For the kill tests, the environment variable `RELAY_CRASH_AT` makes the process abort right
//! after a lifecycle commit and before the response leaves, so that recovery from exactly that
//! state can be tested:
//!
//! | `RELAY_CRASH_AT`            | aborts after                                            |
//! |-----------------------------|---------------------------------------------------------|
//! | `core:provision_committed`  | `Store::provision` (factory-key handshake)              |
//! | `core:next_key_committed`   | `Store::set_next_key` (key update, phase 1)             |
//! | `core:promote_committed`    | `Store::promote_next_key` (key update, phase 2)         |

mod store_writes;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_protocol::cookie::CookieJar;
use relay_protocol::payload::{
    DeviceConfig, InitPayload, Message, Notices, ReadingSeq, RefusalReason, Release,
    ResponsePayload, MAX_ACKS,
};
use relay_protocol::session::{
    IncomingHandshake, PublicKey, Responder, SessionError, StaticKeypair, Transport,
};
use relay_protocol::stream::{StreamKeys, StreamOpen};
use relay_protocol::uplink::{MAX_ADMITS, MAX_ADMIT_QUERY, MAX_REVOKED};
use relay_protocol::{
    Admission, AdmissionKey, DecodeError, DeviceFrame, FlowId, Quota, SessionId, UplinkDatagram,
    UplinkMessage,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{FraudAction, SessionConfig};
use crate::metrics::{AdmissionAnswer, Metrics};
use crate::store::{
    now_ms, Committed, FactoryEntry, IndexEntry, PendingReading, Profile, StoreError,
    SubscriptionId, SubscriptionStatus,
};

pub(crate) use store_writes::StoreWrites;

/// How often sessions past `reject_after` are swept out even if their device went silent.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// A session id named to the gateways as revoked is not handed out again for this long at least
/// (the gateways' default memory of revoked ids), so a new session is never mistaken for it.
const REVOKED_ID_HOLD: Duration = Duration::from_secs(600);

/// Under load, whatever the initiation rate: more than this many frames waiting in the engine's
/// input queue (a flood the engine cannot keep up with; WireGuard's criterion).
const COOKIE_BACKLOG: usize = 256;

/// The window the engine counts handshake initiations in, against
/// `handshakes.cookie_above_per_sec`.
const INITIATION_WINDOW: Duration = Duration::from_secs(1);

/// The environment variable naming a crash point (see the module docs).
pub const CRASH_ENV: &str = "RELAY_CRASH_AT";

/// A gateway connection, numbered by the uplink acceptor. Local to this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayConnId(pub u64);

impl std::fmt::Display for GatewayConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How to reach a device: where its last authenticated frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight over UDP to this address.
    Direct(SocketAddr),
    /// Through a gateway connection, on one of its flows.
    Gateway {
        /// The gateway connection.
        conn: GatewayConnId,
        /// The gateway's flow for the device's address.
        flow: FlowId,
    },
}

/// Why a frame was dropped (`core_frames_dropped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The device frame, or the plaintext inside it, did not parse.
    Decode(DecodeError),
    /// The uplink datagram or control message around a frame did not parse.
    Uplink(DecodeError),
    /// A transport frame for a session the core does not hold.
    UnknownSession,
    /// A transport frame for a session older than `reject_after_secs`.
    Expired,
    /// A transport frame that failed authentication.
    Authentication,
    /// A transport frame whose counter was seen before or is too old.
    Replay,
    /// An authenticated message a device never sends (an `Ack`).
    UnexpectedMessage,
    /// A frame type a device never sends (a `HandshakeResponse`).
    UnexpectedType,
    /// A handshake refused because `session.max_sessions` are held.
    SessionLimit,
    /// An outgoing frame with no way to its device (gateway gone, send buffer full).
    Unroutable,
    /// An authenticated frame that made the fraud detector quarantine its subscription.
    Fraud,
    /// An authenticated frame that arrived on a path (gateway or direct access) its device's
    /// profile does not allow: a session does not roam where a handshake would be refused.
    NotPermitted,
    /// A `CookieInit` whose cookie MAC does not check (the cookie is older than two secret
    /// rotations, or for another path, or forged); answered with a fresh cookie reply.
    StaleCookie,
}

impl DropReason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Decode(e) => e.reason(),
            Self::Uplink(e) => match e {
                DecodeError::Truncated => "uplink_truncated",
                DecodeError::Oversized { .. } => "uplink_oversized",
                DecodeError::UnknownVersion(_) => "uplink_unknown_version",
                DecodeError::UnknownType(_) => "uplink_unknown_type",
                DecodeError::Invalid(_) => "uplink_invalid",
            },
            Self::UnknownSession => "unknown_session",
            Self::Expired => "expired",
            Self::Authentication => "authentication",
            Self::Replay => "replay",
            Self::UnexpectedMessage => "unexpected_message",
            Self::UnexpectedType => "unexpected_type",
            Self::SessionLimit => "session_limit",
            Self::Unroutable => "unroutable",
            Self::Fraud => "fraud",
            Self::NotPermitted => "not_permitted",
            Self::StaleCookie => "stale_cookie",
        }
    }

    /// Every label value, for pre-creating the series.
    pub fn all_labels() -> impl Iterator<Item = &'static str> {
        let decode = [
            DecodeError::Truncated,
            DecodeError::Oversized { len: 0, max: 0 },
            DecodeError::UnknownVersion(0),
            DecodeError::UnknownType(0),
            DecodeError::Invalid(""),
        ];
        decode
            .into_iter()
            .flat_map(|e| [Self::Decode(e), Self::Uplink(e)])
            .chain([
                Self::UnknownSession,
                Self::Expired,
                Self::Authentication,
                Self::Replay,
                Self::UnexpectedMessage,
                Self::UnexpectedType,
                Self::SessionLimit,
                Self::Unroutable,
                Self::Fraud,
                Self::NotPermitted,
                Self::StaleCookie,
            ])
            .map(Self::label)
    }
}

/// The outcome of a handshake initiation (`core_handshakes_total{result}`). Sessions established:
/// `accepted` + `key_announced` + `key_promoted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeResult {
    /// A session was established and the response sent.
    Accepted,
    /// A factory-key handshake created or re-keyed the device's subscription (no session kept).
    Provisioned,
    /// A session was established and the proposed next key stored (key update, phase 1).
    KeyAnnounced,
    /// A session was established with the next key, which replaced the old one (phase 2).
    KeyPromoted,
    /// An authenticated refusal was sent.
    Refused(RefusalReason),
    /// The timestamp is not newer than the last accepted one (dropped silently; a fraud signal).
    Replayed,
    /// The Noise message did not authenticate or decode, or the store refused the change.
    Failed,
}

impl HandshakeResult {
    /// Every outcome.
    pub const ALL: [Self; 17] = [
        Self::Accepted,
        Self::Provisioned,
        Self::KeyAnnounced,
        Self::KeyPromoted,
        Self::Refused(RefusalReason::UnknownKey),
        Self::Refused(RefusalReason::Unclaimed),
        Self::Refused(RefusalReason::NotActivated),
        Self::Refused(RefusalReason::Suspended),
        Self::Refused(RefusalReason::Revoked),
        Self::Refused(RefusalReason::Quarantined),
        Self::Refused(RefusalReason::Superseded),
        Self::Refused(RefusalReason::Released),
        Self::Refused(RefusalReason::KeyRequired),
        Self::Refused(RefusalReason::Reprovision),
        Self::Refused(RefusalReason::NotPermitted),
        Self::Replayed,
        Self::Failed,
    ];

    /// The label value (a refusal is labelled with its reason: `unknown_key`, `suspended`, …).
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Provisioned => "provisioned",
            Self::KeyAnnounced => "key_announced",
            Self::KeyPromoted => "key_promoted",
            Self::Refused(reason) => reason.label(),
            Self::Replayed => "replayed",
            Self::Failed => "failed",
        }
    }
}

/// How a notice reached the device (`via` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// In a handshake response.
    Handshake,
    /// Riding on an acknowledgement.
    Ack,
}

impl Via {
    /// Every value.
    pub const ALL: [Self; 2] = [Self::Handshake, Self::Ack];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Ack => "ack",
        }
    }
}

/// The two phases of a credential update (`core_key_updates_total{phase}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPhase {
    /// The next key was stored beside the current one.
    Announced,
    /// The next key replaced the current one.
    Promoted,
}

impl KeyPhase {
    /// Every value.
    pub const ALL: [Self; 2] = [Self::Announced, Self::Promoted];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Announced => "announced",
            Self::Promoted => "promoted",
        }
    }
}

/// Why the fraud detector flagged a subscription (`core_fraud_flags_total{reason}`; also the
/// reason stored with the flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FraudReason {
    /// Frames on two sessions of one subscription from two routes at once.
    Clone,
    /// A handshake initiation replayed (timestamp not newer than the last accepted).
    Replay,
}

impl FraudReason {
    /// Every value.
    pub const ALL: [Self; 2] = [Self::Clone, Self::Replay];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::Replay => "replay",
        }
    }
}

/// What the lifecycle does, from `[credentials]` and `[fraud]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LifecyclePolicy {
    /// A key older than this gets a Rotate notice (0: never).
    pub rotate_after_secs: u64,
    /// Quarantine or only flag a suspect subscription.
    pub fraud_action: FraudAction,
}

/// What the gateways are told about each session, and when a handshake costs a cookie first,
/// from `[admission]` and `[handshakes]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AdmissionPolicy {
    /// The quota of a session whose profile names none.
    pub default_quota: Quota,
    /// Initiations per second above which a plain one is answered with a cookie (0: always).
    pub cookie_above_per_sec: u32,
}

impl AdmissionPolicy {
    /// From the validated configuration.
    pub fn from_config(
        admission: &crate::config::AdmissionConfig,
        handshakes: &crate::config::HandshakesConfig,
    ) -> Self {
        Self {
            default_quota: Quota {
                frames: admission.quota_frames,
                bytes: admission.quota_bytes,
                interval_secs: admission.quota_interval_secs,
            },
            cookie_above_per_sec: handshakes.cookie_above_per_sec,
        }
    }
}

/// A point where `RELAY_CRASH_AT` aborts the process (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After `Store::provision` committed.
    ProvisionCommitted,
    /// After `Store::set_next_key` committed.
    NextKeyCommitted,
    /// After `Store::promote_next_key` committed.
    PromoteCommitted,
}

impl CrashPoint {
    /// Every crash point.
    pub const ALL: [Self; 3] = [
        Self::ProvisionCommitted,
        Self::NextKeyCommitted,
        Self::PromoteCommitted,
    ];

    /// The value of `RELAY_CRASH_AT` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Self::ProvisionCommitted => "core:provision_committed",
            Self::NextKeyCommitted => "core:next_key_committed",
            Self::PromoteCommitted => "core:promote_committed",
        }
    }

    /// The crash point `RELAY_CRASH_AT` names, if any; a warning says it is armed.
    fn from_env() -> Option<Self> {
        let value = std::env::var(CRASH_ENV).ok()?;
        match Self::ALL.into_iter().find(|p| p.name() == value) {
            Some(p) => {
                tracing::warn!(
                    crash_at = p.name(),
                    "crash point armed: the core aborts there"
                );
                Some(p)
            }
            None => {
                tracing::warn!(
                    value,
                    "{CRASH_ENV} names no crash point of the core; ignored"
                );
                None
            }
        }
    }
}

/// The lifecycle's store writes. Each is one committed transaction when it returns, except the
/// configuration version, which is bookkeeping: recorded later, never waited for (the handshake
/// path must stay as fast as the accept-only one).
pub(crate) trait LifecycleStore: Send {
    /// Creates the device's subscription bound to `key`, or re-keys its live one (recovery).
    fn provision(&mut self, serial: &str, key: &PublicKey) -> Result<IndexEntry, StoreError>;
    /// Key update, phase 1.
    fn set_next_key(&mut self, id: SubscriptionId, key: &PublicKey) -> Result<(), StoreError>;
    /// Key update, phase 2.
    fn promote_next_key(&mut self, id: SubscriptionId, key: &PublicKey) -> Result<(), StoreError>;
    /// Flags a subscription; quarantines it or requests a credential update.
    fn flag(
        &mut self,
        id: SubscriptionId,
        reason: &str,
        quarantine: bool,
    ) -> Result<(), StoreError>;
    /// Records the configuration version the device runs (deferred, best effort).
    fn record_config_version(&mut self, id: SubscriptionId, version: u32);
    /// Every subscription (rare: linking subscriptions that predate their device's claim).
    fn index_entries(&mut self) -> Result<Vec<IndexEntry>, StoreError>;
}

/// What the acceptors hand the engine.
#[derive(Debug)]
pub(crate) enum EngineInput {
    /// A device frame and where it came from.
    Frame { bytes: Bytes, route: Route },
    /// A gateway finished `Hello`: frames for its flows go out through `link`. `name` is the
    /// name in its verified client certificate, what profile policies name it by.
    GatewayUp {
        conn: GatewayConnId,
        name: Arc<str>,
        link: GatewayLink,
    },
    /// A gateway connection ended; sessions routed through it wait for their device's next frame.
    GatewayDown { conn: GatewayConnId },
    /// A gateway asks which of these sessions it may forward frames of (`AdmitQuery`).
    AdmitQuery {
        conn: GatewayConnId,
        sessions: Vec<SessionId>,
    },
    /// The first frame of a device stream (`docs/protocol.md` §13.2): authenticate it with its
    /// session and answer with the upload it opens and the stream's keys.
    StreamOpen {
        frame: Bytes,
        origin: StreamOrigin,
        reply: oneshot::Sender<Result<StreamGrant, StreamDenied>>,
    },
}

/// Where a device stream came from: the path its device's profile must allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StreamOrigin {
    /// A TCP connection to the core's stream port.
    Direct(SocketAddr),
    /// A QUIC stream of a gateway's connection (main or bulk), known by the name in the
    /// gateway's verified certificate: a bulk connection has no control stream, so no
    /// [`GatewayConnId`] the engine knows.
    Gateway(Arc<str>),
}

/// An authenticated stream open: whose upload, which one, and the connection's keys.
#[derive(Debug)]
pub(crate) struct StreamGrant {
    pub owner: crate::video::Owner,
    pub open: StreamOpen,
    pub keys: StreamKeys,
}

/// A device stream's open that was not granted.
#[derive(Debug)]
pub(crate) enum StreamDenied {
    /// Not authenticated, or not a `StreamOpen`: the stream ends with no answer.
    Dropped(DropReason),
    /// Authenticated, but the profile's gateway policy does not allow the path it came on: the
    /// core answers with a refusal (`not_permitted`) sealed under these keys, so the device stops
    /// instead of retrying (`docs/protocol.md` §13.3).
    NotPermitted(StreamKeys),
}

impl StreamDenied {
    /// What the refusal counts as (`core_frames_dropped_total{reason}`).
    pub fn reason(&self) -> DropReason {
        match self {
            Self::Dropped(reason) => *reason,
            Self::NotPermitted(_) => DropReason::NotPermitted,
        }
    }
}

impl From<DropReason> for StreamDenied {
    fn from(reason: DropReason) -> Self {
        Self::Dropped(reason)
    }
}

/// What the admin API asks of the engine, on its own bounded channel, served before frames so a
/// suspension takes effect ahead of any queued traffic.
#[derive(Debug)]
pub(crate) enum EngineControl {
    /// The subscription's status changed in the store (suspend, resume, revoke, quarantine; also
    /// transfer and release, as `Revoked`): apply it, drop its sessions unless it is active, name
    /// them to every gateway, and reply with how many were dropped.
    SetStatus {
        subscription: SubscriptionId,
        status: SubscriptionStatus,
        reply: oneshot::Sender<usize>,
    },
    /// How many sessions the subscription holds.
    LiveSessions {
        subscription: SubscriptionId,
        reply: oneshot::Sender<usize>,
    },
    /// Devices claimed, activated, transferred or released: upsert their factory identities.
    /// Send it before the `SetStatus` of the same change, so that the device's next handshake is
    /// refused with the right reason.
    DevicesChanged {
        devices: Vec<FactoryEntry>,
        reply: oneshot::Sender<()>,
    },
    /// A profile was created or changed: its devices get the new version at their next contact.
    ProfileChanged {
        profile: Profile,
        reply: oneshot::Sender<()>,
    },
    /// The operator asked for a credential update (`rotate_requested` is already stored).
    RequestRotation {
        subscription: SubscriptionId,
        reply: oneshot::Sender<()>,
    },
}

/// The engine's way back to a gateway: datagrams on the connection, and the control stream (via
/// its writer task) for a frame too large for a datagram, `Revoked`, `Admit` and `NotAdmitted`.
#[derive(Debug)]
pub(crate) struct GatewayLink {
    pub connection: quinn::Connection,
    pub control: mpsc::Sender<Bytes>,
}

/// One established session. Kept small: a million of these must fit in a small box.
#[derive(Debug)]
struct CoreSession {
    /// Index of the subscription in [`SessionTable::subs`].
    slot: u32,
    /// Whether a frame authenticated on it (clone detection).
    used: bool,
    route: Route,
    /// What the device tags its frames with for the gateways (never logged: `Debug` redacts it).
    admission: AdmissionKey,
    /// Boxed so the session map's buckets stay small: the map doubles its bucket array as it
    /// grows, and by-value entries of ~340 bytes made each doubling cost more per idle device
    /// than the 1 KiB budget (measured by `device-sim bench`).
    transport: Box<Transport>,
}

/// `SubscriptionEntry::device`, `owner` and friends when there is none.
const NONE: u32 = u32::MAX;
/// `SubscriptionEntry::profile` when the profile is unknown.
const NO_PROFILE: u16 = u16::MAX;
/// "No session" in `SubscriptionEntry::sessions` (the engine never hands out id 0).
const NO_SESSION: SessionId = SessionId(0);

/// `SubscriptionEntry::flags`.
mod flag {
    /// `last_handshake` holds an accepted handshake's timestamp.
    pub const SEEN: u8 = 1;
    /// The operator or the fraud detector asked for a credential update.
    pub const ROTATE_REQUESTED: u8 = 2;
    /// A Rotate notice went out on the current session already.
    pub const ROTATE_NOTIFIED: u8 = 4;
    /// The device reports its configuration version: it gets Config notices.
    pub const CONFIG_AWARE: u8 = 8;
    /// The fraud detector flagged it; not again until its key changed.
    pub const FLAGGED: u8 = 16;
}

/// What the engine knows about one subscription: 48 bytes, for every subscription in the store.
/// The rare lifecycle state (a key update in progress) lives in [`SessionTable::key_changes`].
#[derive(Debug)]
struct SubscriptionEntry {
    id: SubscriptionId,
    /// The timestamp of the last accepted handshake (if `flag::SEEN`): a new one must be greater.
    last_handshake: u64,
    /// The newest session first; at most two (the previous one lives on so that frames in flight
    /// across a rekey still open). [`NO_SESSION`] for none.
    sessions: [SessionId; 2],
    /// Index in [`SessionTable::devices`], or [`NONE`] (a subscription from before claims).
    device: u32,
    /// Index in [`SessionTable::owners`].
    owner: u32,
    /// When the current key was bound, seconds since the Unix epoch.
    key_since_secs: u32,
    /// The configuration version the device runs, as far as the core knows (0: unknown).
    config_version: u32,
    /// Index in [`SessionTable::profiles`], or [`NO_PROFILE`].
    profile: u16,
    status: SubscriptionStatus,
    flags: u8,
}

impl SubscriptionEntry {
    fn newest(&self) -> Option<SessionId> {
        Some(self.sessions[0]).filter(|s| *s != NO_SESSION)
    }

    fn live(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.iter().copied().filter(|s| *s != NO_SESSION)
    }

    fn forget_session(&mut self, id: SessionId) {
        for s in &mut self.sessions {
            if *s == id {
                *s = NO_SESSION;
            }
        }
        // Keep the newest first.
        if self.sessions[0] == NO_SESSION {
            self.sessions.swap(0, 1);
        }
    }

    fn has(&self, bit: u8) -> bool {
        self.flags & bit != 0
    }
}

/// A key update between its two phases: both keys map to the subscription.
#[derive(Clone, Copy, Debug)]
struct KeyChange {
    current: PublicKey,
    next: PublicKey,
}

/// One claimed device (factory identity).
#[derive(Debug)]
struct DeviceRecord {
    serial: Box<str>,
    /// Index in [`SessionTable::owners`].
    owner: u32,
    activated: bool,
    release: Option<Box<Release>>,
    /// Slot of the device's live (not revoked) subscription, or [`NONE`].
    live: u32,
    /// The timestamp of the last factory-key handshake that provisioned (in memory only).
    last_factory: Option<u64>,
    /// Index in [`SessionTable::profiles`] of the profile it was activated with, or
    /// [`NO_PROFILE`]: the policy its factory-key handshakes are checked against.
    profile: u16,
}

/// Which paths a profile's devices may use (`docs/protocol.md` §11.9), and the quota the
/// gateways hold their sessions to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PathPolicy {
    /// Gateway certificate names; empty: any gateway.
    gateways: Box<[Box<str>]>,
    allow_direct: bool,
    /// `None`: `[admission]`'s default.
    quota: Option<Quota>,
}

impl PathPolicy {
    /// Whether its devices may use the gateway whose certificate names it `name`: any gateway
    /// when the list is empty.
    fn allows_gateway(&self, name: &str) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| **g == *name)
    }

    fn of(profile: &Profile) -> Self {
        Self {
            gateways: profile.gateways.iter().map(|g| g.as_str().into()).collect(),
            allow_direct: profile.allow_direct,
            quota: profile.quota.map(|q| Quota {
                frames: q.frames,
                bytes: q.bytes,
                interval_secs: q.interval_secs,
            }),
        }
    }
}

/// What `by_key` says about a key: the subscription's slot, and whether the key was retired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyRef(u32);

impl KeyRef {
    const RETIRED: u32 = 1 << 31;

    fn live(slot: u32) -> Self {
        Self(slot)
    }

    fn retired(slot: u32) -> Self {
        Self(slot | Self::RETIRED)
    }

    fn slot(self) -> u32 {
        self.0 & !Self::RETIRED
    }

    fn is_retired(self) -> bool {
        self.0 & Self::RETIRED != 0
    }
}

/// What the engine loads from the store at start.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Every subscription, in id order.
    pub index: Vec<IndexEntry>,
    /// Every claimed device.
    pub devices: Vec<FactoryEntry>,
    /// Every profile.
    pub profiles: Vec<Profile>,
}

/// One device frame to send, and for a gateway route the admission the gateway installs before
/// it forwards the frame (a handshake response opening a session).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub route: Route,
    pub frame: Vec<u8>,
    pub admission: Option<Admission>,
}

impl Outgoing {
    /// A frame with nothing for the gateway.
    fn plain(route: Route, frame: Vec<u8>) -> Self {
        Self {
            route,
            frame,
            admission: None,
        }
    }
}

/// The answer to a gateway's `AdmitQuery`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AdmitAnswer {
    /// Sessions the gateway may forward frames of (`Admit`).
    pub admitted: Vec<Admission>,
    /// Every other id asked about (`NotAdmitted`).
    pub not_admitted: Vec<SessionId>,
}

/// Frames, readings and revocations produced by [`SessionTable`], for the caller to send, store
/// and announce.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    pub sends: Vec<Outgoing>,
    pub readings: Vec<PendingReading>,
    /// Sessions dropped for a status change: to be named to every gateway.
    pub revoked: Vec<SessionId>,
}

/// Every session and the subscription index, without I/O (the store behind a trait).
pub(crate) struct SessionTable {
    responder: Responder,
    policy: SessionConfig,
    lifecycle: LifecyclePolicy,
    admission: AdmissionPolicy,
    /// The cookie secrets (answers under load are stateless).
    cookies: CookieJar,
    /// The start of the current initiation-counting window, and the initiations in it.
    initiations: (Instant, u32),
    /// Frames waiting in the engine's input queue when the current one was taken: past
    /// [`COOKIE_BACKLOG`] the core is under load whatever the initiation rate.
    backlog: usize,
    sessions: HashMap<SessionId, CoreSession>,
    subs: Vec<SubscriptionEntry>,
    /// Subscriptions appended out of id order (rare), by id; the others are found by binary
    /// search in the sorted prefix of `subs`.
    late_ids: HashMap<SubscriptionId, u32>,
    by_key: HashMap<PublicKey, KeyRef>,
    key_changes: HashMap<u32, KeyChange>,
    devices: Vec<DeviceRecord>,
    device_by_key: HashMap<PublicKey, u32>,
    /// Live subscriptions whose device is not claimed (yet).
    orphans: usize,
    owners: Vec<Box<str>>,
    owner_ids: HashMap<Box<str>, u32>,
    profiles: Vec<DeviceConfig>,
    /// Beside `profiles`, by the same index.
    policies: Vec<PathPolicy>,
    profile_ids: HashMap<String, u16>,
    /// The certificate name of each connected gateway.
    gateway_names: HashMap<GatewayConnId, Arc<str>>,
    /// Session ids named to the gateways as revoked, not to be handed out again for a while.
    recently_revoked: HashMap<SessionId, Instant>,
    store: Box<dyn LifecycleStore>,
    crash_at: Option<CrashPoint>,
    plaintext: Vec<u8>,
    metrics: Metrics,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("responder", &self.responder)
            .field("sessions", &self.sessions.len())
            .field("subscriptions", &self.subs.len())
            .field("devices", &self.devices.len())
            .field("key_changes", &self.key_changes.len())
            .finish_non_exhaustive()
    }
}

fn secs_from_ms(ms: i64) -> u32 {
    u32::try_from(ms.max(0) / 1000).unwrap_or(u32::MAX)
}

fn now_secs() -> u32 {
    secs_from_ms(now_ms())
}

/// The bytes naming a device's path for its cookie (`docs/protocol.md` §12.6): through a gateway
/// `b'g' | conn:u64 | flow:u32`, direct `b'd' | IP (4 or 16 bytes) | port:u16`, big-endian.
fn cookie_source(route: Route) -> ([u8; 19], usize) {
    let mut b = [0u8; 19];
    let len = match route {
        Route::Gateway { conn, flow } => {
            b[0] = b'g';
            b[1..9].copy_from_slice(&conn.0.to_be_bytes());
            b[9..13].copy_from_slice(&flow.0.to_be_bytes());
            13
        }
        Route::Direct(addr) => {
            b[0] = b'd';
            let ip_len = match addr.ip() {
                std::net::IpAddr::V4(ip) => {
                    b[1..5].copy_from_slice(&ip.octets());
                    4
                }
                std::net::IpAddr::V6(ip) => {
                    b[1..17].copy_from_slice(&ip.octets());
                    16
                }
            };
            b[1 + ip_len..3 + ip_len].copy_from_slice(&addr.port().to_be_bytes());
            3 + ip_len
        }
    };
    (b, len)
}

/// Which way a frame came in, for clone detection: a gateway connection, or direct access.
fn origin(route: Route) -> Option<GatewayConnId> {
    match route {
        Route::Direct(_) => None,
        Route::Gateway { conn, .. } => Some(conn),
    }
}

/// What rides on an acknowledgement to `entry` now (nothing, on the fast path).
fn ack_notices(
    entry: &SubscriptionEntry,
    profiles: &[DeviceConfig],
    devices: &[DeviceRecord],
    rotate_after_secs: u64,
    key_change_pending: bool,
    now_secs: u32,
) -> Notices {
    let config = if entry.has(flag::CONFIG_AWARE) {
        profiles
            .get(usize::from(entry.profile))
            .filter(|c| c.version != entry.config_version)
            .copied()
    } else {
        None
    };
    let rotate = !entry.has(flag::ROTATE_NOTIFIED)
        && rotate_due(entry, rotate_after_secs, key_change_pending, now_secs);
    let release = devices
        .get(entry.device as usize)
        .and_then(|d| d.release.as_deref())
        .cloned();
    Notices {
        config,
        rotate,
        release,
    }
}

/// Whether the device should update its key: asked for, or the key is too old; not while an
/// update is between its phases.
fn rotate_due(
    entry: &SubscriptionEntry,
    rotate_after_secs: u64,
    key_change_pending: bool,
    now_secs: u32,
) -> bool {
    if key_change_pending {
        return false;
    }
    entry.has(flag::ROTATE_REQUESTED)
        || (rotate_after_secs > 0
            && u64::from(now_secs.saturating_sub(entry.key_since_secs)) >= rotate_after_secs)
}

impl SessionTable {
    /// Fails only when there is no randomness for the cookie secret.
    pub fn new(
        keypair: StaticKeypair,
        policy: SessionConfig,
        lifecycle: LifecyclePolicy,
        admission: AdmissionPolicy,
        loaded: Loaded,
        store: Box<dyn LifecycleStore>,
        metrics: Metrics,
    ) -> Result<Self, SessionError> {
        let Loaded {
            index,
            devices,
            profiles,
        } = loaded;
        let now = Instant::now();
        let cookies = CookieJar::new(keypair.public(), now)?;
        let mut table = Self {
            responder: Responder::new(keypair),
            policy,
            lifecycle,
            admission,
            cookies,
            initiations: (now, 0),
            backlog: 0,
            sessions: HashMap::new(),
            subs: Vec::with_capacity(index.len()),
            late_ids: HashMap::new(),
            by_key: HashMap::with_capacity(index.len()),
            key_changes: HashMap::new(),
            devices: Vec::with_capacity(devices.len()),
            device_by_key: HashMap::with_capacity(devices.len()),
            orphans: 0,
            owners: Vec::new(),
            owner_ids: HashMap::new(),
            profiles: Vec::with_capacity(profiles.len()),
            policies: Vec::with_capacity(profiles.len()),
            profile_ids: HashMap::with_capacity(profiles.len()),
            gateway_names: HashMap::new(),
            recently_revoked: HashMap::new(),
            store,
            crash_at: CrashPoint::from_env(),
            plaintext: Vec::with_capacity(relay_protocol::frame::MAX_DATAGRAM),
            metrics,
        };
        for p in profiles {
            table.upsert_profile(&p);
        }
        table.upsert_devices(devices);
        let by_serial: HashMap<&str, u32> = (0..)
            .zip(&table.devices)
            .map(|(i, d)| (&*d.serial, i))
            .collect();
        let links: Vec<u32> = index
            .iter()
            .map(|e| by_serial.get(e.serial.as_str()).copied().unwrap_or(NONE))
            .collect();
        drop(by_serial);
        for (e, device) in index.iter().zip(links) {
            table.add_subscription(e, device);
        }
        Ok(table)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The slot of a subscription (`subs` is in id order, as the store lists it and as new
    /// subscriptions get ids; an out-of-order one is in `late_ids`).
    fn slot_of(&self, id: SubscriptionId) -> Option<u32> {
        let sorted = self.subs.len() - self.late_ids.len();
        match self.subs[..sorted].binary_search_by_key(&id, |e| e.id) {
            Ok(slot) => u32::try_from(slot).ok(),
            Err(_) => self.late_ids.get(&id).copied(),
        }
    }

    fn intern_owner(&mut self, owner: &str) -> u32 {
        if let Some(&i) = self.owner_ids.get(owner) {
            return i;
        }
        let i = u32::try_from(self.owners.len()).unwrap_or(NONE);
        self.owners.push(owner.into());
        self.owner_ids.insert(owner.into(), i);
        i
    }

    fn profile_index(&self, name: &str) -> u16 {
        self.profile_ids.get(name).copied().unwrap_or(NO_PROFILE)
    }

    fn upsert_profile(&mut self, profile: &Profile) {
        let config = profile.config();
        let policy = PathPolicy::of(profile);
        match self.profile_ids.get(&profile.name) {
            Some(&i) => {
                self.profiles[usize::from(i)] = config;
                self.policies[usize::from(i)] = policy;
            }
            None => {
                let i = match u16::try_from(self.profiles.len()) {
                    Ok(i) if i != NO_PROFILE => i,
                    _ => {
                        tracing::error!(profile = %profile.name, "too many profiles; ignored");
                        return;
                    }
                };
                self.profiles.push(config);
                self.policies.push(policy);
                self.profile_ids.insert(profile.name.clone(), i);
            }
        }
    }

    /// Adds a subscription from the store at the end of `subs`; returns its slot.
    fn add_subscription(&mut self, e: &IndexEntry, device: u32) -> u32 {
        let slot = u32::try_from(self.subs.len()).unwrap_or(NONE);
        let in_order = self.late_ids.is_empty() && self.subs.last().is_none_or(|l| l.id < e.id);
        if !in_order {
            self.late_ids.insert(e.id, slot);
        }
        // Filled in by `load_subscription`; revoked until then so that it counts nowhere.
        self.subs.push(SubscriptionEntry {
            id: e.id,
            last_handshake: 0,
            sessions: [NO_SESSION; 2],
            device: NONE,
            owner: NONE,
            key_since_secs: 0,
            config_version: 0,
            profile: NO_PROFILE,
            status: SubscriptionStatus::Revoked,
            flags: 0,
        });
        self.load_subscription(slot, e, device);
        slot
    }

    /// Sets a subscription's state from its store row, and its keys in the index.
    fn load_subscription(&mut self, slot: u32, e: &IndexEntry, device: u32) {
        let owner = self.intern_owner(&e.owner);
        let profile = self.profile_index(&e.profile);
        let Some(entry) = self.subs.get_mut(slot as usize) else {
            return;
        };
        if entry.device == NONE && entry.status != SubscriptionStatus::Revoked {
            self.orphans = self.orphans.saturating_sub(1);
        }
        entry.device = device;
        entry.owner = owner;
        entry.profile = profile;
        entry.status = e.status;
        entry.key_since_secs = secs_from_ms(e.key_since_ms);
        entry.config_version = e.config_version.unwrap_or(0);
        entry.flags = 0;
        entry.last_handshake = 0;
        if e.config_version.is_some() {
            entry.flags |= flag::CONFIG_AWARE;
        }
        if e.rotate_requested {
            entry.flags |= flag::ROTATE_REQUESTED;
            if e.flag.is_some() {
                // Flagged and not updated since: the detector stays quiet until the key changes.
                entry.flags |= flag::FLAGGED;
            }
        }
        self.by_key.insert(e.public_key, KeyRef::live(slot));
        match e.next_key {
            Some(next) => {
                self.by_key.insert(next, KeyRef::live(slot));
                self.key_changes.insert(
                    slot,
                    KeyChange {
                        current: e.public_key,
                        next,
                    },
                );
            }
            None => {
                self.key_changes.remove(&slot);
            }
        }
        if e.status != SubscriptionStatus::Revoked {
            match self.devices.get_mut(device as usize) {
                Some(d) => d.live = slot,
                None => self.orphans += 1,
            }
        }
    }

    /// Upserts claimed devices by factory key; returns whether any was new.
    fn upsert_devices(&mut self, devices: Vec<FactoryEntry>) -> bool {
        let mut new = false;
        for f in devices {
            let owner = self.intern_owner(&f.owner);
            let release = f.release.map(Box::new);
            let profile = f.profile.as_deref().map(|p| self.profile_index(p));
            match self.device_by_key.get(&f.factory_key) {
                Some(&d) => {
                    let Some(rec) = self.devices.get_mut(d as usize) else {
                        continue;
                    };
                    rec.profile = profile.unwrap_or(NO_PROFILE);
                    rec.owner = owner;
                    rec.activated = f.activated;
                    rec.release = release;
                    rec.serial = f.serial.into();
                    let live = rec.live;
                    if let (Some(profile), Some(entry)) =
                        (profile, self.subs.get_mut(live as usize))
                    {
                        entry.profile = profile;
                    }
                }
                None => {
                    let d = u32::try_from(self.devices.len()).unwrap_or(NONE);
                    self.devices.push(DeviceRecord {
                        serial: f.serial.into(),
                        owner,
                        activated: f.activated,
                        release,
                        live: NONE,
                        last_factory: None,
                        profile: profile.unwrap_or(NO_PROFILE),
                    });
                    self.device_by_key.insert(f.factory_key, d);
                    new = true;
                }
            }
        }
        new
    }

    /// Applies claims, activations, transfers and releases made through the admin API.
    pub fn devices_changed(&mut self, devices: Vec<FactoryEntry>) {
        let n = devices.len();
        if !self.upsert_devices(devices) || self.orphans == 0 {
            tracing::debug!(devices = n, "devices applied");
            return;
        }
        // Subscriptions that predate their device's claim get linked to it (rare: a store
        // provisioned before claims existed).
        let index = match self.store.index_entries() {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(error = %e, "cannot link subscriptions to newly claimed devices");
                return;
            }
        };
        let by_serial: HashMap<&str, u32> = (0..)
            .zip(&self.devices)
            .map(|(i, d)| (&*d.serial, i))
            .collect();
        let mut links = Vec::new();
        for e in &index {
            let Some(&d) = by_serial.get(e.serial.as_str()) else {
                continue;
            };
            let Some(slot) = self.slot_of(e.id) else {
                continue;
            };
            if self.subs[slot as usize].device == NONE {
                links.push((slot, d, e.status));
            }
        }
        drop(by_serial);
        for (slot, d, status) in links {
            self.subs[slot as usize].device = d;
            if status != SubscriptionStatus::Revoked {
                self.devices[d as usize].live = slot;
                self.orphans = self.orphans.saturating_sub(1);
            }
        }
        tracing::debug!(devices = n, orphans = self.orphans, "devices applied");
    }

    /// Applies a profile change: every device of the profile gets the new version at its next
    /// contact (handshake response or acknowledgement).
    pub fn profile_changed(&mut self, profile: &Profile) {
        self.upsert_profile(profile);
        tracing::debug!(profile = %profile.name, version = profile.version, "profile applied");
    }

    /// A gateway connected; `name` is the name in its verified certificate.
    pub fn gateway_up(&mut self, conn: GatewayConnId, name: Arc<str>) {
        self.gateway_names.insert(conn, name);
    }

    /// A gateway connection ended.
    pub fn gateway_down(&mut self, conn: GatewayConnId) {
        self.gateway_names.remove(&conn);
    }

    /// Whether the profile at index `profile` lets its devices use `route`. A device without a
    /// profile (a subscription whose profile the engine does not know) is not restricted.
    fn permits(&self, profile: u16, route: Route) -> bool {
        let Some(policy) = self.policies.get(usize::from(profile)) else {
            return true;
        };
        match route {
            Route::Direct(_) => policy.allow_direct,
            Route::Gateway { conn, .. } => self.permits_gateway(policy, conn),
        }
    }

    /// Whether `policy` lets its devices use the gateway connection `conn`.
    fn permits_gateway(&self, policy: &PathPolicy, conn: GatewayConnId) -> bool {
        match self.gateway_names.get(&conn) {
            Some(name) => policy.allows_gateway(name),
            // A connection the engine has no name for is on no list.
            None => policy.gateways.is_empty(),
        }
    }

    /// The quota of a session of a device with the profile at index `profile`.
    fn quota_of(&self, profile: u16) -> Quota {
        self.policies
            .get(usize::from(profile))
            .and_then(|p| p.quota)
            .unwrap_or(self.admission.default_quota)
    }

    /// What a gateway is told about the live session `id`: its key, how long the core still
    /// accepts its frames, and its quota.
    fn admission_of(&self, id: SessionId, session: &CoreSession, now: Instant) -> Admission {
        let remaining = self
            .policy
            .reject_after
            .saturating_sub(session.transport.age(now));
        let profile = self
            .subs
            .get(session.slot as usize)
            .map_or(NO_PROFILE, |e| e.profile);
        Admission {
            session: id,
            key: session.admission,
            lifetime_secs: u32::try_from(remaining.as_secs()).unwrap_or(u32::MAX),
            quota: self.quota_of(profile),
        }
    }

    /// Answers a gateway's `AdmitQuery`: each session that is live (not past `reject_after`, its
    /// subscription active) and whose profile lets it use gateway `conn` is admitted with its
    /// remaining lifetime and quota; every other id is not. Duplicate ids are answered once.
    pub fn admit_query(
        &self,
        conn: GatewayConnId,
        sessions: &[SessionId],
        now: Instant,
    ) -> AdmitAnswer {
        let mut answer = AdmitAnswer::default();
        let mut ids = sessions.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let admitted = self.sessions.get(&id).and_then(|session| {
                if session.transport.age(now) > self.policy.reject_after {
                    return None;
                }
                let entry = self.subs.get(session.slot as usize)?;
                if entry.status != SubscriptionStatus::Active {
                    return None;
                }
                let allowed = self
                    .policies
                    .get(usize::from(entry.profile))
                    .is_none_or(|policy| self.permits_gateway(policy, conn));
                allowed.then(|| self.admission_of(id, session, now))
            });
            match admitted {
                Some(a) => answer.admitted.push(a),
                None => answer.not_admitted.push(id),
            }
        }
        self.metrics
            .admission_queries(AdmissionAnswer::Admitted, answer.admitted.len());
        self.metrics
            .admission_queries(AdmissionAnswer::NotAdmitted, answer.not_admitted.len());
        tracing::debug!(
            %conn,
            admitted = answer.admitted.len(),
            not_admitted = answer.not_admitted.len(),
            "admission query answered"
        );
        answer
    }

    /// Refuses a handshake on a path its profile does not allow.
    fn refuse_path(
        &self,
        incoming: IncomingHandshake,
        route: Route,
        out: &mut Outputs,
    ) -> HandshakeResult {
        let gateway = origin(route).and_then(|c| self.gateway_names.get(&c));
        tracing::info!(
            ?route,
            gateway = gateway.map(|g| &**g),
            "path not permitted by the device's profile"
        );
        self.refuse(incoming, RefusalReason::NotPermitted, None, route, out)
    }

    /// Asks the device for a credential update at its next contact.
    pub fn request_rotation(&mut self, id: SubscriptionId) {
        if let Some(slot) = self.slot_of(id) {
            let entry = &mut self.subs[slot as usize];
            entry.flags = (entry.flags | flag::ROTATE_REQUESTED) & !flag::ROTATE_NOTIFIED;
        }
    }

    /// Applies a status change made in the store. A subscription that is no longer active loses
    /// its sessions at once (named in `out.revoked` for the gateways): frames on them are then
    /// `unknown_session`, its handshakes refused. Returns how many sessions were dropped (0 for a
    /// subscription the engine does not index).
    pub fn set_status(
        &mut self,
        id: SubscriptionId,
        status: SubscriptionStatus,
        now: Instant,
        out: &mut Outputs,
    ) -> usize {
        let Some(slot) = self.slot_of(id) else {
            return 0;
        };
        let entry = &mut self.subs[slot as usize];
        let was = entry.status;
        entry.status = status;
        if let Some(d) = self.devices.get_mut(entry.device as usize) {
            if status == SubscriptionStatus::Revoked && d.live == slot {
                d.live = NONE;
            } else if was == SubscriptionStatus::Revoked && status != SubscriptionStatus::Revoked {
                d.live = slot;
            }
        }
        if status == SubscriptionStatus::Active {
            return 0;
        }
        let dropped = self.drop_sessions(slot, now, out);
        tracing::debug!(subscription = id.0, %status, dropped, "status applied");
        dropped
    }

    /// Drops every session of a subscription and names them for the gateways.
    fn drop_sessions(&mut self, slot: u32, now: Instant, out: &mut Outputs) -> usize {
        let Some(entry) = self.subs.get(slot as usize) else {
            return 0;
        };
        let live: Vec<SessionId> = entry.live().collect();
        for session in &live {
            self.remove_session(*session);
            self.recently_revoked.insert(*session, now);
        }
        out.revoked.extend_from_slice(&live);
        live.len()
    }

    /// How many sessions a subscription holds.
    pub fn live_sessions(&self, id: SubscriptionId) -> usize {
        self.slot_of(id)
            .map(|slot| self.subs[slot as usize].live().count())
            .unwrap_or(0)
    }

    /// Handles one device frame. Nothing it contains can make this panic or touch another session.
    pub fn handle_frame(&mut self, bytes: &[u8], route: Route, now: Instant, out: &mut Outputs) {
        match DeviceFrame::decode(bytes) {
            Err(e) => self.metrics.frame_dropped(DropReason::Decode(e)),
            Ok(DeviceFrame::HandshakeInit { sender, noise }) => {
                let rate = self.count_initiation(now);
                if rate > self.admission.cookie_above_per_sec || self.backlog > COOKIE_BACKLOG {
                    // Under load: prove the path first, no Diffie-Hellman until then.
                    self.cookie_reply(sender, noise, route, now, out);
                } else {
                    self.initiation(sender, noise, route, now, out);
                }
            }
            Ok(DeviceFrame::CookieInit { sender, noise, .. }) => {
                self.count_initiation(now);
                let (source, len) = cookie_source(route);
                if self.cookies.check(bytes, &source[..len], now) {
                    self.initiation(sender, noise, route, now, out);
                } else {
                    self.metrics.frame_dropped(DropReason::StaleCookie);
                    self.cookie_reply(sender, noise, route, now, out);
                }
            }
            Ok(DeviceFrame::HandshakeResponse { .. } | DeviceFrame::CookieReply { .. }) => {
                self.metrics.frame_dropped(DropReason::UnexpectedType)
            }
            Ok(
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
                },
            ) => {
                // The admission tag is the gateways' to check; the AEAD authenticates the frame.
                if let Err(reason) =
                    self.handle_transport(receiver, counter, ciphertext, route, now, out)
                {
                    self.metrics.frame_dropped(reason);
                }
            }
        }
    }

    /// How many frames wait behind the one being handled (the engine's input queue).
    pub fn set_backlog(&mut self, waiting: usize) {
        self.backlog = waiting;
    }

    /// Counts one initiation in the current window; returns the count so far.
    fn count_initiation(&mut self, now: Instant) -> u32 {
        let (start, count) = &mut self.initiations;
        if now.saturating_duration_since(*start) >= INITIATION_WINDOW {
            *start = now;
            *count = 0;
        }
        *count = count.saturating_add(1);
        *count
    }

    /// A handshake initiation, plain or with a valid cookie.
    fn initiation(
        &mut self,
        sender: SessionId,
        noise: &[u8],
        route: Route,
        now: Instant,
        out: &mut Outputs,
    ) {
        match self.handle_init(sender, noise, route, now, out) {
            Ok(result) => self.metrics.handshake(result),
            Err(reason) => self.metrics.frame_dropped(reason),
        }
    }

    /// Answers an initiation with a cookie for its path, on the route a response would take.
    fn cookie_reply(
        &mut self,
        sender: SessionId,
        noise: &[u8],
        route: Route,
        now: Instant,
        out: &mut Outputs,
    ) {
        let (source, len) = cookie_source(route);
        let mut frame = Vec::with_capacity(relay_protocol::frame::COOKIE_REPLY_LEN);
        match self
            .cookies
            .reply(sender, noise, &source[..len], now, &mut frame)
        {
            Ok(()) => {
                self.metrics.cookie_replies.inc();
                out.sends.push(Outgoing::plain(route, frame));
            }
            Err(e) => tracing::warn!(error = %e, "cookie reply could not be written"),
        }
    }

    /// Answers with an authenticated refusal.
    fn refuse(
        &self,
        incoming: IncomingHandshake,
        reason: RefusalReason,
        release: Option<Release>,
        route: Route,
        out: &mut Outputs,
    ) -> HandshakeResult {
        let mut response = ResponsePayload::refuse(reason);
        response.notices.release = release;
        let mut frame = Vec::with_capacity(relay_protocol::frame::HANDSHAKE_RESPONSE_HEADER + 64);
        match incoming.refuse(&response, &mut frame) {
            Ok(()) => {
                tracing::debug!(?route, reason = reason.label(), "handshake refused");
                out.sends.push(Outgoing::plain(route, frame));
                HandshakeResult::Refused(reason)
            }
            Err(e) => {
                tracing::warn!(error = %e, "refusal could not be written");
                HandshakeResult::Failed
            }
        }
    }

    fn crash_point(&self, point: CrashPoint) {
        if self.crash_at == Some(point) {
            tracing::warn!(crash_at = point.name(), "crash point reached: aborting");
            std::process::abort();
        }
    }

    fn handle_init(
        &mut self,
        sender: SessionId,
        noise: &[u8],
        route: Route,
        now: Instant,
        out: &mut Outputs,
    ) -> Result<HandshakeResult, DropReason> {
        let incoming = match self.responder.read_init(sender, noise) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, ?route, "handshake failed");
                return Ok(HandshakeResult::Failed);
            }
        };
        let key = *incoming.device();
        if let Some(&device) = self.device_by_key.get(&key) {
            return Ok(self.factory_handshake(device, incoming, route, now, out));
        }
        let slot = match self.by_key.get(&key) {
            None => {
                // Proposing a key with an unknown identity: a factory identity nobody claimed.
                let reason = if incoming.init().next_key.is_some() {
                    RefusalReason::Unclaimed
                } else {
                    RefusalReason::UnknownKey
                };
                return Ok(self.refuse(incoming, reason, None, route, out));
            }
            Some(r) if r.is_retired() => {
                return Ok(self.refuse(incoming, RefusalReason::Superseded, None, route, out));
            }
            Some(r) => r.slot(),
        };
        let Some(entry) = self.subs.get(slot as usize) else {
            return Ok(self.refuse(incoming, RefusalReason::UnknownKey, None, route, out));
        };
        match entry.status {
            SubscriptionStatus::Active => {}
            SubscriptionStatus::Suspended => {
                return Ok(self.refuse(incoming, RefusalReason::Suspended, None, route, out))
            }
            SubscriptionStatus::Quarantined => {
                return Ok(self.refuse(incoming, RefusalReason::Quarantined, None, route, out))
            }
            SubscriptionStatus::Revoked => {
                let (reason, release) = self.revoked_reason(entry);
                return Ok(self.refuse(incoming, reason, release, route, out));
            }
        }
        let init: InitPayload = *incoming.init();
        if entry.has(flag::SEEN) && init.timestamp <= entry.last_handshake {
            self.fraud(slot, FraudReason::Replay, now, out);
            return Ok(HandshakeResult::Replayed);
        }
        if !self.permits(entry.profile, route) {
            return Ok(self.refuse_path(incoming, route, out));
        }
        let id = entry.id;
        // A third session replaces the subscription's oldest, so it never raises the count.
        let replaces = entry.sessions[1] != NO_SESSION;
        if !replaces && self.sessions.len() >= self.policy.max_sessions {
            self.sweep(now);
            if self.sessions.len() >= self.policy.max_sessions {
                // Not the handshake's fault: counted as a dropped frame, not as an outcome.
                return Err(DropReason::SessionLimit);
            }
        }

        let mut response = ResponsePayload::accept(self.policy.rekey_after_secs);
        let mut result = HandshakeResult::Accepted;
        let change = self.key_changes.get(&slot).copied();
        if change.is_some_and(|c| c.next == key) {
            if let Err(e) = self.store.promote_next_key(id, &key) {
                tracing::warn!(subscription = id.0, error = %e, "next key not promoted");
                return Ok(HandshakeResult::Failed);
            }
            self.crash_point(CrashPoint::PromoteCommitted);
            self.promote(slot, now, out);
            result = HandshakeResult::KeyPromoted;
        } else if let Some(next) = init.next_key {
            if change.is_some_and(|c| c.next == next) {
                // Announced before (the response was lost): already stored.
                response.key_accepted = Some(next);
                result = HandshakeResult::KeyAnnounced;
            } else if self.key_is_free(&next, slot) && next != key {
                if let Err(e) = self.store.set_next_key(id, &next) {
                    tracing::warn!(subscription = id.0, error = %e, "next key not stored");
                    return Ok(HandshakeResult::Failed);
                }
                self.crash_point(CrashPoint::NextKeyCommitted);
                self.announce(slot, key, next);
                response.key_accepted = Some(next);
                result = HandshakeResult::KeyAnnounced;
            } else {
                tracing::info!(
                    subscription = id.0,
                    "proposed key already in use; not accepted"
                );
            }
        }
        let now_s = now_secs();
        let pending = self.key_changes.contains_key(&slot);
        let Some(entry) = self.subs.get_mut(slot as usize) else {
            return Ok(HandshakeResult::Failed);
        };
        if let Some(version) = init.config_version {
            entry.flags |= flag::CONFIG_AWARE;
            if version != entry.config_version {
                entry.config_version = version;
                self.store.record_config_version(id, version);
            }
            if let Some(config) = self.profiles.get(usize::from(entry.profile)) {
                if config.version != version {
                    response.notices.config = Some(*config);
                    // Delivered if the device uses the session; if not, it reports the old
                    // version at its next handshake and gets it again.
                    entry.config_version = config.version;
                    self.store.record_config_version(id, config.version);
                    self.metrics.config_push(Via::Handshake);
                }
            }
        }
        entry.flags &= !flag::ROTATE_NOTIFIED;
        if rotate_due(entry, self.lifecycle.rotate_after_secs, pending, now_s) {
            response.notices.rotate = true;
            entry.flags |= flag::ROTATE_NOTIFIED;
            self.metrics.rotate_notice(Via::Handshake);
        }

        let session = self.fresh_session_id();
        // Independent of the end-to-end keys: what the gateways check frames with.
        let admission = AdmissionKey(rand::random::<[u8; 16]>());
        response.admission = Some(admission);
        let mut frame = Vec::with_capacity(
            relay_protocol::frame::HANDSHAKE_RESPONSE_HEADER + 64 + response.encoded_len(),
        );
        let transport = match incoming.accept(session, &response, now, &mut frame) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "handshake could not be completed");
                return Ok(HandshakeResult::Failed);
            }
        };
        let Some(entry) = self.subs.get_mut(slot as usize) else {
            return Ok(HandshakeResult::Failed);
        };
        entry.last_handshake = init.timestamp;
        entry.flags |= flag::SEEN;
        let oldest = entry.sessions[1];
        entry.sessions = [session, entry.sessions[0]];
        if oldest != NO_SESSION {
            self.sessions.remove(&oldest);
        }
        let core_session = CoreSession {
            slot,
            used: false,
            route,
            admission,
            transport: Box::new(transport),
        };
        // Through a gateway, the response carries the admission: the gateway knows the session
        // before the device's first frame.
        let admission = matches!(route, Route::Gateway { .. })
            .then(|| self.admission_of(session, &core_session, now));
        self.sessions.insert(session, core_session);
        self.metrics.sessions.set(self.sessions.len() as i64);
        tracing::debug!(%session, subscription = id.0, ?route, result = result.label(), "session established");
        out.sends.push(Outgoing {
            route,
            frame,
            admission,
        });
        Ok(result)
    }

    /// Why a revoked subscription's key is refused: the device went to another operator, to
    /// another owner (re-provision with the factory identity), or is simply revoked.
    fn revoked_reason(&self, entry: &SubscriptionEntry) -> (RefusalReason, Option<Release>) {
        match self.devices.get(entry.device as usize) {
            Some(d) if d.release.is_some() => {
                (RefusalReason::Released, d.release.as_deref().cloned())
            }
            Some(d) if d.owner != entry.owner => (RefusalReason::Reprovision, None),
            _ => (RefusalReason::Revoked, None),
        }
    }

    /// Whether `key` may become a key of the subscription in `slot`: not a factory key, not
    /// another subscription's, not a retired one.
    fn key_is_free(&self, key: &PublicKey, slot: u32) -> bool {
        if self.device_by_key.contains_key(key) {
            return false;
        }
        match self.by_key.get(key) {
            None => true,
            Some(r) => !r.is_retired() && r.slot() == slot,
        }
    }

    /// Phase 1 done: both keys map to the subscription.
    fn announce(&mut self, slot: u32, current: PublicKey, next: PublicKey) {
        if let Some(old) = self.key_changes.insert(slot, KeyChange { current, next }) {
            // A newer proposal replaces one never used.
            if old.next != next && self.by_key.get(&old.next) == Some(&KeyRef::live(slot)) {
                self.by_key.remove(&old.next);
            }
        }
        self.by_key.insert(next, KeyRef::live(slot));
        self.metrics.key_update(KeyPhase::Announced);
    }

    /// Phase 2 done: the old key is retired (refused `Superseded` from now on).
    fn promote(&mut self, slot: u32, now: Instant, out: &mut Outputs) {
        if let Some(change) = self.key_changes.remove(&slot) {
            self.by_key.insert(change.current, KeyRef::retired(slot));
        }
        let flagged = self
            .subs
            .get(slot as usize)
            .is_some_and(|e| e.has(flag::FLAGGED));
        if flagged {
            // Sessions made with the suspect key die with it.
            self.drop_sessions(slot, now, out);
        }
        if let Some(entry) = self.subs.get_mut(slot as usize) {
            entry.key_since_secs = now_secs();
            entry.flags &= !(flag::ROTATE_REQUESTED | flag::ROTATE_NOTIFIED | flag::FLAGGED);
        }
        self.metrics.key_update(KeyPhase::Promoted);
    }

    /// Retires every key of a subscription (its key is being replaced by provisioning).
    fn retire_keys(&mut self, slot: u32) {
        match self.key_changes.remove(&slot) {
            Some(change) => {
                self.by_key.insert(change.current, KeyRef::retired(slot));
                self.by_key.insert(change.next, KeyRef::retired(slot));
            }
            None => {
                // The engine does not keep each subscription's key beside the index (48 bytes per
                // subscription is the budget); recovery is rare enough for one pass over it.
                for r in self.by_key.values_mut() {
                    if *r == KeyRef::live(slot) {
                        *r = KeyRef::retired(slot);
                    }
                }
            }
        }
    }

    /// A factory-identity handshake: provisioning, or recovery (`docs/protocol.md`,
    /// "Provisioning"). Never leaves a session behind.
    fn factory_handshake(
        &mut self,
        device: u32,
        incoming: IncomingHandshake,
        route: Route,
        now: Instant,
        out: &mut Outputs,
    ) -> HandshakeResult {
        let init: InitPayload = *incoming.init();
        let Some(rec) = self.devices.get(device as usize) else {
            return self.refuse(incoming, RefusalReason::UnknownKey, None, route, out);
        };
        let unclaimed = self
            .owners
            .get(rec.owner as usize)
            .is_none_or(|o| o.is_empty());
        if unclaimed {
            return self.refuse(incoming, RefusalReason::Unclaimed, None, route, out);
        }
        if let Some(release) = rec.release.as_deref() {
            let release = Some(release.clone());
            return self.refuse(incoming, RefusalReason::Released, release, route, out);
        }
        if !rec.activated {
            return self.refuse(incoming, RefusalReason::NotActivated, None, route, out);
        }
        let Some(next) = init.next_key else {
            return self.refuse(incoming, RefusalReason::KeyRequired, None, route, out);
        };
        let live = rec.live;
        if self
            .subs
            .get(live as usize)
            .is_some_and(|e| e.status == SubscriptionStatus::Suspended)
        {
            return self.refuse(incoming, RefusalReason::Suspended, None, route, out);
        }
        if rec.last_factory.is_some_and(|t| init.timestamp <= t) {
            // Dropped, but not held against the subscription: the factory key never leaves the
            // secure element, so this says nothing about a copied subscription key, and someone
            // on the path must not be able to quarantine a device by replaying its provisioning.
            return HandshakeResult::Replayed;
        }
        if !self.permits(rec.profile, route) {
            return self.refuse_path(incoming, route, out);
        }
        if !self.key_is_free(&next, live) {
            return self.refuse(incoming, RefusalReason::KeyRequired, None, route, out);
        }
        // The same key again (a retransmission): the store returns the subscription unchanged.
        let unchanged = self.by_key.get(&next) == Some(&KeyRef::live(live));
        let serial = rec.serial.clone();
        let entry = match self.store.provision(&serial, &next) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%serial, error = %e, "provisioning failed");
                return HandshakeResult::Failed;
            }
        };
        self.crash_point(CrashPoint::ProvisionCommitted);
        let slot = match self.slot_of(entry.id) {
            Some(slot) => {
                if !unchanged {
                    // Recovery: the old key dies at once, and whoever holds it loses its sessions.
                    self.retire_keys(slot);
                    self.drop_sessions(slot, now, out);
                }
                self.load_subscription(slot, &entry, device);
                slot
            }
            None => self.add_subscription(&entry, device),
        };
        if !unchanged {
            // A retransmitted factory handshake (its answer was lost) is answered again but is
            // not a second provisioning.
            self.metrics.provisioned.inc();
        }
        if let Some(rec) = self.devices.get_mut(device as usize) {
            rec.last_factory = Some(init.timestamp);
        }
        let mut response = ResponsePayload::accept(self.policy.rekey_after_secs);
        response.key_accepted = Some(next);
        if let Some(sub) = self.subs.get_mut(slot as usize) {
            sub.flags |= flag::CONFIG_AWARE;
            if let Some(config) = self.profiles.get(usize::from(sub.profile)) {
                response.notices.config = Some(*config);
                sub.config_version = config.version;
                self.store.record_config_version(entry.id, config.version);
                self.metrics.config_push(Via::Handshake);
            }
        }
        let mut frame = Vec::with_capacity(
            relay_protocol::frame::HANDSHAKE_RESPONSE_HEADER + 64 + response.encoded_len(),
        );
        // The factory key gets an answer and no session: the device switches to its new key.
        if let Err(e) = incoming.refuse(&response, &mut frame) {
            tracing::warn!(error = %e, "provisioning response could not be written");
            return HandshakeResult::Failed;
        }
        tracing::info!(%serial, subscription = entry.id.0, ?route, "device provisioned");
        out.sends.push(Outgoing::plain(route, frame));
        HandshakeResult::Provisioned
    }

    /// The fraud detector's verdict on a subscription: flag it and ask for a credential update;
    /// for a clone, quarantine it instead when `fraud.action` says so.
    ///
    /// A replay alone never quarantines: anyone on the path (a hostile gateway) can replay a
    /// recorded initiation, which proves nothing about the key, and a quarantine would hand them
    /// a way to lock devices out (devices without a claimed factory identity cannot recover).
    /// A clone is proven: frames authenticated with the key from two places. A flagged
    /// subscription is not flagged again for the same reason until its key changed; a clone
    /// still quarantines one flagged for a replay.
    fn fraud(&mut self, slot: u32, reason: FraudReason, now: Instant, out: &mut Outputs) {
        let Some(entry) = self.subs.get(slot as usize) else {
            return;
        };
        let quarantine =
            reason == FraudReason::Clone && self.lifecycle.fraud_action == FraudAction::Quarantine;
        if entry.status != SubscriptionStatus::Active || (entry.has(flag::FLAGGED) && !quarantine) {
            return;
        }
        let id = entry.id;
        if let Err(e) = self.store.flag(id, reason.label(), quarantine) {
            tracing::warn!(subscription = id.0, error = %e, "fraud flag not stored");
            return;
        }
        self.metrics.fraud_flag(reason);
        tracing::warn!(
            subscription = id.0,
            reason = reason.label(),
            quarantine,
            "subscription flagged by the fraud detector"
        );
        if let Some(entry) = self.subs.get_mut(slot as usize) {
            entry.flags =
                (entry.flags | flag::FLAGGED | flag::ROTATE_REQUESTED) & !flag::ROTATE_NOTIFIED;
            if quarantine {
                entry.status = SubscriptionStatus::Quarantined;
            }
        }
        if quarantine {
            self.drop_sessions(slot, now, out);
        }
    }

    fn fresh_session_id(&self) -> SessionId {
        loop {
            let id = SessionId(rand::random::<u32>());
            if id != NO_SESSION
                && !self.sessions.contains_key(&id)
                && !self.recently_revoked.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Opens a transport frame of session `receiver` into `self.plaintext`: the session must
    /// exist and be younger than `reject_after` (an expired one is removed), and the frame must
    /// authenticate and pass the replay window (its counter then enters the window).
    fn open_transport(
        &mut self,
        receiver: SessionId,
        counter: u64,
        ciphertext: &[u8],
        now: Instant,
    ) -> Result<(), DropReason> {
        let session = self
            .sessions
            .get_mut(&receiver)
            .ok_or(DropReason::UnknownSession)?;
        if session.transport.age(now) > self.policy.reject_after {
            self.remove_session(receiver);
            return Err(DropReason::Expired);
        }
        session
            .transport
            .open(counter, ciphertext, &mut self.plaintext)
            .map_err(|e| match e {
                SessionError::Replay(_) | SessionError::Exhausted => DropReason::Replay,
                _ => DropReason::Authentication,
            })
    }

    fn handle_transport(
        &mut self,
        receiver: SessionId,
        counter: u64,
        ciphertext: &[u8],
        route: Route,
        now: Instant,
        out: &mut Outputs,
    ) -> Result<(), DropReason> {
        self.open_transport(receiver, counter, ciphertext, now)?;
        let session = self
            .sessions
            .get_mut(&receiver)
            .ok_or(DropReason::UnknownSession)?;
        // Authenticated: this is where the device is now (it may have moved), if its profile lets
        // it use this path; a move is checked like a handshake would be.
        if session.route != route {
            let slot = session.slot;
            let profile = self.subs.get(slot as usize).map(|e| e.profile);
            if profile.is_some_and(|p| !self.permits(p, route)) {
                return Err(DropReason::NotPermitted);
            }
        }
        let Some(session) = self.sessions.get_mut(&receiver) else {
            return Err(DropReason::UnknownSession);
        };
        session.route = route;
        session.used = true;
        let slot = session.slot;
        let entry = self
            .subs
            .get(slot as usize)
            .ok_or(DropReason::UnknownSession)?;
        if entry.sessions[1] == receiver && self.is_clone(entry.sessions[0], route) {
            self.fraud(slot, FraudReason::Clone, now, out);
            if !self.sessions.contains_key(&receiver) {
                return Err(DropReason::Fraud);
            }
        }
        match Message::decode(&self.plaintext).map_err(DropReason::Decode)? {
            Message::Reading { seq, data } => {
                let subscription = self
                    .subs
                    .get(slot as usize)
                    .ok_or(DropReason::UnknownSession)?
                    .id;
                out.readings.push(PendingReading {
                    slot,
                    subscription,
                    seq,
                    received_at_ms: now_ms(),
                    data: data.to_vec(),
                });
                Ok(())
            }
            Message::Keepalive => Ok(()),
            // A StreamOpen is only ever a stream's first frame, never a datagram.
            Message::Ack { .. } | Message::StreamOpen(_) => Err(DropReason::UnexpectedMessage),
        }
    }

    /// Authenticates the first frame of a device stream like a transport frame (its session, the
    /// session's age, the replay window, the path policy), without moving the session's datagram
    /// route, marking it used or storing anything: the stream is a side channel of the session.
    /// Its plaintext must be a `StreamOpen`.
    pub fn open_stream(
        &mut self,
        bytes: &[u8],
        origin: StreamOrigin,
        now: Instant,
    ) -> Result<StreamGrant, StreamDenied> {
        let (receiver, counter, ciphertext) =
            match DeviceFrame::decode(bytes).map_err(DropReason::Decode)? {
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
                _ => return Err(DropReason::UnexpectedType.into()),
            };
        self.open_transport(receiver, counter, ciphertext, now)?;
        let session = self
            .sessions
            .get_mut(&receiver)
            .ok_or(DropReason::UnknownSession)?;
        let slot = session.slot;
        let open = match Message::decode(&self.plaintext).map_err(DropReason::Decode)? {
            Message::StreamOpen(open) => open,
            _ => return Err(DropReason::UnexpectedMessage.into()),
        };
        let keys = session.transport.stream_keys(&open.salt, &open.upload);
        let entry = self
            .subs
            .get(slot as usize)
            .ok_or(DropReason::UnknownSession)?;
        // A gateway stream is checked by the gateway's certificate name: it may come over the
        // gateway's bulk connection, which the engine knows nothing else about.
        let permitted = match &origin {
            StreamOrigin::Direct(addr) => self.permits(entry.profile, Route::Direct(*addr)),
            StreamOrigin::Gateway(name) => self
                .policies
                .get(usize::from(entry.profile))
                .is_none_or(|policy| policy.allows_gateway(name)),
        };
        if !permitted {
            return Err(StreamDenied::NotPermitted(keys));
        }
        let serial = Some(entry.device)
            .filter(|d| *d != NONE)
            .and_then(|d| self.devices.get(d as usize))
            .map(|d| d.serial.to_string());
        let owner = crate::video::Owner {
            subscription: entry.id,
            serial,
        };
        Ok(StreamGrant { owner, open, keys })
    }

    /// A frame on a subscription's older session from `route`, while its newer session already
    /// carried a frame from another route: two devices hold the key.
    fn is_clone(&self, newer: SessionId, route: Route) -> bool {
        self.sessions
            .get(&newer)
            .is_some_and(|n| n.used && origin(n.route) != origin(route))
    }

    fn remove_session(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.remove(&id) {
            if let Some(entry) = self.subs.get_mut(s.slot as usize) {
                entry.forget_session(id);
            }
            self.metrics.sessions.set(self.sessions.len() as i64);
        }
    }

    /// Removes every session past `reject_after`, and forgets revoked ids held long enough.
    pub fn sweep(&mut self, now: Instant) {
        let reject_after = self.policy.reject_after;
        let subs = &mut self.subs;
        self.sessions.retain(|id, s| {
            if s.transport.age(now) <= reject_after {
                return true;
            }
            if let Some(entry) = subs.get_mut(s.slot as usize) {
                entry.forget_session(*id);
            }
            false
        });
        if self.sessions.capacity() > 64 && self.sessions.len() < self.sessions.capacity() / 4 {
            self.sessions.shrink_to_fit();
        }
        let hold = REVOKED_ID_HOLD.max(reject_after);
        self.recently_revoked
            .retain(|_, at| now.saturating_duration_since(*at) < hold);
        self.metrics.sessions.set(self.sessions.len() as i64);
    }

    /// Seals acknowledgements for readings now durable, on each subscription's newest session,
    /// with whatever the core has to tell the device riding on the first one.
    pub fn handle_committed(&mut self, committed: Committed, now: Instant, out: &mut Outputs) {
        let mut durable = committed.durable;
        durable.sort_unstable();
        durable.dedup();
        let now_s = now_secs();
        let mut seqs: Vec<ReadingSeq> = Vec::with_capacity(MAX_ACKS);
        for group in durable.chunk_by(|a, b| a.0 == b.0) {
            let slot = group[0].0;
            let Some(entry) = self.subs.get_mut(slot as usize) else {
                self.metrics.frame_dropped(DropReason::Unroutable);
                continue;
            };
            let Some(session) = entry.newest().and_then(|id| self.sessions.get_mut(&id)) else {
                // No session to seal on: the device re-sends after its next handshake and the
                // duplicate is acknowledged then.
                self.metrics.frame_dropped(DropReason::Unroutable);
                continue;
            };
            if session.transport.age(now) > self.policy.reject_after {
                self.metrics.frame_dropped(DropReason::Expired);
                continue;
            }
            let mut notices = ack_notices(
                entry,
                &self.profiles,
                &self.devices,
                self.lifecycle.rotate_after_secs,
                !self.key_changes.is_empty() && self.key_changes.contains_key(&slot),
                now_s,
            );
            for chunk in group.chunks(MAX_ACKS) {
                seqs.clear();
                seqs.extend(chunk.iter().map(|(_, s)| *s));
                self.plaintext.clear();
                let ack = Message::Ack {
                    seqs,
                    notices: std::mem::take(&mut notices),
                };
                ack.encode(&mut self.plaintext);
                let sent = match ack {
                    Message::Ack {
                        seqs: back,
                        notices,
                    } => {
                        seqs = back;
                        notices
                    }
                    _ => {
                        seqs = Vec::with_capacity(MAX_ACKS);
                        Notices::default()
                    }
                };
                let mut frame = Vec::with_capacity(
                    relay_protocol::frame::TRANSPORT_HEADER
                        + self.plaintext.len()
                        + relay_protocol::frame::TAG_LEN,
                );
                match session.transport.seal(&self.plaintext, &mut frame) {
                    Ok(()) => {
                        out.sends.push(Outgoing::plain(session.route, frame));
                        if let Some(config) = sent.config {
                            entry.config_version = config.version;
                            self.store.record_config_version(entry.id, config.version);
                            self.metrics.config_push(Via::Ack);
                        }
                        if sent.rotate {
                            entry.flags |= flag::ROTATE_NOTIFIED;
                            self.metrics.rotate_notice(Via::Ack);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "acknowledgement could not be sealed");
                        // Not sent: say it on the next one.
                        notices = sent;
                    }
                }
            }
        }
    }
}

/// The engine task: a [`SessionTable`] wired to the sockets, the gateways and the store writer.
pub(crate) struct Engine {
    table: SessionTable,
    gateways: HashMap<GatewayConnId, GatewayLink>,
    direct: Arc<UdpSocket>,
    store: Option<mpsc::Sender<PendingReading>>,
    committed: mpsc::Receiver<Committed>,
    metrics: Metrics,
    out: Outputs,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("table", &self.table)
            .field("gateways", &self.gateways.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(
        table: SessionTable,
        direct: Arc<UdpSocket>,
        store: mpsc::Sender<PendingReading>,
        committed: mpsc::Receiver<Committed>,
        metrics: Metrics,
    ) -> Self {
        Self {
            table,
            gateways: HashMap::new(),
            direct,
            store: Some(store),
            committed,
            metrics,
            out: Outputs::default(),
        }
    }

    /// Runs until `shutdown`, then closes the store channel and seals acknowledgements for what
    /// the writer still commits, for at most `grace`.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<EngineInput>,
        mut control: mpsc::Receiver<EngineControl>,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(c) = control.recv() => self.on_control(c),
                Some(c) = self.committed.recv() => self.on_committed(c),
                msg = input.recv() => match msg {
                    Some(msg) => {
                        self.table.set_backlog(input.len());
                        self.on_input(msg).await
                    }
                    None => break,
                },
                _ = sweep.tick() => self.table.sweep(Instant::now()),
            }
        }
        // Readings already handed over get committed; their acknowledgements still go out if the
        // routes are still there.
        self.store = None;
        drop(input);
        let deadline = tokio::time::Instant::now() + grace;
        while let Ok(Some(c)) = tokio::time::timeout_at(deadline, self.committed.recv()).await {
            self.on_committed(c);
        }
        tracing::debug!(sessions = self.table.session_count(), "engine stopped");
    }

    async fn on_input(&mut self, msg: EngineInput) {
        match msg {
            EngineInput::Frame { bytes, route } => {
                self.table
                    .handle_frame(&bytes, route, Instant::now(), &mut self.out);
                self.flush_revoked();
                self.flush_sends();
                self.flush_readings().await;
            }
            EngineInput::GatewayUp { conn, name, link } => {
                self.table.gateway_up(conn, name);
                self.gateways.insert(conn, link);
            }
            EngineInput::GatewayDown { conn } => {
                self.table.gateway_down(conn);
                self.gateways.remove(&conn);
            }
            EngineInput::AdmitQuery { conn, sessions } => {
                let answer = self.table.admit_query(conn, &sessions, Instant::now());
                self.answer_query(conn, answer);
            }
            EngineInput::StreamOpen {
                frame,
                origin,
                reply,
            } => {
                let granted = self.table.open_stream(&frame, origin, Instant::now());
                if let Err(denied) = &granted {
                    self.metrics.frame_dropped(denied.reason());
                }
                let _ = reply.send(granted);
            }
        }
    }

    /// Sends a gateway the answer to its `AdmitQuery` on its control stream: `Admit` in batches
    /// of [`MAX_ADMITS`], `NotAdmitted` in batches of [`MAX_ADMIT_QUERY`]. A gateway that does
    /// not read its control stream loses answers rather than make the core queue them without
    /// bound: its held frames time out and the next frame asks again.
    fn answer_query(&self, conn: GatewayConnId, answer: AdmitAnswer) {
        let Some(link) = self.gateways.get(&conn) else {
            tracing::debug!(%conn, "gateway gone; admission query not answered");
            return;
        };
        let admits = answer
            .admitted
            .chunks(MAX_ADMITS)
            .map(|chunk| UplinkMessage::Admit {
                admissions: chunk.to_vec(),
            });
        let refusals =
            answer
                .not_admitted
                .chunks(MAX_ADMIT_QUERY)
                .map(|chunk| UplinkMessage::NotAdmitted {
                    sessions: chunk.to_vec(),
                });
        for message in admits.chain(refusals) {
            let mut buf = BytesMut::with_capacity(4 + 2 + MAX_ADMITS * Admission::ENCODED_LEN);
            message.encode(&mut buf);
            if link.control.try_send(buf.freeze()).is_err() {
                tracing::debug!(%conn, "gateway control stream full or gone; admission answer not sent");
                return;
            }
        }
    }

    fn on_control(&mut self, c: EngineControl) {
        match c {
            EngineControl::SetStatus {
                subscription,
                status,
                reply,
            } => {
                let dropped =
                    self.table
                        .set_status(subscription, status, Instant::now(), &mut self.out);
                // The gateways are told before the admin API answers.
                self.flush_revoked();
                let _ = reply.send(dropped);
            }
            EngineControl::LiveSessions {
                subscription,
                reply,
            } => {
                let _ = reply.send(self.table.live_sessions(subscription));
            }
            EngineControl::DevicesChanged { devices, reply } => {
                self.table.devices_changed(devices);
                let _ = reply.send(());
            }
            EngineControl::ProfileChanged { profile, reply } => {
                self.table.profile_changed(&profile);
                let _ = reply.send(());
            }
            EngineControl::RequestRotation {
                subscription,
                reply,
            } => {
                self.table.request_rotation(subscription);
                let _ = reply.send(());
            }
        }
    }

    /// Names the sessions just dropped for a status change to every connected gateway
    /// (`UplinkMessage::Revoked` on its control stream), so that it drops their frames.
    fn flush_revoked(&mut self) {
        if self.out.revoked.is_empty() {
            return;
        }
        let mut revoked = std::mem::take(&mut self.out.revoked);
        for chunk in revoked.chunks(MAX_REVOKED) {
            let message = UplinkMessage::Revoked {
                sessions: chunk.to_vec(),
            };
            let mut buf = BytesMut::with_capacity(4 + 2 + 4 * chunk.len());
            message.encode(&mut buf);
            let buf = buf.freeze();
            for (conn, link) in &self.gateways {
                if queue_control(*conn, link, buf.clone()) {
                    self.metrics.revocations_sent.inc_by(chunk.len() as u64);
                }
            }
        }
        tracing::debug!(
            sessions = revoked.len(),
            gateways = self.gateways.len(),
            "revoked sessions named to the gateways"
        );
        revoked.clear();
        self.out.revoked = revoked;
    }

    fn on_committed(&mut self, c: Committed) {
        self.table
            .handle_committed(c, Instant::now(), &mut self.out);
        self.flush_sends();
    }

    /// Hands readings to the store writer. While its queue is full, keeps sealing the
    /// acknowledgements it returns, so the two never wait on each other.
    async fn flush_readings(&mut self) {
        if self.out.readings.is_empty() {
            return;
        }
        let mut readings = std::mem::take(&mut self.out.readings);
        let Some(store) = self.store.clone() else {
            readings.clear();
            self.out.readings = readings;
            return;
        };
        for reading in readings.drain(..) {
            loop {
                tokio::select! {
                    biased;
                    permit = store.reserve() => {
                        match permit {
                            Ok(p) => p.send(reading),
                            Err(_) => tracing::error!("store writer gone; reading dropped"),
                        }
                        break;
                    }
                    Some(c) = self.committed.recv() => self.on_committed(c),
                }
            }
        }
        self.out.readings = readings;
    }

    fn flush_sends(&mut self) {
        let mut sends = std::mem::take(&mut self.out.sends);
        for outgoing in sends.drain(..) {
            let route = outgoing.route;
            if let Err(why) = self.send(outgoing) {
                tracing::debug!(?route, why, "frame not sent");
                self.metrics.frame_dropped(DropReason::Unroutable);
            }
        }
        self.out.sends = sends;
    }

    /// Sends one frame: straight to a direct device, or through its gateway in a datagram (kind 2
    /// with the admission when there is one), falling back to the control stream (`Admit` first,
    /// then `DeviceFrame`) for what does not fit.
    fn send(&self, outgoing: Outgoing) -> Result<(), &'static str> {
        let Outgoing {
            route,
            frame,
            admission,
        } = outgoing;
        match route {
            Route::Direct(addr) => match self.direct.try_send_to(&frame, addr) {
                Ok(_) => Ok(()),
                Err(_) => Err("direct socket refused the datagram"),
            },
            Route::Gateway { conn, flow } => {
                let link = self.gateways.get(&conn).ok_or("gateway disconnected")?;
                let datagram = UplinkDatagram {
                    flow,
                    admission,
                    frame: &frame,
                };
                let fits = link
                    .connection
                    .max_datagram_size()
                    .is_some_and(|max| datagram.encoded_len() <= max);
                if fits {
                    let mut buf = BytesMut::with_capacity(datagram.encoded_len());
                    datagram.encode(&mut buf);
                    match link.connection.send_datagram(buf.freeze()) {
                        Ok(()) => return Ok(()),
                        Err(quinn::SendDatagramError::TooLarge) => {}
                        Err(_) => return Err("gateway connection refused the datagram"),
                    }
                }
                if let Some(admission) = admission {
                    // Ahead of the frame on the same ordered stream.
                    let mut buf = BytesMut::with_capacity(4 + 1 + Admission::ENCODED_LEN);
                    UplinkMessage::Admit {
                        admissions: vec![admission],
                    }
                    .encode(&mut buf);
                    link.control
                        .try_send(buf.freeze())
                        .map_err(|_| "gateway control stream is full")?;
                }
                let mut buf = BytesMut::with_capacity(frame.len() + 8);
                UplinkMessage::DeviceFrame {
                    flow,
                    frame: Bytes::from(frame),
                }
                .encode(&mut buf);
                link.control
                    .try_send(buf.freeze())
                    .map_err(|_| "gateway control stream is full")
            }
        }
    }
}

/// Queues a control message that must not be lost to a burst (`Revoked`) for a gateway: when its
/// queue is full, a task waits for the writer off the engine task. Returns false when the gateway
/// is gone.
fn queue_control(conn: GatewayConnId, link: &GatewayLink, message: Bytes) -> bool {
    match link.control.try_send(message) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(message)) => {
            let control = link.control.clone();
            tokio::spawn(async move {
                let _ = control.send(message).await;
            });
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            tracing::debug!(%conn, "gateway gone; control message not sent");
            false
        }
    }
}
