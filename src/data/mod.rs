//! Plain data: what a message is, what a call knows and how it ended, and the RPC bodies of
//! Nameko and the micro-framework (shared by the AMQP and WebSocket RPC). Everything here is
//! serializable (a call can run in another process) and imports nothing else of the crate.

mod call_context;
#[cfg(test)]
pub(crate) mod captured_logs;
mod extensions;
mod failure;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
pub(crate) mod fuzz_support;
mod headers;
mod kombu_types;
pub(crate) mod media_type;
mod message;
pub(crate) mod nameko_wire;
mod outcome;
mod retry_state;
pub(crate) mod text;
pub(crate) mod ufw_wire;

pub use call_context::CallContext;
pub use extensions::Extensions;
pub use failure::{Failure, FailureKind};
pub use headers::{HeaderValue, Headers, Properties};
pub(crate) use kombu_types::{kombu_types_as_text, may_hold_kombu_types};
pub use message::{json_properties, DecodeError, Message};
pub use outcome::{Handled, Outcome, TargetRole};
pub(crate) use retry_state::{
    drop_retry_state, is_retry_of, is_retry_of_route, keep_own_retry_state,
};
pub use retry_state::{BackOffData, HEADER_LAST_ERROR, HEADER_LAST_RETRY, HEADER_RETRY_COUNT};
// public, with `escape_wire_text`, as `logging::*`, where a program looks for them
pub(crate) use text::{bounded, MAX_ERROR_TEXT};

/// A boxed error, as targets and dependencies return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
