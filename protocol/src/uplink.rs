//! The gateway↔core link, carried inside one mutually authenticated QUIC connection per gateway.
//!
//! Device frames ride QUIC datagrams (see `docs/protocol.md` §5 for why); control messages ride one
//! bidirectional stream that the gateway opens, as length-prefixed messages:
//!
//! ```text
//! datagram        = version:u8 = 1 | kind:u8 = 1 | flow:u32 | device frame
//!                 | version:u8 = 1 | kind:u8 = 2 | flow:u32 | admission(34) | device frame  core -> gateway
//! stream message  = length:u16 | version:u8 = 1 | kind:u8 | body      (length counts version..body)
//!   kind 0x10 Hello        body = name_len:u8 | name (UTF-8, 1..=64 bytes)    gateway -> core
//!   kind 0x11 HelloAck     body = max_flows:u32 [| bulk_port:u16]              core -> gateway
//!   kind 0x12 DeviceFrame  body = flow:u32 | device frame                      either way
//!   kind 0x13 Revoked      body = count:u16 (1..=256) | session:u32 × count    core -> gateway
//!   kind 0x14 Admit        body = count:u8 (1..=32) | admission(34) × count    core -> gateway
//!   kind 0x15 AdmitQuery   body = count:u16 (1..=256) | session:u32 × count    gateway -> core
//!   kind 0x16 NotAdmitted  body = count:u16 (1..=256) | session:u32 × count    core -> gateway
//! ```
//!
//! A kind-2 datagram carries a handshake response together with the admission of the session it
//! opens (`crate::admission`), so the gateway knows the session before the device's first frame.
//!
//! `Revoked` names core-side session ids the core dropped (suspension, revocation, quarantine,
//! ownership or operator change): the gateway drops device frames addressed to them from then on,
//! so a cut-off device stops costing uplink capacity within the message's delivery time.
//!
//! `DeviceFrame` on the stream is the fallback for a frame that does not fit in a QUIC datagram.

use std::num::NonZeroU16;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::admission::Admission;
use crate::frame::{split_u32, SessionId, MAX_DATAGRAM};
use crate::DecodeError;

/// The uplink protocol version.
pub const VERSION: u8 = 1;

/// Bytes an uplink datagram adds in front of the device frame it carries.
pub const DATAGRAM_HEADER: usize = 6;

/// The largest body of a control-stream message (a device frame plus its flow id).
pub const MAX_MESSAGE_BODY: usize = MAX_DATAGRAM + 4;

/// The longest gateway name in a `Hello`.
pub const MAX_NAME_LEN: usize = 64;

const KIND_DATAGRAM_FRAME: u8 = 0x01;
const KIND_DATAGRAM_ADMIT: u8 = 0x02;
const KIND_HELLO: u8 = 0x10;
const KIND_HELLO_ACK: u8 = 0x11;
const KIND_DEVICE_FRAME: u8 = 0x12;
const KIND_REVOKED: u8 = 0x13;
const KIND_ADMIT: u8 = 0x14;
const KIND_ADMIT_QUERY: u8 = 0x15;
const KIND_NOT_ADMITTED: u8 = 0x16;

/// The most session ids one `Revoked` message names.
pub const MAX_REVOKED: usize = 256;
/// The most admissions one `Admit` message carries.
pub const MAX_ADMITS: usize = 32;
/// The most session ids one `AdmitQuery` or `NotAdmitted` message names.
pub const MAX_ADMIT_QUERY: usize = 256;

/// The gateway's name for one device address: the core routes replies by it. It is local to one
/// uplink connection and says nothing about the device's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u32);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One device frame on an uplink QUIC datagram, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UplinkDatagram<'a> {
    /// Which device address the frame came from or goes to.
    pub flow: FlowId,
    /// Core to gateway only: the session the frame (a handshake response) opens.
    pub admission: Option<Admission>,
    /// The device frame, unchanged.
    pub frame: &'a [u8],
}

impl<'a> UplinkDatagram<'a> {
    /// A plain datagram (kind 1) for `frame` on `flow`.
    pub fn new(flow: FlowId, frame: &'a [u8]) -> Self {
        Self {
            flow,
            admission: None,
            frame,
        }
    }

