//! The `device-sim` binary against a minimal in-process core (the `relay-protocol` responder on a
//! loopback UDP socket, acknowledging every reading): config files, flags, output, exit codes.
//! For devices from `device-sim manufacture` the core knows the factory keys of the manifest it
//! was given and provisions them (`KeyAccepted` + `Config`, no session for the factory key).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_protocol::frame::{DeviceFrame, SessionId};
use relay_protocol::payload::{DeviceConfig, Message, RefusalReason, ResponsePayload};
use relay_protocol::session::{PublicKey, Responder, StaticKeypair, Transport};

type Store = Arc<Mutex<HashMap<PublicKey, BTreeMap<u64, Vec<u8>>>>>;

/// Factory keys the core provisions, and subscription key → factory key.
#[derive(Default)]
struct Provisioning {
    factory: std::collections::HashSet<PublicKey>,
    subscriptions: HashMap<PublicKey, PublicKey>,
}

struct Core {
    addr: SocketAddr,
    public: PublicKey,
    store: Store,
    provisioning: Arc<Mutex<Provisioning>>,
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
        let provisioning = Arc::new(Mutex::new(Provisioning::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, pr, sp) = (store.clone(), provisioning.clone(), stop.clone());
        std::thread::spawn(move || serve(socket, responder, st, pr, sp));
        Self {
            addr,
            public,
            store,
            provisioning,
            stop,
        }
    }

