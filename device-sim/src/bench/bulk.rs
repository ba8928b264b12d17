//! Phase 6, bulk: a camera's video over the stream transport through the gateway, straight to
//! the core, and plain bytes over loopback TCP; the end-to-end crypto's share of the CPU the
//! gateway run took; the meters' reading latency idle and while a camera streams at full speed.
//!
//! ```text
//!  raw:     TcpStream ──(the video, 64 KiB writes)──▶ sink task (reads into a buffer)
//!  direct:  SessionTickets (UDP ─▶ core direct) + upload ══ TCP ══▶ core stream port
//!  gateway: SessionTickets (UDP ─▶ gateway)     + upload ══ TCP ══▶ gateway ══ QUIC ══▶ core
//!  crypto:  DeviceStream::seal_chunk + CoreStream::open_chunk of the same bytes, one thread
//!  latency: run_fleet (meters every 100 ms via the gateway) alone, then again (other meters)
//!           while a camera uploads back to back at full speed through the gateway (the camera
//!           on a SCHED_IDLE thread: it stands for another device's CPU)
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_ops::lane::{BulkLane, LanePriority};
use relay_protocol::frame::{DeviceFrame, SessionId};
use relay_protocol::payload::ResponsePayload;
use relay_protocol::session::{DeviceEvent, DeviceSession, PublicKey, Responder, StaticKeypair};
use relay_protocol::stream::{CoreStream, DeviceStream, UploadId, MAX_CHUNK};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{daemons, progress, BenchError};
use crate::config::DeviceIdentity;
use crate::fleet::{run_fleet, FleetOptions, FleetSummary};
use crate::meter::MeterConfig;
use crate::video::{upload, SessionTickets, UploadError, UploadOptions, DEFAULT_CHUNK};

/// Each meter's reading interval while latency is measured.
pub(super) const LATENCY_INTERVAL: Duration = Duration::from_millis(100);
/// Readings first sent in the first second (the meters' handshakes) are not in the latencies.
const LATENCY_WARMUP: Duration = Duration::from_secs(1);
/// Reading body size while latency is measured.
const LATENCY_PAYLOAD: usize = 64;
/// How long a camera's ticket may wait for its handshake.
const TICKET_WAIT: Duration = Duration::from_secs(10);
/// The streaming camera starts this long before the meters.
const CAMERA_LEAD: Duration = Duration::from_millis(500);
/// Raw TCP transfers; the fastest counts.
const RAW_ROUNDS: usize = 3;
/// Bytes sealed and opened for the crypto's cost, at most.
const CRYPTO_SAMPLE: usize = 64 << 20;

/// The bulk phase's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Bulk {
    /// Bytes of each transfer (one video).
    pub bytes: u64,
    /// Bytes per chunk on the stream transport.
    pub chunk_size: u32,
    /// Plain bytes over loopback TCP into a buffer: the ceiling (the best of three).
    pub raw: BulkRun,
    /// The video over the stream transport straight to the core's stream port.
    pub direct: BulkRun,
    /// The video through the gateway (TCP in, QUIC stream to the core).
    pub gateway: BulkRun,
    /// `gateway.mb_per_sec / direct.mb_per_sec`.
    pub gateway_over_direct: f64,
    /// `gateway.mb_per_sec / raw.mb_per_sec`.
    pub gateway_over_raw: f64,
    /// `direct.mb_per_sec / raw.mb_per_sec`.
    pub direct_over_raw: f64,
    /// The end-to-end stream crypto (seal at the device and open at the core of the same
    /// bytes, ChaCha20-Poly1305), in-process on one thread, nanoseconds per byte.
    pub crypto_ns_per_byte: f64,
    /// `crypto_ns_per_byte × bytes`: the CPU the gateway run spent on it, estimated, seconds.
    pub crypto_cpu_secs: f64,
    /// CPU time (user + system) during the gateway run.
    pub gateway_run_cpu: Cpu,
    /// CPU time during the direct run.
    pub direct_run_cpu: Cpu,
    /// `crypto_cpu_secs / gateway_run_cpu.total_secs`.
    pub crypto_cpu_share: f64,
    /// The meters' latency idle and while a camera streams.
    pub meters: MetersUnderStream,
}

