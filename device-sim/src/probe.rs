//! `device-sim probe`: can this host reach the core directly?
//!
//! Built for the deployment check that a device on a field network has no route to the core (it
//! runs inside a scratch container, where there is no shell, ping or nc). It proves reachability
//! the strongest way a device can: a registered device sends a real `HandshakeInit` to the core's
//! direct-access UDP port, and only the core, holding its Noise private key, can answer with a
//! `HandshakeResponse` that completes the handshake. It also tries a TCP connection to a port such
//! as the core's admin endpoint. Any answer at all (a completed handshake, any datagram, an ICMP
//! "port unreachable", a TCP connection or reset) means a packet got there and back: reachable.
//! Silence until the time limit, or "no route" from the local stack, means unreachable.
//!
//! ```text
//!  DeviceSession::start_handshake ─UDP─▶ ADDR ─▶ HandshakeResponse? ─▶ Answered (reachable)
//!                                             ─▶ ICMP unreachable   ─▶ Refused  (reachable)
//!                                             ─▶ nothing, no route  ─▶ unreachable
//!  TcpStream::connect ─▶ ADDR ─▶ connected / reset ─▶ reachable;  timeout, no route ─▶ unreachable
//! ```

use std::fmt;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::session::{DeviceEvent, DeviceSession, PublicKey};
use relay_protocol::SessionId;
use tokio::net::{TcpStream, UdpSocket};

use crate::config::DeviceIdentity;

/// How many `HandshakeInit`s a UDP probe sends, spread over its time limit (a lost datagram must
/// not make a reachable core look unreachable).
pub const UDP_ATTEMPTS: u32 = 3;

/// What one probe found.
#[derive(Debug)]
pub enum Outcome {
    /// The core completed the device's handshake: it is reachable, and it is the core.
    Handshake,
    /// Something answered with a datagram that is not a valid response: reachable.
    Datagram(usize),
    /// A TCP connection was established: reachable.
    Connected,
    /// The host answered "port closed" (ICMP port unreachable, TCP reset): reachable.
    Refused,
    /// Nothing came back within the time limit: unreachable.
    Silence(Duration),
    /// The local stack has no route, or the network said the host is unreachable.
    NoRoute(std::io::Error),
}

impl Outcome {
    /// Whether a packet reached the target and something came back.
    pub fn reachable(&self) -> bool {
        matches!(
            self,
            Self::Handshake | Self::Datagram(_) | Self::Connected | Self::Refused
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Handshake => f.write_str("the core completed the handshake: REACHABLE"),
            Self::Datagram(n) => write!(f, "an answer of {n} bytes: REACHABLE"),
            Self::Connected => f.write_str("connected: REACHABLE"),
            Self::Refused => f.write_str("the host refused the port: REACHABLE"),
            Self::Silence(t) => write!(f, "no answer within {} ms: unreachable", t.as_millis()),
            Self::NoRoute(e) => write!(f, "{e}: unreachable"),
        }
    }
}

/// Sends `identity`'s `HandshakeInit` to `target` up to [`UDP_ATTEMPTS`] times within `timeout`
/// and reports what came back.
pub async fn probe_udp(
    target: SocketAddr,
    identity: DeviceIdentity,
    core: PublicKey,
    timeout: Duration,
) -> std::io::Result<Outcome> {
    let local: SocketAddr = if target.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    if let Err(e) = socket.connect(target).await {
        return no_route_or(e);
    }
    let mut session = DeviceSession::new(identity.keypair, core);
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut out = Vec::new();
    let per_attempt = timeout / UDP_ATTEMPTS;
    for _ in 0..UDP_ATTEMPTS {
        let now = Instant::now();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let init = session
            .start_handshake(SessionId(rand::random()), unix_ms, now)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Err(e) = socket.send(&init).await {
            return answer_or(e);
        }
        match tokio::time::timeout(per_attempt, socket.recv(&mut buf)).await {
            Err(_) => continue,
            Ok(Err(e)) => return answer_or(e),
            Ok(Ok(n)) => {
                return Ok(
                    match session.handle_datagram(&buf[..n], Instant::now(), &mut out) {
                        Ok(DeviceEvent::Established { .. }) => Outcome::Handshake,
                        _ => Outcome::Datagram(n),
                    },
                )
            }
        }
    }
    Ok(Outcome::Silence(timeout))
}

