//! The uplink acceptors: gateways connect over QUIC with mutual TLS, say `Hello` on a control
//! stream they open, and then carry device frames in QUIC datagrams (or, for a frame too large for
//! a datagram, as `DeviceFrame` messages on the control stream). Device streams (a camera's video)
//! go over a second connection of the gateway's, to the bulk endpoint, whose port `HelloAck`
//! names: that endpoint, its connections' drivers and every stream task run on the bulk lane (own
//! threads at a lower CPU priority, `[video] cpu_priority`), so a video's packet work, decryption
//! and disk writes do not delay the readings' (`docs/protocol.md` §13).
//!
//! ```text
//!  main endpoint ([listen] quic), the core's runtime:
//!  gateway ──QUIC handshake (client cert ⟶ gateway CA)──▶ accept (≤ max_gateways)
//!          ──control stream: Hello{name}──────────────▶ HelloAck{max_flows, bulk_port}, GatewayUp ─▶ engine
//!          ──datagram: flow | device frame──────────────▶ EngineInput::Frame (Route::Gateway)
//!          ◀─datagram / control DeviceFrame──────────────  engine (by route)
//!          ◀─datagram kind 2: flow | admission | frame───  engine (accepted handshake response)
//!          ◀─control Admit{admissions} (+ DeviceFrame)───  engine (response too large for a datagram)
//!          ◀─control Revoked{sessions}───────────────────  engine (sessions dropped by status)
//!          ──control AdmitQuery{sessions}───────────────▶ EngineInput::AdmitQuery ─▶ engine
//!          ◀─control Admit / NotAdmitted─────────────────  engine (the answer)
//!          ══further bidi stream: 0x01 0x20 | device stream frames══▶ streams.rs (older gateways
//!          ◀═acks════════════════════════════════════════   without a bulk connection; task on the lane)
//!  connection closed ─────────────────────────────────▶ GatewayDown ─▶ engine
//!
//!  bulk endpoint ([listen] bulk, port in HelloAck), the bulk lane's threads:
//!  gateway ──QUIC handshake (same TLS: client cert ⟶ gateway CA, no datagrams)──▶ serve_bulk
//!          (≤ max_gateways bulk connections; no control stream, no Hello; name from the certificate)
//!          ══bidi stream: 0x01 0x20 | device stream frames══▶ streams.rs (one task each, on the lane;
//!          ◀═acks════════════════════════════════════════   policy checked by the certificate name)
//! ```
//!
//! A gateway is known by the name in its verified client certificate (first DNS subjectAltName,
//! else common name): that is the name profile policies list (`docs/protocol.md` §11.9). The name
//! it declares in `Hello` is only logged; when the two differ, the certificate's wins.
//!
//! A gateway is untrusted beyond its certificate: anything malformed it sends is counted and
//! dropped, and a broken control stream ends its own connection, never the process.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use relay_protocol::{DecodeError, UplinkDatagram, UplinkMessage};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::LimitsConfig;
use crate::engine::{DropReason, EngineInput, GatewayConnId, GatewayLink, Route};
use crate::metrics::{Access, Metrics};
use crate::streams::StreamHub;

/// How long a gateway has, after the QUIC handshake, to open its control stream and say `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Control-stream messages queued for one gateway (the rare frames too large for a datagram,
/// revocations, answers to admission queries).
const CONTROL_QUEUE: usize = 256;

/// QUIC application error codes the core closes a connection with.
mod close_code {
    pub const SHUTDOWN: u32 = 0;
    pub const PROTOCOL: u32 = 1;
}

