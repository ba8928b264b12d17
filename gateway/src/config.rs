//! The command line and `gateway.toml`, parsed once into a validated [`GatewayConfig`].
//!
//! Everything that can be wrong with the configuration is found here, before any socket is bound:
//! unknown keys, out-of-range limits, unreadable or unusable certificates. Paths in the file are
//! relative to the file's directory; a flag overrides the file.
//!
//! Sections: `name`, `[listen]` (`devices`: UDP, `admin`: TCP), `[uplink]`, `[flows]`,
//! `[revocation]`, `[handshakes]`, `[admission]` and `[streams]` (device streams, a camera's
//! video, over TCP: [`StreamsConfig`]). Every section but `[uplink]` may be left out (defaults).
//!
//! ```toml
//! [streams]
//! # listen = "0.0.0.0:5683"   # TCP; left out: the [listen] devices address (its port, over TCP)
//! enabled = true              # false: no stream listener
//! max_streams = 64            # streams relayed at once; further connections are closed at once
//! stall_timeout_secs = 30     # a stream with no whole frame either way for this long is ended
//! cpu_priority = "idle"       # streams' threads: "idle" (SCHED_IDLE), "low" (nice 10), "normal"
//! ```
//!
//! Device streams (their TCP, their QUIC connection to the core's bulk endpoint, its encryption
//! and UDP) run on a runtime of their own whose threads get `cpu_priority`: with `idle` a video
//! takes only the CPU the datagram path leaves.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use relay_ops::lane::LanePriority;
use serde::Deserialize;

use crate::tls::{TlsError, TlsIdentity};

/// The command line. Every flag has an environment equivalent; a flag overrides the file.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "The relay gateway: forwards end-to-end encrypted device frames (UDP) to the core \
             (QUIC, mutual TLS) and back. It holds no device keys and cannot read what it relays.",
    after_help = "Flags override the config file; paths inside the file are relative to it.\n\
                  Logging: RUST_LOG (default info), LOG_FORMAT=plain|json.\n\
                  Exit status: 0 after SIGINT/SIGTERM, 1 on a runtime failure, 2 on a bad \
                  configuration or command line.\n\
                  `gateway health [--admin ADDR] [--path /ready]` asks a running gateway instead \
                  (container healthchecks): exit 0 on HTTP 200, 1 otherwise."
)]
pub struct Cli {
    /// The configuration file (`gateway.toml`).
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: PathBuf,

    /// UDP address for devices; overrides `listen.devices`. Device streams (TCP) listen on it too
    /// unless `streams.listen` is set.
    #[arg(long, env = "GATEWAY_LISTEN_DEVICES", value_name = "ADDR")]
    pub listen_devices: Option<SocketAddr>,

    /// TCP address of /metrics, /live and /ready; overrides `listen.admin`.
    #[arg(long, env = "GATEWAY_LISTEN_ADMIN", value_name = "ADDR")]
    pub listen_admin: Option<SocketAddr>,

    /// The core's QUIC address, `IP:PORT` or `HOST:PORT` (looked up at every connection
    /// attempt); overrides `uplink.core`.
    #[arg(long, env = "GATEWAY_CORE", value_name = "ADDR")]
    pub core: Option<CoreAddr>,

    /// Once the listeners are bound, write `{"devices":"ADDR","streams":"ADDR","admin":"ADDR"}` to
    /// this file (`streams` only while device streams are enabled).
    #[arg(long, env = "GATEWAY_READY_FILE", value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
}

/// The validated configuration of one gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The name sent to the core in `Hello` (1 to 64 bytes of UTF-8).
    pub name: String,
    /// Where devices send their frames (UDP).
    pub listen_devices: SocketAddr,
    /// Where `/metrics`, `/live` and `/ready` are served (TCP).
    pub listen_admin: SocketAddr,
    /// Where to write the bound addresses once listening.
    pub ready_file: Option<PathBuf>,
    /// The connection to the core.
    pub uplink: UplinkConfig,
    /// The device flow table.
    pub flows: FlowsConfig,
    /// Session ids the core revoked.
    pub revocation: RevocationConfig,
    /// `[handshakes]`: per-source limits on handshake initiations.
    pub handshakes: HandshakeLimits,
    /// `[admission]`: the sessions the core admitted, their tags and quotas.
    pub admission: AdmissionConfig,
    /// `[streams]`: device streams (TCP) relayed over QUIC streams.
    pub streams: StreamsConfig,
}

/// The `[streams]` section, validated: the TCP listener for device streams (`docs/protocol.md`
/// §13, a camera's video) and their limits. Each device stream is relayed over its own QUIC stream
/// of the uplink, frame by frame, holding at most one frame per direction.
///
/// The first frame of a stream is checked like a datagram's admission: an `AdmittedTransport`
/// frame of a session the gateway holds an admission for must carry a valid tag; a plain
/// `Transport` frame, or one of a session the gateway does not know, is refused when
/// `[admission] require` is on. The gateway does not ask the core about unknown sessions for a
/// stream (no `AdmitQuery`): a device opens its stream after its datagram session is established,
/// by which time its admission is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamsConfig {
    /// Accept device streams at all (`enabled`).
    pub enabled: bool,
    /// The TCP address (`listen`); `None`: the device address of `[listen] devices` (or
    /// `--listen-devices`), its port over TCP. With port 0 there, the TCP listener takes the port
    /// the UDP socket was given.
    pub listen: Option<SocketAddr>,
    /// The most device streams relayed at once (`max_streams`); a connection over it is closed at
    /// once (`limit`). The core must allow at least one more concurrent QUIC stream than this.
    pub max_streams: usize,
    /// A stream in which neither side delivered a whole frame for this long is ended (`stalled`);
    /// it also bounds the wait for the first frame, for a QUIC stream and for connecting to the
    /// core's bulk endpoint (`stall_timeout_secs`).
    pub stall_timeout: Duration,
    /// The CPU priority of the threads that relay device streams (`cpu_priority`: `idle`, the
    /// default, `low` or `normal`): the TCP copy, the bulk QUIC connection, its encryption and UDP.
    pub cpu_priority: LanePriority,
}

