//! Replying to an RPC request, then acking it: what every RPC server does once a request's
//! outcome is known, whatever its wire format.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::data::{json_properties, Failure, Handled, Message};
use crate::pipeline::RouteHandle;
use crate::transport::limits::check_size;
use crate::transport::{Acker, OutgoingMessage, PublishOptions, TransportError};

/// How long a request whose reply could not be sent waits before going back to its queue.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// What to reply for how the route handled a request. RPC replies at once: a broker-side
/// retry (`AsyncBackOff`) is not scheduled, its failure is replied.
pub(crate) fn handled_outcome(handled: &Handled) -> Result<Value, &Failure> {
    match handled {
        Handled::Succeeded(value) => Ok(value.clone()),
        Handled::CalledBack(failure)
        | Handled::Failed(failure)
        | Handled::Retry { failure, .. } => Err(failure),
    }
}

/// `body` if it is within `MAX_MESSAGE_SIZE`; else the error reply `too_large` makes from
/// the reason.
pub(crate) fn within_size_limit(
    route: &RouteHandle,
    body: Bytes,
    too_large: impl FnOnce(String) -> Bytes,
) -> Bytes {
    let max_size = route.config().max_message_size;
    match check_size("RPC reply", body.len(), max_size) {
        Ok(()) => body,
        Err(refused) => {
            tracing::warn!(route = route.name(), "{refused}: replying an error instead");
            too_large(format!(
                "result of {} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)",
                body.len()
            ))
        }
    }
}

/// Publish `body` (confirmed) to `exchange` with the request's `reply_to` as routing key and
/// its correlation id, then ack the request. A request without `reply_to` is acked without a
/// reply. A reply that fails for good is not sent (the request is acked: requeued, it would
/// come back for ever); one that may succeed later sends the request back to its queue after
/// a pause.
pub(crate) async fn reply_then_ack(
    route: &RouteHandle,
    request: &Message,
    acker: Box<dyn Acker>,
    exchange: &str,
    body: Bytes,
) {
    let settled = match reply(route, request, exchange, body).await {
        Ok(()) => acker.ack().await,
        Err(error) if error.is_permanent() => {
            tracing::error!(
                route = route.name(),
                "cannot reply to an RPC request ({error}); acked without a reply"
            );
            acker.ack().await
        }
        Err(error) => {
            tracing::error!(
                route = route.name(),
                "cannot reply to an RPC request ({error}); it goes back to the queue"
            );
            tokio::time::sleep(REQUEUE_PAUSE).await;
            acker.nack(true).await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(route = route.name(), "cannot settle an RPC request ({error})");
    }
}

async fn reply(
    route: &RouteHandle,
    request: &Message,
    exchange: &str,
    body: Bytes,
) -> Result<(), TransportError> {
    let Some(reply_to) = request.properties.reply_to.as_deref() else {
        tracing::info!(
            route = route.name(),
            "RPC request {} without reply_to: handled, no reply sent",
            request.routing_key
        );
        return Ok(());
    };
    let mut properties = json_properties();
    properties.correlation_id = request.properties.correlation_id.clone();
    let message = OutgoingMessage { body, properties };
    route.transport().publish(exchange, reply_to, message, PublishOptions::default()).await
}
