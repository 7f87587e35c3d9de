//! Settling a delivery once its outcome is known: ack, or dead-letter then ack.
//!
//! Nothing is acked before its outcome is settled. A message that nothing handled is
//! published (confirmed) to `{queue}.dlq` with the reason in `x-mf-*` headers, then acked. If
//! that publish (or a retry's) fails, the message goes back after a pause (never lost, never a
//! hot loop), as a copy the crash-loop guard does not count, since its handling did not crash:
//! carrying its failure, to be dead-lettered again unrun, or the retry it is to run as.

mod dead_letter;
mod hand_back;
mod headers;
mod retry_copy;

use std::time::Duration;

use dead_letter::dead_letter;
pub use hand_back::mark_first_route;
pub(crate) use hand_back::{
    copy_to_queue, hand_back_as_retry, hand_back_unstarted, redeliveries, Copies, HEADER_COPY_FOR,
    HEADER_DELIVERY_COUNT, HEADER_FIRST_EXCHANGE, HEADER_FIRST_ROUTING_KEY, HEADER_REDELIVERED,
    HEADER_REDELIVERIES,
};
use hand_back::{hand_back_message, left_unsettled, marked_as_retry, try_hand_back_message};
use headers::{keep_well_formed_deaths, mark_pending_dead_letter};
pub use headers::{
    set_aside_routing_headers, HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_ERROR_TYPE,
    HEADER_FAILED_AT, HEADER_HEADERS_DROPPED, HEADER_ORIGINAL_CC, HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_ORIGINAL_USER_ID, HEADER_ROUTE,
};
pub(crate) use headers::{take_pending_dead_letter, HEADER_PENDING_DEAD_LETTER};
pub(crate) use retry_copy::declare_retry_topology;
use retry_copy::{schedule_retry, NotScheduled};

use crate::clock;
use crate::data::{Failure, Handled, Message};
use crate::pipeline::delayed_message::RetryMeta;
use crate::pipeline::retry::BackOffData;
use crate::pipeline::RouteHandle;
use crate::transport::{Acker, Delivery, Properties, TransportError};

const REQUEUE_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause between the attempts to settle a message held because the broker refuses
/// both its dead letter (or retry) and its hand-back: short enough that it goes soon after
/// the refusal ends.
const HELD_PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// Where a delivery came from: where it goes back when it cannot be settled now.
pub(crate) struct Origin<'a> {
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// Whether that queue is a quorum queue.
    pub quorum: bool,
    /// The message as it came, when its handler changed the delivery (a retry unwrapped);
    /// `None` when the delivery is as it came.
    pub original: Option<Message>,
}

/// Settle `delivery`, which came from `origin`, for the route's queue `queue` according to
/// `handled`, and say how it ended: `handled` itself (a retry also when its copy could not be
/// published and the message went back marked as the retry), a dead letter where a retry copy
/// could not be made, or `None` when the message went back to `origin` as it came (its dead
/// letter could not be published, or its callback cannot start during a stop) or is left to
/// go back with the connection (it failed after the stop gave up on it) and will come again,
/// to be counted then. `meta` is the
/// `_meta` its next wrapped retry carries on (see
/// [`delayed_message`](crate::pipeline::delayed_message)).
pub(crate) async fn settle(
    route: &RouteHandle,
    origin: &Origin<'_>,
    queue: &str,
    delivery: Delivery,
    handled: &Handled,
    meta: &RetryMeta,
) -> Option<Handled> {
    if route.failed_after_giving_up(handled, origin.queue) {
        return None;
    }
    let succeeded = matches!(handled, Handled::Succeeded(_) | Handled::CalledBack(_));
    if !succeeded && left_to_come_again(route, origin, &*delivery.acker) {
        return None;
    }
    let (result, done) = match handled {
        Handled::Succeeded(_) | Handled::CalledBack(_) => {
            (delivery.acker.ack().await, Some(handled.clone()))
        }
        Handled::Failed(failure) => {
            let message = delivery.message();
            let published = dead_letter(route, queue, queue, &message, failure).await;
            let done = published.is_ok().then(|| handled.clone());
            let unsent = Unsent::DeadLetter(failure, queue);
            (ack_after(route, origin, queue, delivery, unsent, published).await, done)
        }
        Handled::Retry { failure, delay } => {
            let message = delivery.message();
            match schedule_retry(route, queue, &message, failure, *delay, meta).await {
                Err(NotScheduled::Refused(reason)) => {
                    // The retry copy cannot be made (no room for the original headers, or a
                    // body the retry layout cannot carry): no retry remains.
                    let failure = Failure {
                        retryable: false,
                        causes: [failure.causes.clone(), vec![format!("not retried: {reason}")]]
                            .concat(),
                        ..failure.clone()
                    };
                    return not_retried(route, origin, queue, delivery, message, failure).await;
                }
                Err(NotScheduled::Failed(error)) => {
                    // Handed back marked as the retry (or, past a stop, left to come back as
                    // it was): it runs again, so the retry counts, as one scheduled does.
                    let unsent = Unsent::Retry(failure);
                    let result = ack_after(route, origin, queue, delivery, unsent, Err(error));
                    (result.await, Some(handled.clone()))
                }
                Ok(()) => (delivery.acker.ack().await, Some(handled.clone())),
            }
        }
    };
    warn_if_unsettled(route, result);
    done
}

