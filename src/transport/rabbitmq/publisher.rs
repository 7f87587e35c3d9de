//! Publishing with pipelined publisher confirms.
//!
//! Every publish sends on the shared confirm channel and awaits its own confirm; no lock is
//! held while waiting, so concurrent publishes are in flight together. A publish whose
//! confirm is lost with the connection is sent again once reconnected (at-least-once). RabbitMQ
//! closes a channel on some publishes (to an unknown exchange, say), which fails every publish
//! in flight on it: each is sent once more on a channel of its own, so only the one at fault
//! fails.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};
use tokio::time::Instant;

use super::channels::{open_channel, ChannelSlot};
use super::connection::Shared;
use super::convert::{short, to_basic_properties};
use super::error::{is_fatal, is_soft, map_error};
use crate::transport::limits::check_header_size;
use crate::transport::{OutgoingMessage, PublishOptions, TransportError};

/// Publish `message` and wait for the broker's confirm, retrying across reconnects until the
/// publish timeout.
pub(crate) async fn publish(
    shared: &Shared,
    slot: &ChannelSlot,
    exchange: &str,
    routing_key: &str,
    message: &OutgoingMessage,
    options: PublishOptions,
) -> Result<(), TransportError> {
    // What lapin takes by value, made for each attempt and moved into it (most publishes
    // make one attempt): cheaper than a copy kept for retries.
    let parts = || -> Result<_, TransportError> {
        let properties = to_basic_properties(&message.properties)?;
        Ok((short(exchange, "exchange name")?, short(routing_key, "routing key")?, properties))
    };
    let publish_options = BasicPublishOptions { mandatory: options.mandatory, immediate: false };
    let deadline = Instant::now() + shared.options.publish_timeout;
    let mut min_generation = 0;
    let mut channel_failed = false;
    loop {
        let (exchange_name, key, properties) = parts()?;
        let held = slot.get(shared, min_generation, deadline).await?;
        // RabbitMQ closes the whole connection on a content header bigger than a frame.
        // A negotiated frame_max of 0 means no limit.
        let frame_max = match held.link.connection.configuration().frame_max() {
            0 => usize::MAX,
            size => usize::try_from(size).unwrap_or(usize::MAX),
        };
        check_header_size(&message.properties, frame_max)?;
        let publish = move |channel: Arc<Channel>| async move {
            channel
                .basic_publish(exchange_name, key, publish_options, &message.body, properties)
                .await?
                .await
        };
        let outcome = if channel_failed {
            // The shared channel was closed under this publish, by it (e.g. an unknown
            // exchange) or by another one in flight on it. The one retry goes on a channel of
            // its own: a publish that breaks its channel again breaks no other.
            let own = async {
                let channel = Arc::new(open_channel(&held.link, true).await?);
                let confirmed = publish(channel.clone()).await;
                if channel.status().connected() {
                    let _ = channel.close(200, "publish retried".into()).await;
                }
                confirmed
            };
            // boxed: rare, and its future would otherwise weigh on every publish's
            Box::pin(tokio::time::timeout_at(deadline, held.link.guard(own))).await
        } else {
            tokio::time::timeout_at(deadline, held.link.guard(publish(held.channel.clone()))).await
        };
        let error = match outcome {
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => {
                return Err(TransportError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                })
            }
            Ok(Ok(Confirmation::Nack(_))) => return Err(TransportError::Nacked),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(TransportError::TimedOut(format!(
                    "publish to {} not confirmed within {:?}",
                    shared.nodes.masked(),
                    shared.options.publish_timeout
                )))
            }
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
