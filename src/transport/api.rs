//! The transport trait: the AMQP 0-9-1 operations the framework needs, implemented by
//! RabbitMQ (lapin) and by the in-process broker.
//!
//! Every operation is confirmed: `publish` resolves once the broker has taken
//! responsibility for the message (publisher confirm), and fails with
//! [`TransportError::Unroutable`] when a `mandatory` message reaches no queue.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Consumer, Delivery, TransportError};
use crate::data::{Headers, Properties};

/// A message to publish.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    /// The body.
    pub body: Bytes,
    /// The properties.
    pub properties: Properties,
}

/// Exchange types.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExchangeKind {
    /// Routes on exact routing key.
    Direct,
    /// Routes to every bound queue.
    Fanout,
    /// Routes on dotted routing-key patterns with `*` (one word) and `#` (zero or more words).
    Topic,
    /// Routes on header values (`x-match`).
    Headers,
    /// A plugin exchange type such as `x-delayed-message`.
    Custom(String),
}

impl ExchangeKind {
    /// The AMQP name of the type.
    pub fn as_str(&self) -> &str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Custom(name) => name,
        }
    }
}

/// An exchange to declare.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeSpec {
    /// Exchange name.
    pub name: String,
    /// Exchange type.
    pub kind: ExchangeKind,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding goes away.
    pub auto_delete: bool,
    /// Extra arguments, e.g. `x-delayed-type`.
    pub arguments: Headers,
}

impl ExchangeSpec {
    /// A durable topic exchange, not auto-deleted, without arguments.
    pub fn topic(name: impl Into<String>) -> Self {
        ExchangeSpec {
            name: name.into(),
            kind: ExchangeKind::Topic,
            durable: true,
            auto_delete: false,
            arguments: Headers::new(),
        }
    }
}

/// A queue to declare.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueSpec {
    /// Queue name (never empty: the framework always names its queues).
    pub name: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Used by only one connection and deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer is cancelled.
    pub auto_delete: bool,
    /// `x-message-ttl`, `x-dead-letter-exchange`, `x-dead-letter-routing-key`, `x-expires`,
    /// `x-queue-type`, `x-max-length`, ...
    pub arguments: Headers,
}

impl QueueSpec {
    /// A durable, shared, non-auto-delete queue without arguments.
    pub fn durable(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: Headers::new(),
        }
    }
}

/// A queue-to-exchange binding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingSpec {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// Routing key or pattern.
    pub routing_key: String,
    /// Binding arguments (headers exchanges).
    pub arguments: Headers,
}

/// Counters of a queue, as `queue.declare-ok` returns them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Messages ready for delivery (not counting unacknowledged ones).
    pub message_count: u32,
    /// Consumers attached.
    pub consumer_count: u32,
}

/// Options of a publish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOptions {
    /// Fail with [`TransportError::Unroutable`] when no queue receives the message.
    pub mandatory: bool,
}

/// Options of a consumer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumeOptions {
    /// How many unacknowledged deliveries this consumer may hold (per-consumer QoS).
    pub prefetch: u16,
    /// Exclusive consumer (no other consumer may attach to the queue).
    pub exclusive: bool,
    /// Consumer tag; generated when empty.
    pub consumer_tag: String,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions { prefetch: 10, exclusive: false, consumer_tag: String::new() }
    }
}

