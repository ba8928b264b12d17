//! The real core, in process, on port 0: a device over direct UDP and a gateway over QUIC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use core_stub::{CoreConfig, InitOptions, Listeners, Store, SubscriptionStatus};
use relay_protocol::payload::{Message, ReadingSeq, RefusalReason};
use relay_protocol::session::{DeviceEvent, DeviceSession, PublicKey, StaticKeypair};
use relay_protocol::{FlowId, SessionId, UplinkDatagram, UplinkMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Core {
    dir: tempfile::TempDir,
    quic: SocketAddr,
    bulk: SocketAddr,
    direct: SocketAddr,
    streams: SocketAddr,
    admin: SocketAddr,
    core_public: PublicKey,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), core_stub::CoreError>>,
}

impl Core {
    async fn start(devices: u32) -> Result<Self> {
        Self::start_with(devices, |_| Ok(())).await
    }

    /// Starts a core on a fresh deployment, after `prepare` has had its way with the directory.
    async fn start_with(devices: u32, prepare: impl FnOnce(&Path) -> Result<()>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        core_stub::init(
            dir.path(),
            &InitOptions {
                devices,
                gateways: 1,
                force: false,
            },
        )?;
        prepare(dir.path())?;
        let mut config = CoreConfig::load(&dir.path().join("core/core.toml"))?;
        config.listen_on_ephemeral_ports();
        let ready_file = dir.path().join("ready.json");
        config.ready_file = Some(ready_file.clone());
        let core_public = *config.noise.public();
        let listeners = Listeners::bind(&config).await?;
        let (quic, bulk, direct, streams, admin) = (
            listeners.quic_addr(),
            listeners.bulk_addr(),
            listeners.direct_addr(),
            listeners.stream_addr(),
            listeners.admin_addr(),
        );
        assert_ne!(bulk.port(), 0);
        assert_ne!(bulk, quic, "a bulk endpoint of its own");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(core_stub::run(config, listeners, shutdown.clone()));

        let deadline = Instant::now() + WAIT;
        while !ready_file.exists() {
            if Instant::now() > deadline {
                bail!("no ready file");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ready: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ready_file)?)?;
        assert_eq!(ready["quic"].as_str(), Some(quic.to_string().as_str()));
        assert_eq!(ready["bulk"].as_str(), Some(bulk.to_string().as_str()));
        assert_eq!(ready["direct"].as_str(), Some(direct.to_string().as_str()));
        assert_eq!(ready["admin"].as_str(), Some(admin.to_string().as_str()));
        assert_eq!(
            ready["streams"].as_str(),
            Some(streams.to_string().as_str())
        );
        Ok(Self {
            dir,
            quic,
            bulk,
            direct,
            streams,
            admin,
            core_public,
            shutdown,
            task,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn device_key(&self, i: usize) -> Result<(String, StaticKeypair)> {
        let fleet = std::fs::read_to_string(self.path("devices/fleet.keys"))?;
        let line = fleet
            .lines()
            .nth(i)
            .ok_or_else(|| anyhow!("no device {i}"))?;
        let (serial, key) = line.split_once(' ').ok_or_else(|| anyhow!("bad line"))?;
        Ok((serial.to_owned(), StaticKeypair::from_private_hex(key)?))
    }

    fn store(&self) -> Result<Store> {
        Ok(Store::open(&self.path("core/subscriptions.db"))?)
    }

    async fn http(&self, path: &str) -> Result<String> {
        let mut s = tokio::net::TcpStream::connect(self.admin).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    async fn metric(&self, series: &str) -> Result<f64> {
        let body = self.http("/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .ok_or_else(|| anyhow!("{series} not in /metrics"))?
            .trim()
            .parse()
            .context("metric value")
    }

    /// Polls until the series reaches `want` (metrics are updated after the frame is handled).
    async fn wait_metric(&self, series: &str, want: f64) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series).await?;
            if v == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{series} = {v}, want {want}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task).await???;
        Ok(())
    }
}

/// A device talking to the core's direct-access port.
struct DirectDevice {
    session: DeviceSession,
    socket: UdpSocket,
    core: SocketAddr,
}

impl DirectDevice {
    async fn new(key: StaticKeypair, core_public: PublicKey, core: SocketAddr) -> Result<Self> {
        Ok(Self {
            session: DeviceSession::new(key, core_public),
            socket: UdpSocket::bind("127.0.0.1:0").await?,
            core,
        })
    }

    async fn send(&self, frame: &[u8]) -> Result<()> {
        self.socket.send_to(frame, self.core).await?;
        Ok(())
    }

    async fn recv(&self, within: Duration) -> Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(within, self.socket.recv_from(&mut buf)).await {
            Ok(r) => {
                let (n, _) = r?;
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(_) => Ok(None),
        }
    }

    async fn handshake(&mut self, timestamp: u64) -> Result<Vec<u8>> {
        let init =
            self.session
                .start_handshake(SessionId(timestamp as u32), timestamp, Instant::now())?;
        self.send(&init).await?;
        let response = self
            .recv(WAIT)
            .await?
            .ok_or_else(|| anyhow!("no response"))?;
        let mut pt = Vec::new();
        match self
            .session
            .handle_datagram(&response, Instant::now(), &mut pt)?
        {
            DeviceEvent::Established { .. } => Ok(init),
            other => bail!("unexpected {other:?}"),
        }
    }

    fn reading(&mut self, seq: u64, data: &[u8]) -> Result<Vec<u8>> {
        let mut frame = Vec::new();
        self.session.seal(
            &Message::Reading {
                seq: ReadingSeq(seq),
                data,
            }
            .to_vec(),
            &mut frame,
        )?;
        Ok(frame)
    }

    fn open_ack(&mut self, frame: &[u8]) -> Result<Vec<u64>> {
        let mut pt = Vec::new();
        self.session
            .handle_datagram(frame, Instant::now(), &mut pt)?;
        match Message::decode(&pt)? {
            Message::Ack { seqs, .. } => Ok(seqs.into_iter().map(|s| s.0).collect()),
            other => bail!("expected an ack, got {other:?}"),
        }
    }

    /// Reads the core's authenticated refusal of the pending handshake.
    async fn expect_refusal(&mut self) -> Result<RefusalReason> {
        let frame = self
            .recv(WAIT)
            .await?
            .ok_or_else(|| anyhow!("no refusal"))?;
        let mut pt = Vec::new();
        match self
            .session
            .handle_datagram(&frame, Instant::now(), &mut pt)?
        {
            DeviceEvent::Refused { response } => response.refused.context("no reason"),
            other => bail!("expected a refusal, got {other:?}"),
        }
    }

    async fn expect_ack(&mut self) -> Result<Vec<u64>> {
        let frame = self.recv(WAIT).await?.ok_or_else(|| anyhow!("no ack"))?;
        self.open_ack(&frame)
    }
}

#[tokio::test]
async fn direct_device_end_to_end() -> Result<()> {
    let core = Core::start(5).await?;
    assert!(core.http("/ready").await?.starts_with("HTTP/1.1 200"));
    assert!(core
        .http("/metrics")
        .await?
        .contains("core_build_info{version="));

    let (serial, key) = core.device_key(0)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    let init = dev.handshake(1_000).await?;
    core.wait_metric("core_handshakes_total{result=\"accepted\"}", 1.0)
        .await?;
    core.wait_metric("core_sessions", 1.0).await?;

    // A reading is acknowledged once durable.
    let frame = dev.reading(1, b"first")?;
    dev.send(&frame).await?;
    assert_eq!(dev.expect_ack().await?, vec![1]);
    assert_eq!(core.store()?.count_readings()?, 1);

    // The same reading again (a retransmission: new frame, same seq) is acknowledged, not stored.
    let again = dev.reading(1, b"first")?;
    dev.send(&again).await?;
    assert_eq!(dev.expect_ack().await?, vec![1]);
    assert_eq!(core.store()?.count_readings()?, 1);
    core.wait_metric("core_readings_stored_total", 1.0).await?;
    core.wait_metric("core_readings_duplicate_total", 1.0)
        .await?;

    // A replayed HandshakeInit gets nothing and is counted; the subscription is flagged (asked
    // to update its key) but keeps working: anyone on the path can replay.
    dev.send(&init).await?;
    assert!(dev.recv(Duration::from_millis(300)).await?.is_none());
    core.wait_metric("core_handshakes_total{result=\"replayed\"}", 1.0)
        .await?;
    core.wait_metric("core_fraud_flags_total{reason=\"replay\"}", 1.0)
        .await?;

    // A tampered transport frame is dropped and counted; the session still works after it.
    let good = dev.reading(2, b"second")?;
    let mut bad = good.clone();
    let i = bad.len() - 20;
    bad[i] ^= 0x01;
    dev.send(&bad).await?;
    core.wait_metric("core_frames_dropped_total{reason=\"authentication\"}", 1.0)
        .await?;
    dev.send(&good).await?;
    assert_eq!(dev.expect_ack().await?, vec![2]);

    // An unknown key gets an authenticated refusal, and is counted.
    let stranger = StaticKeypair::generate()?;
    let mut other = DirectDevice::new(stranger, core.core_public, core.direct).await?;
    let stranger_init = other
        .session
        .start_handshake(SessionId(7), 1, Instant::now())?;
    other.send(&stranger_init).await?;
    assert_eq!(other.expect_refusal().await?, RefusalReason::UnknownKey);
    core.wait_metric("core_handshakes_total{result=\"unknown_key\"}", 1.0)
        .await?;

    // Junk on the direct port is counted by reason and harms nobody.
    other.send(&[1, 3, 0]).await?;
    other.send(&[7; 40]).await?;
    core.wait_metric("core_frames_dropped_total{reason=\"truncated\"}", 1.0)
        .await?;
    core.wait_metric("core_frames_dropped_total{reason=\"unknown_version\"}", 1.0)
        .await?;
    let frame = dev.reading(3, b"third")?;
    dev.send(&frame).await?;
    assert_eq!(dev.expect_ack().await?, vec![3]);

    assert_eq!(
        core.store()?.readings_of(&serial)?,
        vec![
            (1, b"first".to_vec()),
            (2, b"second".to_vec()),
            (3, b"third".to_vec())
        ]
    );
    assert!(
        core.metric("core_frames_received_total{access=\"direct\"}")
            .await?
            >= 9.0
    );
    core.stop().await
}

#[tokio::test]
async fn suspended_and_revoked_devices_are_refused() -> Result<()> {
    let core = Core::start_with(3, |dir| {
        let store = Store::open(&dir.join("core/subscriptions.db"))?;
        store.set_status("meter-00002", SubscriptionStatus::Suspended)?;
        store.set_status("meter-00003", SubscriptionStatus::Revoked)?;
        Ok(())
    })
    .await?;
    for (i, result, reason) in [
        (1, "suspended", RefusalReason::Suspended),
        (2, "revoked", RefusalReason::Revoked),
    ] {
        let (_, key) = core.device_key(i)?;
        let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
        let init = dev
            .session
            .start_handshake(SessionId(1), 1, Instant::now())?;
        dev.send(&init).await?;
        assert_eq!(dev.expect_refusal().await?, reason);
        core.wait_metric(
            &format!("core_handshakes_total{{result=\"{result}\"}}"),
            1.0,
        )
        .await?;
    }
    // The active one still gets in.
    let (_, key) = core.device_key(0)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    dev.handshake(5).await?;
    core.stop().await
}

fn client_config(dir: &Path, with_cert: bool) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(dir.join("ca.pem"))?.as_slice()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut crypto = if with_cert {
        let chain =
            rustls_pemfile::certs(&mut std::fs::read(dir.join("gateway-1/cert.pem"))?.as_slice())
                .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(
            &mut std::fs::read(dir.join("gateway-1/key.pem"))?.as_slice(),
        )?
        .ok_or_else(|| anyhow!("no key"))?;
        builder.with_client_auth_cert(chain, key)?
    } else {
        builder.with_no_client_auth()
    };
    crypto.alpn_protocols = vec![b"relay-uplink/1".to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?,
    )))
}

