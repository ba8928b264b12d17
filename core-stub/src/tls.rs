//! The QUIC server configurations for gateways: TLS 1.3 with the `ring` provider only (no
//! process-wide default is installed), mutual authentication against the gateway CA, ALPN
//! `relay-uplink/1`, and the transport settings of `docs/architecture.md`. The main endpoint
//! ([`server_config`]) carries the control stream, device frames as datagrams and device streams
//! from older gateways; the bulk endpoint ([`bulk_server_config`]) the same TLS and transport
//! settings without datagrams and without the control stream: device streams only.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::CertificateDer;
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
/// How much of one device stream a gateway may send ahead of the core's reading (quinn's default
/// is 1.25 MB): room to keep a bulk upload flowing while the core waits for the disk. Measured
/// with 256 MiB over one stream on loopback (2-CPU VM, ext4, other load): 108-114 MB/s with the
/// default, 112-173 MB/s with 4 MiB; 16 MiB gained nothing more on tmpfs. Bounds the core's memory
/// per stream.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

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

/// Builds the main QUIC server configuration. Each gateway may open the control stream and
/// `max_device_streams` device streams (`docs/protocol.md` §13.1) at once.
pub fn server_config(
    tls: &TlsConfig,
    max_device_streams: usize,
) -> Result<quinn::ServerConfig, TlsError> {
    build(tls, max_device_streams, Carriage::Main)
}

/// Builds the bulk endpoint's QUIC server configuration: the same client authentication and
/// transport settings as [`server_config`], but datagrams disabled and no control stream: each
/// gateway may open `max_device_streams` device streams at once.
pub fn bulk_server_config(
    tls: &TlsConfig,
    max_device_streams: usize,
) -> Result<quinn::ServerConfig, TlsError> {
    build(tls, max_device_streams, Carriage::Bulk)
}

/// Which of the two endpoints a configuration is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carriage {
    /// Control stream, datagrams, device streams.
    Main,
    /// Device streams only.
    Bulk,
}

fn build(
    tls: &TlsConfig,
    max_device_streams: usize,
    carriage: Carriage,
) -> Result<quinn::ServerConfig, TlsError> {
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
    // The control stream (main endpoint only) and the device streams, all opened by the gateway;
    // nothing else.
    let bidi = match carriage {
        Carriage::Main => {
            transport
                .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES))
                .datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
            max_device_streams as u64 + 1
        }
        Carriage::Bulk => {
            // No datagrams: the peer is told the core takes none.
            transport.datagram_receive_buffer_size(None);
            max_device_streams as u64
        }
    };
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        // 30 s fits a VarInt of milliseconds.
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .max_concurrent_bidi_streams(quinn::VarInt::from_u64(bidi).unwrap_or(quinn::VarInt::MAX))
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .max_concurrent_uni_streams(0u8.into());

    let mut config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The name a gateway's verified client certificate gives it: its first DNS subjectAltName, else
/// its subject's common name (`core-stub init` puts the gateway's name in both). `None` when the
/// certificate names nothing usable.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    if let Some(dns) = parsed.valid_dns_names().next() {
        return Some(dns.to_owned());
    }
    common_name(parsed.subject())
}

/// The last `CN` in a DER `Name` (its contents, without the outer SEQUENCE): the most specific
/// one, as RFC 6125 reads it.
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    while !name.is_empty() {
        let (tag, mut rdn, rest) = der_tlv(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, attr, rest) = der_tlv(rdn)?;
            rdn = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der_tlv(attr)?;
            let (value_tag, value, _) = der_tlv(value)?;
            // UTF8String, PrintableString, IA5String.
            if oid_tag == 0x06 && oid == CN_OID && matches!(value_tag, 0x0c | 0x13 | 0x16) {
                found = std::str::from_utf8(value).ok().map(str::to_owned);
            }
        }
    }
    found
}

/// One DER tag-length-value: (tag, value, what follows). Definite lengths up to 4 bytes.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((tag, value, rest))
}

/// The gateway's certificate name, from a connection whose client certificate was verified.
pub fn peer_certificate_name(connection: &quinn::Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    certificate_name(chain.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn cert(sans: Vec<String>, cn: Option<&str>) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        dn.push(DnType::OrganizationName, "relay");
        params.distinguished_name = dn;
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn the_name_is_the_first_dns_san_else_the_common_name() {
        assert_eq!(
            certificate_name(&cert(vec!["gateway-1".into()], Some("other"))).as_deref(),
            Some("gateway-1")
        );
        assert_eq!(
            certificate_name(&cert(Vec::new(), Some("gateway-2"))).as_deref(),
            Some("gateway-2")
        );
        assert_eq!(certificate_name(&cert(Vec::new(), None)), None);
        assert_eq!(
            certificate_name(&CertificateDer::from(vec![0x30, 0x03, 1])),
            None
        );
        for bad in [
            &[][..],
            &[0x31],
            &[0x31, 0x85, 1, 1, 1, 1, 1],
            &[0x31, 0x05, 0x30],
        ] {
            assert_eq!(common_name(bad), None);
        }
    }
}
