//! The command line (`docs/architecture.md`, "Command lines"): parsing, turning the config files
//! and flags into [`FleetOptions`], the live progress line and the exit code.
//!
//! ```text
//! device-sim run --config FILE [--devices N] [--skip K] [--readings R|unlimited] [--interval-ms I]
//!                [--payload-bytes B] [--duration-secs D] [--via gateway|direct] [--target ADDR]
//!                [--json]
//! device-sim bench [--json] [--quick] [--meters M] [--secs S] [--bin-dir DIR]
//! device-sim probe --config FILE [--udp ADDR] [--tcp ADDR] [--device SERIAL] [--timeout-ms T]
//! ```
//!
//! Exit codes of `run`: 0 everything acknowledged, 1 readings lost (or refused by a full outbox),
//! 2 bad usage, bad configuration or a local failure (one line `error: …` on stderr). `bench`
//! exits 0 once every figure was measured, whether or not the targets were met, and 2 when it
//! could not run. `probe` exits 0 when nothing answered (unreachable), 1 when something did, 2 on
//! bad usage or a local failure.

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

use crate::bench::{render_table, run_bench, BenchError, BenchOptions};
use crate::config::{load_config, load_fleet, ConfigError};
use crate::fleet::{run_fleet, FleetOptions, FleetProgress, FleetSummary};
use crate::report::{progress_line, summary_table};

/// Everything acknowledged.
pub const EXIT_OK: u8 = 0;
/// Some reading was never acknowledged.
pub const EXIT_LOST: u8 = 1;
/// Bad usage or configuration, or a local failure.
pub const EXIT_ERROR: u8 = 2;
/// `probe`: something answered, the target is reachable from here.
pub const EXIT_REACHABLE: u8 = 1;

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
    /// Run a fleet of meters against the gateway (or the core's direct port) and report.
    Run(RunArgs),
    /// Start core-stub and gateway and measure the relay's cost: throughput against direct
    /// access, the core's handshake rate against snow's, memory per idle device.
    Bench(BenchArgs),
    /// Check whether the core can be reached directly from here: a registered device's real
    /// handshake to a UDP address (only the core can complete it) and a TCP connection. Exit 0
    /// when nothing answered, 1 when something did (for field-network isolation checks).
    Probe(ProbeArgs),
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
    /// `device-sim.toml`.
    #[arg(long, env = "DEVICE_SIM_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// Simulate the first N devices of the fleet file (after --skip) [default: all of them].
    #[arg(long, env = "DEVICE_SIM_DEVICES", value_name = "N")]
    pub devices: Option<usize>,
    /// Leave out the first K devices of the fleet file, so several fleets can share one file.
    #[arg(long, env = "DEVICE_SIM_SKIP", value_name = "K", default_value_t = 0)]
    pub skip: usize,
    /// Readings per device, or `unlimited` (then the run lasts --duration-secs, or without it
    /// until SIGINT or SIGTERM) [default: 10, or unlimited within --duration-secs].
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
    /// Send through the gateway or straight to the core.
    #[arg(long, env = "DEVICE_SIM_VIA", value_enum, default_value_t = Via::Gateway)]
    pub via: Via,
    /// Send here instead of the config's `gateway` or `direct` address: `IP:PORT` or
    /// `HOST:PORT` (looked up once, at start).
    #[arg(long, env = "DEVICE_SIM_TARGET", value_name = "ADDR")]
    pub target: Option<String>,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long, env = "DEVICE_SIM_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
}

/// `device-sim bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print the results as one JSON object instead of a table (progress stays on stderr).
    #[arg(long, env = "DEVICE_SIM_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
    /// A short run: 10k idle devices only (no 100k memory point), 5k core handshakes.
    #[arg(long)]
    pub quick: bool,
    /// Meters in each throughput run (one set through the gateway, another direct).
    #[arg(long, value_name = "M", default_value_t = 200)]
    pub meters: usize,
    /// Length of each throughput run in seconds; the first second is not counted.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub secs: u64,
    /// Where the core-stub and gateway executables are [default: next to device-sim].
    #[arg(long, env = "DEVICE_SIM_BIN_DIR", value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
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
}

/// Parses the command line, runs the subcommand and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    relay_ops::telemetry::init();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Bench(args) => bench(args),
        Command::Probe(args) => probe(args),
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
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    // Dropping the bench future on Ctrl-C kills the daemons (kill_on_drop) and removes the
    // temporary deployment.
    let result = runtime.block_on(async {
        tokio::select! {
            r = run_bench(opts) => r,
            _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
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
        print!("{}", render_table(&report));
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

fn run(args: RunArgs) -> u8 {
    let json = args.json;
    let opts = match fleet_options(args) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let summary = match runtime.block_on(run_with_progress(opts)) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if json {
        match serde_json::to_string(&summary) {
            Ok(line) => println!("{line}"),
            Err(e) => return fail(&e),
        }
    } else {
        print!("{}", summary_table(&summary));
    }
    exit_code(&summary)
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    EXIT_ERROR
}

/// 0 when every reading generated was acknowledged, else 1.
pub fn exit_code(s: &FleetSummary) -> u8 {
    if s.lost == 0 && s.refused == 0 {
        EXIT_OK
    } else {
        EXIT_LOST
    }
}

/// Loads the config and the fleet named by `args` and builds the options of the run.
pub fn fleet_options(args: RunArgs) -> Result<FleetOptions, CliError> {
    let config = load_config(&args.config)?;
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
    let n = args.devices.unwrap_or(devices.len());
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
    if unlimited && args.interval_ms == 0 {
        return Err(CliError::Usage(
            "--interval-ms 0 needs a number of --readings: the run would not end".into(),
        ));
    }
    let target = match (&args.target, args.via) {
        (Some(t), _) => resolve("--target", t)?,
        (None, Via::Gateway) => config.gateway,
        (None, Via::Direct) => config.direct,
    };
    Ok(FleetOptions {
        readings_per_device: readings,
        interval: Duration::from_millis(args.interval_ms),
        payload_bytes: args.payload_bytes,
        duration,
        ..FleetOptions::new(target, config.core_public_key, devices)
    })
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
            Command::Run(a) => a,
            Command::Bench(_) | Command::Probe(_) => panic!("not run"),
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
}