/// One bulk transfer.
#[derive(Clone, Debug, Serialize)]
pub struct BulkRun {
    /// MB (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// Seconds, connect to the last byte read (raw) or to the `Complete` ack.
    pub secs: f64,
    /// Bytes moved.
    pub bytes: u64,
    /// Stream connections (1 unless a resume was needed; 1 for raw).
    pub attempts: u32,
    /// The core's SHA-256 matched the device's (raw: the sink read every byte).
    pub intact: bool,
}

/// CPU seconds (user + system) spent during one run, by process.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Cpu {
    /// The gateway.
    pub gateway_secs: f64,
    /// The core.
    pub core_secs: f64,
    /// This process (the device side: sealing, the TCP sender).
    pub bench_secs: f64,
    /// The three together.
    pub total_secs: f64,
}

/// The meters' reading latency without and with a camera streaming through the same gateway.
#[derive(Clone, Debug, Serialize)]
pub struct MetersUnderStream {
    /// Meters per run (a fresh set each).
    pub meters: usize,
    /// Each meter's reading interval, milliseconds.
    pub interval_ms: u64,
    /// Each run's length, seconds.
    pub secs: f64,
    /// Readings first sent in this first part of each run (the meters' handshakes) are left
    /// out of the latencies, seconds.
    pub warmup_secs: f64,
    /// Without the camera.
    pub idle: LatencyRun,
    /// While the camera streams at full speed.
    pub streaming: LatencyRun,
    /// `streaming.p99_ms / idle.p99_ms`.
    pub p99_ratio: f64,
    /// Chunk bytes the camera sent during the streaming run.
    pub camera_bytes: u64,
    /// Its rate over the run, MB/s.
    pub camera_mb_per_sec: f64,
    /// Videos it completed during the run.
    pub camera_videos: u32,
}

/// One latency run's acknowledgements.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyRun {
    /// Readings acknowledged.
    pub acknowledged: u64,
    /// Readings never acknowledged.
    pub lost: u64,
    /// First send to acknowledgement, median, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile, milliseconds.
    pub p99_ms: Option<f64>,
    /// Worst, milliseconds.
    pub max_ms: Option<f64>,
}

impl From<&FleetSummary> for LatencyRun {
    fn from(s: &FleetSummary) -> Self {
        Self {
            acknowledged: s.acknowledged,
            lost: s.lost,
            p50_ms: s.latency_p50_ms,
            p99_ms: s.latency_p99_ms,
            max_ms: s.latency_max_ms,
        }
    }
}

/// The devices the phase uses, each for one thing.
pub(super) struct BulkDevices {
    pub direct_camera: DeviceIdentity,
    pub gateway_camera: DeviceIdentity,
    pub streaming_camera: DeviceIdentity,
    pub idle_meters: Vec<DeviceIdentity>,
    pub streaming_meters: Vec<DeviceIdentity>,
}

