//! `device-sim flood` and `device-sim forge`: junk that looks like device traffic, for the flood
//! resistance tests and the bench. Nothing here holds a key: the frames are random bytes behind a
//! valid header, so the gateway and the core can only drop them (and count them).
//!
//! ```text
//!  flood: N sockets on 127.x.y.z (from --source-base), round robin, paced to --rate
//!         HandshakeInit = 1 | 1 | sender:u32 (random) | noise:105 (random)          111 bytes
//!  forge: one socket, round robin over --sessions, --count frames paced to --rate
//!         AdmittedTransport = 1 | 4 | receiver:u32 | counter:u64 (random)
//!                             | ciphertext (random, ≥ 16) | tag:8 (random)
//! ```
//!
//! Both run on one blocking thread: a [`RatePacer`] says how many frames are due at each moment
//! (sent in a burst, then a short sleep), so the rate holds from tens to hundreds of thousands of
//! frames per second without a timer per frame. The loopback sources need no configuration on
//! Linux: all of 127.0.0.0/8 is local, and a socket may bind any address in it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use relay_protocol::frame::{SessionId, MAX_DATAGRAM};
use serde::Serialize;

/// The device-link protocol version byte.
const VERSION: u8 = 1;
/// Frame type bytes (`docs/protocol.md` §3).
const TYPE_HANDSHAKE_INIT: u8 = 1;
const TYPE_ADMITTED_TRANSPORT: u8 = 4;
/// The Noise part of a forged initiation: as long as a real device's (IK message 1 with the
/// usual init payload), so that only its contents give it away.
pub const FORGED_NOISE_LEN: usize = 105;
/// A forged initiation's length on the wire.
pub const FORGED_INIT_LEN: usize = 6 + FORGED_NOISE_LEN;
/// The smallest ciphertext of a transport frame (the AEAD tag alone).
pub const MIN_CIPHERTEXT: usize = 16;
/// Bytes of the admission tag.
const ADMISSION_TAG: usize = 8;
/// Bytes before a transport frame's ciphertext.
const TRANSPORT_HEADER: usize = 14;
/// The largest ciphertext a forged admitted frame may have (the frame fits in a datagram).
pub const MAX_CIPHERTEXT: usize = MAX_DATAGRAM - TRANSPORT_HEADER - ADMISSION_TAG;
/// The most sources one flood binds (each is a socket, so an open file).
pub const MAX_SOURCES: usize = 65_536;
/// The longest the pacer sleeps at once, so that a stop is noticed quickly.
const MAX_NAP: Duration = Duration::from_millis(5);

