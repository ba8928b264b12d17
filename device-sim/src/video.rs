//! A camera's video upload over the stream transport (`docs/protocol.md` §13): the device's side,
//! resumable, over TCP to the gateway's stream port (or the core's, with direct access).
//!
//! ```text
//!  upload(video, opts, tickets)
//!   └ attempt: tickets.ticket() ─▶ StreamOpen sealed on the datagram session + its StreamKeys
//!              TCP connect ─▶ length | open frame ─▶ first ack: Receiving{next_chunk} | Complete
//!              │                                                 | Refused (the end)
//!              ├ writer: chunks next_chunk.. (paced by a token bucket) ─▶ length | StreamData
//!              └ reader: length | StreamAck ─▶ acked chunk; Complete ─▶ digest check ─▶ report
//!   connect error, EOF, bad ack, no ack progress ─▶ backoff, new ticket (fresh salt, same upload
//!   id), resume where the core's first ack says
//! ```
//!
//! The uploader holds no session: a [`TicketSource`] hands it the sealed `StreamOpen` for each
//! connection ([`crate::meter::Meter::open_stream`] through the device's task, see
//! [`ChannelTickets`] and [`crate::camera`]). It trusts only authenticated acks: where to resume,
//! what is stored, and the SHA-256 the core computed over the stored video, which it compares
//! with its own.
//!
//! [`video_bytes`] is the deterministic content `--video-bytes` uploads, so that tests can
//! regenerate the exact plaintext the core must have stored.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use relay_protocol::stream::{
    check_length, AckStatus, DeviceStream, RefuseReason, StreamAck, StreamError, StreamKeys,
    StreamOpen, UploadId, MAX_CHUNK, MAX_META, MAX_TOTAL_SIZE, MIN_CHUNK,
};
use serde::Serialize;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::DeviceIdentity;
use crate::meter::{Meter, MeterConfig, Timebase};
use relay_protocol::session::PublicKey;

/// The chunk size uploads use unless told otherwise: the largest the protocol allows.
pub const DEFAULT_CHUNK: u32 = MAX_CHUNK as u32;

/// `len` bytes of deterministic pseudo-random video content for `seed`: SplitMix64 from `seed`,
/// each output word little-endian, the last one cut short. Stable across versions and platforms:
/// tests regenerate the exact plaintext the core must have stored.
pub fn video_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut state = seed;
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let word = z.to_le_bytes();
        let take = (len - out.len()).min(word.len());
        out.extend_from_slice(&word[..take]);
    }
    out
}

/// SHA-256 of `data`: the digest the device and the core compare.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a connection's `StreamOpen` must say: the device seals it with its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRequest {
    /// The upload, the same on every connection.
    pub upload: UploadId,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// The video's size.
    pub total_size: u64,
    /// Metadata stored with the video (at most 200 bytes of UTF-8).
    pub meta: String,
}

/// One connection's first frame (a `Transport`/`AdmittedTransport` frame whose plaintext is the
/// `StreamOpen`, without the length prefix) and the keys of that connection.
#[derive(Debug)]
pub struct Ticket {
    /// The sealed open frame.
    pub frame: Vec<u8>,
    /// The connection's stream keys.
    pub keys: StreamKeys,
}

/// Where the uploader gets a ticket for each connection: whoever holds the device's session.
pub trait TicketSource: Send {
    /// A ticket for `request`, or `None` when the device has no working session now (the
    /// uploader backs off and asks again, counting an attempt).
    fn ticket(&mut self, request: &OpenRequest) -> impl Future<Output = Option<Ticket>> + Send;
}

/// A ticket request to the task that owns the device's [`crate::meter::Meter`]: it answers with
/// `Meter::open_stream` once the meter has a working session, or drops the reply.
#[derive(Debug)]
pub struct TicketRequest {
    /// What to open.
    pub request: OpenRequest,
    /// Where the ticket goes.
    pub reply: oneshot::Sender<Option<Ticket>>,
}

