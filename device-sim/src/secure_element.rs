//! The device's secure element in software: a [`SecureElement`] whose private keys are generated
//! inside, used only through the trait (`public`, `dh`), and sealed at rest in one file per slot.
//! There is no method that returns private key bytes, here or in the trait, on purpose.
//!
//! ```text
//!  SecureElement::generate(slot)
//!    32 random bytes ─▶ ChaCha20-Poly1305 under the KEK, random nonce,
//!                       AAD = header ‖ serial ‖ slot name
//!    ─▶ .<slot>.key.tmp-<random> (0600) ─▶ fsync ─▶ rename to <slot>.key ─▶ fsync dir
//!    ─▶ MemoryKeyStore (in memory, zeroed on drop) ─▶ dh(slot, peer) for the Noise handshake
//!  SealedKeyStore::open(dir, serial, kek)
//!    drop leftover temp files ─▶ unseal each <slot>.key ─▶ MemoryKeyStore
//!  SecureElement::commit(Next, Subscription)
//!    unseal next.key ─▶ seal under "subscription" ─▶ write subscription.key atomically
//!    ─▶ remove next.key ─▶ fsync dir ─▶ move in memory
//!  SecureElement::erase(slot)
//!    remove <slot>.key ─▶ fsync dir ─▶ drop from memory (zeroed)
//! ```
//!
//! Slots: [`KeySlot::Factory`] (the device's identity, generated at manufacture, never moved,
//! replaced or erased), [`KeySlot::Subscription`] (the committed subscription key) and
//! [`KeySlot::Next`] (a key being switched to). The serial number and the slot name are the
//! associated data, so a key file copied to another device, or renamed to another slot, does not
//! open; a commit therefore seals the key again for its new slot.
//!
//! A crash inside a commit leaves either the old arrangement (before the rename) or the key in
//! both `next.key` and `subscription.key` (after it): never a slot without a whole key. The
//! device rule (handshake with Next first, commit on success) finishes the move on restart.
//!
//! A crash never leaves a torn key file: a key file appears only by `rename` of a complete,
//! fsynced temporary file, so `<slot>.key` is either absent or whole; a leftover temporary file is
//! ignored and removed on the next open. A file that is nevertheless short, altered or sealed for
//! another device fails to open with a [`SealedStoreError`], never a panic.
//!
//! **What the key-encryption key (KEK) stands for, honestly.** On real hardware the KEK is bound
//! to the chip (fused or derived inside it) and never readable by software, so a copy of the key
//! files alone is useless. This software stand-in reads it from a separate 0600 file
//! ([`KeyEncryptionKey::load_or_create`]): anyone who can read both that file and the key files
//! as the device's user (or root) can unseal the keys. What it does give: key files that are
//! useless without the KEK (backups, a copied data directory), tamper and torn-write detection,
//! no secret shared between devices, and the same code path a hardware-bound KEK would use.
//! Private keys in memory are best-effort zeroed on drop (no `unsafe`, so the compiler may have
//! left copies).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use relay_protocol::secure_element::{KeySlot, KeyStoreError, MemoryKeyStore, SecureElement};
use relay_protocol::session::{PublicKey, StaticKeypair, KEY_LEN};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The first bytes of every sealed key file.
pub const KEY_FILE_MAGIC: &[u8; 4] = b"RSEK";
/// The sealed key file format version.
pub const KEY_FILE_VERSION: u8 = 1;
const HEADER_LEN: usize = KEY_FILE_MAGIC.len() + 1;
const TAG_LEN: usize = 16;
/// The size of a sealed key file: header, nonce, sealed scalar, tag.
pub const KEY_FILE_LEN: usize = HEADER_LEN + NONCE_LEN + KEY_LEN + TAG_LEN;
/// The size of a KEK file: the raw 32-byte key.
pub const KEK_LEN: usize = 32;
/// Longest serial number accepted (it is associated data and part of file contents' meaning).
pub const MAX_SERIAL_LEN: usize = 128;
/// Temporary files are named `.<final name>` followed by this and random hex.
const TEMP_MARKER: &str = ".tmp-";
/// The first bytes of every sealed state file (a device's other secrets: a persisted session).
pub const STATE_FILE_MAGIC: &[u8; 4] = b"RSES";
/// The sealed state file format version.
pub const STATE_FILE_VERSION: u8 = 1;
/// The longest sealed state file read or written (a persisted session is about 150 bytes).
pub const MAX_SEALED_STATE: usize = 4096;

