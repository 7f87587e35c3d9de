//! The crash-loop guard of the consume loop: counting the times a message came back
//! unsettled, refusing it past `MAX_REDELIVERIES`, and handing unstarted messages back
//! without their counting as crashes.

use std::time::Duration;

use super::QueueSource;
use crate::data::{
    drop_retry_state, keep_own_retry_state, BackOffData, Failure, FailureKind, HeaderValue,
    Headers, Message,
};
use crate::pipeline::settle::{copy_properties, HEADER_PENDING_DEAD_LETTER};
use crate::pipeline::{RouteHandle, Unstarted};
use crate::transport::{
    Acker, Delivery, Limit, LostInFlight, OutgoingMessage, PublishOptions, SharedTransport,
    TransportError,
};

/// Header: how many times a message came back unsettled, as counted on the copies the
/// service publishes of it (quorum queues add their own count, `x-delivery-count`).
pub(crate) const HEADER_REDELIVERIES: &str = "x-mf-redeliveries";
/// Header of a copy published straight to a queue (a counted redelivery, a hand-back, a
/// retry): the exchange the message was first published to.
const HEADER_FIRST_EXCHANGE: &str = "x-mf-redelivered-exchange";
/// Header of a copy published straight to a queue: the routing key the message was first
/// published with.
const HEADER_FIRST_ROUTING_KEY: &str = "x-mf-redelivered-routing-key";
/// The header in which quorum queues count a message's deliveries.
const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// Header of a copy published straight to its queue in place of a redelivery (a counted one,
/// or the hand-back of one): its handler is told the message is redelivered, as the broker
/// would have told of the redelivery the copy replaces ([`take_redelivered_mark`]).
pub(crate) const HEADER_REDELIVERED: &str = "x-mf-redelivered";

/// Header of a copy that goes back to its queue by the route its message came by
/// ([`Copies::ByRoute`]): the queue it is for, where it is read as a copy of the service's.
const HEADER_COPY_FOR: &str = "x-mf-copy-for";

const CRASH_PAUSE: Duration = Duration::from_secs(1);
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
    fn quorum(self) -> bool {
        matches!(self, Copies::Straight { quorum: true })
    }
}

pub(super) async fn crash_pause(source: &QueueSource) {
    tokio::select! {
        _ = source.stopping.cancelled() => {}
        _ = tokio::time::sleep(CRASH_PAUSE) => {}
    }
}

pub(super) enum Guarded {
    Handle(Delivery),
    Refuse(Delivery, Failure),
    /// Published again with its count and acked: the copy is handled later. Also a delivery
    /// whose channel was lost before it could be counted, which the broker requeued.
    Counted,
}

pub(super) enum Checked {
    Guarded(Guarded),
    /// Redelivered: published again as a copy that carries this count before it is handled
    /// (from a classic queue, counted one more time; from a quorum queue that counted a lost
    /// connection, the count it had before).
    Count(Delivery, i64),
}

/// Count the times a message came back unsettled (its worker or the service died while
/// handling it) and refuse it past `MAX_REDELIVERIES`, so one poison message cannot
/// crash-loop the service. A fresh delivery is never counted: messages handed back unstarted
/// come back as fresh copies ([`hand_back_unstarted`]). On a redelivery, the count is that of the
/// copies ([`HEADER_REDELIVERIES`]) plus, from a `quorum` queue, the broker's own; from any
/// other queue the message is published again (confirmed) straight to its queue with its count
/// one higher ([`count_redelivery`]), then acked. A redelivery the transport knows the broker
/// made because the connection was lost while the message was in flight is not counted
/// ([`returned_at_a_loss`]). First the delivery is read as its queue's
/// ([`read_as_its_queues`]).
pub(super) fn check_crash_loop(
    source: &QueueSource,
    copies: Copies,
    mut delivery: Delivery,
) -> Checked {
    read_as_its_queues(source, &mut delivery);
    let quorum = copies.quorum();
    if !delivery.redelivered {
        return Checked::Guarded(Guarded::Handle(delivery));
    }
    if let Some(lost) = delivery.acker.lost_in_flight() {
        tracing::debug!(
            route = %source.label,
            "redelivered: in flight when the connection was lost, not counted as a crash"
        );
        return returned_at_a_loss(quorum, delivery, lost);
    }
    let limit = i64::from(source.max_redeliveries);
    let counted = redeliveries(&delivery.properties.headers, delivery.redelivered, quorum);
    let count = if quorum { counted } else { counted.saturating_add(1) };
    if count > limit {
        let failure = Failure::new(
            FailureKind::Crashed,
            format!(
                "delivered {} times without being settled (MAX_REDELIVERIES={limit}): its \
                 handling may crash the worker or the service",
                count.saturating_add(1)
            ),
        );
        return Checked::Guarded(Guarded::Refuse(delivery, failure));
    }
    if quorum {
        return Checked::Guarded(Guarded::Handle(delivery));
    }
    Checked::Count(delivery, count)
}

