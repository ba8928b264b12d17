use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_protocol::payload::ReadingSeq;
use relay_protocol::session::DeviceSession;

use super::*;
use crate::meter::{Meter, MeterConfig, MeterEvent, Timebase};
use crate::test_core::TestCore;

const SERIAL: &str = "meter-00042";

struct Device {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    kek: PathBuf,
}

impl Device {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("keys");
        let kek = tmp.path().join("hw").join("kek");
        Self {
            _tmp: tmp,
            dir,
            kek,
        }
    }

    fn open(&self) -> Result<SealedKeyStore, SealedStoreError> {
        self.open_as(SERIAL)
    }

    fn open_as(&self, serial: &str) -> Result<SealedKeyStore, SealedStoreError> {
        SealedKeyStore::open(
            &self.dir,
            serial,
            KeyEncryptionKey::load_or_create(&self.kek)?,
        )
    }

    /// "Manufacture": a fresh store with its factory key.
    fn manufacture(&self) -> (SealedKeyStore, PublicKey) {
        let store = self.open().expect("open");
        let public = store.generate(KeySlot::Factory).expect("factory key");
        (store, public)
    }
}

fn dh(store: &dyn SecureElement, slot: KeySlot, peer: &PublicKey) -> [u8; 32] {
    let mut out = [0; 32];
    store.dh(slot, &peer.0, &mut out).expect("dh");
    out
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn keys_survive_a_restart_and_work_the_same() {
    let device = Device::new();
    let (store, factory) = device.manufacture();
    assert_eq!(store.slots(), vec![KeySlot::Factory]);
    let subscription = store
        .generate(KeySlot::Subscription)
        .expect("subscription key");
    assert_ne!(factory, subscription);
    let peer = *StaticKeypair::generate().expect("keypair").public();
    let before = dh(&store, KeySlot::Factory, &peer);
    drop(store);

    let store = device.open().expect("reopen");
    assert_eq!(store.slots(), vec![KeySlot::Factory, KeySlot::Subscription]);
    assert_eq!(store.public(KeySlot::Factory).expect("factory"), factory);
    assert_eq!(
        store.public(KeySlot::Subscription).expect("subscription"),
        subscription
    );
    assert_eq!(dh(&store, KeySlot::Factory, &peer), before);
    assert!(matches!(
        store.generate(KeySlot::Factory),
        Err(KeyStoreError::Occupied(KeySlot::Factory))
    ));
}

#[test]
fn no_secret_is_shared_between_devices() {
    let (a, b) = (Device::new(), Device::new());
    let (_, fa) = a.manufacture();
    let (_, fb) = b.manufacture();
    assert_ne!(fa, fb);
    assert_ne!(
        fs::read(&a.kek).expect("kek"),
        fs::read(&b.kek).expect("kek")
    );
}

#[cfg(unix)]
#[test]
fn secret_files_are_0600_and_the_directory_0700() {
    let device = Device::new();
    let (store, _) = device.manufacture();
    assert_eq!(mode(&store.key_file(KeySlot::Factory)), 0o600);
    assert_eq!(mode(&device.kek), 0o600);
    assert_eq!(mode(&device.dir), 0o700);
    assert_eq!(
        fs::metadata(store.key_file(KeySlot::Factory))
            .expect("meta")
            .len(),
        KEY_FILE_LEN as u64
    );

    // A key file someone made group-readable is refused, not used.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        store.key_file(KeySlot::Factory),
        fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    assert!(matches!(
        device.open(),
        Err(SealedStoreError::Permissions { mode: 0o640, .. })
    ));
}

#[test]
fn every_altered_byte_and_every_truncation_fails_cleanly() {
    let device = Device::new();
    let (store, _) = device.manufacture();
    let path = store.key_file(KeySlot::Factory);
    let good = fs::read(&path).expect("read");
    drop(store);

    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        fs::write(&path, &bad).expect("write");
        match device.open() {
            Err(SealedStoreError::Malformed { .. }) if i < HEADER_LEN => {}
            Err(SealedStoreError::Unseal { path: p }) if i >= HEADER_LEN => assert_eq!(p, path),
            other => panic!("byte {i}: {other:?}"),
        }
    }
    for len in (0..good.len()).chain([good.len() + 1]) {
        let mut bad = good.clone();
        bad.resize(len, 0);
        fs::write(&path, &bad).expect("write");
        let err = device.open().expect_err("truncated");
        assert!(
            matches!(err, SealedStoreError::Malformed { .. }),
            "length {len}: {err:?}"
        );
        assert!(err.to_string().contains("factory.key"), "{err}");
    }
    fs::write(&path, &good).expect("write");
    assert!(device.open().is_ok());
}

