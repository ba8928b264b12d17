//! Every metric of the gateway, registered in one [`prometheus::Registry`] served on `/metrics`.
//!
//! Names and labels are those of `docs/architecture.md`; no metric carries a per-device label.
//! Labelled series are resolved once here so that the hot path only increments an atomic.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use relay_protocol::DecodeError;

/// Why the gateway dropped a frame (`gateway_frames_dropped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A device datagram shorter than its frame type requires.
    Truncated,
    /// A device datagram longer than the device link allows.
    Oversized,
    /// A device datagram with a version byte the gateway does not speak.
    UnknownVersion,
    /// A device datagram with an unknown type byte.
    UnknownType,
    /// A device datagram with a field outside its allowed values.
    Invalid,
    /// A known frame type going the wrong way (a device sending a handshake response, the core
    /// sending a handshake initiation).
    UnexpectedType,
    /// A bounded buffer towards the core was full (the queue while the uplink is down, or the
    /// control stream's send queue).
    QueueFull,
    /// A new device address while the flow table is full.
    FlowTableFull,
    /// A frame from the core for a flow the gateway does not know (expired or never seen).
    UnknownFlow,
    /// A datagram or control-stream frame from the core that does not parse.
    UplinkDecode,
    /// The UDP send to a device failed.
    DeviceSend,
    /// Handed to a control stream whose connection was lost before the frame was written.
    UplinkLost,
    /// A device frame for a session the core revoked (`UplinkMessage::Revoked`).
    Revoked,
    /// A HandshakeInit or CookieInit over its source's rate (`[handshakes]`).
    HandshakeRate,
    /// An `AdmittedTransport` frame whose admission tag does not match its session's key.
    AdmissionMac,
    /// An `AdmittedTransport` frame of a session over its quota for the current window.
    Quota,
    /// An `AdmittedTransport` frame of a session whose admission ran out.
    Expired,
    /// A frame of a session the gateway holds no admission for: the core answered
    /// `NotAdmitted`, or did not answer in time, the holding or query limits were reached, or a
    /// plain `Transport` frame while `[admission] require` is on.
    Unadmitted,
    /// A held frame of a session the core admitted while the admission table was full.
    AdmissionTableFull,
}

