//! The fleet runner: N meters on tokio, one task and one UDP socket each, sending readings at an
//! interval to a gateway (or the core's direct port) and waiting for every acknowledgement.
//!
//! ```text
//!  run_fleet ─ spawns per device ─▶ task: UdpSocket (connected to the target) + Meter
//!                                     select { socket.recv ─▶ meter.handle_datagram
//!                                              sleep_until(meter.poll_timeout) ─▶ poll_transmit
//!                                              next reading tick ─▶ meter.queue_reading
//!                                              shutdown }
//!     ◀─ DeviceResult per task ── FleetSummary (counters, latency percentiles, rate)
//!  FleetProgress (atomics) ◀─ each task adds its counter deltas, for a live progress line
//! ```
//!
//! Reading `i` of device `d` has sequence number `seq_base(run start) + i` (see
//! [`crate::meter::seq_base`]; a device with a state file starts at least at its recorded
//! `next_seq`) and body [`crate::meter::reading_payload`]`(serial, seq, size)`. Each meter starts
//! at a random phase within the first interval so the fleet does not send in lockstep, unless
//! [`Waves`] start the devices in bursts.
//!
//! Two kinds of device: pre-provisioned ones ([`FleetOptions::devices`], keys from `fleet.keys`)
//! and devices with a secure element ([`FleetOptions::element_devices`], from `device-sim
//! manufacture`), which provision themselves, follow update notices and releases, and persist
//! their state in their directory. A sleepy device ([`FleetOptions::sleepy`]) wakes, sends one
//! reading, waits for its acknowledgement (and any key switch it brought), and sleeps.
//!
//! A sleepy device with a directory also persists its session there (sealed, see
//! [`crate::device_dir`]) when it goes to sleep, when a new session is established and at the
//! end, each time with a counter lease it renews before half of it is used; a later run resumes
//! a persisted session younger than its rekey time with no handshake (and then keeps it
//! persisted too, sleepy or not), so its first reading is its first datagram. A session file that
//! cannot be resumed is removed.
//!
//! Handovers ([`FleetOptions::moves`], `--move-to ADDR@MS`): at each, every device connects its
//! socket to the new target; the session stays, and readings in flight on the old path are
//! retransmitted on the new one (the core stores each once).
//!
//! Every place a device event is handled also handles the core's cookie challenge: the meter
//! hands out the `CookieInit` as its next datagram ([`crate::meter::MeterStats::cookie_challenges`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::payload::{ReadingSeq, MAX_READING};
use relay_protocol::session::PublicKey;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::DeviceIdentity;
use crate::device_dir::{DeviceDir, DeviceDirError, SESSION_COUNTER_LEASE};
use crate::meter::{
    reading_payload, seq_base, CrashHook, CrashPoint, Meter, MeterConfig, MeterEvent, MeterStats,
    QueueError, RefusalCounts, Timebase,
};
use crate::secure_element::SealedKeyStore;
use relay_protocol::frame::SessionId;
use relay_protocol::payload::DeviceConfig;
use relay_protocol::session::SessionSnapshot;

/// The environment variable naming a [`CrashPoint`] at which a device aborts the process.
pub const CRASH_ENV: &str = "RELAY_CRASH_AT";

/// The device crash point `RELAY_CRASH_AT` names, if it names one (other values, such as the
/// core's points, are not the simulator's).
pub fn crash_point_from_env() -> Option<CrashPoint> {
    std::env::var(CRASH_ENV)
        .ok()
        .and_then(|v| CrashPoint::from_label(v.trim()))
}

/// A handover (`--move-to`): at `at` after the start every device sends to `target` instead, from
/// the same socket, on the same session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// After the start of the run.
    pub at: Duration,
    /// The new target.
    pub target: SocketAddr,
    /// How reports name it (`HOST:PORT` as given).
    pub name: String,
}

/// Activation waves: devices start `size` at a time, `interval` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waves {
    /// Devices per wave (at least 1).
    pub size: usize,
    /// Between the starts of two waves.
    pub interval: Duration,
}

/// What to run. [`FleetOptions::new`] fills in the defaults.
#[derive(Debug)]
pub struct FleetOptions {
    /// Where every meter sends: the gateway's device port or the core's direct port.
    pub target: SocketAddr,
    /// The core's static public key.
    pub core_public_key: PublicKey,
    /// The devices to simulate, one meter each.
    pub devices: Vec<DeviceIdentity>,
    /// Readings per device; `None` for as many as fit in `duration`.
    pub readings_per_device: Option<u64>,
    /// Time between a meter's readings. Zero means as fast as the outbox takes them: a meter
    /// queues whenever its outbox has room (then `readings_per_device` must be set).
    pub interval: Duration,
    /// Size of each reading body, at most [`MAX_READING`].
    pub payload_bytes: usize,
    /// Stop queuing readings this long after the start, even if `readings_per_device` are not all
    /// queued yet. The drain follows.
    pub duration: Option<Duration>,
    /// After a meter's last reading, how long it waits for outstanding acknowledgements.
    pub drain_timeout: Duration,
    /// Each meter's limits and timers (window, outbox cap, retransmission, handshake retry,
    /// silence timeout).
    pub meter: MeterConfig,
    /// Seed for session ids, jitter and phases; random when `None`.
    pub seed: Option<u64>,
    /// Cancelling it stops every meter at once (Ctrl-C); the summary counts what was left.
    pub shutdown: CancellationToken,
    /// Devices with a secure element, run through the credential lifecycle (factory-fresh or
    /// provisioned: their directories decide), after `devices`.
    pub element_devices: Vec<DeviceDir>,
    /// Start the devices in waves instead of spreading them over the first interval.
    pub waves: Option<Waves>,
    /// Sleepy devices: wake this often, send one reading, wait for its acknowledgement, sleep (no
    /// keepalives). `readings_per_device` counts wakes; `interval` is not used.
    pub sleepy: Option<Duration>,
    /// Apply the configuration the core sends (report interval and size) to the readings.
    pub follow_config: bool,
    /// A device passing this point aborts the process (kill tests); see [`crash_point_from_env`].
    pub crash_at: Option<CrashPoint>,
    /// How reports name the target for devices that were not released elsewhere (the `HOST:PORT`
    /// as given) [default: the address].
    pub target_name: Option<String>,
    /// Handovers, in time order: every device switches its target at each.
    pub moves: Vec<Move>,
    /// Readings first sent within this long after the start are left out of the latency
    /// percentiles (they are still counted): the handshakes of a whole fleet crowd the core at
    /// the start, and a measurement of steady-state latency leaves them out.
    pub latency_warmup: Duration,
}

