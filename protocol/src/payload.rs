//! The plaintexts inside the Noise messages (`docs/protocol.md` §4). Only the two session
//! endpoints ever see these bytes.
//!
//! ```text
//! InitPayload      = version:u8 = 1 | timestamp:u64        | ext*
//! ResponsePayload  = version:u8 = 1 | rekey_after_secs:u32 | ext*
//! Message          = type:u8 | body
//!   0x01 Reading   body = seq:u64 | data (0..=MAX_READING bytes)
//!   0x02 Ack       body = count:u8 (0..=MAX_ACKS) | seq:u64 × count | ext*
//!   0x03 Keepalive body = (empty)
//!   0x04 StreamOpen body = salt:16 | upload:16 | chunk_size:u32 | total_size:u64 | meta_len:u8 | meta  (§13)
//! ext              = type:u8 | len:u8 | value (len bytes)
//!   in InitPayload:     0x01 NextKey key:32 · 0x02 ConfigVersion version:u32
//!   in ResponsePayload: 0x01 Refused reason:u8 · 0x02 KeyAccepted key:32 · and the notices
//!   notices (response and Ack): 0x03 Config (14 B) · 0x04 Rotate (0 B) · 0x05 Release
//! ```
//!
//! Extensions are the lifecycle's carriage: provisioning and key updates ride on handshakes,
//! configuration and update notices on handshake responses and acknowledgements, so none of them
//! costs a message of its own. Without extensions every encoding is the version-1 one byte for
//! byte. Unknown extension types are skipped (a newer core may say more than an older device
//! understands); a repeated type, a wrong length or a type out of place is refused.

use bytes::BufMut;

use crate::frame::{split_u32, split_u64, MAX_TRANSPORT_PLAINTEXT};
use crate::session::{PublicKey, KEY_LEN};
use crate::DecodeError;

/// The version byte of the handshake payloads.
pub const PAYLOAD_VERSION: u8 = 1;

/// Length of [`InitPayload`] on the wire without extensions.
pub const INIT_PAYLOAD_LEN: usize = 9;
/// Length of [`ResponsePayload`] on the wire without extensions.
pub const RESPONSE_PAYLOAD_LEN: usize = 5;
/// The longest handshake payload either side accepts (the largest legal one is well below).
pub const MAX_HANDSHAKE_PAYLOAD: usize = 512;

/// Bytes a reading adds in front of its data inside the plaintext.
pub const READING_HEADER: usize = 9;
/// The largest reading body that fits in one transport frame.
pub const MAX_READING: usize = MAX_TRANSPORT_PLAINTEXT - READING_HEADER;
/// The most sequence numbers one acknowledgement carries.
pub const MAX_ACKS: usize = 64;
/// The longest endpoint a [`Release`] names.
pub const MAX_ENDPOINT: usize = 64;

const EXT_NEXT_KEY: u8 = 0x01;
const EXT_CONFIG_VERSION: u8 = 0x02;
const EXT_REFUSED: u8 = 0x01;
const EXT_KEY_ACCEPTED: u8 = 0x02;
const EXT_CONFIG: u8 = 0x03;
const EXT_ROTATE: u8 = 0x04;
const EXT_RELEASE: u8 = 0x05;
const EXT_ADMISSION: u8 = 0x06;

/// Length of an encoded [`DeviceConfig`].
pub const CONFIG_LEN: usize = 14;

/// A device's service parameters, shared by every device of a profile and versioned: the core
/// knows which version each device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceConfig {
    /// Increases with every change of the profile.
    pub version: u32,
    /// How often the device reports.
    pub report_interval_secs: u32,
    /// How large a report is.
    pub report_bytes: u16,
    /// The change of the measured value that triggers an early report (0: none).
    pub threshold: u32,
}

impl DeviceConfig {
    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.version);
        buf.put_u32(self.report_interval_secs);
        buf.put_u16(self.report_bytes);
        buf.put_u32(self.threshold);
    }

    fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != CONFIG_LEN {
            return Err(DecodeError::Invalid("config length"));
        }
        let (version, b) = split_u32(b)?;
        let (report_interval_secs, b) = split_u32(b)?;
        let report_bytes = u16::from_be_bytes([b[0], b[1]]);
        let (threshold, _) = split_u32(&b[2..])?;
        Ok(Self {
            version,
            report_interval_secs,
            report_bytes,
            threshold,
        })
    }
}

