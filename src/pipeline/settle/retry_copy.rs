//! A broker retry's copy: published to come back to its queue after a delay, through a
//! delay queue or laid out for the delayed-message plugin.

use std::time::Duration;

use super::{copy_properties, mark_first_route};
use crate::clock;
use crate::config::{QueueType, RetryDelay};
use crate::data::{Failure, Message};
use crate::error::{Error, Result};
use crate::pipeline::delayed_message::{self, RetryMeta};
use crate::pipeline::retry::{BackOffData, RetryMode};
use crate::pipeline::RouteHandle;
use crate::transport::limits::MAX_SHORT_STRING;
use crate::transport::{
    HeaderValue, Headers, Limit, OutgoingMessage, PublishOptions, QueueSpec, TransportError,
};

/// How long a delay queue's lease (`x-expires`) outlasts the delay of its messages, in ms.
const DELAY_QUEUE_LEASE_MS: i64 = 60_000;
/// The longest delay a delay queue holds a retry: RabbitMQ refuses a queue TTL or lease over
/// ten years (`value_too_large`), and the lease outlasts the TTL.
const MAX_DELAY_QUEUE_TTL: Duration = Duration::from_millis(315_360_000_000 - 60_000);

/// Declare what broker-side retries of `queue` need at start-up: under
/// `RETRY_DELAY=delayed_message_plugin`, the layout of [`delayed_message`] (a clear error
/// when the plugin is missing). Delay queues need nothing yet, but their names must fit.
pub(crate) async fn declare_retry_topology(route: &RouteHandle, queue: &str) -> Result<()> {
    check_delay_queue_name(route, queue)?;
    let Some(backoff_queue) = delayed_message::backoff_queue(route) else { return Ok(()) };
    delayed_message::declare(route).await.map_err(|error| {
        // The broker's own words for a missing plugin; any other refusal (a backoff queue
        // declared with other arguments, say) is not cured by the plugin.
        Error::Startup(match error.to_string().contains("unknown exchange type") {
            true => format!(
                "RETRY_DELAY=delayed_message_plugin needs the rabbitmq_delayed_message_exchange \
                 plugin on the broker ({error}); use RETRY_DELAY=delay_queues on stock RabbitMQ"
            ),
            false => format!(
                "cannot declare the RETRY_DELAY=delayed_message_plugin retries of {queue} \
                 (exchange {}, queue {backoff_queue}): {error}",
                delayed_message::exchange(route).name
            ),
        })
    })?;
    tracing::info!(
        route = route.name(),
        "retries of messages from {queue} wait in {} and come back through {backoff_queue}",
        delayed_message::exchange(route).name
    );
    Ok(())
}

/// Refuse a route whose first retry's delay queue (`{queue}.delay-{ms}`, declared only when a
/// message fails) would be over the 255 bytes of an AMQP name: none of its failures could be
/// retried, each going to its callback or dead letters at once. The jitter only lengthens the
/// delay, so the first delay without it names the shortest queue the first retry may take.
fn check_delay_queue_name(route: &RouteHandle, queue: &str) -> Result<()> {
    let Some(policy) = route.backoff() else { return Ok(()) };
    let delay_queues = route.config().retry_delay == RetryDelay::DelayQueues;
    if policy.mode != RetryMode::Broker || policy.max_retries == 0 || !delay_queues {
        return Ok(());
    }
    // an `Interval::custom` that panics is reported when a retry asks for its delay
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| policy.interval.delay(1)));
    let Ok(first) = first else { return Ok(()) };
    let millis = i64::try_from(first.min(MAX_DELAY_QUEUE_TTL).as_millis()).unwrap_or(i64::MAX);
    let name = delay_queue(route.config().queue_type, queue, millis.max(1)).name;
    if name.len() <= MAX_SHORT_STRING {
        return Ok(());
    }
    // the name's end, where the delay is (its start is the route's queue, named already)
    let tail = (name.len().saturating_sub(40)..name.len())
        .find(|&at| name.is_char_boundary(at))
        .map_or("", |at| &name[at..]);
    Err(Error::Startup(format!(
        "route '{}': its retries would wait in a delay queue of {} bytes (...{tail}), over the \
         {MAX_SHORT_STRING} bytes of an AMQP name, so no failure could be retried (the queue's \
         name is made of SERVICE_NAME ({} bytes), the route's name and its entrypoint's \
         arguments): shorten one, or use RETRY_DELAY=delayed_message_plugin",
        route.name(),
        name.len(),
        route.service_name().len(),
    )))
}

/// Why a retry copy was not published.
pub(super) enum NotScheduled {
    /// It cannot be made: the message is dead-lettered instead, for this reason.
    Refused(String),
    /// The broker did not take it: the message goes back to its queue.
    Failed(TransportError),
}

