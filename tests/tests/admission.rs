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
