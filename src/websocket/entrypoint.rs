//! [`WebSocketEntrypoint`]: serve a route as a WebSocket RPC command.

use async_trait::async_trait;

use crate::error::Result;
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;
use crate::websocket::server::WebSocketServer;

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
    _private: (),
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
        let server = route.shared_extension(|| WebSocketServer::new(route.clone()));
        server.register(route.clone());
        tracing::info!(route = route.name(), "serving WebSocket command {}", route.name());
        Ok(())
    }

    /// The service's WebSocket server (a shared extension) serves every WebSocket route.
    async fn run(self: Box<Self>, _route: RouteHandle) -> Result<()> {
        Ok(())
    }

    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::WebSocket)
    }
}