/// Why a flood or forge could not run: the caller's options or the local system.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// An option is out of range.
    #[error("{0}")]
    Usage(String),
    /// A socket could not be set up.
    #[error("{what}: {source}")]
    Socket {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// How many frames are due at each moment for `rate` frames per second from `start` (`rate` 0: as
/// many as asked for, at once).
#[derive(Clone, Copy, Debug)]
pub struct RatePacer {
    start: Instant,
    rate: u64,
}

impl RatePacer {
    /// A pacer starting now-ish at `start`.
    pub fn new(start: Instant, rate: u64) -> Self {
        Self { start, rate }
    }

    /// Frames due by `now` since the start (the first is due at once), `u64::MAX` when unpaced.
    pub fn due(&self, now: Instant) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        let nanos = now.saturating_duration_since(self.start).as_nanos();
        let due = nanos.saturating_mul(u128::from(self.rate)) / 1_000_000_000;
        u64::try_from(due.saturating_add(1)).unwrap_or(u64::MAX)
    }

    /// When frame number `n` (counting from 0) is due.
    pub fn at(&self, n: u64) -> Instant {
        if self.rate == 0 {
            return self.start;
        }
        let nanos = u128::from(n).saturating_mul(1_000_000_000) / u128::from(self.rate);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// A forged `HandshakeInit`: random sender, random Noise bytes of a real initiation's length.
pub fn forged_handshake_init(rng: &mut impl RngCore) -> [u8; FORGED_INIT_LEN] {
    let mut frame = [0u8; FORGED_INIT_LEN];
    rng.fill_bytes(&mut frame[2..]);
    frame[0] = VERSION;
    frame[1] = TYPE_HANDSHAKE_INIT;
    frame
}

/// A forged `AdmittedTransport` for `session`: random counter, `ciphertext` random bytes and a
/// random tag, appended to `out`.
pub fn forged_admitted_frame(
    rng: &mut impl RngCore,
    session: SessionId,
    ciphertext: usize,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.push(VERSION);
    out.push(TYPE_ADMITTED_TRANSPORT);
    out.extend_from_slice(&session.0.to_be_bytes());
    out.resize(start + TRANSPORT_HEADER + ciphertext + ADMISSION_TAG, 0);
    rng.fill_bytes(&mut out[start + 6..]);
}

/// `n` distinct loopback addresses from `base` upwards (skipping those ending in .0 and .255),
/// all within 127.0.0.0/8.
pub fn loopback_sources(base: Ipv4Addr, n: usize) -> Result<Vec<Ipv4Addr>, AttackError> {
    if !base.is_loopback() {
        return Err(AttackError::Usage(format!(
            "--source-base {base} is not a loopback address (127.x.y.z)"
        )));
    }
    let mut addrs = Vec::with_capacity(n.min(MAX_SOURCES));
    let mut next = u32::from(base);
    while addrs.len() < n {
        let addr = Ipv4Addr::from(next);
        if !addr.is_loopback() {
            return Err(AttackError::Usage(format!(
                "{n} sources from {base} run past 127.255.255.254"
            )));
        }
        let last = addr.octets()[3];
        if last != 0 && last != 255 {
            addrs.push(addr);
        }
        next = next.wrapping_add(1);
    }
    Ok(addrs)
}

/// `device-sim flood`.
#[derive(Clone, Debug)]
pub struct FloodOptions {
    /// Where the initiations go (a gateway's device port or the core's direct port, on this
    /// host: the sources are loopback addresses).
    pub target: SocketAddr,
    /// Distinct source addresses, one socket each.
    pub sources: usize,
    /// Frames per second over all sources (0: as fast as the sockets take them).
    pub rate: u64,
    /// How long.
    pub duration: Duration,
    /// The first source address.
    pub source_base: Ipv4Addr,
    /// Seed for the random bytes (random when `None`).
    pub seed: Option<u64>,
}

/// What a flood or forge sent.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AttackReport {
    /// `flood` or `forge`.
    pub kind: &'static str,
    /// Where to.
    pub target: String,
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Sends that failed (buffer full, ICMP errors reported on the socket).
    pub send_errors: u64,
    /// Source addresses (flood) or sockets (forge).
    pub sources: usize,
    /// Session ids the frames named (forge).
    pub sessions: usize,
    /// From the first send to the last, in seconds.
    pub elapsed_secs: f64,
    /// `sent / elapsed_secs`.
    pub sent_per_sec: f64,
}

impl AttackReport {
    /// One human-readable line.
    pub fn line(&self) -> String {
        let what = match self.kind {
            "flood" => format!(
                "forged HandshakeInits from {} loopback sources",
                self.sources
            ),
            _ => format!(
                "forged AdmittedTransport frames for {} session ids",
                self.sessions
            ),
        };
        format!(
            "{}: sent {} {what} to {} in {:.2} s ({:.0}/s), {} send errors",
            self.kind,
            self.sent,
            self.target,
            self.elapsed_secs,
            self.sent_per_sec,
            self.send_errors
        )
    }
}

fn check_target(target: SocketAddr) -> Result<(), AttackError> {
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Ok(()),
        _ => Err(AttackError::Usage(format!(
            "--target {target}: the flood's sources are loopback addresses, so the target must be \
             one too (127.x.y.z)"
        ))),
    }
}

/// Binds one blocking UDP socket per source address (port 0). The receive buffers are as small as
/// the kernel allows: the flood never reads what comes back (cookie replies), and thousands of
/// sockets holding it would tie up kernel memory; the kernel drops it instead.
fn bind_sources(addrs: &[Ipv4Addr]) -> Result<Vec<UdpSocket>, AttackError> {
    use socket2::{Domain, Protocol, Socket, Type};
    addrs
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(IpAddr::V4(*ip), 0);
            let fail = |source| AttackError::Socket {
                what: format!("binding {addr} (many sources need `ulimit -n` above their count)"),
                source,
            };
            let socket =
                Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
            let _ = socket.set_recv_buffer_size(1);
            socket.bind(&addr.into()).map_err(fail)?;
            Ok(socket.into())
        })
        .collect()
}

