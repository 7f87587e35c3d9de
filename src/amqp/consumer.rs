//! The consume loop shared by queue-based entrypoints: receive, hand to the route, settle,
//! and stop as the worker mode says.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::amqp::settle::settle;
use crate::amqp::transport::{ConsumeOptions, Delivery};
use crate::error::Result;
use crate::message::Message;
use crate::workers::RouteHandle;

/// Decides whether a message is for the route; others are acked and skipped.
pub(crate) type Accept = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

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
    let message = Message::from_delivery(&delivery);
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
