//! The uploader against the test core's stream port on loopback TCP.

use std::sync::Mutex;

use relay_protocol::session::StaticKeypair;

use super::*;
use crate::meter::{Meter, MeterConfig, Timebase};
use crate::test_core::TestCore;
use crate::test_net::NetCore;

/// A meter with an established session to `core` (handshake exchanged in memory).
fn established(core: &mut TestCore) -> Meter {
    let now = Instant::now();
    let mut meter = Meter::new(
        "cam-00001",
        StaticKeypair::generate().expect("keypair"),
        core.public(),
        MeterConfig::default(),
        Timebase::new(now, 1_700_000_000_000),
        3,
    );
    for _ in 0..3 {
        while let Some(d) = meter.poll_transmit(now) {
            for reply in core.handle(&d, now) {
                meter.handle_datagram(&reply, now).expect("reply");
            }
        }
    }
    assert!(meter.has_working_session());
    meter
}

/// Tickets straight from a meter the test holds.
struct MeterTickets(Arc<Mutex<Meter>>);

impl TicketSource for MeterTickets {
    fn ticket(&mut self, r: &OpenRequest) -> impl Future<Output = Option<Ticket>> + Send {
        let ticket = self
            .0
            .lock()
            .expect("meter")
            .open_stream(
                r.upload,
                r.chunk_size,
                r.total_size,
                &r.meta,
                Instant::now(),
            )
            .map(|(frame, keys)| Ticket { frame, keys });
        std::future::ready(ticket)
    }
}

struct Setup {
    net: NetCore,
    tickets: MeterTickets,
    meter: Arc<Mutex<Meter>>,
}

async fn setup() -> Setup {
    let mut core = TestCore::new();
    core.admission = true;
    let meter = Arc::new(Mutex::new(established(&mut core)));
    let net = NetCore::start(core).await;
    Setup {
        net,
        tickets: MeterTickets(meter.clone()),
        meter,
    }
}

fn options(target: SocketAddr, chunk: u32) -> UploadOptions {
    UploadOptions {
        chunk_size: chunk,
        meta: "camera=cam-00001;event=test".into(),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ack_timeout: Duration::from_secs(10),
        ..UploadOptions::new(target)
    }
}

#[test]
fn video_bytes_are_splitmix64_and_deterministic() {
    // SplitMix64's first output for seed 0, little-endian.
    assert_eq!(
        video_bytes(0, 8),
        0xe220_a839_7b1d_cdafu64.to_le_bytes().to_vec()
    );
    let a = video_bytes(7, 1000);
    assert_eq!(a.len(), 1000);
    assert_eq!(a, video_bytes(7, 1000));
    assert_eq!(&video_bytes(7, 13)[..], &a[..13]);
    assert_ne!(a, video_bytes(8, 1000));
    assert!(video_bytes(1, 0).is_empty());
}

