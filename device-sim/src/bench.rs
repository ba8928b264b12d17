//! `device-sim bench`: the relay's cost, measured in one run on one machine against the real
//! `core-stub` and `gateway` binaries (started as child processes on 127.0.0.1, port 0).
//!
//! ```text
//!  core-stub init TMP ─▶ core-stub run ◀══ QUIC ══ gateway        (children, killed at the end)
//!  1. throughput: run_fleet ─▶ gateway ─▶ core, then run_fleet ─▶ core direct   ratio relay/direct
//!  2. handshakes: snow IK responder in-process (1 thread), then pre-built
//!                 HandshakeInits ─▶ core direct, responses counted               ratio core/raw
//!  3. memory:     VmRSS baseline, then idle sessions through the gateway from distinct
//!                 source addresses (127.0.0.2.., ports 20000..60000) ─▶ RSS per device
//!  4. forged:     forged AdmittedTransport frames for 1000 of those admitted sessions, from a
//!                 GSO blaster, to a plain UDP socket then to the gateway (two rounds each):
//!                 gateway drops/s (admission_mac) against the socket's receive rate, and the
//!                 core's frame counters before and after (the uplink stays untouched)
//!  5. flood:      both daemons restarted with the default cookie threshold; forged
//!                 HandshakeInits from thousands of loopback addresses (127.2.0.1..) through the
//!                 gateway at several times the core's handshake rate (phase 2), while fresh
//!                 devices handshake through it: the share that completes
//!  6. bulk:       (on the restarted daemons) a camera's video over the stream transport through
//!                 the gateway, straight to the core, and plain bytes over loopback TCP: MB/s,
//!                 gateway/direct and gateway/raw; the end-to-end crypto's share of the CPU the
//!                 gateway run took; meters' reading latency idle and while a camera streams
//! ```
//!
//! Phases 1–4 run with the core's cookie threshold out of reach and quotas too large to bite
//! (`[handshakes] cookie_above_per_sec`, `[admission] quota_*` in `core.toml`), so that they
//! measure forwarding and the Noise work rather than the flood defences; phase 5 measures those
//! with the defaults.
//!
//! Every phase uses devices of its own from the fleet file, so each handshake the core sees is a
//! first one for a fresh subscription and each idle device adds exactly one gateway flow and one
//! core session. Figures are ratios taken in the same run (see `shared/PERFORMANCE-NOTES.md`: these
//! machines are noisy); the absolute rates are printed for context only.
//!
//! Nothing here asserts: the command prints the figures, their targets and pass/fail, and exits 0
//! once every figure was measured (2 when it could not run).

mod blast;
mod bulk;
mod daemons;
mod handshakes;
mod idle;
mod table;
mod under_flood;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_protocol::session::PublicKey;
use serde::Serialize;

use crate::config::{load_config, load_fleet, ConfigError, DeviceIdentity};
use crate::fleet::{run_fleet, FleetError, FleetOptions, FleetProgress, FleetSummary};
use crate::flood::{AttackError, FloodOptions};
use crate::meter::MeterConfig;
use relay_protocol::frame::SessionId;

pub use bulk::{Bulk, BulkRun, Cpu, LatencyRun, MetersUnderStream};
pub use table::render_table;

/// Relay throughput must be at least this share of the direct path's.
pub const TARGET_RELAY_RATIO: f64 = 0.80;
/// The core's handshake rate must be at least this share of snow's raw responder rate.
pub const TARGET_HANDSHAKE_RATIO: f64 = 0.80;
/// Gateway memory per connected idle device, at most.
pub const TARGET_GATEWAY_BYTES: f64 = 256.0;
/// Core memory per connected idle device, at most.
pub const TARGET_CORE_BYTES: f64 = 1024.0;
/// The gateway must drop forged frames at least at this share of a plain socket's receive rate.
pub const TARGET_FILTER_RATIO: f64 = 0.90;
/// Real devices' handshakes that must complete under the flood, at least.
pub const TARGET_FLOOD_SUCCESS: f64 = 0.99;

/// Readings sent and unacknowledged per meter in the throughput phase.
const WINDOW: usize = 32;
/// Reading body size in the throughput phase.
const PAYLOAD_BYTES: usize = 64;
/// Acknowledgements before this point of a throughput run are not counted (handshakes, ramp-up).
const WARMUP: Duration = Duration::from_secs(1);
/// Handshakes timed for snow's raw rate (repeated until [`RAW_MIN_TIME`] has passed).
const RAW_HANDSHAKES: usize = 2000;
const RAW_MIN_TIME: Duration = Duration::from_secs(2);
/// Sockets sending HandshakeInits to the core, and how many each keeps unanswered at most.
const HANDSHAKE_SOCKETS: usize = 4;
const HANDSHAKE_OUTSTANDING: usize = 32;
/// Idle-session handshakes in flight at once, and each one's limits.
const IDLE_CONCURRENCY: usize = 512;
/// How long the daemons get to start.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Phases 1–4: a cookie threshold no phase reaches, and quotas no session reaches (but still
/// counted by the gateway).
const UNREACHED_COOKIE_THRESHOLD: i64 = 100_000_000;
const UNREACHED_QUOTA: i64 = 4_000_000_000;
/// Admitted sessions the forged frames name, and their ciphertext (a 64-byte reading's).
const FORGED_SESSIONS: usize = 1000;
const FORGED_CIPHERTEXT: usize = 89;
/// Distinct segment batches the blaster cycles through.
const FORGED_BATCHES: usize = 64;
/// Each blast's length, the rounds (plain socket, then gateway, each round), and the pause after
/// a blast for the receiver to drain its socket buffer before it is read.
const BLAST: Duration = Duration::from_secs(3);
const BLAST_ROUNDS: usize = 2;
const BLAST_SETTLE: Duration = Duration::from_millis(300);
/// The flood: this many times the core's handshake rate (phase 2), within these bounds.
const FLOOD_FACTOR: f64 = 4.0;
const FLOOD_MIN_RATE: u64 = 8_000;
const FLOOD_MAX_RATE: u64 = 100_000;
/// Forged initiations per second per source at most, below the gateway's default per-source
/// bucket (5/s): the flood passes the buckets and reaches the core in full.
const FLOOD_PER_SOURCE: u64 = 4;
const FLOOD_MIN_SOURCES: usize = 500;
const FLOOD_MAX_SOURCES: usize = 25_000;
const FLOOD_SOURCE_BASE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 2, 0, 1);
/// The real devices start this long into the flood, spread over `FLOOD_SPREAD`; the flood lasts
/// until their last attempts are over.
const FLOOD_START_AFTER: Duration = Duration::from_secs(1);
const FLOOD_SPREAD: Duration = Duration::from_secs(5);
const FLOOD_LENGTH: Duration = Duration::from_secs(13);
/// Cameras of the bulk phase: direct, gateway, and the one streaming while meters report.
const BULK_CAMERAS: usize = 3;
/// Pause before reading RSS, so that the daemons' queues drained and the allocator settled.
const SETTLE: Duration = Duration::from_secs(1);

/// What `device-sim bench` was asked to do.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Where `core-stub` and `gateway` are; the directory of the running executable by default.
    pub bin_dir: Option<PathBuf>,
    /// 10k idle devices only, fewer handshakes.
    pub quick: bool,
    /// Meters in each throughput run.
    pub meters: usize,
    /// Length of each throughput run.
    pub secs: u64,
    /// Where the core stores the bulk phase's videos: a new directory is made inside; `None`: the
    /// deployment's `core/videos`, on the same file system as the subscription database.
    pub videos_dir: Option<PathBuf>,
}

