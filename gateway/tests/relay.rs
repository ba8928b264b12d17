//! The gateway in-process against a tiny fake core (a quinn server with a test CA): frames go up
//! and down unchanged, junk is dropped and counted, frames wait in the queue while the core is
//! down. Every socket binds port 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use gateway::{Cli, FrameTap, GatewayConfig, Hooks, Listeners, TapPoint};
use relay_protocol::{
    Admission, AdmissionKey, DeviceFrame, FlowId, Quota, SessionId, UplinkDatagram, UplinkMessage,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// A deployment CA, the core's server certificate and the gateway's client certificate.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    core_cert: CertificateDer<'static>,
    core_key: Vec<u8>,
}

impl Pki {
    fn new() -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "relay test CA");
        let ca = ca_params.self_signed(&ca_key)?;

        let core_key = KeyPair::generate()?;
        let mut core_params =
            CertificateParams::new(vec!["core.relay.local".to_owned(), "localhost".to_owned()])?;
        core_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let core_cert = core_params.signed_by(&core_key, &ca, &ca_key)?;

        let gw_key = KeyPair::generate()?;
        let mut gw_params = CertificateParams::new(vec!["gateway-test".to_owned()])?;
        gw_params
            .distinguished_name
            .push(DnType::CommonName, "gateway-test");
        gw_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let gw_cert = gw_params.signed_by(&gw_key, &ca, &ca_key)?;

        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::create_dir(dir.path().join("gateway-1"))?;
        std::fs::write(dir.path().join("gateway-1/cert.pem"), gw_cert.pem())?;
        std::fs::write(dir.path().join("gateway-1/key.pem"), gw_key.serialize_pem())?;
        Ok(Self {
            dir,
            ca: ca.der().clone(),
            core_cert: core_cert.der().clone(),
            core_key: core_key.serialize_der(),
        })
    }

    /// Writes `gateway-1/gateway.toml` and loads it the way `main` does, on port 0. These tests
    /// relay plain `Transport` frames: admission is not required.
    fn gateway_config(&self, core: SocketAddr, queue_frames: usize) -> Result<GatewayConfig> {
        self.gateway_config_with(core, queue_frames, "[admission]\nrequire = false\n")
    }

    /// As [`gateway_config`](Self::gateway_config), with `extra` appended to the file.
    fn gateway_config_with(
        &self,
        core: SocketAddr,
        queue_frames: usize,
        extra: &str,
    ) -> Result<GatewayConfig> {
        let path = self.dir.path().join("gateway-1/gateway.toml");
        std::fs::write(
            &path,
            format!(
                r#"
name = "gateway-test"

[listen]
devices = "127.0.0.1:5683"
admin = "127.0.0.1:9465"

[uplink]
core = "{core}"
server_name = "core.relay.local"
ca = "../ca.pem"
cert = "cert.pem"
key = "key.pem"
reconnect_initial_ms = 20
reconnect_max_ms = 200
queue_frames = {queue_frames}

[flows]
max = 16
idle_timeout_secs = 600

{extra}"#
            ),
        )?;
        let cli = Cli {
            config: path,
            listen_devices: Some("127.0.0.1:0".parse()?),
            listen_admin: Some("127.0.0.1:0".parse()?),
            core: None,
            ready_file: Some(self.ready_file()),
        };
        Ok(GatewayConfig::load(&cli)?)
    }

    fn ready_file(&self) -> PathBuf {
        self.dir.path().join("gateway-1/ready.json")
    }

    /// `datagram_limit`: the largest QUIC datagram the core accepts (`None`: datagrams off).
    fn server_config(&self, datagram_limit: Option<usize>) -> Result<quinn::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.core_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.core_key.clone())),
            )?;
        tls.alpn_protocols = vec![gateway::tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        // quinn advertises its datagram receive buffer as the largest datagram it accepts.
        transport.datagram_receive_buffer_size(datagram_limit);
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// How a frame reached the fake core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Datagram,
    Stream,
}

/// A gateway connection the fake core has accepted and acknowledged.
struct CoreSession {
    name: String,
    conn: quinn::Connection,
    send: quinn::SendStream,
}

/// The core's side of the uplink, just enough of it: mutual TLS, `Hello`/`HelloAck`, and every
/// device frame that arrives, with its flow.
struct FakeCore {
    endpoint: quinn::Endpoint,
    sessions: mpsc::Receiver<CoreSession>,
    frames: mpsc::Receiver<(FlowId, Vec<u8>, Via)>,
    /// The session ids of each `AdmitQuery`.
    queries: mpsc::Receiver<Vec<SessionId>>,
}

