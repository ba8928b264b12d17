//! The relayed data path end to end: meters → gateway → core over real sockets, QUIC and SQLite.

use std::sync::Arc;
use std::time::Duration;

use gateway::{Hooks, TapPoint};
use relay_tests::recorder::Recorder;
use relay_tests::{fleet, metrics, start_core, start_gateway, verify_store, Deployment};

/// 200 meters × 20 readings through the gateway: the core stores exactly 4000 readings, each once
/// and unaltered, and device-sim reports nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_meters_by_twenty_readings_are_stored_exactly_once() -> anyhow::Result<()> {
    let dep = Deployment::new(200, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;

    let opts = fleet(
        &dep,
        gw.devices,
        dep.devices(0..200)?,
        20,
        Duration::from_millis(50),
    );
    let summary = device_sim::run_fleet(opts, None).await?;

    assert_eq!(summary.lost, 0, "{summary:?}");
    assert_eq!(summary.acknowledged, 4000);
    assert_eq!(dep.store()?.count_readings()?, 4000);
    assert_eq!(verify_store(&dep, &summary, 64)?, 4000);
    let m = core.metrics().await?;
    assert_eq!(metrics::value(&m, "core_readings_stored_total", ""), 4000.0);
    assert_eq!(
        metrics::value(&m, "core_handshakes_total", "result=\"accepted\""),
        summary.handshakes as f64
    );
    let g = gw.metrics().await?;
    assert!(metrics::value(&g, "gateway_frames_forwarded_total", "direction=\"uplink\"") >= 4000.0);
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// Every byte the gateway receives and sends (device link and uplink) is recorded: no reading's
/// plaintext, and no device's static public key, appears in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_never_sees_plaintext_or_device_identities() -> anyhow::Result<()> {
    let dep = Deployment::new(20, 1)?;
    let core = start_core(&dep, None).await?;
    let recorder = Arc::new(Recorder::default());
    let hooks = Hooks {
        tap: Some(recorder.clone()),
    };
    let gw = start_gateway(&dep, 1, core.quic, hooks).await?;

    let devices = dep.devices(0..20)?;
    let keys: Vec<_> = devices.iter().map(|d| *d.keypair.public()).collect();
    let summary = device_sim::run_fleet(
        fleet(&dep, gw.devices, devices, 10, Duration::from_millis(20)),
        None,
    )
    .await?;
    assert_eq!(summary.lost, 0);
    assert_eq!(verify_store(&dep, &summary, 64)?, 200);

    // The recording is not empty: every point saw traffic.
    for p in [
        TapPoint::DeviceRx,
        TapPoint::DeviceTx,
        TapPoint::UplinkTx,
        TapPoint::UplinkRx,
    ] {
        assert!(recorder.count(p) > 0, "nothing recorded at {p:?}");
    }
    // No plaintext: neither whole readings nor the marker every reading carries.
    let store = dep.store()?;
    for d in &summary.per_device {
        for (_, data) in store.readings_of(&d.serial)? {
            assert!(
                !recorder.contains(&data),
                "a reading of {} crossed the gateway in clear",
                d.serial
            );
        }
        assert!(
            !recorder.contains(d.serial.as_bytes()),
            "serial {} seen by the gateway",
            d.serial
        );
    }
    assert!(!recorder.contains(b"|seq="));
    assert!(!recorder.contains(b"kwh="));
    // No device identity: the static keys travel encrypted inside the handshake.
    for k in &keys {
        assert!(
            !recorder.contains(&k.0),
            "a device public key crossed the gateway in clear"
        );
    }
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// Direct access (R14): the same devices and frames straight to the core's UDP port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_access_uses_the_same_session_protocol() -> anyhow::Result<()> {
    let dep = Deployment::new(40, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let via_gw = device_sim::run_fleet(
        fleet(
            &dep,
            gw.devices,
            dep.devices(0..20)?,
            10,
            Duration::from_millis(20),
        ),
        None,
    );
    let direct = device_sim::run_fleet(
        fleet(
            &dep,
            core.direct,
            dep.devices(20..40)?,
            10,
            Duration::from_millis(20),
        ),
        None,
    );
    let (a, b) = tokio::try_join!(via_gw, direct)?;
    assert_eq!(a.lost + b.lost, 0);
    assert_eq!(
        verify_store(&dep, &a, 64)? + verify_store(&dep, &b, 64)?,
        400
    );
    let m = core.metrics().await?;
    assert!(metrics::value(&m, "core_frames_received_total", "access=\"direct\"") >= 200.0);
    assert!(metrics::value(&m, "core_frames_received_total", "access=\"gateway\"") >= 200.0);
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