/// Settle a message whose retry copy could not be made, failed with `failure`: as after its
/// last retry, the callback of a `CallbackRoute` runs (in a worker slot, as every call), and
/// the message is acked, or dead-lettered if there is no callback or it failed. `None` when
/// it went back to `origin`: its dead letter could not be published, or the service is
/// stopping and admits no more calls (it goes back as a stop hands back unstarted messages).
async fn not_retried(
    route: &RouteHandle,
    origin: &Origin<'_>,
    queue: &str,
    delivery: Delivery,
    message: Message,
    failure: Failure,
) -> Option<Handled> {
    let handled = match route.has_callback() {
        false => Handled::Failed(failure),
        true => {
            let Some(permit) = route.acquire().await else {
                give_back(route, origin, delivery).await;
                return None;
            };
            if left_to_come_again(route, origin, &*delivery.acker) {
                return None;
            }
            route.no_retry_made(permit, message.clone(), failure).await
        }
    };
    let (result, done) = match &handled {
        Handled::Failed(failure) => {
            let published = dead_letter(route, queue, queue, &message, failure).await;
            let done = published.is_ok().then(|| handled.clone());
            let unsent = Unsent::DeadLetter(failure, queue);
            (ack_after(route, origin, queue, delivery, unsent, published).await, done)
        }
        _ => (delivery.acker.ack().await, Some(handled)),
    };
    warn_if_unsettled(route, result);
    done
}

/// Settle a delivery of `origin` that could not be read as the route's message:
/// dead-lettered as it came to `{queue}.dlq` with `failure`, then acked; `None` when it went
/// back to `origin`.
pub(crate) async fn dead_letter_unread(
    route: &RouteHandle,
    origin: &Origin<'_>,
    queue: &str,
    delivery: Delivery,
    failure: Failure,
) -> Option<Handled> {
    if left_to_come_again(route, origin, &*delivery.acker) {
        return None;
    }
    let published = dead_letter(route, queue, origin.queue, &delivery.message(), &failure).await;
    let dead = published.is_ok();
    let unsent = Unsent::DeadLetter(&failure, origin.queue);
    let settled = ack_after(route, origin, queue, delivery, unsent, published).await;
    warn_if_unsettled(route, settled);
    dead.then_some(Handled::Failed(failure))
}

/// Whether the delivery's channel was lost (a lost connection) while it was handled: the
/// broker then requeued the message, to deliver it again uncounted, so a retry copy or a
/// dead letter published now would make it exist twice.
fn left_to_come_again(route: &RouteHandle, origin: &Origin<'_>, acker: &dyn Acker) -> bool {
    let lost = acker.channel_lost();
    if lost {
        tracing::info!(
            route = route.name(),
            "a call failed after its channel was lost: the broker delivers its message again \
             from {}, neither retried nor dead-lettered now",
            origin.queue
        );
    }
    lost
}

fn warn_if_unsettled(route: &RouteHandle, settled: Result<(), TransportError>) {
    if let Err(error) = settled {
        tracing::warn!(
            route = route.name(),
            "cannot settle a message ({error}); the broker will deliver it again"
        );
    }
}

/// What the settling of a delivery could not publish.
#[derive(Clone, Copy)]
enum Unsent<'f> {
    /// Its dead letter, for this failure, of a message consumed from this queue.
    DeadLetter(&'f Failure, &'f str),
    /// The copy of its retry after this failure.
    Retry(&'f Failure),
}