/// Why the sealed key store could not open, load or write a key. Local failures all: the
/// filesystem, the KEK, or files altered behind the store's back.
#[derive(Debug, thiserror::Error)]
pub enum SealedStoreError {
    /// Reading, writing or renaming a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is not a complete key file of this format (truncated, not ours, newer version).
    #[error("{}: not a sealed key file: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file did not authenticate: altered, sealed for another device or slot, or under
    /// another KEK.
    #[error("{}: does not unseal (altered, another device's or slot's, or another KEK)", path.display())]
    Unseal {
        /// The file.
        path: PathBuf,
    },
    /// A secret file is readable or writable by group or others.
    #[error("{}: mode {mode:o} is too open; secret files must be 0600", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The serial number is empty, too long or contains a control character.
    #[error("invalid serial number")]
    InvalidSerial,
    /// The operating system's random source failed.
    #[error("random source failed")]
    Random,
    /// The cryptographic library refused an operation it should not refuse.
    #[error("cryptographic operation failed")]
    Crypto,
    /// The slot is empty or occupied, or the key could not be used.
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SealedStoreError + '_ {
    move |source| SealedStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The key-encryption key that seals the store's files: the software stand-in for a key bound to
/// the hardware (see the [module docs](self) for what that does and does not protect). `Debug`
/// never prints it; it is zeroed on drop (best effort).
pub struct KeyEncryptionKey {
    bytes: [u8; KEK_LEN],
}

impl KeyEncryptionKey {
    /// A fresh random KEK held only in memory (tests; a device that derives its KEK elsewhere).
    pub fn generate() -> Result<Self, SealedStoreError> {
        let mut bytes = [0; KEK_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealedStoreError::Random)?;
        Ok(Self { bytes })
    }

    /// Reads the KEK from `path` (exactly 32 bytes, mode 0600), or creates it there from the
    /// random source (atomically, mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SealedStoreError> {
        match read_secret_file(path)? {
            Some(mut contents) => {
                let bytes = <[u8; KEK_LEN]>::try_from(contents.as_slice()).map_err(|_| {
                    SealedStoreError::Malformed {
                        path: path.to_owned(),
                        reason: "a KEK file holds exactly 32 bytes",
                    }
                });
                contents.fill(0);
                Ok(Self { bytes: bytes? })
            }
            None => {
                let kek = Self::generate()?;
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    SealedStoreError::Io {
                        path: path.to_owned(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
                    }
                })?;
                create_private_dir(dir)?;
                remove_leftovers(dir, name)?;
                write_atomic(dir, name, &kek.bytes)?;
                Ok(kek)
            }
        }
    }

    fn aead(&self) -> Result<LessSafeKey, SealedStoreError> {
        // ChaCha20-Poly1305 takes any 32 bytes; a failure here is ring's, reported not panicked.
        UnboundKey::new(&CHACHA20_POLY1305, &self.bytes)
            .map(LessSafeKey::new)
            .map_err(|_| SealedStoreError::Crypto)
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(<redacted>)")
    }
}

impl Drop for KeyEncryptionKey {
    fn drop(&mut self) {
        self.bytes.fill(0);
    }
}

