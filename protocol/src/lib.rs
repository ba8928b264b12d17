//! `relay-protocol`: the wire formats of the relay gateway and the end-to-end session between a
//! device and the core, as pure state machines with no I/O.
//!
//! It does not open sockets, read clocks or spawn tasks: bytes and `now: Instant` go in, bytes and
//! events come out, so the daemons, the device library and deterministic in-memory tests all drive
//! the same code. `docs/protocol.md` is the normative description of every byte here.
//!
//! Two halves, split along the trust boundary:
//!
//! - always built: [`frame`] (device-link frames), [`uplink`] (gateway↔core messages),
//!   [`replay`] (the sliding window). The gateway links only these: it parses headers to drop junk
//!   and route replies, and can never decrypt.
//! - feature `session` (on by default, off for the gateway): [`session`] (Noise IK handshake and
//!   transport, via snow), [`payload`] (the plaintexts inside) and [`secure_element`] (the
//!   device's key store, whose keys the handshake uses without reading them).
//!
//! ```text
//!  device                         gateway (untrusted)                   core
//!  DeviceSession ── DeviceFrame ─▶ frame::DeviceFrame::decode  ──▶  UplinkDatagram ─▶ Responder
//!   (session)        UDP ≤1200 B   FlowId ↔ device address      QUIC datagram      Transport
//!                                  (no keys, no plaintext)                         (session)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// In tests a panic is the failure report; the lint guards the library code.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admission;
pub mod frame;
pub mod replay;
pub mod stream;
pub mod uplink;

#[cfg(feature = "session")]
pub mod cookie;
#[cfg(feature = "session")]
pub mod payload;
#[cfg(feature = "session")]
pub mod secure_element;
#[cfg(feature = "session")]
pub mod session;

#[cfg(all(test, feature = "session"))]
mod tests;

pub use admission::{Admission, AdmissionKey, Quota};
pub use frame::{DeviceFrame, FrameType, SessionId};
pub use uplink::{FlowId, UplinkDatagram, UplinkMessage};

/// Why bytes from a peer could not be parsed. Every variant is the sender's fault (or the path's);
/// the receiver drops the input, counts the reason and carries on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its type requires.
    #[error("truncated")]
    Truncated,
    /// Longer than the protocol allows.
    #[error("oversized: {len} bytes, at most {max}")]
    Oversized {
        /// The length seen.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version byte this implementation does not speak.
    #[error("unknown version {0}")]
    UnknownVersion(u8),
    /// A type byte this implementation does not know.
    #[error("unknown type {0:#04x}")]
    UnknownType(u8),
    /// A field outside its allowed values.
    #[error("invalid: {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// A short, fixed label for metrics (`reason="…"`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Oversized { .. } => "oversized",
            Self::UnknownVersion(_) => "unknown_version",
            Self::UnknownType(_) => "unknown_type",
            Self::Invalid(_) => "invalid",
        }
    }
}
