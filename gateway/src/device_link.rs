//! The device link: the UDP socket devices talk to, one frame per datagram, both directions.
//!
//! One task receives: it checks each datagram's frame header (version, type, length), and for an
//! `AdmittedTransport` frame the session's admission (tag, quota, expiry: [`AdmissionTable`]);
//! then it maps the source address to a flow and sends the frame up as an uplink datagram, or
//! holds it in the bounded queue while the uplink is down. Frames that fail are dropped before
//! they cost a flow, an allocation or uplink capacity, counted by reason. A frame of a session the
//! gateway does not know yet is held ([`PendingAdmissions`]) while the core is asked
//! (`AdmitQuery`); the uplink task hands the answers over as [`LinkEvent`]s. The uplink task calls
//! [`DeviceLink::deliver`] for frames from the core, installs admissions, and fills the revoked
//! and not-admitted sets.
//!
//! The receive task waits for the socket to be readable, then drains it with non-blocking
//! receives, up to [`RECV_BATCH`] datagrams before it looks at its other inputs again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::uplink::MAX_ADMIT_QUERY;
use relay_protocol::{
    Admission, DeviceFrame, FlowId, FrameType, SessionId, UplinkDatagram, UplinkMessage,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admission::{AdmissionTable, Check};
use crate::config::{AdmissionConfig, FlowsConfig, HandshakeLimits, RevocationConfig};
use crate::flows::FlowTable;
use crate::handshake_limit::{HandshakeLimiter, Verdict};
use crate::metrics::{Direction, DropReason, Metrics};
use crate::pending::{HeldFrame, Hold, PendingAdmissions};
use crate::queue::{Pending, PendingQueue};
use crate::revoked::RevokedSessions;
use crate::tap::{Hooks, TapPoint};
use crate::uplink::{Link, LinkEvent, LinkSendError, Sent};

/// Uplink datagrams are encoded into chunks of this arena, so a frame costs no allocation of its
/// own (a chunk is reused once every datagram cut from it has been sent).
const ENCODE_ARENA: usize = 64 * 1024;

/// Datagrams received in one go before the task looks at its events, timers and shutdown.
pub const RECV_BATCH: usize = 64;

/// The device socket and the state both directions share.
#[derive(Debug)]
pub(crate) struct DeviceLink {
    pub socket: UdpSocket,
    pub flows: FlowTable,
    pub metrics: Metrics,
    pub hooks: Hooks,
    /// Sessions the core revoked: their frames stop here.
    pub revoked: RevokedSessions,
    /// Per-source limits on handshake initiations.
    pub handshakes: HandshakeLimiter,
    /// Sessions the core admitted through this gateway.
    pub admissions: AdmissionTable,
    /// Sessions the core answered `NotAdmitted` for: their frames stop here without a query.
    pub not_admitted: RevokedSessions,
    /// `[admission]`.
    pub admission_config: AdmissionConfig,
    /// Frames held by the receive task for admission answers, so that the uplink task only
    /// reports admissions when something waits for them.
    pub held_frames: AtomicUsize,
}

/// The device socket's receive side: `recvmmsg` of up to 32 datagrams per call, each buffer large
/// enough for a GRO batch of segments (quinn-udp), so a burst costs one system call per 32 (or,
/// with GRO, per 32 × 64) datagrams. Without quinn-udp's socket state (an old kernel, another OS)
/// it falls back to one `recv_from` per datagram.
struct Receiver {
    state: Option<quinn_udp::UdpSocketState>,
    bufs: Vec<Vec<u8>>,
    meta: Vec<quinn_udp::RecvMeta>,
}

impl Receiver {
    fn new(socket: &UdpSocket) -> Self {
        // One byte more than the largest frame, so that an oversized datagram is seen as such
        // (the kernel truncates it to the buffer and reports the truncated length).
        let one = MAX_DATAGRAM + 1;
        match quinn_udp::UdpSocketState::new(socket.into()) {
            Ok(state) => {
                let batch = quinn_udp::BATCH_SIZE.max(1);
                let per_buf = one * state.gro_segments().max(1);
                Self {
                    state: Some(state),
                    bufs: (0..batch).map(|_| vec![0u8; per_buf]).collect(),
                    meta: vec![quinn_udp::RecvMeta::default(); batch],
                }
            }
            Err(e) => {
                tracing::info!(error = %e, "batched receive unavailable; one datagram per call");
                Self {
                    state: None,
                    bufs: vec![vec![0u8; one]],
                    meta: vec![quinn_udp::RecvMeta::default()],
                }
            }
        }
    }

    /// Receives what is ready without waiting; returns how many buffers were filled.
    fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        match &self.state {
            Some(state) => {
                let mut iovs: Vec<std::io::IoSliceMut<'_>> = self
                    .bufs
                    .iter_mut()
                    .map(|b| std::io::IoSliceMut::new(b))
                    .collect();
                socket.try_io(tokio::io::Interest::READABLE, || {
                    state.recv(socket.into(), &mut iovs, &mut self.meta)
                })
            }
            None => {
                let (n, from) = socket.try_recv_from(&mut self.bufs[0])?;
                self.meta[0] = quinn_udp::RecvMeta {
                    addr: from,
                    len: n,
                    stride: n,
                    ..quinn_udp::RecvMeta::default()
                };
                Ok(1)
            }
        }
    }

    /// The datagrams in buffer `i` after [`Receiver::recv`]: one, or a GRO batch of segments of
    /// `stride` bytes each.
    fn datagrams(&self, i: usize) -> impl Iterator<Item = (&[u8], SocketAddr)> + '_ {
        let (meta, buf) = match (self.meta.get(i), self.bufs.get(i)) {
            (Some(m), Some(b)) => (*m, b.as_slice()),
            _ => (quinn_udp::RecvMeta::default(), &[][..]),
        };
        let data = buf.get(..meta.len.min(buf.len())).unwrap_or(&[]);
        // An empty datagram has stride 0: still one (empty) datagram.
        let stride = meta.stride.max(1);
        let count = if data.is_empty() {
            1
        } else {
            data.len().div_ceil(stride)
        };
        (0..count).map(move |k| {
            let start = (k * stride).min(data.len());
            let end = (start + stride).min(data.len());
            (&data[start..end], meta.addr)
        })
    }
}

