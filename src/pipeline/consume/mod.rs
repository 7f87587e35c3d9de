//! The one consume loop of every queue-fed entrypoint (events, work queues, RPC): receive,
//! guard against crash loops, hand each delivery to its handler, consume again after a dropped
//! consumer, and stop as the worker mode says.

mod backoff_queue;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::data::{Failure, FailureKind, Handled, HeaderValue, Headers, Message};
use crate::error::Result;
use crate::pipeline::delayed_message::{self, RetryMeta};
use crate::pipeline::settle::{copy_properties, settle};
use crate::pipeline::RouteHandle;
use crate::transport::{
    ConsumeOptions, Delivery, Limit, OutgoingMessage, PublishOptions, SharedTransport,
    TransportError,
};
use backoff_queue::BackoffQueue;

/// Header: how many times a message came back unsettled, as counted on the copies the
/// service publishes of it (quorum queues add their own count, `x-delivery-count`).
pub const HEADER_REDELIVERIES: &str = "x-mf-redeliveries";
/// Header of a copy published straight to a queue (a counted redelivery, a hand-back, a
/// retry): the exchange the message was first published to.
const HEADER_FIRST_EXCHANGE: &str = "x-mf-redelivered-exchange";
/// Header of a copy published straight to a queue: the routing key the message was first
/// published with.
const HEADER_FIRST_ROUTING_KEY: &str = "x-mf-redelivered-routing-key";
/// The header in which quorum queues count a message's deliveries.
const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";

const RECONSUME_PAUSE: Duration = Duration::from_secs(1);
const DRAIN_WAIT: Duration = Duration::from_secs(5);
const CRASH_PAUSE: Duration = Duration::from_secs(1);

/// What a queue's consumer does with each delivery.
#[async_trait]
pub(crate) trait DeliveryHandler: Send + Sync + 'static {
    /// Handle `delivery` and settle it.
    async fn handle(&self, delivery: Delivery);

    /// Settle, without handling it, a delivery that came back unsettled more than
    /// `MAX_REDELIVERIES` times: its handling may crash the worker or the service.
    async fn refuse(&self, delivery: Delivery, failure: Failure);

    /// Whether the queue is a quorum queue, whose own count of a redelivered message's
    /// deliveries (`x-delivery-count`) the crash-loop guard may trust. On any other queue
    /// that header is whatever the publisher wrote, so the default (`false`) ignores it and
    /// counts with copies, which works on every queue type.
    fn quorum(&self) -> bool {
        false
    }
}

/// Where and how to consume.
#[derive(Clone, Debug)]
pub(crate) struct QueueSource {
    /// The broker connection.
    pub transport: SharedTransport,
    /// The queue consumed.
    pub queue: Arc<str>,
    /// The consumer's prefetch.
    pub prefetch: u16,
    /// Fires when the service begins to stop.
    pub stopping: CancellationToken,
    /// How long running calls may take to finish once stopping.
    pub shutdown_timeout: Duration,
    /// How many unsettled redeliveries a message may have before it is refused.
    pub max_redeliveries: u32,
    /// The name used in logs (a route, or the RPC server).
    pub label: Arc<str>,
}

/// Consume `source.queue` with `handler` until the service stops.
///
/// On stop: the consumer is cancelled; deliveries already received are still handed to the
/// handler (which hands unstarted ones back in `thread` modes, or handles them in `greedy_*`
/// modes); running handlers get `SHUTDOWN_TIMEOUT` to finish (past it, unsettled messages go
/// back to the queue when the connection closes).
pub(crate) async fn consume(source: QueueSource, handler: Arc<dyn DeliveryHandler>) -> Result<()> {
    let options = ConsumeOptions { prefetch: source.prefetch, ..ConsumeOptions::default() };
    let (queue, label) = (&source.queue, &source.label);
    let tasks = TaskTracker::new();
    let mut consumer = source.transport.consume(queue, options.clone()).await?;
    loop {
        tokio::select! {
            biased;
            _ = source.stopping.cancelled() => break,
            delivery = consumer.next() => match delivery {
                Some(delivery) => {
                    tasks.spawn(receive(source.clone(), handler.clone(), delivery));
                }
                None => {
                    tracing::warn!(route = %label, "consumer of {queue} ended; consuming again");
                    tokio::select! {
                        _ = source.stopping.cancelled() => break,
                        _ = tokio::time::sleep(RECONSUME_PAUSE) => {}
                    }
                    match source.transport.consume(queue, options.clone()).await {
                        Ok(next) => consumer = next,
                        Err(error) => tracing::error!(route = %label, "cannot consume {queue}: {error}"),
                    }
                }
            }
        }
    }
    consumer.cancel();
    while let Ok(Some(delivery)) = tokio::time::timeout(DRAIN_WAIT, consumer.next()).await {
        tasks.spawn(receive(source.clone(), handler.clone(), delivery));
    }
    tasks.close();
    let limit = source.shutdown_timeout;
    if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
        tracing::warn!(
            route = %label,
            "calls still running after SHUTDOWN_TIMEOUT ({limit:?}); their messages go back to {queue}"
        );
    }
    Ok(())
}

