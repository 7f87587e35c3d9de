//! Retries and failure handling, on every broker of `common::broker_uris()`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker_uris, config, unique};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOff, BackOffData};
use micro_framework::settle::{HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ROUTE};
use micro_framework::testing::TestService;
use micro_framework::transport::HeaderValue;
use serde_json::{json, Value};

/// What targets saw: (payload "name", retry count), in order.
#[derive(Default)]
struct Journal(Mutex<Vec<(String, u32)>>);

impl Journal {
    fn push(&self, name: &str, retry: u32) {
        self.0.lock().unwrap().push((name.to_owned(), retry));
    }
    fn entries(&self) -> Vec<(String, u32)> {
        self.0.lock().unwrap().clone()
    }
}

/// Fails until its third retry (`retry_count == fail_until`), recording each attempt.
fn flaky(
    Payload(payload): Payload<Value>,
    retry: BackOffData,
    Dep(journal): Dep<Arc<Journal>>,
) -> Result<(), std::io::Error> {
    let name = payload["name"].as_str().unwrap_or_default().to_owned();
    journal.push(&name, retry.retry_count);
    let fail_until = payload["fail_until"].as_u64().unwrap_or(u64::MAX);
    if u64::from(retry.retry_count) < fail_until {
        Err(std::io::Error::other(format!("attempt {} failed", retry.retry_count)))
    } else {
        Ok(())
    }
}

fn header<'a>(message: &'a micro_framework::Message, key: &str) -> &'a HeaderValue {
    message.properties.headers.get(key).unwrap_or(&HeaderValue::Void)
}

#[tokio::test]
async fn the_target_sees_attempts_in_order_and_the_worker_is_free_during_the_delay() {
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("shop");
        let config = config(&uri, "retries").with_max_workers(1);
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(3, Duration::from_millis(300)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "name": "a", "fail_until": 3 })).await.unwrap();
        service.wait_for_route("flaky", 1).await.unwrap(); // a's first attempt failed
                                                           // With one worker, b can only run now if a's delay does not hold the worker, and it
                                                           // runs before a's retry if the retry waits for its delay.
        service.dispatch(&shop, "job", &json!({ "name": "b", "fail_until": 0 })).await.unwrap();
        service.wait_for_route("flaky", 5).await.unwrap();
        let entries = journal.entries();
        assert_eq!(entries[..2], [("a".to_owned(), 0), ("b".to_owned(), 0)]);
        let a: Vec<u32> = entries.iter().filter(|(n, _)| n == "a").map(|(_, r)| *r).collect();
        assert_eq!(a, vec![0, 1, 2, 3]);
        assert_eq!(service.route("flaky").unwrap().stats().retried_count(), 3);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn exhausted_retries_go_to_the_dead_letter_queue_with_the_attempt_count() {
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("shop");
        let config = config(&uri, "exhaust");
        let queue = format!("evt-{shop}-job--{}.flaky", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "name": "doomed" })).await.unwrap();
        service.wait_for_route("flaky", 3).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(3));
        assert_eq!(header(&dead[0], HEADER_ROUTE), &HeaderValue::from("flaky"));
        assert_eq!(header(&dead[0], HEADER_ERROR), &HeaderValue::from("attempt 2 failed"));
        assert_eq!(journal.entries().len(), 3);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn errors_outside_the_filter_fail_at_once() {
    fn formatting(Dep(journal): Dep<Arc<Journal>>) -> Result<(), std::fmt::Error> {
        journal.push("fmt", 0);
        Err(std::fmt::Error)
    }
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("shop");
        let config = config(&uri, "filter");
        let queue = format!("evt-{shop}-job--{}.formatting", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(formatting)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(5, Duration::from_millis(20)).retry_on::<std::io::Error>())
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({})).await.unwrap();
        service.wait_for_route("formatting", 1).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(1));
        assert_eq!(journal.entries().len(), 1);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

fn on_exhausted(
    Payload(payload): Payload<Value>,
    failure: Failure,
    retry: BackOffData,
    Dep(journal): Dep<Arc<Journal>>,
) {
    let name =
        format!("callback {} {}", payload["name"].as_str().unwrap_or_default(), failure.message);
    journal.push(&name, retry.retry_count);
}

