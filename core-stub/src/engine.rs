//! The session engine: one task that owns every device session, the in-memory subscription
//! index and the route back to each device. No locks: everything reaches it through one bounded
//! channel, and it alone decides.
//!
//! ```text
//!  direct.rs ──┐                     ┌─────────────── Engine (one task) ───────────────┐
//!  uplink.rs ──┴─EngineInput──▶      │ SessionTable: handshakes, open, route updates    │──PendingReading──▶ store writer
//!   (frames, gateway up/down)        │ gateways: GatewayConnId → quinn::Connection      │◀──Committed──────  (own thread)
//!                                    └── seal Ack on the newest session, send by route ─┘
//! ```
//!
//! `SessionTable` is the I/O-free part (frames and `now` in, frames to send and readings to
//! store out), driven by `Engine`, which owns the sockets and channels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_protocol::payload::{Message, ReadingSeq, ResponsePayload, MAX_ACKS};
use relay_protocol::session::{PublicKey, Responder, SessionError, StaticKeypair, Transport};
use relay_protocol::{DecodeError, DeviceFrame, FlowId, SessionId, UplinkDatagram, UplinkMessage};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SessionConfig;
use crate::metrics::Metrics;
use crate::store::{
    now_ms, Committed, IndexEntry, PendingReading, SubscriptionId, SubscriptionStatus,
};

/// How often sessions past `reject_after` are swept out even if their device went silent.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

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
            ])
            .map(Self::label)
    }
}

/// The outcome of a handshake initiation (`core_handshakes_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeResult {
    /// A session was established and the response sent.
    Accepted,
    /// The device's key is not in the store.
    UnknownKey,
    /// The subscription is suspended.
    Suspended,
    /// The subscription is revoked.
    Revoked,
    /// The timestamp is not newer than the last accepted one for this subscription.
    Replayed,
    /// The Noise message did not authenticate or decode.
    Failed,
}

impl HandshakeResult {
    /// Every outcome.
    pub const ALL: [Self; 6] = [
        Self::Accepted,
        Self::UnknownKey,
        Self::Suspended,
        Self::Revoked,
        Self::Replayed,
        Self::Failed,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::UnknownKey => "unknown_key",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
            Self::Replayed => "replayed",
            Self::Failed => "failed",
        }
    }
}

/// What the acceptors hand the engine.
#[derive(Debug)]
pub(crate) enum EngineInput {
    /// A device frame and where it came from.
    Frame { bytes: Bytes, route: Route },
    /// A gateway finished `Hello`: frames for its flows go out through `link`.
    GatewayUp {
        conn: GatewayConnId,
        link: GatewayLink,
    },
    /// A gateway connection ended; sessions routed through it wait for their device's next frame.
    GatewayDown { conn: GatewayConnId },
}

/// What the admin API asks of the engine, on its own bounded channel, served before frames so a
/// suspension takes effect ahead of any queued traffic.
#[derive(Debug)]
pub(crate) enum EngineControl {
    /// The subscription's status changed in the store: apply it, drop its sessions unless it is
    /// active, and reply with how many were dropped.
    SetStatus {
        subscription: SubscriptionId,
        status: SubscriptionStatus,
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    /// How many sessions the subscription holds.
    LiveSessions {
        subscription: SubscriptionId,
        reply: tokio::sync::oneshot::Sender<usize>,
    },
}

/// The engine's way back to a gateway: datagrams on the connection, and the control stream (via
/// its writer task) for a frame too large for a datagram.
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
    route: Route,
    /// Boxed so the session map's buckets stay small: the map doubles its bucket array as it
    /// grows, and by-value entries of ~340 bytes made each doubling cost more per idle device
    /// than the 1 KiB budget (measured by `device-sim bench`).
    transport: Box<Transport>,
}

/// What the engine knows about one subscription.
#[derive(Debug)]
struct SubscriptionEntry {
    id: SubscriptionId,
    status: SubscriptionStatus,
    /// The timestamp of the last accepted handshake: a new one must be greater.
    last_handshake: Option<u64>,
    /// The newest session first; at most two (the previous one lives on so that frames in flight
    /// across a rekey still open).
    sessions: [Option<SessionId>; 2],
}

/// Frames and readings produced by [`SessionTable`], for the caller to send and store.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    pub sends: Vec<(Route, Vec<u8>)>,
    pub readings: Vec<PendingReading>,
}

