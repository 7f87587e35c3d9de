//! Handing a message back to its queue as a copy: the service received it but will not start
//! it (it is stopping), or cannot settle it now (its retry or dead letter could not be
//! published). A copy carries the count of times its message came back unsettled, which the
//! crash-loop guard of the consume loop reads, and the route it was first published with.

use std::time::Duration;

use crate::data::{BackOffData, HeaderValue, Headers, Message};
use crate::pipeline::settle::copy_properties;
use crate::pipeline::{RouteHandle, Unstarted};
use crate::transport::{Acker, OutgoingMessage, PublishOptions, SharedTransport, TransportError};

/// Header: how many times a message came back unsettled, as counted on the copies the
/// service publishes of it (quorum queues add their own count, `x-delivery-count`).
pub(crate) const HEADER_REDELIVERIES: &str = "x-mf-redeliveries";
/// Header of a copy published straight to a queue (a counted redelivery, a hand-back, a
/// retry): the exchange the message was first published to.
pub(crate) const HEADER_FIRST_EXCHANGE: &str = "x-mf-redelivered-exchange";
/// Header of a copy published straight to a queue: the routing key the message was first
/// published with.
pub(crate) const HEADER_FIRST_ROUTING_KEY: &str = "x-mf-redelivered-routing-key";
/// The header in which quorum queues count a message's deliveries.
pub(crate) const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// Header of a copy published straight to its queue in place of a redelivery (a counted one,
/// or the hand-back of one): its handler is told the message is redelivered, as the broker
/// would have told of the redelivery the copy replaces (`consume::take_redelivered_mark`).
pub(crate) const HEADER_REDELIVERED: &str = "x-mf-redelivered";

/// Header of a copy that goes back to its queue by the route its message came by
/// ([`Copies::ByRoute`]): the queue it is for, where it is read as a copy of the service's.
pub(crate) const HEADER_COPY_FOR: &str = "x-mf-copy-for";

/// How long a stop's hand-back waits to learn whether the broker blocks publishing
/// ([`Transport::publishing_blocked_now`](crate::transport::Transport::publishing_blocked_now)):
/// a broker that does not confirms a probe within milliseconds.
const BLOCK_PROBE_WAIT: Duration = Duration::from_millis(500);

/// How the copies the service publishes of a queue's messages (hand-backs, counted
/// redeliveries) go back to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copies {
    /// Straight to the queue, through the default exchange. From a `quorum` queue, which
    /// counts a message's deliveries itself (`x-delivery-count`), a copy carries that count.
    Straight {
        /// The queue is a quorum queue.
        quorum: bool,
    },
    /// Through the exchange, with the routing key, that their message came by: for RPC
    /// request queues, each the only queue bound to its routing keys. A Python instance of the
    /// service may share the queue, and Nameko finds the method, micro-framework the target,
    /// in the routing key, where a copy straight to the queue has the queue's name.
    ByRoute,
}

impl Copies {
    pub(crate) fn quorum(self) -> bool {
        matches!(self, Copies::Straight { quorum: true })
    }
}

/// How many times a message with `headers` came back unsettled so far: the count its copies
/// carry, plus, on a redelivery (`redelivered`) from a `quorum` queue, the broker's count.
pub(crate) fn redeliveries(headers: &Headers, redelivered: bool, quorum: bool) -> i64 {
    let copies = headers.get(HEADER_REDELIVERIES).and_then(HeaderValue::as_i64).unwrap_or(0);
    let broker = match quorum && redelivered {
        true => headers.get(HEADER_DELIVERY_COUNT).and_then(HeaderValue::as_i64).unwrap_or(0),
        false => 0,
    };
    copies.max(0).saturating_add(broker.max(0))
}

