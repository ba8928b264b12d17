//! The command line (`docs/architecture.md`, "Command lines"): parsing, turning the config files
//! and flags into [`FleetOptions`], the live progress line and the exit code.
//!
//! ```text
//! device-sim run --config FILE [--devices N] [--skip K]                 (pre-provisioned fleet)
//! device-sim run --devices DIR [--serials A,B | --first N] --target HOST:PORT --core-key HEX
//!                [--clone-of DEVICE_DIR] [--allow-refused]                (devices with a secure
//!                                                                          element)
//!   common:      [--readings R|unlimited] [--interval-ms I] [--payload-bytes B] [--duration-secs D]
//!                [--via gateway|direct] [--target ADDR] [--json]
//!                [--wave-size N --wave-interval-ms M] [--sleepy --wake-every-ms M]
//!                [--follow-config] [--drain-timeout-ms T] [--handshake-retry-ms T]
//!                [--silence-timeout-ms T] [--refused-retry-ms T] [--refused-retry-max-ms T]
//!                [--move-to ADDR@MS]…
//! device-sim manufacture --count N --out DIR [--prefix P] [--model M] [--kek-file F]
//! device-sim bench [--json] [--quick] [--meters M] [--secs S] [--bin-dir DIR]
//! device-sim camera (--config FILE [--device INDEX|SERIAL] | --device-dir DIR --target ADDR
//!                   --core-key HEX) [--target ADDR] [--stream-target ADDR] [--direct]
//!                   [--status-every S] [--accident-after S] [--video-bytes N --video-seed SEED |
//!                   --video-file PATH] [--bitrate-mbps M] [--chunk-bytes B] [--max-attempts N]
//!                   [--duration-secs D] [--upload-id HEX] [--json]
//! device-sim probe --config FILE [--udp ADDR] [--tcp ADDR] [--device SERIAL] [--timeout-ms T]
//! device-sim flood --target ADDR --sources N --rate PER_SEC --duration-secs S
//!                  [--source-base 127.2.0.1] [--json]
//! device-sim forge --target ADDR --sessions HEX,HEX,… --count N [--rate R]
//!                  [--ciphertext-bytes B] [--json]
//! ```
//!
//! Exit codes of `run`: 0 everything acknowledged, 1 readings lost (or refused by a full outbox),
//! 2 bad usage, bad configuration or a local failure (one line `error: …` on stderr), 3 a device
//! with a secure element ended without a working subscription (unless `--allow-refused`, which
//! also leaves such devices' readings out of the verdict). `RELAY_CRASH_AT=device:<point>` makes
//! a device abort the process at that point of a key switch (kill tests). `manufacture` exits 0
//! or 2. `bench` exits 0 once every figure was measured, whether or not the targets were met, and
//! 2 when it could not run. `probe` exits 0 when nothing answered (unreachable), 1 when something
//! did, 2 on bad usage or a local failure. `flood` and `forge` exit 0 once they sent, 2 on bad
//! usage or a local failure. `camera` exits 0 when the video is stored with a matching SHA-256
//! and every status reading was acknowledged, 1 otherwise, 2 when it could not run.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use relay_protocol::payload::MAX_READING;
use tokio_util::sync::CancellationToken;

mod camera;

pub use camera::{camera_options, CameraArgs};

use crate::bench::{render_table, run_bench, BenchError, BenchOptions};
use crate::config::{load_config, load_fleet, ConfigError};
use crate::device_dir::{list_devices, DeviceDir, DeviceDirError};
use crate::factory::{manufacture, ManufactureOptions};
use crate::fleet::{
    crash_point_from_env, run_fleet, FleetOptions, FleetProgress, FleetSummary, Move, Waves,
};
use crate::flood::{run_flood, run_forge, FloodOptions, ForgeOptions};
use crate::meter::MeterConfig;
use crate::report::{lifecycle_table, progress_line, summary_table};
use relay_protocol::session::PublicKey;

/// Everything acknowledged.
pub const EXIT_OK: u8 = 0;
/// Some reading was never acknowledged.
pub const EXIT_LOST: u8 = 1;
/// Bad usage or configuration, or a local failure.
pub const EXIT_ERROR: u8 = 2;
/// `probe`: something answered, the target is reachable from here.
pub const EXIT_REACHABLE: u8 = 1;
/// `run`: a device with a secure element ended without a working subscription.
pub const EXIT_NO_SUBSCRIPTION: u8 = 3;

/// `device-sim`: simulated smart meters.
#[derive(Debug, Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated smart meters sending readings end to end to the core"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a fleet of meters against the gateway (or the core's direct port) and report:
    /// pre-provisioned meters (`--config`), or devices with a secure element made by
    /// `manufacture` (`--devices DIR`), which provision themselves and follow the lifecycle.
    Run(Box<RunArgs>),
    /// Make factory-fresh devices (each its own directory, a factory key generated inside its
    /// sealed key store, a device-unique sealing key) and the shipping manifest
    /// (`DIR/manifest.csv`: serial,factory_public_key,model) the owner imports into the core.
    Manufacture(ManufactureArgs),
    /// Start core-stub and gateway and measure the relay's cost: throughput against direct
    /// access, the core's handshake rate against snow's, memory per idle device, forged frames,
    /// handshakes under a flood, and bulk video over the stream transport (gateway against
    /// direct against raw TCP, the crypto's CPU share, meters' latency while a camera streams).
    Bench(BenchArgs),
    /// Check whether the core can be reached directly from here: a registered device's real
    /// handshake to a UDP address (only the core can complete it) and a TCP connection. Exit 0
    /// when nothing answered, 1 when something did (for field-network isolation checks).
    Probe(ProbeArgs),
    /// Forged HandshakeInit frames (random Noise bytes, random sender) from many loopback source
    /// addresses, round robin, paced to a rate: a handshake flood for the flood-resistance tests.
    /// Prints how many were sent.
    Flood(FloodArgs),
    /// Forged AdmittedTransport frames (random counter, ciphertext and tag) for the given
    /// session ids: junk the gateway must drop at its admission check. Prints how many were sent.
    Forge(ForgeArgs),
    /// One camera: status updates as readings over UDP datagrams every few seconds, and after
    /// an "accident" a video uploaded over the stream transport (TCP, end-to-end encrypted in
    /// chunks, resumed after failures). Exit 0 when the video is stored with a matching SHA-256
    /// and every status reading was acknowledged.
    Camera(Box<CameraArgs>),
}

