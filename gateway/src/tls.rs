//! The uplink's TLS material (the core's CA, the gateway's client certificate and key) and the
//! QUIC client configuration built from it.
//!
//! rustls runs with the *ring* provider passed explicitly: nothing here installs a process-wide
//! default provider, so a test process can run gateways and cores side by side.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// The ALPN protocol of the uplink; the core refuses any other.
pub const ALPN: &[u8] = b"relay-uplink/1";

/// QUIC keep-alive on the uplink: well under NAT binding lifetimes and the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// The uplink is considered lost after this long without a packet from the core.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Datagram send and receive buffers: a burst of device frames should queue, not drop.
pub const DATAGRAM_BUFFER_BYTES: usize = 4 << 20;

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {why}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        why: String,
    },
    /// rustls refused the material (for example a key that does not match the certificate).
    #[error("{what}: {source}")]
    Rustls {
        /// Which material, naming its files.
        what: String,
        /// Why.
        source: rustls::Error,
    },
    /// The rustls configuration cannot be used for QUIC.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// The gateway's private key. Its `Debug` form never shows the key.
pub struct ClientKey(PrivateKeyDer<'static>);

impl Clone for ClientKey {
    fn clone(&self) -> Self {
        Self(self.0.clone_key())
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey([redacted])")
    }
}

/// The certificates and key the uplink authenticates with, loaded from PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    files: TlsFiles,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: ClientKey,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("files", &self.files)
            .field("ca_certificates", &self.ca.len())
            .field("chain_certificates", &self.chain.len())
            .field("key", &self.key)
            .finish()
    }
}

impl TlsIdentity {
    /// Reads the three PEM files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = read_certs(&files.ca)?;
        let chain = read_certs(&files.cert)?;
        let mut reader = open(&files.key)?;
        let key = rustls_pemfile::private_key(&mut reader)
            .map_err(|source| TlsError::Read {
                path: files.key.clone(),
                source,
            })?
            .ok_or_else(|| TlsError::Content {
                path: files.key.clone(),
                why: "no private key (PKCS#8, PKCS#1 or SEC1 PEM) found".into(),
            })?;
        Ok(Self {
            files: files.clone(),
            ca,
            chain,
            key: ClientKey(key),
        })
    }

    /// The QUIC client configuration: TLS 1.3 with the ring provider, the core verified against
    /// the CA, the gateway's certificate presented, ALPN `relay-uplink/1`, datagrams on.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(|source| TlsError::Rustls {
                what: format!("CA certificate in {}", self.files.ca.display()),
                source,
            })?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "TLS 1.3 with the ring provider".into(),
                source,
            })?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), self.key.0.clone_key())
            .map_err(|source| TlsError::Rustls {
                what: format!(
                    "client certificate {} with key {}",
                    self.files.cert.display(),
                    self.files.key.display()
                ),
                source,
            })?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }
}

/// The uplink transport parameters (the core opens no streams towards the gateway).
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s is far below the VarInt bound, so the conversion cannot fail; fall back to quinn's
    // default rather than panic if it ever did.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

/// The transport parameters of the bulk connection (device streams only, to the core's bulk
/// endpoint): those of the uplink, without datagrams (none are sent or expected on it).
pub fn bulk_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    t.datagram_receive_buffer_size(None);
    t
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader = open(path)?;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.to_owned(),
            why: "no certificate found".into(),
        });
    }
    Ok(certs)
}
