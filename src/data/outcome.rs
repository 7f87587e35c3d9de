//! How a call ended: [`Outcome`] (the target's value or its [`Failure`]) and [`Handled`] (what
//! the pipeline made of it, for the entrypoint to settle the message).

use serde_json::Value;

use crate::data::failure::Failure;

/// Which function of a route a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TargetRole {
    /// The route's target.
    Target,
    /// A `CallbackRoute`'s callback, run after the target failed for good.
    Callback,
}

/// The outcome of one call: the target's return value, or why it failed.
pub type Outcome = Result<Value, Failure>;

/// How a message's handling ended, for the entrypoint to settle it. Non-exhaustive: an
/// entrypoint of one's own matching on it keeps a `_` arm, so that a new way to end is not a
/// breaking change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Handled {
    /// The target succeeded with this value.
    Succeeded(Value),
    /// The target failed and the route's callback handled the failure.
    CalledBack(Failure),
    /// Nothing handled it: bad input, a failure without callback, or a failing callback.
    /// The message must be dead-lettered with this reason.
    Failed(Failure),
    /// The target failed and its `AsyncBackOff` asks for another attempt after `delay`: the
    /// entrypoint schedules the message again on the broker.
    Retry {
        /// Why the attempt failed.
        failure: Failure,
        /// How long to wait before the next attempt.
        delay: std::time::Duration,
    },
}
