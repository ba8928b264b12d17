//! `core-stub`: the operator side of the relay. It accepts gateways over QUIC with mutual TLS and
//! devices with direct access over UDP, ends every device's end-to-end Noise IK session,
//! authenticates devices against the SQLite subscription store, and stores their readings exactly
//! once, acknowledging each only after it is on disk. Large uploads (a camera's video) come over
//! device streams (TCP, or one QUIC stream each through a gateway) under keys derived from the
//! same session, and are stored resumably with their SHA-256. All of that work (the gateways'
//! second, bulk QUIC connections, the stream listener, decryption, hashing and disk writes) runs
//! on the bulk lane: a runtime of its own whose threads run at `[video] cpu_priority` (`SCHED_IDLE`
//! by default), so that a video at full speed does not delay the readings.
//!
//! Devices are provisioned at run time through their factory identity (the engine creates the
//! subscription in the same handshake, [`engine`]), or statically by [`init::init`]. It
//! deliberately does not trust gateways with anything but ciphertext (they learn only which
//! session ids the core revoked), or keep per-device labels in metrics.
//!
//! Main types: [`run`] with [`Listeners`] and [`CoreConfig`] (the daemon), [`store::Store`] (the
//! subscriptions, readings and the append-only audit log), [`video::VideoStore`] (uploads from
//! device streams: a camera's video, resumable, stored with its SHA-256), [`init::init`] (a whole
//! deployment in one directory), [`admin_api`] with [`tokens`] (the operators' and technicians'
//! JSON API).
//!
//! ```text
//!  gateways ──QUIC datagrams──▶ uplink.rs ─┐                                    ┌──▶ store.rs writer thread
//!  (mTLS, control stream)                   ├─▶ EngineInput ─▶ engine.rs (1 task) ┤    (batch, INSERT OR IGNORE,
//!  devices ───UDP───────────▶ direct.rs ───┘   bounded mpsc    sessions, index,   │     COMMIT, synchronous=FULL)
//!                                                              routes             ◀──┘ Committed seqs
//!  ┌ bulk lane ([video] cpu_priority) ─────────────────────────────────────────────────────────┐
//!  cameras ──TCP (direct)────▶ streams.rs ◀── gateways' bulk QUIC connections ([listen] bulk,
//!           (docs §13)          │             port in HelloAck; uplink::serve_bulk), or further
//!                               │             streams on their main connection (older gateways)
//!                               one task per stream: open ─EngineInput::StreamOpen─▶ engine (auth,
//!                               keys; policy by gateway name) ─▶ video.rs on disk (.part/.state ─▶
//!                               .video/.json) ─▶ acks
//!  └────────────────────────────────────────────────────────────────────────────────────────────┘
//!  devices ◀── Ack (+ notices) / HandshakeResponse by route (UDP send_to, QUIC datagram or
//!              control stream); gateways ◀── Revoked{sessions} on their control streams
//!  Prometheus ──▶ admin (relay-ops): /metrics (metrics.rs), /live, /ready
//!  operators ──▶ admin: /v1/… (admin_api.rs, bearer tokens) ─▶ store (status + audit, one
//!                 transaction) ─▶ engine control channel: drops the device's sessions, names
//!                 them to the gateways, then answers
//!  engine ──lifecycle writes (provision, key update, fraud flag)──▶ its own store connection
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_api;
pub mod config;
mod direct;
pub mod disk;
pub mod engine;
pub mod init;
pub mod manifest;
pub mod metrics;
pub mod release;
pub mod store;
mod streams;
pub mod tls;
pub mod tokens;
mod uplink;
pub mod video;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use relay_ops::admin::{AdminConfig, Readiness};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, CoreConfig};
pub use init::{init, InitOptions, InitSummary};
pub use store::{Store, StoreError, SubscriptionStatus};

/// Device frames queued for the engine from all acceptors together.
const ENGINE_QUEUE: usize = 8192;
/// Admin requests queued for the engine (status changes, session counts).
const CONTROL_QUEUE: usize = 64;
/// Commits queued back from the store writer (each one a whole batch).
const COMMIT_QUEUE: usize = 64;
/// How long shutdown waits for tasks to finish and the last readings to be committed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the core could not start or stopped abnormally, sorted by who must act. Misbehaving peers
/// never produce one: their frames are dropped and counted.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The operator's configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The operator's certificates or keys are unusable for TLS.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Local: a listener could not be bound.
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Local: the store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Local: some other I/O failed (QUIC endpoint, ready file, writer thread).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Local: the metrics could not be registered (a programming error).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl CoreError {
    /// Whether the operator's configuration is at fault (the binary exits with code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Tls(_))
    }
}