#[tokio::test]
async fn the_callback_runs_after_the_last_retry() {
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("shop");
        let config = config(&uri, "callback");
        let queue = format!("evt-{shop}-job--{}.flaky", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![CallbackRoute::new(flaky, on_exhausted)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "name": "x" })).await.unwrap();
        service.wait_for_route("flaky", 3).await.unwrap();
        let entries = journal.entries();
        assert_eq!(entries.last().unwrap(), &("callback x attempt 2 failed".to_owned(), 2));
        assert_eq!(service.queue_len(&format!("{queue}.dlq")).await.unwrap(), 0);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn in_worker_backoff_retries_in_the_same_call() {
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("shop");
        let config = config(&uri, "inworker");
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(BackOff::new(3, Duration::from_millis(5)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "name": "w", "fail_until": 2 })).await.unwrap();
        service.wait_for_route("flaky", 1).await.unwrap();
        let retries: Vec<u32> = journal.entries().iter().map(|(_, r)| *r).collect();
        assert_eq!(retries, vec![0, 1, 2]);
        assert_eq!(service.route("flaky").unwrap().stats().succeeded_count(), 1);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_restart_while_retries_are_pending_loses_none() {
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("shop");
        let config = config(&uri, "restart");
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = || {
            vec![Route::new(flaky)
                .entrypoint(EventListener::new(&shop, "job"))
                .backoff(AsyncBackOff::new(1, Duration::from_millis(300)))
                .dependency(Shared(journal.clone()))]
        };
        let service = TestService::start(routes(), config.clone()).await.unwrap();
        for name in ["p", "q", "r"] {
            service
                .dispatch(&shop, "job", &json!({ "name": name, "fail_until": 1 }))
                .await
                .unwrap();
        }
        service.wait_for_route("flaky", 3).await.unwrap(); // three retries scheduled
        service.stop().await.unwrap();
        let service = TestService::start(routes(), config).await.unwrap();
        service.wait_for_route("flaky", 3).await.unwrap();
        let mut retried: Vec<String> =
            journal.entries().into_iter().filter(|(_, r)| *r == 1).map(|(n, _)| n).collect();
        retried.sort();
        assert_eq!(retried, vec!["p", "q", "r"]);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

fn blocking(Payload(_): Payload<Value>, Dep(probe): Dep<Arc<common::Probe>>) {
    probe.enter(Value::Null);
    probe.leave();
}

#[tokio::test]
async fn a_message_that_keeps_crashing_its_service_is_dead_lettered() {
    use micro_framework::config::QueueType;
    use micro_framework::settle::HEADER_ERROR_KIND;
    for uri in broker_uris() {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let shop = unique("shop");
            let config = config(&uri, "crash").with_max_redeliveries(2).with_queue_type(queue_type);
            let queue = format!("evt-{shop}-job--{}.blocking", config.service_name);
            let markers = [config.service_name.clone(), shop.clone()];
            let mut crashes = 0;
            loop {
                let probe = common::Probe::closed();
                let routes = vec![Route::new(blocking)
                    .entrypoint(EventListener::new(&shop, "job"))
                    .dependency(Shared(probe.clone()))];
                let service = TestService::start(routes, config.clone()).await.unwrap();
                if crashes == 0 {
                    service.dispatch(&shop, "job", &json!({ "poison": true })).await.unwrap();
                }
                // Either the call starts (and we crash the service under it), or the message
                // is dead-lettered as a crash loop.
                let dlq = format!("{queue}.dlq");
                let mut dead = Vec::new();
                for _ in 0..400 {
                    if probe.started() > 0 {
                        break;
                    }
                    dead = service.take_messages(&dlq).await.unwrap();
                    if !dead.is_empty() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                if !dead.is_empty() {
                    assert_eq!(header(&dead[0], HEADER_ERROR_KIND), &HeaderValue::from("crashed"));
                    assert_eq!(crashes, 3, "{queue_type:?}: two redeliveries allowed, then out");
                    probe.open();
                    service.stop().await.unwrap();
                    break;
                }
                assert!(probe.started() > 0, "the message is handled or dead-lettered");
                // A crash: the connection goes away while the call runs.
                service.transport().close().await;
                probe.open();
                let _ = service.stop().await;
                crashes += 1;
                assert!(
                    crashes <= 3,
                    "{queue_type:?}: still not dead-lettered after {crashes} crashes"
                );
            }
            common::cleanup(&uri, &markers).await;
        }
    }
}

#[tokio::test]
async fn the_delayed_message_plugin_mechanism_says_clearly_when_the_plugin_is_missing() {
    use micro_framework::config::RetryDelay;
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "plugin").with_retry_delay(RetryDelay::DelayedMessagePlugin);
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(10)))
            .dependency(Shared(Arc::new(Journal::default())))];
        let error = TestService::start(routes, config).await.unwrap_err();
        assert!(error.to_string().contains("rabbitmq_delayed_message_exchange"), "{error}");
        assert!(error.to_string().contains("RETRY_DELAY=delay_queues"), "{error}");
        common::cleanup(&uri, &markers).await;
    }
}
