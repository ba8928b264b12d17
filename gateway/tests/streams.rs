//! Device streams through the gateway in-process, against a fake core (a quinn server with a test
//! CA) that hands every device stream's QUIC stream to the test: bytes pass unchanged both ways,
//! lengths are checked, stalls and limits end streams, the first frame's admission is checked,
//! and a core that does not read holds the device back instead of filling the gateway. A core that
//! names a bulk endpoint in its `HelloAck` gets device streams on a connection of their own to it
//! (datagrams stay on the uplink); one that cannot be reached leaves them on the uplink.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use gateway::{Cli, FrameTap, GatewayConfig, Hooks, Listeners, TapPoint};
use relay_protocol::stream::{MAX_STREAM_FRAME, UPLINK_STREAM_HEADER};
use relay_protocol::{
    Admission, AdmissionKey, DeviceFrame, Quota, SessionId, UplinkDatagram, UplinkMessage,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// The core's stream receive window in these tests: the most a core that does not read lets the
/// gateway write into one QUIC stream.
const CORE_STREAM_WINDOW: u32 = 256 * 1024;

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
        let mut core_params = CertificateParams::new(vec!["core.relay.local".to_owned()])?;
        core_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let core_cert = core_params.signed_by(&core_key, &ca, &ca_key)?;

        let gw_key = KeyPair::generate()?;
        let mut gw_params = CertificateParams::new(vec!["gateway-test".to_owned()])?;
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

    /// Writes `gateway-1/gateway.toml` with `extra` appended and loads it the way `main` does,
    /// devices on port 0 (so the stream listener follows that port over TCP).
    fn gateway_config(&self, core: SocketAddr, extra: &str) -> Result<GatewayConfig> {
        let path = self.dir.path().join("gateway-1/gateway.toml");
        std::fs::write(
            &path,
            format!(
                r#"
name = "gateway-test"

[uplink]
core = "{core}"
server_name = "core.relay.local"
ca = "../ca.pem"
cert = "cert.pem"
key = "key.pem"
reconnect_initial_ms = 20
reconnect_max_ms = 200

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

    fn ready_file(&self) -> std::path::PathBuf {
        self.dir.path().join("gateway-1/ready.json")
    }

    fn server_config(&self) -> Result<quinn::ServerConfig> {
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
        transport.max_concurrent_bidi_streams(100u32.into());
        transport.stream_receive_window(CORE_STREAM_WINDOW.into());
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// One device stream as the core sees it: the QUIC stream the gateway opened.
struct CoreStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// The core's bulk endpoint, as the fake core plays it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bulk {
    /// None: `HelloAck` names no bulk port (an older core).
    Absent,
    /// A second endpoint (same TLS configuration) whose streams are handed over apart.
    Serve,
    /// Named, but the endpoint refuses every connection.
    Refuse,
    /// Named, but nothing answers there.
    Silent,
    /// Served, but `HelloAck` names a port where nothing answers (the endpoint is behind a NAT
    /// or a port forward, say): only `[uplink] bulk` reaches it.
    Elsewhere,
}

/// The core's side of the uplink: `Hello`/`HelloAck`, the control stream for `Admit`, and every
/// further bidirectional stream handed over as it is accepted; the datagrams it receives; and
/// its bulk endpoint's connections and streams.
struct FakeCore {
    _endpoint: quinn::Endpoint,
    _bulk: Option<quinn::Endpoint>,
    _silent: Option<std::net::UdpSocket>,
    /// Where the bulk endpoint serves, if it does.
    bulk_addr: Option<SocketAddr>,
    control: mpsc::Receiver<quinn::SendStream>,
    streams: mpsc::Receiver<CoreStream>,
    datagrams: mpsc::Receiver<Vec<u8>>,
    bulk_conns: mpsc::Receiver<quinn::Connection>,
    bulk_streams: mpsc::Receiver<CoreStream>,
}

/// A quinn server endpoint on a free loopback port.
fn server_endpoint(pki: &Pki) -> Result<(quinn::Endpoint, SocketAddr)> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?;
    socket.set_nonblocking(true)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(pki.server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, addr))
}

impl FakeCore {
    fn start_with(pki: &Pki, bulk: Bulk) -> Result<(Self, SocketAddr)> {
        let (endpoint, addr) = server_endpoint(pki)?;
        let (bulk_conns_tx, bulk_conns) = mpsc::channel(8);
        let (bulk_streams_tx, bulk_streams) = mpsc::channel(64);
        let silent_port = || -> Result<_> {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let port = NonZeroU16::new(socket.local_addr()?.port());
            Ok((socket, port))
        };
        let (bulk_endpoint, silent, bulk_port, bulk_addr) = match bulk {
            Bulk::Absent => (None, None, None, None),
            Bulk::Silent => {
                let (socket, port) = silent_port()?;
                (None, Some(socket), port, None)
            }
            Bulk::Serve | Bulk::Refuse | Bulk::Elsewhere => {
                let (bulk_endpoint, bulk_addr) = server_endpoint(pki)?;
                let accepting = bulk_endpoint.clone();
                tokio::spawn(async move {
                    while let Some(incoming) = accepting.accept().await {
                        if bulk == Bulk::Refuse {
                            incoming.refuse();
                            continue;
                        }
                        let (conns, streams) = (bulk_conns_tx.clone(), bulk_streams_tx.clone());
                        tokio::spawn(async move {
                            let _ = serve_bulk(incoming, conns, streams).await;
                        });
                    }
                });
                if bulk == Bulk::Elsewhere {
                    let (socket, port) = silent_port()?;
                    (Some(bulk_endpoint), Some(socket), port, Some(bulk_addr))
                } else {
                    let port = NonZeroU16::new(bulk_addr.port());
                    (Some(bulk_endpoint), None, port, Some(bulk_addr))
                }
            }
        };
        let (control_tx, control) = mpsc::channel(8);
        let (streams_tx, streams) = mpsc::channel(64);
        let (datagrams_tx, datagrams) = mpsc::channel(64);
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let control_tx = control_tx.clone();
                let streams_tx = streams_tx.clone();
                let datagrams_tx = datagrams_tx.clone();
                tokio::spawn(async move {
                    let _ =
                        serve_gateway(incoming, bulk_port, control_tx, streams_tx, datagrams_tx)
                            .await;
                });
            }
        });
        Ok((
            Self {
                _endpoint: endpoint,
                _bulk: bulk_endpoint,
                _silent: silent,
                bulk_addr,
                control,
                streams,
                datagrams,
                bulk_conns,
                bulk_streams,
            },
            addr,
        ))
    }

    /// The next device stream on the bulk endpoint.
    async fn bulk_stream(&mut self) -> Result<CoreStream> {
        next(
            &mut self.bulk_streams,
            "no device stream reached the core's bulk endpoint",
        )
        .await
    }

    /// The next connection to the bulk endpoint.
    async fn bulk_connection(&mut self) -> Result<quinn::Connection> {
        next(
            &mut self.bulk_conns,
            "no connection to the core's bulk endpoint",
        )
        .await
    }

    /// The next datagram on the uplink connection (the device frame in it).
    async fn datagram(&mut self) -> Result<Vec<u8>> {
        next(&mut self.datagrams, "no datagram reached the core").await
    }

    async fn control(&mut self) -> Result<quinn::SendStream> {
        next(&mut self.control, "no gateway connected").await
    }

    async fn stream(&mut self) -> Result<CoreStream> {
        next(&mut self.streams, "no device stream reached the core").await
    }

    /// Whether a device stream reaches the core within `within`.
    async fn no_stream(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.streams.recv())
            .await
            .is_err()
    }
}