/// Says Hello on a new control stream: the control stream, and `HelloAck`'s `max_flows` and
/// `bulk_port`.
async fn hello(
    conn: &quinn::Connection,
) -> Result<(
    quinn::SendStream,
    quinn::RecvStream,
    u32,
    Option<std::num::NonZeroU16>,
)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = BytesMut::new();
    UplinkMessage::Hello {
        name: "gateway-1".into(),
    }
    .encode(&mut buf);
    send.write_all(&buf).await?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Some(msg) = UplinkMessage::decode(&mut buf)? {
            match msg {
                UplinkMessage::HelloAck {
                    max_flows,
                    bulk_port,
                } => return Ok((send, recv, max_flows, bulk_port)),
                other => bail!("expected HelloAck, got {other:?}"),
            }
        }
        let n = recv
            .read(&mut chunk)
            .await?
            .ok_or_else(|| anyhow!("stream ended"))?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The next control message from the core.
async fn read_control(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<UplinkMessage> {
    let mut chunk = [0u8; 256];
    loop {
        if let Some(msg) = UplinkMessage::decode(buf)? {
            return Ok(msg);
        }
        let n = tokio::time::timeout(WAIT, recv.read(&mut chunk))
            .await??
            .ok_or_else(|| anyhow!("control stream ended"))?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn gateway_over_quic_end_to_end() -> Result<()> {
    let core = Core::start(3).await?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;

    // Without a client certificate, no uplink.
    endpoint.set_default_client_config(client_config(core.dir.path(), false)?);
    let refused = async {
        let conn = endpoint.connect(core.quic, "core.relay.local")?.await?;
        hello(&conn).await
    };
    assert!(
        tokio::time::timeout(WAIT, refused).await?.is_err(),
        "a gateway without a certificate got through"
    );

    endpoint.set_default_client_config(client_config(core.dir.path(), true)?);
    let conn = endpoint.connect(core.quic, "core.relay.local")?.await?;
    let (mut control, mut control_rx, max_flows, bulk_port) = hello(&conn).await?;
    assert_eq!(max_flows, 1_000_000);
    assert_eq!(
        bulk_port.map(std::num::NonZeroU16::get),
        Some(core.bulk.port()),
        "HelloAck names the bulk endpoint's port"
    );
    core.wait_metric("core_gateways_connected", 1.0).await?;

    let (_, key) = core.device_key(2)?;
    let mut dev = DeviceSession::new(key, core.core_public);
    let flow = FlowId(42);
    let send = |frame: &[u8]| -> Result<()> {
        let mut buf = BytesMut::new();
        UplinkDatagram::new(flow, frame).encode(&mut buf);
        conn.send_datagram(buf.freeze())?;
        Ok(())
    };
    let recv_admitted = || async {
        let dg = tokio::time::timeout(WAIT, conn.read_datagram()).await??;
        let d = UplinkDatagram::decode(&dg)?;
        assert_eq!(d.flow, flow);
        Ok::<_, anyhow::Error>((d.frame.to_vec(), d.admission))
    };
    let recv = || async {
        let (frame, admission) = recv_admitted().await?;
        assert_eq!(
            admission, None,
            "an admission on a frame other than a response"
        );
        Ok::<_, anyhow::Error>(frame)
    };

    // The response comes with the session's admission (kind 2): the same key as the device's.
    send(&dev.start_handshake(SessionId(5), 1, Instant::now())?)?;
    let mut pt = Vec::new();
    let (response, admission) = recv_admitted().await?;
    let ev = dev.handle_datagram(&response, Instant::now(), &mut pt)?;
    assert!(matches!(ev, DeviceEvent::Established { .. }));
    let admission = admission.context("no admission with the response")?;
    let current = dev.current().context("session")?;
    assert_eq!(admission.session, current.remote_id());
    assert_eq!(Some(&admission.key), current.admission());
    assert_eq!(admission.lifetime_secs, 7200, "reject_after_secs");
    assert_eq!(
        (
            admission.quota.frames,
            admission.quota.bytes,
            admission.quota.interval_secs
        ),
        (6000, 7_200_000, 60),
        "the [admission] default"
    );

    let mut frame = Vec::new();
    dev.seal(
        &Message::Reading {
            seq: ReadingSeq(77),
            data: b"via gateway",
        }
        .to_vec(),
        &mut frame,
    )?;
    // Tagged for the gateway (0x04), and accepted by the core like a plain transport frame.
    assert_eq!(frame[1], 4);
    assert!(admission.key.verify(&frame));
    send(&frame)?;
    dev.handle_datagram(&recv().await?, Instant::now(), &mut pt)?;
    assert_eq!(
        Message::decode(&pt)?,
        Message::Ack {
            seqs: vec![ReadingSeq(77)],
            notices: Default::default(),
        }
    );

    // A frame too large for a QUIC datagram comes on the control stream instead.
    let big = vec![0xA5; relay_protocol::payload::MAX_READING];
    let mut frame = Vec::new();
    dev.seal(
        &Message::Reading {
            seq: ReadingSeq(78),
            data: &big,
        }
        .to_vec(),
        &mut frame,
    )?;
    let mut buf = BytesMut::new();
    UplinkMessage::DeviceFrame {
        flow,
        frame: frame.into(),
    }
    .encode(&mut buf);
    control.write_all(&buf).await?;
    dev.handle_datagram(&recv().await?, Instant::now(), &mut pt)?;
    assert_eq!(
        Message::decode(&pt)?,
        Message::Ack {
            seqs: vec![ReadingSeq(78)],
            notices: Default::default(),
        }
    );
    let (serial, _) = core.device_key(2)?;
    assert_eq!(core.store()?.readings_of(&serial)?[1], (78, big));

    // A gateway that lost its table asks: the live session is admitted again, an unknown one
    // is not.
    let core_session = dev.current().context("session")?.remote_id();
    let mut buf = BytesMut::new();
    UplinkMessage::AdmitQuery {
        sessions: vec![core_session, SessionId(0x0bad_0bad)],
    }
    .encode(&mut buf);
    control.write_all(&buf).await?;
    let mut buf = BytesMut::new();
    match read_control(&mut control_rx, &mut buf).await? {
        UplinkMessage::Admit { admissions } => {
            assert_eq!(admissions.len(), 1);
            assert_eq!(
                (
                    admissions[0].session,
                    admissions[0].key,
                    admissions[0].quota
                ),
                (core_session, admission.key, admission.quota)
            );
            assert!(admissions[0].lifetime_secs <= 7200);
        }
        other => bail!("expected Admit, got {other:?}"),
    }
    assert_eq!(
        read_control(&mut control_rx, &mut buf).await?,
        UplinkMessage::NotAdmitted {
            sessions: vec![SessionId(0x0bad_0bad)]
        }
    );
    core.wait_metric("core_admission_queries_total{result=\"admitted\"}", 1.0)
        .await?;
    core.wait_metric("core_admission_queries_total{result=\"not_admitted\"}", 1.0)
        .await?;

    // Suspension: before the API answers, the gateway is told which session died.
    let (status, _) = core
        .api(
            "POST",
            &format!("/v1/devices/{serial}/suspend"),
            Some(&core.token("operator")?),
        )
        .await?;
    assert_eq!(status, 200);
    let revoked = read_control(&mut control_rx, &mut buf).await?;
    assert_eq!(
        revoked,
        UplinkMessage::Revoked {
            sessions: vec![core_session]
        }
    );
    core.wait_metric("core_revocations_sent_total", 1.0).await?;

    // A malformed uplink datagram is counted and the connection carries on.
    conn.send_datagram(bytes::Bytes::from_static(&[9, 1, 0, 0, 0, 1, 1]))?;
    core.wait_metric(
        "core_frames_dropped_total{reason=\"uplink_unknown_version\"}",
        1.0,
    )
    .await?;
    assert!(
        core.metric("core_frames_received_total{access=\"gateway\"}")
            .await?
            >= 3.0
    );

    conn.close(0u32.into(), b"bye");
    core.wait_metric("core_gateways_connected", 0.0).await?;
    core.stop().await
}

impl Core {
    fn token(&self, role: &str) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.path(&format!("admin-{role}.token")))?
                .trim()
                .to_owned(),
        )
    }

    /// An admin API call: `(status, JSON body)`.
    async fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, serde_json::Value)> {
        self.api_with(method, path, token, None).await
    }

    /// An admin API call with a body: `(status, JSON body)`.
    async fn api_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<relay_ops::client::Body<'_>>,
    ) -> Result<(u16, serde_json::Value)> {
        let a = relay_ops::client::request(self.admin, method, path, token, body, WAIT).await?;
        Ok((
            a.status,
            serde_json::from_slice(&a.body).unwrap_or_default(),
        ))
    }

    async fn raw(&self, request: &str) -> Result<String> {
        let mut s = tokio::net::TcpStream::connect(self.admin).await?;
        s.write_all(request.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }
}