/// Runs the phase against running daemons; `videos` is the core's video directory (completed
/// videos are removed from it after each transfer).
pub(super) async fn run(
    daemons: &daemons::Daemons,
    core: PublicKey,
    devices: BulkDevices,
    bytes: usize,
    duration: Duration,
    videos: &Path,
) -> Result<Bulk, BenchError> {
    progress(format_args!(
        "bulk: generating a {:.0} MB video",
        bytes as f64 / 1e6
    ));
    let video: Arc<[u8]> = tokio::task::spawn_blocking(move || crate::video::video_bytes(6, bytes))
        .await
        .map_err(|e| BenchError::Daemon(format!("video generator: {e}")))?
        .into();

    // A plain copy is short and noisy: the best of a few.
    let mut raw = raw_tcp(&video).await?;
    for _ in 1..RAW_ROUNDS {
        let again = raw_tcp(&video).await?;
        if again.mb_per_sec > raw.mb_per_sec {
            raw = again;
        }
    }
    progress(format_args!(
        "bulk raw loopback TCP: {:.0} MB/s (best of {RAW_ROUNDS}, {:.2} s)",
        raw.mb_per_sec, raw.secs
    ));
    let (direct, direct_run_cpu) = camera_run(
        daemons,
        "direct",
        devices.direct_camera,
        core,
        daemons.core_direct,
        daemons.core_streams,
        &video,
        videos,
    )
    .await?;
    let (gateway, gateway_run_cpu) = camera_run(
        daemons,
        "gateway",
        devices.gateway_camera,
        core,
        daemons.gateway_devices,
        daemons.gateway_streams,
        &video,
        videos,
    )
    .await?;
    let sample = bytes.min(CRYPTO_SAMPLE);
    let crypto_ns_per_byte = tokio::task::spawn_blocking(move || crypto_ns_per_byte(sample))
        .await
        .map_err(|e| BenchError::Noise(format!("crypto timing thread: {e}")))??;
    let crypto_cpu_secs = crypto_ns_per_byte * gateway.bytes as f64 / 1e9;
    let crypto_cpu_share = super::ratio(crypto_cpu_secs, gateway_run_cpu.total_secs);
    progress(format_args!(
        "bulk: gateway / direct = {:.1} %, gateway / raw = {:.1} %; end-to-end crypto {crypto_ns_per_byte:.2} ns/B = {crypto_cpu_secs:.2} s of the gateway run's {:.2} CPU s ({:.1} %)",
        100.0 * super::ratio(gateway.mb_per_sec, direct.mb_per_sec),
        100.0 * super::ratio(gateway.mb_per_sec, raw.mb_per_sec),
        gateway_run_cpu.total_secs,
        100.0 * crypto_cpu_share
    ));

    let meters = meters_under_stream(
        daemons,
        core,
        (
            devices.streaming_camera,
            devices.idle_meters,
            devices.streaming_meters,
        ),
        &video,
        duration,
        videos,
    )
    .await?;
    Ok(Bulk {
        bytes: bytes as u64,
        chunk_size: DEFAULT_CHUNK,
        gateway_over_direct: super::ratio(gateway.mb_per_sec, direct.mb_per_sec),
        gateway_over_raw: super::ratio(gateway.mb_per_sec, raw.mb_per_sec),
        direct_over_raw: super::ratio(direct.mb_per_sec, raw.mb_per_sec),
        raw,
        direct,
        gateway,
        crypto_ns_per_byte,
        crypto_cpu_secs,
        gateway_run_cpu,
        direct_run_cpu,
        crypto_cpu_share,
        meters,
    })
}

/// Plain bytes over loopback TCP: the video in 64 KiB writes, read by a sink into a buffer.
async fn raw_tcp(video: &Arc<[u8]>) -> Result<BulkRun, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::io("raw TCP sink"))?;
    let addr = listener
        .local_addr()
        .map_err(BenchError::io("raw TCP sink"))?;
    let sink = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let read = socket.read(&mut buf).await?;
            if read == 0 {
                return Ok::<u64, std::io::Error>(n);
            }
            n += read as u64;
        }
    });
    let start = Instant::now();
    let mut socket = TcpStream::connect(addr)
        .await
        .map_err(BenchError::io("raw TCP connect"))?;
    for chunk in video.chunks(MAX_CHUNK) {
        socket
            .write_all(chunk)
            .await
            .map_err(BenchError::io("raw TCP send"))?;
    }
    socket
        .shutdown()
        .await
        .map_err(BenchError::io("raw TCP send"))?;
    let read = sink
        .await
        .map_err(|e| BenchError::Daemon(format!("raw TCP sink: {e}")))?
        .map_err(BenchError::io("raw TCP sink"))?;
    let secs = start.elapsed().as_secs_f64();
    Ok(BulkRun {
        mb_per_sec: read as f64 / secs.max(1e-9) / 1e6,
        secs,
        bytes: read,
        attempts: 1,
        intact: read == video.len() as u64,
    })
}

