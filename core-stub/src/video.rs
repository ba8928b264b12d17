//! The video sink: what devices upload over streams (`docs/protocol.md` §13), on disk, resumable
//! across connections and across restarts of the core.
//!
//! ```text
//!  <video dir>/<subscription id>/<upload hex>.part    the bytes received so far
//!                               <upload hex>.state   JSON UploadState: how many chunks of .part
//!                                                    are synced (replaced atomically after each sync)
//!                               <upload hex>.video   the whole upload (.part renamed once complete)
//!                               <upload hex>.json    JSON VideoRecord: the completion marker
//! ```
//!
//! Uploads are filed under the subscription, not the device's key: a key update in the middle of
//! an upload does not lose it. Every step is ordered so that a crash at any point leaves either
//! the previous state or the next one:
//!
//! - a checkpoint syncs the new chunks of `.part` first, then replaces `.state` (temporary file,
//!   sync, rename, sync of the directory); only then is the device told (acknowledged);
//! - on a resume, `.part` is cut back to what `.state` says (bytes past it were never
//!   acknowledged);
//! - completion renames `.part` to `.video`, then writes `.json` (atomically), then removes
//!   `.state`. A `.video` without `.json` (a crash in between) is completed on the next open.
//!
//! On the database's file system the sink gives way to the store's commits: `.part` is `O_DSYNC`
//! and written in pieces between commits ([`crate::disk`]).
//!
//! Everything here blocks on the file system: callers run it on a blocking thread. One upload is
//! only ever handled by one stream at a time (the stream hub's lock), so nothing here locks.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use relay_protocol::stream::{RefuseReason, StreamOpen, UploadId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::disk::{DiskGate, WRITE_PIECE};
use crate::store::SubscriptionId;

/// Who an upload belongs to: its directory, and what its record says about the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The device's subscription (the directory name).
    pub subscription: SubscriptionId,
    /// The device's serial, when it has a factory identity.
    pub serial: Option<String>,
}

/// The progress of an incomplete upload (`<upload>.state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct UploadState {
    chunk_size: u32,
    total_size: u64,
    /// Chunks below this are synced in `.part`.
    next_chunk: u32,
    meta: String,
    started_unix_ms: u64,
    /// Connections that carried this upload so far (the current one included).
    attempts: u32,
}

/// A completed upload (`<upload>.json`), as listed by `GET /v1/videos`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoRecord {
    /// The device's subscription id.
    pub subscription: i64,
    /// The device's serial, when it has a factory identity.
    pub device: Option<String>,
    /// The upload id (hex).
    pub upload: String,
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of the stored bytes (hex).
    pub sha256: String,
    /// The upload's chunk size.
    pub chunk_size: u32,
    /// What the device said about the upload (not interpreted).
    pub meta: String,
    /// How the last chunk arrived: `direct`, or the gateway's certificate name.
    pub via: String,
    /// When the first connection of the upload opened.
    pub started_unix_ms: u64,
    /// When the upload completed.
    pub completed_unix_ms: u64,
    /// Connections the upload took.
    pub attempts: u32,
}

impl VideoRecord {
    /// The digest as bytes (zeros when the record's hex is damaged).
    pub fn sha256_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(b) = hex::decode(&self.sha256) {
            if b.len() == 32 {
                out.copy_from_slice(&b);
            }
        }
        out
    }
}

/// The running SHA-256 of an upload's synced prefix, kept in memory between the connections of
/// one upload so that a resumed upload is not read back from disk to be hashed.
#[derive(Clone)]
pub struct HashCarry {
    upto: u64,
    hasher: Sha256,
}

impl std::fmt::Debug for HashCarry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashCarry")
            .field("upto", &self.upto)
            .finish_non_exhaustive()
    }
}

/// What an open finds on disk.
#[derive(Debug)]
pub enum Opened {
    /// The upload is stored already (or was just completed from a `.video` a crash left).
    Complete(VideoRecord),
    /// The upload cannot be taken as asked.
    Refused(RefuseReason),
    /// Ready to receive from `next_chunk()` on.
    Receiving(PartialUpload),
}

/// The stored uploads, under one directory.
#[derive(Clone, Debug)]
pub struct VideoStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Set when the videos share a disk with the subscription store: uploads are then written
    /// in pieces that give way to the store's commits ([`crate::disk`]).
    gate: Option<Arc<DiskGate>>,
}

struct UploadPaths {
    dir: PathBuf,
    part: PathBuf,
    state: PathBuf,
    video: PathBuf,
    json: PathBuf,
}

