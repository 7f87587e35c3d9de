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
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
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

    /// What kind of entrypoint this is: the framework reads it to retry a failure through
    /// the broker and dead-letter it (events, work queues), and for test hooks to hand the
    /// route what the entrypoint would. By default, none of the framework's: failures are
    /// final at once, and hooks hand the route raw messages. An entrypoint wrapping one of
    /// the framework's returns the wrapped one's:
    ///
    /// ```
    /// use micro_framework::entrypoints::{Entrypoint, EntrypointKind};
    /// use micro_framework::{async_trait, Result, RouteHandle};
    ///
    /// /// Logs when its entrypoint stops.
    /// struct Logged<E>(E);
    ///
    /// #[async_trait]
    /// impl<E: Entrypoint> Entrypoint for Logged<E> {
    ///     fn describe(&self) -> String {
    ///         format!("Logged({})", self.0.describe())
    ///     }
    ///     fn queue(&self) -> Option<String> {
    ///         self.0.queue()
    ///     }
    ///     async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
    ///         self.0.setup(route).await
    ///     }
    ///     async fn run(self: Box<Self>, route: RouteHandle) -> Result<()> {
    ///         let stopped = Box::new(self.0).run(route).await;
    ///         eprintln!("stopped: {stopped:?}");
    ///         stopped
    ///     }
    ///     fn kind(&self) -> EntrypointKind {
    ///         self.0.kind()
    ///     }
    /// }
    /// ```
    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::Other)
    }
}
