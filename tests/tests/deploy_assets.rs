//! The monitoring assets in `deploy/` against the real daemons: every metric the Grafana dashboard
//! and the Prometheus alert rules query is one the core or the gateway exports, and the dashboard
//! shows every metric they export. (promtool checks the rules' syntax and behaviour; `.ci/run`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gateway::Hooks;
use relay_tests::{start_core, start_gateway, Deployment};

fn deploy_file(path: &str) -> Result<String> {
    let file: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    std::fs::read_to_string(&file).with_context(|| file.display().to_string())
}

/// Metric names in Prometheus text exposition: the part of each sample line before `{` or ' '.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Identifiers in PromQL (or any text) that name one of the relay's metrics.
fn referenced(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("core_") || w.starts_with("gateway_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` and templating `query`/`definition` string in the dashboard.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// A histogram's `_bucket`, `_sum` and `_count` series count as the histogram.
fn family(name: &str, exported: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if exported.contains(&format!("{base}_bucket")) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics_and_show_them_all() -> Result<()> {
    let dep = Deployment::new(2, 1)?;
    let core = start_core(&dep, None).await?;
    let gw = start_gateway(&dep, 1, core.quic, Hooks::default()).await?;
    let mut names = exported(&core.metrics().await?);
    names.extend(exported(&gw.metrics().await?));
    gw.stop().await?;
    core.stop().await?;
    assert!(names.contains("gateway_frames_dropped_total"), "{names:?}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("grafana/relay-dashboard.json")?)
            .context("the dashboard is not valid JSON")?;
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "{exprs:?}");
    let in_dashboard: BTreeSet<String> = exprs.iter().flat_map(|e| referenced(e)).collect();
    let in_rules = referenced(&deploy_file("prometheus/rules/relay-alerts.yml")?);
    assert!(
        in_rules.contains("gateway_uplink_connected"),
        "{in_rules:?}"
    );

    for (what, used) in [("dashboard", &in_dashboard), ("alert rules", &in_rules)] {
        let unknown: Vec<_> = used.difference(&names).collect();
        assert!(
            unknown.is_empty(),
            "the {what} query metrics nobody exports: {unknown:?}"
        );
    }
    let shown: BTreeSet<String> = in_dashboard.iter().map(|n| family(n, &names)).collect();
    let missing: Vec<String> = names
        .iter()
        .map(|n| family(n, &names))
        .filter(|f| !shown.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but not on the dashboard: {missing:?}"
    );
    Ok(())
}
