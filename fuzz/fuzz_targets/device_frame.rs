//! Device-link frames: whatever a device (or anyone on the field network) sends the gateway.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay_protocol::DeviceFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = DeviceFrame::decode(data) {
        // What parses re-encodes to the same bytes.
        assert_eq!(frame.to_vec(), data);
    }
});
