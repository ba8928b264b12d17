//! The real `core-stub` and `gateway` as child processes: a deployment from `core-stub init`, both
//! started on 127.0.0.1 port 0 with ready files, `/ready` polled, RSS read from `/proc`, metrics
//! scraped from the admin ports. Children are killed when dropped (`kill_on_drop`), so an error or
//! Ctrl-C never leaves them behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::{BenchError, Drops, Machine, Rss};

/// Where the two daemons' executables are.
#[derive(Debug)]
pub(super) struct Binaries {
    pub core: PathBuf,
    pub gateway: PathBuf,
}

/// `core-stub` and `gateway` in `bin_dir`, or next to the running executable.
pub(super) fn find_binaries(bin_dir: Option<&Path>) -> Result<Binaries, BenchError> {
    let dir = match bin_dir {
        Some(d) => d.to_owned(),
        None => std::env::current_exe()
            .map_err(BenchError::io("locating the running executable"))?
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default(),
    };
    let find = |name: &str| {
        let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if path.is_file() {
            Ok(path)
        } else {
            Err(BenchError::MissingBinary(path))
        }
    };
    Ok(Binaries {
        core: find("core-stub")?,
        gateway: find("gateway")?,
    })
}

/// `core-stub init DIR --devices N`.
pub(super) async fn init_deployment(
    core: &Path,
    dir: &Path,
    devices: usize,
) -> Result<(), BenchError> {
    let out = Command::new(core)
        .arg("init")
        .arg(dir)
        .arg("--devices")
        .arg(devices.to_string())
        .arg("--force")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(BenchError::io(format!("running {}", core.display())))?;
    if !out.status.success() {
        return Err(BenchError::Daemon(format!(
            "core-stub init failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Raises `[flows] max` in `gateway.toml` to at least `flows`.
pub(super) fn ensure_gateway_flows(path: &Path, flows: usize) -> Result<(), BenchError> {
    let text = std::fs::read_to_string(path).map_err(BenchError::io(path.display().to_string()))?;
    let bad = |why: &str| BenchError::Daemon(format!("{}: {why}", path.display()));
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.message()))?;
    let table = doc
        .entry("flows")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| bad("[flows] is not a table"))?;
    let current = table
        .get("max")
        .and_then(toml::Value::as_integer)
        .unwrap_or(0);
    let wanted = i64::try_from(flows).unwrap_or(i64::MAX);
    if current >= wanted {
        return Ok(());
    }
    table.insert("max".into(), toml::Value::Integer(wanted));
    let text = toml::to_string(&doc).map_err(|e| bad(&e.to_string()))?;
    std::fs::write(path, text).map_err(BenchError::io(path.display().to_string()))
}

/// Sets (`Some`) or removes (`None`) integer keys of `path`'s TOML tables: `(table, key, value)`.
pub(super) fn edit_toml(
    path: &Path,
    edits: &[(&str, &str, Option<i64>)],
) -> Result<(), BenchError> {
    let edits: Vec<_> = edits
        .iter()
        .map(|(t, k, v)| (*t, *k, v.map(toml::Value::Integer)))
        .collect();
    edit_toml_values(path, &edits)
}

/// [`edit_toml`] with values of any TOML type.
pub(super) fn edit_toml_values(
    path: &Path,
    edits: &[(&str, &str, Option<toml::Value>)],
) -> Result<(), BenchError> {
    let text = std::fs::read_to_string(path).map_err(BenchError::io(path.display().to_string()))?;
    let bad = |why: &str| BenchError::Daemon(format!("{}: {why}", path.display()));
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.message()))?;
    for (table, key, value) in edits {
        let t = doc
            .entry(*table)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad(&format!("[{table}] is not a table")))?;
        match value {
            Some(v) => {
                t.insert((*key).into(), v.clone());
            }
            None => {
                t.remove(*key);
            }
        }
    }
    let text = toml::to_string(&doc).map_err(|e| bad(&e.to_string()))?;
    std::fs::write(path, text).map_err(BenchError::io(path.display().to_string()))
}

/// One daemon; SIGKILL when dropped.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
    ready: serde_json::Value,
}

