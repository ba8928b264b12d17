//! Device streams (`docs/protocol.md` §13): a camera's video, uploaded in chunks over TCP
//! straight to the core or through a gateway (one QUIC stream per upload, on the gateway's bulk
//! connection, or on its main connection for a gateway that has none), stored by
//! [`crate::video`].
//!
//! All of it runs on the bulk lane ([`StreamHub::lane`]: threads of their own at `[video]
//! cpu_priority`, `SCHED_IDLE` by default): the TCP listener and its connections, the bulk QUIC
//! endpoint with its connections' drivers (`uplink::serve_bulk`), every stream task, and the
//! blocking threads that write and sync. Only the open's authentication is the engine's.
//!
//! ```text
//!  bulk lane (own threads, [video] cpu_priority) ─────────────────────────────────────────────────
//!  TCP (direct access) ───────────────────┐
//!  gateway's bulk connection: QUIC stream ┼─▶ StreamHub::serve (one task per stream, generic over
//!  gateway's main connection: QUIC stream ┘     │                the carriage)
//!   (older gateways; both after 0x01 0x20)      │ first frame ──EngineInput::StreamOpen──▶ engine:
//!                                               │   (origin: the address, or the gateway's
//!                                               │    certificate name)
//!                                               │  ◀── owner, StreamOpen, stream keys ── session,
//!                                               │      replay window, path policy (by that name)
//!                                               │ the upload's lock (a newer stream of it takes over)
//!                                               │ VideoStore::open (blocking thread) ─▶ ack: where
//!                                               │   to start
//!                                               └ chunks: open, check index and length, batch ─▶
//!                                                 commit on a blocking thread (write, sync, state
//!                                                 file) ─▶ ack; FINAL ─▶ .video + .json ─▶ Complete
//! ```
//!
//! Reading goes on while the previous batch is written and synced (two batches at most in
//! memory per stream); an ack goes out only once the chunks it names are on disk. Whatever ends a
//! stream ends only that stream: the device's datagram session is not touched, and the chunks
//! that authenticated before the end are kept for the next attempt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use relay_protocol::frame::MAX_DATAGRAM;
use relay_protocol::stream::{
    peek_length, AckStatus, CoreStream, RefuseReason, StreamAck, StreamError, StreamOpen, UploadId,
    LENGTH_PREFIX, MAX_CHUNK, MAX_STREAM_FRAME, UPLINK_STREAM_HEADER,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::VideoConfig;
use crate::disk::DiskGate;
use crate::engine::{DropReason, EngineInput, StreamDenied, StreamGrant, StreamOrigin};
use crate::metrics::{Metrics, StreamEnd};
use crate::store::SubscriptionId;
use crate::video::{HashCarry, Opened, Owner, PartialUpload, VideoRecord, VideoStore};

/// How long the last ack of a stream that ends abnormally may take to write.
const LAST_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Uploads whose running digest is kept in memory between connections, at most (beyond this,
/// idle ones are forgotten and their digest is computed from the file when they complete).
const MAX_CARRIED: usize = 4096;

/// While the previous batch is being synced, the next grows to at most this many times
/// `ack_every_chunks` (group commit: a slow disk gets fewer, larger syncs instead of throttling
/// the stream to one sync per `ack_every_chunks`; measured with 64 KiB chunks on an ext4 VM disk:
/// 1 MiB batches 74 MB/s, 4 MiB 159 MB/s, 16 MiB 258 MB/s of write + sync + state replacement).
const GROUP_COMMIT: u32 = 16;

/// The chunks of all streams buffered beyond each stream's first `ack_every_chunks` (the growth
/// of group commits), in KiB: at most 256 MiB. A stream that finds it spent stops reading until
/// its commit lands, so the device (and gateway) wait instead of the core's memory growing.
const GROWTH_BUDGET_KIB: usize = 256 * 1024;

/// QUIC application error code for a device stream the core refuses at the uplink level.
const STREAM_REFUSED: u32 = 1;

/// How a stream reached the core.
#[derive(Clone, Debug)]
pub(crate) enum StreamVia {
    /// A TCP connection to the stream port, from this address.
    Direct(SocketAddr),
    /// A QUIC stream of a gateway's connection (its bulk connection, or the main one of an
    /// older gateway), known by the name in the gateway's verified certificate: what the path
    /// policy is checked against and what the video record says.
    Gateway(Arc<str>),
}

impl StreamVia {
    fn origin(&self) -> StreamOrigin {
        match self {
            Self::Direct(addr) => StreamOrigin::Direct(*addr),
            Self::Gateway(name) => StreamOrigin::Gateway(name.clone()),
        }
    }

    /// What the video record says: `direct` or the gateway's name.
    fn label(&self) -> &str {
        match self {
            Self::Direct(_) => "direct",
            Self::Gateway(name) => name,
        }
    }
}

type UploadKey = (SubscriptionId, UploadId);

/// One upload some stream is, or recently was, writing.
struct UploadEntry {
    /// Held by the stream writing the upload; keeps its running digest between connections.
    slot: Arc<tokio::sync::Mutex<Option<HashCarry>>>,
    /// The newest stream of the upload (a generation and its cancel token): a newer stream
    /// cancels it and waits for the slot.
    holder: Option<(u64, CancellationToken)>,
}

/// Everything the stream tasks share.
pub(crate) struct StreamHub {
    engine: mpsc::Sender<EngineInput>,
    metrics: Metrics,
    config: VideoConfig,
    store: VideoStore,
    /// Streams past their open, all carriages together: `max_streams`.
    active: Arc<Semaphore>,
    /// Connections whose first frame is not handled yet: `max_streams` too.
    opening: Arc<Semaphore>,
    /// [`GROWTH_BUDGET_KIB`].
    growth: Arc<Semaphore>,
    uploads: Mutex<HashMap<UploadKey, UploadEntry>>,
    generation: AtomicU64,
    shutdown: CancellationToken,
    /// Where stream tasks run: the bulk lane (its own threads, at a lower CPU priority).
    lane: tokio::runtime::Handle,
}

impl std::fmt::Debug for StreamHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHub")
            .field("dir", &self.store.dir())
            .field("active", &self.active.available_permits())
            .finish_non_exhaustive()
    }
}

