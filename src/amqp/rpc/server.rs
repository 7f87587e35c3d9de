//! [`RpcServer`]: the RPC methods of one service instance, served by one consumer of
//! `rpc-{service}` that dispatches each request to the route of its method, replies, then
//! acks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::amqp::rpc::respond::{handled_outcome, reply_then_ack, within_size_limit};
use crate::config::Protocol;
use crate::data::nameko_wire::{reply_body, RemoteException};
use crate::data::{Failure, Handled, Message};
use crate::error::Result;
use crate::pipeline::consume::{consume, slot_for, DeliveryHandler, QueueSource};
use crate::pipeline::settle::{hand_back_as_retry, hand_back_unstarted, Copies};
use crate::pipeline::{Ended, RouteHandle, Serving, SharedExtension};
use crate::transport::Delivery;

/// The RPC routes of a service instance by method name, and the one consumer of their
/// request queue. Every `RPCListener` registers its route at set-up.
#[derive(Debug)]
pub(crate) struct RpcServer {
    /// The route that made the server: its config, transport and stop token are the
    /// service's.
    service: RouteHandle,
    queue: String,
    /// `{service}.`, which a request's routing key starts with.
    routing_prefix: String,
    methods: Mutex<BTreeMap<String, RouteHandle>>,
}

impl RpcServer {
    /// The server of `service`'s instance, consuming `queue`.
    pub(crate) fn new(service: RouteHandle, queue: String) -> Self {
        let routing_prefix = format!("{}.", service.service_name());
        RpcServer { service, queue, routing_prefix, methods: Mutex::default() }
    }

    fn methods(&self) -> MutexGuard<'_, BTreeMap<String, RouteHandle>> {
        self.methods.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serve `route` as the method named after it.
    pub(crate) fn register(&self, route: RouteHandle) {
        self.methods().insert(route.name().to_owned(), route);
    }

    /// The consumer's prefetch: `PREFETCH_COUNT` if set, else the sum of the sizes of the
    /// pools the methods run in, each counted once: requests held past the free slots only
    /// wait in this instance, where another instance could have run them, and a lost
    /// connection would redeliver them.
    fn prefetch(&self) -> u16 {
        self.service.config().prefetch_count.unwrap_or_else(|| {
            let methods = self.methods();
            let mut pools: Vec<&RouteHandle> = Vec::new();
            for route in methods.values() {
                if !pools.iter().any(|seen| seen.pool().is(route.pool())) {
                    pools.push(route);
                }
            }
            pools.iter().fold(0u16, |sum, route| sum.saturating_add(route.prefetch()))
        })
    }

    /// The route of the method a request's routing key `{service}.{method}` names.
    fn route_of<'a>(&self, routing_key: &'a str) -> (&'a str, Option<RouteHandle>) {
        let method = routing_key.strip_prefix(&self.routing_prefix).unwrap_or(routing_key);
        (method, self.methods().get(method).cloned())
    }
}

#[async_trait]
impl SharedExtension for RpcServer {
    async fn start(self: Arc<Self>) -> Result<Serving> {
        let config = self.service.config();
        let source = QueueSource {
            transport: self.service.transport().clone(),
            queue: self.queue.as_str().into(),
            prefetch: self.prefetch(),
            stopping: self.service.stopping().clone(),
            shutdown_timeout: config.shutdown_timeout,
            max_redeliveries: config.max_redeliveries,
            label: "RPC".into(),
            retries_only: false,
            subscribing: self.service.subscribing(),
        };
        Ok(Box::pin(consume(source, self.clone())))
    }
}