/// One camera's upload of `video` (its session established first, so the handshake is not
/// timed), with the CPU the three processes spent meanwhile.
#[allow(clippy::too_many_arguments)]
async fn camera_run(
    daemons: &daemons::Daemons,
    name: &str,
    camera: DeviceIdentity,
    core: PublicKey,
    udp: SocketAddr,
    streams: SocketAddr,
    video: &Arc<[u8]>,
    videos: &Path,
) -> Result<(BulkRun, Cpu), BenchError> {
    progress(format_args!(
        "bulk {name}: {:.0} MB video at full speed -> {streams} (session over {udp})",
        video.len() as f64 / 1e6
    ));
    let mut tickets = SessionTickets::connect(camera, core, udp, TICKET_WAIT)
        .await
        .map_err(BenchError::io(format!("camera socket for {udp}")))?;
    if !tickets.establish().await {
        return Err(BenchError::Daemon(format!(
            "bulk {name}: the camera got no session through {udp}"
        )));
    }
    let opts = UploadOptions {
        max_attempts: 3,
        meta: format!("bench=bulk;path={name}"),
        ..UploadOptions::new(streams)
    };
    let before = cpu(daemons)?;
    let result = upload(Arc::clone(video), &opts, &mut tickets).await;
    let used = cpu(daemons)?.since(before);
    remove_videos(videos);
    let report = result.map_err(|e| BenchError::Daemon(format!("bulk {name}: {e}")))?;
    // The upload's clock starts at its first connection attempt: the SHA-256 of the video is
    // computed before, the session was established before.
    let run = BulkRun {
        mb_per_sec: report.throughput_mb_s,
        secs: report.elapsed_secs,
        bytes: report.bytes,
        attempts: report.attempts,
        intact: report.digest_match,
    };
    progress(format_args!(
        "bulk {name}: {:.0} MB/s ({:.2} s, {} connection(s), SHA-256 {}); CPU gateway {:.2} s, core {:.2} s, device side {:.2} s",
        run.mb_per_sec,
        run.secs,
        run.attempts,
        if run.intact { "matches" } else { "DIFFERS" },
        used.gateway_secs,
        used.core_secs,
        used.bench_secs
    ));
    Ok((run, used))
}

fn cpu(daemons: &daemons::Daemons) -> Result<Cpu, BenchError> {
    let (gateway_secs, core_secs) = daemons.cpu_secs()?;
    let bench_secs = daemons::own_cpu_secs()
        .ok_or_else(|| BenchError::Daemon("no CPU times in /proc/self/stat".into()))?;
    Ok(Cpu {
        gateway_secs,
        core_secs,
        bench_secs,
        total_secs: gateway_secs + core_secs + bench_secs,
    })
}

impl Cpu {
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            gateway_secs: self.gateway_secs - before.gateway_secs,
            core_secs: self.core_secs - before.core_secs,
            bench_secs: self.bench_secs - before.bench_secs,
            total_secs: self.total_secs - before.total_secs,
        }
    }
}