/// `--readings`: a number per device, or `unlimited`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadingLimit {
    /// This many readings per device.
    Count(u64),
    /// No limit: until `--duration-secs`, or without one until SIGINT or SIGTERM.
    Unlimited,
}

impl FromStr for ReadingLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "unlimited" {
            return Ok(Self::Unlimited);
        }
        s.parse()
            .map(Self::Count)
            .map_err(|_| format!("{s:?} is neither a number nor `unlimited`"))
    }
}

/// `--move-to ADDR@MS`: at MS milliseconds after the start every device sends to ADDR instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveTo {
    /// `IP:PORT` or `HOST:PORT` (looked up when the options are built).
    pub addr: String,
    /// Milliseconds after the start.
    pub at_ms: u64,
}

impl FromStr for MoveTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, ms) = s
            .rsplit_once('@')
            .ok_or_else(|| format!("{s:?}: expected ADDR@MS (say 127.0.0.1:5684@3000)"))?;
        if addr.is_empty() {
            return Err(format!("{s:?}: no address before the @"));
        }
        let at_ms = ms
            .parse()
            .map_err(|_| format!("{s:?}: {ms:?} is not a number of milliseconds"))?;
        Ok(Self {
            addr: addr.to_owned(),
            at_ms,
        })
    }
}

/// Where the meters send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// The gateway's device port (`gateway` in the config).
    Gateway,
    /// The core's direct-access port (`direct` in the config).
    Direct,
}

/// `device-sim run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// `device-sim.toml`: a pre-provisioned fleet (keys from its `fleet.keys`). Without it,
    /// `--devices DIR` names devices with a secure element.
    #[arg(long, env = "DEVICE_SIM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With --config: simulate the first N devices of the fleet file (after --skip) [default:
    /// all]. Without --config: the directory `device-sim manufacture --out` made (one
    /// subdirectory per device; factory-fresh or provisioned, each device's state decides).
    #[arg(long, env = "DEVICE_SIM_DEVICES", value_name = "N|DIR")]
    pub devices: Option<String>,
    /// With --config: leave out the first K devices of the fleet file, so several fleets can
    /// share one file.
    #[arg(long, env = "DEVICE_SIM_SKIP", value_name = "K", default_value_t = 0)]
    pub skip: usize,
    /// With --devices DIR: only these serial numbers (comma-separated).
    #[arg(
        long,
        value_name = "A,B",
        value_delimiter = ',',
        conflicts_with = "first"
    )]
    pub serials: Vec<String>,
    /// With --devices DIR: only the first N devices (by serial number).
    #[arg(long, value_name = "N")]
    pub first: Option<usize>,
    /// The core's static public key (64 hex digits), for devices with a secure element (a
    /// device that followed a release uses the one in its state instead).
    #[arg(long, env = "DEVICE_SIM_CORE_KEY", value_name = "HEX")]
    pub core_key: Option<String>,
    /// Also run a clone of this device directory: a copy of its sealed subscription key and
    /// sealing key, without its factory key (for the fraud detector). May be given without
    /// --devices.
    #[arg(long, value_name = "DEVICE_DIR")]
    pub clone_of: Option<PathBuf>,
    /// Exit 0 even if a device with a secure element ends without a working subscription (its
    /// readings then do not count as lost either).
    #[arg(long)]
    pub allow_refused: bool,
    /// Readings per device, or `unlimited` (then the run lasts --duration-secs, or without it
    /// until SIGINT or SIGTERM) [default: 10, or unlimited within --duration-secs]. Sleepy
    /// devices send one per wake.
    #[arg(long, env = "DEVICE_SIM_READINGS", value_name = "R")]
    pub readings: Option<ReadingLimit>,
    /// Milliseconds between a meter's readings; 0 sends as fast as acknowledgements allow.
    #[arg(
        long,
        env = "DEVICE_SIM_INTERVAL_MS",
        value_name = "I",
        default_value_t = 1000
    )]
    pub interval_ms: u64,
    /// Bytes per reading body.
    #[arg(
        long,
        env = "DEVICE_SIM_PAYLOAD_BYTES",
        value_name = "B",
        default_value_t = 64
    )]
    pub payload_bytes: usize,
    /// Stop queuing readings after D seconds (then wait for outstanding acknowledgements).
    #[arg(long, env = "DEVICE_SIM_DURATION_SECS", value_name = "D")]
    pub duration_secs: Option<u64>,
    /// Send through the gateway or straight to the core (addresses from --config).
    #[arg(long, env = "DEVICE_SIM_VIA", value_enum, default_value_t = Via::Gateway)]
    pub via: Via,
    /// Send here instead of the config's `gateway` or `direct` address: `IP:PORT` or
    /// `HOST:PORT` (looked up once, at start). Required with --devices DIR.
    #[arg(long, env = "DEVICE_SIM_TARGET", value_name = "ADDR")]
    pub target: Option<String>,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long, env = "DEVICE_SIM_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
    /// Activation waves: start the devices N at a time (with --wave-interval-ms between waves)
    /// instead of spreading them over the first interval.
    #[arg(long, value_name = "N")]
    pub wave_size: Option<usize>,
    /// Milliseconds between two activation waves.
    #[arg(long, value_name = "M", default_value_t = 1000, requires = "wave_size")]
    pub wave_interval_ms: u64,
    /// Sleepy devices: wake every --wake-every-ms, handshake only if needed, send one reading,
    /// wait for its acknowledgement, sleep (no keepalives).
    #[arg(long)]
    pub sleepy: bool,
    /// Milliseconds between a sleepy device's wakes.
    #[arg(long, value_name = "M", default_value_t = 60_000, requires = "sleepy")]
    pub wake_every_ms: u64,
    /// Follow the configuration the core sends: report interval and report size replace
    /// --interval-ms and --payload-bytes once it arrives.
    #[arg(long)]
    pub follow_config: bool,
    /// After its last reading, how long a device waits for acknowledgements (a sleepy device:
    /// how long it stays awake at most).
    #[arg(long, value_name = "T", default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
    /// An unanswered handshake is retried after this many milliseconds (doubling up to 30 s).
    #[arg(long, value_name = "T", default_value_t = 1000)]
    pub handshake_retry_ms: u64,
    /// With readings outstanding and nothing heard from the core for this long, the session is
    /// presumed lost and a new handshake starts.
    #[arg(long, value_name = "T", default_value_t = 3000)]
    pub silence_timeout_ms: u64,
    /// After a refused handshake (suspended, not activated yet, …) wait this long before the
    /// next (doubling up to --refused-retry-max-ms).
    #[arg(long, value_name = "T", default_value_t = 5000)]
    pub refused_retry_ms: u64,
    /// The longest wait after refusals.
    #[arg(long, value_name = "T", default_value_t = 300_000)]
    pub refused_retry_max_ms: u64,
    /// Handover: at MS milliseconds after the start every device sends to ADDR instead (same
    /// socket, same session; the core moves the route on the first authenticated frame from the
    /// new path). Repeatable: `--move-to B@2000 --move-to CORE@4000`.
    #[arg(long = "move-to", value_name = "ADDR@MS")]
    pub move_to: Vec<MoveTo>,
}