/// Publish a copy of `message` to come back after `delay`: through the delay queue
/// `{queue}.delay-{ms}`, whose per-queue TTL dead-letters it back to `queue` (declared before
/// each use, which renews its `x-expires` lease, so an unused delay queue disappears by
/// itself), or wrapped as [`delayed_message`] lays retries out (its topology declared again
/// first, so a deleted backoff queue cannot swallow the retry), carrying `meta` on.
pub(super) async fn schedule_retry(
    route: &RouteHandle,
    queue: &str,
    message: &Message,
    failure: &Failure,
    delay: Duration,
    meta: &RetryMeta,
) -> Result<(), NotScheduled> {
    // A longer delay cannot be had: a delay queue with its TTL cannot be declared, and the
    // plugin routes a message delayed longer than its timers reach at once.
    let delay = delay.min(match route.config().retry_delay {
        RetryDelay::DelayedMessagePlugin => delayed_message::MAX_DELAY,
        RetryDelay::DelayQueues => MAX_DELAY_QUEUE_TTL,
    });
    let retry = BackOffData::from_headers(&message.properties.headers, 0);
    let now = clock::wall_now();
    let next = retry.next(failure.full_message(), now);
    let retry_count = next.retry_count;
    let mut properties = copy_properties(&message.properties);
    let headers = &mut properties.headers;
    // The queue the copy comes back to, whose consumer alone reads its retry state as its own.
    let back_to = match route.config().retry_delay {
        RetryDelay::DelayedMessagePlugin => delayed_message::backoff_queue(route),
        RetryDelay::DelayQueues => None,
    };
    next.write_headers(headers, back_to.as_deref().unwrap_or(queue), &route.identity());
    // The copy comes back through the default exchange (delay queues) or the backoff exchange
    // (the plugin): it carries the route it was first published with, which its handler reads
    // and its dead letter records.
    mark_first_route(headers, &message.exchange, &message.routing_key);
    let transport = route.transport();
    let (exchange, routing_key, copy, mandatory) = match route.config().retry_delay {
        RetryDelay::DelayedMessagePlugin => {
            let copy =
                delayed_message::wrapped_copy(message, properties, meta, retry_count, now, delay)
                    .map_err(NotScheduled::Refused)?;
            delayed_message::declare(route).await.map_err(not_scheduled)?;
            // The plugin routes a delayed message only once due: a mandatory publish would
            // always come back unroutable.
            (
                delayed_message::exchange(route).name,
                delayed_message::routing_key(route),
                copy,
                false,
            )
        }
        RetryDelay::DelayQueues => {
            let millis = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX).max(1);
            let delay_queue = delay_queue(route.config().queue_type, queue, millis);
            transport.declare_queue(&delay_queue).await.map_err(not_scheduled)?;
            let copy = OutgoingMessage { body: message.body.clone(), properties };
            (String::new(), delay_queue.name, copy, true)
        }
    };
    tracing::info!(
        route = route.name(),
        "retry {retry_count} of a failed message in {delay:?}: {}",
        failure.full_message()
    );
    let options = PublishOptions { mandatory };
    transport.publish(&exchange, &routing_key, copy, options).await.map_err(not_scheduled)
}

/// The delay queue of `queue` for retries due in `millis`: its messages expire into `queue`
/// through the default exchange, and the queue itself once unused for the delay and a lease.
///
/// Under `QUEUE_TYPE=quorum` it is a quorum queue too (another name, `{queue}.quorum-delay-{ms}`,
/// so that a classic one left by an earlier version is no clash): a classic queue lives on the
/// one node it was declared through, and with that node down the retries waiting in it would
/// wait for it, those failing meanwhile could not be scheduled, and with the node removed for
/// good they would be lost. Its expired messages are dead-lettered at least once (RabbitMQ's
/// default for quorum queues is at most once), which needs `reject-publish`.
fn delay_queue(queue_type: QueueType, queue: &str, millis: i64) -> QueueSpec {
    let lease = millis.saturating_add(DELAY_QUEUE_LEASE_MS);
    let mut arguments = Headers::from([
        ("x-message-ttl".to_owned(), HeaderValue::Int(millis)),
        ("x-dead-letter-exchange".to_owned(), HeaderValue::from("")),
        ("x-dead-letter-routing-key".to_owned(), HeaderValue::from(queue)),
        ("x-expires".to_owned(), HeaderValue::Int(lease)),
    ]);
    let name = match queue_type {
        QueueType::Classic => format!("{queue}.delay-{millis}"),
        QueueType::Quorum => {
            arguments.extend([
                ("x-queue-type".to_owned(), HeaderValue::from("quorum")),
                ("x-dead-letter-strategy".to_owned(), HeaderValue::from("at-least-once")),
                ("x-overflow".to_owned(), HeaderValue::from("reject-publish")),
            ]);
            format!("{queue}.quorum-delay-{millis}")
        }
    };
    QueueSpec { arguments, ..QueueSpec::durable(name) }
}

/// Why the broker did not take a retry copy or what it waits in: for good when the same copy
/// would fail again whatever the broker's state, and the message would only come back to fail
/// again; otherwise for now.
fn not_scheduled(error: TransportError) -> NotScheduled {
    match error {
        // A retry copy needs the original headers: without room for them, the message cannot
        // come back as it was.
        TransportError::LimitReached { what: Limit::HeaderSize, reason, .. } => {
            NotScheduled::Refused(reason)
        }
        // A name AMQP cannot carry (a delay queue's, over 255 bytes): nothing was sent.
        TransportError::Invalid(reason) => NotScheduled::Refused(reason),
        error => NotScheduled::Failed(error),
    }
}