/// A [`TicketSource`] that asks the device's task over a channel and waits up to `wait` for its
/// answer (the task may hold the request until a handshake completes).
#[derive(Clone, Debug)]
pub struct ChannelTickets {
    tx: mpsc::Sender<TicketRequest>,
    wait: Duration,
}

impl ChannelTickets {
    /// Requests go to `tx`; each waits at most `wait` for its ticket.
    pub fn new(tx: mpsc::Sender<TicketRequest>, wait: Duration) -> Self {
        Self { tx, wait }
    }
}

impl TicketSource for ChannelTickets {
    fn ticket(&mut self, request: &OpenRequest) -> impl Future<Output = Option<Ticket>> + Send {
        let (reply, answer) = oneshot::channel();
        let request = TicketRequest {
            request: request.clone(),
            reply,
        };
        let (tx, wait) = (self.tx.clone(), self.wait);
        async move {
            tx.send(request).await.ok()?;
            tokio::time::timeout(wait, answer).await.ok()?.ok()?
        }
    }
}

/// A [`TicketSource`] that holds a device's session itself: a [`Meter`] and a UDP socket to the
/// gateway's device port (or the core's direct port). Asked for a ticket, it handshakes first if
/// it has no working session (within `wait`). Between tickets nobody reads the socket, so a
/// session the core has lost meanwhile (a core restart) goes unnoticed until its rekey: for
/// tests and the bench; a device that also sends readings uses [`crate::camera`].
#[derive(Debug)]
pub struct SessionTickets {
    meter: Meter,
    socket: tokio::net::UdpSocket,
    buf: Vec<u8>,
    wait: Duration,
}

impl SessionTickets {
    /// A meter for `identity` talking to the core `core` through `target` (UDP); each ticket
    /// waits at most `wait` for a session.
    pub async fn connect(
        identity: DeviceIdentity,
        core: PublicKey,
        target: SocketAddr,
        wait: Duration,
    ) -> std::io::Result<Self> {
        let now = Instant::now();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let meter = Meter::new(
            identity.serial,
            identity.keypair,
            core,
            MeterConfig::default(),
            Timebase::new(now, unix_ms),
            rand::random(),
        );
        Ok(Self {
            meter,
            socket: crate::fleet::connect(target).await?,
            buf: vec![0u8; relay_protocol::frame::MAX_DATAGRAM + 1],
            wait,
        })
    }

    /// The meter (its counters, its public key).
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Handshakes now if there is no working session yet (within `wait`); `true` once there is
    /// one. Optional: a ticket does the same. Lets a measurement leave the handshake out.
    pub async fn establish(&mut self) -> bool {
        self.drive(None).await.is_some()
    }