impl FakeCore {
    fn start(socket: std::net::UdpSocket, pki: &Pki) -> Result<Self> {
        Self::start_with(socket, pki, Some(1 << 20))
    }

    fn start_with(
        socket: std::net::UdpSocket,
        pki: &Pki,
        datagram_limit: Option<usize>,
    ) -> Result<Self> {
        socket.set_nonblocking(true)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(pki.server_config(datagram_limit)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let (sessions_tx, sessions) = mpsc::channel(8);
        let (frames_tx, frames) = mpsc::channel(1024);
        let (queries_tx, queries) = mpsc::channel(64);
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let sessions_tx = sessions_tx.clone();
                let frames_tx = frames_tx.clone();
                let queries_tx = queries_tx.clone();
                tokio::spawn(async move {
                    // Stale attempts (their client gave up) fail here; that is expected.
                    let _ = serve_gateway(incoming, sessions_tx, frames_tx, queries_tx).await;
                });
            }
        });
        Ok(Self {
            endpoint,
            sessions,
            frames,
            queries,
        })
    }

    async fn query(&mut self) -> Result<Vec<SessionId>> {
        tokio::time::timeout(WAIT, self.queries.recv())
            .await
            .context("no AdmitQuery reached the core")?
            .context("fake core stopped")
    }

    async fn session(&mut self) -> Result<CoreSession> {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .context("no gateway connected")?
            .context("fake core stopped")
    }

    async fn frame(&mut self) -> Result<(FlowId, Vec<u8>, Via)> {
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .context("no frame reached the core")?
            .context("fake core stopped")
    }
}

