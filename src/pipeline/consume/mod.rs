//! The one consume loop of every queue-fed entrypoint (events, work queues, RPC): receive,
//! guard against crash loops, hand each delivery to its handler, consume again after a dropped
//! consumer, and stop as the worker mode says.

mod backoff_queue;
mod crash_guard;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::data::{
    drop_retry_state, is_retry_of, is_retry_of_route, Failure, Handled, HeaderValue, Message,
    HEADER_RETRY_COUNT,
};
use crate::error::Result;
use crate::pipeline::delayed_message::{self, RetryMeta};
use crate::pipeline::settle::{
    hand_back_as_retry, hand_back_unstarted, settle, take_pending_dead_letter, Copies, Origin,
    HEADER_REDELIVERIES,
};
use crate::pipeline::spawners::WorkerPermit;
use crate::pipeline::{Ended, RouteHandle, Subscribing};
use crate::transport::{
    Acker, ConsumeOptions, Consumer, Delivery, SharedTransport, TransportError,
};
use backoff_queue::BackoffQueue;
use crash_guard::{
    check_crash_loop, count_redelivery, crash_pause, take_redelivered_mark, Checked, Guarded,
};

const RECONSUME_PAUSE: Duration = Duration::from_secs(1);
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// What a queue's consumer does with each delivery.
#[async_trait]
pub(crate) trait DeliveryHandler: Send + Sync + 'static {
    /// Handle `delivery` and settle it.
    async fn handle(&self, delivery: Delivery);

    /// Settle, without handling it, a delivery that came back unsettled more than
    /// `MAX_REDELIVERIES` times: its handling may crash the worker or the service.
    async fn refuse(&self, delivery: Delivery, failure: Failure);

    /// How copies of the queue's messages go back to it; and whether the queue is a quorum
    /// queue, whose own count of a redelivered message's deliveries (`x-delivery-count`) the
    /// crash-loop guard may trust. On any other queue that header is whatever the publisher
    /// wrote, so the default (straight, not quorum) ignores it and counts with copies, which
    /// works on every queue type.
    fn copies(&self) -> Copies {
        Copies::Straight { quorum: false }
    }

    /// Called once the stop has waited `SHUTDOWN_TIMEOUT` for the running calls: deliveries
    /// still waiting for a worker slot must not start; returns once they are handed back
    /// (or after a short wait, past which they go back with the connection).
    async fn give_up(&self) {}
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
    /// The queue receives nothing but retries (a route's backoff queue, through its delayed
    /// exchange): the headers only the service's copies carry (the route a copy was first
    /// published with, its count, a pending dead letter, a retry state) are read whatever
    /// exchange a delivery came through. Elsewhere only on one published straight to the
    /// queue, as the service publishes its copies: a publisher who may only reach the queue
    /// through some exchange and routing key cannot steer with those headers how its message
    /// is read (an RPC request as another method's).
    pub retries_only: bool,
    /// Held until the first subscription is made (or has failed): the service's start waits.
    pub subscribing: Option<Subscribing>,
}

/// Consume `source.queue` with `handler` until the service stops.
///
/// On stop: the consumer is cancelled; deliveries already received are still handed to the
/// handler (which hands unstarted ones back in `thread` modes, or handles them in `greedy_*`
/// modes); running handlers get `SHUTDOWN_TIMEOUT` to finish (past it, unsettled messages go
/// back to the queue when the connection closes).
pub(crate) async fn consume(
    mut source: QueueSource,
    handler: Arc<dyn DeliveryHandler>,
) -> Result<()> {
    let subscribing = source.subscribing.take();
    let options = ConsumeOptions { prefetch: source.prefetch, ..ConsumeOptions::default() };
    let (queue, label) = (&source.queue, &source.label);
    let tasks = TaskTracker::new();
    let mut consumer = source.transport.consume(queue, options.clone()).await?;
    drop(subscribing);
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
                    match consume_again(&source, &options).await {
                        Some(next) => consumer = next,
                        None => break,
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
        handler.give_up().await;
        tracing::warn!(
            route = %label,
            "calls still running after SHUTDOWN_TIMEOUT ({limit:?}); their messages go back to {queue}"
        );
    }
    Ok(())
}

