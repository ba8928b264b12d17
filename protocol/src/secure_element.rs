//! The device's secure element: where its static private keys live (requirements R5, R10).
//!
//! [`SecureElement`] is the interface to a key store that generates private keys inside and never
//! hands them out. Callers name a [`KeySlot`] and ask for its public key or for a Diffie-Hellman
//! result; there is deliberately no method that returns private key bytes, so code holding a
//! `dyn SecureElement` cannot leak what it cannot read. A hardware element implements the trait
//! with its own commands; `device-sim`'s `SealedKeyStore` is the software stand-in that seals keys
//! in files; [`MemoryKeyStore`] keeps them in process memory, for tests and the simulator.
//!
//! [`DeviceSession::with_key_store`](crate::session::DeviceSession::with_key_store) runs the Noise
//! handshake with a slot's key through snow's custom resolver, without copying the key out:
//!
//! ```text
//!  DeviceSession::start_handshake
//!    Builder::with_resolver(KeyHandleResolver).local_private_key(handle)   handle: 32 random
//!      s_dh = resolve_dh(); s_dh.set(handle) ─▶ HandleDh bound to (store, slot)  bytes, not a key
//!      e_dh = resolve_dh(); e_dh.generate()  ─▶ HandleDh unbound: snow's own Curve25519
//!    write/read_message: s_dh.dh(peer) ─▶ SecureElement::dh(slot, peer) ─▶ inside the element
//! ```
//!
//! snow builds the static and the ephemeral `Dh` from the same `resolve_dh` call and tells them
//! apart only by what it does to them: the static one gets `set(local_private_key)`, the ephemeral
//! one `generate` (or `set` with a fixed test key). So the resolver hands out identical
//! `HandleDh`s and an instance becomes the element's proxy exactly when it is `set` with the
//! session's handle. The handle is random per handshake: should snow ever treat it as a scalar,
//! the result is an unknown key the core refuses, never a published one.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

use crate::session::{PublicKey, StaticKeypair, KEY_LEN};

/// A named place for one private key in the secure element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeySlot {
    /// The device's factory identity: generated once at manufacture, bound to its serial number.
    Factory,
    /// The key of the device's current subscription, generated later (after claiming).
    Subscription,
    /// A key generated for a switch in progress (provisioning or a credential update), committed
    /// to [`KeySlot::Subscription`] only after a handshake with it succeeded.
    Next,
}

impl KeySlot {
    /// Every slot, in a fixed order.
    pub const ALL: [KeySlot; 3] = [KeySlot::Factory, KeySlot::Subscription, KeySlot::Next];

    /// A short, fixed name (file names, associated data, log fields).
    pub fn name(self) -> &'static str {
        match self {
            Self::Factory => "factory",
            Self::Subscription => "subscription",
            Self::Next => "next",
        }
    }

    /// The slot called `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the secure element refused or failed an operation. Always the local side's problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The slot holds no key.
    #[error("no key in the {0} slot")]
    Empty(KeySlot),
    /// The slot already holds a key; the element never overwrites one silently.
    #[error("the {0} slot already holds a key")]
    Occupied(KeySlot),
    /// The element itself failed: storage, random source, hardware.
    #[error("key store failed: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// The device's key store. Private keys are generated inside and never leave it: every operation
/// takes a [`KeySlot`], and no method returns private key bytes (there is no getter, on purpose).
///
/// Methods take `&self`: an element is shared (a session holds it in an `Arc` while the device
/// generates another slot's key) and serialises its own commands, like the hardware it stands for.
pub trait SecureElement: Send + Sync {
    /// The slots that hold a key.
    fn slots(&self) -> Vec<KeySlot>;