async fn serve_gateway(
    incoming: quinn::Incoming,
    sessions: mpsc::Sender<CoreSession>,
    frames: mpsc::Sender<(FlowId, Vec<u8>, Via)>,
    queries: mpsc::Sender<Vec<SessionId>>,
) -> Result<()> {
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut buf = BytesMut::new();
    let name = match read_message(&mut recv, &mut buf).await? {
        UplinkMessage::Hello { name } => name,
        other => bail!("expected Hello, got {other:?}"),
    };
    let mut ack = BytesMut::new();
    UplinkMessage::HelloAck {
        max_flows: 1000,
        bulk_port: None,
    }
    .encode(&mut ack);
    send.write_all(&ack).await?;
    sessions
        .send(CoreSession {
            name,
            conn: conn.clone(),
            send,
        })
        .await?;
    let datagrams = {
        let frames = frames.clone();
        let conn = conn.clone();
        async move {
            loop {
                let d = conn.read_datagram().await?;
                let d = UplinkDatagram::decode(&d).map_err(|e| anyhow::anyhow!("{e}"))?;
                frames
                    .send((d.flow, d.frame.to_vec(), Via::Datagram))
                    .await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        }
    };
    let stream = async move {
        loop {
            match read_message(&mut recv, &mut buf).await? {
                UplinkMessage::DeviceFrame { flow, frame } => {
                    frames.send((flow, frame.to_vec(), Via::Stream)).await?;
                }
                UplinkMessage::AdmitQuery { sessions } => queries.send(sessions).await?,
                other => bail!("unexpected {other:?}"),
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    tokio::try_join!(datagrams, stream)?;
    Ok(())
}

async fn read_message(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<UplinkMessage> {
    loop {
        if let Some(m) = UplinkMessage::decode(buf).map_err(|e| anyhow::anyhow!("{e}"))? {
            return Ok(m);
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => bail!("stream finished"),
        }
    }
}

/// Records everything the gateway sees.
#[derive(Default)]
struct Recorder(Mutex<Vec<(TapPoint, Vec<u8>)>>);

impl FrameTap for Recorder {
    fn record(&self, point: TapPoint, bytes: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            v.push((point, bytes.to_vec()));
        }
    }
}

impl Recorder {
    fn at(&self, point: TapPoint) -> Vec<Vec<u8>> {
        self.0
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(p, _)| *p == point)
                    .map(|(_, b)| b.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A running gateway.
struct Running {
    device_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), gateway::GatewayError>>,
}

async fn start_gateway(config: GatewayConfig, hooks: Hooks) -> Result<Running> {
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let device_addr = listeners.device_addr();
    let admin_addr = listeners.admin_addr();
    let task = tokio::spawn(gateway::run(config, listeners, shutdown.clone(), hooks));
    Ok(Running {
        device_addr,
        admin_addr,
        shutdown,
        task,
    })
}

impl Running {
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(gateway::SHUTDOWN_GRACE + Duration::from_secs(2), self.task)
            .await
            .context("gateway did not stop within its grace period")???;
        Ok(())
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect(self.admin_addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Ok((status, body))
    }

    /// The value of one series in `/metrics`, e.g. `gateway_frames_dropped_total{reason="truncated"}`.
    async fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("{series} not in\n{body}"))
    }

    async fn wait_metric(&self, series: &str, want: f64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.metric(series).await?;
            if got == want {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{series} = {got}, want {want}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn dropped(&self, reason: &str) -> Result<f64> {
        self.metric(&format!(
            "gateway_frames_dropped_total{{reason=\"{reason}\"}}"
        ))
        .await
    }
}

fn transport(receiver: u32, counter: u64, ciphertext_len: usize) -> Vec<u8> {
    let ciphertext: Vec<u8> = (0..ciphertext_len).map(|i| (i as u8) ^ 0x5a).collect();
    DeviceFrame::Transport {
        receiver: SessionId(receiver),
        counter,
        ciphertext: &ciphertext,
    }
    .to_vec()
}

fn handshake_response() -> Vec<u8> {
    DeviceFrame::HandshakeResponse {
        receiver: SessionId(7),
        sender: SessionId(8),
        noise: &[0xA5; 48],
    }
    .to_vec()
}

fn uplink_datagram(flow: FlowId, frame: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    UplinkDatagram::new(flow, frame).encode(&mut b);
    b.freeze()
}

async fn recv(device: &UdpSocket) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(WAIT, device.recv_from(&mut buf))
        .await
        .context("nothing reached the device")??;
    buf.truncate(n);
    Ok(buf)
}

fn local_udp() -> Result<std::net::UdpSocket> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?)
}

#[tokio::test]
async fn relays_both_ways_and_drops_junk() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start(core_socket, &pki)?;
    let tap = Arc::new(Recorder::default());
    let gw = start_gateway(
        pki.gateway_config(core_addr, 64)?,
        Hooks {
            tap: Some(tap.clone()),
        },
    )
    .await?;

    // The ready file names the bound addresses.
    let ready: serde_json::Value = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(pki.ready_file()) {
                break serde_json::from_str(&text)?;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no ready file");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert_eq!(ready["devices"], gw.device_addr.to_string());
    assert_eq!(ready["admin"], gw.admin_addr.to_string());

    let mut session = core.session().await?;
    assert_eq!(session.name, "gateway-test");
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    assert_eq!(gw.get("/ready").await?.0, 200);
    assert_eq!(gw.metric("gateway_uplink_connects_total").await?, 1.0);

    // Up: a device frame arrives unchanged, with a flow.
    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let f1 = transport(0x1111, 1, 40);
    device.send_to(&f1, gw.device_addr).await?;
    let (flow, got, path) = core.frame().await?;
    assert_eq!((got.as_slice(), path), (f1.as_slice(), Via::Datagram));

    // Down, as a datagram and on the control stream: the device gets the frame unchanged.
    let d1 = handshake_response();
    session.conn.send_datagram(uplink_datagram(flow, &d1))?;
    assert_eq!(recv(&device).await?, d1);
    let d2 = transport(0x2222, 9, 1200 - 14);
    let mut msg = BytesMut::new();
    UplinkMessage::DeviceFrame {
        flow,
        frame: Bytes::from(d2.clone()),
    }
    .encode(&mut msg);
    session.send.write_all(&msg).await?;
    assert_eq!(recv(&device).await?, d2);

    // The largest frame gets through whichever way fits.
    let big = transport(0x1111, 2, 1200 - 14);
    device.send_to(&big, gw.device_addr).await?;
    let (flow2, got, _) = core.frame().await?;
    assert_eq!((flow2, got), (flow, big.clone()));

    // Junk from devices is dropped and counted; a valid frame after it is the next to arrive.
    let mut oversized = transport(0x1111, 3, 100);
    oversized.resize(1300, 0);
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![2, 3, 0, 0, 0, 1],
        vec![1, 9, 0, 0, 0, 1],
        oversized,
        handshake_response(),
        vec![1, 3, 0, 0, 0, 1],
    ];
    for j in &junk {
        device.send_to(j, gw.device_addr).await?;
    }
    let f2 = transport(0x1111, 4, 16);
    device.send_to(&f2, gw.device_addr).await?;
    let (_, got, _) = core.frame().await?;
    assert_eq!(got, f2);
    assert_eq!(gw.dropped("truncated").await?, 2.0);
    assert_eq!(gw.dropped("unknown_version").await?, 1.0);
    assert_eq!(gw.dropped("unknown_type").await?, 1.0);
    assert_eq!(gw.dropped("oversized").await?, 1.0);
    assert_eq!(gw.dropped("unexpected_type").await?, 1.0);

    // Junk from the core: an unknown flow, an undecodable datagram.
    session
        .conn
        .send_datagram(uplink_datagram(FlowId(flow.0.wrapping_add(1000)), &d1))?;
    session.conn.send_datagram(Bytes::from_static(&[9, 9, 9]))?;
    gw.wait_metric("gateway_frames_dropped_total{reason=\"unknown_flow\"}", 1.0)
        .await?;
    gw.wait_metric(
        "gateway_frames_dropped_total{reason=\"uplink_decode\"}",
        1.0,
    )
    .await?;

    let sent_by_device = (3 + junk.len()) as f64;
    assert_eq!(
        gw.metric("gateway_device_frames_received_total").await?,
        sent_by_device
    );
    let uplink_bytes = (f1.len() + big.len() + f2.len()) as f64;
    gw.wait_metric("gateway_frames_forwarded_total{direction=\"uplink\"}", 3.0)
        .await?;
    assert_eq!(
        gw.metric("gateway_forwarded_bytes_total{direction=\"uplink\"}")
            .await?,
        uplink_bytes
    );
    assert_eq!(
        gw.metric("gateway_frames_forwarded_total{direction=\"downlink\"}")
            .await?,
        2.0
    );
    assert_eq!(gw.metric("gateway_flows").await?, 1.0);
    assert_eq!(gw.metric("gateway_queue_frames").await?, 0.0);
    assert_eq!(gw.metric("gateway_queue_capacity_frames").await?, 64.0);
    assert!(gw
        .get("/metrics")
        .await?
        .1
        .contains("gateway_build_info{version="));

    // The tap saw every device datagram, and the gateway sent devices only what the core sent.
    assert_eq!(tap.at(TapPoint::DeviceRx).len(), 3 + junk.len());
    assert_eq!(tap.at(TapPoint::DeviceTx), vec![d1, d2]);
    // Up the link went the Hello and the three frames, each carried whole, nothing else.
    let up = tap.at(TapPoint::UplinkTx).concat();
    for frame in [&f1, &big, &f2] {
        assert!(contains(&up, frame), "frame missing from the uplink bytes");
    }
    assert!(!tap.at(TapPoint::UplinkRx).is_empty());

    gw.stop().await?;
    core.endpoint.close(0u32.into(), b"done");
    Ok(())
}

#[tokio::test]
async fn queues_while_the_core_is_down_and_flushes_in_order() -> Result<()> {
    let pki = Pki::new()?;
    // The core's port is held (so nothing else takes it) but nothing answers yet: the gateway's
    // connection attempts wait in this socket's receive buffer.
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let gw = start_gateway(pki.gateway_config(core_addr, 3)?, Hooks::default()).await?;

    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let frames: Vec<Vec<u8>> = (0..5).map(|i| transport(0x3333, i, 20)).collect();
    for f in &frames {
        device.send_to(f, gw.device_addr).await?;
    }
    gw.wait_metric("gateway_device_frames_received_total", 5.0)
        .await?;
    assert_eq!(gw.get("/ready").await?.0, 503);
    assert_eq!(gw.metric("gateway_uplink_connected").await?, 0.0);
    assert_eq!(gw.metric("gateway_queue_frames").await?, 3.0);
    assert_eq!(gw.metric("gateway_queue_capacity_frames").await?, 3.0);
    assert_eq!(gw.dropped("queue_full").await?, 2.0);

    let mut core = FakeCore::start(core_socket, &pki)?;
    for want in &frames[..3] {
        let (_, got, _) = core.frame().await?;
        assert_eq!(&got, want);
    }
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    assert_eq!(gw.get("/ready").await?.0, 200);
    assert_eq!(gw.metric("gateway_queue_frames").await?, 0.0);
    assert_eq!(
        gw.metric("gateway_frames_forwarded_total{direction=\"uplink\"}")
            .await?,
        3.0
    );

    // Once up, frames go straight through.
    device.send_to(&frames[4], gw.device_addr).await?;
    let (_, got, _) = core.frame().await?;
    assert_eq!(got, frames[4]);

    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn reconnects_when_the_core_drops_the_connection() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start(core_socket, &pki)?;
    let gw = start_gateway(pki.gateway_config(core_addr, 16)?, Hooks::default()).await?;

    let first = core.session().await?;
    gw.wait_metric("gateway_uplink_connects_total", 1.0).await?;
    first.conn.close(7u32.into(), b"core restarting");
    let _second = core.session().await?;
    gw.wait_metric("gateway_uplink_connects_total", 2.0).await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;

    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let f = transport(0x4444, 1, 32);
    device.send_to(&f, gw.device_addr).await?;
    let (_, got, _) = core.frame().await?;
    assert_eq!(got, f);
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn frames_too_big_for_a_datagram_take_the_control_stream() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start_with(core_socket, &pki, Some(600))?;
    let tap = Arc::new(Recorder::default());
    let gw = start_gateway(
        pki.gateway_config(core_addr, 16)?,
        Hooks {
            tap: Some(tap.clone()),
        },
    )
    .await?;
    core.session().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;

    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let small = transport(0x5555, 1, 100);
    let big = transport(0x5555, 2, 1200 - 14);
    device.send_to(&small, gw.device_addr).await?;
    assert_eq!(core.frame().await?.1, small);
    device.send_to(&big, gw.device_addr).await?;
    let (_, got, via) = core.frame().await?;
    assert_eq!((got, via), (big.clone(), Via::Stream));
    gw.wait_metric("gateway_frames_forwarded_total{direction=\"uplink\"}", 2.0)
        .await?;
    assert_eq!(
        gw.metric("gateway_forwarded_bytes_total{direction=\"uplink\"}")
            .await?,
        (small.len() + big.len()) as f64
    );
    assert!(tap.at(TapPoint::UplinkTx).iter().any(|b| contains(b, &big)));

    // A core without datagrams at all gets everything on the stream.
    gw.stop().await?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start_with(core_socket, &pki, None)?;
    let gw = start_gateway(pki.gateway_config(core_addr, 16)?, Hooks::default()).await?;
    core.session().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    device.send_to(&small, gw.device_addr).await?;
    let (_, got, via) = core.frame().await?;
    assert_eq!((got, via), (small, Via::Stream));
    gw.stop().await?;
    Ok(())
}

/// `Revoked` from the core: frames addressed to those sessions stop at the gateway, counted;
/// other sessions and handshakes go on.
#[tokio::test]
async fn drops_frames_of_sessions_the_core_revoked() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start(core_socket, &pki)?;
    let gw = start_gateway(pki.gateway_config(core_addr, 16)?, Hooks::default()).await?;
    let mut session = core.session().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    assert_eq!(
        gw.dropped("revoked").await?,
        0.0,
        "series exists from the start"
    );

    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let dead = transport(0x0bad, 1, 40);
    device.send_to(&dead, gw.device_addr).await?;
    assert_eq!(core.frame().await?.1, dead);

    let mut revoked = BytesMut::new();
    UplinkMessage::Revoked {
        sessions: vec![SessionId(0x0bad), SessionId(0x0bae)],
    }
    .encode(&mut revoked);
    session.send.write_all(&revoked).await?;
    // The gateway applies it on its own time: send until it bites.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut counter = 2;
    while gw.dropped("revoked").await? < 1.0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never dropped");
        device
            .send_to(&transport(0x0bad, counter, 40), gw.device_addr)
            .await?;
        counter += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let alive = transport(0x600d, 1, 40);
    device.send_to(&alive, gw.device_addr).await?;
    loop {
        let (_, got, _) = core.frame().await?;
        if got == alive {
            break;
        }
        // Frames of the dead session sent before the gateway applied the list.
        assert_eq!(&got[2..6], &0x0badu32.to_be_bytes());
    }
    gw.stop().await?;
    Ok(())
}

