use super::*;

const CHUNK: u32 = 1024;

fn owner() -> Owner {
    Owner {
        subscription: SubscriptionId(7),
        serial: Some("cam-1".into()),
    }
}

fn open_of(upload: u8, chunk_size: u32, total_size: u64) -> StreamOpen {
    StreamOpen {
        salt: [9; 16],
        upload: UploadId([upload; 16]),
        chunk_size,
        total_size,
        meta: "accident at 10:00".into(),
    }
}

fn video(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn receiving(opened: Opened) -> PartialUpload {
    match opened {
        Opened::Receiving(u) => u,
        other => panic!("expected Receiving, got {other:?}"),
    }
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: VideoStore,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("videos");
        Self {
            store: VideoStore::new(root.clone(), 1 << 20),
            root,
            _dir: dir,
        }
    }

    fn open(&self, open: &StreamOpen) -> Opened {
        self.store.open(&owner(), open, None, 1_000).expect("open")
    }

    fn file(&self, upload: u8, ext: &str) -> PathBuf {
        self.root
            .join("7")
            .join(format!("{}.{ext}", UploadId([upload; 16]).to_hex()))
    }

    fn state(&self, upload: u8) -> UploadState {
        read_json(&self.file(upload, "state"))
            .expect("read")
            .expect("state exists")
    }
}

#[test]
fn a_new_upload_starts_at_zero_and_resumes_where_it_was_synced() {
    let f = Fixture::new();
    let data = video(5 * CHUNK as usize + 100);
    let open = open_of(1, CHUNK, data.len() as u64);
    let mut up = receiving(f.open(&open));
    assert_eq!(
        (up.next_chunk(), up.stored_bytes(), up.attempts()),
        (0, 0, 1)
    );
    up.commit(&data[..2 * CHUNK as usize], 2).expect("commit");
    assert_eq!(
        (up.next_chunk(), up.stored_bytes()),
        (2, 2 * u64::from(CHUNK))
    );
    assert_eq!(f.state(1).next_chunk, 2);
    drop(up);

    // A new connection (new salt) resumes from the synced prefix.
    let mut again = open.clone();
    again.salt = [1; 16];
    let up = receiving(f.open(&again));
    assert_eq!((up.next_chunk(), up.attempts()), (2, 2));
    let state = f.state(1);
    assert_eq!(
        (state.attempts, state.started_unix_ms, state.meta.as_str()),
        (2, 1_000, "accident at 10:00")
    );
}

#[test]
fn a_resume_cuts_the_part_file_back_to_the_acknowledged_prefix() {
    let f = Fixture::new();
    let data = video(4 * CHUNK as usize);
    let open = open_of(2, CHUNK, data.len() as u64);
    let mut up = receiving(f.open(&open));
    up.commit(&data[..CHUNK as usize], 1).expect("commit");
    drop(up);
    // Bytes written after the last checkpoint (a crash before the state was replaced): never
    // acknowledged, so they must go.
    let part = f.file(2, "part");
    {
        let file = OpenOptions::new().write(true).open(&part).expect("part");
        file.write_all_at(&[0xee; 1500], u64::from(CHUNK))
            .expect("junk");
    }
    assert_eq!(
        std::fs::metadata(&part).expect("meta").len(),
        u64::from(CHUNK) + 1500
    );
    let mut up = receiving(f.open(&open));
    assert_eq!(up.next_chunk(), 1);
    assert_eq!(
        std::fs::metadata(&part).expect("meta").len(),
        u64::from(CHUNK)
    );
    // A leftover temporary state file (a crash inside the atomic replace) is ignored.
    std::fs::write(f.file(2, "state.tmp"), b"{ torn").expect("tmp");
    up.commit(&data[CHUNK as usize..3 * CHUNK as usize], 2)
        .expect("commit");
    let record = up
        .finish(&data[3 * CHUNK as usize..], &owner(), "direct")
        .expect("finish");
    // No digest carried over from the first connection: hashed from the file.
    assert_eq!(record.sha256, sha_hex(&data));
    assert_eq!(std::fs::read(f.file(2, "video")).expect("video"), data);
}

