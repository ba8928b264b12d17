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

    /// How many of `needles` occur in what was recorded at `points`, each point's records joined
    /// in order into one byte string (so a needle split across two reads is still found).
    pub fn count_found(&self, points: &[TapPoint], needles: &[&[u8]]) -> usize {
        let Ok(r) = self.records.lock() else {
            return 0;
        };
        let joined: Vec<Vec<u8>> = points
            .iter()
            .map(|point| {
                let mut all = Vec::new();
                for (_, b) in r.iter().filter(|(p, _)| p == point) {
                    all.extend_from_slice(b);
                }
                all
            })
            .collect();
        needles
            .iter()
            .filter(|n| {
                let f = memchr::memmem::Finder::new(n);
                joined.iter().any(|j| f.find(j).is_some())
            })
            .count()
    }

    /// Bytes recorded at `point`.
    pub fn bytes_at(&self, point: TapPoint) -> usize {
        self.records
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(p, _)| *p == point)
                    .map(|(_, b)| b.len())
                    .sum()
            })
            .unwrap_or(0)
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