/// What the fake core hands the test next on `rx`; `missing` says what did not come in time.
async fn next<T>(rx: &mut mpsc::Receiver<T>, missing: &'static str) -> Result<T> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .context(missing)?
        .context("fake core stopped")
}

/// A connection to the bulk endpoint: only device streams, no control stream, no `Hello`.
async fn serve_bulk(
    incoming: quinn::Incoming,
    conns: mpsc::Sender<quinn::Connection>,
    streams: mpsc::Sender<CoreStream>,
) -> Result<()> {
    let conn = incoming.await?;
    // The gateway presents its certificate here too.
    ensure!(conn.peer_identity().is_some(), "no client certificate");
    conns.send(conn.clone()).await?;
    loop {
        let (send, recv) = conn.accept_bi().await?;
        streams.send(CoreStream { send, recv }).await?;
    }
}

async fn serve_gateway(
    incoming: quinn::Incoming,
    bulk_port: Option<NonZeroU16>,
    control: mpsc::Sender<quinn::SendStream>,
    streams: mpsc::Sender<CoreStream>,
    datagrams: mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let conn = incoming.await?;
    {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                if let Ok(d) = UplinkDatagram::decode(&d) {
                    let _ = datagrams.try_send(d.frame.to_vec());
                }
            }
        });
    }
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut buf = BytesMut::new();
    loop {
        if let Some(m) = UplinkMessage::decode(&mut buf).map_err(|e| anyhow::anyhow!("{e}"))? {
            ensure!(matches!(m, UplinkMessage::Hello { .. }), "expected Hello");
            break;
        }
        match recv.read_chunk(4096, true).await? {
            Some(c) => buf.extend_from_slice(&c.bytes),
            None => bail!("control stream finished"),
        }
    }
    let mut ack = BytesMut::new();
    UplinkMessage::HelloAck {
        max_flows: 1000,
        bulk_port,
    }
    .encode(&mut ack);
    send.write_all(&ack).await?;
    control.send(send).await?;
    // The rest of the control stream is not looked at, but read so that it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = recv.read_chunk(4096, true).await {} });
    loop {
        let (send, recv) = conn.accept_bi().await?;
        streams.send(CoreStream { send, recv }).await?;
    }
}