impl BenchOptions {
    /// The phases' sizes.
    pub fn plan(&self) -> BenchPlan {
        BenchPlan {
            meters: self.meters,
            duration: Duration::from_secs(self.secs),
            core_handshakes: if self.quick { 5_000 } else { 20_000 },
            idle_milestones: if self.quick {
                vec![10_000]
            } else {
                vec![10_000, 100_000]
            },
            flood_devices: if self.quick { 200 } else { 500 },
            bulk_bytes: if self.quick { 64 << 20 } else { 256 << 20 },
        }
    }
}

/// How big each phase is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchPlan {
    /// Meters per throughput run (one set through the gateway, another set direct).
    pub meters: usize,
    /// Each throughput run's length.
    pub duration: Duration,
    /// HandshakeInits sent to the core.
    pub core_handshakes: usize,
    /// Idle devices at which memory is read, ascending.
    pub idle_milestones: Vec<usize>,
    /// Real devices handshaking under the flood.
    pub flood_devices: usize,
    /// Bytes of each bulk transfer (one camera video).
    pub bulk_bytes: usize,
}

impl BenchPlan {
    /// Idle devices at the last milestone.
    pub fn idle_devices(&self) -> usize {
        self.idle_milestones.last().copied().unwrap_or(0)
    }

    /// Devices to provision: each phase gets its own (the bulk phase: three cameras and two sets
    /// of meters).
    pub fn fleet_devices(&self) -> usize {
        2 * self.meters
            + self.core_handshakes
            + self.idle_devices()
            + self.flood_devices
            + BULK_CAMERAS
            + 2 * self.meters
    }
}

/// Why the bench could not produce its figures: the caller's options or the local system.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag's value is out of range.
    #[error("{0}")]
    Usage(String),
    /// `core-stub` or `gateway` is not where it was looked for.
    #[error(
        "{0} not found (build them with cargo build --release -p core-stub -p gateway, or point \
         --bin-dir at them)"
    )]
    MissingBinary(PathBuf),
    /// A daemon failed to start, exited, or misbehaved.
    #[error("{0}")]
    Daemon(String),
    /// Some local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The deployment written by `core-stub init` could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A throughput run could not start.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The Noise library refused something (key material, state): a local failure.
    #[error("noise: {0}")]
    Noise(String),
    /// The flood could not run.
    #[error("flood: {0}")]
    Attack(#[from] AttackError),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// Everything the bench measured: printed as a table, or as one JSON object with `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The command line the bench was run with.
    pub command_line: Vec<String>,
    /// Where it ran.
    pub machine: Machine,
    /// Whether `--quick` was given.
    pub quick: bool,
    /// Devices provisioned by `core-stub init` (each phase uses its own).
    pub fleet_devices: usize,
    /// Relay against direct readings throughput.
    pub throughput: Throughput,
    /// The core's handshake rate against snow's.
    pub handshakes: Handshakes,
    /// Resident memory per idle device.
    pub memory: Memory,
    /// The gateway's drop rate for forged frames against a plain socket's receive rate.
    pub forged_frames: ForgedFrames,
    /// Real devices' handshakes under a flood of forged ones.
    pub flood: FloodHandshakes,
    /// A camera's video through the gateway against direct and raw TCP; meters' latency while
    /// it streams.
    pub bulk: Bulk,
    /// Each figure that has a target, with the verdict.
    pub targets: Vec<TargetCheck>,
    /// Whether every target was met.
    pub all_targets_met: bool,
}

/// The machine, for reading the figures against.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs available to this process.
    pub nproc: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// The kernel release.
    pub kernel: Option<String>,
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    pub memory_bytes: Option<u64>,
}

/// The throughput phase.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Meters per run.
    pub meters: usize,
    /// Readings in flight per meter at most.
    pub window: usize,
    /// Reading body size.
    pub payload_bytes: usize,
    /// What the rates count.
    pub measured: String,
    /// Through the gateway.
    pub relay: PathRun,
    /// Straight to the core's direct port.
    pub direct: PathRun,
    /// `relay.acked_per_sec / direct.acked_per_sec`.
    pub ratio: f64,
}

/// Datagrams dropped, cumulative or over a phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Drops {
    /// By the kernel at the core's UDP sockets (receive buffer full).
    pub kernel_at_core: u64,
    /// By the kernel at the gateway's UDP sockets.
    pub kernel_at_gateway: u64,
    /// By the kernel at every UDP socket on the machine (`RcvbufErrors`): the rest is at the
    /// bench's own sockets.
    pub kernel_total: u64,
    /// `core_frames_dropped_total`, every reason.
    pub core_frames_dropped: f64,
    /// `gateway_frames_dropped_total`, every reason.
    pub gateway_frames_dropped: f64,
}

impl Drops {
    fn plus(self, other: Drops) -> Drops {
        Drops {
            kernel_at_core: self.kernel_at_core + other.kernel_at_core,
            kernel_at_gateway: self.kernel_at_gateway + other.kernel_at_gateway,
            kernel_total: self.kernel_total + other.kernel_total,
            core_frames_dropped: self.core_frames_dropped + other.core_frames_dropped,
            gateway_frames_dropped: self.gateway_frames_dropped + other.gateway_frames_dropped,
        }
    }

    fn since(self, before: Drops) -> Drops {
        Drops {
            kernel_at_core: self.kernel_at_core.saturating_sub(before.kernel_at_core),
            kernel_at_gateway: self
                .kernel_at_gateway
                .saturating_sub(before.kernel_at_gateway),
            kernel_total: self.kernel_total.saturating_sub(before.kernel_total),
            core_frames_dropped: self.core_frames_dropped - before.core_frames_dropped,
            gateway_frames_dropped: self.gateway_frames_dropped - before.gateway_frames_dropped,
        }
    }
}

/// One throughput run.
#[derive(Clone, Debug, Serialize)]
pub struct PathRun {
    /// Readings acknowledged per second within the measured window.
    pub acked_per_sec: f64,
    /// Readings acknowledged within the measured window.
    pub acked_in_window: u64,
    /// Length of the measured window, in seconds.
    pub window_secs: f64,
    /// The whole run, handshakes and drain included.
    pub summary: FleetSummary,
    /// Datagrams dropped during the run, and where.
    pub drops: Drops,
}

/// The handshake phase.
#[derive(Clone, Debug, Serialize)]
pub struct Handshakes {
    /// snow's `Noise_IK_25519_ChaChaPoly_BLAKE2s` responder (build, read message 1, write message
    /// 2, split), one thread, in this process.
    pub raw_per_sec: f64,
    /// Responder handshakes timed for `raw_per_sec`.
    pub raw_count: u64,
    /// HandshakeResponses per second from the core, first send to last response.
    pub core_per_sec: f64,
    /// HandshakeInits sent to the core (each from a distinct registered device).
    pub core_sent: u64,
    /// HandshakeResponses received.
    pub core_responses: u64,
    /// Inits never answered (given up after a second of silence; nothing is resent).
    pub core_unanswered: u64,
    /// From the first send to the last response, in seconds.
    pub core_elapsed_secs: f64,
    /// Increase of `core_handshakes_total{result="accepted"}` over the phase, if scraped.
    pub core_accepted_metric: Option<f64>,
    /// Datagrams dropped while the core was measured, and where.
    pub core_drops: Drops,
    /// `core_per_sec / raw_per_sec`.
    pub ratio: f64,
}

/// The memory phase.
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    /// RSS right after start-up, in bytes.
    pub startup: Rss,
    /// RSS after the throughput and handshake phases: what per-device figures are measured from.
    pub baseline: Rss,
    /// One per milestone.
    pub points: Vec<MemoryPoint>,
}