/// Sends `total` frames made by `make` round robin over `sockets` to `target`, paced by `rate`,
/// stopping early at `deadline`. Returns (sent, errors, first send → last send).
fn blast(
    sockets: &[UdpSocket],
    target: SocketAddr,
    rate: u64,
    total: u64,
    deadline: Option<Instant>,
    mut make: impl FnMut(u64, &mut Vec<u8>),
) -> (u64, u64, Duration) {
    let start = Instant::now();
    let pacer = RatePacer::new(start, rate);
    let mut sent = 0u64;
    let mut errors = 0u64;
    let mut frame = Vec::with_capacity(MAX_DATAGRAM);
    let mut last = start;
    'outer: while sent < total && !sockets.is_empty() {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        let due = pacer.due(now).min(total);
        while sent < due {
            frame.clear();
            make(sent, &mut frame);
            let socket = &sockets[(sent % sockets.len() as u64) as usize];
            if socket.send_to(&frame, target).is_err() {
                errors += 1;
            }
            sent += 1;
            // An unpaced run still looks at the clock now and then, for the deadline.
            if rate == 0 && sent % 1024 == 0 {
                continue 'outer;
            }
        }
        last = Instant::now();
        if sent >= total {
            break;
        }
        let wake = pacer.at(sent);
        let nap = wake.saturating_duration_since(Instant::now()).min(MAX_NAP);
        if !nap.is_zero() {
            std::thread::sleep(nap);
        }
    }
    (sent, errors, last.saturating_duration_since(start))
}

/// `device-sim flood`: forged `HandshakeInit`s from `sources` loopback addresses, round robin, at
/// `rate` per second for `duration`. Blocks the calling thread.
pub fn run_flood(opts: &FloodOptions) -> Result<AttackReport, AttackError> {
    check_target(opts.target)?;
    if opts.sources == 0 || opts.sources > MAX_SOURCES {
        return Err(AttackError::Usage(format!(
            "--sources must be 1 to {MAX_SOURCES}"
        )));
    }
    let addrs = loopback_sources(opts.source_base, opts.sources)?;
    let sockets = bind_sources(&addrs)?;
    let total = if opts.rate == 0 {
        u64::MAX
    } else {
        let secs = opts.duration.as_secs_f64();
        (opts.rate as f64 * secs).round() as u64
    };
    let mut rng = StdRng::seed_from_u64(opts.seed.unwrap_or_else(rand::random));
    let deadline = Instant::now() + opts.duration;
    let (sent, send_errors, elapsed) = blast(
        &sockets,
        opts.target,
        opts.rate,
        total,
        Some(deadline),
        |_, frame| frame.extend_from_slice(&forged_handshake_init(&mut rng)),
    );
    Ok(report(
        "flood",
        opts.target,
        sent,
        send_errors,
        addrs.len(),
        0,
        elapsed,
    ))
}

/// `device-sim forge`.
#[derive(Clone, Debug)]
pub struct ForgeOptions {
    /// Where the frames go.
    pub target: SocketAddr,
    /// The session ids the frames name, round robin.
    pub sessions: Vec<SessionId>,
    /// Frames in all.
    pub count: u64,
    /// Frames per second (0: as fast as the socket takes them).
    pub rate: u64,
    /// Ciphertext bytes per frame (at least [`MIN_CIPHERTEXT`]).
    pub ciphertext_bytes: usize,
    /// Seed for the random bytes (random when `None`).
    pub seed: Option<u64>,
}

