//! Device streams (`docs/protocol.md` §13): a camera's video over TCP, relayed to the core over one
//! bidirectional QUIC stream per device stream, on the bulk connection (a QUIC connection of its
//! own to the core's bulk endpoint) or, when the core has none, on the uplink connection.
//!
//! ```text
//!  ┌──────────────── bulk lane: a runtime of its own, threads at [streams] cpu_priority ────────┐
//!  │ device ─TCP─▶ accept (max_streams, else closed: limit)                                     │
//!  │                │ first frame: length ≤ MAX_DATAGRAM, Transport / AdmittedTransport,        │
//!  │                │   admission tag checked (no AdmitQuery for streams)                       │
//!  │                ├─ uplink down: closed (uplink_down)                                        │
//!  │                ├─ HelloAck named a bulk port: the bulk connection (made once, on the lane, │
//!  │                │   same TLS identity; again when closed or the address changed)            │
//!  │                │   connect failed (or none named): the uplink connection instead           │
//!  │                ├─ open_bi on it                                                            │
//!  │                │   0x01 0x20 | first frame ──────────────────────────────────────────────┼─▶ core
//!  │                ├─ up:   read one frame (length checked) ─▶ write it into the QUIC stream   │
//!  │                └─ down: read one frame from the QUIC stream ─▶ write it to the device      │
//!  └────────────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Everything a video costs the gateway (the TCP copy, the bulk connection's encryption, UDP I/O
//! and its quinn driver) runs on the bulk lane ([`relay_ops::lane::BulkLane`]): the bulk endpoint
//! is created in the lane's context, so quinn drives it there. With `cpu_priority = "idle"` the
//! kernel runs those threads only while the datagram path (the meters) leaves a core free. A
//! stream that falls back to the uplink connection still copies on the lane, but its packets are
//! encrypted by the uplink's driver on the main runtime.
//!
//! The bulk connection is made when a stream needs it: one connect at a time (an async mutex),
//! bounded by `stall_timeout_secs`. When it fails, the stream (and those that follow, for a while
//! that doubles from [`BULK_RETRY_INITIAL`] to [`BULK_RETRY_MAX`] while failures go on) goes over
//! the uplink connection; a new uplink connection or bulk address tries again at once. One warning
//! is logged per run of failures.
//!
//! Both directions copy whole frames, length prefixes included, checking every length
//! (`1..=MAX_STREAM_FRAME`, else `too_large`) before the body is read. A direction reads its next
//! frame only once the previous one was written (for the uplink: accepted by quinn's flow
//! control), so the gateway holds at most one frame per direction and stream, and a slow core
//! slows the device down through TCP. The chunks are sealed end to end: the gateway sees the
//! first frame's header and admission tag, and lengths.
//!
//! A stream ends when both sides finished (`closed`); when neither side delivered a whole frame
//! for `stall_timeout_secs` (`stalled`); or at the first error. The device finishing its side
//! finishes the QUIC stream's send side, and the core's bytes keep flowing back until the core
//! finishes too, so its last acknowledgement reaches the device; the core stopping its reading
//! side (it ended or refused the upload) ends the device-to-core direction at once, and the core
//! finishing its side finishes the device's. A reset from the core or the loss of the uplink
//! closes the TCP connection (`uplink_lost`). When the device side fails (it went
//! away, or sent a length over the limit) the QUIC stream is finished after the last whole frame,
//! so the core keeps every chunk that reached the gateway (the upload resumes after them); any
//! other failure (a stall, the core's fault) resets it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt, WriteError};
use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::stream::{LENGTH_PREFIX, MAX_STREAM_FRAME, UPLINK_STREAM_HEADER};
use relay_protocol::DeviceFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Check;
use crate::config::StreamsConfig;
use crate::device_link::DeviceLink;
use crate::metrics::{Direction, Metrics, StreamEnd};
use crate::tap::TapPoint;
use crate::uplink::{close_code, UplinkError, UplinkUp, CLOSE_GRACE};

/// The QUIC send priority of device streams: below the control stream's (0), so that control
/// messages never queue behind video. (Datagrams go before stream data anyway.)
pub const STREAM_PRIORITY: i32 = -1;

/// The application error code with which the gateway resets a device stream's QUIC stream (and
/// stops reading it) when the stream ends other than cleanly.
pub const STREAM_ABORTED: u32 = 1;

