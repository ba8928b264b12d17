//! The session endpoints fed arbitrary datagrams: the core's responder and an established device.
#![no_main]
use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use relay_protocol::session::{DeviceSession, Responder, StaticKeypair};
use relay_protocol::{DeviceFrame, SessionId};

fn responder() -> &'static Responder {
    static R: OnceLock<Responder> = OnceLock::new();
    R.get_or_init(|| Responder::new(StaticKeypair::from_private(&[7; 32]).expect("fixed key")))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(DeviceFrame::HandshakeInit { sender, noise }) = DeviceFrame::decode(data) {
        let _ = responder().read_init(sender, noise);
    }
    let mut device = DeviceSession::new(
        StaticKeypair::from_private(&[9; 32]).expect("fixed key"),
        *responder().public(),
    );
    let now = Instant::now();
    let _ = device.start_handshake(SessionId(1), 1, now);
    let mut out = Vec::new();
    let _ = device.handle_datagram(data, now, &mut out);
});
