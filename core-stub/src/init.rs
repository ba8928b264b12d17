//! `core-stub init DIR`: a complete deployment in one directory (`docs/architecture.md`, "What
//! `core-stub init DIR` writes"): the CA, the core's and gateways' certificates, the core's Noise
//! key, every config file, the device fleet's keys, and the store with one active subscription per
//! device (static provisioning).
//!
//! Private keys go to files of mode 0600 and nowhere else: never to standard output or a log.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use relay_protocol::session::{PublicKey, SessionError, StaticKeypair};

use crate::release::ReleaseSigner;
use crate::store::{Store, StoreError, SubscriptionStatus};
use crate::tokens::{PlainToken, Role, TokenSet};

/// The most devices `init` provisions.
pub const MAX_DEVICES: u32 = 10_000_000;
/// The most gateways `init` configures (their default ports must stay below 65536).
pub const MAX_GATEWAYS: u32 = 1_000;

/// The names the core's certificate is valid for.
pub const CORE_SANS: [&str; 3] = ["core.relay.local", "localhost", "127.0.0.1"];

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitOptions {
    /// Devices (and so subscriptions) to provision.
    pub devices: u32,
    /// Gateways to configure.
    pub gateways: u32,
    /// Write into a non-empty directory, replacing the files `init` writes.
    pub force: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            devices: 100,
            gateways: 1,
            force: false,
        }
    }
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The caller asked for something impossible.
    #[error("{0}")]
    Options(String),
    /// The directory has files and `--force` was not given.
    #[error("{0} is not empty (use --force to overwrite)")]
    NotEmpty(PathBuf),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Noise key generation failed.
    #[error("noise key: {0}")]
    NoiseKey(#[from] SessionError),
    /// The store could not be created.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The release signing key could not be generated.
    #[error("release key: {0}")]
    ReleaseKey(String),
}

/// What `init` wrote, for the operator. Its `Display` holds no secret.
#[derive(Clone, Debug)]
pub struct InitSummary {
    /// The deployment directory.
    pub dir: PathBuf,
    /// Devices provisioned.
    pub devices: u32,
    /// Gateways configured.
    pub gateways: u32,
    /// The core's Noise public key (also in `devices/device-sim.toml`).
    pub core_public_key: PublicKey,
    /// The core's Ed25519 release public key (also in `core/release.pub`): another operator's
    /// core lists it in `[[release.trusted]]` to accept this core's releases.
    pub release_public_key: [u8; 32],
    /// Every file written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// The admin API tokens generated (role, secret), for the caller to show once. Not part of
    /// the `Display` output, and redacted in `Debug`; also in `admin-<role>.token` (0600).
    pub admin_tokens: Vec<(Role, PlainToken)>,
}

impl fmt::Display for InitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.dir.display();
        writeln!(f, "initialised {d} ({} files):", self.files.len())?;
        writeln!(
            f,
            "  ca.pem, ca.key                deployment CA (ECDSA P-256)"
        )?;
        writeln!(
            f,
            "  core/                         core.toml, cert.pem, key.pem, noise.key, subscriptions.db ({} active subscriptions)",
            self.devices
        )?;
        writeln!(
            f,
            "  core/                         release.key, release.pub (signs releases to other operators)"
        )?;
        let gateways = if self.gateways == 1 {
            "gateway-1/".to_owned()
        } else {
            format!("gateway-1/ .. gateway-{}/", self.gateways)
        };
        writeln!(f, "  {gateways:<30}gateway.toml, cert.pem, key.pem")?;
        writeln!(
            f,
            "  devices/                      device-sim.toml, fleet.keys ({} devices)",
            self.devices
        )?;
        writeln!(f, "core public key: {}", self.core_public_key.to_hex())?;
        write!(
            f,
            "start the core: core-stub run --config {d}/core/core.toml"
        )
    }
}

