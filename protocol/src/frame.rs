//! Device-link frames: what travels in one UDP datagram between a device and a gateway (or the
//! core's direct-access port), and unchanged inside the uplink.
//!
//! Layout (all integers big-endian), see `docs/protocol.md` §3:
//!
//! ```text
//! HandshakeInit      = version:u8 = 1 | type:u8 = 1 | sender:u32   | noise (IK message 1)
//! HandshakeResponse  = version:u8 = 1 | type:u8 = 2 | receiver:u32 | sender:u32 | noise (IK message 2)
//! Transport          = version:u8 = 1 | type:u8 = 3 | receiver:u32 | counter:u64 | ciphertext
//! AdmittedTransport  = version:u8 = 1 | type:u8 = 4 | receiver:u32 | counter:u64 | ciphertext | tag:8
//! CookieReply        = version:u8 = 1 | type:u8 = 5 | receiver:u32 | nonce:24 | sealed cookie:32
//! CookieInit         = version:u8 = 1 | type:u8 = 6 | sender:u32   | noise (IK message 1) | mac:16
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

/// The admission tag that ends an `AdmittedTransport` frame (`docs/protocol.md` §12).
pub const ADMISSION_TAG_LEN: usize = crate::admission::TAG_LEN;
/// The cookie MAC that ends a `CookieInit` frame.
pub const COOKIE_MAC_LEN: usize = 16;
/// The cookie reply's XChaCha20 nonce.
pub const COOKIE_NONCE_LEN: usize = 24;
/// The cookie reply's sealed cookie: 16 bytes of cookie and a 16-byte tag.
pub const COOKIE_SEALED_LEN: usize = 32;
/// A `CookieReply` frame is always this long.
pub const COOKIE_REPLY_LEN: usize = 6 + COOKIE_NONCE_LEN + COOKIE_SEALED_LEN;