/// Why reading a frame failed.
enum ReadEnd {
    /// The peer closed (cleanly or not) or the carriage failed.
    Closed,
    /// A length prefix over the limit.
    TooLarge,
}

/// Length-prefixed frames off a byte stream. Cancel-safe: bytes read stay buffered.
struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(2 * (LENGTH_PREFIX + max)),
            max,
        }
    }

    /// The next whole frame, without its length prefix. A bad length ends it before any of the
    /// body is read.
    async fn next<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> Result<BytesMut, ReadEnd> {
        loop {
            let want = match peek_length(&self.buf) {
                Err(_) => return Err(ReadEnd::TooLarge),
                Ok(Some(len)) if len > self.max => return Err(ReadEnd::TooLarge),
                Ok(Some(len)) if self.buf.len() >= LENGTH_PREFIX + len => {
                    self.buf.advance(LENGTH_PREFIX);
                    return Ok(self.buf.split_to(len));
                }
                Ok(Some(len)) => LENGTH_PREFIX + len - self.buf.len(),
                Ok(None) => LENGTH_PREFIX - self.buf.len(),
            };
            self.buf.reserve(want);
            match reader.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ReadEnd::Closed),
                Ok(_) => {}
            }
        }
    }
}

/// Seals and writes acks on one stream.
struct AckWriter<W> {
    writer: W,
    core: CoreStream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<W: AsyncWrite + Unpin> AckWriter<W> {
    async fn send(&mut self, ack: &StreamAck) -> Result<(), StreamEnd> {
        self.send_within(ack, self.timeout).await
    }

    async fn send_within(&mut self, ack: &StreamAck, within: Duration) -> Result<(), StreamEnd> {
        self.buf.clear();
        self.core
            .seal_ack(ack, &mut self.buf)
            .map_err(|_| StreamEnd::Malformed)?;
        let write = async {
            self.writer.write_all(&self.buf).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(within, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StreamEnd::Truncated),
            Err(_) => Err(StreamEnd::Stalled),
        }
    }
}

/// A batch of chunks handed to a blocking thread, and what came back.
struct Flush {
    upload: PartialUpload,
    data: Vec<u8>,
    result: std::io::Result<()>,
    /// The growth budget the batch held, given back when it lands.
    _growth: Option<OwnedSemaphorePermit>,
}

fn complete_ack(record: &VideoRecord, chunks: u32) -> StreamAck {
    StreamAck {
        status: AckStatus::Complete,
        reason: 0,
        next_chunk: chunks,
        stored_bytes: record.size,
        sha256: record.sha256_bytes(),
    }
}

fn end_of(reason: DropReason) -> StreamEnd {
    match reason {
        DropReason::Decode(_) | DropReason::UnexpectedMessage | DropReason::UnexpectedType => {
            StreamEnd::Malformed
        }
        DropReason::NotPermitted => StreamEnd::Refused,
        _ => StreamEnd::UnknownSession,
    }
}

fn end_of_chunk(e: StreamError) -> StreamEnd {
    match e {
        StreamError::TooLarge(_) => StreamEnd::TooLarge,
        StreamError::Authentication => StreamEnd::Auth,
        StreamError::OutOfOrder { .. } => StreamEnd::Order,
        StreamError::Malformed(_) | StreamError::Exhausted => StreamEnd::Malformed,
    }
}

/// Decrements `core_streams_open` however the stream ends.
struct OpenGauge(Metrics);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.streams_open.dec();
    }
}

