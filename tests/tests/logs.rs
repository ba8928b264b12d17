//! No key and no plaintext in any log line: both daemons run as processes at the most verbose log
//! level while meters send readings, and their whole output is searched for every secret of the
//! deployment and for the readings' contents.

use std::time::Duration;

use relay_tests::procs::{binary, Daemon};
use relay_tests::{fleet, verify_store, wait_ready, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_key_and_no_plaintext() -> anyhow::Result<()> {
    let dep = Deployment::new(10, 1)?;
    let logs = tempfile::tempdir()?;
    let (core_log, gw_log) = (
        logs.path().join("core.log"),
        logs.path().join("gateway.log"),
    );
    let config = dep.core_config().display().to_string();
    let core_args: Vec<String> = [
        "run",
        "--config",
        &config,
        "--listen-quic",
        "127.0.0.1:0",
        "--listen-direct",
        "127.0.0.1:0",
        "--listen-admin",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    let limit = Duration::from_secs(30);
    let core = Daemon::start_logged(
        &binary("core-stub")?,
        &core_args,
        Some(("trace", &core_log)),
        limit,
    )
    .await?;
    let gw_config = dep.gateway_config(1).display().to_string();
    let quic = core.addr("quic")?.to_string();
    let gw_args: Vec<String> = [
        "--config",
        &gw_config,
        "--listen-devices",
        "127.0.0.1:0",
        "--listen-admin",
        "127.0.0.1:0",
        "--core",
        &quic,
    ]
    .map(String::from)
    .to_vec();
    let gw = Daemon::start_logged(
        &binary("gateway")?,
        &gw_args,
        Some(("trace", &gw_log)),
        limit,
    )
    .await?;
    wait_ready(gw.addr("admin")?).await?;

    // Half the fleet through the gateway, half direct: both paths log.
    let a = device_sim::run_fleet(
        fleet(
            &dep,
            gw.addr("devices")?,
            dep.devices(0..5)?,
            5,
            Duration::from_millis(20),
        ),
        None,
    );
    let b = device_sim::run_fleet(
        fleet(
            &dep,
            core.addr("direct")?,
            dep.devices(5..10)?,
            5,
            Duration::from_millis(20),
        ),
        None,
    );
    let (a, b) = tokio::try_join!(a, b)?;
    assert_eq!(a.lost + b.lost, 0);
    gw.kill().await?;
    core.kill().await?;

    let text = std::fs::read_to_string(&core_log)? + &std::fs::read_to_string(&gw_log)?;
    assert!(
        text.lines().count() > 20,
        "the logs are nearly empty: the test would prove nothing"
    );

    // Every secret of the deployment: the core's Noise key, every device key, every TLS key.
    let mut secrets = vec![std::fs::read_to_string(dep.path().join("core/noise.key"))?
        .trim()
        .to_owned()];
    for d in dep.devices(0..10)? {
        secrets.push(d.keypair.private_hex_for_storage());
        secrets.push(d.keypair.public().to_hex());
    }
    for pem in ["ca.key", "core/key.pem", "gateway-1/key.pem"] {
        let body = std::fs::read_to_string(dep.path().join(pem))?;
        secrets.extend(
            body.lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 16)
                .map(String::from),
        );
    }
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a key appears in the logs");
    }
    // No reading's plaintext.
    verify_store(&dep, &a, 64)?;
    let store = dep.store()?;
    for d in a.per_device.iter().chain(&b.per_device) {
        for (_, data) in store.readings_of(&d.serial)? {
            let shown = String::from_utf8_lossy(&data[..24]).into_owned();
            assert!(!text.contains(&shown), "a reading appears in the logs");
        }
    }
    assert!(!text.contains("|seq="));
    Ok(())
}
