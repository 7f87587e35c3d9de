//! The crash-loop guard of the consume loop: counting the times a message came back
//! unsettled, refusing it past `MAX_REDELIVERIES`, and handing unstarted messages back
//! without their counting as crashes.

use std::time::Duration;

use super::QueueSource;
use crate::data::{drop_retry_state, keep_own_retry_state, Failure, FailureKind, HeaderValue};
use crate::pipeline::settle::{
    copy_to_queue, redeliveries, Copies, HEADER_COPY_FOR, HEADER_DELIVERY_COUNT,
    HEADER_FIRST_EXCHANGE, HEADER_FIRST_ROUTING_KEY, HEADER_PENDING_DEAD_LETTER,
    HEADER_REDELIVERED, HEADER_REDELIVERIES,
};
use crate::transport::{Delivery, Limit, LostInFlight, TransportError};

const CRASH_PAUSE: Duration = Duration::from_secs(1);
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
/// come back as fresh copies ([`hand_back_unstarted`](crate::pipeline::settle::hand_back_unstarted)). On a redelivery, the count is that of the
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
    use crate::pipeline::settle::mark_first_route;
    use crate::transport::Acker;
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
