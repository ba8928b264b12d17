//! Every metric the core exports (`docs/architecture.md`, "Metrics"), registered in one
//! [`prometheus::Registry`]. No metric has a per-device label; every label value is created at 0
//! up front so that a scrape shows the whole set before anything happened.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::engine::{DropReason, FraudReason, HandshakeResult, KeyPhase, Via};

/// Which way a device frame reached the core (`access` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Through a gateway's QUIC uplink.
    Gateway,
    /// Straight from the device on the direct UDP port (R14).
    Direct,
}

impl Access {
    fn label(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Direct => "direct",
        }
    }
}

/// The core's metrics. Cheap to clone: every field is a handle into the same registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    frames_received_gateway: IntCounter,
    frames_received_direct: IntCounter,
    frames_dropped: IntCounterVec,
    handshakes: IntCounterVec,
    /// `core_sessions`: sessions held by the engine.
    pub sessions: IntGauge,
    /// `core_gateways_connected`: gateways past `Hello`.
    pub gateways_connected: IntGauge,
    /// `core_bulk_connections`: gateways' bulk connections (device streams only) connected.
    pub bulk_connections: IntGauge,
    /// `core_readings_stored_total`.
    pub readings_stored: IntCounter,
    /// `core_readings_duplicate_total`: readings acknowledged again without being stored again.
    pub readings_duplicate: IntCounter,
    /// `core_store_commit_seconds`: one observation per store transaction.
    pub store_commit_seconds: Histogram,
    admin_requests: IntCounterVec,
    lifecycle_events: IntCounterVec,
    /// `core_provisioned_total`: factory-key handshakes that created or re-keyed a subscription.
    pub provisioned: IntCounter,
    key_updates: IntCounterVec,
    config_pushes: IntCounterVec,
    rotate_notices: IntCounterVec,
    fraud_flags: IntCounterVec,
    /// `core_revocations_sent_total`: session ids named to gateways in `Revoked` messages (one
    /// per session and gateway).
    pub revocations_sent: IntCounter,
    /// `core_devices_claimed_total`: devices claimed (from manifests and releases).
    pub devices_claimed: IntCounter,
    /// `core_devices_activated_total`: devices activated (by plans and accepted transfers).
    pub devices_activated: IntCounter,
    admission_queries: IntCounterVec,
    /// `core_cookie_replies_total`: handshake initiations answered with a cookie challenge (under
    /// load, or because their cookie was stale) instead of a handshake.
    pub cookie_replies: IntCounter,
    /// `core_streams_open`: device streams open (direct and through gateways).
    pub streams_open: IntGauge,
    stream_ends: IntCounterVec,
    /// `core_stream_bytes_total`: upload bytes durably stored from device streams.
    pub stream_bytes: IntCounter,
    /// `core_videos_stored_total`: uploads completed (stored whole, digest recorded).
    pub videos_stored: IntCounter,
}

/// How a device stream ended (`reason` label of `core_stream_ends_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upload is complete (just now, or it was already).
    Complete,
    /// The stream closed before the upload's last chunk (it stays resumable).
    Truncated,
    /// A chunk failed authentication.
    Auth,
    /// A chunk was not the next one expected (reordered, repeated or missing).
    Order,
    /// A length prefix over the limit, or a chunk longer than its place in the upload.
    TooLarge,
    /// Not the frame expected (open, chunk, flags, a short chunk, a misplaced FINAL).
    Malformed,
    /// No whole frame for `stall_timeout_secs`.
    Stalled,
    /// Refused in an ack (too large, chunk size or total changed, too many streams), or by the
    /// device's path policy, or over the limit of streams waiting to open.
    Refused,
    /// The core's disk failed.
    Io,
    /// The open frame is not for a live session, or did not authenticate.
    UnknownSession,
    /// A newer stream of the same upload took over.
    Superseded,
    /// The core shut down.
    Shutdown,
}