/// The receive task's own state: the uplink (if up), the queue, frames waiting for admission.
struct Forwarder {
    link: Option<Link>,
    queue: PendingQueue,
    arena: BytesMut,
    pending: PendingAdmissions,
    queries: QueryBudget,
}

impl Forwarder {
    fn new(queue_frames: usize, admission: &AdmissionConfig, now: Instant) -> Self {
        Self {
            link: None,
            queue: PendingQueue::new(queue_frames),
            arena: BytesMut::new(),
            pending: PendingAdmissions::new(admission.pending_frames, admission.pending_timeout),
            queries: QueryBudget::new(admission.queries_per_sec, now),
        }
    }
}

/// A token bucket for `AdmitQuery` session ids: `rate` per second, bursts of one second's worth.
#[derive(Debug)]
struct QueryBudget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl QueryBudget {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The drop reason for an admission check that did not pass.
fn check_drop(check: Check) -> Option<DropReason> {
    match check {
        Check::Pass => None,
        Check::BadTag => Some(DropReason::AdmissionMac),
        Check::OverQuota => Some(DropReason::Quota),
        Check::Expired => Some(DropReason::Expired),
        Check::Unknown => Some(DropReason::Unadmitted),
    }
}

impl DeviceLink {
    /// The shared state of a device link on `socket`.
    pub fn new(
        socket: UdpSocket,
        flows: FlowsConfig,
        revocation: RevocationConfig,
        handshakes: HandshakeLimits,
        admission: AdmissionConfig,
        metrics: Metrics,
        hooks: Hooks,
    ) -> Self {
        let now = Instant::now();
        Self {
            socket,
            flows: FlowTable::new(flows.max, flows.idle_timeout, now),
            metrics,
            hooks,
            revoked: RevokedSessions::new(revocation.ttl, revocation.max_sessions),
            handshakes: HandshakeLimiter::new(handshakes),
            admissions: AdmissionTable::new(admission.max_sessions, now),
            not_admitted: RevokedSessions::new(
                admission.not_admitted_ttl,
                admission.not_admitted_max,
            ),
            admission_config: admission,
            held_frames: AtomicUsize::new(0),
        }
    }