#[tokio::test]
async fn uploads_a_video_the_core_stores_exactly() {
    let mut s = setup().await;
    let video: Arc<[u8]> = video_bytes(11, 300_000).into();
    let progress = Arc::new(UploadProgress::default());
    let opts = UploadOptions {
        progress: Some(progress.clone()),
        ..options(s.net.tcp, 4096)
    };
    let report = upload(video.clone(), &opts, &mut s.tickets)
        .await
        .expect("uploaded");
    assert!(report.complete && report.digest_match, "{report:?}");
    assert_eq!(report.bytes, 300_000);
    assert_eq!(report.chunks, 74);
    assert_eq!(report.sha256, report.acked_sha256);
    assert_eq!(report.sha256, hex(&sha256(&video)));
    assert_eq!((report.attempts, report.resumed_from.clone()), (1, vec![0]));
    assert_eq!(report.chunk_bytes_sent, 300_000);
    assert_eq!(report.frames_sent, 75, "the open and 74 chunks");
    assert_eq!(report.upload, opts.upload.to_hex());
    assert!(report.throughput_mb_s > 0.0);
    s.net.only_upload(|u| {
        assert!(u.complete);
        assert_eq!(&u.data[..], &video[..]);
        assert_eq!(
            u.open.as_ref().map(|o| o.meta.as_str()),
            Some(opts.meta.as_str())
        );
    });
    let p = progress.snapshot();
    assert_eq!(
        (
            p.total_bytes,
            p.stored_bytes,
            p.sent_bytes,
            p.attempts,
            p.complete
        ),
        (300_000, 300_000, 300_000, 1, true)
    );
    assert_eq!(s.meter.lock().expect("meter").stats().streams_opened, 1);

    // The same upload again: the core answers Complete at once, nothing is resent.
    let again = upload(video, &opts, &mut s.tickets)
        .await
        .expect("complete");
    assert!(again.digest_match);
    assert_eq!(
        (
            again.attempts,
            again.chunk_bytes_sent,
            again.resumed_from.len()
        ),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn resumes_where_the_core_stored_after_a_cut() {
    let mut s = setup().await;
    {
        let mut b = s.net.behaviour.lock().expect("behaviour");
        b.ack_every = 4;
        // The first connection is cut after 30 chunks: 28 were acknowledged as stored.
        b.cut_after = [Some(30), None].into();
    }
    let video: Arc<[u8]> = video_bytes(12, 200 * 1024 + 77).into();
    let opts = options(s.net.tcp, 1024);
    let report = upload(video.clone(), &opts, &mut s.tickets)
        .await
        .expect("uploaded");
    assert!(report.digest_match, "{report:?}");
    assert_eq!(report.attempts, 2);
    assert_eq!(report.resumed_from, [0, 28]);
    let chunks = report.chunks;
    assert_eq!(chunks, 201);
    s.net.only_upload(|u| {
        assert_eq!(&u.data[..], &video[..]);
        assert_eq!(u.connections, 2);
        // 30 on the first connection, then only what was not stored: fewer than the whole.
        assert_eq!(u.chunks_received, 30 + u64::from(chunks - 28));
    });
    // What the device sent covers the whole video once, and the resumed part again at most.
    assert!(report.chunk_bytes_sent >= report.bytes + 2 * 1024);
    assert!(report.chunk_bytes_sent <= 2 * report.bytes - 28 * 1024);
    assert_eq!(s.meter.lock().expect("meter").stats().streams_opened, 2);
}

#[tokio::test]
async fn a_refusal_ends_the_upload_with_its_reason() {
    let mut s = setup().await;
    s.net.behaviour.lock().expect("behaviour").refuse = Some(RefuseReason::Busy);
    let video: Arc<[u8]> = video_bytes(1, 5000).into();
    let err = upload(video, &options(s.net.tcp, 1024), &mut s.tickets)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, UploadError::Refused { reason, .. } if reason == "busy"),
        "{err}"
    );
    assert_eq!(err.to_string(), "the core refused the upload: busy");
    assert_eq!(err.report().map(|r| r.attempts), Some(1));
}

#[tokio::test]
async fn a_changed_size_is_refused_and_a_wrong_digest_is_an_error() {
    let mut s = setup().await;
    let opts = options(s.net.tcp, 1024);
    upload(video_bytes(2, 3000).into(), &opts, &mut s.tickets)
        .await
        .expect("first");
    let err = upload(video_bytes(2, 4000).into(), &opts, &mut s.tickets)
        .await
        .expect_err("other size, same upload id");
    assert!(err.to_string().ends_with("size_mismatch"), "{err}");

    let mut s = setup().await;
    s.net.behaviour.lock().expect("behaviour").corrupt_digest = true;
    let err = upload(video_bytes(3, 3000).into(), &opts_for(&s), &mut s.tickets)
        .await
        .expect_err("digest");
    let UploadError::DigestMismatch { report } = &err else {
        panic!("{err}");
    };
    assert!(report.complete && !report.digest_match);
    assert_ne!(report.sha256, report.acked_sha256);
}

fn opts_for(s: &Setup) -> UploadOptions {
    options(s.net.tcp, 1024)
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let mut s = setup().await;
    // Nothing listens there any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let opts = UploadOptions {
        max_attempts: 3,
        ..options(closed, 1024)
    };
    let err = upload(video_bytes(4, 3000).into(), &opts, &mut s.tickets)
        .await
        .expect_err("nothing there");
    assert!(
        err.to_string()
            .starts_with("gave up after 3 attempts; the last failed: connect"),
        "{err}"
    );

    // A port that accepts and never answers: no ack within the timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let opts = UploadOptions {
        max_attempts: 2,
        ack_timeout: Duration::from_millis(200),
        ..options(silent.local_addr().expect("addr"), 1024)
    };
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let err = upload(video_bytes(4, 3000).into(), &opts, &mut s.tickets)
        .await
        .expect_err("silent");
    assert!(err.to_string().contains("no ack progress"), "{err}");
    held.abort();

    // No session: no ticket.
    let core = TestCore::new();
    let lonely = Meter::new(
        "cam-00002",
        StaticKeypair::generate().expect("keypair"),
        core.public(),
        MeterConfig::default(),
        Timebase::new(Instant::now(), 1_700_000_000_000),
        4,
    );
    let mut tickets = MeterTickets(Arc::new(Mutex::new(lonely)));
    let opts = UploadOptions {
        max_attempts: 2,
        ..options(s.net.tcp, 1024)
    };
    let err = upload(video_bytes(4, 3000).into(), &opts, &mut tickets)
        .await
        .expect_err("no session");
    assert!(err.to_string().contains("no working session"), "{err}");
}