/// `device-sim flood`.
#[derive(Debug, Args)]
pub struct FloodArgs {
    /// Where to send (a gateway's device port or the core's direct port on this host).
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// Distinct loopback source addresses, one socket each (round robin).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub sources: usize,
    /// Forged initiations per second over all sources (0: as fast as possible).
    #[arg(long, value_name = "PER_SEC", default_value_t = 1000)]
    pub rate: u64,
    /// How long, in seconds.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub duration_secs: u64,
    /// The first source address; the next ones count up from it (skipping x.y.z.0 and .255).
    #[arg(long, value_name = "IP", default_value = "127.2.0.1")]
    pub source_base: std::net::Ipv4Addr,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `device-sim forge`.
#[derive(Debug, Args)]
pub struct ForgeArgs {
    /// Where to send (a gateway's device port).
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// The session ids the frames name (hex, comma-separated), round robin.
    #[arg(long, value_name = "HEX,HEX", value_delimiter = ',', required = true, value_parser = crate::flood::parse_session_id)]
    pub sessions: Vec<relay_protocol::frame::SessionId>,
    /// Frames in all.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub count: u64,
    /// Frames per second (0: as fast as possible).
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub rate: u64,
    /// Ciphertext bytes per frame (a 64-byte reading seals into 89).
    #[arg(long, value_name = "B", default_value_t = 89)]
    pub ciphertext_bytes: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `device-sim manufacture`.
#[derive(Debug, Args)]
pub struct ManufactureArgs {
    /// How many devices.
    #[arg(long, value_name = "N")]
    pub count: usize,
    /// The output directory: one subdirectory per device and `manifest.csv` (must not exist
    /// yet).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Serial numbers are this prefix and a zero-padded number from 1 (`dev-000001`, …).
    #[arg(long, value_name = "SERIAL_PREFIX", default_value = "dev-")]
    pub prefix: String,
    /// The model, in the manifest.
    #[arg(long, value_name = "M", default_value = "relay-meter-1")]
    pub model: String,
    /// The sealing key file standing for the chip's device-unique key: a name inside each
    /// device's directory (one per device), or an absolute path (one shared by all devices:
    /// weaker, for throwaway fleets).
    #[arg(long, value_name = "F", default_value = "kek")]
    pub kek_file: PathBuf,
}

/// `device-sim bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print the results as one JSON object instead of a table (progress stays on stderr).
    #[arg(long, env = "DEVICE_SIM_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
    /// A short run: 10k idle devices only (no 100k memory point), 5k core handshakes, 64 MiB
    /// bulk transfers (instead of 256 MiB).
    #[arg(long)]
    pub quick: bool,
    /// Meters in each throughput run (one set through the gateway, another direct), and in each
    /// latency run of the bulk phase (one set idle, another while a camera streams).
    #[arg(long, value_name = "M", default_value_t = 200)]
    pub meters: usize,
    /// Length of each throughput run and of each latency run in seconds; the first second is
    /// not counted.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub secs: u64,
    /// Where the core-stub and gateway executables are [default: next to device-sim].
    #[arg(long, env = "DEVICE_SIM_BIN_DIR", value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where the core stores the bulk phase's videos (a new directory inside DIR, removed at the
    /// end), e.g. a tmpfs standing for a video volume of its own [default: the bench's
    /// deployment, on the same disk as the subscription database].
    #[arg(long, value_name = "DIR")]
    pub videos_dir: Option<PathBuf>,
}

/// `device-sim probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// `device-sim.toml`: the core's public key, the fleet, and the default `--udp` (`direct`).
    #[arg(long, env = "DEVICE_SIM_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// Where to send the handshake (the core's direct-access port) [default: `direct` of the
    /// config].
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<String>,
    /// Also try a TCP connection here (the core's admin port, say).
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<String>,
    /// The registered device whose key the handshake proves [default: the fleet file's last].
    #[arg(long, value_name = "SERIAL")]
    pub device: Option<String>,
    /// How long each probe waits for an answer, in milliseconds.
    #[arg(long, value_name = "T", default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// Why `run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A configuration file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A flag's value is out of range.
    #[error("{0}")]
    Usage(String),
    /// A device directory could not be opened.
    #[error(transparent)]
    Device(#[from] DeviceDirError),
}

/// Parses the command line, runs the subcommand and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    relay_ops::telemetry::init();
    let code = match cli.command {
        Command::Run(args) => run(*args),
        Command::Manufacture(args) => manufacture_command(args),
        Command::Bench(args) => bench(args),
        Command::Probe(args) => probe(args),
        Command::Flood(args) => flood(args),
        Command::Forge(args) => forge(args),
        Command::Camera(args) => camera::camera(*args),
    };
    ExitCode::from(code)
}