/// Resident set sizes, in bytes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Rss {
    /// The gateway's.
    pub gateway: u64,
    /// The core's.
    pub core: u64,
}

/// Memory with this many idle devices connected.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPoint {
    /// Idle sessions established through the gateway so far.
    pub devices: usize,
    /// RSS now.
    pub rss: Rss,
    /// `(gateway RSS - baseline) / devices`.
    pub gateway_bytes_per_device: f64,
    /// `(core RSS - baseline) / devices`.
    pub core_bytes_per_device: f64,
    /// From the previous milestone to this one: `(RSS - RSS then) / (devices - devices then)`.
    pub gateway_marginal_bytes_per_device: Option<f64>,
    /// As above, for the core.
    pub core_marginal_bytes_per_device: Option<f64>,
    /// `gateway_flows` as scraped.
    pub gateway_flows: Option<f64>,
    /// `core_sessions` as scraped.
    pub core_sessions: Option<f64>,
    /// Devices of this step that got no session in three attempts.
    pub failed: u64,
    /// Attempts (of all devices so far) that timed out and were retried or given up.
    pub timeouts: u64,
    /// Source ports skipped because they were in use.
    pub ports_skipped: u64,
}

/// The forged-frame phase: the same blaster against a plain UDP socket and against the
/// gateway's device port, in alternating rounds.
#[derive(Clone, Debug, Serialize)]
pub struct ForgedFrames {
    /// Admitted session ids the frames name (the gateway holds their keys).
    pub sessions: usize,
    /// Bytes per forged frame.
    pub frame_bytes: usize,
    /// Distinct forged frames cycled through.
    pub distinct_frames: usize,
    /// Blaster threads, and datagrams per send call (UDP segmentation offload; 1 without).
    pub blaster_threads: usize,
    /// Datagrams per send call.
    pub segments_per_send: usize,
    /// Each blast's length, in seconds.
    pub blast_secs: f64,
    /// One entry per round.
    pub rounds: Vec<BlastRound>,
    /// The best round's receive rate of the plain socket with the gateway's receive calls
    /// (`recvmmsg` and GRO), datagrams/s: the raw rate the target compares against.
    pub plain_received_per_sec: f64,
    /// The best round's receive rate of the plain socket with one `recv_from` per datagram.
    pub plain_recv_from_per_sec: f64,
    /// The best round's drop rate of the gateway for bad admission tags (frames/s).
    pub gateway_dropped_per_sec: f64,
    /// `gateway_dropped_per_sec / plain_received_per_sec`.
    pub ratio: f64,
    /// Over the gateway rounds: `gateway_device_frames_received_total` increase.
    pub gateway_received: Option<f64>,
    /// Over the gateway rounds: `gateway_frames_dropped_total{reason="admission_mac"}` increase.
    pub gateway_dropped_admission_mac: Option<f64>,
    /// Over the gateway rounds: every other drop reason's increase.
    pub gateway_dropped_other: Option<f64>,
    /// Over the gateway rounds: `gateway_frames_forwarded_total{direction="uplink"}` increase.
    pub gateway_forwarded_uplink: Option<f64>,
    /// Over the gateway rounds: `gateway_admission_queries_total` increase.
    pub gateway_admission_queries: Option<f64>,
    /// Over the gateway rounds: `core_frames_received_total` increase (every access).
    pub core_frames_received: Option<f64>,
    /// Over the gateway rounds: `core_frames_dropped_total` increase (every reason).
    pub core_frames_dropped: Option<f64>,
    /// Nothing forged went up: no frame forwarded, queried about, received or dropped at the
    /// core (false also when a counter could not be read).
    pub uplink_untouched: bool,
    /// Datagrams dropped over the gateway rounds, and where.
    pub drops: Drops,
}

/// One round of the forged-frame phase.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BlastRound {
    /// Datagrams/s the blaster sent at the plain socket.
    pub plain_sent_per_sec: f64,
    /// Datagrams/s the plain socket received (batched receive, as the gateway's).
    pub plain_received_per_sec: f64,
    /// Datagrams/s the plain socket received with one `recv_from` per datagram.
    pub plain_recv_from_per_sec: f64,
    /// Datagrams/s the blaster sent at the gateway.
    pub gateway_sent_per_sec: f64,
    /// Forged frames/s the gateway dropped for their admission tag.
    pub gateway_dropped_per_sec: f64,
}

/// Handshakes under a flood.
#[derive(Clone, Debug, Serialize)]
pub struct FloodHandshakes {
    /// The core's handshake rate the flood is scaled to (phase 2), per second.
    pub core_capacity_per_sec: f64,
    /// Forged initiations per second asked for.
    pub flood_rate_per_sec: u64,
    /// Distinct loopback source addresses.
    pub flood_sources: usize,
    /// Forged initiations sent.
    pub flood_sent: u64,
    /// Forged initiations per second achieved.
    pub flood_sent_per_sec: f64,
    /// How long the flood lasted, in seconds.
    pub flood_secs: f64,
    /// Real devices, each one handshake (up to 3 attempts of 2 s).
    pub devices: usize,
    /// Of them, established.
    pub established: u64,
    /// `established / devices`.
    pub success_ratio: f64,
    /// Initiations the real devices sent (cookie echoes included).
    pub initiations: u64,
    /// Cookie challenges the real devices received.
    pub cookie_challenges: u64,
    /// First initiation to session, median, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile.
    pub latency_p99_ms: Option<f64>,
    /// `core_cookie_replies_total` increase.
    pub core_cookie_replies: Option<f64>,
    /// `core_handshakes_total{result="accepted"}` increase.
    pub core_accepted: Option<f64>,
    /// `core_frames_dropped_total{reason="stale_cookie"}` increase.
    pub core_stale_cookies: Option<f64>,
    /// `gateway_frames_dropped_total{reason="handshake_rate"}` increase.
    pub gateway_handshake_rate_drops: Option<f64>,
}

/// A figure held against its target.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// What.
    pub what: String,
    /// The figure.
    pub figure: f64,
    /// `">="` or `"<="`.
    pub relation: &'static str,
    /// The target.
    pub target: f64,
    /// Whether it is met.
    pub pass: bool,
}

impl TargetCheck {
    fn at_least(what: impl Into<String>, figure: f64, target: f64) -> Self {
        Self {
            what: what.into(),
            figure,
            relation: ">=",
            target,
            pass: figure >= target,
        }
    }

    fn at_most(what: impl Into<String>, figure: f64, target: f64) -> Self {
        Self {
            what: what.into(),
            figure,
            relation: "<=",
            target,
            pass: figure <= target,
        }
    }
}

/// One progress line on stderr.
fn progress(line: impl std::fmt::Display) {
    eprintln!("bench: {line}");
}