    /// Parses one QUIC datagram. The device frame inside is not parsed here.
    pub fn decode(datagram: &'a [u8]) -> Result<Self, DecodeError> {
        let [version, kind, rest @ ..] = datagram else {
            return Err(DecodeError::Truncated);
        };
        if *version != VERSION {
            return Err(DecodeError::UnknownVersion(*version));
        }
        let (flow, rest) = split_u32(rest)?;
        let (admission, frame) = match *kind {
            KIND_DATAGRAM_FRAME => (None, rest),
            KIND_DATAGRAM_ADMIT => {
                let (admission, frame) = rest
                    .split_at_checked(Admission::ENCODED_LEN)
                    .ok_or(DecodeError::Truncated)?;
                (Some(Admission::decode(admission)?), frame)
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        if frame.is_empty() {
            return Err(DecodeError::Truncated);
        }
        if frame.len() > MAX_DATAGRAM {
            return Err(DecodeError::Oversized {
                len: frame.len(),
                max: MAX_DATAGRAM,
            });
        }
        Ok(Self {
            flow: FlowId(flow),
            admission,
            frame,
        })
    }

    /// Appends the datagram to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(VERSION);
        match &self.admission {
            None => {
                buf.put_u8(KIND_DATAGRAM_FRAME);
                buf.put_u32(self.flow.0);
            }
            Some(a) => {
                buf.put_u8(KIND_DATAGRAM_ADMIT);
                buf.put_u32(self.flow.0);
                a.encode(buf);
            }
        }
        buf.put_slice(self.frame);
    }

    /// The encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        let admission = if self.admission.is_some() {
            Admission::ENCODED_LEN
        } else {
            0
        };
        DATAGRAM_HEADER + admission + self.frame.len()
    }
}

/// A message on the uplink control stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkMessage {
    /// The gateway's first message: who it says it is (its certificate is what is trusted).
    Hello {
        /// The gateway's name, for logs and metrics.
        name: String,
    },
    /// The core's answer to `Hello`.
    HelloAck {
        /// How many device flows the core is willing to route for this gateway.
        max_flows: u32,
        /// The UDP port of the core's bulk endpoint, at the same address: the gateway carries
        /// device streams over a second connection to it (`docs/protocol.md` §13.2). `None`
        /// (a 4-byte body): device streams go over this connection.
        bulk_port: Option<NonZeroU16>,
    },
    /// A device frame too large for a QUIC datagram.
    DeviceFrame {
        /// Which device address the frame came from or goes to.
        flow: FlowId,
        /// The device frame, unchanged.
        frame: Bytes,
    },
    /// Core-side session ids the core no longer serves: the gateway drops frames for them.
    Revoked {
        /// 1..=[`MAX_REVOKED`] session ids (more are split by the sender; only the first ones
        /// are encoded).
        sessions: Vec<crate::frame::SessionId>,
    },
    /// Sessions the gateway may forward frames for (answering `AdmitQuery`, or unasked).
    Admit {
        /// 1..=[`MAX_ADMITS`] admissions (only the first ones are encoded).
        admissions: Vec<Admission>,
    },
    /// The gateway saw frames for sessions it holds no admission for (it restarted, or the device
    /// moved here): which of them may pass?
    AdmitQuery {
        /// 1..=[`MAX_ADMIT_QUERY`] core-side session ids.
        sessions: Vec<SessionId>,
    },
    /// The answer for queried sessions the core does not serve through this gateway.
    NotAdmitted {
        /// 1..=[`MAX_ADMIT_QUERY`] core-side session ids.
        sessions: Vec<SessionId>,
    },
}

fn put_ids(buf: &mut impl BufMut, ids: &[SessionId], max: usize) {
    let n = ids.len().min(max);
    buf.put_u16(n as u16);
    for id in &ids[..n] {
        buf.put_u32(id.0);
    }
}

fn get_ids(msg: &mut Bytes, max: usize, what: &'static str) -> Result<Vec<SessionId>, DecodeError> {
    if msg.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    let n = msg.get_u16() as usize;
    if n == 0 || n > max || msg.len() != 4 * n {
        return Err(DecodeError::Invalid(what));
    }
    Ok((0..n).map(|_| SessionId(msg.get_u32())).collect())
}

