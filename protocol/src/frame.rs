//! Device-link frames: what travels in one UDP datagram between a device and a gateway (or the
//! core's direct-access port), and unchanged inside the uplink.
//!
//! Layout (all integers big-endian), see `docs/protocol.md` §3:
//!
//! ```text
//! HandshakeInit      = version:u8 = 1 | type:u8 = 1 | sender:u32   | noise (IK message 1)
//! HandshakeResponse  = version:u8 = 1 | type:u8 = 2 | receiver:u32 | sender:u32 | noise (IK message 2)
//! Transport          = version:u8 = 1 | type:u8 = 3 | receiver:u32 | counter:u64 | ciphertext
//! ```
//!
//! The frame types are parsed here, never their contents: the noise bytes and ciphertext are opaque
//! to everyone but the two session endpoints.

use bytes::BufMut;

use crate::DecodeError;

/// The device-link protocol version carried in byte 0 of every frame.
pub const VERSION: u8 = 1;

/// The largest datagram on the device link, headers included.
pub const MAX_DATAGRAM: usize = 1200;

/// Bytes before the Noise message of a handshake initiation.
pub const HANDSHAKE_INIT_HEADER: usize = 6;
/// Bytes before the Noise message of a handshake response.
pub const HANDSHAKE_RESPONSE_HEADER: usize = 10;
/// Bytes before the ciphertext of a transport frame.
pub const TRANSPORT_HEADER: usize = 14;
/// The AEAD tag that ends every Noise message that carries a payload.
pub const TAG_LEN: usize = 16;

/// Smallest Noise IK message 1 (`e`, encrypted `s`, empty encrypted payload): 32 + 48 + 16.
pub const MIN_NOISE_INIT: usize = 96;
/// Smallest Noise IK message 2 (`e`, empty encrypted payload): 32 + 16.
pub const MIN_NOISE_RESPONSE: usize = 48;

/// The largest plaintext a transport frame can carry.
pub const MAX_TRANSPORT_PLAINTEXT: usize = MAX_DATAGRAM - TRANSPORT_HEADER - TAG_LEN;

/// A session id: the index a receiver chose for itself, so that it finds the session of an
/// incoming frame without trial decryption. It says nothing about the device's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u32);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The type byte of a device-link frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Device to core: Noise IK message 1.
    HandshakeInit = 1,
    /// Core to device: Noise IK message 2.
    HandshakeResponse = 2,
    /// Either way: a transport message of an established session.
    Transport = 3,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::HandshakeInit),
            2 => Some(Self::HandshakeResponse),
            3 => Some(Self::Transport),
            _ => None,
        }
    }
}

/// One device-link frame, borrowed from the datagram it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFrame<'a> {
    /// Noise IK message 1; `sender` is the device's own session id for the response.
    HandshakeInit {
        /// The id the device will recognise the response and later transport frames by.
        sender: SessionId,
        /// The Noise message, opaque.
        noise: &'a [u8],
    },
    /// Noise IK message 2.
    HandshakeResponse {
        /// The device's id from the initiation.
        receiver: SessionId,
        /// The core's id for the new session: every transport frame to the core carries it.
        sender: SessionId,
        /// The Noise message, opaque.
        noise: &'a [u8],
    },
    /// A transport message, sealed with the session's key and `counter` as nonce.
    Transport {
        /// The receiver's session id.
        receiver: SessionId,
        /// The explicit nonce; never reused by a sender within one session.
        counter: u64,
        /// Ciphertext and tag, opaque.
        ciphertext: &'a [u8],
    },
}