/// Why a gateway connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum UplinkError {
    /// The gateway broke the uplink protocol.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// The gateway sent a control message that did not parse.
    #[error("control stream: {0}")]
    Decode(#[from] DecodeError),
    /// The gateway was too slow to say `Hello`.
    #[error("no Hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the control stream failed.
    #[error("control stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the control stream failed.
    #[error("control stream write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Accepts gateway connections until `shutdown`, then closes the endpoint. `bulk_port`, the bulk
/// endpoint's port, is told to each gateway in `HelloAck`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    engine: mpsc::Sender<EngineInput>,
    hub: Arc<StreamHub>,
    metrics: Metrics,
    limits: LimitsConfig,
    bulk_port: Option<NonZeroU16>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(limits.max_gateways));
    let mut next_id = 0u64;
    while let Some((incoming, permit)) =
        next_incoming(&endpoint, &slots, &shutdown, "gateway").await
    {
        next_id += 1;
        let conn_id = GatewayConnId(next_id);
        let span = tracing::info_span!(
            "gateway",
            conn = %conn_id,
            remote = %incoming.remote_address(),
            name = tracing::field::Empty,
        );
        let engine = engine.clone();
        let hub = hub.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let inner_tasks = tasks.clone();
        tasks.spawn(
            async move {
                let _permit = permit;
                let Some(connection) = handshake(incoming, &shutdown, "gateway").await else {
                    return;
                };
                let gateway = Gateway {
                    id: conn_id,
                    connection,
                    engine,
                    hub,
                    metrics,
                    max_flows: limits.max_flows_per_gateway,
                    bulk_port,
                    shutdown,
                    tasks: inner_tasks,
                };
                gateway.serve().await;
            }
            .instrument(span),
        );
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"core shutting down");
    tracing::debug!("uplink acceptor stopped");
}

/// Accepts gateways' bulk connections until `shutdown`, then closes the bulk endpoint. Must run
/// on the bulk lane, where the endpoint was created: quinn spawns each connection's driver on the
/// runtime that accepts it, so the connections' packet work (UDP, encryption) and every stream
/// task stay on the lane's threads.
pub(crate) async fn serve_bulk(
    endpoint: quinn::Endpoint,
    hub: Arc<StreamHub>,
    metrics: Metrics,
    limits: LimitsConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(limits.max_gateways));
    while let Some((incoming, permit)) =
        next_incoming(&endpoint, &slots, &shutdown, "bulk connection").await
    {
        let span = tracing::info_span!(
            "bulk",
            remote = %incoming.remote_address(),
            name = tracing::field::Empty,
        );
        let bulk = BulkConnection {
            hub: hub.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        tasks.spawn_on(
            async move {
                let _permit = permit;
                if let Some(connection) = handshake(incoming, &bulk.shutdown, "bulk").await {
                    bulk.serve(connection).await;
                }
            }
            .instrument(span),
            hub.lane(),
        );
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"core shutting down");
    tracing::debug!("bulk acceptor stopped");
}

/// The next connection attempt on `endpoint` with a slot for it; attempts over `slots` are
/// refused and logged as `what`. `None` once `shutdown` fires or the endpoint is closed.
async fn next_incoming(
    endpoint: &quinn::Endpoint,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(quinn::Incoming, OwnedSemaphorePermit)> {
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => return None,
            i = endpoint.accept() => i?,
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => return Some((incoming, permit)),
            Err(_) => {
                tracing::warn!(remote = %incoming.remote_address(), "{what} refused: max_gateways reached");
                incoming.refuse();
            }
        }
    }
}

/// Completes the TLS handshake of `incoming`, unless `shutdown` fires first; a failed one is
/// logged as `what`'s.
async fn handshake(
    incoming: quinn::Incoming,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<quinn::Connection> {
    let connection = tokio::select! {
        () = shutdown.cancelled() => return None,
        c = incoming => c,
    };
    // Most often: no client certificate, or one the CA did not sign.
    connection
        .map_err(|e| tracing::info!(error = %e, "{what} handshake failed"))
        .ok()
}

/// Serves, on the bulk lane, a device stream that the gateway `name` opened; `via` (which of its
/// connections) labels the stream's span.
fn spawn_device_stream(
    hub: &Arc<StreamHub>,
    tasks: &TaskTracker,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    name: &Arc<str>,
    via: &'static str,
) {
    tasks.spawn_on(
        crate::streams::serve_gateway_stream(hub.clone(), send, recv, name.clone())
            .instrument(tracing::debug_span!("stream", via)),
        hub.lane(),
    );
}

/// One gateway's bulk connection: device streams only (no control stream, no `Hello`, no
/// datagrams), each authorised by the gateway's certificate name.
struct BulkConnection {
    hub: Arc<StreamHub>,
    metrics: Metrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Decrements `core_bulk_connections` however the connection ends.
struct BulkGauge(Metrics);

impl Drop for BulkGauge {
    fn drop(&mut self) {
        self.0.bulk_connections.dec();
    }
}

impl BulkConnection {
    async fn serve(self, connection: quinn::Connection) {
        let Some(name) = crate::tls::peer_certificate_name(&connection) else {
            tracing::warn!(
                "bulk connection refused: its certificate names no gateway (no DNS SAN, no CN)"
            );
            connection.close(close_code::PROTOCOL.into(), b"certificate names no gateway");
            return;
        };
        tracing::Span::current().record("name", name.as_str());
        let name: Arc<str> = name.into();
        self.metrics.bulk_connections.inc();
        let _gauge = BulkGauge(self.metrics.clone());
        tracing::info!("bulk connection up");
        let ended = loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break None,
                bi = connection.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        spawn_device_stream(&self.hub, &self.tasks, send, recv, &name, "gateway-bulk");
                    }
                    Err(e) => break Some(e),
                },
            }
        };
        match ended {
            None => {
                connection.close(close_code::SHUTDOWN.into(), b"core shutting down");
                tracing::info!("bulk connection closed (shutdown)");
            }
            Some(e) => tracing::info!(reason = %e, "bulk connection closed"),
        }
    }
}

