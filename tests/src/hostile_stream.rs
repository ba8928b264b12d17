//! A hostile man in the middle of the stream transport (`docs/protocol.md` §13.4): it sits between
//! a camera and the real gateway's stream port and, one TCP connection after another, does what a
//! compromised gateway could do to a video stream: cut it, reorder chunks, splice in a chunk from
//! another connection, or repeat one. It parses only the length prefixes; it has no keys.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use relay_protocol::stream::{check_length, LENGTH_PREFIX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the proxy does to one connection's device → core frames. Counts are of data frames (the
/// frames after the first, the StreamOpen), from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// Passes everything.
    Honest,
    /// Passes the open and `after` data frames, then closes both sides.
    Truncate {
        /// Data frames passed before the cut.
        after: usize,
    },
    /// Swaps data frames `at` and `at + 1`.
    Reorder {
        /// The first of the two.
        at: usize,
    },
    /// Replaces data frame `at` with a data frame recorded on an earlier connection (another
    /// salt: other keys). Needs an earlier connection that carried data frames.
    Splice {
        /// Which frame is replaced.
        at: usize,
    },
    /// Sends data frame `at` twice.
    Repeat {
        /// Which frame is repeated.
        at: usize,
    },
}

/// The proxy: connection `k` suffers `attacks[k]`; connections past the list are honest.
#[derive(Debug)]
pub struct StreamMitm {
    /// Where cameras connect.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// For each connection, in order: whether the `check` given to [`StreamMitm::start`] held
    /// when it was accepted.
    pub checks: Arc<Mutex<Vec<bool>>>,
    stop: CancellationToken,
}

impl Drop for StreamMitm {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Check = Arc<dyn Fn(usize) -> bool + Send + Sync>;

impl StreamMitm {
    /// Listens on a loopback port and relays to `upstream`. `check(k)` runs as connection `k` is
    /// accepted, before anything is relayed (a test checks there what the core has stored).
    pub async fn start(
        upstream: SocketAddr,
        attacks: Vec<Attack>,
        check: impl Fn(usize) -> bool + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let recorded: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let check: Check = Arc::new(check);
        {
            let (connections, checks, stop) = (connections.clone(), checks.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        () = stop.cancelled() => return,
                    };
                    let Ok((device, _)) = accepted else { continue };
                    let k = connections.fetch_add(1, Ordering::SeqCst);
                    let held = check(k);
                    if let Ok(mut c) = checks.lock() {
                        c.push(held);
                    }
                    let attack = attacks.get(k).copied().unwrap_or(Attack::Honest);
                    let recorded = recorded.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = relay(device, upstream, attack, recorded) => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
            });
        }
        Ok(Self {
            addr,
            connections,
            checks,
            stop,
        })
    }
}

/// One whole frame, length prefix included; `None` at a clean end of stream.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; LENGTH_PREFIX];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = check_length(u32::from_be_bytes(len)).context("length prefix")?;
    let mut frame = vec![0u8; LENGTH_PREFIX + n];
    frame[..LENGTH_PREFIX].copy_from_slice(&len);
    r.read_exact(&mut frame[LENGTH_PREFIX..]).await?;
    Ok(Some(frame))
}

async fn relay(
    device: TcpStream,
    upstream: SocketAddr,
    attack: Attack,
    recorded: Arc<Mutex<Vec<Vec<u8>>>>,
) -> Result<()> {
    let core = TcpStream::connect(upstream).await?;
    device.set_nodelay(true)?;
    core.set_nodelay(true)?;
    let (mut dev_r, mut dev_w) = device.into_split();
    let (mut core_r, mut core_w) = core.into_split();
    // The core's answers pass untouched.
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut core_r, &mut dev_w).await;
        let _ = dev_w.shutdown().await;
    });
    let mut data = 0usize;
    let mut held: Option<Vec<u8>> = None;
    let mut first = true;
    while let Some(frame) = read_frame(&mut dev_r).await? {
        if first {
            first = false;
            core_w.write_all(&frame).await?;
            continue;
        }
        let index = data;
        data += 1;
        if let Ok(mut r) = recorded.lock() {
            if r.len() < 64 {
                r.push(frame.clone());
            }
        }
        match attack {
            Attack::Truncate { after } if index >= after => {
                // Cut: both ways, at once.
                let _ = core_w.shutdown().await;
                down.abort();
                return Ok(());
            }
            Attack::Reorder { at } if index == at => {
                held = Some(frame);
                continue;
            }
            Attack::Splice { at } if index == at => {
                // A chunk of an earlier connection: a different salt, so different keys.
                let other = recorded.lock().ok().and_then(|r| r.first().cloned());
                core_w.write_all(other.as_deref().unwrap_or(&frame)).await?;
                continue;
            }
            Attack::Repeat { at } if index == at => {
                core_w.write_all(&frame).await?;
            }
            _ => {}
        }
        core_w.write_all(&frame).await?;
        if let Some(h) = held.take() {
            core_w.write_all(&h).await?;
        }
    }
    let _ = core_w.shutdown().await;
    let _ = down.await;
    Ok(())
}