/// A software secure element: keys sealed at rest in `dir`, one file per slot, under a
/// [`KeyEncryptionKey`], and used in memory only through [`SecureElement`]. It has no method that
/// returns a private key. `Debug` shows the directory, serial and public keys only.
pub struct SealedKeyStore {
    dir: PathBuf,
    serial: String,
    kek: KeyEncryptionKey,
    keys: MemoryKeyStore,
    /// Serialises the commands that write: `generate` (slot check, file write, import),
    /// `commit` and `erase`.
    writing: Mutex<()>,
}

impl SealedKeyStore {
    /// Opens the store of the device `serial` in `dir` (created 0700 if missing): removes
    /// temporary files a crash left behind and unseals every slot's key file. Fails on a key file
    /// that is short, altered or another device's, and on a key file readable by others.
    pub fn open(dir: &Path, serial: &str, kek: KeyEncryptionKey) -> Result<Self, SealedStoreError> {
        if serial.is_empty()
            || serial.len() > MAX_SERIAL_LEN
            || serial.chars().any(char::is_control)
        {
            return Err(SealedStoreError::InvalidSerial);
        }
        create_private_dir(dir)?;
        let store = Self {
            dir: dir.to_owned(),
            serial: serial.to_owned(),
            kek,
            keys: MemoryKeyStore::new(),
            writing: Mutex::new(()),
        };
        for slot in KeySlot::ALL {
            let name = file_name(slot);
            remove_leftovers(dir, &name)?;
            let path = dir.join(&name);
            if let Some(mut sealed) = read_secret_file(&path)? {
                let keypair = store.unseal(slot, &path, &mut sealed);
                sealed.fill(0);
                store.keys.import(slot, keypair?)?;
            }
        }
        Ok(store)
    }

    /// The directory holding the key files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device's serial number, bound into every key file.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The path of `slot`'s key file (which may not exist).
    pub fn key_file(&self, slot: KeySlot) -> PathBuf {
        self.dir.join(file_name(slot))
    }

    /// Generates the key of the empty `slot`: sealed and durably on disk before it is usable.
    pub fn generate_sealed(&self, slot: KeySlot) -> Result<PublicKey, SealedStoreError> {
        let _writing = lock(&self.writing);
        if self.keys.public(slot).is_ok() {
            return Err(KeyStoreError::Occupied(slot).into());
        }
        let rng = SystemRandom::new();
        let mut private = [0; KEY_LEN];
        let result = rng
            .fill(&mut private)
            .map_err(|_| SealedStoreError::Random)
            .and_then(|()| self.seal(slot, &private, &rng))
            .and_then(|sealed| write_atomic(&self.dir, &file_name(slot), &sealed))
            .and_then(|()| {
                StaticKeypair::from_private(&private).map_err(|_| SealedStoreError::Crypto)
            })
            .and_then(|keypair| Ok(self.keys.import(slot, keypair)?));
        private.fill(0);
        result
    }

    /// Moves the key in `from` to `to` on disk and in memory (see [`SecureElement::commit`]):
    /// the key is re-sealed under `to`'s associated data and written atomically over `to`'s
    /// file, and only then is `from`'s file removed. A crash between the two steps leaves the
    /// same key in both slots, which the device rule resolves: it handshakes with `from` (still
    /// [`KeySlot::Next`]) and commits again.
    pub fn commit_sealed(&self, from: KeySlot, to: KeySlot) -> Result<(), SealedStoreError> {
        if from == KeySlot::Factory || to == KeySlot::Factory {
            return Err(factory_is_fixed());
        }
        if from == to {
            return Ok(());
        }
        let _writing = lock(&self.writing);
        self.keys.public(from)?;
        self.copy_sealed(from, to)?;
        self.remove_file(from)?;
        self.keys.commit(from, to)?;
        Ok(())
    }

    /// Destroys the key in `slot`: its file first (durably), then the copy in memory. The factory
    /// slot refuses.
    pub fn erase_sealed(&self, slot: KeySlot) -> Result<(), SealedStoreError> {
        if slot == KeySlot::Factory {
            return Err(factory_is_fixed());
        }
        let _writing = lock(&self.writing);
        self.remove_file(slot)?;
        self.keys.erase(slot)?;
        Ok(())
    }