/// An `AdmittedTransport` frame for `receiver`, tagged under `key`.
fn admitted(key: &AdmissionKey, receiver: u32, counter: u64, ciphertext_len: usize) -> Vec<u8> {
    let mut f = vec![1, 4];
    f.extend_from_slice(&receiver.to_be_bytes());
    f.extend_from_slice(&counter.to_be_bytes());
    f.extend((0..ciphertext_len).map(|i| (i as u8) ^ 0x3c));
    let tag = key.tag(&f);
    f.extend_from_slice(&tag);
    f
}

fn admission(session: u32, quota: Quota) -> Admission {
    Admission {
        session: SessionId(session),
        key: AdmissionKey([session as u8 ^ 0x77; 16]),
        lifetime_secs: 3600,
        quota,
    }
}

async fn write_message(session: &mut CoreSession, message: UplinkMessage) -> Result<()> {
    let mut b = BytesMut::new();
    message.encode(&mut b);
    session.send.write_all(&b).await?;
    Ok(())
}

/// The admission path end to end: the core installs a session with its handshake response (a
/// kind-2 datagram); tagged frames pass unchanged, forged, untagged, over-quota and wrong-way
/// frames stop at the gateway, counted.
#[tokio::test]
async fn admits_tagged_frames_and_drops_the_rest() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start(core_socket, &pki)?;
    let gw = start_gateway(
        pki.gateway_config_with(core_addr, 16, "")?,
        Hooks::default(),
    )
    .await?;
    let mut session = core.session().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;

    // The handshake goes up; its response comes down with the session's admission.
    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let init = DeviceFrame::HandshakeInit {
        sender: SessionId(0x51),
        noise: &[0x11; 96],
    }
    .to_vec();
    device.send_to(&init, gw.device_addr).await?;
    let (flow, got, _) = core.frame().await?;
    assert_eq!(got, init);
    let a = admission(
        0xa1,
        Quota {
            frames: 3,
            bytes: 0,
            interval_secs: 3600,
        },
    );
    let response = handshake_response();
    let mut d = BytesMut::new();
    UplinkDatagram {
        flow,
        admission: Some(a),
        frame: &response,
    }
    .encode(&mut d);
    session.conn.send_datagram(d.freeze())?;
    assert_eq!(recv(&device).await?, response);
    assert_eq!(gw.metric("gateway_admissions").await?, 1.0);

    // Tagged frames pass unchanged.
    let good = admitted(&a.key, 0xa1, 1, 40);
    device.send_to(&good, gw.device_addr).await?;
    assert_eq!(core.frame().await?.1, good);

    // Junk: a forged tag, a real tag on altered bytes, a plain Transport frame (admission is
    // required), a cookie reply from a device.
    let forged = admitted(&AdmissionKey([0; 16]), 0xa1, 2, 40);
    let mut altered = admitted(&a.key, 0xa1, 3, 40);
    altered[20] ^= 1;
    let cookie_reply = {
        let mut f = vec![1, 5, 0, 0, 0, 0x51];
        f.extend_from_slice(&[0; 56]);
        f
    };
    for junk in [&forged, &altered, &transport(0xa1, 4, 40), &cookie_reply] {
        device.send_to(junk, gw.device_addr).await?;
    }
    // Quota: three frames per window; the first counted already.
    let frames: Vec<Vec<u8>> = (5..9).map(|c| admitted(&a.key, 0xa1, c, 40)).collect();
    for f in &frames {
        device.send_to(f, gw.device_addr).await?;
    }
    assert_eq!(core.frame().await?.1, frames[0]);
    assert_eq!(core.frame().await?.1, frames[1]);
    gw.wait_metric("gateway_frames_dropped_total{reason=\"quota\"}", 2.0)
        .await?;
    assert_eq!(gw.dropped("admission_mac").await?, 2.0);
    assert_eq!(gw.dropped("unadmitted").await?, 1.0);
    assert_eq!(gw.dropped("unexpected_type").await?, 1.0);
    assert_eq!(gw.metric("gateway_admitted_frames_total").await?, 3.0);
    assert_eq!(gw.metric("gateway_admission_queries_total").await?, 0.0);
    assert_eq!(
        gw.metric("gateway_frames_forwarded_total{direction=\"uplink\"}")
            .await?,
        4.0
    );

    // A cookie reply from the core reaches the device; a tagged frame from the core does not.
    session
        .conn
        .send_datagram(uplink_datagram(flow, &cookie_reply))?;
    assert_eq!(recv(&device).await?, cookie_reply);
    session.conn.send_datagram(uplink_datagram(flow, &good))?;
    gw.wait_metric(
        "gateway_frames_dropped_total{reason=\"unexpected_type\"}",
        2.0,
    )
    .await?;

    // Revoked: the admission goes, and so do the session's frames.
    write_message(
        &mut session,
        UplinkMessage::Revoked {
            sessions: vec![SessionId(0xa1)],
        },
    )
    .await?;
    gw.wait_metric("gateway_admissions", 0.0).await?;
    device
        .send_to(&admitted(&a.key, 0xa1, 9, 40), gw.device_addr)
        .await?;
    gw.wait_metric("gateway_frames_dropped_total{reason=\"revoked\"}", 1.0)
        .await?;
    gw.stop().await?;
    Ok(())
}

