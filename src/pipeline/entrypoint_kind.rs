//! [`EntrypointKind`]: what kind of entrypoint triggers a route, kept with the route so that a
//! test can hand the route what that entrypoint would, even when the entrypoint never started.

use std::fmt;

use serde_json::Value;

use crate::config::{Config, Protocol};
use crate::pipeline::consume::Accept;
use crate::pipeline::Entrypoint;

/// Whether the reply to a result fits in `MAX_MESSAGE_SIZE` under a wire format (the config's
/// when `None`), else why not.
pub(crate) type ReplyFits = fn(&Value, Option<Protocol>, &Config) -> Result<(), String>;

/// What kind of entrypoint triggers a route, as the framework reads it: whether a failure
/// is retried through the broker and dead-lettered, what a test hook hands the route, what
/// the status page shows. Opaque: an entrypoint of one's own returns
/// [`Entrypoint::kind`]'s default, or, wrapping one of the framework's, the wrapped one's.
#[derive(Clone, Debug)]
pub struct EntrypointKind(pub(crate) Kind);

/// What kind of entrypoint triggers a route, with what it takes to build the message that
/// entrypoint hands its route.
#[derive(Clone)]
pub(crate) enum Kind {
    /// Events `event_name` of `source_service`, passed through the listener's filter.
    Event {
        /// The service dispatching the events.
        source_service: String,
        /// The events' name (their routing key).
        event_name: String,
        /// The listener's filter: false for an event it skips.
        accept: Accept,
    },
    /// RPC requests for the route's method.
    Rpc {
        /// The wire format, when not the config's.
        protocol: Option<Protocol>,
        /// Whether the reply to a result fits in `MAX_MESSAGE_SIZE` under that wire format,
        /// else why not: a result that does not fails its call before the dependencies are
        /// told, as one with no JSON form does.
        reply_fits: ReplyFits,
    },
    /// HTTP requests for `method path`.
    #[cfg(feature = "http")]
    Http {
        /// The method, upper case.
        method: String,
        /// The path, in axum's syntax.
        path: String,
    },
    /// WebSocket commands named after the route.
    #[cfg(feature = "websocket")]
    WebSocket,
    /// The firings of a timer.
    Timer,
    /// A work queue's messages (`QueueListener`).
    Queue,
    /// An entrypoint written outside the framework.
    Other,
}

impl Kind {
    /// Whether a failure the route cannot retry ends in its dead-letter queue, and a broker
    /// retry (`AsyncBackOff`) is published again: for messages the framework consumes from a
    /// queue (events, work queues), which it settles. An RPC failure is replied, an HTTP or
    /// WebSocket one answered, a timer's logged; an entrypoint written outside the framework
    /// has no way to publish a retry or a dead letter, so its failures are final at once (the
    /// callback runs), as a timer's.
    pub(crate) fn dead_letters(&self) -> bool {
        matches!(self, Kind::Event { .. } | Kind::Queue)
    }

    /// Whether what the entrypoint hands its route is never a call with arguments: an
    /// event's payload (Nameko and micro-framework call an event handler with the payload),
    /// a timer's firing. A work queue's messages may be (a task's `args` and `kwargs`), as
    /// may those of an entrypoint written outside the framework.
    pub(crate) fn never_a_call(&self) -> bool {
        matches!(self, Kind::Event { .. } | Kind::Timer)
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Event { source_service, event_name, .. } => f
                .debug_struct("Event")
                .field("source_service", source_service)
                .field("event_name", event_name)
                .finish_non_exhaustive(),
            Kind::Rpc { protocol, .. } => {
                f.debug_struct("Rpc").field("protocol", protocol).finish()
            }
            #[cfg(feature = "http")]
            Kind::Http { method, path } => {
                f.debug_struct("Http").field("method", method).field("path", path).finish()
            }
            #[cfg(feature = "websocket")]
            Kind::WebSocket => f.write_str("WebSocket"),
            Kind::Timer => f.write_str("Timer"),
            Kind::Queue => f.write_str("Queue"),
            Kind::Other => f.write_str("Other"),
        }
    }
}

/// A route's entrypoint as tests see it: its description and its kind.
#[derive(Clone, Debug)]
pub(crate) struct EntrypointInfo {
    /// What [`Entrypoint::describe`] says, e.g. `EventListener(shop.paid)`.
    pub description: String,
    /// Its kind.
    pub kind: Kind,
}

impl EntrypointInfo {
    /// The description and kind of `entrypoint`.
    pub(crate) fn of(entrypoint: &dyn Entrypoint) -> Self {
        EntrypointInfo { description: entrypoint.describe(), kind: entrypoint.kind().0 }
    }
}
