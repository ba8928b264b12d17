//! The simulator's configuration, parsed once at the edge into typed values: `device-sim.toml`
//! (the core's public key and where to send) and `fleet.keys` (one device per line).
//!
//! ```toml
//! core_public_key = "…64 hex digits…"
//! gateway = "127.0.0.1:5683"
//! direct = "127.0.0.1:5684"
//! fleet = "fleet.keys"            # relative to this file's directory
//! # optional: the stream ports (TCP) for camera video; default: the same host:port as above
//! gateway_streams = "127.0.0.1:5683"
//! direct_streams = "127.0.0.1:5684"
//! ```
//!
//! ```text
//! # fleet.keys: serial and private key, separated by white space
//! meter-00001 4c0f…(64 hex digits)
//! ```
//!
//! Errors name the file and, for `fleet.keys`, the line; they never contain key material.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use relay_protocol::session::{PublicKey, StaticKeypair};
use serde::Deserialize;

/// Why the configuration could not be loaded: always the operator's input.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `device-sim.toml` is not valid TOML of the expected shape (unknown keys included).
    #[error("{path}: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, on one line.
        message: String,
    },
    /// `core_public_key` is not 64 hex digits.
    #[error("{path}: core_public_key: {reason}")]
    CorePublicKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A line of `fleet.keys` is malformed.
    #[error("{path}:{line}: {reason}")]
    FleetLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why; never the key itself.
        reason: &'static str,
    },
    /// A serial appears twice in `fleet.keys`.
    #[error("{path}:{line}: serial {serial} already on line {first}")]
    DuplicateSerial {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the repeat.
        line: usize,
        /// Its first line.
        first: usize,
        /// The serial.
        serial: String,
    },
    /// `fleet.keys` lists no device.
    #[error("{path}: no devices")]
    EmptyFleet {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    core_public_key: String,
    gateway: SocketAddr,
    direct: SocketAddr,
    fleet: PathBuf,
    #[serde(default)]
    gateway_streams: Option<SocketAddr>,
    #[serde(default)]
    direct_streams: Option<SocketAddr>,
}

/// `device-sim.toml`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The core's static Noise public key.
    pub core_public_key: PublicKey,
    /// The gateway's device-facing UDP address.
    pub gateway: SocketAddr,
    /// The core's direct-access UDP address.
    pub direct: SocketAddr,
    /// The fleet file, resolved against the config file's directory.
    pub fleet: PathBuf,
    /// The gateway's stream port (TCP) [default: the same address as `gateway`].
    pub gateway_streams: SocketAddr,
    /// The core's direct-access stream port (TCP) [default: the same address as `direct`].
    pub direct_streams: SocketAddr,
}

impl SimConfig {
    /// Parses `device-sim.toml` text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = one_line(e.message());
            let message = match e.span() {
                Some(span) => format!("line {}: {message}", line_of(text, span.start)),
                None => message,
            };
            ConfigError::Toml {
                path: path.to_owned(),
                message,
            }
        })?;
        let core_public_key =
            PublicKey::from_hex(&raw.core_public_key).map_err(|e| ConfigError::CorePublicKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Ok(Self {
            core_public_key,
            gateway: raw.gateway,
            direct: raw.direct,
            fleet: dir.join(raw.fleet),
            gateway_streams: raw.gateway_streams.unwrap_or(raw.gateway),
            direct_streams: raw.direct_streams.unwrap_or(raw.direct),
        })
    }
}

/// Reads and validates `device-sim.toml`.
pub fn load_config(path: &Path) -> Result<SimConfig, ConfigError> {
    let text = read(path)?;
    SimConfig::parse(&text, path)
}

/// One simulated device: its serial number and its static key pair (held in memory: there is no
/// secure element in the simulator). `Debug` never shows the private key.
#[derive(Debug)]
pub struct DeviceIdentity {
    /// The serial number, as in `fleet.keys` and the core's subscription store.
    pub serial: String,
    /// The device's static key pair.
    pub keypair: StaticKeypair,
}

/// Parses `fleet.keys` text: `serial private-key-hex` per line, `#` comments and blank lines
/// allowed. `path` names the file in errors.
pub fn parse_fleet(text: &str, path: &Path) -> Result<Vec<DeviceIdentity>, ConfigError> {
    let mut devices: Vec<DeviceIdentity> = Vec::new();
    let mut lines_of = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let bad = |reason| ConfigError::FleetLine {
            path: path.to_owned(),
            line: n,
            reason,
        };
        let mut fields = content.split_whitespace();
        let (Some(serial), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("expected `serial private-key-hex`"));
        };
        let keypair = StaticKeypair::from_private_hex(key)
            .map_err(|_| bad("the private key is not 64 hex digits"))?;
        if let Some(first) = lines_of.insert(serial.to_owned(), n) {
            return Err(ConfigError::DuplicateSerial {
                path: path.to_owned(),
                line: n,
                first,
                serial: serial.to_owned(),
            });
        }
        devices.push(DeviceIdentity {
            serial: serial.to_owned(),
            keypair,
        });
    }
    if devices.is_empty() {
        return Err(ConfigError::EmptyFleet {
            path: path.to_owned(),
        });
    }
    Ok(devices)
}