#[tokio::test]
async fn admin_api_tokens_roles_suspend_resume_revoke_and_audit() -> Result<()> {
    let core = Core::start(3).await?;
    let op = core.token("operator")?;
    let tech = core.token("technician")?;

    // No token, an empty one, a wrong one: 401, and each audited as anonymous.
    let no_header = core.raw("GET /v1/devices HTTP/1.1\r\n\r\n").await?;
    assert!(no_header.starts_with("HTTP/1.1 401"), "{no_header}");
    assert_eq!(core.api("GET", "/v1/devices", None).await?.0, 401);
    assert_eq!(core.api("GET", "/v1/devices", Some("")).await?.0, 401);
    assert_eq!(
        core.api("POST", "/v1/devices/meter-00001/suspend", Some("wrong"))
            .await?
            .0,
        401
    );
    // Technicians read, operators change.
    let (status, list) = core.api("GET", "/v1/devices?limit=2", Some(&tech)).await?;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 3);
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(2));
    assert_eq!(list["devices"][0]["status"], "active");
    let (status, _) = core
        .api("POST", "/v1/devices/meter-00001/suspend", Some(&tech))
        .await?;
    assert_eq!(status, 403);
    assert_eq!(core.api("GET", "/v1/audit", Some(&tech)).await?.0, 403);
    assert_eq!(
        core.api("GET", "/v1/devices/meter-99999", Some(&tech))
            .await?
            .0,
        404
    );
    assert_eq!(
        core.api("GET", "/v1/devices?limit=0", Some(&tech)).await?.0,
        400
    );

    // A device with a live session over direct UDP.
    let (serial, key) = core.device_key(0)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    dev.handshake(1_000).await?;
    let frame = dev.reading(1, b"one")?;
    dev.send(&frame).await?;
    assert_eq!(dev.expect_ack().await?, vec![1]);
    let (_, shown) = core
        .api("GET", &format!("/v1/devices/{serial}"), Some(&tech))
        .await?;
    assert_eq!(
        (&shown["readings"], &shown["live_sessions"]),
        (&serde_json::json!(1), &serde_json::json!(1))
    );

    // Suspend: the answer comes after the engine dropped the session.
    let (status, changed) = core
        .api("POST", &format!("/v1/devices/{serial}/suspend"), Some(&op))
        .await?;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["sessions_dropped"], 1);
    assert_eq!(changed["previous"], "active");
    let frame = dev.reading(2, b"two")?;
    dev.send(&frame).await?;
    assert!(dev.recv(Duration::from_millis(300)).await?.is_none());
    core.wait_metric("core_frames_dropped_total{reason=\"unknown_session\"}", 1.0)
        .await?;
    assert_eq!(core.store()?.readings_of(&serial)?.len(), 1);
    let init = dev
        .session
        .start_handshake(SessionId(7), 2_000, Instant::now())?;
    dev.send(&init).await?;
    assert_eq!(dev.expect_refusal().await?, RefusalReason::Suspended);
    core.wait_metric("core_handshakes_total{result=\"suspended\"}", 1.0)
        .await?;
    core.wait_metric("core_lifecycle_events_total{event=\"suspend\"}", 1.0)
        .await?;

    // Resume: handshakes succeed again and readings are acknowledged.
    let (status, _) = core
        .api("POST", &format!("/v1/devices/{serial}/resume"), Some(&op))
        .await?;
    assert_eq!(status, 200);
    dev.handshake(3_000).await?;
    let frame = dev.reading(2, b"two")?;
    dev.send(&frame).await?;
    assert_eq!(dev.expect_ack().await?, vec![2]);

    // Revoke is final.
    let (status, changed) = core
        .api("POST", &format!("/v1/devices/{serial}/revoke"), Some(&op))
        .await?;
    assert_eq!(
        (status, &changed["sessions_dropped"]),
        (200, &serde_json::json!(1))
    );
    let (status, _) = core
        .api("POST", &format!("/v1/devices/{serial}/resume"), Some(&op))
        .await?;
    assert_eq!(status, 409);
    let init = dev
        .session
        .start_handshake(SessionId(8), 4_000, Instant::now())?;
    dev.send(&init).await?;
    assert_eq!(dev.expect_refusal().await?, RefusalReason::Revoked);
    core.wait_metric("core_handshakes_total{result=\"revoked\"}", 1.0)
        .await?;

    // The audit log: every refusal and every change, in order.
    let (status, audit) = core.api("GET", "/v1/audit?limit=100", Some(&op)).await?;
    assert_eq!(status, 200);
    let events = audit["events"].as_array().cloned().unwrap_or_default();
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_owned(),
                e["action"].as_str().unwrap_or("").to_owned(),
                e["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("anonymous", "list_devices", "unauthorized"),
        ("anonymous", "list_devices", "unauthorized"),
        ("anonymous", "list_devices", "unauthorized"),
        ("anonymous", "suspend", "unauthorized"),
        ("technician", "suspend", "forbidden"),
        ("technician", "read_audit", "forbidden"),
        ("technician", "show_device", "not_found"),
        ("technician", "unknown", "bad_request"),
        ("operator", "suspend", "ok"),
        ("operator", "resume", "ok"),
        ("operator", "revoke", "ok"),
        ("operator", "resume", "conflict"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(summary, want);
    assert!(events
        .windows(2)
        .all(|w| w[0]["id"].as_i64() < w[1]["id"].as_i64()));
    assert_eq!(events[8]["target"], serial.as_str());
    let audit_text = audit.to_string();
    assert!(!audit_text.contains(&op) && !audit_text.contains(&tech));

    // Append-only in the database itself, whoever writes to it.
    let conn = rusqlite::Connection::open(core.path("core/subscriptions.db"))?;
    assert!(conn.execute("UPDATE audit SET actor = 'x'", []).is_err());
    assert!(conn.execute("DELETE FROM audit WHERE id = 1", []).is_err());
    drop(conn);
    assert_eq!(core.store()?.audit(1000)?.len(), events.len());
    assert!(
        core.metric("core_admin_requests_total{result=\"unauthorized\"}")
            .await?
            >= 3.0
    );
    core.stop().await
}

#[test]
fn devices_suspend_through_the_cli() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let core = rt.block_on(Core::start(2))?;
    let bin = env!("CARGO_BIN_EXE_core-stub");
    let run = |args: &[&str], token_file: Option<&Path>| {
        let mut c = std::process::Command::new(bin);
        c.args(args)
            .args(["--admin", &core.admin.to_string()])
            .env_remove("CORE_ADMIN_TOKEN");
        if let Some(f) = token_file {
            c.arg("--token-file").arg(f);
        }
        c.output()
    };
    let op = core.path("admin-operator.token");
    let tech = core.path("admin-technician.token");

    let out = run(&["devices", "suspend", "meter-00002"], Some(&op))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("suspended"), "{stdout}");
    let out = run(&["devices", "show", "meter-00002", "--json"], Some(&tech))?;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["status"], "suspended");
    // The wrong role: refused, exit 1, one error line.
    let out = run(&["devices", "resume", "meter-00002"], Some(&tech))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: HTTP 403"));
    // No token at all: bad usage, exit 2.
    let out = run(&["devices", "list"], None)?;
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["audit", "--limit", "5"], Some(&op))?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("forbidden"));
    assert_eq!(
        core.store()?
            .subscriptions()?
            .iter()
            .find(|s| s.serial == "meter-00002")
            .map(|s| s.status),
        Some(SubscriptionStatus::Suspended)
    );
    rt.block_on(core.stop())
}

