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
