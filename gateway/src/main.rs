//! The `gateway` binary: parse the configuration, bind, run until SIGINT or SIGTERM.
//!
//! `gateway health` instead asks a running gateway's admin endpoint whether it is ready (the
//! container healthcheck: a scratch image has no shell or curl to do it).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gateway::{Cli, GatewayConfig, Hooks, Listeners};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// `gateway health`: exit 0 when the admin endpoint answers 200 for `--path`, else 1.
#[derive(Debug, Parser)]
#[command(
    name = "gateway health",
    about = "Ask a running gateway's admin endpoint for /ready (or --path); exit 0 on 200, 1 otherwise"
)]
struct HealthCli {
    /// The gateway's admin address; an unspecified IP (0.0.0.0) means this host's loopback.
    #[arg(
        long,
        env = "GATEWAY_LISTEN_ADMIN",
        value_name = "ADDR",
        default_value = gateway::config::DEFAULT_LISTEN_ADMIN
    )]
    admin: SocketAddr,
    /// `/ready` (the uplink is up) or `/live` (the process answers).
    #[arg(long, default_value = "/ready")]
    path: String,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    // A subcommand of its own would make `--config` optional for the daemon; the healthcheck is
    // the one exception, recognised before the daemon's command line is parsed.
    if std::env::args_os().nth(1).is_some_and(|a| a == "health") {
        return health(HealthCli::parse_from(std::env::args_os().skip(1)));
    }
    let cli = Cli::parse();
    let config = match GatewayConfig::load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    relay_ops::telemetry::init();
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn health(cli: HealthCli) -> ExitCode {
    let timeout = Duration::from_millis(cli.timeout_ms);
    if relay_ops::admin::health_command(cli.admin, &cli.path, timeout) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[tokio::main]
async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        on_signal.cancel();
    });
    gateway::run(config, listeners, shutdown, Hooks::default()).await?;
    Ok(())
}