impl FleetOptions {
    /// Ten readings per device, one a second, 64-byte bodies, 30 s drain, default meter limits.
    pub fn new(
        target: SocketAddr,
        core_public_key: PublicKey,
        devices: Vec<DeviceIdentity>,
    ) -> Self {
        Self {
            target,
            core_public_key,
            devices,
            readings_per_device: Some(10),
            interval: Duration::from_secs(1),
            payload_bytes: 64,
            duration: None,
            drain_timeout: Duration::from_secs(30),
            meter: MeterConfig::default(),
            seed: None,
            shutdown: CancellationToken::new(),
            element_devices: Vec::new(),
            waves: None,
            sleepy: None,
            follow_config: false,
            crash_at: None,
            target_name: None,
            moves: Vec::new(),
            latency_warmup: Duration::ZERO,
        }
    }
}

/// Why the fleet could not run: the caller's options or the local system. Nothing a peer does
/// makes a fleet fail; it shows up in the summary.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// No devices given.
    #[error("no devices to simulate")]
    NoDevices,
    /// Neither a reading count nor a duration (with a non-zero interval): the run would not end.
    #[error("give a number of readings, or a duration and a non-zero interval")]
    Unbounded,
    /// The reading body does not fit in one frame.
    #[error("payload of {size} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Requested.
        size: usize,
        /// [`MAX_READING`].
        max: usize,
    },
    /// A meter's socket could not be set up.
    #[error(
        "socket for device {serial}: {source} (many devices need `ulimit -n` above their count)"
    )]
    Socket {
        /// The device.
        serial: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A meter task panicked.
    #[error("meter task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A device directory or its secure element could not be opened.
    #[error(transparent)]
    Device(#[from] DeviceDirError),
    /// A device's key store holds no key at all.
    #[error("device {serial}: {reason}")]
    Keys {
        /// The device.
        serial: String,
        /// Why.
        reason: String,
    },
    /// A released device's endpoint does not resolve.
    #[error("device {serial}: endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The device.
        serial: String,
        /// The endpoint from its state file.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// Live totals over the fleet, updated by every meter task as it goes.
#[derive(Debug, Default)]
pub struct FleetProgress {
    queued: AtomicU64,
    refused: AtomicU64,
    sent: AtomicU64,
    retransmitted: AtomicU64,
    acked: AtomicU64,
    handshakes: AtomicU64,
    bad_datagrams: AtomicU64,
    devices_done: AtomicU64,
    provisionings: AtomicU64,
    refusals: AtomicU64,
}

/// A copy of [`FleetProgress`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    /// Readings queued.
    pub queued: u64,
    /// Readings refused (outbox full).
    pub refused: u64,
    /// First transmissions.
    pub sent: u64,
    /// Retransmissions.
    pub retransmitted: u64,
    /// Readings acknowledged.
    pub acked: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Datagrams dropped as bad.
    pub bad_datagrams: u64,
    /// Meters finished.
    pub devices_done: u64,
    /// Provisionings completed.
    pub provisionings: u64,
    /// Handshakes refused.
    pub refusals: u64,
}

impl ProgressSnapshot {
    /// Readings sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.acked)
    }
}

impl FleetProgress {
    /// The totals now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            queued: get(&self.queued),
            refused: get(&self.refused),
            sent: get(&self.sent),
            retransmitted: get(&self.retransmitted),
            acked: get(&self.acked),
            handshakes: get(&self.handshakes),
            bad_datagrams: get(&self.bad_datagrams),
            devices_done: get(&self.devices_done),
            provisionings: get(&self.provisionings),
            refusals: get(&self.refusals),
        }
    }

    fn add(&self, now: &MeterStats, before: &MeterStats) {
        let add = |a: &AtomicU64, new: u64, old: u64| {
            if new > old {
                a.fetch_add(new - old, Ordering::Relaxed);
            }
        };
        add(&self.queued, now.queued, before.queued);
        add(&self.refused, now.refused, before.refused);
        add(&self.sent, now.sent, before.sent);
        add(&self.retransmitted, now.retransmitted, before.retransmitted);
        add(&self.acked, now.acked, before.acked);
        add(&self.handshakes, now.handshakes, before.handshakes);
        add(&self.bad_datagrams, now.bad_datagrams, before.bad_datagrams);
        add(&self.provisionings, now.provisionings, before.provisionings);
        add(&self.refusals, now.refusals, before.refusals);
    }
}

