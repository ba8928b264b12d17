//! `device-sim camera`: flags → [`CameraOptions`], a progress line every second during the upload,
//! the summary and the exit code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use relay_protocol::session::PublicKey;
use relay_protocol::stream::UploadId;
use tokio_util::sync::CancellationToken;

use super::{fail, resolve, run_and_print, CliError, EXIT_LOST, EXIT_OK};
use crate::camera::{run_camera, CameraDevice, CameraOptions, CameraProgress, CameraReport};
use crate::config::{load_config, load_fleet};
use crate::device_dir::DeviceDir;
use crate::report::{camera_progress_line, camera_table};
use crate::video::{video_bytes, DEFAULT_CHUNK};

/// `device-sim camera`.
#[derive(Debug, Args)]
pub struct CameraArgs {
    /// `device-sim.toml`: the core's key, the addresses, and the fleet the camera is one of.
    #[arg(long, env = "DEVICE_SIM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With --config: which device of the fleet file, by position (1 = the first line) or by
    /// serial number [default: 1].
    #[arg(long, value_name = "INDEX|SERIAL", requires = "config")]
    pub device: Option<String>,
    /// Instead of --config: a device directory made by `device-sim manufacture` (factory-fresh
    /// or provisioned; a factory-fresh one provisions itself first). Needs --target and
    /// --core-key.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub device_dir: Option<PathBuf>,
    /// The core's static public key (64 hex digits), with --device-dir.
    #[arg(long, env = "DEVICE_SIM_CORE_KEY", value_name = "HEX")]
    pub core_key: Option<String>,
    /// Where status datagrams go (UDP) [default: the config's `gateway`, or `direct` with
    /// --direct].
    #[arg(long, value_name = "ADDR")]
    pub target: Option<String>,
    /// Where the video goes (TCP) [default: the same address as --target when given, else the
    /// config's `gateway_streams`, or `direct_streams` with --direct].
    #[arg(long, value_name = "ADDR")]
    pub stream_target: Option<String>,
    /// Straight to the core (the config's `direct` and `direct_streams` addresses).
    #[arg(long)]
    pub direct: bool,
    /// Seconds between status updates (readings over UDP datagrams).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub status_every: f64,
    /// Bytes per status reading.
    #[arg(long, value_name = "B", default_value_t = 64)]
    pub status_bytes: usize,
    /// Seconds after the start when the accident happens and the video upload starts.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub accident_after: f64,
    /// Size of the generated video (deterministic content from --video-seed).
    #[arg(long, value_name = "N", default_value_t = 8 * 1024 * 1024, conflicts_with = "video_file")]
    pub video_bytes: u64,
    /// Seed of the generated video's content (`device_sim::video::video_bytes`).
    #[arg(long, value_name = "SEED", default_value_t = 1)]
    pub video_seed: u64,
    /// Upload this file instead of generated content.
    #[arg(long, value_name = "PATH")]
    pub video_file: Option<PathBuf>,
    /// Upload at this bitrate at most, in megabits per second (10^6 bits); 0 = full speed.
    #[arg(long, value_name = "MBPS", default_value_t = 0.0)]
    pub bitrate_mbps: f64,
    /// Bytes per chunk (1024..=65536).
    #[arg(long, value_name = "B", default_value_t = DEFAULT_CHUNK)]
    pub chunk_bytes: u32,
    /// Stream connections at most (the first included) before the upload is given up.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_attempts: u32,
    /// How long status updates continue, in seconds [default: until the video is complete,
    /// plus one status update].
    #[arg(long, value_name = "SECS")]
    pub duration_secs: Option<f64>,
    /// After the last status update, how long to wait for its acknowledgement, milliseconds.
    #[arg(long, value_name = "T", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// With chunks unacknowledged, no ack for this long (milliseconds) fails a connection (it
    /// is resumed on a new one).
    #[arg(long, value_name = "T", default_value_t = 30_000)]
    pub ack_timeout_ms: u64,
    /// The upload id (32 hex digits) [default: random]: the same id resumes an upload an
    /// earlier run left unfinished.
    #[arg(long, value_name = "HEX")]
    pub upload_id: Option<String>,
    /// Metadata stored with the video (at most 200 bytes) [default:
    /// `camera=SERIAL;event=accident;unix_ms=T`].
    #[arg(long, value_name = "TEXT")]
    pub meta: Option<String>,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long, env = "DEVICE_SIM_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
}

fn secs(flag: &str, v: f64) -> Result<Duration, CliError> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| CliError::Usage(format!("{flag} {v}: not a number of seconds")))
}

fn upload_id(hex: &str) -> Result<UploadId, CliError> {
    let bad = || CliError::Usage(format!("--upload-id {hex}: expected 32 hex digits"));
    let hex = hex.trim();
    if hex.len() != 32 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(UploadId(id))
}

