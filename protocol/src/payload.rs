//! The plaintexts inside the Noise messages (`docs/protocol.md` §4). Only the two session
//! endpoints ever see these bytes.
//!
//! ```text
//! InitPayload      = version:u8 = 1 | timestamp:u64
//! ResponsePayload  = version:u8 = 1 | rekey_after_secs:u32
//! Message          = type:u8 | body
//!   0x01 Reading   body = seq:u64 | data (0..=MAX_READING bytes)
//!   0x02 Ack       body = count:u8 (1..=MAX_ACKS) | seq:u64 × count
//!   0x03 Keepalive body = (empty)
//! ```

use bytes::BufMut;

use crate::frame::{split_u32, split_u64, MAX_TRANSPORT_PLAINTEXT};
use crate::DecodeError;

/// The version byte of the handshake payloads.
pub const PAYLOAD_VERSION: u8 = 1;

/// Length of [`InitPayload`] on the wire.
pub const INIT_PAYLOAD_LEN: usize = 9;
/// Length of [`ResponsePayload`] on the wire.
pub const RESPONSE_PAYLOAD_LEN: usize = 5;

/// Bytes a reading adds in front of its data inside the plaintext.
pub const READING_HEADER: usize = 9;
/// The largest reading body that fits in one transport frame.
pub const MAX_READING: usize = MAX_TRANSPORT_PLAINTEXT - READING_HEADER;
/// The most sequence numbers one acknowledgement carries.
pub const MAX_ACKS: usize = 64;

/// Inside Noise message 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitPayload {
    /// Strictly increasing across a device's handshakes (milliseconds since the Unix epoch for a
    /// device with a clock): the core refuses an initiation not newer than the last it accepted
    /// from the same key, so a recorded initiation cannot be replayed.
    pub timestamp: u64,
}

impl InitPayload {
    /// Appends the payload.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(PAYLOAD_VERSION);
        buf.put_u64(self.timestamp);
    }

    /// Parses the payload; trailing bytes are refused.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let rest = version(b)?;
        let (timestamp, rest) = split_u64(rest)?;
        no_trailing(rest)?;
        Ok(Self { timestamp })
    }
}

/// Inside Noise message 2: the session policy the core sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponsePayload {
    /// After this many seconds the device starts a new handshake; the core refuses the session's
    /// frames some time later (`docs/protocol.md` §6.4).
    pub rekey_after_secs: u32,
}

impl ResponsePayload {
    /// Appends the payload.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(PAYLOAD_VERSION);
        buf.put_u32(self.rekey_after_secs);
    }

    /// Parses the payload; trailing bytes are refused.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let rest = version(b)?;
        let (rekey_after_secs, rest) = split_u32(rest)?;
        no_trailing(rest)?;
        Ok(Self { rekey_after_secs })
    }
}

/// A reading's sequence number: unique per device for the device's whole life. The core stores a
/// reading once per `(device, seq)` and acknowledges duplicates without storing them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadingSeq(pub u64);

const MSG_READING: u8 = 0x01;
const MSG_ACK: u8 = 0x02;
const MSG_KEEPALIVE: u8 = 0x03;

/// One message in a transport frame's plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Device to core: a reading to store.
    Reading {
        /// The reading's sequence number.
        seq: ReadingSeq,
        /// The reading itself, opaque to the protocol.
        data: &'a [u8],
    },
    /// Core to device: these readings are durably stored.
    Ack {
        /// Between 1 and [`MAX_ACKS`] sequence numbers.
        seqs: Vec<ReadingSeq>,
    },
    /// Either way: nothing but proof of life.
    Keepalive,
}

impl<'a> Message<'a> {
    /// Appends the message. An `Ack` with more than [`MAX_ACKS`] entries carries the first ones
    /// only; callers split long lists.
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Self::Reading { seq, data } => {
                buf.put_u8(MSG_READING);
                buf.put_u64(seq.0);
                buf.put_slice(data);
            }
            Self::Ack { seqs } => {
                let n = seqs.len().min(MAX_ACKS);
                buf.put_u8(MSG_ACK);
                buf.put_u8(n as u8);
                for s in &seqs[..n] {
                    buf.put_u64(s.0);
                }
            }
            Self::Keepalive => buf.put_u8(MSG_KEEPALIVE),
        }
    }

    /// The message as a fresh byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Parses one decrypted plaintext.
    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        let (&kind, body) = b.split_first().ok_or(DecodeError::Truncated)?;
        match kind {
            MSG_READING => {
                let (seq, data) = split_u64(body)?;
                if data.len() > MAX_READING {
                    return Err(DecodeError::Oversized {
                        len: data.len(),
                        max: MAX_READING,
                    });
                }
                Ok(Self::Reading {
                    seq: ReadingSeq(seq),
                    data,
                })
            }
            MSG_ACK => {
                let (&n, mut rest) = body.split_first().ok_or(DecodeError::Truncated)?;
                let n = n as usize;
                if n == 0 || n > MAX_ACKS {
                    return Err(DecodeError::Invalid("ack count"));
                }
                let mut seqs = Vec::with_capacity(n);
                for _ in 0..n {
                    let (s, r) = split_u64(rest)?;
                    seqs.push(ReadingSeq(s));
                    rest = r;
                }
                no_trailing(rest)?;
                Ok(Self::Ack { seqs })
            }
            MSG_KEEPALIVE => {
                no_trailing(body)?;
                Ok(Self::Keepalive)
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

fn version(b: &[u8]) -> Result<&[u8], DecodeError> {
    let (&v, rest) = b.split_first().ok_or(DecodeError::Truncated)?;
    if v != PAYLOAD_VERSION {
        return Err(DecodeError::UnknownVersion(v));
    }
    Ok(rest)
}

fn no_trailing(rest: &[u8]) -> Result<(), DecodeError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Invalid("trailing bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reading_round_trip(seq in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..MAX_READING)) {
            let m = Message::Reading { seq: ReadingSeq(seq), data: &data };
            let bytes = m.to_vec();
            prop_assert!(bytes.len() <= MAX_TRANSPORT_PLAINTEXT);
            prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn ack_round_trip(seqs in proptest::collection::vec(any::<u64>(), 1..=MAX_ACKS)) {
            let m = Message::Ack { seqs: seqs.into_iter().map(ReadingSeq).collect() };
            let bytes = m.to_vec();
            prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn handshake_payloads_round_trip(ts in any::<u64>(), secs in any::<u32>()) {
            let mut b = Vec::new();
            InitPayload { timestamp: ts }.encode(&mut b);
            prop_assert_eq!(b.len(), INIT_PAYLOAD_LEN);
            prop_assert_eq!(InitPayload::decode(&b).unwrap().timestamp, ts);
            let mut b = Vec::new();
            ResponsePayload { rekey_after_secs: secs }.encode(&mut b);
            prop_assert_eq!(b.len(), RESPONSE_PAYLOAD_LEN);
            prop_assert_eq!(ResponsePayload::decode(&b).unwrap().rekey_after_secs, secs);
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = Message::decode(&b);
            let _ = InitPayload::decode(&b);
            let _ = ResponsePayload::decode(&b);
        }
    }

    #[test]
    fn bad_messages_are_refused() {
        assert_eq!(Message::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(Message::decode(&[9]), Err(DecodeError::UnknownType(9)));
        assert!(Message::decode(&[MSG_ACK, 0]).is_err());
        assert!(Message::decode(&[MSG_ACK, 2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(Message::decode(&[MSG_KEEPALIVE, 0]).is_err());
        assert_eq!(
            InitPayload::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownVersion(2))
        );
    }
}