/// Give back to `queue` a message the service received but will not start (it is stopping),
/// or cannot settle now (its retry or dead letter could not be published): a copy with the
/// count it came with ([`redeliveries`]; a `quorum` queue's count moves into the copy) is
/// published (confirmed) straight to `queue`, then the delivery is acked. The copy comes as
/// a fresh delivery, which the crash-loop guard does not count, whereas a requeued delivery
/// comes back marked redelivered, indistinguishable from one whose handling crashed. The copy
/// goes to the tail of the queue. When it cannot be published, the delivery
/// is requeued instead (and counted when it comes back). A delivery whose channel is lost is
/// left as it is: the broker requeued it with the channel. Also once the service has given up
/// waiting for its calls (a stop past `SHUTDOWN_TIMEOUT`), which waits for it a little
/// ([`Unstarted`]). The message is settled with `acker`.
pub(crate) async fn hand_back_unstarted(
    route: &RouteHandle,
    queue: &str,
    copies: Copies,
    message: &Message,
    acker: &dyn Acker,
    _unstarted: Unstarted,
) {
    let transport = route.transport();
    // The copies of a stop are often the first publishes of an alarm, which the connection
    // learns of only once it publishes: sent, they would go out when it ends, after the stop
    // closed the connection, which requeues their messages too.
    if transport.publishing_blocked_now(BLOCK_PROBE_WAIT).await {
        return left_unsettled(route.name(), queue);
    }
    give_back(transport, queue, copies, message, acker, route.name()).await;
}

/// [`hand_back_unstarted`] for a message whose call ran (cut short, or not settled), which
/// is given back only while the service waits for its calls: once it has given up (a stop
/// past `SHUTDOWN_TIMEOUT`), nothing is done, and the message goes back with the connection,
/// as those of the calls still running.
pub(crate) async fn hand_back_message(
    route: &RouteHandle,
    queue: &str,
    copies: Copies,
    message: &Message,
    acker: &dyn Acker,
    label: &str,
) {
    if !route.given_up() {
        give_back(route.transport(), queue, copies, message, acker, label).await;
    }
}

/// [`hand_back_message`], but a message whose copy the broker refused is left unsettled,
/// with the error: for a caller that holds it and tries again.
pub(crate) async fn try_hand_back_message(
    route: &RouteHandle,
    queue: &str,
    copies: Copies,
    message: &Message,
    acker: &dyn Acker,
    label: &str,
) -> Result<(), TransportError> {
    if route.given_up() {
        return Ok(());
    }
    copy_back(route.transport(), queue, copies, message, acker, label).await
}

/// Publish a copy of `message` to `queue`, then ack it; requeue it if the copy cannot be
/// published.
async fn give_back(
    transport: &SharedTransport,
    queue: &str,
    copies: Copies,
    message: &Message,
    acker: &dyn Acker,
    label: &str,
) {
    if let Err(error) = copy_back(transport, queue, copies, message, acker, label).await {
        requeue(acker, label, &error).await;
    }
}

async fn requeue(acker: &dyn Acker, label: &str, error: &TransportError) {
    tracing::warn!(route = label, "cannot hand a message back as a copy ({error}); requeued");
    if let Err(error) = acker.nack(true).await {
        tracing::warn!(route = label, "cannot hand a message back: {error}");
    }
}

/// Publish a copy of `message` to `queue`, then ack it; the error of a copy not published,
/// the delivery left unsettled. Nothing is done when its channel is lost (the broker requeued
/// it).
async fn copy_back(
    transport: &SharedTransport,
    queue: &str,
    copies: Copies,
    message: &Message,
    acker: &dyn Acker,
    label: &str,
) -> Result<(), TransportError> {
    if acker.channel_lost() {
        // The broker requeued the message with its channel: a copy would queue it twice.
        tracing::debug!(route = label, "not handed back: its channel is lost, which requeued it");
        return Ok(());
    }
    let count = redeliveries(&message.properties.headers, message.redelivered, copies.quorum());
    copy_to_queue(transport, queue, copies, message, count, message.redelivered).await?;
    if let Err(error) = acker.ack().await {
        tracing::warn!(route = label, "cannot hand a message back: {error}");
    }
    Ok(())
}

