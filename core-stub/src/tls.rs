//! The QUIC server configuration for gateways: TLS 1.3 with the `ring` provider only (no
//! process-wide default is installed), mutual authentication against the gateway CA, ALPN
//! `relay-uplink/1`, and the transport settings of `docs/architecture.md`.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::TlsConfig;

/// The ALPN protocol gateways must offer.
pub const ALPN: &[u8] = b"relay-uplink/1";

/// The QUIC datagram buffers: a burst of device frames from a busy gateway fits.
pub const DATAGRAM_BUFFER_BYTES: usize = 4 << 20;
/// Keep-alive on the uplink, well inside NAT and idle timeouts.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// An uplink silent this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the TLS configuration could not be built: the operator's certificates are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificates, key or CA.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The gateway CA holds no usable certificate.
    #[error("gateway CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the TLS configuration.
    #[error("quic: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Builds the QUIC server configuration.
pub fn server_config(tls: &TlsConfig) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &tls.gateway_ca {
        roots.add(ca.clone())?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.cert_chain.clone(), tls.key())?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    transport
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES))
        .datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES)
        .keep_alive_interval(Some(KEEP_ALIVE))
        // 30 s fits a VarInt of milliseconds.
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        // One control stream, opened by the gateway; nothing else.
        .max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into());

    let mut config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