/// Ack once `published` succeeded. Otherwise, after a pause (cut short by a stop), the message
/// goes back as a copy the crash-loop guard does not count ([`hand_back_message`]), since its
/// handling did not crash:
/// - an unsent dead letter: to `origin` as it came there, carrying its failure
///   ([`HEADER_PENDING_DEAD_LETTER`]): when it comes back it is dead-lettered with it, without
///   running again, so a dead-letter queue that refuses it for long runs no target again and
///   again, nor counts it as a crash;
/// - an unsent retry: to the route's `queue`, carrying the retry's state, as the retry itself
///   comes back; retried so, a message the broker never takes a retry copy of still ends
///   when its retries do.
///
/// When the broker refuses that copy too (no write permission, say), the message is held
/// unsettled ([`hold`]): requeued, it would come back bare, and run again. While the broker
/// blocks publishing (a resource alarm), nothing more is published for it until the block
/// ends: a publish that timed out meanwhile may still go out then, so the hand-back that
/// follows may make the message exist twice (a duplicate, never a loss: acked behind a
/// publish whose outcome is unknown, it would be lost if the broker refused that publish).
async fn ack_after(
    route: &RouteHandle,
    origin: &Origin<'_>,
    queue: &str,
    delivery: Delivery,
    unsent: Unsent<'_>,
    published: Result<(), TransportError>,
) -> Result<(), TransportError> {
    let Err(error) = published else { return delivery.acker.ack().await };
    let (what, back_to) = match unsent {
        Unsent::DeadLetter(..) => ("dead-letter", origin.queue),
        Unsent::Retry(_) => ("schedule the retry of", queue),
    };
    tracing::error!(
        route = route.name(),
        "cannot {what} a failed message ({error}); it goes back to {back_to}"
    );
    let (message, acker) = delivery.into_parts();
    let back = match unsent {
        Unsent::DeadLetter(failure, _) => {
            let mut back = origin.original.clone().unwrap_or_else(|| message.clone());
            mark_pending_dead_letter(&mut back.properties.headers, failure);
            back
        }
        Unsent::Retry(failure) => {
            let retry = BackOffData::from_headers(&message.properties.headers, 0);
            let next = retry.next(failure.full_message(), clock::wall_now());
            marked_as_retry(route, queue, &message, &next)
        }
    };
    let held = Held { back_to, copies: Copies::Straight { quorum: origin.quorum }, back, message };
    hold(route, queue, unsent, &held, acker.as_ref()).await
}

/// A message whose dead letter or retry the broker did not take, to go back to `back_to` as
/// `back`.
struct Held<'a> {
    back_to: &'a str,
    copies: Copies,
    back: Message,
    /// The message as its dead letter is made of it.
    message: Message,
}

/// Hand `held` back, after a pause; while the broker refuses its copy, hold it unsettled and
/// try again after longer pauses (up to [`HELD_PAUSE_LIMIT`], each refusal logged once the
/// number of attempts doubled), also its dead letter itself, until one is taken or the stop
/// comes, which hands it back once more (requeued if refused again). While the broker blocks
/// publishing nothing is tried (each try would wait in the connection, to go out with the
/// others when the block ends), and a stop meanwhile leaves the message to go back with its
/// channel.
async fn hold(
    route: &RouteHandle,
    queue: &str,
    unsent: Unsent<'_>,
    held: &Held<'_>,
    acker: &dyn Acker,
) -> Result<(), TransportError> {
    let (name, back_to, copies, back) = (route.name(), held.back_to, held.copies, &held.back);
    let (mut pause, mut attempt) = (REQUEUE_PAUSE, 0u64);
    loop {
        attempt += 1;
        tokio::select! {
            _ = route.stopping().cancelled() => {
                match route.transport().publishing_blocked() {
                    true => left_unsettled(name, back_to),
                    false => hand_back_message(route, back_to, copies, back, acker, name).await,
                }
                return Ok(());
            }
            _ = tokio::time::sleep(pause) => {}
        }
        if route.transport().publishing_blocked() {
            continue;
        }
        let Err(refused) = try_hand_back_message(route, back_to, copies, back, acker, name).await
        else {
            return Ok(());
        };
        if let Unsent::DeadLetter(failure, from) = unsent {
            if dead_letter(route, queue, from, &held.message, failure).await.is_ok() {
                return acker.ack().await;
            }
        }
        if attempt.is_power_of_two() {
            tracing::warn!(
                route = name,
                "cannot hand a failed message back to {back_to} either ({refused}): held \
                 unsettled, not run again, and tried again every {:?} or so ({attempt} \
                 attempts)",
                (pause * 2).min(HELD_PAUSE_LIMIT)
            );
        }
        pause = (pause * 2).min(HELD_PAUSE_LIMIT);
    }
}

/// Give `delivery` back to `origin` as it came there, as a copy the crash-loop guard does not
/// count ([`hand_back_message`]; requeued if the copy cannot be published).
async fn give_back(route: &RouteHandle, origin: &Origin<'_>, delivery: Delivery) {
    let (message, acker) = delivery.into_parts();
    let message = origin.original.as_ref().unwrap_or(&message);
    let copies = Copies::Straight { quorum: origin.quorum };
    hand_back_message(route, origin.queue, copies, message, acker.as_ref(), route.name()).await;
}

