//! `run_fleet` end to end over real loopback UDP, against a test-only core loop around
//! [`TestCore`] (the Noise responder of `relay-protocol`, acknowledging every reading).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use relay_protocol::session::StaticKeypair;

use super::*;
use crate::device_dir::DeviceDir;
use crate::test_core::TestCore;

/// Datagram loss on the test core's side, deterministic.
#[derive(Clone, Copy, Default)]
struct Loss {
    /// Drop every n-th datagram received.
    in_every: Option<u64>,
    /// Drop every n-th datagram sent.
    out_every: Option<u64>,
}

struct CoreLoop {
    addr: SocketAddr,
    core: Arc<Mutex<TestCore>>,
    stop: CancellationToken,
}

impl CoreLoop {
    async fn start(loss: Loss) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let core = Arc::new(Mutex::new(TestCore::new()));
        let stop = CancellationToken::new();
        serve(socket, core.clone(), stop.clone(), loss, Arc::default());
        Self { addr, core, stop }
    }

    /// Another address into the same core (a second gateway, or direct access), and how many
    /// datagrams arrive there.
    async fn another_path(&self) -> (SocketAddr, Arc<AtomicU64>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let count = Arc::new(AtomicU64::new(0));
        serve(
            socket,
            self.core.clone(),
            self.stop.clone(),
            Loss::default(),
            count.clone(),
        );
        (addr, count)
    }

    /// Every acknowledged reading is in the store, unaltered; nothing was stored that the fleet
    /// did not queue.
    fn check_store(&self, summary: &FleetSummary, payload: usize) {
        let core = self.core.lock().expect("core");
        for d in &summary.per_device {
            let stored = core.store.get(&d.public_key);
            for seq in &d.acked {
                let data = stored
                    .and_then(|s| s.get(&seq.0))
                    .expect("acknowledged reading stored");
                assert_eq!(data, &reading_payload(&d.serial, seq.0, payload));
            }
            let acked: HashSet<_> = d.acked.iter().collect();
            assert_eq!(acked.len(), d.acked.len(), "each reading acknowledged once");
        }
    }
}

/// The core's receive loop on `socket`: each datagram to the core, its answers back to the sender.
fn serve(
    socket: UdpSocket,
    core: Arc<Mutex<TestCore>>,
    stop: CancellationToken,
    loss: Loss,
    count: Arc<AtomicU64>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let (mut received, mut sent) = (0u64, 0u64);
        loop {
            let (n, from) = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(_) => continue,
                },
            };
            received += 1;
            count.fetch_add(1, Ordering::Relaxed);
            if loss.in_every.is_some_and(|k| received % k == 0) {
                continue;
            }
            let replies = core.lock().expect("core").handle(&buf[..n], Instant::now());
            for r in replies {
                sent += 1;
                if loss.out_every.is_some_and(|k| sent % k == 0) {
                    continue;
                }
                let _ = socket.send_to(&r, from).await;
            }
        }
    });
}

impl Drop for CoreLoop {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn devices(n: usize) -> Vec<DeviceIdentity> {
    (1..=n)
        .map(|i| DeviceIdentity {
            serial: format!("meter-{i:05}"),
            keypair: StaticKeypair::generate().expect("keypair"),
        })
        .collect()
}

fn quick_meter() -> MeterConfig {
    MeterConfig {
        retransmit_initial: Duration::from_millis(50),
        retransmit_max: Duration::from_millis(400),
        handshake_retry_initial: Duration::from_millis(500),
        handshake_retry_max: Duration::from_millis(1000),
        silence_timeout: Duration::from_millis(400),
        ..MeterConfig::default()
    }
}

fn options(target: SocketAddr, core: PublicKey, n: usize, readings: u64) -> FleetOptions {
    FleetOptions {
        readings_per_device: Some(readings),
        interval: Duration::from_millis(10),
        payload_bytes: 100,
        drain_timeout: Duration::from_secs(20),
        meter: quick_meter(),
        seed: Some(1),
        ..FleetOptions::new(target, core, devices(n))
    }
}

#[tokio::test]
async fn delivers_every_reading_over_udp() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let progress = Arc::new(FleetProgress::default());
    let s = run_fleet(options(core.addr, public, 5, 40), Some(progress.clone()))
        .await
        .expect("ran");