#[test]
fn a_part_shorter_than_its_state_resumes_from_what_is_there() {
    let f = Fixture::new();
    let open = open_of(3, CHUNK, 10 * u64::from(CHUNK));
    let mut up = receiving(f.open(&open));
    up.commit(&video(3 * CHUNK as usize), 3).expect("commit");
    drop(up);
    let part = OpenOptions::new()
        .write(true)
        .open(f.file(3, "part"))
        .expect("part");
    part.set_len(u64::from(CHUNK) + 10).expect("cut");
    let up = receiving(f.open(&open));
    assert_eq!(up.next_chunk(), 1);
    assert_eq!(f.state(3).next_chunk, 1);
}

#[test]
fn changed_chunk_size_or_total_and_oversized_uploads_are_refused_without_touching_the_disk() {
    let f = Fixture::new();
    let open = open_of(4, CHUNK, 4 * u64::from(CHUNK));
    let mut up = receiving(f.open(&open));
    up.commit(&video(CHUNK as usize), 1).expect("commit");
    drop(up);
    let before = f.state(4);

    let mut other = open.clone();
    other.chunk_size = 2 * CHUNK;
    assert!(matches!(
        f.open(&other),
        Opened::Refused(RefuseReason::ChunkSize)
    ));
    let mut other = open.clone();
    other.total_size += 1;
    assert!(matches!(
        f.open(&other),
        Opened::Refused(RefuseReason::SizeMismatch)
    ));
    let huge = open_of(5, CHUNK, (1 << 20) + 1);
    assert!(matches!(
        f.open(&huge),
        Opened::Refused(RefuseReason::TooLarge)
    ));
    assert!(!f.file(5, "state").exists() && !f.file(5, "part").exists());
    assert_eq!(f.state(4), before);
    assert_eq!(
        std::fs::metadata(f.file(4, "part")).expect("meta").len(),
        u64::from(CHUNK)
    );
}

#[test]
fn completion_writes_the_video_and_its_record_with_the_sha256() {
    let f = Fixture::new();
    let data = video(3 * CHUNK as usize + 7);
    let open = open_of(6, CHUNK, data.len() as u64);
    let mut up = receiving(f.open(&open));
    up.commit(&data[..CHUNK as usize], 1).expect("commit");
    // Carried to the next connection: the digest is not recomputed from the file.
    let carry = up.into_carry().expect("digest carried");
    assert_eq!(carry.upto, u64::from(CHUNK));
    let mut up = match f.store.open(&owner(), &open, Some(carry), 2_000) {
        Ok(Opened::Receiving(u)) => u,
        other => panic!("{other:?}"),
    };
    assert!(up.hash.is_some());
    up.commit(&data[CHUNK as usize..3 * CHUNK as usize], 2)
        .expect("commit");
    // A last chunk that does not end the upload is refused.
    let mut wrong = receiving(f.open(&open));
    assert!(wrong.commit(&[], 0).is_ok());
    drop(up);
    let err = wrong
        .finish(
            &data[3 * CHUNK as usize..3 * CHUNK as usize + 3],
            &owner(),
            "x",
        )
        .expect_err("short");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(f.file(6, "part").exists() && !f.file(6, "video").exists());

    let up = receiving(f.open(&open));
    assert_eq!(up.next_chunk(), 3);
    let record = up
        .finish(&data[3 * CHUNK as usize..], &owner(), "gateway-1")
        .expect("finish");
    assert_eq!(record.sha256, sha_hex(&data));
    assert_eq!(
        record.sha256_bytes().to_vec(),
        Sha256::digest(&data).to_vec()
    );
    assert_eq!(
        (
            record.size,
            record.chunk_size,
            record.subscription,
            record.device.as_deref(),
            record.via.as_str(),
            record.upload.as_str(),
            record.attempts,
            record.started_unix_ms,
        ),
        (
            data.len() as u64,
            CHUNK,
            7,
            Some("cam-1"),
            "gateway-1",
            UploadId([6; 16]).to_hex().as_str(),
            4,
            1_000,
        )
    );
    assert!(record.completed_unix_ms >= record.started_unix_ms);
    assert_eq!(std::fs::read(f.file(6, "video")).expect("video"), data);
    assert!(!f.file(6, "part").exists());
    assert!(!f.file(6, "state").exists());
    let on_disk: VideoRecord = read_json(&f.file(6, "json"))
        .expect("read")
        .expect("record");
    assert_eq!(on_disk, record);
    assert_eq!(f.store.list().expect("list"), vec![record.clone()]);

    // Already complete: answered at once, nothing rewritten; another total is refused.
    match f.open(&open) {
        Opened::Complete(r) => assert_eq!(r, record),
        other => panic!("{other:?}"),
    }
    let mut other = open.clone();
    other.total_size -= 1;
    assert!(matches!(
        f.open(&other),
        Opened::Refused(RefuseReason::SizeMismatch)
    ));
}

