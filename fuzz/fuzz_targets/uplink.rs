//! Uplink datagrams and control-stream messages: what a core or gateway receives from the other.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay_protocol::{UplinkDatagram, UplinkMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = UplinkDatagram::decode(data) {
        let mut out = Vec::new();
        d.encode(&mut out);
        assert_eq!(out, data);
    }
    // A stream delivered in arbitrary pieces: decode until incomplete or an error.
    let mut src = BytesMut::new();
    for chunk in data.chunks(7) {
        src.extend_from_slice(chunk);
        loop {
            match UplinkMessage::decode(&mut src) {
                Ok(Some(m)) => {
                    let mut again = BytesMut::new();
                    m.encode(&mut again);
                    assert_eq!(UplinkMessage::decode(&mut again), Ok(Some(m)));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