    assert_eq!(
        (s.devices, s.queued, s.sent, s.acknowledged, s.lost),
        (5, 200, 200, 200, 0)
    );
    assert_eq!((s.refused, s.handshakes), (0, 5));
    // Only late responses to handshakes retried meanwhile (debug-build crypto is slow).
    assert!(
        s.bad_datagrams <= s.handshake_attempts - s.handshakes,
        "{s:?}"
    );
    assert!(!s.interrupted);
    assert!(
        s.latency_p50_ms.is_some()
            && s.latency_p50_ms <= s.latency_p99_ms
            && s.latency_p99_ms <= s.latency_max_ms
    );
    assert!(s.acknowledged_per_sec > 0.0);
    core.check_store(&s, 100);

    // Sequence numbers: one base for the run, reading i is base + i.
    let base = s.per_device[0].acked.iter().min().expect("acked").0;
    assert_eq!(base % (1 << SEQ_RUN_BITS_FOR_TESTS), 0);
    for d in &s.per_device {
        let mut seqs: Vec<u64> = d.acked.iter().map(|s| s.0 - base).collect();
        seqs.sort();
        assert_eq!(seqs, (0..40).collect::<Vec<_>>());
        assert!(d.unacked.is_empty());
    }
    let p = progress.snapshot();
    assert_eq!(
        (p.queued, p.acked, p.devices_done, p.in_flight()),
        (200, 200, 5, 0)
    );

    let json = serde_json::to_value(&s).expect("json");
    assert_eq!(json["acknowledged"], 200);
    assert!(json.get("per_device").is_none());
}

const SEQ_RUN_BITS_FOR_TESTS: u32 = crate::meter::SEQ_RUN_BITS;

#[tokio::test]
async fn retransmits_through_loss_in_both_directions() {
    let core = CoreLoop::start(Loss {
        in_every: Some(4),
        out_every: Some(5),
    })
    .await;
    let public = core.core.lock().expect("core").public();
    let s = run_fleet(options(core.addr, public, 4, 30), None)
        .await
        .expect("ran");
    assert_eq!((s.acknowledged, s.lost), (120, 0), "{s:?}");
    assert!(s.retransmitted > 0);
    core.check_store(&s, 100);
}

#[tokio::test]
async fn survives_a_core_restart() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let opts = FleetOptions {
        interval: Duration::from_millis(20),
        ..options(core.addr, public, 3, 60)
    };
    let handle = core.core.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        handle.lock().expect("core").restart();
    });
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost), (180, 0), "{s:?}");
    assert!(
        s.handshakes >= 6,
        "a re-handshake per meter after the restart: {s:?}"
    );
    let silences: u64 = s
        .per_device
        .iter()
        .map(|d| d.stats.silence_rehandshakes)
        .sum();
    assert!(silences >= 1, "{s:?}");
    core.check_store(&s, 100);
}

#[tokio::test]
async fn counts_what_an_absent_core_never_acknowledged() {
    // Bound but silent: no ICMP errors, just nothing back.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let target = silent.local_addr().expect("addr");
    let opts = FleetOptions {
        drain_timeout: Duration::from_millis(200),
        meter: MeterConfig {
            outbox_cap: 2,
            ..quick_meter()
        },
        interval: Duration::from_millis(5),
        ..options(target, PublicKey([9; 32]), 2, 5)
    };
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!(
        (s.queued, s.refused, s.acknowledged, s.lost),
        (4, 6, 0, 4),
        "{s:?}"
    );
    assert_eq!(s.sent, 0, "no session, no reading sent");
    assert!(s.handshake_attempts >= 2);
    assert_eq!(s.latency_p50_ms, None);
    assert_eq!(s.per_device[0].unacked.len(), 2);
}