/// One device's outcome.
#[derive(Clone, Debug)]
pub struct DeviceResult {
    /// The device's serial number.
    pub serial: String,
    /// The device's static public key (how the core knows it).
    pub public_key: PublicKey,
    /// The meter's counters at the end.
    pub stats: MeterStats,
    /// Every reading acknowledged, in acknowledgement order.
    pub acked: Vec<ReadingSeq>,
    /// Every reading queued but never acknowledged, in ascending order.
    pub unacked: Vec<ReadingSeq>,
    /// Send or receive errors on the device's socket (ICMP unreachable and the like).
    pub socket_errors: u64,
    /// A device with a secure element (run through the lifecycle).
    pub element: bool,
    /// It holds a subscription key at the end (always, for a pre-provisioned device).
    pub provisioned: bool,
    /// It ended with a working session: established with its subscription (or pre-provisioned)
    /// key, no refusal since.
    pub working: bool,
    /// The configuration in force at the end.
    pub config: Option<DeviceConfig>,
    /// Where it sent at the end (`HOST:PORT`).
    pub endpoint: String,
    /// The core key it trusted at the end.
    pub core_public_key: PublicKey,
    /// It started from the session persisted in its directory.
    pub resumed: bool,
    /// Times its session was written to its directory (each with a fresh counter lease).
    pub session_writes: u64,
}

/// The fleet's totals. `lost` is what was queued and never acknowledged; `refused` readings never
/// entered an outbox (it was full) and are not in `queued`.
#[derive(Clone, Debug, Serialize)]
pub struct FleetSummary {
    /// Meters run.
    pub devices: usize,
    /// Readings queued.
    pub queued: u64,
    /// First transmissions.
    pub sent: u64,
    /// Readings acknowledged.
    pub acknowledged: u64,
    /// Retransmissions.
    pub retransmitted: u64,
    /// Datagrams the devices sent, of every kind (handshakes, readings, retransmissions).
    pub frames_sent: u64,
    /// `queued - acknowledged` at the end.
    pub lost: u64,
    /// Readings refused because a meter's outbox was full.
    pub refused: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Handshake initiations sent, retries included.
    pub handshake_attempts: u64,
    /// Datagrams dropped as forged, altered, replayed, stale or malformed.
    pub bad_datagrams: u64,
    /// Socket send or receive errors.
    pub socket_errors: u64,
    /// Median first send → acknowledgement, in milliseconds (`null` without acknowledgements).
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile, in milliseconds.
    pub latency_p99_ms: Option<f64>,
    /// Worst, in milliseconds.
    pub latency_max_ms: Option<f64>,
    /// From the start to the last meter finishing, in seconds.
    pub elapsed_secs: f64,
    /// `acknowledged / elapsed_secs`.
    pub acknowledged_per_sec: f64,
    /// Whether the run was cut short by the shutdown token.
    pub interrupted: bool,
    /// Lifecycle totals, when devices with a secure element ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<LifecycleTotals>,
    /// One report per device with a secure element (serialized as `per_device`).
    #[serde(rename = "per_device", skip_serializing_if = "Vec::is_empty")]
    pub device_reports: Vec<DeviceReport>,
    /// Per-device outcomes, for tests (not serialized).
    #[serde(skip)]
    pub per_device: Vec<DeviceResult>,
}

/// The lifecycle over the devices with a secure element.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LifecycleTotals {
    /// Devices with a secure element.
    pub devices: usize,
    /// Of them, holding a subscription key at the end.
    pub provisioned: usize,
    /// Of them, with a working subscription at the end.
    pub working: usize,
    /// Of them, without a working subscription at the end.
    pub without_subscription: usize,
    /// Provisionings completed (factory identity → subscription key).
    pub provisionings: u64,
    /// Credential updates completed.
    pub key_updates: u64,
    /// Configurations applied.
    pub config_updates: u64,
    /// Releases followed.
    pub releases: u64,
    /// Refusals by reason.
    pub refusals: RefusalCounts,
}

/// A configuration as reports show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigReport {
    /// The profile version.
    pub version: u32,
    /// Seconds between reports.
    pub report_interval_secs: u32,
    /// Bytes per report.
    pub report_bytes: u16,
    /// Early-report threshold.
    pub threshold: u32,
}

impl From<DeviceConfig> for ConfigReport {
    fn from(c: DeviceConfig) -> Self {
        Self {
            version: c.version,
            report_interval_secs: c.report_interval_secs,
            report_bytes: c.report_bytes,
            threshold: c.threshold,
        }
    }
}

/// One device with a secure element, as `--json` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    /// The serial number.
    pub serial: String,
    /// It holds a subscription key.
    pub provisioned: bool,
    /// It ended with a working subscription.
    pub working: bool,
    /// Provisionings completed during the run.
    pub provisionings: u64,
    /// Credential updates completed during the run.
    pub key_updates: u64,
    /// The configuration in force (`null`: none received yet).
    pub config: Option<ConfigReport>,
    /// Readings acknowledged.
    pub readings_acknowledged: u64,
    /// Readings queued and never acknowledged.
    pub readings_lost: u64,
    /// Datagrams it sent, of every kind (handshake initiations, readings, retransmissions).
    pub frames_sent: u64,
    /// Handshakes completed during the run.
    pub handshakes: u64,
    /// Handshake initiations sent, retries and cookie echoes included.
    pub handshakes_started: u64,
    /// Cookie challenges the core answered its handshakes with.
    pub cookie_challenges: u64,
    /// It started from the session persisted in its directory (no handshake needed).
    pub resumed: bool,
    /// Refusals by reason.
    pub refusals: RefusalCounts,
    /// Where it sends (`HOST:PORT`).
    pub endpoint: String,
    /// The core key it trusts (hex).
    pub core_public_key: String,
}

