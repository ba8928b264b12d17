//! What the operator sees: the live progress line and the end-of-run summary table (the JSON form
//! is [`FleetSummary`]'s `Serialize`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::fleet::{FleetSummary, ProgressSnapshot};

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
}
