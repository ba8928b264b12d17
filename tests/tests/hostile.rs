//! A hostile relay that flips bits, replays, reorders and drops 20% of frames in both directions:
//! the core stores no altered reading and no duplicate, and retransmission still delivers all.

use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway::Hooks;
use relay_tests::hostile::{self, Mischief};
use relay_tests::{fleet, metrics, start_core, start_gateway, verify_store, Deployment};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_relay_cannot_alter_duplicate_or_lose_readings() -> anyhow::Result<()> {
    let dep = Deployment::new(50, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let stop = CancellationToken::new();
    let (relay, mischief) =
        hostile::start(gw.devices, Mischief::hostile(), 0x5eed, stop.clone()).await?;

    let mut opts = fleet(
        &dep,
        relay,
        dep.devices(0..50)?,
        20,
        Duration::from_millis(50),
    );
    opts.drain_timeout = Duration::from_secs(90);
    // Correctness, not patience: cap the backoffs so a device unlucky several times in a row
    // does not wait the production maximum of 30 s between handshake attempts.
    opts.meter.retransmit_max = Duration::from_secs(2);
    opts.meter.handshake_retry_max = Duration::from_secs(2);
    let summary = device_sim::run_fleet(opts, None).await?;

    eprintln!("{}", serde_json::to_string(&summary)?);
    // The relay really was hostile.
    assert!(mischief.dropped.load(Ordering::Relaxed) > 100);
    assert!(mischief.flipped.load(Ordering::Relaxed) > 50);
    assert!(mischief.replayed.load(Ordering::Relaxed) > 50);
    assert!(mischief.reordered.load(Ordering::Relaxed) > 50);

    // Everything arrived, once, unaltered.
    assert_eq!(summary.lost, 0, "{summary:?}");
    assert_eq!(summary.acknowledged, 1000);
    assert!(summary.retransmitted > 0);
    assert_eq!(verify_store(&dep, &summary, 64)?, 1000);
    assert_eq!(dep.store()?.count_readings()?, 1000);

    // The core saw the forgeries and replays and refused them.
    let m = core.metrics().await?;
    let refused = metrics::value(&m, "core_frames_dropped_total", "reason=\"authentication\"")
        + metrics::value(&m, "core_frames_dropped_total", "reason=\"replay\"");
    assert!(
        refused > 0.0,
        "no forged or replayed frame was refused:\n{m}"
    );
    assert!(metrics::value(&m, "core_frames_dropped_total", "reason=\"replay\"") > 0.0);
    stop.cancel();
    gw.stop().await?;
    core.stop().await?;
    Ok(())
}
