//! The `core-stub` binary: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use core_stub::tokens::{is_valid_owner, PlainToken, Role, TokenSet};
use core_stub::{CoreConfig, InitOptions, Listeners};
use relay_ops::client::Body;
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
    /// Devices through a running core's admin API: list, show, suspend, resume, revoke, rotate,
    /// transfer, accept-transfer, release, readings.
    Devices(DevicesArgs),
    /// Claim the devices of a manufacturer's shipping manifest (a CSV file with the header
    /// serial,factory_public_key,model), or one device from another operator's signed release
    /// (--release). Operator token.
    Claim(ClaimArgs),
    /// Activate the devices of a plan (CSV: serial,account,profile) in one request: all rows or
    /// none; every bad row is printed. Technician or operator token.
    Activate(ActivateArgs),
    /// Service profiles (reporting interval, report size, threshold), versioned.
    Profiles(ProfilesArgs),
    /// The newest audit log events (operator token).
    Audit(AuditArgs),
    /// Create an admin API token: print its secret on stdout (once) and append its hashed entry
    /// to a tokens file (restart the core to load it).
    Token(TokenArgs),
}

#[derive(Debug, Args)]
struct ClaimArgs {
    /// The shipping manifest (CSV with the header serial,factory_public_key,model).
    #[arg(required_unless_present = "release", conflicts_with = "release")]
    manifest: Option<PathBuf>,
    /// A signed release (JSON, from `core-stub devices release` on the old core) instead.
    #[arg(long, value_name = "FILE")]
    release: Option<PathBuf>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct ActivateArgs {
    /// The activation plan (CSV with the header serial,account,profile).
    plan: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct ProfilesArgs {
    #[command(subcommand)]
    command: ProfilesCommand,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Subcommand)]
enum ProfilesCommand {
    /// Every profile with its version.
    List,
    /// Create a profile or replace its settings (its version goes up when the configuration
    /// changes; its devices get it at their next contact; a gateway policy or quota applies at
    /// their next handshake). Operator token.
    Set {
        /// The profile's name.
        name: String,
        /// Seconds between reports.
        #[arg(long)]
        interval: u32,
        /// Bytes per report.
        #[arg(long)]
        bytes: u16,
        /// The change that triggers an early report (0: none).
        #[arg(long, default_value_t = 0)]
        threshold: u32,
        /// The only gateways its devices may use, by certificate name (comma-separated).
        /// Default: any gateway.
        #[arg(long, value_delimiter = ',')]
        gateways: Vec<String>,
        /// Refuse its devices direct access (default: allowed).
        #[arg(long)]
        no_direct: bool,
        /// Admission quota: frames per interval each session may send through a gateway (0:
        /// unlimited). Giving any --quota-* flag sets the profile's own quota (flags left out:
        /// frames and bytes unlimited, interval 60 s); giving none: the core's [admission]
        /// default.
        #[arg(long)]
        quota_frames: Option<u32>,
        /// Admission quota: bytes of device frames per interval (0: unlimited).
        #[arg(long)]
        quota_bytes: Option<u32>,
        /// Admission quota: the interval in seconds (default 60 when a quota is given).
        #[arg(long)]
        quota_interval_secs: Option<u16>,
    },
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The token's name (the actor in the audit log).
    #[arg(long)]
    name: String,
    /// operator or technician.
    #[arg(long)]
    role: Role,
    /// The owner it acts for (default: the name).
    #[arg(long)]
    owner: Option<String>,
    /// The tokens file to append the entry to (created with mode 0600 if missing); without it
    /// the entry is printed on standard error.
    #[arg(long, value_name = "FILE")]
    append: Option<PathBuf>,
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
    /// Your owner's devices: state, subscription status, profile, config version, flag.
    List {
        /// Devices per page.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Devices skipped.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// One device: claim, plan, state, subscription, key age, readings stored, live sessions.
    Show { serial: String },
    /// Refuse the device's sessions until resumed (operator).
    Suspend { serial: String },
    /// Let a suspended device connect again (operator).
    Resume { serial: String },
    /// Refuse the device's subscription for good (operator); a claimed device needs a new plan.
    Revoke { serial: String },
    /// Ask for a credential update: the device gets the notice at its next contact (operator).
    Rotate { serial: String },
    /// Offer the device to another owner; it changes hands when that owner accepts (operator).
    Transfer {
        serial: String,
        /// The receiving owner.
        #[arg(long)]
        to: String,
    },
    /// Accept a transfer offered to your owner: the old subscription is revoked at once, the
    /// device provisions under yours at its next contact (operator).
    AcceptTransfer {
        serial: String,
        /// The customer account.
        #[arg(long)]
        account: Option<String>,
        /// The profile (default: default).
        #[arg(long)]
        profile: Option<String>,
    },
    /// Release the device to another operator's core; prints the signed release (JSON) to hand
    /// to that operator (`core-stub claim --release FILE` there). Operator.
    Release {
        serial: String,
        /// The new core's Noise public key (64 hex digits).
        #[arg(long)]
        core_key: String,
        /// Where devices reach the new core, HOST:PORT.
        #[arg(long)]
        endpoint: String,
    },
    /// The device's newest readings under your owner's subscriptions.
    Readings {
        serial: String,
        /// Readings to show (the newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
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
    /// Direct-access device stream address, TCP (overrides listen.streams).
    #[arg(long, env = "CORE_LISTEN_STREAMS")]
    listen_streams: Option<SocketAddr>,
    /// Gateways' bulk QUIC address for device streams, UDP (overrides listen.bulk; default: the
    /// QUIC address's port + 1). Its port is told to gateways in HelloAck; they connect to it at
    /// the QUIC address's IP.
    #[arg(long, env = "CORE_LISTEN_BULK")]
    listen_bulk: Option<SocketAddr>,
    /// Admin HTTP address (overrides listen.admin).
    #[arg(long, env = "CORE_LISTEN_ADMIN")]
    listen_admin: Option<SocketAddr>,
    /// Write the bound addresses here as JSON once ready (quic, bulk, direct, streams, admin).
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
        Command::Devices(args) => devices(&args),
        Command::Claim(args) => {
            let (path, body) = match (&args.manifest, &args.release) {
                (_, Some(release)) => {
                    ("/v1/claims/release", read_body(release, "application/json"))
                }
                (Some(manifest), None) => ("/v1/claims", read_body(manifest, "text/csv")),
                (None, None) => return fail(&"give MANIFEST.csv or --release FILE", true),
            };
            match body {
                Ok(body) => api_call(&args.api, "POST", path, Some(body)),
                Err(e) => fail(&e, true),
            }
        }
        Command::Activate(args) => match read_body(&args.plan, "text/csv") {
            Ok(body) => api_call(&args.api, "POST", "/v1/plans", Some(body)),
            Err(e) => fail(&e, true),
        },
        Command::Profiles(args) => match &args.command {
            ProfilesCommand::List => api_call(&args.api, "GET", "/v1/profiles", None),
            ProfilesCommand::Set {
                name,
                interval,
                bytes,
                threshold,
                gateways,
                no_direct,
                quota_frames,
                quota_bytes,
                quota_interval_secs,
            } => {
                let quota = (quota_frames.is_some()
                    || quota_bytes.is_some()
                    || quota_interval_secs.is_some())
                .then(|| {
                    serde_json::json!({
                        "frames": quota_frames.unwrap_or(0),
                        "bytes": quota_bytes.unwrap_or(0),
                        "interval_secs": quota_interval_secs
                            .unwrap_or(core_stub::config::DEFAULT_QUOTA_INTERVAL_SECS),
                    })
                });
                let body = serde_json::json!({
                    "report_interval_secs": interval,
                    "report_bytes": bytes,
                    "threshold": threshold,
                    "gateways": gateways,
                    "allow_direct": !no_direct,
                    "quota": quota,
                });
                api_call(
                    &args.api,
                    "PUT",
                    &format!("/v1/profiles/{name}"),
                    Some(json_body(&body)),
                )
            }
        },
        Command::Audit(args) => api_call(
            &args.api,
            "GET",
            &format!("/v1/audit?limit={}", args.limit),
            None,
        ),
        Command::Token(args) => token(&args),
    }
}

/// A request body: its content type and bytes.
type OwnedBody = (&'static str, Vec<u8>);

fn json_body(value: &serde_json::Value) -> OwnedBody {
    ("application/json", value.to_string().into_bytes())
}

fn read_body(path: &std::path::Path, content_type: &'static str) -> Result<OwnedBody, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((content_type, bytes))
}

fn devices(args: &DevicesArgs) -> ExitCode {
    let (method, path, body) = match &args.command {
        DevicesCommand::List { limit, offset } => (
            "GET",
            format!("/v1/devices?limit={limit}&offset={offset}"),
            None,
        ),
        DevicesCommand::Show { serial } => ("GET", format!("/v1/devices/{serial}"), None),
        DevicesCommand::Suspend { serial } => {
            ("POST", format!("/v1/devices/{serial}/suspend"), None)
        }
        DevicesCommand::Resume { serial } => ("POST", format!("/v1/devices/{serial}/resume"), None),
        DevicesCommand::Revoke { serial } => ("POST", format!("/v1/devices/{serial}/revoke"), None),
        DevicesCommand::Rotate { serial } => ("POST", format!("/v1/devices/{serial}/rotate"), None),
        DevicesCommand::Transfer { serial, to } => (
            "POST",
            format!("/v1/devices/{serial}/transfer"),
            Some(json_body(&serde_json::json!({ "to": to }))),
        ),
        DevicesCommand::AcceptTransfer {
            serial,
            account,
            profile,
        } => (
            "POST",
            format!("/v1/devices/{serial}/accept-transfer"),
            Some(json_body(
                &serde_json::json!({ "account": account, "profile": profile }),
            )),
        ),
        DevicesCommand::Release {
            serial,
            core_key,
            endpoint,
        } => (
            "POST",
            format!("/v1/devices/{serial}/release"),
            Some(json_body(
                &serde_json::json!({ "core_public_key": core_key, "endpoint": endpoint }),
            )),
        ),
        DevicesCommand::Readings { serial, limit } => (
            "GET",
            format!("/v1/devices/{serial}/readings?limit={limit}"),
            None,
        ),
    };
    api_call(&args.api, method, &path, body)
}

/// `core-stub token`: a new secret on stdout, its hashed entry appended to the tokens file.
fn token(args: &TokenArgs) -> ExitCode {
    let owner = args.owner.clone().unwrap_or_else(|| args.name.clone());
    if args.name.trim().is_empty() || args.name.len() > 64 {
        return fail(&"--name must have 1 to 64 characters", true);
    }
    if !is_valid_owner(&owner) {
        return fail(
            &"the owner (--owner, else --name) must be 1 to 64 of A-Z a-z 0-9 - _ .",
            true,
        );
    }
    let secret = PlainToken::generate();
    let entry = TokenSet::entry_text(&args.name, args.role, &owner, &secret);
    match &args.append {
        Some(file) => {
            let existing = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return fail(&format!("{}: {e}", file.display()), true),
            };
            // The file must still load with the entry in it (names are unique).
            if let Err(why) = TokenSet::parse(&format!("{existing}{entry}")) {
                return fail(&format!("{}: {why}", file.display()), true);
            }
            if let Err(e) = append_secret_file(file, entry.as_bytes()) {
                return fail(&format!("{}: {e}", file.display()), false);
            }
        }
        None => eprint!("{entry}"),
    }
    println!("{}", secret.expose());
    ExitCode::SUCCESS
}

/// Appends to `path`, creating it with mode 0600 (it lists who may use the admin API).
fn append_secret_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Calls the admin API and prints the answer: exit 0 on 2xx, 1 on a refusal or no answer, 2
/// when no token can be found.
fn api_call(args: &ApiArgs, method: &str, path: &str, body: Option<OwnedBody>) -> ExitCode {
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
                body.as_ref().map(|(content_type, bytes)| Body {
                    content_type,
                    bytes,
                }),
                Duration::from_secs(60),
            ))
            .map_err(|e| e.to_string())
        });
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return fail(&e, false),
    };
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    if !(200..300).contains(&answer.status) {
        // A manifest or a plan: every bad row, one per line, after the one-line error.
        let why = body["error"].as_str().unwrap_or("no reason given");
        let code = fail(&format!("HTTP {}: {why}", answer.status), false);
        for e in body["errors"].as_array().into_iter().flatten() {
            let serial = e["serial"]
                .as_str()
                .map_or(String::new(), |s| format!(" ({s})"));
            eprintln!(
                "  row {}{serial}: {}",
                e["row"],
                e["error"].as_str().unwrap_or("")
            );
        }
        if let Some(total) = body["bad_rows"].as_u64() {
            let shown = body["errors"].as_array().map_or(0, Vec::len) as u64;
            if total > shown {
                eprintln!("  … and {} more", total - shown);
            }
        }
        return code;
    }
    // A signed release is a document to hand on: printed as is.
    if args.json || body.get("signature").is_some() {
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
        println!(
            "{:<24} {:<12} {:<12} {:<16} {:<12} {:<9} flag",
            "serial", "state", "status", "owner", "profile", "config"
        );
        for d in devices {
            let config = format!("{}/{}", s(&d["config_version"]), s(&d["profile_version"]));
            println!(
                "{:<24} {:<12} {:<12} {:<16} {:<12} {:<9} {}",
                s(&d["serial"]),
                s(&d["state"]),
                s(&d["status"]),
                s(&d["owner"]),
                s(&d["profile"]),
                config,
                s(&d["flag"])
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
    } else if let Some(profiles) = body["profiles"].as_array() {
        for p in profiles {
            let gateways = match p["gateways"].as_array() {
                Some(g) if !g.is_empty() => g.iter().map(s).collect::<Vec<_>>().join(","),
                _ => "any".to_owned(),
            };
            let direct = if p["allow_direct"].as_bool() == Some(false) {
                "no"
            } else {
                "yes"
            };
            let quota = match &p["quota"] {
                q if q.is_object() => format!(
                    "{}/{} per {} s",
                    s(&q["frames"]),
                    s(&q["bytes"]),
                    s(&q["interval_secs"])
                ),
                _ => "default".to_owned(),
            };
            println!(
                "{:<16} v{:<5} every {:>6} s  {:>5} B  threshold {:<6} gateways {gateways}  direct {direct}  quota {quota}",
                s(&p["name"]),
                s(&p["version"]),
                s(&p["report_interval_secs"]),
                s(&p["report_bytes"]),
                s(&p["threshold"])
            );
        }
    } else if let Some(readings) = body["readings"].as_array() {
        for r in readings {
            println!(
                "{:>6} {:>20} {} {}",
                s(&r["subscription"]),
                s(&r["seq"]),
                s(&r["received_at_ms"]),
                s(&r["data"])
            );
        }
        println!("({} readings)", readings.len());
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
    if let Some(a) = args.listen_streams {
        config.listen.streams = Some(a);
    }
    if let Some(a) = args.listen_bulk {
        config.listen.bulk = Some(a);
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
