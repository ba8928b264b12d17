//! Crashes: the core and the gateway run as real processes and are killed with SIGKILL in the middle
//! of traffic, then restarted. Every acknowledged reading is in the store exactly once, and the
//! devices recover without losing anything.

use std::time::Duration;

use gateway::Hooks;
use relay_tests::procs::{binary, Daemon};
use relay_tests::{
    fleet, metrics, start_core, start_gateway, verify_store, wait_ready, Deployment,
};

const READY: Duration = Duration::from_secs(30);

fn core_args(dep: &Deployment, quic: &str) -> Vec<String> {
    let config = dep.core_config().display().to_string();
    [
        "run",
        "--config",
        &config,
        "--listen-quic",
        quic,
        "--listen-direct",
        "127.0.0.1:0",
        "--listen-admin",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec()
}

fn gateway_args(dep: &Deployment, devices: &str, core: &str) -> Vec<String> {
    let config = dep.gateway_config(1).display().to_string();
    [
        "--config",
        &config,
        "--listen-devices",
        devices,
        "--listen-admin",
        "127.0.0.1:0",
        "--core",
        core,
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_killed_mid_traffic_loses_no_acknowledged_reading() -> anyhow::Result<()> {
    let dep = Deployment::new(50, 1)?;
    let program = binary("core-stub")?;
    let core = Daemon::start(&program, &core_args(&dep, "127.0.0.1:0"), READY).await?;
    let quic = core.addr("quic")?;
    let gw = start_gateway(&dep, 1, quic, Hooks::default()).await?;

    let mut opts = fleet(
        &dep,
        gw.devices,
        dep.devices(0..50)?,
        60,
        Duration::from_millis(100),
    );
    opts.drain_timeout = Duration::from_secs(60);
    let traffic = tokio::spawn(device_sim::run_fleet(opts, None));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = dep.store()?.count_readings()?;
    assert!(
        before > 0,
        "nothing stored before the crash: the test would prove nothing"
    );
    core.kill().await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let core = Daemon::start(&program, &core_args(&dep, &quic.to_string()), READY).await?;

    let summary = traffic.await??;
    assert_eq!(summary.lost, 0, "{summary:?}");
    assert_eq!(summary.acknowledged, 3000);
    assert_eq!(verify_store(&dep, &summary, 64)?, 3000);
    let g = gw.metrics().await?;
    assert!(
        metrics::value(&g, "gateway_uplink_connects_total", "") >= 2.0,
        "the gateway never reconnected"
    );
    // Devices noticed the core had lost their sessions and handshook again.
    assert!(summary.handshakes >= 100, "{summary:?}");
    gw.stop().await?;
    core.kill().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_traffic_devices_recover_and_nothing_is_lost() -> anyhow::Result<()> {
    let dep = Deployment::new(50, 1)?;
    let core = start_core(&dep, None).await?;
    let program = binary("gateway")?;
    let quic = core.quic.to_string();
    let gw = Daemon::start(&program, &gateway_args(&dep, "127.0.0.1:0", &quic), READY).await?;
    wait_ready(gw.addr("admin")?).await?;
    let devices_addr = gw.addr("devices")?;

    let mut opts = fleet(
        &dep,
        devices_addr,
        dep.devices(0..50)?,
        60,
        Duration::from_millis(100),
    );
    opts.drain_timeout = Duration::from_secs(60);
    let traffic = tokio::spawn(device_sim::run_fleet(opts, None));

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(dep.store()?.count_readings()? > 0);
    gw.kill().await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let gw = Daemon::start(
        &program,
        &gateway_args(&dep, &devices_addr.to_string(), &quic),
        READY,
    )
    .await?;
    wait_ready(gw.addr("admin")?).await?;

    let summary = traffic.await??;
    assert_eq!(summary.lost, 0, "{summary:?}");
    assert_eq!(summary.acknowledged, 3000);
    assert_eq!(verify_store(&dep, &summary, 64)?, 3000);
    let m = core.metrics().await?;
    assert_eq!(metrics::value(&m, "core_readings_stored_total", ""), 3000.0);
    gw.kill().await?;
    core.stop().await?;
    Ok(())
}
