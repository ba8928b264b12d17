//! Relay-assisted admission (issue 5), with the real core and gateways on real sockets: forged
//! frames stop at the gateway, a sleepy meter resumes through a restarted gateway in one datagram,
//! a device moves gateway A → gateway B → direct access without a handshake, real devices
//! complete their handshakes under a flood, and a session over its quota is held to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gateway::{Hooks, TapPoint};
use relay_protocol::{DeviceFrame, SessionId};
use relay_tests::lifecycle::{device_entry, run_devices, Admin, Factory};
use relay_tests::procs::{binary, run};
use relay_tests::recorder::Recorder;
use relay_tests::{
    fleet, metrics, start_core, start_gateway, start_gateway_on, verify_store, Deployment,
};

/// Held by the two tests that load the machine (1000 meters and a forged blast; a flood): they
/// measure behaviour under their own load, not under each other's, when the harness runs this
/// file's tests in parallel.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn counter(text: &str, name: &str, labels: &str) -> f64 {
    metrics::value(text, name, labels)
}

/// Sends `count` AdmittedTransport frames with random counters, ciphertexts and tags, addressed to
/// `sessions` in turn, paced in bursts of 1000 every 10 ms (what a socket buffer absorbs).
fn forge(target: SocketAddr, sessions: &[SessionId], count: usize) -> anyhow::Result<usize> {
    use rand::{Rng, RngCore};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut rng = rand::thread_rng();
    let mut ciphertext = [0u8; 48];
    let mut sent = 0;
    for (i, session) in sessions.iter().cycle().take(count).enumerate() {
        rng.fill_bytes(&mut ciphertext);
        let frame = DeviceFrame::AdmittedTransport {
            receiver: *session,
            counter: rng.gen(),
            ciphertext: &ciphertext,
            tag: rng.gen(),
        }
        .to_vec();
        socket.send_to(&frame, target)?;
        sent += 1;
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(sent)
}

/// 1000 admitted meters deliver every reading while 100,000 forged frames for their own session
/// ids are thrown at the gateway: the gateway drops them (bad admission tag, counted) and the
/// core never sees one (no authentication failure, nothing received that the gateway did not
/// forward).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_frames_for_admitted_sessions_stop_at_the_gateway() -> anyhow::Result<()> {
    const METERS: usize = 1000;
    const FORGED: usize = 100_000;
    let _heavy = HEAVY.lock().await;
    let dep = Deployment::new(METERS as u32, 1)?;
    let core = start_core(&dep, None).await?;
    let recorder = Arc::new(Recorder::default());
    let hooks = Hooks {
        tap: Some(recorder.clone()),
    };
    let gw = start_gateway(&dep, 1, core.quic, hooks).await?;
    let mut opts = fleet(
        &dep,
        gw.devices,
        dep.devices(0..METERS)?,
        8,
        Duration::from_millis(700),
    );
    opts.drain_timeout = Duration::from_secs(20);
    let run = tokio::spawn(device_sim::run_fleet(opts, None));

    // Every meter has sent at least one admitted frame: their session ids are known.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let sessions = loop {
        let ids = recorder.admitted_sessions(TapPoint::DeviceRx);
        if ids.len() >= METERS {
            break ids;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} meters admitted",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let target = gw.devices;
    let sent = tokio::task::spawn_blocking(move || forge(target, &sessions, FORGED)).await??;
    assert_eq!(sent, FORGED);

    let summary = run.await??;
    assert_eq!(
        summary.acknowledged,
        (METERS * 8) as u64,
        "a meter lost readings"
    );
    assert_eq!(verify_store(&dep, &summary, 64)?, (METERS * 8) as u64);

    let g = gw.metrics().await?;
    let dropped = counter(
        &g,
        "gateway_frames_dropped_total",
        "reason=\"admission_mac\"",
    );
    // Loopback loses nothing at this pace; allow for a socket buffer overflowing on a busy host.
    assert!(
        dropped >= 0.99 * FORGED as f64 && dropped <= FORGED as f64,
        "gateway dropped {dropped} forged frames of {FORGED}"
    );
    let c = core.metrics().await?;
    for reason in ["authentication", "unknown_session", "replay"] {
        assert_eq!(
            counter(
                &c,
                "core_frames_dropped_total",
                &format!("reason=\"{reason}\"")
            ),
            0.0,
            "a forged frame reached the core ({reason}):\n{c}"
        );
    }
    let forwarded = counter(&g, "gateway_frames_forwarded_total", "direction=\"uplink\"");
    let received = counter(&c, "core_frames_received_total", "access=\"gateway\"");
    assert!(
        received <= forwarded && forwarded < FORGED as f64,
        "core received {received}, gateway forwarded {forwarded}"
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// One wake of the factory's single sleepy meter through `target`: one reading, acknowledged;
/// returns its summary entry.
async fn wake_once(
    factory: &Factory,
    target: SocketAddr,
    core_key: &str,
) -> anyhow::Result<serde_json::Value> {
    let once = ["--sleepy", "--wake-every-ms", "100", "--readings", "1"];
    let summary = run_devices(factory, &factory.serials, target, core_key, &once, &[])
        .await?
        .ok()?
        .json()?;
    let d = device_entry(&summary, &factory.serials[0])?.clone();
    assert_eq!(d["readings_acknowledged"], 1, "{d}");
    Ok(d)
}

fn handshakes(core_metrics: &str) -> f64 {
    metrics::sum(core_metrics, "core_handshakes_total")
}

/// A sleepy meter sends a reading and sleeps (its process ends, its session persisted in its
/// device directory); the gateway restarts and forgets every admission; the meter wakes and
/// delivers its next reading in one datagram with no handshake: the new gateway asks the core
/// for the session's admission and forwards it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleepy_meter_resumes_through_a_restarted_gateway_in_one_datagram() -> anyhow::Result<()>
{
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "zz-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();
    wake_once(&factory, gw.devices, &core_key).await?;

    let devices_at = gw.devices;
    gw.stop().await?;
    let gw = start_gateway_on(&dep, 1, core.quic, Hooks::default(), Some(devices_at)).await?;
    let before = handshakes(&core.metrics().await?);

    let d = wake_once(&factory, gw.devices, &core_key).await?;
    assert_eq!(d["handshakes_started"], 0, "the meter handshook: {d}");
    assert_eq!(d["frames_sent"], 1, "more than one datagram: {d}");

    let c = core.metrics().await?;
    assert_eq!(handshakes(&c), before, "the core saw a handshake:\n{c}");
    let g = gw.metrics().await?;
    assert_eq!(
        counter(&g, "gateway_device_frames_received_total", ""),
        1.0,
        "{g}"
    );
    assert!(
        counter(&g, "gateway_admission_queries_total", "") >= 1.0,
        "{g}"
    );
    assert_eq!(dep.store()?.readings_of(&serial)?.len(), 2);
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// A meter streaming readings moves from gateway A to gateway B to direct access on its open
/// session: no new handshake, every reading stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_moves_gateway_a_to_b_to_direct_access_mid_stream() -> anyhow::Result<()> {
    let dep = Deployment::new(1, 2)?;
    let core = start_core(&dep, None).await?;
    let gw_a = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let gw_b = start_gateway(&dep, 2, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "mv-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();

    // Provisioned and admitted through A; the session is persisted in the device directory.
    wake_once(&factory, gw_a.devices, &core_key).await?;
    let before = handshakes(&core.metrics().await?);

    const READINGS: u64 = 60;
    let to_b = format!("{}@1500", gw_b.devices);
    let to_direct = format!("{}@3000", core.direct);
    let readings = READINGS.to_string();
    let moved = run_devices(
        &factory,
        &factory.serials,
        gw_a.devices,
        &core_key,
        &[
            "--sleepy",
            "--wake-every-ms",
            "75",
            "--readings",
            &readings,
            "--move-to",
            &to_b,
            "--move-to",
            &to_direct,
        ],
        &[],
    )
    .await?
    .ok()?
    .json()?;
    let d = device_entry(&moved, &serial)?;
    assert_eq!(d["readings_acknowledged"], READINGS, "{d}");
    assert_eq!(d["handshakes_started"], 0, "a new handshake: {d}");

    let c = core.metrics().await?;
    assert_eq!(handshakes(&c), before, "the core saw a handshake:\n{c}");
    assert!(
        counter(&c, "core_frames_received_total", "access=\"direct\"") > 0.0,
        "nothing arrived directly:\n{c}"
    );
    let a = gw_a.metrics().await?;
    let b = gw_b.metrics().await?;
    for (name, m) in [("A", &a), ("B", &b)] {
        assert!(
            counter(m, "gateway_frames_forwarded_total", "direction=\"uplink\"") > 0.0,
            "nothing went through gateway {name}:\n{m}"
        );
    }
    assert!(
        counter(&b, "gateway_admission_queries_total", "") >= 1.0,
        "{b}"
    );
    let rows = dep.store()?.readings_of(&serial)?;
    let mut seqs: Vec<_> = rows.iter().map(|(seq, _)| *seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), rows.len(), "a reading stored twice");
    assert_eq!(rows.len() as u64, READINGS + 1, "readings lost or added");
    gw_a.stop().await?;
    gw_b.stop().await?;
    core.stop().await?;
    Ok(())
}

/// Forged handshake initiations from 4000 loopback addresses at 20,000 per second (each address
/// at its gateway bucket's rate, so all pass the gateway) — several times what the core can answer
/// with Diffie-Hellman (about 4000 per second on 2 cores) — while 200 real meters start: the gateway's
/// per-source buckets and the core's cookie challenge keep the flood from taking the real
/// devices' place, and at least 99% of them complete their handshake and deliver their readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_handshakes_complete_under_a_flood_of_forged_ones() -> anyhow::Result<()> {
    const METERS: usize = 200;
    let _heavy = HEAVY.lock().await;
    let dep = Deployment::new(METERS as u32, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let program = binary("device-sim")?;
    let target = gw.devices.to_string();
    let flood = tokio::spawn(async move {
        run(
            &program,
            &[
                "flood",
                "--target",
                &target,
                "--sources",
                "4000",
                "--rate",
                "20000",
                "--duration-secs",
                "25",
                "--json",
            ],
            &[],
            Duration::from_secs(60),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut opts = fleet(
        &dep,
        gw.devices,
        dep.devices(0..METERS)?,
        3,
        Duration::from_millis(500),
    );
    // The meters' retries (1 s, doubling) all fall inside the flood, which outlasts their run.
    opts.drain_timeout = Duration::from_secs(15);
    let summary = device_sim::run_fleet(opts, None).await?;
    let flood = flood.await??.ok()?.json()?;

    let complete = summary
        .per_device
        .iter()
        .filter(|d| d.stats.handshakes >= 1 && d.unacked.is_empty())
        .count();
    let c = core.metrics().await?;
    let g = gw.metrics().await?;
    eprintln!(
        "{complete} of {METERS} meters completed under {} forged initiations/s",
        flood["sent_per_sec"]
    );
    let stuck: Vec<_> = summary
        .per_device
        .iter()
        .filter(|d| d.stats.handshakes == 0 || !d.unacked.is_empty())
        .take(3)
        .map(|d| format!("{:?}", d.stats))
        .collect();
    assert!(
        complete * 100 >= METERS * 99,
        "only {complete} of {METERS} meters completed; flood {flood}\nstuck: {stuck:#?}\ngateway:\n{g}\ncore:\n{c}"
    );
    let sent = flood["sent"]
        .as_f64()
        .context("flood summary has no `sent`")?;
    assert!(sent >= 100_000.0, "the flood sent only {sent}: {flood}");
    let cookies = counter(&c, "core_cookie_replies_total", "");
    assert!(cookies > 0.0, "the core never asked for a cookie:\n{c}");
    let dh = metrics::sum(&c, "core_handshakes_total");
    assert!(
        dh < sent / 4.0,
        "the core did Diffie-Hellman for {dh} of {sent} forged initiations"
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// A session over the quota its profile sets is held to it at the gateway: the excess is dropped
/// and counted there and never reaches the core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_its_quota_is_held_to_it_at_the_gateway() -> anyhow::Result<()> {
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let profile = serde_json::json!({
        "report_interval_secs": 60,
        "report_bytes": 16,
        "threshold": 0,
        "quota": {"frames": 5, "bytes": 100000, "interval_secs": 600},
    });
    admin
        .ok(
            &admin.operator,
            "PUT",
            "/v1/profiles/tight",
            Some(relay_ops::client::Body::json(&serde_json::to_vec(
                &profile,
            )?)),
        )
        .await?;
    let factory = Factory::manufacture(&dep, 1, "qt-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "tight").await?;
    let serial = factory.serials[0].clone();

    let out = run_devices(
        &factory,
        &factory.serials,
        gw.devices,
        &core_key,
        &[
            "--readings",
            "20",
            "--interval-ms",
            "20",
            "--drain-timeout-ms",
            "2000",
            "--allow-refused",
        ],
        &[],
    )
    .await?;
    let summary = out.json()?;
    let d = device_entry(&summary, &serial)?;
    let acked = d["readings_acknowledged"].as_u64().unwrap_or(0);
    assert!(acked <= 5, "{acked} readings passed a 5-frame quota: {d}");
    let g = gw.metrics().await?;
    assert!(
        counter(&g, "gateway_frames_dropped_total", "reason=\"quota\"") >= 10.0,
        "{g}"
    );
    let stored = dep.store()?.readings_of(&serial)?.len();
    assert!(stored <= 5, "{stored} readings stored");
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