impl StreamEnd {
    /// Every value.
    pub const ALL: [Self; 12] = [
        Self::Complete,
        Self::Truncated,
        Self::Auth,
        Self::Order,
        Self::TooLarge,
        Self::Malformed,
        Self::Stalled,
        Self::Refused,
        Self::Io,
        Self::UnknownSession,
        Self::Superseded,
        Self::Shutdown,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Truncated => "truncated",
            Self::Auth => "auth",
            Self::Order => "order",
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Stalled => "stalled",
            Self::Refused => "refused",
            Self::Io => "io",
            Self::UnknownSession => "unknown_session",
            Self::Superseded => "superseded",
            Self::Shutdown => "shutdown",
        }
    }
}

/// The answer to one session id of a gateway's `AdmitQuery` (`result` label of
/// `core_admission_queries_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmissionAnswer {
    /// Live, and its profile lets it use the asking gateway: `Admit`.
    Admitted,
    /// Unknown, expired, or not allowed through the asking gateway: `NotAdmitted`.
    NotAdmitted,
}

impl AdmissionAnswer {
    /// Every value.
    pub const ALL: [Self; 2] = [Self::Admitted, Self::NotAdmitted];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::NotAdmitted => "not_admitted",
        }
    }
}

/// Every `result` of `core_admin_requests_total`.
pub const ADMIN_RESULTS: [&str; 8] = [
    "ok",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "unavailable",
    "error",
];

/// Every `event` of `core_lifecycle_events_total`.
pub const LIFECYCLE_EVENTS: [&str; 11] = [
    "suspend",
    "resume",
    "revoke",
    "claim",
    "activate",
    "put_profile",
    "rotate",
    "transfer",
    "accept_transfer",
    "release",
    "claim_release",
];

impl Metrics {
    /// Registers every metric, plus `core_build_info{version}`, in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        relay_ops::build_info(&registry, "core", env!("CARGO_PKG_VERSION"))?;

