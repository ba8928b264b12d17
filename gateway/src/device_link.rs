//! The device link: the UDP socket devices talk to, one frame per datagram, both directions.
//!
//! One task receives: it checks each datagram's frame header (version, type, length — all the
//! gateway can check without keys), maps the source address to a flow, and sends the frame up as
//! an uplink datagram, or holds it in the bounded queue while the uplink is down. A transport
//! frame addressed to a session the core revoked is dropped instead. The uplink task calls
//! [`DeviceLink::deliver`] for frames from the core, and fills the revoked set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::{DeviceFrame, FlowId, FrameType, UplinkDatagram};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::flows::FlowTable;
use crate::handshake_limit::{HandshakeLimiter, Verdict};
use crate::metrics::{Direction, DropReason, Metrics};
use crate::queue::{Pending, PendingQueue};
use crate::revoked::RevokedSessions;
use crate::tap::{Hooks, TapPoint};
use crate::uplink::{Link, LinkEvent, LinkSendError, Sent};

/// Uplink datagrams are encoded into chunks of this arena, so a frame costs no allocation of its
/// own (a chunk is reused once every datagram cut from it has been sent).
const ENCODE_ARENA: usize = 64 * 1024;

/// The device socket and the state both directions share.
#[derive(Debug)]
pub(crate) struct DeviceLink {
    pub socket: UdpSocket,
    pub flows: FlowTable,
    pub metrics: Metrics,
    pub hooks: Hooks,
    /// Sessions the core revoked: their frames stop here.
    pub revoked: RevokedSessions,
    /// Per-source limits on handshake initiations.
    pub handshakes: HandshakeLimiter,
}

/// The receive task's own state: the uplink (if up) and the queue.
struct Forwarder {
    link: Option<Link>,
    queue: PendingQueue,
    arena: BytesMut,
}