impl StreamHub {
    /// Stores uploads as `config` says; opens go to the engine on `engine`.
    pub fn new(
        config: VideoConfig,
        engine: mpsc::Sender<EngineInput>,
        metrics: Metrics,
        shutdown: CancellationToken,
        lane: tokio::runtime::Handle,
        gate: Option<Arc<DiskGate>>,
    ) -> Self {
        let mut store = VideoStore::new(config.dir.clone(), config.max_bytes);
        if let Some(gate) = gate {
            store = store.with_gate(gate);
        }
        Self {
            lane,
            engine,
            metrics,
            store,
            active: Arc::new(Semaphore::new(config.max_streams)),
            opening: Arc::new(Semaphore::new(config.max_streams)),
            growth: Arc::new(Semaphore::new(GROWTH_BUDGET_KIB)),
            config,
            uploads: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            shutdown,
        }
    }

    /// The bulk lane, where stream tasks are spawned.
    pub fn lane(&self) -> &tokio::runtime::Handle {
        &self.lane
    }

    /// Serves one device stream to its end, counts the end and returns it. The reader and writer
    /// are the stream's two directions (TCP halves, or a gateway's QUIC stream after its header).
    pub async fn serve<R, W>(self: Arc<Self>, mut reader: R, writer: W, via: StreamVia) -> StreamEnd
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        self.metrics.streams_open.inc();
        let _gauge = OpenGauge(self.metrics.clone());
        let mut report = Report::default();
        let end = self
            .serve_inner(&mut reader, writer, &via, &mut report)
            .await;
        self.metrics.stream_end(end);
        tracing::debug!(
            reason = end.label(),
            subscription = report.subscription,
            upload = report.upload.as_deref().unwrap_or("-"),
            from_chunk = report.from_chunk,
            stored_bytes = report.stored,
            "device stream ended"
        );
        end
    }

    async fn serve_inner<R, W>(
        &self,
        reader: &mut R,
        writer: W,
        via: &StreamVia,
        report: &mut Report,
    ) -> StreamEnd
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let Ok(opening) = self.opening.clone().try_acquire_owned() else {
            return StreamEnd::Refused;
        };
        let stall = self.config.stall_timeout;
        let mut frames = FrameReader::new(MAX_DATAGRAM);
        let first = tokio::select! {
            () = self.shutdown.cancelled() => return StreamEnd::Shutdown,
            r = tokio::time::timeout(stall, frames.next(reader)) => match r {
                Err(_) => return StreamEnd::Stalled,
                Ok(Err(ReadEnd::TooLarge)) => return StreamEnd::TooLarge,
                Ok(Err(ReadEnd::Closed)) => return StreamEnd::Truncated,
                Ok(Ok(frame)) => frame,
            },
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let input = EngineInput::StreamOpen {
            frame: first.freeze(),
            origin: via.origin(),
            reply: reply_tx,
        };
        let granted = tokio::select! {
            () = self.shutdown.cancelled() => return StreamEnd::Shutdown,
            r = async {
                self.engine.send(input).await.ok()?;
                reply_rx.await.ok()
            } => match r {
                None => return StreamEnd::Shutdown,
                Some(Err(StreamDenied::Dropped(reason))) => return end_of(reason),
                Some(Err(StreamDenied::NotPermitted(keys))) => {
                    // Authenticated, so the device can be told, and stops retrying.
                    let mut acks = AckWriter {
                        writer,
                        core: CoreStream::new(keys),
                        buf: Vec::with_capacity(128),
                        timeout: stall,
                    };
                    let _ = acks.send(&StreamAck::refused(RefuseReason::NotPermitted)).await;
                    let _ = tokio::time::timeout(LAST_ACK_TIMEOUT, acks.writer.shutdown()).await;
                    return StreamEnd::Refused;
                }
                Some(Ok(g)) => g,
            },
        };
        drop(opening);
        let StreamGrant { owner, open, keys } = granted;
        report.subscription = owner.subscription.0;
        report.upload = Some(open.upload.to_hex());
        let mut acks = AckWriter {
            writer,
            core: CoreStream::new(keys),
            buf: Vec::with_capacity(128),
            timeout: stall,
        };
        let end = self
            .receive(reader, &mut acks, &mut frames, owner, open, via, report)
            .await;
        let _ = tokio::time::timeout(LAST_ACK_TIMEOUT, acks.writer.shutdown()).await;
        end
    }

    /// From the authenticated open to the end of the stream.
    #[allow(clippy::too_many_arguments)]
    async fn receive<R, W>(
        &self,
        reader: &mut R,
        acks: &mut AckWriter<W>,
        frames: &mut FrameReader,
        owner: Owner,
        open: StreamOpen,
        via: &StreamVia,
        report: &mut Report,
    ) -> StreamEnd
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        if open.total_size > self.config.max_bytes {
            let _ = acks.send(&StreamAck::refused(RefuseReason::TooLarge)).await;
            return StreamEnd::Refused;
        }
        let Ok(_active) = self.active.clone().try_acquire_owned() else {
            let _ = acks.send(&StreamAck::refused(RefuseReason::Busy)).await;
            return StreamEnd::Refused;
        };
        let key = (owner.subscription, open.upload);
        let (generation, superseded, slot) = self.claim(key);
        let guard = tokio::select! {
            () = self.shutdown.cancelled() => {
                self.release(key, generation, false);
                return StreamEnd::Shutdown;
            }
            () = superseded.cancelled() => return StreamEnd::Superseded,
            g = tokio::time::timeout(self.config.stall_timeout, slot.lock_owned()) => match g {
                Ok(g) => g,
                Err(_) => {
                    tracing::warn!(upload = %open.upload, "the upload's previous stream did not let go");
                    self.release(key, generation, false);
                    return StreamEnd::Stalled;
                }
            },
        };
        let mut guard = guard;
        let carry = guard.take();
        let store = self.store.clone();
        let opened = {
            let (owner, open) = (owner.clone(), open.clone());
            tokio::task::spawn_blocking(move || {
                store.open(&owner, &open, carry, crate::video::unix_ms())
            })
            .await
        };
        let upload = match opened {
            Ok(Ok(Opened::Receiving(upload))) => upload,
            Ok(Ok(Opened::Complete(record))) => {
                self.release(key, generation, true);
                let _ = acks.send(&complete_ack(&record, open.chunks())).await;
                return StreamEnd::Complete;
            }
            Ok(Ok(Opened::Refused(reason))) => {
                self.release(key, generation, false);
                let _ = acks.send(&StreamAck::refused(reason)).await;
                return StreamEnd::Refused;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, upload = %open.upload, "cannot open the upload's files");
                self.release(key, generation, false);
                return StreamEnd::Io;
            }
            Err(e) => {
                tracing::error!(error = %e, "upload open task failed");
                self.release(key, generation, false);
                return StreamEnd::Io;
            }
        };
        report.from_chunk = upload.next_chunk();
        let mut session = Session {
            hub: self,
            open: &open,
            owner: &owner,
            via,
            superseded: &superseded,
            report,
            batch_bytes: self.config.ack_every_chunks as usize * open.chunk_size as usize,
        };
        let (end, carry) = session.run(reader, acks, frames, upload).await;
        *guard = carry;
        drop(guard);
        self.release(key, generation, end == StreamEnd::Complete);
        end
    }

    /// Makes the caller the newest stream of upload `key`: an older stream of it is cancelled.
    /// Returns the caller's generation, its cancel token, and the upload's slot to lock.
    fn claim(
        &self,
        key: UploadKey,
    ) -> (
        u64,
        CancellationToken,
        Arc<tokio::sync::Mutex<Option<HashCarry>>>,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let token = self.shutdown.child_token();
        let mut uploads = self
            .uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if uploads.len() >= MAX_CARRIED && !uploads.contains_key(&key) {
            uploads.retain(|_, e| e.holder.is_some() || Arc::strong_count(&e.slot) > 1);
        }
        let entry = uploads.entry(key).or_insert_with(|| UploadEntry {
            slot: Arc::new(tokio::sync::Mutex::new(None)),
            holder: None,
        });
        if let Some((_, older)) = entry.holder.replace((generation, token.clone())) {
            older.cancel();
        }
        (generation, token, entry.slot.clone())
    }

    /// The stream of `generation` is done with upload `key`; a completed upload is forgotten.
    fn release(&self, key: UploadKey, generation: u64, complete: bool) {
        let mut uploads = self
            .uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(entry) = uploads.get_mut(&key) else {
            return;
        };
        if entry.holder.as_ref().is_some_and(|(g, _)| *g == generation) {
            entry.holder = None;
            if complete {
                uploads.remove(&key);
            }
        }
    }
}

