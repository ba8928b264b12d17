//! The camera against the test core on loopback: status readings over UDP, the video over TCP.

use relay_protocol::session::StaticKeypair;

use super::*;
use crate::test_core::TestCore;
use crate::test_net::NetCore;
use crate::video::{sha256, video_bytes};

fn identity(serial: &str) -> DeviceIdentity {
    DeviceIdentity {
        serial: serial.into(),
        keypair: StaticKeypair::generate().expect("keypair"),
    }
}

fn options(net: &NetCore, device: CameraDevice, video: Arc<[u8]>) -> CameraOptions {
    let core = net.core.lock().expect("core").public();
    CameraOptions {
        status_every: Duration::from_millis(100),
        accident_after: Duration::from_millis(250),
        chunk_size: 16 * 1024,
        drain_timeout: Duration::from_secs(5),
        seed: Some(5),
        ..CameraOptions::new(device, core, net.udp, net.tcp, video)
    }
}

/// The status bodies the core stored for `key`, in sequence order.
fn stored_statuses(net: &NetCore, key: &PublicKey) -> Vec<String> {
    let core = net.core.lock().expect("core");
    core.store
        .get(key)
        .map(|m| {
            m.values()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn reports_status_and_uploads_the_video_after_the_accident() {
    let mut core = TestCore::new();
    core.admission = true;
    let net = NetCore::start(core).await;
    let video: Arc<[u8]> = video_bytes(21, 1024 * 1024 + 5).into();
    let device = identity("cam-00001");
    let key = *device.keypair.public();
    let progress = Arc::new(CameraProgress::default());
    let report = run_camera(
        options(&net, CameraDevice::Fixed(device), video.clone()),
        Some(progress.clone()),
    )
    .await
    .expect("ran");
    assert!(report.ok, "{report:?}");
    let v = report.video.as_ref().expect("uploaded");
    assert!(v.complete && v.digest_match);
    assert_eq!(v.sha256, crate::video::hex(&sha256(&video)));
    assert_eq!(v.attempts, 1);
    assert_eq!(report.video_error, None);
    net.only_upload(|u| {
        assert_eq!(&u.data[..], &video[..]);
        assert!(u
            .open
            .as_ref()
            .is_some_and(|o| o.meta.starts_with("camera=cam-00001;event=accident")));
    });
    // Status from the start (before the accident), and one last after the video was stored.
    let s = &report.status;
    assert!(s.acknowledged >= 3, "{s:?}");
    assert_eq!((s.lost, s.queued), (0, s.acknowledged));
    let bodies = stored_statuses(&net, &key);
    assert_eq!(bodies.len() as u64, s.acknowledged);
    assert!(bodies[0].starts_with("cam-00001|seq="), "{}", bodies[0]);
    assert!(bodies[0].contains("|camera=recording|"), "{}", bodies[0]);
    assert!(bodies.iter().all(|b| b.len() == 64));
    let last = bodies.last().expect("some");
    assert!(last.contains("|camera=stored|"), "{last}");
    assert_eq!(report.public_key, key.to_hex());
    assert!(!report.interrupted);
    let (queued, acked, started) = progress.status();
    assert_eq!((queued, acked, started), (s.queued, s.acknowledged, true));
    assert!(progress.upload.snapshot().complete);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["video"]["digest_match"], true);
    assert_eq!(json["ok"], true);
}

#[tokio::test]
async fn resumes_after_a_cut_and_keeps_reporting_for_the_duration() {
    let net = NetCore::start(TestCore::new()).await;
    net.behaviour.lock().expect("behaviour").cut_after = [Some(10), None].into();
    let video: Arc<[u8]> = video_bytes(22, 600 * 1024).into();
    let opts = CameraOptions {
        duration: Some(Duration::from_millis(1500)),
        // A slow video: 600 KiB at 8 Mbit/s takes about 0.6 s after the accident.
        bitrate_bps: 8_000_000,
        ..options(
            &net,
            CameraDevice::Fixed(identity("cam-00002")),
            video.clone(),
        )
    };
    let report = run_camera(opts, None).await.expect("ran");
    assert!(report.ok, "{report:?}");
    let v = report.video.as_ref().expect("uploaded");
    assert_eq!(v.attempts, 2);
    assert_eq!(
        v.resumed_from,
        [0, 8],
        "acks every 4 chunks: 8 of the 10 stored"
    );
    net.only_upload(|u| assert_eq!(&u.data[..], &video[..]));
    // 1.5 s of status every 100 ms (the first at once): no last extra one with a duration.
    let s = &report.status;
    assert!((10..=16).contains(&s.queued), "{s:?}");
    assert_eq!(s.lost, 0);
    assert!(s.acknowledged_during_upload >= 1, "{s:?}");
}

#[tokio::test]
async fn a_refused_video_fails_the_run_but_status_is_reported() {
    let net = NetCore::start(TestCore::new()).await;
    net.behaviour.lock().expect("behaviour").refuse =
        Some(relay_protocol::stream::RefuseReason::TooLarge);
    let opts = options(
        &net,
        CameraDevice::Fixed(identity("cam-00003")),
        video_bytes(1, 9000).into(),
    );
    let report = run_camera(opts, None).await.expect("ran");
    assert!(!report.ok);
    assert_eq!(
        report.video_error.as_deref(),
        Some("the core refused the upload: too_large")
    );
    assert!(report.status.acknowledged >= 2);
    assert_eq!(report.status.lost, 0);
}

#[tokio::test]
async fn the_shutdown_token_stops_the_camera() {
    let net = NetCore::start(TestCore::new()).await;
    let opts = CameraOptions {
        accident_after: Duration::from_secs(60),
        ..options(
            &net,
            CameraDevice::Fixed(identity("cam-00004")),
            video_bytes(1, 9000).into(),
        )
    };
    let stop = opts.shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    let report = run_camera(opts, None).await.expect("ran");
    assert!(report.interrupted && !report.ok);
    assert!(report.video.is_none());
    assert!(report.status.acknowledged >= 1);
}

#[tokio::test]
async fn a_factory_fresh_camera_provisions_itself_then_uploads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut core = TestCore::new();
    core.refuse_unknown = true;
    core.admission = true;
    let (dir, factory) = DeviceDir::manufacture(
        &tmp.path().join("cam-000001"),
        "cam-000001",
        "cam1",
        std::path::Path::new(crate::device_dir::DEFAULT_KEK_FILE),
    )
    .expect("manufacture");
    core.register("cam-000001", factory, true, true);
    let net = NetCore::start(core).await;
    let video: Arc<[u8]> = video_bytes(23, 100_000).into();
    let report = run_camera(
        options(&net, CameraDevice::Element(dir), video.clone()),
        None,
    )
    .await
    .expect("ran");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.status.meter.provisionings, 1);
    net.only_upload(|u| assert_eq!(&u.data[..], &video[..]));
    // The state file remembers the configuration the core sent.
    let reopened = DeviceDir::open(&tmp.path().join("cam-000001")).expect("open");
    assert!(reopened.memory().config.is_some());
    assert!(reopened.state().next_seq > 0);
}

#[test]
fn status_bodies_are_recognisable_and_sized() {
    let b = status_payload("cam-1", 42, "uploading", 40);
    assert_eq!(b.len(), 40);
    assert!(b.starts_with(b"cam-1|seq=42|camera=uploading|."));
    assert_eq!(status_payload("cam-1", 42, "stored", 8), b"cam-1|se");
}