/// A gateway that does not know a session (it restarted, or the device moved here) holds the
/// frame and asks the core: `Admit` releases it, `NotAdmitted` drops it and the session's later
/// frames without asking again, silence drops it after the timeout.
#[tokio::test]
async fn asks_the_core_about_unknown_sessions() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start(core_socket, &pki)?;
    let gw = start_gateway(
        pki.gateway_config_with(core_addr, 16, "[admission]\npending_timeout_ms = 300\n")?,
        Hooks::default(),
    )
    .await?;
    let mut session = core.session().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    let device = UdpSocket::bind("127.0.0.1:0").await?;

    // Admitted on asking: the held frames (two, one forged) are checked and the good one passes.
    let a = admission(0xb1, Quota::default());
    let first = admitted(&a.key, 0xb1, 1, 40);
    let forged = admitted(&AdmissionKey([1; 16]), 0xb1, 2, 40);
    device.send_to(&first, gw.device_addr).await?;
    device.send_to(&forged, gw.device_addr).await?;
    assert_eq!(core.query().await?, [SessionId(0xb1)]);
    gw.wait_metric("gateway_admission_pending_frames", 2.0)
        .await?;
    write_message(
        &mut session,
        UplinkMessage::Admit {
            admissions: vec![a],
        },
    )
    .await?;
    assert_eq!(core.frame().await?.1, first);
    gw.wait_metric(
        "gateway_frames_dropped_total{reason=\"admission_mac\"}",
        1.0,
    )
    .await?;
    gw.wait_metric("gateway_admission_pending_frames", 0.0)
        .await?;
    // From now on without asking.
    let next = admitted(&a.key, 0xb1, 3, 40);
    device.send_to(&next, gw.device_addr).await?;
    assert_eq!(core.frame().await?.1, next);

    // Not admitted: dropped, remembered.
    let b = admission(0xb2, Quota::default());
    device
        .send_to(&admitted(&b.key, 0xb2, 1, 40), gw.device_addr)
        .await?;
    assert_eq!(core.query().await?, [SessionId(0xb2)]);
    write_message(
        &mut session,
        UplinkMessage::NotAdmitted {
            sessions: vec![SessionId(0xb2)],
        },
    )
    .await?;
    gw.wait_metric("gateway_frames_dropped_total{reason=\"unadmitted\"}", 1.0)
        .await?;
    device
        .send_to(&admitted(&b.key, 0xb2, 2, 40), gw.device_addr)
        .await?;
    gw.wait_metric("gateway_frames_dropped_total{reason=\"unadmitted\"}", 2.0)
        .await?;

    // No answer: dropped after the timeout.
    let c = admission(0xb3, Quota::default());
    device
        .send_to(&admitted(&c.key, 0xb3, 1, 40), gw.device_addr)
        .await?;
    assert_eq!(core.query().await?, [SessionId(0xb3)]);
    gw.wait_metric("gateway_frames_dropped_total{reason=\"unadmitted\"}", 3.0)
        .await?;
    assert_eq!(gw.metric("gateway_admission_queries_total").await?, 3.0);
    assert_eq!(gw.metric("gateway_admission_pending_frames").await?, 0.0);
    assert!(core.queries.try_recv().is_err(), "asked more than once");
    gw.stop().await?;
    Ok(())
}

