//! `device-sim camera`: one device that reports its status as readings over UDP datagrams (the
//! ordinary [`Meter`] machinery) and, after an "accident", uploads a video over the stream
//! transport ([`crate::video::upload`]) while it keeps reporting.
//!
//! ```text
//!  run_camera ─ one task: UdpSocket (connected to the target) + Meter
//!     select { socket.recv ─▶ meter.handle_datagram
//!              status tick ─▶ meter.queue_reading(status_payload)      every status_every
//!              sleep_until(meter.poll_timeout) ─▶ poll_transmit
//!              ticket request ─▶ meter.open_stream ─▶ reply (held until a working session)
//!              accident_after ─▶ spawn upload(video) ══ TCP ══▶ stream target (gateway | core)
//!              upload done ─▶ one last status, drain, CameraReport }
//! ```
//!
//! The uploader runs in a task of its own and asks this task for a ticket (a `StreamOpen` sealed
//! on the current session) for every connection ([`ChannelTickets`]), so a session re-established
//! during the upload (a rekey, a core restart) is used by the next resume.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::payload::{ReadingSeq, MAX_READING};
use relay_protocol::session::PublicKey;
use relay_protocol::stream::UploadId;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::DeviceIdentity;
use crate::device_dir::{DeviceDir, DeviceDirError};
use crate::fleet::percentile;
use crate::meter::{seq_base, Meter, MeterConfig, MeterEvent, MeterStats, Timebase};
use crate::video::{
    upload, ChannelTickets, TicketRequest, UploadError, UploadOptions, UploadProgress,
    UploadReport, DEFAULT_CHUNK,
};

/// The camera's identity: a pre-provisioned device (`fleet.keys`) or a device directory with a
/// secure element (it provisions itself first if it is factory-fresh).
#[derive(Debug)]
pub enum CameraDevice {
    /// Keys in memory.
    Fixed(DeviceIdentity),
    /// Keys in the directory's sealed key store; the state file is kept current.
    Element(DeviceDir),
}

impl CameraDevice {
    /// The serial number.
    pub fn serial(&self) -> &str {
        match self {
            Self::Fixed(d) => &d.serial,
            Self::Element(d) => d.serial(),
        }
    }
}

/// What to run. [`CameraOptions::new`] fills in the defaults.
#[derive(Debug)]
pub struct CameraOptions {
    /// The device.
    pub device: CameraDevice,
    /// The core's static public key.
    pub core_public_key: PublicKey,
    /// Where datagrams go: the gateway's device port or the core's direct port (UDP).
    pub target: SocketAddr,
    /// Where the video goes: the gateway's stream port or the core's (TCP).
    pub stream_target: SocketAddr,
    /// A status reading this often, from the start.
    pub status_every: Duration,
    /// Bytes per status reading (at most `MAX_READING`).
    pub status_bytes: usize,
    /// The accident: the video upload starts this long after the start.
    pub accident_after: Duration,
    /// The video.
    pub video: Arc<[u8]>,
    /// The upload's id [default: random]; the same id resumes an earlier run's upload.
    pub upload: Option<UploadId>,
    /// Metadata stored with the video [default: `camera=SERIAL;event=accident;unix_ms=T`].
    pub meta: Option<String>,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Payload bits per second at most; 0 = full speed.
    pub bitrate_bps: u64,
    /// Stream connections at most.
    pub max_attempts: u32,
    /// With chunks unacknowledged, no ack for this long fails a connection.
    pub ack_timeout: Duration,
    /// Status readings continue this long after the start; `None`: until the video is done
    /// (stored or given up on), plus one last status reading.
    pub duration: Option<Duration>,
    /// After the last status reading, how long to wait for outstanding acknowledgements.
    pub drain_timeout: Duration,
    /// The meter's limits and timers.
    pub meter: MeterConfig,
    /// How long an upload attempt waits for a ticket (a working session).
    pub ticket_wait: Duration,
    /// Seed for session ids and jitter; random when `None`.
    pub seed: Option<u64>,
    /// Cancelling it stops the camera (and its upload) at once.
    pub shutdown: CancellationToken,
}

