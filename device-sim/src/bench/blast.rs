//! The forged-frame phase's two ends: a blaster that sends forged `AdmittedTransport` frames as
//! fast as this machine can (UDP generic segmentation offload through `quinn-udp`: up to 64
//! datagrams per send call, so the sender costs little next to the receiver), and a plain UDP
//! socket that only counts what it receives, for the raw receive rate the gateway is held against.
//!
//! ```text
//!  forged_batches ─▶ [frame × segments] × batches (distinct random counters, ciphertexts, tags)
//!  blast: threads × socket ─ sendmsg(GSO, segment = frame length) ─▶ target, until the deadline
//!  PlainReceiver: one thread, blocking recv_from on a socket bound like the gateway's (4 MiB
//!                 buffers), counting datagrams
//! ```

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quinn_udp::{Transmit, UdpSockRef, UdpSocketState};
use rand::rngs::StdRng;
use rand::SeedableRng;
use relay_protocol::frame::SessionId;

use super::BenchError;
use crate::flood::forged_admitted_frame;

/// Segments per send call, at most (the kernel's limit is 64).
const MAX_SEGMENTS: usize = 64;

/// Forged frames grouped for segmentation offload: every frame the same length.
#[derive(Debug)]
pub(super) struct Batches {
    /// Each `segments` frames of `frame_len` bytes, back to back.
    batches: Vec<Vec<u8>>,
    /// Bytes per frame.
    pub frame_len: usize,
    /// Frames per batch.
    pub segments: usize,
}

impl Batches {
    /// Frames in all.
    pub fn frames(&self) -> usize {
        self.batches.len() * self.segments
    }
}

/// How many datagrams one send call may carry on this machine (1 without segmentation offload).
pub(super) fn gso_segments() -> usize {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .ok()
        .and_then(|s| UdpSocketState::new(UdpSockRef::from(&s)).ok())
        .map_or(1, |state| state.max_gso_segments())
        .clamp(1, MAX_SEGMENTS)
}

/// `batches` batches of `segments` forged frames each, for `sessions` round robin, with
/// `ciphertext` bytes of random ciphertext and random counters and tags.
pub(super) fn forged_batches(
    sessions: &[SessionId],
    batches: usize,
    segments: usize,
    ciphertext: usize,
    seed: u64,
) -> Batches {
    let mut rng = StdRng::seed_from_u64(seed);
    let segments = segments.max(1);
    let mut n = 0usize;
    let mut frame_len = 0;
    let batches = (0..batches.max(1))
        .map(|_| {
            let mut batch = Vec::new();
            for _ in 0..segments {
                let session = sessions
                    .get(n % sessions.len().max(1))
                    .copied()
                    .unwrap_or(SessionId(1));
                let before = batch.len();
                forged_admitted_frame(&mut rng, session, ciphertext, &mut batch);
                frame_len = batch.len() - before;
                n += 1;
            }
            batch
        })
        .collect();
    Batches {
        batches,
        frame_len,
        segments,
    }
}

/// What a blast sent.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct BlastOutcome {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Send calls that failed.
    pub errors: u64,
    /// From the start to the last send.
    pub elapsed: Duration,
}

impl BlastOutcome {
    pub fn per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }
}

/// Sends `batches` round robin to `target` from `threads` sockets (one thread each) for
/// `duration`, as fast as they go. Blocks the calling thread.
pub(super) fn blast(
    target: SocketAddr,
    batches: &Arc<Batches>,
    threads: usize,
    duration: Duration,
) -> Result<BlastOutcome, BenchError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut sockets = Vec::with_capacity(threads.max(1));
    for _ in 0..threads.max(1) {
        let socket = relay_ops::udp::bind(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            relay_ops::udp::DEFAULT_BUFFER_BYTES,
        )
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
        .map_err(BenchError::io("blaster socket"))?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))
            .map_err(BenchError::io("blaster socket"))?;
        sockets.push((socket, state));
    }
    let workers: Vec<JoinHandle<BlastOutcome>> = sockets
        .into_iter()
        .enumerate()
        .map(|(t, (socket, state))| {
            let batches = Arc::clone(batches);
            std::thread::spawn(move || send_until(&socket, &state, target, &batches, t, deadline))
        })
        .collect();
    let mut total = BlastOutcome::default();
    for w in workers {
        let o = w
            .join()
            .map_err(|_| BenchError::Daemon("blaster thread panicked".into()))?;
        total.sent += o.sent;
        total.errors += o.errors;
        total.elapsed = total.elapsed.max(o.elapsed);
    }
    Ok(total)
}