#[tokio::test]
async fn refuses_bad_parameters_before_connecting() {
    let mut s = setup().await;
    for (video, chunk) in [(0, 1024), (100, 512), (100, 70_000)] {
        let err = upload(
            video_bytes(5, video).into(),
            &options(s.net.tcp, chunk),
            &mut s.tickets,
        )
        .await
        .expect_err("invalid");
        assert!(matches!(err, UploadError::Invalid(_)), "{err}");
        assert!(err.report().is_none());
    }
}

#[test]
fn the_pacer_lets_through_the_bitrate_and_one_chunk_of_burst() {
    // 8 Mbit/s = 1,000,000 bytes a second, a bucket one 65,536-byte chunk deep.
    let start = Instant::now();
    let mut pacer = Pacer::new(8_000_000, 65_536).expect("paced");
    let mut now = start;
    let mut sent_within_1s = 0;
    for _ in 0..40 {
        now = pacer.reserve(65_536, now);
        if now <= start + Duration::from_secs(1) {
            sent_within_1s += 1;
        }
    }
    // One at once (the bucket), then one every 65.536 ms: 16 more within the second.
    assert_eq!(sent_within_1s, 16);
    // 40 chunks: the first free, 39 paid for at 65.536 ms each.
    let expected = Duration::from_secs_f64(39.0 * 0.065_536);
    let took = now - start;
    assert!(
        took >= expected - Duration::from_millis(1) && took <= expected + Duration::from_millis(1),
        "{took:?}"
    );
    // An idle sender gets one chunk of burst back, not more.
    let later = now + Duration::from_secs(10);
    assert_eq!(pacer.reserve(65_536, later), later);
    assert!(pacer.reserve(65_536, later) > later);
    assert!(Pacer::new(0, 65_536).is_none());
}

#[tokio::test]
async fn a_bitrate_paces_the_upload() {
    let mut s = setup().await;
    // 400 KiB at 8 Mbit/s (1 MB/s) with a 16 KiB burst: at least 0.39 s on any machine.
    let opts = UploadOptions {
        bitrate_bps: 8_000_000,
        ..options(s.net.tcp, 16 * 1024)
    };
    let started = Instant::now();
    let report = upload(video_bytes(6, 400 * 1024).into(), &opts, &mut s.tickets)
        .await
        .expect("uploaded");
    assert!(report.digest_match);
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    assert!(report.throughput_mb_s < 1.2, "{}", report.throughput_mb_s);
}

#[tokio::test]
async fn session_tickets_handshake_over_udp_then_upload() {
    let mut core = TestCore::new();
    core.admission = true;
    let public = core.public();
    let net = NetCore::start(core).await;
    let identity = crate::config::DeviceIdentity {
        serial: "cam-00009".into(),
        keypair: StaticKeypair::generate().expect("keypair"),
    };
    let mut tickets = SessionTickets::connect(identity, public, net.udp, Duration::from_secs(5))
        .await
        .expect("socket");
    assert!(tickets.establish().await);
    assert_eq!(tickets.meter().stats().handshakes, 1);
    let video: Arc<[u8]> = video_bytes(31, 70_000).into();
    for _ in 0..2 {
        // Two uploads on one session, each its own id.
        let report = upload(video.clone(), &options(net.tcp, 8192), &mut tickets)
            .await
            .expect("uploaded");
        assert!(report.digest_match);
    }
    assert_eq!(tickets.meter().stats().handshakes, 1);
    assert_eq!(tickets.meter().stats().streams_opened, 2);
    assert_eq!(net.uploads.lock().expect("uploads").len(), 2);
}