/// Default `streams.enabled`.
pub const DEFAULT_STREAMS_ENABLED: bool = true;
/// Default `streams.max_streams`.
pub const DEFAULT_STREAMS_MAX: usize = 64;
/// Default `streams.stall_timeout_secs`.
pub const DEFAULT_STREAMS_STALL_TIMEOUT_SECS: u64 = 30;
/// The largest `streams.max_streams` accepted (each may hold two frames of 64 KiB, and a QUIC
/// stream at the core).
pub const MAX_STREAMS_LIMIT: usize = 65_536;
/// The longest `streams.stall_timeout_secs` accepted, one hour.
pub const MAX_STREAMS_STALL_TIMEOUT_SECS: u64 = 3600;

/// The `[uplink]` section, validated.
#[derive(Clone, Debug)]
pub struct UplinkConfig {
    /// The core's QUIC address (an IP address or a host name, and a port).
    pub core: CoreAddr,
    /// The name the core's certificate must carry.
    pub server_name: String,
    /// The files the TLS material was read from (resolved), for messages.
    pub files: TlsFiles,
    /// The CA certificates, the client certificate chain and its key, loaded and checked.
    pub tls: TlsIdentity,
    /// The first reconnect delay (before jitter).
    pub reconnect_initial: Duration,
    /// The largest reconnect delay (before jitter).
    pub reconnect_max: Duration,
    /// Frames held while the core is unreachable; past it, the newest are dropped.
    pub queue_frames: usize,
    /// Where the core's bulk endpoint is reached (`bulk`), when not at the uplink's IP and the port
    /// the core names in `HelloAck` (a NAT or a port forward between gateway and core). Used only
    /// when the core has a bulk endpoint.
    pub bulk: Option<CoreAddr>,
}

/// Where the core is: an IP address or a host name, and a port (`10.0.0.1:4433`,
/// `[2001:db8::1]:4433`, `core.example.net:4433`). A name is looked up at every connection
/// attempt, not once at start, so a core that comes back on another address (a container
/// restarted, a DNS change) is found again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreAddr {
    host: CoreHost,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CoreHost {
    Ip(IpAddr),
    Name(String),
}

/// The longest host name (RFC 1035: 253 characters in text form).
pub const MAX_HOST_NAME_LEN: usize = 253;

impl CoreAddr {
    /// The address when it is an IP literal (no lookup needed).
    pub fn ip(&self) -> Option<SocketAddr> {
        match &self.host {
            CoreHost::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            CoreHost::Name(_) => None,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every address the core has now: the literal, or what the system resolver returns for the
    /// name (`/etc/hosts`, DNS).
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match &self.host {
            CoreHost::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            CoreHost::Name(name) => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.port))
                    .await?
                    .collect();
                if found.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{name} has no address"),
                    ));
                }
                Ok(found)
            }
        }
    }
}

impl From<SocketAddr> for CoreAddr {
    fn from(a: SocketAddr) -> Self {
        Self {
            host: CoreHost::Ip(a.ip()),
            port: a.port(),
        }
    }
}

impl FromStr for CoreAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: the port must be a number from 0 to 65535"))?;
        let valid_name = !host.is_empty()
            && host.len() <= MAX_HOST_NAME_LEN
            && !host.starts_with(['.', '-'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid_name {
            return Err(format!(
                "{s:?}: {host:?} is neither an IP address nor a host name"
            ));
        }
        Ok(Self {
            host: CoreHost::Name(host.to_owned()),
            port,
        })
    }
}

impl fmt::Display for CoreAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            CoreHost::Ip(ip) => SocketAddr::new(*ip, self.port).fmt(f),
            CoreHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl<'de> Deserialize<'de> for CoreAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the uplink's TLS material came from, resolved against the config file's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates the core's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// The gateway's client certificate chain (PEM).
    pub cert: PathBuf,
    /// The gateway's private key (PEM).
    pub key: PathBuf,
}

/// The `[flows]` section, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowsConfig {
    /// The most device addresses tracked at once.
    pub max: usize,
    /// A flow with no frame from its device for this long is forgotten.
    pub idle_timeout: Duration,
}

/// The `[revocation]` section, validated: how the gateway remembers the session ids the core
/// revoked (`UplinkMessage::Revoked`) to drop their frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevocationConfig {
    /// How long a revoked session id is remembered.
    pub ttl: Duration,
    /// The most ids remembered at once (the oldest are forgotten first).
    pub max_sessions: usize,
}

/// The `[handshakes]` section, validated: per-source token buckets for HandshakeInit frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshake initiations per second one device address may send, on average.
    pub per_source_per_sec: u32,
    /// How many it may send at once.
    pub per_source_burst: u32,
    /// The most device addresses tracked at once.
    pub max_sources: usize,
}

