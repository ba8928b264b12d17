//! Ownership change and operator change with the real programs: a meter transferred to a new owner
//! (both confirm) re-provisions into the new owner's subscription and its old credentials stop
//! working; a meter released by one core (a second core-stub instance, another deployment) moves
//! there, re-provisions with its factory identity and stores its readings there.

use std::time::Duration;

use gateway::Hooks;
use relay_ops::client::Body;
use relay_tests::lifecycle::{device_entry, run_devices, Admin, Factory};
use relay_tests::procs::{binary, run};
use relay_tests::{metrics, start_core, start_gateway, Deployment};

/// Adds an operator token for `owner` to `dep`'s tokens file; returns its secret.
async fn add_owner(dep: &Deployment, owner: &str) -> anyhow::Result<String> {
    let tokens = dep.path().join("core/admin-tokens.toml");
    let out = run(
        &binary("core-stub")?,
        &[
            "token",
            "--name",
            owner,
            "--role",
            "operator",
            "--owner",
            owner,
            "--append",
            tokens.to_str().unwrap_or_default(),
        ],
        &[],
        Duration::from_secs(30),
    )
    .await?
    .ok()?;
    Ok(out.stdout.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transferred_meter_reprovisions_under_its_new_owner_who_sees_only_new_readings(
) -> anyhow::Result<()> {
    let dep = Deployment::new(1, 1)?;
    let bob = add_owner(&dep, "bob").await?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let admin = Admin::new(&dep, core.admin)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "ow-").await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();
    let quick = ["--readings", "3", "--interval-ms", "50"];
    run_devices(
        &factory,
        &factory.serials,
        gw.devices,
        &core_key,
        &quick,
        &[],
    )
    .await?
    .ok()?;

    // Both sides confirm.
    admin
        .ok(
            &admin.operator,
            "POST",
            &format!("/v1/devices/{serial}/transfer"),
            Some(Body::json(br#"{"to":"bob"}"#)),
        )
        .await?;
    // Bob sees the offer, and none of the readings.
    let offered = admin
        .ok(&bob, "GET", &format!("/v1/devices/{serial}/readings"), None)
        .await?;
    assert_eq!(
        offered["readings"].as_array().map(Vec::len),
        Some(0),
        "{offered}"
    );
    admin
        .ok(
            &bob,
            "POST",
            &format!("/v1/devices/{serial}/accept-transfer"),
            Some(Body::json(br#"{"account":"flat 2","profile":"default"}"#)),
        )
        .await?;

    // The old subscription's credentials stop at once; the meter re-provisions under bob.
    let summary = run_devices(
        &factory,
        &factory.serials,
        gw.devices,
        &core_key,
        &quick,
        &[],
    )
    .await?
    .ok()?
    .json()?;
    let d = device_entry(&summary, &serial)?;
    assert_eq!(d["working"], true, "{d}");
    assert_eq!(d["readings_acknowledged"], 3, "{d}");
    assert!(
        d["refusals"]["reprovision"].as_u64().unwrap_or(0) >= 1,
        "{d}"
    );

    let store = dep.store()?;
    let subs: Vec<_> = store
        .subscriptions()?
        .into_iter()
        .filter(|s| s.serial == serial)
        .collect();
    assert_eq!(subs.len(), 2, "{subs:?}");
    assert_eq!(subs[0].status, core_stub::SubscriptionStatus::Revoked);
    assert_eq!(subs[1].status, core_stub::SubscriptionStatus::Active);
    assert_ne!(subs[0].public_key, subs[1].public_key);

    // Bob sees his three readings and none of the old owner's; the old owner keeps its own three
    // and sees none of bob's.
    let seqs = |v: &serde_json::Value| -> Vec<u64> {
        v["readings"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["seq"].as_u64()).collect())
            .unwrap_or_default()
    };
    let path = format!("/v1/devices/{serial}/readings");
    let bobs = seqs(&admin.ok(&bob, "GET", &path, None).await?);
    let olds = seqs(&admin.ok(&admin.operator, "GET", &path, None).await?);
    assert_eq!(bobs.len(), 3, "{bobs:?}");
    assert_eq!(olds.len(), 3, "{olds:?}");
    assert!(bobs.iter().all(|s| !olds.contains(s)), "{bobs:?} {olds:?}");
    let m = core.metrics().await?;
    assert!(metrics::value(&m, "core_handshakes_total", "result=\"reprovision\"") >= 1.0);
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_meter_moves_to_a_second_core_and_reprovisions_there() -> anyhow::Result<()> {
    let a = Deployment::new(1, 1)?;
    let b = Deployment::new(1, 1)?;
    // Core B trusts core A's release key.
    let a_release = std::fs::read_to_string(a.path().join("core/release.pub"))?;
    let b_config = b.core_config();
    let mut text = std::fs::read_to_string(&b_config)?;
    text.push_str(&format!(
        "\n[[release.trusted]]\nname = \"core-a\"\npublic_key = \"{}\"\n",
        a_release.trim()
    ));
    std::fs::write(&b_config, text)?;

    let core_a = start_core(&a, None).await?;
    let gw_a = start_gateway(&a, 1, core_a.quic, Hooks::default()).await?;
    let core_b = start_core(&b, None).await?;
    let admin_a = Admin::new(&a, core_a.admin)?;
    let admin_b = Admin::new(&b, core_b.admin)?;
    let key_a = a.sim.core_public_key.to_hex();
    let key_b = b.sim.core_public_key.to_hex();

    let factory = Factory::manufacture(&a, 1, "rl-").await?;
    admin_a.claim(&factory.manifest).await?;
    admin_a.activate(&factory.serials, "default").await?;
    let serial = factory.serials[0].clone();
    let quick = ["--readings", "3", "--interval-ms", "50"];
    run_devices(
        &factory,
        &factory.serials,
        gw_a.devices,
        &key_a,
        &quick,
        &[],
    )
    .await?
    .ok()?;

    // A signs the release; B checks it and claims the meter, then activates it.
    let body = serde_json::json!({
        "core_public_key": key_b,
        "endpoint": core_b.direct.to_string(),
    })
    .to_string();
    let release = admin_a
        .ok(
            &admin_a.operator,
            "POST",
            &format!("/v1/devices/{serial}/release"),
            Some(Body::json(body.as_bytes())),
        )
        .await?;
    let doc = release.to_string();
    // A forged release (one byte of the signature changed) is refused by B.
    let mut forged = release.clone();
    if let Some(sig) = forged["signature"].as_str() {
        let flipped = if sig.starts_with('0') { "1" } else { "0" };
        forged["signature"] = serde_json::Value::String(format!("{flipped}{}", &sig[1..]));
    }
    let (status, _) = admin_b
        .call(
            &admin_b.operator,
            "POST",
            "/v1/claims/release",
            Some(Body::json(forged.to_string().as_bytes())),
        )
        .await?;
    assert_ne!(status, 200, "a forged release was accepted");
    admin_b
        .ok(
            &admin_b.operator,
            "POST",
            "/v1/claims/release",
            Some(Body::json(doc.as_bytes())),
        )
        .await?;
    admin_b.activate(&factory.serials, "default").await?;

    // The meter still talks to A's gateway; A's answer sends it to B.
    let summary = run_devices(
        &factory,
        &factory.serials,
        gw_a.devices,
        &key_a,
        &quick,
        &[],
    )
    .await?
    .ok()?
    .json()?;
    let d = device_entry(&summary, &serial)?;
    assert_eq!(d["working"], true, "{d}");
    assert_eq!(d["readings_acknowledged"], 3, "{d}");
    assert_eq!(d["endpoint"], core_b.direct.to_string(), "{d}");
    assert_eq!(d["core_public_key"], key_b, "{d}");

    // Its readings are now at B; A refused the old credentials.
    assert_eq!(b.store()?.readings_of(&serial)?.len(), 3);
    let m = core_a.metrics().await?;
    assert!(metrics::value(&m, "core_handshakes_total", "result=\"released\"") >= 1.0);
    let m = core_b.metrics().await?;
    assert_eq!(metrics::value(&m, "core_provisioned_total", ""), 1.0);
    gw_a.stop().await?;
    core_a.stop().await?;
    core_b.stop().await?;
    Ok(())
}
