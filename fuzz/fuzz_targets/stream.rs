//! What a stream carries from the network (`docs/protocol.md` §13): length prefixes as the gateway
//! and the core read them, data frames as the core opens them, acks as a device opens them, and
//! StreamOpen messages.
#![no_main]
use std::sync::OnceLock;
use std::time::Instant;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay_protocol::payload::{Message, ResponsePayload};
use relay_protocol::session::{DeviceSession, Responder, StaticKeypair, Transport};
use relay_protocol::stream::{split_frame, CoreStream, DeviceStream, UploadId};
use relay_protocol::{DeviceFrame, SessionId};

/// One real session, device end and core end.
fn sessions() -> &'static (DeviceSession, Transport) {
    static S: OnceLock<(DeviceSession, Transport)> = OnceLock::new();
    S.get_or_init(|| {
        let core = Responder::new(StaticKeypair::from_private(&[7; 32]).expect("fixed key"));
        let mut device = DeviceSession::new(
            StaticKeypair::from_private(&[9; 32]).expect("fixed key"),
            *core.public(),
        );
        let now = Instant::now();
        let init = device
            .start_handshake(SessionId(1), 1, now)
            .expect("handshake");
        let Ok(DeviceFrame::HandshakeInit { sender, noise }) = DeviceFrame::decode(&init) else {
            panic!("not an init")
        };
        let mut resp = Vec::new();
        let t = core
            .read_init(sender, noise)
            .expect("init")
            .accept(SessionId(2), &ResponsePayload::accept(60), now, &mut resp)
            .expect("accept");
        let mut out = Vec::new();
        device
            .handle_datagram(&resp, now, &mut out)
            .expect("response");
        (device, t)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = split_frame(&mut buf) {
        assert!(!frame.is_empty());
    }
    let (device, core) = sessions();
    let upload = UploadId([4; 16]);
    let core_stream = CoreStream::new(core.stream_keys(&[5; 16], &upload));
    let mut out = Vec::new();
    let _ = core_stream.open_chunk(data, &mut out);
    let transport = device.current().expect("established");
    let mut device_stream = DeviceStream::new(transport.stream_keys(&[5; 16], &upload));
    let _ = device_stream.open_ack(data);
    if let Ok(Message::StreamOpen(open)) = Message::decode(data) {
        assert_eq!(Message::StreamOpen(open).to_vec(), data);
    }
});
