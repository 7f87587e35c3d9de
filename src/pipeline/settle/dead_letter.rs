//! A dead letter: a copy of a message nothing handled, published (confirmed) to
//! `{queue}.dlq` with the reason in `x-mf-*` headers.

use std::time::{SystemTime, UNIX_EPOCH};

use super::copy_properties;
use super::headers::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_ERROR_TYPE, HEADER_FAILED_AT,
    HEADER_HEADERS_DROPPED, HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE,
    HEADER_ORIGINAL_ROUTING_KEY, HEADER_ORIGINAL_USER_ID, HEADER_ROUTE,
};
use crate::clock;
use crate::data::{Failure, Message};
use crate::pipeline::retry::BackOffData;
use crate::pipeline::settle::HEADER_REDELIVERIES;
use crate::pipeline::RouteHandle;
use crate::transport::{
    HeaderValue, Headers, Limit, OutgoingMessage, PublishOptions, TransportError,
};

fn seconds_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Publish a copy of `message`, consumed from `from`, to `{queue}.dlq` with the failure in its
/// headers. When the original headers leave no room in a frame for the dead-letter headers,
/// the copy carries the dead-letter headers alone, and [`HEADER_HEADERS_DROPPED`] says what
/// was dropped.
pub(super) async fn dead_letter(
    route: &RouteHandle,
    queue: &str,
    from: &str,
    message: &Message,
    failure: &Failure,
) -> Result<(), TransportError> {
    let mut properties = copy_properties(&message.properties);
    // The crash count is that of the queue it came from: a route consuming the dead-letter
    // queue would take it for its own.
    properties.headers.remove(HEADER_REDELIVERIES);
    let reason = dead_letter_headers(route, from, message, failure);
    properties.headers.extend(reason.clone());
    let dlq = format!("{queue}.dlq");
    tracing::warn!(
        route = route.name(),
        "message dead-lettered to {dlq}: {} ({})",
        failure.full_message(),
        failure.kind
    );
    let declared = route.dead_letter_queue();
    if let Some(leased) = declared.filter(|dlq| dlq.arguments.contains_key("x-expires")) {
        route.transport().declare_queue(leased).await?;
    }
    let copy = OutgoingMessage { body: message.body.clone(), properties };
    let error = match publish_dead_letter(route, &dlq, copy).await {
        Err(TransportError::LimitReached { what: Limit::HeaderSize, size, limit, .. }) => {
            format!("{size} bytes, over the frame_max of {limit} bytes")
        }
        published => return published,
    };
    let dropped = format!(
        "{} original headers dropped: with the dead-letter headers they made {error}",
        message.properties.headers.len()
    );
    tracing::warn!(route = route.name(), "dead letter to {dlq}: {dropped}");
    let mut properties = copy_properties(&message.properties);
    properties.headers.retain(|name, _| name == HEADER_ORIGINAL_USER_ID);
    properties.headers.extend(reason);
    properties.headers.insert(HEADER_HEADERS_DROPPED.into(), dropped.into());
    let minimal = OutgoingMessage { body: message.body.clone(), properties };
    publish_dead_letter(route, &dlq, minimal).await
}

/// Publish `copy` to `dlq`, confirmed and mandatory. A dead-letter queue deleted while the
/// service runs (by hand, say) is declared again, and the copy published once more: without
/// it, every failure would go back to its queue and come again for ever.
async fn publish_dead_letter(
    route: &RouteHandle,
    dlq: &str,
    copy: OutgoingMessage,
) -> Result<(), TransportError> {
    let options = PublishOptions { mandatory: true };
    let declared = route.dead_letter_queue().filter(|declared| declared.name == dlq);
    match (route.transport().publish("", dlq, copy.clone(), options).await, declared) {
        (Err(TransportError::Unroutable { .. }), Some(declared)) => {
            tracing::warn!(
                route = route.name(),
                "dead-letter queue {dlq} was gone: declared again"
            );
            route.transport().declare_queue(declared).await?;
            route.transport().publish("", dlq, copy, options).await
        }
        (published, _) => published,
    }
}

/// The `x-mf-*` headers that say why and where from (`from`) a message was dead-lettered.
fn dead_letter_headers(
    route: &RouteHandle,
    from: &str,
    message: &Message,
    failure: &Failure,
) -> Headers {
    let mut headers = Headers::new();
    headers.insert(HEADER_ROUTE.into(), route.name().into());
    headers.insert(HEADER_ERROR_KIND.into(), failure.kind.as_str().into());
    headers.insert(HEADER_ERROR.into(), failure.full_message().into());
    if !failure.error_type.is_empty() {
        headers.insert(HEADER_ERROR_TYPE.into(), failure.error_type.clone().into());
    }
    headers.insert(
        HEADER_FAILED_AT.into(),
        HeaderValue::Timestamp(seconds_since_epoch(clock::wall_now())),
    );
    let retry_count = BackOffData::from_headers(&message.properties.headers, 0).retry_count;
    let attempts = retry_count.saturating_add(1);
    headers.insert(HEADER_ATTEMPTS.into(), HeaderValue::Int(i64::from(attempts)));
    headers.insert(HEADER_ORIGINAL_QUEUE.into(), from.into());
    headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), message.exchange.clone().into());
    headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), message.routing_key.clone().into());
    headers
}
