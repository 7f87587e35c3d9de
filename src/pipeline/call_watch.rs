//! [`CallWatch`]: the calls of a route as they finish, for whoever watches (test waiters).

use std::any::type_name;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::data::{Failure, FailureKind, Handled, Message};

/// How many finished calls a slow watcher may fall behind before it misses some.
const CAPACITY: usize = 1024;

/// A call of a route, finished: the message its entrypoint handed over and how it ended.
#[derive(Clone, Debug)]
pub struct FinishedCall {
    /// The message the route handled.
    pub message: Message,
    /// How it ended.
    pub handled: Handled,
}

impl FinishedCall {
    /// The target's result as a `T`, or why there is none: the call's failure, or a result
    /// that does not fit `T`.
    pub fn result<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        match &self.handled {
            Handled::Succeeded(value) => T::deserialize(value).map_err(|error| {
                Failure::new(
                    FailureKind::Error,
                    format!("the result {value} does not fit {}: {error}", type_name::<T>()),
                )
            }),
            Handled::CalledBack(failure)
            | Handled::Failed(failure)
            | Handled::Retry { failure, .. } => Err(failure.clone()),
        }
    }

    /// The message's JSON payload (`null` when the body is not JSON).
    pub fn payload(&self) -> Value {
        self.message.decode().unwrap_or(Value::Null)
    }
}

/// Sends each finished call to the current watchers; costs nothing when nobody watches.
///
/// The channel is made by the first watcher: its `CAPACITY` slots are allocated and
/// written up front (500 KB), which every route of a service that nobody watches (any
/// service outside tests) would otherwise keep resident.
#[derive(Debug, Default)]
pub(crate) struct CallWatch {
    sender: OnceLock<broadcast::Sender<FinishedCall>>,
}

impl CallWatch {
    /// Tell the watchers that a call of `message` ended with `handled`.
    pub(crate) fn finished(&self, message: &Message, handled: &Handled) {
        let Some(sender) = self.sender.get() else { return };
        if sender.receiver_count() > 0 {
            // no watcher left since the check: nothing to do
            let _ =
                sender.send(FinishedCall { message: message.clone(), handled: handled.clone() });
        }
    }

    /// Receive the calls that finish from now on.
    pub(crate) fn watch(&self) -> broadcast::Receiver<FinishedCall> {
        self.sender.get_or_init(|| broadcast::Sender::new(CAPACITY)).subscribe()
    }
}