/// Runs every phase and reports. The daemons and the temporary deployment are gone when this
/// returns, and also when the future is dropped (Ctrl-C): the children are killed on drop.
pub async fn run_bench(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    let plan = opts.plan();
    if plan.meters == 0 {
        return Err(BenchError::Usage("--meters must be at least 1".into()));
    }
    if plan.duration <= WARMUP + Duration::from_secs(1) {
        return Err(BenchError::Usage(format!(
            "--secs must exceed {} (the first {} s are not counted)",
            WARMUP.as_secs() + 1,
            WARMUP.as_secs()
        )));
    }
    let needed = plan.meters + IDLE_CONCURRENCY + HANDSHAKE_SOCKETS + 64;
    if let Some(limit) = daemons::open_files_limit() {
        if needed as u64 > limit {
            return Err(BenchError::Usage(format!(
                "--meters {} needs about {needed} open files, the limit is {limit} (raise ulimit -n)",
                plan.meters
            )));
        }
    }
    let binaries = daemons::find_binaries(opts.bin_dir.as_deref())?;

    let dir = tempfile::Builder::new()
        .prefix("device-sim-bench.")
        .tempdir()
        .map_err(BenchError::io("temporary directory"))?;
    let fleet_devices = plan.fleet_devices();
    progress(format_args!(
        "core-stub init {} --devices {fleet_devices}",
        dir.path().display()
    ));
    daemons::init_deployment(&binaries.core, dir.path(), fleet_devices).await?;
    // 100k idle devices plus the throughput meters' flows exceed the default `flows.max`.
    let flows = plan.idle_devices() + 2 * plan.meters + 1000;
    daemons::ensure_gateway_flows(&dir.path().join("gateway-1/gateway.toml"), flows)?;
    let core_toml = dir.path().join("core/core.toml");
    daemons::edit_toml(
        &core_toml,
        &[
            (
                "handshakes",
                "cookie_above_per_sec",
                Some(UNREACHED_COOKIE_THRESHOLD),
            ),
            ("admission", "quota_frames", Some(UNREACHED_QUOTA)),
            ("admission", "quota_bytes", Some(UNREACHED_QUOTA)),
        ],
    )?;

    let sim = load_config(&dir.path().join("devices/device-sim.toml"))?;
    progress(format_args!("loading {fleet_devices} device keys"));
    let fleet_path = sim.fleet.clone();
    let mut fleet = tokio::task::spawn_blocking(move || load_fleet(&fleet_path))
        .await
        .map_err(|e| BenchError::Daemon(format!("fleet loader: {e}")))??;
    if fleet.len() < fleet_devices {
        return Err(BenchError::Daemon(format!(
            "core-stub init wrote {} devices, {fleet_devices} asked for",
            fleet.len()
        )));
    }
    let mut take = |n: usize| -> Vec<DeviceIdentity> { fleet.drain(..n).collect() };
    let relay_devices = take(plan.meters);
    let direct_devices = take(plan.meters);
    let handshake_devices = take(plan.core_handshakes);
    let idle_devices = take(plan.idle_devices());
    let flood_devices = take(plan.flood_devices);
    let mut cameras = take(BULK_CAMERAS).into_iter();
    let camera = |c: Option<DeviceIdentity>| {
        c.ok_or_else(|| BenchError::Daemon("too few devices for the bulk phase".into()))
    };
    let bulk_devices = bulk::BulkDevices {
        direct_camera: camera(cameras.next())?,
        gateway_camera: camera(cameras.next())?,
        streaming_camera: camera(cameras.next())?,
        idle_meters: take(plan.meters),
        streaming_meters: take(plan.meters),
    };

    let mut daemons = daemons::Daemons::start(&binaries, dir.path(), START_LIMIT).await?;
    progress(format_args!(
        "core ready (quic {}, direct {}, admin {}), gateway ready (devices {}, admin {})",
        daemons.core_quic,
        daemons.core_direct,
        daemons.core_admin,
        daemons.gateway_devices,
        daemons.gateway_admin
    ));
    let startup = daemons.rss()?;

    // 1. Throughput.
    let relay = throughput(
        &daemons,
        "relay",
        daemons.gateway_devices,
        sim.core_public_key,
        relay_devices,
        &plan,
    )
    .await?;
    daemons.check_alive()?;
    let direct = throughput(
        &daemons,
        "direct",
        daemons.core_direct,
        sim.core_public_key,
        direct_devices,
        &plan,
    )
    .await?;
    daemons.check_alive()?;
    let relay_ratio = ratio(relay.acked_per_sec, direct.acked_per_sec);
    progress(format_args!(
        "relay / direct = {:.1} %",
        100.0 * relay_ratio
    ));

    // 2. Handshakes.
    progress(format_args!(
        "snow IK responder, one thread: {RAW_HANDSHAKES} distinct initiations, for at least {} s",
        RAW_MIN_TIME.as_secs()
    ));
    let raw = tokio::task::spawn_blocking(|| {
        handshakes::raw_responder_rate(RAW_HANDSHAKES, RAW_MIN_TIME)
    })
    .await
    .map_err(|e| BenchError::Noise(format!("raw responder thread: {e}")))??;
    progress(format_args!("raw: {:.0} handshakes/s", raw.per_sec));
    progress(format_args!(
        "pre-building {} HandshakeInits from distinct devices",
        plan.core_handshakes
    ));
    let core_key = sim.core_public_key;
    let inits =
        tokio::task::spawn_blocking(move || handshakes::build_inits(handshake_devices, core_key))
            .await
            .map_err(|e| BenchError::Noise(format!("init builder thread: {e}")))??;
    let accepted_before = daemons
        .core_metric("core_handshakes_total{result=\"accepted\"}")
        .await;
    let drops_before = daemons.drops().await;
    progress(format_args!(
        "sending them to the core's direct port from {HANDSHAKE_SOCKETS} sockets, {HANDSHAKE_OUTSTANDING} outstanding each"
    ));
    let core = handshakes::core_rate(
        inits,
        daemons.core_direct,
        HANDSHAKE_SOCKETS,
        HANDSHAKE_OUTSTANDING,
    )
    .await?;
    let accepted_after = daemons
        .core_metric("core_handshakes_total{result=\"accepted\"}")
        .await;
    daemons.check_alive()?;
    progress(format_args!(
        "core: {:.0} handshakes/s ({} responses of {} sent)",
        core.per_sec, core.responses, core.sent
    ));
    let handshakes = Handshakes {
        raw_per_sec: raw.per_sec,
        raw_count: raw.count,
        core_per_sec: core.per_sec,
        core_sent: core.sent,
        core_responses: core.responses,
        core_unanswered: core.sent - core.responses,
        core_elapsed_secs: core.elapsed.as_secs_f64(),
        core_accepted_metric: accepted_before.zip(accepted_after).map(|(b, a)| a - b),
        core_drops: daemons.drops().await.since(drops_before),
        ratio: ratio(core.per_sec, raw.per_sec),
    };

    // 3. Memory.
    tokio::time::sleep(SETTLE).await;
    let baseline = daemons.rss()?;
    progress(format_args!(
        "baseline RSS: gateway {}, core {}",
        mib(baseline.gateway),
        mib(baseline.core)
    ));
    let mut points: Vec<MemoryPoint> = Vec::new();
    let mut sources = idle::SourceAddrs::new();
    let mut idle_devices = idle_devices.into_iter();
    let mut established = 0usize;
    let mut timeouts = 0u64;
    let mut previous: Option<(usize, Rss)> = None;
    let mut forged_ids: Vec<SessionId> = Vec::new();
    for &milestone in &plan.idle_milestones {
        let step: Vec<DeviceIdentity> = idle_devices
            .by_ref()
            .take(milestone.saturating_sub(established))
            .collect();
        progress(format_args!(
            "idle sessions through the gateway: {} more from distinct source addresses, {IDLE_CONCURRENCY} handshakes at a time",
            step.len()
        ));
        let outcome = idle::establish(
            step,
            sim.core_public_key,
            daemons.gateway_devices,
            &mut sources,
            IDLE_CONCURRENCY,
            established,
            FORGED_SESSIONS.saturating_sub(forged_ids.len()),
        )
        .await?;
        daemons.check_alive()?;
        forged_ids.extend(&outcome.sessions);
        established += outcome.established as usize;
        timeouts += outcome.timeouts;
        tokio::time::sleep(SETTLE).await;
        let rss = daemons.rss()?;
        let per = |now: u64, base: u64, n: usize| {
            if n == 0 {
                0.0
            } else {
                (now as f64 - base as f64) / n as f64
            }
        };
        let marginal = previous.map(|(n0, r0)| {
            let n = established.saturating_sub(n0);
            (per(rss.gateway, r0.gateway, n), per(rss.core, r0.core, n))
        });
        let point = MemoryPoint {
            devices: established,
            rss,
            gateway_bytes_per_device: per(rss.gateway, baseline.gateway, established),
            core_bytes_per_device: per(rss.core, baseline.core, established),
            gateway_marginal_bytes_per_device: marginal.map(|m| m.0),
            core_marginal_bytes_per_device: marginal.map(|m| m.1),
            gateway_flows: daemons.gateway_metric("gateway_flows").await,
            core_sessions: daemons.core_metric("core_sessions").await,
            failed: outcome.failed,
            timeouts,
            ports_skipped: sources.skipped(),
        };
        progress(format_args!(
            "{} idle devices: gateway {} ({:.0} B/device), core {} ({:.0} B/device), {} failed, {} timeouts",
            point.devices,
            mib(rss.gateway),
            point.gateway_bytes_per_device,
            mib(rss.core),
            point.core_bytes_per_device,
            point.failed,
            point.timeouts
        ));
        previous = Some((established, rss));
        points.push(point);
    }

    // 4. Forged frames.
    let forged_frames = forged_frames(&daemons, forged_ids).await?;
    daemons.check_alive()?;

    // 5. Handshakes under a flood, with the core's default cookie threshold.
    daemons.stop().await;
    daemons::edit_toml(&core_toml, &[("handshakes", "cookie_above_per_sec", None)])?;
    // The bulk phase's videos: on a volume of their own when asked.
    let own_videos = match &opts.videos_dir {
        Some(parent) => {
            let d = tempfile::Builder::new()
                .prefix("relay-bench-videos-")
                .tempdir_in(parent)
                .map_err(BenchError::io(parent.display().to_string()))?;
            daemons::edit_toml_values(
                &core_toml,
                &[(
                    "video",
                    "dir",
                    Some(toml::Value::String(d.path().display().to_string())),
                )],
            )?;
            Some(d)
        }
        None => None,
    };
    let videos_dir = own_videos
        .as_ref()
        .map_or_else(|| dir.path().join("core/videos"), |d| d.path().to_owned());
    progress(format_args!("videos stored in {}", videos_dir.display()));
    progress("restarting core-stub and gateway with the default cookie threshold");
    let mut daemons = daemons::Daemons::start(&binaries, dir.path(), START_LIMIT).await?;
    let flood = handshake_flood(
        &daemons,
        flood_devices,
        sim.core_public_key,
        handshakes.core_per_sec,
    )
    .await?;
    daemons.check_alive()?;

    // 6. Bulk: the stream transport.
    let bulk = bulk::run(
        &daemons,
        sim.core_public_key,
        bulk_devices,
        plan.bulk_bytes,
        plan.duration,
        &videos_dir,
    )
    .await?;
    daemons.check_alive()?;
    daemons.stop().await;
    drop(own_videos);
    drop(dir);

    let throughput = Throughput {
        meters: plan.meters,
        window: WINDOW,
        payload_bytes: PAYLOAD_BYTES,
        measured: format!(
            "readings acknowledged between t={} s and t={} s of each run (handshakes and drain excluded)",
            WARMUP.as_secs(),
            plan.duration.as_secs()
        ),
        relay,
        direct,
        ratio: relay_ratio,
    };
    let memory = Memory {
        startup,
        baseline,
        points,
    };
    let targets = targets(&throughput, &handshakes, &memory, &forged_frames, &flood);
    Ok(BenchReport {
        command_line: std::env::args().collect(),
        machine: daemons::machine(),
        quick: opts.quick,
        fleet_devices,
        all_targets_met: targets.iter().all(|t| t.pass),
        targets,
        throughput,
        handshakes,
        memory,
        forged_frames,
        flood,
        bulk,
    })
}