impl UploadPaths {
    fn new(root: &Path, owner: &Owner, upload: &UploadId) -> Self {
        let dir = root.join(owner.subscription.0.to_string());
        let hex = upload.to_hex();
        Self {
            part: dir.join(format!("{hex}.part")),
            state: dir.join(format!("{hex}.state")),
            video: dir.join(format!("{hex}.video")),
            json: dir.join(format!("{hex}.json")),
            dir,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    u64::try_from(crate::store::now_ms()).unwrap_or(0)
}

impl VideoStore {
    /// Uploads live under `dir` (created when the first one arrives); larger than `max_bytes`
    /// ones are refused.
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            gate: None,
        }
    }

    /// Uploads give way to the store's commits through `gate` (the videos share its disk).
    pub fn with_gate(mut self, gate: Arc<DiskGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finds or starts the upload `open` names for `owner`. A refusal leaves the disk as it was.
    /// `carry` is the running digest an earlier connection of the same upload left behind, if
    /// any. `now_ms`: for a new upload's start time.
    pub fn open(
        &self,
        owner: &Owner,
        open: &StreamOpen,
        carry: Option<HashCarry>,
        now_ms: u64,
    ) -> io::Result<Opened> {
        if open.total_size > self.max_bytes {
            return Ok(Opened::Refused(RefuseReason::TooLarge));
        }
        let paths = UploadPaths::new(&self.dir, owner, &open.upload);
        if let Some(record) = read_json::<VideoRecord>(&paths.json)? {
            if record.size != open.total_size {
                return Ok(Opened::Refused(RefuseReason::SizeMismatch));
            }
            return Ok(Opened::Complete(record));
        }
        let state = read_json::<UploadState>(&paths.state)?;
        if let Some(state) = &state {
            if state.chunk_size != open.chunk_size {
                return Ok(Opened::Refused(RefuseReason::ChunkSize));
            }
            if state.total_size != open.total_size {
                return Ok(Opened::Refused(RefuseReason::SizeMismatch));
            }
        }
        if paths.video.exists() {
            // A crash between the rename and the record: finish the job.
            let state = state.unwrap_or_else(|| fresh_state(open, now_ms));
            let record = complete(&paths, owner, &open.upload, &state, None, "unknown", now_ms)?;
            return Ok(Opened::Complete(record));
        }
        let state = match state {
            Some(mut s) => {
                s.attempts = s.attempts.saturating_add(1);
                s
            }
            None => {
                create_dir_durably(&self.dir)?;
                create_dir_durably(&paths.dir)?;
                fresh_state(open, now_ms)
            }
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        if self.gate.is_some() {
            // Each write is on the disk when it returns: no backlog of dirty video pages for
            // the kernel to flush in front of a store commit.
            options.custom_flags(libc::O_DSYNC);
        }
        let part = options.open(&paths.part)?;
        let mut upload = PartialUpload {
            part,
            gate: self.gate.clone(),
            upload: open.upload,
            paths,
            state,
            hash: None,
        };
        // Bytes past the synced prefix were never acknowledged: cut them. A `.part` shorter than
        // its state (it cannot be, data is synced before the state) resumes from what is there.
        let len = upload.part.metadata()?.len();
        if len < upload.stored_bytes() {
            upload.state.next_chunk = (len / u64::from(open.chunk_size)) as u32;
        }
        upload.part.set_len(upload.stored_bytes())?;
        upload.part.sync_all()?;
        write_atomic(
            &upload.paths.state,
            &upload.paths.dir,
            &json(&upload.state)?,
        )?;
        upload.hash = match carry {
            _ if upload.state.next_chunk == 0 => Some(HashCarry {
                upto: 0,
                hasher: Sha256::new(),
            }),
            Some(c) if c.upto == upload.stored_bytes() => Some(c),
            _ => None,
        };
        Ok(Opened::Receiving(upload))
    }

    /// Every completed upload's record, oldest completion first. Unreadable records are skipped.
    pub fn list(&self) -> io::Result<Vec<VideoRecord>> {
        let mut out = Vec::new();
        let subs = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for sub in subs {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(sub.path())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    if let Ok(Some(record)) = read_json::<VideoRecord>(&path) {
                        out.push(record);
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.completed_unix_ms, &a.upload).cmp(&(b.completed_unix_ms, &b.upload)));
        Ok(out)
    }
}

fn fresh_state(open: &StreamOpen, now_ms: u64) -> UploadState {
    UploadState {
        chunk_size: open.chunk_size,
        total_size: open.total_size,
        next_chunk: 0,
        meta: open.meta.clone(),
        started_unix_ms: now_ms,
        attempts: 1,
    }
}

/// One incomplete upload, open for writing by one stream.
pub struct PartialUpload {
    part: File,
    /// When set, `part` is `O_DSYNC` and written in pieces that give way to store commits.
    gate: Option<Arc<DiskGate>>,
    upload: UploadId,
    paths: UploadPaths,
    state: UploadState,
    /// The digest of exactly the synced prefix, when known.
    hash: Option<HashCarry>,
}

impl std::fmt::Debug for PartialUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartialUpload")
            .field("part", &self.paths.part)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl PartialUpload {
    /// The first chunk not stored.
    pub fn next_chunk(&self) -> u32 {
        self.state.next_chunk
    }

    /// Bytes stored (synced).
    pub fn stored_bytes(&self) -> u64 {
        u64::from(self.state.next_chunk) * u64::from(self.state.chunk_size)
    }

    /// Connections this upload took, this one included.
    pub fn attempts(&self) -> u32 {
        self.state.attempts
    }

    /// Writes `data`, the next `chunks` chunks (contiguous, from `next_chunk()`), syncs it and
    /// then records it in the state file. When this returns `Ok`, they may be acknowledged.
    pub fn commit(&mut self, data: &[u8], chunks: u32) -> io::Result<()> {
        if chunks == 0 {
            return Ok(());
        }
        let result = self.write_synced(data).and_then(|()| {
            let mut next = self.state.clone();
            next.next_chunk = next.next_chunk.saturating_add(chunks);
            if let Some(gate) = &self.gate {
                gate.wait_turn();
            }
            write_atomic(&self.paths.state, &self.paths.dir, &json(&next)?)?;
            self.state = next;
            Ok(())
        });
        if result.is_err() {
            // The file may hold more than the digest covers.
            self.hash = None;
        }
        result
    }

    /// Writes `data` at the end of the synced prefix and syncs it, and extends the digest.
    fn write_synced(&mut self, data: &[u8]) -> io::Result<()> {
        let offset = self.stored_bytes();
        match &self.gate {
            None => {
                self.part.write_all_at(data, offset)?;
                self.part.sync_data()?;
            }
            Some(gate) => {
                let mut at = offset;
                for piece in data.chunks(WRITE_PIECE) {
                    gate.wait_turn();
                    // O_DSYNC: synced (data and size) when this returns.
                    self.part.write_all_at(piece, at)?;
                    at += piece.len() as u64;
                }
            }
        }
        if let Some(h) = &mut self.hash {
            h.hasher.update(data);
            h.upto += data.len() as u64;
        }
        Ok(())
    }

    /// Writes the last `data` (which must end the upload), and completes it: `.part` becomes
    /// `.video`, the record is written, the state removed. `via`: how the data arrived.
    pub fn finish(mut self, data: &[u8], owner: &Owner, via: &str) -> io::Result<VideoRecord> {
        let end = self.stored_bytes() + data.len() as u64;
        if end != self.state.total_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the last chunk does not end the upload",
            ));
        }
        self.write_synced(data)?;
        complete(
            &self.paths,
            owner,
            &self.upload,
            &self.state,
            self.hash.take(),
            via,
            unix_ms(),
        )
    }

    /// Gives up the file and hands back the running digest, for the upload's next connection.
    pub fn into_carry(mut self) -> Option<HashCarry> {
        self.hash.take().filter(|h| h.upto == self.stored_bytes())
    }
}