/// The old core's release of a device to another operator: where the device goes next. It comes
/// inside the device's session with the old core, so the device trusts it as it trusts that core;
/// the signed document the new core checks travels between the operators, not on the device link.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Release {
    /// The new core's static public key.
    pub core: PublicKey,
    /// When the release was issued (milliseconds since the Unix epoch).
    pub issued_ms: u64,
    /// The new core's address for the device, `HOST:PORT`, 1..=[`MAX_ENDPOINT`] ASCII bytes.
    pub endpoint: String,
}

impl Release {
    fn encoded_len(&self) -> usize {
        KEY_LEN + 8 + self.endpoint.len()
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.core.0);
        buf.put_u64(self.issued_ms);
        buf.put_slice(self.endpoint.as_bytes());
    }

    fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let (core, b) = split_key(b)?;
        let (issued_ms, endpoint) = split_u64(b)?;
        if endpoint.is_empty() || endpoint.len() > MAX_ENDPOINT {
            return Err(DecodeError::Invalid("release endpoint length"));
        }
        if !endpoint.iter().all(|c| c.is_ascii_graphic()) {
            return Err(DecodeError::Invalid("release endpoint"));
        }
        let endpoint = String::from_utf8(endpoint.to_vec())
            .map_err(|_| DecodeError::Invalid("release endpoint"))?;
        Ok(Self {
            core,
            issued_ms,
            endpoint,
        })
    }

    /// Whether the release can be encoded (its endpoint is 1..=[`MAX_ENDPOINT`] printable ASCII
    /// bytes).
    pub fn is_valid(&self) -> bool {
        !self.endpoint.is_empty()
            && self.endpoint.len() <= MAX_ENDPOINT
            && self.endpoint.bytes().all(|c| c.is_ascii_graphic())
    }
}

/// Why the core refused a handshake. The refusal is authenticated (it is the handshake's response)
/// but establishes no session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RefusalReason {
    /// The key is not known to the core.
    UnknownKey = 1,
    /// A factory identity no owner has claimed.
    Unclaimed = 2,
    /// A claimed device that no activation plan named yet.
    NotActivated = 3,
    /// The subscription is suspended; it may be resumed.
    Suspended = 4,
    /// The subscription is revoked.
    Revoked = 5,
    /// The subscription is quarantined (suspected clone): re-provision with the factory identity.
    Quarantined = 6,
    /// The key was retired by a credential update.
    Superseded = 7,
    /// The device was released to another operator: see the response's [`Release`].
    Released = 8,
    /// A factory-identity handshake must propose a subscription key (`NextKey`).
    KeyRequired = 9,
    /// The subscription ended (ownership change): re-provision with the factory identity.
    Reprovision = 10,
    /// The device's profile does not allow this path (that gateway, or direct access): retry
    /// later, or through another path.
    NotPermitted = 11,
}

impl RefusalReason {
    /// Every reason.
    pub const ALL: [Self; 11] = [
        Self::UnknownKey,
        Self::Unclaimed,
        Self::NotActivated,
        Self::Suspended,
        Self::Revoked,
        Self::Quarantined,
        Self::Superseded,
        Self::Released,
        Self::KeyRequired,
        Self::Reprovision,
        Self::NotPermitted,
    ];

    /// The reason for a code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == code)
    }

    /// A short, fixed label (metrics, logs).
    pub fn label(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::Unclaimed => "unclaimed",
            Self::NotActivated => "not_activated",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
            Self::Quarantined => "quarantined",
            Self::Superseded => "superseded",
            Self::Released => "released",
            Self::KeyRequired => "key_required",
            Self::Reprovision => "reprovision",
            Self::NotPermitted => "not_permitted",
        }
    }

    /// Whether the device should fall back to its factory identity (re-provision).
    pub fn needs_factory(self) -> bool {
        matches!(
            self,
            Self::UnknownKey
                | Self::Quarantined
                | Self::Superseded
                | Self::Reprovision
                | Self::Released
        )
    }
}

/// What the core tells a device besides the answer itself, on a handshake response or riding on
/// an acknowledgement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Notices {
    /// The device's configuration, when the device does not run this version yet.
    pub config: Option<DeviceConfig>,
    /// Generate a new key and switch to it (a credential update).
    pub rotate: bool,
    /// The device now belongs to another operator.
    pub release: Option<Release>,
}

