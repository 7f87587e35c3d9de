//! Publishing with pipelined publisher confirms.
//!
//! Every publish sends on a shared confirm channel and awaits its own confirm; no lock is
//! held while waiting, so concurrent publishes are in flight together. Mandatory publishes
//! have a channel of their own, whose dispatcher tells each its own routing
//! ([`MandatoryChannel`]). A publish whose confirm is lost with the connection is sent again
//! once reconnected (at-least-once). RabbitMQ closes a channel on some publishes (to an
//! unknown exchange, say), which fails every publish in flight on it: each is sent once more
//! on a channel of its own, so only the one at fault fails.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::time::Instant;

use super::channels::{open_channel, ChannelSlot, Held};
use super::connection::Shared;
use super::convert::{short, to_basic_properties};
use super::error::{is_fatal, is_soft, map_error};
use super::mandatory::{publish_key, MandatoryChannel, Outcome, Sending, Tracked};
use crate::clock::deadline_after;
use crate::transport::limits::check_headers;
use crate::transport::{OutgoingMessage, PublishOptions, TransportError};

/// Publish `message` and wait for the broker's confirm, retrying across reconnects until the
/// publish timeout.
pub(crate) async fn publish(
    shared: &Shared,
    slot: &ChannelSlot,
    mandatory: &MandatoryChannel,
    exchange: &str,
    routing_key: &str,
    message: &OutgoingMessage,
    options: PublishOptions,
) -> Result<(), TransportError> {
    let publish = Publish { shared, exchange, routing_key, message, mandatory: options.mandatory };
    if options.mandatory {
        let key = publish_key(exchange, routing_key, message);
        publish.with_retries(Route::Mandatory(mandatory, key)).await
    } else {
        publish.with_retries(Route::Shared(slot)).await
    }
}

/// The channel a publish goes on first.
enum Route<'a> {
    /// The shared confirm channel, pipelined with the other publishes.
    Shared(&'a ChannelSlot),
    /// The mandatory publishes' channel, pipelined with the others, and the publish's key.
    Mandatory(&'a MandatoryChannel, u64),
}

/// A channel taken from a route.
enum Taken<'a> {
    Shared(&'a ChannelSlot, Held),
    Mandatory(&'a MandatoryChannel, Tracked, u64),
}

impl<'a> Route<'a> {
    async fn take(
        &self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Taken<'a>, TransportError> {
        Ok(match *self {
            Route::Shared(slot) => {
                Taken::Shared(slot, slot.get(shared, min_generation, deadline).await?)
            }
            Route::Mandatory(channel, key) => {
                Taken::Mandatory(channel, channel.get(shared, min_generation, deadline).await?, key)
            }
        })
    }
}

impl Taken<'_> {
    fn held(&self) -> &Held {
        match self {
            Taken::Shared(_, held) => held,
            Taken::Mandatory(_, tracked, _) => tracked.held(),
        }
    }

    /// Replace this channel for the next publishes.
    async fn invalidate(&self) {
        match self {
            Taken::Shared(slot, held) => slot.invalidate(held).await,
            Taken::Mandatory(channel, tracked, _) => channel.invalidate(tracked).await,
        }
    }
}

/// One message to publish.
struct Publish<'a> {
    shared: &'a Shared,
    exchange: &'a str,
    routing_key: &'a str,
    message: &'a OutgoingMessage,
    mandatory: bool,
}

/// How one attempt ended: with the publish's result, or with an error of its channel.
enum Attempt {
    Done(Result<(), TransportError>),
    ChannelFailed(lapin::Error),
}

/// What lapin takes by value for a publish.
type Parts = (ShortString, ShortString, BasicProperties);