/// Loads the config (or opens the device directory) and builds the camera's options.
pub fn camera_options(args: &CameraArgs) -> Result<CameraOptions, CliError> {
    let (device, core, target, stream_target) = match (&args.config, &args.device_dir) {
        (Some(path), _) => {
            let config = load_config(path)?;
            let fleet = load_fleet(&config.fleet)?;
            let count = fleet.len();
            let which = args.device.as_deref().unwrap_or("1");
            let identity = match which.parse::<usize>() {
                Ok(0) => None,
                Ok(n) => fleet.into_iter().nth(n - 1),
                Err(_) => fleet.into_iter().find(|d| d.serial == which),
            }
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--device {which}: {} lists {count} devices (give a position from 1, or a serial)",
                    config.fleet.display()
                ))
            })?;
            let target = match &args.target {
                Some(t) => resolve("--target", t)?,
                None if args.direct => config.direct,
                None => config.gateway,
            };
            let stream_target = match (&args.stream_target, &args.target) {
                (Some(s), _) => resolve("--stream-target", s)?,
                (None, Some(_)) => target,
                (None, None) if args.direct => config.direct_streams,
                (None, None) => config.gateway_streams,
            };
            (
                CameraDevice::Fixed(identity),
                config.core_public_key,
                target,
                stream_target,
            )
        }
        (None, Some(dir)) => {
            let target = args.target.as_deref().ok_or_else(|| {
                CliError::Usage("--target HOST:PORT is required with --device-dir".into())
            })?;
            let target = resolve("--target", target)?;
            let stream_target = match &args.stream_target {
                Some(s) => resolve("--stream-target", s)?,
                None => target,
            };
            let core = args.core_key.as_deref().ok_or_else(|| {
                CliError::Usage("--core-key HEX is required with --device-dir".into())
            })?;
            let core = PublicKey::from_hex(core)
                .map_err(|e| CliError::Usage(format!("--core-key: {e}")))?;
            (
                CameraDevice::Element(DeviceDir::open(dir)?),
                core,
                target,
                stream_target,
            )
        }
        (None, None) => {
            return Err(CliError::Usage(
                "give --config FILE (a device of the fleet) or --device-dir DIR".into(),
            ))
        }
    };
    if !(1024..=65_536).contains(&args.chunk_bytes) {
        return Err(CliError::Usage(format!(
            "--chunk-bytes {} is not within 1024..=65536",
            args.chunk_bytes
        )));
    }
    if args.max_attempts == 0 {
        return Err(CliError::Usage("--max-attempts must be at least 1".into()));
    }
    if !args.bitrate_mbps.is_finite() || args.bitrate_mbps < 0.0 {
        return Err(CliError::Usage(format!(
            "--bitrate-mbps {}: not a bitrate",
            args.bitrate_mbps
        )));
    }
    let status_every = secs("--status-every", args.status_every)?;
    if status_every.is_zero() {
        return Err(CliError::Usage("--status-every must be above 0".into()));
    }
    if args.status_bytes > relay_protocol::payload::MAX_READING {
        return Err(CliError::Usage(format!(
            "--status-bytes {} exceeds the maximum of {}",
            args.status_bytes,
            relay_protocol::payload::MAX_READING
        )));
    }
    if args.meta.as_ref().is_some_and(|m| m.len() > 200) {
        return Err(CliError::Usage("--meta is over 200 bytes".into()));
    }
    let video: Arc<[u8]> = match &args.video_file {
        Some(path) => std::fs::read(path)
            .map_err(|e| CliError::Usage(format!("--video-file {}: {e}", path.display())))?
            .into(),
        None => {
            let len = usize::try_from(args.video_bytes)
                .map_err(|_| CliError::Usage("--video-bytes is too large here".into()))?;
            video_bytes(args.video_seed, len).into()
        }
    };
    if video.is_empty() {
        return Err(CliError::Usage("the video is empty".into()));
    }
    Ok(CameraOptions {
        status_every,
        status_bytes: args.status_bytes,
        accident_after: secs("--accident-after", args.accident_after)?,
        upload: args.upload_id.as_deref().map(upload_id).transpose()?,
        meta: args.meta.clone(),
        chunk_size: args.chunk_bytes,
        bitrate_bps: (args.bitrate_mbps * 1e6).round() as u64,
        max_attempts: args.max_attempts,
        ack_timeout: Duration::from_millis(args.ack_timeout_ms.max(1)),
        duration: args
            .duration_secs
            .map(|d| secs("--duration-secs", d))
            .transpose()?,
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        ..CameraOptions::new(device, core, target, stream_target, video)
    })
}

/// Runs `device-sim camera`: exit 0 when the video is stored with a matching digest and every
/// status reading was acknowledged, 1 otherwise, 2 when it could not run.
pub fn camera(args: CameraArgs) -> u8 {
    let json = args.json;
    let opts = match camera_options(&args) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    drop(args);
    match run_and_print(run_with_progress(opts), json, camera_table) {
        Ok(report) if report.ok => EXIT_OK,
        Ok(_) => EXIT_LOST,
        Err(code) => code,
    }
}

/// The camera with SIGINT and SIGTERM wired to its shutdown token and a progress line on stderr
/// every second while the video uploads.
async fn run_with_progress(
    opts: CameraOptions,
) -> Result<CameraReport, crate::camera::CameraError> {
    let shutdown = opts.shutdown.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
            () = terminate => {}
        }
        shutdown.cancel();
    });
    let progress = Arc::new(CameraProgress::default());
    let done = CancellationToken::new();
    let reporter = tokio::spawn(report_progress(progress.clone(), done.clone()));
    let result = run_camera(opts, Some(progress)).await;
    done.cancel();
    let _ = reporter.await;
    result
}

async fn report_progress(progress: Arc<CameraProgress>, done: CancellationToken) {
    let period = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut last = (Instant::now(), 0u64);
    let mut finished = false;
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            _ = ticker.tick() => {
                let status = progress.status();
                let snapshot = progress.upload.snapshot();
                let now = Instant::now();
                let rate = snapshot.sent_bytes.saturating_sub(last.1) as f64
                    / now.saturating_duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, snapshot.sent_bytes);
                if !status.2 || finished {
                    continue;
                }
                finished = snapshot.complete;
                eprintln!("{}", camera_progress_line(&snapshot, status, rate));
            }
        }
    }
}