/// A new consumer of `source.queue`, tried every [`RECONSUME_PAUSE`] until one starts;
/// `None` once stopping. A queue the service declared is declared again with its bindings
/// first (a no-op while it exists), as Nameko's consumers do: one deleted under the service
/// (by hand, say) comes back as the service declared it, and is not consumed while missing
/// (the broker's refusal closes a channel, which the client logs as an error although
/// nothing failed). One it did not declare (taken passively) is waited for.
async fn consume_again(source: &QueueSource, options: &ConsumeOptions) -> Option<Consumer> {
    let (queue, label) = (&source.queue, &source.label);
    loop {
        until_stopping(source, tokio::time::sleep(RECONSUME_PAUSE)).await?;
        match until_stopping(source, source.transport.declare_again(queue)).await? {
            Ok(true) => tracing::warn!(
                route = %label,
                "queue {queue} declared again with its bindings (deleted, if the broker \
                 cancelled its consumer)"
            ),
            Ok(false) => {}
            // Declared again by another with other arguments (a queue type moved, say): it
            // exists, and is consumed as it is.
            Err(error @ TransportError::PreconditionFailed(_)) => tracing::warn!(
                route = %label,
                "cannot declare {queue} again as the service declares it ({error}): consuming \
                 it as it is"
            ),
            // Declared in part (a binding refused): not consumed, as a queue consumed without
            // its bindings would receive nothing, and its consumer never end.
            Err(error) => {
                tracing::error!(route = %label, "cannot declare {queue} again: {error}");
                continue;
            }
        }
        match until_stopping(source, source.transport.consume(queue, options.clone())).await? {
            Ok(next) => return Some(next),
            Err(error) => tracing::error!(route = %label, "cannot consume {queue}: {error}"),
        }
    }
}

/// What `operation` gives, or `None` once the service begins to stop: while the broker is
/// away, the transport waits for it up to its publish timeout, which would hold the stop up.
async fn until_stopping<T>(
    source: &QueueSource,
    operation: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        _ = source.stopping.cancelled() => None,
        done = operation => Some(done),
    }
}

async fn receive(source: QueueSource, handler: Arc<dyn DeliveryHandler>, delivery: Delivery) {
    // The rare paths are boxed: this future is moved into a task for every delivery, and
    // moving it copies all of it.
    let copies = handler.copies();
    let guarded = match check_crash_loop(&source, copies, delivery) {
        Checked::Guarded(guarded) => guarded,
        Checked::Count(delivery, count) => {
            Box::pin(count_redelivery(&source, copies, delivery, count)).await
        }
    };
    match guarded {
        Guarded::Handle(mut delivery) => {
            if let Some(failure) = take_pending_dead_letter(&mut delivery.properties.headers) {
                // its dead letter could not be published: made again, the call not run again
                return handler.refuse(delivery, failure).await;
            }
            if delivery.properties.headers.contains_key(HEADER_REDELIVERIES) {
                // A counted copy of a message that may have crashed the service: wait before
                // running it again, so a crash loop is no hot loop and the ack of the message
                // it replaces reaches the broker before a new crash could lose it.
                Box::pin(crash_pause(&source)).await;
            }
            take_redelivered_mark(&mut delivery);
            handler.handle(delivery).await
        }
        Guarded::Refuse(delivery, failure) => handler.refuse(delivery, failure).await,
        Guarded::Counted => {}
    }
}

/// A worker slot of `route` for `message`, settled by `acker`, or `None` when it is not to run:
/// the service stops (it is handed back to `queue` unstarted, as `copies` go), or its channel
/// was lost while it waited (the broker requeued it, and its redelivery runs it; run here too,
/// it would run twice: it is dropped unsettled).
pub(crate) async fn slot_for(
    route: &RouteHandle,
    queue: &str,
    copies: Copies,
    message: &Message,
    acker: &dyn Acker,
) -> Option<WorkerPermit> {
    let permit = match route.acquire_or_unstarted().await {
        Ok(permit) => permit,
        Err(unstarted) => {
            hand_back_unstarted(route, queue, copies, message, acker, unstarted).await;
            return None;
        }
    };
    if acker.channel_lost() {
        tracing::debug!(
            route = route.name(),
            "not run: its channel was lost while it waited for a slot"
        );
        return None;
    }
    Some(permit)
}