#[test]
fn a_key_file_opens_only_for_its_device_slot_and_kek() {
    let device = Device::new();
    let (store, _) = device.manufacture();
    let factory = store.key_file(KeySlot::Factory);
    drop(store);

    // Another serial number (the file copied to another device with the same stand-in KEK).
    assert!(matches!(
        device.open_as("meter-00043"),
        Err(SealedStoreError::Unseal { .. })
    ));

    // The factory key moved into the subscription slot.
    let subscription = device.dir.join("subscription.key");
    fs::rename(&factory, &subscription).expect("rename");
    assert!(matches!(
        device.open(),
        Err(SealedStoreError::Unseal { .. })
    ));
    fs::rename(&subscription, &factory).expect("rename");

    // Another KEK.
    let other = KeyEncryptionKey::generate().expect("kek");
    assert!(matches!(
        SealedKeyStore::open(&device.dir, SERIAL, other),
        Err(SealedStoreError::Unseal { .. })
    ));
    assert!(device.open().is_ok());
}

#[test]
fn a_crash_before_rename_never_leaves_a_torn_key() {
    let device = Device::new();
    let (store, factory) = device.manufacture();
    let sealed = fs::read(store.key_file(KeySlot::Factory)).expect("read");
    drop(store);

    // What a crash part-way through `write_atomic` leaves: temporary files, some partly written,
    // for a slot being generated and for the slot that already holds a key.
    let leftovers = [
        device.dir.join(".subscription.key.tmp-00112233"),
        device.dir.join(".subscription.key.tmp-deadbeef"),
        device.dir.join(".factory.key.tmp-0badc0de"),
    ];
    fs::write(&leftovers[0], &sealed[..KEY_FILE_LEN / 2]).expect("write");
    fs::write(&leftovers[1], b"").expect("write");
    fs::write(&leftovers[2], [0xff; KEY_FILE_LEN]).expect("write");

    let store = device.open().expect("open after crash");
    assert_eq!(
        store.slots(),
        vec![KeySlot::Factory],
        "no torn subscription key"
    );
    assert_eq!(
        store.public(KeySlot::Factory).expect("factory"),
        factory,
        "the old key intact"
    );
    for l in &leftovers {
        assert!(!l.exists(), "{} removed", l.display());
    }
    // The interrupted generation can simply run again.
    store.generate(KeySlot::Subscription).expect("subscription");
    let names: Vec<_> = fs::read_dir(&device.dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["factory.key", "subscription.key"]);
}

#[test]
fn kek_file_is_created_once_and_checked() {
    let device = Device::new();
    let (_, factory) = device.manufacture();
    let kek = fs::read(&device.kek).expect("kek");
    assert_eq!(kek.len(), KEK_LEN);
    let store = device.open().expect("reopen with the same KEK");
    assert_eq!(store.public(KeySlot::Factory).expect("factory"), factory);
    assert_eq!(fs::read(&device.kek).expect("kek"), kek, "not regenerated");

    fs::write(&device.kek, &kek[..KEK_LEN - 1]).expect("truncate");
    assert!(matches!(
        KeyEncryptionKey::load_or_create(&device.kek),
        Err(SealedStoreError::Malformed { .. })
    ));
}

#[test]
fn debug_never_prints_a_private_key_or_the_kek() {
    let device = Device::new();
    let kek_store = device.open().expect("open");
    // Seal a key we know, as `generate` would have, to look for it in the output.
    let known = [0x5a; KEY_LEN];
    let sealed = kek_store
        .seal(KeySlot::Factory, &known, &SystemRandom::new())
        .expect("seal");
    write_atomic(&device.dir, "factory.key", &sealed).expect("write");
    drop(kek_store);
    let store = device.open().expect("open");
    let kek = fs::read(&device.kek).expect("kek");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let shown = format!(
        "{store:?} {:?}",
        KeyEncryptionKey::load_or_create(&device.kek).expect("kek")
    );
    assert!(
        shown.contains(SERIAL) && shown.contains("redacted"),
        "{shown}"
    );
    // Neither as hex nor as a byte list (0x5a is 90).
    for secret in [
        hex(&known),
        hex(&kek),
        "90, 90".to_string(),
        format!("{:?}", &kek[..4]),
    ] {
        assert!(!shown.contains(secret.trim_matches(['[', ']'])), "{shown}");
    }
}

#[test]
fn a_meter_handshakes_with_its_sealed_factory_key() {
    let device = Device::new();
    let (store, factory) = device.manufacture();
    let mut core = TestCore::new();
    let start = Instant::now();
    let session = DeviceSession::with_key_store(Arc::new(store), KeySlot::Factory, core.public())
        .expect("session");
    let mut meter = Meter::with_session(
        SERIAL,
        session,
        MeterConfig::default(),
        Timebase::new(start, 1_700_000_000_000),
        1,
    );
    assert_eq!(meter.public(), &factory);
    meter
        .queue_reading(ReadingSeq(1), b"kwh=1.0".to_vec(), start)
        .expect("queue");
    let mut now = start;
    let mut acked = false;
    for _ in 0..20 {
        while let Some(up) = meter.poll_transmit(now) {
            for down in core.handle(&up, now) {
                meter.handle_datagram(&down, now).expect("datagram");
            }
        }
        while let Some(event) = meter.poll_event() {
            acked |= matches!(
                event,
                MeterEvent::Acked {
                    seq: ReadingSeq(1),
                    ..
                }
            );
        }
        if acked {
            break;
        }
        now += Duration::from_millis(100);
    }
    assert!(acked, "the reading was acknowledged");
    assert!(
        core.store.contains_key(&factory),
        "the core stored it under the factory key"
    );
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    names
}

