//! A call cut short by the service's stop while it waited between in-worker retries
//! (`BackOff`), or before it started: [`Ended`] says whether a call ended so, and [`Interrupted`] what its entrypoint
//! needs to give the message back (a queued message, an RPC request) or to fail it (a timer's
//! run, an HTTP or WebSocket call, which have nothing to give back).

use crate::data::{BackOffData, Failure, FailureKind, Handled};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Why an interrupted call was not retried, as its failure's last cause says.
const NOT_RETRIED: &str = "not retried: the service is stopping";

/// A delivery that waited for a worker slot and got none (the service stops): to be handed
/// back unstarted; the stop's give-up waits for it while this lives.
#[derive(Debug)]
pub(crate) struct Unstarted {
    _hand_back: TaskTrackerToken,
}

impl Unstarted {
    /// An unstarted delivery holding `hand_back`, a token of the stop's give-up.
    pub(crate) fn new(hand_back: TaskTrackerToken) -> Self {
        Unstarted { _hand_back: hand_back }
    }
}

/// How a call in a worker slot ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Handled, after this many retries (those its headers counted, and those made in the
    /// worker).
    Handled(Handled, u32),
    /// Cut short between in-worker retries by the service's stop: nothing settled it.
    Interrupted(Interrupted),
    /// Never started: in a process mode, the stop gave up while the call waited for a worker
    /// process (one being replaced). Its message is to be handed back unstarted.
    Unstarted(Unstarted),
}

impl Ended {
    /// How the call ended for an entrypoint that cannot give its message back: an
    /// interrupted call failed.
    pub(crate) fn or_failed(self) -> Handled {
        match self {
            Ended::Handled(handled, _) => handled,
            Ended::Interrupted(interrupted) => interrupted.failed(),
            Ended::Unstarted(_) => Handled::Failed(Failure::new(
                FailureKind::Crashed,
                "the service stopped before a worker process took the call: past \
                 SHUTDOWN_TIMEOUT no call starts",
            )),
        }
    }
}

/// A call whose attempt failed and whose next attempt, in the worker, the stop cut short.
#[derive(Debug)]
pub(crate) struct Interrupted {
    /// The failure of the last attempt.
    failure: Failure,
    /// The retry state of the attempt that did not run: its message's copy carries it, so
    /// that the instance handling it next goes on counting.
    next: BackOffData,
}

impl Interrupted {
    /// The call whose attempt at `retry` failed with `failure`, interrupted now.
    pub(crate) fn new(failure: Failure, retry: &BackOffData) -> Self {
        let next = retry.next(failure.full_message(), crate::clock::wall_now());
        Interrupted { failure, next }
    }

    /// The retry state of the attempt that did not run, which its message's copy carries.
    pub(crate) fn next(&self) -> &BackOffData {
        &self.next
    }

    /// The call as failed, with its last failure and why it was not retried.
    pub(crate) fn failed(&self) -> Handled {
        let mut failure = self.failure.clone();
        failure.retryable = false;
        failure.causes.push(NOT_RETRIED.to_owned());
        Handled::Failed(failure)
    }
}