/// The lifecycle commands against a running core: claim, activate (a bad plan names its row and
/// changes nothing), profiles, transfer to a second owner made with `core-stub token`, release.
#[test]
fn claim_activate_profiles_transfer_and_release_through_the_cli() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_core-stub");
    let rt = tokio::runtime::Runtime::new()?;
    let mut acme_token = String::new();
    let core = rt.block_on(Core::start_with(1, |dir| {
        let out = std::process::Command::new(bin)
            .args(["token", "--name", "acme-ops", "--role", "operator"])
            .args(["--owner", "acme", "--append"])
            .arg(dir.join("core/admin-tokens.toml"))
            .output()?;
        if !out.status.success() {
            bail!("token: {}", String::from_utf8_lossy(&out.stderr));
        }
        acme_token = String::from_utf8(out.stdout)?.trim().to_owned();
        Ok(())
    }))?;
    let op = core.path("admin-operator.token");
    let run = |args: &[&str], token: &str| {
        std::process::Command::new(bin)
            .args(args)
            .args(["--admin", &core.admin.to_string()])
            .env("CORE_ADMIN_TOKEN", token)
            .output()
    };
    let op_token = std::fs::read_to_string(&op)?.trim().to_owned();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let manifest = core.path("manifest.csv");
    let mut csv = String::from("serial,factory_public_key,model\n");
    for i in 1..=3u8 {
        csv.push_str(&format!("em-{i},{},EM-1\n", hex::encode([i; 32])));
    }
    std::fs::write(&manifest, csv)?;
    let m = manifest.to_string_lossy().into_owned();
    let out = run(&["claim", &m], &op_token)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("claimed"), "{}", text(&out));

    let plan = core.path("plan.csv");
    std::fs::write(
        &plan,
        "serial,account,profile\nem-1,apt 1,default\nem-9,apt 9,default\nem-2,apt 2,default\n",
    )?;
    let p = plan.to_string_lossy().into_owned();
    let out = run(&["activate", &p], &op_token)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: HTTP 422"), "{stderr}");
    assert!(stderr.contains("row 3 (em-9): unknown serial"), "{stderr}");
    assert_eq!(
        rt.block_on(core.metric("core_devices_activated_total"))?,
        0.0
    );
    std::fs::write(
        &plan,
        "serial,account,profile\nem-1,apt 1,default\nem-2,apt 2,default\n",
    )?;
    let out = run(&["activate", &p], &op_token)?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        rt.block_on(core.metric("core_devices_activated_total"))?,
        2.0
    );

    let out = run(
        &[
            "profiles",
            "set",
            "heat",
            "--interval",
            "300",
            "--bytes",
            "16",
        ],
        &op_token,
    )?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["profiles", "list"], &op_token)?;
    assert!(text(&out).contains("heat"), "{}", text(&out));
    let out = run(
        &[
            "profiles",
            "set",
            "building-a",
            "--interval",
            "300",
            "--bytes",
            "16",
            "--gateways",
            "gateway-1,gateway-3",
            "--no-direct",
            "--quota-frames",
            "100",
            "--quota-bytes",
            "20000",
        ],
        &op_token,
    )?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["profiles", "list"], &op_token)?;
    let listed = text(&out);
    let line = listed
        .lines()
        .find(|l| l.starts_with("building-a"))
        .unwrap_or_default();
    assert!(
        line.contains("gateways gateway-1,gateway-3")
            && line.contains("direct no")
            && line.contains("quota 100/20000 per 60 s"),
        "{listed}"
    );
    assert!(
        listed.lines().any(|l| l.starts_with("heat")
            && l.contains("gateways any")
            && l.contains("direct yes")
            && l.contains("quota default")),
        "{listed}"
    );
    let quota = core.store()?.profile("building-a")?.quota;
    assert_eq!(
        quota.map(|q| (q.frames, q.bytes, q.interval_secs)),
        Some((100, 20_000, 60))
    );

    // Transfer em-1 to acme: offered by the operator, accepted by acme's operator.
    let out = run(&["devices", "transfer", "em-1", "--to", "acme"], &op_token)?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        &["devices", "accept-transfer", "em-1", "--profile", "heat"],
        &acme_token,
    )?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["devices", "list", "--json"], &acme_token)?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(list["total"], 1);
    assert_eq!(list["devices"][0]["profile"], "heat");
    let out = run(&["devices", "readings", "em-1"], &acme_token)?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["devices", "show", "em-3"], &acme_token)?;
    assert_eq!(out.status.code(), Some(1), "not acme's");

    // Release em-2 to another core: the signed document on stdout; this core does not trust
    // its own releases, so claiming it here is refused.
    let out = run(
        &[
            "devices",
            "release",
            "em-2",
            "--core-key",
            &"ab".repeat(32),
            "--endpoint",
            "core-2.example:4433",
        ],
        &op_token,
    )?;
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["serial"], "em-2");
    assert_eq!(doc["signature"].as_str().map(str::len), Some(128));
    let release = core.path("release.json");
    std::fs::write(&release, &out.stdout)?;
    let r = release.to_string_lossy().into_owned();
    let out = run(&["claim", "--release", &r], &op_token)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not a trusted releaser"),
        "{}",
        text(&out)
    );

    let out = run(&["audit", "--limit", "200"], &op_token)?;
    let audit = text(&out);
    for action in [
        "claim_manifest",
        "activate_plan",
        "put_profile",
        "transfer",
        "accept_transfer",
        "release",
    ] {
        assert!(audit.contains(action), "{action} not audited: {audit}");
    }
    assert!(!audit.contains(&acme_token) && !audit.contains(&op_token));
    rt.block_on(core.stop())
}

