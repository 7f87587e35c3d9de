//! [`EventListener`]: handle events that another service dispatches.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::amqp::naming::{
    dead_letter_queue_of, event_exchange, event_queue, is_quorum, HandlerType,
};
use crate::config::Config;
use crate::data::{Headers, Message};
use crate::error::Result;
use crate::handler::outcome::panic_message;
use crate::pipeline::consume::{serve_route, Accept};
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
use crate::pipeline::settle::declare_retry_topology;
use crate::pipeline::Entrypoint;
use crate::pipeline::{RouteHandle, RouteQueues};
use crate::transport::{BindingSpec, QueueSpec};

type PayloadFilter = Arc<dyn Fn(&Value) -> bool + Send + Sync>;

/// Handles the events `event_name` that `source_service` dispatches, through a queue bound to
/// the exchange `{source_service}.events` (Nameko's `@event_handler`).
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::EventListener;
/// use micro_framework::amqp::naming::HandlerType;
/// use serde_json::Value;
///
/// fn on_paid(Payload(order): Payload<Value>) {}
///
/// let route = Route::new(on_paid).entrypoint(
///     EventListener::new("shop", "order_paid")
///         .handler_type(HandlerType::ServicePool)
///         .filter(|payload| payload["amount"].as_f64().unwrap_or(0.0) > 100.0),
/// );
/// ```
#[derive(Clone)]
pub struct EventListener {
    source_service: String,
    event_name: String,
    handler_type: HandlerType,
    reliable_delivery: bool,
    filter: Option<PayloadFilter>,
    queue: Option<String>,
    /// Whether the queue set up is a quorum queue.
    quorum: bool,
}

impl EventListener {
    /// Listen to `source_service`'s events named `event_name`.
    pub fn new(source_service: impl Into<String>, event_name: impl Into<String>) -> Self {
        EventListener {
            source_service: source_service.into(),
            event_name: event_name.into(),
            handler_type: HandlerType::default(),
            reliable_delivery: true,
            filter: None,
            queue: None,
            quorum: false,
        }
    }

    /// How instances share the events (default: service pool).
    pub fn handler_type(mut self, handler_type: HandlerType) -> Self {
        self.handler_type = handler_type;
        self
    }

    /// With `false`, the queue goes when its last consumer leaves, and events dispatched
    /// while no instance listens are lost: the queue is declared as Nameko declares that of
    /// `@event_handler(..., reliable_delivery=False)` (auto-delete; a broadcast handler's
    /// exclusive too), so a Rust instance can share the queue of a Python handler declared
    /// so, which RabbitMQ refuses for a queue of other flags (`PRECONDITION_FAILED`). Such a
    /// queue is a classic queue whatever `QUEUE_TYPE` (quorum queues cannot auto-delete).
    /// Default `true`: a durable queue that keeps events until an instance takes them.
    ///
    /// ```
    /// use micro_framework::amqp::entrypoints::EventListener;
    ///
    /// let listener = EventListener::new("shop", "order_paid").reliable_delivery(false);
    /// ```
    pub fn reliable_delivery(mut self, reliable: bool) -> Self {
        self.reliable_delivery = reliable;
        self
    }

    /// Handle only events whose payload passes `filter`; others are acknowledged and skipped.
    /// Payloads that cannot be decoded are not skipped: they are bad input. The retry of an
    /// event the filter took is not filtered again.
    pub fn filter(mut self, filter: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }
}

impl std::fmt::Debug for EventListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventListener")
            .field("source_service", &self.source_service)
            .field("event_name", &self.event_name)
            .field("handler_type", &self.handler_type)
            .field("reliable_delivery", &self.reliable_delivery)
            .field("filtered", &self.filter.is_some())
            .finish()
    }
}

#[async_trait]
impl Entrypoint for EventListener {
    fn describe(&self) -> String {
        format!("EventListener({}.{})", self.source_service, self.event_name)
    }

