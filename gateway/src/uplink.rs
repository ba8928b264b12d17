//! The uplink: one QUIC connection to the core, kept up by one task.
//!
//! The task looks the core's address up (a host name at every attempt, so a core that came back
//! on a new address is found), connects (mutual TLS, ALPN `relay-uplink/1`) with exponential
//! backoff and full jitter, opens the control stream, sends `Hello` and waits for `HelloAck`.
//! Only then is the uplink up: `/ready` turns 200, and the device-link task is handed a `Link`
//! through which it sends frames and flushes its queue. While up, the task forwards datagrams and
//! control-stream `DeviceFrame`s from the core to the device link, installs the admissions the
//! core sends (with a handshake response in a kind-2 datagram, or in `Admit` messages) before
//! anything that follows them is delivered, hands the session ids of the core's `Revoked` and
//! `NotAdmitted` messages to the device link's sets, tells the device link which held sessions
//! were answered, and writes the control-stream messages the device link queued (oversized
//! frames, `AdmitQuery`). While up, the connection is also published to the device streams
//! ([`crate::streams`]) as an `UplinkUp`, with the address of the core's bulk endpoint when the
//! `HelloAck` named one (`bulk_port`: the core's IP, that port, unless `[uplink] bulk` says where
//! it is reached from here): device streams then go over a
//! QUIC connection of their own to it, else each opens its own bidirectional QUIC stream on this
//! connection. When the connection ends, for whatever reason, the device link is told, and the
//! task reconnects.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, RecvStream, SendDatagramError, SendStream, VarInt};
use rand::Rng;
use relay_ops::admin::Readiness;
use relay_protocol::uplink::DATAGRAM_HEADER;
use relay_protocol::{Admission, DecodeError, FlowId, SessionId, UplinkDatagram, UplinkMessage};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::CoreAddr;
use crate::device_link::DeviceLink;
use crate::metrics::DropReason;
use crate::tap::TapPoint;

/// Time allowed for looking up the core's host name.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the QUIC and TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed between sending `Hello` and receiving `HelloAck`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that stayed up this long resets the reconnect backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Control-stream messages (oversized frames) waiting to be written.
pub const CONTROL_QUEUE: usize = 256;
/// Time allowed, at shutdown, for the close to reach the core.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Application close codes the gateway sends.
pub(crate) mod close_code {
    pub const SHUTDOWN: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
}

/// Why an uplink connection could not be set up, or ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The core's host name could not be looked up (local side or DNS).
    #[error("cannot resolve {core}: {source}")]
    Resolve {
        /// The configured address.
        core: String,
        /// Why.
        source: std::io::Error,
    },
    /// A client endpoint for the core's address family could not be created (local side).
    #[error("cannot create the uplink endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The connection could not be started (local side).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing the control stream failed.
    #[error("control stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading the control stream failed.
    #[error("control stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The core finished the control stream.
    #[error("control stream closed by the core")]
    StreamClosed,
    /// A step took too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The core sent control-stream bytes that do not parse (the core's fault).
    #[error("undecodable control message: {0}")]
    Decode(#[from] DecodeError),
    /// The core sent a message that makes no sense here (the core's fault).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The gateway is shutting down.
    #[error("shutdown")]
    Shutdown,
}

/// What the uplink task tells the device-link task.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The uplink is up (after `HelloAck`): send through this, and flush the queue.
    Up(Link),
    /// The uplink is down: queue.
    Down,
    /// These sessions' admissions are installed: release their held frames.
    Admitted(Vec<SessionId>),
    /// These sessions will not be admitted: drop their held frames for `reason`.
    NotAdmitted {
        /// The sessions.
        sessions: Vec<SessionId>,
        /// `unadmitted` (the core said no) or `admission_table_full`.
        reason: DropReason,
    },
}

/// One message for the control stream.
#[derive(Debug)]
pub(crate) struct ControlMessage {
    /// The encoded message.
    bytes: Bytes,
    /// For a `DeviceFrame`, the device frame's length: counted as forwarded once written.
    frame_len: Option<usize>,
}

/// The uplink as published to the device streams while it is up (after `HelloAck`).
#[derive(Clone, Debug)]
pub(crate) struct UplinkUp {
    /// The uplink connection: device streams fall back to it.
    pub connection: Connection,
    /// The core's bulk endpoint for device streams (`HelloAck { bulk_port }` at the connection's
    /// remote IP); `None`: the core has none (an older core).
    pub bulk: Option<SocketAddr>,
}