/// Removes the completed videos (`*.video` and their `.json`) under `dir`: the bench does not
/// need them and they would fill the disk. Partial uploads are left alone.
pub(super) fn remove_videos(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            remove_videos(&path);
        } else if path
            .extension()
            .is_some_and(|e| e == "video" || e == "json")
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Seal (device) and open (core) of `bytes` in 64 KiB chunks under stream keys derived from a
/// real session, one thread: nanoseconds per byte for both together.
pub(super) fn crypto_ns_per_byte(bytes: usize) -> Result<f64, BenchError> {
    let noise = |e: relay_protocol::session::SessionError| BenchError::Noise(e.to_string());
    let responder = Responder::new(StaticKeypair::generate().map_err(noise)?);
    let now = Instant::now();
    let mut device = DeviceSession::new(
        StaticKeypair::generate().map_err(noise)?,
        *responder.public(),
    );
    let init = device
        .start_handshake(SessionId(1), 1, now)
        .map_err(noise)?;
    let Ok(DeviceFrame::HandshakeInit { sender, noise: msg }) = DeviceFrame::decode(&init) else {
        return Err(BenchError::Noise("not a HandshakeInit".into()));
    };
    let incoming = responder.read_init(sender, msg).map_err(noise)?;
    let mut response = Vec::new();
    let core_side = incoming
        .accept(
            SessionId(2),
            &ResponsePayload::accept(3600),
            now,
            &mut response,
        )
        .map_err(noise)?;
    let mut plain = Vec::new();
    match device.handle_datagram(&response, now, &mut plain) {
        Ok(DeviceEvent::Established { .. }) => {}
        _ => return Err(BenchError::Noise("the handshake did not complete".into())),
    }
    let device_side = device
        .current()
        .ok_or_else(|| BenchError::Noise("no session".into()))?;
    let (salt, upload) = ([7u8; 16], UploadId([9; 16]));
    let sealer = DeviceStream::new(device_side.stream_keys(&salt, &upload));
    let opener = CoreStream::new(core_side.stream_keys(&salt, &upload));
    let data = crate::video::video_bytes(8, MAX_CHUNK);
    let chunks = bytes.div_ceil(MAX_CHUNK).max(1);
    let mut frame = Vec::with_capacity(MAX_CHUNK + 64);
    let mut opened = Vec::with_capacity(MAX_CHUNK);
    let start = Instant::now();
    for index in 0..chunks {
        frame.clear();
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        sealer
            .seal_chunk(index, false, &data, &mut frame)
            .map_err(|e| BenchError::Noise(e.to_string()))?;
        opener
            .open_chunk(&frame[4..], &mut opened)
            .map_err(|e| BenchError::Noise(e.to_string()))?;
    }
    let elapsed = start.elapsed();
    Ok(elapsed.as_nanos() as f64 / (chunks * MAX_CHUNK) as f64)
}