    /// Drives the session until it works (then opens `open`, if given) or `wait` is over.
    async fn drive(&mut self, open: Option<&OpenRequest>) -> Option<Option<Ticket>> {
        let deadline = Instant::now() + self.wait;
        loop {
            let now = Instant::now();
            if self.meter.has_working_session() {
                let Some(r) = open else {
                    return Some(None);
                };
                if let Some((frame, keys)) =
                    self.meter
                        .open_stream(r.upload, r.chunk_size, r.total_size, &r.meta, now)
                {
                    return Some(Some(Ticket { frame, keys }));
                }
            }
            while let Some(datagram) = self.meter.poll_transmit(now) {
                let _ = self.socket.send(&datagram).await;
            }
            while self.meter.poll_event().is_some() {}
            if now >= deadline {
                return None;
            }
            let wake = self
                .meter
                .poll_timeout()
                .map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                received = self.socket.recv(&mut self.buf) => {
                    if let Ok(n) = received {
                        let _ = self.meter.handle_datagram(&self.buf[..n], Instant::now());
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

impl TicketSource for SessionTickets {
    async fn ticket(&mut self, request: &OpenRequest) -> Option<Ticket> {
        self.drive(Some(request)).await.flatten()
    }
}

/// How to upload. [`UploadOptions::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// The stream port: the gateway's (TCP), or the core's for direct access.
    pub target: SocketAddr,
    /// The upload's id, the same on every resume (random by default).
    pub upload: UploadId,
    /// Bytes per chunk, 1024..=65536.
    pub chunk_size: u32,
    /// Metadata stored with the video (UTF-8, at most 200 bytes).
    pub meta: String,
    /// Payload bits per second at most (a token bucket one chunk deep); 0 = as fast as the path
    /// takes them.
    pub bitrate_bps: u64,
    /// Connections (tickets asked for) at most, the first included.
    pub max_attempts: u32,
    /// A TCP connect that takes longer fails the attempt.
    pub connect_timeout: Duration,
    /// With chunks sent and not acknowledged, no ack for this long fails the attempt; also the
    /// longest wait for the first ack.
    pub ack_timeout: Duration,
    /// The wait after the first failed attempt, doubling (plus up to a quarter of jitter).
    pub backoff_initial: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
    /// Live counters, if the caller shows progress.
    pub progress: Option<Arc<UploadProgress>>,
    /// Cancelling it stops the upload (it is resumable later with the same upload id).
    pub shutdown: CancellationToken,
}

impl UploadOptions {
    /// A new random upload id, 64 KiB chunks, full speed, 10 attempts, 5 s connect timeout,
    /// 30 s ack timeout, backoff from 200 ms to 5 s.
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            upload: UploadId(rand::random()),
            chunk_size: DEFAULT_CHUNK,
            meta: String::new(),
            bitrate_bps: 0,
            max_attempts: 10,
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            progress: None,
            shutdown: CancellationToken::new(),
        }
    }
}

/// Live totals of an upload, updated as it goes (for a progress line).
#[derive(Debug, Default)]
pub struct UploadProgress {
    total: AtomicU64,
    stored: AtomicU64,
    sent: AtomicU64,
    attempts: AtomicU32,
    complete: AtomicU32,
}

/// A copy of [`UploadProgress`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UploadSnapshot {
    /// The video's size.
    pub total_bytes: u64,
    /// Bytes the core says are durably stored.
    pub stored_bytes: u64,
    /// Chunk payload bytes sent, every attempt.
    pub sent_bytes: u64,
    /// Connections so far.
    pub attempts: u32,
    /// The core acknowledged the whole video.
    pub complete: bool,
}

impl UploadProgress {
    /// The totals now.
    pub fn snapshot(&self) -> UploadSnapshot {
        UploadSnapshot {
            total_bytes: self.total.load(Ordering::Relaxed),
            stored_bytes: self.stored.load(Ordering::Relaxed),
            sent_bytes: self.sent.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            complete: self.complete.load(Ordering::Relaxed) != 0,
        }
    }
}

/// What an upload did. Sizes in bytes; MB are 10^6 bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UploadReport {
    /// The upload id (hex).
    pub upload: String,
    /// The video's size.
    pub bytes: u64,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Chunks in the video.
    pub chunks: u32,
    /// The device's SHA-256 of the video (hex).
    pub sha256: String,
    /// The SHA-256 the core's `Complete` ack carried (hex; empty without one).
    pub acked_sha256: String,
    /// Both digests are the same: the core stored exactly this video.
    pub digest_match: bool,
    /// The core acknowledged the whole video.
    pub complete: bool,
    /// Connections made (tickets asked for), the first included.
    pub attempts: u32,
    /// The chunk each connection started from, as the core's first ack said (connections that
    /// got no first ack are not listed).
    pub resumed_from: Vec<u32>,
    /// Chunk payload bytes sent over every connection (more than `bytes` after a resume that
    /// repeated chunks the core had not stored yet).
    pub chunk_bytes_sent: u64,
    /// Stream frames sent (open frames and chunks), every connection.
    pub frames_sent: u64,
    /// From the first connection attempt to the `Complete` ack (or the end), in seconds.
    pub elapsed_secs: f64,
    /// `bytes / elapsed_secs` in MB/s (10^6 bytes), once complete.
    pub throughput_mb_s: f64,
}

