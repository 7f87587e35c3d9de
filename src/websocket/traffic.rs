//! When a WebSocket client's bytes last came in and went out. A client is idle from its last
//! byte, not its last whole message (one sent in slow fragments, a ping), and a reply it takes
//! steadily is sent however long it takes; one it takes nothing of for the idle timeout is cut.

use std::sync::{Mutex, MutexGuard};

use tokio::time::Instant;

use crate::web_server::Watcher;

/// The last traffic of one connection, by tokio's clock.
#[derive(Debug)]
pub(super) struct Traffic {
    last_read: Mutex<Instant>,
    last_written: Mutex<Instant>,
}

impl Traffic {
    /// Traffic as of now (the connection is new).
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Traffic { last_read: Mutex::new(now), last_written: Mutex::new(now) }
    }

    /// When bytes last came from the client.
    pub(super) fn last_read(&self) -> Instant {
        *lock(&self.last_read)
    }

    /// When bytes last went to the client.
    pub(super) fn last_written(&self) -> Instant {
        *lock(&self.last_written)
    }
}

impl Watcher for Traffic {
    fn bytes_read(&self) {
        *lock(&self.last_read) = Instant::now();
    }

    fn bytes_written(&self) {
        *lock(&self.last_written) = Instant::now();
    }
}

fn lock(instant: &Mutex<Instant>) -> MutexGuard<'_, Instant> {
    instant.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