    /// The public half of the key in `slot`.
    fn public(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError>;

    /// Generates a new Curve25519 key inside the element in the empty `slot` and returns its public
    /// half. Refuses ([`KeyStoreError::Occupied`]) if `slot` holds a key.
    fn generate(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError>;

    /// X25519 of the key in `slot` with `peer_public`, written to `out`: the only use of a
    /// private key the element offers.
    fn dh(
        &self,
        slot: KeySlot,
        peer_public: &[u8; KEY_LEN],
        out: &mut [u8; KEY_LEN],
    ) -> Result<(), KeyStoreError>;

    /// Moves the key in `from` to `to`, replacing what `to` held, and leaves `from` empty. Atomic:
    /// after a crash the element holds either the old or the new arrangement, never a torn key
    /// (a key present in both slots is allowed in between). Refuses an empty `from` and
    /// `to == KeySlot::Factory` (the factory identity is never replaced).
    fn commit(&self, from: KeySlot, to: KeySlot) -> Result<(), KeyStoreError>;

    /// Destroys the key in `slot` (nothing if empty). The factory slot refuses.
    fn erase(&self, slot: KeySlot) -> Result<(), KeyStoreError>;
}

/// One private key held in memory, inside snow's Curve25519 implementation (the one the handshake
/// itself uses, so results are bit-identical to a raw-key handshake).
struct SlotKey {
    dh: Box<dyn Dh>,
    public: PublicKey,
}

impl Drop for SlotKey {
    fn drop(&mut self) {
        // Best effort without unsafe: overwrite the scalar through the only setter snow offers.
        self.dh.set(&[0; KEY_LEN]);
    }
}

fn curve25519() -> Result<Box<dyn Dh>, KeyStoreError> {
    DefaultResolver
        .resolve_dh(&DHChoice::Curve25519)
        .ok_or_else(|| KeyStoreError::Backend("snow has no Curve25519".into()))
}

fn public_of(dh: &dyn Dh) -> Result<PublicKey, KeyStoreError> {
    dh.pubkey()
        .try_into()
        .map(PublicKey)
        .map_err(|_| KeyStoreError::Backend("public key of the wrong length".into()))
}

/// A [`SecureElement`] in process memory: keys are zeroed when dropped and never written anywhere.
/// For tests, the simulator (whose keys come from `fleet.keys`), and as the in-memory half of a
/// software store that seals keys at rest. `Debug` shows public keys only.
#[derive(Default)]
pub struct MemoryKeyStore {
    keys: Mutex<BTreeMap<KeySlot, SlotKey>>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves an existing key pair into the empty `slot` (the simulator's `fleet.keys`, or a
    /// software store loading its sealed file). A hardware element would have no such operation;
    /// it is not part of [`SecureElement`].
    pub fn import(
        &self,
        slot: KeySlot,
        keypair: StaticKeypair,
    ) -> Result<PublicKey, KeyStoreError> {
        let mut keys = self.lock();
        if keys.contains_key(&slot) {
            return Err(KeyStoreError::Occupied(slot));
        }
        let mut dh = curve25519()?;
        dh.set(keypair.private());
        let public = public_of(&*dh)?;
        keys.insert(slot, SlotKey { dh, public });
        Ok(public)
    }

    /// Drops the key in `slot`, if any (it is zeroed).
    pub fn remove(&self, slot: KeySlot) -> bool {
        self.lock().remove(&slot).is_some()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<KeySlot, SlotKey>> {
        // A panic while holding the lock cannot leave a half-written map entry.
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SecureElement for MemoryKeyStore {
    fn slots(&self) -> Vec<KeySlot> {
        self.lock().keys().copied().collect()
    }

    fn public(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError> {
        self.lock()
            .get(&slot)
            .map(|k| k.public)
            .ok_or(KeyStoreError::Empty(slot))
    }

    fn generate(&self, slot: KeySlot) -> Result<PublicKey, KeyStoreError> {
        let mut keys = self.lock();
        if keys.contains_key(&slot) {
            return Err(KeyStoreError::Occupied(slot));
        }
        let mut rng = DefaultResolver
            .resolve_rng()
            .ok_or_else(|| KeyStoreError::Backend("snow has no random source".into()))?;
        let mut dh = curve25519()?;
        dh.generate(&mut *rng)
            .map_err(|e| KeyStoreError::Backend(Box::new(e)))?;
        let public = public_of(&*dh)?;
        keys.insert(slot, SlotKey { dh, public });
        Ok(public)
    }

    fn dh(
        &self,
        slot: KeySlot,
        peer_public: &[u8; KEY_LEN],
        out: &mut [u8; KEY_LEN],
    ) -> Result<(), KeyStoreError> {
        let keys = self.lock();
        let key = keys.get(&slot).ok_or(KeyStoreError::Empty(slot))?;
        key.dh
            .dh(peer_public, out)
            .map_err(|e| KeyStoreError::Backend(Box::new(e)))
    }

    fn commit(&self, from: KeySlot, to: KeySlot) -> Result<(), KeyStoreError> {
        if to == KeySlot::Factory || from == KeySlot::Factory {
            return Err(KeyStoreError::Backend(
                "the factory identity is never moved or replaced".into(),
            ));
        }
        let mut keys = self.lock();
        let key = keys.remove(&from).ok_or(KeyStoreError::Empty(from))?;
        keys.insert(to, key);
        Ok(())
    }

    fn erase(&self, slot: KeySlot) -> Result<(), KeyStoreError> {
        if slot == KeySlot::Factory {
            return Err(KeyStoreError::Backend(
                "the factory identity is never erased".into(),
            ));
        }
        self.lock().remove(&slot);
        Ok(())
    }
}

impl fmt::Debug for MemoryKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.lock().iter().map(|(slot, k)| (slot, k.public)))
            .finish()
    }
}

/// One handshake's binding of a slot to snow: the handle snow carries as the "private key", and
/// the first error the element reported (snow itself can only say `Error::Dh`).
pub(crate) struct KeyHandle {
    store: Arc<dyn SecureElement>,
    slot: KeySlot,
    public: PublicKey,
    handle: [u8; KEY_LEN],
    failure: Mutex<Option<KeyStoreError>>,
}

impl KeyHandle {
    /// A fresh random handle for `slot`, whose public key is `public`.
    pub(crate) fn new(
        store: Arc<dyn SecureElement>,
        slot: KeySlot,
        public: PublicKey,
    ) -> Result<Arc<Self>, snow::Error> {
        let mut rng = DefaultResolver
            .resolve_rng()
            .ok_or(snow::Error::Init(snow::error::InitStage::GetRngImpl))?;
        let mut handle = [0; KEY_LEN];
        rng.try_fill_bytes(&mut handle)?;
        Ok(Arc::new(Self {
            store,
            slot,
            public,
            handle,
            failure: Mutex::new(None),
        }))
    }

    /// What to pass to `Builder::local_private_key`.
    pub(crate) fn handle(&self) -> &[u8] {
        &self.handle
    }

    /// The resolver to build the handshake with.
    pub(crate) fn resolver(self: &Arc<Self>) -> BoxedCryptoResolver {
        Box::new(KeyHandleResolver(Arc::clone(self)))
    }

    /// The element's error behind the last `snow::Error::Dh`, if it was the element's.
    pub(crate) fn take_failure(&self) -> Option<KeyStoreError> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn is_handle(&self, key: &[u8]) -> bool {
        // Constant time: `key` may be a real (ephemeral) private key.
        key.len() == KEY_LEN
            && key
                .iter()
                .zip(&self.handle)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// snow's default primitives, except that every Curve25519 instance is a `HandleDh`.
struct KeyHandleResolver(Arc<KeyHandle>);

impl CryptoResolver for KeyHandleResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(HandleDh {
                key: Arc::clone(&self.0),
                software: DefaultResolver.resolve_dh(choice)?,
                bound: false,
            })),
            // The element holds Curve25519 keys only.
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

/// A Curve25519 `Dh` that is either the element's proxy for one slot (`bound`, after `set` with
/// the handle) or snow's own implementation (ephemeral keys).
struct HandleDh {
    key: Arc<KeyHandle>,
    software: Box<dyn Dh>,
    bound: bool,
}

impl Dh for HandleDh {
    fn name(&self) -> &'static str {
        self.software.name()
    }

    fn pub_len(&self) -> usize {
        self.software.pub_len()
    }

    fn priv_len(&self) -> usize {
        self.software.priv_len()
    }

    fn set(&mut self, privkey: &[u8]) {
        self.bound = self.key.is_handle(privkey);
        if !self.bound {
            self.software.set(privkey);
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        // Only ephemeral keys are generated by snow; the element generates its own.
        self.bound = false;
        self.software.generate(rng)
    }

    fn pubkey(&self) -> &[u8] {
        if self.bound {
            &self.key.public.0
        } else {
            self.software.pubkey()
        }
    }

    fn privkey(&self) -> &[u8] {
        // snow reads `privkey` only in `Builder::generate_keypair`, never on this resolver; a
        // bound instance has nothing but the handle to give.
        if self.bound {
            &self.key.handle
        } else {
            self.software.privkey()
        }
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        if !self.bound {
            return self.software.dh(pubkey, out);
        }
        let peer: &[u8; KEY_LEN] = pubkey
            .get(..KEY_LEN)
            .and_then(|p| p.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let out: &mut [u8; KEY_LEN] = out
            .get_mut(..KEY_LEN)
            .and_then(|o| o.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        self.key.store.dh(self.key.slot, peer, out).map_err(|e| {
            *self
                .key
                .failure
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e);
            snow::Error::Dh
        })
    }
}
