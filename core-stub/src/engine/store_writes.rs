//! The engine's [`LifecycleStore`] on SQLite: its own [`Store`] connection for the rare lifecycle
//! transactions (each committed before the handshake response leaves, on the engine task), and a
//! background thread with another connection that records configuration versions.
//!
//! ```text
//!  engine ──provision / set_next_key / promote_next_key / flag──▶ Store (engine's connection)
//!         ──record_config_version──▶ pending map (coalesced) ──▶ recorder thread ──▶ Store
//! ```
//!
//! Configuration versions change at most once per device and profile change, but a device reports
//! its version in every handshake, and the handshake path must not wait for a disk flush: the
//! versions wait in a map keyed by subscription (so it is bounded by the number of subscriptions
//! and holds only the latest version of each) until the thread writes them.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use relay_protocol::session::PublicKey;

use super::LifecycleStore;
use crate::store::{IndexEntry, Store, StoreError, SubscriptionId};

/// The engine's store: synchronous lifecycle writes, deferred version records.
#[derive(Debug)]
pub(crate) struct StoreWrites {
    store: Store,
    recorder: Arc<Recorder>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Recorder {
    state: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    versions: HashMap<SubscriptionId, u32>,
    stop: bool,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic on the recorder thread cannot leave the map half-updated in a harmful way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoreWrites {
    /// Lifecycle writes on `store`; configuration versions recorded on `versions` by a thread.
    pub fn new(store: Store, versions: Store) -> std::io::Result<Self> {
        let recorder = Arc::new(Recorder::default());
        let shared = recorder.clone();
        let thread = std::thread::Builder::new()
            .name("config-versions".into())
            .spawn(move || record_versions(&versions, &shared))?;
        Ok(Self {
            store,
            recorder,
            thread: Some(thread),
        })
    }
}

/// Writes the pending versions until told to stop, then writes what is left.
fn record_versions(store: &Store, recorder: &Recorder) {
    loop {
        let (batch, stop) = {
            let mut state = recorder.lock();
            while state.versions.is_empty() && !state.stop {
                state = recorder.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            (std::mem::take(&mut state.versions), state.stop)
        };
        for (id, version) in batch {
            if let Err(e) = store.set_config_version(id, version) {
                tracing::warn!(subscription = id.0, version, error = %e, "configuration version not recorded");
            }
        }
        if stop {
            return;
        }
    }
}

impl Drop for StoreWrites {
    fn drop(&mut self) {
        self.recorder.lock().stop = true;
        self.recorder.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("configuration version recorder panicked");
            }
        }
    }
}

impl LifecycleStore for StoreWrites {
    fn provision(&mut self, serial: &str, key: &PublicKey) -> Result<IndexEntry, StoreError> {
        self.store.provision(serial, key)
    }

    fn set_next_key(&mut self, id: SubscriptionId, key: &PublicKey) -> Result<(), StoreError> {
        self.store.set_next_key(id, key)
    }

    fn promote_next_key(&mut self, id: SubscriptionId, key: &PublicKey) -> Result<(), StoreError> {
        self.store.promote_next_key(id, key)
    }

    fn flag(
        &mut self,
        id: SubscriptionId,
        reason: &str,
        quarantine: bool,
    ) -> Result<(), StoreError> {
        self.store.flag(id, reason, quarantine)
    }

    fn record_config_version(&mut self, id: SubscriptionId, version: u32) {
        self.recorder.lock().versions.insert(id, version);
        self.recorder.wake.notify_one();
    }

    fn index_entries(&mut self) -> Result<Vec<IndexEntry>, StoreError> {
        self.store.index_entries()
    }
}