/// Records the bytes at each tap point.
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
    /// Everything seen at `point`, concatenated.
    fn joined(&self, point: TapPoint) -> Vec<u8> {
        self.0
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(p, _)| *p == point)
                    .flat_map(|(_, b)| b.iter().copied())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A running gateway.
struct Running {
    stream_addr: SocketAddr,
    device_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), gateway::GatewayError>>,
}

/// A gateway (`extra` added to its configuration) up on its uplink to a fake core (with `bulk`);
/// the control stream the core accepted comes back too, to keep it open.
async fn rig(
    pki: &Pki,
    bulk: Bulk,
    extra: &str,
    hooks: Hooks,
) -> Result<(FakeCore, quinn::SendStream, Running)> {
    let (mut core, core_addr) = FakeCore::start_with(pki, bulk)?;
    let gw = start_gateway(pki.gateway_config(core_addr, extra)?, hooks).await?;
    let control = core.control().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;
    Ok((core, control, gw))
}

async fn start_gateway(config: GatewayConfig, hooks: Hooks) -> Result<Running> {
    let listeners = Listeners::bind(&config).await?;
    let stream_addr = listeners.stream_addr().context("streams enabled")?;
    let device_addr = listeners.device_addr();
    let admin_addr = listeners.admin_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway::run(config, listeners, shutdown.clone(), hooks));
    Ok(Running {
        stream_addr,
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

    async fn metrics(&self) -> Result<String> {
        let mut s = TcpStream::connect(self.admin_addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
    }

    /// The value of one series in `/metrics`.
    async fn metric(&self, series: &str) -> Result<f64> {
        let body = self.metrics().await?;
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

    async fn wait_end(&self, reason: &str, want: f64) -> Result<()> {
        self.wait_metric(
            &format!("gateway_stream_ends_total{{reason=\"{reason}\"}}"),
            want,
        )
        .await
    }
}

/// `length | frame`.
fn framed(frame: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(frame.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(frame);
    out
}

/// A `length | body` stream frame of `len` pseudo-random bytes (the gateway does not look inside).
fn data_frame(len: usize, seed: u8) -> Vec<u8> {
    let body: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    framed(&body)
}

/// A plain `Transport` frame as a stream's first frame, framed.
fn open_transport(receiver: u32) -> Vec<u8> {
    let ciphertext = [0x5a; 80];
    framed(
        &DeviceFrame::Transport {
            receiver: SessionId(receiver),
            counter: 1,
            ciphertext: &ciphertext,
        }
        .to_vec(),
    )
}

/// An `AdmittedTransport` frame tagged under `key` as a stream's first frame, framed.
fn open_admitted(key: &AdmissionKey, receiver: u32) -> Vec<u8> {
    let mut f = vec![1, 4];
    f.extend_from_slice(&receiver.to_be_bytes());
    f.extend_from_slice(&1u64.to_be_bytes());
    f.extend_from_slice(&[0x3c; 80]);
    let tag = key.tag(&f);
    f.extend_from_slice(&tag);
    framed(&f)
}

async fn read_exactly<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, r.read_exact(&mut buf))
        .await
        .context("timed out reading")??;
    Ok(buf)
}

/// Reads the QUIC stream's header and first frame and checks them.
async fn expect_open(stream: &mut CoreStream, first: &[u8]) -> Result<()> {
    let head = read_exactly(&mut stream.recv, UPLINK_STREAM_HEADER.len() + first.len()).await?;
    ensure!(head[..2] == UPLINK_STREAM_HEADER, "header {:?}", &head[..2]);
    ensure!(head[2..] == *first, "first frame altered");
    Ok(())
}

/// Waits until the gateway ends the device's TCP connection (EOF or reset), reading and
/// discarding anything before it.
async fn expect_tcp_closed(tcp: &mut TcpStream) -> Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .context("the gateway kept the device's connection open")
}

/// Waits until the gateway ends the QUIC stream after the device's fault: finished after the last
/// whole frame, so the core keeps what arrived.
async fn expect_finished(stream: &mut CoreStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.recv.read(&mut buf).await? {
                Some(n) => got.extend_from_slice(&buf[..n]),
                None => return Ok::<_, anyhow::Error>(()),
            }
        }
    })
    .await
    .context("the QUIC stream stayed open")??;
    Ok(got)
}