/// The meters' latency idle, then (other meters) while a camera uploads back to back.
async fn meters_under_stream(
    daemons: &daemons::Daemons,
    core: PublicKey,
    (camera, idle_meters, streaming_meters): (
        DeviceIdentity,
        Vec<DeviceIdentity>,
        Vec<DeviceIdentity>,
    ),
    video: &Arc<[u8]>,
    duration: Duration,
    videos: &Path,
) -> Result<MetersUnderStream, BenchError> {
    let meters = idle_meters.len();
    let fleet = |devices: Vec<DeviceIdentity>| FleetOptions {
        readings_per_device: None,
        interval: LATENCY_INTERVAL,
        payload_bytes: LATENCY_PAYLOAD,
        duration: Some(duration),
        drain_timeout: Duration::from_secs(5),
        meter: MeterConfig::default(),
        latency_warmup: LATENCY_WARMUP,
        ..FleetOptions::new(daemons.gateway_devices, core, devices)
    };
    progress(format_args!(
        "latency: {meters} meters every {} ms via the gateway for {} s, no camera",
        LATENCY_INTERVAL.as_millis(),
        duration.as_secs()
    ));
    let idle = run_fleet(fleet(idle_meters), None).await?;
    let idle = LatencyRun::from(&idle);
    progress(format_args!(
        "latency idle: p50 {} p99 {} ({} acked, {} lost)",
        ms(idle.p50_ms),
        ms(idle.p99_ms),
        idle.acknowledged,
        idle.lost
    ));

    let mut tickets = SessionTickets::connect(camera, core, daemons.gateway_devices, TICKET_WAIT)
        .await
        .map_err(BenchError::io("streaming camera socket"))?;
    if !tickets.establish().await {
        return Err(BenchError::Daemon(
            "latency: the streaming camera got no session through the gateway".into(),
        ));
    }
    let stop = CancellationToken::new();
    // The camera is another device with a CPU of its own: here it shares the bench machine's, so
    // its sealing runs on a thread of its own under SCHED_IDLE, where it takes only what the
    // meters, the gateway and the core leave (as the camera's own CPU would).
    let lane = BulkLane::new("bench-camera", 1, LanePriority::Idle)
        .map_err(BenchError::io("streaming camera thread"))?;
    let camera = {
        let (stop, video, streams) = (stop.clone(), Arc::clone(video), daemons.gateway_streams);
        let videos = videos.to_owned();
        lane.handle().spawn(async move {
            let (mut bytes, mut completed) = (0u64, 0u32);
            while !stop.is_cancelled() {
                let opts = UploadOptions {
                    max_attempts: 3,
                    meta: "bench=latency".into(),
                    shutdown: stop.clone(),
                    ..UploadOptions::new(streams)
                };
                match upload(Arc::clone(&video), &opts, &mut tickets).await {
                    Ok(r) => {
                        bytes += r.chunk_bytes_sent;
                        completed += 1;
                    }
                    Err(UploadError::Interrupted { report }) => {
                        bytes += report.chunk_bytes_sent;
                    }
                    Err(e) => {
                        bytes += e.report().map_or(0, |r| r.chunk_bytes_sent);
                        progress(format_args!("latency: the streaming camera failed: {e}"));
                        break;
                    }
                }
                remove_videos(&videos);
            }
            (bytes, completed)
        })
    };
    tokio::time::sleep(CAMERA_LEAD).await;
    progress(format_args!(
        "latency: {meters} other meters for {} s while a camera uploads at full speed through the gateway",
        duration.as_secs()
    ));
    let started = Instant::now();
    let streaming = run_fleet(fleet(streaming_meters), None).await;
    let secs = started.elapsed().as_secs_f64() + CAMERA_LEAD.as_secs_f64();
    stop.cancel();
    let (camera_bytes, camera_videos) = camera
        .await
        .map_err(|e| BenchError::Daemon(format!("streaming camera: {e}")))?;
    drop(lane);
    remove_videos(videos);
    let streaming = LatencyRun::from(&streaming?);
    let camera_mb_per_sec = camera_bytes as f64 / secs.max(1e-9) / 1e6;
    let p99_ratio = match (streaming.p99_ms, idle.p99_ms) {
        (Some(s), Some(i)) => super::ratio(s, i),
        _ => 0.0,
    };
    progress(format_args!(
        "latency streaming: p50 {} p99 {} ({} acked, {} lost); p99 × {p99_ratio:.2}; the camera sent {:.0} MB ({camera_mb_per_sec:.0} MB/s, {camera_videos} videos)",
        ms(streaming.p50_ms),
        ms(streaming.p99_ms),
        streaming.acknowledged,
        streaming.lost,
        camera_bytes as f64 / 1e6
    ));
    Ok(MetersUnderStream {
        meters,
        interval_ms: u64::try_from(LATENCY_INTERVAL.as_millis()).unwrap_or(u64::MAX),
        secs: duration.as_secs_f64(),
        warmup_secs: LATENCY_WARMUP.as_secs_f64(),
        idle,
        streaming,
        p99_ratio,
        camera_bytes,
        camera_mb_per_sec,
        camera_videos,
    })
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crypto_costs_something_per_byte() {
        let ns = crypto_ns_per_byte(1 << 20).expect("timed");
        assert!(ns > 0.0 && ns.is_finite(), "{ns}");
    }

    #[test]
    fn removes_completed_videos_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = dir.path().join("abcd");
        std::fs::create_dir_all(&device).expect("mkdir");
        for f in ["u1.video", "u1.json", "u2.part", "u2.state"] {
            std::fs::write(device.join(f), b"x").expect("write");
        }
        remove_videos(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(&device)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["u2.part", "u2.state"]);
        remove_videos(&dir.path().join("missing"));
    }
}