fn bench(args: BenchArgs) -> u8 {
    let json = args.json;
    let opts = BenchOptions {
        bin_dir: args.bin_dir,
        quick: args.quick,
        meters: args.meters,
        secs: args.secs,
        videos_dir: args.videos_dir,
    };
    // Dropping the bench future on Ctrl-C kills the daemons (kill_on_drop) and removes the
    // temporary deployment.
    let work = async {
        tokio::select! {
            r = run_bench(opts) => r,
            _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
        }
    };
    match run_and_print(work, json, render_table) {
        Ok(_) => EXIT_OK,
        Err(code) => code,
    }
}

/// Runs `work` on a new multi-threaded runtime (given up to 2 s to wind down), then prints its
/// report: one JSON line with `json`, else `table`. Returns the report, or the exit code of what
/// failed (already printed).
pub(crate) fn run_and_print<T, E>(
    work: impl std::future::Future<Output = Result<T, E>>,
    json: bool,
    table: impl FnOnce(&T) -> String,
) -> Result<T, u8>
where
    T: serde::Serialize,
    E: std::fmt::Display,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&e))?;
    let result = runtime.block_on(work);
    runtime.shutdown_timeout(Duration::from_secs(2));
    let report = result.map_err(|e| fail(&e))?;
    if json {
        let line = serde_json::to_string(&report).map_err(|e| fail(&e))?;
        println!("{line}");
    } else {
        print!("{}", table(&report));
    }
    Ok(report)
}

fn flood(args: FloodArgs) -> u8 {
    let target = match resolve("--target", &args.target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let opts = FloodOptions {
        target,
        sources: args.sources,
        rate: args.rate,
        duration: Duration::from_secs(args.duration_secs),
        source_base: args.source_base,
        seed: None,
    };
    print_attack(run_flood(&opts), args.json)
}

fn forge(args: ForgeArgs) -> u8 {
    let target = match resolve("--target", &args.target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let opts = ForgeOptions {
        target,
        sessions: args.sessions,
        count: args.count,
        rate: args.rate,
        ciphertext_bytes: args.ciphertext_bytes,
        seed: None,
    };
    print_attack(run_forge(&opts), args.json)
}

fn print_attack(
    result: Result<crate::flood::AttackReport, crate::flood::AttackError>,
    json: bool,
) -> u8 {
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => return fail(&e),
        }
    } else {
        println!("{}", report.line());
    }
    EXIT_OK
}

fn probe(args: ProbeArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(run_probe(args)) {
        Ok(true) => EXIT_REACHABLE,
        Ok(false) => EXIT_OK,
        Err(e) => fail(&e),
    }
}

/// Runs the probes, prints one line each and a verdict; `Ok(true)` when something answered.
async fn run_probe(args: ProbeArgs) -> Result<bool, CliError> {
    let config = load_config(&args.config)?;
    let fleet = load_fleet(&config.fleet)?;
    let identity = match &args.device {
        Some(serial) => fleet
            .into_iter()
            .find(|d| &d.serial == serial)
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--device {serial} is not in {}",
                    config.fleet.display()
                ))
            })?,
        None => fleet
            .into_iter()
            .last()
            .ok_or_else(|| CliError::Usage("the fleet file lists no device".into()))?,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let udp = match &args.udp {
        Some(a) => resolve("--udp", a)?,
        None => config.direct,
    };
    let local = |e: std::io::Error| CliError::Usage(format!("probe failed locally: {e}"));
    println!(
        "probing from here as {} (a real handshake: only the core can complete it)",
        identity.serial
    );
    let mut reachable = false;
    let got = crate::probe::probe_udp(udp, identity, config.core_public_key, timeout)
        .await
        .map_err(local)?;
    println!("udp {udp} handshake: {got}");
    reachable |= got.reachable();
    if let Some(tcp) = &args.tcp {
        let tcp = resolve("--tcp", tcp)?;
        let got = crate::probe::probe_tcp(tcp, timeout).await.map_err(local)?;
        println!("tcp {tcp} connect: {got}");
        reachable |= got.reachable();
    }
    println!(
        "result: {}",
        if reachable {
            "REACHABLE from here"
        } else {
            "unreachable from here"
        }
    );
    Ok(reachable)
}

/// `IP:PORT` as is, `HOST:PORT` through the system resolver (the first address).
fn resolve(flag: &str, addr: &str) -> Result<SocketAddr, CliError> {
    addr.to_socket_addrs()
        .map_err(|e| CliError::Usage(format!("{flag} {addr}: {e}")))?
        .next()
        .ok_or_else(|| CliError::Usage(format!("{flag} {addr}: no address")))
}