#[tokio::test]
async fn zero_interval_paces_by_the_outbox() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let opts = FleetOptions {
        interval: Duration::ZERO,
        meter: MeterConfig {
            outbox_cap: 16,
            ..quick_meter()
        },
        ..options(core.addr, public, 2, 300)
    };
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost, s.refused), (600, 0, 0), "{s:?}");
    core.check_store(&s, 100);
}

#[tokio::test]
async fn shutdown_stops_the_fleet() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let target = silent.local_addr().expect("addr");
    let opts = FleetOptions {
        duration: Some(Duration::from_secs(60)),
        readings_per_device: None,
        ..options(target, PublicKey([9; 32]), 2, 0)
    };
    let stop = opts.shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
    });
    let started = Instant::now();
    let s = run_fleet(opts, None).await.expect("ran");
    assert!(s.interrupted);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(s.queued > 0 && s.lost == s.queued);
}

#[tokio::test]
async fn refuses_options_that_cannot_run() {
    let target: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let key = PublicKey([1; 32]);
    let e = run_fleet(FleetOptions::new(target, key, Vec::new()), None).await;
    assert!(matches!(e, Err(FleetError::NoDevices)));
    let opts = FleetOptions {
        readings_per_device: None,
        ..FleetOptions::new(target, key, devices(1))
    };
    assert!(matches!(
        run_fleet(opts, None).await,
        Err(FleetError::Unbounded)
    ));
    let opts = FleetOptions {
        payload_bytes: MAX_READING + 1,
        ..FleetOptions::new(target, key, devices(1))
    };
    assert!(matches!(
        run_fleet(opts, None).await,
        Err(FleetError::PayloadTooLarge { .. })
    ));
}

#[test]
fn percentiles_use_nearest_rank() {
    let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
    assert_eq!(percentile(&v, 50.0), Some(&Duration::from_millis(50)));
    assert_eq!(percentile(&v, 99.0), Some(&Duration::from_millis(99)));
    assert_eq!(percentile(&v[..1], 99.0), Some(&Duration::from_millis(1)));
    assert_eq!(percentile(&[], 50.0), None);
}

/// `n` factory-fresh devices in `root`, registered (claimed and activated) at `core`.
fn manufactured(root: &std::path::Path, core: &Mutex<TestCore>, n: usize) -> Vec<DeviceDir> {
    let mut c = core.lock().expect("core");
    c.refuse_unknown = true;
    (1..=n)
        .map(|i| {
            let serial = format!("dev-{i:06}");
            let (dir, factory) = DeviceDir::manufacture(
                &root.join(&serial),
                &serial,
                "m1",
                std::path::Path::new(crate::device_dir::DEFAULT_KEK_FILE),
            )
            .expect("manufacture");
            c.register(&serial, factory, true, true);
            dir
        })
        .collect()
}

fn reopen(root: &std::path::Path, n: usize) -> Vec<DeviceDir> {
    (1..=n)
        .map(|i| DeviceDir::open(&root.join(format!("dev-{i:06}"))).expect("open"))
        .collect()
}

fn element_options(
    target: SocketAddr,
    core: PublicKey,
    dirs: Vec<DeviceDir>,
    readings: u64,
) -> FleetOptions {
    FleetOptions {
        element_devices: dirs,
        ..options(target, core, 0, readings)
    }
}