    /// Receives device datagrams until shutdown.
    pub async fn receive(
        self: Arc<Self>,
        mut events: mpsc::Receiver<LinkEvent>,
        queue_frames: usize,
        shutdown: CancellationToken,
    ) {
        let mut fwd = Forwarder::new(queue_frames, &self.admission_config, Instant::now());
        let mut rx = Receiver::new(&self.socket);
        // Fires when the oldest query's answer is overdue; armed only while one waits.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.on_event(event, &mut fwd).await,
                () = &mut timer, if timer_at.is_some() => {
                    timer_at = None;
                    self.on_overdue(&mut fwd).await;
                }
                ready = self.socket.readable() => {
                    if let Err(e) = ready {
                        tracing::warn!(error = %e, "device socket failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    for _ in 0..RECV_BATCH {
                        match rx.recv(&self.socket) {
                            Ok(n) => {
                                // One clock read per batch: frames of one batch arrived together.
                                let now = Instant::now();
                                let mut count = 0u64;
                                for i in 0..n {
                                    for (data, from) in rx.datagrams(i) {
                                        count += 1;
                                        self.on_datagram(data, from, now, &mut fwd).await;
                                    }
                                }
                                self.metrics.device_frames_received.inc_by(count);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                // Unconnected UDP sockets rarely fail; do not spin if one keeps
                                // failing.
                                tracing::warn!(error = %e, "device socket receive failed");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                break;
                            }
                        }
                    }
                }
            }
            self.after_work(&mut fwd);
            let next = fwd.pending.next_deadline();
            if next != timer_at {
                if let Some(at) = next {
                    timer.as_mut().reset(at.into());
                }
                timer_at = next;
            }
        }
    }

    /// What a device datagram leads to: dropped (counted), held, or forwarded.
    async fn on_datagram(&self, data: &[u8], from: SocketAddr, now: Instant, fwd: &mut Forwarder) {
        self.hooks.record(TapPoint::DeviceRx, data);
        let drop = match DeviceFrame::decode(data) {
            Ok(DeviceFrame::AdmittedTransport { receiver, .. }) => {
                // The hot path: a lookup, a SipHash, a compare; nothing allocated or awaited
                // before a forged frame is dropped.
                match self.admissions.check(receiver, data, now) {
                    Check::Pass => {
                        self.metrics.admitted_frames.inc();
                        None
                    }
                    Check::Unknown => {
                        self.on_unknown_session(receiver, data, from, now, fwd);
                        return;
                    }
                    Check::Expired => {
                        self.metrics.admissions.set(gauge(self.admissions.len()));
                        Some(DropReason::Expired)
                    }
                    other => check_drop(other),
                }
            }
            Ok(DeviceFrame::Transport { receiver, .. }) => {
                if self.admission_config.require {
                    Some(DropReason::Unadmitted)
                } else if self.revoked.contains(receiver, now) {
                    Some(DropReason::Revoked)
                } else {
                    None
                }
            }
            Ok(DeviceFrame::HandshakeInit { .. } | DeviceFrame::CookieInit { .. }) => {
                if self.handshakes.check(from, now) == Verdict::Drop {
                    tracing::trace!(%from, "handshake over the source's rate");
                    Some(DropReason::HandshakeRate)
                } else {
                    None
                }
            }
            // Only the core answers handshakes and sends cookies.
            Ok(DeviceFrame::HandshakeResponse { .. } | DeviceFrame::CookieReply { .. }) => {
                Some(DropReason::UnexpectedType)
            }
            Err(e) => {
                tracing::trace!(%from, error = %e, "dropped device datagram");
                Some(DropReason::from_decode(&e))
            }
        };
        match drop {
            Some(reason) => self.metrics.drop_frame(reason),
            None => self.forward(data, from, fwd).await,
        }
    }

    /// An `AdmittedTransport` frame of a session not in the admission table: dropped if the core
    /// revoked it or said no, else held while the core is asked (or until the uplink is up).
    fn on_unknown_session(
        &self,
        id: SessionId,
        data: &[u8],
        from: SocketAddr,
        now: Instant,
        fwd: &mut Forwarder,
    ) {
        if self.revoked.contains(id, now) {
            self.metrics.drop_frame(DropReason::Revoked);
            return;
        }
        if self.not_admitted.contains(id, now) {
            self.metrics.drop_frame(DropReason::Unadmitted);
            return;
        }
        let up = fwd.link.is_some();
        let queries = &mut fwd.queries;
        // While the uplink is down, sessions are held unqueried (the holder's bounds apply) and
        // all asked about when it comes up.
        match fwd
            .pending
            .hold(id, from, data, || !up || queries.take(now))
        {
            Hold::Added => {}
            Hold::New => {
                if up {
                    fwd.pending.queried(id, now);
                }
            }
            Hold::Refused => self.metrics.drop_frame(DropReason::Unadmitted),
        }
    }