fn manufacture_command(args: ManufactureArgs) -> u8 {
    let opts = ManufactureOptions {
        count: args.count,
        out: args.out,
        prefix: args.prefix,
        model: args.model,
        kek_file: args.kek_file,
    };
    let count = opts.count;
    // About twenty progress lines for a large batch, none for a small one.
    let step = (count / 20).max(100);
    let result = manufacture(&opts, &|done| {
        if count >= 200 && (done % step == 0 || done == count) {
            eprintln!("manufactured {done}/{count}");
        }
    });
    match result {
        Ok(s) => {
            println!(
                "manufactured {} devices ({} … {}) in {} in {:.1} s; manifest: {}",
                s.devices,
                s.first,
                s.last,
                opts.out.display(),
                s.elapsed.as_secs_f64(),
                s.manifest.display()
            );
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

fn run(args: RunArgs) -> u8 {
    let json = args.json;
    let allow_refused = args.allow_refused;
    let opts = match fleet_options(args) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let table = |summary: &FleetSummary| {
        let mut out = summary_table(summary);
        if summary.lifecycle.is_some() {
            out.push_str(&lifecycle_table(summary));
        }
        out
    };
    match run_and_print(run_with_progress(opts), json, table) {
        Ok(summary) => exit_code_for(&summary, allow_refused),
        Err(code) => code,
    }
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    EXIT_ERROR
}

/// 0 when every reading generated was acknowledged, else 1.
pub fn exit_code(s: &FleetSummary) -> u8 {
    exit_code_for(s, false)
}

/// [`EXIT_NO_SUBSCRIPTION`] when a device with a secure element ended without a working
/// subscription (unless `allow_refused`), else 1 when a reading was lost (not counting, with
/// `allow_refused`, the readings of such devices), else 0.
pub fn exit_code_for(s: &FleetSummary, allow_refused: bool) -> u8 {
    let refused_device = |d: &&crate::fleet::DeviceResult| d.element && !d.working;
    if !allow_refused && s.per_device.iter().any(|d| refused_device(&d)) {
        return EXIT_NO_SUBSCRIPTION;
    }
    let lost = if allow_refused {
        s.per_device
            .iter()
            .filter(|d| !refused_device(d))
            .map(|d| d.unacked.len() as u64)
            .sum()
    } else {
        s.lost
    };
    if lost == 0 && s.refused == 0 {
        EXIT_OK
    } else {
        EXIT_LOST
    }
}

/// Loads the config and the fleet (or the device directories) named by `args` and builds the
/// options of the run.
pub fn fleet_options(args: RunArgs) -> Result<FleetOptions, CliError> {
    if args.payload_bytes > MAX_READING {
        return Err(CliError::Usage(format!(
            "--payload-bytes {} exceeds the maximum of {MAX_READING}",
            args.payload_bytes
        )));
    }
    let duration = args.duration_secs.map(Duration::from_secs);
    let readings = match (args.readings, duration) {
        (None, None) => Some(10),
        (Some(ReadingLimit::Count(n)), _) => Some(n),
        (None | Some(ReadingLimit::Unlimited), Some(_)) => None,
        // Until the shutdown signal: a count no run reaches, as the bench's fleets use.
        (Some(ReadingLimit::Unlimited), None) => Some(u64::MAX),
    };
    let unlimited = readings.is_none() || readings == Some(u64::MAX);
    let pace_ms = if args.sleepy {
        args.wake_every_ms
    } else {
        args.interval_ms
    };
    if unlimited && pace_ms == 0 {
        return Err(CliError::Usage(
            "--interval-ms 0 needs a number of --readings: the run would not end".into(),
        ));
    }
    let waves = match args.wave_size {
        None => None,
        Some(0) => return Err(CliError::Usage("--wave-size must be at least 1".into())),
        Some(size) => Some(Waves {
            size,
            interval: Duration::from_millis(args.wave_interval_ms),
        }),
    };
    if args.refused_retry_ms == 0 || args.handshake_retry_ms == 0 {
        return Err(CliError::Usage(
            "--handshake-retry-ms and --refused-retry-ms must be at least 1".into(),
        ));
    }
    let meter = MeterConfig {
        handshake_retry_initial: Duration::from_millis(args.handshake_retry_ms),
        handshake_retry_max: Duration::from_millis(args.handshake_retry_ms.max(30_000)),
        silence_timeout: Duration::from_millis(args.silence_timeout_ms),
        refused_retry_initial: Duration::from_millis(args.refused_retry_ms),
        refused_retry_max: Duration::from_millis(
            args.refused_retry_max_ms.max(args.refused_retry_ms),
        ),
        ..MeterConfig::default()
    };
    let mut moves = Vec::with_capacity(args.move_to.len());
    for m in &args.move_to {
        moves.push(Move {
            at: Duration::from_millis(m.at_ms),
            target: resolve("--move-to", &m.addr)?,
            name: m.addr.clone(),
        });
    }
    moves.sort_by_key(|m| m.at);
    let (target, target_name, core_public_key, devices, element_devices) = match &args.config {
        Some(config) => {
            let (target, core, devices) = fixed_fleet(config, &args)?;
            (target, None, core, devices, Vec::new())
        }
        None => {
            let (target, core, element) = element_fleet(&args)?;
            (target, args.target.clone(), core, Vec::new(), element)
        }
    };
    Ok(FleetOptions {
        readings_per_device: readings,
        interval: Duration::from_millis(args.interval_ms),
        payload_bytes: args.payload_bytes,
        duration,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        meter,
        element_devices,
        waves,
        sleepy: args
            .sleepy
            .then(|| Duration::from_millis(args.wake_every_ms)),
        follow_config: args.follow_config,
        crash_at: crash_point_from_env(),
        target_name,
        moves,
        ..FleetOptions::new(target, core_public_key, devices)
    })
}

/// `--config FILE`: the pre-provisioned fleet of `fleet.keys`.
fn fixed_fleet(
    config: &std::path::Path,
    args: &RunArgs,
) -> Result<(SocketAddr, PublicKey, Vec<crate::config::DeviceIdentity>), CliError> {
    if !args.serials.is_empty() || args.first.is_some() || args.clone_of.is_some() {
        return Err(CliError::Usage(
            "--serials, --first and --clone-of go with --devices DIR, not --config".into(),
        ));
    }
    let config = load_config(config)?;
    let mut devices = load_fleet(&config.fleet)?;
    if args.skip >= devices.len() {
        return Err(CliError::Usage(format!(
            "--skip {}, but {} lists only {} devices",
            args.skip,
            config.fleet.display(),
            devices.len()
        )));
    }
    devices.drain(..args.skip);
    let n = match &args.devices {
        None => devices.len(),
        Some(n) => n.parse().map_err(|_| {
            CliError::Usage(format!(
                "--devices {n}: with --config, a number of devices (a directory goes without \
                 --config)"
            ))
        })?,
    };
    if n == 0 {
        return Err(CliError::Usage("--devices must be at least 1".into()));
    }
    if n > devices.len() {
        return Err(CliError::Usage(format!(
            "--devices {n}, but {} lists only {} devices",
            config.fleet.display(),
            devices.len()
        )));
    }
    devices.truncate(n);
    let target = match (&args.target, args.via) {
        (Some(t), _) => resolve("--target", t)?,
        (None, Via::Gateway) => config.gateway,
        (None, Via::Direct) => config.direct,
    };
    Ok((target, config.core_public_key, devices))
}

/// `--devices DIR` and `--clone-of`: devices with a secure element.
fn element_fleet(args: &RunArgs) -> Result<(SocketAddr, PublicKey, Vec<DeviceDir>), CliError> {
    if args.devices.is_none() && args.clone_of.is_none() {
        return Err(CliError::Usage(
            "give --config FILE (a pre-provisioned fleet) or --devices DIR (from `device-sim \
             manufacture`)"
                .into(),
        ));
    }
    let target = args.target.as_deref().ok_or_else(|| {
        CliError::Usage("--target HOST:PORT is required with --devices DIR".into())
    })?;
    let target = resolve("--target", target)?;
    let core = args
        .core_key
        .as_deref()
        .ok_or_else(|| CliError::Usage("--core-key HEX is required with --devices DIR".into()))?;
    let core =
        PublicKey::from_hex(core).map_err(|e| CliError::Usage(format!("--core-key: {e}")))?;
    let mut dirs = Vec::new();
    if let Some(root) = &args.devices {
        let root = PathBuf::from(root);
        let paths = if args.serials.is_empty() {
            let mut all = list_devices(&root)?;
            if let Some(n) = args.first {
                if n == 0 || n > all.len() {
                    return Err(CliError::Usage(format!(
                        "--first {n}, but {} holds {} devices",
                        root.display(),
                        all.len()
                    )));
                }
                all.truncate(n);
            }
            if all.is_empty() {
                return Err(CliError::Usage(format!(
                    "{}: no device directories",
                    root.display()
                )));
            }
            all
        } else {
            args.serials.iter().map(|s| root.join(s)).collect()
        };
        for path in paths {
            dirs.push(DeviceDir::open(&path)?);
        }
    } else if !args.serials.is_empty() || args.first.is_some() {
        return Err(CliError::Usage(
            "--serials and --first select from --devices DIR".into(),
        ));
    }
    if let Some(original) = &args.clone_of {
        dirs.push(DeviceDir::open(original)?.clone_subscription()?);
    }
    Ok((target, core, dirs))
}

/// Runs the fleet with a progress line on stderr and SIGINT (Ctrl-C) and SIGTERM (`docker stop`,
/// which a process with PID 1 would otherwise ignore) wired to the shutdown token.
async fn run_with_progress(opts: FleetOptions) -> Result<FleetSummary, crate::fleet::FleetError> {
    let progress = Arc::new(FleetProgress::default());
    let shutdown = opts.shutdown.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        let interrupt = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = interrupt => {}
            () = terminate => {}
        }
        shutdown.cancel();
    });
    let done = CancellationToken::new();
    let reporter = tokio::spawn(report_progress(
        progress.clone(),
        Instant::now(),
        done.clone(),
    ));
    let result = run_fleet(opts, Some(progress)).await;
    done.cancel();
    let _ = reporter.await;
    result
}

