//! Handshake rates: snow's IK responder alone (what the core cannot beat), and the real core's
//! answers to initiations from distinct registered devices sent to its direct port.
//!
//! Everything expensive that is not the measured side's work (device keys, message 1) is built
//! before the clock starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_protocol::payload::{InitPayload, ResponsePayload};
use relay_protocol::session::{DeviceSession, PublicKey, NOISE_PATTERN, PROLOGUE};
use relay_protocol::{DeviceFrame, SessionId};
use snow::Builder;
use tokio::net::UdpSocket;

use super::BenchError;
use crate::config::DeviceIdentity;

/// How long a sending socket waits for the next response before writing off what it still
/// has outstanding (the core answers nothing to a refused initiation; nothing is resent).
const SILENCE: Duration = Duration::from_secs(1);

fn noise(e: snow::Error) -> BenchError {
    BenchError::Noise(e.to_string())
}

/// snow's responder rate on this thread.
#[derive(Clone, Copy, Debug)]
pub(super) struct RawRate {
    pub per_sec: f64,
    pub count: u64,
}

/// Times `Builder::build_responder` + `read_message` + `write_message` +
/// `into_stateless_transport_mode` over `distinct` pre-built IK message 1s (from as many device
/// keys, to a throwaway core key), cycling through them until `min_time` has passed.
pub(super) fn raw_responder_rate(
    distinct: usize,
    min_time: Duration,
) -> Result<RawRate, BenchError> {
    let params: snow::params::NoiseParams = NOISE_PATTERN.parse().map_err(noise)?;
    let core = Builder::new(params.clone())
        .generate_keypair()
        .map_err(noise)?;
    let mut init_payload = Vec::new();
    InitPayload {
        timestamp: 1,
        ..InitPayload::default()
    }
    .encode(&mut init_payload);
    let mut response_payload = Vec::new();
    ResponsePayload::accept(3600).encode(&mut response_payload);

    let mut messages = Vec::with_capacity(distinct);
    let mut buf = [0u8; 256];
    for _ in 0..distinct.max(1) {
        let device = Builder::new(params.clone())
            .generate_keypair()
            .map_err(noise)?;
        let mut hs = Builder::new(params.clone())
            .local_private_key(&device.private)
            .and_then(|b| b.remote_public_key(&core.public))
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_initiator())
            .map_err(noise)?;
        let n = hs.write_message(&init_payload, &mut buf).map_err(noise)?;
        messages.push(buf[..n].to_vec());
    }

    let mut payload = [0u8; 64];
    let mut count = 0u64;
    let start = Instant::now();
    loop {
        for message in &messages {
            let mut hs = Builder::new(params.clone())
                .local_private_key(&core.private)
                .and_then(|b| b.prologue(PROLOGUE))
                .and_then(|b| b.build_responder())
                .map_err(noise)?;
            hs.read_message(message, &mut payload).map_err(noise)?;
            hs.write_message(&response_payload, &mut buf)
                .map_err(noise)?;
            std::hint::black_box(hs.into_stateless_transport_mode().map_err(noise)?);
            count += 1;
        }
        if start.elapsed() >= min_time {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(RawRate {
        per_sec: count as f64 / secs,
        count,
    })
}

/// One `HandshakeInit` datagram per device (distinct keys, unix-ms timestamps) for the core
/// `core`, built on every CPU.
pub(super) fn build_inits(
    devices: Vec<DeviceIdentity>,
    core: PublicKey,
) -> Result<Vec<Vec<u8>>, BenchError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .max(1);
    let per_thread = devices.len().div_ceil(threads).max(1);
    let mut chunks: Vec<Vec<DeviceIdentity>> = Vec::new();
    let mut devices = devices.into_iter().peekable();
    while devices.peek().is_some() {
        chunks.push(devices.by_ref().take(per_thread).collect());
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    std::thread::scope(|scope| {
        let workers: Vec<_> = chunks
            .into_iter()
            .enumerate()
            .map(|(c, chunk)| {
                scope.spawn(move || {
                    let now = Instant::now();
                    chunk
                        .into_iter()
                        .enumerate()
                        .map(|(i, d)| {
                            let id = SessionId(
                                u32::try_from(c * per_thread + i + 1).unwrap_or(u32::MAX),
                            );
                            DeviceSession::new(d.keypair, core)
                                .start_handshake(id, timestamp, now)
                                .map_err(|e| BenchError::Noise(e.to_string()))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            match w.join() {
                Ok(inits) => all.extend(inits?),
                Err(_) => return Err(BenchError::Noise("init builder thread panicked".into())),
            }
        }
        Ok(all)
    })
}

/// What the core answered.
#[derive(Clone, Copy, Debug)]
pub(super) struct CoreRate {
    pub per_sec: f64,
    pub sent: u64,
    pub responses: u64,
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Debug, Default)]
struct SocketOutcome {
    sent: u64,
    responses: u64,
    last_response: Option<Instant>,
}

/// Sends `inits` to `target` from `sockets` sockets, each keeping at most `outstanding`
/// unanswered, and counts `HandshakeResponse`s. The rate is responses over first send to last
/// response.
pub(super) async fn core_rate(
    inits: Vec<Vec<u8>>,
    target: SocketAddr,
    sockets: usize,
    outstanding: usize,
) -> Result<CoreRate, BenchError> {
    let sockets = sockets.max(1);
    let per_socket = inits.len().div_ceil(sockets).max(1);
    let mut bound = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
            .await
            .map_err(BenchError::io("handshake socket"))?;
        socket
            .connect(target)
            .await
            .map_err(BenchError::io("handshake socket"))?;
        bound.push(socket);
    }
    let mut inits = inits.into_iter().peekable();
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for socket in bound {
        let share: Vec<Vec<u8>> = inits.by_ref().take(per_socket).collect();
        tasks.spawn(drive(socket, share, outstanding.max(1)));
    }
    let mut total = SocketOutcome::default();
    while let Some(joined) = tasks.join_next().await {
        let o = joined.map_err(|e| BenchError::Daemon(format!("handshake sender: {e}")))?;
        total.sent += o.sent;
        total.responses += o.responses;
        total.last_response = total.last_response.max(o.last_response);
    }
    let elapsed = total.last_response.map_or(Duration::ZERO, |t| t - start);
    let secs = elapsed.as_secs_f64();
    Ok(CoreRate {
        per_sec: if secs > 0.0 {
            total.responses as f64 / secs
        } else {
            0.0
        },
        sent: total.sent,
        responses: total.responses,
        elapsed,
    })
}

async fn drive(socket: UdpSocket, inits: Vec<Vec<u8>>, window: usize) -> SocketOutcome {
    let mut o = SocketOutcome::default();
    let mut next = 0;
    let mut in_flight = 0usize;
    let mut buf = [0u8; 2048];
    loop {
        while in_flight < window && next < inits.len() {
            if socket.send(&inits[next]).await.is_ok() {
                in_flight += 1;
            }
            o.sent += 1;
            next += 1;
        }
        if in_flight == 0 {
            break;
        }
        match tokio::time::timeout(SILENCE, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                if matches!(
                    DeviceFrame::decode(&buf[..n]),
                    Ok(DeviceFrame::HandshakeResponse { .. })
                ) {
                    o.responses += 1;
                    o.last_response = Some(Instant::now());
                    in_flight -= 1;
                }
            }
            // An ICMP error from an earlier send: that initiation is lost.
            Ok(Err(_)) => in_flight = in_flight.saturating_sub(1),
            // Whatever is outstanding after a second of silence was refused or dropped.
            Err(_) => in_flight = 0,
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::session::{Responder, StaticKeypair};

    #[test]
    fn raw_rate_counts_whole_handshakes() {
        let r = raw_responder_rate(3, Duration::ZERO).expect("runs");
        assert_eq!(r.count, 3);
        assert!(r.per_sec > 0.0);
    }

    #[test]
    fn built_inits_are_accepted_by_a_responder() {
        let core = StaticKeypair::from_private(&[7; 32]).expect("key");
        let core_public = *core.public();
        let devices: Vec<DeviceIdentity> = (0..5)
            .map(|i| DeviceIdentity {
                serial: format!("meter-{i}"),
                keypair: StaticKeypair::generate().expect("key"),
            })
            .collect();
        let publics: Vec<PublicKey> = devices.iter().map(|d| *d.keypair.public()).collect();
        let inits = build_inits(devices, core_public).expect("built");
        assert_eq!(inits.len(), 5);
        let responder = Responder::new(core);
        for (init, public) in inits.iter().zip(&publics) {
            let Ok(DeviceFrame::HandshakeInit { sender, noise }) = DeviceFrame::decode(init) else {
                panic!("not a HandshakeInit");
            };
            let incoming = responder.read_init(sender, noise).expect("authenticates");
            assert_eq!(incoming.device(), public);
        }
    }
}