impl From<&DeviceResult> for DeviceReport {
    fn from(d: &DeviceResult) -> Self {
        Self {
            serial: d.serial.clone(),
            provisioned: d.provisioned,
            working: d.working,
            provisionings: d.stats.provisionings,
            key_updates: d.stats.key_updates,
            config: d.config.map(ConfigReport::from),
            readings_acknowledged: d.stats.acked,
            readings_lost: d.unacked.len() as u64,
            frames_sent: d.stats.frames_sent,
            handshakes: d.stats.handshakes,
            handshakes_started: d.stats.handshakes_started,
            cookie_challenges: d.stats.cookie_challenges,
            resumed: d.resumed,
            refusals: d.stats.refusals_by_reason,
            endpoint: d.endpoint.clone(),
            core_public_key: d.core_public_key.to_hex(),
        }
    }
}

/// What one meter task needs besides its meter and socket.
struct Plan {
    first_reading: Instant,
    interval: Duration,
    readings: Option<u64>,
    readings_end: Option<Instant>,
    payload_bytes: usize,
    drain_timeout: Duration,
    outbox_cap: usize,
    sleepy: Option<Duration>,
    follow_config: bool,
    shutdown: CancellationToken,
    progress: Option<Arc<FleetProgress>>,
}

struct MeterOutcome {
    result: DeviceResult,
    latencies: Vec<Duration>,
}

/// A device ready to run: its identity opened, its target resolved.
enum Prepared {
    Fixed(DeviceIdentity),
    Element {
        dir: DeviceDir,
        store: Arc<crate::secure_element::SealedKeyStore>,
    },
}

impl Prepared {
    fn serial(&self) -> &str {
        match self {
            Self::Fixed(d) => &d.serial,
            Self::Element { dir, .. } => dir.serial(),
        }
    }
}

/// Runs the fleet to the end: every reading queued and then acknowledged or given up on at the
/// drain timeout, or until `opts.shutdown` is cancelled. `progress`, if given, is kept current.
pub async fn run_fleet(
    opts: FleetOptions,
    progress: Option<Arc<FleetProgress>>,
) -> Result<FleetSummary, FleetError> {
    if opts.devices.is_empty() && opts.element_devices.is_empty() {
        return Err(FleetError::NoDevices);
    }
    let bounded_by_time = opts.duration.is_some()
        && (!opts.interval.is_zero() || opts.sleepy.is_some_and(|w| !w.is_zero()));
    if opts.readings_per_device.is_none() && !bounded_by_time {
        return Err(FleetError::Unbounded);
    }
    if opts.payload_bytes > MAX_READING {
        return Err(FleetError::PayloadTooLarge {
            size: opts.payload_bytes,
            max: MAX_READING,
        });
    }
    let default_endpoint = opts
        .target_name
        .clone()
        .unwrap_or_else(|| opts.target.to_string());
    let mut prepared: Vec<(Prepared, SocketAddr, String)> =
        Vec::with_capacity(opts.devices.len() + opts.element_devices.len());
    for d in opts.devices {
        prepared.push((Prepared::Fixed(d), opts.target, default_endpoint.clone()));
    }
    // Every key store and endpoint first, so that a setup failure is reported before any
    // traffic.
    for dir in opts.element_devices {
        let store = Arc::new(dir.open_store()?);
        let (target, endpoint) = match dir.memory().release {
            None => (opts.target, default_endpoint.clone()),
            Some(r) => (
                resolve(&r.endpoint)
                    .await
                    .map_err(|reason| FleetError::Endpoint {
                        serial: dir.serial().to_owned(),
                        endpoint: r.endpoint.clone(),
                        reason,
                    })?,
                r.endpoint,
            ),
        };
        prepared.push((Prepared::Element { dir, store }, target, endpoint));
    }
    let mut sockets = Vec::with_capacity(prepared.len());
    for (device, target, _) in &prepared {
        let socket = connect(*target)
            .await
            .map_err(|source| FleetError::Socket {
                serial: device.serial().to_owned(),
                source,
            })?;
        sockets.push(socket);
    }

    let start = Instant::now();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let timebase = Timebase::new(start, unix_ms);
    let base = seq_base(unix_ms);
    let mut rng = StdRng::seed_from_u64(opts.seed.unwrap_or_else(rand::random));
    let readings_end = opts.duration.map(|d| start + d);
    let devices = prepared.len();
    let pace = opts.sleepy.unwrap_or(opts.interval);

    let mut tasks = tokio::task::JoinSet::new();
    for (index, ((device, _, endpoint), socket)) in prepared.into_iter().zip(sockets).enumerate() {
        let phase = match opts.waves {
            Some(w) => w.interval * u32::try_from(index / w.size.max(1)).unwrap_or(u32::MAX),
            None if pace.is_zero() => Duration::ZERO,
            None => pace.mul_f64(rng.gen_range(0.0..1.0)),
        };
        let seed = rng.gen();
        let (meter, dir, seq_base) = match device {
            Prepared::Fixed(identity) => (
                Meter::new(
                    identity.serial,
                    identity.keypair,
                    opts.core_public_key,
                    opts.meter.clone(),
                    timebase,
                    seed,
                ),
                None,
                base,
            ),
            Prepared::Element { dir, store } => {
                let meter = Meter::with_element(
                    dir.serial(),
                    Arc::clone(&store) as Arc<dyn relay_protocol::secure_element::SecureElement>,
                    opts.core_public_key,
                    dir.memory(),
                    opts.meter.clone(),
                    timebase,
                    seed,
                )
                .map_err(|e| FleetError::Keys {
                    serial: dir.serial().to_owned(),
                    reason: e.to_string(),
                })?;
                let seq_base = base.max(dir.state().next_seq);
                (meter, Some((dir, store)), seq_base)
            }
        };
        let mut meter = meter;
        if let Some(point) = opts.crash_at {
            meter.set_crash_hook(CrashHook::new(move |at| {
                if at == point {
                    eprintln!("{CRASH_ENV}={point}: aborting");
                    std::process::abort();
                }
                false
            }));
        }
        let plan = Plan {
            first_reading: start + phase,
            interval: opts.interval,
            readings: opts.readings_per_device,
            readings_end,
            payload_bytes: opts.payload_bytes,
            drain_timeout: opts.drain_timeout,
            outbox_cap: opts.meter.outbox_cap,
            sleepy: opts.sleepy,
            follow_config: opts.follow_config,
            shutdown: opts.shutdown.clone(),
            progress: progress.clone(),
        };
        let moves = opts
            .moves
            .iter()
            .map(|m| (start + m.at, m.target, m.name.clone()))
            .collect();
        let (dir, store) = dir.unzip();
        let mut driver = Driver {
            meter,
            socket,
            dir,
            store,
            persist_session: false,
            lease_mark: None,
            session_writes: 0,
            moves,
            resumed: false,
            endpoint,
            seq_base,
            queued: 0,
            acked: Vec::new(),
            latencies: Vec::new(),
            socket_errors: 0,
            reported: MeterStats::default(),
            buf: vec![0u8; MAX_DATAGRAM + 1],
            progress: plan.progress.clone(),
            config_change: None,
            latency_from: start + opts.latency_warmup,
        };
        driver.resume(opts.sleepy.is_some(), start);
        tasks.spawn(async move { (index, run_meter(driver, plan).await) });
    }

    let mut outcomes: Vec<Option<MeterOutcome>> = (0..devices).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, outcome) = joined?;
        outcomes[index] = Some(outcome);
    }
    let elapsed = start.elapsed();
    Ok(summarize(
        outcomes.into_iter().flatten().collect(),
        elapsed,
        opts.shutdown.is_cancelled(),
    ))
}