impl DeviceLink {
    /// Receives device datagrams until shutdown.
    pub async fn receive(
        self: Arc<Self>,
        mut events: mpsc::Receiver<LinkEvent>,
        queue_frames: usize,
        shutdown: CancellationToken,
    ) {
        let mut fwd = Forwarder {
            link: None,
            queue: PendingQueue::new(queue_frames),
            arena: BytesMut::new(),
        };
        // One byte more than the largest frame, so that an oversized datagram is seen as such
        // (the kernel truncates it to the buffer and reports the truncated length).
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(event) = events.recv() => match event {
                    LinkEvent::Up(link) => {
                        fwd.link = Some(link);
                        self.flush(&mut fwd).await;
                    }
                    LinkEvent::Down => fwd.link = None,
                },
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.on_datagram(buf.get(..n).unwrap_or(&[]), from, &mut fwd).await,
                    Err(e) => {
                        // Unconnected UDP sockets rarely fail; do not spin if one keeps failing.
                        tracing::warn!(error = %e, "device socket receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    }

    async fn on_datagram(&self, data: &[u8], from: SocketAddr, fwd: &mut Forwarder) {
        self.metrics.device_frames_received.inc();
        self.hooks.record(TapPoint::DeviceRx, data);
        let frame_type = match DeviceFrame::decode(data) {
            Ok(DeviceFrame::Transport { receiver, .. })
                if self.revoked.contains(receiver, Instant::now()) =>
            {
                self.metrics.drop_frame(DropReason::Revoked);
                return;
            }
            Ok(DeviceFrame::HandshakeInit { .. })
                if self.handshakes.check(from, Instant::now()) == Verdict::Drop =>
            {
                tracing::trace!(%from, "handshake over the source's rate");
                self.metrics.drop_frame(DropReason::HandshakeRate);
                return;
            }
            Ok(frame) => frame.frame_type(),
            Err(e) => {
                tracing::trace!(%from, error = %e, "dropped device datagram");
                self.metrics.drop_frame(DropReason::from_decode(&e));
                return;
            }
        };
        if frame_type == FrameType::HandshakeResponse {
            // Only the core answers handshakes.
            self.metrics.drop_frame(DropReason::UnexpectedType);
            return;
        }
        let flow = match self.flows.flow_for(from, Instant::now()) {
            Ok(assigned) => {
                self.metrics.flows.set(gauge(assigned.flows));
                assigned.flow
            }
            Err(e) => {
                tracing::debug!(%from, error = %e, "dropped device datagram");
                self.metrics.drop_frame(DropReason::FlowTableFull);
                return;
            }
        };
        let datagram = encode(&mut fwd.arena, flow, data);
        let pending = Pending { flow, datagram };
        match &fwd.link {
            Some(link) => match link.send(flow, pending.datagram, false, &self.hooks).await {
                Ok(Sent::Datagram) => self.metrics.forwarded(Direction::Uplink, data.len()),
                Ok(Sent::Stream) => {}
                Err(LinkSendError::Backpressure) => self.metrics.drop_frame(DropReason::QueueFull),
                Err(LinkSendError::Lost(datagram)) => {
                    fwd.link = None;
                    self.enqueue(fwd, Pending { flow, datagram });
                }
            },
            None => self.enqueue(fwd, pending),
        }
    }

    fn enqueue(&self, fwd: &mut Forwarder, pending: Pending) {
        if fwd.queue.push(pending).is_err() {
            self.metrics.drop_frame(DropReason::QueueFull);
        }
        self.metrics.queue_frames.set(gauge(fwd.queue.len()));
    }

    /// Sends what was queued while the uplink was down, oldest first, waiting for buffer space
    /// rather than letting the burst push its own oldest frames out.
    async fn flush(&self, fwd: &mut Forwarder) {
        let queued = fwd.queue.len();
        while let Some(link) = &fwd.link {
            let Some(pending) = fwd.queue.pop() else {
                break;
            };
            let len = pending
                .datagram
                .len()
                .saturating_sub(relay_protocol::uplink::DATAGRAM_HEADER);
            match link
                .send(pending.flow, pending.datagram, true, &self.hooks)
                .await
            {
                Ok(Sent::Datagram) => self.metrics.forwarded(Direction::Uplink, len),
                Ok(Sent::Stream) => {}
                Err(LinkSendError::Backpressure) => self.metrics.drop_frame(DropReason::QueueFull),
                Err(LinkSendError::Lost(datagram)) => {
                    fwd.queue.unpop(Pending {
                        flow: pending.flow,
                        datagram,
                    });
                    fwd.link = None;
                }
            }
        }
        self.metrics.queue_frames.set(gauge(fwd.queue.len()));
        if queued > 0 {
            tracing::info!(
                sent = queued - fwd.queue.len(),
                left = fwd.queue.len(),
                "flushed queued device frames"
            );
        }
    }

    /// Sends a frame from the core to the device of `flow`.
    pub async fn deliver(&self, flow: FlowId, frame: &[u8]) {
        // The core is trusted more than the field network, but the gateway still relays only
        // well-formed frames going the right way.
        match DeviceFrame::decode(frame).map(|f| f.frame_type()) {
            Ok(FrameType::HandshakeInit) => {
                self.metrics.drop_frame(DropReason::UnexpectedType);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%flow, error = %e, "undecodable device frame from the core");
                self.metrics.drop_frame(DropReason::UplinkDecode);
                return;
            }
        }
        let Some(addr) = self.flows.addr_of(flow) else {
            self.metrics.drop_frame(DropReason::UnknownFlow);
            return;
        };
        match self.socket.send_to(frame, addr).await {
            Ok(_) => {
                self.hooks.record(TapPoint::DeviceTx, frame);
                self.metrics.forwarded(Direction::Downlink, frame.len());
            }
            Err(e) => {
                tracing::debug!(%flow, error = %e, "send to device failed");
                self.metrics.drop_frame(DropReason::DeviceSend);
            }
        }
    }

    /// Forgets idle flows every `every` until shutdown.
    pub async fn expire_idle_flows(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.revoked.expire(Instant::now());
                    let (removed, left) = self.flows.expire_idle(Instant::now());
                    self.metrics.flows.set(gauge(left));
                    if removed > 0 {
                        tracing::debug!(removed, left, "expired idle flows");
                    }
                }
            }
        }
    }
}

/// Encodes `UplinkDatagram { flow, frame }` into the arena and cuts it off as its own `Bytes`.
fn encode(arena: &mut BytesMut, flow: FlowId, frame: &[u8]) -> Bytes {
    let datagram = UplinkDatagram { flow, frame };
    let len = datagram.encoded_len();
    if arena.capacity() < len {
        arena.reserve(ENCODE_ARENA.max(len));
    }
    datagram.encode(arena);
    debug_assert_eq!(arena.len(), len);
    arena.split().freeze()
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_datagrams_back_to_back_in_one_arena() {
        let mut arena = BytesMut::new();
        let a = encode(&mut arena, FlowId(1), &[1, 3, 9]);
        let b = encode(&mut arena, FlowId(2), &[1, 1, 8]);
        assert_eq!(&a[..], &[1, 1, 0, 0, 0, 1, 1, 3, 9]);
        let d = UplinkDatagram::decode(&b).expect("valid");
        assert_eq!((d.flow, d.frame), (FlowId(2), &[1u8, 1, 8][..]));
    }
}
