//! The `device-sim` binary against a minimal in-process core (the `relay-protocol` responder on a
//! loopback UDP socket, acknowledging every reading): config files, flags, output, exit codes.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_protocol::frame::{DeviceFrame, SessionId};
use relay_protocol::payload::{Message, ResponsePayload};
use relay_protocol::session::{PublicKey, Responder, StaticKeypair, Transport};

type Store = Arc<Mutex<HashMap<PublicKey, BTreeMap<u64, Vec<u8>>>>>;

struct Core {
    addr: SocketAddr,
    public: PublicKey,
    store: Store,
    stop: Arc<AtomicBool>,
}

impl Core {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let responder = Responder::new(StaticKeypair::generate().expect("keypair"));
        let public = *responder.public();
        let store = Store::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (store.clone(), stop.clone());
        std::thread::spawn(move || serve(socket, responder, st, sp));
        Self {
            addr,
            public,
            store,
            stop,
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(socket: UdpSocket, responder: Responder, store: Store, stop: Arc<AtomicBool>) {
    let mut sessions: HashMap<SessionId, (Transport, PublicKey)> = HashMap::new();
    let mut next = 1u32;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let now = Instant::now();
        match DeviceFrame::decode(&buf[..n]) {
            Ok(DeviceFrame::HandshakeInit { sender, noise }) => {
                let Ok(incoming) = responder.read_init(sender, noise) else {
                    continue;
                };
                let device = *incoming.device();
                next += 1;
                let mut out = Vec::new();
                let policy = ResponsePayload {
                    rekey_after_secs: 3600,
                };
                if let Ok(t) = incoming.accept(SessionId(next), policy, now, &mut out) {
                    sessions.insert(SessionId(next), (t, device));
                    let _ = socket.send_to(&out, from);
                }
            }
            Ok(DeviceFrame::Transport {
                receiver,
                counter,
                ciphertext,
            }) => {
                let Some((t, device)) = sessions.get_mut(&receiver) else {
                    continue;
                };
                let mut plain = Vec::new();
                if t.open(counter, ciphertext, &mut plain).is_err() {
                    continue;
                }
                let Ok(Message::Reading { seq, data }) = Message::decode(&plain) else {
                    continue;
                };
                store
                    .lock()
                    .expect("store")
                    .entry(*device)
                    .or_default()
                    .entry(seq.0)
                    .or_insert_with(|| data.to_vec());
                let mut out = Vec::new();
                if t.seal(&Message::Ack { seqs: vec![seq] }.to_vec(), &mut out)
                    .is_ok()
                {
                    let _ = socket.send_to(&out, from);
                }
            }
            _ => {}
        }
    }
}

/// Writes `device-sim.toml` and `fleet.keys` into `dir/devices/`; the gateway address is `target`
/// too unless `gateway` says otherwise.
fn write_config(dir: &Path, core: &Core, gateway: SocketAddr, devices: usize) -> PathBuf {
    let devices_dir = dir.join("devices");
    std::fs::create_dir_all(&devices_dir).expect("mkdir");
    let mut keys = String::from("# serial private-key\n\n");
    for i in 1..=devices {
        let kp = StaticKeypair::generate().expect("keypair");
        keys.push_str(&format!("meter-{i:05} {}\n", kp.private_hex_for_storage()));
    }
    std::fs::write(devices_dir.join("fleet.keys"), keys).expect("write");
    let path = devices_dir.join("device-sim.toml");
    std::fs::write(
        &path,
        format!(
            "core_public_key = \"{}\"\ngateway = \"{gateway}\"\ndirect = \"{}\"\nfleet = \"fleet.keys\"\n",
            core.public.to_hex(),
            core.addr
        ),
    )
    .expect("write");
    path
}

fn device_sim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-sim"));
    for var in [
        "DEVICE_SIM_CONFIG",
        "DEVICE_SIM_DEVICES",
        "DEVICE_SIM_READINGS",
        "DEVICE_SIM_INTERVAL_MS",
        "DEVICE_SIM_PAYLOAD_BYTES",
        "DEVICE_SIM_DURATION_SECS",
        "DEVICE_SIM_VIA",
        "DEVICE_SIM_JSON",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn run_direct_prints_json_and_exits_zero() {
    let core = Core::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &core, "127.0.0.1:9".parse().expect("addr"), 4);
    let out = device_sim()
        .args([
            "run",
            "--devices",
            "3",
            "--readings",
            "5",
            "--interval-ms",
            "20",
        ])
        .args(["--payload-bytes", "80", "--via", "direct", "--json"])
        .env("DEVICE_SIM_CONFIG", &config)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert_eq!(v["devices"], 3);
    assert_eq!(v["acknowledged"], 15);
    assert_eq!(v["lost"], 0);
    assert!(v["latency_p99_ms"].is_number());

    let store = core.store.lock().expect("store");
    assert_eq!(store.len(), 3);
    for readings in store.values() {
        assert_eq!(readings.len(), 5);
        for (seq, data) in readings {
            let prefix = format!("|seq={seq}|kwh=");
            assert_eq!(data.len(), 80);
            assert!(data.starts_with(b"meter-0000"));
            assert!(data.windows(prefix.len()).any(|w| w == prefix.as_bytes()));
        }
    }
}

#[test]
fn run_prints_a_table_and_exits_one_when_readings_are_lost() {
    let core = Core::start();
    // The "gateway" is a socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &core, silent.local_addr().expect("addr"), 2);
    let child = device_sim()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--readings", "1", "--interval-ms", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    // It would wait 30 s for acknowledgements; Ctrl-C ends it with what it has.
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("exits");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
    };
    assert_eq!(row("devices").as_deref(), Some("2"), "{stdout}");
    assert_eq!(row("lost").as_deref(), Some("2"), "{stdout}");
    assert_eq!(row("interrupted").as_deref(), Some("yes"), "{stdout}");
}

#[test]
fn bad_config_is_one_error_line_and_exit_two() {
    let core = Core::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &core, core.addr, 1);
    let mut text = std::fs::read_to_string(&config).expect("read");
    text.push_str("colour = \"blue\"\n");
    std::fs::write(&config, text).expect("write");
    let out = device_sim()
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("colour"),
        "{stderr}"
    );

    // The bench itself is a command to run by hand, never a test: here only its refusal to
    // start without the daemons' executables.
    let out = device_sim()
        .args(["bench", "--quick", "--bin-dir"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("cargo build --release -p core-stub -p gateway"),
        "{stderr}"
    );
}