/// Waits until the QUIC stream is reset by the gateway (or the connection goes).
async fn expect_reset(stream: &mut CoreStream) -> Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.recv.read(&mut sink).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(anyhow::anyhow!("finished cleanly, not reset")),
                Err(_) => return Ok(()),
            }
        }
    })
    .await
    .context("the QUIC stream stayed open")?
}

#[tokio::test]
async fn relays_a_stream_both_ways_byte_for_byte() -> Result<()> {
    let pki = Pki::new()?;
    let tap = Arc::new(Recorder::default());
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Absent,
        "[admission]\nrequire = false\n",
        Hooks {
            tap: Some(tap.clone()),
        },
    )
    .await?;
    // The stream port follows the device port, over TCP; the ready file names it.
    assert_eq!(gw.stream_addr, gw.device_addr);
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pki.ready_file())?)?;
    assert_eq!(ready["streams"], gw.stream_addr.to_string());

    let device = TcpStream::connect(gw.stream_addr).await?;
    let first = open_transport(0x77);
    let frames: Vec<Vec<u8>> = [1, 1000, 65_536 + 23, MAX_STREAM_FRAME, 7, MAX_STREAM_FRAME]
        .iter()
        .enumerate()
        .map(|(i, &len)| data_frame(len, i as u8))
        .collect();
    let up: Vec<u8> = std::iter::once(first.clone())
        .chain(frames.iter().cloned())
        .flatten()
        .collect();
    // Written in odd pieces: frames cut across TCP segments arrive whole.
    let down_all = {
        let sent = up.clone();
        let (mut rd, mut wr) = device.into_split();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(3001) {
                wr.write_all(piece).await?;
            }
            // The device is done sending; it keeps reading acknowledgements.
            wr.shutdown().await?;
            Ok::<_, anyhow::Error>(wr)
        });
        let mut stream = core.stream().await?;
        expect_open(&mut stream, &first).await?;
        let rest = read_exactly(&mut stream.recv, up.len() - first.len()).await?;
        assert_eq!(rest, up[first.len()..], "frames altered on the way up");

        // Down: acknowledgements, one written in two pieces; the device gets them unchanged.
        let acks: Vec<Vec<u8>> = (0..5u8).map(|i| data_frame(68, 0xa0 + i)).collect();
        let down: Vec<u8> = acks.iter().flatten().copied().collect();
        stream.send.write_all(&down[..10]).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.send.write_all(&down[10..]).await?;
        assert_eq!(read_exactly(&mut rd, down.len()).await?, down);

        // The device's end reaches the core as the stream's end; the core's last ack still
        // reaches the device, and then its end.
        let mut tail = [0u8; 1];
        assert!(tokio::time::timeout(WAIT, stream.recv.read(&mut tail))
            .await
            .context("no end of stream at the core")??
            .is_none());
        let last = data_frame(68, 0xff);
        stream.send.write_all(&last).await?;
        stream.send.finish()?;
        assert_eq!(read_exactly(&mut rd, last.len()).await?, last);
        assert_eq!(
            tokio::time::timeout(WAIT, rd.read(&mut tail)).await??,
            0,
            "the device's connection ends after the core's end"
        );
        drop(writer.await??);
        [down, last].concat()
    };

    gw.wait_end("closed", 1.0).await?;
    gw.wait_metric("gateway_streams_open", 0.0).await?;
    assert_eq!(gw.metric("gateway_streams_total").await?, 1.0);
    assert_eq!(
        gw.metric("gateway_stream_bytes_total{direction=\"up\"}")
            .await?,
        up.len() as f64
    );
    assert_eq!(
        gw.metric("gateway_stream_bytes_total{direction=\"down\"}")
            .await?,
        down_all.len() as f64
    );
    // The tap saw what passed, and the uplink side carries the header and the same bytes.
    assert_eq!(tap.joined(TapPoint::StreamRx), up);
    assert_eq!(tap.joined(TapPoint::StreamTx), down_all);
    let uplink_tx = tap.joined(TapPoint::UplinkTx);
    assert!(
        uplink_tx.ends_with(&[&UPLINK_STREAM_HEADER[..], &up].concat()),
        "uplink bytes differ"
    );
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn lengths_over_the_limit_end_the_stream() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Absent,
        "[admission]\nrequire = false\n",
        Hooks::default(),
    )
    .await?;
    let over = u32::try_from(MAX_STREAM_FRAME + 1)?.to_be_bytes();

    // From the device, after a good frame: the device's connection and the QUIC stream end.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    let first = open_transport(1);
    let good = data_frame(MAX_STREAM_FRAME, 1);
    device
        .write_all(&[first.clone(), good.clone(), over.to_vec()].concat())
        .await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    // The good frame still reaches the core, then the stream's end.
    assert_eq!(expect_finished(&mut stream).await?, good);
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("too_large", 1.0).await?;

    // A zero length is refused too.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device
        .write_all(&[first.clone(), vec![0; 4]].concat())
        .await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    assert!(expect_finished(&mut stream).await?.is_empty());
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("too_large", 2.0).await?;

    // From the core.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&first).await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    stream.send.write_all(&over).await?;
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("too_large", 3.0).await?;

    // A first frame longer than any device frame: refused before a QUIC stream is opened.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&1201u32.to_be_bytes()).await?;
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("too_large", 4.0).await?;
    // And one that is not a Transport frame.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    let init = DeviceFrame::HandshakeInit {
        sender: SessionId(9),
        noise: &[0x11; 96],
    }
    .to_vec();
    device.write_all(&framed(&init)).await?;
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("malformed", 1.0).await?;
    assert!(core.no_stream(Duration::from_millis(200)).await);

    // The core resetting its side closes the device's connection.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&first).await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    stream.send.reset(7u32.into())?;
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("uplink_lost", 1.0).await?;

    gw.wait_metric("gateway_streams_open", 0.0).await?;
    assert_eq!(gw.metric("gateway_streams_total").await?, 6.0);
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_stall_ends_the_stream() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Absent,
        "[admission]\nrequire = false\n[streams]\nstall_timeout_secs = 1\n",
        Hooks::default(),
    )
    .await?;

    // Frames trickling one way keep the stream alive past the timeout.
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    let first = open_transport(1);
    device.write_all(&first).await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let f = data_frame(100, i);
        device.write_all(&f).await?;
        assert_eq!(read_exactly(&mut stream.recv, f.len()).await?, f);
    }
    assert_eq!(
        gw.metric("gateway_stream_ends_total{reason=\"stalled\"}")
            .await?,
        0.0
    );
    // Then silence both ways ends it, and half a frame is not a frame.
    device.write_all(&data_frame(100, 9)[..50]).await?;
    let started = tokio::time::Instant::now();
    expect_tcp_closed(&mut device).await?;
    expect_reset(&mut stream).await?;
    assert!(started.elapsed() >= Duration::from_millis(900));
    gw.wait_end("stalled", 1.0).await?;

    // A connection that never sends its first frame.
    let mut idle = TcpStream::connect(gw.stream_addr).await?;
    expect_tcp_closed(&mut idle).await?;
    gw.wait_end("stalled", 2.0).await?;
    assert!(core.no_stream(Duration::from_millis(100)).await);
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn at_most_max_streams_at_once() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Absent,
        "[admission]\nrequire = false\n[streams]\nmax_streams = 2\n",
        Hooks::default(),
    )
    .await?;

    let first = open_transport(1);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut device = TcpStream::connect(gw.stream_addr).await?;
        device.write_all(&first).await?;
        let mut stream = core.stream().await?;
        expect_open(&mut stream, &first).await?;
        open.push((device, stream));
    }
    gw.wait_metric("gateway_streams_open", 2.0).await?;

    // The third is closed at once, before its first frame is read.
    let mut third = TcpStream::connect(gw.stream_addr).await?;
    expect_tcp_closed(&mut third).await?;
    gw.wait_end("limit", 1.0).await?;
    assert!(core.no_stream(Duration::from_millis(100)).await);

    // The open ones still work.
    let (device, stream) = &mut open[1];
    let f = data_frame(500, 3);
    device.write_all(&f).await?;
    assert_eq!(read_exactly(&mut stream.recv, f.len()).await?, f);

    // Once one ends, there is room again.
    let (device, mut stream) = open.remove(0);
    drop(device);
    let mut tail = [0u8; 1];
    assert!(tokio::time::timeout(WAIT, stream.recv.read(&mut tail))
        .await??
        .is_none());
    stream.send.finish()?;
    gw.wait_end("closed", 1.0).await?;
    gw.wait_metric("gateway_streams_open", 1.0).await?;
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&first).await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    gw.wait_metric("gateway_streams_open", 2.0).await?;
    assert_eq!(gw.metric("gateway_streams_total").await?, 4.0);
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_first_frame_must_be_admitted() -> Result<()> {
    let pki = Pki::new()?;
    // `[admission] require` is on by default.

    let (mut core, mut control, gw) = rig(&pki, Bulk::Absent, "", Hooks::default()).await?;

    let key = AdmissionKey([0x42; 16]);
    let refused = |first: Vec<u8>| {
        let addr = gw.stream_addr;
        async move {
            let mut device = TcpStream::connect(addr).await?;
            device.write_all(&first).await?;
            expect_tcp_closed(&mut device).await
        }
    };
    // A session the gateway does not know, tagged or not.
    refused(open_admitted(&key, 0x51)).await?;
    refused(open_transport(0x51)).await?;
    gw.wait_end("unadmitted", 2.0).await?;
    assert!(core.no_stream(Duration::from_millis(100)).await);

    // Once the core admitted the session, its tagged frame opens a stream; a forged tag does not,
    // and a plain Transport frame still does not.
    let mut admit = BytesMut::new();
    UplinkMessage::Admit {
        admissions: vec![Admission {
            session: SessionId(0x51),
            key,
            lifetime_secs: 3600,
            quota: Quota {
                frames: 1,
                bytes: 0,
                interval_secs: 3600,
            },
        }],
    }
    .encode(&mut admit);
    control.write_all(&admit).await?;
    gw.wait_metric("gateway_admissions", 1.0).await?;

    refused(open_admitted(&AdmissionKey([0; 16]), 0x51)).await?;
    gw.wait_end("admission_mac", 1.0).await?;
    refused(open_transport(0x51)).await?;
    gw.wait_end("unadmitted", 3.0).await?;
    assert!(core.no_stream(Duration::from_millis(100)).await);

    // Twice: a stream's first frame does not use the session's datagram quota up (one frame).
    for _ in 0..2 {
        let first = open_admitted(&key, 0x51);
        let mut device = TcpStream::connect(gw.stream_addr).await?;
        device.write_all(&first).await?;
        let mut stream = core.stream().await?;
        expect_open(&mut stream, &first).await?;
    }
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn no_uplink_no_stream() -> Result<()> {
    let pki = Pki::new()?;
    // Nothing answers QUIC here.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let gw = start_gateway(
        pki.gateway_config(silent.local_addr()?, "[admission]\nrequire = false\n")?,
        Hooks::default(),
    )
    .await?;
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&open_transport(1)).await?;
    expect_tcp_closed(&mut device).await?;
    gw.wait_end("uplink_down", 1.0).await?;
    gw.stop().await?;
    Ok(())
}

