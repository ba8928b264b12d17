//! The stream transport (`docs/protocol.md` §13): large uploads (a camera's video) over TCP on the
//! device link and one QUIC stream per upload on the uplink, protected end to end in chunks of at
//! most 64 KiB under keys derived from the device's datagram session.
//!
//! ```text
//!  stream frame = length:u32 | frame                       1 ..= MAX_STREAM_FRAME
//!  first frame  = Transport / AdmittedTransport, plaintext StreamOpen (message 0x04)
//!  StreamData   = 0x01 | 0x07 | flags:u8 | index:u32 | ChaCha20-Poly1305(chunk)   device → core
//!  StreamAck    = 0x01 | 0x08 | index:u32 | ChaCha20-Poly1305(46 bytes)          core → device
//! ```
//!
//! Ordering, truncation and splicing are all caught by the AEAD: a chunk's index is its nonce, the
//! FINAL flag is in its associated data, and every connection has its own keys (a fresh salt), so
//! a chunk moved, dropped, cut short or taken from another stream fails to open or leaves the
//! upload without an authenticated FINAL chunk.
//!
//! The framing half ([`split_frame`], the constants) is always built: the gateway checks lengths
//! with it. The key-holding half needs the `session` feature.

use bytes::{Buf, BytesMut};

/// Bytes of the big-endian length that precedes every frame on a stream.
pub const LENGTH_PREFIX: usize = 4;
/// The largest chunk of upload data in one `StreamData` frame.
pub const MAX_CHUNK: usize = 65_536;
/// The smallest chunk size an upload may declare.
pub const MIN_CHUNK: usize = 1_024;
/// `StreamData` header: version, type, flags, index.
pub const DATA_HEADER: usize = 7;
/// `StreamAck` header: version, type, index.
pub const ACK_HEADER: usize = 6;
/// The AEAD tag that ends every sealed stream frame.
pub const TAG_LEN: usize = 16;
/// The largest frame on a stream (a full `StreamData` frame), without its length prefix.
pub const MAX_STREAM_FRAME: usize = DATA_HEADER + MAX_CHUNK + TAG_LEN;
/// The largest upload (1 TiB).
pub const MAX_TOTAL_SIZE: u64 = 1 << 40;
/// The plaintext of a `StreamAck`.
pub const ACK_PLAINTEXT: usize = 46;
/// A whole `StreamAck` frame, without its length prefix.
pub const ACK_FRAME: usize = ACK_HEADER + ACK_PLAINTEXT + TAG_LEN;
/// The longest metadata string in a `StreamOpen`.
pub const MAX_META: usize = 200;
/// What the gateway writes first on a QUIC stream it opens for a device stream: version 1, kind
/// `DeviceStream` (0x20).
pub const UPLINK_STREAM_HEADER: [u8; 2] = [0x01, 0x20];

/// Frame type of a `StreamData` frame (byte 1).
pub const TYPE_DATA: u8 = 0x07;
/// Frame type of a `StreamAck` frame (byte 1).
pub const TYPE_ACK: u8 = 0x08;
/// `StreamData` flag: the upload's last chunk.
pub const FLAG_FINAL: u8 = 0x01;

/// Why a stream frame was refused. Each ends the stream it arrived on, and only that stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A length prefix of 0 or over [`MAX_STREAM_FRAME`], or a chunk over the upload's size.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not the frame this position requires, or a field out of range.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The AEAD tag did not check: altered, spliced from another stream, or moved.
    #[error("authentication failed")]
    Authentication,
    /// A frame whose index is not the next one expected.
    #[error("out of order: expected {expected}, got {got}")]
    OutOfOrder {
        /// The index expected.
        expected: u32,
        /// The index received.
        got: u32,
    },
    /// The stream ran out of indexes.
    #[error("stream exhausted")]
    Exhausted,
}

impl StreamError {
    /// A short, fixed label for metrics (`reason="…"`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Authentication => "auth",
            Self::OutOfOrder { .. } => "order",
            Self::Exhausted => "exhausted",
        }
    }
}

/// Takes one whole frame (without its length prefix) off the front of `buf`, if `buf` holds one.
/// A bad length is refused as soon as its 4 bytes are in, before any of the body is buffered.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<BytesMut>, StreamError> {
    let Some(len) = peek_length(buf)? else {
        return Ok(None);
    };
    if buf.len() < LENGTH_PREFIX + len {
        return Ok(None);
    }
    buf.advance(LENGTH_PREFIX);
    Ok(Some(buf.split_to(len)))
}