/// Reads and validates `fleet.keys`.
pub fn load_fleet(path: &Path) -> Result<Vec<DeviceIdentity>, ConfigError> {
    let text = read(path)?;
    parse_fleet(&text, path)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "4c0f4b6e1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4";

    fn config(extra: &str) -> String {
        format!(
            "core_public_key = \"{}\"\ngateway = \"127.0.0.1:5683\"\ndirect = \"127.0.0.1:5684\"\nfleet = \"fleet.keys\"\n{extra}",
            "ab".repeat(32)
        )
    }

    #[test]
    fn parses_the_documented_config() {
        let c = SimConfig::parse(&config(""), Path::new("/etc/relay/devices/device-sim.toml"))
            .expect("valid");
        assert_eq!(c.core_public_key, PublicKey([0xab; 32]));
        assert_eq!(c.gateway, "127.0.0.1:5683".parse().expect("addr"));
        assert_eq!(c.direct, "127.0.0.1:5684".parse().expect("addr"));
        assert_eq!(c.fleet, Path::new("/etc/relay/devices/fleet.keys"));
        let c = SimConfig::parse(&config(""), Path::new("device-sim.toml")).expect("valid");
        assert_eq!(c.fleet, Path::new("fleet.keys"));
        // The stream ports default to the datagram ones (TCP on the same number).
        assert_eq!(c.gateway_streams, c.gateway);
        assert_eq!(c.direct_streams, c.direct);
        let c = SimConfig::parse(
            &config("gateway_streams = \"127.0.0.1:7000\"\ndirect_streams = \"[::1]:7001\"\n"),
            Path::new("device-sim.toml"),
        )
        .expect("valid");
        assert_eq!(c.gateway_streams, "127.0.0.1:7000".parse().expect("addr"));
        assert_eq!(c.direct_streams, "[::1]:7001".parse().expect("addr"));
        assert_eq!(c.gateway, "127.0.0.1:5683".parse().expect("addr"));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let p = Path::new("x.toml");
        let e = SimConfig::parse(&config("colour = \"blue\"\n"), p).expect_err("unknown key");
        assert!(e.to_string().contains("colour"), "{e}");
        let e = SimConfig::parse(&config("").replace(&"ab".repeat(32), "abc"), p)
            .expect_err("short key");
        assert!(e.to_string().starts_with("x.toml: core_public_key"), "{e}");
        let e = SimConfig::parse(&config("").replace("127.0.0.1:5683", "nowhere"), p)
            .expect_err("bad addr");
        assert!(!e.to_string().contains('\n'), "{e}");
        assert!(SimConfig::parse("gateway = \"127.0.0.1:1\"", p).is_err());
    }

    #[test]
    fn parses_fleet_keys_with_comments_and_blank_lines() {
        let text =
            format!("# the fleet\n\nmeter-00001 {KEY}\n  meter-00002\t{KEY}  # trailing comment\n");
        let f = parse_fleet(&text, Path::new("fleet.keys")).expect("valid");
        let serials: Vec<_> = f.iter().map(|d| d.serial.as_str()).collect();
        assert_eq!(serials, ["meter-00001", "meter-00002"]);
        assert_eq!(f[0].keypair.private_hex_for_storage(), KEY);
    }

    #[test]
    fn fleet_errors_name_the_line_and_never_the_key() {
        let p = Path::new("fleet.keys");
        let bad_key = &KEY[..62];
        let cases = [
            (
                format!("meter-1 {KEY}\nmeter-2 {bad_key}\n"),
                "fleet.keys:2: the private key",
            ),
            (
                format!("meter-1 {KEY}\n\nmeter-2\n"),
                "fleet.keys:3: expected",
            ),
            (format!("meter-1 {KEY} extra\n"), "fleet.keys:1: expected"),
            (
                format!("meter-1 {KEY}\nmeter-1 {KEY}\n"),
                "fleet.keys:2: serial meter-1 already on line 1",
            ),
            ("# nothing\n".to_owned(), "fleet.keys: no devices"),
        ];
        for (text, want) in cases {
            let e = parse_fleet(&text, p).expect_err(want).to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains(bad_key) && !e.contains(&KEY[..16]), "{e}");
        }
    }
}
