//! Records every byte the gateway receives and sends, through its `FrameTap` hook: frames from
//! and to devices, and the payloads of its QUIC uplink (datagrams and control-stream bytes).

use std::sync::Mutex;

use gateway::{FrameTap, TapPoint};

/// Everything the gateway handled, in order, per tap point.
#[derive(Debug, Default)]
pub struct Recorder {
    records: Mutex<Vec<(TapPoint, Vec<u8>)>>,
}

impl FrameTap for Recorder {
    fn record(&self, point: TapPoint, bytes: &[u8]) {
        if let Ok(mut r) = self.records.lock() {
            r.push((point, bytes.to_vec()));
        }
    }
}

impl Recorder {
    /// How many records at `point`.
    pub fn count(&self, point: TapPoint) -> usize {
        self.records
            .lock()
            .map(|r| r.iter().filter(|(p, _)| *p == point).count())
            .unwrap_or(0)
    }

    /// Total bytes recorded.
    pub fn bytes(&self) -> usize {
        self.records
            .lock()
            .map(|r| r.iter().map(|(_, b)| b.len()).sum())
            .unwrap_or(0)
    }

    /// Whether `needle` occurs anywhere in what was recorded.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.records
            .lock()
            .map(|r| {
                r.iter()
                    .any(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
            })
            .unwrap_or(false)
    }

    /// The distinct core-side session ids of the admitted transport frames recorded at `point`.
    pub fn admitted_sessions(&self, point: TapPoint) -> Vec<relay_protocol::SessionId> {
        let mut ids: Vec<_> = self
            .records
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(p, _)| *p == point)
                    .filter_map(|(_, b)| match relay_protocol::DeviceFrame::decode(b) {
                        Ok(f @ relay_protocol::DeviceFrame::AdmittedTransport { .. }) => {
                            f.receiver()
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        ids
    }
}