impl Notices {
    /// Whether there is nothing to say.
    pub fn is_empty(&self) -> bool {
        self.config.is_none() && !self.rotate && self.release.is_none()
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        self.config.map_or(0, |_| 2 + CONFIG_LEN)
            + if self.rotate { 2 } else { 0 }
            + self
                .release
                .as_ref()
                .filter(|r| r.is_valid())
                .map_or(0, |r| 2 + r.encoded_len())
    }

    fn encode(&self, buf: &mut impl BufMut) {
        if let Some(c) = &self.config {
            buf.put_u8(EXT_CONFIG);
            buf.put_u8(CONFIG_LEN as u8);
            c.encode(buf);
        }
        if self.rotate {
            buf.put_u8(EXT_ROTATE);
            buf.put_u8(0);
        }
        if let Some(r) = self.release.as_ref().filter(|r| r.is_valid()) {
            buf.put_u8(EXT_RELEASE);
            buf.put_u8(r.encoded_len() as u8);
            r.encode(buf);
        }
    }

    /// Takes a notice extension; `Ok(false)` if `kind` is not one.
    fn take(&mut self, kind: u8, value: &[u8]) -> Result<bool, DecodeError> {
        match kind {
            EXT_CONFIG => self.config = Some(DeviceConfig::decode(value)?),
            EXT_ROTATE => {
                if !value.is_empty() {
                    return Err(DecodeError::Invalid("rotate length"));
                }
                self.rotate = true;
            }
            EXT_RELEASE => self.release = Some(Release::decode(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Inside Noise message 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitPayload {
    /// Strictly increasing across a device's handshakes (milliseconds since the Unix epoch for a
    /// device with a clock): the core refuses an initiation not newer than the last it accepted
    /// from the same key, so a recorded initiation cannot be replayed.
    pub timestamp: u64,
    /// A key the device generated in its secure element and proposes to switch to (provisioning
    /// with the factory identity, or a credential update with the current key).
    pub next_key: Option<PublicKey>,
    /// The configuration version the device runs.
    pub config_version: Option<u32>,
}

impl InitPayload {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        INIT_PAYLOAD_LEN
            + self.next_key.map_or(0, |_| 2 + KEY_LEN)
            + self.config_version.map_or(0, |_| 6)
    }

    /// Appends the payload.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(PAYLOAD_VERSION);
        buf.put_u64(self.timestamp);
        if let Some(k) = &self.next_key {
            buf.put_u8(EXT_NEXT_KEY);
            buf.put_u8(KEY_LEN as u8);
            buf.put_slice(&k.0);
        }
        if let Some(v) = self.config_version {
            buf.put_u8(EXT_CONFIG_VERSION);
            buf.put_u8(4);
            buf.put_u32(v);
        }
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let rest = version(b)?;
        let (timestamp, rest) = split_u64(rest)?;
        let mut p = Self {
            timestamp,
            ..Self::default()
        };
        for ext in Extensions::new(rest) {
            let (kind, value) = ext?;
            match kind {
                EXT_NEXT_KEY => p.next_key = Some(exact_key(value)?),
                EXT_CONFIG_VERSION => {
                    let (v, rest) = split_u32(value)?;
                    no_trailing(rest)?;
                    p.config_version = Some(v);
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

/// Inside Noise message 2: the core's answer and the session policy it sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponsePayload {
    /// After this many seconds the device starts a new handshake; the core refuses the session's
    /// frames some time later (`docs/protocol.md` §6.4).
    pub rekey_after_secs: u32,
    /// Set: the core refused the device and keeps no session.
    pub refused: Option<RefusalReason>,
    /// The proposed key the core bound to the device's subscription.
    pub key_accepted: Option<PublicKey>,
    /// Configuration, update notice, release.
    pub notices: Notices,
    /// The session's admission key (`docs/protocol.md` §12): the device tags every frame with it.
    pub admission: Option<crate::admission::AdmissionKey>,
}

impl ResponsePayload {
    /// A plain acceptance with `rekey_after_secs`.
    pub fn accept(rekey_after_secs: u32) -> Self {
        Self {
            rekey_after_secs,
            ..Self::default()
        }
    }

    /// A refusal.
    pub fn refuse(reason: RefusalReason) -> Self {
        Self {
            refused: Some(reason),
            ..Self::default()
        }
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        RESPONSE_PAYLOAD_LEN
            + self.refused.map_or(0, |_| 3)
            + self.key_accepted.map_or(0, |_| 2 + KEY_LEN)
            + self.notices.encoded_len()
            + self.admission.map_or(0, |_| 2 + crate::admission::KEY_LEN)
    }

    /// Appends the payload.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(PAYLOAD_VERSION);
        buf.put_u32(self.rekey_after_secs);
        if let Some(r) = self.refused {
            buf.put_u8(EXT_REFUSED);
            buf.put_u8(1);
            buf.put_u8(r as u8);
        }
        if let Some(k) = &self.key_accepted {
            buf.put_u8(EXT_KEY_ACCEPTED);
            buf.put_u8(KEY_LEN as u8);
            buf.put_slice(&k.0);
        }
        self.notices.encode(buf);
        if let Some(k) = &self.admission {
            buf.put_u8(EXT_ADMISSION);
            buf.put_u8(crate::admission::KEY_LEN as u8);
            buf.put_slice(&k.0);
        }
    }

    /// Parses the payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let rest = version(b)?;
        let (rekey_after_secs, rest) = split_u32(rest)?;
        let mut p = Self::accept(rekey_after_secs);
        for ext in Extensions::new(rest) {
            let (kind, value) = ext?;
            match kind {
                EXT_REFUSED => {
                    let [code] = value else {
                        return Err(DecodeError::Invalid("refusal length"));
                    };
                    p.refused = Some(
                        RefusalReason::from_code(*code)
                            .ok_or(DecodeError::Invalid("refusal reason"))?,
                    );
                }
                EXT_KEY_ACCEPTED => p.key_accepted = Some(exact_key(value)?),
                EXT_ADMISSION => {
                    p.admission = Some(crate::admission::AdmissionKey(
                        value
                            .try_into()
                            .map_err(|_| DecodeError::Invalid("admission key length"))?,
                    ));
                }
                _ => {
                    p.notices.take(kind, value)?;
                }
            }
        }
        Ok(p)
    }
}

/// Walks `type | len | value` extensions, refusing truncation and repeated types.
struct Extensions<'a> {
    rest: &'a [u8],
    seen: u32,
}

impl<'a> Extensions<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self { rest, seen: 0 }
    }
}

impl<'a> Iterator for Extensions<'a> {
    type Item = Result<(u8, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let item = (|| {
            let [kind, len, ref tail @ ..] = *self.rest else {
                return Err(DecodeError::Truncated);
            };
            let len = len as usize;
            if tail.len() < len {
                return Err(DecodeError::Truncated);
            }
            // Types 0..32 are tracked for repeats; higher ones are unknown and skipped anyway.
            if kind < 32 {
                let bit = 1u32 << kind;
                if self.seen & bit != 0 {
                    return Err(DecodeError::Invalid("repeated extension"));
                }
                self.seen |= bit;
            }
            let (value, rest) = tail.split_at(len);
            self.rest = rest;
            Ok((kind, value))
        })();
        if item.is_err() {
            self.rest = &[];
        }
        Some(item)
    }
}

fn split_key(b: &[u8]) -> Result<(PublicKey, &[u8]), DecodeError> {
    if b.len() < KEY_LEN {
        return Err(DecodeError::Truncated);
    }
    let (k, rest) = b.split_at(KEY_LEN);
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(k);
    Ok((PublicKey(key), rest))
}

fn exact_key(b: &[u8]) -> Result<PublicKey, DecodeError> {
    let (k, rest) = split_key(b)?;
    no_trailing(rest)?;
    Ok(k)
}

/// A reading's sequence number: unique per device for the device's whole life. The core stores a
/// reading once per `(device, seq)` and acknowledges duplicates without storing them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadingSeq(pub u64);

const MSG_READING: u8 = 0x01;
const MSG_ACK: u8 = 0x02;
const MSG_KEEPALIVE: u8 = 0x03;
const MSG_STREAM_OPEN: u8 = 0x04;

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
    /// Core to device: these readings are durably stored; and whatever the core has to tell the
    /// device rides along.
    Ack {
        /// Up to [`MAX_ACKS`] sequence numbers (none only when `notices` says something).
        seqs: Vec<ReadingSeq>,
        /// Configuration, update notice, release: the piggyback.
        notices: Notices,
    },
    /// Either way: nothing but proof of life.
    Keepalive,
    /// Device to core, only as the first frame of a stream (`docs/protocol.md` §13): which upload
    /// the stream carries, and the salt of its keys.
    StreamOpen(crate::stream::StreamOpen),
}

impl<'a> Message<'a> {
    /// An acknowledgement with nothing riding along.
    pub fn ack(seqs: Vec<ReadingSeq>) -> Self {
        Self::Ack {
            seqs,
            notices: Notices::default(),
        }
    }