fn targets(
    t: &Throughput,
    h: &Handshakes,
    m: &Memory,
    f: &ForgedFrames,
    fl: &FloodHandshakes,
) -> Vec<TargetCheck> {
    let mut checks = vec![
        TargetCheck::at_least("relay / direct throughput", t.ratio, TARGET_RELAY_RATIO),
        TargetCheck::at_least("core / raw handshake rate", h.ratio, TARGET_HANDSHAKE_RATIO),
        TargetCheck::at_least(
            "gateway forged-frame drops / raw UDP receive rate",
            f.ratio,
            TARGET_FILTER_RATIO,
        ),
        TargetCheck::at_most(
            "forged frames reaching the uplink",
            if f.uplink_untouched { 0.0 } else { 1.0 },
            0.0,
        ),
        TargetCheck::at_least(
            "real handshakes completed under flood",
            fl.success_ratio,
            TARGET_FLOOD_SUCCESS,
        ),
    ];
    for p in &m.points {
        let k = thousands(p.devices);
        checks.push(TargetCheck::at_most(
            format!("gateway bytes per idle device at {k}"),
            p.gateway_bytes_per_device,
            TARGET_GATEWAY_BYTES,
        ));
        checks.push(TargetCheck::at_most(
            format!("core bytes per idle device at {k}"),
            p.core_bytes_per_device,
            TARGET_CORE_BYTES,
        ));
    }
    checks
}

