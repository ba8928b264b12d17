//! Both daemons' admin endpoints: `promtool check metrics` passes on each scrape, `/live` and
//! `/ready` answer, build info is exported, and no metric carries a per-device label.

use std::time::Duration;

use gateway::Hooks;
use relay_tests::{fleet, metrics, start_core, start_gateway, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_carry_no_device_labels() -> anyhow::Result<()> {
    let dep = Deployment::new(10, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let devices = dep.devices(0..10)?;
    let serials: Vec<String> = devices.iter().map(|d| d.serial.clone()).collect();
    let keys: Vec<String> = devices
        .iter()
        .map(|d| d.keypair.public().to_hex())
        .collect();
    let s = device_sim::run_fleet(
        fleet(&dep, gw.devices, devices, 3, Duration::from_millis(20)),
        None,
    )
    .await?;
    assert_eq!(s.lost, 0);

    for (name, admin, prefix) in [
        ("core", core.admin, "core_"),
        ("gateway", gw.admin, "gateway_"),
    ] {
        assert_eq!(
            metrics::http_get(admin, "/live").await?.0,
            200,
            "{name} /live"
        );
        assert_eq!(
            metrics::http_get(admin, "/ready").await?.0,
            200,
            "{name} /ready"
        );
        let text = metrics::scrape(admin).await?;
        assert!(
            text.contains(&format!("{prefix}build_info{{version=\"")),
            "{name}: no build_info"
        );
        metrics::promtool_check(&text)?;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.starts_with(prefix),
                "{name}: metric outside its namespace: {line}"
            );
            let labels = line
                .split_once('{')
                .map_or("", |(_, l)| l.split('}').next().unwrap_or(""));
            for label in labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, _)| k)
            {
                assert!(
                    [
                        "version",
                        "reason",
                        "direction",
                        "result",
                        "access",
                        "event",
                        "via",
                        "phase",
                        "le"
                    ]
                    .contains(&label),
                    "{name}: unexpected label {label:?} in {line}"
                );
            }
        }
        for id in serials.iter().chain(&keys) {
            assert!(
                !text.contains(id.as_str()),
                "{name}: a device identity in the metrics"
            );
        }
    }
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