/// A core that does not read holds the device back: the gateway writes no more into the QUIC
/// stream than the core's flow-control window, holds one frame, and stops reading the device's
/// socket, so the device's write does not complete. Once the core reads, everything arrives.
#[tokio::test]
async fn a_core_that_does_not_read_holds_the_device_back() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Absent,
        "[admission]\nrequire = false\n",
        Hooks::default(),
    )
    .await?;

    // 32 MiB: far more than the core's window, the gateway's frame and both sockets' buffers.
    let first = open_transport(1);
    let frames: Vec<u8> = (0..512u32)
        .flat_map(|i| data_frame(MAX_STREAM_FRAME - (i as usize % 3), i as u8))
        .collect();
    let device = TcpStream::connect(gw.stream_addr).await?;
    let (_rd, mut wr) = device.into_split();
    let writer = {
        let all = [first.clone(), frames.clone()].concat();
        tokio::spawn(async move {
            wr.write_all(&all).await?;
            wr.shutdown().await?;
            Ok::<_, anyhow::Error>(())
        })
    };
    let mut stream = core.stream().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writer.is_finished(),
        "the device wrote 32 MiB to a core that reads nothing"
    );
    let up = gw
        .metric("gateway_stream_bytes_total{direction=\"up\"}")
        .await?;
    let bound = f64::from(CORE_STREAM_WINDOW) + 2.0 * (MAX_STREAM_FRAME + 4) as f64;
    assert!(
        up <= bound,
        "{up} bytes written into the QUIC stream, more than the core's window allows ({bound})"
    );
    assert!(up > 0.0);

    // The core reads: every byte arrives, in order, and the device's write completes.
    expect_open(&mut stream, &first).await?;
    let got = read_exactly(&mut stream.recv, frames.len()).await?;
    assert!(got == frames, "frames altered");
    tokio::time::timeout(WAIT, writer)
        .await
        .context("the device's write never completed")???;
    let mut tail = [0u8; 1];
    assert!(tokio::time::timeout(WAIT, stream.recv.read(&mut tail))
        .await??
        .is_none());
    gw.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_stream_listener_can_move_or_be_off() -> Result<()> {
    let pki = Pki::new()?;
    let core = "127.0.0.1:9".parse()?;
    let off = pki.gateway_config(core, "[streams]\nenabled = false\n")?;
    let listeners = Listeners::bind(&off).await?;
    assert_eq!(listeners.stream_addr(), None);
    drop(listeners);

    let elsewhere = pki.gateway_config(core, "[streams]\nlisten = \"127.0.0.1:0\"\n")?;
    let listeners = Listeners::bind(&elsewhere).await?;
    let addr = listeners.stream_addr().context("enabled")?;
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    // Something listens there.
    TcpStream::connect(addr).await?;

    // A stream port that is taken is a bind error naming it.
    let taken = pki.gateway_config(core, &format!("[streams]\nlisten = \"{addr}\"\n"))?;
    let e = Listeners::bind(&taken).await.expect_err("port in use");
    assert!(e.to_string().contains("streams"), "{e}");
    Ok(())
}

