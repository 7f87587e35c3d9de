//! What one connection is doing (reading a request head, handling requests, idle between
//! them) and the deadline that this allows it; see the [parent module](super) for the rules.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Timeouts;
use crate::clock::deadline_after;
use crate::web_server::Watcher;

/// What a connection is waiting for, and until when.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request head, which must be complete by the deadline.
    Head(Instant),
    /// This many requests being handled: no deadline.
    Busy(usize),
    /// The first byte of the next request, which must come by the deadline.
    Idle(Instant),
}

/// Once the service stops, how long a connection may take no byte of its last response before
/// it is dropped (else `HTTP_KEEP_ALIVE_TIMEOUT`): a client that stopped reading a long
/// response would hold the stop until then, or until `SHUTDOWN_TIMEOUT`, while one that
/// reads it, however slowly, renews the wait with each byte.
const STOPPING_SEND_WAIT: Duration = Duration::from_secs(5);

/// The phase of one connection, updated by its socket and its requests.
#[derive(Debug)]
pub(super) struct Activity {
    timeouts: Timeouts,
    /// The service is stopping: the wait after a response is [`STOPPING_SEND_WAIT`].
    stopping: AtomicBool,
    /// The last request's body was dropped before its end: its client may still be sending
    /// it, so the connection lingers when it closes (see [`mod@super::linger`]).
    body_left_unread: AtomicBool,
    phase: Mutex<Phase>,
    /// Wakes [`Activity::expired`] when the deadline changes.
    changed: Notify,
}

impl Activity {
    pub(super) fn new(timeouts: Timeouts) -> Self {
        let phase = Phase::Head(deadline_after(timeouts.header_read));
        Activity {
            timeouts,
            stopping: AtomicBool::new(false),
            body_left_unread: AtomicBool::new(false),
            phase: Mutex::new(phase),
            changed: Notify::new(),
        }
    }

    /// The wait for the next request after the last byte of a response.
    fn keep_alive(&self) -> Duration {
        match self.stopping.load(Ordering::Relaxed) {
            true => self.timeouts.keep_alive.min(STOPPING_SEND_WAIT),
            false => self.timeouts.keep_alive,
        }
    }

    /// The service is stopping: from now on a connection whose last response waits for its
    /// client to read it is dropped [`STOPPING_SEND_WAIT`] after the last byte it took.
    pub(super) fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut phase = self.phase();
        if let Phase::Idle(until) = *phase {
            self.set(&mut phase, Phase::Idle(until.min(deadline_after(self.keep_alive()))));
        }
    }

    /// A request body was dropped before its end (answered without it, or with part of it).
    pub(super) fn body_left_unread(&self) {
        self.body_left_unread.store(true, Ordering::Relaxed);
    }

    /// Whether the last request's body was left unread: its client may still be sending it.
    pub(super) fn left_a_body_unread(&self) -> bool {
        self.body_left_unread.load(Ordering::Relaxed)
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, phase: &mut Phase, next: Phase) {
        *phase = next;
        self.changed.notify_one();
    }

    /// Whether the connection is waiting for a request head that hyper has not handed over
    /// yet: from the accept, or from the first byte of its next request (not while a request
    /// is handled, nor idle between requests). A stopping server closes such a connection at
    /// once: it has no request to finish.
    pub(super) fn awaits_head(&self) -> bool {
        matches!(*self.phase(), Phase::Head(_))
    }

    /// Resolves when the current deadline has passed, with what the client failed to do.
    pub(super) async fn expired(&self) -> &'static str {
        loop {
            let changed = self.changed.notified();
            let phase = *self.phase();
            let (until, why) = match phase {
                Phase::Busy(_) => {
                    changed.await;
                    continue;
                }
                Phase::Head(until) => {
                    (until, "no complete request head in HTTP_HEADER_READ_TIMEOUT")
                }
                Phase::Idle(until) => (until, "no new request in HTTP_KEEP_ALIVE_TIMEOUT"),
            };
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(until) => {
                    // a byte may have come in meanwhile and set a later deadline
                    if self.deadline_passed() {
                        return why;
                    }
                }
            }
        }
    }

    fn deadline_passed(&self) -> bool {
        match *self.phase() {
            Phase::Busy(_) => false,
            Phase::Head(until) | Phase::Idle(until) => until <= Instant::now(),
        }
    }
}

impl Watcher for Activity {
    /// Bytes came from the client: an idle connection is now reading a request head.
    fn bytes_read(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            self.set(&mut phase, Phase::Head(deadline_after(self.timeouts.header_read)));
        }
    }

    /// Bytes went to the client: the keep-alive wait counts from the last of a response.
    fn bytes_written(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            self.set(&mut phase, Phase::Idle(deadline_after(self.keep_alive())));
        }
    }
}

/// A request being handled on a connection; dropped once its response is handed to hyper
/// (or the request is dropped), which starts the keep-alive wait when it was the last.
pub(super) struct Request(Arc<Activity>);

impl Request {
    pub(super) fn begin(activity: Arc<Activity>) -> Self {
        // hyper reads a request only once the last one's body is read or dropped
        activity.body_left_unread.store(false, Ordering::Relaxed);
        {
            let mut phase = activity.phase();
            let open = match *phase {
                Phase::Busy(open) => open + 1,
                Phase::Head(_) | Phase::Idle(_) => 1,
            };
            activity.set(&mut phase, Phase::Busy(open));
        }
        Request(activity)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let activity = &self.0;
        let mut phase = activity.phase();
        let next = match *phase {
            Phase::Busy(open) if open > 1 => Phase::Busy(open - 1),
            _ => Phase::Idle(deadline_after(activity.keep_alive())),
        };
        activity.set(&mut phase, next);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn activity() -> Arc<Activity> {
        let timeouts =
            Timeouts { header_read: Duration::from_secs(60), keep_alive: Duration::from_secs(75) };
        Arc::new(Activity::new(timeouts))
    }

    #[test]
    fn a_connection_awaits_a_head_until_its_request_is_handled_and_from_the_next_byte_on() {
        let activity = activity();
        assert!(activity.awaits_head(), "from the accept, no byte yet");
        activity.bytes_read();
        assert!(activity.awaits_head(), "part of a head");
        let request = Request::begin(activity.clone());
        assert!(!activity.awaits_head(), "a request being handled");
        activity.bytes_read();
        assert!(!activity.awaits_head(), "a request whose body is arriving");
        drop(request);
        activity.bytes_written();
        assert!(!activity.awaits_head(), "idle between requests");
        activity.bytes_read();
        assert!(activity.awaits_head(), "the first byte of the next request");
    }

    #[test]
    fn a_body_left_unread_is_the_last_requests_only() {
        let activity = activity();
        assert!(!activity.left_a_body_unread());
        let request = Request::begin(activity.clone());
        activity.body_left_unread();
        drop(request);
        assert!(activity.left_a_body_unread(), "after its answer");
        let _next = Request::begin(activity.clone());
        assert!(!activity.left_a_body_unread(), "hyper drained it before it read the next");
    }
}