/// `device-sim forge`: `count` forged `AdmittedTransport` frames for `sessions`, paced to `rate`.
/// Blocks the calling thread.
pub fn run_forge(opts: &ForgeOptions) -> Result<AttackReport, AttackError> {
    if opts.sessions.is_empty() {
        return Err(AttackError::Usage("--sessions names no session id".into()));
    }
    if !(MIN_CIPHERTEXT..=MAX_CIPHERTEXT).contains(&opts.ciphertext_bytes) {
        return Err(AttackError::Usage(format!(
            "--ciphertext-bytes must be {MIN_CIPHERTEXT} to {MAX_CIPHERTEXT}"
        )));
    }
    let local = match (opts.target.ip(), opts.target.ip().is_loopback()) {
        (IpAddr::V4(_), true) => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        (IpAddr::V4(_), false) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        (IpAddr::V6(_), true) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
        (IpAddr::V6(_), false) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = relay_ops::udp::bind(local, 1 << 20).map_err(|source| AttackError::Socket {
        what: format!("binding {local}"),
        source,
    })?;
    socket
        .set_nonblocking(false)
        .map_err(|source| AttackError::Socket {
            what: "forge socket".into(),
            source,
        })?;
    let sockets = [socket];
    let mut rng = StdRng::seed_from_u64(opts.seed.unwrap_or_else(rand::random));
    let sessions = &opts.sessions;
    let (sent, send_errors, elapsed) = blast(
        &sockets,
        opts.target,
        opts.rate,
        opts.count,
        None,
        |n, frame| {
            let session = sessions[(n % sessions.len() as u64) as usize];
            forged_admitted_frame(&mut rng, session, opts.ciphertext_bytes, frame);
        },
    );
    Ok(report(
        "forge",
        opts.target,
        sent,
        send_errors,
        1,
        sessions.len(),
        elapsed,
    ))
}

fn report(
    kind: &'static str,
    target: SocketAddr,
    sent: u64,
    send_errors: u64,
    sources: usize,
    sessions: usize,
    elapsed: Duration,
) -> AttackReport {
    let secs = elapsed.as_secs_f64();
    AttackReport {
        kind,
        target: target.to_string(),
        sent,
        send_errors,
        sources,
        sessions,
        elapsed_secs: secs,
        sent_per_sec: if secs > 0.0 { sent as f64 / secs } else { 0.0 },
    }
}

/// A session id as `forge --sessions` spells it: 1 to 8 hex digits, `0x` optional.
pub fn parse_session_id(s: &str) -> Result<SessionId, String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if hex.is_empty() || hex.len() > 8 {
        return Err(format!("{s:?}: a session id is 1 to 8 hex digits"));
    }
    u32::from_str_radix(hex, 16)
        .map(SessionId)
        .map_err(|_| format!("{s:?}: a session id is 1 to 8 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spreads_frames_over_the_second() {
        let t0 = Instant::now();
        let p = RatePacer::new(t0, 1000);
        assert_eq!(p.due(t0), 1, "the first frame at once");
        assert_eq!(p.due(t0 + Duration::from_micros(999)), 1);
        assert_eq!(p.due(t0 + Duration::from_millis(1)), 2);
        assert_eq!(p.due(t0 + Duration::from_millis(500)), 501);
        assert_eq!(p.due(t0 + Duration::from_secs(2)), 2001);
        assert_eq!(p.at(0), t0);
        assert_eq!(p.at(250), t0 + Duration::from_millis(250));
        let unpaced = RatePacer::new(t0, 0);
        assert_eq!(unpaced.due(t0), u64::MAX);
        assert_eq!(unpaced.at(7), t0);
        // Earlier than the start (a clock read before it): the first frame only.
        assert_eq!(RatePacer::new(t0 + Duration::from_secs(1), 5).due(t0), 1);
    }

    #[test]
    fn forged_frames_have_valid_headers_and_random_bodies() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = forged_handshake_init(&mut rng);
        let b = forged_handshake_init(&mut rng);
        assert_eq!(a.len(), 111);
        assert_eq!(&a[..2], &[1, 1]);
        assert_ne!(a[2..], b[2..]);
        let mut out = vec![0xee];
        forged_admitted_frame(&mut rng, SessionId(0x0102_0304), 16, &mut out);
        assert_eq!(out.len(), 1 + 14 + 16 + 8);
        assert_eq!(&out[1..7], &[1, 4, 1, 2, 3, 4]);
    }

    #[test]
    fn loopback_sources_are_distinct_and_skip_network_and_broadcast_looking_ones() {
        let base: Ipv4Addr = "127.2.0.254".parse().expect("ip");
        let got = loopback_sources(base, 3).expect("sources");
        assert_eq!(
            got,
            ["127.2.0.254", "127.2.1.1", "127.2.1.2"].map(|s| s.parse::<Ipv4Addr>().expect("ip"))
        );
        assert!(loopback_sources("10.0.0.1".parse().expect("ip"), 1).is_err());
        assert!(loopback_sources("127.255.255.254".parse().expect("ip"), 2).is_err());
        let many = loopback_sources("127.2.0.1".parse().expect("ip"), 1000).expect("sources");
        let unique: std::collections::HashSet<_> = many.iter().collect();
        assert_eq!(unique.len(), 1000);
    }

    #[test]
    fn parses_session_ids() {
        assert_eq!(parse_session_id("0a0b0c0d"), Ok(SessionId(0x0a0b_0c0d)));
        assert_eq!(parse_session_id("0xFF"), Ok(SessionId(255)));
        assert!(parse_session_id("").is_err());
        assert!(parse_session_id("123456789").is_err());
        assert!(parse_session_id("xyz").is_err());
    }

    /// Receives on `socket` until `quiet` passes without a datagram: (count, distinct sources).
    fn drain(socket: &UdpSocket, quiet: Duration) -> (u64, std::collections::HashSet<IpAddr>) {
        socket.set_read_timeout(Some(quiet)).expect("timeout");
        let mut buf = [0u8; 2048];
        let mut n = 0;
        let mut sources = std::collections::HashSet::new();
        while let Ok((len, from)) = socket.recv_from(&mut buf) {
            assert_eq!(len, FORGED_INIT_LEN);
            assert_eq!(&buf[..2], &[1, 1]);
            sources.insert(from.ip());
            n += 1;
        }
        (n, sources)
    }

    #[test]
    fn a_flood_comes_from_distinct_loopback_sources_at_its_rate() {
        let sink =
            relay_ops::udp::bind("127.0.0.1:0".parse().expect("addr"), 4 << 20).expect("bind");
        sink.set_nonblocking(false).expect("blocking");
        let opts = FloodOptions {
            target: sink.local_addr().expect("addr"),
            sources: 20,
            rate: 2000,
            duration: Duration::from_millis(500),
            source_base: "127.2.0.1".parse().expect("ip"),
            seed: Some(7),
        };
        let started = Instant::now();
        let report = run_flood(&opts).expect("flood");
        let took = started.elapsed();
        assert_eq!(report.sent, 1000, "{report:?}");
        assert_eq!(report.send_errors, 0);
        assert!(took >= Duration::from_millis(450), "paced, took {took:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        let (received, sources) = drain(&sink, Duration::from_millis(300));
        assert_eq!(received, 1000);
        assert_eq!(sources.len(), 20);
        assert!(sources
            .iter()
            .all(|ip| matches!(ip, IpAddr::V4(v4) if v4.octets()[..2] == [127, 2])));
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["sent"], 1000);
        assert!(report.line().contains("from 20 loopback sources"));

        let not_loopback = FloodOptions {
            target: "192.0.2.1:5683".parse().expect("addr"),
            ..opts
        };
        assert!(matches!(
            run_flood(&not_loopback),
            Err(AttackError::Usage(_))
        ));
    }

    #[test]
    fn forge_sends_count_frames_for_the_sessions_round_robin() {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sink.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let opts = ForgeOptions {
            target: sink.local_addr().expect("addr"),
            sessions: vec![SessionId(1), SessionId(2), SessionId(3)],
            count: 30,
            rate: 0,
            ciphertext_bytes: 40,
            seed: None,
        };
        let report = run_forge(&opts).expect("forge");
        assert_eq!((report.sent, report.sessions), (30, 3));
        let mut buf = [0u8; 2048];
        let mut per_session = [0u32; 4];
        while let Ok(n) = sink.recv(&mut buf) {
            assert_eq!(n, 14 + 40 + 8);
            assert_eq!(&buf[..2], &[1, 4]);
            let id = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
            per_session[id as usize] += 1;
        }
        assert_eq!(per_session, [0, 10, 10, 10]);
        for bad in [
            ForgeOptions {
                sessions: Vec::new(),
                ..opts.clone()
            },
            ForgeOptions {
                ciphertext_bytes: 15,
                ..opts.clone()
            },
        ] {
            assert!(matches!(run_forge(&bad), Err(AttackError::Usage(_))));
        }
    }
}