#[test]
fn a_crash_between_the_rename_and_the_record_is_completed_on_the_next_open() {
    let f = Fixture::new();
    let data = video(2 * CHUNK as usize);
    let open = open_of(8, CHUNK, data.len() as u64);
    let mut up = receiving(f.open(&open));
    up.commit(&data, 2).expect("commit");
    drop(up);
    std::fs::rename(f.file(8, "part"), f.file(8, "video")).expect("rename");
    match f.open(&open) {
        Opened::Complete(r) => {
            assert_eq!(r.sha256, sha_hex(&data));
            assert_eq!(r.size, data.len() as u64);
        }
        other => panic!("{other:?}"),
    }
    assert!(f.file(8, "json").exists() && !f.file(8, "state").exists());
}

#[test]
fn a_single_chunk_upload_and_an_empty_store_list() {
    let f = Fixture::new();
    assert!(f.store.list().expect("list").is_empty());
    let data = video(10);
    let open = open_of(9, CHUNK, 10);
    let up = receiving(f.open(&open));
    let record = up.finish(&data, &owner(), "direct").expect("finish");
    assert_eq!(record.sha256, sha_hex(&data));
    assert_eq!(f.store.list().expect("list").len(), 1);
}

#[test]
fn with_the_disk_gate_large_commits_are_written_in_pieces_and_stored_whole() {
    use crate::disk::{DiskGate, WRITE_PIECE};
    use std::sync::Arc;

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("videos");
    let gate = Arc::new(DiskGate::default());
    let store = VideoStore::new(root.clone(), 64 << 20).with_gate(gate.clone());
    let chunk = 64 * 1024u32;
    // Commits of several pieces and a part of one, and a last chunk that is short.
    let data = video(3 * WRITE_PIECE + 5 * chunk as usize + 777);
    let open = open_of(9, chunk, data.len() as u64);
    let mut up = receiving(store.open(&owner(), &open, None, 1).expect("open"));
    let first = (2 * WRITE_PIECE) / chunk as usize + 3;
    up.commit(&data[..first * chunk as usize], first as u32)
        .expect("commit");
    drop(up);

    // A commit that holds the gate the whole time slows the writes, it does not stop them.
    let _held = gate.hold();
    let mut up = receiving(store.open(&owner(), &open, None, 2).expect("reopen"));
    assert_eq!(up.next_chunk(), first as u32);
    let chunks = (data.len() as u64).div_ceil(u64::from(chunk)) as usize;
    let from = first * chunk as usize;
    let last = (chunks - 1) * chunk as usize;
    up.commit(&data[from..last], (chunks - 1 - first) as u32)
        .expect("commit");
    let record = up
        .finish(&data[last..], &owner(), "direct")
        .expect("finish");
    assert_eq!(record.sha256, sha_hex(&data));
    let stored = root
        .join("7")
        .join(format!("{}.video", UploadId([9; 16]).to_hex()));
    assert_eq!(std::fs::read(stored).expect("video"), data);
}
