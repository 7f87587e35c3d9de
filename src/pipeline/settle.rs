//! Settling a delivery once its outcome is known: ack, or dead-letter then ack.
//!
//! Nothing is acked before its outcome is settled. A message that nothing handled is
//! published (confirmed) to `{queue}.dlq` with the reason in `x-mf-*` headers, then acked. If
//! that publish fails, the message is handed back to its queue after a pause (never lost,
//! never a hot loop).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::RetryDelay;
use crate::data::Failure;
use crate::data::Handled;
use crate::data::Message;
use crate::error::{Error, Result};
use crate::pipeline::retry::RetryMode;
use crate::pipeline::retry::{
    BackOffData, HEADER_LAST_ERROR, HEADER_LAST_RETRY, HEADER_RETRY_COUNT,
};
use crate::pipeline::RouteHandle;
use crate::transport::{
    BindingSpec, Delivery, ExchangeKind, ExchangeSpec, HeaderValue, Headers, Limit,
    OutgoingMessage, Properties, PublishOptions, QueueSpec, TransportError,
};

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
/// Header: how many attempts were made (1 + retries).
pub const HEADER_ATTEMPTS: &str = "x-mf-attempts";
/// Header: the queue the message came from.
pub const HEADER_ORIGINAL_QUEUE: &str = "x-mf-original-queue";
/// Header: the exchange the message was published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-mf-original-exchange";
/// Header: the routing key the message was published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-mf-original-routing-key";

/// Header of a copy: the `user_id` property of the message copied (a copy cannot carry it:
/// RabbitMQ accepts it only from the user it names). Any publisher can set a header, so,
/// unlike the property, it proves nothing.
pub const HEADER_ORIGINAL_USER_ID: &str = "x-mf-original-user-id";
/// Header of a dead letter whose original headers did not fit in a frame beside the
/// dead-letter headers: how many were dropped, and how big they made the frame.
pub const HEADER_HEADERS_DROPPED: &str = "x-mf-headers-dropped";