impl CameraOptions {
    /// A status reading every 5 s (64 bytes), the accident after 2 s, 64 KiB chunks at full
    /// speed, 10 attempts, status until the video is done, 10 s drain.
    pub fn new(
        device: CameraDevice,
        core_public_key: PublicKey,
        target: SocketAddr,
        stream_target: SocketAddr,
        video: Arc<[u8]>,
    ) -> Self {
        Self {
            device,
            core_public_key,
            target,
            stream_target,
            status_every: Duration::from_secs(5),
            status_bytes: 64,
            accident_after: Duration::from_secs(2),
            video,
            upload: None,
            meta: None,
            chunk_size: DEFAULT_CHUNK,
            bitrate_bps: 0,
            max_attempts: 10,
            ack_timeout: Duration::from_secs(30),
            duration: None,
            drain_timeout: Duration::from_secs(10),
            meter: MeterConfig::default(),
            ticket_wait: Duration::from_secs(10),
            seed: None,
            shutdown: CancellationToken::new(),
        }
    }
}

/// Why the camera could not run: local failures only (what the network does is in the report).
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    /// The options are inconsistent.
    #[error("{0}")]
    Usage(String),
    /// The datagram socket could not be set up.
    #[error("socket: {0}")]
    Socket(std::io::Error),
    /// The device directory or its key store could not be opened.
    #[error(transparent)]
    Device(#[from] DeviceDirError),
    /// The key store holds no usable key.
    #[error("device {serial}: {reason}")]
    Keys {
        /// The device.
        serial: String,
        /// Why.
        reason: String,
    },
}

/// Live counters for a progress line.
#[derive(Debug, Default)]
pub struct CameraProgress {
    /// The upload's.
    pub upload: Arc<UploadProgress>,
    status_queued: AtomicU64,
    status_acked: AtomicU64,
    upload_started: AtomicU64,
}

impl CameraProgress {
    /// Status readings queued and acknowledged so far, and whether the upload has started.
    pub fn status(&self) -> (u64, u64, bool) {
        (
            self.status_queued.load(Ordering::Relaxed),
            self.status_acked.load(Ordering::Relaxed),
            self.upload_started.load(Ordering::Relaxed) != 0,
        )
    }
}

/// The status readings' side of the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusReport {
    /// Readings queued.
    pub queued: u64,
    /// Readings acknowledged.
    pub acknowledged: u64,
    /// Queued and never acknowledged.
    pub lost: u64,
    /// Retransmissions.
    pub retransmitted: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// First send to acknowledgement, median, milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile, milliseconds.
    pub latency_p99_ms: Option<f64>,
    /// Worst, milliseconds.
    pub latency_max_ms: Option<f64>,
    /// Readings first sent while the video was uploading, acknowledged.
    pub acknowledged_during_upload: u64,
    /// Their 99th percentile latency, milliseconds.
    pub latency_p99_during_upload_ms: Option<f64>,
    /// The meter's counters.
    pub meter: MeterStats,
}

/// What the camera did: `--json` prints it as one object.
#[derive(Clone, Debug, Serialize)]
pub struct CameraReport {
    /// The device's serial number.
    pub serial: String,
    /// Its static public key (hex): how the core knows it.
    pub public_key: String,
    /// Where datagrams went.
    pub target: String,
    /// Where the video went.
    pub stream_target: String,
    /// Status readings.
    pub status: StatusReport,
    /// The upload (also after a failure: what was done), `null` if it never started.
    pub video: Option<UploadReport>,
    /// Why the upload failed, if it did.
    pub video_error: Option<String>,
    /// From the start to the end, seconds.
    pub elapsed_secs: f64,
    /// Cut short by the shutdown token.
    pub interrupted: bool,
    /// The video is stored with a matching digest and every status reading was acknowledged.
    pub ok: bool,
}

