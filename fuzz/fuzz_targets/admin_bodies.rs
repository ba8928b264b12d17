//! The admin API's request bodies: shipping manifests and activation plans (CSV) and signed
//! releases (JSON), as any client on the admin port can send them. Parsing must never panic, and
//! every row reported bad must name a line that exists.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lines = data.split(|b| *b == b'\n').count();
    let manifest = core_stub::manifest::parse_manifest(data);
    for e in manifest.errors.iter() {
        assert!(e.row >= 1 && e.row <= lines.max(1), "row {} of {lines}", e.row);
    }
    let plan = core_stub::manifest::parse_plan(data);
    for e in plan.errors.iter() {
        assert!(e.row >= 1 && e.row <= lines.max(1), "row {} of {lines}", e.row);
    }
    let _ = core_stub::release::ReleaseDocument::from_json(data);
});
