//! A simulated device's persistent storage: one directory per device, holding its secure element
//! (the [`SealedKeyStore`]'s key files and the KEK standing for the chip's sealing key) and a
//! small state file. A restarted device continues from it.
//!
//! ```text
//!  DIR/<serial>/                  0700
//!    kek                          0600  32 bytes: the device-unique sealing key (hardware stand-in)
//!    factory.key                  0600  sealed factory key (from manufacture, never replaced)
//!    subscription.key             0600  sealed subscription key (after provisioning)
//!    next.key                     0600  sealed key of a switch in progress (rarely present)
//!    state.json                   0600  DeviceState, written atomically (temp, fsync, rename,
//!                                       fsync dir)
//!    session.sealed               0600  a sleepy device's persisted session (see below), sealed
//!                                       under the KEK like the key files, written atomically
//! ```
//!
//! `session.sealed` (only while the device holds a session it may resume) is the
//! [`crate::secure_element::SealedKeyStore::seal_state`] envelope (`RSES` | version 1 | nonce |
//! ChaCha20-Poly1305 under the KEK, associated data = serial and file name) around
//! `format:u8 = 1 | SessionSnapshot` (`relay_protocol::session::SessionSnapshot::encode`: session
//! ids, both transport keys, the next send counter with the lease added, the receive floor, when it
//! was established, the rekey time, the admission key). The snapshot's send counter is the
//! counter at the moment of writing plus a lease ([`SESSION_COUNTER_LEASE`]); the device writes
//! the file again before it has used half the lease, so a crash after any write never makes it
//! reuse a nonce.
//!
//! `state.json` (format 1; unknown fields are ignored, so a newer simulator's file still opens):
//!
//! ```json
//! {"format":1,"serial":"dev-000001","model":"relay-meter-1","kek_file":"kek",
//!  "config":{"version":2,"report_interval_secs":60,"report_bytes":64,"threshold":0},
//!  "next_seq":1825403766771810304,
//!  "release":{"core_public_key":"…64 hex…","endpoint":"core-b.example:5684","issued_ms":1718000000000}}
//! ```
//!
//! `config` and `release` are `null` until the core sent them; `next_seq` is the lowest reading
//! sequence number the device may use next (a restarted device starts at least there).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use relay_protocol::payload::{DeviceConfig, Release};
use relay_protocol::secure_element::KeySlot;
use relay_protocol::session::PublicKey;
use serde::{Deserialize, Serialize};

use crate::meter::DeviceMemory;
use crate::secure_element::{
    create_private_dir, remove_leftovers, write_atomic, KeyEncryptionKey, SealedKeyStore,
    SealedStoreError,
};

/// The state file's name in a device directory.
pub const STATE_FILE: &str = "state.json";
/// The KEK file's default name in a device directory.
pub const DEFAULT_KEK_FILE: &str = "kek";
/// The state file format this simulator writes.
pub const STATE_FORMAT: u32 = 1;
/// The longest state file read (a real one is a few hundred bytes).
const MAX_STATE_LEN: u64 = 64 * 1024;
/// The sealed session file's name in a device directory.
pub const SESSION_FILE: &str = "session.sealed";
/// The session file's inner format.
pub const SESSION_FORMAT: u8 = 1;
/// Send counters skipped ahead of the persisted session: a restarted device resumes at the
/// persisted counter plus this, so frames sent after the last write never reuse a nonce.
pub const SESSION_COUNTER_LEASE: u64 = 1024;

/// Why a device directory could not be created, opened or written. Local failures all.
#[derive(Debug, thiserror::Error)]
pub enum DeviceDirError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The state file is not valid.
    #[error("{}: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The device directory exists already (manufacture never overwrites a device).
    #[error("{}: already exists", .0.display())]
    Exists(PathBuf),
    /// The sealed key store failed.
    #[error(transparent)]
    Store(#[from] SealedStoreError),
}

/// A configuration as the state file spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The profile version.
    pub version: u32,
    /// Seconds between reports.
    pub report_interval_secs: u32,
    /// Bytes per report.
    pub report_bytes: u16,
    /// Early-report threshold (0: none).
    pub threshold: u32,
}

impl From<DeviceConfig> for ConfigState {
    fn from(c: DeviceConfig) -> Self {
        Self {
            version: c.version,
            report_interval_secs: c.report_interval_secs,
            report_bytes: c.report_bytes,
            threshold: c.threshold,
        }
    }
}

impl From<ConfigState> for DeviceConfig {
    fn from(c: ConfigState) -> Self {
        Self {
            version: c.version,
            report_interval_secs: c.report_interval_secs,
            report_bytes: c.report_bytes,
            threshold: c.threshold,
        }
    }
}

