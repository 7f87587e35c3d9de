//! [`UfwRpcServer`]: the RPC targets of one service instance in the Python micro-framework's
//! wire format: one queue per target, one for the built-in commands, each consumed here and
//! answered, then acked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;

use crate::amqp::rpc::respond::{handled_outcome, reply_then_ack, within_size_limit};
use crate::config::Protocol;
use crate::data::nameko_wire::request_body;
use crate::data::ufw_wire::{answer_builtin, reply_body, target_detail, RemoteError, Request};
use crate::data::{json_properties, Failure, FailureKind, Handled, Message};
use crate::error::Result;
use crate::pipeline::consume::{consume, slot_for, DeliveryHandler, QueueSource};
use crate::pipeline::settle::{hand_back_as_retry, hand_back_unstarted, Copies};
use crate::pipeline::{Ended, RouteHandle, Serving, SharedExtension};
use crate::transport::limits::check_received_size;
use crate::transport::{Acker, Delivery};

/// How many built-in command requests the instance takes at once (they are answered at once,
/// without a worker).
const BUILTIN_PREFETCH: u16 = 10;

/// The micro-framework RPC targets of a service instance by name, with their queues. Every
/// `RPCListener` speaking that protocol registers its route at set-up.
#[derive(Debug)]
pub(crate) struct UfwRpcServer {
    /// The route that made the server: its config, transport and stop token are the
    /// service's.
    service: RouteHandle,
    builtin_queue: String,
    targets: Mutex<BTreeMap<String, (RouteHandle, String)>>,
}

impl UfwRpcServer {
    /// The server of `service`'s instance; built-in commands arrive on `builtin_queue`.
    pub(crate) fn new(service: RouteHandle, builtin_queue: String) -> Self {
        UfwRpcServer { service, builtin_queue, targets: Mutex::default() }
    }

    fn targets(&self) -> MutexGuard<'_, BTreeMap<String, (RouteHandle, String)>> {
        self.targets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serve `route` as the target named after it, from `queue`.
    pub(crate) fn register(&self, route: RouteHandle, queue: String) {
        self.targets().insert(route.name().to_owned(), (route, queue));
    }

    fn route(&self, target: &str) -> Option<RouteHandle> {
        self.targets().get(target).map(|(route, _)| route.clone())
    }

    /// The target a request's routing key `{service}.{target}` names, if the service has it.
    fn named_route(&self, routing_key: &str) -> Option<RouteHandle> {
        let prefix = format!("{}.", self.service.service_name());
        routing_key.strip_prefix(&prefix).and_then(|target| self.route(target))
    }

    /// The route a request is answered through: the target its routing key names, else the
    /// service's.
    fn route_of(&self, routing_key: &str) -> RouteHandle {
        self.named_route(routing_key).unwrap_or_else(|| self.service.clone())
    }

    fn source(&self, queue: &str, prefetch: u16) -> QueueSource {
        let config = self.service.config();
        QueueSource {
            transport: self.service.transport().clone(),
            queue: queue.into(),
            prefetch: config.prefetch_count.unwrap_or(prefetch),
            stopping: self.service.stopping().clone(),
            shutdown_timeout: config.shutdown_timeout,
            max_redeliveries: config.max_redeliveries,
            label: "RPC".into(),
            retries_only: false,
            subscribing: self.service.subscribing(),
        }
    }