impl Publish<'_> {
    /// What lapin takes by value, made for each attempt and moved into it (most publishes
    /// make one attempt): cheaper than a copy kept for retries.
    fn parts(&self, held: &Held) -> Result<Parts, TransportError> {
        let properties = to_basic_properties(&self.message.properties)?;
        let exchange = short(self.exchange, "exchange name")?;
        let routing_key = short(self.routing_key, "routing key")?;
        // RabbitMQ closes the whole connection on a content header bigger than a frame.
        // A negotiated frame_max of 0 means no limit.
        let frame_max = match held.link.connection.configuration().frame_max() {
            0 => usize::MAX,
            size => usize::try_from(size).unwrap_or(usize::MAX),
        };
        check_headers(&self.message.properties, frame_max)?;
        Ok((exchange, routing_key, properties))
    }

    fn options(&self) -> BasicPublishOptions {
        BasicPublishOptions { mandatory: self.mandatory, immediate: false }
    }

    /// Send on `channel` of `held`'s link and await the confirm, by `deadline`.
    async fn attempt(&self, held: &Held, channel: Arc<Channel>, deadline: Instant) -> Attempt {
        let (exchange, key, properties) = match self.parts(held) {
            Ok(parts) => parts,
            Err(error) => return Attempt::Done(Err(error)),
        };
        let (options, body) = (self.options(), &self.message.body);
        let publish = async move {
            channel.basic_publish(exchange, key, options, body, properties).await?.await
        };
        let outcome = tokio::time::timeout_at(deadline, held.link.guard(publish)).await;
        match outcome {
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Attempt::Done(Ok(())),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Attempt::Done(Err(self.unroutable())),
            Ok(Ok(Confirmation::Nack(_))) => Attempt::Done(Err(TransportError::Nacked)),
            Ok(Err(error)) => Attempt::ChannelFailed(error),
            Err(_) => Attempt::Done(Err(self.not_confirmed(held))),
        }
    }

    /// Hand the publish to the dispatcher of the mandatory publishes' channel, which tells it
    /// its own routing, by `deadline`.
    async fn tracked_attempt(&self, tracked: &Tracked, key: u64, deadline: Instant) -> Attempt {
        let (exchange, routing_key, properties) = match self.parts(tracked.held()) {
            Ok(parts) => parts,
            Err(error) => return Attempt::Done(Err(error)),
        };
        let (options, body) = (self.options(), self.message.body.clone());
        let channel = tracked.held().channel.clone();
        let sending: Sending = Box::pin(async move {
            channel.basic_publish(exchange, routing_key, options, &body, properties).await
        });
        match tracked.publish(key, sending, deadline).await {
            Ok(Ok(Outcome::Routed)) => Attempt::Done(Ok(())),
            Ok(Ok(Outcome::Unroutable)) => Attempt::Done(Err(self.unroutable())),
            Ok(Ok(Outcome::Nacked)) => Attempt::Done(Err(TransportError::Nacked)),
            Ok(Err(error)) => Attempt::ChannelFailed(error),
            Err(_) => Attempt::Done(Err(self.not_confirmed(tracked.held()))),
        }
    }

    /// On `route`'s channel, pipelined with the other publishes.
    async fn with_retries(&self, route: Route<'_>) -> Result<(), TransportError> {
        let shared = self.shared;
        let deadline = deadline_after(shared.options.publish_timeout);
        let mut min_generation = 0;
        let mut channel_failed = false;
        let mut closed_by_broker = false;
        loop {
            let taken = route.take(shared, min_generation, deadline).await?;
            let held = taken.held().clone();
            let attempt = if channel_failed {
                // The channel was closed under this publish, by it (e.g. an unknown exchange)
                // or by another one in flight on it. The one retry goes on a channel of its
                // own: a publish that breaks its channel again breaks no other, and a returned
                // message there is its own.
                // Boxed: rare, and its future would otherwise weigh on every publish's.
                Box::pin(self.on_a_channel_of_its_own(&held, deadline)).await
            } else {
                match &taken {
                    Taken::Shared(_, held) => {
                        self.attempt(held, held.channel.clone(), deadline).await
                    }
                    Taken::Mandatory(_, tracked, key) => {
                        self.tracked_attempt(tracked, *key, deadline).await
                    }
                }
            };
            let error = match attempt {
                Attempt::Done(result) => return result,
                Attempt::ChannelFailed(error) => error,
            };
            if !channel_failed {
                taken.invalidate().await;
            }
            if held.link.alive() {
                if channel_failed {
                    return Err(map_error(&error));
                }
                channel_failed = true;
            } else if is_soft(&error) || (is_fatal(&error) && closed_by_broker) {
                shared.kick();
                return Err(map_error(&error));
            } else {
                // A connection the broker closed with a hard error is seldom this publish's
                // doing: every operation in flight gets the error of the one at fault (say,
                // a declaration of an unknown exchange type). Its confirm was lost: sent
                // again as after any loss, once, so a publish at fault fails the next time.
                closed_by_broker |= is_fatal(&error);
                shared.kick();
                min_generation = held.link.generation + 1;
            }
        }
    }

    async fn on_a_channel_of_its_own(&self, held: &Held, deadline: Instant) -> Attempt {
        let opened = held.link.guard(open_channel(&held.link, true));
        let channel = match tokio::time::timeout_at(deadline, opened).await {
            Ok(Ok(channel)) => Arc::new(channel),
            Ok(Err(error)) => return Attempt::ChannelFailed(error),
            Err(_) => return Attempt::Done(Err(self.not_confirmed(held))),
        };
        let attempt = self.attempt(held, channel.clone(), deadline).await;
        if channel.status().connected() {
            // bounded as the publish is: a connection gone silent answers no close either
            let closing = held.link.guard(channel.close(200, "publish retried".into()));
            let _ = tokio::time::timeout_at(deadline, closing).await;
        }
        attempt
    }

    fn unroutable(&self) -> TransportError {
        TransportError::Unroutable {
            exchange: self.exchange.to_owned(),
            routing_key: self.routing_key.to_owned(),
        }
    }

    /// The timeout of a publish sent on `held`'s link. A broker that blocks the connection
    /// (`connection.blocked`: a resource alarm) is named: it is why no confirm came.
    fn not_confirmed(&self, held: &Held) -> TransportError {
        let (broker, limit) = (self.shared.nodes.masked(), self.shared.options.publish_timeout);
        let mut text = format!("publish to {broker} not confirmed within {limit:?}");
        if held.link.connection.status().blocked() {
            text.push_str(
                ": the broker blocks publishing on this connection (connection.blocked, a \
                 resource alarm: low on memory or disk space); the message may still go out \
                 once the alarm ends",
            );
        }
        TransportError::TimedOut(text)
    }
}
