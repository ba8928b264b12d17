//! Device lifecycle through the admin API: a device sending through the gateway is suspended
//! mid-stream and no reading of it is stored after the API answered; the others carry on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway::Hooks;
use relay_tests::{
    fleet, metrics, start_core, start_gateway, verify_store, wait_for_readings, Deployment,
};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_mid_stream_stops_the_device_at_once_and_spares_the_others() -> anyhow::Result<()>
{
    let dep = Deployment::new(6, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let devices = dep.devices(0..6)?;
    let target = devices[0].serial.clone();
    let mut opts = fleet(&dep, gw.devices, devices, 40, Duration::from_millis(50));
    opts.drain_timeout = Duration::from_secs(3);
    let run = tokio::spawn(device_sim::run_fleet(opts, None));

    // Wait until the device is streaming.
    let store = dep.store()?;
    wait_for_readings(
        &store,
        std::slice::from_ref(&target),
        3,
        Duration::from_secs(4),
    )
    .await?;

    let token = std::fs::read_to_string(dep.path().join("admin-operator.token"))?;
    let answer = relay_ops::client::request(
        core.admin,
        "POST",
        &format!("/v1/devices/{target}/suspend"),
        Some(token.trim()),
        None,
        Duration::from_secs(10),
    )
    .await?;
    let answered_ms = now_ms();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let stored_at_answer = store.readings_of(&target)?.len();

    let summary = run.await??;
    // Readings are stamped when the core opens them: none of the suspended device's is newer
    // than the API's answer (so it stopped within that round trip, well under a second).
    let stats = store.stats()?;
    let d = stats
        .devices
        .iter()
        .find(|d| d.serial == target)
        .ok_or_else(|| anyhow::anyhow!("{target} not in stats"))?;
    assert!(
        d.last_reading_ms.is_some_and(|t| t <= answered_ms),
        "a reading of {target} was stored after the suspension: {:?} > {answered_ms}",
        d.last_reading_ms
    );
    assert_eq!(d.status.as_str(), "suspended");
    // At most the batch already being committed when the answer went out.
    assert!(store.readings_of(&target)?.len() <= stored_at_answer + 1);

    for d in &summary.per_device {
        if d.serial == target {
            assert!(!d.unacked.is_empty(), "{target} kept being acknowledged");
        } else {
            assert!(d.unacked.is_empty(), "{} lost readings", d.serial);
            assert_eq!(d.acked.len(), 40, "{}", d.serial);
        }
    }
    verify_store(&dep, &summary, 64)?;
    let m = core.metrics().await?;
    // The dead session's frames stop at the gateway once the core named it (`Revoked`); those
    // already on their way end at the core.
    let gw_m = gw.metrics().await?;
    assert!(
        metrics::value(
            &m,
            "core_frames_dropped_total",
            "reason=\"unknown_session\""
        ) + metrics::value(&gw_m, "gateway_frames_dropped_total", "reason=\"revoked\"")
            >= 1.0
    );
    assert_eq!(
        metrics::value(&m, "core_lifecycle_events_total", "event=\"suspend\""),
        1.0
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// Revocation reaches the gateway: once the API answered, frames of the revoked device are dropped
/// at the gateway (`reason="revoked"`), and from one second after the answer on the core sees
/// none of them, while the other devices keep streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_a_device_off_at_core_and_gateway_within_one_second() -> anyhow::Result<()>
{
    let dep = Deployment::new(4, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let devices = dep.devices(0..4)?;
    let target = devices[0].serial.clone();
    let mut opts = fleet(&dep, gw.devices, devices, 60, Duration::from_millis(50));
    opts.drain_timeout = Duration::from_secs(4);
    let run = tokio::spawn(device_sim::run_fleet(opts, None));

    let store = dep.store()?;
    wait_for_readings(
        &store,
        std::slice::from_ref(&target),
        3,
        Duration::from_secs(4),
    )
    .await?;

    let token = std::fs::read_to_string(dep.path().join("admin-operator.token"))?;
    let answer = relay_ops::client::request(
        core.admin,
        "POST",
        &format!("/v1/devices/{target}/revoke"),
        Some(token.trim()),
        None,
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let answered = std::time::Instant::now();
    let stored_at_answer = store.readings_of(&target)?.len();

    // One second after the answer: what the core has seen of the dead session so far.
    tokio::time::sleep_until((answered + Duration::from_secs(1)).into()).await;
    let at_one_second = metrics::value(
        &core.metrics().await?,
        "core_frames_dropped_total",
        "reason=\"unknown_session\"",
    );

    let summary = run.await??;
    let core_m = core.metrics().await?;
    let gw_m = gw.metrics().await?;
    let revoked_at_gateway =
        metrics::value(&gw_m, "gateway_frames_dropped_total", "reason=\"revoked\"");
    assert!(
        revoked_at_gateway >= 1.0,
        "the gateway forwarded every frame of the revoked device"
    );
    assert_eq!(
        metrics::value(
            &core_m,
            "core_frames_dropped_total",
            "reason=\"unknown_session\""
        ),
        at_one_second,
        "frames of the revoked session still reached the core more than a second after the answer"
    );
    assert!(store.readings_of(&target)?.len() <= stored_at_answer + 1);
    // The device's new handshakes reach the core and are refused there, authenticated.
    assert!(metrics::value(&core_m, "core_handshakes_total", "result=\"revoked\"") >= 1.0);
    for d in &summary.per_device {
        if d.serial != target {
            assert!(d.unacked.is_empty(), "{} lost readings", d.serial);
            assert_eq!(d.acked.len(), 60, "{}", d.serial);
        }
    }
    verify_store(&dep, &summary, 64)?;
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// A sleepy meter (one reading per wake, no keepalives) gets a forced credential update at its
/// next contact, inside its session, and completes it; all its readings are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleepy_meter_gets_its_credential_update_at_its_next_wake() -> anyhow::Result<()> {
    use relay_tests::lifecycle::{device_entry, run_devices, Admin, Factory};
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "sl-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();

    let sleepy = ["--sleepy", "--wake-every-ms", "1500", "--readings", "4"];
    let run = {
        let (factory, key, target) = (factory.clone(), core_key.clone(), gw.devices);
        tokio::spawn(async move {
            run_devices(&factory, &factory.serials, target, &key, &sleepy, &[]).await
        })
    };
    let store = dep.store()?;
    wait_for_readings(
        &store,
        std::slice::from_ref(&serial),
        1,
        Duration::from_secs(5),
    )
    .await?;
    let first_key = store
        .subscriptions()?
        .into_iter()
        .find(|s| s.serial == serial)
        .map(|s| s.public_key)
        .ok_or_else(|| anyhow::anyhow!("{serial} never provisioned"))?;
    // Asleep now: the notice waits for its next wake.
    admin
        .ok(
            &admin.operator,
            "POST",
            &format!("/v1/devices/{serial}/rotate"),
            None,
        )
        .await?;

    let summary = run.await??.ok()?.json()?;
    let d = device_entry(&summary, &serial)?;
    assert_eq!(d["readings_acknowledged"], 4, "{d}");
    assert!(d["key_updates"].as_u64().unwrap_or(0) >= 1, "{d}");
    let now_key = store
        .subscriptions()?
        .into_iter()
        .find(|s| s.serial == serial)
        .map(|s| s.public_key)
        .ok_or_else(|| anyhow::anyhow!("gone"))?;
    assert_ne!(now_key, first_key, "the key was not renewed");
    assert_eq!(store.readings_of(&serial)?.len(), 4);
    let m = core.metrics().await?;
    assert_eq!(
        metrics::value(&m, "core_key_updates_total", "phase=\"promoted\""),
        1.0
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

/// A suspended meter is refused (authenticated, with the reason) and keeps its readings; resumed,
/// it connects again by itself and every reading is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_meter_is_resumed_and_delivers_everything() -> anyhow::Result<()> {
    use relay_tests::lifecycle::{device_entry, run_devices, Admin, Factory};
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "su-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();

    let args = [
        "--readings",
        "30",
        "--interval-ms",
        "100",
        "--refused-retry-ms",
        "300",
        "--refused-retry-max-ms",
        "600",
        "--silence-timeout-ms",
        "500",
    ];
    let run = {
        let (factory, key, target) = (factory.clone(), core_key.clone(), gw.devices);
        tokio::spawn(async move {
            run_devices(&factory, &factory.serials, target, &key, &args, &[]).await
        })
    };
    let store = dep.store()?;
    wait_for_readings(
        &store,
        std::slice::from_ref(&serial),
        3,
        Duration::from_secs(5),
    )
    .await?;
    admin
        .ok(
            &admin.operator,
            "POST",
            &format!("/v1/devices/{serial}/suspend"),
            None,
        )
        .await?;
    let during = store.readings_of(&serial)?.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        store.readings_of(&serial)?.len() <= during + 1,
        "readings were stored while suspended"
    );
    admin
        .ok(
            &admin.operator,
            "POST",
            &format!("/v1/devices/{serial}/resume"),
            None,
        )
        .await?;

    let summary = run.await??.ok()?.json()?;
    let d = device_entry(&summary, &serial)?;
    assert_eq!(d["readings_acknowledged"], 30, "{d}");
    assert!(d["refusals"]["suspended"].as_u64().unwrap_or(0) >= 1, "{d}");
    assert_eq!(store.readings_of(&serial)?.len(), 30);
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
