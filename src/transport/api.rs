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
use tokio::sync::mpsc;

use crate::data::{Headers, Message, Properties};

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

/// Errors of the transport layer.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Serialize, Deserialize)]
pub enum TransportError {
    /// The connection is down or could not be opened (credentials masked).
    #[error("broker connection error: {0}")]
    Connection(String),
    /// The broker refused a declaration whose arguments differ from the existing entity
    /// (`406 PRECONDITION_FAILED`).
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// An exchange or queue does not exist (`404 NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The queue is used exclusively by another connection or consumer (`405 RESOURCE_LOCKED`
    /// or `403 ACCESS_REFUSED` on exclusive consume).
    #[error("resource locked: {0}")]
    ResourceLocked(String),
    /// A mandatory message reached no queue (`basic.return`).
    #[error("message to exchange '{exchange}' with routing key '{routing_key}' reached no queue")]
    Unroutable {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },
    /// The broker negatively acknowledged a publish.
    #[error("broker refused the message (publisher nack)")]
    Nacked,
    /// The consumer, channel or transport was closed.
    #[error("closed: {0}")]
    Closed(String),
    /// A limit was reached (`MAX_MESSAGE_SIZE`, the in-process broker's memory, pending RPC
    /// calls); nothing was sent.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// Anything else the broker reported.
    #[error("broker error: {0}")]
    Other(String),
}

/// How a delivery is settled with the broker. Implemented by each transport.
///
/// Dropping an acker without settling must hand the message back to the queue
/// (as a channel close does on RabbitMQ).
#[async_trait]
pub trait Acker: Send + Sync + fmt::Debug {
    /// Acknowledge: the message is done and removed.
    async fn ack(&self) -> Result<(), TransportError>;
    /// Negative acknowledgement; `requeue = false` dead-letters or drops it.
    async fn nack(&self, requeue: bool) -> Result<(), TransportError>;
    /// Reject (single-message nack).
    async fn reject(&self, requeue: bool) -> Result<(), TransportError>;
}

/// A message delivered to a consumer.
#[derive(Debug)]
pub struct Delivery {
    /// Exchange the message was published to (empty for the default exchange).
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// True when the message was delivered before and handed back.
    pub redelivered: bool,
    /// The body.
    pub body: Bytes,
    /// The properties.
    pub properties: Properties,
    /// Settles the delivery.
    pub acker: Box<dyn Acker>,
}

impl Delivery {
    /// The message it carries, as handlers see it.
    pub fn message(&self) -> Message {
        Message {
            body: self.body.clone(),
            properties: self.properties.clone(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            redelivered: self.redelivered,
            ..Message::default()
        }
    }
}

/// A stream of deliveries from one queue: a [`futures::Stream`] that ends once the consumer
/// is cancelled (by us or the broker) or its connection is lost.
///
/// [`Consumer::cancel`] stops new deliveries (`basic.cancel`); deliveries already received
/// are still yielded, and stay valid until settled.
pub struct Consumer {
    deliveries: mpsc::Receiver<Delivery>,
    canceller: Option<Box<dyn FnOnce() + Send>>,
    tag: String,
}

impl Consumer {
    /// Build a consumer from a channel of deliveries and a function that cancels it at the
    /// broker. Transports call this.
    pub fn new(
        tag: impl Into<String>,
        deliveries: mpsc::Receiver<Delivery>,
        canceller: impl FnOnce() + Send + 'static,
    ) -> Self {
        Consumer { deliveries, canceller: Some(Box::new(canceller)), tag: tag.into() }
    }

    /// The consumer tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Stop new deliveries. Deliveries already buffered are still yielded before the stream
    /// ends.
    pub fn cancel(&mut self) {
        if let Some(cancel) = self.canceller.take() {
            cancel();
        }
    }
}

impl futures::Stream for Consumer {
    type Item = Delivery;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("tag", &self.tag).finish()
    }
}

/// The AMQP operations the framework uses. Implemented by RabbitMQ and the in-process broker.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Declare an exchange; fails with `PreconditionFailed` if it exists with other flags.
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError>;
    /// Declare a queue; fails with `PreconditionFailed` if it exists with other flags or arguments.
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError>;
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
    /// Fetch one message without a consumer (`basic.get`, manual ack).
    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError>;
    /// True while the transport is connected to its broker (used for readiness).
    fn is_connected(&self) -> bool;
    /// How many times the transport reconnected to its broker.
    fn reconnects(&self) -> u64 {
        0
    }
    /// Close the transport; consumers end and unsettled deliveries go back to their queues.
    async fn close(&self);
}

/// A shared handle to a transport.
pub type SharedTransport = Arc<dyn Transport>;
