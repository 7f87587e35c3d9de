//! The acker of a RabbitMQ delivery: settles it once on the channel it came from, keeps
//! that channel open until then, and records the settlement (or the loss) where the
//! delivery is tracked: a consumer's in flight, a get's channel count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Channel;

use super::connection::Link;
use super::convert::from_basic_properties;
use super::error::map_error;
use super::gets::Unsettled;
use super::returns::{Identity, Returns};
use crate::data::HeaderValue;
use crate::transport::{Acker, ClosedPart, Delivery, LostInFlight, TransportError};

/// The header in which a quorum queue counts a message's deliveries.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Settles one delivery on the channel it came from.
#[derive(Debug)]
struct RabbitAcker {
    acker: lapin::Acker,
    settled: AtomicBool,
    /// Keeps the channel open while the delivery is unsettled; let go once it is settled, so
    /// that a channel nothing else uses closes with its last settlement.
    channel: Mutex<Option<Arc<Channel>>>,
    /// The connection of the channel.
    link: Arc<Link>,
    /// Where a consumer's delivery is recorded in flight; `None` for a `basic.get`'s.
    tracked: Option<Tracked>,
    /// The count of its channel's unsettled deliveries, for a `basic.get`'s.
    unsettled: Option<Arc<Unsettled>>,
}

/// A consumer's delivery in the transport's [`Returns`].
#[derive(Debug)]
struct Tracked {
    returns: Arc<Returns>,
    number: u64,
    /// The broker took it back at a channel's loss before: this is its redelivery.
    returned: Option<LostInFlight>,
}

impl Tracked {
    fn settled(&self) {
        self.returns.settled(self.number);
    }

    fn lost(&self) {
        self.returns.lost(self.number);
    }
}

enum Settle {
    Ack,
    Nack(bool),
    Reject(bool),
}

impl RabbitAcker {
    async fn settle(&self, how: Settle) -> Result<(), TransportError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Err(TransportError::AlreadySettled);
        }
        let result = match how {
            Settle::Ack => self.link.guard(self.acker.ack(BasicAckOptions::default())).await,
            Settle::Nack(requeue) => {
                let options = BasicNackOptions { requeue, multiple: false };
                self.link.guard(self.acker.nack(options)).await
            }
            Settle::Reject(requeue) => {
                self.link.guard(self.acker.reject(BasicRejectOptions { requeue })).await
            }
        };
        self.let_go();
        if let Some(tracked) = &self.tracked {
            match result {
                Ok(true) => tracked.settled(),
                Ok(false) | Err(_) => tracked.lost(),
            }
        }
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(TransportError::Closed {
                what: ClosedPart::Channel,
                reason: "the delivery's channel is closed; the broker requeued the message".into(),
            }),
            Err(error) => Err(TransportError::Closed {
                what: ClosedPart::Channel,
                reason: format!(
                    "the delivery's channel failed ({}); the broker requeues the message",
                    map_error(&error)
                ),
            }),
        }
    }

    /// Its channel or connection is gone (the broker took the delivery back), or it was
    /// settled.
    fn gone(&self) -> bool {
        !self.acker.usable() || !self.link.alive()
    }

    /// Once the settlement is sent (or failed): the channel is no longer kept open for this
    /// delivery, and a get may run on it again.
    fn let_go(&self) {
        drop(self.channel.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(unsettled) = &self.unsettled {
            unsettled.settled();
        }
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(Settle::Ack).await
    }

    async fn nack(&self, requeue: bool) -> Result<(), TransportError> {
        self.settle(Settle::Nack(requeue)).await
    }

    async fn reject(&self, requeue: bool) -> Result<(), TransportError> {
        self.settle(Settle::Reject(requeue)).await
    }

    fn lost_in_flight(&self) -> Option<LostInFlight> {
        self.tracked.as_ref().and_then(|tracked| tracked.returned)
    }

    fn channel_lost(&self) -> bool {
        !self.settled.load(Ordering::SeqCst) && self.gone()
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if self.settled.load(Ordering::SeqCst) {
            return;
        }
        if self.gone() {
            // Its channel is gone: the broker took it back.
            if let Some(tracked) = &self.tracked {
                tracked.lost();
            }
            self.let_go();
            return;
        }
        // Handed back unsettled, as a crashed handling would: its redelivery counts.
        if let Some(tracked) = &self.tracked {
            tracked.settled();
        }
        // Without a runtime nothing is sent: the delivery stays unsettled on its channel, which
        // no get uses again (its count keeps it) and whose closing requeues it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let channel = self.channel.get_mut().unwrap_or_else(PoisonError::into_inner).take();
            let (acker, link, unsettled) =
                (self.acker.clone(), self.link.clone(), self.unsettled.take());
            runtime.spawn(async move {
                // A reject, not a nack: RabbitMQ 4.3 and later count a quorum queue's
                // redelivery (`x-delivery-count`, which the crash-loop guard reads) after a
                // `basic.reject`, and not after a `basic.nack`; earlier versions count both.
                let _ = link.guard(acker.reject(BasicRejectOptions { requeue: true })).await;
                drop(channel);
                if let Some(unsettled) = unsettled {
                    unsettled.settled();
                }
            });
        }
    }
}

/// Where a delivery comes from.
pub(super) enum Origin<'a> {
    /// A consumer of `queue`: the delivery is recorded in flight in `returns`.
    Consumer { returns: &'a Arc<Returns>, queue: &'a str },
    /// A `basic.get`: the delivery joins its channel's count of unsettled ones.
    Get(&'a Arc<Unsettled>),
}

/// Convert a lapin delivery; its acker keeps `channel` open until settled.
pub(super) fn to_delivery(
    delivery: lapin::message::Delivery,
    channel: &Arc<Channel>,
    link: &Arc<Link>,
    origin: Origin<'_>,
) -> Delivery {
    let body = Bytes::from(delivery.data);
    let properties = from_basic_properties(&delivery.properties);
    let (tracked, unsettled) = match origin {
        Origin::Consumer { returns, queue } => {
            let ids = [&properties.message_id, &properties.correlation_id].map(Option::as_deref);
            let (exchange, key) = (delivery.exchange.as_str(), delivery.routing_key.as_str());
            let identity = Identity::new(queue, exchange, key, ids);
            let on = (link.generation, channel.id());
            let count = properties.headers.get(DELIVERY_COUNT).and_then(HeaderValue::as_i64);
            let how = (delivery.redelivered, count.unwrap_or(0));
            let (number, returned) = returns.received((on, queue), identity, &body, how);
            (Some(Tracked { returns: returns.clone(), number, returned }), None)
        }
        Origin::Get(unsettled) => {
            unsettled.fetched();
            (None, Some(unsettled.clone()))
        }
    };
    Delivery {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        redelivered: delivery.redelivered,
        properties,
        body,
        acker: Box::new(RabbitAcker {
            acker: delivery.acker,
            settled: AtomicBool::new(false),
            channel: Mutex::new(Some(channel.clone())),
            link: link.clone(),
            tracked,
            unsettled,
        }),
    }
}