/// A redelivery the broker made because the delivery's connection (or channel) was lost
/// while it was in flight, which this service saw: no handling of the message crashed, so it
/// is not counted. From a quorum queue whose count of deliveries went up with the loss, a copy
/// is published with the count the message had before it, as the broker's count cannot be
/// taken back.
fn returned_at_a_loss(quorum: bool, delivery: Delivery, lost: LostInFlight) -> Checked {
    let headers = &delivery.properties.headers;
    let broker = headers.get(HEADER_DELIVERY_COUNT).and_then(HeaderValue::as_i64).unwrap_or(0);
    if !quorum || broker <= lost.delivery_count_before {
        return Checked::Guarded(Guarded::Handle(delivery));
    }
    let copies = redeliveries(headers, false, false);
    Checked::Count(delivery, copies.saturating_add(lost.delivery_count_before.max(0)))
}

/// How many times a message with `headers` came back unsettled so far: the count its copies
/// carry, plus, on a redelivery (`redelivered`) from a `quorum` queue, the broker's count.
fn redeliveries(headers: &Headers, redelivered: bool, quorum: bool) -> i64 {
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
    if let Err(error) = try_hand_back_message(route, queue, copies, message, acker, label).await {
        requeue(acker, label, &error).await;
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

/// Publish a redelivered message again to its queue with its `count`, then ack it.
pub(super) async fn count_redelivery(
    source: &QueueSource,
    copies: Copies,
    delivery: Delivery,
    count: i64,
) -> Guarded {
    if delivery.acker.channel_lost() {
        // The broker requeued it with its channel: a counted copy would queue it twice.
        tracing::debug!(route = %source.label, "not counted: its channel is lost, which requeued it");
        return Guarded::Counted;
    }
    let message = delivery.message();
    match copy_to_queue(&source.transport, &source.queue, copies, &message, count, true).await {
        Ok(()) => {}
        Err(TransportError::LimitReached { what: Limit::HeaderSize, reason, .. }) => {
            // Uncounted, a message that crashes the service would crash it for ever.
            let failure = Failure::new(
                FailureKind::Crashed,
                format!("redelivered unsettled, and its redeliveries cannot be counted: {reason}"),
            );
            return Guarded::Refuse(delivery, failure);
        }
        Err(error) => {
            tracing::warn!(route = %source.label, "cannot count a redelivery ({error}); handling it");
            return Guarded::Handle(delivery);
        }
    }
    if let Err(error) = delivery.acker.ack().await {
        tracing::warn!(route = %source.label, "cannot ack a counted redelivery: {error}");
    }
    Guarded::Counted
}

/// Publish (confirmed) a copy of `message` to `queue` as its `copies` go, with its `count` of
/// comebacks (none written when 0), when it stands in for a redelivery (`redelivered`)
/// [`HEADER_REDELIVERED`], and straight to the queue the route it was first published with;
/// by its route, the queue it is for. (A message that came straight, by no route, goes back
/// straight.)
async fn copy_to_queue(
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

/// Mark `delivery` redelivered if it is a copy that stands in for a redelivery
/// ([`HEADER_REDELIVERED`], removed): once the crash-loop guard has taken it for the fresh
/// delivery it is, its handler sees what the broker would have said of the redelivery.
pub(super) fn take_redelivered_mark(delivery: &mut Delivery) {
    if delivery.properties.headers.remove(HEADER_REDELIVERED).is_some() {
        delivery.redelivered = true;
    }
}

/// Read `delivery` as a message of `source`'s queue. The headers only the service's copies
/// carry (the route a copy was first published with, its count of redeliveries, its mark as
/// a redelivery, a pending dead letter, a retry state) are read only on a message published
/// straight to the queue, as every copy comes back (delay queues included), or arriving on a
/// queue of nothing but retries (`retries_only`); on any other they were set by its publisher
/// and are dropped: it could otherwise have its message read as one of another route (an RPC
/// request as another method's), skip a filter as a retry, retry less, or be dead-lettered
/// unrun. A copy that came by its route, for this queue ([`Copies::ByRoute`]), keeps all but
/// the route it was first published with: it came by that route, so a publisher who may use
/// only that route steers nothing with them but its own message. Then the route a copy
/// straight to the queue was first published with is restored, and a retry state made for
/// another queue dropped.
fn read_as_its_queues(source: &QueueSource, delivery: &mut Delivery) {
    let copy_of_ours = source.retries_only
        || (delivery.exchange.is_empty() && delivery.routing_key == *source.queue);
    let headers = &mut delivery.properties.headers;
    let copy_for = headers.remove(HEADER_COPY_FOR);
    let copy_by_route = copy_for.as_ref().and_then(HeaderValue::as_str) == Some(&*source.queue);
    if !copy_of_ours && !copy_by_route {
        for name in [HEADER_REDELIVERIES, HEADER_REDELIVERED, HEADER_PENDING_DEAD_LETTER] {
            headers.remove(name);
        }
        drop_retry_state(headers);
    }
    restore_first_route(delivery, copy_of_ours);
    keep_own_retry_state(&mut delivery.properties.headers, &source.queue);
}

/// A copy came back by another route: give it back the exchange and routing key it was first
/// published with, which handlers read (the RPC method, an event's name) and dead letters
/// record, when it is a `copy_of_ours` (else those headers are only dropped).
fn restore_first_route(delivery: &mut Delivery, copy_of_ours: bool) {
    let headers = &mut delivery.properties.headers;
    let exchange = headers.remove(HEADER_FIRST_EXCHANGE);
    let routing_key = headers.remove(HEADER_FIRST_ROUTING_KEY);
    if !copy_of_ours {
        return;
    }
    if let (Some(HeaderValue::String(exchange)), Some(HeaderValue::String(routing_key))) =
        (exchange, routing_key)
    {
        delivery.exchange = exchange;
        delivery.routing_key = routing_key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;

    /// The acker of a delivery the broker returned at a lost connection.
    #[derive(Debug)]
    struct Returned(LostInFlight);

    #[async_trait]
    impl Acker for Returned {
        async fn ack(&self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn nack(&self, _: bool) -> Result<(), TransportError> {
            Ok(())
        }
        async fn reject(&self, _: bool) -> Result<(), TransportError> {
            Ok(())
        }
        fn lost_in_flight(&self) -> Option<LostInFlight> {
            Some(self.0)
        }
    }

    fn returned(before: i64, headers: &[(&str, i64)]) -> (Delivery, LostInFlight) {
        let lost = LostInFlight { delivery_count_before: before };
        let mut delivery = Delivery {
            exchange: String::new(),
            routing_key: "q".into(),
            redelivered: true,
            body: bytes::Bytes::from_static(b"{}"),
            properties: crate::data::Properties::default(),
            acker: Box::new(Returned(lost)),
        };
        for (name, value) in headers {
            delivery.properties.headers.insert((*name).into(), HeaderValue::Int(*value));
        }
        (delivery, lost)
    }

    #[test]
    fn the_first_route_is_restored_only_on_a_copy_of_ours() {
        for copy_of_ours in [true, false] {
            let (mut delivery, _) = returned(0, &[]);
            delivery.exchange = "nameko-rpc".into();
            delivery.routing_key = "svc.mul".into();
            mark_first_route(&mut delivery.properties.headers, "nameko-rpc", "svc.add");
            restore_first_route(&mut delivery, copy_of_ours);
            let expected = if copy_of_ours { "svc.add" } else { "svc.mul" };
            assert_eq!(delivery.routing_key, expected);
            assert!(delivery.properties.headers.is_empty(), "the headers are dropped either way");
        }
    }

    #[test]
    fn a_return_at_a_lost_connection_from_a_classic_queue_is_handled_uncounted() {
        let (delivery, lost) = returned(0, &[(HEADER_REDELIVERIES, 2)]);
        let checked = returned_at_a_loss(false, delivery, lost);
        assert!(matches!(checked, Checked::Guarded(Guarded::Handle(_))));
    }

    #[test]
    fn a_quorum_queues_count_of_the_loss_is_taken_back_in_a_copy() {
        let (delivery, lost) = returned(1, &[(HEADER_REDELIVERIES, 2), (HEADER_DELIVERY_COUNT, 2)]);
        match returned_at_a_loss(true, delivery, lost) {
            Checked::Count(_, count) => assert_eq!(count, 3, "2 counted by copies, 1 by the queue"),
            Checked::Guarded(_) => panic!("the queue counted the loss: a copy takes it back"),
        }
    }

    #[test]
    fn a_quorum_queue_that_did_not_count_the_loss_hands_it_on_as_it_is() {
        let (delivery, lost) = returned(1, &[(HEADER_DELIVERY_COUNT, 1)]);
        let checked = returned_at_a_loss(true, delivery, lost);
        assert!(matches!(checked, Checked::Guarded(Guarded::Handle(_))));
    }
}