/// A recognisable status body of exactly `size` bytes (at most `MAX_READING`):
/// `SERIAL|seq=N|camera=STATE|` padded with `.` (or cut short). `STATE` is `recording` before the
/// accident, `uploading` during the upload, then `stored` or `failed`.
pub fn status_payload(serial: &str, seq: u64, state: &str, size: usize) -> Vec<u8> {
    let mut v = format!("{serial}|seq={seq}|camera={state}|").into_bytes();
    v.resize(size.min(MAX_READING), b'.');
    v
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the upload is.
enum Video {
    Waiting,
    Running(JoinHandle<Result<UploadReport, UploadError>>),
    Done(Result<UploadReport, UploadError>),
}

/// Runs the camera: status readings from the start, the upload at the accident, until the video
/// is done (or `duration`), then the drain. `progress`, if given, is kept current.
pub async fn run_camera(
    opts: CameraOptions,
    progress: Option<Arc<CameraProgress>>,
) -> Result<CameraReport, CameraError> {
    if opts.status_every.is_zero() {
        return Err(CameraError::Usage(
            "the status interval must not be 0".into(),
        ));
    }
    if opts.status_bytes > MAX_READING {
        return Err(CameraError::Usage(format!(
            "status readings of {} bytes exceed the maximum of {MAX_READING}",
            opts.status_bytes
        )));
    }
    let progress = progress.unwrap_or_default();
    let start = Instant::now();
    let unix_ms = unix_ms_now();
    let timebase = Timebase::new(start, unix_ms);
    let seed = opts.seed.unwrap_or_else(rand::random);
    let serial = opts.device.serial().to_owned();
    let (meter, mut dir) = match opts.device {
        CameraDevice::Fixed(identity) => (
            Meter::new(
                identity.serial,
                identity.keypair,
                opts.core_public_key,
                opts.meter.clone(),
                timebase,
                seed,
            ),
            None,
        ),
        CameraDevice::Element(dir) => {
            let store = Arc::new(dir.open_store()?);
            let meter = Meter::with_element(
                dir.serial(),
                store as Arc<dyn relay_protocol::secure_element::SecureElement>,
                opts.core_public_key,
                dir.memory(),
                opts.meter.clone(),
                timebase,
                seed,
            )
            .map_err(|e| CameraError::Keys {
                serial: serial.clone(),
                reason: e.to_string(),
            })?;
            (meter, Some(dir))
        }
    };
    let socket = crate::fleet::connect(opts.target)
        .await
        .map_err(CameraError::Socket)?;
    let seq0 = match &dir {
        Some(d) => seq_base(unix_ms).max(d.state().next_seq),
        None => seq_base(unix_ms),
    };
    let upload_id = opts.upload.unwrap_or_else(|| UploadId(rand::random()));
    let (ticket_tx, mut ticket_rx) = mpsc::channel::<TicketRequest>(4);
    let upload_shutdown = opts.shutdown.child_token();
    let upload_opts = UploadOptions {
        upload: upload_id,
        chunk_size: opts.chunk_size,
        meta: opts
            .meta
            .clone()
            .unwrap_or_else(|| format!("camera={serial};event=accident;unix_ms={unix_ms}")),
        bitrate_bps: opts.bitrate_bps,
        max_attempts: opts.max_attempts,
        ack_timeout: opts.ack_timeout,
        progress: Some(progress.upload.clone()),
        shutdown: upload_shutdown.clone(),
        ..UploadOptions::new(opts.stream_target)
    };
    let mut upload_opts = Some(upload_opts);
    let mut tickets = Some(ChannelTickets::new(ticket_tx, opts.ticket_wait));

    let mut cam = Camera {
        meter,
        socket,
        buf: vec![0u8; MAX_DATAGRAM + 1],
        seq0,
        queued: 0,
        latencies: Vec::new(),
        during_upload: Vec::new(),
        sent_during_upload: std::collections::HashSet::new(),
        progress: progress.clone(),
        serial: serial.clone(),
    };
    let accident_at = start + opts.accident_after;
    let status_until = opts.duration.map(|d| start + d);
    let mut next_status = start;
    let mut video = Video::Waiting;
    let mut drain_deadline: Option<Instant> = None;
    let mut pending: Vec<TicketRequest> = Vec::new();
    let mut interrupted = false;

    loop {
        let now = Instant::now();
        let state = match &video {
            Video::Waiting => "recording",
            Video::Running(_) => "uploading",
            Video::Done(Ok(_)) => "stored",
            Video::Done(Err(_)) => "failed",
        };
        // Status readings on the interval until the duration (without one: until the video is
        // done, then one last reading), then the drain; never before the video is done.
        let video_done = matches!(video, Video::Done(_));
        let queuing = drain_deadline.is_none()
            && match status_until {
                Some(until) => now < until,
                None => !video_done,
            };
        if queuing {
            while next_status <= now {
                cam.queue_status(state, opts.status_bytes, now);
                next_status += opts.status_every;
            }
        } else if drain_deadline.is_none() && video_done {
            if status_until.is_none() {
                cam.queue_status(state, opts.status_bytes, now);
            }
            drain_deadline = Some(now + opts.drain_timeout);
        }
        if let (Video::Waiting, true) = (&video, now >= accident_at) {
            if let (Some(o), Some(mut t)) = (upload_opts.take(), tickets.take()) {
                let data = Arc::clone(&opts.video);
                progress.upload_started.store(1, Ordering::Relaxed);
                tracing::debug!(%serial, upload = %o.upload, bytes = data.len(), "accident: video upload starts");
                video = Video::Running(tokio::spawn(async move { upload(data, &o, &mut t).await }));
            }
        }
        // Tickets for the uploader, once the session works.
        if cam.meter.has_working_session() {
            for req in pending.drain(..) {
                let r = &req.request;
                let ticket = cam
                    .meter
                    .open_stream(r.upload, r.chunk_size, r.total_size, &r.meta, now)
                    .map(|(frame, keys)| crate::video::Ticket { frame, keys });
                let _ = req.reply.send(ticket);
            }
        }
        pending.retain(|r| !r.reply.is_closed());
        cam.flush(now, &mut dir).await;
        if let Some(deadline) = drain_deadline {
            if cam.meter.outstanding() == 0 || now >= deadline {
                break;
            }
        }

        let wake = [
            cam.meter.poll_timeout(),
            queuing.then_some(next_status),
            matches!(video, Video::Waiting).then_some(accident_at),
            status_until.filter(|u| *u > now),
            drain_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let running = matches!(video, Video::Running(_));
        tokio::select! {
            () = opts.shutdown.cancelled() => {
                interrupted = true;
                break;
            }
            received = cam.socket.recv(&mut cam.buf) => {
                if let Ok(n) = received {
                    if let Err(e) = cam.meter.handle_datagram(&cam.buf[..n], Instant::now()) {
                        tracing::debug!(%serial, reason = e.reason(), "bad datagram dropped");
                    }
                }
            }
            request = ticket_rx.recv(), if !ticket_rx.is_closed() => {
                if let Some(request) = request {
                    pending.push(request);
                }
            }
            done = async {
                match &mut video {
                    Video::Running(handle) => handle.await,
                    _ => std::future::pending().await,
                }
            }, if running => {
                let result = done.unwrap_or_else(|e| Err(UploadError::Invalid(format!("upload task: {e}"))));
                match &result {
                    Ok(r) => tracing::debug!(%serial, secs = r.elapsed_secs, "video stored"),
                    Err(e) => tracing::warn!(%serial, error = %e, "video upload failed"),
                }
                video = Video::Done(result);
            }
            () = sleep_until(wake) => {}
        }
    }
    upload_shutdown.cancel();
    let video = match video {
        Video::Done(r) => Some(r),
        Video::Running(handle) => Some(
            handle
                .await
                .unwrap_or_else(|e| Err(UploadError::Invalid(format!("upload task: {e}")))),
        ),
        Video::Waiting => None,
    };
    cam.persist(&mut dir);
    Ok(cam.report(
        video,
        &opts.target,
        &opts.stream_target,
        start.elapsed(),
        interrupted,
    ))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The camera's datagram side.
struct Camera {
    meter: Meter,
    socket: UdpSocket,
    buf: Vec<u8>,
    seq0: u64,
    queued: u64,
    latencies: Vec<Duration>,
    during_upload: Vec<Duration>,
    /// Status readings first queued while the upload ran.
    sent_during_upload: std::collections::HashSet<ReadingSeq>,
    progress: Arc<CameraProgress>,
    serial: String,
}

impl Camera {
    fn queue_status(&mut self, state: &str, size: usize, now: Instant) {
        let seq = self.seq0 + self.queued;
        self.queued += 1;
        let body = status_payload(&self.serial, seq, state, size);
        match self.meter.queue_reading(ReadingSeq(seq), body, now) {
            Ok(()) => {
                self.progress.status_queued.fetch_add(1, Ordering::Relaxed);
                if state == "uploading" {
                    self.sent_during_upload.insert(ReadingSeq(seq));
                }
            }
            Err(e) => tracing::warn!(serial = %self.serial, error = %e, "status not queued"),
        }
    }

    /// Sends what the meter has to send and handles its events.
    async fn flush(&mut self, now: Instant, dir: &mut Option<DeviceDir>) {
        loop {
            while let Some(datagram) = self.meter.poll_transmit(now) {
                if let Err(e) = self.socket.send(&datagram).await {
                    tracing::debug!(serial = %self.serial, error = %e, "send failed");
                }
            }
            let mut any = false;
            while let Some(event) = self.meter.poll_event() {
                any = true;
                match event {
                    MeterEvent::Acked { seq, latency } => {
                        self.latencies.push(latency);
                        if self.sent_during_upload.remove(&seq) {
                            self.during_upload.push(latency);
                        }
                        self.progress.status_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    MeterEvent::StateChanged => self.persist(dir),
                    MeterEvent::Released { endpoint } => {
                        tracing::warn!(serial = %self.serial, %endpoint, "released to another core; the camera does not follow");
                    }
                    other => tracing::debug!(serial = %self.serial, event = ?other, "meter event"),
                }
            }
            if !any {
                break;
            }
        }
    }

    /// A device with a directory writes its state file.
    fn persist(&self, dir: &mut Option<DeviceDir>) {
        if let Some(d) = dir.as_mut() {
            if let Err(e) = d.save(&self.meter.memory(), self.seq0 + self.queued) {
                tracing::warn!(serial = %self.serial, error = %e, "cannot save state");
            }
        }
    }

    fn report(
        mut self,
        video: Option<Result<UploadReport, UploadError>>,
        target: &SocketAddr,
        stream_target: &SocketAddr,
        elapsed: Duration,
        interrupted: bool,
    ) -> CameraReport {
        self.latencies.sort();
        self.during_upload.sort();
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        let stats = *self.meter.stats();
        let status = StatusReport {
            queued: stats.queued,
            acknowledged: stats.acked,
            lost: stats.queued.saturating_sub(stats.acked),
            retransmitted: stats.retransmitted,
            handshakes: stats.handshakes,
            latency_p50_ms: percentile(&self.latencies, 50.0).map(ms),
            latency_p99_ms: percentile(&self.latencies, 99.0).map(ms),
            latency_max_ms: self.latencies.last().map(ms),
            acknowledged_during_upload: self.during_upload.len() as u64,
            latency_p99_during_upload_ms: percentile(&self.during_upload, 99.0).map(ms),
            meter: stats,
        };
        let (video, video_error) = match video {
            None => (None, None),
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (e.report().cloned(), Some(e.to_string())),
        };
        let ok = video.as_ref().is_some_and(|v| v.complete && v.digest_match)
            && video_error.is_none()
            && status.acknowledged > 0
            && status.lost == 0
            && !interrupted;
        CameraReport {
            serial: self.serial,
            public_key: self.meter.public().to_hex(),
            target: target.to_string(),
            stream_target: stream_target.to_string(),
            status,
            video,
            video_error,
            elapsed_secs: elapsed.as_secs_f64(),
            interrupted,
            ok,
        }
    }
}

#[cfg(test)]
mod tests;