    /// Appends the message. An `Ack` with more than [`MAX_ACKS`] entries carries the first ones
    /// only; callers split long lists.
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Self::Reading { seq, data } => {
                buf.put_u8(MSG_READING);
                buf.put_u64(seq.0);
                buf.put_slice(data);
            }
            Self::Ack { seqs, notices } => {
                let n = seqs.len().min(MAX_ACKS);
                buf.put_u8(MSG_ACK);
                buf.put_u8(n as u8);
                for s in &seqs[..n] {
                    buf.put_u64(s.0);
                }
                notices.encode(buf);
            }
            Self::Keepalive => buf.put_u8(MSG_KEEPALIVE),
            Self::StreamOpen(open) => {
                buf.put_u8(MSG_STREAM_OPEN);
                open.encode(buf);
            }
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
                if n > MAX_ACKS {
                    return Err(DecodeError::Invalid("ack count"));
                }
                let mut seqs = Vec::with_capacity(n);
                for _ in 0..n {
                    let (s, r) = split_u64(rest)?;
                    seqs.push(ReadingSeq(s));
                    rest = r;
                }
                let mut notices = Notices::default();
                for ext in Extensions::new(rest) {
                    let (kind, value) = ext?;
                    if !notices.take(kind, value)? && kind < EXT_CONFIG {
                        return Err(DecodeError::Invalid("extension not allowed on an ack"));
                    }
                }
                if n == 0 && notices.is_empty() {
                    return Err(DecodeError::Invalid("empty ack"));
                }
                Ok(Self::Ack { seqs, notices })
            }
            MSG_KEEPALIVE => {
                no_trailing(body)?;
                Ok(Self::Keepalive)
            }
            MSG_STREAM_OPEN => Ok(Self::StreamOpen(crate::stream::StreamOpen::decode(body)?)),
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
            let m = Message::ack(seqs.into_iter().map(ReadingSeq).collect());
            let bytes = m.to_vec();
            prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
        }

        #[test]
        fn handshake_payloads_round_trip(ts in any::<u64>(), secs in any::<u32>()) {
            let mut b = Vec::new();
            InitPayload { timestamp: ts, ..InitPayload::default() }.encode(&mut b);
            prop_assert_eq!(b.len(), INIT_PAYLOAD_LEN);
            prop_assert_eq!(InitPayload::decode(&b).unwrap().timestamp, ts);
            let mut b = Vec::new();
            ResponsePayload::accept(secs).encode(&mut b);
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

    fn arb_notices() -> impl Strategy<Value = Notices> {
        (
            proptest::option::of((any::<u32>(), any::<u32>(), any::<u16>(), any::<u32>())),
            any::<bool>(),
            proptest::option::of((any::<[u8; 32]>(), any::<u64>(), "[a-z0-9.:]{1,64}")),
        )
            .prop_map(|(config, rotate, release)| Notices {
                config: config.map(|(version, report_interval_secs, report_bytes, threshold)| {
                    DeviceConfig {
                        version,
                        report_interval_secs,
                        report_bytes,
                        threshold,
                    }
                }),
                rotate,
                release: release.map(|(core, issued_ms, endpoint)| Release {
                    core: PublicKey(core),
                    issued_ms,
                    endpoint,
                }),
            })
    }

    proptest! {
        #[test]
        fn extensions_round_trip(
            ts in any::<u64>(),
            next in proptest::option::of(any::<[u8; 32]>()),
            cv in proptest::option::of(any::<u32>()),
            secs in any::<u32>(),
            refused in proptest::option::of(1u8..=11),
            accepted in proptest::option::of(any::<[u8; 32]>()),
            admission in proptest::option::of(any::<[u8; 16]>()),
            notices in arb_notices(),
            seqs in proptest::collection::vec(any::<u64>(), 0..=MAX_ACKS),
        ) {
            let init = InitPayload { timestamp: ts, next_key: next.map(PublicKey), config_version: cv };
            let mut b = Vec::new();
            init.encode(&mut b);
            prop_assert_eq!(b.len(), init.encoded_len());
            prop_assert_eq!(InitPayload::decode(&b).unwrap(), init);

            let resp = ResponsePayload {
                rekey_after_secs: secs,
                refused: refused.and_then(RefusalReason::from_code),
                key_accepted: accepted.map(PublicKey),
                notices: notices.clone(),
                admission: admission.map(crate::admission::AdmissionKey),
            };
            let mut b = Vec::new();
            resp.encode(&mut b);
            prop_assert_eq!(b.len(), resp.encoded_len());
            prop_assert!(b.len() <= MAX_HANDSHAKE_PAYLOAD);
            prop_assert_eq!(ResponsePayload::decode(&b).unwrap(), resp);

            let ack = Message::Ack { seqs: seqs.into_iter().map(ReadingSeq).collect(), notices };
            let b = ack.to_vec();
            prop_assert!(b.len() <= MAX_TRANSPORT_PLAINTEXT);
            match Message::decode(&b) {
                Ok(m) => prop_assert_eq!(m, ack),
                // Only an ack with neither seqs nor notices is refused.
                Err(_) => {
                    let empty = matches!(&ack, Message::Ack { seqs, notices } if seqs.is_empty() && notices.is_empty());
                    prop_assert!(empty);
                }
            }
        }
    }

    #[test]
    fn extensions_are_checked() {
        let base = [PAYLOAD_VERSION, 0, 0, 0, 0, 0, 0, 0, 7];
        let with = |ext: &[u8]| [&base[..], ext].concat();
        // Unknown types are skipped; a repeated type, a short value or a bad length is refused.
        assert_eq!(
            InitPayload::decode(&with(&[0x77, 2, 1, 2]))
                .unwrap()
                .timestamp,
            7
        );
        assert!(InitPayload::decode(&with(&[0x02, 4, 0, 0, 0, 1, 0x02, 4, 0, 0, 0, 2])).is_err());
        assert!(InitPayload::decode(&with(&[0x02, 4, 0, 0])).is_err());
        assert!(InitPayload::decode(&with(&[0x02, 3, 0, 0, 0])).is_err());
        assert!(InitPayload::decode(&with(&[0x01, 31])).is_err());
        assert!(InitPayload::decode(&with(&[0x01])).is_err());
        let resp = |ext: &[u8]| [&[PAYLOAD_VERSION, 0, 0, 0, 60][..], ext].concat();
        assert!(ResponsePayload::decode(&resp(&[EXT_REFUSED, 1, 0])).is_err());
        assert_eq!(
            ResponsePayload::decode(&resp(&[EXT_REFUSED, 1, 11]))
                .unwrap()
                .refused,
            Some(RefusalReason::NotPermitted)
        );
        assert!(ResponsePayload::decode(&resp(&[EXT_REFUSED, 1, 12])).is_err());
        assert!(ResponsePayload::decode(&resp(&[EXT_ROTATE, 1, 0])).is_err());
        assert!(ResponsePayload::decode(&resp(&[EXT_CONFIG, 13])).is_err());
        let mut release = vec![EXT_RELEASE, 41];
        release.extend_from_slice(&[0; 40]);
        release.push(b' ');
        assert!(
            ResponsePayload::decode(&resp(&release)).is_err(),
            "endpoint must be printable"
        );
        // A refusal or a key on an ack is out of place; an empty ack says nothing.
        assert!(Message::decode(&[MSG_ACK, 0, EXT_REFUSED, 1, 1]).is_err());
        assert!(Message::decode(&[MSG_ACK, 0]).is_err());
        assert_eq!(
            Message::decode(&[MSG_ACK, 0, EXT_ROTATE, 0]).unwrap(),
            Message::Ack {
                seqs: vec![],
                notices: Notices {
                    rotate: true,
                    ..Notices::default()
                }
            }
        );
    }

    #[test]
    fn without_extensions_the_encodings_are_version_1() {
        let mut b = Vec::new();
        InitPayload {
            timestamp: 1,
            ..InitPayload::default()
        }
        .encode(&mut b);
        assert_eq!(b, [1, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut b = Vec::new();
        ResponsePayload::accept(300).encode(&mut b);
        assert_eq!(b, [1, 0, 0, 1, 44]);
        assert_eq!(
            Message::ack(vec![ReadingSeq(5)]).to_vec(),
            [2, 1, 0, 0, 0, 0, 0, 0, 0, 5]
        );
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
