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
//! What it does not do: the fleet does not use a secure element yet: device private keys are read
//! from `fleet.keys` and live in process memory (never logged or printed); [`secure_element`] is
//! the key store they will move to. It keeps no state between runs; reading sequence numbers stay
//! unique across runs because they start from the run's start time ([`meter::seq_base`]). It does
//! not measure the gateway or the core from the inside: it reports what the devices saw.
//!
//! Main types:
//!
//! - [`meter::Meter`]: one meter as an I/O-free state machine (`queue_reading`,
//!   `handle_datagram`, `poll_transmit`, `poll_event`, `poll_timeout`; `now: Instant` passed in),
//!   with [`meter::MeterEvent`], [`meter::MeterConfig`] and [`meter::MeterStats`];
//!   [`meter::reading_payload`] makes the recognisable reading bodies tests look for.
//! - [`fleet::run_fleet`]: N meters on tokio, one task and one UDP socket each, configured by
//!   [`fleet::FleetOptions`], ending in a [`fleet::FleetSummary`] (and live
//!   [`fleet::FleetProgress`]).
//! - [`config`]: `device-sim.toml` and `fleet.keys`, validated at the edge.
//! - [`report`] and [`cli`]: the progress line, the summary table and the `device-sim` command.
//! - [`secure_element::SealedKeyStore`]: the device's secure element in software (factory and
//!   subscription keys generated inside, sealed at rest, used by the handshake through
//!   `relay_protocol::secure_element::SecureElement`, never read out).
//! - [`probe`]: `device-sim probe`, whether the core answers a device directly (field-network
//!   isolation checks).
//! - [`mod@bench`]: `device-sim bench`, which starts the real `core-stub` and `gateway` and measures
//!   relay against direct throughput, the core's handshake rate against snow's, and memory per
//!   idle device ([`bench::run_bench`] → [`bench::BenchReport`]).
//!
//! ```text
//!  device-sim.toml, fleet.keys ─▶ config ─▶ cli ─▶ FleetOptions ─▶ fleet::run_fleet
//!                                                                    │ one task per device
//!   reading tick ─▶ Meter::queue_reading                              ▼
//!   Meter::poll_transmit ─▶ UdpSocket ══ UDP ══▶ gateway ══ QUIC ══▶ core (Noise responder, store)
//!   Meter::handle_datagram ◀─ UdpSocket ◀══ acks ═══════════════════════╝  (or --via direct)
//!        └─▶ MeterEvent::Acked ─▶ latencies, counters ─▶ FleetSummary ─▶ report (table | JSON)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod meter;
pub mod probe;
pub mod report;
pub mod secure_element;

#[cfg(test)]
mod test_core;

pub use config::{load_config, load_fleet, parse_fleet, ConfigError, DeviceIdentity, SimConfig};
pub use fleet::{run_fleet, DeviceResult, FleetError, FleetOptions, FleetProgress, FleetSummary};
pub use meter::{reading_payload, seq_base, Meter, MeterConfig, MeterEvent, MeterStats, Timebase};