/// What the end-of-stream log line says.
#[derive(Debug, Default)]
struct Report {
    subscription: i64,
    upload: Option<String>,
    from_chunk: u32,
    stored: u64,
}

/// One stream's receiving loop, past the open.
struct Session<'a> {
    hub: &'a StreamHub,
    open: &'a StreamOpen,
    owner: &'a Owner,
    via: &'a StreamVia,
    superseded: &'a CancellationToken,
    report: &'a mut Report,
    /// The bytes of `ack_every_chunks` chunks: what a batch keeps allocated.
    batch_bytes: usize,
}

impl Session<'_> {
    /// Answers the open, then takes chunks until the upload completes or the stream ends. Returns
    /// how it ended and the digest to keep for the upload's next connection.
    async fn run<R, W>(
        &mut self,
        reader: &mut R,
        acks: &mut AckWriter<W>,
        frames: &mut FrameReader,
        upload: PartialUpload,
    ) -> (StreamEnd, Option<HashCarry>)
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        frames.max = MAX_STREAM_FRAME;
        let ack = StreamAck::receiving(upload.next_chunk(), upload.stored_bytes());
        if let Err(end) = acks.send(&ack).await {
            return (end, upload.into_carry());
        }
        let hub = self.hub;
        let stall = hub.config.stall_timeout;
        let ack_every = hub.config.ack_every_chunks;
        let max_batch = ack_every.saturating_mul(GROUP_COMMIT);
        let chunks = self.open.chunks();
        let batch_bytes = self.batch_bytes;
        let mut expected = upload.next_chunk();
        let mut upload = Some(upload);
        let mut batch: Vec<u8> = Vec::with_capacity(batch_bytes);
        let mut batch_chunks = 0u32;
        // Growth budget held for the batch's chunks past `ack_every`, and how many it covers.
        let mut growth: Option<OwnedSemaphorePermit> = None;
        let mut growth_chunks = 0u32;
        let chunk_kib = (self.open.chunk_size as usize).div_ceil(1024);
        let mut spare: Vec<u8> = Vec::with_capacity(batch_bytes);
        let mut inflight: Option<tokio::task::JoinHandle<Flush>> = None;
        let mut plain = Vec::with_capacity(MAX_CHUNK);
        let mut deadline = Instant::now() + stall;

        let end = loop {
            if batch_chunks >= ack_every && inflight.is_none() {
                if let Some(u) = upload.take() {
                    let data = std::mem::replace(&mut batch, std::mem::take(&mut spare));
                    inflight = Some(spawn_commit(u, data, batch_chunks, growth.take()));
                    batch_chunks = 0;
                    growth_chunks = 0;
                }
            }
            // While a batch is on its way to the disk, the next one grows, up to `max_batch` and
            // as far as the shared budget allows.
            let mut can_read = batch_chunks < ack_every + growth_chunks;
            if !can_read && batch_chunks < max_batch {
                if let Ok(p) = hub.growth.clone().try_acquire_many_owned(chunk_kib as u32) {
                    match &mut growth {
                        Some(held) => held.merge(p),
                        None => growth = Some(p),
                    }
                    growth_chunks += 1;
                    can_read = true;
                }
            }
            tokio::select! {
                biased;
                () = hub.shutdown.cancelled() => break StreamEnd::Shutdown,
                () = self.superseded.cancelled() => break StreamEnd::Superseded,
                joined = async {
                    match inflight.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if inflight.is_some() => {
                    inflight = None;
                    match self.landed(joined, &mut upload, &mut spare) {
                        Ok(ack) => {
                            if let Err(end) = acks.send(&ack).await {
                                break end;
                            }
                        }
                        Err(end) => break end,
                    }
                    // Reading waited for the disk, not for the device.
                    deadline = Instant::now() + stall;
                }
                frame = tokio::time::timeout_at(deadline, frames.next(reader)), if can_read => {
                    let frame = match frame {
                        Err(_) => break StreamEnd::Stalled,
                        Ok(Err(ReadEnd::TooLarge)) => break StreamEnd::TooLarge,
                        Ok(Err(ReadEnd::Closed)) => break StreamEnd::Truncated,
                        Ok(Ok(frame)) => frame,
                    };
                    deadline = Instant::now() + stall;
                    let chunk = match acks.core.open_chunk(&frame, &mut plain) {
                        Ok(c) => c,
                        Err(e) => break end_of_chunk(e),
                    };
                    if chunk.index != expected {
                        break StreamEnd::Order;
                    }
                    let want = self.open.chunk_len(chunk.index);
                    if plain.len() > want {
                        break StreamEnd::TooLarge;
                    }
                    let last = chunk.index + 1 == chunks;
                    if plain.len() < want || chunk.last != last {
                        break StreamEnd::Malformed;
                    }
                    batch.extend_from_slice(&plain);
                    batch_chunks += 1;
                    expected += 1;
                    if last {
                        return self
                            .finish(acks, inflight, upload, &mut spare, batch)
                            .await;
                    }
                }
            }
        };

        // Keep what authenticated: the device resumes after it.
        let mut end = end;
        if let Some(handle) = inflight.take() {
            match self.landed(handle.await, &mut upload, &mut spare) {
                Ok(ack) => {
                    let _ = acks.send_within(&ack, LAST_ACK_TIMEOUT).await;
                }
                Err(e) => end = e,
            }
        }
        if end != StreamEnd::Io && batch_chunks > 0 {
            if let Some(u) = upload.take() {
                let joined = spawn_commit(u, batch, batch_chunks, growth.take()).await;
                match self.landed(joined, &mut upload, &mut spare) {
                    Ok(ack) => {
                        let _ = acks.send_within(&ack, LAST_ACK_TIMEOUT).await;
                    }
                    Err(e) => end = e,
                }
            }
        }
        (end, upload.and_then(PartialUpload::into_carry))
    }

    /// A batch came back from the disk: the upload is handed back, and the ack to send made.
    fn landed(
        &mut self,
        joined: Result<Flush, tokio::task::JoinError>,
        upload: &mut Option<PartialUpload>,
        spare: &mut Vec<u8>,
    ) -> Result<StreamAck, StreamEnd> {
        let flush = joined.map_err(|e| {
            tracing::error!(error = %e, "upload write task failed");
            StreamEnd::Io
        })?;
        let Flush {
            upload: u,
            mut data,
            result,
            _growth,
        } = flush;
        let ack = StreamAck::receiving(u.next_chunk(), u.stored_bytes());
        *upload = Some(u);
        if let Err(e) = result {
            tracing::error!(error = %e, upload = %self.open.upload, "cannot store upload chunks");
            return Err(StreamEnd::Io);
        }
        self.hub.metrics.stream_bytes.inc_by(data.len() as u64);
        self.report.stored += data.len() as u64;
        data.clear();
        // A batch grown by group commit does not keep its size once the disk caught up.
        data.shrink_to(self.batch_bytes);
        *spare = data;
        Ok(ack)
    }

    /// The FINAL chunk arrived (it is in `batch`): store it, complete the upload, say Complete.
    async fn finish<W: AsyncWrite + Unpin>(
        &mut self,
        acks: &mut AckWriter<W>,
        inflight: Option<tokio::task::JoinHandle<Flush>>,
        mut upload: Option<PartialUpload>,
        spare: &mut Vec<u8>,
        batch: Vec<u8>,
    ) -> (StreamEnd, Option<HashCarry>) {
        if let Some(handle) = inflight {
            match self.landed(handle.await, &mut upload, spare) {
                Ok(ack) => {
                    if let Err(end) = acks.send(&ack).await {
                        return (end, upload.and_then(PartialUpload::into_carry));
                    }
                }
                Err(end) => return (end, None),
            }
        }
        let Some(upload) = upload else {
            return (StreamEnd::Io, None);
        };
        let owner = self.owner.clone();
        let via = self.via.label().to_owned();
        let len = batch.len() as u64;
        let done = tokio::task::spawn_blocking(move || upload.finish(&batch, &owner, &via)).await;
        let record = match done {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, upload = %self.open.upload, "cannot complete the upload");
                return (StreamEnd::Io, None);
            }
            Err(e) => {
                tracing::error!(error = %e, "upload completion task failed");
                return (StreamEnd::Io, None);
            }
        };
        self.hub.metrics.stream_bytes.inc_by(len);
        self.hub.metrics.videos_stored.inc();
        self.report.stored += len;
        tracing::info!(
            subscription = record.subscription,
            upload = %record.upload,
            bytes = record.size,
            attempts = record.attempts,
            via = %record.via,
            "video stored"
        );
        // Stored either way; a device that missed this ack is answered Complete on its next try.
        let _ = acks.send(&complete_ack(&record, self.open.chunks())).await;
        (StreamEnd::Complete, None)
    }
}