// Device streams (docs/protocol.md §13): a camera's video over TCP and through a gateway.

use relay_protocol::stream::{
    AckStatus, DeviceStream, RefuseReason, StreamAck, StreamOpen, UploadId,
};
use sha2::Digest;

type BoxRead = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// One stream connection of a camera: any carriage, the device's end of the stream.
struct Camera {
    read: BoxRead,
    write: BoxWrite,
    stream: DeviceStream,
    /// The length-prefixed open frame it started with (for replays).
    opened_with: Vec<u8>,
}

/// Seals a StreamOpen with the device's session: `(length | frame, stream keys)`.
fn stream_open(
    dev: &mut DeviceSession,
    upload: UploadId,
    chunk_size: u32,
    total_size: u64,
) -> Result<(Vec<u8>, relay_protocol::stream::StreamKeys)> {
    let open = StreamOpen {
        salt: rand::random(),
        upload,
        chunk_size,
        total_size,
        meta: "accident".into(),
    };
    let mut frame = Vec::new();
    dev.seal(&Message::StreamOpen(open.clone()).to_vec(), &mut frame)?;
    let keys = dev
        .current()
        .context("no session")?
        .stream_keys(&open.salt, &upload);
    let mut out = (frame.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&frame);
    Ok((out, keys))
}