    /// The first step of a commit: `from`'s key, unsealed from its file and sealed again for
    /// `to`, written atomically as `to`'s file. `from`'s file stays (and the keys in memory are
    /// untouched): what a crash inside [`SealedKeyStore::commit_sealed`] leaves on disk, which
    /// crash tests recreate with it.
    pub(crate) fn copy_sealed(&self, from: KeySlot, to: KeySlot) -> Result<(), SealedStoreError> {
        let path = self.key_file(from);
        let mut sealed = read_secret_file(&path)?.ok_or(KeyStoreError::Empty(from))?;
        let private = self.unseal_scalar(from, &path, &mut sealed);
        sealed.fill(0);
        let mut private = private?;
        let result = StaticKeypair::from_private(&private)
            .map_err(|_| SealedStoreError::Crypto)
            .and_then(|keypair| {
                if *keypair.public() == self.keys.public(from)? {
                    Ok(())
                } else {
                    // The file changed behind the store's back since it was opened.
                    Err(SealedStoreError::Malformed {
                        path: path.clone(),
                        reason: "the key file no longer holds the key in use",
                    })
                }
            })
            .and_then(|()| self.seal(to, &private, &SystemRandom::new()))
            .and_then(|sealed| write_atomic(&self.dir, &file_name(to), &sealed));
        private.fill(0);
        result
    }