    /// Maps the frame's source to a flow and sends it up, or queues it while the uplink is down.
    async fn forward(&self, data: &[u8], from: SocketAddr, fwd: &mut Forwarder) {
        let flow = match self.flows.flow_for(from, Instant::now()) {
            Ok(assigned) => {
                self.metrics.flows.set(gauge(assigned.flows));
                assigned.flow
            }
            Err(e) => {
                tracing::debug!(%from, error = %e, "dropped device datagram");
                self.metrics.drop_frame(DropReason::FlowTableFull);
                return;
            }
        };
        let datagram = encode(&mut fwd.arena, flow, data);
        let pending = Pending { flow, datagram };
        match &fwd.link {
            Some(link) => match link.send(flow, pending.datagram, false, &self.hooks).await {
                Ok(Sent::Datagram) => self.metrics.forwarded(Direction::Uplink, data.len()),
                Ok(Sent::Stream) => {}
                Err(LinkSendError::Backpressure) => self.metrics.drop_frame(DropReason::QueueFull),
                Err(LinkSendError::Lost(datagram)) => {
                    fwd.link = None;
                    self.enqueue(fwd, Pending { flow, datagram });
                }
            },
            None => self.enqueue(fwd, pending),
        }
    }

    async fn on_event(&self, event: LinkEvent, fwd: &mut Forwarder) {
        match event {
            LinkEvent::Up(link) => {
                fwd.link = Some(link);
                self.flush(fwd).await;
                // Held sessions are asked about now (again, if the answer was due from a
                // connection that is gone).
                fwd.pending.requery_all(Instant::now());
            }
            LinkEvent::Down => {
                fwd.link = None;
                fwd.pending.unquery_all();
            }
            LinkEvent::Admitted(sessions) => {
                for id in sessions {
                    self.release(id, fwd).await;
                }
            }
            LinkEvent::NotAdmitted { sessions, reason } => {
                for id in sessions {
                    for _ in fwd.pending.release(id) {
                        self.metrics.drop_frame(reason);
                    }
                }
            }
        }
    }

    /// Checks the frames held for `id` against its admission now, and forwards or drops them.
    async fn release(&self, id: SessionId, fwd: &mut Forwarder) {
        let held = fwd.pending.release(id);
        if !held.is_empty() {
            self.check_held(id, held, Instant::now(), fwd).await;
        }
    }

    /// Checks held frames of `id` like frames just received, and forwards or drops them.
    async fn check_held(
        &self,
        id: SessionId,
        held: Vec<HeldFrame>,
        now: Instant,
        fwd: &mut Forwarder,
    ) {
        for HeldFrame { from, frame } in held {
            match check_drop(self.admissions.check(id, &frame, now)) {
                None => {
                    self.metrics.admitted_frames.inc();
                    self.forward(&frame, from, fwd).await;
                }
                Some(reason) => self.metrics.drop_frame(reason),
            }
        }
    }

    /// Held sessions whose answer is overdue: released if they were admitted meanwhile (with a
    /// handshake response, which needs no answer), else dropped.
    async fn on_overdue(&self, fwd: &mut Forwarder) {
        let now = Instant::now();
        for (id, frames) in fwd.pending.expire(now) {
            if self.admissions.contains(id, now) {
                self.check_held(id, frames, now, fwd).await;
            } else {
                tracing::trace!(session = %id, "no admission answer in time");
                for _ in frames {
                    self.metrics.drop_frame(DropReason::Unadmitted);
                }
            }
        }
    }

    /// After each turn of the receive loop: updates the gauges, sends the queries collected.
    fn after_work(&self, fwd: &mut Forwarder) {
        // Before the queries go out, so that the uplink task sees it when their answers come.
        let held = fwd.pending.len();
        self.metrics.admission_pending_frames.set(gauge(held));
        self.held_frames.store(held, Ordering::Relaxed);
        if fwd.pending.has_queries() {
            if let Some(link) = &fwd.link {
                let sessions = fwd.pending.take_queries();
                for chunk in sessions.chunks(MAX_ADMIT_QUERY) {
                    let mut encoded = BytesMut::with_capacity(6 + 4 * chunk.len());
                    UplinkMessage::AdmitQuery {
                        sessions: chunk.to_vec(),
                    }
                    .encode(&mut encoded);
                    match link.send_control(encoded.freeze()) {
                        Ok(()) => self.metrics.admission_queries.inc_by(chunk.len() as u64),
                        // The held frames time out (or are asked about again when the uplink is
                        // back up).
                        Err(e) => {
                            tracing::debug!(sessions = chunk.len(), error = ?e, "admission query not sent");
                        }
                    }
                }
            }
        }
    }