/// Why an upload did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The caller's parameters (chunk size, an empty or oversized video).
    #[error("invalid upload: {0}")]
    Invalid(String),
    /// The core refused the upload (authenticated): retrying would not help.
    #[error("the core refused the upload: {reason}")]
    Refused {
        /// The reason's label (`too_large`, `chunk_size`, `busy`, `size_mismatch`,
        /// `not_permitted`, or `code N` for one this version does not know).
        reason: String,
        /// What was done until then.
        report: Box<UploadReport>,
    },
    /// Every attempt failed.
    #[error("gave up after {} attempts; the last failed: {last}", report.attempts)]
    GaveUp {
        /// Why the last attempt failed.
        last: String,
        /// What was done until then.
        report: Box<UploadReport>,
    },
    /// The core stored the video but its SHA-256 differs from the device's.
    #[error("the core's SHA-256 of the stored video ({}) differs from the device's ({})", report.acked_sha256, report.sha256)]
    DigestMismatch {
        /// The whole upload.
        report: Box<UploadReport>,
    },
    /// The shutdown token was cancelled.
    #[error("interrupted")]
    Interrupted {
        /// What was done until then.
        report: Box<UploadReport>,
    },
}

impl UploadError {
    /// What was done before the upload failed (`None` for invalid parameters).
    pub fn report(&self) -> Option<&UploadReport> {
        match self {
            Self::Invalid(_) => None,
            Self::Refused { report, .. }
            | Self::GaveUp { report, .. }
            | Self::DigestMismatch { report }
            | Self::Interrupted { report } => Some(report),
        }
    }
}

/// Why one connection ended without the upload's completion; the next attempt follows.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("no ticket: the device has no working session")]
    NoTicket,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("the stream ended before the upload completed")]
    Closed,
    #[error("bad ack: {0}")]
    Stream(#[from] StreamError),
    #[error("bad ack: {0}")]
    BadAck(&'static str),
    #[error("no ack progress for {0:?}")]
    Stalled(Duration),
    #[error("refused")]
    Refused(u8),
    #[error("interrupted")]
    Interrupted,
}

/// A token bucket over payload bytes: `rate` bytes a second, `depth` bytes of burst, debt
/// allowed (a chunk larger than what is in the bucket goes at once and the next one waits).
#[derive(Clone, Debug)]
pub(crate) struct Pacer {
    rate: f64,
    depth: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Pacer {
    /// `bits_per_sec` of payload; `None` for 0 (no pacing).
    pub(crate) fn new(bits_per_sec: u64, depth: usize) -> Option<Self> {
        (bits_per_sec > 0).then(|| Self {
            rate: bits_per_sec as f64 / 8.0,
            depth: depth as f64,
            tokens: depth as f64,
            last: None,
        })
    }

    /// Takes `len` bytes at `now`; returns when they may go (`now` or later).
    pub(crate) fn reserve(&mut self, len: usize, now: Instant) -> Instant {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.depth);
        }
        self.last = Some(now.max(self.last.unwrap_or(now)));
        let wait = if self.tokens >= len as f64 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((len as f64 - self.tokens) / self.rate)
        };
        self.tokens -= len as f64;
        now + wait
    }
}

/// The connection's counters, shared by its writer and its reader.
#[derive(Debug, Default)]
struct Shared {
    /// Chunks below this were written to the socket.
    sent: AtomicU32,
    /// Chunks below this are stored (the last ack).
    acked: AtomicU32,
    chunk_bytes: AtomicU64,
    frames: AtomicU64,
}

/// The upload's fixed facts.
struct Plan<'a> {
    video: &'a [u8],
    open: StreamOpen,
    digest: [u8; 32],
    opts: &'a UploadOptions,
}

