//! When a WebSocket client's bytes last came in and went out. A client is idle from its last
//! byte, not its last whole message (one sent in slow fragments, a ping), and a reply it takes
//! steadily is sent however long it takes; one it takes nothing of for the idle timeout is cut.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::web_server::Watcher;

/// The last traffic of one connection, by tokio's clock: as times since the connection
/// began, so that each read and write stores a number rather than takes a lock.
#[derive(Debug)]
pub(super) struct Traffic {
    began: Instant,
    /// Nanoseconds from `began` to the last read.
    last_read: AtomicU64,
    /// Nanoseconds from `began` to the last write.
    last_written: AtomicU64,
}

impl Traffic {
    /// Traffic as of now (the connection is new).
    pub(super) fn new() -> Self {
        Traffic {
            began: Instant::now(),
            last_read: AtomicU64::new(0),
            last_written: AtomicU64::new(0),
        }
    }

    /// When bytes last came from the client.
    pub(super) fn last_read(&self) -> Instant {
        self.at(&self.last_read)
    }

    /// When bytes last went to the client.
    pub(super) fn last_written(&self) -> Instant {
        self.at(&self.last_written)
    }

    fn at(&self, since_began: &AtomicU64) -> Instant {
        self.began + Duration::from_nanos(since_began.load(Ordering::Relaxed))
    }

    fn record(&self, since_began: &AtomicU64) {
        // 2^64 ns is 584 years: a connection's age fits
        let age = u64::try_from(self.began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // the reader and the writer record at once: of two racing records, the later stays
        since_began.fetch_max(age, Ordering::Relaxed);
    }
}

impl Watcher for Traffic {
    fn bytes_read(&self) {
        self.record(&self.last_read);
    }

    fn bytes_written(&self) {
        self.record(&self.last_written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_read_and_write_moves_its_own_time_on() {
        let traffic = Traffic::new();
        let began = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        traffic.bytes_read();
        assert_eq!(traffic.last_read(), began + Duration::from_secs(3));
        assert_eq!(traffic.last_written(), began, "a read is no write");
        tokio::time::advance(Duration::from_millis(1500)).await;
        traffic.bytes_written();
        assert_eq!(traffic.last_written(), began + Duration::from_millis(4500));
        assert_eq!(traffic.last_read(), began + Duration::from_secs(3), "a write is no read");
    }
}
