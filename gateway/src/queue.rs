//! The bounded queue of device frames held while the uplink is down.
//!
//! Owned by the device-link task alone. Past its capacity the newest frame is refused (the caller
//! counts it as `queue_full`): the frames already held are older and closer to their device's
//! retransmission, and keeping them preserves order.

use std::collections::VecDeque;

use bytes::Bytes;
use relay_protocol::FlowId;

/// One device frame, already encoded as an uplink datagram.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    /// The frame's flow (also inside `datagram`), for the control-stream fallback.
    pub flow: FlowId,
    /// `UplinkDatagram { flow, frame }`, encoded.
    pub datagram: Bytes,
}

/// A FIFO of at most `capacity` frames.
#[derive(Debug)]
pub(crate) struct PendingQueue {
    frames: VecDeque<Pending>,
    capacity: usize,
}

impl PendingQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            capacity,
        }
    }

    /// Appends `frame`, or hands it back when the queue is full.
    pub fn push(&mut self, frame: Pending) -> Result<(), Pending> {
        if self.frames.len() >= self.capacity {
            return Err(frame);
        }
        self.frames.push_back(frame);
        Ok(())
    }

    /// Puts back a frame taken with [`pop`](Self::pop) that could not be sent.
    pub fn unpop(&mut self, frame: Pending) {
        self.frames.push_front(frame);
    }

    pub fn pop(&mut self) -> Option<Pending> {
        self.frames.pop_front()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Pending {
        Pending {
            flow: FlowId(u32::from(n)),
            datagram: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn keeps_order_and_refuses_the_newest_when_full() {
        let mut q = PendingQueue::new(2);
        assert!(q.push(frame(1)).is_ok());
        assert!(q.push(frame(2)).is_ok());
        assert_eq!(q.push(frame(3)).map_err(|f| f.flow), Err(FlowId(3)));
        let first = q.pop().expect("one");
        q.unpop(first);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().map(|f| f.flow), Some(FlowId(1)));
        assert_eq!(q.pop().map(|f| f.flow), Some(FlowId(2)));
        assert!(q.pop().is_none());
        let mut none = PendingQueue::new(0);
        assert!(none.push(frame(1)).is_err());
    }
}
