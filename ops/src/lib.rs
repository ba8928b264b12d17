//! `relay-ops`: the operational surface shared by the gateway and the core.
//!
//! - [`admin`]: a small HTTP/1.1 server for `/metrics` (Prometheus text format), `/live` and
//!   `/ready`, plus optional extra routes a daemon adds (bounded requests, one per connection).
//! - [`client`]: the bounded HTTP/1.1 client every admin caller uses (CLIs, health checks,
//!   bench, tests).
//! - [`telemetry`]: tracing set-up with the filter from `RUST_LOG` and the format (`plain` or
//!   `json`) from `LOG_FORMAT`.
//! - [`udp`]: UDP sockets bound with burst-sized kernel buffers.
//! - [`build_info`]: the `*_build_info` gauge every daemon exports.
//!
//! It deliberately knows nothing about devices, sessions or keys.
//!
//! ```text
//!  Prometheus ──GET /metrics──▶ admin::serve ──▶ prometheus::Registry (the daemon's metrics.rs)
//!  orchestrator ──GET /ready──▶ admin::serve ──▶ Readiness flag (set by the daemon)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod client;
pub mod lane;
pub mod telemetry;
pub mod udp;

use prometheus::{IntGaugeVec, Opts, Registry};

/// Registers `<prefix>_build_info{version="…"} 1` in `registry`.
pub fn build_info(registry: &Registry, prefix: &str, version: &str) -> prometheus::Result<()> {
    let gauge = IntGaugeVec::new(
        Opts::new(
            format!("{prefix}_build_info"),
            "Build information; the value is always 1.",
        ),
        &["version"],
    )?;
    gauge.with_label_values(&[version]).set(1);
    registry.register(Box::new(gauge))
}
