//! The bulk lane: a runtime of its own, at a lower CPU priority, for work that moves a lot of bytes
//! (device streams: a camera's video) beside work that must stay quick (the meters' readings).
//!
//! Tokio has no task priorities: one runtime shares its workers among all its tasks in turn, so a
//! video that keeps every core busy makes each reading wait in the same run queues, at every hop
//! of its way. Work placed on a [`BulkLane`] runs on threads of its own, which are given a lower
//! CPU priority ([`LanePriority`]). With [`LanePriority::Idle`] (Linux `SCHED_IDLE`) the kernel
//! runs a lane thread only while no ordinary thread wants the CPU, and takes the CPU back the
//! moment one wakes up: a video still runs at full speed on an otherwise idle machine, and yields
//! at once to a reading. (A nice value alone does not do this: it changes the share of CPU time,
//! but a waking thread may still wait for a busy lane thread's time slice, measured at three times
//! the idle p99 of 200 meters with two nice-10 busy loops beside them; under `SCHED_IDLE` busy
//! loops the p99 did not move.)

use std::io;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::runtime::{Builder, Handle, Runtime};

/// The CPU priority of a lane's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LanePriority {
    /// Only what ordinary threads leave (`SCHED_IDLE`): the default. Under a load that keeps
    /// every core busy with ordinary work, the lane waits.
    #[default]
    Idle,
    /// Nice 10: a smaller share of the CPU under contention, never starved.
    Low,
    /// As every other thread: no priority for the quick work.
    Normal,
}

impl LanePriority {
    /// The configuration spelling.
    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Low => "low",
            Self::Normal => "normal",
        }
    }
}

impl std::str::FromStr for LanePriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "idle" => Ok(Self::Idle),
            "low" => Ok(Self::Low),
            "normal" => Ok(Self::Normal),
            other => Err(format!(
                "unknown CPU priority {other:?}: idle, low or normal"
            )),
        }
    }
}

/// A runtime for bulk work whose threads run at a lower CPU priority. Dropping it stops its
/// threads without waiting (it may be dropped inside another runtime).
#[derive(Debug)]
pub struct BulkLane {
    runtime: Option<Runtime>,
    handle: Handle,
    /// The first error the kernel gave when a thread was lowered.
    refused: Arc<Mutex<Option<String>>>,
}

impl BulkLane {
    /// A lane of `threads` worker threads named `name`, each lowered to `priority`. Blocking work
    /// spawned from its tasks runs on its own pool, lowered too. A thread the kernel will not
    /// lower runs as it is (see [`BulkLane::refused`]).
    pub fn new(name: &str, threads: usize, priority: LanePriority) -> io::Result<Self> {
        let refused = Arc::new(Mutex::new(None));
        let on_start = refused.clone();
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = lower_current_thread(priority) {
                    on_start
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(e.to_string());
                }
            })
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            refused,
        })
    }

    /// Where to spawn bulk tasks.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Why the kernel refused to lower one of the threads started so far, if it did.
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for BulkLane {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Lowers the calling thread (this thread only) to `priority`.
pub fn lower_current_thread(priority: LanePriority) -> io::Result<()> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
    };
    let (priority, policy) = match priority {
        LanePriority::Normal => return Ok(()),
        #[cfg(target_os = "linux")]
        LanePriority::Idle => (ThreadPriority::Min, NormalThreadSchedulePolicy::Idle),
        #[cfg(not(target_os = "linux"))]
        LanePriority::Idle => (ThreadPriority::Min, NormalThreadSchedulePolicy::Other),
        LanePriority::Low => (
            // Crossplatform 0..=99 maps onto nice 19..=-20; 25 is nice 10.
            ThreadPriority::Crossplatform(
                ThreadPriorityValue::try_from(25u8).map_err(io::Error::other)?,
            ),
            NormalThreadSchedulePolicy::Other,
        ),
    };
    thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        priority,
        ThreadSchedulePolicy::Normal(policy),
    )
    .map_err(|e| io::Error::other(format!("{e:?}")))
}

/// The calling thread's scheduling policy as Linux reports it (`/proc/thread-self/sched`):
/// 0 ordinary, 5 idle; `None` where it cannot be read.
pub fn current_thread_policy() -> Option<u32> {
    let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    sched
        .lines()
        .find(|l| l.starts_with("policy"))?
        .rsplit(':')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn idle_lane_threads_run_under_sched_idle_and_others_do_not() {
        let lane = BulkLane::new("test-lane", 1, LanePriority::Idle).expect("lane");
        let (tx, rx) = std::sync::mpsc::channel();
        lane.handle().spawn(async move {
            let _ = tx.send((
                current_thread_policy(),
                tokio::task::spawn_blocking(current_thread_policy)
                    .await
                    .ok()
                    .flatten(),
            ));
        });
        let (worker, blocking) = rx.recv().expect("lane task ran");
        assert_eq!(lane.refused(), None);
        assert_eq!(worker, Some(5), "SCHED_IDLE on the lane's worker");
        assert_eq!(blocking, Some(5), "SCHED_IDLE on the lane's blocking pool");
        assert_eq!(
            current_thread_policy(),
            Some(0),
            "the caller's thread is left alone"
        );
    }

    #[test]
    fn priorities_parse_and_refuse_others() {
        assert_eq!("idle".parse(), Ok(LanePriority::Idle));
        assert_eq!("low".parse(), Ok(LanePriority::Low));
        assert_eq!("normal".parse(), Ok(LanePriority::Normal));
        assert!("high".parse::<LanePriority>().is_err());
        assert_eq!(LanePriority::default(), LanePriority::Idle);
    }
}
