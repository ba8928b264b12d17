//! Direct access (R14): devices that reach the core without a gateway send the same device frames
//! over plain UDP. Each datagram goes to the engine with the sender's address as its route; the
//! engine answers through the same socket. A device holding an admission key tags its frames here
//! too (`AdmittedTransport`): the engine takes them like plain transport frames, since the AEAD
//! authenticates them and no gateway stands in between. Under load, initiations are answered with
//! a cookie bound to the sender's address (`docs/protocol.md` §12.6).

use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineInput, Route};
use crate::metrics::{Access, Metrics};

/// Larger than any valid frame, so an oversized datagram is seen (and counted) as oversized.
const RECV_BUFFER: usize = 2048;

/// Receives datagrams until `shutdown`. Waiting on a full engine queue is the backpressure: the
/// kernel's socket buffer fills and drops, not this process's memory.
pub(crate) async fn serve(
    socket: Arc<UdpSocket>,
    engine: mpsc::Sender<EngineInput>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, from) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier sends surface here on some systems; not fatal.
                tracing::debug!(error = %e, "direct receive failed");
                continue;
            }
        };
        metrics.frame_received(Access::Direct);
        let input = EngineInput::Frame {
            bytes: Bytes::copy_from_slice(&buf[..n]),
            route: Route::Direct(from),
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = engine.send(input) => if r.is_err() { break },
        }
    }
    tracing::debug!("direct listener stopped");
}
