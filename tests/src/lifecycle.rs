//! The device credential lifecycle from the outside: factory-fresh devices made by
//! `device-sim manufacture`, claimed and activated through the core's admin API, then run by
//! `device-sim run --devices DIR` as a real process (so a crash point can abort it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use relay_ops::client::{self, Body};

use crate::procs::{binary, run, Output};
use crate::Deployment;

/// How long a one-shot device-sim run may take before the test gives up on it.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The admin API of one core, with the deployment's two tokens.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The core's admin address.
    pub addr: SocketAddr,
    /// The operator token of owner "operator".
    pub operator: String,
    /// The technician token of owner "operator".
    pub technician: String,
}

impl Admin {
    /// The admin API of `dep`'s core listening on `addr`.
    pub fn new(dep: &Deployment, addr: SocketAddr) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            Ok(std::fs::read_to_string(dep.path().join(name))
                .with_context(|| format!("reading {name}"))?
                .trim()
                .to_owned())
        };
        Ok(Self {
            addr,
            operator: read("admin-operator.token")?,
            technician: read("admin-technician.token")?,
        })
    }

    /// One request; returns the status and the body as JSON (`null` if empty or not JSON).
    pub async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Body<'_>>,
    ) -> Result<(u16, serde_json::Value)> {
        let answer = client::request(
            self.addr,
            method,
            path,
            Some(token),
            body,
            Duration::from_secs(30),
        )
        .await?;
        let json = serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null);
        Ok((answer.status, json))
    }

    /// As [`Admin::call`], failing unless the answer is 200.
    pub async fn ok(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Body<'_>>,
    ) -> Result<serde_json::Value> {
        let (status, json) = self.call(token, method, path, body).await?;
        if status != 200 {
            bail!("{method} {path}: {status} {json}");
        }
        Ok(json)
    }

    /// Claims the devices of `manifest` (CSV text) as the operator.
    pub async fn claim(&self, manifest: &str) -> Result<serde_json::Value> {
        self.ok(
            &self.operator,
            "POST",
            "/v1/claims",
            Some(Body::csv(manifest.as_bytes())),
        )
        .await
    }

    /// Activates `serials` with profile `profile` as the technician, one plan.
    pub async fn activate(&self, serials: &[String], profile: &str) -> Result<serde_json::Value> {
        self.ok(
            &self.technician,
            "POST",
            "/v1/plans",
            Some(Body::csv(plan(serials, profile).as_bytes())),
        )
        .await
    }
}

/// An activation plan: one row per serial, account `apt-N`.
pub fn plan(serials: &[String], profile: &str) -> String {
    let mut text = String::from("serial,account,profile\n");
    for (i, s) in serials.iter().enumerate() {
        text.push_str(&format!("{s},apt-{},{profile}\n", i + 1));
    }
    text
}

/// Devices made by `device-sim manufacture`.
#[derive(Debug, Clone)]
pub struct Factory {
    /// The output directory (one subdirectory per device, `manifest.csv`).
    pub dir: PathBuf,
    /// The serial numbers, in manifest order.
    pub serials: Vec<String>,
    /// The manifest's text.
    pub manifest: String,
}

impl Factory {
    /// `device-sim manufacture --count N --out DIR/factory-PREFIX --prefix PREFIX`.
    pub async fn manufacture(dep: &Deployment, count: u32, prefix: &str) -> Result<Self> {
        let dir = dep.path().join(format!("factory-{prefix}"));
        let program = binary("device-sim")?;
        let count = count.to_string();
        run(
            &program,
            &[
                "manufacture",
                "--count",
                &count,
                "--out",
                path_str(&dir)?,
                "--prefix",
                prefix,
            ],
            &[],
            RUN_LIMIT,
        )
        .await?
        .ok()?;
        let manifest = std::fs::read_to_string(dir.join("manifest.csv"))?;
        let serials = manifest
            .lines()
            .skip(1)
            .filter_map(|l| l.split(',').next())
            .map(str::to_owned)
            .collect();
        Ok(Self {
            dir,
            serials,
            manifest,
        })
    }

    /// The manifest restricted to `serials` (header kept).
    pub fn manifest_of(&self, serials: &[String]) -> String {
        let mut lines = self.manifest.lines();
        let mut text = format!("{}\n", lines.next().unwrap_or_default());
        for l in lines {
            if serials.iter().any(|s| l.starts_with(&format!("{s},"))) {
                text.push_str(l);
                text.push('\n');
            }
        }
        text
    }

    /// A device's directory.
    pub fn device_dir(&self, serial: &str) -> PathBuf {
        self.dir.join(serial)
    }
}

/// `device-sim run --devices DIR --serials … --target … --core-key … --json ARGS…` with `env`.
pub async fn run_devices(
    factory: &Factory,
    serials: &[String],
    target: SocketAddr,
    core_key: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Output> {
    let program = binary("device-sim")?;
    let serials = serials.join(",");
    let target = target.to_string();
    let mut all = vec![
        "run",
        "--devices",
        path_str(&factory.dir)?,
        "--serials",
        &serials,
        "--target",
        &target,
        "--core-key",
        core_key,
        "--json",
    ];
    all.extend_from_slice(args);
    run(&program, &all, env, RUN_LIMIT).await
}

/// The `per_device` entry of `serial` in a device-sim JSON summary.
pub fn device_entry<'a>(
    summary: &'a serde_json::Value,
    serial: &str,
) -> Result<&'a serde_json::Value> {
    summary["per_device"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["serial"] == serial))
        .with_context(|| format!("{serial} not in the summary: {summary}"))
}

/// A path as UTF-8 (every path here is under a temporary directory).
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}
