//! `core.toml`, parsed once into validated types (`docs/architecture.md`, "Configuration files").
//!
//! Unknown keys are refused, every limit has a default, paths are relative to the directory of the
//! config file, and the key material the file names is read and checked here too, so that every
//! operator mistake surfaces before anything binds a socket. Secrets live in types whose `Debug`
//! never prints them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_ops::lane::LanePriority;
use relay_protocol::session::StaticKeypair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::disk::GiveWay;
use crate::release::{ReleaseSigner, TrustedReleaser, ISSUER_KEY_LEN};
use crate::tokens::{TokenFileError, TokenSet};

/// Why the configuration cannot be used. Always the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown keys.
    #[error("{path}: line {line}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the problem (0 when unknown).
        line: usize,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {field}: {why}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The dotted key.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A key or certificate file is not what it should be.
    #[error("{path}: {why}")]
    KeyMaterial {
        /// The key or certificate file.
        path: PathBuf,
        /// What is wrong with it (never its contents).
        why: String,
    },
    /// The admin tokens file is unusable.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
}

/// The core's whole configuration, validated.
#[derive(Debug)]
pub struct CoreConfig {
    /// This core's name, for logs.
    pub name: String,
    /// Where to listen. Tests set port 0 here; command-line flags override the file.
    pub listen: ListenConfig,
    /// The TLS identity and the gateway CA.
    pub tls: TlsConfig,
    /// The core's Noise static key.
    pub noise: NoiseKey,
    /// The subscription store and its write batching.
    pub store: StoreConfig,
    /// Session policy.
    pub session: SessionConfig,
    /// Caps on gateways and flows.
    pub limits: LimitsConfig,
    /// The admin API's tokens.
    pub admin: AdminApiConfig,
    /// The device credential lifecycle: `[credentials]`, `[fraud]`, `[release]`.
    pub lifecycle: LifecycleConfig,
    /// What the gateways are told about admitted sessions: `[admission]`.
    pub admission: AdmissionConfig,
    /// Handshake load control: `[handshakes]`.
    pub handshakes: HandshakesConfig,
    /// The video sink for device streams: `[video]`.
    pub video: VideoConfig,
    /// Where to write `{"quic":…,"direct":…,"streams":…,"bulk":…,"admin":…}` once ready
    /// (command line only).
    pub ready_file: Option<PathBuf>,
}

/// `[listen]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenConfig {
    /// Gateways (QUIC over UDP).
    pub quic: SocketAddr,
    /// Devices with direct access (UDP).
    pub direct: SocketAddr,
    /// Device streams with direct access (TCP, `docs/protocol.md` §13). `None`: the direct
    /// address's IP and bound port number, over TCP (resolved when binding, so that a command-line
    /// override of the direct address moves it too).
    pub streams: Option<SocketAddr>,
    /// Gateways' bulk QUIC endpoint (UDP): a second connection from each gateway that carries
    /// only device streams, driven by the bulk lane's threads. `None`: the QUIC address's IP and
    /// port + 1, or port 0 when the QUIC port is 0 ([`ListenConfig::bulk_addr`]; resolved when
    /// binding, so that a command-line override of the QUIC address moves it too).
    pub bulk: Option<SocketAddr>,
    /// `/metrics`, `/live`, `/ready` (TCP).
    pub admin: SocketAddr,
}

impl ListenConfig {
    /// The address the bulk endpoint binds: `bulk` when set, else the QUIC address's IP with the
    /// next port number (`0.0.0.0:4433` -> `0.0.0.0:4434`), or port 0 when the QUIC port is 0.
    /// `None` when the QUIC port is 65535 and `bulk` is not set (there is no next port).
    pub fn bulk_addr(&self) -> Option<SocketAddr> {
        if let Some(addr) = self.bulk {
            return Some(addr);
        }
        let port = match self.quic.port() {
            0 => 0,
            p => p.checked_add(1)?,
        };
        Some(SocketAddr::new(self.quic.ip(), port))
    }
}

/// `[tls]`, loaded: the certificate chain, its private key and the CA gateways must chain to.
pub struct TlsConfig {
    /// Where the certificate came from (for logs).
    pub cert_path: PathBuf,
    /// The core's certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Certificates of the CA(s) that sign gateway client certificates.
    pub gateway_ca: Vec<CertificateDer<'static>>,
}

impl TlsConfig {
    /// The private key (for the TLS server configuration only).
    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_path", &self.cert_path)
            .field("cert_chain", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .field("gateway_ca", &self.gateway_ca.len())
            .finish()
    }
}

