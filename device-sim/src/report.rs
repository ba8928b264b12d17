//! What the operator sees: the live progress line and the end-of-run summary table (the JSON form
//! is [`FleetSummary`]'s `Serialize`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::camera::CameraReport;
use crate::fleet::{FleetSummary, ProgressSnapshot};
use crate::video::UploadSnapshot;

/// One progress line, without line ending: elapsed time, acknowledged of queued, retransmissions,
/// readings in flight.
pub fn progress_line(p: &ProgressSnapshot, elapsed: Duration) -> String {
    let mut line = format!(
        "{:>7.1}s  acked {}/{}  retx {}  in flight {}",
        elapsed.as_secs_f64(),
        p.acked,
        p.queued,
        p.retransmitted,
        p.in_flight()
    );
    if p.refused > 0 {
        let _ = write!(line, "  refused {}", p.refused);
    }
    if p.bad_datagrams > 0 {
        let _ = write!(line, "  bad {}", p.bad_datagrams);
    }
    if p.provisionings > 0 {
        let _ = write!(line, "  provisioned {}", p.provisionings);
    }
    if p.refusals > 0 {
        let _ = write!(line, "  handshakes refused {}", p.refusals);
    }
    line
}

/// The lifecycle part of the summary (devices with a secure element): totals, refusals by reason,
/// and the devices left without a working subscription (the first 20).
pub fn lifecycle_table(s: &FleetSummary) -> String {
    let Some(l) = &s.lifecycle else {
        return String::new();
    };
    let mut rows: Vec<(String, String)> = vec![
        ("devices with an element".into(), l.devices.to_string()),
        ("provisioned".into(), l.provisioned.to_string()),
        ("working subscription".into(), l.working.to_string()),
        (
            "without subscription".into(),
            l.without_subscription.to_string(),
        ),
        ("provisionings".into(), l.provisionings.to_string()),
        ("key updates".into(), l.key_updates.to_string()),
        ("config updates".into(), l.config_updates.to_string()),
        ("releases followed".into(), l.releases.to_string()),
    ];
    for (reason, n) in l.refusals.iter() {
        rows.push((format!("refused: {}", reason.label()), n.to_string()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    for d in s.device_reports.iter().filter(|d| !d.working).take(20) {
        let refusals: Vec<String> = d
            .refusals
            .iter()
            .map(|(r, n)| format!("{}×{n}", r.label()))
            .collect();
        let _ = writeln!(
            out,
            "  no subscription: {} (provisioned {}, refusals {})",
            d.serial,
            d.provisioned,
            if refusals.is_empty() {
                "none".to_owned()
            } else {
                refusals.join(" ")
            }
        );
    }
    out
}

/// The summary as an aligned two-column table, one line per figure, ending with a newline.
pub fn summary_table(s: &FleetSummary) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    let rows: [(&str, String); 18] = [
        ("devices", s.devices.to_string()),
        ("readings queued", s.queued.to_string()),
        ("sent (first time)", s.sent.to_string()),
        ("acknowledged", s.acknowledged.to_string()),
        ("retransmitted", s.retransmitted.to_string()),
        ("datagrams sent", s.frames_sent.to_string()),
        ("lost", s.lost.to_string()),
        ("refused (outbox full)", s.refused.to_string()),
        ("handshakes", s.handshakes.to_string()),
        ("handshake attempts", s.handshake_attempts.to_string()),
        ("bad datagrams", s.bad_datagrams.to_string()),
        ("socket errors", s.socket_errors.to_string()),
        ("latency p50", ms(s.latency_p50_ms)),
        ("latency p99", ms(s.latency_p99_ms)),
        ("latency max", ms(s.latency_max_ms)),
        ("elapsed", format!("{:.1} s", s.elapsed_secs)),
        ("acknowledged/s", format!("{:.1}", s.acknowledged_per_sec)),
        (
            "interrupted",
            if s.interrupted { "yes" } else { "no" }.to_owned(),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

/// The camera's progress line during the upload: share stored, bytes stored and sent, the send
/// rate (`bytes_per_sec`, over the last interval), the connection, and the status readings
/// acknowledged.
pub fn camera_progress_line(
    u: &UploadSnapshot,
    (queued, acked, _): (u64, u64, bool),
    bytes_per_sec: f64,
) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let share = if u.total_bytes > 0 {
        100.0 * u.stored_bytes as f64 / u.total_bytes as f64
    } else {
        0.0
    };
    let rate = bytes_per_sec / 1e6;
    format!(
        "camera: video {share:.1} % stored ({:.1} of {:.1} MB), sent {:.1} MB, {rate:.1} MB/s, connection {}{}; status {acked}/{queued} acked",
        mb(u.stored_bytes),
        mb(u.total_bytes),
        mb(u.sent_bytes),
        u.attempts,
        if u.complete { ", complete" } else { "" }
    )
}

/// The camera's summary: the device, its status readings, the video, the verdict.
pub fn camera_table(r: &CameraReport) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    let s = &r.status;
    let mut rows: Vec<(&str, String)> = vec![
        ("camera", format!("{} (key {})", r.serial, r.public_key)),
        ("datagrams to", r.target.clone()),
        ("video to", r.stream_target.clone()),
        (
            "status readings",
            format!(
                "{} queued, {} acknowledged, {} lost, {} retransmitted, {} handshakes",
                s.queued, s.acknowledged, s.lost, s.retransmitted, s.handshakes
            ),
        ),
        (
            "  latency",
            format!(
                "p50 {} p99 {} max {}; during the upload {} acknowledged, p99 {}",
                ms(s.latency_p50_ms),
                ms(s.latency_p99_ms),
                ms(s.latency_max_ms),
                s.acknowledged_during_upload,
                ms(s.latency_p99_during_upload_ms)
            ),
        ),
    ];
    match &r.video {
        None => rows.push(("video", "not started".into())),
        Some(v) => {
            rows.push((
                "video",
                format!(
                    "{} bytes, upload {}, {} chunks of {} B",
                    v.bytes, v.upload, v.chunks, v.chunk_size
                ),
            ));
            rows.push((
                "  stored",
                if v.complete {
                    format!(
                        "yes, SHA-256 {} ({})",
                        if v.digest_match { "matches" } else { "DIFFERS" },
                        v.acked_sha256
                    )
                } else {
                    "no".into()
                },
            ));
            let resumed: Vec<String> = v.resumed_from.iter().map(u32::to_string).collect();
            rows.push((
                "  connections",
                format!("{} (started at chunk {})", v.attempts, resumed.join(", ")),
            ));
            rows.push((
                "  sent",
                format!(
                    "{:.1} MB of chunks in {} frames",
                    v.chunk_bytes_sent as f64 / 1e6,
                    v.frames_sent
                ),
            ));
            rows.push((
                "  time",
                format!("{:.2} s, {:.1} MB/s", v.elapsed_secs, v.throughput_mb_s),
            ));
        }
    }
    if let Some(e) = &r.video_error {
        rows.push(("  error", e.clone()));
    }
    rows.push(("elapsed", format!("{:.1} s", r.elapsed_secs)));
    let verdict = if r.ok {
        "OK: video stored intact, every status reading acknowledged"
    } else if r.interrupted {
        "INTERRUPTED"
    } else {
        "FAILED"
    };
    rows.push(("result", verdict.into()));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_progress_and_summary() {
        let p = ProgressSnapshot {
            queued: 10,
            sent: 8,
            acked: 5,
            retransmitted: 2,
            ..ProgressSnapshot::default()
        };
        assert_eq!(
            progress_line(&p, Duration::from_millis(2500)),
            "    2.5s  acked 5/10  retx 2  in flight 3"
        );
        let s = FleetSummary {
            devices: 2,
            queued: 10,
            sent: 10,
            acknowledged: 10,
            retransmitted: 0,
            frames_sent: 0,
            lost: 0,
            refused: 0,
            handshakes: 2,
            handshake_attempts: 2,
            bad_datagrams: 0,
            socket_errors: 0,
            latency_p50_ms: Some(1.25),
            latency_p99_ms: Some(3.0),
            latency_max_ms: None,
            elapsed_secs: 2.0,
            acknowledged_per_sec: 5.0,
            interrupted: false,
            lifecycle: None,
            device_reports: Vec::new(),
            per_device: Vec::new(),
        };
        let t = summary_table(&s);
        assert!(t.contains("\nacknowledged           10\n"), "{t}");
        assert!(
            t.contains("latency p50            1.2 ms\n")
                || t.contains("latency p50            1.3 ms\n"),
            "{t}"
        );
        assert!(t.contains("latency max            -\n"), "{t}");
        assert_eq!(t.lines().count(), 18);
    }

    #[test]
    fn renders_the_camera_progress_and_summary() {
        let u = UploadSnapshot {
            total_bytes: 10_000_000,
            stored_bytes: 2_500_000,
            sent_bytes: 3_000_000,
            attempts: 2,
            complete: false,
        };
        assert_eq!(
            camera_progress_line(&u, (4, 3, true), 1_500_000.0),
            "camera: video 25.0 % stored (2.5 of 10.0 MB), sent 3.0 MB, 1.5 MB/s, connection 2; status 3/4 acked"
        );
        let video = crate::video::UploadReport {
            upload: "00".repeat(16),
            bytes: 10_000_000,
            chunk_size: 65_536,
            chunks: 153,
            sha256: "ab".repeat(32),
            acked_sha256: "ab".repeat(32),
            digest_match: true,
            complete: true,
            attempts: 2,
            resumed_from: vec![0, 48],
            chunk_bytes_sent: 10_400_000,
            frames_sent: 160,
            elapsed_secs: 2.0,
            throughput_mb_s: 5.0,
        };
        let mut r = CameraReport {
            serial: "cam-1".into(),
            public_key: "cd".repeat(32),
            target: "127.0.0.1:5683".into(),
            stream_target: "127.0.0.1:5683".into(),
            status: crate::camera::StatusReport {
                queued: 4,
                acknowledged: 4,
                ..Default::default()
            },
            video: Some(video),
            video_error: None,
            elapsed_secs: 3.0,
            interrupted: false,
            ok: true,
        };
        let t = camera_table(&r);
        let line = |start: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} in\n{t}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("connections"),
            "connections 2 (started at chunk 0, 48)"
        );
        assert_eq!(line("time"), "time 2.00 s, 5.0 MB/s");
        assert!(line("stored").starts_with("stored yes, SHA-256 matches"));
        assert!(line("result").starts_with("result OK"));
        r.ok = false;
        r.video_error = Some("gave up".into());
        let t = camera_table(&r);
        assert!(
            t.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["error", "gave", "up"]),
            "{t}"
        );
        assert!(
            t.lines().last().is_some_and(|l| l.ends_with("FAILED")),
            "{t}"
        );
    }
}