async fn receive(source: QueueSource, handler: Arc<dyn DeliveryHandler>, delivery: Delivery) {
    // The rare paths are boxed: this future is moved into a task for every delivery, and
    // moving it copies all of it.
    let guarded = match check_crash_loop(&source, handler.quorum(), delivery) {
        Checked::Guarded(guarded) => guarded,
        Checked::Count(delivery, count) => {
            Box::pin(count_redelivery(&source, delivery, count)).await
        }
    };
    match guarded {
        Guarded::Handle(delivery) => {
            if delivery.properties.headers.contains_key(HEADER_REDELIVERIES) {
                // A counted copy of a message that may have crashed the service: wait before
                // running it again, so a crash loop is no hot loop and the ack of the message
                // it replaces reaches the broker before a new crash could lose it.
                Box::pin(crash_pause(&source)).await;
            }
            handler.handle(delivery).await
        }
        Guarded::Refuse(delivery, failure) => handler.refuse(delivery, failure).await,
        Guarded::Counted => {}
    }
}

async fn crash_pause(source: &QueueSource) {
    tokio::select! {
        _ = source.stopping.cancelled() => {}
        _ = tokio::time::sleep(CRASH_PAUSE) => {}
    }
}

enum Guarded {
    Handle(Delivery),
    Refuse(Delivery, Failure),
    /// Published again with its count and acked: the copy is handled later.
    Counted,
}

enum Checked {
    Guarded(Guarded),
    /// Redelivered from a classic queue: to count (this many times) before it is handled.
    Count(Delivery, i64),
}

