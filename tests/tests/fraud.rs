//! The fraud detector against a real clone: a copy of a meter's subscription key (not its factory
//! key, which never leaves the element) used through a second gateway while the genuine meter
//! streams through the first. The core sees one subscription on two routes at once, quarantines it,
//! and the genuine meter recovers through its factory identity with a new key; the clone is left
//! with a dead key.

use std::time::Duration;

use gateway::Hooks;
use relay_tests::lifecycle::{device_entry, path_str, Admin, Factory, RUN_LIMIT};
use relay_tests::procs::{binary, run};
use relay_tests::{metrics, start_core, start_gateway, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cloned_onto_a_second_gateway_is_detected_and_the_genuine_meter_recovers(
) -> anyhow::Result<()> {
    let dep = Deployment::new(1, 2)?;
    let core = start_core(&dep, None).await?;
    let gw1 = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let gw2 = start_gateway(&dep, 2, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "cl-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();

    // The genuine meter: provisioned, then streaming through gateway 1.
    relay_tests::lifecycle::run_devices(
        &factory,
        &factory.serials,
        gw1.devices,
        &core_key,
        &["--readings", "2", "--interval-ms", "50"],
        &[],
    )
    .await?
    .ok()?;
    let store = dep.store()?;
    let original_key = store
        .subscriptions()?
        .into_iter()
        .find(|s| s.serial == serial)
        .map(|s| s.public_key)
        .ok_or_else(|| anyhow::anyhow!("not provisioned"))?;
    let genuine = {
        let factory = factory.clone();
        let key = core_key.clone();
        let target = gw1.devices;
        tokio::spawn(async move {
            relay_tests::lifecycle::run_devices(
                &factory,
                &factory.serials,
                target,
                &key,
                &[
                    "--readings",
                    "40",
                    "--interval-ms",
                    "100",
                    "--drain-timeout-ms",
                    "30000",
                ],
                &[],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The clone: the same subscription key, through gateway 2.
    let clone_dir = factory.device_dir(&serial);
    let target2 = gw2.devices.to_string();
    let clone = run(
        &binary("device-sim")?,
        &[
            "run",
            "--clone-of",
            path_str(&clone_dir)?,
            "--target",
            &target2,
            "--core-key",
            &core_key,
            "--readings",
            "40",
            "--interval-ms",
            "100",
            "--duration-secs",
            "6",
            "--drain-timeout-ms",
            "2000",
            "--allow-refused",
            "--json",
        ],
        &[],
        RUN_LIMIT,
    )
    .await?
    .ok()?
    .json()?;

    let genuine = genuine.await??.ok()?.json()?;
    let g = device_entry(&genuine, &serial)?;
    assert_eq!(g["working"], true, "genuine: {g}");
    assert_eq!(g["readings_acknowledged"], 40, "genuine: {g}");
    assert!(
        g["refusals"]["quarantined"].as_u64().unwrap_or(0) >= 1,
        "the genuine meter was never told: {g}"
    );
    let c = device_entry(&clone, &serial)?;
    assert_eq!(c["working"], false, "the clone still works: {c}");

    let m = core.metrics().await?;
    assert!(metrics::value(&m, "core_fraud_flags_total", "reason=\"clone\"") >= 1.0);
    // Recovered: active again under a new key bound through the factory identity.
    let view = admin
        .ok(
            &admin.operator,
            "GET",
            &format!("/v1/devices/{serial}"),
            None,
        )
        .await?;
    assert_eq!(view["status"], "active", "{view}");
    let now_key = store
        .subscriptions()?
        .into_iter()
        .find(|s| s.serial == serial && s.status == core_stub::SubscriptionStatus::Active)
        .map(|s| s.public_key)
        .ok_or_else(|| anyhow::anyhow!("no active subscription"))?;
    assert_ne!(
        now_key, original_key,
        "the cloned key is still the subscription's"
    );
    let log = admin
        .ok(&admin.operator, "GET", "/v1/audit?limit=1000", None)
        .await?;
    let text = log.to_string();
    assert!(
        text.contains("quarantine"),
        "no quarantine in the audit log"
    );
    gw1.stop().await?;
    gw2.stop().await?;
    core.stop().await?;
    Ok(())
}
