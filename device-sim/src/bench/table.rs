//! The bench's figures as an aligned table: what, figure, target, pass/fail.

use std::fmt::Write as _;

use super::BenchReport;

/// The report as a table (a header line, then one row per figure), ending with a newline.
pub fn render_table(r: &BenchReport) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |what: String, figure: String, target: &str, pass: Option<bool>| {
        let verdict = match pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "",
        };
        rows.push([what, figure, target.to_owned(), verdict.to_owned()]);
    };
    let pct = |v: f64| format!("{:.1} %", 100.0 * v);
    let per_sec = |v: f64| format!("{v:.0}/s");
    let check = |what: &str| r.targets.iter().find(|t| t.what == what).map(|t| t.pass);

    let t = &r.throughput;
    let secs = t.relay.window_secs;
    row(
        format!("relay: acked readings/s via gateway ({:.1} s)", secs),
        per_sec(t.relay.acked_per_sec),
        "",
        None,
    );
    row(
        format!(
            "direct: acked readings/s to core ({:.1} s)",
            t.direct.window_secs
        ),
        per_sec(t.direct.acked_per_sec),
        "",
        None,
    );
    row(
        "relay / direct".into(),
        pct(t.ratio),
        ">= 80 %",
        check("relay / direct throughput"),
    );
    let h = &r.handshakes;
    row(
        "raw snow IK responder, 1 thread (handshakes/s)".into(),
        per_sec(h.raw_per_sec),
        "",
        None,
    );
    row(
        "core: handshakes answered/s (direct UDP)".into(),
        per_sec(h.core_per_sec),
        "",
        None,
    );
    row(
        "core / raw".into(),
        pct(h.ratio),
        ">= 80 %",
        check("core / raw handshake rate"),
    );
    for p in &r.memory.points {
        let k = super::thousands(p.devices);
        row(
            format!("gateway RSS per idle device, {k}"),
            format!("{:.0} B", p.gateway_bytes_per_device),
            "<= 256 B",
            check(&format!("gateway bytes per idle device at {k}")),
        );
        row(
            format!("core RSS per idle device, {k}"),
            format!("{:.0} B", p.core_bytes_per_device),
            "<= 1024 B",
            check(&format!("core bytes per idle device at {k}")),
        );
        if let (Some(g), Some(c)) = (
            p.gateway_marginal_bytes_per_device,
            p.core_marginal_bytes_per_device,
        ) {
            row(
                format!("  marginal to {k} (gateway / core)"),
                format!("{g:.0} B / {c:.0} B"),
                "",
                None,
            );
        }
    }

    let f = &r.forged_frames;
    row(
        "forged frames: plain UDP socket receives/s, recv_from".into(),
        per_sec(f.plain_recv_from_per_sec),
        "",
        None,
    );
    row(
        "forged frames: plain UDP socket receives/s, recvmmsg + GRO".into(),
        per_sec(f.plain_received_per_sec),
        "",
        None,
    );
    row(
        "forged frames: gateway drops/s (bad admission tag)".into(),
        per_sec(f.gateway_dropped_per_sec),
        "",
        None,
    );
    row(
        "gateway filter / raw UDP receive".into(),
        pct(f.ratio),
        ">= 90 %",
        check("gateway forged-frame drops / raw UDP receive rate"),
    );
    row(
        "forged frames on the uplink (core counters)".into(),
        if f.uplink_untouched {
            "none".into()
        } else {
            "some".into()
        },
        "none",
        check("forged frames reaching the uplink"),
    );
    let fl = &r.flood;
    row(
        format!(
            "handshake flood: forged inits/s, {} sources",
            fl.flood_sources
        ),
        per_sec(fl.flood_sent_per_sec),
        "",
        None,
    );
    row(
        format!("real handshakes completed under flood ({})", fl.devices),
        pct(fl.success_ratio),
        ">= 99 %",
        check("real handshakes completed under flood"),
    );

    let b = &r.bulk;
    let size = format!("{} MiB", b.bytes >> 20);
    let mbs = |v: f64| format!("{v:.0} MB/s");
    row(
        format!("bulk: raw loopback TCP ({size})"),
        mbs(b.raw.mb_per_sec),
        "",
        None,
    );
    row(
        format!("bulk: camera video direct to core ({size})"),
        mbs(b.direct.mb_per_sec),
        "",
        None,
    );
    row(
        format!("bulk: camera video via gateway ({size})"),
        mbs(b.gateway.mb_per_sec),
        "",
        None,
    );
    row(
        "bulk: gateway / direct".into(),
        pct(b.gateway_over_direct),
        "",
        None,
    );
    row(
        "bulk: gateway / raw TCP".into(),
        pct(b.gateway_over_raw),
        "",
        None,
    );
    row(
        "bulk: end-to-end crypto, share of CPU (gateway run)".into(),
        pct(b.crypto_cpu_share),
        "",
        None,
    );
    let lat = &b.meters;
    row(
        format!("meters' p99 latency, idle ({} meters)", lat.meters),
        ms(lat.idle.p99_ms),
        "",
        None,
    );
    row(
        "meters' p99 latency, camera streaming".into(),
        ms(lat.streaming.p99_ms),
        "",
        None,
    );
    row(
        "meters' p99 latency, camera streaming / idle".into(),
        format!("× {:.2}", lat.p99_ratio),
        "",
        None,
    );

    let mut out = String::new();
    let header = ["what", "figure", "target", "result"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let _ = writeln!(
        out,
        "{:<w0$}  {:>w1$}  {:<w2$}  {}",
        header[0], header[1], header[2], header[3]
    );
    for [what, figure, target, verdict] in &rows {
        let line = format!("{what:<w0$}  {figure:>w1$}  {target:<w2$}  {verdict}");
        let _ = writeln!(out, "{}", line.trim_end());
    }

    let _ = writeln!(out);
    let _ = writeln!(out, "measured: {}", t.measured);
    let _ = writeln!(
        out,
        "throughput: {} meters per path, window {}, {} B readings; relay {} acked, {} retransmitted, {} lost, p50 {} p99 {}; direct {} acked, {} retransmitted, {} lost, p50 {} p99 {}",
        t.meters,
        t.window,
        t.payload_bytes,
        t.relay.summary.acknowledged,
        t.relay.summary.retransmitted,
        t.relay.summary.lost,
        ms(t.relay.summary.latency_p50_ms),
        ms(t.relay.summary.latency_p99_ms),
        t.direct.summary.acknowledged,
        t.direct.summary.retransmitted,
        t.direct.summary.lost,
        ms(t.direct.summary.latency_p50_ms),
        ms(t.direct.summary.latency_p99_ms),
    );
    for (name, run) in [("relay", &t.relay), ("direct", &t.direct)] {
        let _ = writeln!(out, "  {name} drops: {}", drops(&run.drops));
    }
    let kernel = t.relay.drops.kernel_total + t.direct.drops.kernel_total;
    let acked = t.relay.summary.acknowledged + t.direct.summary.acknowledged;
    if kernel * 100 > acked {
        let _ = writeln!(
            out,
            "  note: the kernel dropped datagrams at full UDP receive buffers; the readings/s then \
             reflect loss recovery (retransmission after 500 ms) as much as forwarding speed"
        );
    }
    let _ = writeln!(
        out,
        "handshakes: raw {} timed; core {} sent from distinct devices, {} answered, {} unanswered, in {:.2} s{}",
        h.raw_count,
        h.core_sent,
        h.core_responses,
        h.core_unanswered,
        h.core_elapsed_secs,
        h.core_accepted_metric
            .map(|a| format!(" (core_handshakes_total accepted +{a:.0})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "  drops: {}", drops(&h.core_drops));
    let m = &r.memory;
    let _ = writeln!(
        out,
        "memory: RSS at start-up gateway {} core {}; baseline (after the phases above) gateway {} core {}",
        mib(m.startup.gateway),
        mib(m.startup.core),
        mib(m.baseline.gateway),
        mib(m.baseline.core)
    );
    for p in &m.points {
        let _ = writeln!(
            out,
            "  {} idle devices: gateway {} core {}; gateway_flows {} core_sessions {}; {} failed, {} timeouts so far, {} source ports skipped",
            p.devices,
            mib(p.rss.gateway),
            mib(p.rss.core),
            opt(p.gateway_flows),
            opt(p.core_sessions),
            p.failed,
            p.timeouts,
            p.ports_skipped
        );
    }
    let _ = writeln!(
        out,
        "forged frames: {} B each, {} distinct, for {} admitted sessions; blaster {} thread(s), {} datagrams per send, {} rounds of {:.0} s (best round counted)",
        f.frame_bytes,
        f.distinct_frames,
        f.sessions,
        f.blaster_threads,
        f.segments_per_send,
        f.rounds.len(),
        f.blast_secs
    );
    for (i, round) in f.rounds.iter().enumerate() {
        let _ = writeln!(
            out,
            "  round {}: plain socket {:.0}/s batched ({:.0}/s by recv_from) of {:.0}/s sent; gateway dropped {:.0}/s of {:.0}/s sent",
            i + 1,
            round.plain_received_per_sec,
            round.plain_recv_from_per_sec,
            round.plain_sent_per_sec,
            round.gateway_dropped_per_sec,
            round.gateway_sent_per_sec
        );
    }
    let _ = writeln!(
        out,
        "  gateway: received +{}, dropped admission_mac +{}, other +{}, forwarded up +{}, admission queries +{}; core: frames received +{}, dropped +{}",
        opt(f.gateway_received),
        opt(f.gateway_dropped_admission_mac),
        opt(f.gateway_dropped_other),
        opt(f.gateway_forwarded_uplink),
        opt(f.gateway_admission_queries),
        opt(f.core_frames_received),
        opt(f.core_frames_dropped)
    );
    let _ = writeln!(out, "  drops: {}", drops(&f.drops));
    let _ = writeln!(
        out,
        "flood: {} forged inits/s asked ({:.0} × core rate {:.0}/s), {} sent in {:.1} s from {} sources; {} of {} real handshakes, {} initiations, {} cookie challenges, p50 {} p99 {}; core cookie replies +{}, accepted +{}, stale cookies +{}; gateway handshake_rate drops +{}",
        fl.flood_rate_per_sec,
        if fl.core_capacity_per_sec > 0.0 {
            fl.flood_rate_per_sec as f64 / fl.core_capacity_per_sec
        } else {
            0.0
        },
        fl.core_capacity_per_sec,
        fl.flood_sent,
        fl.flood_secs,
        fl.flood_sources,
        fl.established,
        fl.devices,
        fl.initiations,
        fl.cookie_challenges,
        ms(fl.latency_p50_ms),
        ms(fl.latency_p99_ms),
        opt(fl.core_cookie_replies),
        opt(fl.core_accepted),
        opt(fl.core_stale_cookies),
        opt(fl.gateway_handshake_rate_drops)
    );
    let cpu = |c: &super::Cpu| {
        format!(
            "{:.2} s (gateway {:.2}, core {:.2}, device side {:.2})",
            c.total_secs, c.gateway_secs, c.core_secs, c.bench_secs
        )
    };
    let _ = writeln!(
        out,
        "bulk: {} B video in {} B chunks; raw {:.2} s, direct {:.2} s ({} connection(s), SHA-256 {}), gateway {:.2} s ({} connection(s), SHA-256 {}); CPU direct run {}, gateway run {}; end-to-end crypto {:.2} ns/B (seal + open, one thread) = {:.2} CPU s of the gateway run",
        b.bytes,
        b.chunk_size,
        b.raw.secs,
        b.direct.secs,
        b.direct.attempts,
        if b.direct.intact { "matches" } else { "DIFFERS" },
        b.gateway.secs,
        b.gateway.attempts,
        if b.gateway.intact { "matches" } else { "DIFFERS" },
        cpu(&b.direct_run_cpu),
        cpu(&b.gateway_run_cpu),
        b.crypto_ns_per_byte,
        b.crypto_cpu_secs
    );
    let _ = writeln!(
        out,
        "  meters every {} ms for {:.0} s via the gateway (readings sent in the first {:.0} s not in the latencies): idle {} acked, {} lost, p50 {} p99 {} max {}; camera streaming {} acked, {} lost, p50 {} p99 {} max {}; the camera sent {:.0} MB ({:.0} MB/s, {} videos)",
        lat.interval_ms,
        lat.secs,
        lat.warmup_secs,
        lat.idle.acknowledged,
        lat.idle.lost,
        ms(lat.idle.p50_ms),
        ms(lat.idle.p99_ms),
        ms(lat.idle.max_ms),
        lat.streaming.acknowledged,
        lat.streaming.lost,
        ms(lat.streaming.p50_ms),
        ms(lat.streaming.p99_ms),
        ms(lat.streaming.max_ms),
        lat.camera_bytes as f64 / 1e6,
        lat.camera_mb_per_sec,
        lat.camera_videos
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs, {}, kernel {}; fleet {} devices; {}",
        r.machine.nproc,
        r.machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        r.machine.kernel.as_deref().unwrap_or("?"),
        r.fleet_devices,
        if r.all_targets_met {
            "all targets met"
        } else {
            "some targets missed"
        }
    );
    out
}

fn drops(d: &super::Drops) -> String {
    format!(
        "kernel (receive buffer full) at core {}, at gateway {}, at the bench's sockets {}; frames dropped by core {:.0}, by gateway {:.0}",
        d.kernel_at_core,
        d.kernel_at_gateway,
        d.kernel_total
            .saturating_sub(d.kernel_at_core + d.kernel_at_gateway),
        d.core_frames_dropped,
        d.gateway_frames_dropped
    )
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

fn mib(b: u64) -> String {
    super::mib(b)
}