impl Camera {
    async fn tcp(
        dev: &mut DeviceSession,
        to: SocketAddr,
        upload: UploadId,
        chunk_size: u32,
        total_size: u64,
    ) -> Result<(Self, StreamAck)> {
        let tcp = tokio::net::TcpStream::connect(to).await?;
        let (r, w) = tcp.into_split();
        Self::start(
            dev,
            Box::new(r),
            Box::new(w),
            upload,
            chunk_size,
            total_size,
        )
        .await
    }

    async fn start(
        dev: &mut DeviceSession,
        read: BoxRead,
        mut write: BoxWrite,
        upload: UploadId,
        chunk_size: u32,
        total_size: u64,
    ) -> Result<(Self, StreamAck)> {
        let (open, keys) = stream_open(dev, upload, chunk_size, total_size)?;
        write.write_all(&open).await?;
        let mut cam = Self {
            read,
            write,
            stream: DeviceStream::new(keys),
            opened_with: open,
        };
        let ack = cam.ack().await?.context("no answer to the open")?;
        Ok((cam, ack))
    }

    async fn chunk(&mut self, index: u32, last: bool, data: &[u8]) -> Result<()> {
        let mut out = Vec::new();
        self.stream.seal_chunk(index, last, data, &mut out)?;
        self.write.write_all(&out).await?;
        Ok(())
    }

    /// The next ack; `None` when the core closed the stream.
    async fn ack(&mut self) -> Result<Option<StreamAck>> {
        let mut len = [0u8; 4];
        match tokio::time::timeout(WAIT, self.read.read_exact(&mut len)).await? {
            Ok(_) => {}
            Err(_) => return Ok(None),
        }
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        tokio::time::timeout(WAIT, self.read.read_exact(&mut frame)).await??;
        Ok(Some(self.stream.open_ack(&frame)?))
    }

    /// Reads acks until the core closes the stream; returns the last one.
    async fn until_closed(&mut self) -> Result<Option<StreamAck>> {
        let mut last = None;
        while let Some(a) = self.ack().await? {
            last = Some(a);
        }
        Ok(last)
    }
}

/// Uploads `data` whole in chunks of `chunk` bytes over a new QUIC stream of `conn` (a gateway's
/// uplink or bulk connection), checks the core answers Complete with its SHA-256 and stored it
/// byte for byte, and returns the video's record.
async fn upload_over_quic(
    conn: &quinn::Connection,
    dev: &mut DeviceSession,
    core: &Core,
    upload: UploadId,
    chunk: u32,
    data: &[u8],
) -> Result<serde_json::Value> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&relay_protocol::stream::UPLINK_STREAM_HEADER)
        .await?;
    let (mut cam, ack) = Camera::start(
        dev,
        Box::new(recv),
        Box::new(send),
        upload,
        chunk,
        data.len() as u64,
    )
    .await?;
    assert_eq!(ack, receiving(0, chunk));
    let chunks = data.len().div_ceil(chunk as usize);
    for (i, piece) in data.chunks(chunk as usize).enumerate() {
        cam.chunk(i as u32, i + 1 == chunks, piece).await?;
    }
    let digest: [u8; 32] = sha2::Sha256::digest(data).into();
    let last = cam.until_closed().await?.context("no final ack")?;
    assert_eq!(last.status, AckStatus::Complete);
    assert_eq!(last.sha256, digest);
    assert_eq!(std::fs::read(video_file(core, upload, "video")?)?, data);
    Ok(serde_json::from_slice(&std::fs::read(video_file(
        core, upload, "json",
    )?)?)?)
}

fn receiving(next_chunk: u32, chunk: u32) -> StreamAck {
    StreamAck::receiving(next_chunk, u64::from(next_chunk) * u64::from(chunk))
}

/// Deterministic video bytes.
fn video(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 % 253) as u8).collect()
}

