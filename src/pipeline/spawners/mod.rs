//! Where calls run: the worker pool of a runner context.
//!
//! A pool admits at most `MAX_WORKERS` calls at once. Sync targets run on OS threads
//! (tokio's blocking pool, or the calling thread for a lone call: `WorkerPool::lone_call`),
//! async targets on the runtime; the pool's permits bound both.

#[cfg(feature = "process")]
pub mod process;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
    /// Held while the free slots are read and reported (see [`WorkerPool::report_available`]).
    reporting: Arc<Mutex<()>>,
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
            reporting: Arc::default(),
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

    /// Whether `other` is this pool (a clone of it), not another of the same size.
    pub fn is(&self, other: &WorkerPool) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
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

    /// Hand the free slots now to `report` (a gauge's `set`), one report at a time. Calls
    /// that start or end together each read the count and report it; unserialized, the one
    /// that read first could report last, and a gauge would show a slot busy while all are
    /// free, until the next call.
    pub fn report_available(&self, report: impl FnOnce(usize)) {
        let _one_at_a_time = self.reporting.lock().unwrap_or_else(PoisonError::into_inner);
        report(self.available());
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
                () = self.closed_to_new_calls(stopping) => None,
                permit = slots.acquire_owned() => permit.ok(),
            }
        };
        permit.map(|permit| self.permit(permit))
    }

    /// Resolves once the pool admits no new call: when `stopping` fires, for a pool that is
    /// not greedy; never for a greedy one, which runs what was received.
    pub async fn closed_to_new_calls(&self, stopping: &CancellationToken) {
        if self.mode.is_greedy() {
            std::future::pending::<()>().await;
        }
        stopping.cancelled().await;
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
    fn the_free_slots_reported_last_are_the_free_slots_now() {
        use std::sync::mpsc::channel;
        let (pool, stopping) =
            (WorkerPool::new(2, WorkerMode::Thread, "test"), CancellationToken::new());
        let held = pool.try_acquire(&stopping);
        let reported = AtomicU64::new(u64::MAX);
        let (read, was_read) = channel();
        let (reported_after, was_reported_after) = channel();
        std::thread::scope(|threads| {
            // a call's report reads 1 free slot, then stalls before setting the gauge ...
            let (pool, reported) = (&pool, &reported);
            threads.spawn(move || {
                pool.report_available(|free| {
                    read.send(()).unwrap();
                    let _ = was_reported_after.recv_timeout(Duration::from_millis(300));
                    reported.store(free as u64, Ordering::SeqCst);
                })
            });
            // ... while another call ends and reports 2: it must not be overwritten by the 1
            was_read.recv().unwrap();
            drop(held);
            pool.report_available(|free| reported.store(free as u64, Ordering::SeqCst));
            let _ = reported_after.send(()); // the stalled report may have given up waiting
        });
        assert_eq!(reported.load(Ordering::SeqCst), 2, "both slots are free");
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
