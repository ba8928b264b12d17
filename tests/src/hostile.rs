//! A hostile relay on the device link: it sits between the devices and the real gateway and does
//! what a compromised gateway could do to device frames in both directions: drop, flip bits,
//! replay old frames and reorder. It cannot do more than that (it has no keys), which is the point.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// What the relay does to each frame, as probabilities in 0..=1.
#[derive(Clone, Copy, Debug)]
pub struct Mischief {
    /// Frames silently dropped.
    pub drop: f64,
    /// Frames sent with one bit flipped.
    pub flip: f64,
    /// Frames followed by a replay of an older frame of the same flow.
    pub replay: f64,
    /// Frames held back and sent after the next one.
    pub reorder: f64,
}

impl Mischief {
    /// 20% dropped, 10% flipped, 10% replayed, 10% reordered.
    pub fn hostile() -> Self {
        Self {
            drop: 0.20,
            flip: 0.10,
            replay: 0.10,
            reorder: 0.10,
        }
    }
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct MischiefCounts {
    /// Frames passed through (in either direction), before mischief.
    pub frames: AtomicU64,
    /// Dropped.
    pub dropped: AtomicU64,
    /// Sent with a bit flipped.
    pub flipped: AtomicU64,
    /// Old frames sent again.
    pub replayed: AtomicU64,
    /// Frames delivered out of order.
    pub reordered: AtomicU64,
}

struct Flow {
    upstream: Arc<UdpSocket>,
    state: Arc<Mutex<Direction>>,
}

#[derive(Default)]
struct Direction {
    history: Vec<Vec<u8>>,
    held: Option<Vec<u8>>,
}

/// Starts the relay: devices send to the returned address; it forwards to `target`.
pub async fn start(
    target: SocketAddr,
    mischief: Mischief,
    seed: u64,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, Arc<MischiefCounts>)> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    let counts = Arc::new(MischiefCounts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, device) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = front.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = flows.entry(device) {
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if up.connect(target).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                let back_state = Arc::new(Mutex::new(Direction::default()));
                // Downlink: gateway -> device, with the same mischief.
                let (up2, front2, c2, st2, stop2) = (
                    up.clone(),
                    front.clone(),
                    c.clone(),
                    back_state,
                    shutdown.clone(),
                );
                let mut rng2 = StdRng::seed_from_u64(rng.gen());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    loop {
                        let n = tokio::select! {
                            () = stop2.cancelled() => return,
                            r = up2.recv(&mut buf) => match r { Ok(n) => n, Err(_) => continue },
                        };
                        let out = meddle(&buf[..n], mischief, &mut rng2, &st2, &c2).await;
                        for f in out {
                            let _ = front2.send_to(&f, device).await;
                        }
                    }
                });
                slot.insert(Flow {
                    upstream: up,
                    state: Arc::new(Mutex::new(Direction::default())),
                });
            }
            let Some(flow) = flows.get(&device) else {
                continue;
            };
            let out = meddle(&buf[..n], mischief, &mut rng, &flow.state, &c).await;
            for f in out {
                let _ = flow.upstream.send(&f).await;
            }
        }
    });
    Ok((addr, counts))
}

/// Decides what to send for one incoming frame.
async fn meddle(
    frame: &[u8],
    m: Mischief,
    rng: &mut StdRng,
    state: &Mutex<Direction>,
    counts: &MischiefCounts,
) -> Vec<Vec<u8>> {
    counts.frames.fetch_add(1, Ordering::Relaxed);
    let mut st = state.lock().await;
    st.history.push(frame.to_vec());
    if st.history.len() > 32 {
        st.history.remove(0);
    }
    let mut out = Vec::new();
    if rng.gen_bool(m.drop) {
        counts.dropped.fetch_add(1, Ordering::Relaxed);
    } else {
        let mut f = frame.to_vec();
        if rng.gen_bool(m.flip) && !f.is_empty() {
            let bit = rng.gen_range(0..f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            counts.flipped.fetch_add(1, Ordering::Relaxed);
        }
        if rng.gen_bool(m.reorder) && st.held.is_none() {
            st.held = Some(f);
            counts.reordered.fetch_add(1, Ordering::Relaxed);
        } else {
            out.push(f);
            if let Some(h) = st.held.take() {
                out.push(h);
            }
        }
    }
    if rng.gen_bool(m.replay) {
        let i = rng.gen_range(0..st.history.len());
        out.push(st.history[i].clone());
        counts.replayed.fetch_add(1, Ordering::Relaxed);
    }
    out
}
