//! `gateway`: the untrusted relay between devices on the field network (UDP) and the core (one
//! QUIC connection with mutual TLS).
//!
//! Devices hold end-to-end Noise sessions with the core; the gateway only moves their frames. It
//! checks each frame's header (version, type, length), checks the admission tag of each device
//! frame against the per-session admission key the core handed it, holds each session to the
//! quota the core set, remembers which device address each flow id stands for, and queues frames
//! while the core is unreachable.
//!
//! What it deliberately does not do: it holds no device identity or end-to-end session key and
//! does not link `snow` (`cargo tree -p gateway` shows it), so it cannot read or forge a frame's
//! content, nor a device stream's chunks (their keys derive from the session); the admission key
//! (16 random bytes the core draws per session, independent of the end-to-end keys) only lets it
//! tell frames of whoever holds the session from junk. It keeps no per-device state beyond an
//! address↔flow entry and one admission entry per session (and, while a device stream is open,
//! at most one frame per direction); it retransmits nothing (devices do).
//!
//! ```text
//!                ┌─────────────────────────── gateway ────────────────────────────┐
//!  device ─UDP─▶ │ device_link::receive ─ DeviceFrame::decode (header only)       │
//!                │      │ 0x04: admission table (tag, quota, expiry) or held and  │
//!                │      │   asked about (AdmitQuery); 0x03 dropped (require)      │
//!                │      │ flows: addr ↔ FlowId (one mutex, bounded, idle expiry)  │
//!                │      │ revoked sessions (from the core's Revoked): dropped     │
//!                │      ├─ uplink up ───▶ Link::send ─ QUIC datagram ────────────┼─▶ core
//!                │      │                  └ too big: control-stream message ────┼─▶
//!                │      └─ uplink down ─▶ queue (bounded; newest dropped;         │
//!                │                        flushed after the next HelloAck)        │
//!  device ◀─UDP─ │ DeviceLink::deliver ◀─ uplink task ◀─ datagrams, stream ◀──────┼── core
//!                │                        └ admissions installed (kind 2, Admit)  │
//!  device ─TCP─▶ │ streams (bulk lane: own threads, SCHED_IDLE): first frame's    │
//!         ◀─TCP─ │   admission checked, then one QUIC stream per device stream,   │
//!                │   frame by frame both ways, on the bulk connection ◀───────────┼─▶ core bulk
//!                │   (HelloAck's bulk_port), or on the uplink if there is none ◀──┼─▶ endpoint
//!                │ metrics ─▶ admin: /metrics /live /ready (relay-ops)            │
//!                └────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Device streams (a camera's video) move far more bytes than the datagram path and tokio has no
//! priorities, so they run apart: their TCP copy and a QUIC connection of their own to the core's
//! bulk endpoint (its packet encryption, UDP I/O and quinn driver included) run on a runtime whose
//! threads have a lower CPU priority (`[streams] cpu_priority`, [`relay_ops::lane`]), so that
//! the meters' frames do not wait behind a video's work. A core that names no bulk endpoint gets
//! them on the uplink connection.
//!
//! Main types: [`GatewayConfig`] (parsed once from [`Cli`] and `gateway.toml`), [`Listeners`]
//! (bound before [`run`], port 0 allowed), [`Hooks`] / [`FrameTap`] (tests see every byte),
//! [`GatewayError`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod config;
mod device_link;
pub mod flows;
pub mod handshake_limit;
pub mod metrics;
mod pending;
mod queue;
pub mod revoked;
pub mod streams;
mod tap;
pub mod tls;
pub mod uplink;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use relay_ops::admin::{AdminConfig, Readiness};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{
    AdmissionConfig, Cli, ConfigError, CoreAddr, FlowsConfig, GatewayConfig, RevocationConfig,
    StreamsConfig, TlsFiles, UplinkConfig,
};
pub use tap::{FrameTap, Hooks, TapPoint};

use device_link::DeviceLink;
use metrics::Metrics;
use streams::StreamRelay;
use uplink::Uplink;

