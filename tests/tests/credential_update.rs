//! Credential updates killed at every step. The update is two-phase (docs/protocol.md §11.5): the
//! device announces a key generated in its element, the core keeps old and new, the device commits
//! the new key only after a handshake with it, the core retires the old one only after seeing the
//! new one used. Here the device (`device-sim`, aborted at a crash point) and the core
//! (`core-stub`, aborted at a crash point) die at each step in turn; every time, the restarted
//! device works, and at the end device and core hold exactly one key, the new one.
//!
//! Devices use direct access here: the gateway adds nothing to these steps and has its own tests.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use relay_tests::lifecycle::{device_entry, run_devices, Admin, Factory};
use relay_tests::procs::{binary, Daemon};
use relay_tests::Deployment;

const READY: Duration = Duration::from_secs(30);
const DEVICE_POINTS: [&str; 4] = [
    "device:rotate_notice",
    "device:next_generated",
    "device:key_accepted",
    "device:next_established",
];
const CORE_POINTS: [&str; 2] = ["core:next_key_committed", "core:promote_committed"];
/// The key lifetime of the periodic tests.
const PERIOD_SECS: u64 = 8;

/// How a test asks for an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// An operator's `POST /v1/devices/{serial}/rotate`.
    Forced,
    /// The core's `credentials.rotate_after_secs` (set to [`PERIOD_SECS`] here: long enough that
    /// one update finishes well inside it, so the checks see a settled key).
    Periodic,
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

