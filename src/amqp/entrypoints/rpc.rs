//! [`RPCListener`]: serve a route as an RPC method (Nameko's `@rpc`).

use async_trait::async_trait;

use crate::amqp::rpc::naming::{rpc_binding, rpc_exchange, rpc_queue};
use crate::amqp::rpc::RpcServer;
use crate::error::Result;
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;

/// Serves the route's target as the RPC method `{route name}` of the service.
///
/// All RPC routes of a service share one durable queue `rpc-{service}`, bound to the
/// `RPC_EXCHANGE` (`nameko-rpc`) with `{service}.*`, and one consumer that dispatches each
/// request on its routing key `{service}.{method}`. The target takes the arguments through
/// [`Args<T>`](crate::amqp::rpc::Args); its return value is the result, its error is replied
/// as a remote error named after its type. Unknown methods (`MethodNotFound`), unreadable
/// requests (`MalformedRequest`) and arguments that do not fit (`IncorrectSignature`) are
/// replied too: RPC requests are acknowledged once replied, never dead-lettered. A request
/// without `reply_to` is handled and acknowledged without a reply.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::RPCListener;
/// use micro_framework::amqp::rpc::Args;
///
/// #[derive(serde::Deserialize)]
/// struct Echo { x: serde_json::Value }
///
/// fn echo(Args(Echo { x }): Args<Echo>) -> serde_json::Value { x }
///
/// let route = Route::new(echo).entrypoint(RPCListener::new());
/// ```
#[derive(Debug, Default)]
pub struct RPCListener {
    /// The service's request queue, once set up.
    queue: Option<String>,
}

impl RPCListener {
    /// Serve the route as the RPC method named after it.
    pub fn new() -> Self {
        RPCListener::default()
    }
}

#[async_trait]
impl Entrypoint for RPCListener {
    fn describe(&self) -> String {
        "RPCListener".to_owned()
    }

    fn queue(&self) -> Option<String> {
        self.queue.clone()
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        let config = route.config();
        let transport = route.transport();
        let queue = rpc_queue(config);
        transport.declare_exchange(&rpc_exchange(config)).await?;
        transport.declare_queue(&queue).await?;
        transport.bind_queue(&rpc_binding(config)).await?;
        let server = route.shared_extension(|| RpcServer::new(route.clone(), queue.name.clone()));
        server.register(route.clone());
        tracing::info!(
            route = route.name(),
            "serving RPC method {}.{} on queue {}",
            route.service_name(),
            route.name(),
            queue.name
        );
        self.queue = Some(queue.name);
        Ok(())
    }

    /// The service's RPC server (a shared extension) consumes the request queue for every RPC
    /// route.
    async fn run(self: Box<Self>, _route: RouteHandle) -> Result<()> {
        Ok(())
    }
}
