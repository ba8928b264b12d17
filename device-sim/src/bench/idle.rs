//! Idle sessions through the gateway: each device does one handshake from a source address of its
//! own (the gateway keys flows by address), then closes its socket. The gateway's flow and the
//! core's session stay until their idle and expiry timeouts (minutes to hours), which is the state
//! a connected, silent meter costs.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_protocol::session::{DeviceEvent, DeviceSession, PublicKey};
use relay_protocol::SessionId;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::{progress, BenchError};
use crate::config::DeviceIdentity;

/// Source ports used on each loopback address: well clear of the privileged range, and about
/// 40k addresses per IP.
const PORTS: std::ops::Range<u16> = 20_000..60_000;
/// Loopback addresses used, 127.0.0.2 onwards (127.0.0.1 is left to everything else).
const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 254;
/// Handshake attempts per device, and how long each waits for its response.
const ATTEMPTS: u32 = 3;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Source ports tried in a row before giving up (something holds the whole range).
const MAX_SKIP_RUN: u64 = 10_000;

/// Hands out UDP sockets bound to distinct loopback addresses (127.0.0.2:20000, …:20001, …,
/// then 127.0.0.3), skipping ports already in use.
#[derive(Debug)]
pub(super) struct SourceAddrs {
    host: u8,
    port: u16,
    skipped: u64,
}

impl SourceAddrs {
    pub fn new() -> Self {
        Self {
            host: FIRST_HOST,
            port: PORTS.start,
            skipped: 0,
        }
    }

    /// Ports skipped because they were in use.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    fn advance(&mut self) -> Result<SocketAddr, BenchError> {
        if self.host > LAST_HOST {
            return Err(BenchError::Usage("out of loopback source addresses".into()));
        }
        let addr = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(127, 0, 0, self.host),
            self.port,
        ));
        self.port += 1;
        if self.port >= PORTS.end {
            self.port = PORTS.start;
            self.host += 1;
        }
        Ok(addr)
    }

    /// A socket on the next free address.
    pub fn bind(&mut self) -> Result<std::net::UdpSocket, BenchError> {
        let mut run = 0;
        loop {
            let addr = self.advance()?;
            match std::net::UdpSocket::bind(addr) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && run < MAX_SKIP_RUN => {
                    self.skipped += 1;
                    run += 1;
                }
                Err(e) => return Err(BenchError::io(format!("binding {addr}"))(e)),
            }
        }
    }
}

/// How one step went.
#[derive(Clone, Debug, Default)]
pub(super) struct IdleOutcome {
    pub established: u64,
    /// Devices without a session after every attempt.
    pub failed: u64,
    /// Attempts that got no response in time.
    pub timeouts: u64,
    /// The core's ids of the first sessions established (at most the `keep_ids` asked for): the
    /// sessions the gateway holds admissions for.
    pub sessions: Vec<SessionId>,
}

#[derive(Debug, Default)]
struct Counters {
    established: AtomicU64,
    failed: AtomicU64,
    timeouts: AtomicU64,
    sessions: std::sync::Mutex<Vec<SessionId>>,
}