/// Redraws the progress line about four times a second on a terminal; elsewhere (a log file, CI)
/// prints a line every five seconds.
async fn report_progress(progress: Arc<FleetProgress>, start: Instant, done: CancellationToken) {
    let tty = std::io::stderr().is_terminal();
    let period = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(5)
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = ticker.tick() => {
                let line = progress_line(&progress.snapshot(), start.elapsed());
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
        }
    }
    if tty {
        eprint!("\r\x1b[K");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::session::StaticKeypair;

    fn write_config(dir: &std::path::Path, devices: usize) -> PathBuf {
        let core = StaticKeypair::generate().expect("keypair");
        let mut keys = String::from("# test fleet\n");
        for i in 1..=devices {
            let kp = StaticKeypair::generate().expect("keypair");
            keys.push_str(&format!("meter-{i:05} {}\n", kp.private_hex_for_storage()));
        }
        std::fs::create_dir_all(dir.join("devices")).expect("mkdir");
        std::fs::write(dir.join("devices/fleet.keys"), keys).expect("write");
        let path = dir.join("devices/device-sim.toml");
        std::fs::write(
            &path,
            format!(
                "core_public_key = \"{}\"\ngateway = \"127.0.0.1:5683\"\ndirect = \"127.0.0.1:5684\"\nfleet = \"fleet.keys\"\n",
                core.public().to_hex()
            ),
        )
        .expect("write");
        path
    }

    fn parse(args: &[&str]) -> RunArgs {
        let mut argv = vec!["device-sim", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Run(a) => *a,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn builds_options_from_config_and_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), 3);
        let p = path.to_str().expect("utf-8");
        let o = fleet_options(parse(&["--config", p])).expect("valid");
        assert_eq!(o.devices.len(), 3);
        assert_eq!(o.target, "127.0.0.1:5683".parse().expect("addr"));
        assert_eq!(o.readings_per_device, Some(10));
        assert_eq!(o.interval, Duration::from_secs(1));

        let o = fleet_options(parse(&[
            "--config",
            p,
            "--devices",
            "2",
            "--via",
            "direct",
            "--duration-secs",
            "5",
            "--interval-ms",
            "20",
            "--payload-bytes",
            "200",
        ]))
        .expect("valid");
        assert_eq!(
            o.devices
                .iter()
                .map(|d| d.serial.as_str())
                .collect::<Vec<_>>(),
            ["meter-00001", "meter-00002"]
        );
        assert_eq!(o.target, "127.0.0.1:5684".parse().expect("addr"));
        assert_eq!(
            (o.readings_per_device, o.duration),
            (None, Some(Duration::from_secs(5)))
        );
        assert_eq!(
            (o.interval, o.payload_bytes),
            (Duration::from_millis(20), 200)
        );
    }

    #[test]
    fn a_container_fleet_skips_targets_by_name_and_runs_until_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), 5);
        let p = path.to_str().expect("utf-8");
        let o = fleet_options(parse(&[
            "--config",
            p,
            "--skip",
            "2",
            "--devices",
            "2",
            "--target",
            "localhost:5683",
            "--readings",
            "unlimited",
        ]))
        .expect("valid");
        assert_eq!(
            o.devices
                .iter()
                .map(|d| d.serial.as_str())
                .collect::<Vec<_>>(),
            ["meter-00003", "meter-00004"]
        );
        assert!(o.target.ip().is_loopback(), "{}", o.target);
        assert_eq!(o.target.port(), 5683);
        // No count and no duration: until SIGINT or SIGTERM.
        assert_eq!((o.readings_per_device, o.duration), (Some(u64::MAX), None));

        let o = fleet_options(parse(&[
            "--config",
            p,
            "--skip",
            "4",
            "--target",
            "10.0.0.7:1",
            "--readings",
            "unlimited",
            "--duration-secs",
            "3",
        ]))
        .expect("valid");
        assert_eq!(o.devices.len(), 1);
        assert_eq!(o.target, "10.0.0.7:1".parse().expect("addr"));
        assert_eq!(
            (o.readings_per_device, o.duration),
            (None, Some(Duration::from_secs(3)))
        );
        let o = fleet_options(parse(&["--config", p, "--readings", "7"])).expect("valid");
        assert_eq!(o.readings_per_device, Some(7));

        for args in [
            vec!["--config", p, "--skip", "5"],
            vec!["--config", p, "--skip", "4", "--devices", "2"],
            vec![
                "--config",
                p,
                "--readings",
                "unlimited",
                "--interval-ms",
                "0",
            ],
            vec!["--config", p, "--target", "no-such-host.invalid:1"],
            vec!["--config", p, "--target", "nonsense"],
        ] {
            let e = fleet_options(parse(&args))
                .expect_err("refused")
                .to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{e}");
        }
        assert!(
            Cli::try_parse_from(["device-sim", "run", "--config", p, "--readings", "many"])
                .is_err()
        );
        let Command::Probe(probe) = Cli::try_parse_from([
            "device-sim",
            "probe",
            "--config",
            p,
            "--udp",
            "10.0.0.2:5684",
            "--tcp",
            "10.0.0.2:9464",
        ])
        .expect("parses")
        .command
        else {
            panic!("not probe");
        };
        assert_eq!(
            (probe.udp.as_deref(), probe.tcp.as_deref(), probe.timeout_ms),
            (Some("10.0.0.2:5684"), Some("10.0.0.2:9464"), 3000)
        );
    }

    #[test]
    fn refuses_bad_requests_with_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), 2);
        let p = path.to_str().expect("utf-8");
        for args in [
            vec!["--config", p, "--devices", "3"],
            vec!["--config", p, "--devices", "0"],
            vec!["--config", p, "--payload-bytes", "5000"],
            vec!["--config", p, "--interval-ms", "0", "--duration-secs", "1"],
            vec!["--config", "/nonexistent/device-sim.toml"],
        ] {
            let e = fleet_options(parse(&args))
                .expect_err("refused")
                .to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{e}");
        }
        assert!(Cli::try_parse_from([
            "device-sim",
            "run",
            "--config",
            p,
            "--via",
            "carrier-pigeon"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["device-sim", "bench", "--quick", "--json"]).is_ok());
        let Command::Bench(b) = Cli::try_parse_from(["device-sim", "bench", "--meters", "50"])
            .expect("parses")
            .command
        else {
            panic!("not bench");
        };
        assert_eq!((b.meters, b.secs, b.quick), (50, 10, false));
    }

    fn camera(args: &[&str]) -> Result<crate::camera::CameraOptions, CliError> {
        let mut argv = vec!["device-sim", "camera"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Camera(a) => camera_options(&a),
            _ => panic!("not camera"),
        }
    }

    #[test]
    fn camera_addresses_come_from_the_config_or_the_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), 3);
        let p = path.to_str().expect("utf-8");
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let o = camera(&["--config", p, "--video-bytes", "5000"]).expect("valid");
        assert_eq!(o.device.serial(), "meter-00001");
        assert_eq!(
            (o.target, o.stream_target),
            (addr("127.0.0.1:5683"), addr("127.0.0.1:5683"))
        );
        assert_eq!(o.video.len(), 5000);
        assert_eq!(&o.video[..], &crate::video::video_bytes(1, 5000)[..]);
        assert_eq!(
            (o.status_every, o.accident_after),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!(
            (o.chunk_size, o.bitrate_bps, o.max_attempts, o.duration),
            (65_536, 0, 10, None)
        );

        let o = camera(&[
            "--config",
            p,
            "--device",
            "meter-00003",
            "--direct",
            "--video-bytes",
            "10",
            "--video-seed",
            "9",
            "--bitrate-mbps",
            "2.5",
            "--duration-secs",
            "1.5",
            "--upload-id",
            "000102030405060708090a0b0c0d0e0f",
        ])
        .expect("valid");
        assert_eq!(o.device.serial(), "meter-00003");
        assert_eq!(
            (o.target, o.stream_target),
            (addr("127.0.0.1:5684"), addr("127.0.0.1:5684"))
        );
        assert_eq!(&o.video[..], &crate::video::video_bytes(9, 10)[..]);
        assert_eq!(o.bitrate_bps, 2_500_000);
        assert_eq!(o.duration, Some(Duration::from_millis(1500)));
        assert_eq!(
            o.upload.map(|u| u.to_hex()).as_deref(),
            Some("000102030405060708090a0b0c0d0e0f")
        );

        let o = camera(&[
            "--config",
            p,
            "--device",
            "2",
            "--target",
            "10.0.0.1:7",
            "--video-bytes",
            "10",
        ])
        .expect("valid");
        assert_eq!(o.device.serial(), "meter-00002");
        assert_eq!(
            (o.target, o.stream_target),
            (addr("10.0.0.1:7"), addr("10.0.0.1:7"))
        );
        let o = camera(&[
            "--config",
            p,
            "--target",
            "10.0.0.1:7",
            "--stream-target",
            "10.0.0.2:8",
            "--video-bytes",
            "10",
        ])
        .expect("valid");
        assert_eq!(o.stream_target, addr("10.0.0.2:8"));

        for args in [
            vec!["--config", p, "--device", "4"],
            vec!["--config", p, "--device", "0"],
            vec!["--config", p, "--device", "meter-9"],
            vec!["--config", p, "--chunk-bytes", "512"],
            vec!["--config", p, "--video-bytes", "0"],
            vec!["--config", p, "--status-every", "0"],
            vec!["--config", p, "--bitrate-mbps=-1"],
            vec!["--config", p, "--upload-id", "abc"],
            vec!["--config", p, "--video-file", "/nonexistent/video"],
            vec!["--device-dir", "/nonexistent", "--core-key", "00"],
            vec![],
        ] {
            let e = camera(&args)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!e.is_empty() && !e.contains('\n'), "{args:?}: {e}");
        }
        assert!(Cli::try_parse_from([
            "device-sim",
            "camera",
            "--config",
            p,
            "--video-bytes",
            "1",
            "--video-file",
            "x"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["device-sim", "camera", "--device-dir", "d", "--config", p])
                .is_err()
        );
    }

    #[test]
    fn parses_handovers_and_the_attack_commands() {
        assert_eq!(
            "127.0.0.1:5684@3000".parse::<MoveTo>(),
            Ok(MoveTo {
                addr: "127.0.0.1:5684".into(),
                at_ms: 3000
            })
        );
        assert_eq!(
            "gw-b.example:5683@0".parse::<MoveTo>().map(|m| m.addr),
            Ok("gw-b.example:5683".into())
        );
        // IPv6 with brackets: the last @ splits.
        assert_eq!("[::1]:5683@250".parse::<MoveTo>().map(|m| m.at_ms), Ok(250));
        for bad in [
            "127.0.0.1:5684",
            "@100",
            "127.0.0.1:1@soon",
            "127.0.0.1:1@-5",
        ] {
            assert!(bad.parse::<MoveTo>().is_err(), "{bad}");
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), 1);
        let p = path.to_str().expect("utf-8");
        let o = fleet_options(parse(&[
            "--config",
            p,
            "--move-to",
            "127.0.0.1:7002@2000",
            "--move-to",
            "127.0.0.1:7001@1000",
        ]))
        .expect("valid");
        assert_eq!(
            o.moves
                .iter()
                .map(|m| (m.at.as_millis(), m.target.port(), m.name.as_str()))
                .collect::<Vec<_>>(),
            [
                (1000, 7001, "127.0.0.1:7001"),
                (2000, 7002, "127.0.0.1:7002")
            ],
            "in time order"
        );
        assert!(fleet_options(parse(&["--config", p, "--move-to", "nonsense:x@5"])).is_err());

        let Command::Flood(f) = Cli::try_parse_from([
            "device-sim",
            "flood",
            "--target",
            "127.0.0.1:5683",
            "--sources",
            "500",
            "--rate",
            "20000",
            "--duration-secs",
            "5",
        ])
        .expect("parses")
        .command
        else {
            panic!("not flood");
        };
        assert_eq!(
            (f.sources, f.rate, f.duration_secs, f.source_base, f.json),
            (500, 20_000, 5, std::net::Ipv4Addr::new(127, 2, 0, 1), false)
        );
        let Command::Forge(f) = Cli::try_parse_from([
            "device-sim",
            "forge",
            "--target",
            "127.0.0.1:5683",
            "--sessions",
            "0000abcd,0x10",
            "--count",
            "100000",
            "--json",
        ])
        .expect("parses")
        .command
        else {
            panic!("not forge");
        };
        assert_eq!(
            f.sessions,
            [
                relay_protocol::frame::SessionId(0xabcd),
                relay_protocol::frame::SessionId(0x10)
            ]
        );
        assert_eq!((f.count, f.rate, f.json), (100_000, 0, true));
        assert!(Cli::try_parse_from([
            "device-sim",
            "forge",
            "--target",
            "127.0.0.1:5683",
            "--sessions",
            "xyz"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["device-sim", "forge", "--target", "127.0.0.1:1"]).is_err());
    }
}
