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
//! [`crate::meter::seq_base`]) and body [`crate::meter::reading_payload`]`(serial, seq, size)`.
//! Each meter starts at a random phase within the first interval so the fleet does not send in
//! lockstep.

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
use crate::meter::{
    reading_payload, seq_base, Meter, MeterConfig, MeterEvent, MeterStats, QueueError, Timebase,
};

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
    /// Per-device outcomes, for tests (not serialized).
    #[serde(skip)]
    pub per_device: Vec<DeviceResult>,
}

/// What one meter task needs besides its identity and socket.
struct Plan {
    core: PublicKey,
    meter: MeterConfig,
    timebase: Timebase,
    seed: u64,
    seq_base: u64,
    first_reading: Instant,
    interval: Duration,
    readings: Option<u64>,
    readings_end: Option<Instant>,
    payload_bytes: usize,
    drain_timeout: Duration,
    shutdown: CancellationToken,
    progress: Option<Arc<FleetProgress>>,
}

struct MeterOutcome {
    result: DeviceResult,
    latencies: Vec<Duration>,
}

/// Runs the fleet to the end: every reading queued and then acknowledged or given up on at the
/// drain timeout, or until `opts.shutdown` is cancelled. `progress`, if given, is kept current.
pub async fn run_fleet(
    opts: FleetOptions,
    progress: Option<Arc<FleetProgress>>,
) -> Result<FleetSummary, FleetError> {
    if opts.devices.is_empty() {
        return Err(FleetError::NoDevices);
    }
    if opts.readings_per_device.is_none() && (opts.duration.is_none() || opts.interval.is_zero()) {
        return Err(FleetError::Unbounded);
    }
    if opts.payload_bytes > MAX_READING {
        return Err(FleetError::PayloadTooLarge {
            size: opts.payload_bytes,
            max: MAX_READING,
        });
    }
    // Every socket first, so that a setup failure is reported before any traffic.
    let mut sockets = Vec::with_capacity(opts.devices.len());
    for d in &opts.devices {
        let socket = connect(opts.target)
            .await
            .map_err(|source| FleetError::Socket {
                serial: d.serial.clone(),
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
    let devices = opts.devices.len();

    let mut tasks = tokio::task::JoinSet::new();
    for (index, (identity, socket)) in opts.devices.into_iter().zip(sockets).enumerate() {
        let phase = if opts.interval.is_zero() {
            Duration::ZERO
        } else {
            opts.interval.mul_f64(rng.gen_range(0.0..1.0))
        };
        let plan = Plan {
            core: opts.core_public_key,
            meter: opts.meter.clone(),
            timebase,
            seed: rng.gen(),
            seq_base: base,
            first_reading: start + phase,
            interval: opts.interval,
            readings: opts.readings_per_device,
            readings_end,
            payload_bytes: opts.payload_bytes,
            drain_timeout: opts.drain_timeout,
            shutdown: opts.shutdown.clone(),
            progress: progress.clone(),
        };
        tasks.spawn(async move { (index, run_meter(identity, socket, plan).await) });
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

/// A UDP socket connected to `target`, bound to the loopback address for a loopback target (so
/// tests and single-host runs never listen on the network), else to the unspecified address.
async fn connect(target: SocketAddr) -> std::io::Result<UdpSocket> {
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

async fn run_meter(identity: DeviceIdentity, socket: UdpSocket, plan: Plan) -> MeterOutcome {
    let serial = identity.serial;
    let outbox_cap = plan.meter.outbox_cap;
    let mut meter = Meter::new(
        serial.clone(),
        identity.keypair,
        plan.core,
        plan.meter,
        plan.timebase,
        plan.seed,
    );
    let public_key = *meter.public();
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    let mut socket_errors = 0u64;
    let mut reported = MeterStats::default();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];

    let mut pacer = Pacer {
        next: plan.first_reading,
        index: 0,
        interval: plan.interval,
        limit: plan.readings,
        end: plan.readings_end,
        drain_timeout: plan.drain_timeout,
        outbox_cap,
        stalled_since: None,
        drain_deadline: None,
    };

    // Nothing at all before the meter's phase: its first handshake is spread out too.
    tokio::select! {
        _ = plan.shutdown.cancelled() => {}
        _ = tokio::time::sleep_until(plan.first_reading.into()) => {}
    }

    loop {
        if plan.shutdown.is_cancelled() {
            break;
        }
        let now = Instant::now();
        while let Some(index) = pacer.next_due(now, meter.outstanding()) {
            let seq = plan.seq_base + index;
            let data = reading_payload(&serial, seq, plan.payload_bytes);
            match meter.queue_reading(ReadingSeq(seq), data, now) {
                // A full outbox is counted by the meter (and in the summary as refused).
                Ok(()) | Err(QueueError::OutboxFull { .. }) => {}
                Err(e) => tracing::warn!(%serial, error = %e, "reading not queued"),
            }
        }

        while let Some(datagram) = meter.poll_transmit(now) {
            if let Err(e) = socket.send(&datagram).await {
                // Lost like any datagram: retransmission covers it.
                socket_errors += 1;
                tracing::debug!(%serial, error = %e, "send failed");
            }
        }
        while let Some(event) = meter.poll_event() {
            match event {
                MeterEvent::Acked { seq, latency } => {
                    acked.push(seq);
                    latencies.push(latency);
                }
                MeterEvent::Established { rekey_after } => {
                    tracing::debug!(%serial, ?rekey_after, "session established");
                }
            }
        }
        if let Some(p) = &plan.progress {
            p.add(meter.stats(), &reported);
            reported = *meter.stats();
        }

        if pacer
            .drain_deadline
            .is_some_and(|d| meter.outstanding() == 0 || now >= d)
        {
            break;
        }
        let wake = [meter.poll_timeout(), pacer.wake(meter.outstanding())]
            .into_iter()
            .flatten()
            .min();

        tokio::select! {
            _ = plan.shutdown.cancelled() => break,
            received = socket.recv(&mut buf) => match received {
                Ok(n) => {
                    if let Err(e) = meter.handle_datagram(&buf[..n], Instant::now()) {
                        tracing::debug!(%serial, reason = e.reason(), "bad datagram dropped");
                    }
                }
                Err(e) => {
                    // ECONNREFUSED from an earlier ICMP error, typically: the target is not up.
                    socket_errors += 1;
                    tracing::debug!(%serial, error = %e, "receive failed");
                }
            },
            _ = sleep_until(wake), if wake.is_some() => {}
        }
    }

    if let Some(p) = &plan.progress {
        p.add(meter.stats(), &reported);
        p.devices_done.fetch_add(1, Ordering::Relaxed);
    }
    let mut unacked: Vec<ReadingSeq> = meter.unacked().collect();
    unacked.sort();
    MeterOutcome {
        result: DeviceResult {
            serial,
            public_key,
            stats: *meter.stats(),
            acked,
            unacked,
            socket_errors,
        },
        latencies,
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
        total.acked += s.acked;
        total.handshakes += s.handshakes;
        total.handshakes_started += s.handshakes_started;
        total.bad_datagrams += s.bad_datagrams;
        socket_errors += o.result.socket_errors;
        per_device.push(o.result);
    }
    latencies.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let secs = elapsed.as_secs_f64();
    FleetSummary {
        devices: per_device.len(),
        queued: total.queued,
        sent: total.sent,
        acknowledged: total.acked,
        retransmitted: total.retransmitted,
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
        per_device,
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Option<&Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1)
}

#[cfg(test)]
mod tests;
