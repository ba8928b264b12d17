//! The `core-stub` binary: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use core_stub::{CoreConfig, InitOptions, Listeners};
use tokio_util::sync::CancellationToken;

/// The operator side of the relay: gateways, direct access, sessions, subscription store.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a complete deployment (CA, certificates, keys, configs, store) into DIR.
    Init(InitArgs),
    /// Run the core.
    Run(RunArgs),
    /// Print what the store holds: subscriptions, readings, per device the count and the time of
    /// the last one (safe while the core runs).
    Stats(StatsArgs),
    /// Ask a running core's admin endpoint for /ready (or --path): exit 0 on 200, 1 otherwise
    /// (the container healthcheck; a scratch image has no shell or curl).
    Health(HealthArgs),
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// core.toml (its `store.path` is read).
    #[arg(long, env = "CORE_CONFIG")]
    config: PathBuf,
    /// One JSON object with every subscription, instead of the totals as text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// The core's admin address; an unspecified IP (0.0.0.0) means this host's loopback.
    #[arg(long, env = "CORE_LISTEN_ADMIN", default_value = "127.0.0.1:9464")]
    admin: SocketAddr,
    /// `/ready` or `/live`.
    #[arg(long, default_value = "/ready")]
    path: String,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    timeout_ms: u64,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// The deployment directory (created if missing; must be empty unless --force).
    dir: PathBuf,
    /// Devices to provision.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Gateways to configure.
    #[arg(long, default_value_t = 1)]
    gateways: u32,
    /// Overwrite the files of an earlier init in DIR.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// core.toml.
    #[arg(long, env = "CORE_CONFIG")]
    config: PathBuf,
    /// Gateways' QUIC address (overrides listen.quic).
    #[arg(long, env = "CORE_LISTEN_QUIC")]
    listen_quic: Option<SocketAddr>,
    /// Direct-access UDP address (overrides listen.direct).
    #[arg(long, env = "CORE_LISTEN_DIRECT")]
    listen_direct: Option<SocketAddr>,
    /// Admin HTTP address (overrides listen.admin).
    #[arg(long, env = "CORE_LISTEN_ADMIN")]
    listen_admin: Option<SocketAddr>,
    /// Write the bound addresses here as JSON once ready.
    #[arg(long, env = "CORE_READY_FILE")]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Init(args) => {
            let options = InitOptions {
                devices: args.devices,
                gateways: args.gateways,
                force: args.force,
            };
            match core_stub::init(&args.dir, &options) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, matches!(e, core_stub::init::InitError::Options(_))),
            }
        }
        Command::Run(args) => run(args),
        Command::Stats(args) => stats(&args),
        Command::Health(args) => health(&args),
    }
}

fn stats(args: &StatsArgs) -> ExitCode {
    let config = match CoreConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(&e, true),
    };
    let stats = match core_stub::Store::open_existing(&config.store.path).and_then(|s| s.stats()) {
        Ok(s) => s,
        Err(e) => return fail(&e, false),
    };
    if args.json {
        match serde_json::to_string(&stats) {
            Ok(line) => println!("{line}"),
            Err(e) => return fail(&e, false),
        }
    } else {
        println!("store          {}", config.store.path.display());
        println!(
            "subscriptions  {} ({} active)",
            stats.subscriptions, stats.active
        );
        println!("with readings  {}", stats.with_readings);
        println!("readings       {}", stats.readings);
    }
    ExitCode::SUCCESS
}

fn health(args: &HealthArgs) -> ExitCode {
    let timeout = Duration::from_millis(args.timeout_ms);
    if relay_ops::admin::health_command(args.admin, &args.path, timeout) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(args: RunArgs) -> ExitCode {
    relay_ops::telemetry::init();
    let mut config = match CoreConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(&e, true),
    };
    if let Some(a) = args.listen_quic {
        config.listen.quic = a;
    }
    if let Some(a) = args.listen_direct {
        config.listen.direct = a;
    }
    if let Some(a) = args.listen_admin {
        config.listen.admin = a;
    }
    config.ready_file = args.ready_file;

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e, false),
    };
    let result = runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        core_stub::run(config, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, e.is_config()),
    }
}

/// One line on standard error; exit code 2 when the configuration is at fault.
fn fail(e: &dyn std::fmt::Display, config_error: bool) -> ExitCode {
    eprintln!("error: {}", e.to_string().replace('\n', " "));
    ExitCode::from(if config_error { 2 } else { 1 })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}