/// The device-facing UDP address of gateway `k` (1-based).
pub fn gateway_devices_addr(k: u32) -> String {
    format!("127.0.0.1:{}", 5683 + 10 * (k - 1))
}

/// The admin address of gateway `k` (1-based).
pub fn gateway_admin_addr(k: u32) -> String {
    format!("127.0.0.1:{}", 9465 + 10 * (k - 1))
}

/// The serial of device `i` (1-based).
pub fn serial(i: u32) -> String {
    format!("meter-{i:05}")
}

/// Writes a deployment into `dir` and says what it wrote.
pub fn init(dir: &Path, options: &InitOptions) -> Result<InitSummary, InitError> {
    if options.devices > MAX_DEVICES {
        return Err(InitError::Options(format!(
            "--devices must be at most {MAX_DEVICES}"
        )));
    }
    if options.gateways == 0 || options.gateways > MAX_GATEWAYS {
        return Err(InitError::Options(format!(
            "--gateways must be between 1 and {MAX_GATEWAYS}"
        )));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| InitError::Io { path, source }
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !options.force {
                return Err(InitError::NotEmpty(dir.to_owned()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        Err(e) => return Err(io(dir)(e)),
    }

    let mut w = Writer {
        dir: dir.to_owned(),
        files: Vec::new(),
    };
    for sub in ["core", "devices"]
        .into_iter()
        .map(String::from)
        .chain((1..=options.gateways).map(|k| format!("gateway-{k}")))
    {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(io(&p))?;
    }

    // The CA and the certificates it signs.
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("relay deployment CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    w.write("ca.pem", ca_cert.pem().as_bytes(), Mode::Public)?;
    w.write("ca.key", ca_key.serialize_pem().as_bytes(), Mode::Secret)?;

    let leaf = |sans: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = dn(cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
    };

    let (cert, key) = leaf(
        CORE_SANS.iter().map(|s| s.to_string()).collect(),
        CORE_SANS[0],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    w.write("core/cert.pem", cert.as_bytes(), Mode::Public)?;
    w.write("core/key.pem", key.as_bytes(), Mode::Secret)?;
    let noise = StaticKeypair::generate()?;
    let core_public_key = *noise.public();
    w.write(
        "core/noise.key",
        format!("{}\n", noise.private_hex_for_storage()).as_bytes(),
        Mode::Secret,
    )?;
    drop(noise);
    let mut release_key = ReleaseSigner::generate_pkcs8().map_err(InitError::ReleaseKey)?;
    let release_public_key = ReleaseSigner::from_pkcs8(&release_key)
        .map_err(InitError::ReleaseKey)?
        .public_key();
    w.write("core/release.key", &release_key, Mode::Secret)?;
    release_key.fill(0);
    w.write(
        "core/release.pub",
        format!("{}\n", hex::encode(release_public_key)).as_bytes(),
        Mode::Public,
    )?;
    w.write("core/core.toml", core_toml().as_bytes(), Mode::Public)?;
    let operator = PlainToken::generate();
    let technician = PlainToken::generate();
    w.write(
        "core/admin-tokens.toml",
        // The technician works for the operating company: same owner.
        TokenSet::file_text(&[
            ("operator", Role::Operator, "operator", &operator),
            ("technician", Role::Technician, "operator", &technician),
        ])
        .as_bytes(),
        Mode::Secret,
    )?;
    for (role, token) in [(Role::Operator, &operator), (Role::Technician, &technician)] {
        w.write(
            &format!("admin-{}.token", role.as_str()),
            format!("{}\n", token.expose()).as_bytes(),
            Mode::Secret,
        )?;
    }

    for k in 1..=options.gateways {
        let name = format!("gateway-{k}");
        let (cert, key) = leaf(
            vec![name.clone()],
            &name,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        w.write(&format!("{name}/cert.pem"), cert.as_bytes(), Mode::Public)?;
        w.write(&format!("{name}/key.pem"), key.as_bytes(), Mode::Secret)?;
        w.write(
            &format!("{name}/gateway.toml"),
            gateway_toml(k).as_bytes(),
            Mode::Public,
        )?;
    }

    // The fleet: keys, then the store that knows their public halves.
    let devices = generate_device_keys(options.devices)?;
    let fleet_path = "devices/fleet.keys";
    let mut fleet = Vec::with_capacity(devices.len() * 78);
    for (i, kp) in (1..).zip(&devices) {
        writeln!(fleet, "{} {}", serial(i), kp.private_hex_for_storage())
            .map_err(io(&dir.join(fleet_path)))?;
    }
    w.write(fleet_path, &fleet, Mode::Secret)?;
    fleet.fill(0);
    w.write(
        "devices/device-sim.toml",
        device_sim_toml(&core_public_key).as_bytes(),
        Mode::Public,
    )?;

    let db = "core/subscriptions.db";
    for stale in [db, "core/subscriptions.db-wal", "core/subscriptions.db-shm"] {
        w.remove(stale)?;
    }
    let mut store = Store::open(&dir.join(db))?;
    let serials: Vec<String> = (1..=options.devices).map(serial).collect();
    store.add_subscriptions(
        serials
            .iter()
            .zip(&devices)
            .map(|(s, kp)| (s.as_str(), kp.public(), SubscriptionStatus::Active)),
    )?;
    drop(store);
    w.files.push(db.into());

    Ok(InitSummary {
        dir: dir.to_owned(),
        devices: options.devices,
        gateways: options.gateways,
        core_public_key,
        release_public_key,
        files: w.files,
        admin_tokens: vec![(Role::Operator, operator), (Role::Technician, technician)],
    })
}

/// Curve25519 key generation dominates `init` for a large fleet: spread it over the cores.
fn generate_device_keys(n: u32) -> Result<Vec<StaticKeypair>, SessionError> {
    let n = n as usize;
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let per_thread = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..n)
            .step_by(per_thread)
            .map(|start| {
                let count = per_thread.min(n - start);
                scope.spawn(move || {
                    (0..count)
                        .map(|_| random_keypair())
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            match w.join() {
                Ok(keys) => all.extend(keys?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(all)
    })
}

/// An X25519 private key is 32 bytes from the OS's CSPRNG (clamped when used). Deriving the
/// public half once is half the work of `StaticKeypair::generate`, which derives it twice.
fn random_keypair() -> Result<StaticKeypair, SessionError> {
    use rand::RngCore;
    let mut private = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut private);
    let kp = StaticKeypair::from_private(&private);
    private.fill(0);
    kp
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// From the start of last year to twenty years on: valid now whatever the clock's hour.
fn set_validity(params: &mut CertificateParams) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Mean Gregorian year; an error of a day does not matter with a year of margin.
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 20, 1, 1);
}

fn core_toml() -> String {
    r#"name = "core-1"

[listen]
quic = "127.0.0.1:4433"       # gateways (QUIC, UDP)
# bulk = "127.0.0.1:4434"     # gateways' second QUIC connection, for device streams only (UDP);
                              # unset: the quic address's port + 1 (follows --listen-quic). Its
                              # port is told to gateways, which connect to it at the quic IP
direct = "127.0.0.1:5684"     # devices with direct access (UDP)
# streams = "127.0.0.1:5684"  # devices' video streams with direct access (TCP); unset: the
                              # direct address's port number, over TCP (follows --listen-direct)
admin = "127.0.0.1:9464"      # /metrics /live /ready (TCP)

[tls]
cert = "cert.pem"
key = "key.pem"
gateway_ca = "../ca.pem"      # only client certificates chaining to this CA are accepted

[noise]
private_key_file = "noise.key"

[store]
path = "subscriptions.db"
batch_max = 512               # readings per commit at most
batch_linger_ms = 2           # how long a commit waits to fill a batch

[session]
rekey_after_secs = 3600       # told to the device in the handshake response
reject_after_secs = 7200      # the core refuses a session's frames after this
max_sessions = 1000000

[limits]
max_gateways = 256
max_flows_per_gateway = 1000000

[admission]                   # the quota a gateway holds each admitted session to, per device, when
                              # its profile has none of its own ("quota" in PUT /v1/profiles/NAME)
quota_frames = 6000           # frames per interval (0 = unlimited)
quota_bytes = 7200000         # bytes of device frames per interval (0 = unlimited)
quota_interval_secs = 60

[handshakes]
cookie_above_per_sec = 2000   # above this many initiations in a second the core answers with a
                              # cookie challenge (no Noise work until the device echoes it);
                              # 0 = always demand a cookie

[video]                       # uploads over device streams (a camera's video)
dir = "videos"                # <dir>/<subscription>/<upload>.video + .json (.part + .state while
                              # incomplete)
max_bytes = 4294967296        # larger uploads are refused
max_streams = 256             # streams at once, direct and through all gateways together
stall_timeout_secs = 30       # a stream that delivers nothing this long is ended
ack_every_chunks = 16         # chunks synced to disk per acknowledgement (more, up to 16x, while
                              # the disk is still syncing the previous batch)
cpu_priority = "idle"         # the threads that receive, decrypt and store streams (and run the
                              # bulk QUIC endpoint): "idle" (SCHED_IDLE: only CPU time nothing
                              # else wants, so readings keep their latency under a video),
                              # "low" (nice 10) or "normal"
give_way = "auto"             # "auto": when dir is on the database's file system, video writes
                              # give way to the store's commits (readings first, slower videos);
                              # "never": videos at the disk's full speed

[admin]
tokens_file = "admin-tokens.toml"   # admin API tokens: name, role, owner, SHA-256 of the secret

[credentials]
rotate_after_secs = 7776000   # a subscription key older than this is renewed (90 days; 0 = never)

[fraud]
action = "quarantine"         # a suspected clone (one key on two routes at once): "quarantine"
                              # (refused until the device re-provisions with its factory identity)
                              # or "flag" (flag + renew key). A replayed handshake only ever flags
                              # and renews: anyone on the path can replay one.

[release]
signing_key_file = "release.key"    # Ed25519 (PKCS#8) signing releases to other operators; public
                                    # half in release.pub
# Other operators' cores whose signed releases this core accepts (POST /v1/claims/release):
# [[release.trusted]]
# name = "previous-operator"
# public_key = "64 hex digits (their release.pub)"
"#
    .to_owned()
}

fn gateway_toml(k: u32) -> String {
    format!(
        r#"name = "gateway-{k}"

[listen]
devices = "{devices}"    # the field network (UDP)
admin = "{admin}"

[uplink]
core = "127.0.0.1:4433"
server_name = "core.relay.local"
ca = "../ca.pem"
cert = "cert.pem"
key = "key.pem"
reconnect_initial_ms = 100
reconnect_max_ms = 10000
queue_frames = 4096           # frames held while the core is unreachable; newest dropped past it
# bulk = "core.example:4434"  # the core's bulk endpoint (device streams) as reached from here, if
                              # not at the core's IP and the port it names (a NAT, a port forward)

[flows]
max = 100000
idle_timeout_secs = 900

[handshakes]
per_source_per_sec = 5        # handshake initiations per device address and second (token bucket)
per_source_burst = 10
max_sources = 100000

[admission]
require = true                # drop device frames without an admission tag (every session has one)
max_sessions = 1000000        # admitted sessions held
pending_frames = 4096         # frames of sessions being asked about (after a restart, a move)
pending_timeout_ms = 2000
queries_per_sec = 2000        # admission queries to the core
not_admitted_ttl_secs = 60    # sessions the core refused are not asked about again for this long
not_admitted_max = 65536

[streams]
# listen = "{devices}"   # devices' video streams (TCP); unset: the devices address's port
                              # number, over TCP (follows --listen-devices)
enabled = true                # one QUIC stream to the core per device stream
max_streams = 64              # streams relayed at once; further connections are closed at once
stall_timeout_secs = 30       # a stream with no whole frame either way for this long is ended
"#,
        devices = gateway_devices_addr(k),
        admin = gateway_admin_addr(k),
    )
}

fn device_sim_toml(core: &PublicKey) -> String {
    format!(
        r#"core_public_key = "{core}"
gateway = "{gateway}"
direct = "127.0.0.1:5684"
fleet = "fleet.keys"
"#,
        core = core.to_hex(),
        gateway = gateway_devices_addr(1),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Public,
    /// Owner read/write only, set when the file is created (never world-readable, not even
    /// briefly).
    Secret,
}

struct Writer {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl Writer {
    fn remove(&self, rel: &str) -> Result<(), InitError> {
        let path = self.dir.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(InitError::Io { path, source }),
        }
    }

    fn write(&mut self, rel: &str, contents: &[u8], mode: Mode) -> Result<(), InitError> {
        // An old file keeps its old mode when truncated: start from a fresh one.
        self.remove(rel)?;
        let path = self.dir.join(rel);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(if mode == Mode::Secret { 0o600 } else { 0o644 });
        }
        let result = options
            .open(&path)
            .and_then(|mut f| f.write_all(contents).and_then(|()| f.sync_all()));
        result.map_err(|source| InitError::Io {
            path: path.clone(),
            source,
        })?;
        self.files.push(rel.into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CoreConfig;

    #[test]
    fn writes_a_complete_deployment() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("deploy");
        let summary = init(
            &dir,
            &InitOptions {
                devices: 25,
                gateways: 2,
                force: false,
            },
        )
        .expect("init");
        for f in [
            "ca.pem",
            "ca.key",
            "core/core.toml",
            "core/cert.pem",
            "core/key.pem",
            "core/noise.key",
            "core/release.key",
            "core/release.pub",
            "core/subscriptions.db",
            "gateway-1/gateway.toml",
            "gateway-1/cert.pem",
            "gateway-1/key.pem",
            "gateway-2/gateway.toml",
            "gateway-2/cert.pem",
            "gateway-2/key.pem",
            "devices/device-sim.toml",
            "devices/fleet.keys",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [
                "ca.key",
                "core/key.pem",
                "core/noise.key",
                "core/release.key",
                "gateway-1/key.pem",
                "gateway-2/key.pem",
                "devices/fleet.keys",
                "core/admin-tokens.toml",
                "admin-operator.token",
                "admin-technician.token",
            ] {
                let mode = std::fs::metadata(dir.join(f))
                    .expect("meta")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }

        // The core config loads with our own loader, key material included.
        let config = CoreConfig::load(&dir.join("core/core.toml")).expect("core.toml loads");
        assert_eq!(config.noise.public(), &summary.core_public_key);
        assert_eq!(config.store.path, dir.join("core").join("subscriptions.db"));
        assert_eq!(config.tls.gateway_ca.len(), 1);
        // The lifecycle sections: documented defaults, and the release key with its public half.
        assert_eq!(config.lifecycle.rotate_after_secs, 7_776_000);
        assert_eq!(
            config.lifecycle.fraud_action,
            crate::config::FraudAction::Quarantine
        );
        // The admission and handshake sections: the documented defaults.
        assert_eq!(config.admission, crate::config::AdmissionConfig::default());
        assert_eq!(
            config.handshakes.cookie_above_per_sec,
            crate::config::DEFAULT_COOKIE_ABOVE_PER_SEC
        );
        let signer = config
            .lifecycle
            .release_signer
            .as_ref()
            .expect("release key");
        assert_eq!(signer.public_key(), summary.release_public_key);
        assert_eq!(
            std::fs::read_to_string(dir.join("core/release.pub"))
                .expect("release.pub")
                .trim(),
            hex::encode(summary.release_public_key)
        );
        // The admin tokens: the files hold the secrets, the config only their hashes.
        assert_eq!(config.admin.tokens.len(), 2);
        for (role, token) in &summary.admin_tokens {
            let file = std::fs::read_to_string(dir.join(format!("admin-{}.token", role.as_str())))
                .expect("token file");
            assert_eq!(file.trim(), token.expose());
            let entry = config
                .admin
                .tokens
                .authenticate(file.trim())
                .expect("valid");
            assert_eq!(entry.role, *role);
            assert_eq!(entry.owner, "operator", "one company: the operator");
        }
        let hashes = std::fs::read_to_string(dir.join("core/admin-tokens.toml")).expect("read");
        assert!(!summary
            .admin_tokens
            .iter()
            .any(|(_, t)| hashes.contains(t.expose())));

        // Gateway configs: the documented keys and per-gateway ports.
        let gw: toml::Table = toml::from_str(
            &std::fs::read_to_string(dir.join("gateway-2/gateway.toml")).expect("read"),
        )
        .expect("gateway.toml parses");
        assert_eq!(gw["name"].as_str(), Some("gateway-2"));
        assert_eq!(gw["listen"]["devices"].as_str(), Some("127.0.0.1:5693"));
        assert_eq!(gw["listen"]["admin"].as_str(), Some("127.0.0.1:9475"));
        assert_eq!(
            gw["uplink"]["server_name"].as_str(),
            Some("core.relay.local")
        );
        assert_eq!(gw["flows"]["max"].as_integer(), Some(100_000));

        let sim: toml::Table = toml::from_str(
            &std::fs::read_to_string(dir.join("devices/device-sim.toml")).expect("read"),
        )
        .expect("device-sim.toml parses");
        assert_eq!(
            sim["core_public_key"].as_str(),
            Some(summary.core_public_key.to_hex().as_str())
        );
        assert_eq!(sim["direct"].as_str(), Some("127.0.0.1:5684"));

        // fleet.keys matches the store, one active subscription per device.
        let fleet = std::fs::read_to_string(dir.join("devices/fleet.keys")).expect("read");
        let lines: Vec<_> = fleet.lines().collect();
        assert_eq!(lines.len(), 25);
        let store = Store::open(&dir.join("core/subscriptions.db")).expect("store");
        let subs = store.subscriptions().expect("subs");
        assert_eq!(subs.len(), 25);
        for (line, sub) in lines.iter().zip(&subs) {
            let (serial, key) = line.split_once(' ').expect("two fields");
            assert_eq!(serial, sub.serial);
            let kp = StaticKeypair::from_private_hex(key).expect("key");
            assert_eq!(kp.public(), &sub.public_key);
            assert_eq!(sub.status, SubscriptionStatus::Active);
        }
        assert_eq!(subs[0].serial, "meter-00001");

        // The summary names no secret.
        let text = summary.to_string();
        assert!(!text.contains(lines[0].split_once(' ').expect("fields").1));
        assert!(text.contains("25 devices"));
    }

    #[test]
    fn refuses_a_non_empty_directory_without_force() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("something"), b"x").expect("write");
        let opts = InitOptions {
            devices: 3,
            gateways: 1,
            force: false,
        };
        assert!(matches!(
            init(tmp.path(), &opts),
            Err(InitError::NotEmpty(_))
        ));
        init(
            tmp.path(),
            &InitOptions {
                force: true,
                ..opts
            },
        )
        .expect("forced");
        // Again over an existing deployment: the store is recreated, not appended to.
        init(
            tmp.path(),
            &InitOptions {
                devices: 5,
                force: true,
                ..opts
            },
        )
        .expect("forced again");
        let store = Store::open(&tmp.path().join("core/subscriptions.db")).expect("store");
        assert_eq!(store.subscriptions().expect("subs").len(), 5);
    }
}