struct Gateway {
    id: GatewayConnId,
    connection: quinn::Connection,
    engine: mpsc::Sender<EngineInput>,
    hub: Arc<StreamHub>,
    metrics: Metrics,
    max_flows: u32,
    /// Told in `HelloAck`: the bulk endpoint's port.
    bulk_port: Option<NonZeroU16>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Gateway {
    async fn serve(self) {
        let Some(name) = crate::tls::peer_certificate_name(&self.connection) else {
            // The CA signed a certificate that names nothing: policies could not name it.
            tracing::warn!("gateway refused: its certificate names no gateway (no DNS SAN, no CN)");
            self.connection
                .close(close_code::PROTOCOL.into(), b"certificate names no gateway");
            return;
        };
        tracing::Span::current().record("name", name.as_str());
        let (send, mut recv, mut buf) = match self.hello(&name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(error = %e, "gateway refused");
                self.connection
                    .close(close_code::PROTOCOL.into(), b"expected Hello");
                return;
            }
        };

        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        self.tasks
            .spawn(write_control(send, control_rx).in_current_span());
        let link = GatewayLink {
            connection: self.connection.clone(),
            control: control_tx,
        };
        let name: Arc<str> = name.into();
        if self
            .engine
            .send(EngineInput::GatewayUp {
                conn: self.id,
                name: name.clone(),
                link,
            })
            .await
            .is_err()
        {
            return;
        }
        self.metrics.gateways_connected.inc();
        tracing::info!("gateway connected");

        let result = self.forward(&mut recv, &mut buf, &name).await;

        self.metrics.gateways_connected.dec();
        // The engine drops its link (and so the control writer) and keeps the sessions.
        let _ = self
            .engine
            .send(EngineInput::GatewayDown { conn: self.id })
            .await;
        match result {
            Ok(()) => {
                self.connection
                    .close(close_code::SHUTDOWN.into(), b"core shutting down");
                tracing::info!("gateway disconnected (shutdown)");
            }
            Err(UplinkError::Connection(e)) => tracing::info!(reason = %e, "gateway disconnected"),
            Err(e) => {
                tracing::warn!(error = %e, "gateway connection closed");
                self.connection
                    .close(close_code::PROTOCOL.into(), b"protocol error");
            }
        }
    }

    /// Accepts the control stream, reads `Hello`, answers `HelloAck`. `certified` is the name in
    /// the gateway's certificate; a different name in `Hello` is logged and otherwise ignored.
    async fn hello(
        &self,
        certified: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, BytesMut), UplinkError> {
        let exchange = async {
            let (mut send, mut recv) = self.connection.accept_bi().await?;
            let mut buf = BytesMut::with_capacity(4096);
            let name = match read_message(&mut recv, &mut buf).await? {
                Some(UplinkMessage::Hello { name }) => name,
                Some(_) => return Err(UplinkError::Protocol("first message is not Hello")),
                None => return Err(UplinkError::Protocol("control stream ended before Hello")),
            };
            if name != certified {
                tracing::warn!(
                    hello = %name,
                    certificate = %certified,
                    "gateway's Hello name differs from its certificate's: using the certificate's"
                );
            }
            let mut ack = BytesMut::with_capacity(8);
            UplinkMessage::HelloAck {
                max_flows: self.max_flows,
                bulk_port: self.bulk_port,
            }
            .encode(&mut ack);
            send.write_all(&ack).await?;
            Ok((send, recv, buf))
        };
        tokio::select! {
            r = tokio::time::timeout(HELLO_TIMEOUT, exchange) => r.map_err(|_| UplinkError::HelloTimeout)?,
            () = self.shutdown.cancelled() => Err(UplinkError::Protocol("core shutting down")),
        }
    }

