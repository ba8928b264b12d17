//! Signed releases: how a device moves from this operator's core to another one (operator
//! change, spec "Release").
//!
//! The old core signs a document naming the device (serial, factory public key, model) and the
//! new core (its Noise public key and the endpoint devices reach it at) with its Ed25519 release
//! key (`[release] signing_key_file`, PKCS#8, written by `init`). The operator carries the JSON to
//! the new operator, whose core accepts it only when the issuer's public key is one of its
//! `[[release.trusted]]` keys and the document names that core's own public key.
//!
//! The signature covers a fixed binary encoding, not the JSON, so that re-formatting the JSON on
//! its way between operators does not invalidate it:
//!
//! ```text
//! "relay-release-v1" 0x00 | len:u16 serial | factory_key:32 | len:u16 model | core_key:32
//!   | len:u16 endpoint | issued_ms:u64 | issuer_key:32          (integers big-endian)
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use relay_protocol::payload::{Release, MAX_ENDPOINT};
use relay_protocol::session::PublicKey;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// Domain separation: a release signature can never be mistaken for any other signature.
const CONTEXT: &[u8] = b"relay-release-v1\0";
/// Length of an Ed25519 public key.
pub const ISSUER_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The longest model name.
pub const MAX_MODEL: usize = 64;

/// Why a release document is refused. The peer (the other operator) or the input is at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    /// Not the JSON document, or a field is malformed.
    #[error("malformed release: {0}")]
    Malformed(String),
    /// The issuer is not one of `[[release.trusted]]`.
    #[error("the issuer {0} is not a trusted releaser")]
    Untrusted(String),
    /// The signature does not verify.
    #[error("the release's signature does not verify")]
    BadSignature,
    /// The release names another core.
    #[error("the release names another core ({0})")]
    OtherCore(String),
}

/// This core's release signing key. `Debug` prints the public key only.
#[derive(Clone)]
pub struct ReleaseSigner(Arc<Ed25519KeyPair>);

impl fmt::Debug for ReleaseSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseSigner({})", hex::encode(self.public_key()))
    }
}

impl ReleaseSigner {
    /// A fresh key, as PKCS#8 (v2) DER, for `init` to write (mode 0600).
    pub fn generate_pkcs8() -> Result<Vec<u8>, String> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| "the system random source failed".to_owned())
    }

    /// The key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(|k| Self(Arc::new(k)))
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))
    }

    /// Reads a PKCS#8 DER file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let der = std::fs::read(path).map_err(|e| e.to_string())?;
        Self::from_pkcs8(&der)
    }

    /// The public half, as other operators list it in `[[release.trusted]]`.
    pub fn public_key(&self) -> [u8; ISSUER_KEY_LEN] {
        let mut key = [0u8; ISSUER_KEY_LEN];
        key.copy_from_slice(self.0.public_key().as_ref());
        key
    }

    /// Signs a release of `device` to the core `core` at `endpoint`.
    pub fn sign(
        &self,
        device: &ReleasedDevice,
        core: PublicKey,
        endpoint: &str,
        issued_ms: u64,
    ) -> ReleaseDocument {
        let mut doc = ReleaseDocument {
            serial: device.serial.clone(),
            factory_public_key: device.factory_key,
            model: device.model.clone(),
            core_public_key: core,
            endpoint: endpoint.to_owned(),
            issued_ms,
            issuer_public_key: self.public_key(),
            signature: [0; SIGNATURE_LEN],
        };
        let sig = self.0.sign(&doc.signed_bytes());
        doc.signature.copy_from_slice(sig.as_ref());
        doc
    }
}

/// The device a release names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleasedDevice {
    /// Its serial number.
    pub serial: String,
    /// Its factory public key.
    pub factory_key: PublicKey,
    /// Its model, from the manifest.
    pub model: String,
}

/// One `[[release.trusted]]` entry: another operator's core whose releases this core accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedReleaser {
    /// For the audit log.
    pub name: String,
    /// Its Ed25519 release public key.
    pub public_key: [u8; ISSUER_KEY_LEN],
}