    /// Seals `contents` (a secret the device keeps besides its keys, such as a persisted
    /// session) under the KEK into the file `name` of the store's directory, written atomically
    /// (0600). The associated data binds the serial number and `name`, so the file opens only as
    /// itself, on this device.
    pub fn seal_state(&self, name: &str, contents: &[u8]) -> Result<(), SealedStoreError> {
        if contents.len() > MAX_SEALED_STATE || name.contains(['/', '\\']) || name.is_empty() {
            return Err(SealedStoreError::Malformed {
                path: self.dir.join(name),
                reason: "too large a state, or not a file name",
            });
        }
        let rng = SystemRandom::new();
        let mut nonce = [0; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| SealedStoreError::Random)?;
        let mut file = Vec::with_capacity(HEADER_LEN + NONCE_LEN + contents.len() + TAG_LEN);
        file.extend_from_slice(STATE_FILE_MAGIC);
        file.push(STATE_FILE_VERSION);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(contents);
        let tag = self
            .kek
            .aead()?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.state_aad(name)),
                &mut file[HEADER_LEN + NONCE_LEN..],
            )
            .map_err(|_| SealedStoreError::Crypto)?;
        file.extend_from_slice(tag.as_ref());
        let _writing = lock(&self.writing);
        let written = write_atomic(&self.dir, name, &file);
        file.fill(0);
        written
    }

    /// The contents of the sealed state file `name`, or `None` if there is none. Fails on a file
    /// that is altered, truncated, another device's or another name's, and on one others may read.
    pub fn open_state(&self, name: &str) -> Result<Option<Vec<u8>>, SealedStoreError> {
        let path = self.dir.join(name);
        remove_leftovers(&self.dir, name)?;
        let Some(mut file) = read_secret_file(&path)? else {
            return Ok(None);
        };
        let malformed = |reason| SealedStoreError::Malformed {
            path: path.clone(),
            reason,
        };
        if file.len() < HEADER_LEN + NONCE_LEN + TAG_LEN
            || &file[..STATE_FILE_MAGIC.len()] != STATE_FILE_MAGIC
        {
            file.fill(0);
            return Err(malformed("not a sealed state file"));
        }
        if file[STATE_FILE_MAGIC.len()] != STATE_FILE_VERSION {
            return Err(malformed("unknown version"));
        }
        if file.len() > HEADER_LEN + NONCE_LEN + MAX_SEALED_STATE + TAG_LEN {
            return Err(malformed("too large"));
        }
        let (head, sealed) = file.split_at_mut(HEADER_LEN + NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&head[HEADER_LEN..])
            .map_err(|_| malformed("bad nonce"))?;
        let opened =
            match self
                .kek
                .aead()?
                .open_in_place(nonce, Aad::from(self.state_aad(name)), sealed)
            {
                Ok(opened) => {
                    let contents = opened.to_vec();
                    opened.fill(0);
                    Ok(Some(contents))
                }
                Err(_) => Err(SealedStoreError::Unseal { path: path.clone() }),
            };
        file.fill(0);
        opened
    }

    /// Removes the sealed state file `name`, if any, durably.
    pub fn remove_state(&self, name: &str) -> Result<(), SealedStoreError> {
        let path = self.dir.join(name);
        let _writing = lock(&self.writing);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(io_error(&path)(source)),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))
    }

    fn state_aad(&self, name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(HEADER_LEN + 4 + self.serial.len() + name.len());
        aad.extend_from_slice(STATE_FILE_MAGIC);
        aad.push(STATE_FILE_VERSION);
        aad.extend_from_slice(&(self.serial.len() as u16).to_be_bytes());
        aad.extend_from_slice(self.serial.as_bytes());
        aad.extend_from_slice(&(name.len() as u16).to_be_bytes());
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    /// Removes `slot`'s key file, if any, and makes the removal durable.
    fn remove_file(&self, slot: KeySlot) -> Result<(), SealedStoreError> {
        let path = self.key_file(slot);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(io_error(&path)(source)),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))
    }

    fn aad(&self, slot: KeySlot) -> Vec<u8> {
        let mut aad = Vec::with_capacity(HEADER_LEN + 2 + self.serial.len() + 16);
        aad.extend_from_slice(KEY_FILE_MAGIC);
        aad.push(KEY_FILE_VERSION);
        // Length-prefixed so that no serial/slot pair can be confused with another.
        aad.extend_from_slice(&(self.serial.len() as u16).to_be_bytes());
        aad.extend_from_slice(self.serial.as_bytes());
        aad.extend_from_slice(slot.name().as_bytes());
        aad
    }

    fn seal(
        &self,
        slot: KeySlot,
        private: &[u8; KEY_LEN],
        rng: &SystemRandom,
    ) -> Result<Vec<u8>, SealedStoreError> {
        let mut nonce = [0; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| SealedStoreError::Random)?;
        let mut file = Vec::with_capacity(KEY_FILE_LEN);
        file.extend_from_slice(KEY_FILE_MAGIC);
        file.push(KEY_FILE_VERSION);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(private);
        let tag = self
            .kek
            .aead()?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(slot)),
                &mut file[HEADER_LEN + NONCE_LEN..],
            )
            .map_err(|_| SealedStoreError::Crypto)?;
        file.extend_from_slice(tag.as_ref());
        Ok(file)
    }

    fn unseal(
        &self,
        slot: KeySlot,
        path: &Path,
        file: &mut [u8],
    ) -> Result<StaticKeypair, SealedStoreError> {
        let mut private = self.unseal_scalar(slot, path, file)?;
        let keypair =
            StaticKeypair::from_private(&private).map_err(|_| SealedStoreError::Malformed {
                path: path.to_owned(),
                reason: "bad key length",
            });
        private.fill(0);
        keypair
    }

    /// The private scalar sealed in `file` (the contents of `path`, `slot`'s key file).
    fn unseal_scalar(
        &self,
        slot: KeySlot,
        path: &Path,
        file: &mut [u8],
    ) -> Result<[u8; KEY_LEN], SealedStoreError> {
        let malformed = |reason| SealedStoreError::Malformed {
            path: path.to_owned(),
            reason,
        };
        if file.len() < HEADER_LEN || &file[..KEY_FILE_MAGIC.len()] != KEY_FILE_MAGIC {
            return Err(malformed("wrong magic bytes"));
        }
        if file[KEY_FILE_MAGIC.len()] != KEY_FILE_VERSION {
            return Err(malformed("unknown version"));
        }
        if file.len() != KEY_FILE_LEN {
            return Err(malformed("wrong length (truncated?)"));
        }
        let (head, sealed) = file.split_at_mut(HEADER_LEN + NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&head[HEADER_LEN..])
            .map_err(|_| malformed("bad nonce"))?;
        let opened = self
            .kek
            .aead()?
            .open_in_place(nonce, Aad::from(self.aad(slot)), sealed)
            .map_err(|_| SealedStoreError::Unseal {
                path: path.to_owned(),
            })?;
        let private = <[u8; KEY_LEN]>::try_from(&*opened).map_err(|_| malformed("bad key length"));
        opened.fill(0);
        private
    }
}

