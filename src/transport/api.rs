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
use futures::stream::BoxStream;
use futures::StreamExt;
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
///
/// The variant says what happened; the message it carries is for people (credentials
/// masked) and is never read by the framework to decide anything. Use
/// [`TransportError::is_permanent`] to decide whether trying again can help.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TransportError {
    /// The broker cannot be reached: the name does not resolve, the TCP connection is refused
    /// or fails, the connection attempt times out, or the connection is down and did not come
    /// back in time. Trying again can help.
    #[error("broker connection error: {0}")]
    Unreachable(String),
    /// The broker refused the login: wrong user name or password (`403 ACCESS_REFUSED` when
    /// the connection opens), or the authentication mechanism failed. Permanent.
    #[error("broker connection error: {0}")]
    Authentication(String),
    /// TLS failed: the broker's certificate was refused (unknown issuer, wrong name, expired),
    /// the broker refused ours (a TLS alert, e.g. no client certificate), or the CA,
    /// certificate or key files cannot be read or are not valid PEM. Permanent.
    #[error("broker connection error: {0}")]
    Tls(String),
    /// The broker URI cannot be used (syntax, scheme, option; password masked). Permanent.
    #[error("broker connection error: {0}")]
    InvalidUri(String),
    /// The connection failed while in use (I/O error, missed heartbeats, the broker closed it
    /// with `320 CONNECTION_FORCED`). The RabbitMQ transport reconnects by itself; trying
    /// again can help.
    #[error("broker connection error: {0}")]
    ConnectionLost(String),
    /// The broker did not answer in time (publish timeout): the connection may be blocked
    /// by a resource alarm or the broker overloaded. Whether a publish reached the broker is
    /// unknown. Trying again can help.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// Something was closed and will not come back: the transport (closed by the
    /// application), the channel a delivery came on (it cannot be settled any more), or a
    /// consumer.
    #[error("closed: {reason}")]
    Closed {
        /// What was closed.
        what: ClosedPart,
        /// What happened.
        reason: String,
    },
    /// The broker refused an operation to this user or on this resource
    /// (`403 ACCESS_REFUSED`: no permission, the default exchange, a reserved `amq.` name).
    #[error("access refused: {0}")]
    AccessRefused(String),
    /// The broker refused a declaration whose arguments differ from the existing entity, or
    /// an invalid argument (`406 PRECONDITION_FAILED`).
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// An exchange or queue does not exist (`404 NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The queue is used exclusively by another connection or consumer (`405 RESOURCE_LOCKED`,
    /// or a `basic.consume` refused with `403` because the queue is in exclusive use).
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
    /// A limit was reached; nothing was sent.
    #[error("limit reached: {reason}")]
    LimitReached {
        /// Which limit.
        what: Limit,
        /// What the operation would have reached, in the limit's [unit](Limit::unit).
        size: u64,
        /// The limit, in the same unit.
        limit: u64,
        /// What was refused, for people.
        reason: String,
    },
    /// Another reply of the broker, with its AMQP reply code (e.g. `503 COMMAND_INVALID`,
    /// `530 NOT_ALLOWED`, `541 INTERNAL_ERROR`).
    #[error("broker error: {code} {text}")]
    Broker {
        /// The AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The delivery was acknowledged, rejected or nacked already.
    #[error("delivery already settled")]
    AlreadySettled,
    /// A value AMQP or the transport cannot carry (a name over 255 bytes, an empty queue
    /// name, a header value of no AMQP type); nothing was sent.
    #[error("invalid value: {0}")]
    Invalid(String),
    /// The transport cannot do this: an operation a worker process does not forward, a
    /// queue feature the in-process broker does not implement, a server speaking another
    /// protocol version.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A failure in the AMQP client or between the framework's own processes that none of
    /// the other variants describes (a bug, or a state the client does not expect).
    #[error("internal transport error: {0}")]
    Internal(String),
}