/// How long device streams go over the uplink connection after a failed connect to the core's
/// bulk endpoint before one tries again, after the first failure.
pub const BULK_RETRY_INITIAL: Duration = Duration::from_secs(5);
/// The longest such wait: it doubles at each further failure up to this.
pub const BULK_RETRY_MAX: Duration = Duration::from_secs(300);

/// Accepts device streams and relays each over a QUIC stream of the bulk connection, or of the
/// current uplink connection.
#[derive(Debug)]
pub(crate) struct StreamRelay {
    config: StreamsConfig,
    device_link: Arc<DeviceLink>,
    /// The uplink while it is up (after `HelloAck`), with the core's bulk endpoint.
    uplink: watch::Receiver<Option<UplinkUp>>,
    /// The connection to the core's bulk endpoint.
    bulk: BulkUplink,
    /// Streams being relayed now.
    open: AtomicUsize,
}

/// The QUIC connection for device streams to the core's bulk endpoint, kept by the relay: its
/// endpoint is created on the bulk lane, so that quinn drives it (and its connection) there.
#[derive(Debug)]
pub(crate) struct BulkUplink {
    /// The uplink's client configuration (the gateway's certificate) with the bulk transport
    /// parameters.
    client_config: quinn::ClientConfig,
    /// The name the core's certificate must carry.
    server_name: String,
    /// The lane's runtime.
    lane: Handle,
    metrics: Metrics,
    /// One connect at a time.
    state: Mutex<BulkState>,
}

#[derive(Debug, Default)]
struct BulkState {
    /// The client endpoint (its UDP socket), of the bulk address's family.
    endpoint: Option<Endpoint>,
    /// The bulk connection and the address it goes to.
    live: Option<(SocketAddr, Connection)>,
    /// The last failed connect, while failures go on.
    failed: Option<BulkFailure>,
    /// A warning was logged for the current run of failures.
    warned: bool,
    /// Shut down: no further endpoint.
    closed: bool,
}

/// A failed connect to the bulk endpoint: streams use the uplink connection until `retry_at`,
/// unless the address or the uplink connection changes.
#[derive(Debug)]
struct BulkFailure {
    addr: SocketAddr,
    /// The uplink connection the failure happened under (held, so that its id is not reused).
    uplink: Connection,
    retry_at: Instant,
    backoff: Duration,
}

impl BulkUplink {
    /// A bulk uplink (not connected yet) whose endpoint will be driven by `lane`. `client_config`
    /// is the uplink's; its transport parameters are replaced by the bulk ones.
    pub fn new(
        mut client_config: quinn::ClientConfig,
        server_name: String,
        lane: Handle,
        metrics: Metrics,
    ) -> Self {
        client_config.transport_config(Arc::new(crate::tls::bulk_transport_config()));
        Self {
            client_config,
            server_name,
            lane,
            metrics,
            state: Mutex::new(BulkState::default()),
        }
    }

    /// The live bulk connection to `addr`, connected now if there is none, it closed, or it goes
    /// elsewhere; `None` when connecting failed (now, or recently under the same `uplink`
    /// connection): the stream goes over the uplink connection then.
    async fn connection(
        &self,
        addr: SocketAddr,
        uplink: &Connection,
        timeout: Duration,
    ) -> Option<Connection> {
        let mut state = self.state.lock().await;
        if let Some((live_addr, conn)) = &state.live {
            if *live_addr == addr && conn.close_reason().is_none() {
                return Some(conn.clone());
            }
        }
        if let Some((old, conn)) = state.live.take() {
            if old != addr {
                tracing::debug!(%old, new = %addr, "bulk endpoint moved");
                conn.close(
                    VarInt::from_u32(close_code::SHUTDOWN),
                    b"bulk endpoint moved",
                );
            }
        }
        if state.closed {
            return None;
        }
        let same_failure = state
            .failed
            .as_ref()
            .filter(|f| f.addr == addr && f.uplink.stable_id() == uplink.stable_id());
        if same_failure.is_some_and(|f| Instant::now() < f.retry_at) {
            return None;
        }
        let backoff =
            same_failure.map_or(BULK_RETRY_INITIAL, |f| (f.backoff * 2).min(BULK_RETRY_MAX));
        match self.connect(&mut state, addr, timeout).await {
            Ok(conn) => {
                tracing::info!(%addr, "bulk uplink connected");
                state.failed = None;
                state.warned = false;
                self.metrics.bulk_uplink_connects.inc();
                self.metrics.bulk_uplink_connected.inc();
                let (watched, gauge) = (conn.clone(), self.metrics.bulk_uplink_connected.clone());
                self.lane.spawn(async move {
                    let reason = watched.closed().await;
                    gauge.dec();
                    tracing::debug!(%reason, "bulk uplink closed");
                });
                state.live = Some((addr, conn.clone()));
                Some(conn)
            }
            Err(e) => {
                if state.warned {
                    tracing::debug!(%addr, error = %e, "bulk uplink connect failed again");
                } else {
                    tracing::warn!(
                        %addr,
                        error = %e,
                        retry_after = ?backoff,
                        "bulk uplink connect failed: device streams go over the uplink connection"
                    );
                    state.warned = true;
                }
                state.failed = Some(BulkFailure {
                    addr,
                    uplink: uplink.clone(),
                    retry_at: Instant::now() + backoff,
                    backoff,
                });
                None
            }
        }
    }