/// The core's Noise static key pair. `Debug` prints the public key only.
pub struct NoiseKey(StaticKeypair);

impl NoiseKey {
    /// Wraps a key pair.
    pub fn new(keypair: StaticKeypair) -> Self {
        Self(keypair)
    }

    /// The public half, which devices are configured with.
    pub fn public(&self) -> &relay_protocol::session::PublicKey {
        self.0.public()
    }

    pub(crate) fn into_keypair(self) -> StaticKeypair {
        self.0
    }
}

impl fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoiseKey({:?})", self.0.public())
    }
}

/// `[store]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The SQLite database.
    pub path: PathBuf,
    /// Readings per commit at most.
    pub batch_max: usize,
    /// How long a commit waits to fill a batch.
    pub batch_linger: Duration,
}

/// `[session]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Told to the device in the handshake response.
    pub rekey_after_secs: u32,
    /// The core refuses a session's frames after this.
    pub reject_after: Duration,
    /// Sessions held at most.
    pub max_sessions: usize,
}

/// `[limits]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Gateway connections at once.
    pub max_gateways: usize,
    /// Told to each gateway in `HelloAck`.
    pub max_flows_per_gateway: u32,
}

/// `[admission]`: the quota a gateway holds each admitted session to when the session's profile
/// names none (`docs/protocol.md`, admission). 0 in a field: unlimited for that field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Frames per interval (default 6000: 100 a second over a minute).
    pub quota_frames: u32,
    /// Bytes of device frames per interval (default 7,200,000: 6000 frames of 1200 bytes).
    pub quota_bytes: u32,
    /// The interval in seconds (default 60).
    pub quota_interval_secs: u16,
}

/// The default `[admission] quota_frames`.
pub const DEFAULT_QUOTA_FRAMES: u32 = 6000;
/// The default `[admission] quota_bytes`.
pub const DEFAULT_QUOTA_BYTES: u32 = 7_200_000;
/// The default `[admission] quota_interval_secs`, also what `core-stub profiles set` uses when a
/// quota flag is given without `--quota-interval-secs`.
pub const DEFAULT_QUOTA_INTERVAL_SECS: u16 = 60;

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            quota_frames: DEFAULT_QUOTA_FRAMES,
            quota_bytes: DEFAULT_QUOTA_BYTES,
            quota_interval_secs: DEFAULT_QUOTA_INTERVAL_SECS,
        }
    }
}

/// `[handshakes]`: when the core answers handshake initiations with a cookie challenge instead of
/// doing the Noise work (`docs/protocol.md`, cookies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakesConfig {
    /// Initiations (plain and cookie-carrying) per 1-second window above which a plain one is
    /// answered with a cookie reply (default 2000; 0: always).
    pub cookie_above_per_sec: u32,
}

/// The default `[handshakes] cookie_above_per_sec`.
pub const DEFAULT_COOKIE_ABOVE_PER_SEC: u32 = 2000;

impl Default for HandshakesConfig {
    fn default() -> Self {
        Self {
            cookie_above_per_sec: DEFAULT_COOKIE_ABOVE_PER_SEC,
        }
    }
}

/// `[video]`: where and how the core stores what devices upload over streams
/// (`docs/protocol.md` §13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoConfig {
    /// The directory of stored and partial uploads (`dir`, relative to the config file).
    pub dir: PathBuf,
    /// The largest upload accepted, in bytes (`max_bytes`; larger ones are refused `too_large`).
    pub max_bytes: u64,
    /// Device streams open at once, all gateways and direct access together (`max_streams`;
    /// more are refused `busy`). Each gateway connection may open this many QUIC streams.
    pub max_streams: usize,
    /// A stream that delivers no whole frame for this long is ended (`stall_timeout_secs`).
    pub stall_timeout: Duration,
    /// Chunks stored per acknowledgement (`ack_every_chunks`): each batch costs a sync of the
    /// data and an atomic rewrite of the state file. While one batch is being synced the next may
    /// grow beyond this (group commit, at most 16 times; see `streams.rs`).
    pub ack_every_chunks: u32,
    /// The CPU priority of the bulk lane's threads (`cpu_priority`: `idle`, `low` or `normal`),
    /// where device streams, the gateways' bulk QUIC connections and their disk writes run.
    pub cpu_priority: LanePriority,
    /// Whether video writes give way to the store's commits (`give_way`: `auto`, when the videos
    /// share the database's disk, or `never`; `disk.rs`).
    pub give_way: GiveWay,
}

