//! Test only: the in-memory [`TestCore`] on loopback sockets: its datagram side on UDP and a
//! stream port on TCP that plays the core's part of `docs/protocol.md` §13 (open, resume where
//! the stored chunks end, acks every few chunks, `Complete` with the SHA-256 of what it stored),
//! with knobs to cut connections, refuse uploads and falsify the digest.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::session::PublicKey;
use relay_protocol::stream::{
    AckStatus, CoreStream, RefuseReason, StreamAck, StreamOpen, UploadId,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::test_core::TestCore;
use crate::video::{read_frame, sha256};

/// One upload as the test core holds it.
#[derive(Debug, Default)]
pub(crate) struct StoredUpload {
    pub open: Option<StreamOpen>,
    /// Stored bytes (chunks below `next_chunk` count; bytes past them are discarded on resume).
    pub data: Vec<u8>,
    pub next_chunk: u32,
    pub complete: bool,
    /// Connections that opened this upload.
    pub connections: u32,
    /// Chunks received over every connection, stored or not.
    pub chunks_received: u64,
}

/// How the stream port behaves.
#[derive(Debug)]
pub(crate) struct Behaviour {
    /// An ack every this many chunks.
    pub ack_every: u32,
    /// Connection `i` (0-based, over every upload) is cut after it received this many chunks,
    /// without storing those past the last ack: one entry per connection, popped in turn.
    pub cut_after: VecDeque<Option<u32>>,
    /// Refuse every upload.
    pub refuse: Option<RefuseReason>,
    /// Put a wrong SHA-256 in the `Complete` ack.
    pub corrupt_digest: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            ack_every: 4,
            cut_after: VecDeque::new(),
            refuse: None,
            corrupt_digest: false,
        }
    }
}

type Uploads = HashMap<(PublicKey, UploadId), StoredUpload>;

/// The test core on loopback: `udp` for datagrams, `tcp` for streams. Stops when dropped.
pub(crate) struct NetCore {
    pub core: Arc<Mutex<TestCore>>,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub uploads: Arc<Mutex<Uploads>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    stop: CancellationToken,
}

impl Drop for NetCore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NetCore {
    /// Serves `core` on fresh loopback ports (both sides optional to use).
    pub async fn start(core: TestCore) -> Self {
        let core = Arc::new(Mutex::new(core));
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("tcp bind");
        let this = Self {
            udp: udp.local_addr().expect("addr"),
            tcp: tcp.local_addr().expect("addr"),
            core,
            uploads: Arc::default(),
            behaviour: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (core, stop) = (this.core.clone(), this.stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            loop {
                let (n, from) = tokio::select! {
                    () = stop.cancelled() => break,
                    r = udp.recv_from(&mut buf) => match r {
                        Ok(r) => r,
                        Err(_) => continue,
                    },
                };
                let replies = lock(&core).handle(&buf[..n], Instant::now());
                for reply in replies {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        let (core, stop) = (this.core.clone(), this.stop.clone());
        let (uploads, behaviour) = (this.uploads.clone(), this.behaviour.clone());
        tokio::spawn(async move {
            loop {
                let socket = tokio::select! {
                    () = stop.cancelled() => break,
                    r = tcp.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let (core, uploads, behaviour) = (core.clone(), uploads.clone(), behaviour.clone());
                tokio::spawn(serve_stream(socket, core, uploads, behaviour));
            }
        });
        this
    }

    /// The one upload stored so far (panics unless there is exactly one).
    pub fn only_upload<R>(&self, f: impl FnOnce(&StoredUpload) -> R) -> R {
        let uploads = lock(&self.uploads);
        assert_eq!(uploads.len(), 1, "uploads: {}", uploads.len());
        f(uploads.values().next().expect("one upload"))
    }
}

async fn send_ack(socket: &mut TcpStream, stream: &mut CoreStream, ack: &StreamAck) -> bool {
    let mut out = Vec::new();
    if stream.seal_ack(ack, &mut out).is_err() {
        return false;
    }
    socket.write_all(&out).await.is_ok()
}

/// One stream connection, the core's side.
async fn serve_stream(
    mut socket: TcpStream,
    core: Arc<Mutex<TestCore>>,
    uploads: Arc<Mutex<Uploads>>,
    behaviour: Arc<Mutex<Behaviour>>,
) {
    let mut buf = Vec::new();
    if !matches!(read_frame(&mut socket, &mut buf).await, Ok(true)) {
        return;
    }
    let Some((device, open, keys)) = lock(&core).open_stream(&buf) else {
        return;
    };
    let mut stream = CoreStream::new(keys);
    let key = (device, open.upload);
    let (ack_every, cut_after, refuse, corrupt) = {
        let mut b = lock(&behaviour);
        let cut = b.cut_after.pop_front().flatten();
        (b.ack_every.max(1), cut, b.refuse, b.corrupt_digest)
    };
    // The answer to the open.
    let first = {
        let mut all = lock(&uploads);
        let up = all.entry(key).or_default();
        up.connections += 1;
        let earlier = up.open.clone();
        match (refuse, earlier) {
            (Some(r), _) => StreamAck::refused(r),
            (None, Some(e)) if e.chunk_size != open.chunk_size => {
                StreamAck::refused(RefuseReason::ChunkSize)
            }
            (None, Some(e)) if e.total_size != open.total_size => {
                StreamAck::refused(RefuseReason::SizeMismatch)
            }
            _ if up.complete => complete_ack(up, corrupt),
            _ => {
                let keep = usize::try_from(open.offset(up.next_chunk)).expect("offset");
                up.data.truncate(keep);
                up.open = Some(open.clone());
                StreamAck::receiving(up.next_chunk, keep as u64)
            }
        }
    };
    if !send_ack(&mut socket, &mut stream, &first).await || first.status != AckStatus::Receiving {
        return;
    }
    let mut expect = first.next_chunk;
    let mut received = 0u32;
    let mut chunk = Vec::new();
    loop {
        if !matches!(read_frame(&mut socket, &mut buf).await, Ok(true)) {
            return;
        }
        let Ok(c) = stream.open_chunk(&buf, &mut chunk) else {
            return;
        };
        let last = c.index + 1 == open.chunks();
        if c.index != expect || chunk.len() != open.chunk_len(c.index) || c.last != last {
            return;
        }
        received += 1;
        expect += 1;
        let ack = {
            let mut all = lock(&uploads);
            let up = all.get_mut(&key).expect("opened");
            up.chunks_received += 1;
            let offset = usize::try_from(open.offset(c.index)).expect("offset");
            up.data.truncate(offset);
            up.data.extend_from_slice(&chunk);
            if cut_after.is_some_and(|n| received >= n) {
                // Cut: what was received since the last ack is not stored.
                return;
            }
            if c.last {
                up.next_chunk = expect;
                up.complete = true;
                Some(complete_ack(up, corrupt))
            } else if received % ack_every == 0 {
                up.next_chunk = expect;
                Some(StreamAck::receiving(expect, up.data.len() as u64))
            } else {
                None
            }
        };
        if let Some(ack) = ack {
            if !send_ack(&mut socket, &mut stream, &ack).await || ack.status != AckStatus::Receiving
            {
                return;
            }
        }
    }
}

fn complete_ack(up: &StoredUpload, corrupt: bool) -> StreamAck {
    let mut sha256 = sha256(&up.data);
    if corrupt {
        sha256[0] ^= 1;
    }
    StreamAck {
        status: AckStatus::Complete,
        reason: 0,
        next_chunk: up.next_chunk,
        stored_bytes: up.data.len() as u64,
        sha256,
    }
}