#[tokio::test]
async fn factory_fresh_devices_provision_themselves_and_continue_after_a_restart() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = manufactured(tmp.path(), &core.core, 4);
    let opts = FleetOptions {
        waves: Some(Waves {
            size: 2,
            interval: Duration::from_millis(200),
        }),
        ..element_options(core.addr, public, dirs, 10)
    };
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.devices, s.acknowledged, s.lost), (4, 40, 0), "{s:?}");
    let l = s.lifecycle.as_ref().expect("lifecycle totals");
    assert_eq!(
        (l.devices, l.provisioned, l.working, l.without_subscription),
        (4, 4, 4, 0)
    );
    assert_eq!(
        (l.provisionings, l.key_updates, l.config_updates),
        (4, 0, 4)
    );
    for d in &s.per_device {
        assert!(d.element && d.provisioned && d.working, "{d:?}");
        let c = core.core.lock().expect("core");
        let stored = c.readings_of(&d.serial).expect("stored");
        for seq in &d.acked {
            assert_eq!(
                stored.get(&seq.0),
                Some(&reading_payload(&d.serial, seq.0, 100))
            );
        }
        assert_eq!(
            c.subscription(&d.serial).expect("sub").key,
            d.public_key,
            "the device ends on its subscription key"
        );
        assert_eq!(d.endpoint, core.addr.to_string());
    }
    let json = serde_json::to_value(&s).expect("json");
    assert_eq!(json["lifecycle"]["provisioned"], 4);
    let reports = json["per_device"].as_array().expect("per device");
    assert_eq!(reports.len(), 4);
    assert_eq!(reports[0]["serial"], "dev-000001");
    assert_eq!(reports[0]["provisioned"], true);
    assert_eq!(reports[0]["readings_acknowledged"], 10);
    assert_eq!(reports[0]["config"]["version"], 1);
    assert_eq!(reports[0]["refusals"], serde_json::json!({}));

    // A second run continues from the directories: no provisioning, later sequence numbers.
    let last: Vec<u64> = s
        .per_device
        .iter()
        .map(|d| d.acked.iter().map(|q| q.0).max().expect("acked"))
        .collect();
    let s = run_fleet(
        element_options(core.addr, public, reopen(tmp.path(), 4), 3),
        None,
    )
    .await
    .expect("ran");
    assert_eq!((s.acknowledged, s.lost), (12, 0), "{s:?}");
    let l = s.lifecycle.as_ref().expect("lifecycle");
    assert_eq!((l.provisionings, l.working), (0, 4));
    for (d, last) in s.per_device.iter().zip(last) {
        assert!(d.acked.iter().all(|q| q.0 > last), "{}", d.serial);
    }
}

#[tokio::test]
async fn sleepy_devices_wake_send_one_reading_and_rotate_when_told() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = manufactured(tmp.path(), &core.core, 2);
    let opts = FleetOptions {
        sleepy: Some(Duration::from_millis(300)),
        ..element_options(core.addr, public, dirs, 4)
    };
    let handle = core.core.clone();
    tokio::spawn(async move {
        // After the first wake: the operator forces a credential update of one device.
        tokio::time::sleep(Duration::from_millis(450)).await;
        handle.lock().expect("core").request_rotate("dev-000001");
    });
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost), (8, 0), "{s:?}");
    let d = &s.per_device[0];
    assert_eq!(d.stats.key_updates, 1, "{d:?}");
    assert_eq!(s.per_device[1].stats.key_updates, 0);
    // One reading per wake, each its own first transmission; no keepalives exist.
    assert_eq!(d.stats.sent, 4);
    let c = core.core.lock().expect("core");
    assert_eq!(c.subscription("dev-000001").expect("sub").key, d.public_key);
}