    /// Claims the devices of a manifest (all but `except`).
    fn claim(&self, manifest: &Path, except: &[&str]) {
        let text = std::fs::read_to_string(manifest).expect("manifest");
        let mut p = self.provisioning.lock().expect("provisioning");
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split(',').collect();
            if !except.contains(&fields[0]) {
                p.factory
                    .insert(PublicKey::from_hex(fields[1]).expect("key"));
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The configuration a provisioned device gets (and again when it reports another version).
fn config() -> DeviceConfig {
    DeviceConfig {
        version: 1,
        report_interval_secs: 60,
        report_bytes: 64,
        threshold: 0,
    }
}

fn serve(
    socket: UdpSocket,
    responder: Responder,
    store: Store,
    provisioning: Arc<Mutex<Provisioning>>,
    stop: Arc<AtomicBool>,
) {
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
                let mut device = *incoming.device();
                let mut out = Vec::new();
                let mut provisioned = false;
                {
                    let mut p = provisioning.lock().expect("provisioning");
                    if p.factory.contains(&device) {
                        let Some(next) = incoming.init().next_key else {
                            continue;
                        };
                        p.subscriptions.insert(next, device);
                        let mut policy = ResponsePayload::accept(3600);
                        policy.key_accepted = Some(next);
                        policy.notices.config = Some(config());
                        if incoming.refuse(&policy, &mut out).is_ok() {
                            let _ = socket.send_to(&out, from);
                        }
                        continue;
                    }
                    if let Some(factory) = p.subscriptions.get(&device) {
                        // Readings of a provisioned device are kept under its factory key.
                        device = *factory;
                        provisioned = true;
                    } else if !p.factory.is_empty() {
                        // A core that claimed devices knows every key it accepts.
                        let policy = ResponsePayload::refuse(RefusalReason::UnknownKey);
                        if incoming.refuse(&policy, &mut out).is_ok() {
                            let _ = socket.send_to(&out, from);
                        }
                        continue;
                    }
                }
                next += 1;
                let mut policy = ResponsePayload::accept(3600);
                if provisioned && incoming.init().config_version != Some(1) {
                    policy.notices.config = Some(config());
                }
                if let Ok(t) = incoming.accept(SessionId(next), &policy, now, &mut out) {
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
                if t.seal(&Message::ack(vec![seq]).to_vec(), &mut out).is_ok() {
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

fn run_json(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn manufactured_devices_provision_themselves_through_the_command_line() {
    let core = Core::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = dir.path().join("batch");
    let out = device_sim()
        .args(["manufacture", "--count", "3", "--prefix", "dev-", "--out"])
        .arg(&batch)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("manufactured 3 devices"), "{stdout}");
    let manifest = std::fs::read_to_string(batch.join("manifest.csv")).expect("manifest");
    let lines: Vec<&str> = manifest.lines().collect();
    assert_eq!(lines[0], "serial,factory_public_key,model");
    assert_eq!(lines.len(), 4);
    assert!(lines[1].starts_with("dev-000001,") && lines[1].ends_with(",relay-meter-1"));
    // Never over an existing batch.
    let again = device_sim()
        .args(["manufacture", "--count", "1", "--out"])
        .arg(&batch)
        .output()
        .expect("runs");
    assert_eq!(again.status.code(), Some(2));

    // dev-000003 is not claimed at this core.
    core.claim(&batch.join("manifest.csv"), &["dev-000003"]);
    let run = |extra: &[&str], crash: Option<&str>| {
        let mut c = device_sim();
        c.arg("run");
        if !extra.contains(&"--clone-of") {
            c.arg("--devices").arg(&batch);
        }
        c.args(["--target", &core.addr.to_string()])
            .args(["--core-key", &core.public.to_hex()])
            .args(["--readings", "3", "--interval-ms", "20", "--json"])
            .args(["--refused-retry-ms", "100", "--drain-timeout-ms", "1000"])
            .args(extra);
        match crash {
            Some(point) => c.env("RELAY_CRASH_AT", point),
            None => c.env_remove("RELAY_CRASH_AT"),
        };
        c.output().expect("runs")
    };

    // Killed between the core's acceptance and the first handshake with the new key.
    let out = run(&["--serials", "dev-000001"], Some("device:key_accepted"));
    assert_eq!(out.status.code(), None, "aborted: {out:?}");
    let out = run(&["--first", "2"], None);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = run_json(&out);
    assert_eq!(v["acknowledged"], 6);
    assert_eq!(v["lifecycle"]["provisioned"], 2);
    assert_eq!(v["lifecycle"]["working"], 2);
    let devices = v["per_device"].as_array().expect("per device");
    assert_eq!(devices.len(), 2);
    for d in devices {
        assert_eq!(d["provisioned"], true);
        assert_eq!(d["config"]["version"], 1);
        assert_eq!(d["readings_acknowledged"], 3);
        assert_eq!(d["endpoint"], core.addr.to_string());
    }
    // dev-000001 completed the provisioning the crash interrupted (no new factory handshake).
    assert_eq!(devices[0]["provisionings"], 1);
    assert_eq!(core.store.lock().expect("store").len(), 2);

    // The unclaimed device ends without a subscription: exit 3, or 0 with --allow-refused.
    let out = run(&["--serials", "dev-000003"], None);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(run_json(&out)["lifecycle"]["without_subscription"], 1);
    let out = run(&["--serials", "dev-000003", "--allow-refused"], None);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A clone: dev-000002's subscription key without its factory key.
    let out = run(
        &[
            "--clone-of",
            batch.join("dev-000002").to_str().expect("utf-8"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = run_json(&out);
    assert_eq!(v["devices"], 1);
    assert_eq!(v["per_device"][0]["serial"], "dev-000002");
    assert_eq!(v["per_device"][0]["provisioned"], true);
    let out = run(
        &[
            "--clone-of",
            batch.join("dev-000003").to_str().expect("utf-8"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "nothing to clone: {out:?}");
}

#[test]
fn help_names_every_lifecycle_flag() {
    let out = device_sim().args(["run", "--help"]).output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--devices <N|DIR>",
        "--serials",
        "--first",
        "--core-key",
        "--clone-of",
        "--allow-refused",
        "--wave-size",
        "--wave-interval-ms",
        "--sleepy",
        "--wake-every-ms",
        "--follow-config",
        "--drain-timeout-ms",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    let out = device_sim()
        .args(["manufacture", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--count", "--out", "--prefix", "--model", "--kek-file"] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
}

#[test]
fn camera_help_names_its_flags() {
    let out = device_sim()
        .args(["camera", "--help"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--device <INDEX|SERIAL>",
        "--device-dir",
        "--target",
        "--stream-target",
        "--direct",
        "--status-every",
        "--accident-after",
        "--video-bytes",
        "--video-seed",
        "--video-file",
        "--bitrate-mbps",
        "--chunk-bytes",
        "--max-attempts",
        "--duration-secs",
        "--upload-id",
        "--json",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
}

/// The core here has no stream port: the status readings are acknowledged, the video is given up
/// on after its attempts, and the exit code says so (1), with the JSON naming why.
#[test]
fn camera_without_a_stream_port_reports_the_failed_video_and_exits_one() {
    let core = Core::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &core, core.addr, 2);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let out = device_sim()
        .args([
            "camera",
            "--config",
            config.to_str().expect("utf-8"),
            "--device",
            "2",
            "--stream-target",
            &closed.to_string(),
            "--status-every",
            "0.2",
            "--accident-after",
            "0.3",
            "--video-bytes",
            "100000",
            "--max-attempts",
            "2",
            "--json",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json = run_json(&out);
    assert_eq!(json["serial"], "meter-00002");
    assert_eq!(json["ok"], false);
    assert!(json["status"]["acknowledged"].as_u64() >= Some(2), "{json}");
    assert_eq!(json["status"]["lost"], 0);
    assert_eq!(json["video"]["attempts"], 2);
    assert_eq!(json["video"]["bytes"], 100_000);
    let error = json["video_error"].as_str().expect("an error");
    assert!(error.starts_with("gave up after 2 attempts"), "{error}");

    let out = device_sim()
        .args([
            "camera",
            "--config",
            config.to_str().expect("utf-8"),
            "--device",
            "3",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: --device 3:"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