/// A core that ends a stream (here: it refuses it) answers, finishes and stops reading: the
/// device gets the answer and the end at once, while it still holds its side open.
#[tokio::test]
async fn the_core_ending_a_stream_ends_it_at_once() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Absent,
        "[admission]\nrequire = false\n",
        Hooks::default(),
    )
    .await?;

    let mut device = TcpStream::connect(gw.stream_addr).await?;
    let first = open_transport(1);
    device.write_all(&first).await?;
    let mut stream = core.stream().await?;
    expect_open(&mut stream, &first).await?;
    let refusal = data_frame(68, 2);
    stream.send.write_all(&refusal).await?;
    stream.send.finish()?;
    stream.recv.stop(0u32.into())?;

    let started = tokio::time::Instant::now();
    assert_eq!(read_exactly(&mut device, refusal.len()).await?, refusal);
    let mut tail = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(WAIT, device.read(&mut tail)).await??,
        0
    );
    gw.wait_end("closed", 1.0).await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await?;
    Ok(())
}

/// A device stream's first frame, then one frame each way, through `stream`.
async fn exchange(device: &mut TcpStream, stream: &mut CoreStream, first: &[u8]) -> Result<()> {
    expect_open(stream, first).await?;
    let up = data_frame(5000, 1);
    device.write_all(&up).await?;
    assert_eq!(read_exactly(&mut stream.recv, up.len()).await?, up);
    let ack = data_frame(68, 2);
    stream.send.write_all(&ack).await?;
    assert_eq!(read_exactly(device, ack.len()).await?, ack);
    Ok(())
}