#[tokio::test]
async fn a_released_device_retargets_to_the_new_core() {
    let a = CoreLoop::start(Loss::default()).await;
    let b = CoreLoop::start(Loss::default()).await;
    let a_key = a.core.lock().expect("core").public();
    let b_key = b.core.lock().expect("core").public();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = manufactured(tmp.path(), &a.core, 1);
    let factory = a.core.lock().expect("core").device("dev-000001").factory;
    {
        let mut b = b.core.lock().expect("core");
        b.refuse_unknown = true;
        b.register("dev-000001", factory, true, true);
    }
    let opts = FleetOptions {
        interval: Duration::from_millis(50),
        ..element_options(a.addr, a_key, dirs, 30)
    };
    let handle = a.core.clone();
    let endpoint = b.addr.to_string();
    let release = relay_protocol::payload::Release {
        core: b_key,
        issued_ms: 1,
        endpoint: endpoint.clone(),
    };
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        handle.lock().expect("core").release("dev-000001", release);
    });
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost), (30, 0), "{s:?}");
    let d = &s.per_device[0];
    assert_eq!(d.endpoint, endpoint);
    assert_eq!(d.core_public_key, b_key);
    assert_eq!(d.stats.provisionings, 2);
    let json = serde_json::to_value(&s).expect("json");
    assert_eq!(json["per_device"][0]["endpoint"], endpoint);
    assert_eq!(json["per_device"][0]["refusals"]["released"], 1);
    let on_a = a
        .core
        .lock()
        .expect("core")
        .readings_of("dev-000001")
        .map_or(0, |r| r.len());
    let on_b = b
        .core
        .lock()
        .expect("core")
        .readings_of("dev-000001")
        .map_or(0, |r| r.len());
    assert!(on_a > 0 && on_b > 0 && on_a + on_b == 30, "{on_a} + {on_b}");
    // The state file remembers the new core for the next run.
    let state = DeviceDir::open(&tmp.path().join("dev-000001")).expect("open");
    assert_eq!(state.memory().release.map(|r| r.endpoint), Some(endpoint));
}

#[tokio::test]
async fn an_unactivated_device_ends_without_a_subscription() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = manufactured(tmp.path(), &core.core, 2);
    core.core
        .lock()
        .expect("core")
        .device("dev-000002")
        .activated = false;
    let opts = FleetOptions {
        drain_timeout: Duration::from_millis(500),
        meter: MeterConfig {
            refused_retry_initial: Duration::from_millis(100),
            ..quick_meter()
        },
        ..element_options(core.addr, public, dirs, 3)
    };
    let s = run_fleet(opts, None).await.expect("ran");
    let l = s.lifecycle.as_ref().expect("lifecycle");
    assert_eq!((l.working, l.without_subscription), (1, 1));
    assert!(
        l.refusals
            .get(relay_protocol::payload::RefusalReason::NotActivated)
            >= 1
    );
    let d = &s.per_device[1];
    assert!(!d.working && !d.provisioned);
    assert_eq!(d.unacked.len(), 3);
    assert_eq!(
        crate::cli::exit_code_for(&s, false),
        crate::cli::EXIT_NO_SUBSCRIPTION
    );
    assert_eq!(crate::cli::exit_code_for(&s, true), crate::cli::EXIT_OK);
}

#[tokio::test]
async fn devices_move_between_paths_on_the_same_session() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    core.core.lock().expect("core").admission = true;
    let (b, on_b) = core.another_path().await;
    let (c_addr, on_c) = core.another_path().await;
    let opts = FleetOptions {
        interval: Duration::from_millis(20),
        moves: vec![
            Move {
                at: Duration::from_millis(300),
                target: b,
                name: "gateway-b".into(),
            },
            Move {
                at: Duration::from_millis(600),
                target: c_addr,
                name: c_addr.to_string(),
            },
        ],
        ..options(core.addr, public, 3, 50)
    };
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost), (150, 0), "{s:?}");
    assert_eq!(s.handshakes, 3, "the session moves, no new handshake");
    core.check_store(&s, 100);
    let (b, c) = (on_b.load(Ordering::Relaxed), on_c.load(Ordering::Relaxed));
    assert!(
        b >= 15 && c >= 15,
        "both new paths carried readings: {b}, {c}"
    );
    for d in &s.per_device {
        assert_eq!(d.endpoint, c_addr.to_string(), "{d:?}");
        assert_eq!(d.stats.handshakes_started, 1);
    }
    let stored: usize = {
        let core = core.core.lock().expect("core");
        s.per_device
            .iter()
            .map(|d| core.store.get(&d.public_key).map_or(0, |r| r.len()))
            .sum()
    };
    assert_eq!(stored, 150, "every reading stored once");
}