/// The largest plaintext a transport frame can carry (the admitted form: its tag included).
pub const MAX_TRANSPORT_PLAINTEXT: usize =
    MAX_DATAGRAM - TRANSPORT_HEADER - TAG_LEN - ADMISSION_TAG_LEN;

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
    /// Device to core: a transport message tagged with the session's admission key.
    AdmittedTransport = 4,
    /// Core to device: the core is under load; echo this cookie.
    CookieReply = 5,
    /// Device to core: a handshake initiation re-sent with the cookie's MAC.
    CookieInit = 6,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::HandshakeInit),
            2 => Some(Self::HandshakeResponse),
            3 => Some(Self::Transport),
            4 => Some(Self::AdmittedTransport),
            5 => Some(Self::CookieReply),
            6 => Some(Self::CookieInit),
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
    /// A device's transport message with the admission tag a gateway checks.
    AdmittedTransport {
        /// The core's session id.
        receiver: SessionId,
        /// The explicit nonce.
        counter: u64,
        /// Ciphertext and AEAD tag, opaque; the admission tag is not part of it.
        ciphertext: &'a [u8],
        /// SipHash-2-4 under the admission key of every byte before it.
        tag: [u8; ADMISSION_TAG_LEN],
    },
    /// The core's answer to an initiation while it is under load: a cookie sealed for the device.
    CookieReply {
        /// The `sender` of the initiation being answered.
        receiver: SessionId,
        /// The XChaCha20-Poly1305 nonce.
        nonce: &'a [u8; COOKIE_NONCE_LEN],
        /// The cookie, sealed.
        sealed: &'a [u8; COOKIE_SEALED_LEN],
    },
    /// A handshake initiation carrying the MAC of the cookie the core sent.
    CookieInit {
        /// As in `HandshakeInit`.
        sender: SessionId,
        /// The Noise message, opaque; the MAC is not part of it.
        noise: &'a [u8],
        /// Keyed BLAKE2s-128 under the cookie of every byte before it.
        mac: [u8; COOKIE_MAC_LEN],
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
            FrameType::AdmittedTransport => {
                let (receiver, rest) = split_u32(rest)?;
                let (counter, rest) = split_u64(rest)?;
                let (ciphertext, tag) = split_tail::<ADMISSION_TAG_LEN>(rest)?;
                if ciphertext.len() < TAG_LEN {
                    return Err(DecodeError::Truncated);
                }
                Ok(Self::AdmittedTransport {
                    receiver: SessionId(receiver),
                    counter,
                    ciphertext,
                    tag: *tag,
                })
            }
            FrameType::CookieReply => {
                let (receiver, rest) = split_u32(rest)?;
                if rest.len() > COOKIE_NONCE_LEN + COOKIE_SEALED_LEN {
                    return Err(DecodeError::Invalid("cookie reply: trailing bytes"));
                }
                let (nonce, sealed) = rest
                    .split_first_chunk::<COOKIE_NONCE_LEN>()
                    .ok_or(DecodeError::Truncated)?;
                let sealed: &[u8; COOKIE_SEALED_LEN] =
                    sealed.try_into().map_err(|_| DecodeError::Truncated)?;
                Ok(Self::CookieReply {
                    receiver: SessionId(receiver),
                    nonce,
                    sealed,
                })
            }
            FrameType::CookieInit => {
                let (sender, rest) = split_u32(rest)?;
                let (noise, mac) = split_tail::<COOKIE_MAC_LEN>(rest)?;
                if noise.len() < MIN_NOISE_INIT {
                    return Err(DecodeError::Truncated);
                }
                Ok(Self::CookieInit {
                    sender: SessionId(sender),
                    noise,
                    mac: *mac,
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
            Self::AdmittedTransport { .. } => FrameType::AdmittedTransport,
            Self::CookieReply { .. } => FrameType::CookieReply,
            Self::CookieInit { .. } => FrameType::CookieInit,
        }
    }

    /// The session id the frame is addressed to, for frames that carry one (transport frames of
    /// either form): what a gateway filters on.
    pub fn receiver(&self) -> Option<SessionId> {
        match self {
            Self::Transport { receiver, .. } | Self::AdmittedTransport { receiver, .. } => {
                Some(*receiver)
            }
            _ => None,
        }
    }

    /// The encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::HandshakeInit { noise, .. } => HANDSHAKE_INIT_HEADER + noise.len(),
            Self::HandshakeResponse { noise, .. } => HANDSHAKE_RESPONSE_HEADER + noise.len(),
            Self::Transport { ciphertext, .. } => TRANSPORT_HEADER + ciphertext.len(),
            Self::AdmittedTransport { ciphertext, .. } => {
                TRANSPORT_HEADER + ciphertext.len() + ADMISSION_TAG_LEN
            }
            Self::CookieReply { .. } => COOKIE_REPLY_LEN,
            Self::CookieInit { noise, .. } => HANDSHAKE_INIT_HEADER + noise.len() + COOKIE_MAC_LEN,
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
            Self::AdmittedTransport {
                receiver,
                counter,
                ciphertext,
                tag,
            } => {
                buf.put_u32(receiver.0);
                buf.put_u64(*counter);
                buf.put_slice(ciphertext);
                buf.put_slice(tag);
            }
            Self::CookieReply {
                receiver,
                nonce,
                sealed,
            } => {
                buf.put_u32(receiver.0);
                buf.put_slice(&nonce[..]);
                buf.put_slice(&sealed[..]);
            }
            Self::CookieInit { sender, noise, mac } => {
                buf.put_u32(sender.0);
                buf.put_slice(noise);
                buf.put_slice(mac);
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

/// Splits the last `N` bytes off `b`.
pub(crate) fn split_tail<const N: usize>(b: &[u8]) -> Result<(&[u8], &[u8; N]), DecodeError> {
    let (head, tail) = b.split_last_chunk::<N>().ok_or(DecodeError::Truncated)?;
    Ok((head, tail))
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

    #[test]
    fn admitted_transport_round_trip_and_bounds() {
        let ct = [0xAB; 16];
        let f = DeviceFrame::AdmittedTransport {
            receiver: SessionId(7),
            counter: 3,
            ciphertext: &ct,
            tag: [9; 8],
        };
        let bytes = f.to_vec();
        assert_eq!(bytes.len(), 14 + 16 + 8);
        assert_eq!(bytes.len(), f.encoded_len());
        assert_eq!(DeviceFrame::decode(&bytes), Ok(f));
        assert_eq!(f.receiver(), Some(SessionId(7)));
        // One byte short of a ciphertext tag plus the admission tag.
        assert_eq!(
            DeviceFrame::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn cookie_frames_round_trip_and_bounds() {
        let nonce = [1u8; COOKIE_NONCE_LEN];
        let sealed = [2u8; COOKIE_SEALED_LEN];
        let reply = DeviceFrame::CookieReply {
            receiver: SessionId(5),
            nonce: &nonce,
            sealed: &sealed,
        };
        let bytes = reply.to_vec();
        assert_eq!(bytes.len(), COOKIE_REPLY_LEN);
        assert_eq!(DeviceFrame::decode(&bytes), Ok(reply));
        assert_eq!(
            DeviceFrame::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut long = bytes.clone();
        long.push(0);
        assert!(DeviceFrame::decode(&long).is_err());

        let noise = [3u8; MIN_NOISE_INIT];
        let init = DeviceFrame::CookieInit {
            sender: SessionId(6),
            noise: &noise,
            mac: [4; COOKIE_MAC_LEN],
        };
        let bytes = init.to_vec();
        assert_eq!(bytes.len(), 6 + MIN_NOISE_INIT + 16);
        assert_eq!(DeviceFrame::decode(&bytes), Ok(init));
        assert_eq!(
            DeviceFrame::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated)
        );
    }
}