    fn enqueue(&self, fwd: &mut Forwarder, pending: Pending) {
        if fwd.queue.push(pending).is_err() {
            self.metrics.drop_frame(DropReason::QueueFull);
        }
        self.metrics.queue_frames.set(gauge(fwd.queue.len()));
    }

    /// Sends what was queued while the uplink was down, oldest first, waiting for buffer space
    /// rather than letting the burst push its own oldest frames out.
    async fn flush(&self, fwd: &mut Forwarder) {
        let queued = fwd.queue.len();
        while let Some(link) = &fwd.link {
            let Some(pending) = fwd.queue.pop() else {
                break;
            };
            let len = pending
                .datagram
                .len()
                .saturating_sub(relay_protocol::uplink::DATAGRAM_HEADER);
            match link
                .send(pending.flow, pending.datagram, true, &self.hooks)
                .await
            {
                Ok(Sent::Datagram) => self.metrics.forwarded(Direction::Uplink, len),
                Ok(Sent::Stream) => {}
                Err(LinkSendError::Backpressure) => self.metrics.drop_frame(DropReason::QueueFull),
                Err(LinkSendError::Lost(datagram)) => {
                    fwd.queue.unpop(Pending {
                        flow: pending.flow,
                        datagram,
                    });
                    fwd.link = None;
                }
            }
        }
        self.metrics.queue_frames.set(gauge(fwd.queue.len()));
        if queued > 0 {
            tracing::info!(
                sent = queued - fwd.queue.len(),
                left = fwd.queue.len(),
                "flushed queued device frames"
            );
        }
    }

    /// Installs admissions from the core (uplink task). Returns the sessions installed and those
    /// refused because the table is full.
    pub fn admit(
        &self,
        admissions: &[Admission],
        now: Instant,
    ) -> (Vec<SessionId>, Vec<SessionId>) {
        let mut installed = Vec::with_capacity(admissions.len());
        let mut refused = Vec::new();
        for a in admissions {
            match self.admissions.install(a, now) {
                Ok(()) => {
                    self.not_admitted.remove(a.session);
                    installed.push(a.session);
                }
                Err(e) => {
                    tracing::warn!(session = %a.session, error = %e, "admission not installed");
                    refused.push(a.session);
                }
            }
        }
        self.metrics.admissions.set(gauge(self.admissions.len()));
        (installed, refused)
    }

    /// Drops `sessions` from the admission table and remembers them as revoked (uplink task).
    pub fn revoke(&self, sessions: &[SessionId], now: Instant) {
        self.revoked.insert(sessions, now);
        self.admissions.remove(sessions);
        self.metrics.admissions.set(gauge(self.admissions.len()));
    }

    /// Sends a frame from the core to the device of `flow`.
    pub async fn deliver(&self, flow: FlowId, frame: &[u8]) {
        // The core is trusted more than the field network, but the gateway still relays only
        // well-formed frames going the right way.
        match DeviceFrame::decode(frame).map(|f| f.frame_type()) {
            Ok(FrameType::HandshakeInit | FrameType::AdmittedTransport | FrameType::CookieInit) => {
                self.metrics.drop_frame(DropReason::UnexpectedType);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%flow, error = %e, "undecodable device frame from the core");
                self.metrics.drop_frame(DropReason::UplinkDecode);
                return;
            }
        }
        let Some(addr) = self.flows.addr_of(flow) else {
            self.metrics.drop_frame(DropReason::UnknownFlow);
            return;
        };
        match self.socket.send_to(frame, addr).await {
            Ok(_) => {
                self.hooks.record(TapPoint::DeviceTx, frame);
                self.metrics.forwarded(Direction::Downlink, frame.len());
            }
            Err(e) => {
                tracing::debug!(%flow, error = %e, "send to device failed");
                self.metrics.drop_frame(DropReason::DeviceSend);
            }
        }
    }

    /// Forgets idle flows, expired admissions and old revoked or not-admitted ids every `every`
    /// until shutdown.
    pub async fn expire_idle_flows(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.revoked.expire(now);
                    self.not_admitted.expire(now);
                    let (removed, left) = self.flows.expire_idle(now);
                    self.metrics.flows.set(gauge(left));
                    if removed > 0 {
                        tracing::debug!(removed, left, "expired idle flows");
                    }
                    let (removed, left) = self.admissions.sweep(now);
                    self.metrics.admissions.set(gauge(left));
                    if removed > 0 {
                        tracing::debug!(removed, left, "expired admissions");
                    }
                }
            }
        }
    }
}