/// `delivery`, which failed for good after `retries` retries: with its count of retries as a
/// retried message carries it (`x-mf-retry-count`), which its dead letter reads to count its
/// attempts. Retries made in the worker (`BackOff`) are in no header of the delivery.
fn count_retries(mut delivery: Delivery, handled: &Handled, retries: u32) -> Delivery {
    if matches!(handled, Handled::Failed(_)) && retries > 0 {
        let count = HeaderValue::Int(i64::from(retries));
        delivery.properties.headers.insert(HEADER_RETRY_COUNT.into(), count);
    }
    delivery
}

/// Decides whether a message is for the route; others are acked and skipped. The error says
/// why it cannot tell (a filter that panicked on the message): the message is bad input.
pub(crate) type Accept = Arc<dyn Fn(&Message) -> std::result::Result<bool, String> + Send + Sync>;

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
        retries_only: false,
        subscribing: route.take_subscribing(),
    };
    let Some(backoff_queue) = delayed_message::backoff_queue(&route) else {
        return consume(source, Arc::new(RouteQueue { route, queue, quorum, accept })).await;
    };
    let retries =
        QueueSource { queue: backoff_queue.as_str().into(), retries_only: true, ..source.clone() };
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

impl RouteQueue {
    async fn settle(&self, delivery: Delivery, handled: &Handled) {
        let origin = Origin { queue: &self.queue, quorum: self.quorum, original: None };
        let (route, meta) = (&self.route, &RetryMeta::default());
        if let Some(done) = settle(route, &origin, &self.queue, delivery, handled, meta).await {
            route.settled(&done);
        }
    }
}

#[async_trait]
impl DeliveryHandler for RouteQueue {
    async fn handle(&self, mut delivery: Delivery) {
        let route = &self.route;
        let headers = &delivery.properties.headers;
        let of_queue = is_retry_of(headers, &self.queue);
        // A retry of another route of a queue that routes share (singleton handlers) is an
        // event of this route's: its filter asks, and its retries start anew. Taken as this
        // route's retry, it ran unfiltered, with the other's retry state.
        let retry = of_queue && is_retry_of_route(headers, &route.identity());
        if of_queue && !retry {
            drop_retry_state(&mut delivery.properties.headers);
        }
        let message = delivery.message();
        // A body over MAX_MESSAGE_SIZE is not read, not even by the filter (which would skip it
        // unseen): the call refuses it, and it is dead-lettered whole.
        let readable = message.body.len() <= route.config().max_message_size;
        // A retry of this route's (its state kept for it by the crash-loop guard) was taken by
        // the filter already: asked again, a filter that changed its mind would have it acked
        // unrun, the failed message gone without a dead letter.
        let accepted = if readable && !retry { (self.accept)(&message) } else { Ok(true) };
        match accepted {
            Ok(true) => {}
            Ok(false) => {
                if let Err(error) = delivery.acker.ack().await {
                    tracing::warn!(route = route.name(), "cannot ack a skipped message: {error}");
                }
                route.skipped();
                return;
            }
            Err(reason) => return self.refuse(delivery, Failure::bad_input(reason)).await,
        }
        let copies = Copies::Straight { quorum: self.quorum };
        let acker = delivery.acker.as_ref();
        let Some(permit) = slot_for(route, &self.queue, copies, &message, acker).await else {
            return;
        };
        let message = Arc::new(message);
        let (handled, retries) = match route.handle_counted(permit, &message).await {
            Ended::Handled(handled, retries) => (handled, retries),
            Ended::Interrupted(interrupted) => {
                let (queue, acker) = (&self.queue, delivery.acker.as_ref());
                let label = route.name();
                hand_back_as_retry(
                    route,
                    queue,
                    Copies::Straight { quorum: self.quorum },
                    &message,
                    interrupted.next(),
                    acker,
                    label,
                )
                .await;
                return;
            }
            Ended::Unstarted(unstarted) => {
                let (queue, acker) = (&self.queue, delivery.acker.as_ref());
                let copies = Copies::Straight { quorum: self.quorum };
                return hand_back_unstarted(route, queue, copies, &message, acker, unstarted).await;
            }
        };
        let delivery = count_retries(delivery, &handled, retries);
        self.settle(delivery, &handled).await;
    }

    /// Dead-letter the message with the reason.
    async fn refuse(&self, delivery: Delivery, failure: Failure) {
        self.settle(delivery, &Handled::Failed(failure)).await;
    }

    fn copies(&self) -> Copies {
        Copies::Straight { quorum: self.quorum }
    }

    async fn give_up(&self) {
        self.route.give_up().await;
    }
}
