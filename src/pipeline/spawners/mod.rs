//! Where calls run: the worker pool of a runner context.
//!
//! A pool admits at most `MAX_WORKERS` calls at once. Sync targets run on OS threads
//! (tokio's blocking pool, or the calling thread for a lone call: `WorkerPool::lone_call`),
//! async targets on the runtime; the pool's permits bound both.

#[cfg(feature = "process")]
pub mod process;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerMode;

/// How long a pool must have had no call end for a new call to find it quiet. Longer than
/// the pauses between the calls of a busy service: a drained queue's come microseconds
/// apart, and with 50 µs, 16 HTTP clients on loopback (16,000 requests/s) lost a fifth of
/// their rate to calls run in place. Shorter than the pause between the sequential calls
/// of an RPC caller, a round trip through the broker (0.3 ms and more).
const QUIET_AFTER: Duration = Duration::from_micros(200);

/// A slot in the pool, held while a call runs.
#[derive(Debug)]
pub struct WorkerPermit {
    _permit: OwnedSemaphorePermit,
    last_end: Arc<LastEnd>,
}

impl Drop for WorkerPermit {
    fn drop(&mut self) {
        self.last_end.now();
    }
}

/// When a call of the pool last ended.
#[derive(Debug)]
struct LastEnd {
    epoch: Instant,
    /// Nanoseconds from `epoch`; 0 until a call ends.
    at: AtomicU64,
}

impl LastEnd {
    fn new() -> Self {
        LastEnd { epoch: Instant::now(), at: AtomicU64::new(0) }
    }

    fn now(&self) {
        let at = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.at.store(at.max(1), Ordering::Relaxed);
    }

    /// How long ago a call ended; `Duration::MAX` if none has.
    fn ago(&self) -> Duration {
        match self.at.load(Ordering::Relaxed) {
            0 => Duration::MAX,
            at => self.epoch.elapsed().saturating_sub(Duration::from_nanos(at)),
        }
    }
}

/// The worker pool shared by the routes of one runner context.
#[derive(Clone, Debug)]
pub(crate) struct WorkerPool {
    slots: Arc<Semaphore>,
    last_end: Arc<LastEnd>,
    quiet_after: Duration,
    size: usize,
    mode: WorkerMode,
    context: Arc<str>,
    time_limit: Option<Duration>,
    #[cfg(feature = "process")]
    processes: Arc<std::sync::OnceLock<Arc<process::ProcessPool>>>,
}

impl WorkerPool {
    /// A pool of `size` workers in `mode`, named `context` in metrics.
    pub fn new(size: usize, mode: WorkerMode, context: &str) -> Self {
        WorkerPool {
            slots: Arc::new(Semaphore::new(size)),
            last_end: Arc::new(LastEnd::new()),
            quiet_after: QUIET_AFTER,
            size,
            mode,
            context: context.into(),
            time_limit: None,
            #[cfg(feature = "process")]
            processes: Arc::default(),
        }
    }

    /// Limit each call to `limit` (process modes kill the worker that overruns it).
    pub fn with_time_limit(mut self, limit: Option<Duration>) -> Self {
        self.time_limit = limit;
        self
    }

    /// The time limit of a call, if any: a process pool kills the worker that overruns it; in
    /// a thread mode an async call is cancelled.
    pub fn time_limit(&self) -> Option<Duration> {
        self.time_limit
    }

    /// The worker processes, in process modes once started.
    #[cfg(feature = "process")]
    pub fn processes(&self) -> Option<&Arc<process::ProcessPool>> {
        self.processes.get()
    }

    #[cfg(feature = "process")]
    pub(crate) fn set_processes(&self, processes: Arc<process::ProcessPool>) {
        let _ = self.processes.set(processes);
    }

    /// The context's metric label.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// How many calls may run at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The worker mode.
    pub fn mode(&self) -> WorkerMode {
        self.mode
    }

    /// Free slots now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }

    /// Whether a call holding one of the pool's slots is its only one, after a quiet spell
    /// (no call ended for [`QUIET_AFTER`]): a lone call, not one of a stream that happens to
    /// be alone for a moment, while the next ones are on their way.
    pub fn lone_call(&self) -> bool {
        self.available() + 1 >= self.size && self.last_end.ago() >= self.quiet_after
    }

    /// Wait for a free slot. Once `stopping` fires, a non-greedy pool admits nothing more
    /// (`None`: hand the message back); a greedy pool still admits what was received.
    pub async fn acquire(&self, stopping: &CancellationToken) -> Option<WorkerPermit> {
        let slots = self.slots.clone();
        let permit = if self.mode.is_greedy() {
            slots.acquire_owned().await.ok()
        } else {
            tokio::select! {
                biased;
                _ = stopping.cancelled() => None,
                permit = slots.acquire_owned() => permit.ok(),
            }
        };
        permit.map(|permit| self.permit(permit))
    }

    /// A free slot now, or `None` when every slot is busy or the service is stopping and
    /// the pool is not greedy. For entrypoints that refuse work rather than queue it
    /// (HTTP, WebSocket).
    pub fn try_acquire(&self, stopping: &CancellationToken) -> Option<WorkerPermit> {
        if stopping.is_cancelled() && !self.mode.is_greedy() {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.permit(permit))
    }

    fn permit(&self, permit: OwnedSemaphorePermit) -> WorkerPermit {
        WorkerPermit { _permit: permit, last_end: self.last_end.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn thread_mode_admits_nothing_after_stop_but_greedy_does() {
        let stopping = CancellationToken::new();
        stopping.cancel();
        let thread = WorkerPool::new(2, WorkerMode::Thread, "test");
        assert!(thread.acquire(&stopping).await.is_none());
        let greedy = WorkerPool::new(2, WorkerMode::GreedyThread, "test");
        let permit = greedy.acquire(&stopping).await;
        assert!(permit.is_some());
        assert_eq!(greedy.available(), 1);
    }

    #[test]
    fn a_call_is_lone_when_alone_after_a_quiet_spell() {
        let stopping = CancellationToken::new();
        let mut pool = WorkerPool::new(2, WorkerMode::Thread, "test");
        pool.quiet_after = Duration::from_secs(3600);
        let first = pool.try_acquire(&stopping).unwrap();
        assert!(pool.lone_call(), "no call ran before");
        let second = pool.try_acquire(&stopping).unwrap();
        assert!(!pool.lone_call(), "another call runs");
        drop(first);
        assert!(!pool.lone_call(), "a call just ended: the next ones may be on their way");
        pool.quiet_after = Duration::ZERO;
        assert!(pool.lone_call(), "quiet long enough");
        drop(second);
    }

    #[test]
    fn try_acquire_refuses_when_full_or_stopping() {
        let stopping = CancellationToken::new();
        let pool = WorkerPool::new(1, WorkerMode::Thread, "test");
        let held = pool.try_acquire(&stopping);
        assert!(held.is_some());
        assert!(pool.try_acquire(&stopping).is_none());
        drop(held);
        stopping.cancel();
        assert!(pool.try_acquire(&stopping).is_none());
    }
}