/// A core that names a bulk endpoint gets device streams there, on one connection made with the
/// gateway's certificate, while datagrams stay on the uplink; a bulk connection that closes is
/// made again for the next stream.
#[tokio::test]
async fn device_streams_take_the_bulk_connection() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, _control, gw) = rig(
        &pki,
        Bulk::Serve,
        "[admission]\nrequire = false\n",
        Hooks::default(),
    )
    .await?;
    assert_eq!(gw.metric("gateway_bulk_uplink_connected").await?, 0.0);

    let first = open_transport(1);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut device = TcpStream::connect(gw.stream_addr).await?;
        device.write_all(&first).await?;
        let mut stream = core.bulk_stream().await?;
        exchange(&mut device, &mut stream, &first).await?;
        open.push((device, stream));
    }
    let bulk = core.bulk_connection().await?;
    assert!(
        core.no_stream(Duration::from_millis(200)).await,
        "a stream on the uplink"
    );
    gw.wait_metric("gateway_bulk_uplink_connected", 1.0).await?;
    assert_eq!(gw.metric("gateway_bulk_uplink_connects_total").await?, 1.0);

    // A device datagram still goes over the uplink connection.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let datagram = &first[4..];
    udp.send_to(datagram, gw.device_addr).await?;
    assert_eq!(core.datagram().await?, datagram);

    // The bulk connection closes (the core restarted its bulk endpoint, say): its streams end,
    // and the next stream connects again.
    bulk.close(0u32.into(), b"bye");
    for (mut device, _stream) in open {
        expect_tcp_closed(&mut device).await?;
    }
    gw.wait_metric("gateway_bulk_uplink_connected", 0.0).await?;
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&first).await?;
    let mut stream = core.bulk_stream().await?;
    exchange(&mut device, &mut stream, &first).await?;
    gw.wait_metric("gateway_bulk_uplink_connected", 1.0).await?;
    assert_eq!(gw.metric("gateway_bulk_uplink_connects_total").await?, 2.0);
    assert!(core.no_stream(Duration::from_millis(100)).await);
    gw.stop().await?;
    Ok(())
}