#[async_trait]
impl DeliveryHandler for RpcServer {
    /// Handle one request: find the method's route, run it, reply, ack.
    async fn handle(&self, delivery: Delivery) {
        let (message, acker) = delivery.into_parts();
        let message = Arc::new(message);
        let (method, route) = self.route_of(&message.routing_key);
        let (outcome, route, handled) = match route {
            None => {
                (Err(RemoteException::nameko("MethodNotFound", method)), self.service.clone(), None)
            }
            Some(route) => match well_formed(&message, route.config().max_message_size) {
                Err(reason) => {
                    let handled = Handled::Failed(Failure::bad_input(reason.clone()));
                    (Err(RemoteException::nameko("MalformedRequest", reason)), route, Some(handled))
                }
                Ok(()) => {
                    // handed back counted with copies, as this server's crash-loop guard counts
                    let (queue, copies) = (&self.queue, Copies::ByRoute);
                    let slot = slot_for(&route, queue, copies, &message, &*acker).await;
                    let Some(permit) = slot else { return };
                    let handled = match route.handle_counted(permit, &message).await {
                        Ended::Handled(handled, _) => handled,
                        Ended::Interrupted(interrupted) => {
                            // unanswered: another instance answers it
                            let (queue, acker) = (&self.queue, &*acker);
                            hand_back_as_retry(
                                &route,
                                queue,
                                Copies::ByRoute,
                                &message,
                                interrupted.next(),
                                acker,
                                "RPC",
                            )
                            .await;
                            return;
                        }
                        Ended::Unstarted(unstarted) => {
                            let (queue, acker) = (&self.queue, &*acker);
                            let copies = Copies::ByRoute;
                            hand_back_unstarted(&route, queue, copies, &message, acker, unstarted)
                                .await;
                            return;
                        }
                    };
                    let outcome = handled_outcome(&handled).map_err(RemoteException::from_failure);
                    (outcome, route, Some(handled))
                }
            },
        };
        if handled
            .as_ref()
            .is_some_and(|handled| route.failed_after_giving_up(handled, &self.queue))
        {
            return;
        }
        if let Err(error) = &outcome {
            // an unknown method has no route: the route answering for the service is not it
            let route = if handled.is_some() { route.name() } else { "" };
            tracing::warn!(route, "RPC {method} failed: {} {}", error.exc_type, error.value);
        }
        let body = nameko_reply(&route, &outcome);
        reply_then_ack(&route, &message, acker, Protocol::Nameko, body).await;
        if let Some(handled) = handled {
            route.settled(&handled);
        }
    }

    /// A request that keeps crashing the service is answered with an error and not run.
    async fn refuse(&self, delivery: Delivery, failure: Failure) {
        let (message, acker) = delivery.into_parts();
        let (method, named) = self.route_of(&message.routing_key);
        let log_route = named.as_ref().map_or("", RouteHandle::name);
        tracing::error!(route = log_route, "RPC {method} refused: {}", failure.message);
        let route = named.as_ref().unwrap_or(&self.service);
        let body = nameko_reply(route, &Err(RemoteException::from_failure(&failure)));
        reply_then_ack(route, &message, acker, Protocol::Nameko, body).await;
        // counted for the method's route; one no route has is counted under none, as its
        // request is when it is not refused
        if let Some(route) = &named {
            route.settled(&Handled::Failed(failure));
        }
    }

    /// Copies of a request go back by its route: a Python instance sharing the queue finds
    /// its method in the routing key.
    fn copies(&self) -> Copies {
        Copies::ByRoute
    }

    async fn give_up(&self) {
        self.service.give_up().await;
    }
}

/// A request is at most `MAX_MESSAGE_SIZE` bytes of `{"args": [...], "kwargs": {...}}` in JSON.
/// Checked without building the request's values: a big request is decoded once, by its
/// route. A well-formed request is read once here; only a refused one is read again, to say
/// whether it is not JSON at all or JSON of the wrong shape.
fn well_formed(message: &Message, max_size: usize) -> std::result::Result<(), String> {
    if message.body.len() > max_size {
        return Err(format!(
            "request of {} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)",
            message.body.len()
        ));
    }
    if message.decode_into::<RequestShape>().is_ok() {
        return Ok(());
    }
    message.decode_into::<IgnoredAny>().map_err(|error| error.to_string())?;
    Err("Message missing `args` or `kwargs`".to_owned())
}

/// The shape of a request's body, its values skipped.
#[derive(Deserialize)]
struct RequestShape {
    #[serde(rename = "args")]
    _args: Vec<IgnoredAny>,
    #[serde(rename = "kwargs")]
    _kwargs: HashMap<String, IgnoredAny>,
}

/// The reply body for `outcome`; a result over `MAX_MESSAGE_SIZE` is replied as an error.
fn nameko_reply(
    route: &RouteHandle,
    outcome: &std::result::Result<serde_json::Value, RemoteException>,
) -> Bytes {
    within_size_limit(route, reply_body(outcome), |reason| {
        reply_body(&Err(RemoteException::nameko("UnserializableValueError", reason)))
    })
}