/// Uploads `video` to `opts.target`, asking `tickets` for each connection's open frame, resuming
/// after failures until the core acknowledges the whole video with its SHA-256 (compared with
/// the device's) or `max_attempts` connections failed. The SHA-256 of the video is computed
/// first, on a blocking thread.
pub async fn upload(
    video: Arc<[u8]>,
    opts: &UploadOptions,
    tickets: &mut impl TicketSource,
) -> Result<UploadReport, UploadError> {
    let chunk = opts.chunk_size as usize;
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
        return Err(UploadError::Invalid(format!(
            "chunk size {chunk} is not within {MIN_CHUNK}..={MAX_CHUNK}"
        )));
    }
    let total = video.len() as u64;
    if total == 0 || total > MAX_TOTAL_SIZE {
        return Err(UploadError::Invalid(format!(
            "a video of {total} bytes (1 byte to 1 TiB)"
        )));
    }
    if opts.meta.len() > MAX_META {
        return Err(UploadError::Invalid(format!(
            "metadata of {} bytes (at most {MAX_META})",
            opts.meta.len()
        )));
    }
    if opts.max_attempts == 0 {
        return Err(UploadError::Invalid("max_attempts is 0".into()));
    }
    let hashed = Arc::clone(&video);
    let digest = tokio::task::spawn_blocking(move || sha256(&hashed))
        .await
        .map_err(|e| UploadError::Invalid(format!("hashing the video: {e}")))?;
    let open = StreamOpen {
        salt: [0; 16],
        upload: opts.upload,
        chunk_size: opts.chunk_size,
        total_size: total,
        meta: opts.meta.clone(),
    };
    let plan = Plan {
        video: &video,
        digest,
        opts,
        open,
    };
    plan.run(tickets).await
}

