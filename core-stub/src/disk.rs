//! Readings first on a disk shared with videos.
//!
//! A reading is acknowledged only after the store's transaction holding it is synced, so its
//! latency is the latency of one SQLite commit. When videos are written to the same disk, a video
//! sync of many megabytes sits in the disk's queue ahead of that commit. The [`DiskGate`] keeps
//! the video's writes out of the commits' way:
//!
//! - the store writer holds the gate from the moment a batch's first reading is queued until its
//!   commit is synced ([`DiskGate::hold`]);
//! - the video sink writes in pieces of at most [`WRITE_PIECE`] bytes, each written through to
//!   the disk (`O_DSYNC`) before the next, and waits for the gate between pieces
//!   ([`DiskGate::wait_turn`]).
//!
//! So a commit waits behind at most one piece already on its way to the disk, never behind a
//! whole batch, and the video fills the disk's time between commits. The wait for the gate is
//! bounded ([`MAX_TURN_WAIT`]): a store committing back to back slows videos down, it does not
//! stop them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// `[video] give_way`: whether video writes give way to store commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GiveWay {
    /// When the videos and the database share a file system ([`same_disk`]): the default.
    #[default]
    Auto,
    /// Never: videos are written at the disk's full speed, and readings' commits queue behind
    /// their syncs (for a disk fast enough that the operator prefers video throughput).
    Never,
}

impl GiveWay {
    /// Whether video writes give way, given whether the videos share the database's disk.
    pub fn applies(self, shares_disk: bool) -> bool {
        match self {
            Self::Auto => shares_disk,
            Self::Never => false,
        }
    }
}

/// The most video data written to the disk at once (and so the most a commit waits behind).
pub const WRITE_PIECE: usize = 512 * 1024;

/// The longest a video piece waits for commits to finish.
pub const MAX_TURN_WAIT: Duration = Duration::from_millis(250);

/// Store commits in progress; video writers wait for none.
#[derive(Debug, Default)]
pub struct DiskGate {
    commits: Mutex<u32>,
    done: Condvar,
}

impl DiskGate {
    /// Holds the gate until the guard is dropped: from the moment a commit is due (its first
    /// reading is queued) to its end.
    pub fn hold(&self) -> GateHold<'_> {
        *self.lock() += 1;
        GateHold { gate: self }
    }

    /// Blocks until no commit runs, or for [`MAX_TURN_WAIT`] at most. For blocking threads.
    pub fn wait_turn(&self) {
        let running = self.lock();
        if *running > 0 {
            let _ = self
                .done
                .wait_timeout_while(running, MAX_TURN_WAIT, |n| *n > 0)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u32> {
        self.commits.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A commit due or running; see [`DiskGate::hold`].
#[derive(Debug)]
pub struct GateHold<'a> {
    gate: &'a DiskGate,
}

impl Drop for GateHold<'_> {
    fn drop(&mut self) {
        let mut running = self.gate.lock();
        *running = running.saturating_sub(1);
        if *running == 0 {
            self.gate.done.notify_all();
        }
    }
}

/// Whether `a` and `b` (files or directories, existing or not) are on the same file system: each
/// is looked up at its nearest existing ancestor. `false` when neither can be found.
pub fn same_disk(a: &Path, b: &Path) -> bool {
    match (device_of(a), device_of(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn device_of(path: &Path) -> Option<u64> {
    let absolute = std::path::absolute(path).ok()?;
    absolute
        .ancestors()
        .find_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_turn_waits_for_the_commit_to_end_and_no_longer() {
        let gate = Arc::new(DiskGate::default());
        gate.wait_turn(); // no commit: no wait

        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let committer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _held = gate.hold();
                entered_tx.send(()).ok();
                release_rx.recv().ok();
            })
        };
        entered_rx.recv().ok();
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.wait_turn();
                Instant::now()
            })
        };
        std::thread::sleep(Duration::from_millis(10));
        assert!(!waiter.is_finished(), "a turn waits while a commit runs");
        let released = Instant::now();
        release_tx.send(()).ok();
        committer.join().ok();
        let turn = waiter.join().unwrap_or(released);
        assert!(turn >= released);

        // A commit that never ends holds a turn back for MAX_TURN_WAIT only.
        let (_hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let stuck = gate.clone();
        std::thread::spawn(move || {
            let _held = stuck.hold();
            entered_tx.send(()).ok();
            hold_rx.recv().ok();
        });
        entered_rx.recv().ok();
        let started = Instant::now();
        gate.wait_turn();
        assert!(started.elapsed() >= MAX_TURN_WAIT);
    }

    #[test]
    fn give_way_applies_on_a_shared_disk_unless_never() {
        assert!(GiveWay::Auto.applies(true));
        assert!(!GiveWay::Auto.applies(false));
        assert!(!GiveWay::Never.applies(true));
        assert!(!GiveWay::Never.applies(false));
    }

    #[test]
    fn paths_on_one_file_system_share_a_disk_and_tmpfs_does_not() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = dir.path().join("core.db");
        assert!(same_disk(&db, &dir.path().join("videos/not/yet")));
        assert!(same_disk(Path::new("relative/videos"), Path::new(".")));
        if Path::new("/proc/self").exists() {
            assert!(!same_disk(&db, Path::new("/proc/self")));
        }
    }
}