/// The default `[video] dir`.
pub const DEFAULT_VIDEO_DIR: &str = "videos";
/// The default `[video] max_bytes`: 4 GiB.
pub const DEFAULT_VIDEO_MAX_BYTES: u64 = 4 << 30;
/// The default `[video] max_streams`.
pub const DEFAULT_VIDEO_MAX_STREAMS: usize = 256;
/// The default `[video] stall_timeout_secs`.
pub const DEFAULT_VIDEO_STALL_SECS: u64 = 30;
/// The default `[video] ack_every_chunks` (1 MiB at 64 KiB chunks).
pub const DEFAULT_VIDEO_ACK_EVERY: u32 = 16;
/// The most `[video] max_streams` accepted: each may hold a few MiB in flight.
pub const MAX_VIDEO_STREAMS: u64 = 65_536;

impl Default for VideoConfig {
    fn default() -> Self {
        Self {
            dir: DEFAULT_VIDEO_DIR.into(),
            max_bytes: DEFAULT_VIDEO_MAX_BYTES,
            max_streams: DEFAULT_VIDEO_MAX_STREAMS,
            stall_timeout: Duration::from_secs(DEFAULT_VIDEO_STALL_SECS),
            ack_every_chunks: DEFAULT_VIDEO_ACK_EVERY,
            cpu_priority: LanePriority::default(),
            give_way: GiveWay::default(),
        }
    }
}

/// `[admin]`: the admin API (`/v1/…` on the admin listener). Without a tokens file no token is
/// valid, so every API request is refused (and audited).
#[derive(Clone, Debug, Default)]
pub struct AdminApiConfig {
    /// Where the tokens came from.
    pub tokens_file: Option<PathBuf>,
    /// The tokens accepted.
    pub tokens: TokenSet,
}

/// What the core does with a subscription its fraud detector suspects (`[fraud] action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FraudAction {
    /// Flag it and quarantine it: its sessions are dropped and its key refused until the device
    /// re-provisions with its factory identity.
    #[default]
    Quarantine,
    /// Flag it and ask the device for a credential update; it keeps working meanwhile.
    Flag,
}

/// `[credentials]`, `[fraud]` and `[release]`: the device credential lifecycle.
#[derive(Clone, Debug, Default)]
pub struct LifecycleConfig {
    /// A subscription key older than this gets a Rotate notice (`[credentials]
    /// rotate_after_secs`, default 90 days; 0 = never).
    pub rotate_after_secs: u64,
    /// What a fraud suspicion does (`[fraud] action`).
    pub fraud_action: FraudAction,
    /// The key this core signs releases with (`[release] signing_key_file`); `None` when the
    /// file is not there and was not named (no releases can be issued).
    pub release_signer: Option<ReleaseSigner>,
    /// Other operators' cores whose releases this core accepts (`[[release.trusted]]`).
    pub trusted_releasers: Vec<TrustedReleaser>,
}

/// The default key age that triggers a credential update: 90 days.
pub const DEFAULT_ROTATE_AFTER_SECS: u64 = 90 * 24 * 3600;

// The file as written. Every section and key has a default; unknown keys are errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    name: String,
    listen: RawListen,
    tls: RawTls,
    noise: RawNoise,
    store: RawStore,
    session: RawSession,
    limits: RawLimits,
    admin: RawAdmin,
    credentials: RawCredentials,
    fraud: RawFraud,
    release: RawRelease,
    admission: RawAdmission,
    handshakes: RawHandshakes,
    video: RawVideo,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawVideo {
    dir: PathBuf,
    max_bytes: u64,
    max_streams: u64,
    stall_timeout_secs: u64,
    ack_every_chunks: u64,
    cpu_priority: LanePriority,
    give_way: GiveWay,
}