/// Makes the `.video` (renaming `.part` when it is still there), writes the record, removes the
/// state. `hash`: the digest of the whole upload when known, else the file is read back.
fn complete(
    paths: &UploadPaths,
    owner: &Owner,
    upload: &UploadId,
    state: &UploadState,
    hash: Option<HashCarry>,
    via: &str,
    now_ms: u64,
) -> io::Result<VideoRecord> {
    if paths.part.exists() {
        std::fs::rename(&paths.part, &paths.video)?;
        sync_dir(&paths.dir)?;
    }
    let size = std::fs::metadata(&paths.video)?.len();
    let digest: [u8; 32] = match hash {
        Some(h) if h.upto == size => h.hasher.finalize().into(),
        _ => hash_file(&paths.video)?,
    };
    let record = VideoRecord {
        subscription: owner.subscription.0,
        device: owner.serial.clone(),
        upload: upload.to_hex(),
        size,
        sha256: hex::encode(digest),
        chunk_size: state.chunk_size,
        meta: state.meta.clone(),
        via: via.to_owned(),
        started_unix_ms: state.started_unix_ms,
        completed_unix_ms: now_ms,
        attempts: state.attempts,
    };
    write_atomic(&paths.json, &paths.dir, &json(&record)?)?;
    match std::fs::remove_file(&paths.state) {
        Ok(()) => sync_dir(&paths.dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(record)
}

fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

fn json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(io::Error::other)
}

/// `None` when the file does not exist.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` (in `dir`) with `contents` so that a crash leaves the old file or the new one:
/// a temporary file, synced, renamed over it, and the directory synced.
fn write_atomic(path: &Path, dir: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` if it is missing, and makes its entry durable.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