impl SecureElement for SealedKeyStore {
    fn slots(&self) -> Vec<KeySlot> {
        self.keys.slots()
    }

    fn public(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError> {
        self.keys.public(slot)
    }

    fn generate(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError> {
        self.generate_sealed(slot).map_err(into_key_store_error)
    }

    fn dh(
        &self,
        slot: KeySlot,
        peer_public: &[u8; KEY_LEN],
        out: &mut [u8; KEY_LEN],
    ) -> Result<(), KeyStoreError> {
        self.keys.dh(slot, peer_public, out)
    }

    fn commit(&self, from: KeySlot, to: KeySlot) -> Result<(), KeyStoreError> {
        self.commit_sealed(from, to).map_err(into_key_store_error)
    }

    fn erase(&self, slot: KeySlot) -> Result<(), KeyStoreError> {
        self.erase_sealed(slot).map_err(into_key_store_error)
    }
}

fn into_key_store_error(e: SealedStoreError) -> KeyStoreError {
    match e {
        SealedStoreError::KeyStore(e) => e,
        other => KeyStoreError::Backend(Box::new(other)),
    }
}

fn factory_is_fixed() -> SealedStoreError {
    SealedStoreError::KeyStore(KeyStoreError::Backend(
        "the factory identity is never moved, replaced or erased".into(),
    ))
}

impl fmt::Debug for SealedKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKeyStore")
            .field("dir", &self.dir)
            .field("serial", &self.serial)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn file_name(slot: KeySlot) -> String {
    format!("{}.key", slot.name())
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates `dir` (and parents) if missing, the last component 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), SealedStoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error(dir))
}

/// The contents of the secret file at `path`, or `None` if there is none. Refuses a file that
/// group or others may read or write.
pub(crate) fn read_secret_file(path: &Path) -> Result<Option<Vec<u8>>, SealedStoreError> {
    let contents = match fs::read(path) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(path)(source)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(io_error(path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            let mut contents = contents;
            contents.fill(0);
            return Err(SealedStoreError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    Ok(Some(contents))
}

/// Removes temporary files for `name` that a crash between create and rename left in `dir`.
pub(crate) fn remove_leftovers(dir: &Path, name: &str) -> Result<(), SealedStoreError> {
    let prefix = format!(".{name}{TEMP_MARKER}");
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(io_error(&path)(source)),
            }
        }
    }
    Ok(())
}

/// Writes `contents` to `dir/name` so that a crash at any point leaves either the old file or
/// the complete new one: a fresh 0600 temporary file in the same directory, fsync, rename over
/// `name`, fsync the directory (which makes the rename durable).
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
) -> Result<(), SealedStoreError> {
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| SealedStoreError::Random)?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let temp = dir.join(format!(".{name}{TEMP_MARKER}{suffix}"));
    let target = dir.join(name);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options
        .open(&temp)
        .and_then(|mut f| f.write_all(contents).and_then(|()| f.sync_all()))
        .map_err(io_error(&temp))
        .and_then(|()| fs::rename(&temp, &target).map_err(io_error(&target)));
    if let Err(e) = written {
        // Best effort: a leftover is harmless (never read as a key) and removed on the next open.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

#[cfg(test)]
mod tests;