    /// Connects to `addr` from the endpoint of its family (created on the lane if needed).
    async fn connect(
        &self,
        state: &mut BulkState,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Connection, UplinkError> {
        if state.closed {
            return Err(UplinkError::Shutdown);
        }
        let ipv6 = addr.is_ipv6();
        let endpoint = match &state.endpoint {
            Some(e) if e.local_addr().is_ok_and(|a| a.is_ipv6() == ipv6) => e.clone(),
            _ => {
                let fresh = {
                    // quinn spawns the endpoint's driver on the runtime current at this call.
                    let _lane = self.lane.enter();
                    crate::uplink::endpoint_for(ipv6).map_err(UplinkError::Endpoint)?
                };
                if let Some(old) = state.endpoint.replace(fresh.clone()) {
                    old.close(
                        VarInt::from_u32(close_code::SHUTDOWN),
                        b"address family changed",
                    );
                }
                fresh
            }
        };
        let connecting = {
            // quinn spawns the connection's driver here, on the runtime current at this call.
            let _lane = self.lane.enter();
            endpoint.connect_with(self.client_config.clone(), addr, &self.server_name)?
        };
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| UplinkError::Timeout("bulk QUIC handshake"))??;
        Ok(conn)
    }

    /// Closes the bulk endpoint (and its connection) and waits, briefly, for the close to reach the
    /// core.
    async fn close(&self) {
        let endpoint = {
            let mut state = self.state.lock().await;
            state.closed = true;
            state.live = None;
            state.endpoint.take()
        };
        if let Some(endpoint) = endpoint {
            endpoint.close(
                VarInt::from_u32(close_code::SHUTDOWN),
                b"gateway shutting down",
            );
            let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        }
    }
}

/// A stream's place in the limit: given back when the stream's task ends, however it ends.
struct Slot<'a>(&'a StreamRelay);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let left = self
            .0
            .open
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.0
            .device_link
            .metrics
            .streams_open
            .set(i64::try_from(left).unwrap_or(i64::MAX));
    }
}

/// Bytes relayed on one stream, for its end's log line.
#[derive(Debug, Default)]
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
}

/// When either direction last delivered a whole frame, in milliseconds since the stream started.
#[derive(Debug)]
struct Progress {
    start: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
enum ReadError {
    /// The sender finished cleanly, between frames.
    Eof,
    /// The sender finished inside a frame.
    Truncated,
    /// A length of 0 or over the limit.
    TooLarge(usize),
    /// The transport failed (a TCP reset, a QUIC reset or the connection's loss).
    Io(std::io::Error),
}

/// Reads one length-prefixed frame of at most `max` bytes (without its prefix) and returns it
/// with its prefix. The length is checked before any of the body is read.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<BytesMut, ReadError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut got = 0;
    while got < LENGTH_PREFIX {
        let n = r.read(&mut prefix[got..]).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Err(if got == 0 {
                ReadError::Eof
            } else {
                ReadError::Truncated
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > max {
        return Err(ReadError::TooLarge(len));
    }
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX + len);
    buf.extend_from_slice(&prefix);
    buf.resize(LENGTH_PREFIX + len, 0);
    r.read_exact(&mut buf[LENGTH_PREFIX..])
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ReadError::Truncated,
            _ => ReadError::Io(e),
        })?;
    Ok(buf)
}

/// A direction failed: how the stream ends, and whether the device's side is at fault (the QUIC
/// stream is then finished rather than reset, so that the core keeps the whole frames it got).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    end: StreamEnd,
    by_device: bool,
}

impl Failure {
    fn device(end: StreamEnd) -> Self {
        Self {
            end,
            by_device: true,
        }
    }

    fn core(end: StreamEnd) -> Self {
        Self {
            end,
            by_device: false,
        }
    }
}