/// While the uplink is down, frames of unknown sessions are held and asked about once it is up
/// (the sleepy meter waking behind a restarted gateway).
#[tokio::test]
async fn holds_unknown_sessions_until_the_uplink_is_up() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let gw = start_gateway(
        pki.gateway_config_with(core_addr, 16, "")?,
        Hooks::default(),
    )
    .await?;
    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let a = admission(0xc1, Quota::default());
    let reading = admitted(&a.key, 0xc1, 1, 40);
    device.send_to(&reading, gw.device_addr).await?;
    gw.wait_metric("gateway_admission_pending_frames", 1.0)
        .await?;
    // Longer than the 2 s answer timeout: it only runs once the question is asked.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut core = FakeCore::start(core_socket, &pki)?;
    let mut session = core.session().await?;
    assert_eq!(core.query().await?, [SessionId(0xc1)]);
    write_message(
        &mut session,
        UplinkMessage::Admit {
            admissions: vec![a],
        },
    )
    .await?;
    assert_eq!(core.frame().await?.1, reading);
    assert_eq!(gw.metric("gateway_admitted_frames_total").await?, 1.0);
    gw.stop().await?;
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The binary: a bad configuration is one line on stderr and exit code 2.
#[test]
fn binary_reports_a_bad_config_in_one_line_with_code_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("gateway.toml");
    std::fs::write(&bad, "name = \"g\"\nnonsense = 1\n")?;
    for config in [bad.as_path(), Path::new("/nonexistent/gateway.toml")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(config)
            .env_remove("GATEWAY_CORE")
            .output()?;
        let stderr = String::from_utf8(out.stderr)?;
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--help")
        .output()?;
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout)?;
    assert!(
        help.contains("--listen-devices") && help.contains("GATEWAY_READY_FILE"),
        "{help}"
    );
    Ok(())
}

