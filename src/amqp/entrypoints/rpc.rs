//! [`RPCListener`]: serve a route as an RPC method (Nameko's `@rpc`).

use async_trait::async_trait;

use crate::amqp::rpc::naming::{rpc_binding, rpc_exchange, rpc_queue};
use crate::amqp::rpc::{serve, RpcRegistry};
use crate::error::Result;
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;
use crate::transport::SharedTransport;

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
    queue: Option<String>,
    registration: Option<Registration>,
}

/// A method registered at set-up. Dropped before the entrypoint runs (the service did not
/// start, or only its topology was read), it unregisters the method; once running, the
/// consumer's end forgets the whole registry.
#[derive(Debug)]
struct Registration {
    transport: Option<SharedTransport>,
    method: String,
}

impl Registration {
    fn keep(mut self) {
        self.transport = None;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(transport) = self.transport.take() {
            RpcRegistry::unregister(&transport, &self.method);
        }
    }
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

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        let config = route.config();
        let transport = route.transport();
        let queue = rpc_queue(config);
        transport.declare_exchange(&rpc_exchange(config)).await?;
        transport.declare_queue(&queue).await?;
        transport.bind_queue(&rpc_binding(config)).await?;
        RpcRegistry::of(transport).register(route.clone());
        self.registration = Some(Registration {
            transport: Some(transport.clone()),
            method: route.name().to_owned(),
        });
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

    async fn run(mut self: Box<Self>, route: RouteHandle) -> Result<()> {
        if let Some(registration) = self.registration.take() {
            registration.keep();
        }
        let queue = self
            .queue
            .clone()
            .ok_or_else(|| crate::Error::Startup(format!("{} was not set up", self.describe())))?;
        let registry = RpcRegistry::of(route.transport());
        if registry.claim_consumer() {
            serve(registry, route, queue).await
        } else {
            // another RPC route of the service consumes the queue for this one too
            route.stopping().cancelled().await;
            Ok(())
        }
    }
}