/// A signed release, as `POST /v1/devices/{serial}/release` answers it and
/// `POST /v1/claims/release` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseDocument {
    /// The device's serial number.
    pub serial: String,
    /// Its factory public key.
    pub factory_public_key: PublicKey,
    /// Its model.
    pub model: String,
    /// The new core's Noise static public key.
    pub core_public_key: PublicKey,
    /// Where devices reach the new core, `HOST:PORT`.
    pub endpoint: String,
    /// When it was issued, ms since the Unix epoch.
    pub issued_ms: u64,
    /// The old core's release public key.
    pub issuer_public_key: [u8; ISSUER_KEY_LEN],
    /// Ed25519 over [`ReleaseDocument::signed_bytes`].
    pub signature: [u8; SIGNATURE_LEN],
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Json {
    serial: String,
    factory_public_key: String,
    model: String,
    core_public_key: String,
    endpoint: String,
    issued_ms: u64,
    issuer_public_key: String,
    signature: String,
}

/// Whether `endpoint` is `HOST:PORT` that fits the device's Release notice: 1..=64 printable
/// ASCII bytes, a non-empty host and a port from 1 to 65535.
pub fn is_valid_endpoint(endpoint: &str) -> bool {
    let fits = !endpoint.is_empty()
        && endpoint.len() <= MAX_ENDPOINT
        && endpoint.bytes().all(|b| b.is_ascii_graphic());
    fits && endpoint
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Whether `model` is 1..=[`MAX_MODEL`] printable ASCII bytes without a comma (it comes from a
/// CSV manifest).
pub fn is_valid_model(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= MAX_MODEL
        && model
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b',')
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

impl ReleaseDocument {
    /// The bytes the signature covers (module docs).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(CONTEXT);
        put_str(&mut out, &self.serial);
        out.extend_from_slice(&self.factory_public_key.0);
        put_str(&mut out, &self.model);
        out.extend_from_slice(&self.core_public_key.0);
        put_str(&mut out, &self.endpoint);
        out.extend_from_slice(&self.issued_ms.to_be_bytes());
        out.extend_from_slice(&self.issuer_public_key);
        out
    }

    /// The JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "serial": self.serial,
            "factory_public_key": self.factory_public_key.to_hex(),
            "model": self.model,
            "core_public_key": self.core_public_key.to_hex(),
            "endpoint": self.endpoint,
            "issued_ms": self.issued_ms,
            "issuer_public_key": hex::encode(self.issuer_public_key),
            "signature": hex::encode(self.signature),
        })
    }

    /// Parses the JSON document and checks every field's form (not the signature).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReleaseError> {
        let bad = |what: &str| ReleaseError::Malformed(what.to_owned());
        let j: Json = serde_json::from_slice(bytes)
            .map_err(|e| ReleaseError::Malformed(e.to_string().replace('\n', " ")))?;
        let serial_ok = !j.serial.is_empty()
            && j.serial.len() <= crate::admin_api::MAX_SERIAL
            && j.serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !serial_ok {
            return Err(bad("serial"));
        }
        if !is_valid_model(&j.model) {
            return Err(bad("model"));
        }
        if !is_valid_endpoint(&j.endpoint) {
            return Err(bad("endpoint (HOST:PORT, at most 64 bytes)"));
        }
        let hex_n = |s: &str, what: &str, n: usize| {
            hex::decode(s)
                .ok()
                .filter(|b| b.len() == n)
                .ok_or_else(|| bad(&format!("{what}: {} hex digits", 2 * n)))
        };
        let mut issuer = [0u8; ISSUER_KEY_LEN];
        issuer.copy_from_slice(&hex_n(&j.issuer_public_key, "issuer_public_key", 32)?);
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&hex_n(&j.signature, "signature", SIGNATURE_LEN)?);
        Ok(Self {
            serial: j.serial,
            factory_public_key: PublicKey::from_hex(&j.factory_public_key)
                .map_err(|_| bad("factory_public_key: 64 hex digits"))?,
            model: j.model,
            core_public_key: PublicKey::from_hex(&j.core_public_key)
                .map_err(|_| bad("core_public_key: 64 hex digits"))?,
            endpoint: j.endpoint,
            issued_ms: j.issued_ms,
            issuer_public_key: issuer,
            signature,
        })
    }

    /// Checks that a trusted releaser signed it for `this_core`; returns that releaser.
    pub fn verify<'a>(
        &self,
        trusted: &'a [TrustedReleaser],
        this_core: &PublicKey,
    ) -> Result<&'a TrustedReleaser, ReleaseError> {
        let issuer = trusted
            .iter()
            .find(|t| t.public_key == self.issuer_public_key)
            .ok_or_else(|| ReleaseError::Untrusted(hex::encode(self.issuer_public_key)))?;
        UnparsedPublicKey::new(&ED25519, &self.issuer_public_key)
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| ReleaseError::BadSignature)?;
        if &self.core_public_key != this_core {
            return Err(ReleaseError::OtherCore(self.core_public_key.to_hex()));
        }
        Ok(issuer)
    }

    /// What the old core tells the device (the Release notice).
    pub fn notice(&self) -> Release {
        Release {
            core: self.core_public_key,
            issued_ms: self.issued_ms,
            endpoint: self.endpoint.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> ReleasedDevice {
        ReleasedDevice {
            serial: "meter-7".into(),
            factory_key: PublicKey([7; 32]),
            model: "EM-1 rev b".into(),
        }
    }

    #[test]
    fn a_signed_release_verifies_once_trusted_and_not_when_changed() {
        let signer =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("k");
        let core = PublicKey([9; 32]);
        let doc = signer.sign(&device(), core, "core-2.example:4433", 1234);
        let trusted = [TrustedReleaser {
            name: "old-operator".into(),
            public_key: signer.public_key(),
        }];
        let json = serde_json::to_vec(&doc.to_json()).expect("json");
        let back = ReleaseDocument::from_json(&json).expect("parse");
        assert_eq!(back, doc);
        assert_eq!(
            back.verify(&trusted, &core).expect("ok").name,
            "old-operator"
        );
        assert_eq!(back.notice().endpoint, "core-2.example:4433");

        assert!(matches!(
            back.verify(&[], &core),
            Err(ReleaseError::Untrusted(_))
        ));
        assert!(matches!(
            back.verify(&trusted, &PublicKey([8; 32])),
            Err(ReleaseError::OtherCore(_))
        ));
        let mut forged = back.clone();
        forged.serial = "meter-8".into();
        assert_eq!(
            forged.verify(&trusted, &core),
            Err(ReleaseError::BadSignature)
        );
        let mut forged = back.clone();
        forged.endpoint = "evil:1".into();
        assert_eq!(
            forged.verify(&trusted, &core),
            Err(ReleaseError::BadSignature)
        );
        // A trusted name on another key does not help a forger.
        let other =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("k");
        let forged = other.sign(&device(), core, "core-2.example:4433", 1234);
        assert!(matches!(
            forged.verify(&trusted, &core),
            Err(ReleaseError::Untrusted(_))
        ));
        assert!(!format!("{signer:?}").is_empty());
    }

    #[test]
    fn malformed_documents_are_refused() {
        let signer =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("k");
        let good = signer
            .sign(&device(), PublicKey([9; 32]), "h:1", 1)
            .to_json();
        for (field, value) in [
            ("serial", serde_json::json!("bad serial")),
            ("endpoint", serde_json::json!("no-port")),
            ("endpoint", serde_json::json!("h:0")),
            ("model", serde_json::json!("")),
            ("factory_public_key", serde_json::json!("abcd")),
            ("signature", serde_json::json!("00")),
            ("issued_ms", serde_json::json!(-1)),
            ("extra", serde_json::json!(1)),
        ] {
            let mut j = good.clone();
            j[field] = value;
            let bytes = serde_json::to_vec(&j).expect("json");
            assert!(
                matches!(
                    ReleaseDocument::from_json(&bytes),
                    Err(ReleaseError::Malformed(_))
                ),
                "{field}"
            );
        }
        assert!(ReleaseDocument::from_json(b"not json").is_err());
        assert!(ReleaseSigner::from_pkcs8(b"junk").is_err());
        assert!(is_valid_endpoint("[::1]:4433") && !is_valid_endpoint(":1"));
    }
}