impl DropReason {
    /// Every reason, so that each series exists (at 0) from the start.
    pub const ALL: [Self; 19] = [
        Self::Truncated,
        Self::Oversized,
        Self::UnknownVersion,
        Self::UnknownType,
        Self::Invalid,
        Self::UnexpectedType,
        Self::QueueFull,
        Self::FlowTableFull,
        Self::UnknownFlow,
        Self::UplinkDecode,
        Self::DeviceSend,
        Self::UplinkLost,
        Self::Revoked,
        Self::HandshakeRate,
        Self::AdmissionMac,
        Self::Quota,
        Self::Expired,
        Self::Unadmitted,
        Self::AdmissionTableFull,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Oversized => "oversized",
            Self::UnknownVersion => "unknown_version",
            Self::UnknownType => "unknown_type",
            Self::Invalid => "invalid",
            Self::UnexpectedType => "unexpected_type",
            Self::QueueFull => "queue_full",
            Self::FlowTableFull => "flow_table_full",
            Self::UnknownFlow => "unknown_flow",
            Self::UplinkDecode => "uplink_decode",
            Self::DeviceSend => "device_send",
            Self::UplinkLost => "uplink_lost",
            Self::Revoked => "revoked",
            Self::HandshakeRate => "handshake_rate",
            Self::AdmissionMac => "admission_mac",
            Self::Quota => "quota",
            Self::Expired => "expired",
            Self::Unadmitted => "unadmitted",
            Self::AdmissionTableFull => "admission_table_full",
        }
    }

    /// The reason for a device datagram that did not decode; its label is
    /// [`DecodeError::reason`].
    pub fn from_decode(e: &DecodeError) -> Self {
        match e {
            DecodeError::Truncated => Self::Truncated,
            DecodeError::Oversized { .. } => Self::Oversized,
            DecodeError::UnknownVersion(_) => Self::UnknownVersion,
            DecodeError::UnknownType(_) => Self::UnknownType,
            DecodeError::Invalid(_) => Self::Invalid,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a device stream ended (`gateway_stream_ends_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamEnd {
    /// Both sides finished (or the device went away, or the gateway shut down).
    Closed,
    /// A length prefix of 0 or over the limit (the first frame's: a datagram's size; later ones:
    /// `MAX_STREAM_FRAME`), from either side.
    TooLarge,
    /// A first frame that is not a `Transport` or `AdmittedTransport` device frame.
    Malformed,
    /// Neither side delivered a whole frame for `stall_timeout_secs`.
    Stalled,
    /// A first frame of a session the gateway holds no admission for (or one the core revoked)
    /// while `[admission] require` is on, or a plain `Transport` frame then.
    Unadmitted,
    /// A first frame whose admission tag does not match its session's key.
    AdmissionMac,
    /// No uplink to carry the stream when it opened.
    UplinkDown,
    /// The uplink connection was lost, or the core reset the stream.
    UplinkLost,
    /// `max_streams` streams were open already: closed at once.
    Limit,
}

impl StreamEnd {
    /// Every reason, so that each series exists (at 0) from the start.
    pub const ALL: [Self; 9] = [
        Self::Closed,
        Self::TooLarge,
        Self::Malformed,
        Self::Stalled,
        Self::Unadmitted,
        Self::AdmissionMac,
        Self::UplinkDown,
        Self::UplinkLost,
        Self::Limit,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Stalled => "stalled",
            Self::Unadmitted => "unadmitted",
            Self::AdmissionMac => "admission_mac",
            Self::UplinkDown => "uplink_down",
            Self::UplinkLost => "uplink_lost",
            Self::Limit => "limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A direction of forwarding, the `direction` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device to core.
    Uplink,
    /// Core to device.
    Downlink,
}

/// The gateway's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `gateway_device_frames_received_total`: every datagram read from the device socket.
    pub device_frames_received: IntCounter,
    forwarded_uplink: IntCounter,
    forwarded_downlink: IntCounter,
    bytes_uplink: IntCounter,
    bytes_downlink: IntCounter,
    dropped: Vec<IntCounter>,
    /// `gateway_uplink_connected`: 1 while the uplink is up (after `HelloAck`).
    pub uplink_connected: IntGauge,
    /// `gateway_uplink_connects_total`: uplink connections completed (after `HelloAck`).
    pub uplink_connects: IntCounter,
    /// `gateway_queue_frames`: frames held while the uplink is down.
    pub queue_frames: IntGauge,
    /// `gateway_queue_capacity_frames`: the queue's capacity.
    pub queue_capacity: IntGauge,
    /// `gateway_flows`: entries in the flow table.
    pub flows: IntGauge,
    /// `gateway_admissions`: sessions in the admission table.
    pub admissions: IntGauge,
    /// `gateway_admission_queries_total`: session ids named in `AdmitQuery` messages.
    pub admission_queries: IntCounter,
    /// `gateway_admitted_frames_total`: `AdmittedTransport` frames whose tag and quota passed.
    pub admitted_frames: IntCounter,
    /// `gateway_admission_pending_frames`: frames held for sessions being asked about.
    pub admission_pending_frames: IntGauge,
    /// `gateway_streams_open`: device streams being relayed now.
    pub streams_open: IntGauge,
    /// `gateway_streams_total`: TCP connections accepted on the stream port (those closed at once
    /// for `limit` included), so that the ends add up to it once none is open.
    pub streams_total: IntCounter,
    /// `gateway_bulk_uplink_connected`: 1 while the bulk connection (device streams, to the core's
    /// bulk endpoint) is up.
    pub bulk_uplink_connected: IntGauge,
    /// `gateway_bulk_uplink_connects_total`: bulk connections established.
    pub bulk_uplink_connects: IntCounter,
    stream_ends: Vec<IntCounter>,
    stream_bytes_up: IntCounter,
    stream_bytes_down: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry, `gateway_build_info` included.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        relay_ops::build_info(&registry, "gateway", env!("CARGO_PKG_VERSION"))?;

        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter_vec =
            |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };

        let forwarded = counter_vec(
            "gateway_frames_forwarded_total",
            "Device frames forwarded, by direction (uplink: device to core, downlink: core to device).",
            "direction",
        )?;
        let bytes = counter_vec(
            "gateway_forwarded_bytes_total",
            "Bytes of device frames forwarded, by direction.",
            "direction",
        )?;
        let dropped_vec = counter_vec(
            "gateway_frames_dropped_total",
            "Frames dropped, by reason.",
            "reason",
        )?;
        let dropped = DropReason::ALL
            .iter()
            .map(|r| dropped_vec.with_label_values(&[r.label()]))
            .collect();
        let stream_ends_vec = counter_vec(
            "gateway_stream_ends_total",
            "Device streams ended, by reason.",
            "reason",
        )?;
        let stream_ends = StreamEnd::ALL
            .iter()
            .map(|r| stream_ends_vec.with_label_values(&[r.label()]))
            .collect();
        let stream_bytes = counter_vec(
            "gateway_stream_bytes_total",
            "Bytes relayed on device streams, length prefixes included, by direction (up: device \
             to core, down: core to device).",
            "direction",
        )?;

        Ok(Self {
            device_frames_received: counter(
                "gateway_device_frames_received_total",
                "Datagrams received from devices, valid or not.",
            )?,
            forwarded_uplink: forwarded.with_label_values(&["uplink"]),
            forwarded_downlink: forwarded.with_label_values(&["downlink"]),
            bytes_uplink: bytes.with_label_values(&["uplink"]),
            bytes_downlink: bytes.with_label_values(&["downlink"]),
            dropped,
            uplink_connected: gauge(
                "gateway_uplink_connected",
                "1 while the uplink to the core is established, else 0.",
            )?,
            uplink_connects: counter(
                "gateway_uplink_connects_total",
                "Uplink connections established (HelloAck received).",
            )?,
            queue_frames: gauge(
                "gateway_queue_frames",
                "Device frames held while the uplink is down.",
            )?,
            queue_capacity: gauge(
                "gateway_queue_capacity_frames",
                "How many device frames the queue holds at most.",
            )?,
            flows: gauge("gateway_flows", "Device addresses in the flow table.")?,
            admissions: gauge(
                "gateway_admissions",
                "Sessions in the admission table (admitted by the core through this gateway).",
            )?,
            admission_queries: counter(
                "gateway_admission_queries_total",
                "Session ids the gateway asked the core about (AdmitQuery).",
            )?,
            admitted_frames: counter(
                "gateway_admitted_frames_total",
                "AdmittedTransport frames whose admission tag and quota passed.",
            )?,
            admission_pending_frames: gauge(
                "gateway_admission_pending_frames",
                "Device frames held until the core answers whether their session is admitted.",
            )?,
            streams_open: gauge(
                "gateway_streams_open",
                "Device streams (TCP) being relayed to the core now.",
            )?,
            streams_total: counter(
                "gateway_streams_total",
                "Device stream connections accepted (TCP), those refused at once included.",
            )?,
            bulk_uplink_connected: gauge(
                "gateway_bulk_uplink_connected",
                "1 while the QUIC connection for device streams to the core's bulk endpoint is \
                 established, else 0.",
            )?,
            bulk_uplink_connects: counter(
                "gateway_bulk_uplink_connects_total",
                "QUIC connections for device streams established to the core's bulk endpoint.",
            )?,
            stream_ends,
            stream_bytes_up: stream_bytes.with_label_values(&["up"]),
            stream_bytes_down: stream_bytes.with_label_values(&["down"]),
            registry,
        })
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one dropped frame.
    pub fn drop_frame(&self, reason: DropReason) {
        if let Some(c) = self.dropped.get(reason.index()) {
            c.inc();
        }
    }

    /// Counts one forwarded frame of `len` bytes.
    pub fn forwarded(&self, direction: Direction, len: usize) {
        let (frames, bytes) = match direction {
            Direction::Uplink => (&self.forwarded_uplink, &self.bytes_uplink),
            Direction::Downlink => (&self.forwarded_downlink, &self.bytes_downlink),
        };
        frames.inc();
        bytes.inc_by(len as u64);
    }

    /// The current count for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason.index()).map_or(0, IntCounter::get)
    }

    /// Counts one device stream ended for `reason`.
    pub fn stream_ended(&self, reason: StreamEnd) {
        if let Some(c) = self.stream_ends.get(reason.index()) {
            c.inc();
        }
    }

    /// The current count of streams ended for `reason`.
    pub fn stream_ends(&self, reason: StreamEnd) -> u64 {
        self.stream_ends
            .get(reason.index())
            .map_or(0, IntCounter::get)
    }

    /// Counts `len` bytes relayed on a device stream.
    pub fn stream_bytes(&self, direction: Direction, len: usize) {
        let c = match direction {
            Direction::Uplink => &self.stream_bytes_up,
            Direction::Downlink => &self.stream_bytes_down,
        };
        c.inc_by(len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reasons_keep_the_protocol_labels() {
        for e in [
            DecodeError::Truncated,
            DecodeError::Oversized { len: 2, max: 1 },
            DecodeError::UnknownVersion(9),
            DecodeError::UnknownType(9),
            DecodeError::Invalid("x"),
        ] {
            assert_eq!(DropReason::from_decode(&e).label(), e.reason());
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn every_series_exists_from_the_start() {
        let m = Metrics::new().expect("metrics");
        let text = {
            use prometheus::Encoder;
            let mut out = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&m.registry().gather(), &mut out)
                .expect("encode");
            String::from_utf8(out).expect("utf-8")
        };
        for r in DropReason::ALL {
            let series = format!("gateway_frames_dropped_total{{reason=\"{}\"}} 0", r.label());
            assert!(text.contains(&series), "{series} missing");
        }
        for (i, r) in StreamEnd::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            let series = format!("gateway_stream_ends_total{{reason=\"{}\"}} 0", r.label());
            assert!(text.contains(&series), "{series} missing");
        }
        for name in [
            "gateway_build_info{version=",
            "gateway_device_frames_received_total 0",
            "gateway_frames_forwarded_total{direction=\"uplink\"} 0",
            "gateway_frames_forwarded_total{direction=\"downlink\"} 0",
            "gateway_forwarded_bytes_total{direction=\"uplink\"} 0",
            "gateway_uplink_connected 0",
            "gateway_uplink_connects_total 0",
            "gateway_queue_frames 0",
            "gateway_queue_capacity_frames 0",
            "gateway_flows 0",
            "gateway_admissions 0",
            "gateway_admission_queries_total 0",
            "gateway_admitted_frames_total 0",
            "gateway_admission_pending_frames 0",
            "gateway_streams_open 0",
            "gateway_streams_total 0",
            "gateway_bulk_uplink_connected 0",
            "gateway_bulk_uplink_connects_total 0",
            "gateway_stream_bytes_total{direction=\"up\"} 0",
            "gateway_stream_bytes_total{direction=\"down\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