/// The `[admission]` section, validated: how the gateway checks device frames against the
/// admissions the core hands it (`docs/protocol.md` §12), and what it does with frames of sessions
/// it does not know yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Drop plain `Transport` (0x03) frames from devices (`unadmitted`): only tagged
    /// `AdmittedTransport` frames of admitted sessions reach the core.
    pub require: bool,
    /// The most admitted sessions held at once (one ~40 to 80-byte entry each).
    pub max_sessions: usize,
    /// The most frames held, in all, for sessions being asked about (`AdmitQuery`), at most
    /// [`PENDING_PER_SESSION`](crate::admission::PENDING_PER_SESSION) (4) per session; 0:
    /// frames of unknown sessions are dropped without asking.
    pub pending_frames: usize,
    /// How long held frames wait for the core's answer, from the query.
    pub pending_timeout: Duration,
    /// The most session ids asked about per second; frames of further unknown sessions are
    /// dropped (`unadmitted`).
    pub queries_per_sec: u32,
    /// How long a session id the core answered `NotAdmitted` for is remembered (its frames are
    /// dropped without asking again).
    pub not_admitted_ttl: Duration,
    /// The most such ids remembered at once (the oldest are forgotten first).
    pub not_admitted_max: usize,
}

/// Default `admission.require`.
pub const DEFAULT_ADMISSION_REQUIRE: bool = true;
/// Default `admission.max_sessions`.
pub const DEFAULT_ADMISSION_MAX_SESSIONS: usize = 1_000_000;
/// Default `admission.pending_frames`.
pub const DEFAULT_ADMISSION_PENDING_FRAMES: usize = 4096;
/// Default `admission.pending_timeout_ms`.
pub const DEFAULT_ADMISSION_PENDING_TIMEOUT_MS: u64 = 2000;
/// Default `admission.queries_per_sec`.
pub const DEFAULT_ADMISSION_QUERIES_PER_SEC: u32 = 2000;
/// Default `admission.not_admitted_ttl_secs`.
pub const DEFAULT_ADMISSION_NOT_ADMITTED_TTL_SECS: u64 = 60;
/// Default `admission.not_admitted_max` (about 100 bytes each).
pub const DEFAULT_ADMISSION_NOT_ADMITTED_MAX: usize = 65_536;
/// The largest `admission.max_sessions` accepted.
pub const MAX_ADMISSION_SESSIONS: usize = 1 << 24;
/// The largest `admission.pending_frames` accepted (about 1.2 KiB each).
pub const MAX_ADMISSION_PENDING_FRAMES: usize = 1 << 20;
/// The longest `admission.pending_timeout_ms` accepted.
pub const MAX_ADMISSION_PENDING_TIMEOUT_MS: u64 = 60_000;
/// The largest `admission.queries_per_sec` accepted.
pub const MAX_ADMISSION_QUERIES_PER_SEC: u32 = 1_000_000;

/// Default `handshakes.per_source_per_sec`: a meter handshakes once per rekey period and retries
/// after 1 s, doubling.
pub const DEFAULT_HANDSHAKES_PER_SOURCE_PER_SEC: u32 = 5;
/// Default `handshakes.per_source_burst`.
pub const DEFAULT_HANDSHAKES_PER_SOURCE_BURST: u32 = 10;
/// Default `handshakes.max_sources` (about 60 bytes each).
pub const DEFAULT_HANDSHAKES_MAX_SOURCES: usize = 100_000;
/// The largest `handshakes.per_source_per_sec` and `per_source_burst` accepted.
pub const MAX_HANDSHAKE_RATE: u32 = 1_000_000;
/// The largest `handshakes.max_sources` accepted.
pub const MAX_HANDSHAKE_SOURCES: usize = 1 << 24;

/// Default `revocation.ttl_secs`.
pub const DEFAULT_REVOCATION_TTL_SECS: u64 = 600;
/// Default `revocation.max_sessions` (about 100 bytes each).
pub const DEFAULT_REVOCATION_MAX_SESSIONS: usize = 65_536;
/// The largest `revocation.ttl_secs` accepted, one day.
pub const MAX_REVOCATION_TTL_SECS: u64 = 24 * 3600;
/// The largest `revocation.max_sessions` accepted.
pub const MAX_REVOCATION_SESSIONS: usize = 1 << 22;

/// Default `listen.devices`.
pub const DEFAULT_LISTEN_DEVICES: &str = "0.0.0.0:5683";
/// Default `listen.admin`.
pub const DEFAULT_LISTEN_ADMIN: &str = "127.0.0.1:9465";
/// Default `uplink.reconnect_initial_ms`.
pub const DEFAULT_RECONNECT_INITIAL_MS: u64 = 100;
/// Default `uplink.reconnect_max_ms`.
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 10_000;
/// Default `uplink.queue_frames`.
pub const DEFAULT_QUEUE_FRAMES: usize = 4096;
/// Default `flows.max`.
pub const DEFAULT_FLOWS_MAX: usize = 100_000;
/// Default `flows.idle_timeout_secs`.
pub const DEFAULT_FLOW_IDLE_TIMEOUT_SECS: u64 = 900;