/// Where the core filed an upload: `videos/<subscription>/<upload>.<ext>`.
fn video_file(core: &Core, upload: UploadId, ext: &str) -> Result<PathBuf> {
    for sub in std::fs::read_dir(core.path("core/videos"))? {
        let path = sub?.path().join(format!("{}.{ext}", upload.to_hex()));
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("no {ext} file for {upload}")
}

/// A core whose `[video]` acknowledges every 4 chunks.
async fn video_core() -> Result<Core> {
    Core::start_with(3, |dir| {
        let path = dir.join("core/core.toml");
        let toml = std::fs::read_to_string(&path)?;
        let edited = toml.replace("ack_every_chunks = 16", "ack_every_chunks = 4");
        assert_ne!(edited, toml, "init writes [video] ack_every_chunks");
        std::fs::write(&path, edited)?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn direct_video_stream_detects_tampering_resumes_and_completes() -> Result<()> {
    const CHUNK: u32 = 1024;
    let core = video_core().await?;
    let (serial, key) = core.device_key(0)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    dev.handshake(1_000).await?;
    let data = video(10 * CHUNK as usize + 300);
    let total = data.len() as u64;
    let part = |i: u32| {
        let start = (i * CHUNK) as usize;
        &data[start..(start + CHUNK as usize).min(data.len())]
    };
    let upload = UploadId([0x11; 16]);
    let ends = |reason: &str| format!("core_stream_ends_total{{reason=\"{reason}\"}}");

    // A new upload starts at 0; an ack after every 4 chunks. The connection breaks after 5.
    let (mut cam, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    assert_eq!(ack, receiving(0, CHUNK));
    for i in 0..5 {
        cam.chunk(i, false, part(i)).await?;
    }
    assert_eq!(cam.ack().await?, Some(receiving(4, CHUNK)));
    let replayed_open = cam.opened_with.clone();
    drop(cam);
    core.wait_metric(&ends("truncated"), 1.0).await?;
    // The chunk that arrived after the last ack was kept too: the resume starts after it.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(video_file(&core, upload, "state")?)?)?;
    assert_eq!(state["next_chunk"], 5);
    assert_eq!(
        std::fs::metadata(video_file(&core, upload, "part")?)?.len(),
        5 * u64::from(CHUNK)
    );

    // A skipped chunk: `order`.
    let (mut cam, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    assert_eq!(ack, receiving(5, CHUNK));
    cam.chunk(6, false, part(6)).await?;
    assert_eq!(cam.until_closed().await?, None);
    core.wait_metric(&ends("order"), 1.0).await?;

    // An altered chunk: `auth`.
    let (mut cam, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    assert_eq!(ack, receiving(5, CHUNK));
    let mut out = Vec::new();
    cam.stream.seal_chunk(5, false, part(5), &mut out)?;
    out[40] ^= 1;
    cam.write.write_all(&out).await?;
    assert_eq!(cam.until_closed().await?, None);
    core.wait_metric(&ends("auth"), 1.0).await?;

    // FINAL on a chunk that is not the last: `malformed`.
    let (mut cam, _) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    cam.chunk(5, true, part(5)).await?;
    assert_eq!(cam.until_closed().await?, None);
    core.wait_metric(&ends("malformed"), 1.0).await?;

    // Five good chunks, then a last chunk running past the end: `too_large`; the good ones stay.
    let (mut cam, _) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    for i in 5..10 {
        cam.chunk(i, false, part(i)).await?;
    }
    let mut long = part(10).to_vec();
    long.push(0);
    cam.chunk(10, true, &long).await?;
    assert_eq!(cam.ack().await?, Some(receiving(9, CHUNK)));
    assert_eq!(cam.until_closed().await?, Some(receiving(10, CHUNK)));
    core.wait_metric(&ends("too_large"), 1.0).await?;

    // A last chunk that stops short of the end: `malformed`.
    let (mut cam, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    assert_eq!(ack, receiving(10, CHUNK));
    cam.chunk(10, true, &part(10)[..299]).await?;
    assert_eq!(cam.until_closed().await?, None);
    core.wait_metric(&ends("malformed"), 2.0).await?;

    // The replayed open of the first connection: refused by the replay window.
    let mut tcp = tokio::net::TcpStream::connect(core.streams).await?;
    tcp.write_all(&replayed_open).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    core.wait_metric(&ends("unknown_session"), 1.0).await?;

    // The last chunk: Complete, with the digest of what is stored.
    let (mut cam, _) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    cam.chunk(10, true, part(10)).await?;
    let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
    let complete = StreamAck {
        status: AckStatus::Complete,
        reason: 0,
        next_chunk: 11,
        stored_bytes: total,
        sha256: digest,
    };
    assert_eq!(cam.ack().await?, Some(complete));
    assert_eq!(cam.until_closed().await?, None);
    core.wait_metric(&ends("complete"), 1.0).await?;
    core.wait_metric("core_videos_stored_total", 1.0).await?;
    // Every byte stored exactly once over the seven connections.
    core.wait_metric("core_stream_bytes_total", total as f64)
        .await?;
    core.wait_metric("core_streams_open", 0.0).await?;

    assert_eq!(std::fs::read(video_file(&core, upload, "video")?)?, data);
    assert!(video_file(&core, upload, "part").is_err());
    assert!(video_file(&core, upload, "state").is_err());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(video_file(&core, upload, "json")?)?)?;
    assert_eq!(record["sha256"], hex::encode(digest));
    assert_eq!(record["size"], total);
    // Filed under the subscription; `init`'s devices have no factory identity, so no serial in
    // the record (the admin API's listing adds it).
    let sub_dir = video_file(&core, upload, "json")?
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .context("subscription dir")?;
    assert_eq!(record["subscription"].to_string(), sub_dir);
    assert!(record["device"].is_null());
    assert_eq!(record["via"], "direct");
    assert_eq!(record["meta"], "accident");
    assert_eq!(record["attempts"], 7);

    // Asked again: Complete at once.
    let (_, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, total).await?;
    assert_eq!(ack, complete);

    // The operator lists it, with the device's serial; a technician may not.
    let (status, body) = core
        .api("GET", "/v1/videos", Some(&core.token("operator")?))
        .await?;
    assert_eq!(status, 200, "{body}");
    let videos = body["videos"].as_array().context("videos")?;
    assert_eq!(videos.len(), 1);
    assert_eq!(videos[0]["device"], serial.as_str());
    assert_eq!(videos[0]["sha256"], hex::encode(digest));
    assert_eq!(videos[0]["upload"], upload.to_hex());
    let (status, _) = core
        .api("GET", "/v1/videos", Some(&core.token("technician")?))
        .await?;
    assert_eq!(status, 403);

    // The datagram session was never disturbed; a StreamOpen as a datagram is dropped.
    let frame = dev.reading(1, b"after the video")?;
    dev.send(&frame).await?;
    assert_eq!(dev.expect_ack().await?, vec![1]);
    let (open, _) = stream_open(&mut dev.session, UploadId([0x22; 16]), CHUNK, 10)?;
    dev.send(&open[4..]).await?;
    core.wait_metric(
        "core_frames_dropped_total{reason=\"unexpected_message\"}",
        1.0,
    )
    .await?;
    core.stop().await
}

#[tokio::test]
async fn stream_refusals_takeover_junk_and_stalls() -> Result<()> {
    const CHUNK: u32 = 2048;
    let core = Core::start_with(3, |dir| {
        let path = dir.join("core/core.toml");
        let toml = std::fs::read_to_string(&path)?
            .replace("stall_timeout_secs = 30", "stall_timeout_secs = 1")
            .replace("max_bytes = 4294967296", "max_bytes = 1000000");
        std::fs::write(&path, toml)?;
        Ok(())
    })
    .await?;
    let (_, key) = core.device_key(1)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    dev.handshake(1_000).await?;
    let ends = |reason: &str| format!("core_stream_ends_total{{reason=\"{reason}\"}}");
    let upload = UploadId([0x33; 16]);

    // Over [video] max_bytes.
    let (_, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, 1_000_001).await?;
    assert_eq!(ack, StreamAck::refused(RefuseReason::TooLarge));

    // Started with one chunk size and total; resumed with another: refused, nothing lost.
    let (mut cam, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, 10_000).await?;
    assert_eq!(ack, receiving(0, CHUNK));
    cam.chunk(0, false, &[7; CHUNK as usize]).await?;
    drop(cam);
    core.wait_metric(&ends("truncated"), 1.0).await?;
    let (_, ack) = Camera::tcp(&mut dev.session, core.streams, upload, 1024, 10_000).await?;
    assert_eq!(ack, StreamAck::refused(RefuseReason::ChunkSize));
    let (_, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, 10_001).await?;
    assert_eq!(ack, StreamAck::refused(RefuseReason::SizeMismatch));
    core.wait_metric(&ends("refused"), 3.0).await?;

    // A second connection of the same upload takes over from the first.
    let (mut first, ack) =
        Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, 10_000).await?;
    assert_eq!(ack, receiving(1, CHUNK));
    let (second, ack) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, 10_000).await?;
    assert_eq!(ack, receiving(1, CHUNK));
    assert_eq!(first.until_closed().await?, None);
    core.wait_metric(&ends("superseded"), 1.0).await?;
    drop(second);
    core.wait_metric(&ends("truncated"), 2.0).await?;

    // Junk: a length over the limit, and a first frame that is no device frame.
    let mut tcp = tokio::net::TcpStream::connect(core.streams).await?;
    tcp.write_all(&[0xff; 4]).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await??;
    core.wait_metric(&ends("too_large"), 1.0).await?;
    let mut tcp = tokio::net::TcpStream::connect(core.streams).await?;
    tcp.write_all(&[0, 0, 0, 3, 1, 2, 3]).await?;
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await??;
    core.wait_metric(&ends("malformed"), 1.0).await?;

    // Silence: `stalled` after stall_timeout_secs, before and after the open.
    let mut tcp = tokio::net::TcpStream::connect(core.streams).await?;
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await??;
    core.wait_metric(&ends("stalled"), 1.0).await?;
    let (mut cam, _) = Camera::tcp(&mut dev.session, core.streams, upload, CHUNK, 10_000).await?;
    assert_eq!(cam.until_closed().await?, None);
    core.wait_metric(&ends("stalled"), 2.0).await?;
    core.stop().await
}

#[tokio::test]
async fn video_stream_through_a_gateway_quic_stream() -> Result<()> {
    const CHUNK: u32 = 65_536;
    let core = Core::start(3).await?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client_config(core.dir.path(), true)?);
    let conn = endpoint.connect(core.quic, "core.relay.local")?.await?;
    let (_control, _control_rx, _, _) = hello(&conn).await?;
    core.wait_metric("core_gateways_connected", 1.0).await?;

    // The session is made over direct access; the stream goes through the gateway.
    let (_, key) = core.device_key(2)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    dev.handshake(1_000).await?;
    let data = video(5 * CHUNK as usize + 1);
    let upload = UploadId([0x44; 16]);

    headerless_stream_is_refused(&core, &conn).await?;

    // Several device streams at once on one connection, beside the control stream.
    let mut open = Vec::new();
    for i in 0..4u8 {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&relay_protocol::stream::UPLINK_STREAM_HEADER)
            .await?;
        let (cam, ack) = Camera::start(
            &mut dev.session,
            Box::new(recv),
            Box::new(send),
            UploadId([0x50 + i; 16]),
            CHUNK,
            data.len() as u64,
        )
        .await?;
        assert_eq!(ack, receiving(0, CHUNK));
        open.push(cam);
    }
    core.wait_metric("core_streams_open", 4.0).await?;
    drop(open);
    core.wait_metric("core_streams_open", 0.0).await?;

    let record = upload_over_quic(&conn, &mut dev.session, &core, upload, CHUNK, &data).await?;
    assert_eq!(record["via"], "gateway-1");
    core.wait_metric("core_videos_stored_total", 1.0).await?;
    conn.close(0u32.into(), b"bye");
    core.stop().await
}

/// A rustls client configuration whose certificate is self-signed for `gateway-1`: the right
/// name, not signed by the deployment's CA.
fn forged_client_config(dir: &Path) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(dir.join("ca.pem"))?.as_slice()) {
        roots.add(c?)?;
    }
    let forged = rcgen::generate_simple_self_signed(vec!["gateway-1".to_owned()])?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(forged.key_pair.serialize_der())
        .map_err(|e| anyhow!("{e}"))?;
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![forged.cert.der().clone()], key)?;
    crypto.alpn_protocols = vec![b"relay-uplink/1".to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?,
    )))
}

