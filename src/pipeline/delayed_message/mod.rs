//! Broker retries laid out as the Python original's `AsyncBackOff` lays them out on the
//! `rabbitmq_delayed_message_exchange` plugin (`RETRY_DELAY=delayed_message_plugin`), so that
//! Python and Rust instances of a service run each other's retries:
//!
//! | what | layout |
//! |---|---|
//! | exchange | `{service}_backoff`, type `x-delayed-message`, `x-delayed-type: direct`, durable |
//! | routing key | `{route}_backoff`, header `x-delay` (ms) |
//! | queue | `{service}.{route}_backoff_queue`, durable, bound with `{route}_backoff` |
//! | body | `{"fn_args": [payload], "fn_kwargs": {}, "_meta": {"backoff": {"retry_count", "last_retry"}}}` |
//!
//! A route with broker retries consumes its backoff queue beside its own queue; each retry
//! there is unwrapped back to its payload, `_meta.backoff` giving its retry state.

mod envelope;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub(crate) use envelope::RetryMeta;

use crate::config::{QueueType, RetryDelay};
use crate::data::{HeaderValue, Headers, Message, Properties};
use crate::data::{HEADER_LAST_RETRY, HEADER_RETRY_COUNT};
use crate::pipeline::retry::RetryMode;
use crate::pipeline::RouteHandle;
use crate::transport::{
    BindingSpec, Delivery, ExchangeKind, ExchangeSpec, OutgoingMessage, QueueSpec, TransportError,
};

/// The header the plugin reads the delay from, in milliseconds.
const DELAY_HEADER: &str = "x-delay";

/// The longest delay the plugin holds a message (2^32-1 ms, its timers' reach, 49.7 days):
/// it routes a message with a longer `x-delay` at once.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(4_294_967_295);

/// Whether `route`'s retries take this layout: broker retries under
/// `RETRY_DELAY=delayed_message_plugin`.
fn in_use(route: &RouteHandle) -> bool {
    let broker_retries = route.backoff().is_some_and(|policy| policy.mode == RetryMode::Broker);
    broker_retries && route.config().retry_delay == RetryDelay::DelayedMessagePlugin
}

/// The exchange of a service's retries, `{service}_backoff`.
pub(crate) fn exchange(route: &RouteHandle) -> ExchangeSpec {
    ExchangeSpec {
        name: format!("{}_backoff", route.service_name()),
        kind: ExchangeKind::Custom("x-delayed-message".into()),
        durable: true,
        auto_delete: false,
        arguments: Headers::from([("x-delayed-type".to_owned(), HeaderValue::from("direct"))]),
    }
}

/// The routing key of a route's retries, `{route}_backoff`.
pub(crate) fn routing_key(route: &RouteHandle) -> String {
    format!("{}_backoff", route.name())
}

/// The queue of a route's retries, `{service}.{route}_backoff_queue`, when it has one.
pub(crate) fn backoff_queue(route: &RouteHandle) -> Option<String> {
    in_use(route).then(|| format!("{}.{}_queue", route.service_name(), routing_key(route)))
}

/// Whether a route's backoff queue is a quorum queue (as `QUEUE_TYPE` says).
pub(crate) fn backoff_queue_is_quorum(route: &RouteHandle) -> bool {
    route.config().queue_type == QueueType::Quorum
}

/// Declare the exchange, the backoff queue and its binding (idempotent).
pub(crate) async fn declare(route: &RouteHandle) -> Result<(), TransportError> {
    let Some(name) = backoff_queue(route) else { return Ok(()) };
    let exchange = exchange(route);
    let transport = route.transport();
    transport.declare_exchange(&exchange).await?;
    let mut queue = QueueSpec::durable(name);
    if backoff_queue_is_quorum(route) {
        queue.arguments.insert("x-queue-type".into(), HeaderValue::from("quorum"));
    }
    transport.declare_queue(&queue).await?;
    let binding = BindingSpec {
        queue: queue.name,
        exchange: exchange.name,
        routing_key: routing_key(route),
        arguments: Headers::new(),
    };
    transport.bind_queue(&binding).await
}

/// The retry copy of `message`: its payload wrapped with `meta` and the retry state
/// (`retry_count`, `now`), under `properties` with `x-delay` set. The error says why the
/// message cannot be wrapped (a body that is not JSON or text).
pub(crate) fn wrapped_copy(
    message: &Message,
    mut properties: Properties,
    meta: &RetryMeta,
    retry_count: u32,
    now: SystemTime,
    delay: Duration,
) -> Result<OutgoingMessage, String> {
    let payload = envelope::payload_of(message)
        .map_err(|reason| format!("this retry layout carries JSON payloads only: {reason}"))?;
    let body = envelope::wrap(&payload, meta, retry_count, now)?;
    let millis = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX).max(1);
    properties.headers.insert(DELAY_HEADER.into(), HeaderValue::Int(millis));
    properties.content_type = Some("application/json".into());
    properties.content_encoding = Some("utf-8".into());
    Ok(OutgoingMessage { body: Bytes::from(body), properties })
}

/// Turn a delivery of the backoff queue into the message the route handles: its body the
/// payload, its retry count and time those of `_meta.backoff` (which win over the `x-mf-*`
/// headers), without `x-delay`; returns the `_meta` for its next retry. A body that does not
/// fit the layout is left as it came, and the error says why.
pub(crate) fn unwrap(delivery: &mut Delivery) -> Result<RetryMeta, String> {
    let unwrapped = envelope::unwrap(&delivery.message())?;
    let properties = &mut delivery.properties;
    properties.content_type = Some("application/json".into());
    properties.content_encoding = Some("utf-8".into());
    let headers = &mut properties.headers;
    headers.remove(DELAY_HEADER);
    if let Some(retry_count) = unwrapped.retry_count {
        headers.insert(HEADER_RETRY_COUNT.into(), HeaderValue::Int(i64::from(retry_count)));
        match unwrapped.last_retry.and_then(|at| at.duration_since(UNIX_EPOCH).ok()) {
            Some(since) => {
                headers.insert(HEADER_LAST_RETRY.into(), HeaderValue::Timestamp(since.as_secs()));
            }
            None => {
                headers.remove(HEADER_LAST_RETRY);
            }
        }
    }
    delivery.body = Bytes::from(unwrapped.payload.get().to_owned());
    Ok(unwrapped.meta)
}