impl UplinkMessage {
    /// Appends the length-prefixed message to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let body_len = match self {
            Self::Hello { name } => 1 + name.len().min(MAX_NAME_LEN),
            Self::HelloAck { bulk_port, .. } => 4 + if bulk_port.is_some() { 2 } else { 0 },
            Self::DeviceFrame { frame, .. } => 4 + frame.len(),
            Self::Revoked { sessions } => 2 + 4 * sessions.len().min(MAX_REVOKED),
            Self::Admit { admissions } => {
                1 + Admission::ENCODED_LEN * admissions.len().min(MAX_ADMITS)
            }
            Self::AdmitQuery { sessions } | Self::NotAdmitted { sessions } => {
                2 + 4 * sessions.len().min(MAX_ADMIT_QUERY)
            }
        };
        buf.put_u16((2 + body_len) as u16);
        buf.put_u8(VERSION);
        match self {
            Self::Hello { name } => {
                buf.put_u8(KIND_HELLO);
                let name = truncate_utf8(name, MAX_NAME_LEN);
                buf.put_u8(name.len() as u8);
                buf.put_slice(name.as_bytes());
            }
            Self::HelloAck {
                max_flows,
                bulk_port,
            } => {
                buf.put_u8(KIND_HELLO_ACK);
                buf.put_u32(*max_flows);
                if let Some(port) = bulk_port {
                    buf.put_u16(port.get());
                }
            }
            Self::DeviceFrame { flow, frame } => {
                buf.put_u8(KIND_DEVICE_FRAME);
                buf.put_u32(flow.0);
                buf.put_slice(frame);
            }
            Self::Revoked { sessions } => {
                buf.put_u8(KIND_REVOKED);
                put_ids(buf, sessions, MAX_REVOKED);
            }
            Self::Admit { admissions } => {
                buf.put_u8(KIND_ADMIT);
                let n = admissions.len().min(MAX_ADMITS);
                buf.put_u8(n as u8);
                for a in &admissions[..n] {
                    a.encode(buf);
                }
            }
            Self::AdmitQuery { sessions } => {
                buf.put_u8(KIND_ADMIT_QUERY);
                put_ids(buf, sessions, MAX_ADMIT_QUERY);
            }
            Self::NotAdmitted { sessions } => {
                buf.put_u8(KIND_NOT_ADMITTED);
                put_ids(buf, sessions, MAX_ADMIT_QUERY);
            }
        }
    }

    /// Takes one message off the front of `src`. `Ok(None)`: not all of it has arrived yet, and
    /// nothing was consumed. On error the stream is no longer in sync and must be closed.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        if src.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([src[0], src[1]]) as usize;
        if len < 2 {
            return Err(DecodeError::Truncated);
        }
        if len - 2 > MAX_MESSAGE_BODY {
            return Err(DecodeError::Oversized {
                len: len - 2,
                max: MAX_MESSAGE_BODY,
            });
        }
        if src.len() < 2 + len {
            return Ok(None);
        }
        src.advance(2);
        let mut msg = src.split_to(len).freeze();
        let version = msg.get_u8();
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let kind = msg.get_u8();
        let decoded = match kind {
            KIND_HELLO => {
                let n = *msg.first().ok_or(DecodeError::Truncated)? as usize;
                msg.advance(1);
                if n == 0 || n > MAX_NAME_LEN {
                    return Err(DecodeError::Invalid("gateway name length"));
                }
                if msg.len() != n {
                    return Err(DecodeError::Invalid("gateway name length"));
                }
                let name = std::str::from_utf8(&msg)
                    .map_err(|_| DecodeError::Invalid("gateway name is not UTF-8"))?;
                Self::Hello {
                    name: name.to_owned(),
                }
            }
            KIND_HELLO_ACK => {
                if msg.len() != 4 && msg.len() != 6 {
                    return Err(DecodeError::Invalid("hello-ack length"));
                }
                let max_flows = msg.get_u32();
                let bulk_port = if msg.is_empty() {
                    None
                } else {
                    Some(
                        NonZeroU16::new(msg.get_u16())
                            .ok_or(DecodeError::Invalid("hello-ack bulk port 0"))?,
                    )
                };
                Self::HelloAck {
                    max_flows,
                    bulk_port,
                }
            }
            KIND_DEVICE_FRAME => {
                if msg.len() < 5 {
                    return Err(DecodeError::Truncated);
                }
                let flow = FlowId(msg.get_u32());
                Self::DeviceFrame { flow, frame: msg }
            }
            KIND_REVOKED => Self::Revoked {
                sessions: get_ids(&mut msg, MAX_REVOKED, "revoked count")?,
            },
            KIND_ADMIT => {
                let n = *msg.first().ok_or(DecodeError::Truncated)? as usize;
                msg.advance(1);
                if n == 0 || n > MAX_ADMITS || msg.len() != Admission::ENCODED_LEN * n {
                    return Err(DecodeError::Invalid("admit count"));
                }
                let admissions = msg
                    .chunks_exact(Admission::ENCODED_LEN)
                    .map(Admission::decode)
                    .collect::<Result<_, _>>()?;
                Self::Admit { admissions }
            }
            KIND_ADMIT_QUERY => Self::AdmitQuery {
                sessions: get_ids(&mut msg, MAX_ADMIT_QUERY, "admit query count")?,
            },
            KIND_NOT_ADMITTED => Self::NotAdmitted {
                sessions: get_ids(&mut msg, MAX_ADMIT_QUERY, "not admitted count")?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        Ok(Some(decoded))
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_and_wait_for_more() {
        let msgs = [
            UplinkMessage::Hello {
                name: "gw-1".into(),
            },
            UplinkMessage::HelloAck {
                max_flows: 100_000,
                bulk_port: None,
            },
            UplinkMessage::HelloAck {
                max_flows: 7,
                bulk_port: NonZeroU16::new(4434),
            },
            UplinkMessage::DeviceFrame {
                flow: FlowId(7),
                frame: Bytes::from_static(&[1, 3, 0, 0, 0, 0]),
            },
            UplinkMessage::Revoked {
                sessions: vec![
                    crate::frame::SessionId(9),
                    crate::frame::SessionId(u32::MAX),
                ],
            },
            UplinkMessage::Admit {
                admissions: vec![admission(3), admission(4)],
            },
            UplinkMessage::AdmitQuery {
                sessions: vec![SessionId(1), SessionId(2)],
            },
            UplinkMessage::NotAdmitted {
                sessions: vec![SessionId(2)],
            },
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        // Feed byte by byte: every prefix is "incomplete", never an error.
        let all = buf.clone();
        let mut src = BytesMut::new();
        let mut out = Vec::new();
        for b in all.iter() {
            src.put_u8(*b);
            while let Some(m) = UplinkMessage::decode(&mut src).expect("valid stream") {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert!(src.is_empty());
    }

    #[test]
    fn revoked_lists_are_bounded() {
        for bad in [
            &[0u8, 4, 1, 0x13, 0, 0][..],
            &[0, 8, 1, 0x13, 0, 2, 0, 0, 0, 1],
        ] {
            let mut src = BytesMut::from(bad);
            assert!(UplinkMessage::decode(&mut src).is_err(), "{bad:?}");
        }
        let many = UplinkMessage::Revoked {
            sessions: (0..1000).map(crate::frame::SessionId).collect(),
        };
        let mut buf = BytesMut::new();
        many.encode(&mut buf);
        let Some(UplinkMessage::Revoked { sessions }) = UplinkMessage::decode(&mut buf).unwrap()
        else {
            panic!("not a revoked list")
        };
        assert_eq!(sessions.len(), MAX_REVOKED);
    }

    #[test]
    fn rejects_bad_messages() {
        let mut src = BytesMut::from(&[0xFF, 0xFF][..]);
        assert!(matches!(
            UplinkMessage::decode(&mut src),
            Err(DecodeError::Oversized { .. })
        ));
        let mut src = BytesMut::from(&[0, 2, 9, 0x10][..]);
        assert_eq!(
            UplinkMessage::decode(&mut src),
            Err(DecodeError::UnknownVersion(9))
        );
        let mut src = BytesMut::from(&[0, 3, 1, 0x10, 5][..]);
        assert!(UplinkMessage::decode(&mut src).is_err());
        assert_eq!(
            UplinkDatagram::decode(&[1, 1, 0, 0, 0, 1]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            UplinkDatagram::decode(&[1, 3, 0, 0, 0, 1, 1]),
            Err(DecodeError::UnknownType(3))
        );
        // A kind-2 datagram too short for its admission.
        assert_eq!(
            UplinkDatagram::decode(&[1, 2, 0, 0, 0, 1, 1]),
            Err(DecodeError::Truncated)
        );
    }

    fn admission(session: u32) -> Admission {
        Admission {
            session: SessionId(session),
            key: crate::admission::AdmissionKey([session as u8; 16]),
            lifetime_secs: 7200,
            quota: crate::admission::Quota {
                frames: 10,
                bytes: 1000,
                interval_secs: 60,
            },
        }
    }

    #[test]
    fn admitting_datagram_round_trips() {
        let frame = [1u8, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        let d = UplinkDatagram {
            flow: FlowId(9),
            admission: Some(admission(5)),
            frame: &frame,
        };
        let mut buf = Vec::new();
        d.encode(&mut buf);
        assert_eq!(buf.len(), d.encoded_len());
        assert_eq!(buf.len(), 6 + 34 + frame.len());
        assert_eq!(UplinkDatagram::decode(&buf), Ok(d));
        // An admission for session 0 is invalid.
        let mut bad = buf.clone();
        bad[6..10].copy_from_slice(&[0; 4]);
        assert!(UplinkDatagram::decode(&bad).is_err());
    }

    #[test]
    fn admit_lists_are_bounded() {
        let many = UplinkMessage::Admit {
            admissions: (1..100).map(admission).collect(),
        };
        let mut buf = BytesMut::new();
        many.encode(&mut buf);
        let Some(UplinkMessage::Admit { admissions }) = UplinkMessage::decode(&mut buf).unwrap()
        else {
            panic!("not an admit list")
        };
        assert_eq!(admissions.len(), MAX_ADMITS);
        for bad in [&[0u8, 3, 1, 0x14, 0][..], &[0, 4, 1, 0x15, 0, 0]] {
            let mut src = BytesMut::from(bad);
            assert!(UplinkMessage::decode(&mut src).is_err(), "{bad:?}");
        }
    }
}