/// `HOST:PORT` to its first address.
async fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address".to_owned())
}

/// A UDP socket connected to `target`, bound to the loopback address for a loopback target (so
/// tests and single-host runs never listen on the network), else to the unspecified address.
pub(crate) async fn connect(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let ip = match (target.ip(), target.ip().is_loopback()) {
        (IpAddr::V4(_), true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (IpAddr::V6(_), true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        (IpAddr::V4(_), false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (IpAddr::V6(_), false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    socket.connect(target).await?;
    Ok(socket)
}

/// One meter's I/O: its socket, its directory, what it saw.
struct Driver {
    meter: Meter,
    socket: UdpSocket,
    /// A device with a secure element keeps its state here.
    dir: Option<DeviceDir>,
    /// Its secure element, which also seals the persisted session.
    store: Option<Arc<SealedKeyStore>>,
    /// Keep the session persisted in the directory (a sleepy device, or one that resumed).
    persist_session: bool,
    /// The persisted session's id and the send counter at which its lease is half used: the
    /// session is written again before it sends with that counter.
    lease_mark: Option<(SessionId, u64)>,
    /// Session writes so far.
    session_writes: u64,
    /// Handovers still to come: when, where to, its name.
    moves: std::collections::VecDeque<(Instant, SocketAddr, String)>,
    /// The meter started from a persisted session.
    resumed: bool,
    endpoint: String,
    seq_base: u64,
    /// Readings queued so far (reading `i` has sequence number `seq_base + i`).
    queued: u64,
    acked: Vec<ReadingSeq>,
    latencies: Vec<Duration>,
    socket_errors: u64,
    reported: MeterStats,
    buf: Vec<u8>,
    progress: Option<Arc<FleetProgress>>,
    /// A configuration arrived that the pacer may follow.
    config_change: Option<DeviceConfig>,
    /// Only readings first sent from here on count towards the latencies.
    latency_from: Instant,
}

/// How a wait ended.
enum Woke {
    Datagram,
    Timer,
    Shutdown,
}

impl Driver {
    fn serial(&self) -> &str {
        self.meter.serial()
    }

    /// Queues the next reading at `now`.
    fn queue(&mut self, payload_bytes: usize, now: Instant) {
        let seq = self.seq_base + self.queued;
        self.queued += 1;
        let data = reading_payload(self.meter.serial(), seq, payload_bytes);
        match self.meter.queue_reading(ReadingSeq(seq), data, now) {
            // A full outbox is counted by the meter (and in the summary as refused).
            Ok(()) | Err(QueueError::OutboxFull { .. }) => {}
            Err(e) => tracing::warn!(serial = %self.serial(), error = %e, "reading not queued"),
        }
    }

    /// Sends what the meter has to send and handles its events (a release re-targets the
    /// socket before the handshake with the new core goes out).
    async fn flush(&mut self, now: Instant) {
        self.handover(now).await;
        self.drain_events().await;
        loop {
            while let Some(datagram) = self.meter.poll_transmit(now) {
                self.renew_lease(now);
                if let Err(e) = self.socket.send(&datagram).await {
                    // Lost like any datagram: retransmission covers it.
                    self.socket_errors += 1;
                    tracing::debug!(serial = %self.serial(), error = %e, "send failed");
                }
            }
            if !self.drain_events().await {
                break;
            }
        }
        if let Some(p) = &self.progress {
            p.add(self.meter.stats(), &self.reported);
            self.reported = *self.meter.stats();
        }
    }

    /// Handles the meter's events; `true` if there were any.
    async fn drain_events(&mut self) -> bool {
        let mut any = false;
        while let Some(event) = self.meter.poll_event() {
            any = true;
            let serial = self.meter.serial().to_owned();
            match event {
                MeterEvent::Acked { seq, latency } => {
                    self.acked.push(seq);
                    let first_sent = Instant::now().checked_sub(latency);
                    if first_sent.is_none_or(|t| t >= self.latency_from) {
                        self.latencies.push(latency);
                    }
                }
                MeterEvent::Established { rekey_after } => {
                    tracing::debug!(%serial, ?rekey_after, "session established");
                    if self.persist_session {
                        self.save_session(Instant::now());
                    }
                }
                MeterEvent::Refused { reason, slot } => {
                    tracing::debug!(%serial, reason = reason.label(), ?slot, "handshake refused");
                }
                MeterEvent::KeyAccepted { provisioning } => {
                    tracing::debug!(%serial, provisioning, "the core accepted the new key");
                }
                MeterEvent::KeyCommitted { provisioning } => {
                    tracing::debug!(%serial, provisioning, "new subscription key committed");
                }
                MeterEvent::ConfigApplied(config) => {
                    tracing::debug!(%serial, version = config.version, "configuration applied");
                    self.config_change = Some(config);
                }
                MeterEvent::Released { endpoint } => self.retarget(endpoint).await,
                MeterEvent::StateChanged => self.persist(),
            }
        }
        any
    }

    /// Writes the device's state file (devices with a secure element).
    fn persist(&mut self) {
        let next_seq = self.seq_base + self.queued;
        let memory = self.meter.memory();
        if let Some(dir) = self.dir.as_mut() {
            if let Err(e) = dir.save(&memory, next_seq) {
                tracing::warn!(serial = %self.meter.serial(), error = %e, "cannot save state");
            }
        }
    }

    /// Resumes the session persisted in the device's directory, if there is one it may resume
    /// (younger than its rekey time, no key switch under way), and from then on keeps it
    /// persisted; a sleepy device keeps its session persisted in any case. A session file that
    /// cannot be resumed is removed.
    fn resume(&mut self, sleepy: bool, now: Instant) {
        let (Some(dir), Some(store)) = (&self.dir, &self.store) else {
            return;
        };
        let serial = dir.serial().to_owned();
        let loaded = match dir.load_session(store) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(%serial, error = %e, "persisted session unreadable; removed");
                None
            }
        };
        if let Some(mut bytes) = loaded {
            let snapshot = SessionSnapshot::decode(&bytes);
            bytes.fill(0);
            match snapshot {
                Ok(snapshot) => self.resumed = self.meter.resume_session(&snapshot, now),
                Err(e) => tracing::warn!(%serial, error = %e, "persisted session malformed"),
            }
            if self.resumed {
                tracing::debug!(%serial, "resumed the persisted session");
            }
        }
        self.persist_session = sleepy || self.resumed;
        if self.resumed {
            // A fresh lease before the first frame on the resumed session.
            self.save_session(now);
        } else if let Some(store) = &self.store {
            if let Some(dir) = &self.dir {
                if let Err(e) = dir.forget_session(store) {
                    tracing::warn!(%serial, error = %e, "cannot remove the persisted session");
                }
            }
        }
    }

    /// Writes the current session to the directory with a fresh counter lease, or removes the
    /// file when there is no session to resume. If the write fails the file is removed, so that
    /// no later run resumes with counters this one has used.
    fn save_session(&mut self, now: Instant) {
        let (Some(dir), Some(store)) = (&self.dir, &self.store) else {
            return;
        };
        let serial = dir.serial();
        self.lease_mark = None;
        let snapshot = self.meter.session_snapshot(SESSION_COUNTER_LEASE, now);
        let counter = self.meter.session_counter();
        if let (Some(snapshot), Some((id, sent))) = (snapshot, counter) {
            let mut bytes = snapshot.encode();
            let saved = dir.save_session(store, &bytes);
            bytes.fill(0);
            match saved {
                Ok(()) => {
                    self.lease_mark = Some((id, sent.saturating_add(SESSION_COUNTER_LEASE / 2)));
                    self.session_writes += 1;
                    return;
                }
                Err(e) => tracing::warn!(%serial, error = %e, "cannot persist the session"),
            }
        }
        if let Err(e) = dir.forget_session(store) {
            tracing::warn!(%serial, error = %e, "cannot remove the persisted session");
        }
    }

    /// Writes the persisted session again once half its counter lease is used.
    fn renew_lease(&mut self, now: Instant) {
        if let (Some((id, mark)), Some((current, sent))) =
            (self.lease_mark, self.meter.session_counter())
        {
            if id == current && sent >= mark {
                self.save_session(now);
            }
        }
    }

    /// A release: from now on the device talks to `endpoint`.
    async fn retarget(&mut self, endpoint: String) {
        let serial = self.meter.serial().to_owned();
        let socket = match resolve(&endpoint).await {
            Ok(addr) => connect(addr).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match socket {
            Ok(socket) => {
                tracing::info!(%serial, %endpoint, "released: now sending to the new core");
                self.socket = socket;
                self.endpoint = endpoint;
            }
            Err(e) => {
                self.socket_errors += 1;
                tracing::warn!(%serial, %endpoint, error = %e, "cannot reach the new core");
            }
        }
    }

    /// Handovers due by `now`: the same socket, connected to the new target (datagrams from the
    /// old one are no longer received; what was in flight there is retransmitted on the new path).
    async fn handover(&mut self, now: Instant) {
        while self.moves.front().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, target, name)) = self.moves.pop_front() else {
                break;
            };
            match self.socket.connect(target).await {
                Ok(()) => {
                    tracing::debug!(serial = %self.meter.serial(), %name, "handover");
                    self.endpoint = name;
                }
                Err(e) => {
                    self.socket_errors += 1;
                    tracing::warn!(serial = %self.meter.serial(), %name, error = %e, "handover failed");
                }
            }
        }
    }

    /// Waits for a datagram (handled), `wake`, the next handover, or the shutdown.
    async fn wait(&mut self, wake: Option<Instant>, shutdown: &CancellationToken) -> Woke {
        let wake = [wake, self.moves.front().map(|(at, _, _)| *at)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => Woke::Shutdown,
            received = self.socket.recv(&mut self.buf) => {
                match received {
                    Ok(n) => {
                        if let Err(e) = self.meter.handle_datagram(&self.buf[..n], Instant::now()) {
                            tracing::debug!(
                                serial = %self.meter.serial(),
                                reason = e.reason(),
                                "bad datagram dropped"
                            );
                        }
                    }
                    Err(e) => {
                        // ECONNREFUSED from an earlier ICMP error, typically: the target is not
                        // up.
                        self.socket_errors += 1;
                        tracing::debug!(serial = %self.meter.serial(), error = %e, "receive failed");
                    }
                }
                Woke::Datagram
            }
            _ = sleep_until(wake), if wake.is_some() => Woke::Timer,
        }
    }

    fn finish(mut self) -> MeterOutcome {
        if let Some(p) = &self.progress {
            p.add(self.meter.stats(), &self.reported);
            p.devices_done.fetch_add(1, Ordering::Relaxed);
        }
        self.persist();
        if self.persist_session {
            self.save_session(Instant::now());
        }
        let mut unacked: Vec<ReadingSeq> = self.meter.unacked().collect();
        unacked.sort();
        MeterOutcome {
            result: DeviceResult {
                serial: self.meter.serial().to_owned(),
                public_key: *self.meter.public(),
                stats: *self.meter.stats(),
                acked: self.acked,
                unacked,
                socket_errors: self.socket_errors,
                element: self.dir.is_some(),
                provisioned: self.meter.is_provisioned(),
                working: self.meter.has_working_session(),
                config: self.meter.device_config().copied(),
                endpoint: self.endpoint,
                core_public_key: *self.meter.core(),
                resumed: self.resumed,
                session_writes: self.session_writes,
            },
            latencies: self.latencies,
        }
    }
}

async fn run_meter(mut driver: Driver, plan: Plan) -> MeterOutcome {
    // Nothing at all before the meter's phase (or wave): its first handshake is spread out too.
    tokio::select! {
        _ = plan.shutdown.cancelled() => {}
        _ = tokio::time::sleep_until(plan.first_reading.into()) => {}
    }
    match plan.sleepy {
        Some(wake_every) => run_sleepy(&mut driver, &plan, wake_every).await,
        None => run_streaming(&mut driver, &plan).await,
    }
    driver.finish()
}

/// Readings at the interval, the session kept up throughout.
async fn run_streaming(driver: &mut Driver, plan: &Plan) {
    let mut payload_bytes = plan.payload_bytes;
    let mut pacer = Pacer {
        next: plan.first_reading,
        index: 0,
        interval: plan.interval,
        limit: plan.readings,
        end: plan.readings_end,
        drain_timeout: plan.drain_timeout,
        outbox_cap: plan.outbox_cap,
        stalled_since: None,
        drain_deadline: None,
    };
    loop {
        if plan.shutdown.is_cancelled() {
            break;
        }
        let now = Instant::now();
        while pacer.next_due(now, driver.meter.outstanding()).is_some() {
            driver.queue(payload_bytes, now);
        }
        driver.flush(now).await;
        if let Some(config) = driver.config_change.take().filter(|_| plan.follow_config) {
            if config.report_interval_secs > 0 {
                pacer.interval = Duration::from_secs(u64::from(config.report_interval_secs));
            }
            payload_bytes = usize::from(config.report_bytes).min(MAX_READING);
        }

        if pacer
            .drain_deadline
            .is_some_and(|d| driver.meter.outstanding() == 0 || now >= d)
        {
            break;
        }
        let wake = [
            driver.meter.poll_timeout(),
            pacer.wake(driver.meter.outstanding()),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Woke::Shutdown = driver.wait(wake, &plan.shutdown).await {
            break;
        }
    }
}

/// A sleepy device: wake, one reading, stay awake until it is acknowledged and nothing else is
/// under way (a key switch the acknowledgement announced, say) or the drain timeout, sleep.
async fn run_sleepy(driver: &mut Driver, plan: &Plan, wake_every: Duration) {
    let mut next_wake = plan.first_reading;
    let mut wakes = 0u64;
    'life: loop {
        if plan.readings.is_some_and(|n| wakes >= n)
            || plan.readings_end.is_some_and(|end| next_wake >= end)
        {
            break;
        }
        tokio::select! {
            _ = plan.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next_wake.into()) => {}
        }
        wakes += 1;
        let woke = Instant::now();
        driver.queue(plan.payload_bytes, woke);
        let awake_until = woke + plan.drain_timeout;
        loop {
            let now = Instant::now();
            driver.flush(now).await;
            if driver.meter.is_idle() || now >= awake_until {
                break;
            }
            let wake = [driver.meter.poll_timeout(), Some(awake_until)]
                .into_iter()
                .flatten()
                .min();
            if let Woke::Shutdown = driver.wait(wake, &plan.shutdown).await {
                break 'life;
            }
        }
        driver.config_change = None;
        // Going to sleep: the session goes to the directory, to survive a restart.
        if driver.persist_session {
            driver.save_session(Instant::now());
        }
        next_wake = (next_wake + wake_every).max(Instant::now());
    }
}

