//! Gateway policy with the real programs (`docs/protocol.md` §11.9): a building's meters may use
//! only that building's gateway. Two gateways; a profile allowing only gateway 1 (by the name in
//! its certificate); factory-fresh meters activated with it provision and deliver through
//! gateway 1, and are refused `not_permitted` through gateway 2, before and after provisioning,
//! counted at the core, with nothing stored. A camera's stream through a gateway its profile does
//! not allow is refused `not_permitted`, authenticated, and the camera stops.

use std::sync::Arc;

use anyhow::bail;
use device_sim::video::{upload, video_bytes, UploadError, UploadOptions};
use relay_ops::client::Body;
use relay_tests::lifecycle::{device_entry, run_devices, Admin, Factory};
use relay_tests::{metrics, start_core, start_gateway, Deployment};

/// The name `core-stub init` puts in gateway 1's certificate (DNS SAN and CN).
const GATEWAY_1: &str = "gateway-1";

/// A run that expects refusals: short, and successful even if nothing was delivered.
const REFUSED_RUN: &[&str] = &[
    "--readings",
    "1",
    "--duration-secs",
    "2",
    "--drain-timeout-ms",
    "1500",
    "--allow-refused",
];

fn not_permitted(summary: &serde_json::Value, serial: &str) -> anyhow::Result<u64> {
    let d = device_entry(summary, serial)?;
    Ok(d["refusals"]["not_permitted"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_outside_its_gateway_policy_is_refused_and_counted() -> anyhow::Result<()> {
    let dep = Deployment::new(1, 2)?;
    let core = start_core(&dep, None).await?;
    let gw1 = start_gateway(&dep, 1, core.quic, gateway::Hooks::default()).await?;
    let gw2 = start_gateway(&dep, 2, core.quic, gateway::Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();

    let profile = serde_json::json!({
        "report_interval_secs": 60,
        "report_bytes": 16,
        "threshold": 0,
        "gateways": [GATEWAY_1],
        "allow_direct": false,
    });
    let body = serde_json::to_vec(&profile)?;
    let put = admin
        .ok(
            &admin.operator,
            "PUT",
            "/v1/profiles/building-a",
            Some(Body::json(&body)),
        )
        .await?;
    assert_eq!(put["profile"]["gateways"], serde_json::json!([GATEWAY_1]));

    let factory = Factory::manufacture(&dep, 2, "pa-").await?;
    let meters = &factory.serials;
    admin.claim(&factory.manifest).await?;
    admin.activate(meters, "building-a").await?;

    // Factory-fresh, through gateway 2: the provisioning handshake is refused.
    let refused = run_devices(&factory, meters, gw2.devices, &core_key, REFUSED_RUN, &[])
        .await?
        .ok()?
        .json()?;
    for serial in meters {
        let d = device_entry(&refused, serial)?;
        assert_eq!(d["provisioned"], false, "{d}");
        assert!(not_permitted(&refused, serial)? >= 1, "{d}");
    }
    let subs = dep.store()?.subscriptions()?;
    assert!(
        !subs.iter().any(|s| meters.contains(&s.serial)),
        "nothing provisioned"
    );
    let m = core.metrics().await?;
    let before = metrics::value(&m, "core_handshakes_total", "result=\"not_permitted\"");
    assert!(before >= 2.0, "counted at the core: {before}");
    assert_eq!(metrics::value(&m, "core_provisioned_total", ""), 0.0);

    // Through gateway 1: provisioned, and every reading delivered.
    let out = run_devices(
        &factory,
        meters,
        gw1.devices,
        &core_key,
        &["--readings", "3", "--interval-ms", "50"],
        &[],
    )
    .await?
    .ok()?
    .json()?;
    assert_eq!(out["lifecycle"]["provisioned"], 2, "{out}");
    let store = dep.store()?;
    for serial in meters {
        let d = device_entry(&out, serial)?;
        assert_eq!(d["readings_acknowledged"], 3, "{d}");
        assert_eq!(store.readings_of(serial)?.len(), 3, "{serial}");
    }

    // Provisioned, through gateway 2 again: the subscription-key handshake is refused, and
    // nothing more is stored.
    let refused = run_devices(&factory, meters, gw2.devices, &core_key, REFUSED_RUN, &[])
        .await?
        .ok()?
        .json()?;
    for serial in meters {
        let d = device_entry(&refused, serial)?;
        assert!(not_permitted(&refused, serial)? >= 1, "{d}");
        assert_eq!(d["readings_acknowledged"], 0, "{d}");
        assert_eq!(store.readings_of(serial)?.len(), 3, "{serial}");
    }
    let m = core.metrics().await?;
    let after = metrics::value(&m, "core_handshakes_total", "result=\"not_permitted\"");
    assert!(
        after >= before + 2.0,
        "counted at the core: {before} -> {after}"
    );
    assert_eq!(metrics::value(&m, "core_provisioned_total", ""), 2.0);

    gw2.stop().await?;
    gw1.stop().await?;
    core.stop().await?;
    Ok(())
}

/// A device stream is checked against the policy at every open, not only at the handshake: a
/// camera whose session is already open, uploading through a gateway its profile no longer allows,
/// gets an authenticated refusal (`not_permitted`) and stops after one attempt, instead of
/// retrying into the same refusal; allowed again, the same session uploads through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_a_gateway_its_profile_forbids_is_refused_with_the_reason(
) -> anyhow::Result<()> {
    let dep = Deployment::new(1, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, gateway::Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    // The session is opened through gateway 1 while the default profile allows every gateway.
    let mut tickets = dep.session_tickets(0, gw.devices).await?;
    anyhow::ensure!(tickets.establish().await, "no session through gateway 1");
    let put_gateways = |gateways: &'static [&'static str]| {
        let admin = &admin;
        async move {
            let profile = serde_json::json!({
                "report_interval_secs": 60,
                "report_bytes": 64,
                "threshold": 0,
                "gateways": gateways,
                "allow_direct": true,
            });
            let body = serde_json::to_vec(&profile)?;
            admin
                .ok(
                    &admin.operator,
                    "PUT",
                    "/v1/profiles/default",
                    Some(Body::json(&body)),
                )
                .await
        }
    };
    put_gateways(&["gateway-2"]).await?;

    let video: Arc<[u8]> = video_bytes(3, 300_000).into();
    let mut o = UploadOptions::new(gw.streams);
    o.max_attempts = 5;
    match upload(video.clone(), &o, &mut tickets).await {
        Err(UploadError::Refused { reason, report }) => {
            assert_eq!(reason, "not_permitted");
            assert_eq!(report.attempts, 1, "no retry into the same refusal");
        }
        other => bail!("expected a not_permitted refusal, got {other:?}"),
    }
    let m = core.metrics().await?;
    assert_eq!(
        metrics::value(&m, "core_stream_ends_total", "reason=\"refused\""),
        1.0
    );
    assert_eq!(metrics::value(&m, "core_videos_stored_total", ""), 0.0);

    // Gateway 1 allowed again: the same session uploads through it.
    put_gateways(&[GATEWAY_1]).await?;
    let report = upload(video, &UploadOptions::new(gw.streams), &mut tickets).await?;
    assert!(report.complete && report.digest_match, "{report:?}");
    let m = core.metrics().await?;
    assert_eq!(metrics::value(&m, "core_videos_stored_total", ""), 1.0);

    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
