//! Running the real binaries as child processes, for the tests that kill them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// A daemon running as a child process; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// The addresses it reported in its ready file.
    pub ready: serde_json::Value,
}

impl Daemon {
    /// Starts `program args… --ready-file F` and waits until F appears (at most `limit`).
    pub async fn start(program: &Path, args: &[String], limit: Duration) -> Result<Self> {
        Self::start_logged(program, args, None, limit).await
    }

    /// As [`Daemon::start`], with the log filter `RUST_LOG=filter` and standard error written to
    /// `log` when given.
    pub async fn start_logged(
        program: &Path,
        args: &[String],
        log: Option<(&str, &Path)>,
        limit: Duration,
    ) -> Result<Self> {
        Self::start_with_env(program, args, log, &[], limit).await
    }

    /// As [`Daemon::start_logged`], with extra environment variables (a crash point, say).
    pub async fn start_with_env(
        program: &Path,
        args: &[String],
        log: Option<(&str, &Path)>,
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ready_file: PathBuf = dir.path().join("ready.json");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("--ready-file")
            .arg(&ready_file)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some((filter, path)) = log {
            cmd.env("RUST_LOG", filter)
                .stderr(std::fs::File::create(path).context("creating the log file")?);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                if let Ok(ready) = serde_json::from_str(&text) {
                    return Ok(Self { child, ready });
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("{} exited before it was ready: {status}", program.display());
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {limit:?}", program.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An address from the ready file.
    pub fn addr(&self, key: &str) -> Result<SocketAddr> {
        self.ready[key]
            .as_str()
            .with_context(|| format!("no {key} in ready file"))?
            .parse()
            .context("bad address in ready file")
    }

    /// Waits for the process to exit by itself (a crash point) for at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .context("the process did not exit")?
            .context("waiting for the process")
    }

    /// SIGKILL, no chance to clean up: what a crash or power loss looks like.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// The path of one of the workspace's binaries (`core-stub`, `gateway`, `device-sim`).
///
/// `cargo test --workspace` builds them next to the test executables. When a binary is missing or
/// older than any source file of the workspace's crates (a run of this package alone after an
/// edit), one `cargo build` brings it up to date. An up-to-date binary is used as it is: a nested
/// `cargo build -p NAME` resolves features differently from the workspace's test build and would
/// relink it for nothing.
pub fn binary(name: &str) -> Result<PathBuf> {
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target directory")?;
    let path = dir.join(name);
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if !built.iter().any(|b| b == name) {
        if is_stale(&path) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "--quiet", "-p", name, "--bin", name])
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("cargo build -p {name} failed");
            }
        }
        built.push(name.to_owned());
    }
    if !path.exists() {
        bail!("{} does not exist after cargo build", path.display());
    }
    Ok(path)
}

/// Whether `binary` is missing or older than a source file of the crates it is built from.
fn is_stale(binary: &Path) -> bool {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return true;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = [
        "protocol/src",
        "ops/src",
        "core-stub/src",
        "gateway/src",
        "device-sim/src",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    let mut newest = std::fs::metadata(root.join("Cargo.lock"))
        .and_then(|m| m.modified())
        .ok();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest.is_some_and(|n| n > built)
}

/// What a one-shot command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// The exit status.
    pub status: std::process::ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Fails with both streams when the command did not exit 0.
    pub fn ok(self) -> Result<Self> {
        if !self.status.success() {
            bail!(
                "exited with {}\nstdout:\n{}\nstderr:\n{}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Standard output parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "stdout is not JSON:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `program args…` to completion with `env` set (at most `limit`; killed after).
pub async fn run(
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| {
            format!(
                "{} {args:?} did not finish within {limit:?}",
                program.display()
            )
        })??;
    Ok(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