/// When a meter's readings are due, and when it stops queuing them.
struct Pacer {
    next: Instant,
    index: u64,
    interval: Duration,
    limit: Option<u64>,
    end: Option<Instant>,
    drain_timeout: Duration,
    outbox_cap: usize,
    /// Zero interval only: since when the outbox has been full.
    stalled_since: Option<Instant>,
    /// Set once the last reading is queued: when the meter stops waiting for acknowledgements.
    drain_deadline: Option<Instant>,
}

impl Pacer {
    /// The index of the reading to queue at `now`, if one is due. With a zero interval a full
    /// outbox holds readings back; if it stays full for the drain timeout the meter gives up.
    fn next_due(&mut self, now: Instant, outstanding: usize) -> Option<u64> {
        if self.drain_deadline.is_some() {
            return None;
        }
        let stalled_out = self
            .stalled_since
            .is_some_and(|t| now >= t + self.drain_timeout);
        let done = self.limit.is_some_and(|n| self.index >= n)
            || self.end.is_some_and(|end| self.next >= end || now >= end);
        if done || stalled_out {
            // A stalled meter has waited its drain already.
            self.drain_deadline = Some(if stalled_out {
                now
            } else {
                now + self.drain_timeout
            });
            return None;
        }
        if self.held_back(outstanding) {
            self.stalled_since.get_or_insert(now);
            return None;
        }
        self.stalled_since = None;
        if self.next > now {
            return None;
        }
        let index = self.index;
        self.index += 1;
        self.next += self.interval;
        Some(index)
    }