#[test]
fn commit_moves_next_to_subscription_durably() {
    let device = Device::new();
    let (store, factory) = device.manufacture();
    let old = store.generate(KeySlot::Subscription).expect("subscription");
    let next = store.generate(KeySlot::Next).expect("next");
    let peer = *StaticKeypair::generate().expect("keypair").public();
    let next_dh = dh(&store, KeySlot::Next, &peer);

    store
        .commit(KeySlot::Next, KeySlot::Subscription)
        .expect("commit");
    assert_eq!(store.slots(), vec![KeySlot::Factory, KeySlot::Subscription]);
    assert_eq!(store.public(KeySlot::Subscription).expect("sub"), next);
    assert_ne!(next, old);
    assert_eq!(dh(&store, KeySlot::Subscription, &peer), next_dh);
    assert_eq!(file_names(&device.dir), ["factory.key", "subscription.key"]);
    drop(store);

    // After a restart: the committed key, sealed for its new slot.
    let store = device.open().expect("reopen");
    assert_eq!(store.slots(), vec![KeySlot::Factory, KeySlot::Subscription]);
    assert_eq!(store.public(KeySlot::Subscription).expect("sub"), next);
    assert_eq!(store.public(KeySlot::Factory).expect("factory"), factory);
    assert_eq!(dh(&store, KeySlot::Subscription, &peer), next_dh);
    #[cfg(unix)]
    assert_eq!(mode(&store.key_file(KeySlot::Subscription)), 0o600);

    // Nothing to move, and the factory identity never moves nor is replaced.
    assert!(matches!(
        store.commit(KeySlot::Next, KeySlot::Subscription),
        Err(KeyStoreError::Empty(KeySlot::Next))
    ));
    assert!(store
        .commit(KeySlot::Subscription, KeySlot::Factory)
        .is_err());
    assert!(store.commit(KeySlot::Factory, KeySlot::Next).is_err());
    assert_eq!(store.public(KeySlot::Factory).expect("factory"), factory);
}

#[test]
fn erase_destroys_a_key_but_never_the_factory_identity() {
    let device = Device::new();
    let (store, factory) = device.manufacture();
    store.generate(KeySlot::Next).expect("next");
    store.erase(KeySlot::Next).expect("erase");
    assert_eq!(store.slots(), vec![KeySlot::Factory]);
    store
        .erase(KeySlot::Next)
        .expect("erasing an empty slot is nothing");
    assert!(store.erase(KeySlot::Factory).is_err());
    assert_eq!(file_names(&device.dir), ["factory.key"]);
    // The slot can be generated afresh: a different key.
    let again = store.generate(KeySlot::Next).expect("next again");
    drop(store);
    let store = device.open().expect("reopen");
    assert_eq!(store.public(KeySlot::Next).expect("next"), again);
    assert_eq!(store.public(KeySlot::Factory).expect("factory"), factory);
}

#[test]
fn a_crash_inside_a_commit_leaves_the_key_in_both_slots_and_a_second_commit_finishes() {
    let device = Device::new();
    let (store, _) = device.manufacture();
    store.generate(KeySlot::Subscription).expect("subscription");
    let next = store.generate(KeySlot::Next).expect("next");
    // The first step only (sealed for the destination, renamed into place), then the "crash".
    store
        .copy_sealed(KeySlot::Next, KeySlot::Subscription)
        .expect("first step");
    drop(store);

    let store = device.open().expect("open after crash");
    assert_eq!(store.slots(), KeySlot::ALL.to_vec());
    assert_eq!(store.public(KeySlot::Next).expect("next"), next);
    assert_eq!(store.public(KeySlot::Subscription).expect("sub"), next);
    // The device rule handshakes with Next and commits again: idempotent.
    store
        .commit(KeySlot::Next, KeySlot::Subscription)
        .expect("commit again");
    assert_eq!(store.slots(), vec![KeySlot::Factory, KeySlot::Subscription]);
    drop(store);
    let store = device.open().expect("reopen");
    assert_eq!(store.public(KeySlot::Subscription).expect("sub"), next);
    assert_eq!(file_names(&device.dir), ["factory.key", "subscription.key"]);

    // A crash before the rename: a leftover temporary file, the old arrangement intact.
    let other = store.generate(KeySlot::Next).expect("next");
    let sealed = fs::read(store.key_file(KeySlot::Next)).expect("read");
    drop(store);
    fs::write(
        device.dir.join(".subscription.key.tmp-0123abcd"),
        &sealed[..KEY_FILE_LEN - 3],
    )
    .expect("write");
    let store = device.open().expect("open after crash");
    assert_eq!(store.public(KeySlot::Subscription).expect("sub"), next);
    assert_eq!(store.public(KeySlot::Next).expect("next"), other);
    assert_eq!(
        file_names(&device.dir),
        ["factory.key", "next.key", "subscription.key"]
    );
}
