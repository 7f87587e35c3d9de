//! Where calls run: the worker pool of a runner context.
//!
//! A pool admits at most `MAX_WORKERS` calls at once. Sync targets run on OS threads
//! (tokio's blocking pool, or the calling thread when their call is the pool's only one),
//! async targets on the runtime; the pool's permits bound both.

#[cfg(feature = "process")]
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerMode;

/// A slot in the pool, held while a call runs.
#[derive(Debug)]
pub struct WorkerPermit {
    _permit: OwnedSemaphorePermit,
}

/// The worker pool shared by the routes of one runner context.
#[derive(Clone, Debug)]
pub(crate) struct WorkerPool {
    slots: Arc<Semaphore>,
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

    /// The hard time limit of a call, if any (only process pools enforce it).
    #[cfg_attr(not(feature = "process"), allow(dead_code))]
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
        permit.map(|permit| WorkerPermit { _permit: permit })
    }

    /// A free slot now, or `None` when every slot is busy or the service is stopping and
    /// the pool is not greedy. For entrypoints that refuse work rather than queue it
    /// (HTTP, WebSocket).
    pub fn try_acquire(&self, stopping: &CancellationToken) -> Option<WorkerPermit> {
        if stopping.is_cancelled() && !self.mode.is_greedy() {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(WorkerPermit { _permit: permit })
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