impl Daemon {
    /// Starts `program args… --ready-file F` (RUST_LOG=warn, stderr to `log`) and waits for F.
    async fn start(
        name: &'static str,
        program: &Path,
        args: &[String],
        dir: &Path,
        limit: Duration,
    ) -> Result<Self, BenchError> {
        let ready_file = dir.join(format!("{name}.ready.json"));
        // A restart: the previous run's ready file names the previous addresses.
        match std::fs::remove_file(&ready_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BenchError::io(ready_file.display().to_string())(e)),
        }
        let log = dir.join(format!("{name}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(BenchError::io(log.display().to_string()))?;
        let mut child = Command::new(program)
            .args(args)
            .arg("--ready-file")
            .arg(&ready_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(BenchError::io(format!("starting {}", program.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Daemon(format!("{name} exited at once")))?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                if let Ok(ready) = serde_json::from_str(&text) {
                    return Ok(Self {
                        name,
                        child,
                        pid,
                        log,
                        ready,
                    });
                }
            }
            if let Some(status) = child.try_wait().map_err(BenchError::io(name))? {
                return Err(BenchError::Daemon(format!(
                    "{name} exited before it was ready ({status}): {}",
                    log_tail(&log)
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(format!(
                    "{name} wrote no ready file within {limit:?}: {}",
                    log_tail(&log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addr(&self, key: &str) -> Result<SocketAddr, BenchError> {
        self.ready[key]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                BenchError::Daemon(format!(
                    "{}: no address {key:?} in its ready file",
                    self.name
                ))
            })
    }

    fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Daemon(format!(
                "{} exited during the bench ({status}): {}",
                self.name,
                log_tail(&self.log)
            ))),
            Err(e) => Err(BenchError::io(self.name)(e)),
        }
    }

    /// Inodes of the UDP (and other) sockets this process holds.
    fn socket_inodes(&self) -> std::collections::HashSet<u64> {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.pid)) else {
            return Default::default();
        };
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| {
                let t = target.to_str()?;
                t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
    }

    /// CPU time (user + system, every thread, living or exited) so far, in seconds.
    fn cpu_secs(&self) -> Result<f64, BenchError> {
        let path = format!("/proc/{}/stat", self.pid);
        let text = std::fs::read_to_string(&path).map_err(BenchError::io(path))?;
        cpu_secs(&text).ok_or_else(|| BenchError::Daemon(format!("no CPU times for {}", self.name)))
    }

    fn rss(&self) -> Result<u64, BenchError> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path).map_err(BenchError::io(path))?;
        vm_rss(&text).ok_or_else(|| BenchError::Daemon(format!("no VmRSS for {}", self.name)))
    }
}

/// Clock ticks per second of `/proc/PID/stat` times: `USER_HZ`, 100 on every Linux the kernel
/// ABI allows user space to see (`sysconf(_SC_CLK_TCK)`; read without `libc` here).
const USER_HZ: f64 = 100.0;

/// `utime + stime` of a `/proc/PID/stat` text, in seconds.
pub(super) fn cpu_secs(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may hold spaces: count fields after the last one.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// This process's CPU time so far (`getrusage(RUSAGE_SELF)`, from `/proc/self/stat`), seconds.
pub(super) fn own_cpu_secs() -> Option<f64> {
    cpu_secs(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// The last few lines of a daemon's log, on one line.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "(nothing logged)".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
pub(super) fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// The core and the gateway, running and ready, with their bound addresses.
#[derive(Debug)]
pub(super) struct Daemons {
    core: Daemon,
    gateway: Daemon,
    pub core_quic: SocketAddr,
    pub core_direct: SocketAddr,
    pub core_admin: SocketAddr,
    /// The core's direct stream port (TCP).
    pub core_streams: SocketAddr,
    pub gateway_devices: SocketAddr,
    /// The gateway's stream port (TCP).
    pub gateway_streams: SocketAddr,
    pub gateway_admin: SocketAddr,
}

impl Daemons {
    /// Starts the core from `dir/core/core.toml`, then the gateway from `dir/gateway-1` pointed
    /// at the core's QUIC address, and waits until the gateway's `/ready` answers 200 (its uplink
    /// is up).
    pub async fn start(bins: &Binaries, dir: &Path, limit: Duration) -> Result<Self, BenchError> {
        let any = "127.0.0.1:0".to_owned();
        let path = |p: &str| dir.join(p).display().to_string();
        let core = Daemon::start(
            "core-stub",
            &bins.core,
            &[
                "run".into(),
                "--config".into(),
                path("core/core.toml"),
                "--listen-quic".into(),
                any.clone(),
                "--listen-direct".into(),
                any.clone(),
                "--listen-admin".into(),
                any.clone(),
            ],
            dir,
            limit,
        )
        .await?;
        let core_quic = core.addr("quic")?;
        let core_direct = core.addr("direct")?;
        let core_admin = core.addr("admin")?;
        let core_streams = core.addr("streams")?;
        let gateway = Daemon::start(
            "gateway",
            &bins.gateway,
            &[
                "--config".into(),
                path("gateway-1/gateway.toml"),
                "--listen-devices".into(),
                any.clone(),
                "--listen-admin".into(),
                any,
                "--core".into(),
                core_quic.to_string(),
            ],
            dir,
            limit,
        )
        .await?;
        let mut daemons = Self {
            core_quic,
            core_direct,
            core_admin,
            core_streams,
            gateway_devices: gateway.addr("devices")?,
            gateway_streams: gateway.addr("streams")?,
            gateway_admin: gateway.addr("admin")?,
            core,
            gateway,
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = http_get(daemons.gateway_admin, "/ready").await {
                break;
            }
            daemons.check_alive()?;
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(format!(
                    "the gateway's /ready did not answer 200 within {limit:?} (uplink to the core not up?): {}",
                    log_tail(&daemons.gateway.log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(daemons)
    }

    /// An error naming the daemon that exited, if one did.
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        self.core.check_alive()?;
        self.gateway.check_alive()
    }

    /// CPU seconds (user + system) of the gateway and of the core so far.
    pub fn cpu_secs(&self) -> Result<(f64, f64), BenchError> {
        Ok((self.gateway.cpu_secs()?, self.core.cpu_secs()?))
    }

    /// Both resident set sizes now.
    pub fn rss(&self) -> Result<Rss, BenchError> {
        Ok(Rss {
            gateway: self.gateway.rss()?,
            core: self.core.rss()?,
        })
    }

    /// Datagrams dropped so far: by the kernel at the daemons' UDP sockets (receive buffer
    /// full) and in all (`RcvbufErrors`), and by the daemons themselves
    /// (`*_frames_dropped_total`, every reason). Cumulative; callers take differences.
    pub async fn drops(&self) -> Drops {
        let per_socket = udp_socket_drops();
        let at = |d: &Daemon| {
            let inodes = d.socket_inodes();
            per_socket
                .iter()
                .filter(|(inode, _)| inodes.contains(inode))
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        let sum = |text: Option<String>, name: &str| text.map(|t| metric_sum(&t, name));
        Drops {
            kernel_at_core: at(&self.core),
            kernel_at_gateway: at(&self.gateway),
            kernel_total: rcvbuf_errors().unwrap_or(0),
            core_frames_dropped: sum(self.core_metrics().await, "core_frames_dropped_total")
                .unwrap_or(0.0),
            gateway_frames_dropped: sum(
                self.gateway_metrics().await,
                "gateway_frames_dropped_total",
            )
            .unwrap_or(0.0),
        }
    }

    /// The core's whole `/metrics` text, if it can be scraped.
    pub async fn core_metrics(&self) -> Option<String> {
        match http_get(self.core_admin, "/metrics").await {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    }

    /// The gateway's whole `/metrics` text, if it can be scraped.
    pub async fn gateway_metrics(&self) -> Option<String> {
        match http_get(self.gateway_admin, "/metrics").await {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    }

    /// One series of the core's `/metrics`, if it can be scraped.
    pub async fn core_metric(&self, series: &str) -> Option<f64> {
        scrape(self.core_admin, series).await
    }

    /// One series of the gateway's `/metrics`, if it can be scraped.
    pub async fn gateway_metric(&self, series: &str) -> Option<f64> {
        scrape(self.gateway_admin, series).await
    }

    /// Kills both and waits for them to be gone.
    pub async fn stop(mut self) {
        let _ = self.gateway.child.kill().await;
        let _ = self.core.child.kill().await;
    }
}

async fn scrape(admin: SocketAddr, series: &str) -> Option<f64> {
    match http_get(admin, "/metrics").await {
        Ok((200, body)) => metric(&body, series),
        _ => None,
    }
}

/// `GET path` on an admin endpoint: the status and the body as text.
pub(super) async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    relay_ops::client::get(addr, path, Duration::from_secs(5))
        .await
        .map(|answer| (answer.status, answer.text()))
        .map_err(std::io::Error::from)
}

/// The value of `series` (name and labels exactly as exposed) in a Prometheus text exposition.
pub(super) fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every series of metric `name`, whatever the labels.
pub(super) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labels) => labels.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// `drops` of every UDP socket in `/proc/net/udp` and `udp6`, by inode.
fn udp_socket_drops() -> Vec<(u64, u64)> {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| parse_udp_table(&text))
        .collect()
}

/// `(inode, drops)` of each socket line of a `/proc/net/udp` table.
pub(super) fn parse_udp_table(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(9)?.parse().ok()?, f.get(12)?.parse().ok()?))
        })
        .collect()
}

/// `Udp: RcvbufErrors` of `/proc/net/snmp`: receive-buffer overflows on every UDP socket.
fn rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The soft `Max open files` limit of this process.
pub(super) fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the figures were measured on.
pub(super) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_owned()),
        memory_bytes: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_and_metrics() {
        let status = "Name:\tcore-stub\nVmPeak:\t  99 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss(status), Some(12345 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        let text = "# HELP core_sessions Sessions.\n# TYPE core_sessions gauge\ncore_sessions 42\n\
                    core_handshakes_total{result=\"accepted\"} 7\ncore_handshakes_total{result=\"failed\"} 1\n";
        assert_eq!(metric(text, "core_sessions"), Some(42.0));
        assert_eq!(
            metric(text, "core_handshakes_total{result=\"accepted\"}"),
            Some(7.0)
        );
        assert_eq!(metric(text, "core_handshakes_total"), None);
        assert_eq!(metric(text, "core_session"), None);
        assert_eq!(metric_sum(text, "core_handshakes_total"), 8.0);
        assert_eq!(metric_sum(text, "core_sessions"), 42.0);
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1234: 0100007F:D9CE 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 55501 2 0000000000000000 17\n";
        assert_eq!(parse_udp_table(udp), [(55501, 17)]);
        let stat =
            "4242 (core stub) S 1 4242 4242 0 -1 4194560 9000 0 0 0 250 75 0 0 20 0 9 0 1 2 3";
        assert_eq!(cpu_secs(stat), Some(3.25));
        assert_eq!(cpu_secs("4242 (x) S 1"), None);
        assert!(own_cpu_secs().is_some());
    }

    #[test]
    fn raises_the_gateway_flow_limit_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "name = \"gateway-1\"\n\n[flows]\nmax = 100000\nidle_timeout_secs = 900\n",
        )
        .expect("write");
        ensure_gateway_flows(&path, 50).expect("kept");
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .contains("max = 100000"));
        ensure_gateway_flows(&path, 121_400).expect("raised");
        let doc: toml::Table = std::fs::read_to_string(&path)
            .expect("read")
            .parse()
            .expect("toml");
        assert_eq!(doc["flows"]["max"].as_integer(), Some(121_400));
        assert_eq!(doc["flows"]["idle_timeout_secs"].as_integer(), Some(900));
        assert_eq!(doc["name"].as_str(), Some("gateway-1"));
    }

    #[test]
    fn edits_toml_keys_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("core.toml");
        std::fs::write(
            &path,
            "name = \"core\"\n\n[handshakes]\ncookie_above_per_sec = 7\n",
        )
        .expect("write");
        edit_toml(
            &path,
            &[
                ("admission", "quota_frames", Some(9)),
                ("handshakes", "cookie_above_per_sec", None),
            ],
        )
        .expect("edited");
        let doc: toml::Table = std::fs::read_to_string(&path)
            .expect("read")
            .parse()
            .expect("toml");
        assert_eq!(doc["admission"]["quota_frames"].as_integer(), Some(9));
        assert!(doc["handshakes"].get("cookie_above_per_sec").is_none());
        assert_eq!(doc["name"].as_str(), Some("core"));
        edit_toml_values(
            &path,
            &[(
                "video",
                "dir",
                Some(toml::Value::String("/dev/shm/v".into())),
            )],
        )
        .expect("edited");
        let doc: toml::Table = std::fs::read_to_string(&path)
            .expect("read")
            .parse()
            .expect("toml");
        assert_eq!(doc["video"]["dir"].as_str(), Some("/dev/shm/v"));
        assert_eq!(doc["admission"]["quota_frames"].as_integer(), Some(9));
    }

    #[test]
    fn missing_binaries_are_named_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = find_binaries(Some(dir.path()))
            .expect_err("empty dir")
            .to_string();
        assert!(
            e.contains("core-stub") && e.contains("cargo build --release"),
            "{e}"
        );
    }
}