/// The binary starts on port 0, writes its ready file, and exits 0 on SIGTERM.
#[test]
fn binary_stops_cleanly_on_sigterm() -> Result<()> {
    let pki = Pki::new()?;
    // A core that never answers: the gateway keeps retrying, which must not delay its exit.
    let core = local_udp()?;
    pki.gateway_config(core.local_addr()?, 8)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(pki.dir.path().join("gateway-1/gateway.toml"))
        .args([
            "--listen-devices",
            "127.0.0.1:0",
            "--listen-admin",
            "127.0.0.1:0",
        ])
        .arg("--ready-file")
        .arg(pki.ready_file())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + WAIT;
    while !pki.ready_file().exists() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("no ready file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let deadline = std::time::Instant::now() + gateway::SHUTDOWN_GRACE + Duration::from_secs(3);
    loop {
        if let Some(status) = child.try_wait()? {
            assert!(status.success(), "{status}");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("gateway did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn finds_the_core_by_host_name_and_reports_health() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let mut core = FakeCore::start(core_socket, &pki)?;
    let mut config = pki.gateway_config(core_addr, 16)?;
    // The name is looked up at each connection attempt, as `core:4433` is in a compose network.
    config.uplink.core = format!("localhost:{}", core_addr.port())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let gw = start_gateway(config, Hooks::default()).await?;

    let _session = core.session().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    let ready = health(gw.admin_addr, "/ready").await?;
    assert!(ready.status.success(), "{ready:?}");
    assert!(
        String::from_utf8_lossy(&ready.stdout).contains(": 200"),
        "{ready:?}"
    );

    let device = UdpSocket::bind("127.0.0.1:0").await?;
    let f = transport(0x5555, 1, 32);
    device.send_to(&f, gw.device_addr).await?;
    let (_, got, _) = core.frame().await?;
    assert_eq!(got, f);

    let admin = gw.admin_addr;
    gw.stop().await?;
    let down = health(admin, "/live").await?;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    Ok(())
}

/// `gateway health` (the container healthcheck) against `admin`.
async fn health(admin: SocketAddr, path: &str) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["health", "--admin", &admin.to_string(), "--path", path])
        .env_remove("GATEWAY_LISTEN_ADMIN")
        .output()
        .await?)
}

/// `Type=notify` in deploy/systemd/relay-gateway.service: the binary reports READY=1 on
/// `$NOTIFY_SOCKET` once it listens, and STOPPING=1 on SIGTERM, then exits 0.
#[tokio::test]
async fn tells_systemd_when_ready_and_stopping() -> Result<()> {
    let pki = Pki::new()?;
    let core_socket = local_udp()?;
    let core_addr = core_socket.local_addr()?;
    let _core = FakeCore::start(core_socket, &pki)?;
    pki.gateway_config(core_addr, 16)?;
    let notify_path = pki.dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path)?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(pki.dir.path().join("gateway-1/gateway.toml"))
        .args([
            "--listen-devices",
            "127.0.0.1:0",
            "--listen-admin",
            "127.0.0.1:0",
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("GATEWAY_CORE")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, notify.recv(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));

    let pid = child.id().context("pid")?.to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    assert!(killed.success());
    let n = tokio::time::timeout(WAIT, notify.recv(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let status = tokio::time::timeout(WAIT, child.wait()).await??;
    assert_eq!(status.code(), Some(0));
    Ok(())
}
