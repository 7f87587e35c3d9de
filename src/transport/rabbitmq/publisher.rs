//! Publishing with pipelined publisher confirms.
//!
//! Every publish sends on the shared confirm channel and awaits its own confirm; no lock is
//! held while waiting, so concurrent publishes are in flight together. A publish whose
//! confirm is lost with the connection is sent again once reconnected (at-least-once). RabbitMQ
//! closes a channel on some publishes (to an unknown exchange, say), which fails every publish
//! in flight on it: each is sent once more on a channel of its own, so only the one at fault
//! fails. Mandatory publishes go on channels of their own, one in flight on each
//! ([`MandatoryChannels`]), so that a returned message is told to its own publish.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};
use tokio::time::Instant;

use super::channels::{open_channel, ChannelSlot, Held};
use super::connection::Shared;
use super::convert::{short, to_basic_properties};
use super::error::{is_fatal, is_soft, map_error};
use super::mandatory::MandatoryChannels;
use crate::transport::limits::check_header_size;
use crate::transport::{OutgoingMessage, PublishOptions, TransportError};

/// Publish `message` and wait for the broker's confirm, retrying across reconnects until the
/// publish timeout.
pub(crate) async fn publish(
    shared: &Shared,
    slot: &ChannelSlot,
    mandatory: &MandatoryChannels,
    exchange: &str,
    routing_key: &str,
    message: &OutgoingMessage,
    options: PublishOptions,
) -> Result<(), TransportError> {
    let publish = Publish { shared, exchange, routing_key, message, mandatory: options.mandatory };
    if options.mandatory {
        publish.on_own_channels(mandatory).await
    } else {
        publish.on_shared_channel(slot).await
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

impl Publish<'_> {
    /// Send on `channel` of `held`'s link and await the confirm, by `deadline`.
    async fn attempt(&self, held: &Held, channel: Arc<Channel>, deadline: Instant) -> Attempt {
        // What lapin takes by value, made for each attempt and moved into it (most publishes
        // make one attempt): cheaper than a copy kept for retries.
        let parts = || -> Result<_, TransportError> {
            let properties = to_basic_properties(&self.message.properties)?;
            let exchange = short(self.exchange, "exchange name")?;
            Ok((exchange, short(self.routing_key, "routing key")?, properties))
        };
        let (exchange, key, properties) = match parts() {
            Ok(parts) => parts,
            Err(error) => return Attempt::Done(Err(error)),
        };
        // RabbitMQ closes the whole connection on a content header bigger than a frame.
        // A negotiated frame_max of 0 means no limit.
        let frame_max = match held.link.connection.configuration().frame_max() {
            0 => usize::MAX,
            size => usize::try_from(size).unwrap_or(usize::MAX),
        };
        if let Err(error) = check_header_size(&self.message.properties, frame_max) {
            return Attempt::Done(Err(error));
        }
        let options = BasicPublishOptions { mandatory: self.mandatory, immediate: false };
        let body = &self.message.body;
        let publish = async move {
            channel.basic_publish(exchange, key, options, body, properties).await?.await
        };
        let outcome = tokio::time::timeout_at(deadline, held.link.guard(publish)).await;
        match outcome {
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Attempt::Done(Ok(())),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Attempt::Done(Err(TransportError::Unroutable {
                exchange: self.exchange.to_owned(),
                routing_key: self.routing_key.to_owned(),
            })),
            Ok(Ok(Confirmation::Nack(_))) => Attempt::Done(Err(TransportError::Nacked)),
            Ok(Err(error)) => Attempt::ChannelFailed(error),
            Err(_) => Attempt::Done(Err(self.not_confirmed())),
        }
    }

    /// On a channel with no other publish in flight, so that a returned message is this
    /// publish's.
    async fn on_own_channels(&self, channels: &MandatoryChannels) -> Result<(), TransportError> {
        let shared = self.shared;
        let deadline = Instant::now() + shared.options.publish_timeout;
        let mut min_generation = 0;
        loop {
            let mut lease = channels.lease(shared, min_generation, deadline).await?;
            let held = lease.held().clone();
            let error = match self.attempt(&held, held.channel.clone(), deadline).await {
                Attempt::Done(result) => {
                    // a publish that timed out is still in flight: the lease keeps its
                    // channel out of use until its confirm comes
                    if !matches!(result, Err(TransportError::TimedOut(_))) {
                        lease.settled();
                    }
                    return result;
                }
                Attempt::ChannelFailed(error) => error,
            };
            lease.discard();
            if held.link.alive() {
                return Err(map_error(&error));
            }
            shared.kick();
            if is_soft(&error) || is_fatal(&error) {
                return Err(map_error(&error));
            }
            min_generation = held.link.generation + 1;
        }
    }

    /// On the shared confirm channel, pipelined with the other publishes.
    async fn on_shared_channel(&self, slot: &ChannelSlot) -> Result<(), TransportError> {
        let shared = self.shared;
        let deadline = Instant::now() + shared.options.publish_timeout;
        let mut min_generation = 0;
        let mut channel_failed = false;
        loop {
            let held = slot.get(shared, min_generation, deadline).await?;
            let attempt = if channel_failed {
                // The shared channel was closed under this publish, by it (e.g. an unknown
                // exchange) or by another one in flight on it. The one retry goes on a channel
                // of its own: a publish that breaks its channel again breaks no other.
                // Boxed: rare, and its future would otherwise weigh on every publish's.
                Box::pin(self.on_a_channel_of_its_own(&held, deadline)).await
            } else {
                self.attempt(&held, held.channel.clone(), deadline).await
            };
            let error = match attempt {
                Attempt::Done(result) => return result,
                Attempt::ChannelFailed(error) => error,
            };
            if !channel_failed {
                slot.invalidate(&held).await;
            }
            if held.link.alive() {
                if channel_failed {
                    return Err(map_error(&error));
                }
                channel_failed = true;
            } else if is_soft(&error) || is_fatal(&error) {
                shared.kick();
                return Err(map_error(&error));
            } else {
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
            Err(_) => return Attempt::Done(Err(self.not_confirmed())),
        };
        let attempt = self.attempt(held, channel.clone(), deadline).await;
        if channel.status().connected() {
            let _ = channel.close(200, "publish retried".into()).await;
        }
        attempt
    }

    fn not_confirmed(&self) -> TransportError {
        TransportError::TimedOut(format!(
            "publish to {} not confirmed within {:?}",
            self.shared.nodes.masked(),
            self.shared.options.publish_timeout
        ))
    }
}
