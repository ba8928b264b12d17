//! The binary's command line: exit codes and what it prints.

use std::process::Command;

fn core_stub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_core-stub"))
}

#[test]
fn bad_config_is_one_error_line_and_exit_code_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("core.toml");
    std::fs::write(
        &path,
        "name = \"x\"\n[store]\nbatch_max = 1\nsurprise = true\n",
    )
    .expect("write");
    let out = core_stub()
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("CORE_CONFIG")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("surprise"), "{stderr}");

    // The config file can also come from the environment.
    let out = core_stub()
        .arg("run")
        .env("CORE_CONFIG", dir.path().join("missing.toml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn init_prints_a_summary_without_secrets_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = core_stub()
        .arg("init")
        .arg(dir.path())
        .args(["--devices", "4", "--gateways", "2"])
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 devices"), "{stdout}");
    let noise_key = std::fs::read_to_string(dir.path().join("core/noise.key")).expect("key");
    assert!(!stdout.contains(noise_key.trim()));
    let fleet = std::fs::read_to_string(dir.path().join("devices/fleet.keys")).expect("fleet");
    for line in fleet.lines() {
        let (_, key) = line.split_once(' ').expect("line");
        assert!(!stdout.contains(key));
    }
    assert!(!stdout.contains("PRIVATE KEY"));

    let again = core_stub()
        .arg("init")
        .arg(dir.path())
        .output()
        .expect("init");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).starts_with("error: "));
    let forced = core_stub()
        .arg("init")
        .arg(dir.path())
        .arg("--force")
        .output()
        .expect("init");
    assert!(forced.status.success());
}

#[test]
fn stats_and_health_beside_a_running_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = core_stub()
        .arg("init")
        .arg(dir.path())
        .args(["--devices", "3"])
        .output()
        .expect("init");
    assert!(init.status.success(), "{init:?}");
    let config = dir.path().join("core/core.toml");
    let stats = |json: bool| {
        let mut c = core_stub();
        c.arg("stats").arg("--config").arg(&config);
        if json {
            c.arg("--json");
        }
        let out = c.env_remove("CORE_CONFIG").output().expect("stats");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let text = stats(false);
    assert!(text.contains("subscriptions  3 (3 active)"), "{text}");
    assert!(text.contains("with readings  0"), "{text}");

    let ready_file = dir.path().join("ready.json");
    let any = "127.0.0.1:0";
    let mut core = core_stub()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args([
            "--listen-quic",
            any,
            "--listen-direct",
            any,
            "--listen-admin",
            any,
        ])
        .arg("--ready-file")
        .arg(&ready_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("core");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready_file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ready: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ready_file).expect("ready file")).expect("json");
    let admin = ready["admin"].as_str().expect("admin").to_owned();
    // The bulk endpoint follows the ephemeral QUIC port: a port of its own.
    let bulk: std::net::SocketAddr = ready["bulk"].as_str().expect("bulk").parse().expect("addr");
    let quic: std::net::SocketAddr = ready["quic"].as_str().expect("quic").parse().expect("addr");
    assert_ne!(bulk.port(), 0);
    assert_ne!(bulk.port(), quic.port());
    let health = |path: &str| {
        core_stub()
            .args(["health", "--admin", &admin, "--path", path])
            .env_remove("CORE_LISTEN_ADMIN")
            .output()
            .expect("health")
    };
    let ok = health("/ready");
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).ends_with(": 200\n"),
        "{ok:?}"
    );
    assert_eq!(health("/nowhere").status.code(), Some(1));

    // The store is readable while the core holds it open.
    let json: serde_json::Value = serde_json::from_str(&stats(true)).expect("json");
    assert_eq!(json["subscriptions"], 3);
    assert_eq!(json["readings"], 0);
    assert_eq!(json["devices"][0]["serial"], "meter-00001");
    assert!(json["devices"][0]["last_reading_ms"].is_null());

    core.kill().expect("kill");
    core.wait().expect("wait");
    assert_eq!(health("/live").status.code(), Some(1));
}

#[test]
fn token_prints_a_secret_and_appends_its_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens.toml");
    let make = |name: &str, extra: &[&str]| {
        core_stub()
            .args(["token", "--name", name, "--role", "operator"])
            .args(extra)
            .arg("--append")
            .arg(&file)
            .output()
            .expect("token")
    };
    let out = make("acme-ops", &["--owner", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).expect("utf-8");
    let secret = secret.trim();
    assert_eq!(secret.len(), 64);
    let text = std::fs::read_to_string(&file).expect("file");
    assert!(!text.contains(secret), "only the hash is stored");
    let set = core_stub::tokens::TokenSet::parse(&text).expect("parses");
    let entry = set.authenticate(secret).expect("valid");
    assert_eq!(
        (entry.name.as_str(), entry.owner.as_str()),
        ("acme-ops", "acme")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second token; then a name taken and a bad owner are refused, the file untouched.
    assert!(make("beta", &[]).status.success());
    let before = std::fs::read_to_string(&file).expect("file");
    let out = make("beta", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("twice"));
    assert_eq!(make("gamma", &["--owner", "a b"]).status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&file).expect("file"), before);
    let out = core_stub()
        .args(["token", "--name", "x", "--role", "admin"])
        .output()
        .expect("token");
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown role");
}
