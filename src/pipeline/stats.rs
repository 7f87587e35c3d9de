//! [`RouteStats`]: counters of a route, and waiting on them.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::data::Handled;

/// Counters of one route.
#[derive(Debug)]
pub struct RouteStats {
    received: AtomicU64,
    succeeded: AtomicU64,
    called_back: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    retried: AtomicU64,
    settled: watch::Sender<u64>,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            received: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            called_back: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            settled: watch::Sender::new(0),
        }
    }
}

impl RouteStats {
    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn settled(&self, handled: &Handled) {
        let counter = match handled {
            Handled::Succeeded(_) => &self.succeeded,
            Handled::CalledBack(_) => &self.called_back,
            Handled::Failed(_) => &self.failed,
            Handled::Retry { .. } => &self.retried,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.settled.send_modify(|count| *count += 1);
    }

    /// Messages whose handling started.
    pub fn received_count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub(crate) fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        self.settled.send_modify(|count| *count += 1);
    }

    /// Messages acknowledged without a call because the entrypoint's filter skipped them.
    pub fn skipped_count(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Failed attempts scheduled again on the broker.
    pub fn retried_count(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Messages handled successfully.
    pub fn succeeded_count(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Failures handled by the callback.
    pub fn called_back_count(&self) -> u64 {
        self.called_back.load(Ordering::Relaxed)
    }

    /// Messages that failed for good (dead-lettered).
    pub fn failed_count(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Messages settled, whatever the outcome (skipped ones included).
    pub fn settled_count(&self) -> u64 {
        *self.settled.borrow()
    }

    /// Wait until at least `count` messages are settled.
    pub async fn wait_settled(&self, count: u64) {
        let mut receiver = self.settled.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow it.
        let _ = receiver.wait_for(|settled| *settled >= count).await;
    }
}
