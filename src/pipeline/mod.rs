//! The pipeline: a route's message goes through one consume loop, waits for a worker slot,
//! is translated, gets its dependencies, is handled by the target (in this process or a
//! worker process), retried as the route's policy says, and settled with the broker.

mod call_watch;
pub(crate) mod consume;
mod delayed_message;
mod entrypoint;
pub(crate) mod entrypoint_kind;
mod interrupted;
mod queue_claims;
pub mod retry;
mod route_handle;
pub mod routes;
pub mod settle;
mod shared;
pub mod spawners;
mod stats;
mod subscriptions;

pub use call_watch::FinishedCall;
pub use entrypoint::Entrypoint;
pub(crate) use interrupted::{Ended, Unstarted};
pub(crate) use queue_claims::RouteQueues;
#[cfg(feature = "process")]
pub(crate) use route_handle::Attempt;
pub use route_handle::RouteHandle;
pub(crate) use route_handle::ServiceEnv;
pub use shared::{Serving, SharedExtension};
pub use stats::RouteStats;
pub(crate) use subscriptions::Subscribing;