/// Count the times a message came back unsettled (its worker or the service died while
/// handling it) and refuse it past `MAX_REDELIVERIES`, so one poison message cannot
/// crash-loop the service. A fresh delivery is never counted: messages handed back unstarted
/// come back as fresh copies ([`hand_back`]). On a redelivery, the count is that of the
/// copies ([`HEADER_REDELIVERIES`]) plus, from a `quorum` queue, the broker's own; from any
/// other queue the message is published again (confirmed) straight to its queue with its count
/// one higher ([`count_redelivery`]), then acked.
fn check_crash_loop(source: &QueueSource, quorum: bool, mut delivery: Delivery) -> Checked {
    restore_first_route(&mut delivery);
    if !delivery.redelivered {
        return Checked::Guarded(Guarded::Handle(delivery));
    }
    let limit = i64::from(source.max_redeliveries);
    let counted = redeliveries(&delivery, quorum);
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

/// How many times `delivery` came back unsettled so far: the count its copies carry, plus,
/// on a redelivery from a `quorum` queue, the broker's count.
fn redeliveries(delivery: &Delivery, quorum: bool) -> i64 {
    let headers = &delivery.properties.headers;
    let copies = headers.get(HEADER_REDELIVERIES).and_then(HeaderValue::as_i64).unwrap_or(0);
    let broker = match quorum && delivery.redelivered {
        true => headers.get(HEADER_DELIVERY_COUNT).and_then(HeaderValue::as_i64).unwrap_or(0),
        false => 0,
    };
    copies.max(0).saturating_add(broker.max(0))
}

/// Give back to `queue` a delivery the service received but will not start (it is stopping):
/// a copy with the count it came with ([`redeliveries`]; a `quorum` queue's count moves into
/// the copy) is published (confirmed) straight to `queue`, then the delivery is acked. The
/// copy comes as a fresh delivery, which the crash-loop guard does not count, whereas a
/// requeued delivery comes back marked redelivered, indistinguishable from one whose handling
/// crashed. The copy goes to the tail of the queue. When it cannot be published, the delivery
/// is requeued instead (and counted when it comes back).
pub(crate) async fn hand_back(
    transport: &SharedTransport,
    queue: &str,
    quorum: bool,
    delivery: Delivery,
    label: &str,
) {
    let count = redeliveries(&delivery, quorum);
    let mut properties = copy_properties(&delivery.properties);
    let headers = &mut properties.headers;
    match count {
        0 => headers.remove(HEADER_REDELIVERIES),
        count => headers.insert(HEADER_REDELIVERIES.into(), HeaderValue::Int(count)),
    };
    mark_first_route(headers, &delivery.exchange, &delivery.routing_key);
    let copy = OutgoingMessage { body: delivery.body.clone(), properties };
    let options = PublishOptions { mandatory: true };
    let settled = match transport.publish("", queue, copy, options).await {
        Ok(()) => delivery.acker.ack().await,
        Err(error) => {
            tracing::warn!(
                route = label,
                "cannot hand a message back as a copy ({error}); requeued"
            );
            delivery.acker.nack(true).await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(route = label, "cannot hand a message back: {error}");
    }
}

/// Publish a redelivered message again straight to its queue with its `count`, then ack it.
async fn count_redelivery(source: &QueueSource, delivery: Delivery, count: i64) -> Guarded {
    let mut properties = copy_properties(&delivery.properties);
    let headers = &mut properties.headers;
    headers.insert(HEADER_REDELIVERIES.into(), HeaderValue::Int(count));
    mark_first_route(headers, &delivery.exchange, &delivery.routing_key);
    let copy = OutgoingMessage { body: delivery.body.clone(), properties };
    let options = PublishOptions { mandatory: true };
    match source.transport.publish("", &source.queue, copy, options).await {
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

/// Record in the `headers` of a copy that goes to its queue by another route (straight, or
/// through a delay queue) the `exchange` and `routing_key` the message was first published
/// with, for [`restore_first_route`].
pub(crate) fn mark_first_route(headers: &mut Headers, exchange: &str, routing_key: &str) {
    headers.insert(HEADER_FIRST_EXCHANGE.into(), exchange.into());
    headers.insert(HEADER_FIRST_ROUTING_KEY.into(), routing_key.into());
}

/// A copy came back by another route: give it back the exchange and routing key it was first
/// published with, which handlers read (the RPC method, an event's name) and dead letters
/// record.
fn restore_first_route(delivery: &mut Delivery) {
    let headers = &mut delivery.properties.headers;
    let first = |headers: &Headers, name| {
        headers.get(name).and_then(HeaderValue::as_str).map(str::to_owned)
    };
    if let (Some(exchange), Some(routing_key)) =
        (first(headers, HEADER_FIRST_EXCHANGE), first(headers, HEADER_FIRST_ROUTING_KEY))
    {
        headers.remove(HEADER_FIRST_EXCHANGE);
        headers.remove(HEADER_FIRST_ROUTING_KEY);
        delivery.exchange = exchange;
        delivery.routing_key = routing_key;
    }
}

/// Decides whether a message is for the route; others are acked and skipped.
pub(crate) type Accept = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

/// Consume `queue` (a quorum queue when `quorum`) for `route` alone (events, work queues):
/// each accepted message is handled by the route and settled with the broker (ack, retry or
/// dead letter). A route whose retries wait in a backoff queue consumes that queue too.
pub(crate) async fn serve_route(
    route: RouteHandle,
    queue: String,
    quorum: bool,
    accept: Accept,
) -> Result<()> {
    let source = QueueSource {
        transport: route.transport().clone(),
        queue: queue.as_str().into(),
        prefetch: route.prefetch(),
        stopping: route.stopping().clone(),
        shutdown_timeout: route.config().shutdown_timeout,
        max_redeliveries: route.config().max_redeliveries,
        label: route.name().into(),
    };
    let Some(backoff_queue) = delayed_message::backoff_queue(&route) else {
        return consume(source, Arc::new(RouteQueue { route, queue, quorum, accept })).await;
    };
    let retries = QueueSource { queue: backoff_queue.as_str().into(), ..source.clone() };
    let backoff = BackoffQueue {
        route: route.clone(),
        queue: queue.clone(),
        quorum: delayed_message::backoff_queue_is_quorum(&route),
        backoff_queue,
    };
    let retries = consume(retries, Arc::new(backoff));
    let work = consume(source, Arc::new(RouteQueue { route, queue, quorum, accept }));
    futures::try_join!(work, retries).map(|_| ())
}

struct RouteQueue {
    route: RouteHandle,
    queue: String,
    quorum: bool,
    accept: Accept,
}

#[async_trait]
impl DeliveryHandler for RouteQueue {
    async fn handle(&self, delivery: Delivery) {
        let route = &self.route;
        let message = delivery.message();
        if !(self.accept)(&message) {
            if let Err(error) = delivery.acker.ack().await {
                tracing::warn!(route = route.name(), "cannot ack a skipped message: {error}");
            }
            route.skipped();
            return;
        }
        let Some(permit) = route.acquire().await else {
            hand_back(route.transport(), &self.queue, self.quorum, delivery, route.name()).await;
            return;
        };
        let handled = route.handle(permit, message).await;
        if let Some(done) =
            settle(route, &self.queue, delivery, &handled, &RetryMeta::default()).await
        {
            route.settled(&done);
        }
    }

    /// Dead-letter the message with the reason.
    async fn refuse(&self, delivery: Delivery, failure: Failure) {
        let handled = Handled::Failed(failure);
        if let Some(done) =
            settle(&self.route, &self.queue, delivery, &handled, &RetryMeta::default()).await
        {
            self.route.settled(&done);
        }
    }

    fn quorum(&self) -> bool {
        self.quorum
    }
}