/// Encodes `UplinkDatagram { flow, frame }` into the arena and cuts it off as its own `Bytes`.
fn encode(arena: &mut BytesMut, flow: FlowId, frame: &[u8]) -> Bytes {
    let datagram = UplinkDatagram::new(flow, frame);
    let len = datagram.encoded_len();
    if arena.capacity() < len {
        arena.reserve(ENCODE_ARENA.max(len));
    }
    datagram.encode(arena);
    debug_assert_eq!(arena.len(), len);
    arena.split().freeze()
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::{AdmissionKey, Quota};

    fn admission_config() -> AdmissionConfig {
        AdmissionConfig {
            require: true,
            max_sessions: 100,
            pending_frames: 8,
            pending_timeout: Duration::from_millis(50),
            queries_per_sec: 10,
            not_admitted_ttl: Duration::from_secs(60),
            not_admitted_max: 100,
        }
    }

    async fn link(admission: AdmissionConfig) -> DeviceLink {
        // As `Listeners::bind` does.
        let socket = relay_ops::udp::bind(
            "127.0.0.1:0".parse().expect("addr"),
            relay_ops::udp::DEFAULT_BUFFER_BYTES,
        )
        .and_then(UdpSocket::from_std)
        .expect("bind");
        DeviceLink::new(
            socket,
            FlowsConfig {
                max: 100,
                idle_timeout: Duration::from_secs(60),
            },
            RevocationConfig {
                ttl: Duration::from_secs(60),
                max_sessions: 100,
            },
            HandshakeLimits {
                per_source_per_sec: 1,
                per_source_burst: 2,
                max_sources: 100,
            },
            admission,
            Metrics::new().expect("metrics"),
            Hooks::default(),
        )
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 7], port))
    }

    fn admission(id: u32, quota: Quota) -> Admission {
        Admission {
            session: SessionId(id),
            key: AdmissionKey([id as u8; 16]),
            lifetime_secs: 600,
            quota,
        }
    }

    fn tagged(key: &AdmissionKey, id: u32, counter: u64) -> Vec<u8> {
        let mut f = vec![1, 4];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&counter.to_be_bytes());
        f.extend_from_slice(&[0x5a; 24]);
        let tag = key.tag(&f);
        f.extend_from_slice(&tag);
        f
    }

    fn transport(id: u32) -> Vec<u8> {
        DeviceFrame::Transport {
            receiver: SessionId(id),
            counter: 1,
            ciphertext: &[0x5a; 24],
        }
        .to_vec()
    }

    fn forwarder(l: &DeviceLink) -> Forwarder {
        Forwarder::new(16, &l.admission_config, Instant::now())
    }

    #[tokio::test]
    async fn plain_transport_frames_need_admission_when_required() {
        let l = link(admission_config()).await;
        let mut fwd = forwarder(&l);
        l.on_datagram(&transport(3), addr(1), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 1);
        assert_eq!((fwd.queue.len(), l.flows.len()), (0, 0));

        let l = link(AdmissionConfig {
            require: false,
            ..admission_config()
        })
        .await;
        let mut fwd = forwarder(&l);
        l.on_datagram(&transport(3), addr(1), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 0);
        assert_eq!(fwd.queue.len(), 1);
    }

    #[tokio::test]
    async fn tagged_frames_pass_and_junk_stops_before_it_costs_a_flow() {
        let l = link(admission_config()).await;
        let mut fwd = forwarder(&l);
        let quota = Quota {
            frames: 2,
            bytes: 0,
            interval_secs: 60,
        };
        let a = admission(9, quota);
        // Installed as from a kind-2 datagram.
        assert_eq!(
            l.admit(&[a], Instant::now()),
            (vec![SessionId(9)], Vec::new())
        );
        assert_eq!(l.metrics.admissions.get(), 1);
        l.on_datagram(&tagged(&a.key, 9, 1), addr(1), Instant::now(), &mut fwd)
            .await;
        assert_eq!(fwd.queue.len(), 1);
        assert_eq!(l.metrics.admitted_frames.get(), 1);
        // Forged, from elsewhere: dropped, and no flow for its source.
        let forged = tagged(&AdmissionKey([0; 16]), 9, 2);
        l.on_datagram(&forged, addr(2), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::AdmissionMac), 1);
        assert_eq!(l.flows.len(), 1);
        // The quota: one more frame, then no more this window.
        l.on_datagram(&tagged(&a.key, 9, 3), addr(1), Instant::now(), &mut fwd)
            .await;
        l.on_datagram(&tagged(&a.key, 9, 4), addr(1), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::Quota), 1);
        assert_eq!(fwd.queue.len(), 2);
        // Expired.
        let short = Admission {
            lifetime_secs: 0,
            ..admission(10, Quota::default())
        };
        l.admit(&[short], Instant::now());
        l.on_datagram(
            &tagged(&short.key, 10, 1),
            addr(1),
            Instant::now(),
            &mut fwd,
        )
        .await;
        assert_eq!(l.metrics.dropped(DropReason::Expired), 1);
        assert_eq!(l.metrics.admissions.get(), 1);
        // Revoked: the admission goes with it.
        l.revoke(&[SessionId(9)], Instant::now());
        assert_eq!(l.metrics.admissions.get(), 0);
        l.on_datagram(&tagged(&a.key, 9, 5), addr(1), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::Revoked), 1);
        assert_eq!(fwd.pending.len(), 0);
    }

    #[tokio::test]
    async fn unknown_sessions_are_held_then_released_or_dropped() {
        let l = link(admission_config()).await;
        let mut fwd = forwarder(&l);
        let a = admission(21, Quota::default());
        let b = admission(22, Quota::default());
        // Uplink down: held, nothing to ask yet.
        l.on_datagram(&tagged(&a.key, 21, 1), addr(1), Instant::now(), &mut fwd)
            .await;
        l.on_datagram(&tagged(&a.key, 21, 2), addr(1), Instant::now(), &mut fwd)
            .await;
        l.on_datagram(
            &tagged(&AdmissionKey([0; 16]), 21, 3),
            addr(3),
            Instant::now(),
            &mut fwd,
        )
        .await;
        l.on_datagram(&tagged(&b.key, 22, 1), addr(2), Instant::now(), &mut fwd)
            .await;
        l.after_work(&mut fwd);
        assert_eq!(fwd.pending.len(), 4);
        assert_eq!(l.held_frames.load(Ordering::Relaxed), 4);
        assert_eq!(l.metrics.admission_pending_frames.get(), 4);
        assert!(!fwd.pending.has_queries());
        assert_eq!((fwd.queue.len(), l.flows.len()), (0, 0));

        // Admitted: the good frames go on, the forged one is dropped.
        let (installed, _) = l.admit(&[a], Instant::now());
        l.on_event(LinkEvent::Admitted(installed), &mut fwd).await;
        assert_eq!(fwd.queue.len(), 2);
        assert_eq!(l.metrics.admitted_frames.get(), 2);
        assert_eq!(l.metrics.dropped(DropReason::AdmissionMac), 1);
        assert_eq!(l.flows.len(), 1);

        // Not admitted: dropped, and the next frame without holding.
        l.not_admitted.insert(&[SessionId(22)], Instant::now());
        l.on_event(
            LinkEvent::NotAdmitted {
                sessions: vec![SessionId(22)],
                reason: DropReason::Unadmitted,
            },
            &mut fwd,
        )
        .await;
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 1);
        l.on_datagram(&tagged(&b.key, 22, 2), addr(2), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 2);
        assert_eq!(fwd.pending.len(), 0);
        // Admitting it later takes it out of the negative set.
        l.admit(&[b], Instant::now());
        l.on_datagram(&tagged(&b.key, 22, 3), addr(2), Instant::now(), &mut fwd)
            .await;
        assert_eq!(fwd.queue.len(), 3);
    }

    #[tokio::test]
    async fn overdue_sessions_are_dropped_unless_admitted_meanwhile() {
        let l = link(admission_config()).await;
        let mut fwd = forwarder(&l);
        let a = admission(31, Quota::default());
        let b = admission(32, Quota::default());
        l.on_datagram(&tagged(&a.key, 31, 1), addr(1), Instant::now(), &mut fwd)
            .await;
        l.on_datagram(&tagged(&b.key, 32, 1), addr(2), Instant::now(), &mut fwd)
            .await;
        fwd.pending.requery_all(Instant::now());
        assert_eq!(fwd.pending.take_queries().len(), 2);
        // Session 32's handshake response brought its admission; nobody was told.
        l.admit(&[b], Instant::now());
        tokio::time::sleep(Duration::from_millis(60)).await;
        l.on_overdue(&mut fwd).await;
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 1);
        assert_eq!(fwd.queue.len(), 1);
        assert_eq!(fwd.pending.len(), 0);
    }

    #[tokio::test]
    async fn pending_is_bounded_per_session_and_in_all() {
        let l = link(admission_config()).await;
        let mut fwd = forwarder(&l);
        for counter in 0..6 {
            l.on_datagram(
                &tagged(&AdmissionKey([1; 16]), 41, counter),
                addr(1),
                Instant::now(),
                &mut fwd,
            )
            .await;
        }
        assert_eq!(fwd.pending.len(), crate::pending::PER_SESSION);
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 2);
        for id in 42..52 {
            l.on_datagram(
                &tagged(&AdmissionKey([1; 16]), id, 0),
                addr(1),
                Instant::now(),
                &mut fwd,
            )
            .await;
        }
        assert_eq!(fwd.pending.len(), 8);
        assert_eq!(l.metrics.dropped(DropReason::Unadmitted), 8);
    }

    /// Not a correctness test: the processing cost of one forged frame of an admitted session,
    /// socket aside (`cargo test --release -p gateway --lib -- --ignored forged_frame_cost
    /// --nocapture`; 100 to 200 ns on the development VM, against microseconds for the receive
    /// system call).
    #[tokio::test]
    #[ignore]
    async fn forged_frame_cost() {
        let l = link(AdmissionConfig {
            max_sessions: 10_000,
            ..admission_config()
        })
        .await;
        let admissions: Vec<Admission> = (0..1000u32)
            .map(|i| admission(1000 + i, Quota::default()))
            .collect();
        l.admit(&admissions, Instant::now());
        let frames: Vec<Vec<u8>> = (0..1000u32)
            .map(|id| {
                tagged(
                    &AdmissionKey(*b"forged-forged-16"),
                    1000 + id,
                    u64::from(id),
                )
            })
            .collect();
        let mut fwd = forwarder(&l);
        let n = 2_000_000;
        let started = Instant::now();
        for i in 0..n {
            l.on_datagram(&frames[i % 1000], addr(1), Instant::now(), &mut fwd)
                .await;
        }
        let per = started.elapsed().as_nanos() as f64 / n as f64;
        println!("{per:.0} ns per forged frame");
        assert_eq!(l.metrics.dropped(DropReason::AdmissionMac), n as u64);
    }

    #[test]
    fn the_query_budget_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = QueryBudget::new(4, t0);
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 4);
        assert!(b.take(t0 + Duration::from_millis(250)));
        assert!(!b.take(t0 + Duration::from_millis(250)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 4);
    }

    #[tokio::test]
    async fn cookie_inits_share_the_handshake_bucket_and_cookie_replies_stop() {
        let l = link(admission_config()).await;
        let mut fwd = forwarder(&l);
        let init = DeviceFrame::HandshakeInit {
            sender: SessionId(5),
            noise: &[7; 96],
        }
        .to_vec();
        let mut cookie_init = vec![1, 6, 0, 0, 0, 5];
        cookie_init.extend_from_slice(&[7; 96 + 16]);
        // Burst 2: one of each passes, the third is over the source's rate.
        l.on_datagram(&init, addr(1), Instant::now(), &mut fwd)
            .await;
        l.on_datagram(&cookie_init, addr(1), Instant::now(), &mut fwd)
            .await;
        l.on_datagram(&cookie_init, addr(1), Instant::now(), &mut fwd)
            .await;
        assert_eq!(fwd.queue.len(), 2);
        assert_eq!(l.metrics.dropped(DropReason::HandshakeRate), 1);
        let mut cookie_reply = vec![1, 5, 0, 0, 0, 5];
        cookie_reply.extend_from_slice(&[0; 56]);
        l.on_datagram(&cookie_reply, addr(2), Instant::now(), &mut fwd)
            .await;
        assert_eq!(l.metrics.dropped(DropReason::UnexpectedType), 1);
        assert_eq!(fwd.queue.len(), 2);
    }

    #[test]
    fn encodes_datagrams_back_to_back_in_one_arena() {
        let mut arena = BytesMut::new();
        let a = encode(&mut arena, FlowId(1), &[1, 3, 9]);
        let b = encode(&mut arena, FlowId(2), &[1, 1, 8]);
        assert_eq!(&a[..], &[1, 1, 0, 0, 0, 1, 1, 3, 9]);
        let d = UplinkDatagram::decode(&b).expect("valid");
        assert_eq!((d.flow, d.frame), (FlowId(2), &[1u8, 1, 8][..]));
    }
}