/// Every session and the subscription index, without I/O.
pub(crate) struct SessionTable {
    responder: Responder,
    policy: SessionConfig,
    sessions: HashMap<SessionId, CoreSession>,
    subs: Vec<SubscriptionEntry>,
    by_key: HashMap<PublicKey, u32>,
    plaintext: Vec<u8>,
    metrics: Metrics,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("responder", &self.responder)
            .field("sessions", &self.sessions.len())
            .field("subscriptions", &self.subs.len())
            .finish_non_exhaustive()
    }
}

impl SessionTable {
    pub fn new(
        keypair: StaticKeypair,
        policy: SessionConfig,
        index: Vec<IndexEntry>,
        metrics: Metrics,
    ) -> Self {
        let mut subs = Vec::with_capacity(index.len());
        let mut by_key = HashMap::with_capacity(index.len());
        for (slot, e) in (0..=u32::MAX).zip(index) {
            by_key.insert(e.public_key, slot);
            subs.push(SubscriptionEntry {
                id: e.id,
                status: e.status,
                last_handshake: None,
                sessions: [None, None],
            });
        }
        Self {
            responder: Responder::new(keypair),
            policy,
            sessions: HashMap::new(),
            subs,
            by_key,
            plaintext: Vec::with_capacity(relay_protocol::frame::MAX_DATAGRAM),
            metrics,
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The slot of a subscription (`subs` is in id order, as the store lists it).
    fn slot_of(&self, id: SubscriptionId) -> Option<usize> {
        self.subs.binary_search_by_key(&id, |e| e.id).ok()
    }

    /// Applies a status change made in the store. A subscription that is no longer active loses
    /// its sessions at once: frames on them are then `unknown_session`, its handshakes
    /// `suspended` or `revoked`. Returns how many sessions were dropped (0 for a subscription the
    /// engine does not index).
    pub fn set_status(&mut self, id: SubscriptionId, status: SubscriptionStatus) -> usize {
        let Some(slot) = self.slot_of(id) else {
            return 0;
        };
        let entry = &mut self.subs[slot];
        entry.status = status;
        if status == SubscriptionStatus::Active {
            return 0;
        }
        let live: Vec<SessionId> = entry.sessions.iter().flatten().copied().collect();
        for session in &live {
            self.remove_session(*session);
        }
        tracing::debug!(subscription = id.0, %status, dropped = live.len(), "status applied");
        live.len()
    }

    /// How many sessions a subscription holds.
    pub fn live_sessions(&self, id: SubscriptionId) -> usize {
        self.slot_of(id)
            .map(|slot| self.subs[slot].sessions.iter().flatten().count())
            .unwrap_or(0)
    }

    /// Handles one device frame. Nothing it contains can make this panic or touch another session.
    pub fn handle_frame(&mut self, bytes: &[u8], route: Route, now: Instant, out: &mut Outputs) {
        match DeviceFrame::decode(bytes) {
            Err(e) => self.metrics.frame_dropped(DropReason::Decode(e)),
            Ok(DeviceFrame::HandshakeInit { sender, noise }) => {
                match self.handle_init(sender, noise, route, now, out) {
                    Ok(result) => self.metrics.handshake(result),
                    Err(reason) => self.metrics.frame_dropped(reason),
                }
            }
            Ok(DeviceFrame::HandshakeResponse { .. }) => {
                self.metrics.frame_dropped(DropReason::UnexpectedType)
            }
            Ok(DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            }) => {
                if let Err(reason) =
                    self.handle_transport(receiver, counter, ciphertext, route, now, out)
                {
                    self.metrics.frame_dropped(reason);
                }
            }
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
        let Some(&slot) = self.by_key.get(incoming.device()) else {
            tracing::debug!(?route, "handshake from an unknown key");
            return Ok(HandshakeResult::UnknownKey);
        };
        let Some(entry) = self.subs.get(slot as usize) else {
            return Ok(HandshakeResult::UnknownKey);
        };
        match entry.status {
            SubscriptionStatus::Active => {}
            SubscriptionStatus::Suspended => return Ok(HandshakeResult::Suspended),
            SubscriptionStatus::Revoked => return Ok(HandshakeResult::Revoked),
        }
        let timestamp = incoming.timestamp();
        if entry.last_handshake.is_some_and(|last| timestamp <= last) {
            return Ok(HandshakeResult::Replayed);
        }
        // A third session replaces the subscription's oldest, so it never raises the count.
        let replaces = entry.sessions[1].is_some();
        if !replaces && self.sessions.len() >= self.policy.max_sessions {
            self.sweep(now);
            if self.sessions.len() >= self.policy.max_sessions {
                // Not the handshake's fault: counted as a dropped frame, not as an outcome.
                return Err(DropReason::SessionLimit);
            }
        }

        let id = self.fresh_session_id();
        let mut frame = Vec::with_capacity(relay_protocol::frame::HANDSHAKE_RESPONSE_HEADER + 64);
        let policy = ResponsePayload {
            rekey_after_secs: self.policy.rekey_after_secs,
        };
        let transport = match incoming.accept(id, policy, now, &mut frame) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "handshake could not be completed");
                return Ok(HandshakeResult::Failed);
            }
        };
        let Some(entry) = self.subs.get_mut(slot as usize) else {
            return Ok(HandshakeResult::UnknownKey);
        };
        entry.last_handshake = Some(timestamp);
        let oldest = entry.sessions[1].take();
        entry.sessions[1] = entry.sessions[0].replace(id);
        if let Some(oldest) = oldest {
            self.sessions.remove(&oldest);
        }
        self.sessions.insert(
            id,
            CoreSession {
                slot,
                route,
                transport: Box::new(transport),
            },
        );
        self.metrics.sessions.set(self.sessions.len() as i64);
        tracing::debug!(session = %id, subscription = entry.id.0, ?route, "session established");
        out.sends.push((route, frame));
        Ok(HandshakeResult::Accepted)
    }

    fn fresh_session_id(&self) -> SessionId {
        loop {
            let id = SessionId(rand::random::<u32>());
            if id.0 != 0 && !self.sessions.contains_key(&id) {
                return id;
            }
        }
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
            })?;
        // Authenticated: this is where the device is now (it may have moved).
        session.route = route;
        let slot = session.slot;
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
            Message::Ack { .. } => Err(DropReason::UnexpectedMessage),
        }
    }

    fn remove_session(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.remove(&id) {
            if let Some(entry) = self.subs.get_mut(s.slot as usize) {
                for slot in &mut entry.sessions {
                    if *slot == Some(id) {
                        *slot = None;
                    }
                }
            }
            self.metrics.sessions.set(self.sessions.len() as i64);
        }
    }

    /// Removes every session past `reject_after`.
    pub fn sweep(&mut self, now: Instant) {
        let reject_after = self.policy.reject_after;
        let subs = &mut self.subs;
        self.sessions.retain(|id, s| {
            if s.transport.age(now) <= reject_after {
                return true;
            }
            if let Some(entry) = subs.get_mut(s.slot as usize) {
                for slot in &mut entry.sessions {
                    if *slot == Some(*id) {
                        *slot = None;
                    }
                }
            }
            false
        });
        if self.sessions.capacity() > 64 && self.sessions.len() < self.sessions.capacity() / 4 {
            self.sessions.shrink_to_fit();
        }
        self.metrics.sessions.set(self.sessions.len() as i64);
    }

    /// Seals acknowledgements for readings now durable, on each subscription's newest session.
    pub fn handle_committed(&mut self, committed: Committed, now: Instant, out: &mut Outputs) {
        let mut durable = committed.durable;
        durable.sort_unstable();
        durable.dedup();
        let mut seqs: Vec<ReadingSeq> = Vec::with_capacity(MAX_ACKS);
        for group in durable.chunk_by(|a, b| a.0 == b.0) {
            let slot = group[0].0;
            let newest = self
                .subs
                .get(slot as usize)
                .and_then(|e| e.sessions.iter().flatten().next().copied());
            let Some(session) = newest.and_then(|id| self.sessions.get_mut(&id)) else {
                // No session to seal on: the device re-sends after its next handshake and the
                // duplicate is acknowledged then.
                self.metrics.frame_dropped(DropReason::Unroutable);
                continue;
            };
            if session.transport.age(now) > self.policy.reject_after {
                self.metrics.frame_dropped(DropReason::Expired);
                continue;
            }
            for chunk in group.chunks(MAX_ACKS) {
                seqs.clear();
                seqs.extend(chunk.iter().map(|(_, s)| *s));
                self.plaintext.clear();
                Message::Ack { seqs }.encode(&mut self.plaintext);
                let mut frame = Vec::with_capacity(
                    relay_protocol::frame::TRANSPORT_HEADER
                        + self.plaintext.len()
                        + relay_protocol::frame::TAG_LEN,
                );
                match session.transport.seal(&self.plaintext, &mut frame) {
                    Ok(()) => out.sends.push((session.route, frame)),
                    Err(e) => tracing::warn!(error = %e, "acknowledgement could not be sealed"),
                }
                seqs = Vec::with_capacity(MAX_ACKS);
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
                    Some(msg) => self.on_input(msg).await,
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
                self.flush_sends();
                self.flush_readings().await;
            }
            EngineInput::GatewayUp { conn, link } => {
                self.gateways.insert(conn, link);
            }
            EngineInput::GatewayDown { conn } => {
                self.gateways.remove(&conn);
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
                let dropped = self.table.set_status(subscription, status);
                let _ = reply.send(dropped);
            }
            EngineControl::LiveSessions {
                subscription,
                reply,
            } => {
                let _ = reply.send(self.table.live_sessions(subscription));
            }
        }
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
        for (route, frame) in sends.drain(..) {
            if let Err(why) = self.send(route, frame) {
                tracing::debug!(?route, why, "frame not sent");
                self.metrics.frame_dropped(DropReason::Unroutable);
            }
        }
        self.out.sends = sends;
    }

    fn send(&self, route: Route, frame: Vec<u8>) -> Result<(), &'static str> {
        match route {
            Route::Direct(addr) => match self.direct.try_send_to(&frame, addr) {
                Ok(_) => Ok(()),
                Err(_) => Err("direct socket refused the datagram"),
            },
            Route::Gateway { conn, flow } => {
                let link = self.gateways.get(&conn).ok_or("gateway disconnected")?;
                let datagram = UplinkDatagram {
                    flow,
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

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::session::{DeviceEvent, DeviceSession};

    struct Rig {
        table: SessionTable,
        metrics: Metrics,
        core_public: PublicKey,
        devices: Vec<StaticKeypair>,
    }

    fn policy() -> SessionConfig {
        SessionConfig {
            rekey_after_secs: 60,
            reject_after: Duration::from_secs(120),
            max_sessions: 100,
        }
    }

    fn rig(statuses: &[SubscriptionStatus], policy: SessionConfig) -> Rig {
        let core = StaticKeypair::generate().expect("core key");
        let core_public = *core.public();
        let devices: Vec<_> = statuses
            .iter()
            .map(|_| StaticKeypair::generate().expect("device key"))
            .collect();
        let index = devices
            .iter()
            .zip(statuses)
            .enumerate()
            .map(|(i, (k, s))| IndexEntry {
                id: SubscriptionId(i as i64 + 1),
                public_key: *k.public(),
                status: *s,
            })
            .collect();
        let metrics = Metrics::new().expect("metrics");
        Rig {
            table: SessionTable::new(core, policy, index, metrics.clone()),
            metrics,
            core_public,
            devices,
        }
    }

    fn device(rig: &Rig, i: usize) -> DeviceSession {
        let kp = StaticKeypair::from_private_hex(&rig.devices[i].private_hex_for_storage())
            .expect("copy key");
        DeviceSession::new(kp, rig.core_public)
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

    fn establish(rig: &mut Rig, dev: &mut DeviceSession, ts: u64, route: Route, now: Instant) {
        let init = dev
            .start_handshake(SessionId(ts as u32 + 1), ts, now)
            .expect("init");
        let mut out = Outputs::default();
        rig.table.handle_frame(&init, route, now, &mut out);
        assert_eq!(out.sends.len(), 1, "one response");
        assert_eq!(out.sends[0].0, route);
        let mut pt = Vec::new();
        let ev = dev
            .handle_datagram(&out.sends[0].1, now, &mut pt)
            .expect("response");
        assert!(
            matches!(ev, DeviceEvent::Established { rekey_after } if rekey_after == Duration::from_secs(60))
        );
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

    #[test]
    fn core_session_is_compact() {
        // The per-device memory budget is 1 KiB all included; the session itself is most of it.
        assert!(
            std::mem::size_of::<CoreSession>() <= 512,
            "{}",
            std::mem::size_of::<CoreSession>()
        );
        assert!(std::mem::size_of::<SubscriptionEntry>() <= 48);
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
        assert_eq!(out.sends[0].0, B);
        let mut pt = Vec::new();
        dev.handle_datagram(&out.sends[0].1, now, &mut pt)
            .expect("ack opens");
        assert_eq!(
            Message::decode(&pt).expect("message"),
            Message::Ack {
                seqs: vec![ReadingSeq(5)]
            }
        );
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
        for (_, f) in &out.sends {
            let mut pt = Vec::new();
            dev.handle_datagram(f, now, &mut pt).expect("ack");
            match Message::decode(&pt).expect("message") {
                Message::Ack { seqs } => total += seqs.len(),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(total, 150);
    }

    #[test]
    fn refusals_send_nothing_and_are_counted() {
        let mut rig = rig(
            &[
                SubscriptionStatus::Active,
                SubscriptionStatus::Suspended,
                SubscriptionStatus::Revoked,
            ],
            policy(),
        );
        let now = Instant::now();
        let mut out = Outputs::default();
        for (i, result) in [
            (1, HandshakeResult::Suspended),
            (2, HandshakeResult::Revoked),
        ] {
            let mut dev = device(&rig, i);
            let init = dev.start_handshake(SessionId(9), 1, now).expect("init");
            rig.table.handle_frame(&init, A, now, &mut out);
            assert_eq!(handshakes(&rig.metrics, result), 1);
        }
        let stranger = StaticKeypair::generate().expect("key");
        let mut dev = DeviceSession::new(stranger, rig.core_public);
        let init = dev.start_handshake(SessionId(9), 1, now).expect("init");
        rig.table.handle_frame(&init, A, now, &mut out);
        assert_eq!(handshakes(&rig.metrics, HandshakeResult::UnknownKey), 1);

        // Replay of an accepted initiation, and an older timestamp.
        let mut dev = device(&rig, 0);
        let init = dev.start_handshake(SessionId(9), 10, now).expect("init");
        rig.table.handle_frame(&init, A, now, &mut out);
        assert_eq!(out.sends.len(), 1);
        rig.table.handle_frame(&init, A, now, &mut out);
        let old = dev.start_handshake(SessionId(9), 9, now).expect("init");
        rig.table.handle_frame(&old, A, now, &mut out);
        assert_eq!(handshakes(&rig.metrics, HandshakeResult::Replayed), 2);

        // A corrupted initiation fails authentication.
        let mut bad = dev.start_handshake(SessionId(9), 11, now).expect("init");
        let last = bad.len() - 1;
        bad[last] ^= 1;
        rig.table.handle_frame(&bad, A, now, &mut out);
        assert_eq!(handshakes(&rig.metrics, HandshakeResult::Failed), 1);
        assert_eq!(out.sends.len(), 1, "nothing sent for any refusal");
        assert_eq!(rig.table.session_count(), 1);
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
        let last = tampered.len() - 1;
        tampered[last] ^= 0x80;
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
        dev.seal(
            &Message::Ack {
                seqs: vec![ReadingSeq(1)],
            }
            .to_vec(),
            &mut f,
        )
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
        assert_eq!(
            rig.table
                .set_status(SubscriptionId(1), SubscriptionStatus::Suspended),
            1
        );
        assert_eq!(rig.table.live_sessions(SubscriptionId(1)), 0);
        let mut out = Outputs::default();
        rig.table
            .handle_frame(&reading(&mut dev, 1), A, now, &mut out);
        assert!(out.readings.is_empty());
        assert_eq!(dropped(&rig.metrics, "unknown_session"), 1);
        let init = dev.start_handshake(SessionId(3), 2, now).expect("init");
        rig.table.handle_frame(&init, A, now, &mut out);
        assert_eq!(handshakes(&rig.metrics, HandshakeResult::Suspended), 1);
        // The other device is untouched.
        rig.table
            .handle_frame(&reading(&mut other, 1), A, now, &mut out);
        assert_eq!(out.readings.len(), 1);

        rig.table
            .set_status(SubscriptionId(1), SubscriptionStatus::Active);
        establish(&mut rig, &mut dev, 3, A, now);
        assert_eq!(
            rig.table
                .set_status(SubscriptionId(9), SubscriptionStatus::Revoked),
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
        let init = d1.start_handshake(SessionId(5), 1, now).expect("init");
        let mut out = Outputs::default();
        rig.table.handle_frame(&init, A, now, &mut out);
        assert!(out.sends.is_empty());
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
                let kp =
                    StaticKeypair::from_private_hex(&k.private_hex_for_storage()).expect("key");
                let mut d = DeviceSession::new(kp, core_public);
                d.start_handshake(SessionId(i as u32 + 1), 1, Instant::now())
                    .expect("init")
            })
            .collect();
        let index: Vec<IndexEntry> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| IndexEntry {
                id: SubscriptionId(i as i64 + 1),
                public_key: *k.public(),
                status: SubscriptionStatus::Active,
            })
            .collect();
        drop(keys);
        let metrics = Metrics::new().expect("metrics");
        let before = rss_bytes().expect("rss");
        let mut table = SessionTable::new(core, policy_with(N), index, metrics);
        let mut out = Outputs::default();
        for (i, init) in inits.iter().enumerate() {
            let route = Route::Direct(SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 5000)));
            table.handle_frame(init, route, Instant::now(), &mut out);
            out.sends.clear();
        }
        assert_eq!(table.session_count(), N);
        let after = rss_bytes().expect("rss");
        println!(
            "{N} idle devices: {} bytes of RSS each (session {} B inline)",
            after.saturating_sub(before) / N as u64,
            std::mem::size_of::<CoreSession>()
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
}
