//! Publishing with pipelined publisher confirms.
//!
//! Every publish sends on the shared confirm channel and awaits its own confirm; no lock is
//! held while waiting, so concurrent publishes are in flight together. A publish whose
//! confirm is lost with the connection is sent again once reconnected (at-least-once).

use lapin::options::BasicPublishOptions;
use lapin::Confirmation;
use tokio::time::Instant;

use super::channels::ChannelSlot;
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
    let exchange_name = short(exchange, "exchange name")?;
    let key = short(routing_key, "routing key")?;
    let properties = to_basic_properties(&message.properties)?;
    let publish_options = BasicPublishOptions { mandatory: options.mandatory, immediate: false };
    let deadline = Instant::now() + shared.options.publish_timeout;
    let mut min_generation = 0;
    let mut channel_failures = 0;
    loop {
        let held = slot.get(shared, min_generation, deadline).await?;
        // RabbitMQ closes the whole connection on a content header bigger than a frame.
        // A negotiated frame_max of 0 means no limit.
        let frame_max = match held.link.connection.configuration().frame_max() {
            0 => usize::MAX,
            size => usize::try_from(size).unwrap_or(usize::MAX),
        };
        check_header_size(&message.properties, frame_max)?;
        let attempt = async {
            held.channel
                .basic_publish(
                    exchange_name.clone(),
                    key.clone(),
                    publish_options,
                    &message.body,
                    properties.clone(),
                )
                .await?
                .await
        };
        let error = match tokio::time::timeout_at(deadline, held.link.guard(attempt)).await {
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
                    shared.uri.masked, shared.options.publish_timeout
                )))
            }
        };
        slot.invalidate(&held).await;
        if held.link.alive() {
            // The channel was closed: by this publish (e.g. unknown exchange) or by another one
            // in flight on the same channel. One retry on a fresh channel tells them apart.
            channel_failures += 1;
            if channel_failures > 1 {
                return Err(map_error(&error));
            }
        } else if is_soft(&error) || is_fatal(&error) {
            shared.kick();
            return Err(map_error(&error));
        } else {
            shared.kick();
            min_generation = held.link.generation + 1;
        }
    }
}