/// A followed release as the state file spells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseState {
    /// The new core's static public key, hex.
    pub core_public_key: String,
    /// The new core's address, `HOST:PORT`.
    pub endpoint: String,
    /// When the old core issued the release (Unix milliseconds).
    pub issued_ms: u64,
}

/// The contents of `state.json`; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// The serial number (bound into every sealed key file).
    pub serial: String,
    /// The model, as in the manifest.
    pub model: String,
    /// The KEK file: relative to the device directory, or absolute.
    pub kek_file: PathBuf,
    /// The configuration in force.
    pub config: Option<ConfigState>,
    /// The lowest reading sequence number the device may use next.
    pub next_seq: u64,
    /// The release the device followed.
    pub release: Option<ReleaseState>,
}

impl DeviceState {
    /// What the meter needs of it.
    pub fn memory(&self) -> Result<DeviceMemory, String> {
        let release = match &self.release {
            None => None,
            Some(r) => {
                let core = PublicKey::from_hex(&r.core_public_key)
                    .map_err(|e| format!("release.core_public_key: {e}"))?;
                let release = Release {
                    core,
                    issued_ms: r.issued_ms,
                    endpoint: r.endpoint.clone(),
                };
                if !release.is_valid() {
                    return Err("release.endpoint: 1 to 64 printable ASCII bytes".into());
                }
                Some(release)
            }
        };
        Ok(DeviceMemory {
            config: self.config.map(DeviceConfig::from),
            release,
        })
    }

    /// Takes the meter's memory in.
    pub fn remember(&mut self, memory: &DeviceMemory) {
        self.config = memory.config.map(ConfigState::from);
        self.release = memory.release.as_ref().map(|r| ReleaseState {
            core_public_key: r.core.to_hex(),
            endpoint: r.endpoint.clone(),
            issued_ms: r.issued_ms,
        });
    }
}

/// One device's directory: see the [module docs](self).
#[derive(Debug)]
pub struct DeviceDir {
    path: PathBuf,
    state: DeviceState,
    /// A temporary directory this device lives in (a clone), removed when the last handle goes.
    _owned: Option<Arc<tempfile::TempDir>>,
}

