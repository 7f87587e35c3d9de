//! [`RPCListener`]: serve a route as an RPC method (Nameko's `@rpc`).

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::amqp::rpc::naming::{
    rpc_binding, rpc_exchange, rpc_queue, ufw_builtin_queue, ufw_rpc_exchange, ufw_target_queue,
    UFW_RPC_EXCHANGE,
};
use crate::amqp::rpc::{RpcServer, UfwRpcServer};
use crate::config::{Config, Protocol};
use crate::data::ufw_wire::Request;
use crate::data::{json_properties, Headers, Message};
use crate::error::{Error, Result};
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;

/// Serves the route's target as the RPC method `{route name}` of the service, in the wire
/// format of the config's `PROTOCOL` or of [`RPCListener::protocol`].
///
/// **Nameko** (`nameko`): all RPC routes of a service share one durable queue `rpc-{service}`, bound to the
/// `RPC_EXCHANGE` (`nameko-rpc`) with `{service}.*`, and one consumer that dispatches each
/// request on its routing key `{service}.{method}`. The target takes the arguments through
/// [`Args<T>`](crate::amqp::rpc::Args); its return value is the result, its error is replied
/// as a remote error named after its type. Unknown methods (`MethodNotFound`), unreadable
/// requests (`MalformedRequest`) and arguments that do not fit (`IncorrectSignature`) are
/// replied too: RPC requests are acknowledged once replied, never dead-lettered. A request
/// without `reply_to` is handled and acknowledged without a reply.
///
/// **micro-framework** (`micro_framework`): the route is the target `{route name}`, served
/// from its own durable queue `rpc-{service}-{target}` bound to the exchange `ufw-rpc` with
/// `{service}.{target}`; the built-in commands `__list_targets__` and `__get_target__` come on
/// `rpc-{service}-broadcast` (bound `{service}._broadcast.*`). Requests are `{"command",
/// "command_args", "command_kwargs"}`, replies `{"data", "exception"}` JSON-encoded twice, as
/// the Python original's. The target reads its arguments through `Args<T>` all the same; an
/// unknown target is `RPCTargetDoesNotExist`, an unreadable request `RPCMalformedMessage`,
/// arguments that do not fit a `TypeError` (as Python raises it), any other error is named
/// after its Rust type. Python callers rebuild none of these from code of ours.
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
    /// The wire format, when not the config's.
    protocol: Option<Protocol>,
    /// The route's request queue, once set up.
    queue: Option<String>,
}

impl RPCListener {
    /// Serve the route as the RPC method named after it.
    pub fn new() -> Self {
        RPCListener::default()
    }

    /// Serve in `protocol`'s wire format instead of the config's `PROTOCOL`, so one service
    /// can answer Nameko and micro-framework callers.
    ///
    /// ```
    /// use micro_framework::prelude::*;
    /// use micro_framework::amqp::entrypoints::RPCListener;
    /// use micro_framework::config::Protocol;
    ///
    /// fn ping() -> &'static str { "pong" }
    ///
    /// let for_nameko = Route::new(ping).entrypoint(RPCListener::new());
    /// let for_python_micro_framework = Route::new(ping)
    ///     .name("ping_ufw")
    ///     .entrypoint(RPCListener::new().protocol(Protocol::MicroFramework));
    /// ```
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
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
        let queue = match self.protocol.unwrap_or(config.protocol) {
            Protocol::Nameko => {
                if route.name().contains('.') {
                    // `{service}.*`, the queue's binding, matches one word after the service.
                    return Err(Error::Startup(format!(
                        "RPC method '{}' could never be called: Nameko routes a call to \
                         `{{service}}.{{method}}` through the binding `{}.*`, which matches a \
                         method name without a dot; name the route without one",
                        route.name(),
                        config.service_name
                    )));
                }
                let queue = rpc_queue(config);
                transport.declare_exchange(&rpc_exchange(config)).await?;
                transport.declare_queue(&queue).await?;
                transport.bind_queue(&rpc_binding(config)).await?;
                let server =
                    route.shared_extension(|| RpcServer::new(route.clone(), queue.name.clone()));
                server.register(route.clone());
                queue
            }
            Protocol::MicroFramework => {
                transport.declare_exchange(&ufw_rpc_exchange()).await?;
                let (builtin_queue, builtin_binding) = ufw_builtin_queue(config);
                let (queue, binding) = ufw_target_queue(config, route.name());
                for (queue, binding) in [(&builtin_queue, builtin_binding), (&queue, binding)] {
                    transport.declare_queue(queue).await?;
                    transport.bind_queue(&binding).await?;
                }
                let server = route.shared_extension(|| {
                    UfwRpcServer::new(route.clone(), builtin_queue.name.clone())
                });
                server.register(route.clone(), queue.name.clone());
                queue
            }
        };
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

    /// The service's RPC server of the protocol (a shared extension) consumes the request
    /// queues of every RPC route.
    async fn run(self: Box<Self>, _route: RouteHandle) -> Result<()> {
        Ok(())
    }

    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::Rpc {
            protocol: self.protocol,
            reply_fits: crate::amqp::rpc::reply_fits,
        })
    }
}

/// The message an RPC listener speaking `protocol` (the config's when `None`) hands its route
/// for a call of `method(*args, **kwargs)`: the request `{"args": [...], "kwargs": {...}}` as
/// [`Args`](crate::amqp::rpc::Args) reads it, from the protocol's exchange with the routing
/// key `{service}.{method}`, carrying `headers` (context data).
pub(crate) fn rpc_request(
    config: &Config,
    protocol: Option<Protocol>,
    method: &str,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    headers: Headers,
) -> Message {
    let mut properties = json_properties();
    properties.headers = headers;
    let request = Request { id: None, command: method.to_owned(), args, kwargs };
    let exchange = match protocol.unwrap_or(config.protocol) {
        Protocol::Nameko => config.rpc_exchange.clone(),
        Protocol::MicroFramework => UFW_RPC_EXCHANGE.to_owned(),
    };
    Message {
        exchange,
        routing_key: format!("{}.{method}", config.service_name),
        ..request.into_message(properties)
    }
}