    /// Forwards device frames to the engine, and hands device streams (every bidirectional
    /// stream after the control stream) to their own tasks, until the connection ends or the core
    /// shuts down.
    async fn forward(
        &self,
        recv: &mut quinn::RecvStream,
        buf: &mut BytesMut,
        name: &Arc<str>,
    ) -> Result<(), UplinkError> {
        let mut chunk = [0u8; 4096];
        // Messages that arrived together with Hello.
        self.drain_control(buf).await?;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                dg = self.connection.read_datagram() => {
                    let dg = dg?;
                    self.on_datagram(dg).await;
                }
                bi = self.connection.accept_bi() => {
                    let (send, recv) = bi?;
                    spawn_device_stream(&self.hub, &self.tasks, send, recv, name, "gateway");
                }
                n = recv.read(&mut chunk) => {
                    match n? {
                        Some(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            self.drain_control(buf).await?;
                        }
                        None => return Err(UplinkError::Protocol("control stream finished")),
                    }
                }
            }
        }
    }

    async fn on_datagram(&self, dg: Bytes) {
        self.metrics.frame_received(Access::Gateway);
        match UplinkDatagram::decode(&dg) {
            Ok(d) if d.admission.is_some() => {
                // Admissions go core -> gateway only.
                self.metrics
                    .frame_dropped(DropReason::Uplink(DecodeError::Invalid(
                        "admission datagram from a gateway",
                    )));
            }
            Ok(d) => {
                let route = Route::Gateway {
                    conn: self.id,
                    flow: d.flow,
                };
                let bytes = dg.slice(dg.len() - d.frame.len()..);
                let _ = self.engine.send(EngineInput::Frame { bytes, route }).await;
            }
            Err(e) => self.metrics.frame_dropped(DropReason::Uplink(e)),
        }
    }

    async fn drain_control(&self, buf: &mut BytesMut) -> Result<(), UplinkError> {
        while let Some(msg) = UplinkMessage::decode(buf).inspect_err(|e| {
            self.metrics.frame_dropped(DropReason::Uplink(*e));
        })? {
            match msg {
                UplinkMessage::DeviceFrame { flow, frame } => {
                    self.metrics.frame_received(Access::Gateway);
                    let route = Route::Gateway {
                        conn: self.id,
                        flow,
                    };
                    let _ = self
                        .engine
                        .send(EngineInput::Frame {
                            bytes: frame,
                            route,
                        })
                        .await;
                }
                UplinkMessage::Hello { .. } => return Err(UplinkError::Protocol("second Hello")),
                UplinkMessage::HelloAck { .. } => {
                    return Err(UplinkError::Protocol("HelloAck from a gateway"))
                }
                UplinkMessage::AdmitQuery { sessions } => {
                    let _ = self
                        .engine
                        .send(EngineInput::AdmitQuery {
                            conn: self.id,
                            sessions,
                        })
                        .await;
                }
                UplinkMessage::Revoked { .. } => {
                    return Err(UplinkError::Protocol("Revoked from a gateway"))
                }
                UplinkMessage::Admit { .. } => {
                    return Err(UplinkError::Protocol("Admit from a gateway"))
                }
                UplinkMessage::NotAdmitted { .. } => {
                    return Err(UplinkError::Protocol("NotAdmitted from a gateway"))
                }
            }
        }
        Ok(())
    }
}

/// Reads until one whole control message is buffered. `None`: the stream ended first.
async fn read_message(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<UplinkMessage>, UplinkError> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(msg) = UplinkMessage::decode(buf)? {
            return Ok(Some(msg));
        }
        match recv.read(&mut chunk).await? {
            Some(n) => buf.extend_from_slice(&chunk[..n]),
            None => return Ok(None),
        }
    }
}

/// Owns the control stream's sending half: writes what the engine queues for this gateway.
async fn write_control(mut send: quinn::SendStream, mut queue: mpsc::Receiver<Bytes>) {
    while let Some(msg) = queue.recv().await {
        if let Err(e) = send.write_all(&msg).await {
            tracing::debug!(error = %e, "control stream write failed");
            return;
        }
    }
    let _ = send.finish();
}