impl DeviceDir {
    /// Manufactures a factory-fresh device in the new directory `path`: its KEK (at `kek_file`,
    /// relative to `path` unless absolute; created if missing), its factory key generated inside
    /// its sealed store, and its state file. Returns the device and its factory public key.
    pub fn manufacture(
        path: &Path,
        serial: &str,
        model: &str,
        kek_file: &Path,
    ) -> Result<(Self, PublicKey), DeviceDirError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| DeviceDirError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        match fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(DeviceDirError::Exists(path.to_owned()))
            }
            Err(source) => {
                return Err(DeviceDirError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        create_private_dir(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|source| {
                DeviceDirError::Io {
                    path: path.to_owned(),
                    source,
                }
            })?;
        }
        let dir = Self {
            path: path.to_owned(),
            state: DeviceState {
                format: STATE_FORMAT,
                serial: serial.to_owned(),
                model: model.to_owned(),
                kek_file: kek_file.to_owned(),
                config: None,
                next_seq: 0,
                release: None,
            },
            _owned: None,
        };
        let store = dir.open_store()?;
        let factory = store.generate_sealed(KeySlot::Factory)?;
        dir.write_state()?;
        Ok((dir, factory))
    }

    /// Opens the device directory `path` (its state file; the keys are opened by
    /// [`DeviceDir::open_store`]).
    pub fn open(path: &Path) -> Result<Self, DeviceDirError> {
        remove_leftovers(path, STATE_FILE)?;
        let file = path.join(STATE_FILE);
        let bad = |reason: String| DeviceDirError::State {
            path: file.clone(),
            reason,
        };
        let len = fs::metadata(&file)
            .map_err(|source| DeviceDirError::Io {
                path: file.clone(),
                source,
            })?
            .len();
        if len > MAX_STATE_LEN {
            return Err(bad(format!("larger than {MAX_STATE_LEN} bytes")));
        }
        let text = fs::read_to_string(&file).map_err(|source| DeviceDirError::Io {
            path: file.clone(),
            source,
        })?;
        let state: DeviceState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if state.format != STATE_FORMAT {
            return Err(bad(format!("unknown format {}", state.format)));
        }
        state.memory().map_err(bad)?;
        Ok(Self {
            path: path.to_owned(),
            state,
            _owned: None,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's serial number.
    pub fn serial(&self) -> &str {
        &self.state.serial
    }

    /// The state as last read or written.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// What the meter starts from.
    pub fn memory(&self) -> DeviceMemory {
        // Checked when the directory was opened.
        self.state.memory().unwrap_or_default()
    }

    /// The KEK file's path.
    pub fn kek_path(&self) -> PathBuf {
        if self.state.kek_file.is_absolute() {
            self.state.kek_file.clone()
        } else {
            self.path.join(&self.state.kek_file)
        }
    }

    /// Opens the device's secure element (creating the KEK if missing).
    pub fn open_store(&self) -> Result<SealedKeyStore, DeviceDirError> {
        let kek = KeyEncryptionKey::load_or_create(&self.kek_path())?;
        Ok(SealedKeyStore::open(&self.path, &self.state.serial, kek)?)
    }

    /// Persists a session snapshot (an opaque encoding) in the sealed session file, atomically.
    pub fn save_session(
        &self,
        store: &SealedKeyStore,
        snapshot: &[u8],
    ) -> Result<(), DeviceDirError> {
        let mut contents = Vec::with_capacity(1 + snapshot.len());
        contents.push(SESSION_FORMAT);
        contents.extend_from_slice(snapshot);
        let sealed = store.seal_state(SESSION_FILE, &contents);
        contents.fill(0);
        Ok(sealed?)
    }

    /// The persisted session snapshot, if there is one. A file of another format counts as none.
    pub fn load_session(&self, store: &SealedKeyStore) -> Result<Option<Vec<u8>>, DeviceDirError> {
        let Some(mut contents) = store.open_state(SESSION_FILE)? else {
            return Ok(None);
        };
        let snapshot = match contents.split_first() {
            Some((&SESSION_FORMAT, rest)) => Some(rest.to_vec()),
            _ => None,
        };
        contents.fill(0);
        Ok(snapshot)
    }

    /// Removes the persisted session (it ended, or cannot be resumed).
    pub fn forget_session(&self, store: &SealedKeyStore) -> Result<(), DeviceDirError> {
        Ok(store.remove_state(SESSION_FILE)?)
    }

    /// Records the meter's memory and the next reading sequence number, atomically.
    pub fn save(&mut self, memory: &DeviceMemory, next_seq: u64) -> Result<(), DeviceDirError> {
        self.state.remember(memory);
        self.state.next_seq = self.state.next_seq.max(next_seq);
        self.write_state()
    }

    fn write_state(&self) -> Result<(), DeviceDirError> {
        let mut text =
            serde_json::to_vec_pretty(&self.state).map_err(|e| DeviceDirError::State {
                path: self.path.join(STATE_FILE),
                reason: e.to_string(),
            })?;
        text.push(b'\n');
        Ok(write_atomic(&self.path, STATE_FILE, &text)?)
    }

    /// A clone of this device for fraud tests: a new temporary directory holding a copy of its
    /// sealed subscription key, its KEK and its state, but not its factory key. The copy
    /// disappears when the returned handle is dropped.
    pub fn clone_subscription(&self) -> Result<Self, DeviceDirError> {
        let subscription = self
            .path
            .join(format!("{}.key", KeySlot::Subscription.name()));
        if !subscription.exists() {
            return Err(DeviceDirError::State {
                path: subscription,
                reason: "no subscription key to clone (the device is not provisioned)".into(),
            });
        }
        let tmp = tempfile::Builder::new()
            .prefix("device-sim-clone-")
            .tempdir()
            .map_err(|source| DeviceDirError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let path = tmp.path().join(&self.state.serial);
        create_private_dir(&path)?;
        let copy = |from: &Path, name: &str| -> Result<(), DeviceDirError> {
            let bytes = fs::read(from).map_err(|source| DeviceDirError::Io {
                path: from.to_owned(),
                source,
            })?;
            Ok(write_atomic(&path, name, &bytes)?)
        };
        copy(
            &subscription,
            &format!("{}.key", KeySlot::Subscription.name()),
        )?;
        let mut state = self.state.clone();
        if !state.kek_file.is_absolute() {
            copy(&self.kek_path(), DEFAULT_KEK_FILE)?;
            state.kek_file = PathBuf::from(DEFAULT_KEK_FILE);
        }
        let dir = Self {
            path,
            state,
            _owned: Some(Arc::new(tmp)),
        };
        dir.write_state()?;
        Ok(dir)
    }
}

/// The device directories under `root` (those holding a state file), sorted by name.
pub fn list_devices(root: &Path) -> Result<Vec<PathBuf>, DeviceDirError> {
    let io = |source| DeviceDirError::Io {
        path: root.to_owned(),
        source,
    };
    let mut dirs = Vec::new();
    for entry in fs::read_dir(root).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.join(STATE_FILE).is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::secure_element::SecureElement;

    #[test]
    fn manufacture_open_save_and_clone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("dev-000001");
        let (mut dir, factory) =
            DeviceDir::manufacture(&path, "dev-000001", "m1", Path::new(DEFAULT_KEK_FILE))
                .expect("manufacture");
        assert!(matches!(
            DeviceDir::manufacture(&path, "dev-000001", "m1", Path::new(DEFAULT_KEK_FILE)),
            Err(DeviceDirError::Exists(_))
        ));
        let store = dir.open_store().expect("store");
        assert_eq!(store.public(KeySlot::Factory).expect("factory"), factory);
        assert_eq!(dir.memory(), DeviceMemory::default());

        let memory = DeviceMemory {
            config: Some(DeviceConfig {
                version: 3,
                report_interval_secs: 60,
                report_bytes: 64,
                threshold: 5,
            }),
            release: Some(Release {
                core: PublicKey([7; 32]),
                issued_ms: 9,
                endpoint: "core-b:5684".into(),
            }),
        };
        dir.save(&memory, 42).expect("save");
        dir.save(&memory, 7).expect("save");
        let reopened = DeviceDir::open(&path).expect("open");
        assert_eq!(reopened.memory(), memory);
        assert_eq!(reopened.state().next_seq, 42, "never goes back");
        assert_eq!(list_devices(tmp.path()).expect("list"), vec![path.clone()]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o700);
            assert_eq!(mode(&path.join(STATE_FILE)), 0o600);
            assert_eq!(mode(&path.join(DEFAULT_KEK_FILE)), 0o600);
        }

        // Not provisioned: nothing to clone.
        assert!(dir.clone_subscription().is_err());
        let subscription = store.generate(KeySlot::Subscription).expect("sub");
        let clone = dir.clone_subscription().expect("clone");
        let copy = clone.open_store().expect("clone store");
        assert_eq!(copy.slots(), vec![KeySlot::Subscription], "no factory key");
        assert_eq!(
            copy.public(KeySlot::Subscription).expect("sub"),
            subscription
        );
        let clone_path = clone.path().to_owned();
        drop((copy, clone));
        assert!(!clone_path.exists(), "the clone's directory is removed");

        fs::write(path.join(STATE_FILE), b"{\"format\":2}").expect("write");
        assert!(matches!(
            DeviceDir::open(&path),
            Err(DeviceDirError::State { .. })
        ));
    }

    #[test]
    fn the_session_file_is_sealed_for_this_device_and_round_trips() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("dev-000001");
        let (dir, _) =
            DeviceDir::manufacture(&path, "dev-000001", "m1", Path::new(DEFAULT_KEK_FILE))
                .expect("manufacture");
        let store = dir.open_store().expect("store");
        assert_eq!(dir.load_session(&store).expect("load"), None);
        let snapshot: Vec<u8> = (0..126u8).collect();
        dir.save_session(&store, &snapshot).expect("save");
        let file = path.join(SESSION_FILE);
        let sealed = fs::read(&file).expect("read");
        assert_eq!(&sealed[..4], b"RSES");
        assert!(
            !sealed.windows(16).any(|w| w == &snapshot[10..26]),
            "the snapshot is not in the clear"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Reopened (a restart): the same bytes.
        let reopened = DeviceDir::open(&path).expect("open");
        let store = reopened.open_store().expect("store");
        assert_eq!(
            reopened.load_session(&store).expect("load"),
            Some(snapshot.clone())
        );

        // Altered, or another device's file: refused, never a panic.
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        fs::write(&file, &altered).expect("write");
        assert!(reopened.load_session(&store).is_err());
        let other_path = tmp.path().join("dev-000002");
        let (other, _) =
            DeviceDir::manufacture(&other_path, "dev-000002", "m1", Path::new(DEFAULT_KEK_FILE))
                .expect("manufacture");
        let other_store = other.open_store().expect("store");
        fs::write(other_path.join(SESSION_FILE), &sealed).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(
                other_path.join(SESSION_FILE),
                fs::Permissions::from_mode(0o600),
            )
            .expect("chmod");
        }
        assert!(matches!(
            other.load_session(&other_store),
            Err(DeviceDirError::Store(SealedStoreError::Unseal { .. }))
        ));

        dir.save_session(&store, &snapshot).expect("save again");
        dir.forget_session(&store).expect("forget");
        assert!(!file.exists());
        dir.forget_session(&store)
            .expect("forgetting twice is fine");
        assert_eq!(dir.load_session(&store).expect("load"), None);
    }
}
