//! Device authentication at the core: unknown, suspended and revoked keys are refused and counted,
//! and the other devices are unaffected.

use std::time::Duration;

use core_stub::SubscriptionStatus;
use device_sim::DeviceIdentity;
use gateway::Hooks;
use relay_protocol::session::StaticKeypair;
use relay_tests::{fleet, metrics, start_core, start_gateway, verify_store, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_suspended_and_revoked_keys_are_refused_and_others_unaffected() -> anyhow::Result<()>
{
    let dep = Deployment::new(12, 1)?;
    // Statuses are read when the core starts.
    let store = dep.store()?;
    let mut devices = dep.devices(0..12)?;
    store.set_status(&devices[10].serial, SubscriptionStatus::Suspended)?;
    store.set_status(&devices[11].serial, SubscriptionStatus::Revoked)?;
    drop(store);
    devices.push(DeviceIdentity {
        serial: "intruder".into(),
        keypair: StaticKeypair::generate()?,
    });

    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let mut opts = fleet(&dep, gw.devices, devices, 5, Duration::from_millis(50));
    opts.drain_timeout = Duration::from_secs(4);
    let summary = device_sim::run_fleet(opts, None).await?;

    for d in &summary.per_device {
        match d.serial.as_str() {
            "intruder" | "meter-00011" | "meter-00012" => {
                assert!(d.acked.is_empty(), "{} got readings acknowledged", d.serial);
                assert_eq!(d.stats.handshakes, 0, "{} completed a handshake", d.serial);
            }
            _ => assert!(d.unacked.is_empty(), "{} lost readings", d.serial),
        }
    }
    assert_eq!(summary.acknowledged, 50);
    // The intruder has no subscription to look up; the registered devices' readings are all there.
    let mut registered = summary.clone();
    registered.per_device.retain(|d| d.serial != "intruder");
    assert_eq!(verify_store(&dep, &registered, 64)?, 50);
    let m = core.metrics().await?;
    for result in ["unknown_key", "suspended", "revoked"] {
        let n = metrics::value(&m, "core_handshakes_total", &format!("result=\"{result}\""));
        assert!(n >= 1.0, "{result} not counted:\n{m}");
    }
    assert_eq!(
        metrics::value(&m, "core_handshakes_total", "result=\"accepted\""),
        10.0
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// One device address flooding the gateway with handshake initiations (forged: random Noise
/// bytes) has everything past its burst and rate dropped at the gateway, counted by reason; the
/// core sees only what the bucket let through, and the meters on other addresses deliver
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_flooding_handshakes_is_limited_at_the_gateway_and_others_are_unaffected(
) -> anyhow::Result<()> {
    let dep = Deployment::new(20, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let opts = fleet(
        &dep,
        gw.devices,
        dep.devices(0..20)?,
        5,
        Duration::from_millis(100),
    );
    let run = tokio::spawn(device_sim::run_fleet(opts, None));

    const FLOOD: u32 = 3000;
    let flooder = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let mut frame = vec![1u8, 1];
        frame.extend_from_slice(&i.to_be_bytes());
        frame.extend((0..111u32).map(|k| (k.wrapping_mul(31).wrapping_add(i)) as u8));
        flooder.send_to(&frame, gw.devices).await?;
        if i % 200 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let summary = run.await??;
    for d in &summary.per_device {
        assert!(d.unacked.is_empty(), "{} lost readings", d.serial);
        assert_eq!(d.acked.len(), 5, "{}", d.serial);
    }
    verify_store(&dep, &summary, 64)?;

    // The default bucket: a burst of 10, then 5 per second.
    let let_through = 10.0 + 5.0 * (flood_secs + 1.0);
    let gw_m = gw.metrics().await?;
    let dropped = metrics::value(
        &gw_m,
        "gateway_frames_dropped_total",
        "reason=\"handshake_rate\"",
    );
    assert!(
        dropped >= f64::from(FLOOD) - let_through,
        "only {dropped} of {FLOOD} dropped in {flood_secs:.2} s"
    );
    let core_m = core.metrics().await?;
    let failed = metrics::value(&core_m, "core_handshakes_total", "result=\"failed\"");
    assert!(
        failed <= let_through,
        "{failed} forged handshakes reached the core (at most {let_through:.0} expected)"
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