        let frames_received = IntCounterVec::new(
            Opts::new(
                "core_frames_received_total",
                "Device frames received, by how they reached the core.",
            ),
            &["access"],
        )?;
        let frames_dropped = IntCounterVec::new(
            Opts::new(
                "core_frames_dropped_total",
                "Device frames dropped, by reason.",
            ),
            &["reason"],
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "core_handshakes_total",
                "Handshake initiations that authenticated or failed, by outcome.",
            ),
            &["result"],
        )?;
        let sessions = IntGauge::new("core_sessions", "Established device sessions held.")?;
        let gateways_connected =
            IntGauge::new("core_gateways_connected", "Gateways with an open uplink.")?;
        let bulk_connections = IntGauge::new(
            "core_bulk_connections",
            "Gateways' bulk QUIC connections (device streams only, on the bulk endpoint) connected.",
        )?;
        let readings_stored = IntCounter::new(
            "core_readings_stored_total",
            "Readings durably stored for the first time.",
        )?;
        let readings_duplicate = IntCounter::new(
            "core_readings_duplicate_total",
            "Readings received again after they were stored; acknowledged, not stored again.",
        )?;
        let store_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "core_store_commit_seconds",
                "Time to commit one batch of readings (synchronous=FULL).",
            )
            .buckets(vec![
                0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5,
            ]),
        )?;

        let admin_requests = IntCounterVec::new(
            Opts::new(
                "core_admin_requests_total",
                "Admin API requests (/v1/…), by result.",
            ),
            &["result"],
        )?;
        let lifecycle_events = IntCounterVec::new(
            Opts::new(
                "core_lifecycle_events_total",
                "Subscription status changes made through the admin API, by event.",
            ),
            &["event"],
        )?;
        registry.register(Box::new(admin_requests.clone()))?;
        registry.register(Box::new(lifecycle_events.clone()))?;
        let provisioned = IntCounter::new(
            "core_provisioned_total",
            "Factory-identity handshakes that created or re-keyed a device's subscription.",
        )?;
        let key_updates = IntCounterVec::new(
            Opts::new(
                "core_key_updates_total",
                "Credential update steps committed, by phase (announced: next key stored; promoted: old key retired).",
            ),
            &["phase"],
        )?;
        let config_pushes = IntCounterVec::new(
            Opts::new(
                "core_config_pushes_total",
                "Configurations sent to devices, by carrier (handshake response or acknowledgement).",
            ),
            &["via"],
        )?;
        let rotate_notices = IntCounterVec::new(
            Opts::new(
                "core_rotate_notices_total",
                "Credential update notices sent to devices, by carrier.",
            ),
            &["via"],
        )?;
        let fraud_flags = IntCounterVec::new(
            Opts::new(
                "core_fraud_flags_total",
                "Subscriptions flagged by the fraud detector, by reason.",
            ),
            &["reason"],
        )?;
        let revocations_sent = IntCounter::new(
            "core_revocations_sent_total",
            "Session ids named to gateways as revoked (one per session and gateway).",
        )?;
        registry.register(Box::new(provisioned.clone()))?;
        registry.register(Box::new(key_updates.clone()))?;
        registry.register(Box::new(config_pushes.clone()))?;
        registry.register(Box::new(rotate_notices.clone()))?;
        registry.register(Box::new(fraud_flags.clone()))?;
        registry.register(Box::new(revocations_sent.clone()))?;
        for phase in KeyPhase::ALL {
            key_updates.with_label_values(&[phase.label()]);
        }
        for via in Via::ALL {
            config_pushes.with_label_values(&[via.label()]);
            rotate_notices.with_label_values(&[via.label()]);
        }
        for reason in FraudReason::ALL {
            fraud_flags.with_label_values(&[reason.label()]);
        }
        let devices_claimed = IntCounter::new(
            "core_devices_claimed_total",
            "Devices claimed by an owner, from shipping manifests and signed releases.",
        )?;
        let devices_activated = IntCounter::new(
            "core_devices_activated_total",
            "Devices activated, by activation plans and accepted transfers.",
        )?;
        registry.register(Box::new(devices_claimed.clone()))?;
        registry.register(Box::new(devices_activated.clone()))?;
        let admission_queries = IntCounterVec::new(
            Opts::new(
                "core_admission_queries_total",
                "Session ids gateways asked about (AdmitQuery, after losing their admission state), by answer.",
            ),
            &["result"],
        )?;
        let cookie_replies = IntCounter::new(
            "core_cookie_replies_total",
            "Handshake initiations answered with a cookie challenge (core under load, or a stale cookie) instead of a handshake.",
        )?;
        registry.register(Box::new(admission_queries.clone()))?;
        registry.register(Box::new(cookie_replies.clone()))?;
        let streams_open = IntGauge::new(
            "core_streams_open",
            "Device streams open (video uploads), direct and through gateways.",
        )?;
        let stream_ends = IntCounterVec::new(
            Opts::new("core_stream_ends_total", "Device streams ended, by reason."),
            &["reason"],
        )?;
        let stream_bytes = IntCounter::new(
            "core_stream_bytes_total",
            "Upload bytes from device streams durably stored.",
        )?;
        let videos_stored = IntCounter::new(
            "core_videos_stored_total",
            "Uploads completed: stored whole, SHA-256 recorded.",
        )?;
        registry.register(Box::new(streams_open.clone()))?;
        registry.register(Box::new(stream_ends.clone()))?;
        registry.register(Box::new(stream_bytes.clone()))?;
        registry.register(Box::new(videos_stored.clone()))?;
        for end in StreamEnd::ALL {
            stream_ends.with_label_values(&[end.label()]);
        }
        for answer in AdmissionAnswer::ALL {
            admission_queries.with_label_values(&[answer.label()]);
        }
        for result in ADMIN_RESULTS {
            admin_requests.with_label_values(&[result]);
        }
        for event in LIFECYCLE_EVENTS {
            lifecycle_events.with_label_values(&[event]);
        }
        registry.register(Box::new(frames_received.clone()))?;
        registry.register(Box::new(frames_dropped.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(gateways_connected.clone()))?;
        registry.register(Box::new(bulk_connections.clone()))?;
        registry.register(Box::new(readings_stored.clone()))?;
        registry.register(Box::new(readings_duplicate.clone()))?;
        registry.register(Box::new(store_commit_seconds.clone()))?;

        for reason in DropReason::all_labels() {
            frames_dropped.with_label_values(&[reason]);
        }
        for result in HandshakeResult::ALL {
            handshakes.with_label_values(&[result.label()]);
        }

        Ok(Self {
            frames_received_gateway: frames_received.with_label_values(&[Access::Gateway.label()]),
            frames_received_direct: frames_received.with_label_values(&[Access::Direct.label()]),
            registry,
            frames_dropped,
            handshakes,
            sessions,
            gateways_connected,
            bulk_connections,
            readings_stored,
            readings_duplicate,
            store_commit_seconds,
            admin_requests,
            lifecycle_events,
            provisioned,
            key_updates,
            config_pushes,
            rotate_notices,
            fraud_flags,
            revocations_sent,
            devices_claimed,
            devices_activated,
            admission_queries,
            cookie_replies,
            streams_open,
            stream_ends,
            stream_bytes,
            videos_stored,
        })
    }

    /// Counts one device stream's end.
    pub fn stream_end(&self, end: StreamEnd) {
        self.stream_ends.with_label_values(&[end.label()]).inc();
    }

    /// The current value of `core_stream_ends_total{reason}`.
    pub fn stream_ends_count(&self, end: StreamEnd) -> u64 {
        self.stream_ends.with_label_values(&[end.label()]).get()
    }

    /// Counts one admin API request by result (one of [`ADMIN_RESULTS`]).
    pub fn admin_request(&self, result: &'static str) {
        self.admin_requests.with_label_values(&[result]).inc();
    }

    /// Counts one status change (one of [`LIFECYCLE_EVENTS`]).
    pub fn lifecycle_event(&self, event: &'static str) {
        self.lifecycle_events.with_label_values(&[event]).inc();
    }

    /// The registry served on `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one device frame received.
    pub fn frame_received(&self, access: Access) {
        match access {
            Access::Gateway => self.frames_received_gateway.inc(),
            Access::Direct => self.frames_received_direct.inc(),
        }
    }

    /// Counts one dropped frame.
    pub fn frame_dropped(&self, reason: DropReason) {
        self.frames_dropped
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, result: HandshakeResult) {
        self.handshakes.with_label_values(&[result.label()]).inc();
    }

    /// The current value of `core_frames_dropped_total{reason}`.
    pub fn frames_dropped_count(&self, reason: &str) -> u64 {
        self.frames_dropped.with_label_values(&[reason]).get()
    }

    /// Counts one credential update step.
    pub fn key_update(&self, phase: KeyPhase) {
        self.key_updates.with_label_values(&[phase.label()]).inc();
    }

    /// Counts one configuration sent to a device.
    pub fn config_push(&self, via: Via) {
        self.config_pushes.with_label_values(&[via.label()]).inc();
    }

    /// Counts one credential update notice sent to a device.
    pub fn rotate_notice(&self, via: Via) {
        self.rotate_notices.with_label_values(&[via.label()]).inc();
    }

    /// Counts one subscription flagged by the fraud detector.
    pub fn fraud_flag(&self, reason: FraudReason) {
        self.fraud_flags.with_label_values(&[reason.label()]).inc();
    }

    /// The current value of `core_key_updates_total{phase}`.
    pub fn key_updates_count(&self, phase: KeyPhase) -> u64 {
        self.key_updates.with_label_values(&[phase.label()]).get()
    }

    /// The current value of `core_config_pushes_total{via}`.
    pub fn config_pushes_count(&self, via: Via) -> u64 {
        self.config_pushes.with_label_values(&[via.label()]).get()
    }

    /// The current value of `core_rotate_notices_total{via}`.
    pub fn rotate_notices_count(&self, via: Via) -> u64 {
        self.rotate_notices.with_label_values(&[via.label()]).get()
    }

    /// The current value of `core_fraud_flags_total{reason}`.
    pub fn fraud_flags_count(&self, reason: FraudReason) -> u64 {
        self.fraud_flags.with_label_values(&[reason.label()]).get()
    }

    /// Counts `n` session ids of an `AdmitQuery` answered `answer`.
    pub fn admission_queries(&self, answer: AdmissionAnswer, n: usize) {
        self.admission_queries
            .with_label_values(&[answer.label()])
            .inc_by(n as u64);
    }

    /// The current value of `core_admission_queries_total{result}`.
    pub fn admission_queries_count(&self, answer: AdmissionAnswer) -> u64 {
        self.admission_queries
            .with_label_values(&[answer.label()])
            .get()
    }

    /// The current value of `core_handshakes_total{result}`.
    pub fn handshakes_count(&self, result: HandshakeResult) -> u64 {
        self.handshakes.with_label_values(&[result.label()]).get()
    }
}
