//! Real devices' handshakes under a flood of forged ones: `device-sim flood` (forged
//! `HandshakeInit`s from thousands of loopback addresses, through the gateway, several times the
//! core's handshake rate) on a blocking thread, and meanwhile fresh registered devices, started
//! evenly over a spread, each doing one handshake through the gateway the way a meter does
//! (echoing a cookie challenge at once, retrying after a silence).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use relay_protocol::session::PublicKey;
use tokio::net::UdpSocket;

use super::idle::{one_session, SessionResult};
use super::BenchError;
use crate::config::DeviceIdentity;
use crate::flood::{run_flood, AttackReport, FloodOptions};

/// What happened.
#[derive(Debug)]
pub(super) struct UnderFlood {
    /// What the flood sent.
    pub flood: AttackReport,
    /// One per real device.
    pub devices: Vec<SessionResult>,
}

/// Runs `flood` and, from `start_after` into it, one handshake per device through `gateway`,
/// the devices' starts spread evenly over `spread`.
pub(super) async fn handshakes_under_flood(
    devices: Vec<DeviceIdentity>,
    core: PublicKey,
    gateway: SocketAddr,
    flood: FloodOptions,
    start_after: Duration,
    spread: Duration,
) -> Result<UnderFlood, BenchError> {
    let flooding = tokio::task::spawn_blocking(move || run_flood(&flood));
    let start = Instant::now() + start_after;
    let n = devices.len().max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, device) in devices.into_iter().enumerate() {
        let at = start + spread.mul_f64(i as f64 / n as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            match UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await {
                Ok(socket) => one_session(device, core, socket, gateway).await,
                Err(_) => SessionResult::default(),
            }
        });
    }
    let mut results = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.map_err(|e| BenchError::Daemon(format!("device task: {e}")))?);
    }
    let flood = flooding
        .await
        .map_err(|e| BenchError::Daemon(format!("flood thread: {e}")))??;
    Ok(UnderFlood {
        flood,
        devices: results,
    })
}
