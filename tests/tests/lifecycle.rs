//! Device lifecycle through the admin API: a device sending through the gateway is suspended
//! mid-stream and no reading of it is stored after the API answered; the others carry on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway::Hooks;
use relay_tests::{fleet, metrics, start_core, start_gateway, verify_store, Deployment};

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
    for _ in 0..200 {
        if store.readings_of(&target)?.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        store.readings_of(&target)?.len() >= 3,
        "{target} never streamed"
    );

    let token = std::fs::read_to_string(dep.path().join("admin-operator.token"))?;
    let answer = relay_ops::client::request(
        core.admin,
        "POST",
        &format!("/v1/devices/{target}/suspend"),
        Some(token.trim()),
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
    assert!(
        metrics::value(
            &m,
            "core_frames_dropped_total",
            "reason=\"unknown_session\""
        ) >= 1.0
    );
    assert_eq!(
        metrics::value(&m, "core_lifecycle_events_total", "event=\"suspend\""),
        1.0
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