/// The device link's handle on an established uplink connection.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    conn: Connection,
    control: mpsc::Sender<ControlMessage>,
}

/// How a frame left through the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// As a QUIC datagram, now.
    Datagram,
    /// Queued for the control stream; counted as forwarded once written.
    Stream,
}

/// Why a frame could not be handed to the uplink.
#[derive(Debug)]
pub(crate) enum LinkSendError {
    /// The connection is gone; the frame is handed back to be queued.
    Lost(Bytes),
    /// The control stream's send queue is full; the frame is dropped.
    Backpressure,
}

impl Link {
    /// Sends one encoded uplink datagram: as a QUIC datagram if it fits the path, otherwise as a
    /// `DeviceFrame` message on the control stream. `wait`: wait for buffer space instead of
    /// letting quinn drop older datagrams or refusing when the stream queue is full (used to flush
    /// the queue, where frames are already old).
    pub async fn send(
        &self,
        flow: FlowId,
        datagram: Bytes,
        wait: bool,
        hooks: &crate::Hooks,
    ) -> Result<Sent, LinkSendError> {
        let fits = self
            .conn
            .max_datagram_size()
            .is_some_and(|max| datagram.len() <= max);
        if fits {
            let sent = if wait {
                self.conn.send_datagram_wait(datagram.clone()).await
            } else {
                self.conn.send_datagram(datagram.clone())
            };
            match sent {
                Ok(()) => {
                    hooks.record(TapPoint::UplinkTx, &datagram);
                    return Ok(Sent::Datagram);
                }
                Err(SendDatagramError::ConnectionLost(_)) => {
                    return Err(LinkSendError::Lost(datagram))
                }
                // The path shrank, or the core turned datagrams off: the stream carries it.
                Err(
                    SendDatagramError::TooLarge
                    | SendDatagramError::UnsupportedByPeer
                    | SendDatagramError::Disabled,
                ) => {}
            }
        }
        let frame = datagram.slice(DATAGRAM_HEADER.min(datagram.len())..);
        let frame_len = Some(frame.len());
        let message = UplinkMessage::DeviceFrame { flow, frame };
        let mut encoded = BytesMut::with_capacity(datagram.len() + 4);
        message.encode(&mut encoded);
        let encoded = ControlMessage {
            bytes: encoded.freeze(),
            frame_len,
        };
        let queued = if wait {
            self.control.send(encoded).await.map_err(|_| ())
        } else {
            match self.control.try_send(encoded) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => return Err(LinkSendError::Backpressure),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
            }
        };
        queued
            .map(|()| Sent::Stream)
            .map_err(|()| LinkSendError::Lost(datagram))
    }

    /// Queues a control message of the gateway's own (not a device frame) without waiting.
    pub fn send_control(&self, message: Bytes) -> Result<(), LinkSendError> {
        let message = ControlMessage {
            bytes: message,
            frame_len: None,
        };
        match self.control.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(LinkSendError::Backpressure),
            Err(mpsc::error::TrySendError::Closed(m)) => Err(LinkSendError::Lost(m.bytes)),
        }
    }
}

/// The reconnect delay: exponential, with full jitter (a uniform draw below the current cap).
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            cap: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let cap_ms = u64::try_from(self.cap.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..=cap_ms));
        self.cap = (self.cap * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.cap = self.initial;
    }
}

/// An established connection whose `Hello` was acknowledged.
struct Session {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    /// Control-stream bytes read past the `HelloAck`.
    buf: BytesMut,
    /// The core's bulk endpoint, if its `HelloAck` named one.
    bulk: Option<SocketAddr>,
}

/// The uplink task and what it needs.
pub(crate) struct Uplink {
    pub name: String,
    pub core: CoreAddr,
    /// `[uplink] bulk`: the core's bulk endpoint as reached from here, instead of the uplink's IP
    /// and `HelloAck`'s port.
    pub bulk: Option<CoreAddr>,
    pub server_name: String,
    pub client_config: quinn::ClientConfig,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub device_link: Arc<DeviceLink>,
    pub readiness: Readiness,
    pub events: mpsc::Sender<LinkEvent>,
    /// The connection (and the core's bulk endpoint) while the uplink is up, for device streams.
    pub connection: watch::Sender<Option<UplinkUp>>,
    pub shutdown: CancellationToken,
}

