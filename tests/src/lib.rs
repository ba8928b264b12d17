//! `relay-tests`: the end-to-end harness. It makes a real deployment with `core-stub init` in a
//! temporary directory and starts the real core and gateways through their library `run`
//! functions on port 0 (or as child processes, see [`procs`], where a test kills them), with real
//! QUIC and TLS, a real SQLite file and real UDP sockets. Nothing is mocked.
//!
//! ```text
//!  device_sim::run_fleet ──UDP──▶ [hostile relay] ──▶ gateway::run ══QUIC══▶ core_stub::run ──▶ SQLite
//!                        └──────────────────────── UDP (direct) ──────────────▲
//! ```
#![forbid(unsafe_code)]

pub mod hostile;
pub mod hostile_stream;
pub mod lifecycle;
pub mod metrics;
pub mod procs;
pub mod recorder;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use device_sim::{DeviceIdentity, FleetOptions, FleetSummary, SimConfig};
use relay_protocol::payload::ReadingSeq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A fresh deployment made by `core-stub init` in a temporary directory.
#[derive(Debug)]
pub struct Deployment {
    dir: tempfile::TempDir,
    /// The device-sim config (core public key, addresses).
    pub sim: SimConfig,
}

impl Deployment {
    /// `core-stub init DIR --devices N --gateways G`.
    pub fn new(devices: u32, gateways: u32) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        core_stub::init(
            dir.path(),
            &core_stub::InitOptions {
                devices,
                gateways,
                force: true,
            },
        )
        .context("core-stub init")?;
        let sim = device_sim::load_config(&dir.path().join("devices/device-sim.toml"))?;
        Ok(Self { dir, sim })
    }

    /// The deployment directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The core's config file.
    pub fn core_config(&self) -> PathBuf {
        self.path().join("core/core.toml")
    }

    /// Gateway `k`'s config file (1-based).
    pub fn gateway_config(&self, k: u32) -> PathBuf {
        self.path().join(format!("gateway-{k}/gateway.toml"))
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.path().join("core/subscriptions.db")
    }

    /// The devices of the fleet file, `range` of them (by position).
    pub fn devices(&self, range: std::ops::Range<usize>) -> Result<Vec<DeviceIdentity>> {
        let all = device_sim::load_fleet(&self.sim.fleet)?;
        if range.end > all.len() {
            bail!("the fleet has {} devices, not {}", all.len(), range.end);
        }
        Ok(all
            .into_iter()
            .skip(range.start)
            .take(range.len())
            .collect())
    }

    /// Device `i` of the fleet file as a stream uploader's session holder, its datagrams to
    /// `target` (a gateway's device port, or the core's direct port); it handshakes at its first
    /// ticket (or [`establish`](device_sim::video::SessionTickets::establish)), waiting 10 s at most.
    pub async fn session_tickets(
        &self,
        i: usize,
        target: SocketAddr,
    ) -> Result<device_sim::video::SessionTickets> {
        let identity = self.devices(i..i + 1)?.pop().context("the device")?;
        Ok(device_sim::video::SessionTickets::connect(
            identity,
            self.sim.core_public_key,
            target,
            Duration::from_secs(10),
        )
        .await?)
    }

    /// Opens the store (read side; the core may be running: WAL allows it).
    pub fn store(&self) -> Result<core_stub::Store> {
        Ok(core_stub::Store::open(&self.store_path())?)
    }
}

/// A core running in-process.
#[derive(Debug)]
pub struct Core {
    /// Gateways connect here (QUIC).
    pub quic: SocketAddr,
    /// Devices with direct access send here (UDP).
    pub direct: SocketAddr,
    /// Device streams with direct access connect here (TCP).
    pub streams: SocketAddr,
    /// `/metrics`, `/live`, `/ready`.
    pub admin: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), core_stub::CoreError>>,
}

/// Starts the core of `dep` on ephemeral ports (or on `quic` if given, to come back where a
/// restarted core is expected).
pub async fn start_core(dep: &Deployment, quic: Option<SocketAddr>) -> Result<Core> {
    start_core_with(dep, quic, |_| {}).await
}

