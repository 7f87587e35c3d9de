//! [`Entrypoint`]: what triggers a route. The framework's entrypoints (AMQP events and RPC,
//! timers, HTTP, WebSocket) are built on this trait, as yours can be.
//!
//! An entrypoint declares what it needs in [`Entrypoint::setup`], then feeds messages to its
//! route in [`Entrypoint::run`] until the route's `stopping()` token fires. What it gets back
//! is how the message's handling ended, to settle its source as it sees fit: an entrypoint of
//! yours has no broker retry (an `AsyncBackOff` failure is final at once and a
//! `CallbackRoute`'s callback runs, as for a timer); in-worker `BackOff` retries work as
//! anywhere.
//!
//! ```
//! use micro_framework::entrypoints::Entrypoint;
//! use micro_framework::{Message, RouteHandle};
//!
//! /// Calls its route once at start-up.
//! struct Once;
//!
//! #[micro_framework::async_trait]
//! impl Entrypoint for Once {
//!     fn describe(&self) -> String {
//!         "Once".into()
//!     }
//!
//!     async fn run(self: Box<Self>, route: RouteHandle) -> micro_framework::Result<()> {
//!         if let Some(permit) = route.acquire().await {
//!             let handled = route.handle(permit, Message::default()).await;
//!             route.settled(&handled);
//!         }
//!         Ok(())
//!     }
//! }
//! ```

use async_trait::async_trait;

use crate::error::Result;
use crate::pipeline::entrypoint_kind::EntrypointKind;
use crate::pipeline::RouteHandle;

/// What triggers a route.
#[async_trait]
pub trait Entrypoint: Send + Sync + 'static {
    /// A short description for logs, e.g. `EventListener(orders.created)`.
    fn describe(&self) -> String;

    /// The queue the entrypoint consumes, once set up (shown on the status page, with the
    /// depth of its dead-letter queue); `None` for entrypoints that consume none.
    fn queue(&self) -> Option<String> {
        None
    }

    /// Declare what the entrypoint needs (queues, bindings). Runs for every route of the
    /// service before any route starts.
    async fn setup(&mut self, _route: &RouteHandle) -> Result<()> {
        Ok(())
    }

    /// Feed messages to the route until `route.stopping()` fires, then finish as the worker
    /// mode says (hand unstarted messages back, or finish them) and return.
    async fn run(self: Box<Self>, route: RouteHandle) -> Result<()>;

    /// What kind of entrypoint this is, for test hooks to hand the route what it would. The
    /// framework's entrypoints say; the routes of others take raw messages.
    #[doc(hidden)]
    fn kind(&self) -> EntrypointKind {
        EntrypointKind::Other
    }
}
