//! Settling beyond the plain path, on every broker of `common::broker_uris()`: the retry state
//! a route reads is the one made for its own queue, and a message whose retry or dead letter
//! cannot be published goes back to its queue without being taken for a crash.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker_uris, config, unique};
use micro_framework::amqp::entrypoints::{EventListener, QueueListener};
use micro_framework::config::RetryDelay;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOffData};
use micro_framework::testing::TestService;
use serde_json::{json, Value};

/// The retry counts a route's target saw, in order.
#[derive(Default)]
struct Journal(Mutex<Vec<u32>>);

impl Journal {
    fn entries(&self) -> Vec<u32> {
        self.0.lock().unwrap().clone()
    }
}

/// Fails until its retry number `fail_until`, recording each attempt's retry count.
fn flaky(
    Payload(payload): Payload<Value>,
    retry: BackOffData,
    Dep(journal): Dep<Arc<Journal>>,
) -> Result<(), std::io::Error> {
    journal.0.lock().unwrap().push(retry.retry_count);
    match u64::from(retry.retry_count) < payload["fail_until"].as_u64().unwrap_or(u64::MAX) {
        true => Err(std::io::Error::other(format!("attempt {} failed", retry.retry_count))),
        false => Ok(()),
    }
}

/// Each broker with the retry layouts it has: delay queues everywhere, and the delayed-message
/// plugin on the in-process broker that emulates it (RabbitMQ here has no plugin).
fn brokers_and_layouts() -> Vec<(String, RetryDelay)> {
    let plugin =
        format!("memory://test-{}?plugins=rabbitmq_delayed_message_exchange", uuid::Uuid::new_v4());
    let delay_queues = broker_uris().into_iter().map(|uri| (uri, RetryDelay::DelayQueues));
    delay_queues.chain([(plugin, RetryDelay::DelayedMessagePlugin)]).collect()
}

/// A dead letter keeps the headers of the message (its retry count, and under delay queues the
/// `x-death` of its passes through them): a route that consumes the dead-letter queue to
/// process its messages again, with a backoff of its own, starts its retries from 0.
#[tokio::test]
async fn a_route_consuming_a_dead_letter_queue_makes_its_own_retries() {
    for (uri, layout) in brokers_and_layouts() {
        let shop = unique("reprocess");
        let config = config(&uri, "reprocess").with_retry_delay(layout);
        let markers = [config.service_name.clone(), shop.clone()];
        let dlq = format!("evt-{shop}-job--{}.flaky.dlq", config.service_name);
        let (first, again) = (Arc::new(Journal::default()), Arc::new(Journal::default()));
        let routes = vec![
            Route::new(flaky)
                .entrypoint(EventListener::new(&shop, "job"))
                .backoff(AsyncBackOff::new(1, Duration::from_millis(20)))
                .dependency(Shared(first.clone())),
            Route::new(flaky)
                .name("reprocess")
                .entrypoint(QueueListener::new(&dlq))
                .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
                .dependency(Shared(again.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        // fails its first attempt and its one retry: dead-lettered after retry 1
        service.dispatch(&shop, "job", &json!({ "fail_until": 2 })).await.unwrap();
        let reprocess = service.route("reprocess").unwrap().clone();
        common::wait_until(|| reprocess.stats().succeeded_count() == 1, "the reprocessing").await;
        assert_eq!(first.entries(), [0, 1], "{uri} {layout:?}");
        assert_eq!(again.entries(), [0, 1, 2], "{uri} {layout:?}: the reprocessor's own retries");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}