/// A stream on `conn` without the device stream header is refused, counted `malformed`.
async fn headerless_stream_is_refused(core: &Core, conn: &quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[0x01, 0x99]).await?;
    assert!(tokio::time::timeout(WAIT, recv.read_to_end(1024))
        .await?
        .is_err());
    core.wait_metric("core_stream_ends_total{reason=\"malformed\"}", 1.0)
        .await
}

/// Tries to carry a device stream's open over a connection to the bulk endpoint made with
/// `config`: `Ok(())` only if the core answered it.
async fn try_bulk_stream(
    core: &Core,
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    dev: &mut DeviceSession,
) -> Result<()> {
    let conn = endpoint
        .connect_with(config, core.bulk, "core.relay.local")?
        .await?;
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&relay_protocol::stream::UPLINK_STREAM_HEADER)
        .await?;
    let (_cam, ack) = Camera::start(
        dev,
        Box::new(recv),
        Box::new(send),
        UploadId([0x66; 16]),
        1024,
        10_000,
    )
    .await?;
    bail!("the core answered {ack:?}")
}

#[tokio::test]
async fn video_stream_over_the_bulk_endpoint() -> Result<()> {
    const CHUNK: u32 = 65_536;
    let core = Core::start(3).await?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let (_, key) = core.device_key(2)?;
    let mut dev = DirectDevice::new(key, core.core_public, core.direct).await?;
    dev.handshake(1_000).await?;

    // Without a certificate, or with one the gateway CA did not sign: no stream gets through.
    for (what, config) in [
        ("no certificate", client_config(core.dir.path(), false)?),
        (
            "a forged certificate",
            forged_client_config(core.dir.path())?,
        ),
    ] {
        let tried = tokio::time::timeout(
            WAIT,
            try_bulk_stream(&core, &endpoint, config, &mut dev.session),
        )
        .await
        .map_err(|_| anyhow!("{what}: no answer"))?;
        assert!(tried.is_err(), "{what}: a stream got through");
    }
    assert_eq!(core.metric("core_bulk_connections").await?, 0.0);
    assert_eq!(core.metric("core_streams_open").await?, 0.0);

    let (bulk_client, bulk_addr) = (client_config(core.dir.path(), true)?, core.bulk);
    let bulk_connect = || async {
        anyhow::Ok(
            endpoint
                .connect_with(bulk_client.clone(), bulk_addr, "core.relay.local")?
                .await?,
        )
    };

    // A gateway's bulk connection: no Hello, no control stream, no datagrams; device streams only.
    let conn = bulk_connect().await?;
    assert_eq!(
        conn.max_datagram_size(),
        None,
        "the bulk endpoint takes no datagrams"
    );
    core.wait_metric("core_bulk_connections", 1.0).await?;
    assert_eq!(core.metric("core_gateways_connected").await?, 0.0);

    headerless_stream_is_refused(&core, &conn).await?;

    // A whole upload, stored, under the gateway's certificate name.
    let data = video(5 * CHUNK as usize + 1);
    let upload = UploadId([0x77; 16]);
    let record = upload_over_quic(&conn, &mut dev.session, &core, upload, CHUNK, &data).await?;
    assert_eq!(record["via"], "gateway-1");
    core.wait_metric("core_videos_stored_total", 1.0).await?;
    core.wait_metric("core_streams_open", 0.0).await?;

    // The datagram session was never disturbed.
    let frame = dev.reading(1, b"after the video")?;
    dev.send(&frame).await?;
    assert_eq!(dev.expect_ack().await?, vec![1]);

    conn.close(0u32.into(), b"bye");
    core.wait_metric("core_bulk_connections", 0.0).await?;

    // Shutdown closes a bulk connection that is still up.
    let conn = bulk_connect().await?;
    core.wait_metric("core_bulk_connections", 1.0).await?;
    core.stop().await?;
    let closed = tokio::time::timeout(WAIT, conn.closed()).await?;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    Ok(())
}