    /// With a zero interval the outbox is the pace: a full one holds the next reading back (an
    /// ack wakes the task) instead of refusing it.
    fn held_back(&self, outstanding: usize) -> bool {
        self.interval.is_zero() && outstanding >= self.outbox_cap
    }

    /// When [`Pacer::next_due`] may next have something to say.
    fn wake(&self, outstanding: usize) -> Option<Instant> {
        if self.drain_deadline.is_some() {
            return self.drain_deadline;
        }
        let next = if self.held_back(outstanding) {
            self.stalled_since.map(|t| t + self.drain_timeout)
        } else {
            Some(self.next)
        };
        match (next, self.end) {
            (Some(n), Some(end)) => Some(n.min(end)),
            (n, end) => n.or(end),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

fn summarize(outcomes: Vec<MeterOutcome>, elapsed: Duration, interrupted: bool) -> FleetSummary {
    let mut latencies: Vec<Duration> = Vec::new();
    let mut per_device = Vec::with_capacity(outcomes.len());
    let mut total = MeterStats::default();
    let mut socket_errors = 0;
    for o in outcomes {
        latencies.extend(o.latencies);
        let s = &o.result.stats;
        total.queued += s.queued;
        total.refused += s.refused;
        total.sent += s.sent;
        total.retransmitted += s.retransmitted;
        total.frames_sent += s.frames_sent;
        total.acked += s.acked;
        total.handshakes += s.handshakes;
        total.handshakes_started += s.handshakes_started;
        total.bad_datagrams += s.bad_datagrams;
        socket_errors += o.result.socket_errors;
        per_device.push(o.result);
    }
    latencies.sort();
    let element: Vec<&DeviceResult> = per_device.iter().filter(|d| d.element).collect();
    let lifecycle = (!element.is_empty()).then(|| {
        let mut t = LifecycleTotals {
            devices: element.len(),
            ..LifecycleTotals::default()
        };
        for d in &element {
            t.provisioned += usize::from(d.provisioned);
            t.working += usize::from(d.working);
            t.provisionings += d.stats.provisionings;
            t.key_updates += d.stats.key_updates;
            t.config_updates += d.stats.config_updates;
            t.releases += d.stats.releases;
            t.refusals.merge(&d.stats.refusals_by_reason);
        }
        t.without_subscription = t.devices - t.working;
        t
    });
    let device_reports = element.into_iter().map(DeviceReport::from).collect();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let secs = elapsed.as_secs_f64();
    FleetSummary {
        devices: per_device.len(),
        queued: total.queued,
        sent: total.sent,
        acknowledged: total.acked,
        retransmitted: total.retransmitted,
        frames_sent: total.frames_sent,
        lost: total.queued.saturating_sub(total.acked),
        refused: total.refused,
        handshakes: total.handshakes,
        handshake_attempts: total.handshakes_started,
        bad_datagrams: total.bad_datagrams,
        socket_errors,
        latency_p50_ms: percentile(&latencies, 50.0).map(ms),
        latency_p99_ms: percentile(&latencies, 99.0).map(ms),
        latency_max_ms: latencies.last().map(ms),
        elapsed_secs: secs,
        acknowledged_per_sec: if secs > 0.0 {
            total.acked as f64 / secs
        } else {
            0.0
        },
        interrupted,
        lifecycle,
        device_reports,
        per_device,
    }
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Option<&Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1)
}

#[cfg(test)]
mod tests;
