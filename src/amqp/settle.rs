//! Settling a delivery once its outcome is known: ack, or dead-letter then ack.
//!
//! Nothing is acked before its outcome is settled. A message that nothing handled is
//! published (confirmed) to `{queue}.dlq` with the reason in `x-mf-*` headers, then acked. If
//! that publish fails, the message is handed back to its queue after a pause (never lost,
//! never a hot loop).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::amqp::transport::{Delivery, HeaderValue, OutgoingMessage, PublishOptions};
use crate::failure::Failure;
use crate::message::Message;
use crate::workers::{Handled, RouteHandle};

/// Header: the route that failed.
pub const HEADER_ROUTE: &str = "x-mf-route";
/// Header: the failure kind (`bad_input`, `error`, `panic`, ...).
pub const HEADER_ERROR_KIND: &str = "x-mf-error-kind";
/// Header: the error message with its causes.
pub const HEADER_ERROR: &str = "x-mf-error";
/// Header: the Rust type of the error, when known.
pub const HEADER_ERROR_TYPE: &str = "x-mf-error-type";
/// Header: when the message was dead-lettered (seconds since the epoch).
pub const HEADER_FAILED_AT: &str = "x-mf-failed-at";
/// Header: the queue the message came from.
pub const HEADER_ORIGINAL_QUEUE: &str = "x-mf-original-queue";
/// Header: the exchange the message was published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-mf-original-exchange";
/// Header: the routing key the message was published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-mf-original-routing-key";

const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Settle `delivery` of `queue` according to `handled`.
pub(crate) async fn settle(
    route: &RouteHandle,
    queue: &str,
    delivery: Delivery,
    handled: &Handled,
) {
    let result = match handled {
        Handled::Succeeded(_) | Handled::CalledBack(_) => delivery.acker.ack().await,
        Handled::Failed(failure) => {
            let message = Message::from_delivery(&delivery);
            match dead_letter(route, queue, &message, failure).await {
                Ok(()) => delivery.acker.ack().await,
                Err(error) => {
                    tracing::error!(
                        route = route.name(),
                        "cannot dead-letter a failed message ({error}); it goes back to {queue}"
                    );
                    tokio::time::sleep(REQUEUE_PAUSE).await;
                    delivery.acker.nack(true).await
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::warn!(
            route = route.name(),
            "cannot settle a message ({error}); the broker will deliver it again"
        );
    }
}

/// Publish a copy of `message` to `{queue}.dlq` with the failure in its headers.
pub(crate) async fn dead_letter(
    route: &RouteHandle,
    queue: &str,
    message: &Message,
    failure: &Failure,
) -> Result<(), crate::amqp::transport::TransportError> {
    let mut properties = message.properties.clone();
    let headers = &mut properties.headers;
    headers.insert(HEADER_ROUTE.into(), route.name().into());
    headers.insert(HEADER_ERROR_KIND.into(), failure.kind.as_str().into());
    headers.insert(HEADER_ERROR.into(), failure.full_message().into());
    if !failure.error_type.is_empty() {
        headers.insert(HEADER_ERROR_TYPE.into(), failure.error_type.clone().into());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    headers.insert(HEADER_FAILED_AT.into(), HeaderValue::Timestamp(now));
    headers.insert(HEADER_ORIGINAL_QUEUE.into(), queue.into());
    headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), message.exchange.clone().into());
    headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), message.routing_key.clone().into());
    properties.expiration = None;
    let dlq = format!("{queue}.dlq");
    tracing::warn!(
        route = route.name(),
        "message dead-lettered to {dlq}: {} ({})",
        failure.full_message(),
        failure.kind
    );
    let copy = OutgoingMessage { body: message.body.clone(), properties };
    route.transport().publish("", &dlq, copy, PublishOptions { mandatory: true }).await
}