/// A client endpoint on an ephemeral port of the core's address family: that of an IP literal,
/// IPv4 for a host name until a lookup returns IPv6 addresses only.
pub(crate) fn client_endpoint(core: &CoreAddr) -> std::io::Result<Endpoint> {
    endpoint_for(core.ip().is_some_and(|a| a.is_ipv6()))
}

/// A client endpoint on an ephemeral port of the unspecified address of one family, driven by
/// the runtime current where it is called.
pub(crate) fn endpoint_for(ipv6: bool) -> std::io::Result<Endpoint> {
    let local: SocketAddr = if ipv6 {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    Endpoint::client(local)
}

impl Uplink {
    /// Keeps the uplink up until shutdown.
    pub async fn run(self, mut endpoint: Endpoint) {
        let mut backoff = Backoff::new(self.reconnect_initial, self.reconnect_max);
        let mut connection_id: u64 = 0;
        while !self.shutdown.is_cancelled() {
            connection_id += 1;
            let span = tracing::info_span!("uplink", conn = connection_id, core = %self.core);
            let attempt = tokio::select! {
                () = self.shutdown.cancelled() => break,
                r = self.connect(&mut endpoint).instrument(span.clone()) => r,
            };
            match attempt {
                Ok(session) => {
                    let started = Instant::now();
                    let end = self.serve(session).instrument(span.clone()).await;
                    if matches!(end, UplinkError::Shutdown) {
                        break;
                    }
                    if started.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "uplink connect failed");
                }
            }
            let delay = backoff.next_delay();
            tracing::debug!(parent: &span, delay_ms = delay.as_millis() as u64, "reconnecting after");
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        endpoint.close(
            VarInt::from_u32(close_code::SHUTDOWN),
            b"gateway shutting down",
        );
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }

    /// Address lookup, QUIC handshake, control stream, `Hello`, `HelloAck`.
    async fn connect(&self, endpoint: &mut Endpoint) -> Result<Session, UplinkError> {
        let remote = self.target(endpoint).await?;
        tracing::debug!(%remote, "connecting");
        let connecting =
            endpoint.connect_with(self.client_config.clone(), remote, &self.server_name)?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| UplinkError::Timeout("QUIC handshake"))??;
        match self.hello(&conn).await {
            Ok((send, recv, buf, bulk_port)) => {
                let bulk = match bulk_port {
                    Some(port) => Some(self.bulk_target(&conn, port).await),
                    None => None,
                };
                Ok(Session {
                    conn,
                    send,
                    recv,
                    buf,
                    bulk,
                })
            }
            Err(e) => {
                conn.close(close_code_for(&e), b"hello failed");
                Err(e)
            }
        }
    }

    /// The core's bulk endpoint: `[uplink] bulk` looked up, or the uplink's IP and `HelloAck`'s
    /// port (also when the lookup fails, which is logged).
    async fn bulk_target(&self, conn: &Connection, port: NonZeroU16) -> SocketAddr {
        let announced = SocketAddr::new(conn.remote_address().ip(), port.get());
        let Some(bulk) = &self.bulk else {
            return announced;
        };
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, bulk.resolve()).await;
        let ipv6 = announced.is_ipv6();
        match found {
            Ok(Ok(found)) => {
                if let Some(a) = found.iter().find(|a| a.is_ipv6() == ipv6).or(found.first()) {
                    return *a;
                }
                tracing::warn!(%bulk, %announced, "[uplink] bulk has no address: using the core's announced bulk endpoint");
            }
            Ok(Err(e)) => {
                tracing::warn!(%bulk, %announced, error = %e, "looking up [uplink] bulk failed: using the core's announced bulk endpoint");
            }
            Err(_) => {
                tracing::warn!(%bulk, %announced, "looking up [uplink] bulk timed out: using the core's announced bulk endpoint");
            }
        }
        announced
    }

    /// Looks the core up now and picks an address of the endpoint's family if there is one;
    /// otherwise the endpoint is replaced by one of the other family.
    async fn target(&self, endpoint: &mut Endpoint) -> Result<SocketAddr, UplinkError> {
        let resolve_err = |source| UplinkError::Resolve {
            core: self.core.to_string(),
            source,
        };
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, self.core.resolve())
            .await
            .map_err(|_| UplinkError::Timeout("looking up the core's address"))?
            .map_err(resolve_err)?;
        let ipv6 = endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
        if let Some(same) = found.iter().find(|a| a.is_ipv6() == ipv6) {
            return Ok(*same);
        }
        let other = *found.first().ok_or_else(|| {
            resolve_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        })?;
        let fresh = endpoint_for(other.is_ipv6()).map_err(UplinkError::Endpoint)?;
        std::mem::replace(endpoint, fresh).close(
            VarInt::from_u32(close_code::SHUTDOWN),
            b"address family changed",
        );
        Ok(other)
    }

    /// `Hello`, then `HelloAck`: the control stream, the bytes read past the `HelloAck`, and the
    /// port of the core's bulk endpoint if it has one.
    async fn hello(
        &self,
        conn: &Connection,
    ) -> Result<(SendStream, RecvStream, BytesMut, Option<NonZeroU16>), UplinkError> {
        let hooks = &self.device_link.hooks;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut hello = BytesMut::new();
        UplinkMessage::Hello {
            name: self.name.clone(),
        }
        .encode(&mut hello);
        send.write_all(&hello).await?;
        hooks.record(TapPoint::UplinkTx, &hello);
        let mut buf = BytesMut::with_capacity(4096);
        let ack = tokio::time::timeout(HELLO_TIMEOUT, read_message(&mut recv, &mut buf, hooks))
            .await
            .map_err(|_| UplinkError::Timeout("HelloAck"))??;
        match ack {
            UplinkMessage::HelloAck {
                max_flows,
                bulk_port,
            } => {
                let limit = usize::try_from(max_flows).unwrap_or(usize::MAX);
                self.device_link.flows.set_peer_limit(limit);
                tracing::debug!(max_flows, bulk_port = ?bulk_port, "core acknowledged hello");
                Ok((send, recv, buf, bulk_port))
            }
            _ => Err(UplinkError::Protocol("expected HelloAck")),
        }
    }

    /// Runs an established connection until it ends; returns why.
    async fn serve(&self, session: Session) -> UplinkError {
        let Session {
            conn,
            mut send,
            mut recv,
            mut buf,
            bulk,
        } = session;
        let metrics = &self.device_link.metrics;
        let (control_tx, mut control_rx) = mpsc::channel::<ControlMessage>(CONTROL_QUEUE);
        metrics.uplink_connects.inc();
        metrics.uplink_connected.set(1);
        self.readiness.set(true);
        tracing::info!(remote = %conn.remote_address(), bulk = ?bulk, "uplink connected");
        let link = Link {
            conn: conn.clone(),
            control: control_tx,
        };
        // The device link gone means shutdown is under way; the select below notices.
        let _ = self.events.send(LinkEvent::Up(link)).await;
        self.connection.send_replace(Some(UplinkUp {
            connection: conn.clone(),
            bulk,
        }));

        let end = tokio::select! {
            e = self.downlink_datagrams(&conn) => e,
            e = self.control_reader(&mut recv, &mut buf) => e,
            e = self.control_writer(&mut send, &mut control_rx) => e,
            () = self.shutdown.cancelled() => UplinkError::Shutdown,
        };

        self.readiness.set(false);
        metrics.uplink_connected.set(0);
        self.connection.send_replace(None);
        let _ = self.events.send(LinkEvent::Down).await;
        control_rx.close();
        while let Ok(message) = control_rx.try_recv() {
            if message.frame_len.is_some() {
                metrics.drop_frame(DropReason::UplinkLost);
            }
        }
        conn.close(close_code_for(&end), end.to_string().as_bytes());
        match &end {
            UplinkError::Shutdown => tracing::info!("uplink closed for shutdown"),
            e => tracing::warn!(reason = %e, "uplink disconnected"),
        }
        end
    }

    async fn downlink_datagrams(&self, conn: &Connection) -> UplinkError {
        let link = &self.device_link;
        loop {
            let datagram = match conn.read_datagram().await {
                Ok(d) => d,
                Err(e) => return e.into(),
            };
            link.hooks.record(TapPoint::UplinkRx, &datagram);
            match UplinkDatagram::decode(&datagram) {
                Ok(d) => {
                    // The session is known before the device can answer the response.
                    if let Some(admission) = d.admission {
                        self.admitted(&[admission]).await;
                    }
                    link.deliver(d.flow, d.frame).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "undecodable datagram from the core");
                    link.metrics.drop_frame(DropReason::UplinkDecode);
                }
            }
        }
    }

    async fn control_reader(&self, recv: &mut RecvStream, buf: &mut BytesMut) -> UplinkError {
        let link = &self.device_link;
        loop {
            match read_message(recv, buf, &link.hooks).await {
                Ok(UplinkMessage::DeviceFrame { flow, frame }) => link.deliver(flow, &frame).await,
                Ok(UplinkMessage::Revoked { sessions }) => {
                    tracing::debug!(sessions = sessions.len(), "core revoked sessions");
                    link.revoke(&sessions, Instant::now());
                }
                Ok(UplinkMessage::Admit { admissions }) => {
                    tracing::debug!(sessions = admissions.len(), "core admitted sessions");
                    self.admitted(&admissions).await;
                }
                Ok(UplinkMessage::NotAdmitted { sessions }) => {
                    tracing::debug!(sessions = sessions.len(), "core did not admit sessions");
                    link.not_admitted.insert(&sessions, Instant::now());
                    self.tell(LinkEvent::NotAdmitted {
                        sessions,
                        reason: DropReason::Unadmitted,
                    })
                    .await;
                }
                Ok(_) => return UplinkError::Protocol("unexpected control message"),
                Err(e) => {
                    if matches!(e, UplinkError::Decode(_)) {
                        link.metrics.drop_frame(DropReason::UplinkDecode);
                    }
                    return e;
                }
            }
        }
    }

    /// Installs `admissions`, then tells the device link which of them it may hold frames for.
    async fn admitted(&self, admissions: &[Admission]) {
        let link = &self.device_link;
        let (installed, refused) = link.admit(admissions, Instant::now());
        // Nothing held (the common case: a handshake response): nobody to tell. A frame held
        // after this check finds the admission when its query is answered or overdue.
        if link.held_frames.load(Ordering::Relaxed) == 0 {
            return;
        }
        if !installed.is_empty() {
            self.tell(LinkEvent::Admitted(installed)).await;
        }
        if !refused.is_empty() {
            self.tell(LinkEvent::NotAdmitted {
                sessions: refused,
                reason: DropReason::AdmissionTableFull,
            })
            .await;
        }
    }

    async fn tell(&self, event: LinkEvent) {
        // The device link gone means shutdown is under way.
        let _ = self.events.send(event).await;
    }

    async fn control_writer(
        &self,
        send: &mut SendStream,
        queue: &mut mpsc::Receiver<ControlMessage>,
    ) -> UplinkError {
        while let Some(message) = queue.recv().await {
            if let Err(e) = send.write_all(&message.bytes).await {
                return e.into();
            }
            self.device_link
                .hooks
                .record(TapPoint::UplinkTx, &message.bytes);
            if let Some(len) = message.frame_len {
                self.device_link
                    .metrics
                    .forwarded(crate::metrics::Direction::Uplink, len);
            }
        }
        // Every sender is gone only when the device link stopped, at shutdown.
        std::future::pending().await
    }
}

fn close_code_for(e: &UplinkError) -> VarInt {
    match e {
        UplinkError::Decode(_) | UplinkError::Protocol(_) => {
            VarInt::from_u32(close_code::PROTOCOL_ERROR)
        }
        _ => VarInt::from_u32(close_code::SHUTDOWN),
    }
}

/// Reads one control message, keeping any bytes past it in `buf`.
async fn read_message(
    recv: &mut RecvStream,
    buf: &mut BytesMut,
    hooks: &crate::Hooks,
) -> Result<UplinkMessage, UplinkError> {
    loop {
        if let Some(message) = UplinkMessage::decode(buf)? {
            return Ok(message);
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => {
                hooks.record(TapPoint::UplinkRx, &chunk.bytes);
                buf.extend_from_slice(&chunk.bytes);
            }
            None => return Err(UplinkError::StreamClosed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut caps = Vec::new();
        for _ in 0..8 {
            let cap = b.cap;
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} > {cap:?}");
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.cap, Duration::from_millis(100));
    }
}