const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Settle `delivery` of `queue` according to `handled`, and say how it ended: `handled`
/// itself, a dead letter where a retry copy could not be made, or `None` when the message
/// went back to its queue (its copy could not be published) and will come again.
pub(crate) async fn settle(
    route: &RouteHandle,
    queue: &str,
    delivery: Delivery,
    handled: &Handled,
) -> Option<Handled> {
    let (result, done) = match handled {
        Handled::Succeeded(_) | Handled::CalledBack(_) => {
            (delivery.acker.ack().await, Some(handled.clone()))
        }
        Handled::Failed(failure) => {
            let message = delivery.message();
            let published = dead_letter(route, queue, &message, failure).await;
            let done = published.is_ok().then(|| handled.clone());
            (ack_after(route, queue, delivery, published, "dead-letter").await, done)
        }
        Handled::Retry { failure, delay } => {
            let message = delivery.message();
            match schedule_retry(route, queue, &message, failure, *delay).await {
                Err(TransportError::LimitReached { what: Limit::HeaderSize, reason, .. }) => {
                    // A retry copy needs the original headers: without room for them, the
                    // message cannot come back as it was, so it is dead-lettered now.
                    let failure = Failure {
                        retryable: false,
                        causes: [failure.causes.clone(), vec![format!("not retried: {reason}")]]
                            .concat(),
                        ..failure.clone()
                    };
                    let published = dead_letter(route, queue, &message, &failure).await;
                    let done = published.is_ok().then_some(Handled::Failed(failure));
                    (ack_after(route, queue, delivery, published, "dead-letter").await, done)
                }
                published => {
                    let done = published.is_ok().then(|| handled.clone());
                    let what = "schedule the retry of";
                    (ack_after(route, queue, delivery, published, what).await, done)
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
    done
}

/// Ack once `published` succeeded; otherwise hand the message back after a pause.
async fn ack_after(
    route: &RouteHandle,
    queue: &str,
    delivery: Delivery,
    published: Result<(), TransportError>,
    what: &str,
) -> Result<(), TransportError> {
    match published {
        Ok(()) => delivery.acker.ack().await,
        Err(error) => {
            tracing::error!(
                route = route.name(),
                "cannot {what} a failed message ({error}); it goes back to {queue}"
            );
            tokio::time::sleep(REQUEUE_PAUSE).await;
            delivery.acker.nack(true).await
        }
    }
}

/// The `x-delayed-message` exchange of a service (`{service}_backoff`, as the Python
/// original names it).
fn delayed_exchange(route: &RouteHandle) -> ExchangeSpec {
    ExchangeSpec {
        name: format!("{}_backoff", route.service_name()),
        kind: ExchangeKind::Custom("x-delayed-message".into()),
        durable: true,
        auto_delete: false,
        arguments: Headers::from([("x-delayed-type".to_owned(), HeaderValue::from("direct"))]),
    }
}

/// Declare what broker-side retries of `queue` need at start-up: with
/// `RETRY_DELAY=delayed_message_plugin`, the `x-delayed-message` exchange and the queue's
/// binding to it (a clear error when the plugin is missing). Delay queues need nothing yet.
pub(crate) async fn declare_retry_topology(route: &RouteHandle, queue: &str) -> Result<()> {
    let broker_retries = route.backoff().is_some_and(|policy| policy.mode == RetryMode::Broker);
    if !broker_retries || route.config().retry_delay != RetryDelay::DelayedMessagePlugin {
        return Ok(());
    }
    let exchange = delayed_exchange(route);
    route.transport().declare_exchange(&exchange).await.map_err(|error| {
        Error::Startup(format!(
            "RETRY_DELAY=delayed_message_plugin needs the rabbitmq_delayed_message_exchange \
             plugin on the broker ({error}); use RETRY_DELAY=delay_queues on stock RabbitMQ"
        ))
    })?;
    let binding = BindingSpec {
        queue: queue.to_owned(),
        exchange: exchange.name,
        routing_key: queue.to_owned(),
        arguments: Headers::new(),
    };
    Ok(route.transport().bind_queue(&binding).await?)
}

/// Publish a copy of `message` to come back to `queue` after `delay`: through the delay
/// queue `{queue}.delay-{ms}`, whose per-queue TTL dead-letters it back (declared before each
/// use, which renews its `x-expires` lease, so an unused delay queue disappears by itself), or
/// through the `x-delayed-message` exchange with an `x-delay` header.
pub(crate) async fn schedule_retry(
    route: &RouteHandle,
    queue: &str,
    message: &Message,
    failure: &Failure,
    delay: Duration,
) -> Result<(), TransportError> {
    let millis = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX).max(1);
    let mut extra = Headers::new();
    let (exchange, routing_key) = match route.config().retry_delay {
        RetryDelay::DelayedMessagePlugin => {
            extra.insert("x-delay".to_owned(), HeaderValue::Int(millis));
            (delayed_exchange(route).name, queue.to_owned())
        }
        RetryDelay::DelayQueues => {
            let delay_queue = QueueSpec {
                arguments: Headers::from([
                    ("x-message-ttl".to_owned(), HeaderValue::Int(millis)),
                    ("x-dead-letter-exchange".to_owned(), HeaderValue::from("")),
                    ("x-dead-letter-routing-key".to_owned(), HeaderValue::from(queue)),
                    ("x-expires".to_owned(), HeaderValue::Int(millis.saturating_add(60_000))),
                ]),
                ..QueueSpec::durable(format!("{queue}.delay-{millis}"))
            };
            route.transport().declare_queue(&delay_queue).await?;
            (String::new(), delay_queue.name)
        }
    };
    let retry = BackOffData::from_headers(&message.properties.headers, 0);
    let mut properties = copy_properties(&message.properties);
    let headers = &mut properties.headers;
    headers.insert(HEADER_RETRY_COUNT.into(), HeaderValue::Int(i64::from(retry.retry_count) + 1));
    headers.insert(HEADER_LAST_RETRY.into(), HeaderValue::Timestamp(now_seconds()));
    headers.insert(HEADER_LAST_ERROR.into(), failure.full_message().into());
    headers.extend(extra);
    tracing::info!(
        route = route.name(),
        "retry {} of a failed message in {delay:?}: {}",
        retry.retry_count.saturating_add(1),
        failure.full_message()
    );
    let copy = OutgoingMessage { body: message.body.clone(), properties };
    route
        .transport()
        .publish(&exchange, &routing_key, copy, PublishOptions { mandatory: true })
        .await
}

fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Publish a copy of `message` to `{queue}.dlq` with the failure in its headers. When the
/// original headers leave no room in a frame for the dead-letter headers, the copy carries the
/// dead-letter headers alone, and [`HEADER_HEADERS_DROPPED`] says what was dropped.
pub(crate) async fn dead_letter(
    route: &RouteHandle,
    queue: &str,
    message: &Message,
    failure: &Failure,
) -> Result<(), TransportError> {
    let mut properties = copy_properties(&message.properties);
    let reason = dead_letter_headers(route, queue, message, failure);
    properties.headers.extend(reason.clone());
    let dlq = format!("{queue}.dlq");
    tracing::warn!(
        route = route.name(),
        "message dead-lettered to {dlq}: {} ({})",
        failure.full_message(),
        failure.kind
    );
    let copy = OutgoingMessage { body: message.body.clone(), properties };
    let options = PublishOptions { mandatory: true };
    let error = match route.transport().publish("", &dlq, copy, options).await {
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
    route.transport().publish("", &dlq, minimal, options).await
}

/// The `x-mf-*` headers that say why and where from a message was dead-lettered.
fn dead_letter_headers(
    route: &RouteHandle,
    queue: &str,
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
    headers.insert(HEADER_FAILED_AT.into(), HeaderValue::Timestamp(now_seconds()));
    let retry_count = BackOffData::from_headers(&message.properties.headers, 0).retry_count;
    let attempts = retry_count.saturating_add(1);
    headers.insert(HEADER_ATTEMPTS.into(), HeaderValue::Int(i64::from(attempts)));
    headers.insert(HEADER_ORIGINAL_QUEUE.into(), queue.into());
    headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), message.exchange.clone().into());
    headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), message.routing_key.clone().into());
    headers
}

/// The properties of a copy the service publishes of a message it received (a retry, a dead
/// letter, a counted redelivery): without the per-message TTL, and without the `user_id`
/// property, which RabbitMQ accepts only from the user it names; its value moves to
/// [`HEADER_ORIGINAL_USER_ID`].
pub(crate) fn copy_properties(original: &Properties) -> Properties {
    let mut properties = original.clone();
    properties.expiration = None;
    if let Some(user_id) = properties.user_id.take() {
        properties.headers.insert(HEADER_ORIGINAL_USER_ID.into(), user_id.into());
    }
    properties
}