/// The core's five listeners, bound before [`run`] so that port 0 can be used and the bound
/// addresses known up front.
#[derive(Debug)]
pub struct Listeners {
    quic: std::net::UdpSocket,
    bulk: std::net::UdpSocket,
    direct: tokio::net::UdpSocket,
    streams: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    quic_addr: SocketAddr,
    bulk_addr: SocketAddr,
    direct_addr: SocketAddr,
    stream_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Listeners {
    /// Binds `config.listen.{quic,bulk,direct,streams,admin}`. Must be called inside a tokio
    /// runtime.
    pub async fn bind(config: &CoreConfig) -> Result<Self, CoreError> {
        let listen = config.listen;
        let bind_err = |what, addr| move |source| CoreError::Bind { what, addr, source };
        let buffer = relay_ops::udp::DEFAULT_BUFFER_BYTES;
        let quic =
            relay_ops::udp::bind(listen.quic, buffer).map_err(bind_err("quic", listen.quic))?;
        let quic_addr = quic.local_addr().map_err(bind_err("quic", listen.quic))?;
        // Unset: the QUIC address's port + 1 (port 0 with an ephemeral QUIC port).
        let bulk_want = listen.bulk_addr().ok_or_else(|| {
            bind_err("bulk", listen.quic)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the QUIC port is 65535, so there is no port + 1: set listen.bulk (--listen-bulk)",
            ))
        })?;
        let bulk = relay_ops::udp::bind(bulk_want, buffer).map_err(bind_err("bulk", bulk_want))?;
        let bulk_addr = bulk.local_addr().map_err(bind_err("bulk", bulk_want))?;
        let direct = relay_ops::udp::bind(listen.direct, buffer)
            .and_then(tokio::net::UdpSocket::from_std)
            .map_err(bind_err("direct", listen.direct))?;
        let direct_addr = direct
            .local_addr()
            .map_err(bind_err("direct", listen.direct))?;
        let streams = match listen.streams {
            Some(addr) => tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_err("streams", addr))?,
            None => {
                // The direct port number over TCP; with an ephemeral direct port, any free one
                // when that number is taken over TCP.
                let same = SocketAddr::new(direct_addr.ip(), direct_addr.port());
                match tokio::net::TcpListener::bind(same).await {
                    Ok(l) => l,
                    Err(_) if listen.direct.port() == 0 => {
                        let any = SocketAddr::new(direct_addr.ip(), 0);
                        tokio::net::TcpListener::bind(any)
                            .await
                            .map_err(bind_err("streams", any))?
                    }
                    Err(e) => return Err(bind_err("streams", same)(e)),
                }
            }
        };
        let stream_addr = streams
            .local_addr()
            .map_err(bind_err("streams", direct_addr))?;
        let (admin, admin_addr) = relay_ops::admin::bind(listen.admin)
            .await
            .map_err(bind_err("admin", listen.admin))?;
        Ok(Self {
            quic,
            bulk,
            direct,
            streams,
            admin,
            quic_addr,
            bulk_addr,
            direct_addr,
            stream_addr,
            admin_addr,
        })
    }

    /// The bound QUIC (gateway) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound bulk QUIC address: gateways' connections for device streams only (its port is
    /// told to each gateway in `HelloAck`).
    pub fn bulk_addr(&self) -> SocketAddr {
        self.bulk_addr
    }

    /// The bound direct-access UDP address.
    pub fn direct_addr(&self) -> SocketAddr {
        self.direct_addr
    }

    /// The bound direct-access stream address (TCP, `docs/protocol.md` §13).
    pub fn stream_addr(&self) -> SocketAddr {
        self.stream_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
}