/// The largest `flows.max`: flow ids are 32 bits, and memory is ~200 bytes per flow.
pub const MAX_FLOWS_LIMIT: usize = 16 * 1024 * 1024;
/// The largest `uplink.queue_frames` (about 1.2 KiB each).
pub const MAX_QUEUE_FRAMES: usize = 1 << 20;
/// The largest reconnect delay accepted, one hour.
pub const MAX_RECONNECT_MS: u64 = 3_600_000;
/// The longest idle timeout accepted (a flow's last-seen time is kept in seconds as a `u32`).
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Why the configuration cannot be used. The `Display` form is one line naming the file and the
/// key or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the layout (unknown key, wrong type).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What and where (line and column), on one line.
        message: String,
    },
    /// A value is outside what it may be.
    #[error("config {path}: {key}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: &'static str,
        /// Why.
        why: String,
    },
    /// The TLS material named by the file is unusable.
    #[error("config {path}: {source}")]
    Tls {
        /// The config file.
        path: PathBuf,
        /// What is wrong with which file.
        source: TlsError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: String,
    #[serde(default)]
    listen: FileListen,
    uplink: FileUplink,
    #[serde(default)]
    flows: FileFlows,
    #[serde(default)]
    revocation: FileRevocation,
    #[serde(default)]
    handshakes: FileHandshakes,
    #[serde(default)]
    admission: FileAdmission,
    #[serde(default)]
    streams: FileStreams,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileStreams {
    listen: Option<SocketAddr>,
    enabled: bool,
    max_streams: usize,
    stall_timeout_secs: u64,
    cpu_priority: LanePriority,
}

impl Default for FileStreams {
    fn default() -> Self {
        Self {
            listen: None,
            enabled: DEFAULT_STREAMS_ENABLED,
            max_streams: DEFAULT_STREAMS_MAX,
            stall_timeout_secs: DEFAULT_STREAMS_STALL_TIMEOUT_SECS,
            cpu_priority: LanePriority::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileAdmission {
    require: bool,
    max_sessions: usize,
    pending_frames: usize,
    pending_timeout_ms: u64,
    queries_per_sec: u32,
    not_admitted_ttl_secs: u64,
    not_admitted_max: usize,
}

impl Default for FileAdmission {
    fn default() -> Self {
        Self {
            require: DEFAULT_ADMISSION_REQUIRE,
            max_sessions: DEFAULT_ADMISSION_MAX_SESSIONS,
            pending_frames: DEFAULT_ADMISSION_PENDING_FRAMES,
            pending_timeout_ms: DEFAULT_ADMISSION_PENDING_TIMEOUT_MS,
            queries_per_sec: DEFAULT_ADMISSION_QUERIES_PER_SEC,
            not_admitted_ttl_secs: DEFAULT_ADMISSION_NOT_ADMITTED_TTL_SECS,
            not_admitted_max: DEFAULT_ADMISSION_NOT_ADMITTED_MAX,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileHandshakes {
    per_source_per_sec: u32,
    per_source_burst: u32,
    max_sources: usize,
}

impl Default for FileHandshakes {
    fn default() -> Self {
        Self {
            per_source_per_sec: DEFAULT_HANDSHAKES_PER_SOURCE_PER_SEC,
            per_source_burst: DEFAULT_HANDSHAKES_PER_SOURCE_BURST,
            max_sources: DEFAULT_HANDSHAKES_MAX_SOURCES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRevocation {
    #[serde(default = "default_revocation_ttl_secs")]
    ttl_secs: u64,
    #[serde(default = "default_revocation_max_sessions")]
    max_sessions: usize,
}

impl Default for FileRevocation {
    fn default() -> Self {
        Self {
            ttl_secs: DEFAULT_REVOCATION_TTL_SECS,
            max_sessions: DEFAULT_REVOCATION_MAX_SESSIONS,
        }
    }
}

fn default_revocation_ttl_secs() -> u64 {
    DEFAULT_REVOCATION_TTL_SECS
}
fn default_revocation_max_sessions() -> usize {
    DEFAULT_REVOCATION_MAX_SESSIONS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    #[serde(default = "default_listen_devices")]
    devices: SocketAddr,
    #[serde(default = "default_listen_admin")]
    admin: SocketAddr,
}

impl Default for FileListen {
    fn default() -> Self {
        Self {
            devices: default_listen_devices(),
            admin: default_listen_admin(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUplink {
    core: Option<CoreAddr>,
    server_name: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_reconnect_initial_ms")]
    reconnect_initial_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    reconnect_max_ms: u64,
    #[serde(default = "default_queue_frames")]
    queue_frames: usize,
    #[serde(default)]
    bulk: Option<CoreAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFlows {
    #[serde(default = "default_flows_max")]
    max: usize,
    #[serde(default = "default_idle_timeout_secs")]
    idle_timeout_secs: u64,
}

impl Default for FileFlows {
    fn default() -> Self {
        Self {
            max: DEFAULT_FLOWS_MAX,
            idle_timeout_secs: DEFAULT_FLOW_IDLE_TIMEOUT_SECS,
        }
    }
}

fn default_listen_devices() -> SocketAddr {
    DEFAULT_LISTEN_DEVICES
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 5683)))
}
fn default_listen_admin() -> SocketAddr {
    DEFAULT_LISTEN_ADMIN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9465)))
}
fn default_reconnect_initial_ms() -> u64 {
    DEFAULT_RECONNECT_INITIAL_MS
}
fn default_reconnect_max_ms() -> u64 {
    DEFAULT_RECONNECT_MAX_MS
}
fn default_queue_frames() -> usize {
    DEFAULT_QUEUE_FRAMES
}
fn default_flows_max() -> usize {
    DEFAULT_FLOWS_MAX
}
fn default_idle_timeout_secs() -> u64 {
    DEFAULT_FLOW_IDLE_TIMEOUT_SECS
}

impl GatewayConfig {
    /// Reads the file named on the command line and applies the flags on top.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(&cli.config).map_err(|source| ConfigError::Read {
            path: cli.config.clone(),
            source,
        })?;
        Self::from_toml(&text, &cli.config, cli)
    }

    /// Parses `text` as if read from `path` (relative paths inside resolve against its directory)
    /// and applies the flags in `cli` (its `config` field is not consulted).
    pub fn from_toml(text: &str, path: &Path, cli: &Cli) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&e, text),
        })?;
        let invalid = |key: &'static str, why: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            why,
        };

        let name = file.name;
        if name.is_empty() || name.len() > relay_protocol::uplink::MAX_NAME_LEN {
            return Err(invalid(
                "name",
                format!(
                    "must be 1 to {} bytes, is {}",
                    relay_protocol::uplink::MAX_NAME_LEN,
                    name.len()
                ),
            ));
        }

        let up = file.uplink;
        let core = cli.core.clone().or(up.core).ok_or_else(|| {
            invalid(
                "uplink.core",
                "missing (set it in the file or with --core)".into(),
            )
        })?;
        if rustls::pki_types::ServerName::try_from(up.server_name.as_str()).is_err() {
            return Err(invalid(
                "uplink.server_name",
                format!("{:?} is not a DNS name or IP address", up.server_name),
            ));
        }
        if up.reconnect_initial_ms == 0 || up.reconnect_initial_ms > MAX_RECONNECT_MS {
            return Err(invalid(
                "uplink.reconnect_initial_ms",
                format!("must be 1 to {MAX_RECONNECT_MS}"),
            ));
        }
        if up.reconnect_max_ms < up.reconnect_initial_ms || up.reconnect_max_ms > MAX_RECONNECT_MS {
            return Err(invalid(
                "uplink.reconnect_max_ms",
                format!(
                    "must be reconnect_initial_ms ({}) to {MAX_RECONNECT_MS}",
                    up.reconnect_initial_ms
                ),
            ));
        }
        if up.queue_frames > MAX_QUEUE_FRAMES {
            return Err(invalid(
                "uplink.queue_frames",
                format!("must be at most {MAX_QUEUE_FRAMES}"),
            ));
        }
        if file.flows.max == 0 || file.flows.max > MAX_FLOWS_LIMIT {
            return Err(invalid(
                "flows.max",
                format!("must be 1 to {MAX_FLOWS_LIMIT}"),
            ));
        }
        if file.flows.idle_timeout_secs == 0 || file.flows.idle_timeout_secs > MAX_IDLE_TIMEOUT_SECS
        {
            return Err(invalid(
                "flows.idle_timeout_secs",
                format!("must be 1 to {MAX_IDLE_TIMEOUT_SECS}"),
            ));
        }

        let revocation = file.revocation;
        if revocation.ttl_secs == 0 || revocation.ttl_secs > MAX_REVOCATION_TTL_SECS {
            return Err(invalid(
                "revocation.ttl_secs",
                format!("must be 1 to {MAX_REVOCATION_TTL_SECS}"),
            ));
        }
        if revocation.max_sessions == 0 || revocation.max_sessions > MAX_REVOCATION_SESSIONS {
            return Err(invalid(
                "revocation.max_sessions",
                format!("must be 1 to {MAX_REVOCATION_SESSIONS}"),
            ));
        }

        let hs = file.handshakes;
        for (key, value) in [
            ("handshakes.per_source_per_sec", hs.per_source_per_sec),
            ("handshakes.per_source_burst", hs.per_source_burst),
        ] {
            if value == 0 || value > MAX_HANDSHAKE_RATE {
                return Err(invalid(key, format!("must be 1 to {MAX_HANDSHAKE_RATE}")));
            }
        }
        if hs.max_sources == 0 || hs.max_sources > MAX_HANDSHAKE_SOURCES {
            return Err(invalid(
                "handshakes.max_sources",
                format!("must be 1 to {MAX_HANDSHAKE_SOURCES}"),
            ));
        }

        let adm = file.admission;
        if adm.max_sessions == 0 || adm.max_sessions > MAX_ADMISSION_SESSIONS {
            return Err(invalid(
                "admission.max_sessions",
                format!("must be 1 to {MAX_ADMISSION_SESSIONS}"),
            ));
        }
        if adm.pending_frames > MAX_ADMISSION_PENDING_FRAMES {
            return Err(invalid(
                "admission.pending_frames",
                format!("must be 0 to {MAX_ADMISSION_PENDING_FRAMES}"),
            ));
        }
        if adm.pending_timeout_ms == 0 || adm.pending_timeout_ms > MAX_ADMISSION_PENDING_TIMEOUT_MS
        {
            return Err(invalid(
                "admission.pending_timeout_ms",
                format!("must be 1 to {MAX_ADMISSION_PENDING_TIMEOUT_MS}"),
            ));
        }
        if adm.queries_per_sec == 0 || adm.queries_per_sec > MAX_ADMISSION_QUERIES_PER_SEC {
            return Err(invalid(
                "admission.queries_per_sec",
                format!("must be 1 to {MAX_ADMISSION_QUERIES_PER_SEC}"),
            ));
        }
        if adm.not_admitted_ttl_secs == 0 || adm.not_admitted_ttl_secs > MAX_REVOCATION_TTL_SECS {
            return Err(invalid(
                "admission.not_admitted_ttl_secs",
                format!("must be 1 to {MAX_REVOCATION_TTL_SECS}"),
            ));
        }
        if adm.not_admitted_max == 0 || adm.not_admitted_max > MAX_REVOCATION_SESSIONS {
            return Err(invalid(
                "admission.not_admitted_max",
                format!("must be 1 to {MAX_REVOCATION_SESSIONS}"),
            ));
        }

        let streams = file.streams;
        if streams.max_streams == 0 || streams.max_streams > MAX_STREAMS_LIMIT {
            return Err(invalid(
                "streams.max_streams",
                format!("must be 1 to {MAX_STREAMS_LIMIT}"),
            ));
        }
        if streams.stall_timeout_secs == 0
            || streams.stall_timeout_secs > MAX_STREAMS_STALL_TIMEOUT_SECS
        {
            return Err(invalid(
                "streams.stall_timeout_secs",
                format!("must be 1 to {MAX_STREAMS_STALL_TIMEOUT_SECS}"),
            ));
        }

        let base = path.parent().unwrap_or_else(|| Path::new(""));
        let files = TlsFiles {
            ca: resolve(base, &up.ca),
            cert: resolve(base, &up.cert),
            key: resolve(base, &up.key),
        };
        let tls = TlsIdentity::load(&files).map_err(|source| ConfigError::Tls {
            path: path.to_owned(),
            source,
        })?;
        // Build the client configuration once here so that a key that does not match its
        // certificate, or a CA file of junk, is a configuration error and not a runtime one.
        tls.client_config().map_err(|source| ConfigError::Tls {
            path: path.to_owned(),
            source,
        })?;

        Ok(Self {
            name,
            listen_devices: cli.listen_devices.unwrap_or(file.listen.devices),
            listen_admin: cli.listen_admin.unwrap_or(file.listen.admin),
            ready_file: cli.ready_file.clone(),
            uplink: UplinkConfig {
                core,
                server_name: up.server_name,
                files,
                tls,
                reconnect_initial: Duration::from_millis(up.reconnect_initial_ms),
                reconnect_max: Duration::from_millis(up.reconnect_max_ms),
                queue_frames: up.queue_frames,
                bulk: up.bulk,
            },
            flows: FlowsConfig {
                max: file.flows.max,
                idle_timeout: Duration::from_secs(file.flows.idle_timeout_secs),
            },
            handshakes: HandshakeLimits {
                per_source_per_sec: hs.per_source_per_sec,
                per_source_burst: hs.per_source_burst,
                max_sources: hs.max_sources,
            },
            revocation: RevocationConfig {
                ttl: Duration::from_secs(revocation.ttl_secs),
                max_sessions: revocation.max_sessions,
            },
            admission: AdmissionConfig {
                require: adm.require,
                max_sessions: adm.max_sessions,
                pending_frames: adm.pending_frames,
                pending_timeout: Duration::from_millis(adm.pending_timeout_ms),
                queries_per_sec: adm.queries_per_sec,
                not_admitted_ttl: Duration::from_secs(adm.not_admitted_ttl_secs),
                not_admitted_max: adm.not_admitted_max,
            },
            streams: StreamsConfig {
                enabled: streams.enabled,
                listen: streams.listen,
                max_streams: streams.max_streams,
                stall_timeout: Duration::from_secs(streams.stall_timeout_secs),
                cpu_priority: streams.cpu_priority,
            },
        })
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// `toml`'s own message spans several lines with a source excerpt; keep one line with the position.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(path: &Path) -> Cli {
        Cli {
            config: path.to_owned(),
            listen_devices: None,
            listen_admin: None,
            core: None,
            ready_file: None,
        }
    }

    /// A CA, and a gateway certificate it signed, written as PEM into `dir`.
    fn write_pki(dir: &Path) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["gateway-1".to_owned()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("cert");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        std::fs::create_dir_all(dir.join("gw")).expect("mkdir");
        std::fs::write(dir.join("gw/cert.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("gw/key.pem"), key.serialize_pem()).expect("write");
    }

    const MINIMAL: &str = r#"
name = "gateway-1"

[uplink]
core = "127.0.0.1:4433"
server_name = "core.relay.local"
ca = "../ca.pem"
cert = "cert.pem"
key = "key.pem"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        std::fs::write(&path, MINIMAL).expect("write");
        let c = GatewayConfig::load(&cli(&path)).expect("valid config");
        assert_eq!(c.name, "gateway-1");
        assert_eq!(c.listen_devices, "0.0.0.0:5683".parse().expect("addr"));
        assert_eq!(c.listen_admin, "127.0.0.1:9465".parse().expect("addr"));
        assert_eq!(c.uplink.core, "127.0.0.1:4433".parse().expect("addr"));
        assert_eq!(c.uplink.reconnect_initial, Duration::from_millis(100));
        assert_eq!(c.uplink.reconnect_max, Duration::from_secs(10));
        assert_eq!(c.uplink.queue_frames, 4096);
        assert_eq!(c.flows.max, 100_000);
        assert_eq!(c.flows.idle_timeout, Duration::from_secs(900));
        assert_eq!(c.revocation.ttl, Duration::from_secs(600));
        assert_eq!(c.revocation.max_sessions, 65_536);
        assert_eq!(
            c.handshakes,
            HandshakeLimits {
                per_source_per_sec: 5,
                per_source_burst: 10,
                max_sources: 100_000,
            }
        );
        assert_eq!(
            c.admission,
            AdmissionConfig {
                require: true,
                max_sessions: 1_000_000,
                pending_frames: 4096,
                pending_timeout: Duration::from_secs(2),
                queries_per_sec: 2000,
                not_admitted_ttl: Duration::from_secs(60),
                not_admitted_max: 65_536,
            }
        );
        assert_eq!(
            c.streams,
            StreamsConfig {
                enabled: true,
                listen: None,
                max_streams: 64,
                stall_timeout: Duration::from_secs(30),
                cpu_priority: LanePriority::Idle,
            }
        );
        assert_eq!(c.uplink.files.ca, dir.path().join("gw/../ca.pem"));
        assert_eq!(c.uplink.files.cert, dir.path().join("gw/cert.pem"));
        assert_eq!(c.uplink.files.key, dir.path().join("gw/key.pem"));
    }

    #[test]
    fn admission_section() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        let text = format!(
            "{MINIMAL}\n[admission]\nrequire = false\nmax_sessions = 10\npending_frames = 0\n\
             pending_timeout_ms = 500\nqueries_per_sec = 7\nnot_admitted_ttl_secs = 5\n\
             not_admitted_max = 3\n"
        );
        let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
        assert_eq!(
            c.admission,
            AdmissionConfig {
                require: false,
                max_sessions: 10,
                pending_frames: 0,
                pending_timeout: Duration::from_millis(500),
                queries_per_sec: 7,
                not_admitted_ttl: Duration::from_secs(5),
                not_admitted_max: 3,
            }
        );
        // Keys left out keep their defaults.
        let text = format!("{MINIMAL}\n[admission]\nrequire = false\n");
        let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
        assert!(!c.admission.require);
        assert_eq!(c.admission.max_sessions, DEFAULT_ADMISSION_MAX_SESSIONS);
    }

    #[test]
    fn streams_section() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        let text = format!(
            "{MINIMAL}\n[streams]\nlisten = \"127.0.0.1:6000\"\nenabled = false\n\
             max_streams = 3\nstall_timeout_secs = 5\ncpu_priority = \"low\"\n"
        );
        let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
        assert_eq!(
            c.streams,
            StreamsConfig {
                enabled: false,
                listen: Some("127.0.0.1:6000".parse().expect("addr")),
                max_streams: 3,
                stall_timeout: Duration::from_secs(5),
                cpu_priority: LanePriority::Low,
            }
        );
        // Keys left out keep their defaults; the address follows the devices'.
        let text = format!("{MINIMAL}\n[streams]\nmax_streams = 1\n");
        let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
        assert!(c.streams.enabled);
        assert_eq!(c.streams.listen, None);
        assert_eq!(c.streams.max_streams, 1);
        assert_eq!(
            c.streams.stall_timeout,
            Duration::from_secs(DEFAULT_STREAMS_STALL_TIMEOUT_SECS)
        );
        assert_eq!(c.streams.cpu_priority, LanePriority::Idle);
        for (text, want) in [
            ("idle", LanePriority::Idle),
            ("low", LanePriority::Low),
            ("normal", LanePriority::Normal),
        ] {
            let text = format!("{MINIMAL}\n[streams]\ncpu_priority = \"{text}\"\n");
            let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
            assert_eq!(c.streams.cpu_priority, want);
        }
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        let mut cli = cli(&path);
        cli.core = Some("10.0.0.1:1".parse().expect("addr"));
        cli.listen_devices = Some("127.0.0.1:0".parse().expect("addr"));
        let text = MINIMAL.replace("core = \"127.0.0.1:4433\"\n", "");
        let c = GatewayConfig::from_toml(&text, &path, &cli).expect("valid config");
        assert_eq!(c.uplink.core, "10.0.0.1:1".parse().expect("addr"));
        assert_eq!(c.listen_devices, "127.0.0.1:0".parse().expect("addr"));
    }

    #[test]
    fn the_core_may_be_a_host_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        let text = MINIMAL.replace("127.0.0.1:4433", "core:4433");
        let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
        assert_eq!(c.uplink.core.to_string(), "core:4433");
        assert_eq!(c.uplink.core.ip(), None);
        assert_eq!(c.uplink.core.port(), 4433);
        assert_eq!(
            c.uplink.bulk, None,
            "the core's announced bulk endpoint by default"
        );

        // `bulk`: where the core's bulk endpoint is reached from here (a NAT, a port forward).
        let text = MINIMAL.replace("key.pem\"", "key.pem\"\nbulk = \"bulk.example:7443\"");
        let c = GatewayConfig::from_toml(&text, &path, &cli(&path)).expect("valid config");
        assert_eq!(
            c.uplink.bulk.map(|b| b.to_string()).as_deref(),
            Some("bulk.example:7443")
        );
        let text = MINIMAL.replace("key.pem\"", "key.pem\"\nbulk = \"bulk.example\"");
        assert!(GatewayConfig::from_toml(&text, &path, &cli(&path)).is_err());

        for (text, shown) in [
            ("core.relay.local:4433", "core.relay.local:4433"),
            ("relay_core-1:1", "relay_core-1:1"),
            ("10.1.2.3:4433", "10.1.2.3:4433"),
            ("[2001:db8::1]:4433", "[2001:db8::1]:4433"),
        ] {
            let a: CoreAddr = text.parse().expect(text);
            assert_eq!(a.to_string(), shown);
        }
        let ip: CoreAddr = "10.1.2.3:4433".parse().expect("addr");
        assert_eq!(ip.ip(), Some("10.1.2.3:4433".parse().expect("addr")));
        for bad in [
            "core",
            "core:",
            ":4433",
            "core:99999",
            "two words:1",
            "2001:db8::1:4433x",
            "-core:1",
            "c/ore:1",
        ] {
            assert!(bad.parse::<CoreAddr>().is_err(), "{bad} accepted");
        }
        let e = GatewayConfig::from_toml(
            &MINIMAL.replace("127.0.0.1:4433", "core:http"),
            &path,
            &cli(&path),
        )
        .expect_err("bad port")
        .to_string();
        assert!(e.contains("line 5") && e.contains("port"), "{e}");
        assert!(!e.contains('\n'), "{e}");

        let parsed = Cli::try_parse_from(["gateway", "--config", "g.toml", "--core", "core:4433"])
            .expect("parses");
        assert_eq!(
            parsed.core.map(|c| c.to_string()).as_deref(),
            Some("core:4433")
        );
    }

    #[tokio::test]
    async fn names_resolve_at_each_lookup() {
        let name: CoreAddr = "localhost:4433".parse().expect("addr");
        let found = name.resolve().await.expect("localhost resolves");
        assert!(
            found
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 4433),
            "{found:?}"
        );
        let literal: CoreAddr = "10.1.2.3:9".parse().expect("addr");
        assert_eq!(
            literal.resolve().await.expect("no lookup"),
            ["10.1.2.3:9".parse::<SocketAddr>().expect("addr")]
        );
        let unknown: CoreAddr = "no-such-host.invalid:1".parse().expect("addr");
        assert!(unknown.resolve().await.is_err());
    }

    #[test]
    fn refuses_unknown_keys_with_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        let text = format!("{MINIMAL}\n[flows]\nmax = 10\nmax_idle = 3\n");
        let e = GatewayConfig::from_toml(&text, &path, &cli(&path))
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("max_idle"), "{e}");
        assert!(e.contains("line 13, column 1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn refuses_bad_values_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        let check = |text: &str, needle: &str| {
            let e = GatewayConfig::from_toml(text, &path, &cli(&path))
                .expect_err(needle)
                .to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        };
        check(&format!("{MINIMAL}[flows]\nmax = 0\n"), "flows.max");
        check(
            &format!("{MINIMAL}[revocation]\nttl_secs = 0\n"),
            "revocation.ttl_secs",
        );
        check(
            &format!("{MINIMAL}[revocation]\nmax_sessions = 0\n"),
            "revocation.max_sessions",
        );
        check(
            &format!("{MINIMAL}[handshakes]\nper_source_per_sec = 0\n"),
            "handshakes.per_source_per_sec",
        );
        check(
            &format!("{MINIMAL}[handshakes]\nper_source_burst = 2000000\n"),
            "handshakes.per_source_burst",
        );
        check(
            &format!("{MINIMAL}[handshakes]\nmax_sources = 0\n"),
            "handshakes.max_sources",
        );
        for (section, needle) in [
            ("max_sessions = 0", "admission.max_sessions"),
            ("pending_frames = 2000000", "admission.pending_frames"),
            ("pending_timeout_ms = 0", "admission.pending_timeout_ms"),
            ("queries_per_sec = 0", "admission.queries_per_sec"),
            (
                "not_admitted_ttl_secs = 0",
                "admission.not_admitted_ttl_secs",
            ),
            ("not_admitted_max = 0", "admission.not_admitted_max"),
            ("require = 1", "line 11"),
        ] {
            check(&format!("{MINIMAL}[admission]\n{section}\n"), needle);
        }
        for (section, needle) in [
            ("max_streams = 0", "streams.max_streams: must be 1 to 65536"),
            ("max_streams = 70000", "streams.max_streams"),
            (
                "stall_timeout_secs = 0",
                "streams.stall_timeout_secs: must be 1",
            ),
            ("stall_timeout_secs = 3601", "streams.stall_timeout_secs"),
            ("listen = \"nowhere\"", "line 11"),
            ("listen = \"127.0.0.1\"", "socket address"),
            ("maximum = 3", "unknown field `maximum`"),
            ("cpu_priority = \"high\"", "unknown variant `high`"),
            ("cpu_priority = 1", "line 11"),
        ] {
            check(&format!("{MINIMAL}[streams]\n{section}\n"), needle);
        }
        check(
            &MINIMAL.replace("\"gateway-1\"", "\"\""),
            "name: must be 1 to 64",
        );
        check(
            &MINIMAL.replace("core = \"127.0.0.1:4433\"\n", ""),
            "uplink.core",
        );
        check(&MINIMAL.replace("cert.pem", "nope.pem"), "nope.pem");
        check(
            &MINIMAL.replace("\"key.pem\"", "\"cert.pem\""),
            "no private key",
        );
        check("name = \"x\"\n[uplink\n", "line 2");
        let missing = GatewayConfig::load(&cli(&dir.path().join("absent.toml")))
            .expect_err("missing file")
            .to_string();
        assert!(missing.contains("absent.toml"), "{missing}");
    }

    #[test]
    fn key_material_stays_out_of_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pki(dir.path());
        let path = dir.path().join("gw/gateway.toml");
        std::fs::write(&path, MINIMAL).expect("write");
        let c = GatewayConfig::load(&cli(&path)).expect("valid config");
        let key_pem = std::fs::read_to_string(dir.path().join("gw/key.pem")).expect("read");
        let der_b64: String = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let debug = format!("{c:?}");
        assert!(debug.contains("redacted"), "{debug}");
        assert!(!debug.contains(&der_b64[..16]), "{debug}");
        let c = &c.uplink.tls;
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn cli_help_and_env() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--config",
            "--listen-devices",
            "--listen-admin",
            "--core",
            "--ready-file",
        ] {
            assert!(help.contains(flag), "{help}");
        }
        assert!(help.contains("GATEWAY_CORE"), "{help}");
        let parsed =
            Cli::try_parse_from(["gateway", "--config", "g.toml", "--core", "127.0.0.1:1"])
                .expect("parses");
        assert_eq!(parsed.core, Some("127.0.0.1:1".parse().expect("addr")));
    }
}