impl<'a> DeviceFrame<'a> {
    /// Parses one whole datagram. A datagram holds exactly one frame, so a short one is
    /// `Truncated`, never "incomplete".
    pub fn decode(datagram: &'a [u8]) -> Result<Self, DecodeError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(DecodeError::Oversized {
                len: datagram.len(),
                max: MAX_DATAGRAM,
            });
        }
        let [version, kind, rest @ ..] = datagram else {
            return Err(DecodeError::Truncated);
        };
        if *version != VERSION {
            return Err(DecodeError::UnknownVersion(*version));
        }
        let kind = FrameType::from_u8(*kind).ok_or(DecodeError::UnknownType(*kind))?;
        match kind {
            FrameType::HandshakeInit => {
                let (sender, noise) = split_u32(rest)?;
                if noise.len() < MIN_NOISE_INIT {
                    return Err(DecodeError::Truncated);
                }
                Ok(Self::HandshakeInit {
                    sender: SessionId(sender),
                    noise,
                })
            }
            FrameType::HandshakeResponse => {
                let (receiver, rest) = split_u32(rest)?;
                let (sender, noise) = split_u32(rest)?;
                if noise.len() < MIN_NOISE_RESPONSE {
                    return Err(DecodeError::Truncated);
                }
                Ok(Self::HandshakeResponse {
                    receiver: SessionId(receiver),
                    sender: SessionId(sender),
                    noise,
                })
            }
            FrameType::Transport => {
                let (receiver, rest) = split_u32(rest)?;
                let (counter, ciphertext) = split_u64(rest)?;
                if ciphertext.len() < TAG_LEN {
                    return Err(DecodeError::Truncated);
                }
                Ok(Self::Transport {
                    receiver: SessionId(receiver),
                    counter,
                    ciphertext,
                })
            }
        }
    }

    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::HandshakeInit { .. } => FrameType::HandshakeInit,
            Self::HandshakeResponse { .. } => FrameType::HandshakeResponse,
            Self::Transport { .. } => FrameType::Transport,
        }
    }

    /// The encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::HandshakeInit { noise, .. } => HANDSHAKE_INIT_HEADER + noise.len(),
            Self::HandshakeResponse { noise, .. } => HANDSHAKE_RESPONSE_HEADER + noise.len(),
            Self::Transport { ciphertext, .. } => TRANSPORT_HEADER + ciphertext.len(),
        }
    }

    /// Appends the frame to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(VERSION);
        buf.put_u8(self.frame_type() as u8);
        match self {
            Self::HandshakeInit { sender, noise } => {
                buf.put_u32(sender.0);
                buf.put_slice(noise);
            }
            Self::HandshakeResponse {
                receiver,
                sender,
                noise,
            } => {
                buf.put_u32(receiver.0);
                buf.put_u32(sender.0);
                buf.put_slice(noise);
            }
            Self::Transport {
                receiver,
                counter,
                ciphertext,
            } => {
                buf.put_u32(receiver.0);
                buf.put_u64(*counter);
                buf.put_slice(ciphertext);
            }
        }
    }

    /// The frame as a fresh byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }
}

pub(crate) fn split_u32(b: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    let (head, rest) = b.split_first_chunk::<4>().ok_or(DecodeError::Truncated)?;
    Ok((u32::from_be_bytes(*head), rest))
}

pub(crate) fn split_u64(b: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let (head, rest) = b.split_first_chunk::<8>().ok_or(DecodeError::Truncated)?;
    Ok((u64::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_by_reason() {
        assert_eq!(DeviceFrame::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(
            DeviceFrame::decode(&[2, 3]),
            Err(DecodeError::UnknownVersion(2))
        );
        assert_eq!(
            DeviceFrame::decode(&[1, 9]),
            Err(DecodeError::UnknownType(9))
        );
        assert_eq!(
            DeviceFrame::decode(&[1, 3, 0, 0, 0, 1]),
            Err(DecodeError::Truncated)
        );
        let big = vec![1u8; MAX_DATAGRAM + 1];
        assert!(matches!(
            DeviceFrame::decode(&big),
            Err(DecodeError::Oversized { .. })
        ));
        // A transport frame too short to hold a tag.
        let mut f = vec![1, 3, 0, 0, 0, 1];
        f.extend_from_slice(&7u64.to_be_bytes());
        f.extend_from_slice(&[0; TAG_LEN - 1]);
        assert_eq!(DeviceFrame::decode(&f), Err(DecodeError::Truncated));
    }

    #[test]
    fn transport_round_trip() {
        let ct = [0xAB; 40];
        let f = DeviceFrame::Transport {
            receiver: SessionId(0xdead_beef),
            counter: 42,
            ciphertext: &ct,
        };
        let bytes = f.to_vec();
        assert_eq!(bytes.len(), f.encoded_len());
        assert_eq!(&bytes[..6], &[1, 3, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(DeviceFrame::decode(&bytes), Ok(f));
    }
}