fn spawn_commit(
    mut upload: PartialUpload,
    data: Vec<u8>,
    chunks: u32,
    growth: Option<OwnedSemaphorePermit>,
) -> tokio::task::JoinHandle<Flush> {
    tokio::task::spawn_blocking(move || {
        let result = upload.commit(&data, chunks);
        Flush {
            upload,
            data,
            result,
            _growth: growth,
        }
    })
}

/// Accepts direct-access device streams on the TCP stream port until `shutdown`.
pub(crate) async fn serve_direct(
    listener: TcpListener,
    hub: Arc<StreamHub>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    // The listener moves to the bulk lane's reactor, with every connection it accepts.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the stream listener cannot move to the bulk lane");
            return;
        }
    };
    let lane = hub.lane.clone();
    let accept = serve_direct_on_lane(listener, hub, shutdown, tasks.clone());
    let _ = tasks.spawn_on(accept, &lane).await;
}

async fn serve_direct_on_lane(
    listener: std::net::TcpListener,
    hub: Arc<StreamHub>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the stream listener cannot move to the bulk lane");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: give the others time to finish.
                tracing::warn!(error = %e, "stream accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (reader, writer) = socket.into_split();
        let span = tracing::debug_span!("stream", via = "direct", peer = %peer);
        tasks.spawn(
            hub.clone()
                .serve(reader, writer, StreamVia::Direct(peer))
                .instrument(span),
        );
    }
    tracing::debug!("stream listener stopped");
}

/// Serves one QUIC stream a gateway opened (on its bulk connection, or after its control stream
/// on the main one): a device stream, after its 2-byte header. `name` is the gateway's
/// certificate name.
pub(crate) async fn serve_gateway_stream(
    hub: Arc<StreamHub>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    name: Arc<str>,
) {
    let mut header = [0u8; 2];
    let read = tokio::time::timeout(hub.config.stall_timeout, recv.read_exact(&mut header)).await;
    if !matches!(read, Ok(Ok(_))) || header != UPLINK_STREAM_HEADER {
        tracing::debug!("gateway stream without a device stream header: refused");
        let _ = recv.stop(STREAM_REFUSED.into());
        let _ = send.reset(STREAM_REFUSED.into());
        hub.metrics.stream_end(StreamEnd::Malformed);
        return;
    }
    let end = hub
        .serve(&mut recv, &mut send, StreamVia::Gateway(name))
        .await;
    if end != StreamEnd::Complete {
        // Unread device bytes are not wanted any more.
        let _ = recv.stop(STREAM_REFUSED.into());
    }
}