async fn start_core(
    dep: &Deployment,
    direct: SocketAddr,
    crash_at: Option<&str>,
) -> anyhow::Result<Daemon> {
    let config = dep.core_config().display().to_string();
    let args: Vec<String> = [
        "run",
        "--config",
        &config,
        "--listen-quic",
        "127.0.0.1:0",
        "--listen-direct",
        &direct.to_string(),
        "--listen-admin",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    let env: Vec<(&str, &str)> = crash_at
        .map(|p| ("RELAY_CRASH_AT", p))
        .into_iter()
        .collect();
    Daemon::start_with_env(&binary("core-stub")?, &args, None, &env, READY).await
}

/// A deployment whose core renews keys after `rotate_after_secs`.
fn deployment(rotate_after_secs: u64) -> anyhow::Result<Deployment> {
    let dep = Deployment::new(1, 1)?;
    let path = dep.core_config();
    let text = std::fs::read_to_string(&path)?;
    let text = text.replace(
        "rotate_after_secs = 7776000",
        &format!("rotate_after_secs = {rotate_after_secs}"),
    );
    std::fs::write(&path, text)?;
    Ok(dep)
}

/// What the store says about `serial`'s subscription: (public key, a key update still pending).
fn subscription(dep: &Deployment, serial: &str) -> anyhow::Result<(Vec<u8>, bool)> {
    let store = dep.store()?;
    let sub = store
        .subscriptions()?
        .into_iter()
        .filter(|s| s.serial == serial)
        .max_by_key(|s| s.id)
        .ok_or_else(|| anyhow::anyhow!("{serial} has no subscription"))?;
    let view = store.device_view(serial, "operator")?;
    Ok((sub.public_key.0.to_vec(), view.next_key_pending))
}

/// Exactly one valid key: the core holds one key and no pending one, the device holds no key in
/// its `next` slot, and a fresh run of the device works with what it holds.
async fn assert_one_working_key(
    dep: &Deployment,
    factory: &Factory,
    serial: &str,
    direct: SocketAddr,
    core_key: &str,
    old_key: &[u8],
) -> anyhow::Result<()> {
    let (key, pending) = subscription(dep, serial)?;
    assert!(!pending, "{serial}: the core still holds a pending key");
    assert_ne!(key, old_key, "{serial}: the update never completed");
    let dir = factory.device_dir(serial);
    assert!(
        !has_file(&dir, "next.key"),
        "{serial}: the device still holds an uncommitted key"
    );
    let summary = run_devices(
        factory,
        &[serial.to_owned()],
        direct,
        core_key,
        &["--readings", "2", "--interval-ms", "50"],
        &[],
    )
    .await?
    .ok()?
    .json()?;
    let d = device_entry(&summary, serial)?;
    assert_eq!(d["working"], true, "{d}");
    assert_eq!(d["readings_acknowledged"], 2, "{d}");
    assert_eq!(
        subscription(dep, serial)?.0,
        key,
        "{serial}: the device needed another key change to work"
    );
    Ok(())
}

fn has_file(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}

async fn device_killed_at_every_step(trigger: Trigger) -> anyhow::Result<()> {
    let dep = deployment(if trigger == Trigger::Periodic {
        PERIOD_SECS
    } else {
        0
    })?;
    let direct = free_udp_port()?;
    let core = start_core(&dep, direct, None).await?;
    let admin = Admin::new(&dep, core.addr("admin")?)?;
    let core_key = dep.sim.core_public_key.to_hex();
    let prefix = if trigger == Trigger::Periodic {
        "pd-"
    } else {
        "fd-"
    };
    let factory = Factory::manufacture(&dep, DEVICE_POINTS.len() as u32, prefix).await?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    let quick = ["--readings", "2", "--interval-ms", "50"];

    for (serial, point) in factory.serials.iter().zip(DEVICE_POINTS) {
        let one = [serial.clone()];
        run_devices(&factory, &one, direct, &core_key, &quick, &[])
            .await?
            .ok()?;
        let (old_key, _) = subscription(&dep, serial)?;
        match trigger {
            Trigger::Forced => {
                admin
                    .ok(
                        &admin.operator,
                        "POST",
                        &format!("/v1/devices/{serial}/rotate"),
                        None,
                    )
                    .await?;
            }
            Trigger::Periodic => {
                tokio::time::sleep(Duration::from_millis(PERIOD_SECS * 1000 + 500)).await
            }
        }
        let crashed = run_devices(
            &factory,
            &one,
            direct,
            &core_key,
            &["--readings", "3", "--interval-ms", "100"],
            &[("RELAY_CRASH_AT", point)],
        )
        .await?;
        assert!(
            !crashed.status.success() && crashed.status.code().is_none(),
            "{point}: the device did not abort: {}\n{}",
            crashed.status,
            crashed.stderr
        );
        // Restarted, the device finishes the update and works.
        let summary = run_devices(
            &factory,
            &one,
            direct,
            &core_key,
            &["--readings", "3", "--interval-ms", "100"],
            &[],
        )
        .await?
        .ok()
        .map_err(|e| anyhow::anyhow!("{point}: {e}"))?
        .json()?;
        let d = device_entry(&summary, serial)?;
        assert_eq!(d["working"], true, "{point}: {d}");
        assert_eq!(d["readings_acknowledged"], 3, "{point}: {d}");
        assert_one_working_key(&dep, &factory, serial, direct, &core_key, &old_key)
            .await
            .map_err(|e| anyhow::anyhow!("{point}: {e}"))?;
    }
    core.kill().await?;
    Ok(())
}

async fn core_killed_at_every_step(trigger: Trigger) -> anyhow::Result<()> {
    let dep = deployment(if trigger == Trigger::Periodic {
        PERIOD_SECS
    } else {
        0
    })?;
    let direct = free_udp_port()?;
    let core_key = dep.sim.core_public_key.to_hex();
    let prefix = if trigger == Trigger::Periodic {
        "pc-"
    } else {
        "fc-"
    };
    let factory = Factory::manufacture(&dep, CORE_POINTS.len() as u32, prefix).await?;
    let mut core = start_core(&dep, direct, None).await?;
    {
        let admin = Admin::new(&dep, core.addr("admin")?)?;
        admin.claim(&factory.manifest).await?;
        admin.activate(&factory.serials, "default").await?;
    }
    let quick = ["--readings", "2", "--interval-ms", "50"];

    for (serial, point) in factory.serials.iter().zip(CORE_POINTS) {
        let one = [serial.clone()];
        run_devices(&factory, &one, direct, &core_key, &quick, &[])
            .await?
            .ok()?;
        let (old_key, _) = subscription(&dep, serial)?;
        match trigger {
            Trigger::Forced => {
                let admin = Admin::new(&dep, core.addr("admin")?)?;
                admin
                    .ok(
                        &admin.operator,
                        "POST",
                        &format!("/v1/devices/{serial}/rotate"),
                        None,
                    )
                    .await?;
            }
            Trigger::Periodic => {
                tokio::time::sleep(Duration::from_millis(PERIOD_SECS * 1000 + 500)).await
            }
        }
        // The core that will die at `point`.
        core.kill().await?;
        let mut doomed = start_core(&dep, direct, Some(point)).await?;
        let device = {
            let (factory, one, key) = (factory.clone(), one.clone(), core_key.clone());
            tokio::spawn(async move {
                run_devices(
                    &factory,
                    &one,
                    direct,
                    &key,
                    &[
                        "--readings",
                        "6",
                        "--interval-ms",
                        "300",
                        "--drain-timeout-ms",
                        "30000",
                    ],
                    &[],
                )
                .await
            })
        };
        let status = doomed.wait_exit(Duration::from_secs(30)).await?;
        assert!(
            status.code().is_none(),
            "{point}: the core did not abort: {status}"
        );
        // Back up on the same port; the device, still running, finishes on its own.
        core = start_core(&dep, direct, None).await?;
        let summary = device
            .await??
            .ok()
            .map_err(|e| anyhow::anyhow!("{point}: {e}"))?
            .json()?;
        let d = device_entry(&summary, serial)?;
        assert_eq!(d["working"], true, "{point}: {d}");
        assert_eq!(d["readings_acknowledged"], 6, "{point}: {d}");
        assert_one_working_key(&dep, &factory, serial, direct, &core_key, &old_key)
            .await
            .map_err(|e| anyhow::anyhow!("{point}: {e}"))?;
    }
    core.kill().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_update_with_the_device_killed_at_every_step() -> anyhow::Result<()> {
    device_killed_at_every_step(Trigger::Forced).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_update_with_the_device_killed_at_every_step() -> anyhow::Result<()> {
    device_killed_at_every_step(Trigger::Periodic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_update_with_the_core_killed_at_every_step() -> anyhow::Result<()> {
    core_killed_at_every_step(Trigger::Forced).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_update_with_the_core_killed_at_every_step() -> anyhow::Result<()> {
    core_killed_at_every_step(Trigger::Periodic).await
}

/// Provisioning itself, with the core killed right after it bound the new key and before it
/// answered: the device, which never heard back, still gets a working subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_with_the_core_killed_before_it_answered() -> anyhow::Result<()> {
    let dep = deployment(0)?;
    let direct = free_udp_port()?;
    let core_key = dep.sim.core_public_key.to_hex();
    let factory = Factory::manufacture(&dep, 1, "kp-").await?;
    let core = start_core(&dep, direct, None).await?;
    let admin = Admin::new(&dep, core.addr("admin")?)?;
    admin.claim(&factory.manifest).await?;
    admin.activate(&factory.serials, "default").await?;
    core.kill().await?;
    let mut doomed = start_core(&dep, direct, Some("core:provision_committed")).await?;
    let device = {
        let factory = factory.clone();
        let key = core_key.clone();
        tokio::spawn(async move {
            run_devices(
                &factory,
                &factory.serials,
                direct,
                &key,
                &[
                    "--readings",
                    "3",
                    "--interval-ms",
                    "200",
                    "--drain-timeout-ms",
                    "30000",
                ],
                &[],
            )
            .await
        })
    };
    let status = doomed.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.code().is_none(), "the core did not abort: {status}");
    let core = start_core(&dep, direct, None).await?;
    let summary = device.await??.ok()?.json()?;
    let serial = &factory.serials[0];
    let d = device_entry(&summary, serial)?;
    assert_eq!(d["working"], true, "{d}");
    assert_eq!(d["readings_acknowledged"], 3, "{d}");
    let (_, pending) = subscription(&dep, serial)?;
    assert!(!pending);
    assert!(!has_file(&factory.device_dir(serial), "next.key"));
    core.kill().await?;
    Ok(())
}
