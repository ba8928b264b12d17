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
    /// Devices through a running core's admin API: list, show, suspend, resume, revoke.
    Devices(DevicesArgs),
    /// The newest audit log events (operator token).
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// The core's admin address.
    #[arg(
        long,
        env = "CORE_ADMIN",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    admin: SocketAddr,
    /// A file holding the token (`admin-operator.token` from init); else $CORE_ADMIN_TOKEN.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Print the API's JSON answer as is.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Args)]
struct DevicesArgs {
    #[command(subcommand)]
    command: DevicesCommand,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Serial, status and creation time of each device.
    List {
        /// Devices per page.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Devices skipped.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Status, readings stored and live sessions of one device.
    Show { serial: String },
    /// Refuse the device's sessions until resumed (operator).
    Suspend { serial: String },
    /// Let a suspended device connect again (operator).
    Resume { serial: String },
    /// Refuse the device for good (operator).
    Revoke { serial: String },
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Events to show (the newest).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[command(flatten)]
    api: ApiArgs,
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
                    // Shown once; the core keeps only their hashes.
                    println!("admin API tokens (also in DIR/admin-<role>.token, mode 0600):");
                    for (role, token) in &summary.admin_tokens {
                        println!("  {:<11}{}", role.as_str(), token.expose());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, matches!(e, core_stub::init::InitError::Options(_))),
            }
        }
        Command::Run(args) => run(args),
        Command::Stats(args) => stats(&args),
        Command::Health(args) => health(&args),
        Command::Devices(args) => {
            let (method, path) = match &args.command {
                DevicesCommand::List { limit, offset } => {
                    ("GET", format!("/v1/devices?limit={limit}&offset={offset}"))
                }
                DevicesCommand::Show { serial } => ("GET", format!("/v1/devices/{serial}")),
                DevicesCommand::Suspend { serial } => {
                    ("POST", format!("/v1/devices/{serial}/suspend"))
                }
                DevicesCommand::Resume { serial } => {
                    ("POST", format!("/v1/devices/{serial}/resume"))
                }
                DevicesCommand::Revoke { serial } => {
                    ("POST", format!("/v1/devices/{serial}/revoke"))
                }
            };
            api_call(&args.api, method, &path)
        }
        Command::Audit(args) => {
            api_call(&args.api, "GET", &format!("/v1/audit?limit={}", args.limit))
        }
    }
}

/// Calls the admin API and prints the answer: exit 0 on 2xx, 1 on a refusal or no answer, 2
/// when no token can be found.
fn api_call(args: &ApiArgs, method: &str, path: &str) -> ExitCode {
    let token = match &args.token_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => return fail(&format!("{}: {e}", f.display()), true),
        },
        None => match std::env::var("CORE_ADMIN_TOKEN") {
            Ok(t) => t.trim().to_owned(),
            Err(_) => return fail(&"no token: give --token-file or set CORE_ADMIN_TOKEN", true),
        },
    };
    if token.is_empty() || token.contains(['\r', '\n']) {
        return fail(&"the token is empty or not one line", true);
    }
    let addr = relay_ops::admin::local_admin_addr(args.admin);
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(relay_ops::client::request(
                addr,
                method,
                path,
                Some(&token),
                Duration::from_secs(10),
            ))
            .map_err(|e| e.to_string())
        });
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return fail(&e, false),
    };
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    if !(200..300).contains(&answer.status) {
        let why = body["error"].as_str().unwrap_or("no reason given");
        return fail(&format!("HTTP {}: {why}", answer.status), false);
    }
    if args.json {
        println!("{}", String::from_utf8_lossy(&answer.body));
    } else {
        print_human(&body);
    }
    ExitCode::SUCCESS
}

/// A plain-text rendering of the API's answers.
fn print_human(body: &serde_json::Value) {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    if let Some(devices) = body["devices"].as_array() {
        for d in devices {
            println!(
                "{:<24} {:<10} {}",
                s(&d["serial"]),
                s(&d["status"]),
                s(&d["created_at_ms"])
            );
        }
        println!(
            "({} of {}, offset {})",
            devices.len(),
            s(&body["total"]),
            s(&body["offset"])
        );
    } else if let Some(events) = body["events"].as_array() {
        for e in events {
            println!(
                "{:>6} {} {:<12} {:<11} {:<13} {:<16} {:<13} {}",
                s(&e["id"]),
                s(&e["at_ms"]),
                s(&e["actor"]),
                s(&e["role"]),
                s(&e["action"]),
                s(&e["target"]),
                s(&e["outcome"]),
                s(&e["detail"])
            );
        }
    } else if let Some(fields) = body.as_object() {
        for (k, v) in fields {
            println!("{k:<16} {}", s(v));
        }
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