/// The length of the frame at the front of `buf`, checked against [`MAX_STREAM_FRAME`]; `None`
/// while fewer than 4 bytes are buffered.
pub fn peek_length(buf: &[u8]) -> Result<Option<usize>, StreamError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Ok(None);
    };
    let mut len = [0u8; LENGTH_PREFIX];
    len.copy_from_slice(prefix);
    check_length(u32::from_be_bytes(len)).map(Some)
}

/// Checks a frame length read off the wire: `1..=MAX_STREAM_FRAME`.
pub fn check_length(len: u32) -> Result<usize, StreamError> {
    let len = len as usize;
    if len == 0 || len > MAX_STREAM_FRAME {
        return Err(StreamError::TooLarge(len));
    }
    Ok(len)
}

/// A frame's type byte (byte 1), if it has one.
pub fn frame_type(frame: &[u8]) -> Option<u8> {
    frame.get(1).copied()
}

/// Identifies one upload for its whole life: random, chosen by the device, the same on every
/// resume. Not secret; it names the upload's files at the core.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId(pub [u8; 16]);

impl UploadId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UploadId({})", self.to_hex())
    }
}

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(feature = "session")]
pub use keyed::*;

#[cfg(feature = "session")]
mod keyed {
    use bytes::BufMut;
    use chacha20poly1305::aead::AeadInPlace;
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit};

    use super::*;
    use crate::DecodeError;

    const KEY_LEN: usize = 32;
    const VERSION: u8 = crate::frame::VERSION;
    /// The label mixed into every stream key.
    const KDF_LABEL: &[u8] = b"relay-stream/1";

    /// The fixed part of a `StreamOpen` after its type byte.
    const OPEN_FIXED: usize = 16 + 16 + 4 + 8 + 1;

    /// Device → core, the plaintext of the first frame on a stream (message type 0x04): which
    /// upload, how it is cut, and a fresh salt for this connection's keys.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct StreamOpen {
        /// Fresh random bytes for every connection: the stream keys differ on each.
        pub salt: [u8; 16],
        /// The upload, the same on every resume.
        pub upload: UploadId,
        /// Bytes per chunk (every chunk but the last), [`MIN_CHUNK`]`..=`[`MAX_CHUNK`].
        pub chunk_size: u32,
        /// The upload's whole size, `1..=`[`MAX_TOTAL_SIZE`].
        pub total_size: u64,
        /// What the device says about it (UTF-8, at most [`MAX_META`] bytes): stored, not
        /// interpreted.
        pub meta: String,
    }

    impl StreamOpen {
        /// Bytes of the encoding, without the message type.
        pub fn encoded_len(&self) -> usize {
            OPEN_FIXED + self.meta.len().min(MAX_META)
        }

        /// Appends the body (without the message type byte). Metadata past [`MAX_META`] bytes is
        /// cut at a character boundary.
        pub fn encode(&self, buf: &mut impl BufMut) {
            let mut end = self.meta.len().min(MAX_META);
            while !self.meta.is_char_boundary(end) {
                end -= 1;
            }
            buf.put_slice(&self.salt);
            buf.put_slice(&self.upload.0);
            buf.put_u32(self.chunk_size);
            buf.put_u64(self.total_size);
            buf.put_u8(end as u8);
            buf.put_slice(&self.meta.as_bytes()[..end]);
        }

        /// Parses the body (after the message type byte).
        pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
            if b.len() < OPEN_FIXED {
                return Err(DecodeError::Truncated);
            }
            let mut salt = [0u8; 16];
            salt.copy_from_slice(&b[..16]);
            let mut upload = [0u8; 16];
            upload.copy_from_slice(&b[16..32]);
            let mut rest = &b[32..];
            let chunk_size = rest.get_u32();
            let total_size = rest.get_u64();
            let meta_len = rest.get_u8() as usize;
            if !(MIN_CHUNK..=MAX_CHUNK).contains(&(chunk_size as usize)) {
                return Err(DecodeError::Invalid("chunk size"));
            }
            if total_size == 0 || total_size > MAX_TOTAL_SIZE {
                return Err(DecodeError::Invalid("total size"));
            }
            if meta_len > MAX_META {
                return Err(DecodeError::Invalid("metadata length"));
            }
            if rest.len() < meta_len {
                return Err(DecodeError::Truncated);
            }
            if rest.len() > meta_len {
                return Err(DecodeError::Invalid("trailing bytes"));
            }
            let meta = std::str::from_utf8(rest)
                .map_err(|_| DecodeError::Invalid("metadata is not UTF-8"))?
                .to_owned();
            Ok(Self {
                salt,
                upload: UploadId(upload),
                chunk_size,
                total_size,
                meta,
            })
        }

        /// How many chunks the upload has.
        pub fn chunks(&self) -> u32 {
            let n = self.total_size.div_ceil(u64::from(self.chunk_size.max(1)));
            u32::try_from(n).unwrap_or(u32::MAX)
        }

        /// The length chunk `index` must have (0 past the end).
        pub fn chunk_len(&self, index: u32) -> usize {
            let start = u64::from(index) * u64::from(self.chunk_size);
            let end = (start + u64::from(self.chunk_size)).min(self.total_size);
            end.saturating_sub(start) as usize
        }

        /// Where chunk `index` starts in the upload.
        pub fn offset(&self, index: u32) -> u64 {
            u64::from(index) * u64::from(self.chunk_size)
        }
    }

    /// What a `StreamAck` says about the upload.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u8)]
    pub enum AckStatus {
        /// Receiving: chunks below `next_chunk` are durably stored (the first ack answers the
        /// open and says where to start).
        Receiving = 0,
        /// The whole upload is stored; `sha256` is its digest.
        Complete = 1,
        /// The core will not take this upload (`reason`); the stream ends.
        Refused = 2,
    }

    /// Why the core refused an upload (a `Refused` ack's `reason`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u8)]
    pub enum RefuseReason {
        /// The total size is over the core's limit.
        TooLarge = 1,
        /// The chunk size differs from the upload's earlier attempts.
        ChunkSize = 2,
        /// The core has too many streams open.
        Busy = 3,
        /// The total size differs from the upload's earlier attempts.
        SizeMismatch = 4,
        /// The device's profile does not let it stream over this path (its gateway policy,
        /// `docs/protocol.md` §11.9): another gateway, or direct access, may be allowed.
        NotPermitted = 5,
    }

    impl RefuseReason {
        /// From the wire value.
        pub fn from_code(code: u8) -> Option<Self> {
            Some(match code {
                1 => Self::TooLarge,
                2 => Self::ChunkSize,
                3 => Self::Busy,
                4 => Self::SizeMismatch,
                5 => Self::NotPermitted,
                _ => return None,
            })
        }

        /// A short, fixed label.
        pub fn label(self) -> &'static str {
            match self {
                Self::TooLarge => "too_large",
                Self::ChunkSize => "chunk_size",
                Self::Busy => "busy",
                Self::SizeMismatch => "size_mismatch",
                Self::NotPermitted => "not_permitted",
            }
        }
    }

    /// Core → device: the upload's progress, end to end authenticated.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct StreamAck {
        /// Receiving, complete or refused.
        pub status: AckStatus,
        /// A [`RefuseReason`] code when refused, else 0.
        pub reason: u8,
        /// Chunks below this are durably stored.
        pub next_chunk: u32,
        /// Bytes durably stored.
        pub stored_bytes: u64,
        /// SHA-256 of the stored upload when complete, else zeros.
        pub sha256: [u8; 32],
    }

    impl StreamAck {
        /// A `Receiving` ack.
        pub fn receiving(next_chunk: u32, stored_bytes: u64) -> Self {
            Self {
                status: AckStatus::Receiving,
                reason: 0,
                next_chunk,
                stored_bytes,
                sha256: [0; 32],
            }
        }

        /// A `Refused` ack.
        pub fn refused(reason: RefuseReason) -> Self {
            Self {
                status: AckStatus::Refused,
                reason: reason as u8,
                next_chunk: 0,
                stored_bytes: 0,
                sha256: [0; 32],
            }
        }

        fn encode(&self) -> [u8; ACK_PLAINTEXT] {
            let mut b = [0u8; ACK_PLAINTEXT];
            b[0] = self.status as u8;
            b[1] = self.reason;
            b[2..6].copy_from_slice(&self.next_chunk.to_be_bytes());
            b[6..14].copy_from_slice(&self.stored_bytes.to_be_bytes());
            b[14..].copy_from_slice(&self.sha256);
            b
        }

        fn decode(b: &[u8]) -> Result<Self, StreamError> {
            if b.len() != ACK_PLAINTEXT {
                return Err(StreamError::Malformed("ack length"));
            }
            let status = match b[0] {
                0 => AckStatus::Receiving,
                1 => AckStatus::Complete,
                2 => AckStatus::Refused,
                _ => return Err(StreamError::Malformed("ack status")),
            };
            let mut next = [0u8; 4];
            next.copy_from_slice(&b[2..6]);
            let mut stored = [0u8; 8];
            stored.copy_from_slice(&b[6..14]);
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&b[14..]);
            Ok(Self {
                status,
                reason: b[1],
                next_chunk: u32::from_be_bytes(next),
                stored_bytes: u64::from_be_bytes(stored),
                sha256,
            })
        }
    }

    /// One stream connection's two keys, derived from the session's transport keys. As secret as
    /// those: zeroed on drop, never printed.
    pub struct StreamKeys {
        send: [u8; KEY_LEN],
        recv: [u8; KEY_LEN],
    }

    impl std::fmt::Debug for StreamKeys {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("StreamKeys(..)")
        }
    }

    impl Drop for StreamKeys {
        fn drop(&mut self) {
            self.send = [0; KEY_LEN];
            self.recv = [0; KEY_LEN];
        }
    }

    /// `BLAKE2s-256(key = transport key, "relay-stream/1" | salt | upload)`.
    fn derive(key: &[u8; KEY_LEN], salt: &[u8; 16], upload: &UploadId) -> [u8; KEY_LEN] {
        use blake2::digest::{FixedOutput, Mac};
        // A 32-byte key is always a valid BLAKE2s key.
        let mut mac = <blake2::Blake2sMac256 as blake2::digest::KeyInit>::new(key.into());
        mac.update(KDF_LABEL);
        mac.update(salt);
        mac.update(&upload.0);
        mac.finalize_fixed().into()
    }

    impl StreamKeys {
        /// Derives a connection's keys from a session's (sending, receiving) transport keys.
        pub(crate) fn derive(
            session: &[[u8; KEY_LEN]; 2],
            salt: &[u8; 16],
            upload: &UploadId,
        ) -> Self {
            Self {
                send: derive(&session[0], salt, upload),
                recv: derive(&session[1], salt, upload),
            }
        }
    }

    /// Noise's nonce layout: 32 zero bits, then the index as 64-bit little-endian.
    fn nonce(index: u32) -> chacha20poly1305::Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&u64::from(index).to_le_bytes());
        n.into()
    }

    fn put_length(out: &mut Vec<u8>, len: usize) {
        // Callers only seal frames up to MAX_STREAM_FRAME.
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }

    /// A chunk that opened: where it goes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Chunk {
        /// The chunk's index in the upload.
        pub index: u32,
        /// Whether it is the upload's last.
        pub last: bool,
    }

    /// The device's end of one stream connection: seals chunks, opens acks.
    #[derive(Debug)]
    pub struct DeviceStream {
        keys: StreamKeys,
        next_ack: u32,
    }

    impl DeviceStream {
        /// For the keys of the `StreamOpen` this connection started with.
        pub fn new(keys: StreamKeys) -> Self {
            Self { keys, next_ack: 0 }
        }

        /// Appends `length | StreamData` for chunk `index` (`last`: the upload's final chunk).
        pub fn seal_chunk(
            &self,
            index: u32,
            last: bool,
            data: &[u8],
            out: &mut Vec<u8>,
        ) -> Result<(), StreamError> {
            if data.len() > MAX_CHUNK {
                return Err(StreamError::TooLarge(data.len()));
            }
            let len = DATA_HEADER + data.len() + TAG_LEN;
            out.reserve(LENGTH_PREFIX + len);
            put_length(out, len);
            let header = out.len();
            out.push(VERSION);
            out.push(TYPE_DATA);
            out.push(if last { FLAG_FINAL } else { 0 });
            out.extend_from_slice(&index.to_be_bytes());
            let body = out.len();
            out.extend_from_slice(data);
            let (head, body) = out[header..].split_at_mut(body - header);
            let cipher = ChaCha20Poly1305::new((&self.keys.send).into());
            let tag = cipher
                .encrypt_in_place_detached(&nonce(index), head, body)
                .map_err(|_| StreamError::Exhausted)?;
            out.extend_from_slice(&tag);
            Ok(())
        }

        /// Opens one `StreamAck` frame (without its length prefix). Acks must arrive in order:
        /// the first is index 0.
        pub fn open_ack(&mut self, frame: &[u8]) -> Result<StreamAck, StreamError> {
            if frame.len() != ACK_FRAME {
                return Err(StreamError::Malformed("ack frame length"));
            }
            if frame[0] != VERSION || frame[1] != TYPE_ACK {
                return Err(StreamError::Malformed("not an ack"));
            }
            let mut index = [0u8; 4];
            index.copy_from_slice(&frame[2..ACK_HEADER]);
            let index = u32::from_be_bytes(index);
            if index != self.next_ack {
                return Err(StreamError::OutOfOrder {
                    expected: self.next_ack,
                    got: index,
                });
            }
            let (head, rest) = frame.split_at(ACK_HEADER);
            let (body, tag) = rest.split_at(ACK_PLAINTEXT);
            let mut plain = [0u8; ACK_PLAINTEXT];
            plain.copy_from_slice(body);
            let cipher = ChaCha20Poly1305::new((&self.keys.recv).into());
            cipher
                .decrypt_in_place_detached(&nonce(index), head, &mut plain, tag.into())
                .map_err(|_| StreamError::Authentication)?;
            self.next_ack = index.checked_add(1).ok_or(StreamError::Exhausted)?;
            StreamAck::decode(&plain)
        }
    }

    /// The core's end of one stream connection: opens chunks, seals acks.
    #[derive(Debug)]
    pub struct CoreStream {
        keys: StreamKeys,
        next_ack: u32,
    }

    impl CoreStream {
        /// For the keys the `StreamOpen` selected.
        pub fn new(keys: StreamKeys) -> Self {
            Self { keys, next_ack: 0 }
        }

        /// Opens one `StreamData` frame (without its length prefix) into `out` (cleared first).
        /// The caller checks that the index is the one it expects.
        pub fn open_chunk(&self, frame: &[u8], out: &mut Vec<u8>) -> Result<Chunk, StreamError> {
            out.clear();
            if frame.len() > MAX_STREAM_FRAME {
                return Err(StreamError::TooLarge(frame.len()));
            }
            if frame.len() < DATA_HEADER + TAG_LEN {
                return Err(StreamError::Malformed("data frame too short"));
            }
            if frame[0] != VERSION || frame[1] != TYPE_DATA {
                return Err(StreamError::Malformed("not a data frame"));
            }
            let flags = frame[2];
            if flags & !FLAG_FINAL != 0 {
                return Err(StreamError::Malformed("unknown flags"));
            }
            let mut index = [0u8; 4];
            index.copy_from_slice(&frame[3..DATA_HEADER]);
            let index = u32::from_be_bytes(index);
            let (head, rest) = frame.split_at(DATA_HEADER);
            let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
            out.extend_from_slice(body);
            let cipher = ChaCha20Poly1305::new((&self.keys.recv).into());
            if cipher
                .decrypt_in_place_detached(&nonce(index), head, out, tag.into())
                .is_err()
            {
                out.clear();
                return Err(StreamError::Authentication);
            }
            Ok(Chunk {
                index,
                last: flags & FLAG_FINAL != 0,
            })
        }

        /// Appends `length | StreamAck` to `out`.
        pub fn seal_ack(&mut self, ack: &StreamAck, out: &mut Vec<u8>) -> Result<(), StreamError> {
            let index = self.next_ack;
            let next = index.checked_add(1).ok_or(StreamError::Exhausted)?;
            put_length(out, ACK_FRAME);
            let header = out.len();
            out.push(VERSION);
            out.push(TYPE_ACK);
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(&ack.encode());
            let (head, body) = out[header..].split_at_mut(ACK_HEADER);
            let cipher = ChaCha20Poly1305::new((&self.keys.send).into());
            let tag = cipher
                .encrypt_in_place_detached(&nonce(index), head, body)
                .map_err(|_| StreamError::Exhausted)?;
            out.extend_from_slice(&tag);
            self.next_ack = next;
            Ok(())
        }
    }
}

#[cfg(all(test, feature = "session"))]
mod tests;