impl Default for RawVideo {
    fn default() -> Self {
        let d = VideoConfig::default();
        Self {
            dir: d.dir,
            max_bytes: d.max_bytes,
            max_streams: d.max_streams as u64,
            stall_timeout_secs: d.stall_timeout.as_secs(),
            ack_every_chunks: d.ack_every_chunks.into(),
            cpu_priority: d.cpu_priority,
            give_way: d.give_way,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmission {
    quota_frames: u64,
    quota_bytes: u64,
    quota_interval_secs: u64,
}

impl Default for RawAdmission {
    fn default() -> Self {
        let d = AdmissionConfig::default();
        Self {
            quota_frames: d.quota_frames.into(),
            quota_bytes: d.quota_bytes.into(),
            quota_interval_secs: d.quota_interval_secs.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHandshakes {
    cookie_above_per_sec: u64,
}

impl Default for RawHandshakes {
    fn default() -> Self {
        Self {
            cookie_above_per_sec: DEFAULT_COOKIE_ABOVE_PER_SEC.into(),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    tokens_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCredentials {
    rotate_after_secs: u64,
}

impl Default for RawCredentials {
    fn default() -> Self {
        Self {
            rotate_after_secs: DEFAULT_ROTATE_AFTER_SECS,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFraud {
    action: FraudAction,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRelease {
    /// `None`: `release.key` if it exists.
    signing_key_file: Option<PathBuf>,
    trusted: Vec<RawTrusted>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrusted {
    name: String,
    public_key: String,
}

/// The default release signing key file, relative to the config.
pub const DEFAULT_RELEASE_KEY: &str = "release.key";

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            name: "core-1".into(),
            listen: RawListen::default(),
            tls: RawTls::default(),
            noise: RawNoise::default(),
            store: RawStore::default(),
            session: RawSession::default(),
            limits: RawLimits::default(),
            admin: RawAdmin::default(),
            credentials: RawCredentials::default(),
            fraud: RawFraud::default(),
            release: RawRelease::default(),
            admission: RawAdmission::default(),
            handshakes: RawHandshakes::default(),
            video: RawVideo::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    quic: SocketAddr,
    direct: SocketAddr,
    /// `None`: the direct address, over TCP.
    streams: Option<SocketAddr>,
    /// `None`: the QUIC address's port + 1.
    bulk: Option<SocketAddr>,
    admin: SocketAddr,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            quic: SocketAddr::from(([127, 0, 0, 1], 4433)),
            direct: SocketAddr::from(([127, 0, 0, 1], 5684)),
            streams: None,
            bulk: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    gateway_ca: PathBuf,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            gateway_ca: "../ca.pem".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNoise {
    private_key_file: PathBuf,
}

impl Default for RawNoise {
    fn default() -> Self {
        Self {
            private_key_file: "noise.key".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    path: PathBuf,
    batch_max: u64,
    batch_linger_ms: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            path: "subscriptions.db".into(),
            batch_max: 512,
            batch_linger_ms: 2,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSession {
    rekey_after_secs: u64,
    reject_after_secs: u64,
    max_sessions: u64,
}

impl Default for RawSession {
    fn default() -> Self {
        Self {
            rekey_after_secs: 3600,
            reject_after_secs: 7200,
            max_sessions: 1_000_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_gateways: u64,
    max_flows_per_gateway: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_gateways: 256,
            max_flows_per_gateway: 1_000_000,
        }
    }
}

/// The largest batch a commit may take: beyond this a transaction only adds latency.
pub const MAX_BATCH: u64 = 100_000;
/// The longest linger accepted: acknowledgements wait at least this long.
pub const MAX_LINGER_MS: u64 = 1_000;

impl CoreConfig {
    /// Reads `path`, resolves the paths in it against its directory, and loads the key material.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Parses `text` (named `origin` in errors) with relative paths resolved against `base`.
    pub fn from_toml(text: &str, origin: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            line: e
                .span()
                .map(|s| {
                    let upto = &text.as_bytes()[..s.start.min(text.len())];
                    upto.iter().filter(|b| **b == b'\n').count() + 1
                })
                .unwrap_or(0),
            message: e.message().replace('\n', " "),
        })?;
        let invalid = |field: &'static str, why: String| ConfigError::Invalid {
            path: origin.to_owned(),
            field,
            why,
        };

        if raw.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if raw.store.batch_max == 0 || raw.store.batch_max > MAX_BATCH {
            return Err(invalid(
                "store.batch_max",
                format!("must be between 1 and {MAX_BATCH}"),
            ));
        }
        if raw.store.batch_linger_ms > MAX_LINGER_MS {
            return Err(invalid(
                "store.batch_linger_ms",
                format!("must be at most {MAX_LINGER_MS}"),
            ));
        }
        let rekey_after_secs = u32::try_from(raw.session.rekey_after_secs)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| {
                invalid(
                    "session.rekey_after_secs",
                    format!("must be between 1 and {}", u32::MAX),
                )
            })?;
        if raw.session.reject_after_secs <= raw.session.rekey_after_secs {
            return Err(invalid(
                "session.reject_after_secs",
                "must be greater than session.rekey_after_secs".into(),
            ));
        }
        if raw.session.max_sessions == 0 {
            return Err(invalid("session.max_sessions", "must be at least 1".into()));
        }
        if raw.limits.max_gateways == 0 || raw.limits.max_gateways > 65_536 {
            return Err(invalid(
                "limits.max_gateways",
                "must be between 1 and 65536".into(),
            ));
        }
        let max_flows_per_gateway = u32::try_from(raw.limits.max_flows_per_gateway)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                invalid(
                    "limits.max_flows_per_gateway",
                    format!("must be between 1 and {}", u32::MAX),
                )
            })?;

        let admission = admission_config(&raw.admission).map_err(|(f, why)| invalid(f, why))?;
        let cookie_above_per_sec =
            u32::try_from(raw.handshakes.cookie_above_per_sec).map_err(|_| {
                invalid(
                    "handshakes.cookie_above_per_sec",
                    format!("must be at most {}", u32::MAX),
                )
            })?;

        let video = video_config(&raw.video, base).map_err(|(f, why)| invalid(f, why))?;
        if raw.listen.bulk.is_none() && raw.listen.quic.port() == u16::MAX {
            return Err(invalid(
                "listen.bulk",
                "must be set when listen.quic's port is 65535 (the default is its port + 1)".into(),
            ));
        }

        let cert_path = base.join(&raw.tls.cert);
        let tls = TlsConfig {
            cert_chain: read_certs(&cert_path)?,
            key: read_private_key(&base.join(&raw.tls.key))?,
            gateway_ca: read_certs(&base.join(&raw.tls.gateway_ca))?,
            cert_path,
        };
        let noise = read_noise_key(&base.join(&raw.noise.private_key_file))?;
        // The store is provisioned by `init`; a wrong path must not quietly start an empty one.
        let store_path = base.join(&raw.store.path);
        std::fs::metadata(&store_path).map_err(|source| ConfigError::Read {
            path: store_path.clone(),
            source,
        })?;
        let admin = match raw.admin.tokens_file {
            Some(rel) => {
                let path = base.join(rel);
                AdminApiConfig {
                    tokens: TokenSet::load(&path)?,
                    tokens_file: Some(path),
                }
            }
            None => AdminApiConfig::default(),
        };
        let lifecycle = LifecycleConfig {
            rotate_after_secs: raw.credentials.rotate_after_secs,
            fraud_action: raw.fraud.action,
            release_signer: read_release_key(base, raw.release.signing_key_file)?,
            trusted_releasers: trusted_releasers(raw.release.trusted)
                .map_err(|why| invalid("release.trusted", why))?,
        };

        Ok(Self {
            name: raw.name,
            listen: ListenConfig {
                quic: raw.listen.quic,
                direct: raw.listen.direct,
                streams: raw.listen.streams,
                bulk: raw.listen.bulk,
                admin: raw.listen.admin,
            },
            tls,
            noise,
            store: StoreConfig {
                path: store_path,
                batch_max: raw.store.batch_max as usize,
                batch_linger: Duration::from_millis(raw.store.batch_linger_ms),
            },
            session: SessionConfig {
                rekey_after_secs,
                reject_after: Duration::from_secs(raw.session.reject_after_secs),
                max_sessions: usize::try_from(raw.session.max_sessions).unwrap_or(usize::MAX),
            },
            limits: LimitsConfig {
                max_gateways: raw.limits.max_gateways as usize,
                max_flows_per_gateway,
            },
            admin,
            lifecycle,
            admission,
            handshakes: HandshakesConfig {
                cookie_above_per_sec,
            },
            video,
            ready_file: None,
        })
    }

    /// Moves every listener to port 0 on 127.0.0.1, as tests want.
    pub fn listen_on_ephemeral_ports(&mut self) {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        self.listen = ListenConfig {
            quic: any,
            direct: any,
            streams: Some(any),
            bulk: Some(any),
            admin: any,
        };
    }
}

/// Checks `[admission]`: each field in its wire range, and an interval when anything is limited.
fn admission_config(raw: &RawAdmission) -> Result<AdmissionConfig, (&'static str, String)> {
    let u32_field = |field: &'static str, v: u64| {
        u32::try_from(v).map_err(|_| (field, format!("must be at most {}", u32::MAX)))
    };
    let config = AdmissionConfig {
        quota_frames: u32_field("admission.quota_frames", raw.quota_frames)?,
        quota_bytes: u32_field("admission.quota_bytes", raw.quota_bytes)?,
        quota_interval_secs: u16::try_from(raw.quota_interval_secs).map_err(|_| {
            (
                "admission.quota_interval_secs",
                format!("must be at most {}", u16::MAX),
            )
        })?,
    };
    if (config.quota_frames != 0 || config.quota_bytes != 0) && config.quota_interval_secs == 0 {
        return Err((
            "admission.quota_interval_secs",
            "must be at least 1 when quota_frames or quota_bytes is limited".into(),
        ));
    }
    Ok(config)
}

/// Checks `[video]` and resolves its directory against `base`.
fn video_config(raw: &RawVideo, base: &Path) -> Result<VideoConfig, (&'static str, String)> {
    if raw.dir.as_os_str().is_empty() {
        return Err(("video.dir", "must not be empty".into()));
    }
    let max_total = relay_protocol::stream::MAX_TOTAL_SIZE;
    if raw.max_bytes == 0 || raw.max_bytes > max_total {
        return Err((
            "video.max_bytes",
            format!("must be between 1 and {max_total} (the protocol's limit)"),
        ));
    }
    if raw.max_streams == 0 || raw.max_streams > MAX_VIDEO_STREAMS {
        return Err((
            "video.max_streams",
            format!("must be between 1 and {MAX_VIDEO_STREAMS}"),
        ));
    }
    if raw.stall_timeout_secs == 0 || raw.stall_timeout_secs > 3600 {
        return Err((
            "video.stall_timeout_secs",
            "must be between 1 and 3600".into(),
        ));
    }
    // At most 64 MiB between two acknowledgements (at 64 KiB chunks): what a stream may buffer.
    if raw.ack_every_chunks == 0 || raw.ack_every_chunks > 1024 {
        return Err((
            "video.ack_every_chunks",
            "must be between 1 and 1024".into(),
        ));
    }
    Ok(VideoConfig {
        dir: base.join(&raw.dir),
        max_bytes: raw.max_bytes,
        max_streams: raw.max_streams as usize,
        stall_timeout: Duration::from_secs(raw.stall_timeout_secs),
        ack_every_chunks: raw.ack_every_chunks as u32,
        cpu_priority: raw.cpu_priority,
        give_way: raw.give_way,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::KeyMaterial {
            path: path.to_owned(),
            why: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(ConfigError::KeyMaterial {
            path: path.to_owned(),
            why: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read_file(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| ConfigError::KeyMaterial {
            path: path.to_owned(),
            why: "no PEM private key in the file".into(),
        })
}

/// The release key named in the config must be there; the default one may be absent (a
/// deployment from before releases existed), and then this core issues no releases.
fn read_release_key(
    base: &Path,
    named: Option<PathBuf>,
) -> Result<Option<ReleaseSigner>, ConfigError> {
    let path = base.join(named.as_deref().unwrap_or(Path::new(DEFAULT_RELEASE_KEY)));
    if named.is_none() && !path.exists() {
        return Ok(None);
    }
    let der = read_file(&path)?;
    ReleaseSigner::from_pkcs8(&der)
        .map(Some)
        .map_err(|why| ConfigError::KeyMaterial { path, why })
}

fn trusted_releasers(raw: Vec<RawTrusted>) -> Result<Vec<TrustedReleaser>, String> {
    let mut out: Vec<TrustedReleaser> = Vec::with_capacity(raw.len());
    for t in raw {
        if t.name.trim().is_empty() || t.name.len() > 64 {
            return Err("a name must have 1 to 64 characters".into());
        }
        let public_key = hex::decode(t.public_key.trim())
            .ok()
            .and_then(|b| <[u8; ISSUER_KEY_LEN]>::try_from(b).ok())
            .ok_or_else(|| format!("{:?}: public_key must be 64 hex digits", t.name))?;
        if out
            .iter()
            .any(|o| o.name == t.name || o.public_key == public_key)
        {
            return Err(format!("{:?}: name or key listed twice", t.name));
        }
        out.push(TrustedReleaser {
            name: t.name,
            public_key,
        });
    }
    Ok(out)
}

fn read_noise_key(path: &Path) -> Result<NoiseKey, ConfigError> {
    let text = read_file(path)?;
    let text = std::str::from_utf8(&text).map_err(|_| ConfigError::KeyMaterial {
        path: path.to_owned(),
        why: "not 64 hex digits".into(),
    })?;
    StaticKeypair::from_private_hex(text.trim())
        .map(NoiseKey)
        .map_err(|_| ConfigError::KeyMaterial {
            path: path.to_owned(),
            why: "not a Curve25519 private key in 64 hex digits".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> ConfigError {
        let dir = tempfile::tempdir().expect("tempdir");
        match CoreConfig::from_toml(text, Path::new("core.toml"), dir.path()) {
            Ok(_) => panic!("config accepted: {text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = parse_err("name = \"x\"\nbogus = 1\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = parse_err("[store]\nbatch_max = 5\nlinger = 3\n");
        assert!(matches!(e, ConfigError::Parse { line: 3, .. }), "{e}");
        let e = parse_err("[admin]\ntokens = \"x\"\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        let e = parse_err("[nope]\n");
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn limits_are_validated() {
        let e = parse_err("[store]\nbatch_max = 0\n");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "store.batch_max",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_err("[session]\nrekey_after_secs = 10\nreject_after_secs = 10\n");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "session.reject_after_secs",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_err("[listen]\nquic = \"not an address\"\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn lifecycle_sections_are_validated() {
        let e = parse_err("[fraud]\naction = \"shrug\"\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        let e = parse_err("[credentials]\nrotate_after = 5\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        let e = parse_err("[[release.trusted]]\nname = \"x\"\n");
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(trusted_releasers(vec![RawTrusted {
            name: "x".into(),
            public_key: "00".into()
        }])
        .is_err());
        let k = "ab".repeat(32);
        let two = |a: &str, b: &str| {
            trusted_releasers(vec![
                RawTrusted {
                    name: a.into(),
                    public_key: k.clone(),
                },
                RawTrusted {
                    name: b.into(),
                    public_key: k.clone(),
                },
            ])
        };
        assert!(two("a", "b").is_err(), "one key twice");
        let one = trusted_releasers(vec![RawTrusted {
            name: "old".into(),
            public_key: k.clone(),
        }])
        .expect("valid");
        assert_eq!(one[0].public_key, [0xab; 32]);
        let raw: RawConfig = toml::from_str("").expect("defaults");
        assert_eq!(raw.credentials.rotate_after_secs, DEFAULT_ROTATE_AFTER_SECS);
        assert_eq!(raw.fraud.action, FraudAction::Quarantine);
        let raw: RawConfig =
            toml::from_str("[fraud]\naction = \"flag\"\n[credentials]\nrotate_after_secs = 0\n")
                .expect("parse");
        assert_eq!(
            (raw.fraud.action, raw.credentials.rotate_after_secs),
            (FraudAction::Flag, 0)
        );
        // The default key may be absent; a named one may not.
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read_release_key(dir.path(), None)
            .expect("absent")
            .is_none());
        assert!(read_release_key(dir.path(), Some("r.key".into())).is_err());
        std::fs::write(dir.path().join("release.key"), b"junk").expect("write");
        assert!(matches!(
            read_release_key(dir.path(), None),
            Err(ConfigError::KeyMaterial { .. })
        ));
    }

    #[test]
    fn admission_and_handshakes_have_safe_defaults_and_are_validated() {
        let raw: RawConfig = toml::from_str("").expect("defaults");
        assert_eq!(
            admission_config(&raw.admission).expect("valid"),
            AdmissionConfig {
                quota_frames: 6000,
                quota_bytes: 7_200_000,
                quota_interval_secs: 60
            }
        );
        assert_eq!(raw.handshakes.cookie_above_per_sec, 2000);
        let raw: RawConfig = toml::from_str(
            "[admission]\nquota_frames = 0\nquota_bytes = 0\nquota_interval_secs = 0\n\
             [handshakes]\ncookie_above_per_sec = 0\n",
        )
        .expect("parse");
        assert_eq!(
            admission_config(&raw.admission).expect("unlimited"),
            AdmissionConfig {
                quota_frames: 0,
                quota_bytes: 0,
                quota_interval_secs: 0
            }
        );
        assert_eq!(raw.handshakes.cookie_above_per_sec, 0);
        for (text, field) in [
            (
                "[admission]\nquota_interval_secs = 0\n",
                "admission.quota_interval_secs",
            ),
            (
                "[admission]\nquota_interval_secs = 65536\n",
                "admission.quota_interval_secs",
            ),
            (
                "[admission]\nquota_frames = 4294967296\n",
                "admission.quota_frames",
            ),
        ] {
            let raw: RawConfig = toml::from_str(text).expect("parse");
            assert_eq!(
                admission_config(&raw.admission).map_err(|e| e.0),
                Err(field)
            );
        }
        let e = parse_err("[handshakes]\ncookie_above_per_sec = 4294967296\n");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "handshakes.cookie_above_per_sec",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_err("[admission]\nquota = 5\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        let e = parse_err("[handshakes]\ncookies = 5\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn video_and_stream_listener_have_defaults_and_are_validated() {
        let base = Path::new("/etc/relay");
        let raw: RawConfig = toml::from_str("").expect("defaults");
        assert_eq!(raw.listen.streams, None, "follows the direct address");
        let video = video_config(&raw.video, base).expect("valid");
        assert_eq!(
            video,
            VideoConfig {
                dir: base.join("videos"),
                max_bytes: 4 << 30,
                max_streams: 256,
                stall_timeout: Duration::from_secs(30),
                ack_every_chunks: 16,
                cpu_priority: LanePriority::Idle,
                give_way: GiveWay::Auto,
            }
        );
        let raw: RawConfig = toml::from_str(
            "[listen]\nstreams = \"0.0.0.0:7000\"\n[video]\ndir = \"/data/v\"\nmax_bytes = 10\n\
             max_streams = 2\nstall_timeout_secs = 5\nack_every_chunks = 1\n",
        )
        .expect("parse");
        assert_eq!(
            raw.listen.streams,
            Some(SocketAddr::from(([0, 0, 0, 0], 7000)))
        );
        let video = video_config(&raw.video, base).expect("valid");
        assert_eq!(
            (
                video.dir,
                video.max_bytes,
                video.max_streams,
                video.stall_timeout,
                video.ack_every_chunks
            ),
            (PathBuf::from("/data/v"), 10, 2, Duration::from_secs(5), 1)
        );
        for (text, field) in [
            ("[video]\nmax_bytes = 0\n", "video.max_bytes"),
            ("[video]\nmax_bytes = 1099511627777\n", "video.max_bytes"),
            ("[video]\nmax_streams = 0\n", "video.max_streams"),
            (
                "[video]\nstall_timeout_secs = 0\n",
                "video.stall_timeout_secs",
            ),
            ("[video]\nack_every_chunks = 0\n", "video.ack_every_chunks"),
            (
                "[video]\nack_every_chunks = 1025\n",
                "video.ack_every_chunks",
            ),
            ("[video]\ndir = \"\"\n", "video.dir"),
        ] {
            let raw: RawConfig = toml::from_str(text).expect("parse");
            assert_eq!(video_config(&raw.video, base).map_err(|e| e.0), Err(field));
        }
        let e = parse_err("[video]\nmax_gigabytes = 1\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn bulk_listener_and_lane_priority_have_defaults_and_are_validated() {
        let raw: RawConfig = toml::from_str("").expect("defaults");
        assert_eq!(raw.listen.bulk, None, "follows the QUIC address");
        assert_eq!(raw.video.cpu_priority, LanePriority::Idle);
        let listen = |quic: &str, bulk: Option<&str>| ListenConfig {
            quic: quic.parse().expect("addr"),
            direct: SocketAddr::from(([127, 0, 0, 1], 5684)),
            streams: None,
            bulk: bulk.map(|b| b.parse().expect("addr")),
            admin: SocketAddr::from(([127, 0, 0, 1], 9464)),
        };
        let addr = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        assert_eq!(
            listen("0.0.0.0:4433", None).bulk_addr(),
            addr("0.0.0.0:4434")
        );
        assert_eq!(listen("[::1]:4433", None).bulk_addr(), addr("[::1]:4434"));
        assert_eq!(
            listen("127.0.0.1:0", None).bulk_addr(),
            addr("127.0.0.1:0"),
            "an ephemeral QUIC port: an ephemeral bulk port"
        );
        assert_eq!(listen("127.0.0.1:65535", None).bulk_addr(), None);
        assert_eq!(
            listen("127.0.0.1:65535", Some("10.0.0.1:7000")).bulk_addr(),
            addr("10.0.0.1:7000")
        );

        let raw: RawConfig = toml::from_str(
            "[listen]\nquic = \"0.0.0.0:4433\"\nbulk = \"0.0.0.0:7443\"\n\
             [video]\ncpu_priority = \"low\"\n",
        )
        .expect("parse");
        assert_eq!(raw.listen.bulk, addr("0.0.0.0:7443"));
        assert_eq!(raw.video.cpu_priority, LanePriority::Low);
        let base = Path::new("/etc/relay");
        assert_eq!(
            video_config(&raw.video, base).expect("valid").cpu_priority,
            LanePriority::Low
        );
        let raw: RawConfig = toml::from_str("[video]\ncpu_priority = \"normal\"\n").expect("parse");
        assert_eq!(raw.video.cpu_priority, LanePriority::Normal);
        let raw: RawConfig = toml::from_str("[video]\ngive_way = \"never\"\n").expect("parse");
        assert_eq!(
            video_config(&raw.video, base).expect("valid").give_way,
            GiveWay::Never
        );
        let e = parse_err("[video]\ngive_way = \"sometimes\"\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");

        let e = parse_err("[video]\ncpu_priority = \"high\"\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        let e = parse_err("[listen]\nbulk = \"not an address\"\n");
        assert!(matches!(e, ConfigError::Parse { line: 2, .. }), "{e}");
        let e = parse_err("[listen]\nquic = \"127.0.0.1:65535\"\n");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "listen.bulk",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_key_material_is_a_read_error() {
        // Everything defaulted: the files it names do not exist in an empty directory.
        let e = parse_err("");
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }
}