#[tokio::test]
async fn a_sleepy_device_resumes_its_persisted_session_in_one_datagram() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    core.core.lock().expect("core").admission = true;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = manufactured(tmp.path(), &core.core, 2);
    let sleepy = |dirs, readings| FleetOptions {
        sleepy: Some(Duration::from_millis(200)),
        ..element_options(core.addr, public, dirs, readings)
    };
    let s = run_fleet(sleepy(dirs, 2), None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost), (4, 0), "{s:?}");
    for d in &s.per_device {
        assert!(!d.resumed);
        let file = tmp
            .path()
            .join(&d.serial)
            .join(crate::device_dir::SESSION_FILE);
        assert!(file.exists(), "{} persisted its session", d.serial);
    }
    let handshakes = core.core.lock().expect("core").handshakes;

    // The next run (the device woke after a restart): one datagram each, no handshake.
    let s = run_fleet(sleepy(reopen(tmp.path(), 2), 1), None)
        .await
        .expect("ran");
    assert_eq!((s.acknowledged, s.lost), (2, 0), "{s:?}");
    for d in &s.per_device {
        assert!(d.resumed, "{d:?}");
        assert_eq!(
            (
                d.stats.handshakes,
                d.stats.handshakes_started,
                d.stats.frames_sent
            ),
            (0, 0, 1),
            "{d:?}"
        );
    }
    assert_eq!(core.core.lock().expect("core").handshakes, handshakes);
    assert_eq!(core.core.lock().expect("core").bad_tags, 0);
    let json = serde_json::to_value(&s).expect("json");
    for d in json["per_device"].as_array().expect("per device") {
        assert_eq!(
            (&d["frames_sent"], &d["handshakes"]),
            (&1.into(), &0.into())
        );
        assert_eq!(d["resumed"], true);
    }
    assert_eq!(json["frames_sent"], 2);

    // The core lost its sessions meanwhile: the resumed session goes unanswered, the device
    // handshakes again and delivers.
    core.core.lock().expect("core").restart();
    let s = run_fleet(sleepy(reopen(tmp.path(), 2), 1), None)
        .await
        .expect("ran");
    assert_eq!((s.acknowledged, s.lost), (2, 0), "{s:?}");
    for d in &s.per_device {
        assert!(d.resumed);
        assert_eq!(d.stats.handshakes, 1, "{d:?}");
    }

    // A streaming run resumes the persisted session too, and keeps it persisted.
    let s = run_fleet(
        element_options(core.addr, public, reopen(tmp.path(), 2), 3),
        None,
    )
    .await
    .expect("ran");
    assert_eq!((s.acknowledged, s.lost, s.handshakes), (6, 0, 0), "{s:?}");
    assert!(s.per_device.iter().all(|d| d.resumed));

    // More frames than half the counter lease: the session is written again before the lease
    // could run out (at the resume, once in between, at the end).
    let n = crate::device_dir::SESSION_COUNTER_LEASE / 2 + 100;
    let s = run_fleet(
        FleetOptions {
            interval: Duration::ZERO,
            ..element_options(core.addr, public, reopen(tmp.path(), 1), n)
        },
        None,
    )
    .await
    .expect("ran");
    assert_eq!((s.acknowledged, s.lost, s.handshakes), (n, 0, 0), "{s:?}");
    assert_eq!(s.per_device[0].session_writes, 3, "{:?}", s.per_device[0]);
}

#[tokio::test]
async fn a_latency_warmup_leaves_early_readings_out_of_the_percentiles() {
    let core = CoreLoop::start(Loss::default()).await;
    let public = core.core.lock().expect("core").public();
    let opts = FleetOptions {
        latency_warmup: Duration::from_secs(3600),
        ..options(core.addr, public, 2, 5)
    };
    let s = run_fleet(opts, None).await.expect("ran");
    assert_eq!((s.acknowledged, s.lost), (10, 0));
    assert_eq!(
        (s.latency_p50_ms, s.latency_p99_ms, s.latency_max_ms),
        (None, None, None)
    );
}