/// Tries to open a TCP connection to `target` within `timeout`.
pub async fn probe_tcp(target: SocketAddr, timeout: Duration) -> std::io::Result<Outcome> {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Err(_) => Ok(Outcome::Silence(timeout)),
        Ok(Ok(_stream)) => Ok(Outcome::Connected),
        Ok(Err(e)) => answer_or(e),
    }
}

/// A send or receive error: "refused" is the host's answer; "no route" kinds mean unreachable;
/// anything else is a local failure.
fn answer_or(e: std::io::Error) -> std::io::Result<Outcome> {
    if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::ConnectionReset {
        return Ok(Outcome::Refused);
    }
    no_route_or(e)
}

fn no_route_or(e: std::io::Error) -> std::io::Result<Outcome> {
    match e.kind() {
        ErrorKind::NetworkUnreachable
        | ErrorKind::HostUnreachable
        | ErrorKind::AddrNotAvailable
        | ErrorKind::TimedOut => Ok(Outcome::NoRoute(e)),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::test_core::TestCore;
    use relay_protocol::session::StaticKeypair;

    fn device() -> DeviceIdentity {
        DeviceIdentity {
            serial: "meter-00001".into(),
            keypair: StaticKeypair::generate().expect("keypair"),
        }
    }

    /// The test core (which accepts any device key) behind a UDP socket.
    async fn serve_core() -> (SocketAddr, PublicKey) {
        let core = Arc::new(Mutex::new(TestCore::new()));
        let public = core.lock().expect("core").public();
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let replies = core.lock().expect("core").handle(&buf[..n], Instant::now());
                for r in replies {
                    let _ = socket.send_to(&r, from).await;
                }
            }
        });
        (addr, public)
    }

    #[tokio::test]
    async fn a_core_that_completes_the_handshake_is_reachable() {
        let (addr, core) = serve_core().await;
        let got = probe_udp(addr, device(), core, Duration::from_secs(5))
            .await
            .expect("probe");
        assert!(matches!(got, Outcome::Handshake), "{got}");
        assert!(got.reachable());
        assert!(got.to_string().ends_with("REACHABLE"), "{got}");
    }

    #[tokio::test]
    async fn silence_is_unreachable_and_closed_ports_are_answers() {
        let core = StaticKeypair::generate().expect("keypair");
        // A socket that reads nothing and answers nothing.
        let mute = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mute_addr = mute.local_addr().expect("addr");
        let got = probe_udp(
            mute_addr,
            device(),
            *core.public(),
            Duration::from_millis(300),
        )
        .await
        .expect("probe");
        assert!(matches!(got, Outcome::Silence(_)), "{got}");
        assert!(!got.reachable());
        assert!(got.to_string().ends_with(": unreachable"), "{got}");

        // A closed UDP port on a host that is there: its ICMP answer means reachable.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        let got = probe_udp(
            closed_addr,
            device(),
            *core.public(),
            Duration::from_secs(2),
        )
        .await
        .expect("probe");
        assert!(matches!(got, Outcome::Refused), "{got}");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = listener.local_addr().expect("addr");
        let got = probe_tcp(open, Duration::from_secs(2))
            .await
            .expect("probe");
        assert!(matches!(got, Outcome::Connected), "{got}");
        drop(listener);
        let got = probe_tcp(open, Duration::from_secs(2))
            .await
            .expect("probe");
        assert!(matches!(got, Outcome::Refused), "{got}");
        assert!(got.reachable());
    }

    #[test]
    fn no_route_is_unreachable_and_local_failures_are_errors() {
        let got = answer_or(std::io::Error::from(ErrorKind::NetworkUnreachable)).expect("outcome");
        assert!(!got.reachable());
        assert!(got.to_string().ends_with(": unreachable"), "{got}");
        assert!(answer_or(std::io::Error::from(ErrorKind::PermissionDenied)).is_err());
    }
}