/// Runs the core on `listeners` until `shutdown` is cancelled, then drains: acceptors stop, the
/// store writer commits what it holds and the engine seals those acknowledgements, within
/// [`SHUTDOWN_GRACE`].
pub async fn run(
    config: CoreConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), CoreError> {
    // Whatever way this function ends, everything it started stops.
    let stop = shutdown.child_token();
    let _stop_on_return = stop.clone().drop_guard();
    let tasks = TaskTracker::new();

    let metrics = metrics::Metrics::new()?;
    let readiness = Readiness::new();
    let listeners_addrs = BoundAddrs {
        quic: listeners.quic_addr,
        bulk: listeners.bulk_addr,
        direct: listeners.direct_addr,
        streams: listeners.stream_addr,
        admin: listeners.admin_addr,
    };

    let store_path = config.store.path.clone();
    let (store, api_store, engine_stores, loaded) = tokio::task::spawn_blocking(move || {
        let store = store::Store::open(&store_path)?;
        let loaded = engine::Loaded {
            index: store.index_entries()?,
            devices: store.factory_entries()?,
            profiles: store.profiles()?,
        };
        // The admin API's own connection (WAL: it reads beside the writer thread), and the
        // engine's two: lifecycle transactions, and configuration versions in the background.
        let api_store = store::Store::open(&store_path)?;
        let engine_stores = (
            store::Store::open(&store_path)?,
            store::Store::open(&store_path)?,
        );
        Ok::<_, StoreError>((store, api_store, engine_stores, loaded))
    })
    .await
    .map_err(|e| CoreError::Io {
        what: "opening the store",
        source: std::io::Error::other(e),
    })??;
    let index_len = loaded.index.len();
    tracing::info!(
        path = %config.store.path.display(),
        subscriptions = index_len,
        "store open"
    );

    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(tls::server_config(&config.tls, config.video.max_streams)?),
        listeners.quic,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| CoreError::Io {
        what: "QUIC endpoint",
        source,
    })?;

    // The bulk lane: device streams, the gateways' bulk connections and their disk writes run on
    // its threads, at `[video] cpu_priority`, so that a video does not delay the readings.
    let lane = start_lane(config.video.cpu_priority).await?;
    let bulk_endpoint = {
        // quinn spawns the endpoint's driver and wraps its socket in the runtime current at
        // creation: the lane's.
        let _on_lane = lane.handle().enter();
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(tls::bulk_server_config(
                &config.tls,
                config.video.max_streams,
            )?),
            listeners.bulk,
            Arc::new(quinn::TokioRuntime),
        )
    }
    .map_err(|source| CoreError::Io {
        what: "bulk QUIC endpoint",
        source,
    })?;

    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let mut admin = AdminConfig::new(metrics.registry().clone(), readiness.clone());
    // Manifests and plans of up to 100 000 rows come in one request.
    admin.max_body = admin.max_body.max(admin_api::MAX_BODY);
    admin.handler = Some(
        admin_api::AdminApi::new(
            config.admin.tokens.clone(),
            api_store,
            control_tx,
            metrics.clone(),
            admin_api::ReleaseSettings {
                signer: config.lifecycle.release_signer.clone(),
                trusted: config.lifecycle.trusted_releasers.clone(),
                core_public_key: *config.noise.public(),
            },
        )
        .with_videos(video::VideoStore::new(
            config.video.dir.clone(),
            config.video.max_bytes,
        ))
        .into_handler(),
    );
    tasks.spawn(relay_ops::admin::serve(
        listeners.admin,
        admin,
        stop.clone(),
    ));

    // Readings first: when videos go to the database's disk, their writes give way to commits.
    let gate = Arc::new(disk::DiskGate::default());
    let shares_disk = disk::same_disk(&config.store.path, &config.video.dir);
    let give_way = config.video.give_way.applies(shares_disk);
    match (shares_disk, give_way) {
        (true, true) => tracing::info!(
            videos = %config.video.dir.display(),
            "videos share the database's disk: video writes give way to store commits (a volume of their own is faster)"
        ),
        (true, false) => tracing::warn!(
            videos = %config.video.dir.display(),
            "videos share the database's disk and [video] give_way = \"never\": readings' commits may wait behind video syncs"
        ),
        (false, _) => {}
    }
    let (input_tx, input_rx) = mpsc::channel(ENGINE_QUEUE);
    let (store_tx, store_rx) = mpsc::channel(config.store.batch_max.saturating_mul(2));
    let (committed_tx, committed_rx) = mpsc::channel(COMMIT_QUEUE);
    let writer = store::spawn_writer(
        store,
        store_rx,
        committed_tx,
        config.store.batch_max,
        config.store.batch_linger,
        metrics.clone(),
        gate.clone(),
    )
    .map_err(|source| CoreError::Io {
        what: "starting the store writer",
        source,
    })?;

    let direct_socket = Arc::new(listeners.direct);
    let lifecycle_store =
        engine::StoreWrites::new(engine_stores.0, engine_stores.1).map_err(|source| {
            CoreError::Io {
                what: "starting the configuration version recorder",
                source,
            }
        })?;
    let table = engine::SessionTable::new(
        config.noise.into_keypair(),
        config.session,
        engine::LifecyclePolicy {
            rotate_after_secs: config.lifecycle.rotate_after_secs,
            fraud_action: config.lifecycle.fraud_action,
        },
        engine::AdmissionPolicy::from_config(&config.admission, &config.handshakes),
        loaded,
        Box::new(lifecycle_store),
        metrics.clone(),
    )
    .map_err(|e| CoreError::Io {
        what: "drawing the cookie secret",
        source: std::io::Error::other(e.to_string()),
    })?;
    let engine = engine::Engine::new(
        table,
        direct_socket.clone(),
        store_tx,
        committed_rx,
        metrics.clone(),
    );
    let engine_task = tokio::spawn(engine.run(input_rx, control_rx, stop.clone(), SHUTDOWN_GRACE));
    tasks.spawn(direct::serve(
        direct_socket,
        input_tx.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let hub = Arc::new(streams::StreamHub::new(
        config.video.clone(),
        input_tx.clone(),
        metrics.clone(),
        stop.clone(),
        lane.handle().clone(),
        give_way.then(|| gate.clone()),
    ));
    tasks.spawn(streams::serve_direct(
        listeners.streams,
        hub.clone(),
        stop.clone(),
        tasks.clone(),
    ));
    tasks.spawn_on(
        uplink::serve_bulk(
            bulk_endpoint.clone(),
            hub.clone(),
            metrics.clone(),
            config.limits,
            stop.clone(),
            tasks.clone(),
        ),
        lane.handle(),
    );
    tasks.spawn(uplink::serve(
        endpoint.clone(),
        input_tx,
        hub,
        metrics.clone(),
        config.limits,
        std::num::NonZeroU16::new(listeners_addrs.bulk.port()),
        stop.clone(),
        tasks.clone(),
    ));

    if let Some(path) = &config.ready_file {
        write_ready_file(path, &listeners_addrs)?;
    }
    readiness.set(true);
    tracing::info!(
        name = %config.name,
        quic = %listeners_addrs.quic,
        bulk = %listeners_addrs.bulk,
        direct = %listeners_addrs.direct,
        streams = %listeners_addrs.streams,
        admin = %listeners_addrs.admin,
        videos = %config.video.dir.display(),
        "core ready"
    );

    stop.cancelled().await;
    readiness.set(false);
    tracing::info!("shutting down");
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks still running after the grace period");
    }
    // Stream tasks are done (or abandoned after the grace period). The bulk endpoint, closed by
    // its acceptor, tells its connections before the lane's threads (its driver's) go.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, bulk_endpoint.wait_idle()).await;
    drop(lane);
    // The engine closes the store channel and seals the last acknowledgements; then the writer
    // thread, having committed everything it was handed, ends.
    if tokio::time::timeout(SHUTDOWN_GRACE * 2, engine_task)
        .await
        .is_err()
    {
        tracing::warn!("engine still running after the grace period");
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
    let joined = tokio::task::spawn_blocking(move || writer.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("store writer thread panicked");
    }
    tracing::info!("core stopped");
    Ok(())
}

/// Starts the bulk lane at `priority` and logs it; warns when the kernel would not lower its
/// threads (they then run at the ordinary priority).
async fn start_lane(
    priority: relay_ops::lane::LanePriority,
) -> Result<relay_ops::lane::BulkLane, CoreError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lane =
        relay_ops::lane::BulkLane::new("core-bulk", threads, priority).map_err(|source| {
            CoreError::Io {
                what: "starting the bulk lane's threads",
                source,
            }
        })?;
    // A worker has started (and tried to lower itself) once it ran a task.
    let _ = tokio::time::timeout(Duration::from_secs(1), lane.handle().spawn(async {})).await;
    tracing::info!(
        cpu_priority = priority.label(),
        threads,
        "bulk lane started (device streams)"
    );
    if let Some(why) = lane.refused() {
        tracing::warn!(
            cpu_priority = priority.label(),
            error = %why,
            "the kernel refused to lower the bulk lane's threads: device streams run at the ordinary priority"
        );
    }
    Ok(lane)
}

/// The bound addresses, for the ready file and the log.
struct BoundAddrs {
    quic: SocketAddr,
    bulk: SocketAddr,
    direct: SocketAddr,
    streams: SocketAddr,
    admin: SocketAddr,
}

/// Writes `{"quic":…,"bulk":…,"direct":…,"streams":…,"admin":…}` atomically (temporary file,
/// then rename), so a reader never sees half a file.
fn write_ready_file(path: &Path, addrs: &BoundAddrs) -> Result<(), CoreError> {
    let body = serde_json::json!({
        "quic": addrs.quic.to_string(),
        "bulk": addrs.bulk.to_string(),
        "direct": addrs.direct.to_string(),
        "streams": addrs.streams.to_string(),
        "admin": addrs.admin.to_string(),
    })
    .to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let io = |source| CoreError::Io {
        what: "writing the ready file",
        source,
    };
    std::fs::write(&tmp, body).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
