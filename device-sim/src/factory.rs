//! The factory: `device-sim manufacture` makes factory-fresh devices, each in its own
//! [`DeviceDir`] with a factory key generated inside its sealed store, and writes the shipping
//! manifest the owner imports into the core to claim them.
//!
//! ```text
//!  manufacture(count, out, prefix, model)
//!    per device (threads): out/<serial>/ ─ kek (device-unique) ─ factory.key (generated inside)
//!                          ─ state.json
//!    then out/manifest.csv (atomically):  serial,factory_public_key,model
//! ```
//!
//! No secret is shared between devices: each has its own factory key and its own KEK (unless
//! `kek_file` is an absolute path, which puts every device's sealing key in one file, a
//! convenience for throwaway fleets, weaker than the default).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use relay_protocol::session::PublicKey;

use crate::device_dir::{DeviceDir, DeviceDirError, DEFAULT_KEK_FILE};
use crate::secure_element::{write_atomic, MAX_SERIAL_LEN};

/// The manifest's file name in the output directory.
pub const MANIFEST_FILE: &str = "manifest.csv";
/// The manifest's header line.
pub const MANIFEST_HEADER: &str = "serial,factory_public_key,model";
/// The most devices one `manufacture` makes.
pub const MAX_COUNT: usize = 1_000_000;

/// What to manufacture.
#[derive(Clone, Debug)]
pub struct ManufactureOptions {
    /// How many devices.
    pub count: usize,
    /// The output directory: one subdirectory per device, and the manifest.
    pub out: PathBuf,
    /// Serial numbers are this prefix and a zero-padded number from 1.
    pub prefix: String,
    /// The model written to the manifest and the state files.
    pub model: String,
    /// The KEK file: relative to each device's directory (one per device), or absolute (shared).
    pub kek_file: PathBuf,
}

impl ManufactureOptions {
    /// `count` devices in `out`, serials `dev-000001`…, model `relay-meter-1`, a KEK per device.
    pub fn new(count: usize, out: PathBuf) -> Self {
        Self {
            count,
            out,
            prefix: "dev-".into(),
            model: "relay-meter-1".into(),
            kek_file: PathBuf::from(DEFAULT_KEK_FILE),
        }
    }
}

/// Why manufacturing failed: the options or the local system.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// An option is out of range.
    #[error("{0}")]
    Usage(String),
    /// The output directory holds a manifest already.
    #[error("{}: exists; manufacture into a new directory", .0.display())]
    ManifestExists(PathBuf),
    /// A device could not be made (the devices made before it stay; no manifest is written).
    #[error("device {serial}: {source}")]
    Device {
        /// The device.
        serial: String,
        /// The cause.
        source: DeviceDirError,
    },
    /// The manifest could not be written.
    #[error("{}: {source}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: crate::secure_element::SealedStoreError,
    },
}

/// What was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManufactureSummary {
    /// Devices made.
    pub devices: usize,
    /// The first and last serial numbers.
    pub first: String,
    /// The last serial number.
    pub last: String,
    /// The manifest's path.
    pub manifest: PathBuf,
    /// How long it took.
    pub elapsed: Duration,
}

/// The serial number of device `n` (from 1) of `count`.
pub fn serial(prefix: &str, n: usize, count: usize) -> String {
    let width = count.to_string().len().max(6);
    format!("{prefix}{n:0width$}")
}

/// The longest serial number the core accepts.
pub const MAX_SERIAL: usize = 64;
/// The longest model the core accepts.
pub const MAX_MODEL: usize = 64;

fn check_prefix(prefix: &str) -> Result<(), FactoryError> {
    if prefix
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        Ok(())
    } else {
        Err(FactoryError::Usage(format!(
            "--prefix {prefix:?}: serial numbers are made of A-Z a-z 0-9 - _ ."
        )))
    }
}

fn check_model(model: &str) -> Result<(), FactoryError> {
    // As the core's manifest import: printable ASCII, no comma (a CSV field without quoting).
    if !model.is_empty()
        && model.len() <= MAX_MODEL
        && model
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b',')
    {
        Ok(())
    } else {
        Err(FactoryError::Usage(format!(
            "--model {model:?}: 1 to {MAX_MODEL} printable ASCII characters, no comma"
        )))
    }
}