    fn queue(&self) -> Option<String> {
        self.queue.clone()
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        // `{source}.events` of an empty source is `.events`, and an empty event name binds
        // the routing key "": such a listener would start and never receive an event
        if self.source_service.trim().is_empty() || self.event_name.trim().is_empty() {
            return Err(crate::Error::Startup(format!(
                "route '{}': {} needs a source service and an event name",
                route.name(),
                self.describe()
            )));
        }
        let config = route.config();
        let transport = route.transport();
        let exchange = event_exchange(config, &self.source_service);
        let queue = self.unreliable(event_queue(
            config,
            &self.handler_type,
            &self.source_service,
            &self.event_name,
            route.name(),
        ));
        let dlq = dead_letter_queue_of(config, &queue);
        // singleton handlers of one event share its queue on purpose; any other handler's
        // queue is its route's own
        let events = format!("{} events of {}", self.event_name, self.source_service);
        let events = match (&self.handler_type, self.reliable_delivery) {
            (HandlerType::Singleton, true) => events,
            // declared with other flags: the second declaration would be refused
            (HandlerType::Singleton, false) => format!("{events} without reliable delivery"),
            _ => format!("route {}'s {events}", route.name()),
        };
        let named_for = Some(events.as_str());
        let queues = RouteQueues { consumes: &queue.name, named_for, dead_letters: &dlq.name };
        route.claim_queues(queues)?;
        // DECLARE_EVENT_EXCHANGES=false: the exchange is the one the broker holds (Nameko's
        // `no_declare`), whatever its flags; a missing one fails the bind below
        if config.declare_event_exchanges {
            transport.declare_exchange(&exchange).await?;
        }
        transport.declare_queue(&queue).await?;
        transport
            .bind_queue(&BindingSpec {
                queue: queue.name.clone(),
                exchange: exchange.name.clone(),
                routing_key: self.event_name.clone(),
                arguments: Default::default(),
            })
            .await?;
        transport.declare_queue(&dlq).await?;
        route.set_dead_letter_queue(dlq);
        declare_retry_topology(route, &queue.name).await?;
        tracing::info!(
            route = route.name(),
            "listening to {} on queue {}",
            self.describe(),
            queue.name
        );
        self.quorum = is_quorum(&queue);
        self.queue = Some(queue.name);
        route.will_subscribe();
        Ok(())
    }

    async fn run(self: Box<Self>, route: RouteHandle) -> Result<()> {
        let queue = self
            .queue
            .clone()
            .ok_or_else(|| crate::Error::Startup(format!("{} was not set up", self.describe())))?;
        serve_route(route, queue, self.quorum, self.accept()).await
    }

    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::Event {
            source_service: self.source_service.clone(),
            event_name: self.event_name.clone(),
            accept: self.accept(),
        })
    }
}

impl EventListener {
    /// `queue` with Nameko's flags for a handler without reliable delivery: auto-delete, and
    /// exclusive for a broadcast handler; as declared otherwise when delivery is reliable.
    fn unreliable(&self, queue: QueueSpec) -> QueueSpec {
        if self.reliable_delivery {
            return queue;
        }
        let mut arguments = queue.arguments;
        arguments.remove("x-queue-type");
        QueueSpec {
            auto_delete: true,
            exclusive: queue.exclusive || matches!(self.handler_type, HandlerType::Broadcast(_)),
            arguments,
            ..queue
        }
    }

    /// Whether the route handles a message: its payload passes the filter, or cannot be
    /// decoded (bad input, not skipped). A filter that panics on the payload (an `expect` on
    /// a field it assumed) makes the message bad input: the panic would otherwise end the task
    /// that holds the delivery, leaving it unsettled, to come back as a crash again and again.
    fn accept(&self) -> Accept {
        match self.filter.clone() {
            None => Arc::new(|_: &Message| Ok(true)),
            Some(filter) => Arc::new(move |message: &Message| match message.decode() {
                Ok(payload) => std::panic::catch_unwind(AssertUnwindSafe(|| filter(&payload)))
                    .map_err(|panic| format!("filter panicked: {}", panic_message(panic.as_ref()))),
                Err(_) => Ok(true),
            }),
        }
    }
}

/// The message an event listener hands its route for `source_service`'s event `event_name`
/// with `payload`: as delivered from the exchange `{source_service}.events`, a persistent JSON
/// message with `headers` (context data).
pub(crate) fn event_delivery<T: Serialize + ?Sized>(
    config: &Config,
    source_service: &str,
    event_name: &str,
    payload: &T,
    headers: Headers,
) -> serde_json::Result<Message> {
    let mut message = Message::json(payload)?;
    message.properties.headers = headers;
    message.exchange = event_exchange(config, source_service).name;
    message.routing_key = event_name.to_owned();
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueType;

    #[test]
    fn without_reliable_delivery_queues_are_declared_as_nameko_declares_them() {
        let config = Config::new("orders").with_queue_type(QueueType::Quorum);
        let queue = |listener: &EventListener| {
            let queue = event_queue(&config, &listener.handler_type, "shop", "paid", "m");
            listener.unreliable(queue)
        };
        let pool = EventListener::new("shop", "paid");
        let reliable = queue(&pool);
        assert!(reliable.durable && !reliable.auto_delete && !reliable.exclusive);
        assert!(is_quorum(&reliable));

        let unreliable = queue(&pool.reliable_delivery(false));
        assert_eq!(unreliable.name, "evt-shop-paid--orders.m");
        assert!(unreliable.durable && unreliable.auto_delete && !unreliable.exclusive);
        assert!(unreliable.arguments.is_empty(), "quorum queues cannot auto-delete");

        let broadcast = EventListener::new("shop", "paid")
            .handler_type(HandlerType::Broadcast(Some("b1".into())))
            .reliable_delivery(false);
        let broadcast = queue(&broadcast);
        assert_eq!(broadcast.name, "evt-shop-paid--orders.m-b1");
        assert!(broadcast.auto_delete && broadcast.exclusive);
    }
}
