//! Scraping a daemon's `/metrics` over real HTTP and reading values out of the text format.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};

/// `GET path` on the admin endpoint; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let answer = relay_ops::client::get(addr, path, std::time::Duration::from_secs(10)).await?;
    Ok((answer.status, answer.text()))
}

/// The whole `/metrics` text.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

/// The value of the sample `name{labels}` (labels written as in the exposition, e.g.
/// `reason="authentication"`; empty for none). Missing samples read as 0.
pub fn value(text: &str, name: &str, labels: &str) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n == name && label_set_matches(l, labels) {
            return v.parse().unwrap_or(f64::NAN);
        }
    }
    0.0
}

/// Sum of every sample of `name` whatever its labels.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn label_set_matches(have: &str, want: &str) -> bool {
    let want: Vec<&str> = want.split(',').filter(|s| !s.is_empty()).collect();
    let have: Vec<&str> = have.split(',').filter(|s| !s.is_empty()).collect();
    want.len() == have.len() && want.iter().all(|w| have.contains(w))
}

/// Runs `promtool check metrics` on `text` when promtool is installed. Returns `Ok(false)` when it
/// is not (and `RELAY_REQUIRE_PROMTOOL` is unset), so the README's test command runs anywhere while
/// CI, which installs promtool, fails without it.
pub fn promtool_check(text: &str) -> Result<bool> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var_os("RELAY_REQUIRE_PROMTOOL").is_some() {
                bail!("promtool is required (RELAY_REQUIRE_PROMTOOL) but not installed");
            }
            eprintln!("promtool not installed: skipping `promtool check metrics`");
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_values() {
        let t = "# HELP x y\nx_total{reason=\"a\",kind=\"b\"} 3\nx_total{reason=\"c\"} 4\ny 2.5\n";
        assert_eq!(super::value(t, "x_total", "kind=\"b\",reason=\"a\""), 3.0);
        assert_eq!(super::value(t, "y", ""), 2.5);
        assert_eq!(super::value(t, "x_total", "reason=\"z\""), 0.0);
        assert_eq!(super::sum(t, "x_total"), 7.0);
    }
}