/// How a stream's copying ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Both sides finished.
    Clean,
    /// One direction failed.
    Failed(Failure),
}

/// How the device-to-core direction ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpDone {
    /// The device finished its side; so did the gateway on the QUIC stream.
    Finished,
    /// The core stopped reading (it ended the upload): nothing more goes up.
    Stopped,
}

impl StreamRelay {
    /// A relay of device streams over `bulk` or the uplink published on `uplink`.
    pub fn new(
        config: StreamsConfig,
        device_link: Arc<DeviceLink>,
        uplink: watch::Receiver<Option<UplinkUp>>,
        bulk: BulkUplink,
    ) -> Self {
        Self {
            config,
            device_link,
            uplink,
            bulk,
            open: AtomicUsize::new(0),
        }
    }

    /// Accepts device streams until shutdown; each is relayed by a task of `tasks`. Then closes
    /// the bulk connection.
    pub async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let metrics = &self.device_link.metrics;
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: do not spin.
                    tracing::warn!(error = %e, "stream accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            metrics.streams_total.inc();
            let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
            if open > self.config.max_streams {
                self.open.fetch_sub(1, Ordering::Relaxed);
                metrics.stream_ended(StreamEnd::Limit);
                tracing::debug!(
                    %peer,
                    limit = self.config.max_streams,
                    reason = "limit",
                    "device stream refused"
                );
                drop(tcp);
                continue;
            }
            metrics
                .streams_open
                .set(i64::try_from(open).unwrap_or(i64::MAX));
            tasks.spawn(self.clone().relay(tcp, peer, shutdown.clone()));
        }
        self.bulk.close().await;
    }

    /// Relays one device stream until it ends; counts and logs the end.
    async fn relay(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
        let _slot = Slot(&self);
        let started = Instant::now();
        let counts = Counts::default();
        let end = tokio::select! {
            // Dropping the stream finishes the QUIC stream: the core sees the upload cut short
            // between two frames and keeps what it stored.
            () = shutdown.cancelled() => StreamEnd::Closed,
            end = self.run(tcp, &counts) => end,
        };
        self.device_link.metrics.stream_ended(end);
        tracing::debug!(
            %peer,
            reason = end.label(),
            up_bytes = counts.up.load(Ordering::Relaxed),
            down_bytes = counts.down.load(Ordering::Relaxed),
            ms = started.elapsed().as_millis() as u64,
            "device stream ended"
        );
    }

    async fn run(&self, tcp: TcpStream, counts: &Counts) -> StreamEnd {
        let link = &self.device_link;
        let stall = self.config.stall_timeout;
        // Acknowledgements are small and the device waits for them.
        let _ = tcp.set_nodelay(true);
        let (mut rd, wr) = tcp.into_split();

        let first = match tokio::time::timeout(stall, read_frame(&mut rd, MAX_DATAGRAM)).await {
            Err(_) => return StreamEnd::Stalled,
            Ok(Err(ReadError::TooLarge(_))) => return StreamEnd::TooLarge,
            Ok(Err(ReadError::Truncated)) => return StreamEnd::Malformed,
            Ok(Err(ReadError::Eof | ReadError::Io(_))) => return StreamEnd::Closed,
            Ok(Ok(first)) => first,
        };
        link.hooks.record(TapPoint::StreamRx, &first);
        if let Err(end) = self.admit(&first[LENGTH_PREFIX..], Instant::now()) {
            return end;
        }

        let (mut send, mut recv) = match self.open_stream(stall).await {
            Ok(streams) => streams,
            Err(end) => return end,
        };
        let _ = send.set_priority(STREAM_PRIORITY);
        let mut head = BytesMut::with_capacity(UPLINK_STREAM_HEADER.len() + first.len());
        head.extend_from_slice(&UPLINK_STREAM_HEADER);
        head.extend_from_slice(&first);

        let outcome = self
            .copy(&mut rd, wr, &mut send, &mut recv, head.freeze(), counts)
            .await;
        match outcome {
            Outcome::Clean => StreamEnd::Closed,
            Outcome::Failed(Failure { end, by_device }) => {
                // Finishing a stream already finished (the device's EOF came first) fails
                // harmlessly.
                if by_device {
                    let _ = send.finish();
                } else {
                    let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
                }
                let _ = recv.stop(VarInt::from_u32(STREAM_ABORTED));
                end
            }
        }
    }

    /// Opens the device stream's QUIC stream: on the bulk connection when the core named a bulk
    /// endpoint and it can be reached, else on the uplink connection.
    async fn open_stream(&self, stall: Duration) -> Result<(SendStream, RecvStream), StreamEnd> {
        let Some(up) = self.uplink.borrow().clone() else {
            return Err(StreamEnd::UplinkDown);
        };
        if let Some(addr) = up.bulk {
            if let Some(bulk) = self.bulk.connection(addr, &up.connection, stall).await {
                // Waits while the core's stream limit is reached.
                match tokio::time::timeout(stall, bulk.open_bi()).await {
                    Err(_) => return Err(StreamEnd::Stalled),
                    Ok(Ok(streams)) => return Ok(streams),
                    // Lost since: the next stream connects again; this one takes the uplink.
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "no QUIC stream on the bulk connection");
                    }
                }
            }
        }
        match tokio::time::timeout(stall, up.connection.open_bi()).await {
            Err(_) => Err(StreamEnd::Stalled),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no QUIC stream for a device stream");
                Err(StreamEnd::UplinkDown)
            }
            Ok(Ok(streams)) => Ok(streams),
        }
    }

    /// The admission check of a stream's first frame (without its length prefix).
    fn admit(&self, frame: &[u8], now: Instant) -> Result<(), StreamEnd> {
        let link = &self.device_link;
        let require = link.admission_config.require;
        let refused = |id| link.revoked.contains(id, now) || link.not_admitted.contains(id, now);
        match DeviceFrame::decode(frame) {
            Ok(DeviceFrame::AdmittedTransport { receiver, .. }) => {
                if refused(receiver) {
                    return Err(StreamEnd::Unadmitted);
                }
                match link.admissions.verify(receiver, frame, now) {
                    Check::Pass => Ok(()),
                    Check::BadTag => Err(StreamEnd::AdmissionMac),
                    // Unknown or expired: the core authenticates the frame in any case.
                    _ if require => Err(StreamEnd::Unadmitted),
                    _ => Ok(()),
                }
            }
            Ok(DeviceFrame::Transport { receiver, .. }) => {
                if require || refused(receiver) {
                    Err(StreamEnd::Unadmitted)
                } else {
                    Ok(())
                }
            }
            Ok(_) | Err(_) => Err(StreamEnd::Malformed),
        }
    }

    /// Copies both directions until both finished or one failed; `head` (the uplink stream's
    /// header and the first frame) goes up first.
    async fn copy<R, W>(
        &self,
        rd: &mut R,
        wr: W,
        send: &mut SendStream,
        recv: &mut RecvStream,
        head: Bytes,
        counts: &Counts,
    ) -> Outcome
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let stall = self.config.stall_timeout;
        let progress = Progress::new();
        let up = self.copy_up(rd, send, head, &progress, counts);
        let down = self.copy_down(recv, wr, &progress, counts);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let deadline = progress.last() + stall;
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(_) => up_done = true,
                    Err(failure) => return Outcome::Failed(failure),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(failure) => return Outcome::Failed(failure),
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    if progress.last().elapsed() >= stall {
                        return Outcome::Failed(Failure::core(StreamEnd::Stalled));
                    }
                }
            }
            if up_done && down_done {
                return Outcome::Clean;
            }
        }
    }

    /// Device to core: writes `head`, then each frame the device sends, one at a time.
    async fn copy_up<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        send: &mut SendStream,
        head: Bytes,
        progress: &Progress,
        counts: &Counts,
    ) -> Result<UpDone, Failure> {
        let link = &self.device_link;
        let mut chunk = head;
        let mut framed = chunk.len().saturating_sub(UPLINK_STREAM_HEADER.len());
        // The core stopping the stream (it ended the upload, or refused it) ends this direction
        // at once, without waiting for the device's next frame.
        let stopped = send.stopped();
        tokio::pin!(stopped);
        loop {
            link.hooks.record(TapPoint::UplinkTx, &chunk);
            match send.write_chunk(chunk).await {
                Ok(()) => {}
                Err(WriteError::Stopped(_)) => return Ok(UpDone::Stopped),
                Err(_) => return Err(Failure::core(StreamEnd::UplinkLost)),
            }
            link.metrics.stream_bytes(Direction::Uplink, framed);
            counts.up.fetch_add(framed as u64, Ordering::Relaxed);
            // One frame per turn: while the device's socket and quinn both have room, nothing here
            // would make the task wait, and the datagram path shares the runtime's threads.
            tokio::task::yield_now().await;
            let read = tokio::select! {
                r = read_frame(rd, MAX_STREAM_FRAME) => r,
                s = &mut stopped => return match s {
                    Ok(_) => Ok(UpDone::Stopped),
                    Err(_) => Err(Failure::core(StreamEnd::UplinkLost)),
                },
            };
            match read {
                Ok(frame) => {
                    progress.touch();
                    link.hooks.record(TapPoint::StreamRx, &frame);
                    framed = frame.len();
                    chunk = frame.freeze();
                }
                // The device is done: so is the QUIC stream, once what was written is delivered.
                Err(ReadError::Eof) => {
                    // Fails only on a stream already finished or reset, which this one is not.
                    let _ = send.finish();
                    return Ok(UpDone::Finished);
                }
                Err(ReadError::TooLarge(len)) => {
                    tracing::debug!(len, "device stream frame over the limit");
                    return Err(Failure::device(StreamEnd::TooLarge));
                }
                // The device went away inside a frame, or reset the connection.
                Err(ReadError::Truncated) => return Err(Failure::device(StreamEnd::Closed)),
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "device stream read failed");
                    return Err(Failure::device(StreamEnd::Closed));
                }
            }
        }
    }

    /// Core to device: each frame the core sends, one at a time; the core finishing finishes the
    /// TCP connection's send side.
    async fn copy_down<W: AsyncWrite + Unpin>(
        &self,
        recv: &mut RecvStream,
        mut wr: W,
        progress: &Progress,
        counts: &Counts,
    ) -> Result<(), Failure> {
        let link = &self.device_link;
        loop {
            match read_frame(recv, MAX_STREAM_FRAME).await {
                Ok(frame) => {
                    progress.touch();
                    link.hooks.record(TapPoint::UplinkRx, &frame);
                    if wr.write_all(&frame).await.is_err() {
                        return Err(Failure::device(StreamEnd::Closed));
                    }
                    link.hooks.record(TapPoint::StreamTx, &frame);
                    link.metrics.stream_bytes(Direction::Downlink, frame.len());
                    counts.down.fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                Err(ReadError::Eof) => {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                Err(ReadError::TooLarge(len)) => {
                    tracing::debug!(len, "core stream frame over the limit");
                    return Err(Failure::core(StreamEnd::TooLarge));
                }
                Err(ReadError::Truncated) => return Err(Failure::core(StreamEnd::UplinkLost)),
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "uplink stream read failed");
                    return Err(Failure::core(StreamEnd::UplinkLost));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8], max: usize) -> Vec<Result<Vec<u8>, String>> {
        let mut r = bytes;
        let mut out = Vec::new();
        loop {
            match read_frame(&mut r, max).await {
                Ok(f) => out.push(Ok(f.to_vec())),
                Err(ReadError::Eof) => break,
                Err(e) => {
                    out.push(Err(format!("{e:?}")));
                    break;
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn frames_are_read_whole_with_their_prefix() {
        let mut wire = vec![0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 1, 9];
        let frames = read_all(&wire, 10).await;
        assert_eq!(
            frames,
            [Ok(vec![0, 0, 0, 3, 1, 2, 3]), Ok(vec![0, 0, 0, 1, 9])]
        );
        // Cut inside the body, inside the prefix.
        wire.truncate(10);
        assert_eq!(read_all(&wire, 10).await[1], Err("Truncated".into()));
        wire.truncate(9);
        assert_eq!(read_all(&wire, 10).await[1], Err("Truncated".into()));
    }

    #[tokio::test]
    async fn lengths_are_checked_before_the_body() {
        // No body follows: the length alone is refused.
        assert_eq!(
            read_all(&[0, 0, 0, 0], 10).await,
            [Err("TooLarge(0)".into())]
        );
        assert_eq!(
            read_all(&[0, 0, 0, 11], 10).await,
            [Err("TooLarge(11)".into())]
        );
        let max = u32::try_from(MAX_STREAM_FRAME).expect("fits");
        assert_eq!(
            read_all(&(max + 1).to_be_bytes(), MAX_STREAM_FRAME).await,
            [Err(format!("TooLarge({})", MAX_STREAM_FRAME + 1))]
        );
        assert_eq!(
            read_all(&u32::MAX.to_be_bytes(), MAX_STREAM_FRAME).await,
            [Err(format!("TooLarge({})", u32::MAX))]
        );
    }

    #[test]
    fn progress_moves_forward_only() {
        let p = Progress::new();
        let before = p.last();
        std::thread::sleep(Duration::from_millis(5));
        p.touch();
        assert!(p.last() > before);
    }
}