/// Say that a message to hand back to `queue` is left unsettled, as the broker blocks
/// publishing.
pub(crate) fn left_unsettled(label: &str, queue: &str) {
    tracing::warn!(
        route = label,
        "not handed back as a copy: the broker blocks publishing (connection.blocked, a \
         resource alarm); left unsettled, the message goes back to {queue} once, with its \
         channel, marked redelivered"
    );
}

/// `message`, to come back to `queue` as the attempt `next` ([`hand_back_as_retry`]).
pub(crate) fn marked_as_retry(
    route: &RouteHandle,
    queue: &str,
    message: &Message,
    next: &BackOffData,
) -> Message {
    let mut marked = message.clone();
    next.write_headers(&mut marked.properties.headers, queue, &route.identity());
    marked
}

/// [`hand_back_message`] for a `message` to come back to `queue` as the attempt `next`: a
/// call the stop cut short between in-worker retries, or a retry whose copy the broker did
/// not take. Its copy carries that retry state (`x-mf-retry-count` and the rest, as a broker
/// retry's copy does), so that the instance handling it next goes on counting, and a message
/// whose retries the broker never takes still ends when its retries do.
pub(crate) async fn hand_back_as_retry(
    route: &RouteHandle,
    queue: &str,
    copies: Copies,
    message: &Message,
    next: &BackOffData,
    acker: &dyn Acker,
    label: &str,
) {
    let marked = marked_as_retry(route, queue, message, next);
    hand_back_message(route, queue, copies, &marked, acker, label).await;
}

/// Publish (confirmed) a copy of `message` to `queue` as its `copies` go, with its `count` of
/// comebacks (none written when 0), when it stands in for a redelivery (`redelivered`)
/// [`HEADER_REDELIVERED`], and straight to the queue the route it was first published with;
/// by its route, the queue it is for. (A message that came straight, by no route, goes back
/// straight.)
pub(crate) async fn copy_to_queue(
    transport: &SharedTransport,
    queue: &str,
    copies: Copies,
    message: &Message,
    count: i64,
    redelivered: bool,
) -> Result<(), TransportError> {
    let mut properties = copy_properties(&message.properties);
    let headers = &mut properties.headers;
    match count {
        0 => headers.remove(HEADER_REDELIVERIES),
        count => headers.insert(HEADER_REDELIVERIES.into(), HeaderValue::Int(count)),
    };
    if redelivered {
        headers.insert(HEADER_REDELIVERED.into(), HeaderValue::Bool(true));
    }
    let options = PublishOptions { mandatory: true };
    if copies == Copies::ByRoute && !message.exchange.is_empty() {
        headers.insert(HEADER_COPY_FOR.into(), queue.into());
        let copy = OutgoingMessage { body: message.body.clone(), properties };
        return transport.publish(&message.exchange, &message.routing_key, copy, options).await;
    }
    mark_first_route(headers, &message.exchange, &message.routing_key);
    let copy = OutgoingMessage { body: message.body.clone(), properties };
    transport.publish("", queue, copy, options).await
}

/// Record in the `headers` of a copy that goes to its queue by another route (straight, or
/// through a delay queue) the `exchange` and `routing_key` the message was first published
/// with: its handler reads them as the message's, as the original's handler did. Read only on
/// a message published straight to its queue (the default exchange) or arriving on a backoff
/// queue.
///
/// ```
/// use micro_framework::settle::mark_first_route;
/// use micro_framework::Headers;
///
/// // a dead letter of the `paid` event of `shop`, published again straight to its queue
/// let mut headers = Headers::new();
/// mark_first_route(&mut headers, "shop.events", "paid");
/// assert_eq!(headers.len(), 2);
/// ```
pub fn mark_first_route(headers: &mut Headers, exchange: &str, routing_key: &str) {
    headers.insert(HEADER_FIRST_EXCHANGE.into(), exchange.into());
    headers.insert(HEADER_FIRST_ROUTING_KEY.into(), routing_key.into());
}
