//! The plaintexts inside Noise: what a device or the core reads after decryption.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay_protocol::payload::{InitPayload, Message, ResponsePayload};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert_eq!(m.to_vec(), data);
    }
    let _ = InitPayload::decode(data);
    let _ = ResponsePayload::decode(data);
});
