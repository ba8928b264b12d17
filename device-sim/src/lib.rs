//! `device-sim`: the device side of the relay as a library, and a fleet of simulated smart meters
//! that load the gateway and the core with real end-to-end traffic.
//!
//! Each simulated meter holds its own Noise IK session with the core (through
//! `relay_protocol::session::DeviceSession`), so the gateway in between only ever forwards
//! ciphertext. A meter queues readings, sends at most a window of them at a time, retransmits with
//! exponential backoff until the core acknowledges them (an ack means "durably stored"), rekeys
//! when the core's policy says so, retries handshakes with backoff and jitter, and starts a new
//! handshake when the core goes silent (after a core restart lost the session, say).
//!
//! Two kinds of device. Pre-provisioned meters read their private keys from `fleet.keys` and hold
//! them in process memory (never logged or printed); they keep no state between runs, and their
//! reading sequence numbers stay unique because they start from the run's start time
//! ([`meter::seq_base`]). Devices with a secure element, made by `device-sim manufacture`
//! ([`factory`]), hold their keys in a [`secure_element::SealedKeyStore`] in their own directory
//! ([`device_dir`]) and run the credential lifecycle: provisioning with the factory identity,
//! configuration, credential updates, refusals, release to another operator; they persist what
//! they must remember and continue from it after a restart. It does not measure the gateway or
//! the core from the inside: it reports what the devices saw.
//!
//! Main types:
//!
//! - [`meter::Meter`]: one meter as an I/O-free state machine (`queue_reading`,
//!   `handle_datagram`, `poll_transmit`, `poll_event`, `poll_timeout`; `now: Instant` passed in),
//!   with [`meter::MeterEvent`], [`meter::MeterConfig`] and [`meter::MeterStats`];
//!   [`meter::Meter::with_element`] adds the device rule of the credential lifecycle (a library a
//!   real device could reuse: the element does the key operations, the caller the I/O and the
//!   persistence of [`meter::DeviceMemory`]), with [`meter::CrashPoint`]s for kill tests;
//!   [`meter::reading_payload`] makes the recognisable reading bodies tests look for.
//! - [`device_dir::DeviceDir`]: a device's directory (sealed key files, KEK, `state.json`, a
//!   sleepy device's sealed session), and
//!   [`factory::manufacture`]: factory-fresh devices and the shipping manifest.
//! - [`fleet::run_fleet`]: N meters on tokio, one task and one UDP socket each, configured by
//!   [`fleet::FleetOptions`] (activation waves, sleepy devices that persist and resume their
//!   session, handovers, `RELAY_CRASH_AT`), ending in a [`fleet::FleetSummary`] (and live
//!   [`fleet::FleetProgress`]).
//! - [`config`]: `device-sim.toml` and `fleet.keys`, validated at the edge.
//! - [`report`] and [`cli`]: the progress line, the summary table and the `device-sim` command.
//! - [`secure_element::SealedKeyStore`]: the device's secure element in software (factory,
//!   subscription and next keys generated inside, sealed at rest, committed and erased
//!   atomically, used by the handshake through `relay_protocol::secure_element::SecureElement`,
//!   never read out).
//! - [`flood`]: `device-sim flood` and `device-sim forge`, forged handshakes from many loopback
//!   sources and forged admitted frames for given session ids (flood-resistance tests, the bench).
//! - [`probe`]: `device-sim probe`, whether the core answers a device directly (field-network
//!   isolation checks).
//! - [`video`]: a video upload over the stream transport (TCP to the gateway's or the core's
//!   stream port, `docs/protocol.md` §13): [`video::upload`] with [`video::UploadOptions`] →
//!   [`video::UploadReport`], resumed where the core's acks say after any failure, its
//!   `StreamOpen` tickets from whoever holds the session ([`video::TicketSource`]:
//!   [`meter::Meter::open_stream`] through [`video::ChannelTickets`] or
//!   [`video::SessionTickets`]); [`video::video_bytes`], the deterministic content.
//! - [`camera`]: `device-sim camera`, one device sending status readings over UDP and, after an
//!   accident, its video over the stream transport ([`camera::run_camera`] →
//!   [`camera::CameraReport`]).
//! - [`mod@bench`]: `device-sim bench`, which starts the real `core-stub` and `gateway` and measures
//!   relay against direct throughput, the core's handshake rate against snow's, memory per
//!   idle device, the gateway's forged-frame drop rate against a plain socket's receive rate,
//!   real handshakes under a flood, and bulk video through the gateway against direct and raw TCP
//!   ([`bench::run_bench`] → [`bench::BenchReport`]).
//!
//! ```text
//!  device-sim.toml, fleet.keys ─▶ config ─┐
//!  manufacture ─▶ DIR/<serial>/ (DeviceDir) ┴▶ cli ─▶ FleetOptions ─▶ fleet::run_fleet
//!                                                                    │ one task per device
//!   reading tick ─▶ Meter::queue_reading                              ▼
//!   Meter::poll_transmit ─▶ UdpSocket ══ UDP ══▶ gateway ══ QUIC ══▶ core (Noise responder, store)
//!   Meter::handle_datagram ◀─ UdpSocket ◀══ acks ═══════════════════════╝  (or --via direct)
//!        └─▶ MeterEvent::Acked ─▶ latencies, counters ─▶ FleetSummary ─▶ report (table | JSON)
//!
//!  camera: Meter (status readings, UDP) ─ Meter::open_stream ─▶ ticket ─▶ video::upload
//!          ══ TCP: length | StreamOpen, StreamData… ══▶ gateway ══ QUIC stream ══▶ core
//!          ◀═ StreamAck (resume point, Complete + SHA-256) ═══════════════════╝ (or direct)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod camera;
pub mod cli;
pub mod config;
pub mod device_dir;
pub mod factory;
pub mod fleet;
pub mod flood;
pub mod meter;
pub mod probe;
pub mod report;
pub mod secure_element;
pub mod video;

#[cfg(test)]
mod test_core;
#[cfg(test)]
mod test_net;

pub use config::{load_config, load_fleet, parse_fleet, ConfigError, DeviceIdentity, SimConfig};
pub use device_dir::DeviceDir;
pub use fleet::{run_fleet, DeviceResult, FleetError, FleetOptions, FleetProgress, FleetSummary};
pub use meter::{
    reading_payload, seq_base, CrashPoint, DeviceMemory, Meter, MeterConfig, MeterEvent,
    MeterStats, Timebase,
};