/// The AMQP operations the framework uses. Implemented by RabbitMQ and the in-process broker.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Declare an exchange; fails with `PreconditionFailed` if it exists with other flags.
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError>;
    /// Declare a queue; fails with `PreconditionFailed` if it exists with other flags or arguments.
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError>;
    /// Declare a queue for the current connection only: unlike [`Transport::declare_queue`]'s,
    /// it is not declared again after a reconnect. For an exclusive queue whose holder
    /// matters, as a lock another instance takes once the connection holding it is gone: a
    /// queue declared again would take the lock back on a connection that no longer knows
    /// it holds it. A transport that never reconnects declares it as any other; so does a
    /// worker process's, whose operations its service's transport makes (and records).
    async fn declare_queue_for_connection(
        &self,
        spec: &QueueSpec,
    ) -> Result<QueueInfo, TransportError> {
        self.declare_queue(spec).await
    }
    /// Counters of an existing queue (passive declare); `NotFound` if it does not exist.
    async fn queue_info(&self, queue: &str) -> Result<QueueInfo, TransportError>;
    /// Bind a queue to an exchange.
    async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError>;
    /// Delete a queue, returning how many messages it held.
    async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError>;
    /// Delete an exchange.
    async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError>;
    /// Remove every ready message of a queue, returning how many.
    async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError>;
    /// Publish and wait for the broker's confirm.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
    ) -> Result<(), TransportError>;
    /// Start consuming a queue.
    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError>;
    /// Fetch one message without a consumer (`basic.get`, manual ack). A get that fails (of a
    /// missing queue, say) leaves the deliveries of earlier gets settleable.
    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError>;
    /// Declare `queue` again, with the bindings this transport gave it and the exchanges of
    /// those it declared, as this transport declared them: a queue deleted under its consumer
    /// (by hand, say) comes back, as Nameko's consumers declare theirs again. `false` when
    /// this transport holds no record of declaring it: it deleted the queue itself or only
    /// checked it (passively); a queue with `x-expires` is kept in the RabbitMQ transport's
    /// record until its lease runs out, and never in the in-process one's.
    async fn declare_again(&self, _queue: &str) -> Result<bool, TransportError> {
        Ok(false)
    }
    /// True while the transport is connected to its broker (used for readiness).
    fn is_connected(&self) -> bool;
    /// False while a consumer of the transport has not subscribed again since the last
    /// reconnect (each does when it is next read), its queue without a consumer meanwhile;
    /// used for readiness with [`Transport::is_connected`]. True by default.
    fn consumers_subscribed(&self) -> bool {
        true
    }
    /// How many channels its connection may have open at once (AMQP's `channel_max`, as
    /// negotiated with the broker); `None` while it is not connected, and for a transport
    /// without channels (the default).
    fn channel_limit(&self) -> Option<usize> {
        None
    }
    /// How many times the transport reconnected to its broker.
    fn reconnects(&self) -> u64 {
        0
    }
    /// Since when the transport is connected; `None` while it is not.
    fn connected_since(&self) -> Option<std::time::SystemTime> {
        None
    }
    /// The broker node the transport is connected to, as `host:port`; `None` while it is not
    /// connected, and for a broker without nodes (the in-process one).
    fn broker_node(&self) -> Option<String> {
        None
    }
    /// The broker node the transport was last connected to, as `host:port`, also while it
    /// is not connected (for metrics to say which node was lost); `None` for a broker without
    /// nodes.
    fn last_broker_node(&self) -> Option<String> {
        self.broker_node()
    }
    /// True while the broker blocks publishing on the transport's connection
    /// (`connection.blocked`: a resource alarm). A publish sent meanwhile waits in the
    /// connection and goes out once the alarm ends, also one that timed out: what the broker
    /// makes of it is unknown until then. False from transports that are never blocked (the
    /// default).
    fn publishing_blocked(&self) -> bool {
        false
    }
    /// [`Transport::publishing_blocked`], found out by publishing, which alone tells: RabbitMQ
    /// blocks a connection (and says so) only once it publishes during the alarm, and a
    /// publish sent before the connection knows goes out when the alarm ends. The RabbitMQ
    /// transport publishes a message no queue can take, and waits up to `within` for its
    /// confirm or the block. The default asks [`Transport::publishing_blocked`].
    async fn publishing_blocked_now(&self, _within: std::time::Duration) -> bool {
        self.publishing_blocked()
    }
    /// Close the transport; consumers end and unsettled deliveries go back to their queues.
    async fn close(&self);
}

/// A shared handle to a transport.
pub type SharedTransport = Arc<dyn Transport>;

/// Why `transport` is not ready for a service's work, if it is not: not connected, or a
/// consumer not subscribed again since a reconnect.
pub(crate) fn not_ready(transport: &dyn Transport) -> Option<&'static str> {
    if !transport.is_connected() {
        Some("not connected to the broker")
    } else if !transport.consumers_subscribed() {
        Some("consumers subscribing again after a reconnect")
    } else {
        None
    }
}
