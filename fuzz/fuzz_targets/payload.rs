//! The plaintexts inside Noise: what a device or the core reads after decryption. Extensions may
//! arrive in any order and unknown ones are skipped, so the check is that whatever decodes
//! re-encodes to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay_protocol::payload::{InitPayload, Message, ResponsePayload};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let again = m.to_vec();
        assert_eq!(Message::decode(&again).as_ref(), Ok(&m));
    }
    if let Ok(p) = InitPayload::decode(data) {
        let mut again = Vec::new();
        p.encode(&mut again);
        assert_eq!(InitPayload::decode(&again), Ok(p));
    }
    if let Ok(p) = ResponsePayload::decode(data) {
        let mut again = Vec::new();
        p.encode(&mut again);
        assert_eq!(ResponsePayload::decode(&again), Ok(p));
    }
});
