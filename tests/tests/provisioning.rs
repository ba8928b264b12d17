//! Remote provisioning, building-wide activation and configuration, with the real programs:
//! factory-fresh devices made by `device-sim manufacture`, claimed and activated through the core's
//! admin API, provisioning themselves through a real gateway whose every byte is recorded.

use std::sync::Arc;
use std::time::Duration;

use gateway::Hooks;
use relay_ops::client::Body;
use relay_tests::lifecycle::{device_entry, plan, run_devices, Admin, Factory};
use relay_tests::recorder::Recorder;
use relay_tests::{metrics, start_core, start_gateway, wait_for_readings, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_fresh_meters_are_claimed_activated_and_provisioned_through_the_gateway(
) -> anyhow::Result<()> {
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let recorder = Arc::new(Recorder::default());
    let gw = start_gateway(
        &dep,
        1,
        core.quic,
        Hooks {
            tap: Some(recorder.clone()),
        },
    )
    .await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();

    let factory = Factory::manufacture(&dep, 4, "fm-").await?;
    let (claimed, unclaimed) = factory.serials.split_at(3);
    admin.claim(&factory.manifest_of(claimed)).await?;
    admin.activate(claimed, "default").await?;

    let out = run_devices(
        &factory,
        claimed,
        gw.devices,
        &core_key,
        &["--readings", "5", "--interval-ms", "50"],
        &[],
    )
    .await?
    .ok()?;
    let summary = out.json()?;
    assert_eq!(summary["lifecycle"]["provisioned"], 3, "{summary}");
    for serial in claimed {
        let d = device_entry(&summary, serial)?;
        assert_eq!(d["provisioned"], true, "{d}");
        assert_eq!(d["readings_acknowledged"], 5, "{d}");
        assert_eq!(d["config"]["version"], 1, "{d}");
    }

    // A device nobody claimed is refused, authenticated, and counted; it never gets a session.
    let refused = run_devices(
        &factory,
        unclaimed,
        gw.devices,
        &core_key,
        &[
            "--readings",
            "1",
            "--duration-secs",
            "2",
            "--drain-timeout-ms",
            "1500",
            "--allow-refused",
        ],
        &[],
    )
    .await?
    .ok()?
    .json()?;
    let d = device_entry(&refused, &unclaimed[0])?;
    assert_eq!(d["provisioned"], false, "{d}");
    assert!(d["refusals"]["unclaimed"].as_u64().unwrap_or(0) >= 1, "{d}");

    // Every acknowledged reading is stored under the new subscription; the gateway carried neither
    // the new subscription keys nor any reading in the clear.
    let store = dep.store()?;
    let subs = store.subscriptions()?;
    for serial in claimed {
        let rows = store.readings_of(serial)?;
        assert_eq!(rows.len(), 5, "{serial}");
        let sub = subs
            .iter()
            .find(|s| &s.serial == serial)
            .ok_or_else(|| anyhow::anyhow!("{serial} has no subscription"))?;
        assert!(
            !recorder.contains(&sub.public_key.0),
            "the gateway saw {serial}'s subscription key in the clear"
        );
        for (_, data) in &rows {
            assert!(
                !recorder.contains(data),
                "the gateway saw a reading of {serial}"
            );
        }
    }
    assert!(
        recorder.count(gateway::TapPoint::DeviceRx) > 0,
        "nothing recorded"
    );

    let m = core.metrics().await?;
    assert_eq!(metrics::value(&m, "core_provisioned_total", ""), 3.0);
    assert!(metrics::value(&m, "core_handshakes_total", "result=\"unclaimed\"") >= 1.0);
    assert_eq!(metrics::value(&m, "core_devices_claimed_total", ""), 3.0);
    assert_eq!(metrics::value(&m, "core_devices_activated_total", ""), 3.0);

    // The audit log holds the claim, the activation and each provisioning.
    let log = admin
        .ok(&admin.operator, "GET", "/v1/audit?limit=1000", None)
        .await?;
    let actions: Vec<&str> = log["events"]
        .as_array()
        .or(log.as_array())
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    for want in ["claim", "activate", "provision"] {
        assert!(
            actions.contains(&want),
            "no {want} in the audit log: {actions:?}"
        );
    }
    assert_eq!(actions.iter().filter(|a| **a == "provision").count(), 3);

    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_of_1000_meters_activates_in_one_request_and_a_bad_row_changes_nothing(
) -> anyhow::Result<()> {
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();

    let factory = Factory::manufacture(&dep, 1000, "bm-").await?;
    admin.claim(&factory.manifest).await?;

    // One bad row (an unknown profile on the 500th meter, line 501 of the file): refused as a
    // whole, the row named, nothing activated.
    let mut bad = plan(&factory.serials, "default");
    let victim = &factory.serials[499];
    bad = bad.replace(
        &format!("{victim},apt-500,default"),
        &format!("{victim},apt-500,no-such-profile"),
    );
    let (status, answer) = admin
        .call(
            &admin.technician,
            "POST",
            "/v1/plans",
            Some(Body::csv(bad.as_bytes())),
        )
        .await?;
    assert_eq!(status, 422, "{answer}");
    let errors = answer["errors"].as_array().cloned().unwrap_or_default();
    assert_eq!(errors.len(), 1, "{answer}");
    assert_eq!(errors[0]["row"], 501, "{answer}");
    assert_eq!(errors[0]["serial"], victim.as_str(), "{answer}");
    let view = admin
        .ok(
            &admin.operator,
            "GET",
            &format!("/v1/devices/{}", factory.serials[0]),
            None,
        )
        .await?;
    assert_eq!(
        view["state"], "claimed",
        "the bad plan changed something: {view}"
    );
    let m = core.metrics().await?;
    assert_eq!(metrics::value(&m, "core_devices_activated_total", ""), 0.0);

    let activated = admin.activate(&factory.serials, "default").await?;
    assert_eq!(activated["activated"], 1000, "{activated}");
    let m = core.metrics().await?;
    assert_eq!(
        metrics::value(&m, "core_devices_activated_total", ""),
        1000.0
    );

    // Every one of them is active at its first contact.
    let summary = run_devices(
        &factory,
        &factory.serials,
        gw.devices,
        &core_key,
        &[
            "--readings",
            "2",
            "--interval-ms",
            "200",
            "--wave-size",
            "250",
            "--wave-interval-ms",
            "200",
        ],
        &[],
    )
    .await?
    .ok()?
    .json()?;
    assert_eq!(
        summary["lifecycle"]["provisioned"], 1000,
        "{}",
        summary["lifecycle"]
    );
    let store = dep.store()?;
    let mut stored = 0;
    for serial in &factory.serials {
        stored += store.readings_of(serial)?.len();
    }
    assert_eq!(stored, 2000);
    let m = core.metrics().await?;
    assert_eq!(metrics::value(&m, "core_provisioned_total", ""), 1000.0);
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_change_reaches_every_device_on_its_next_ack_with_no_extra_message(
) -> anyhow::Result<()> {
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 5, "pm-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;

    let run = {
        let serials = factory.serials.clone();
        let target = gw.devices;
        let key = core_key.clone();
        let factory = factory.clone();
        tokio::spawn(async move {
            run_devices(
                &factory,
                &serials,
                target,
                &key,
                // A long silence timeout: no re-handshake under load, so the only way the new
                // configuration can arrive is on an acknowledgement.
                &[
                    "--readings",
                    "40",
                    "--interval-ms",
                    "100",
                    "--silence-timeout-ms",
                    "30000",
                ],
                &[],
            )
            .await
        })
    };
    // Wait until all five are provisioned and streaming.
    let store = dep.store()?;
    wait_for_readings(&store, &factory.serials, 2, Duration::from_secs(15)).await?;
    let before = core.metrics().await?;
    let handshakes_before = metrics::sum(&before, "core_handshakes_total");

    let profile = admin
        .ok(
            &admin.operator,
            "PUT",
            "/v1/profiles/default",
            Some(Body::json(
                br#"{"report_interval_secs":30,"report_bytes":64,"threshold":5}"#,
            )),
        )
        .await?;
    assert_eq!(profile["profile"]["version"], 2, "{profile}");

    let summary = run.await??.ok()?.json()?;
    for serial in &factory.serials {
        let d = device_entry(&summary, serial)?;
        assert_eq!(d["config"]["version"], 2, "{d}");
        assert_eq!(d["config"]["report_interval_secs"], 30, "{d}");
        assert_eq!(d["config"]["threshold"], 5, "{d}");
        // The core knows which version each device runs.
        let view = admin
            .ok(
                &admin.operator,
                "GET",
                &format!("/v1/devices/{serial}"),
                None,
            )
            .await?;
        assert_eq!(view["config_version"], 2, "{view}");
    }
    let after = core.metrics().await?;
    // Exactly one push per device, riding on an acknowledgement; no handshake was needed for it.
    assert_eq!(
        metrics::value(&after, "core_config_pushes_total", "via=\"ack\""),
        5.0
    );
    assert_eq!(
        metrics::sum(&after, "core_handshakes_total"),
        handshakes_before
    );
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