/// Manufactures the devices and writes the manifest. `progress` is called with the number of
/// devices done so far (from several threads).
pub fn manufacture(
    opts: &ManufactureOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<ManufactureSummary, FactoryError> {
    if opts.count == 0 || opts.count > MAX_COUNT {
        return Err(FactoryError::Usage(format!(
            "--count must be 1 to {MAX_COUNT}"
        )));
    }
    check_prefix(&opts.prefix)?;
    check_model(&opts.model)?;
    let last = serial(&opts.prefix, opts.count, opts.count);
    if last.len() > MAX_SERIAL.min(MAX_SERIAL_LEN) || last.starts_with('.') {
        return Err(FactoryError::Usage(format!(
            "serial {last:?} is not usable (at most {MAX_SERIAL} characters, not starting with .)"
        )));
    }
    let manifest = opts.out.join(MANIFEST_FILE);
    if manifest.exists() {
        return Err(FactoryError::ManifestExists(manifest));
    }
    std::fs::create_dir_all(&opts.out).map_err(|source| FactoryError::Device {
        serial: String::new(),
        source: DeviceDirError::Io {
            path: opts.out.clone(),
            source,
        },
    })?;

    let start = Instant::now();
    let keys: Mutex<Vec<Option<PublicKey>>> = Mutex::new(vec![None; opts.count]);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<FactoryError>> = Mutex::new(None);
    // Each device costs a few fsyncs: threads overlap their waits.
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .clamp(1, 32)
        .min(opts.count);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.count {
                    return;
                }
                let serial = serial(&opts.prefix, i + 1, opts.count);
                match DeviceDir::manufacture(
                    &opts.out.join(&serial),
                    &serial,
                    &opts.model,
                    &opts.kek_file,
                ) {
                    Ok((_, key)) => {
                        lock(&keys)[i] = Some(key);
                        progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                    }
                    Err(source) => {
                        failed.store(true, Ordering::Relaxed);
                        lock(&error).get_or_insert(FactoryError::Device { serial, source });
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = lock(&error).take() {
        return Err(e);
    }

    let keys = keys.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut text = String::with_capacity(opts.count * 100);
    text.push_str(MANIFEST_HEADER);
    text.push('\n');
    for (i, key) in keys.iter().enumerate() {
        let Some(key) = key else {
            continue;
        };
        text.push_str(&format!(
            "{},{},{}\n",
            serial(&opts.prefix, i + 1, opts.count),
            key.to_hex(),
            opts.model
        ));
    }
    write_atomic(&opts.out, MANIFEST_FILE, text.as_bytes()).map_err(|source| {
        FactoryError::Manifest {
            path: manifest.clone(),
            source,
        }
    })?;
    Ok(ManufactureSummary {
        devices: opts.count,
        first: serial(&opts.prefix, 1, opts.count),
        last,
        manifest,
        elapsed: start.elapsed(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a manifest back: `(serial, factory public key, model)` per row.
pub fn read_manifest(path: &Path) -> Result<Vec<(String, PublicKey, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_HEADER) {
        return Err(format!(
            "{}: line 1: expected `{MANIFEST_HEADER}`",
            path.display()
        ));
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let bad = |what: &str| format!("{}: line {}: {what}", path.display(), i + 2);
            let mut f = line.split(',');
            let (Some(s), Some(k), Some(m), None) = (f.next(), f.next(), f.next(), f.next()) else {
                return Err(bad("expected three fields"));
            };
            let key = PublicKey::from_hex(k).map_err(|_| bad("bad factory_public_key"))?;
            Ok((s.to_owned(), key, m.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::secure_element::{KeySlot, SecureElement};
    use std::collections::HashSet;

    #[test]
    fn manufactures_distinct_devices_and_a_manifest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("batch");
        let opts = ManufactureOptions {
            prefix: "m-".into(),
            ..ManufactureOptions::new(25, out.clone())
        };
        let calls = AtomicUsize::new(0);
        let summary = manufacture(&opts, &|_| {
            calls.fetch_add(1, Ordering::Relaxed);
        })
        .expect("manufacture");
        assert_eq!(calls.load(Ordering::Relaxed), 25);
        assert_eq!(
            (summary.first.as_str(), summary.last.as_str()),
            ("m-000001", "m-000025")
        );
        let rows = read_manifest(&summary.manifest).expect("manifest");
        assert_eq!(rows.len(), 25);
        let keys: HashSet<_> = rows.iter().map(|(_, k, _)| *k).collect();
        assert_eq!(keys.len(), 25, "every factory key distinct");
        let keks: HashSet<_> = rows
            .iter()
            .map(|(s, _, _)| std::fs::read(out.join(s).join(DEFAULT_KEK_FILE)).expect("kek"))
            .collect();
        assert_eq!(keks.len(), 25, "every sealing key distinct");
        for (s, key, model) in &rows {
            assert_eq!(model, "relay-meter-1");
            let dir = DeviceDir::open(&out.join(s)).expect("open");
            let store = dir.open_store().expect("store");
            assert_eq!(store.slots(), vec![KeySlot::Factory]);
            assert_eq!(store.public(KeySlot::Factory).expect("factory"), *key);
        }
        // Never over an existing batch.
        assert!(matches!(
            manufacture(&opts, &|_| {}),
            Err(FactoryError::ManifestExists(_))
        ));
        for bad in [
            ManufactureOptions::new(0, out.clone()),
            ManufactureOptions {
                prefix: "a,b".into(),
                ..ManufactureOptions::new(1, tmp.path().join("x"))
            },
            ManufactureOptions {
                model: "".into(),
                ..ManufactureOptions::new(1, tmp.path().join("y"))
            },
        ] {
            assert!(matches!(
                manufacture(&bad, &|_| {}),
                Err(FactoryError::Usage(_))
            ));
        }
    }
}
