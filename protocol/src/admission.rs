//! Relay-assisted admission: the per-session key the core hands both the device (inside the
//! session) and the gateway (over the authenticated uplink), the short tag it puts on every device
//! frame, and the quota the gateway holds the session to. `docs/protocol.md` §12.
//!
//! ```text
//! AdmittedTransport = version:u8 = 1 | type:u8 = 4 | receiver:u32 | counter:u64 | ciphertext | tag:8
//! tag               = SipHash-2-4(admission key, every byte before the tag), as u64 little-endian
//! admission         = session:u32 | key:16 | lifetime_secs:u32 | quota_frames:u32
//!                     | quota_bytes:u32 | quota_interval_secs:u16                       (34 bytes)
//! ```
//!
//! The key is 16 random bytes the core draws for each session, independent of the end-to-end
//! keys: knowing it lets the gateway check that a frame came from whoever holds the session, and
//! nothing more. It opens no ciphertext and names no device. Built without the `session` feature:
//! the gateway links this module and no end-to-end crypto.

use bytes::BufMut;
use siphasher::sip::SipHasher24;

use crate::frame::{split_u32, SessionId};
use crate::DecodeError;

/// Bytes of the admission tag at the end of an `AdmittedTransport` frame.
pub const TAG_LEN: usize = 8;
/// Bytes of an admission key.
pub const KEY_LEN: usize = 16;

/// A session's admission key. Its `Debug` output never shows the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AdmissionKey(pub [u8; KEY_LEN]);

impl std::fmt::Debug for AdmissionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionKey(..)")
    }
}

impl AdmissionKey {
    /// The tag of `signed` (the frame's bytes before the tag).
    pub fn tag(&self, signed: &[u8]) -> [u8; TAG_LEN] {
        SipHasher24::new_with_key(&self.0)
            .hash(signed)
            .to_le_bytes()
    }

    /// Whether `frame`, a whole `AdmittedTransport` datagram, ends with the right tag. Compares
    /// in constant time; a frame too short to hold a tag fails.
    pub fn verify(&self, frame: &[u8]) -> bool {
        let Some(split) = frame.len().checked_sub(TAG_LEN) else {
            return false;
        };
        let (signed, tag) = frame.split_at(split);
        let expected = self.tag(signed);
        tag.iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// What a session may send through a gateway per interval. A zero field is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Quota {
    /// Frames per interval.
    pub frames: u32,
    /// Bytes of device frames per interval.
    pub bytes: u32,
    /// The interval in seconds (0: the quota is unlimited).
    pub interval_secs: u16,
}

impl Quota {
    /// No limit at all.
    pub fn is_unlimited(&self) -> bool {
        self.interval_secs == 0 || (self.frames == 0 && self.bytes == 0)
    }
}

/// One admitted session, as the core tells a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The core's session id: the `receiver` of the device's frames.
    pub session: SessionId,
    /// The key the device tags its frames with.
    pub key: AdmissionKey,
    /// Seconds from now until the core stops serving the session.
    pub lifetime_secs: u32,
    /// What the session may send.
    pub quota: Quota,
}

impl Admission {
    /// The encoded length.
    pub const ENCODED_LEN: usize = 4 + KEY_LEN + 4 + 4 + 4 + 2;

    /// Appends the 34-byte encoding.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.session.0);
        buf.put_slice(&self.key.0);
        buf.put_u32(self.lifetime_secs);
        buf.put_u32(self.quota.frames);
        buf.put_u32(self.quota.bytes);
        buf.put_u16(self.quota.interval_secs);
    }

    /// Parses exactly [`Admission::ENCODED_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < Self::ENCODED_LEN {
            return Err(DecodeError::Truncated);
        }
        if b.len() > Self::ENCODED_LEN {
            return Err(DecodeError::Invalid("admission: trailing bytes"));
        }
        let (session, rest) = split_u32(b)?;
        let (key, rest) = rest.split_at(KEY_LEN);
        let (lifetime_secs, rest) = split_u32(rest)?;
        let (frames, rest) = split_u32(rest)?;
        let (bytes, rest) = split_u32(rest)?;
        let [i0, i1] = rest else {
            return Err(DecodeError::Truncated);
        };
        if session == 0 {
            return Err(DecodeError::Invalid("admission: session id 0"));
        }
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(key);
        Ok(Self {
            session: SessionId(session),
            key: AdmissionKey(k),
            lifetime_secs,
            quota: Quota {
                frames,
                bytes,
                interval_secs: u16::from_be_bytes([*i0, *i1]),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_siphash_2_4_of_the_reference_vector() {
        // The SipHash paper's test vector: key 00..0f, message 00..0e, output a129ca6149be45e5.
        let key = AdmissionKey(std::array::from_fn(|i| i as u8));
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(u64::from_le_bytes(key.tag(&msg)), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn verify_accepts_the_tagged_frame_and_nothing_altered() {
        let key = AdmissionKey([7; 16]);
        let mut frame = vec![1, 4, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1];
        frame.extend_from_slice(&[0xaa; 20]);
        let tag = key.tag(&frame);
        frame.extend_from_slice(&tag);
        assert!(key.verify(&frame));
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 1;
            assert!(!key.verify(&bad), "flip at {i} passed");
        }
        assert!(!AdmissionKey([8; 16]).verify(&frame));
        assert!(!key.verify(&frame[..7]));
        assert!(!key.verify(&[]));
    }

    #[test]
    fn admission_round_trips_and_rejects_bad_lengths() {
        let a = Admission {
            session: SessionId(0x0102_0304),
            key: AdmissionKey([3; 16]),
            lifetime_secs: 7200,
            quota: Quota {
                frames: 600,
                bytes: 60_000,
                interval_secs: 60,
            },
        };
        let mut buf = Vec::new();
        a.encode(&mut buf);
        assert_eq!(buf.len(), Admission::ENCODED_LEN);
        assert_eq!(Admission::decode(&buf), Ok(a));
        assert_eq!(Admission::decode(&buf[..33]), Err(DecodeError::Truncated));
        buf.push(0);
        assert!(Admission::decode(&buf).is_err());
        assert!(format!("{a:?}").contains("AdmissionKey(..)"));
    }

    #[test]
    fn zero_quota_fields_mean_unlimited() {
        assert!(Quota::default().is_unlimited());
        assert!(!Quota {
            frames: 1,
            bytes: 0,
            interval_secs: 1
        }
        .is_unlimited());
    }
}