    /// Answer `request` (a built-in command, or a call of a target run in a worker slot);
    /// `None` when the request goes back to its queue (the service is stopping).
    async fn answer(
        &self,
        request: Request,
        message: &mut Arc<Message>,
        acker: &dyn Acker,
    ) -> Option<(Result<Value, RemoteError>, RouteHandle, Option<Handled>)> {
        let builtin = answer_builtin(
            &request,
            |target| self.route(target).map(|_| target_detail(target)),
            || self.targets().keys().map(|target| target_detail(target)).collect(),
        );
        if let Some(answer) = builtin {
            return Some((answer, self.service.clone(), None));
        }
        let target = self.targets().get(&request.command).cloned();
        let Some((route, queue)) = target else {
            let error = RemoteError::target_does_not_exist(&request.command);
            return Some((Err(error), self.route_of(&message.routing_key), None));
        };
        // handed back counted with copies, as this server's crash-loop guard counts
        let permit = slot_for(&route, &queue, Copies::ByRoute, message, acker).await?;
        // A request whose call the stop may cut short between in-worker retries (`BackOff`),
        // or before a worker process takes it, goes back as it came, so it is kept: only for
        // such routes, as it holds its body for the whole call.
        let cut_short = route.retries_in_worker() || route.runs_in_processes();
        let request_as_it_came = cut_short.then(|| message.clone());
        // The route reads the arguments as any RPC request's: `{"args", "kwargs"}`. The
        // message is not shared yet (unless kept above): its body is replaced, the rest is not
        // copied. The new body is JSON whatever the request's content type said (the request
        // was read as JSON regardless, as the Python original reads it): a `text/plain` type
        // kept would make the route read it as one JSON string.
        let call = Arc::make_mut(message);
        call.body = request_body(request.args, request.kwargs);
        let json = json_properties();
        call.properties.content_type = json.content_type;
        call.properties.content_encoding = json.content_encoding;
        let handled = match route.handle_counted(permit, message).await {
            Ended::Handled(handled, _) => handled,
            Ended::Interrupted(interrupted) => {
                // unanswered, as it came: another instance answers it (only a route retrying
                // in the worker is interrupted, and its request was kept)
                let request = request_as_it_came.as_ref().unwrap_or(message);
                hand_back_as_retry(
                    &route,
                    &queue,
                    Copies::ByRoute,
                    request,
                    interrupted.next(),
                    acker,
                    "RPC",
                )
                .await;
                return None;
            }
            Ended::Unstarted(unstarted) => {
                let request = request_as_it_came.as_ref().unwrap_or(message);
                let copies = Copies::ByRoute;
                hand_back_unstarted(&route, &queue, copies, request, acker, unstarted).await;
                return None;
            }
        };
        if route.failed_after_giving_up(&handled, &queue) {
            return None;
        }
        let outcome = handled_outcome(&handled).map_err(RemoteError::from_failure);
        Some((outcome, route, Some(handled)))
    }
}

#[async_trait]
impl SharedExtension for UfwRpcServer {
    async fn start(self: Arc<Self>) -> Result<Serving> {
        let mut sources = vec![self.source(&self.builtin_queue, BUILTIN_PREFETCH)];
        for (route, queue) in self.targets().values() {
            sources.push(self.source(queue, route.prefetch()));
        }
        let server = self.clone();
        Ok(Box::pin(async move {
            let consumers = sources.into_iter().map(|source| consume(source, server.clone()));
            futures::future::try_join_all(consumers).await.map(|_| ())
        }))
    }
}

#[async_trait]
impl DeliveryHandler for UfwRpcServer {
    /// Handle one request: answer it, reply, ack.
    async fn handle(&self, delivery: Delivery) {
        let (message, acker) = delivery.into_parts();
        let mut message = Arc::new(message);
        let max_size = self.service.config().max_message_size;
        let request = match check_received_size("RPC request", message.body.len(), max_size) {
            Err(too_large) => Err(RemoteError::malformed(too_large.to_string())),
            Ok(()) => Request::parse(&message.body).map_err(|malformed| malformed.error),
        };
        let (outcome, route, handled) = match request {
            // counted for the target its routing key names; one that names none (the
            // built-ins' queue) is answered, counted under no route, as an unknown method is
            Err(error) => match self.named_route(&message.routing_key) {
                Some(route) => {
                    let handled = Handled::Failed(Failure::bad_input(error.message.clone()));
                    (Err(error), route, Some(handled))
                }
                None => (Err(error), self.service.clone(), None),
            },
            Ok(request) => match self.answer(request, &mut message, &*acker).await {
                Some(answer) => answer,
                None => return,
            },
        };
        if let Err(error) = &outcome {
            // under the route that took the request (a target's command may come by the
            // built-ins' queue too), or none
            let route = if handled.is_some() { route.name() } else { "" };
            tracing::warn!(route, "RPC {} failed: {error}", message.routing_key);
        }
        let body = ufw_reply(&route, &outcome);
        reply_then_ack(&route, &message, acker, Protocol::MicroFramework, body).await;
        if let Some(handled) = handled {
            route.settled(&handled);
        }
    }

    /// A request that keeps crashing the service is answered with an error and not run.
    async fn refuse(&self, delivery: Delivery, failure: Failure) {
        let (message, acker) = delivery.into_parts();
        let named = self.named_route(&message.routing_key);
        let log_route = named.as_ref().map_or("", RouteHandle::name);
        tracing::error!(
            route = log_route,
            "RPC {} refused: {}",
            message.routing_key,
            failure.message
        );
        let route = named.as_ref().unwrap_or(&self.service);
        let body = ufw_reply(route, &Err(RemoteError::from_failure(&failure)));
        reply_then_ack(route, &message, acker, Protocol::MicroFramework, body).await;
        // counted for the target the request names, as a request handled
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

/// The reply body for `outcome`; a result over `MAX_MESSAGE_SIZE` is replied as an error.
fn ufw_reply(route: &RouteHandle, outcome: &std::result::Result<Value, RemoteError>) -> Bytes {
    within_size_limit(route, reply_body(outcome), |reason| {
        let failure = Failure::new(FailureKind::Unserializable, reason);
        reply_body(&Err(RemoteError::from_failure(&failure)))
    })
}
