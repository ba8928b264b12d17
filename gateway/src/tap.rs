//! Test hooks: a tap that sees every byte the gateway exchanges with devices and with the core.
//!
//! End-to-end tests install one to show that nothing but ciphertext and headers passes through the
//! gateway. Without a tap the cost is one `Option` check per frame.

use std::sync::Arc;

/// Where in the gateway a byte string was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TapPoint {
    /// A datagram received from a device, before any check.
    DeviceRx,
    /// A datagram sent to a device.
    DeviceTx,
    /// A QUIC payload sent to the core: a datagram, or bytes written to the control stream or to
    /// a device stream's QUIC stream.
    UplinkTx,
    /// A QUIC payload received from the core: a datagram, or bytes read from the control stream or
    /// from a device stream's QUIC stream.
    UplinkRx,
    /// Bytes read from a device's TCP stream (one length-prefixed frame at a time, before any
    /// check).
    StreamRx,
    /// Bytes written to a device's TCP stream.
    StreamTx,
}

/// Receives a copy of the bytes at each [`TapPoint`]. Called on the forwarding path: keep it quick.
pub trait FrameTap: Send + Sync {
    /// `bytes` passed `point`.
    fn record(&self, point: TapPoint, bytes: &[u8]);
}

/// Optional instrumentation of a running gateway; `Hooks::default()` in production.
#[derive(Default, Clone)]
pub struct Hooks {
    /// Sees every byte at the device link and the uplink.
    pub tap: Option<Arc<dyn FrameTap>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("tap", &self.tap.as_ref().map(|_| "FrameTap"))
            .finish()
    }
}

impl Hooks {
    /// Hands `bytes` to the tap, if there is one.
    #[inline]
    pub(crate) fn record(&self, point: TapPoint, bytes: &[u8]) {
        if let Some(tap) = &self.tap {
            tap.record(point, bytes);
        }
    }
}