/// [`start_core`], with `tweak` applied to the loaded configuration first.
pub async fn start_core_with(
    dep: &Deployment,
    quic: Option<SocketAddr>,
    tweak: impl FnOnce(&mut core_stub::CoreConfig),
) -> Result<Core> {
    let mut config = core_stub::CoreConfig::load(&dep.core_config())?;
    config.listen_on_ephemeral_ports();
    if let Some(q) = quic {
        config.listen.quic = q;
    }
    tweak(&mut config);
    let listeners = core_stub::Listeners::bind(&config).await?;
    let (quic, direct, streams, admin) = (
        listeners.quic_addr(),
        listeners.direct_addr(),
        listeners.stream_addr(),
        listeners.admin_addr(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(core_stub::run(config, listeners, stop.clone()));
    wait_ready(admin).await?;
    Ok(Core {
        quic,
        direct,
        streams,
        admin,
        stop,
        task,
    })
}

impl Core {
    /// Graceful shutdown.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }

    /// The current `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        metrics::scrape(self.admin).await
    }
}

/// A gateway running in-process.
#[derive(Debug)]
pub struct Gateway {
    /// Devices send here (UDP).
    pub devices: SocketAddr,
    /// Device streams connect here (TCP; the same port number as `devices`).
    pub streams: SocketAddr,
    /// `/metrics`, `/live`, `/ready`.
    pub admin: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), gateway::GatewayError>>,
}

/// Starts gateway `k` of `dep` on ephemeral ports, connected to `core`, and waits until its
/// uplink is up.
pub async fn start_gateway(
    dep: &Deployment,
    k: u32,
    core: SocketAddr,
    hooks: gateway::Hooks,
) -> Result<Gateway> {
    start_gateway_on(dep, k, core, hooks, None).await
}

/// [`start_gateway`] with the device port at `devices` when given (a restarted gateway comes back
/// where its devices send; its stream port follows, the same number over TCP).
pub async fn start_gateway_on(
    dep: &Deployment,
    k: u32,
    core: SocketAddr,
    hooks: gateway::Hooks,
    devices: Option<SocketAddr>,
) -> Result<Gateway> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let cli = gateway::Cli {
        config: dep.gateway_config(k),
        listen_devices: Some(devices.unwrap_or(any)),
        listen_admin: Some(any),
        core: Some(core.into()),
        ready_file: None,
    };
    let config = gateway::GatewayConfig::load(&cli)?;
    let listeners = gateway::Listeners::bind(&config).await?;
    let (devices, admin) = (listeners.device_addr(), listeners.admin_addr());
    let streams = listeners
        .stream_addr()
        .context("the gateway's [streams] are off")?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(gateway::run(config, listeners, stop.clone(), hooks));
    wait_ready(admin).await?;
    Ok(Gateway {
        devices,
        streams,
        admin,
        stop,
        task,
    })
}

impl Gateway {
    /// Graceful shutdown.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }

    /// The current `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        metrics::scrape(self.admin).await
    }
}

/// Waits until `/ready` answers 200 (at most 20 s).
pub async fn wait_ready(admin: SocketAddr) -> Result<()> {
    for _ in 0..400 {
        if let Ok((200, _)) = metrics::http_get(admin, "/ready").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{admin} never became ready")
}

/// Fleet options for `devices` sending to `target`: `readings` each, `interval` apart.
pub fn fleet(
    dep: &Deployment,
    target: SocketAddr,
    devices: Vec<DeviceIdentity>,
    readings: u64,
    interval: Duration,
) -> FleetOptions {
    let mut o = FleetOptions::new(target, dep.sim.core_public_key, devices);
    o.readings_per_device = Some(readings);
    o.interval = interval;
    o.payload_bytes = 64;
    o
}

/// Checks the store against what the fleet saw: every acknowledged reading is stored, each once,
/// with exactly the bytes the device sent. Returns how many readings the store holds for the
/// fleet's devices.
pub fn verify_store(dep: &Deployment, summary: &FleetSummary, payload_bytes: usize) -> Result<u64> {
    let store = dep.store()?;
    let mut total = 0u64;
    for d in &summary.per_device {
        let rows = store.readings_of(&d.serial)?;
        let mut seen = std::collections::HashSet::new();
        for (seq, data) in &rows {
            if !seen.insert(*seq) {
                bail!("{}: reading {seq} stored twice", d.serial);
            }
            let want = device_sim::reading_payload(&d.serial, *seq, payload_bytes);
            if *data != want {
                bail!("{}: reading {seq} altered in the store", d.serial);
            }
        }
        for ReadingSeq(seq) in &d.acked {
            if !seen.contains(seq) {
                bail!(
                    "{}: acknowledged reading {seq} is not in the store",
                    d.serial
                );
            }
        }
        total += rows.len() as u64;
    }
    Ok(total)
}

/// Waits until each of `serials` has at least `n` readings in the store (a serial with no
/// subscription yet counts as none), for at most `limit`; fails naming the first one still short.
pub async fn wait_for_readings(
    store: &core_stub::Store,
    serials: &[String],
    n: usize,
    limit: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let short = serials
            .iter()
            .find(|s| store.readings_of(s).map_or(0, |r| r.len()) < n);
        let Some(serial) = short else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{serial} did not store {n} readings within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