fn send_until(
    socket: &UdpSocket,
    state: &UdpSocketState,
    target: SocketAddr,
    batches: &Batches,
    offset: usize,
    deadline: Instant,
) -> BlastOutcome {
    let start = Instant::now();
    let mut o = BlastOutcome::default();
    let mut i = offset;
    let len = batches.frame_len;
    while Instant::now() < deadline && !batches.batches.is_empty() {
        let batch = &batches.batches[i % batches.batches.len()];
        i += 1;
        // The kernel may refuse segmentation after all (quinn-udp then lowers the limit): send
        // the batch's frames one by one from then on.
        if state.max_gso_segments() >= batches.segments && batches.segments > 1 {
            let transmit = Transmit {
                destination: target,
                ecn: None,
                contents: batch,
                segment_size: Some(len),
                src_ip: None,
            };
            match state.try_send(UdpSockRef::from(socket), &transmit) {
                Ok(()) => o.sent += batches.segments as u64,
                Err(_) => o.errors += 1,
            }
        } else {
            for frame in batch.chunks(len.max(1)) {
                match socket.send_to(frame, target) {
                    Ok(_) => o.sent += 1,
                    Err(_) => o.errors += 1,
                }
            }
        }
    }
    o.elapsed = start.elapsed();
    o
}

/// A plain UDP socket on 127.0.0.1 (buffers as the gateway's) and a thread that receives and
/// counts until stopped: with one blocking `recv_from` per datagram, or (`batched`) with the same
/// receive calls the gateway makes (`recvmmsg` of 32 buffers, GRO, through quinn-udp), so that the
/// comparison with the gateway measures its per-frame work, not its system calls.
pub(super) struct PlainReceiver {
    pub addr: SocketAddr,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PlainReceiver {
    pub fn start(batched: bool) -> Result<Self, BenchError> {
        let socket = relay_ops::udp::bind(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            relay_ops::udp::DEFAULT_BUFFER_BYTES,
        )
        .map_err(BenchError::io("plain receiver socket"))?;
        socket
            .set_nonblocking(batched)
            .and_then(|()| socket.set_read_timeout(Some(Duration::from_millis(50))))
            .map_err(BenchError::io("plain receiver socket"))?;
        let addr = socket
            .local_addr()
            .map_err(BenchError::io("plain receiver socket"))?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&count), Arc::clone(&stop));
        let state = if batched {
            Some(
                UdpSocketState::new((&socket).into())
                    .map_err(BenchError::io("plain receiver socket state"))?,
            )
        } else {
            None
        };
        let thread = std::thread::spawn(move || match state {
            None => {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if socket.recv_from(&mut buf).is_ok() {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Some(state) => {
                let per_buf = 1201 * state.gro_segments().max(1);
                let batch = quinn_udp::BATCH_SIZE.max(1);
                let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; per_buf]).collect();
                let mut meta = vec![quinn_udp::RecvMeta::default(); batch];
                while !s.load(Ordering::Relaxed) {
                    let mut iovs: Vec<std::io::IoSliceMut<'_>> = bufs
                        .iter_mut()
                        .map(|b| std::io::IoSliceMut::new(b))
                        .collect();
                    match state.recv((&socket).into(), &mut iovs, &mut meta) {
                        Ok(n) => {
                            let datagrams: usize = meta
                                .iter()
                                .take(n)
                                .map(|m| m.len.div_ceil(m.stride.max(1)).max(1))
                                .sum();
                            c.fetch_add(datagrams as u64, Ordering::Relaxed);
                        }
                        Err(_) => std::thread::sleep(Duration::from_micros(20)),
                    }
                }
            }
        });
        Ok(Self {
            addr,
            count,
            stop,
            thread: Some(thread),
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for PlainReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_equal_frames_for_the_sessions_round_robin() {
        let sessions = [SessionId(7), SessionId(8)];
        let b = forged_batches(&sessions, 3, 4, 20, 1);
        assert_eq!((b.frames(), b.segments, b.frame_len), (12, 4, 14 + 20 + 8));
        let frames: Vec<&[u8]> = b
            .batches
            .iter()
            .flat_map(|x| x.chunks(b.frame_len))
            .collect();
        assert_eq!(frames.len(), 12);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(&f[..2], &[1, 4]);
            let id = u32::from_be_bytes([f[2], f[3], f[4], f[5]]);
            assert_eq!(id, 7 + (i as u32 % 2));
        }
        let distinct: std::collections::HashSet<_> = frames.iter().collect();
        assert_eq!(distinct.len(), 12, "random counters, ciphertexts and tags");
    }

    #[test]
    fn the_blaster_reaches_a_plain_receiver() {
        let receiver = PlainReceiver::start(false).expect("receiver");
        let segments = gso_segments();
        assert!((1..=MAX_SEGMENTS).contains(&segments));
        let batches = Arc::new(forged_batches(&[SessionId(1)], 4, segments, 16, 2));
        let out = blast(receiver.addr, &batches, 2, Duration::from_millis(100)).expect("blast");
        assert!(out.sent > 0, "{out:?}");
        let deadline = Instant::now() + Duration::from_secs(2);
        while receiver.received() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(receiver.received() > 0);
        assert!(receiver.received() <= out.sent);
        assert!(out.per_sec() > 0.0);
    }
}