/// How long shutdown waits for the tasks to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the gateway could not start. Once running it only stops on the shutdown signal: a failing
/// core or a misbehaving device ends a connection or a frame, never the process.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A listening socket could not be bound.
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        /// `devices`, `streams` or `admin`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The uplink's UDP socket could not be created.
    #[error("cannot create the uplink endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The device streams' bulk lane (threads, listener) could not be set up.
    #[error("cannot start the device streams' lane: {0}")]
    Lane(std::io::Error),
    /// The ready file could not be written.
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The gateway's listening sockets, bound before [`run`] so that callers (and tests using port 0)
/// know the addresses.
#[derive(Debug)]
pub struct Listeners {
    devices: UdpSocket,
    admin: TcpListener,
    streams: Option<TcpListener>,
    device_addr: SocketAddr,
    admin_addr: SocketAddr,
    stream_addr: Option<SocketAddr>,
}

/// Attempts at finding a port free for both UDP and TCP when the stream listener follows a device
/// address of port 0.
const SAME_PORT_ATTEMPTS: usize = 16;

impl Listeners {
    /// Binds the device UDP socket, the device stream TCP listener (unless `[streams]` is
    /// disabled) and the admin TCP listener of `config`.
    ///
    /// Without `[streams] listen` the stream listener takes the device socket's address and port
    /// over TCP; with port 0 there, a port free for both is found.
    pub async fn bind(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let bind_err = |what, addr| move |source| GatewayError::Bind { what, addr, source };
        let bind_devices = || {
            let devices =
                relay_ops::udp::bind(config.listen_devices, relay_ops::udp::DEFAULT_BUFFER_BYTES)
                    .and_then(UdpSocket::from_std)
                    .map_err(bind_err("devices", config.listen_devices))?;
            let addr = devices
                .local_addr()
                .map_err(bind_err("devices", config.listen_devices))?;
            Ok::<_, GatewayError>((devices, addr))
        };
        let streams = &config.streams;
        let (devices, device_addr, streams) = match (streams.enabled, streams.listen) {
            (false, _) => {
                let (devices, addr) = bind_devices()?;
                (devices, addr, None)
            }
            (true, Some(listen)) => {
                let (devices, addr) = bind_devices()?;
                let streams = TcpListener::bind(listen)
                    .await
                    .map_err(bind_err("streams", listen))?;
                (devices, addr, Some(streams))
            }
            (true, None) => {
                let any_port = config.listen_devices.port() == 0;
                let mut attempt = 1;
                loop {
                    let (devices, addr) = bind_devices()?;
                    match TcpListener::bind(addr).await {
                        Ok(streams) => break (devices, addr, Some(streams)),
                        Err(e)
                            if any_port
                                && attempt < SAME_PORT_ATTEMPTS
                                && e.kind() == std::io::ErrorKind::AddrInUse =>
                        {
                            attempt += 1;
                        }
                        Err(e) => return Err(bind_err("streams", addr)(e)),
                    }
                }
            }
        };
        let stream_addr = match &streams {
            Some(l) => Some(l.local_addr().map_err(bind_err("streams", device_addr))?),
            None => None,
        };
        let (admin, admin_addr) = relay_ops::admin::bind(config.listen_admin)
            .await
            .map_err(bind_err("admin", config.listen_admin))?;
        Ok(Self {
            devices,
            admin,
            streams,
            device_addr,
            admin_addr,
            stream_addr,
        })
    }

    /// The bound device address (UDP).
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// The bound device stream address (TCP); `None` when `[streams] enabled = false`.
    pub fn stream_addr(&self) -> Option<SocketAddr> {
        self.stream_addr
    }

    /// The bound admin address (TCP).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
}

