//! The consume loop shared by queue-based entrypoints: receive, hand to the route, settle,
//! and stop as the worker mode says.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::data::Handled;
use crate::data::Message;
use crate::data::{Failure, FailureKind};
use crate::error::Result;
use crate::pipeline::settle::settle;
use crate::pipeline::RouteHandle;
use crate::transport::{ConsumeOptions, Delivery, HeaderValue, OutgoingMessage, PublishOptions};

/// Decides whether a message is for the route; others are acked and skipped.
pub(crate) type Accept = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

/// Header: how many times a message came back unsettled (classic queues; quorum queues count
/// in `x-delivery-count`).
pub const HEADER_REDELIVERIES: &str = "x-mf-redeliveries";

const RECONSUME_PAUSE: Duration = Duration::from_secs(1);
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// Consume `queue` for `route` until the service stops.
///
/// On stop: the consumer is cancelled; messages received but not started are handed back
/// (`thread` modes) or handled (`greedy_*` modes); running calls finish and are settled,
/// within `SHUTDOWN_TIMEOUT` (past it, unsettled messages go back to the queue when the
/// connection closes).
pub(crate) async fn serve_queue(route: RouteHandle, queue: String, accept: Accept) -> Result<()> {
    let options = ConsumeOptions { prefetch: route.prefetch(), ..ConsumeOptions::default() };
    let tasks = TaskTracker::new();
    let queue: Arc<str> = queue.into();
    let mut consumer = route.transport().consume(&queue, options.clone()).await?;
    loop {
        tokio::select! {
            biased;
            _ = route.stopping().cancelled() => break,
            delivery = consumer.next() => match delivery {
                Some(delivery) => {
                    tasks.spawn(handle(route.clone(), queue.clone(), delivery, accept.clone()));
                }
                None => {
                    tracing::warn!(route = route.name(), "consumer of {queue} ended; consuming again");
                    tokio::select! {
                        _ = route.stopping().cancelled() => break,
                        _ = tokio::time::sleep(RECONSUME_PAUSE) => {}
                    }
                    match route.transport().consume(&queue, options.clone()).await {
                        Ok(next) => consumer = next,
                        Err(error) => tracing::error!(route = route.name(), "cannot consume {queue}: {error}"),
                    }
                }
            }
        }
    }
    consumer.cancel();
    while let Ok(Some(delivery)) = tokio::time::timeout(DRAIN_WAIT, consumer.next()).await {
        tasks.spawn(handle(route.clone(), queue.clone(), delivery, accept.clone()));
    }
    tasks.close();
    let limit = route.config().shutdown_timeout;
    if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
        tracing::warn!(
            route = route.name(),
            "calls still running after SHUTDOWN_TIMEOUT ({limit:?}); their messages go back to {queue}"
        );
    }
    Ok(())
}

async fn handle(route: RouteHandle, queue: Arc<str>, delivery: Delivery, accept: Accept) {
    let Some(delivery) = guard_crash_loop(&route, &queue, delivery).await else { return };
    let message = delivery.message();
    if !accept(&message) {
        if let Err(error) = delivery.acker.ack().await {
            tracing::warn!(route = route.name(), "cannot ack a skipped message: {error}");
        }
        route.skipped();
        return;
    }
    let Some(permit) = route.acquire().await else {
        if let Err(error) = delivery.acker.nack(true).await {
            tracing::warn!(route = route.name(), "cannot hand a message back: {error}");
        }
        return;
    };
    let handled = route.handle(permit, message).await;
    settle(&route, &queue, delivery, &handled).await;
    route.settled(&handled);
}

/// Count the times a message came back unsettled (its worker or the service died while
/// handling it) and dead-letter it past `MAX_REDELIVERIES`, so one poison message cannot
/// crash-loop the service. Quorum queues count in `x-delivery-count`; on classic queues a
/// redelivered message is published again (confirmed) with the count in a header, then acked:
/// the copy is handled later. Returns the delivery to handle now, if any.
async fn guard_crash_loop(
    route: &RouteHandle,
    queue: &str,
    delivery: Delivery,
) -> Option<Delivery> {
    let headers = &delivery.properties.headers;
    let limit = i64::from(route.config().max_redeliveries);
    let quorum_count = headers.get("x-delivery-count").and_then(HeaderValue::as_i64);
    let count = match quorum_count {
        Some(count) => count,
        None if !delivery.redelivered => return Some(delivery),
        None => headers
            .get(HEADER_REDELIVERIES)
            .and_then(HeaderValue::as_i64)
            .unwrap_or(0)
            .saturating_add(1),
    };
    if count <= limit && quorum_count.is_some() {
        return Some(delivery);
    }
    if count > limit {
        let failure = Failure::new(
            FailureKind::Crashed,
            format!(
                "delivered {} times without being settled (MAX_REDELIVERIES={limit}): its \
                 handling may crash the worker or the service",
                count.saturating_add(1)
            ),
        );
        let handled = Handled::Failed(failure);
        settle(route, queue, delivery, &handled).await;
        route.settled(&handled);
        return None;
    }
    let mut properties = delivery.properties.clone();
    properties.headers.insert(HEADER_REDELIVERIES.into(), HeaderValue::Int(count));
    let copy = OutgoingMessage { body: delivery.body.clone(), properties };
    let published =
        route.transport().publish("", queue, copy, PublishOptions { mandatory: true }).await;
    let settled = match published {
        Ok(()) => delivery.acker.ack().await,
        Err(error) => {
            tracing::warn!(
                route = route.name(),
                "cannot count a redelivery ({error}); handling it"
            );
            return Some(delivery);
        }
    };
    if let Err(error) = settled {
        tracing::warn!(route = route.name(), "cannot ack a counted redelivery: {error}");
    }
    None
}