/// Establishes one session per device through `gateway`, `concurrency` handshakes at a time,
/// and keeps the core's ids of the first `keep_ids` sessions. `already` (idle devices before this
/// step) only shows in the progress lines.
pub(super) async fn establish(
    devices: Vec<DeviceIdentity>,
    core: PublicKey,
    gateway: SocketAddr,
    sources: &mut SourceAddrs,
    concurrency: usize,
    already: usize,
    keep_ids: usize,
) -> Result<IdleOutcome, BenchError> {
    let total = devices.len();
    let counters = Arc::new(Counters::default());
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_report = Instant::now();
    let report = |c: &Counters| {
        progress(format_args!(
            "  {} idle sessions ({} of {total} this step), {} failed, {} timeouts",
            already as u64 + c.established.load(Ordering::Relaxed),
            c.established.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
            c.timeouts.load(Ordering::Relaxed)
        ));
    };
    for device in devices {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BenchError::Daemon("idle-session limiter closed".into()))?;
        let std_socket = sources.bind()?;
        std_socket
            .set_nonblocking(true)
            .map_err(BenchError::io("idle-session socket"))?;
        let socket =
            UdpSocket::from_std(std_socket).map_err(BenchError::io("idle-session socket"))?;
        let shared = counters.clone();
        tasks.spawn(async move {
            let result = one_session(device, core, socket, gateway).await;
            shared
                .timeouts
                .fetch_add(result.timeouts, Ordering::Relaxed);
            if result.established {
                shared.established.fetch_add(1, Ordering::Relaxed);
                if let Some(id) = result.session {
                    let mut ids = shared
                        .sessions
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if ids.len() < keep_ids {
                        ids.push(id);
                    }
                }
            } else {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        while let Some(joined) = tasks.try_join_next() {
            joined.map_err(|e| BenchError::Daemon(format!("idle-session task: {e}")))?;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            report(&counters);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| BenchError::Daemon(format!("idle-session task: {e}")))?;
    }
    report(&counters);
    let sessions = std::mem::take(
        &mut *counters
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    Ok(IdleOutcome {
        established: counters.established.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        timeouts: counters.timeouts.load(Ordering::Relaxed),
        sessions,
    })
}

/// How one device's handshake went.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SessionResult {
    pub established: bool,
    /// Attempts that got no response in time.
    pub timeouts: u64,
    /// Initiations sent (cookie echoes included).
    pub initiations: u64,
    /// Cookie challenges the core answered with.
    pub cookie_challenges: u64,
    /// From the first initiation to the session.
    pub latency: Option<Duration>,
    /// The core's id of the session (the `receiver` of the device's frames).
    pub session: Option<SessionId>,
}

/// Up to [`ATTEMPTS`] handshakes (new ephemeral key, id and a greater timestamp each), each
/// waiting [`ATTEMPT_TIMEOUT`] for its response; a cookie challenge is echoed at once (the
/// attempt keeps waiting). The socket closes when this returns.
pub(super) async fn one_session(
    device: DeviceIdentity,
    core: PublicKey,
    socket: UdpSocket,
    gateway: SocketAddr,
) -> SessionResult {
    let mut result = SessionResult::default();
    if socket.connect(gateway).await.is_err() {
        return result;
    }
    let mut session = DeviceSession::new(device.keypair, core);
    let mut last_timestamp = 0u64;
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    let started = Instant::now();
    for _ in 0..ATTEMPTS {
        let timestamp = unix_ms().max(last_timestamp + 1);
        last_timestamp = timestamp;
        let id = SessionId(rand::random::<u32>() | 1);
        let Ok(init) = session.start_handshake(id, timestamp, Instant::now()) else {
            return result;
        };
        // A failed send is a lost datagram like any other: the attempt times out.
        let _ = socket.send(&init).await;
        result.initiations += 1;
        let deadline = tokio::time::Instant::now() + ATTEMPT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => {
                    result.timeouts += 1;
                    break;
                }
                Ok(Ok(n)) => match session.handle_datagram(&buf[..n], Instant::now(), &mut out) {
                    Ok(DeviceEvent::Established { .. }) => {
                        result.established = true;
                        result.latency = Some(started.elapsed());
                        result.session = session.current().map(|t| t.remote_id());
                        return result;
                    }
                    Ok(DeviceEvent::CookieChallenge) => {
                        result.cookie_challenges += 1;
                        result.initiations += 1;
                        let _ = socket.send(&out).await;
                    }
                    // A refusal, a stray or a late datagram: keep waiting.
                    _ => {}
                },
                // An ICMP error for an earlier send; keep waiting for this attempt's response.
                Ok(Err(_)) => {}
            }
        }
    }
    result
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_and_roll_over_to_the_next_ip() {
        let mut s = SourceAddrs::new();
        let first = s.advance().expect("addr");
        assert_eq!(first, "127.0.0.2:20000".parse().expect("addr"));
        s.port = PORTS.end - 1;
        assert_eq!(
            s.advance().expect("addr"),
            "127.0.0.2:59999".parse().expect("addr")
        );
        assert_eq!(
            s.advance().expect("addr"),
            "127.0.0.3:20000".parse().expect("addr")
        );
        s.host = LAST_HOST + 1;
        assert!(s.advance().is_err());
    }

    #[test]
    fn skips_ports_in_use() {
        let mut s = SourceAddrs::new();
        // Find a free port in the range, hold it, and ask for exactly that one.
        let held = s.bind().expect("bind");
        let port = held.local_addr().expect("addr").port();
        let mut again = SourceAddrs::new();
        again.port = port;
        let next = again.bind().expect("bind");
        assert_ne!(next.local_addr().expect("addr").port(), port);
        assert!(again.skipped() >= 1);
    }
}