/// Runs the gateway until `shutdown` is cancelled, then drains within [`SHUTDOWN_GRACE`].
pub async fn run(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), GatewayError> {
    let metrics = Metrics::new()?;
    metrics
        .queue_capacity
        .set(i64::try_from(config.uplink.queue_frames).unwrap_or(i64::MAX));
    let readiness = Readiness::new();
    let client_config = config.uplink.tls.client_config()?;
    let endpoint = uplink::client_endpoint(&config.uplink.core).map_err(GatewayError::Endpoint)?;

    let Listeners {
        devices,
        admin,
        streams,
        device_addr,
        admin_addr,
        stream_addr,
    } = listeners;
    let device_link = Arc::new(DeviceLink::new(
        devices,
        config.flows,
        config.revocation,
        config.handshakes,
        config.admission,
        metrics.clone(),
        hooks,
    ));
    // Up/Down events are rare; admission answers come in bursts after a restart and are
    // consumed at once. The uplink task waits when the channel is full.
    let (events_tx, events_rx) = mpsc::channel(64);
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    tasks.spawn(relay_ops::admin::serve(
        admin,
        AdminConfig::new(metrics.registry().clone(), readiness.clone()),
        stop.clone(),
    ));
    tasks.spawn(
        device_link
            .clone()
            .receive(events_rx, config.uplink.queue_frames, stop.clone()),
    );
    tasks.spawn(
        device_link
            .clone()
            .expire_idle_flows(sweep_interval(config.flows.idle_timeout), stop.clone()),
    );
    let (connection, uplink_connection) = watch::channel(None);
    let mut lane = None;
    if let Some(listener) = streams {
        let priority = config.streams.cpu_priority;
        let bulk = relay_ops::lane::BulkLane::new(
            "gateway-bulk",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            priority,
        )
        .map_err(GatewayError::Lane)?;
        // A task that ran means a lane thread started (and was lowered, or refused).
        let _ = bulk.handle().spawn(async {}).await;
        match bulk.refused() {
            None => tracing::info!(
                cpu_priority = priority.label(),
                "device streams' lane started"
            ),
            Some(why) => tracing::warn!(
                cpu_priority = priority.label(),
                error = %why,
                "the kernel refused to lower the device streams' threads: they run as the others"
            ),
        }
        let relay = Arc::new(StreamRelay::new(
            config.streams,
            device_link.clone(),
            uplink_connection,
            streams::BulkUplink::new(
                client_config.clone(),
                config.uplink.server_name.clone(),
                bulk.handle().clone(),
                metrics.clone(),
            ),
        ));
        let listener = listener.into_std().map_err(GatewayError::Lane)?;
        let accept = {
            let (tasks, stop) = (tasks.clone(), stop.clone());
            async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => relay.accept(l, tasks, stop).await,
                    Err(e) => tracing::error!(
                        error = %e,
                        "the stream listener cannot move to the bulk lane"
                    ),
                }
            }
        };
        tasks.spawn_on(accept, bulk.handle());
        lane = Some(bulk);
    }
    tasks.spawn(
        Uplink {
            name: config.name.clone(),
            core: config.uplink.core.clone(),
            bulk: config.uplink.bulk.clone(),
            server_name: config.uplink.server_name.clone(),
            client_config,
            reconnect_initial: config.uplink.reconnect_initial,
            reconnect_max: config.uplink.reconnect_max,
            device_link,
            readiness,
            events: events_tx,
            connection,
            shutdown: stop.clone(),
        }
        .run(endpoint),
    );
    tasks.close();
    tracing::info!(
        name = %config.name,
        devices = %device_addr,
        streams = ?stream_addr,
        admin = %admin_addr,
        core = %config.uplink.core,
        "gateway started"
    );

    let started = match &config.ready_file {
        Some(path) => write_ready_file(path, device_addr, stream_addr, admin_addr),
        None => Ok(()),
    };
    if started.is_ok() {
        notify_systemd(sd_notify::NotifyState::Ready);
        stop.cancelled().await;
        notify_systemd(sd_notify::NotifyState::Stopping);
        tracing::info!("shutting down");
    } else {
        stop.cancel();
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "tasks still running after the shutdown grace period");
    }
    drop(lane);
    started
}

/// Idle flows are swept often enough that one lives at most ~25% past its timeout.
fn sweep_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Writes `{"devices":"ADDR","streams":"ADDR","admin":"ADDR"}` atomically (temporary file, then
/// rename); `streams` only when device streams are enabled.
fn write_ready_file(
    path: &Path,
    devices: SocketAddr,
    streams: Option<SocketAddr>,
    admin: SocketAddr,
) -> Result<(), GatewayError> {
    let mut body = serde_json::json!({
        "devices": devices.to_string(),
        "admin": admin.to_string(),
    });
    if let Some(streams) = streams {
        body["streams"] = serde_json::Value::String(streams.to_string());
    }
    let body = body.to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| GatewayError::ReadyFile {
            path: path.to_owned(),
            source,
        })
}

/// Tells systemd about the state when run as a `Type=notify` service (no-op without
/// `NOTIFY_SOCKET`).
fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}