impl Plan<'_> {
    async fn run(&self, tickets: &mut impl TicketSource) -> Result<UploadReport, UploadError> {
        let opts = self.opts;
        let request = OpenRequest {
            upload: self.open.upload,
            chunk_size: self.open.chunk_size,
            total_size: self.open.total_size,
            meta: self.open.meta.clone(),
        };
        let mut report = UploadReport {
            upload: opts.upload.to_hex(),
            bytes: self.open.total_size,
            chunk_size: self.open.chunk_size,
            chunks: self.open.chunks(),
            sha256: hex(&self.digest),
            ..UploadReport::default()
        };
        if let Some(p) = &opts.progress {
            p.total.store(report.bytes, Ordering::Relaxed);
        }
        let start = Instant::now();
        let mut backoff = opts.backoff_initial;
        let mut stored = 0u32;
        loop {
            report.attempts += 1;
            if let Some(p) = &opts.progress {
                p.attempts.store(report.attempts, Ordering::Relaxed);
            }
            let shared = Shared::default();
            let result = tokio::select! {
                r = self.attempt(tickets, &request, &shared, &mut report) => r,
                () = opts.shutdown.cancelled() => Err(AttemptError::Interrupted),
            };
            report.chunk_bytes_sent += shared.chunk_bytes.load(Ordering::Relaxed);
            report.frames_sent += shared.frames.load(Ordering::Relaxed);
            report.elapsed_secs = start.elapsed().as_secs_f64();
            let err = match result {
                Ok(ack) => return self.complete(ack, report),
                Err(e) => e,
            };
            match err {
                AttemptError::Refused(code) => {
                    let reason = RefuseReason::from_code(code)
                        .map_or_else(|| format!("code {code}"), |r| r.label().to_owned());
                    return Err(UploadError::Refused {
                        reason,
                        report: Box::new(report),
                    });
                }
                AttemptError::Interrupted => {
                    return Err(UploadError::Interrupted {
                        report: Box::new(report),
                    })
                }
                _ => {}
            }
            tracing::debug!(upload = %opts.upload, attempt = report.attempts, error = %err, "stream attempt failed");
            if report.attempts >= opts.max_attempts {
                return Err(UploadError::GaveUp {
                    last: err.to_string(),
                    report: Box::new(report),
                });
            }
            // An attempt that got more stored starts the backoff over.
            let now_stored = shared.acked.load(Ordering::Relaxed);
            if now_stored > stored {
                stored = now_stored;
                backoff = opts.backoff_initial;
            }
            let jitter = backoff.mul_f64(rand::thread_rng().gen_range(0.0..0.25));
            tokio::select! {
                () = tokio::time::sleep(backoff + jitter) => {}
                () = opts.shutdown.cancelled() => {
                    return Err(UploadError::Interrupted { report: Box::new(report) });
                }
            }
            backoff = (backoff * 2).min(opts.backoff_max);
        }
    }

    /// The `Complete` ack: check it against the device's own digest.
    fn complete(
        &self,
        ack: StreamAck,
        mut report: UploadReport,
    ) -> Result<UploadReport, UploadError> {
        report.complete = true;
        report.acked_sha256 = hex(&ack.sha256);
        report.digest_match = ack.sha256 == self.digest && ack.stored_bytes == report.bytes;
        if report.elapsed_secs > 0.0 {
            report.throughput_mb_s = report.bytes as f64 / report.elapsed_secs / 1e6;
        }
        if let Some(p) = &self.opts.progress {
            p.stored.store(ack.stored_bytes, Ordering::Relaxed);
            p.complete.store(1, Ordering::Relaxed);
        }
        if report.digest_match {
            Ok(report)
        } else {
            Err(UploadError::DigestMismatch {
                report: Box::new(report),
            })
        }
    }

    /// One connection: open, resume where the core says, send the rest, wait for `Complete`.
    async fn attempt(
        &self,
        tickets: &mut impl TicketSource,
        request: &OpenRequest,
        shared: &Shared,
        report: &mut UploadReport,
    ) -> Result<StreamAck, AttemptError> {
        let opts = self.opts;
        let ticket = tickets
            .ticket(request)
            .await
            .ok_or(AttemptError::NoTicket)?;
        let socket = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(opts.target))
            .await
            .map_err(|_| AttemptError::ConnectTimeout)?
            .map_err(AttemptError::Connect)?;
        // Acks are small and each one matters to the sender's window; chunks are whole writes.
        let _ = socket.set_nodelay(true);
        let (mut rd, mut wr) = socket.into_split();
        let mut stream = DeviceStream::new(ticket.keys);
        let mut first = Vec::with_capacity(4 + ticket.frame.len());
        first.extend_from_slice(&(ticket.frame.len() as u32).to_be_bytes());
        first.extend_from_slice(&ticket.frame);
        wr.write_all(&first).await.map_err(AttemptError::Io)?;
        shared.frames.fetch_add(1, Ordering::Relaxed);

        let mut buf = Vec::with_capacity(128);
        let ack = match tokio::time::timeout(opts.ack_timeout, read_frame(&mut rd, &mut buf)).await
        {
            Err(_) => return Err(AttemptError::Stalled(opts.ack_timeout)),
            Ok(Err(e)) => return Err(AttemptError::Io(e)),
            Ok(Ok(false)) => return Err(AttemptError::Closed),
            Ok(Ok(true)) => stream.open_ack(&buf)?,
        };
        let chunks = self.open.chunks();
        let start = match ack.status {
            AckStatus::Complete => return Ok(ack),
            AckStatus::Refused => return Err(AttemptError::Refused(ack.reason)),
            AckStatus::Receiving if ack.next_chunk >= chunks => {
                return Err(AttemptError::BadAck("resume point past the last chunk"))
            }
            AckStatus::Receiving => ack.next_chunk,
        };
        report.resumed_from.push(start);
        shared.sent.store(start, Ordering::Relaxed);
        shared.acked.store(start, Ordering::Relaxed);
        self.stored(start);

        // The writer seals with the connection's state and the reader opens acks with it: one
        // task, so the lock is never contended; it is held for one chunk's sealing at most.
        let stream = std::sync::Mutex::new(stream);
        let writer = self.send_chunks(&mut wr, &stream, start, shared);
        let reader = self.read_acks(&mut rd, &stream, &mut buf, shared);
        tokio::pin!(writer, reader);
        let mut writing = true;
        loop {
            tokio::select! {
                written = &mut writer, if writing => match written {
                    Ok(()) => writing = false,
                    Err(e) => {
                        // The core may have said why it stopped reading (a refusal, or the
                        // upload is complete after all): give its last frames a moment.
                        return match tokio::time::timeout(Duration::from_secs(1), &mut reader).await {
                            Ok(Ok(ack)) => Ok(ack),
                            Ok(Err(AttemptError::Refused(code))) => Err(AttemptError::Refused(code)),
                            _ => Err(AttemptError::Io(e)),
                        };
                    }
                },
                acked = &mut reader => return acked,
            }
        }
    }

    /// Records the core's stored position in the live progress.
    fn stored(&self, next_chunk: u32) {
        if let Some(p) = &self.opts.progress {
            let bytes = self.open.offset(next_chunk).min(self.open.total_size);
            p.stored.store(bytes, Ordering::Relaxed);
        }
    }

    /// Writes chunks `start..` (sealed, length-prefixed), paced by the bitrate if one is set.
    async fn send_chunks(
        &self,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        stream: &std::sync::Mutex<DeviceStream>,
        start: u32,
        shared: &Shared,
    ) -> std::io::Result<()> {
        let open = &self.open;
        let chunks = open.chunks();
        let mut pacer = Pacer::new(self.opts.bitrate_bps, open.chunk_size as usize);
        let mut frame = Vec::with_capacity(MAX_CHUNK + 64);
        for index in start..chunks {
            let from = usize::try_from(open.offset(index)).unwrap_or(usize::MAX);
            let len = open.chunk_len(index);
            let data = self
                .video
                .get(from..from.saturating_add(len))
                .unwrap_or(&[]);
            if let Some(pacer) = pacer.as_mut() {
                let at = pacer.reserve(data.len(), Instant::now());
                tokio::time::sleep_until(at.into()).await;
            }
            frame.clear();
            lock(stream)
                .seal_chunk(index, index + 1 == chunks, data, &mut frame)
                .map_err(std::io::Error::other)?;
            wr.write_all(&frame).await?;
            shared.sent.store(index + 1, Ordering::Relaxed);
            shared
                .chunk_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            shared.frames.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = &self.opts.progress {
                p.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        wr.flush().await
    }

    /// Reads acks until `Complete` (returned), a refusal or a failure.
    async fn read_acks(
        &self,
        rd: &mut tokio::net::tcp::OwnedReadHalf,
        stream: &std::sync::Mutex<DeviceStream>,
        buf: &mut Vec<u8>,
        shared: &Shared,
    ) -> Result<StreamAck, AttemptError> {
        let timeout = self.opts.ack_timeout;
        loop {
            let ack = match tokio::time::timeout(timeout, read_frame(rd, buf)).await {
                Err(_) => {
                    if shared.sent.load(Ordering::Relaxed) > shared.acked.load(Ordering::Relaxed) {
                        return Err(AttemptError::Stalled(timeout));
                    }
                    // Nothing outstanding (a slow bitrate between acks): keep waiting.
                    continue;
                }
                Ok(Err(e)) => return Err(AttemptError::Io(e)),
                Ok(Ok(false)) => return Err(AttemptError::Closed),
                Ok(Ok(true)) => lock(stream).open_ack(buf)?,
            };
            match ack.status {
                AckStatus::Complete => return Ok(ack),
                AckStatus::Refused => return Err(AttemptError::Refused(ack.reason)),
                AckStatus::Receiving => {
                    let acked = shared.acked.load(Ordering::Relaxed);
                    if ack.next_chunk < acked {
                        return Err(AttemptError::BadAck("stored position went back"));
                    }
                    if ack.next_chunk > shared.sent.load(Ordering::Relaxed) {
                        return Err(AttemptError::BadAck("stored chunks never sent"));
                    }
                    shared.acked.store(ack.next_chunk, Ordering::Relaxed);
                    self.stored(ack.next_chunk);
                }
            }
        }
    }
}

/// The connection's state; a poisoned lock still holds valid keys and counters.
fn lock(stream: &std::sync::Mutex<DeviceStream>) -> std::sync::MutexGuard<'_, DeviceStream> {
    stream
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads one length-prefixed frame into `buf` (replacing its contents). `Ok(false)` on a clean
/// end of stream before a frame starts; a length of 0 or over `MAX_STREAM_FRAME` is an error.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = check_length(u32::from_be_bytes(len))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
}

#[cfg(test)]
mod tests;
