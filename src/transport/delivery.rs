//! What a consumer receives: [`Delivery`], settled with its [`Acker`], from a [`Consumer`]
//! stream.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::TransportError;
use crate::data::{Message, Properties};

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

    /// `Some` when this delivery is the redelivery of one the broker took back because its
    /// channel or connection was lost while it was in flight: a redelivery no handling of
    /// the message caused. `None` otherwise, and from transports that cannot tell (the
    /// default).
    fn lost_in_flight(&self) -> Option<LostInFlight> {
        None
    }

    /// True once this unsettled delivery's channel or connection is known lost: the broker
    /// took the message back (it delivers it again, marked redelivered), and settling it can
    /// only fail. False from transports that cannot tell (the default).
    fn channel_lost(&self) -> bool {
        false
    }
}

/// What a transport knows of a delivery the broker took back when its channel or connection
/// was lost, and delivered again ([`Acker::lost_in_flight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostInFlight {
    /// The queue's count of the message's deliveries (a quorum queue's `x-delivery-count`,
    /// 0 when absent) on the delivery that was lost. The broker may count the loss on the
    /// redelivery (RabbitMQ 3.10 does); this is the count without it.
    pub delivery_count_before: i64,
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
    /// ends: poll it to its end. (On RabbitMQ the broker is told when the stream is next
    /// polled, or dropped; until then it goes on delivering up to the prefetch.)
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