impl TransportError {
    /// True when trying the same operation again cannot succeed until something changes:
    /// the credentials, the certificates, the URI, the broker's definitions or permissions,
    /// or the request itself.
    ///
    /// Not permanent (trying again later can help): [`Unreachable`](Self::Unreachable),
    /// [`ConnectionLost`](Self::ConnectionLost), [`TimedOut`](Self::TimedOut),
    /// [`ResourceLocked`](Self::ResourceLocked) (the holder may go away),
    /// [`Nacked`](Self::Nacked), [`LimitReached`](Self::LimitReached) of the in-process
    /// broker's memory or of pending calls (they drain), and [`Broker`](Self::Broker) replies
    /// `320 CONNECTION_FORCED`, `506 RESOURCE_ERROR` and `541 INTERNAL_ERROR`. Everything
    /// else is permanent, e.g. [`Authentication`](Self::Authentication),
    /// [`Tls`](Self::Tls), [`InvalidUri`](Self::InvalidUri), a message over
    /// `MAX_MESSAGE_SIZE`, or a transport [`Closed`](Self::Closed) by the application.
    ///
    /// ```
    /// use micro_framework::transport::TransportError;
    /// assert!(!TransportError::Unreachable("connection refused".into()).is_permanent());
    /// assert!(TransportError::Authentication("ACCESS_REFUSED".into()).is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        match self {
            TransportError::Unreachable(_)
            | TransportError::ConnectionLost(_)
            | TransportError::TimedOut(_)
            | TransportError::ResourceLocked(_)
            | TransportError::Nacked => false,
            TransportError::LimitReached { what, .. } => what.is_permanent(),
            TransportError::Broker { code, .. } => {
                !matches!(*code, CONNECTION_FORCED | RESOURCE_ERROR | INTERNAL_ERROR)
            }
            TransportError::Authentication(_)
            | TransportError::Tls(_)
            | TransportError::InvalidUri(_)
            | TransportError::Closed { .. }
            | TransportError::AccessRefused(_)
            | TransportError::PreconditionFailed(_)
            | TransportError::NotFound(_)
            | TransportError::Unroutable { .. }
            | TransportError::AlreadySettled
            | TransportError::Invalid(_)
            | TransportError::Unsupported(_)
            | TransportError::Internal(_) => true,
        }
    }
}

/// `320 CONNECTION_FORCED`: the broker closed the connection (e.g. it is shutting down).
const CONNECTION_FORCED: u16 = 320;
/// `506 RESOURCE_ERROR`: the broker lacks the resources to do it now.
const RESOURCE_ERROR: u16 = 506;
/// `541 INTERNAL_ERROR`: the broker failed internally.
const INTERNAL_ERROR: u16 = 541;

/// What a [`TransportError::Closed`] error says was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClosedPart {
    /// The transport (closed by the application, or the service a worker process forwards
    /// to went away).
    Transport,
    /// The channel a delivery came on: it can no longer be settled (the broker requeues it).
    Channel,
    /// A consumer (e.g. the reply queue's consumer of an RPC call).
    Consumer,
}

/// Which limit a [`TransportError::LimitReached`] error reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Limit {
    /// `MAX_MESSAGE_SIZE`: the size of one message body, in bytes. Permanent for that message.
    MessageSize,
    /// The in-process broker's bound on its ready messages (`memory://NAME?max_bytes=N`), in
    /// bytes. It frees up as consumers catch up.
    BrokerMemory,
    /// The RPC calls one service instance may have waiting for replies, a count. It frees up
    /// as replies come.
    PendingCalls,
    /// The encoded properties and headers of one message, in bytes: AMQP carries them in one
    /// frame, so they must fit in the connection's `frame_max` (131,072 bytes on RabbitMQ by
    /// default); RabbitMQ closes the whole connection on a bigger one. Permanent for that
    /// message.
    HeaderSize,
}

impl Limit {
    /// The unit of the limit's numbers: `"bytes"` or `"calls"`.
    pub fn unit(self) -> &'static str {
        match self {
            Limit::MessageSize | Limit::BrokerMemory | Limit::HeaderSize => "bytes",
            Limit::PendingCalls => "calls",
        }
    }

    /// True when trying again cannot help: the size of a message's body or headers.
    pub fn is_permanent(self) -> bool {
        matches!(self, Limit::MessageSize | Limit::HeaderSize)
    }
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

    /// The message it carries and what settles it, the message moved out rather than copied.
    pub(crate) fn into_parts(self) -> (Message, Box<dyn Acker>) {
        let message = Message {
            body: self.body,
            properties: self.properties,
            exchange: self.exchange,
            routing_key: self.routing_key,
            redelivered: self.redelivered,
            ..Message::default()
        };
        (message, self.acker)
    }
}

/// A stream of deliveries from one queue: a [`futures::Stream`] that ends once the consumer
/// is cancelled (by us or the broker) or its connection is lost.
///
/// [`Consumer::cancel`] stops new deliveries (`basic.cancel`); deliveries already received
/// are still yielded, and stay valid until settled.
pub struct Consumer {
    /// Fused: read again once ended (a consume loop waiting to consume anew, a drain at
    /// stop), it stays ended, where some streams (a transport's `unfold`) would panic.
    deliveries: futures::stream::Fuse<BoxStream<'static, Delivery>>,
    canceller: Option<Box<dyn FnOnce() + Send>>,
    tag: String,
}