/// `10000` as `10k`.
fn thousands(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Blaster threads: one is enough with segmentation offload and leaves the receiver its CPU;
/// more on a machine with cores to spare.
fn blaster_threads(segments: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if segments > 1 {
        (cpus / 4).clamp(1, 2)
    } else {
        (cpus / 2).clamp(1, 4)
    }
}

/// Phase 4: the blaster at a plain socket, then at the gateway, [`BLAST_ROUNDS`] times; the
/// gateway's and the core's counters around the gateway rounds.
async fn forged_frames(
    daemons: &daemons::Daemons,
    sessions: Vec<SessionId>,
) -> Result<ForgedFrames, BenchError> {
    if sessions.is_empty() {
        return Err(BenchError::Daemon(
            "no admitted session to forge frames for (every idle handshake failed?)".into(),
        ));
    }
    let segments = blast::gso_segments();
    let threads = blaster_threads(segments);
    let count = sessions.len();
    let batches = Arc::new(
        tokio::task::spawn_blocking(move || {
            blast::forged_batches(
                &sessions,
                FORGED_BATCHES,
                segments,
                FORGED_CIPHERTEXT,
                rand::random(),
            )
        })
        .await
        .map_err(|e| BenchError::Daemon(format!("frame builder: {e}")))?,
    );
    progress(format_args!(
        "forged frames: {} distinct {}-byte AdmittedTransport frames for {count} admitted sessions; blaster {threads} thread(s), {segments} datagrams per send; {} rounds of {} s against a plain socket, then the gateway",
        batches.frames(),
        batches.frame_len,
        BLAST_ROUNDS,
        BLAST.as_secs()
    ));
    let run = |target: SocketAddr| {
        let b = Arc::clone(&batches);
        async move {
            tokio::task::spawn_blocking(move || blast::blast(target, &b, threads, BLAST))
                .await
                .map_err(|e| BenchError::Daemon(format!("blaster: {e}")))?
        }
    };
    let admission_mac = "gateway_frames_dropped_total{reason=\"admission_mac\"}";
    let gateway_before = daemons.gateway_metrics().await;
    let core_before = daemons.core_metrics().await;
    let mut drops = Drops::default();
    let mut rounds = Vec::with_capacity(BLAST_ROUNDS);
    for round in 1..=BLAST_ROUNDS {
        // The same blast at a plain socket: one `recv_from` per datagram, then batched reads.
        let mut plain_rates = [(0.0, 0.0); 2];
        for (batched, rates) in [false, true].into_iter().zip(&mut plain_rates) {
            let receiver = blast::PlainReceiver::start(batched)?;
            let sent = run(receiver.addr).await?;
            tokio::time::sleep(BLAST_SETTLE).await;
            *rates = (sent.per_sec(), per_sec(receiver.received(), sent.elapsed));
        }
        let [(_, plain_recv_from_per_sec), (plain_sent_per_sec, plain_received_per_sec)] =
            plain_rates;

        let before = daemons.gateway_metric(admission_mac).await;
        let drops_before = daemons.drops().await;
        let gateway = run(daemons.gateway_devices).await?;
        tokio::time::sleep(BLAST_SETTLE).await;
        let after = daemons.gateway_metric(admission_mac).await;
        drops = drops.plus(daemons.drops().await.since(drops_before));
        let dropped = after.zip(before).map_or(0.0, |(a, b)| a - b);
        let gateway_dropped_per_sec = dropped / gateway.elapsed.as_secs_f64().max(1e-9);
        let r = BlastRound {
            plain_sent_per_sec,
            plain_received_per_sec,
            plain_recv_from_per_sec,
            gateway_sent_per_sec: gateway.per_sec(),
            gateway_dropped_per_sec,
        };
        progress(format_args!(
            "  round {round}: plain socket received {:.0}/s batched, {:.0}/s by recv_from (blaster {:.0}/s); gateway dropped {:.0}/s for bad tags (blaster {:.0}/s)",
            r.plain_received_per_sec,
            r.plain_recv_from_per_sec,
            r.plain_sent_per_sec,
            r.gateway_dropped_per_sec,
            r.gateway_sent_per_sec
        ));
        rounds.push(r);
    }
    let gateway_after = daemons.gateway_metrics().await;
    let core_after = daemons.core_metrics().await;
    let delta = |before: &Option<String>, after: &Option<String>, f: &dyn Fn(&str) -> f64| {
        before
            .as_deref()
            .zip(after.as_deref())
            .map(|(b, a)| f(a) - f(b))
    };
    let series = |name: &'static str| move |t: &str| daemons::metric(t, name).unwrap_or(0.0);
    let sum = |name: &'static str| move |t: &str| daemons::metric_sum(t, name);
    let gateway_received = delta(
        &gateway_before,
        &gateway_after,
        &series("gateway_device_frames_received_total"),
    );
    let gateway_dropped_admission_mac =
        delta(&gateway_before, &gateway_after, &series(admission_mac));
    let gateway_dropped_all = delta(
        &gateway_before,
        &gateway_after,
        &sum("gateway_frames_dropped_total"),
    );
    let gateway_forwarded_uplink = delta(
        &gateway_before,
        &gateway_after,
        &series("gateway_frames_forwarded_total{direction=\"uplink\"}"),
    );
    let gateway_admission_queries = delta(
        &gateway_before,
        &gateway_after,
        &sum("gateway_admission_queries_total"),
    );
    let core_frames_received = delta(
        &core_before,
        &core_after,
        &sum("core_frames_received_total"),
    );
    let core_frames_dropped = delta(&core_before, &core_after, &sum("core_frames_dropped_total"));
    let uplink_untouched = [
        gateway_forwarded_uplink,
        gateway_admission_queries,
        core_frames_received,
        core_frames_dropped,
    ]
    .iter()
    .all(|d| *d == Some(0.0));
    let best = |f: fn(&BlastRound) -> f64| rounds.iter().map(f).fold(0.0, f64::max);
    let plain_received_per_sec = best(|r| r.plain_received_per_sec);
    let plain_recv_from_per_sec = best(|r| r.plain_recv_from_per_sec);
    let gateway_dropped_per_sec = best(|r| r.gateway_dropped_per_sec);
    let forged = ForgedFrames {
        sessions: count,
        frame_bytes: batches.frame_len,
        distinct_frames: batches.frames(),
        blaster_threads: threads,
        segments_per_send: segments,
        blast_secs: BLAST.as_secs_f64(),
        plain_received_per_sec,
        plain_recv_from_per_sec,
        gateway_dropped_per_sec,
        ratio: ratio(gateway_dropped_per_sec, plain_received_per_sec),
        rounds,
        gateway_received,
        gateway_dropped_admission_mac,
        gateway_dropped_other: gateway_dropped_all
            .zip(gateway_dropped_admission_mac)
            .map(|(all, mac)| all - mac),
        gateway_forwarded_uplink,
        gateway_admission_queries,
        core_frames_received,
        core_frames_dropped,
        uplink_untouched,
        drops,
    };
    progress(format_args!(
        "forged frames: gateway {:.0}/s against plain socket {:.0}/s = {:.1} %; core frames received +{}, dropped +{}; uplink {}",
        forged.gateway_dropped_per_sec,
        forged.plain_received_per_sec,
        100.0 * forged.ratio,
        opt_count(forged.core_frames_received),
        opt_count(forged.core_frames_dropped),
        if forged.uplink_untouched { "untouched" } else { "TOUCHED" }
    ));
    Ok(forged)
}

/// Phase 5: forged initiations through the gateway at [`FLOOD_FACTOR`] times the core's
/// handshake rate, from as many loopback sources as keep each under the gateway's per-source
/// bucket (and the open-file limit allows), while `devices` handshake.
async fn handshake_flood(
    daemons: &daemons::Daemons,
    devices: Vec<DeviceIdentity>,
    core: PublicKey,
    core_capacity: f64,
) -> Result<FloodHandshakes, BenchError> {
    let rate =
        ((FLOOD_FACTOR * core_capacity).round() as u64).clamp(FLOOD_MIN_RATE, FLOOD_MAX_RATE);
    let files = daemons::open_files_limit().unwrap_or(1024) as usize;
    let sources = usize::try_from(rate / FLOOD_PER_SOURCE)
        .unwrap_or(FLOOD_MAX_SOURCES)
        .clamp(FLOOD_MIN_SOURCES, FLOOD_MAX_SOURCES)
        .min(files.saturating_sub(devices.len() + 256))
        .max(1);
    let n = devices.len();
    progress(format_args!(
        "handshake flood: {rate} forged HandshakeInits/s ({FLOOD_FACTOR} × the core's {core_capacity:.0}/s) from {sources} loopback sources through the gateway for {} s; {n} real devices handshake from t = {} s over {} s",
        FLOOD_LENGTH.as_secs(),
        FLOOD_START_AFTER.as_secs(),
        FLOOD_SPREAD.as_secs()
    ));
    let scrape = || async {
        (
            daemons.core_metric("core_cookie_replies_total").await,
            daemons
                .core_metric("core_handshakes_total{result=\"accepted\"}")
                .await,
            daemons
                .core_metric("core_frames_dropped_total{reason=\"stale_cookie\"}")
                .await,
            daemons
                .gateway_metric("gateway_frames_dropped_total{reason=\"handshake_rate\"}")
                .await,
        )
    };
    let before = scrape().await;
    let outcome = under_flood::handshakes_under_flood(
        devices,
        core,
        daemons.gateway_devices,
        FloodOptions {
            target: daemons.gateway_devices,
            sources,
            rate,
            duration: FLOOD_LENGTH,
            source_base: FLOOD_SOURCE_BASE,
            seed: None,
        },
        FLOOD_START_AFTER,
        FLOOD_SPREAD,
    )
    .await?;
    let after = scrape().await;
    // A counter the core did not expose before its first increment reads as 0.
    let delta = |a: Option<f64>, b: Option<f64>| a.map(|a| a - b.unwrap_or(0.0));
    let established = outcome.devices.iter().filter(|d| d.established).count() as u64;
    let mut latencies: Vec<Duration> = outcome.devices.iter().filter_map(|d| d.latency).collect();
    latencies.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let flood = FloodHandshakes {
        core_capacity_per_sec: core_capacity,
        flood_rate_per_sec: rate,
        flood_sources: outcome.flood.sources,
        flood_sent: outcome.flood.sent,
        flood_sent_per_sec: outcome.flood.sent_per_sec,
        flood_secs: outcome.flood.elapsed_secs,
        devices: n,
        established,
        success_ratio: if n == 0 {
            0.0
        } else {
            established as f64 / n as f64
        },
        initiations: outcome.devices.iter().map(|d| d.initiations).sum(),
        cookie_challenges: outcome.devices.iter().map(|d| d.cookie_challenges).sum(),
        latency_p50_ms: nearest_rank(&latencies, 50.0).map(ms),
        latency_p99_ms: nearest_rank(&latencies, 99.0).map(ms),
        core_cookie_replies: delta(after.0, before.0),
        core_accepted: delta(after.1, before.1),
        core_stale_cookies: delta(after.2, before.2),
        gateway_handshake_rate_drops: delta(after.3, before.3),
    };
    progress(format_args!(
        "handshake flood: {} of {n} real handshakes completed ({:.1} %), {} cookie challenges; flood sent {} ({:.0}/s); core cookie replies +{}, gateway handshake_rate drops +{}",
        flood.established,
        100.0 * flood.success_ratio,
        flood.cookie_challenges,
        flood.flood_sent,
        flood.flood_sent_per_sec,
        opt_count(flood.core_cookie_replies),
        opt_count(flood.gateway_handshake_rate_drops)
    ));
    Ok(flood)
}

fn per_sec(n: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn opt_count(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

/// Nearest-rank percentile of sorted values.
fn nearest_rank(sorted: &[Duration], p: f64) -> Option<&Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1)
}

/// One throughput run: `devices` meters as fast as their window allows for the plan's duration,
/// acknowledged readings counted between [`WARMUP`] and the end of queuing.
async fn throughput(
    daemons: &daemons::Daemons,
    name: &str,
    target: SocketAddr,
    core: PublicKey,
    devices: Vec<DeviceIdentity>,
    plan: &BenchPlan,
) -> Result<PathRun, BenchError> {
    progress(format_args!(
        "throughput {name}: {} meters -> {target}, window {WINDOW}, {PAYLOAD_BYTES} B readings, {} s",
        devices.len(),
        plan.duration.as_secs()
    ));
    let opts = FleetOptions {
        readings_per_device: Some(u64::MAX),
        interval: Duration::ZERO,
        payload_bytes: PAYLOAD_BYTES,
        duration: Some(plan.duration),
        drain_timeout: Duration::from_secs(5),
        // A short outbox keeps the window full without leaving thousands of readings to drain.
        meter: MeterConfig {
            window: WINDOW,
            outbox_cap: 4 * WINDOW,
            ..MeterConfig::default()
        },
        ..FleetOptions::new(target, core, devices)
    };
    let fleet_progress = Arc::new(FleetProgress::default());
    let start = Instant::now();
    let sampler = tokio::spawn(sample_window(
        fleet_progress.clone(),
        start + WARMUP,
        start + plan.duration,
    ));
    let drops_before = daemons.drops().await;
    let summary = run_fleet(opts, Some(fleet_progress)).await?;
    let drops = daemons.drops().await.since(drops_before);
    let (acked_in_window, window) = sampler
        .await
        .map_err(|e| BenchError::Daemon(format!("throughput sampler: {e}")))?;
    let window_secs = window.as_secs_f64();
    let acked_per_sec = if window_secs > 0.0 {
        acked_in_window as f64 / window_secs
    } else {
        0.0
    };
    progress(format_args!(
        "throughput {name}: {acked_per_sec:.0} acked readings/s ({acked_in_window} in {window_secs:.2} s; {} acked, {} retransmitted, {} lost in all)",
        summary.acknowledged, summary.retransmitted, summary.lost
    ));
    progress(format_args!(
        "  datagrams dropped: kernel at core {}, at gateway {}, in all {}; core dropped {:.0} frames, gateway {:.0}",
        drops.kernel_at_core,
        drops.kernel_at_gateway,
        drops.kernel_total,
        drops.core_frames_dropped,
        drops.gateway_frames_dropped
    ));
    Ok(PathRun {
        acked_per_sec,
        acked_in_window,
        window_secs,
        summary,
        drops,
    })
}

/// Acknowledgements counted between `from` and `to`, and the exact time between the two samples.
/// Prints the running count every two seconds.
async fn sample_window(
    progress_of: Arc<FleetProgress>,
    from: Instant,
    to: Instant,
) -> (u64, Duration) {
    tokio::time::sleep_until(from.into()).await;
    let (a0, t0) = (progress_of.snapshot().acked, Instant::now());
    let mut tick =
        tokio::time::interval_at((t0 + Duration::from_secs(2)).into(), Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(to.into()) => break,
            _ = tick.tick() => {
                let acked = progress_of.snapshot().acked - a0;
                progress(format_args!("  {acked} acked in {:.0} s", t0.elapsed().as_secs_f64()));
            }
        }
    }
    let (a1, t1) = (progress_of.snapshot().acked, Instant::now());
    (a1.saturating_sub(a0), t1 - t0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(quick: bool) -> BenchOptions {
        BenchOptions {
            bin_dir: None,
            quick,
            meters: 200,
            secs: 10,
            videos_dir: None,
        }
    }

    #[test]
    fn each_phase_gets_devices_of_its_own() {
        let p = opts(false).plan();
        assert_eq!(p.idle_milestones, [10_000, 100_000]);
        assert_eq!(p.fleet_devices(), 400 + 20_000 + 100_000 + 500 + 3 + 400);
        assert_eq!(p.bulk_bytes, 256 << 20);
        let q = opts(true).plan();
        assert_eq!(q.idle_milestones, [10_000]);
        assert_eq!(q.fleet_devices(), 400 + 5_000 + 10_000 + 200 + 3 + 400);
        assert_eq!(q.bulk_bytes, 64 << 20);
    }

    fn summary(acked: u64) -> FleetSummary {
        FleetSummary {
            devices: 200,
            queued: acked,
            sent: acked,
            acknowledged: acked,
            retransmitted: 0,
            frames_sent: 0,
            lost: 0,
            refused: 0,
            handshakes: 200,
            handshake_attempts: 200,
            bad_datagrams: 0,
            socket_errors: 0,
            latency_p50_ms: Some(1.0),
            latency_p99_ms: Some(2.0),
            latency_max_ms: Some(3.0),
            elapsed_secs: 10.0,
            acknowledged_per_sec: acked as f64 / 10.0,
            interrupted: false,
            lifecycle: None,
            device_reports: Vec::new(),
            per_device: Vec::new(),
        }
    }

    fn run(per_sec: f64) -> PathRun {
        PathRun {
            acked_per_sec: per_sec,
            acked_in_window: (per_sec * 9.0) as u64,
            window_secs: 9.0,
            summary: summary((per_sec * 10.0) as u64),
            drops: Drops::default(),
        }
    }

    #[test]
    fn renders_every_figure_with_its_verdict() {
        let throughput = Throughput {
            meters: 200,
            window: WINDOW,
            payload_bytes: PAYLOAD_BYTES,
            measured: "what".into(),
            relay: run(45_000.0),
            direct: run(50_000.0),
            ratio: 0.9,
        };
        let handshakes = Handshakes {
            raw_per_sec: 4000.0,
            raw_count: 8000,
            core_per_sec: 3000.0,
            core_sent: 100,
            core_responses: 100,
            core_unanswered: 0,
            core_elapsed_secs: 1.0,
            core_accepted_metric: Some(100.0),
            core_drops: Drops::default(),
            ratio: 0.75,
        };
        let rss = Rss {
            gateway: 1 << 20,
            core: 1 << 21,
        };
        let point = |devices, g, c| MemoryPoint {
            devices,
            rss,
            gateway_bytes_per_device: g,
            core_bytes_per_device: c,
            gateway_marginal_bytes_per_device: None,
            core_marginal_bytes_per_device: None,
            gateway_flows: Some(devices as f64),
            core_sessions: None,
            failed: 0,
            timeouts: 0,
            ports_skipped: 0,
        };
        let memory = Memory {
            startup: rss,
            baseline: rss,
            points: vec![point(10_000, 120.0, 900.0), point(100_000, 300.0, 800.0)],
        };
        let forged_frames = ForgedFrames {
            sessions: 1000,
            frame_bytes: 111,
            distinct_frames: 4096,
            blaster_threads: 1,
            segments_per_send: 64,
            blast_secs: 3.0,
            rounds: vec![BlastRound {
                plain_sent_per_sec: 1_500_000.0,
                plain_received_per_sec: 1_000_000.0,
                plain_recv_from_per_sec: 900_000.0,
                gateway_sent_per_sec: 1_500_000.0,
                gateway_dropped_per_sec: 930_000.0,
            }],
            plain_received_per_sec: 1_000_000.0,
            plain_recv_from_per_sec: 900_000.0,
            gateway_dropped_per_sec: 930_000.0,
            ratio: 0.93,
            gateway_received: Some(2_800_000.0),
            gateway_dropped_admission_mac: Some(2_790_000.0),
            gateway_dropped_other: Some(0.0),
            gateway_forwarded_uplink: Some(0.0),
            gateway_admission_queries: Some(0.0),
            core_frames_received: Some(0.0),
            core_frames_dropped: Some(0.0),
            uplink_untouched: true,
            drops: Drops::default(),
        };
        let flood = FloodHandshakes {
            core_capacity_per_sec: 4000.0,
            flood_rate_per_sec: 16_000,
            flood_sources: 4000,
            flood_sent: 208_000,
            flood_sent_per_sec: 16_000.0,
            flood_secs: 13.0,
            devices: 500,
            established: 493,
            success_ratio: 0.986,
            initiations: 1100,
            cookie_challenges: 480,
            latency_p50_ms: Some(40.0),
            latency_p99_ms: Some(900.0),
            core_cookie_replies: Some(150_000.0),
            core_accepted: Some(493.0),
            core_stale_cookies: Some(0.0),
            gateway_handshake_rate_drops: Some(10.0),
        };
        let targets = targets(&throughput, &handshakes, &memory, &forged_frames, &flood);
        let run = |mb_per_sec: f64| BulkRun {
            mb_per_sec,
            secs: 256.0 * 1.048_576 / mb_per_sec,
            bytes: 256 << 20,
            attempts: 1,
            intact: true,
        };
        let latency = |p99| LatencyRun {
            acknowledged: 20_000,
            lost: 0,
            p50_ms: Some(0.5),
            p99_ms: Some(p99),
            max_ms: Some(20.0),
        };
        let cpu = Cpu {
            gateway_secs: 0.8,
            core_secs: 1.0,
            bench_secs: 0.7,
            total_secs: 2.5,
        };
        let bulk = Bulk {
            bytes: 256 << 20,
            chunk_size: 65_536,
            raw: run(2000.0),
            direct: run(500.0),
            gateway: run(400.0),
            gateway_over_direct: 0.8,
            gateway_over_raw: 0.2,
            direct_over_raw: 0.25,
            crypto_ns_per_byte: 1.5,
            crypto_cpu_secs: 0.4,
            gateway_run_cpu: cpu,
            direct_run_cpu: cpu,
            crypto_cpu_share: 0.16,
            meters: MetersUnderStream {
                meters: 200,
                interval_ms: 100,
                secs: 10.0,
                warmup_secs: 1.0,
                idle: latency(2.0),
                streaming: latency(5.0),
                p99_ratio: 2.5,
                camera_bytes: 3_000_000_000,
                camera_mb_per_sec: 300.0,
                camera_videos: 11,
            },
        };
        let report = BenchReport {
            command_line: vec!["device-sim".into(), "bench".into()],
            machine: daemons::machine(),
            quick: false,
            fleet_devices: 120_400,
            all_targets_met: targets.iter().all(|t| t.pass),
            targets,
            throughput,
            handshakes,
            memory,
            forged_frames,
            flood,
            bulk,
        };
        let t = render_table(&report);
        let line = |start: &str| {
            t.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} in\n{t}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(line("relay / direct"), "relay / direct 90.0 % >= 80 % pass");
        assert_eq!(line("core / raw"), "core / raw 75.0 % >= 80 % FAIL");
        assert_eq!(
            line("gateway RSS per idle device, 100k"),
            "gateway RSS per idle device, 100k 300 B <= 256 B FAIL"
        );
        assert_eq!(
            line("core RSS per idle device, 10k"),
            "core RSS per idle device, 10k 900 B <= 1024 B pass"
        );
        assert_eq!(
            line("gateway filter / raw UDP receive"),
            "gateway filter / raw UDP receive 93.0 % >= 90 % pass"
        );
        assert_eq!(
            line("forged frames on the uplink"),
            "forged frames on the uplink (core counters) none none pass"
        );
        assert_eq!(
            line("real handshakes completed under flood"),
            "real handshakes completed under flood (500) 98.6 % >= 99 % FAIL"
        );
        assert!(t.contains("round 1: plain socket 1000000/s"), "{t}");
        assert_eq!(
            line("bulk: camera video via gateway"),
            "bulk: camera video via gateway (256 MiB) 400 MB/s"
        );
        assert_eq!(
            line("bulk: gateway / direct"),
            "bulk: gateway / direct 80.0 %"
        );
        assert_eq!(
            line("bulk: gateway / raw TCP"),
            "bulk: gateway / raw TCP 20.0 %"
        );
        assert_eq!(
            line("bulk: end-to-end crypto, share of CPU"),
            "bulk: end-to-end crypto, share of CPU (gateway run) 16.0 %"
        );
        assert_eq!(
            line("meters' p99 latency, camera streaming / idle"),
            "meters' p99 latency, camera streaming / idle × 2.50"
        );
        assert!(t.contains("some targets missed"), "{t}");
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&report).expect("json")).expect("parses");
        assert_eq!(json["targets"].as_array().map(Vec::len), Some(9));
        assert_eq!(json["forged_frames"]["uplink_untouched"], true);
        assert_eq!(json["flood"]["established"], 493);
        assert_eq!(json["bulk"]["gateway_over_direct"], 0.8);
        assert_eq!(json["bulk"]["meters"]["streaming"]["p99_ms"], 5.0);
        assert_eq!(json["bulk"]["gateway_run_cpu"]["total_secs"], 2.5);
        assert_eq!(json["all_targets_met"], false);
    }

    #[test]
    fn targets_compare_the_right_way() {
        assert!(TargetCheck::at_least("x", 0.8, 0.8).pass);
        assert!(!TargetCheck::at_least("x", 0.79, 0.8).pass);
        assert!(TargetCheck::at_most("x", 256.0, 256.0).pass);
        assert!(!TargetCheck::at_most("x", 257.0, 256.0).pass);
        assert_eq!(thousands(100_000), "100k");
        assert_eq!(thousands(12_345), "12345");
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