/// `[uplink] bulk` names where the core's bulk endpoint is reached from the gateway (a NAT or a
/// port forward between them): device streams go there, not to the port `HelloAck` names, where
/// nothing answers.
#[tokio::test]
async fn uplink_bulk_overrides_the_announced_bulk_endpoint() -> Result<()> {
    let pki = Pki::new()?;
    let (mut core, core_addr) = FakeCore::start_with(&pki, Bulk::Elsewhere)?;
    let mut config = pki.gateway_config(
        core_addr,
        "[admission]\nrequire = false\n[streams]\nstall_timeout_secs = 2\n",
    )?;
    config.uplink.bulk = Some(core.bulk_addr.context("served")?.into());
    let gw = start_gateway(config, Hooks::default()).await?;
    let _control = core.control().await?;
    gw.wait_metric("gateway_uplink_connected", 1.0).await?;

    let first = open_transport(1);
    let mut device = TcpStream::connect(gw.stream_addr).await?;
    device.write_all(&first).await?;
    let mut stream = core.bulk_stream().await?;
    exchange(&mut device, &mut stream, &first).await?;
    gw.wait_metric("gateway_bulk_uplink_connected", 1.0).await?;
    assert!(
        core.no_stream(Duration::from_millis(200)).await,
        "a stream on the uplink"
    );
    gw.stop().await?;
    Ok(())
}

/// A bulk endpoint that refuses, or does not answer within the stall timeout: the stream goes
/// over the uplink connection, and so does the next one (without waiting again).
#[tokio::test]
async fn an_unreachable_bulk_endpoint_leaves_streams_on_the_uplink() -> Result<()> {
    for bulk in [Bulk::Refuse, Bulk::Silent] {
        let pki = Pki::new()?;
        let (mut core, _control, gw) = rig(
            &pki,
            bulk,
            "[admission]\nrequire = false\n[streams]\nstall_timeout_secs = 1\n",
            Hooks::default(),
        )
        .await?;

        let first = open_transport(1);
        for i in 0..2 {
            let started = tokio::time::Instant::now();
            let mut device = TcpStream::connect(gw.stream_addr).await?;
            device.write_all(&first).await?;
            let mut stream = core.stream().await?;
            exchange(&mut device, &mut stream, &first).await?;
            if i == 1 {
                assert!(
                    started.elapsed() < Duration::from_millis(500),
                    "{bulk:?}: the second stream waited {:?}",
                    started.elapsed()
                );
            }
        }
        assert_eq!(
            gw.metric("gateway_bulk_uplink_connected").await?,
            0.0,
            "{bulk:?}"
        );
        assert_eq!(
            gw.metric("gateway_bulk_uplink_connects_total").await?,
            0.0,
            "{bulk:?}"
        );
        assert_eq!(
            gw.metric("gateway_stream_ends_total{reason=\"stalled\"}")
                .await?,
            0.0
        );
        gw.stop().await?;
    }
    Ok(())
}