impl Consumer {
    /// Build a consumer from a channel of deliveries and a function that cancels it at the
    /// broker. Transports call this.
    pub fn new(
        tag: impl Into<String>,
        mut deliveries: mpsc::Receiver<Delivery>,
        canceller: impl FnOnce() + Send + 'static,
    ) -> Self {
        let deliveries = futures::stream::poll_fn(move |cx| deliveries.poll_recv(cx));
        Consumer::from_stream(tag, deliveries, canceller)
    }

    /// Build a consumer from a stream of deliveries and a function that cancels it at the
    /// broker. A transport whose deliveries already arrive as a stream hands them on without
    /// a task and a channel in between (one wake-up less per delivery).
    pub fn from_stream(
        tag: impl Into<String>,
        deliveries: impl futures::Stream<Item = Delivery> + Send + 'static,
        canceller: impl FnOnce() + Send + 'static,
    ) -> Self {
        Consumer {
            deliveries: deliveries.boxed().fuse(),
            canceller: Some(Box::new(canceller)),
            tag: tag.into(),
        }
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
        self.deliveries.poll_next_unpin(cx)
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
    /// Close the transport; consumers end and unsettled deliveries go back to their queues.
    async fn close(&self);
}

/// A shared handle to a transport.
pub type SharedTransport = Arc<dyn Transport>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanence_of_every_variant() {
        let text = || "why".to_owned();
        let limit = |what| TransportError::LimitReached { what, size: 2, limit: 1, reason: text() };
        let broker = |code| TransportError::Broker { code, text: text() };
        let closed = |what| TransportError::Closed { what, reason: text() };
        let retryable = [
            TransportError::Unreachable(text()),
            TransportError::ConnectionLost(text()),
            TransportError::TimedOut(text()),
            TransportError::ResourceLocked(text()),
            TransportError::Nacked,
            limit(Limit::BrokerMemory),
            limit(Limit::PendingCalls),
            broker(320),
            broker(506),
            broker(541),
        ];
        for error in retryable {
            assert!(!error.is_permanent(), "{error:?} can succeed when tried again");
        }
        let permanent = [
            TransportError::Authentication(text()),
            TransportError::Tls(text()),
            TransportError::InvalidUri(text()),
            closed(ClosedPart::Transport),
            closed(ClosedPart::Channel),
            closed(ClosedPart::Consumer),
            TransportError::AccessRefused(text()),
            TransportError::PreconditionFailed(text()),
            TransportError::NotFound(text()),
            TransportError::Unroutable { exchange: text(), routing_key: text() },
            limit(Limit::MessageSize),
            broker(503),
            broker(530),
            TransportError::AlreadySettled,
            TransportError::Invalid(text()),
            TransportError::Unsupported(text()),
            TransportError::Internal(text()),
        ];
        for error in permanent {
            assert!(error.is_permanent(), "{error:?} fails again until something changes");
        }
    }

    #[test]
    fn messages_keep_their_wording() {
        let unreachable = TransportError::Unreachable("cannot connect to amqp://u:***@h/".into());
        assert_eq!(
            unreachable.to_string(),
            "broker connection error: cannot connect to amqp://u:***@h/"
        );
        let limit = TransportError::LimitReached {
            what: Limit::PendingCalls,
            size: 3,
            limit: 2,
            reason: "2 RPC calls wait".into(),
        };
        assert_eq!(limit.to_string(), "limit reached: 2 RPC calls wait");
        assert_eq!((Limit::PendingCalls.unit(), Limit::MessageSize.unit()), ("calls", "bytes"));
        let broker = TransportError::Broker { code: 530, text: "NOT_ALLOWED - vhost".into() };
        assert_eq!(broker.to_string(), "broker error: 530 NOT_ALLOWED - vhost");
        assert_eq!(TransportError::AlreadySettled.to_string(), "delivery already settled");
    }

    #[test]
    fn errors_cross_the_worker_process_link() {
        let error = TransportError::LimitReached {
            what: Limit::MessageSize,
            size: 17,
            limit: 16,
            reason: "event of 17 bytes".into(),
        };
        let json = serde_json::to_string(&error).unwrap();
        assert_eq!(serde_json::from_str::<TransportError>(&json).unwrap(), error);
        let closed = TransportError::Closed { what: ClosedPart::Channel, reason: "gone".into() };
        let json = serde_json::to_string(&closed).unwrap();
        assert_eq!(serde_json::from_str::<TransportError>(&json).unwrap(), closed);
    }
}
