//! What the admission and cookie checks read from the network, and a sleeping device's stored
//! session: a gateway verifying tags, the core checking cookie MACs, a device decoding its snapshot.
#![no_main]
use std::sync::Mutex;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use relay_protocol::cookie::CookieJar;
use relay_protocol::session::{SessionSnapshot, StaticKeypair};
use relay_protocol::{Admission, AdmissionKey};

static JAR: Mutex<Option<CookieJar>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let _ = AdmissionKey([3; 16]).verify(data);
    if let Ok(a) = Admission::decode(data) {
        let mut out = Vec::new();
        a.encode(&mut out);
        assert_eq!(out, data);
    }
    if let Ok(s) = SessionSnapshot::decode(data) {
        assert_eq!(s.encode(), data);
    }
    let mut jar = JAR.lock().unwrap_or_else(|p| p.into_inner());
    let jar = jar.get_or_insert_with(|| {
        let core = StaticKeypair::from_private(&[7; 32]).expect("fixed key");
        CookieJar::new(core.public(), Instant::now()).expect("randomness")
    });
    assert!(!jar.check(data, b"g-fuzz", Instant::now()) || data.len() >= 16);
});
