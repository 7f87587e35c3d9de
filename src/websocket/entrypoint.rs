//! [`WebSocketEntrypoint`]: serve a route as a WebSocket RPC command.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;
use crate::transport::SharedTransport;
use crate::websocket::registry::WsRegistry;
use crate::websocket::server::serve;

/// Serves the route's target as the WebSocket RPC command `{route name}` (the Python
/// original's `WebSocketEntrypoint`).
///
/// All WebSocket routes of a service share one server on `WEBSOCKET_IP:WEBSOCKET_PORT`
/// (default `0.0.0.0:8765`), bound when the service starts: an address in use stops the
/// start. The target takes the frame's `command_args`/`command_kwargs` through
/// [`Args<T>`](crate::amqp::rpc::Args), as an RPC target does; its return value is the
/// reply's `data`. A call needs a free worker of the route's pool at once: when none is
/// free the reply is the error `MaxConnectionsReached`, nothing waits in a queue. A `BackOff`
/// retries in the worker before the reply; an `AsyncBackOff` is not scheduled and a
/// `CallbackRoute`'s callback runs, but the failure is replied either way. See the
/// [module](crate::websocket) for the frames.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::rpc::Args;
/// use micro_framework::websocket::WebSocketEntrypoint;
///
/// fn add(Args((a, b)): Args<(i64, i64)>) -> i64 { a + b }
///
/// let route = Route::new(add).entrypoint(WebSocketEntrypoint::new());   // command "add"
/// ```
#[derive(Debug, Default)]
pub struct WebSocketEntrypoint {
    registration: Option<Registration>,
}

/// A command registered at set-up. Dropped before the entrypoint runs (the service did not
/// start, or only its topology was read), it unregisters the command, and the last one
/// closes the socket; once running, the server's end forgets the whole registry.
#[derive(Debug)]
struct Registration {
    registry: Arc<WsRegistry>,
    transport: Option<SharedTransport>,
    command: String,
}

impl Registration {
    /// The registry, kept for good: the server forgets it when it stops, which may be before
    /// another entrypoint of the service first runs.
    fn keep(mut self) -> Arc<WsRegistry> {
        self.transport = None;
        self.registry.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(transport) = self.transport.take() {
            WsRegistry::unregister(&transport, &self.command);
        }
    }
}

impl WebSocketEntrypoint {
    /// Serve the route as the command named after it.
    pub fn new() -> Self {
        WebSocketEntrypoint::default()
    }
}

#[async_trait]
impl Entrypoint for WebSocketEntrypoint {
    fn describe(&self) -> String {
        "WebSocketEntrypoint".to_owned()
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        let registry = WsRegistry::of(route.transport());
        if !route.is_topology_only() {
            let address = registry.bind(route.config())?;
            tracing::info!(
                route = route.name(),
                "serving WebSocket command {} on ws://{address}",
                route.name()
            );
        }
        registry.register(route.clone());
        self.registration = Some(Registration {
            registry,
            transport: Some(route.transport().clone()),
            command: route.name().to_owned(),
        });
        Ok(())
    }

    async fn run(mut self: Box<Self>, route: RouteHandle) -> Result<()> {
        let registration = self
            .registration
            .take()
            .ok_or_else(|| Error::Startup(format!("{} was not set up", self.describe())))?;
        let registry = registration.keep();
        if !registry.claim_server() {
            // another WebSocket route of the service serves the socket for this one too
            route.stopping().cancelled().await;
            return Ok(());
        }
        let listener = registry
            .take_listener()
            .ok_or_else(|| Error::Startup("the WebSocket socket was not bound".into()))?;
        serve(registry, route, listener).await
    }
}