/// The properties of a copy the service publishes of a message it received (a retry, a dead
/// letter, a counted redelivery, a hand-back): without the per-message TTL; without
/// `x-delivery-count`, a quorum queue's count of the original's deliveries, which no copy
/// should carry to another queue (where a publisher's value would be read as a count); and
/// without the `user_id` property, which RabbitMQ accepts only from the user it names; its
/// value moves to [`HEADER_ORIGINAL_USER_ID`]; and without the mark of a copy that stands in
/// for a redelivery ([`HEADER_REDELIVERED`]), which only such a copy carries; without the
/// routing headers `CC` and `BCC` ([`set_aside_routing_headers`]); and with only the
/// `x-death` entries RabbitMQ could have written ([`keep_well_formed_deaths`]).
pub(crate) fn copy_properties(original: &Properties) -> Properties {
    let mut properties = original.clone();
    properties.expiration = None;
    set_aside_routing_headers(&mut properties.headers);
    keep_well_formed_deaths(&mut properties.headers);
    properties.headers.remove("x-delivery-count");
    // a copy stands in for a redelivery only where it says so itself
    properties.headers.remove(HEADER_REDELIVERED);
    if let Some(user_id) = properties.user_id.take() {
        properties.headers.insert(HEADER_ORIGINAL_USER_ID.into(), user_id.into());
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::HeaderValue;

    fn table(fields: &[(&str, HeaderValue)]) -> HeaderValue {
        HeaderValue::Table(
            fields.iter().map(|(key, value)| ((*key).to_owned(), value.clone())).collect(),
        )
    }

    fn death(queue: &str) -> Vec<(&'static str, HeaderValue)> {
        vec![
            ("queue", HeaderValue::from(queue)),
            ("reason", HeaderValue::from("expired")),
            ("count", HeaderValue::Int(2)),
            ("exchange", HeaderValue::from("")),
            ("routing-keys", HeaderValue::Array(vec![HeaderValue::from(queue)])),
            ("time", HeaderValue::Timestamp(1_700_000_000)),
            ("original-expiration", HeaderValue::from("100")),
        ]
    }

    fn copied(x_death: HeaderValue) -> Option<HeaderValue> {
        let mut properties = Properties::default();
        properties.headers.insert("x-death".into(), x_death);
        copy_properties(&properties).headers.remove("x-death")
    }

    #[test]
    fn a_copy_carries_no_cc_or_bcc_and_keeps_the_cc_for_operators() {
        let cc = HeaderValue::Array(vec![HeaderValue::from("jobs2")]);
        let mut properties = Properties::default();
        properties.headers.insert("CC".into(), cc.clone());
        properties.headers.insert("BCC".into(), HeaderValue::Array(vec!["jobs3".into()]));
        let copy = copy_properties(&properties);
        assert!(!copy.headers.contains_key("CC"), "{:?}", copy.headers);
        assert!(!copy.headers.contains_key("BCC"), "{:?}", copy.headers);
        assert_eq!(copy.headers.get(HEADER_ORIGINAL_CC), Some(&cc));
        // a copy of a copy keeps the first CC
        assert_eq!(copy_properties(&copy).headers, copy.headers);
    }

    #[test]
    fn a_copy_keeps_the_x_death_entries_rabbitmq_writes() {
        let good = table(&death("work.delay-100"));
        let mut other = death("other");
        other.push(("a-later-field", HeaderValue::Bool(true)));
        let other = table(&other);
        let both = HeaderValue::Array(vec![good.clone(), other.clone()]);
        assert_eq!(copied(both.clone()), Some(both));
    }

    #[test]
    fn a_copy_drops_the_x_death_entries_rabbitmq_would_crash_on() {
        let good = table(&death("work.delay-100"));
        let with = |key: &'static str, value: HeaderValue| {
            let mut fields = death("work.delay-100");
            fields.retain(|(name, _)| *name != key);
            fields.push((key, value));
            table(&fields)
        };
        let without = |key: &str| {
            let mut fields = death("work.delay-100");
            fields.retain(|(name, _)| *name != key);
            table(&fields)
        };
        let malformed = [
            HeaderValue::Int(1),
            HeaderValue::from("expired"),
            table(&[]),
            without("queue"),
            without("reason"),
            with("queue", HeaderValue::Int(5)),
            with("count", HeaderValue::from("many")),
            with("count", HeaderValue::Int(-1)),
            with("time", HeaderValue::from("now")),
            with("routing-keys", HeaderValue::from("work")),
            with("routing-keys", HeaderValue::Array(vec![HeaderValue::Int(1)])),
        ];
        for entry in malformed {
            let kept = copied(HeaderValue::Array(vec![entry.clone(), good.clone()]));
            assert_eq!(kept, Some(HeaderValue::Array(vec![good.clone()])), "{entry:?}");
            assert_eq!(copied(HeaderValue::Array(vec![entry.clone()])), None, "{entry:?}");
        }
        assert_eq!(copied(HeaderValue::from("not a list")), None);
        assert_eq!(copied(HeaderValue::Array(vec![])), None);
    }
}
