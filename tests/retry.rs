//! Retries and failure handling, on every broker of `common::broker_uris()`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::queues::event_with_a_250_byte_queue;
use common::{broker_uris, config, unique};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOff, BackOffData, BackOffPolicy};
use micro_framework::settle::{HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ROUTE};
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeKind, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, PublishOptions,
    QueueSpec, TransportError,
};
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

/// A started service whose `flaky` route takes the `job` events of a shop of its own.
struct Flaky {
    service: TestService,
    /// What `flaky` saw, attempt by attempt.
    journal: Arc<Journal>,
    shop: String,
    /// The route's queue, `evt-{shop}-job--{service}.flaky`.
    queue: String,
    /// The names `common::cleanup` removes after the test: the service's and the shop's.
    markers: [String; 2],
}

/// Start a service of `config` whose `flaky` route, retried by `backoff`, takes the `job`
/// events of a new shop and records its attempts in a journal of its own: the set-up of most
/// tests here, which differ in the config, the backoff and what they send.
async fn start_flaky(config: Config, backoff: BackOffPolicy) -> Flaky {
    let journal = Arc::new(Journal::default());
    let shop = unique("shop");
    let queue = format!("evt-{shop}-job--{}.flaky", config.service_name);
    let markers = [config.service_name.clone(), shop.clone()];
    let routes = vec![Route::new(flaky)
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(backoff)
        .dependency(Shared(journal.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    Flaky { service, journal, shop, queue, markers }
}

#[tokio::test]
async fn the_target_sees_attempts_in_order_and_the_worker_is_free_during_the_delay() {
    for uri in broker_uris() {
        let config = config(&uri, "retries").with_max_workers(1);
        let backoff = AsyncBackOff::new(3, Duration::from_millis(300));
        let Flaky { service, journal, shop, markers, .. } = start_flaky(config, backoff).await;
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
        let backoff = AsyncBackOff::new(2, Duration::from_millis(20));
        let Flaky { service, journal, shop, queue, markers } =
            start_flaky(config(&uri, "exhaust"), backoff).await;
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
async fn under_quorum_queues_retries_wait_in_a_quorum_delay_queue() {
    // a classic delay queue lives on the one node it was declared through: with that node
    // down, the retries waiting in it waited for it and those failing meanwhile could not be
    // scheduled (each spent a retry at once); with the node removed, they were lost
    use micro_framework::config::QueueType;
    for uri in broker_uris() {
        let config = config(&uri, "qdelay").with_queue_type(QueueType::Quorum);
        let backoff = AsyncBackOff::new(2, Duration::from_millis(200));
        let Flaky { service, journal, shop, queue, markers } = start_flaky(config, backoff).await;
        service.dispatch(&shop, "job", &json!({ "name": "doomed" })).await.unwrap();
        service.wait_for_route("flaky", 3).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1, "{uri}");
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(3), "{uri}");
        let HeaderValue::Array(deaths) = header(&dead[0], "x-death") else {
            panic!("{uri}: no x-death in {:?}", dead[0].properties.headers)
        };
        let delay_queue = format!("{queue}.quorum-delay-200");
        let passes: Vec<(&str, i64)> = deaths
            .iter()
            .filter_map(|death| match death {
                HeaderValue::Table(table) => Some((
                    table.get("queue").and_then(HeaderValue::as_str).unwrap_or_default(),
                    table.get("count").and_then(HeaderValue::as_i64).unwrap_or_default(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(passes, [(delay_queue.as_str(), 2)], "{uri}");
        // declared with arguments: a plain durable declaration of it is refused
        let plain = QueueSpec::durable(&delay_queue);
        let refused = service.transport().declare_queue(&plain).await.unwrap_err();
        assert!(matches!(refused, TransportError::PreconditionFailed(_)), "{uri}: {refused}");
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
        let backoff = BackOff::new(3, Duration::from_millis(5));
        let Flaky { service, journal, shop, markers, .. } =
            start_flaky(config(&uri, "inworker"), backoff).await;
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

/// A lost connection is no crash: the calls running then have their messages redelivered by
/// the broker, and with `MAX_REDELIVERIES=0` they run again rather than being dead-lettered.
#[tokio::test]
async fn a_connection_lost_while_a_call_runs_does_not_count_against_max_redeliveries() {
    use micro_framework::config::QueueType;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("lossuser");
    let uri = user.uri(&uri);
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let shop = unique("shop");
        let config = config(&uri, "loss").with_max_redeliveries(0).with_queue_type(queue_type);
        let dlq = format!("evt-{shop}-job--{}.blocking.dlq", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let probe = common::Probe::closed();
        let routes = vec![Route::new(blocking)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "id": 1 })).await.unwrap();
        common::wait_until(|| probe.started() == 1, "the call to start").await;
        user.close_connections();
        common::wait_until(|| probe.started() == 2, "the redelivered message to run").await;
        probe.open();
        service.wait_for_route("blocking", 2).await.unwrap();
        let dead = service.take_messages(&dlq).await.unwrap();
        assert!(dead.is_empty(), "{queue_type:?}: dead-lettered as a crash: {dead:?}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// Deliveries received and still waiting for a worker slot when the connection is lost are
/// not run once a slot is free: the broker requeued them with the connection, and their
/// redeliveries run (was: both ran, each message twice).
#[tokio::test]
async fn deliveries_waiting_for_a_slot_when_the_connection_is_lost_run_once() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("waituser");
    let uri = user.uri(&uri);
    let shop = unique("shop");
    let config = config(&uri, "waiting").with_max_workers(1).with_prefetch_count(Some(4));
    let markers = [config.service_name.clone(), shop.clone()];
    let probe = common::Probe::closed();
    let routes = vec![Route::new(blocking)
        .entrypoint(EventListener::new(&shop, "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    for id in 0..3 {
        service.dispatch(&shop, "job", &json!({ "id": id })).await.unwrap();
    }
    common::wait_until(|| probe.started() == 1, "the first call to start").await;
    user.close_connections();
    // the redeliveries wait for the slot behind the deliveries received before the loss
    common::wait_until(|| service.transport().reconnects() > 0, "the reconnect").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    probe.open();
    // the first call ran unacked (its ack lost with the connection): it runs again
    common::wait_until(|| probe.started() >= 4, "the calls").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = probe.started();
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
    assert_eq!(runs, 4, "the first message twice, the two others once each");
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

// ---------------------------------------------------------------------------------------
// RETRY_DELAY=delayed_message_plugin: the Python original's layout, on the in-process broker
// with the plugin emulated (RabbitMQ here has no plugin).

/// A private in-process broker with the delayed-message plugin emulated.
fn plugin_broker() -> String {
    format!("memory://test-{}?plugins=rabbitmq_delayed_message_exchange", uuid::Uuid::new_v4())
}

/// What the Python original publishes when a call of `payload` fails for the `retry_count`-th
/// time, `_meta` keys of its own beside the retry state.
fn python_retry(payload: &Value, retry_count: u32, last_retry: f64) -> OutgoingMessage {
    let body = json!({
        "fn_args": [payload],
        "fn_kwargs": {},
        "_meta": { "trace": { "id": 7 }, "backoff": { "retry_count": retry_count, "last_retry": last_retry } },
    });
    let mut properties = micro_framework::data::json_properties();
    properties.headers.insert("x-delay".into(), HeaderValue::Int(20));
    OutgoingMessage { body: body.to_string().into(), properties }
}

/// Binds a spy queue beside the backoff queue of `service_name`'s `route`: it gets each retry
/// as published.
async fn spy_on_retries(service: &TestService, service_name: &str, route: &str) -> String {
    let transport = service.transport();
    let spy = unique("spy");
    transport.declare_queue(&QueueSpec::durable(&spy)).await.unwrap();
    let binding = BindingSpec {
        queue: spy.clone(),
        exchange: format!("{service_name}_backoff"),
        routing_key: format!("{route}_backoff"),
        arguments: Default::default(),
    };
    transport.bind_queue(&binding).await.unwrap();
    spy
}

/// The body of a wrapped retry, and its `_meta.backoff.retry_count`.
fn unwrap_retry(message: &micro_framework::Message) -> (Value, u64) {
    let body: Value = serde_json::from_slice(&message.body).unwrap();
    let count = body["_meta"]["backoff"]["retry_count"].as_u64().expect("a retry count");
    (body, count)
}

#[tokio::test]
async fn under_the_delayed_message_plugin_retries_take_the_python_layout_then_dead_letter() {
    use micro_framework::config::RetryDelay;
    use micro_framework::settle::HEADER_ORIGINAL_QUEUE;
    let uri = plugin_broker();
    let config = config(&uri, "layout").with_retry_delay(RetryDelay::DelayedMessagePlugin);
    let service_name = config.service_name.clone();
    let backoff = AsyncBackOff::new(2, Duration::from_millis(50));
    let Flaky { service, journal, shop, queue, .. } = start_flaky(config, backoff).await;
    let transport = service.transport();
    let exchange = format!("{service_name}_backoff");
    let as_direct = ExchangeSpec {
        kind: ExchangeKind::Direct,
        arguments: Default::default(),
        ..ExchangeSpec::topic(&exchange)
    };
    let error = transport.declare_exchange(&as_direct).await.unwrap_err();
    assert!(error.to_string().contains("'type'"), "{exchange} is no direct exchange: {error}");
    let spy = spy_on_retries(&service, &service_name, "flaky").await;

    let payload = json!({ "name": "p", "text": "café ☕" });
    service.dispatch(&shop, "job", &payload).await.unwrap();
    service.wait_for_route("flaky", 3).await.unwrap();
    let seen: Vec<u32> = journal.entries().iter().map(|(_, retry)| *retry).collect();
    assert_eq!(seen, vec![0, 1, 2], "BackOffData sees each retry's count");
    let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(3));
    assert_eq!(header(&dead[0], HEADER_ORIGINAL_QUEUE), &HeaderValue::from(queue.as_str()));
    assert_eq!(serde_json::from_slice::<Value>(&dead[0].body).unwrap(), payload, "the payload");

    let retries = service.take_messages(&spy).await.unwrap();
    assert_eq!(retries.len(), 2);
    for (n, retry) in retries.iter().enumerate() {
        let (body, count) = unwrap_retry(retry);
        assert_eq!(count, n as u64 + 1);
        assert_eq!((&body["fn_args"], &body["fn_kwargs"]), (&json!([payload]), &json!({})));
        assert!(body["_meta"]["backoff"]["last_retry"].as_f64().unwrap() > 1.6e9, "{body}");
        assert_eq!(
            (retry.exchange.as_str(), retry.routing_key.as_str()),
            (exchange.as_str(), "flaky_backoff")
        );
        assert_eq!(header(retry, "x-delay"), &HeaderValue::Int(-50), "delayed 50 ms, then marked");
    }
    let backoff_queue = format!("{service_name}.flaky_backoff_queue");
    assert_eq!(service.queue_len(&backoff_queue).await.unwrap(), 0);
    assert_eq!(service.route("flaky").unwrap().stats().retried_count(), 2);
    service.stop().await.unwrap();
}

/// What each call of `remembering` saw of its retries.
#[derive(Default)]
struct RetryLog(Mutex<Vec<BackOffData>>);

fn remembering(
    Payload(_): Payload<Value>,
    retry: BackOffData,
    Dep(log): Dep<Arc<RetryLog>>,
) -> Result<(), std::io::Error> {
    log.0.lock().unwrap().push(retry);
    Err(std::io::Error::other("still failing"))
}

#[tokio::test]
async fn a_retry_in_the_python_layout_continues_its_count_and_keeps_its_meta() {
    use micro_framework::config::RetryDelay;
    let uri = plugin_broker();
    let log = Arc::new(RetryLog::default());
    let shop = unique("shop");
    let config = config(&uri, "continue").with_retry_delay(RetryDelay::DelayedMessagePlugin);
    let service_name = config.service_name.clone();
    let queue = format!("evt-{shop}-job--{service_name}.remembering");
    let routes = vec![Route::new(remembering)
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(AsyncBackOff::new(3, Duration::from_millis(20)))
        .dependency(Shared(log.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let spy = spy_on_retries(&service, &service_name, "remembering").await;

    let payload = json!({ "name": "from python" });
    let python = python_retry(&payload, 2, 1_700_000_000.75);
    let options = PublishOptions::default();
    let exchange = format!("{service_name}_backoff");
    service.transport().publish(&exchange, "remembering_backoff", python, options).await.unwrap();
    service.wait_for_route("remembering", 2).await.unwrap();
    let seen = log.0.lock().unwrap().clone();
    let counts: Vec<u32> = seen.iter().map(|retry| retry.retry_count).collect();
    assert_eq!(counts, vec![2, 3], "the count goes on from _meta.backoff.retry_count");
    let last_retry = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(seen[0].last_retry, Some(last_retry), "from _meta.backoff.last_retry");
    assert_eq!(seen[0].max_retries, 3);
    let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
    assert_eq!(dead.len(), 1, "max_retries 3 reached at the third retry");
    assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(4));
    assert_eq!(serde_json::from_slice::<Value>(&dead[0].body).unwrap(), payload);

    let retries = service.take_messages(&spy).await.unwrap();
    let ours = retries.iter().map(unwrap_retry).find(|(_, count)| *count == 3);
    let (body, _) = ours.expect("our retry, number 3");
    assert_eq!(body["_meta"]["trace"], json!({ "id": 7 }), "unknown _meta keys are kept");
    assert_eq!(body["fn_args"], json!([payload]));
    service.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_retries_are_dead_lettered_with_the_reason_and_the_service_goes_on() {
    use micro_framework::config::RetryDelay;
    use micro_framework::settle::{HEADER_ERROR_KIND, HEADER_ORIGINAL_QUEUE};
    let uri = plugin_broker();
    let config = config(&uri, "malformed").with_retry_delay(RetryDelay::DelayedMessagePlugin);
    let backoff_queue = format!("{}.flaky_backoff_queue", config.service_name);
    let backoff = AsyncBackOff::new(3, Duration::from_millis(20));
    let Flaky { service, journal, queue, .. } = start_flaky(config, backoff).await;

    let malformed = [
        ("not json", "not valid JSON"),
        (r#"{"fn_kwargs": {}}"#, "missing field `fn_args`"),
        (r#"{"fn_args": "x", "fn_kwargs": {}}"#, "invalid type"),
        (r#"{"fn_args": [1, 2], "fn_kwargs": {}}"#, "fn_args holds 2 values"),
        (r#"{"fn_args": [1], "fn_kwargs": {"k": 1}}"#, "fn_kwargs [\"k\"] given"),
        (
            r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": {"backoff": {"retry_count": "2"}}}"#,
            "retry_count is not a count",
        ),
    ];
    let options = PublishOptions::default();
    for (body, _) in malformed {
        let message = OutgoingMessage {
            body: body.into(),
            properties: micro_framework::data::json_properties(),
        };
        service.transport().publish("", &backoff_queue, message, options).await.unwrap();
    }
    service.wait_for_route("flaky", malformed.len() as u64).await.unwrap();
    let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
    assert_eq!(dead.len(), malformed.len());
    for (body, reason) in malformed {
        let letter = dead.iter().find(|letter| &letter.body[..] == body.as_bytes());
        let letter = letter.unwrap_or_else(|| panic!("{body} dead-lettered as it came"));
        let error = header(letter, HEADER_ERROR).as_str().unwrap();
        assert!(error.contains("not an AsyncBackOff retry") && error.contains(reason), "{error}");
        assert_eq!(header(letter, HEADER_ERROR_KIND), &HeaderValue::from("bad_input"));
        let from = HeaderValue::from(backoff_queue.as_str());
        assert_eq!(header(letter, HEADER_ORIGINAL_QUEUE), &from);
    }
    assert!(journal.entries().is_empty(), "no call for a malformed retry");

    let fine = json!({ "fn_args": [{ "name": "ok", "fail_until": 0 }], "fn_kwargs": {},
                       "_meta": { "backoff": { "retry_count": 1 } } });
    let message = OutgoingMessage {
        body: fine.to_string().into(),
        properties: micro_framework::data::json_properties(),
    };
    service.transport().publish("", &backoff_queue, message, options).await.unwrap();
    service.wait_for_route("flaky", malformed.len() as u64 + 1).await.unwrap();
    assert_eq!(journal.entries(), vec![("ok".to_owned(), 1)]);
    assert_eq!(service.route("flaky").unwrap().stats().succeeded_count(), 1);
    service.stop().await.unwrap();
}

/// Publish a `job` event of `shop` whose body is neither JSON nor text (the plugin's retry
/// layout cannot carry it).
async fn publish_binary_job(service: &TestService, shop: &str) {
    let mut properties = micro_framework::data::json_properties();
    properties.content_type = Some("application/octet-stream".into());
    let binary = OutgoingMessage { body: vec![0xff, 0x00, 0x01].into(), properties };
    let options = PublishOptions { mandatory: true };
    service.transport().publish(&format!("{shop}.events"), "job", binary, options).await.unwrap();
}

/// Fails each call, recording it: whatever the message, it cannot read it.
fn unreadable(Dep(journal): Dep<Arc<Journal>>) -> Result<(), std::io::Error> {
    journal.push("call", 0);
    Err(std::io::Error::other("cannot read it"))
}

/// A service that got a job whose body the plugin's retry layout cannot carry.
struct BinaryJob {
    service: TestService,
    /// What `unreadable` (and a callback of the route) recorded.
    journal: Arc<Journal>,
    /// The route's queue, `evt-{shop}-job--{service}.unreadable`.
    queue: String,
}

/// Under the delayed-message plugin's layout, start a service named after `name` whose `route`
/// (of [`unreadable`], with or without a callback) takes the `job` events of a new shop with
/// three broker retries, publish it a job of [`publish_binary_job`], and wait for its first
/// call: what the test checks is what became of the failure.
async fn a_binary_job_failed_by(route: Route, name: &str) -> BinaryJob {
    use micro_framework::config::RetryDelay;
    let uri = plugin_broker();
    let journal = Arc::new(Journal::default());
    let shop = unique("shop");
    let config = config(&uri, name).with_retry_delay(RetryDelay::DelayedMessagePlugin);
    let queue = format!("evt-{shop}-job--{}.unreadable", config.service_name);
    let routes = vec![route
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(AsyncBackOff::new(3, Duration::from_millis(20)))
        .dependency(Shared(journal.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    publish_binary_job(&service, &shop).await;
    service.wait_for_route("unreadable", 1).await.unwrap();
    BinaryJob { service, journal, queue }
}

#[tokio::test]
async fn a_body_the_python_layout_cannot_carry_is_dead_lettered_instead_of_retried() {
    let BinaryJob { service, journal, queue } =
        a_binary_job_failed_by(Route::new(unreadable), "binary").await;
    let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].body[..], &[0xff, 0x00, 0x01], "the body as it came");
    let error = header(&dead[0], HEADER_ERROR).as_str().unwrap();
    assert!(error.contains("not retried: this retry layout carries JSON payloads only"), "{error}");
    assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(1));
    assert_eq!(journal.entries().len(), 1, "one attempt, no retry");
    service.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// The crash-loop guard and the route of copies: hand-backs, retries, forged counts.

fn hog(Payload(_): Payload<Value>, Dep(probe): Dep<Arc<common::Probe>>) {
    probe.enter(Value::Null);
    probe.leave();
}

/// How many times `victim` ran.
#[derive(Debug, Default)]
struct VictimCalls(std::sync::atomic::AtomicU64);

fn victim(Payload(_): Payload<Value>, Dep(calls): Dep<Arc<VictimCalls>>) {
    calls.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// The `hog` route: a `hog` event of `shop` holds a worker slot until `probe` opens, so that
/// with one worker what comes next is received but cannot start.
fn hog_route(shop: &str, probe: &Arc<common::Probe>) -> Route {
    Route::new(hog).entrypoint(EventListener::new(shop, "hog")).dependency(Shared(probe.clone()))
}

/// The `victim` route: it counts in `calls` the `job` events of `shop` it runs.
fn victim_route(shop: &str, calls: &Arc<VictimCalls>) -> Route {
    Route::new(victim).entrypoint(EventListener::new(shop, "job")).dependency(Shared(calls.clone()))
}

/// Start `routes` (with [`hog_route`] among them) under `config`, and have a `hog` call of
/// `shop` take the worker slot and hold it until `probe` opens: what the test sends next waits
/// for that slot.
async fn start_with_the_slot_held(
    routes: Vec<Route>,
    config: &Config,
    shop: &str,
    probe: &Arc<common::Probe>,
) -> TestService {
    let service = TestService::start(routes, config.clone()).await.unwrap();
    service.dispatch(shop, "hog", &json!({})).await.unwrap();
    probe.wait_started(1).await;
    service
}

/// A service whose one worker slot the hog holds while a `job` event for the victim waits.
struct VictimWaiting {
    service: TestService,
    /// Keeps the in-process broker (and its queues) alive between the service's starts.
    keeper: micro_framework::transport::SharedTransport,
    /// Opens to let the hog finish.
    probe: Arc<common::Probe>,
    calls: Arc<VictimCalls>,
}

/// Start the hog and the victim of `shop` under `config` (of one worker), have the hog take the
/// slot, and send the victim a `job` event, which is received but cannot start.
async fn a_victim_waiting_for_the_slot(config: &Config, shop: &str) -> VictimWaiting {
    let keeper = micro_framework::transport::connect(config).await.unwrap();
    let calls = Arc::new(VictimCalls::default());
    let probe = common::Probe::closed();
    let routes = vec![hog_route(shop, &probe), victim_route(shop, &calls)];
    let service = start_with_the_slot_held(routes, config, shop, &probe).await;
    service.dispatch(shop, "job", &json!({ "id": 1 })).await.unwrap();
    VictimWaiting { service, keeper, probe, calls }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_handed_back_at_shutdown_are_not_counted_as_crashes() {
    use micro_framework::config::QueueType;
    use std::sync::atomic::Ordering;
    for (uri, queue_type) in broker_uris()
        .into_iter()
        .flat_map(|uri| [(uri.clone(), QueueType::Classic), (uri, QueueType::Quorum)])
    {
        let shop = unique("handback");
        // With no redelivery allowed, one hand-back counted as a crash dead-letters the message.
        let config = config(&uri, "handback")
            .with_max_workers(1)
            .with_max_redeliveries(0)
            .with_queue_type(queue_type);
        let queue = format!("evt-{shop}-job--{}.victim", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let VictimWaiting { service, keeper, probe, calls } =
            a_victim_waiting_for_the_slot(&config, &shop).await;
        // The victim's message is received and waits for the one worker slot, which the hog
        // holds until the service stops: it is handed back unstarted.
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.begin_stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        probe.open();
        service.wait_stopped().await.unwrap();
        assert_eq!(calls.0.load(Ordering::SeqCst), 0, "{queue_type:?}: the victim never ran");

        let routes = vec![hog_route(&shop, &probe), victim_route(&shop, &calls)];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        // The victim's call settles it (its stats count it), and so would a dead letter.
        service.wait_for_route("victim", 1).await.unwrap();
        service.stop().await.unwrap();
        let dlq = format!("{queue}.dlq");
        let dead = micro_framework::testing::take_messages(keeper.as_ref(), &dlq).await.unwrap();
        assert!(dead.is_empty(), "{queue_type:?}: a message that never ran is dead-lettered");
        let left = micro_framework::testing::take_messages(keeper.as_ref(), &queue).await.unwrap();
        assert!(left.is_empty(), "{queue_type:?}: nothing is left in {queue}");
        assert_eq!(calls.0.load(Ordering::SeqCst), 1, "{queue_type:?}: handed back, it runs once");
        keeper.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

/// A greedy-thread service of one worker whose stop gives up on its calls after 500 ms.
fn greedy_one_worker(uri: &str, service: &str) -> Config {
    config(uri, service)
        .with_max_workers(1)
        .with_worker_mode(micro_framework::config::WorkerMode::GreedyThread)
        .with_shutdown_timeout(Duration::from_millis(500))
}

/// A greedy stop that gives up on its calls (past `SHUTDOWN_TIMEOUT`) hands back the
/// messages still waiting for a worker slot as fresh copies, which no restart counts as
/// crashes: with `MAX_REDELIVERIES=0`, the victim, which never ran, runs after the restart
/// (was: left to go back with the connection, it came back redelivered and was dead-lettered
/// as `crashed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_greedy_stop_gave_up_on_unstarted_are_not_counted_as_crashes() {
    use std::sync::atomic::Ordering;
    for uri in broker_uris() {
        let shop = unique("greedyback");
        let config = greedy_one_worker(&uri, "greedyback").with_max_redeliveries(0);
        let queue = format!("evt-{shop}-job--{}.victim", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let VictimWaiting { service, keeper, probe, calls } =
            a_victim_waiting_for_the_slot(&config, &shop).await;
        // The hog holds the one slot past SHUTDOWN_TIMEOUT: the stop gives up on it (its
        // message goes back with the connection) and on the victim waiting for the slot.
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.stop().await.unwrap();
        probe.open();
        assert_eq!(calls.0.load(Ordering::SeqCst), 0, "the victim never ran");

        let routes = vec![hog_route(&shop, &probe), victim_route(&shop, &calls)];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        service.wait_for_route("victim", 1).await.unwrap();
        service.stop().await.unwrap();
        let dlq = format!("{queue}.dlq");
        let dead = micro_framework::testing::take_messages(keeper.as_ref(), &dlq).await.unwrap();
        keeper.close().await;
        common::cleanup(&uri, &markers).await;
        assert!(dead.is_empty(), "{uri}: a message that never ran is dead-lettered: {dead:?}");
        assert_eq!(calls.0.load(Ordering::SeqCst), 1, "{uri}: handed back, it runs once");
    }
}

fn answer(Dep(calls): Dep<Arc<VictimCalls>>) -> u64 {
    calls.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_requests_handed_back_at_shutdown_are_not_counted_as_crashes() {
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::amqp::rpc::Client;
    for uri in broker_uris() {
        let shop = unique("handbackrpc");
        // With no redelivery allowed, one hand-back counted as a crash refuses the request.
        let config = config(&uri, "handbackrpc").with_max_workers(1).with_max_redeliveries(0);
        let keeper = micro_framework::transport::connect(&config).await.unwrap();
        let calls = Arc::new(VictimCalls::default());
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = |probe: &Arc<common::Probe>| {
            let answering = Route::new(answer).entrypoint(RPCListener::new());
            vec![hog_route(&shop, probe), answering.dependency(Shared(calls.clone()))]
        };
        let probe = common::Probe::closed();
        let service = start_with_the_slot_held(routes(&probe), &config, &shop, &probe).await;
        let client = Arc::new(Client::connect(&config).await.unwrap());
        let caller = client.clone();
        let name = config.service_name.clone();
        let call = tokio::spawn(async move { caller.call::<u64>(&name, "answer", (), ()).await });
        // The request is received and waits for the one worker slot, which the hog holds
        // until the service stops: it is handed back unstarted.
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.begin_stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        probe.open();
        service.wait_stopped().await.unwrap();
        assert_eq!(calls.0.load(std::sync::atomic::Ordering::SeqCst), 0, "it never ran");

        let service = TestService::start(routes(&probe), config.clone()).await.unwrap();
        assert_eq!(call.await.unwrap(), Ok(1), "handed back, the request runs once");
        service.stop().await.unwrap();
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
        keeper.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

/// The (exchange, routing key) of each call of `routed`, which always fails.
#[derive(Debug, Default)]
struct Routes(Mutex<Vec<(String, String)>>);

fn routed(
    message: micro_framework::Message,
    Dep(seen): Dep<Arc<Routes>>,
) -> Result<(), std::io::Error> {
    seen.0.lock().unwrap().push((message.exchange.clone(), message.routing_key.clone()));
    Err(std::io::Error::other("always fails"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_keeps_its_exchange_and_routing_key_and_dead_letters_with_them() {
    use micro_framework::config::RetryDelay;
    use micro_framework::settle::{HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_ROUTING_KEY};
    let delay_queues = format!("memory://test-{}", uuid::Uuid::new_v4());
    for (uri, mode) in [
        (plugin_broker(), RetryDelay::DelayedMessagePlugin),
        (delay_queues, RetryDelay::DelayQueues),
    ] {
        let shop = unique("routeshop");
        let config = config(&uri, "keeproute").with_retry_delay(mode);
        let queue = format!("evt-{shop}-paid--{}.routed", config.service_name);
        let seen = Arc::new(Routes::default());
        let routes = vec![Route::new(routed)
            .entrypoint(EventListener::new(&shop, "paid"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(20)))
            .dependency(Shared(seen.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({ "id": 1 })).await.unwrap();
        service.wait_for_route("routed", 2).await.unwrap();
        let first = (format!("{shop}.events"), "paid".to_owned());
        assert_eq!(seen.0.lock().unwrap().clone(), vec![first.clone(), first.clone()], "{mode:?}");
        let dlq = format!("{queue}.dlq");
        let mut dead = Vec::new();
        for _ in 0..500 {
            dead = service.take_messages(&dlq).await.unwrap();
            if !dead.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(dead.len(), 1, "{mode:?}: the exhausted message is dead-lettered");
        let original = (
            header(&dead[0], HEADER_ORIGINAL_EXCHANGE),
            header(&dead[0], HEADER_ORIGINAL_ROUTING_KEY),
        );
        assert_eq!(original, (&HeaderValue::from(first.0.as_str()), &HeaderValue::from("paid")));
        service.stop().await.unwrap();
    }
}

/// Start the `victim` route (`MAX_REDELIVERIES=2`), publish through its exchange a `job`
/// carrying the headers `forged` makes for the route's queue, and check that it runs once, as
/// the fresh message it is, and is not dead-lettered.
async fn a_forged_job_runs_once(name: &str, forged: impl FnOnce(&str) -> Headers) {
    use std::sync::atomic::Ordering;
    let uri = format!("memory://test-{}", uuid::Uuid::new_v4());
    let shop = unique(name);
    let config = config(&uri, name).with_max_redeliveries(2);
    let queue = format!("evt-{shop}-job--{}.victim", config.service_name);
    let calls = Arc::new(VictimCalls::default());
    let service = TestService::start(vec![victim_route(&shop, &calls)], config).await.unwrap();
    let mut properties = micro_framework::data::json_properties();
    properties.headers = forged(&queue);
    let message = OutgoingMessage { body: json!({ "id": 1 }).to_string().into(), properties };
    let options = PublishOptions { mandatory: true };
    service.transport().publish(&format!("{shop}.events"), "job", message, options).await.unwrap();
    service.wait_for_route("victim", 1).await.unwrap();
    assert_eq!(calls.0.load(Ordering::SeqCst), 1, "a fresh message runs, whatever it claims");
    assert!(service.take_messages(&format!("{queue}.dlq")).await.unwrap().is_empty());
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_count_set_by_the_publisher_does_not_steer_the_crash_loop_guard() {
    a_forged_job_runs_once("forged", |_| {
        Headers::from([("x-delivery-count".to_owned(), HeaderValue::Int(99))])
    })
    .await;
}

/// The headers only the service's own copies carry, set by a publisher on a message it
/// publishes through an exchange, are not read: the message is not dead-lettered unrun as a
/// pending dead letter, and runs as the fresh message it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_of_a_copy_set_by_a_publisher_are_not_read() {
    let failure = micro_framework::data::Failure::bad_input("forged".to_owned());
    let pending = serde_json::to_string(&failure).unwrap();
    a_forged_job_runs_once("forgedcopy", |queue| {
        Headers::from([
            ("x-mf-dead-letter-pending".to_owned(), HeaderValue::from(pending)),
            ("x-mf-redeliveries".to_owned(), HeaderValue::Int(99)),
            ("x-mf-retry-count".to_owned(), HeaderValue::Int(99)),
            ("x-mf-retry-queue".to_owned(), HeaderValue::from(queue)),
        ])
    })
    .await;
}

fn always_fails(Payload(_): Payload<Value>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("always fails"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jittered_retries_wait_in_a_bounded_set_of_delay_queues() {
    let uri = format!("memory://test-{}", uuid::Uuid::new_v4());
    let shop = unique("jitter");
    let config = config(&uri, "jitter");
    let queue = format!("evt-{shop}-job--{}.always_fails", config.service_name);
    // Retries a minute away: all still wait in their delay queues when counted.
    let routes = vec![Route::new(always_fails)
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(AsyncBackOff::new(1, Duration::from_secs(60)).jitter(1.0))];
    let service = TestService::start(routes, config).await.unwrap();
    let burst = 40;
    for id in 0..burst {
        service.dispatch(&shop, "job", &json!({ "id": id })).await.unwrap();
    }
    service.wait_for_route("always_fails", burst).await.unwrap();
    // The nine steps of a jitter of 1.0 on 60 s: 60 s + k × 7.5 s.
    let mut waiting = 0;
    for step in 0..=8u64 {
        let delay_queue = format!("{queue}.delay-{}", 60_000 + step * 7_500);
        waiting += service.queue_len(&delay_queue).await.unwrap_or(0);
    }
    assert_eq!(u64::from(waiting), burst, "every retry waits in one of the nine delay queues");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn the_callback_runs_when_the_retry_copy_cannot_be_made() {
    fn give_up(failure: Failure, retry: BackOffData, Dep(journal): Dep<Arc<Journal>>) {
        journal.push(&format!("callback: {}", failure.full_message()), retry.retry_count);
    }
    let BinaryJob { service, journal, queue } =
        a_binary_job_failed_by(CallbackRoute::new(unreadable, give_up), "binarycb").await;
    let entries = journal.entries();
    assert_eq!(entries.len(), 2, "one attempt, then the callback: {entries:?}");
    assert!(entries[1].0.starts_with("callback: cannot read it"), "{entries:?}");
    assert!(entries[1].0.contains("not retried"), "{entries:?}");
    assert_eq!(service.queue_len(&format!("{queue}.dlq")).await.unwrap(), 0, "called back");
    assert_eq!(service.route("unreadable").unwrap().stats().called_back_count(), 1);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn an_anonymous_broadcast_listener_dead_letters_into_its_leased_queue() {
    use micro_framework::amqp::naming::HandlerType;
    for uri in broker_uris() {
        let shop = unique("leased");
        let config = config(&uri, "leased");
        let markers = [config.service_name.clone(), shop.clone()];
        let listener = EventListener::new(&shop, "job").handler_type(HandlerType::Broadcast(None));
        let routes = vec![Route::new(always_fails).entrypoint(listener)];
        let service = TestService::start(routes, config).await.unwrap();
        for id in 0..2 {
            service.dispatch(&shop, "job", &json!({ "id": id })).await.unwrap();
        }
        service.wait_for_route("always_fails", 2).await.unwrap();
        let stats = service.route("always_fails").unwrap().stats();
        assert_eq!(stats.failed_count(), 2, "both dead-lettered (the lease renewed each time)");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

fn odd_ones(Payload(payload): Payload<Value>, retry: BackOffData, Dep(journal): Dep<Arc<Journal>>) {
    journal.push(payload["name"].as_str().unwrap_or_default(), retry.retry_count);
}

/// Singleton handlers share one queue, `evt-{source}-{event}`: a retry of one route comes back
/// there, and another route may take it. It takes it as an event of its own: its filter asks
/// and its retries start anew. Before, it ran it unfiltered, with the other's retry state.
#[tokio::test]
async fn a_retry_of_one_singleton_route_is_an_event_of_its_own_for_another() {
    use micro_framework::amqp::naming::HandlerType;
    for uri in broker_uris() {
        let shop = unique("single");
        let config = config(&uri, "single").with_max_workers(4);
        let markers = [config.service_name.clone(), shop.clone()];
        let (failing, other) = (Arc::new(Journal::default()), Arc::new(Journal::default()));
        let singleton = || EventListener::new(&shop, "job").handler_type(HandlerType::Singleton);
        let odd = |payload: &Value| payload["odd"] == json!(true);
        let routes = vec![
            Route::new(flaky)
                .entrypoint(singleton())
                .backoff(AsyncBackOff::new(3, Duration::from_millis(20)))
                .dependency(Shared(failing.clone())),
            Route::new(odd_ones)
                .entrypoint(singleton().filter(odd))
                .dependency(Shared(other.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        for id in 0..8 {
            let event = json!({ "name": format!("e{id}"), "odd": id % 2 == 1 });
            service.dispatch(&shop, "job", &event).await.unwrap();
        }
        // every retry is made or taken by then (20 ms apart)
        service.wait_for_route("flaky", 4).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let taken = other.entries();
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        let names = |id: &[u32]| id.iter().map(|id| format!("e{id}")).collect::<Vec<_>>();
        assert!(
            taken.iter().all(|(name, _)| names(&[1, 3, 5, 7]).contains(name)),
            "{uri}: the filter of the other route asks: {taken:?}"
        );
        assert!(
            taken.iter().all(|(_, retry)| *retry == 0),
            "{uri}: at its first attempt: {taken:?}"
        );
        assert!(failing.entries().iter().all(|(_, retry)| *retry <= 3), "{uri}");
    }
}

#[tokio::test]
async fn a_dead_letter_queue_deleted_while_the_service_runs_is_declared_again() {
    for uri in broker_uris() {
        let journal = Arc::new(Journal::default());
        let shop = unique("dlqgone");
        let config = config(&uri, "dlqgone");
        let markers = [config.service_name.clone(), shop.clone()];
        let dlq = format!("evt-{shop}-job--{}.flaky.dlq", config.service_name);
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.transport().delete_queue(&dlq).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "name": "a" })).await.unwrap();
        let mut dead = Vec::new();
        for _ in 0..250 {
            dead = service.take_messages(&dlq).await.unwrap_or_default();
            if !dead.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(dead.len(), 1, "{uri}: the failed message is in the dead-letter queue");
        assert_eq!(header(&dead[0], HEADER_ROUTE), &HeaderValue::from("flaky"));
        assert_eq!(journal.entries(), vec![("a".to_owned(), 0)], "{uri}: it ran once");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_service_past_its_shutdown_timeout_starts_no_more_calls() {
    use std::sync::atomic::Ordering;
    for uri in broker_uris() {
        let shop = unique("greedystop");
        let config = greedy_one_worker(&uri, "greedystop");
        let markers = [config.service_name.clone(), shop.clone()];
        let VictimWaiting { service, keeper, probe, calls } =
            a_victim_waiting_for_the_slot(&config, &shop).await;
        // The victim's message is received and waits for the one worker slot, which the hog
        // holds past SHUTDOWN_TIMEOUT: the stop gives up on both, and their messages go back
        // to their queues when the connection closes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.stop().await.unwrap();
        probe.open();
        // The slot is free now, but the service has stopped: nothing of it may start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(calls.0.load(Ordering::SeqCst), 0, "a call started after the stop returned");

        let routes = vec![hog_route(&shop, &probe), victim_route(&shop, &calls)];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        service.wait_for_route("victim", 1).await.unwrap();
        service.wait_for_route("hog", 1).await.unwrap();
        service.stop().await.unwrap();
        assert_eq!(calls.0.load(Ordering::SeqCst), 1, "the victim's message runs once");
        keeper.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_delay_longer_than_the_broker_holds_waits_as_long_as_it_can() {
    use micro_framework::config::RetryDelay;
    // The plugin holds a message at most 2^32-1 ms (49.7 days), and routes one with a longer
    // `x-delay` at once; RabbitMQ takes a queue TTL of at most ten years.
    let plugin = (plugin_broker(), RetryDelay::DelayedMessagePlugin, 60 * 86_400);
    let queues =
        broker_uris().into_iter().map(|uri| (uri, RetryDelay::DelayQueues, 11 * 365 * 86_400));
    for (uri, retry_delay, seconds) in std::iter::once(plugin).chain(queues) {
        let config = config(&uri, "longdelay").with_retry_delay(retry_delay);
        let backoff = AsyncBackOff::new(3, Duration::from_secs(seconds));
        let Flaky { service, journal, shop, markers, .. } = start_flaky(config, backoff).await;
        service.dispatch(&shop, "job", &json!({ "name": "later" })).await.unwrap();
        common::wait_until(|| !journal.entries().is_empty(), "the first attempt").await;
        // Long enough for a retry routed at once, or a message requeued after its retry
        // could not be scheduled, to run again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let attempts = journal.entries().len();
        let retried = service.route("flaky").unwrap().stats().retried_count();
        assert_eq!((attempts, retried), (1, 1), "{retry_delay:?} on {uri}: (attempts, retries)");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn in_worker_retries_count_in_the_dead_letters_attempts() {
    for uri in broker_uris() {
        let backoff = BackOff::new(2, Duration::from_millis(5));
        let Flaky { service, journal, shop, queue, markers } =
            start_flaky(config(&uri, "inworkerdead"), backoff).await;
        service.dispatch(&shop, "job", &json!({ "name": "doomed" })).await.unwrap();
        service.wait_for_route("flaky", 1).await.unwrap();
        assert_eq!(journal.entries().len(), 3, "the first attempt and two retries");
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(3), "{uri}");
        assert_eq!(header(&dead[0], HEADER_ERROR), &HeaderValue::from("attempt 2 failed"));
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// Kills its worker process: no error for a retry filter to match.
#[cfg(feature = "process")]
fn crash_io(Payload(_): Payload<Value>) -> Result<(), std::io::Error> {
    std::process::abort()
}

#[cfg(feature = "process")]
#[tokio::test]
async fn with_a_retry_filter_a_call_that_kills_its_worker_process_fails_at_once() {
    use micro_framework::config::WorkerMode;
    use micro_framework::settle::HEADER_ERROR_KIND;
    // Everything up to `start` runs in the worker process too, which builds the same routes.
    let shop = unique("crashfilter");
    let config = micro_framework::testing::test_config(&unique("crashfilter"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let dlq = format!("evt-{shop}-job--{}.crash_io.dlq", config.service_name);
    let routes = vec![Route::new(crash_io)
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(AsyncBackOff::new(2, Duration::from_millis(10)).retry_on::<std::io::Error>())];
    let service = TestService::start(routes, config).await.unwrap();
    service.dispatch(&shop, "job", &json!({})).await.unwrap();
    common::wait_until_async(|| async { service.queue_len(&dlq).await.unwrap_or(0) > 0 }).await;
    let dead = service.take_messages(&dlq).await.unwrap();
    assert_eq!(header(&dead[0], HEADER_ERROR_KIND), &HeaderValue::from("crashed"));
    assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(1), "not retried");
    service.stop().await.unwrap();
}

/// Records whether each call's message is marked redelivered; fails a redelivered message's
/// first attempt, so that it is retried.
fn sees_redelivery(
    message: micro_framework::Message,
    retry: BackOffData,
    Dep(probe): Dep<Arc<common::Probe>>,
) -> Result<(), std::io::Error> {
    probe.enter(json!(message.redelivered));
    probe.leave();
    match message.redelivered && retry.retry_count == 0 {
        true => Err(std::io::Error::other("retry it")),
        false => Ok(()),
    }
}

/// A message that came back unsettled (its service died while handling it) is handed to its
/// target marked redelivered, on every queue type: on classic queues the crash-loop guard runs
/// a counted copy of it, which the broker delivers as a fresh message. Its retry, a message of
/// its own that no consumer held before, is not.
#[tokio::test]
async fn a_message_back_after_a_crash_is_seen_as_redelivered() {
    use micro_framework::config::QueueType;
    for uri in broker_uris() {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let shop = unique("shop");
            let config = config(&uri, "seen").with_queue_type(queue_type);
            let markers = [config.service_name.clone(), shop.clone()];
            let start = |probe: Arc<common::Probe>| {
                let routes = vec![Route::new(sees_redelivery)
                    .entrypoint(EventListener::new(&shop, "job"))
                    .backoff(AsyncBackOff::new(1, Duration::from_millis(20)))
                    .dependency(Shared(probe))];
                TestService::start(routes, config.clone())
            };
            let first = common::Probe::closed();
            let service = start(first.clone()).await.unwrap();
            service.dispatch(&shop, "job", &json!({})).await.unwrap();
            first.wait_started(1).await;
            // A crash: the connection goes away while the call runs.
            service.transport().close().await;
            first.open();
            let _ = service.stop().await;

            let second = common::Probe::new();
            let service = start(second.clone()).await.unwrap();
            service.wait_for_route("sees_redelivery", 2).await.unwrap();
            let seen = second.seen.lock().unwrap().clone();
            assert_eq!(first.seen.lock().unwrap().clone(), [json!(false)]);
            let expected = [json!(true), json!(false)];
            assert_eq!(seen, expected, "{uri} {queue_type:?}: back after a crash, then retried");
            service.stop().await.unwrap();
            common::cleanup(&uri, &markers).await;
        }
    }
}

/// A retry whose delay queue `{queue}.delay-{ms}` would have a name over 255 bytes (an AMQP
/// short string) cannot be made: no retry remains, and the dead letter says why, instead of
/// the message going back to its queue to fail again until the crash-loop guard refuses it.
/// (A route whose first retry's delay queue is too long stops the start,
/// `tests/scale.rs`: here the second retry's longer delay makes the name too long.)
#[tokio::test]
async fn a_retry_whose_delay_queue_name_is_too_long_is_dead_lettered_saying_why() {
    use micro_framework::retry::Interval;
    use micro_framework::settle::HEADER_ERROR_KIND;
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "long").with_max_redeliveries(1);
        let markers = [config.service_name.clone(), shop.clone()];
        // A queue of 247 bytes: `.delay-5` makes 255 bytes, `.delay-50` 256.
        let (event, _) = event_with_a_250_byte_queue(&shop, &config.service_name, "always_fails");
        let event = event[3..].to_owned();
        let queue = format!("evt-{shop}-{event}--{}.always_fails", config.service_name);
        let longer =
            Interval::custom(|retry| Duration::from_millis(if retry == 1 { 5 } else { 50 }));
        let routes = vec![Route::new(always_fails)
            .entrypoint(EventListener::new(&shop, &event))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(5)).interval(longer))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, &event, &json!({})).await.unwrap();
        service.wait_for_route("always_fails", 2).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1, "{uri}");
        assert_eq!(header(&dead[0], HEADER_ERROR_KIND), &HeaderValue::from("error"), "{uri}");
        let error = header(&dead[0], HEADER_ERROR).as_str().unwrap_or_default().to_owned();
        assert!(error.starts_with("always fails") && error.contains("not retried: "), "{error}");
        assert!(error.contains("255"), "{error}");
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(2), "{uri}");
        let stats = service.route("always_fails").unwrap().stats();
        let counts = (stats.received_count(), stats.retried_count(), stats.failed_count());
        assert_eq!(counts, (2, 1, 1), "one retry, then no more: {uri}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

fn judged_by_a_panicking_filter(Payload(_): Payload<Value>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("always fails"))
}

fn delayed_by_a_panicking_interval(Payload(_): Payload<Value>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("always fails"))
}

/// The route's retry policy runs user code (a `retry_if` predicate, an `Interval::custom`
/// function): one that panics leaves the failure without a retry, and the dead letter says
/// why, instead of the panic ending the task that holds the delivery, which came back
/// unsettled until the crash-loop guard refused it as a crash.
#[tokio::test]
async fn a_retry_policy_that_panics_dead_letters_the_failure_once_saying_why() {
    use micro_framework::retry::Interval;
    use micro_framework::settle::HEADER_ERROR_KIND;
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "policy").with_max_redeliveries(1);
        let markers = [config.service_name.clone(), shop.clone()];
        let backoff = || AsyncBackOff::new(2, Duration::from_millis(20));
        let routes = vec![
            Route::new(judged_by_a_panicking_filter)
                .entrypoint(EventListener::new(&shop, "filter"))
                .backoff(backoff().retry_if(|_| panic!("the predicate's bug"))),
            Route::new(delayed_by_a_panicking_interval)
                .entrypoint(EventListener::new(&shop, "interval"))
                .backoff(backoff().interval(Interval::custom(|_| panic!("the interval's bug")))),
        ];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        for (route, event, bug) in [
            ("judged_by_a_panicking_filter", "filter", "the predicate's bug"),
            ("delayed_by_a_panicking_interval", "interval", "the interval's bug"),
        ] {
            service.dispatch(&shop, event, &json!({})).await.unwrap();
            service.wait_for_route(route, 1).await.unwrap();
            let dlq = format!("evt-{shop}-{event}--{}.{route}.dlq", config.service_name);
            let dead = service.take_messages(&dlq).await.unwrap();
            assert_eq!(dead.len(), 1, "{uri} {route}");
            assert_eq!(header(&dead[0], HEADER_ERROR_KIND), &HeaderValue::from("error"), "{route}");
            let error = header(&dead[0], HEADER_ERROR).as_str().unwrap_or_default().to_owned();
            assert!(error.starts_with("always fails") && error.contains(bug), "{route}: {error}");
            assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(1), "{route}");
            let stats = service.route(route).unwrap().stats();
            assert_eq!((stats.received_count(), stats.failed_count()), (1, 1), "{uri} {route}");
        }
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// With the plugin present, a retry layout that cannot be declared for another reason (here
/// the backoff queue a Python service declared as a classic queue, met with
/// `QUEUE_TYPE=quorum`) stops the start with that reason, not with a claim that the plugin is
/// missing.
#[tokio::test]
async fn a_retry_layout_refused_for_another_reason_than_the_plugin_says_so() {
    use micro_framework::config::{QueueType, RetryDelay};
    let uri = plugin_broker();
    let shop = unique("shop");
    let config = config(&uri, "layout")
        .with_retry_delay(RetryDelay::DelayedMessagePlugin)
        .with_queue_type(QueueType::Quorum);
    let python = micro_framework::transport::connect(&config).await.unwrap();
    let backoff_queue = format!("{}.flaky_backoff_queue", config.service_name);
    python.declare_queue(&QueueSpec::durable(&backoff_queue)).await.unwrap();
    let routes = vec![Route::new(flaky)
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(AsyncBackOff::new(1, Duration::from_millis(10)))
        .dependency(Shared(Arc::new(Journal::default())))];
    let error = TestService::start(routes, config).await.unwrap_err().to_string();
    assert!(error.contains("x-queue-type") && error.contains(&backoff_queue), "{error}");
    assert!(!error.contains("needs the rabbitmq_delayed_message_exchange plugin"), "{error}");
    python.close().await;
}

fn timed_job(Dep(journal): Dep<Arc<Journal>>) -> Result<(), std::io::Error> {
    journal.push("job", 0);
    Err(std::io::Error::other("the job failed"))
}

fn timed_job_failed(failure: Failure, retry: BackOffData, Dep(journal): Dep<Arc<Journal>>) {
    journal.push(&format!("callback after: {}", failure.message), retry.retry_count);
}

/// Broker retries need a message on a queue: a route whose entrypoint has none (a timer, RPC,
/// HTTP, WebSocket) cannot retry with `AsyncBackOff`, so no retry remains and its
/// `CallbackRoute` callback runs, instead of the failure being counted as a retry scheduled
/// that never comes.
#[tokio::test]
async fn without_a_queue_to_retry_from_an_async_backoff_failure_runs_the_callback() {
    use micro_framework::entrypoints::TimeEntrypoint;
    let uri = broker_uris().remove(0);
    let journal = Arc::new(Journal::default());
    let routes = vec![CallbackRoute::new(timed_job, timed_job_failed)
        .entrypoint(TimeEntrypoint::every(Duration::from_millis(50)))
        .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
        .dependency(Shared(journal.clone()))];
    let service = TestService::start(routes, config(&uri, "timed")).await.unwrap();
    service.wait_for_route("timed_job", 1).await.unwrap();
    let route = service.route("timed_job").unwrap().clone();
    service.stop().await.unwrap();
    let stats = route.stats();
    let runs = stats.settled_count();
    let counts = (stats.retried_count(), stats.called_back_count(), stats.failed_count());
    assert_eq!(counts, (0, runs, 0), "retried, called back, failed, of {runs} runs");
    let expected = [("job".to_owned(), 0), ("callback after: the job failed".to_owned(), 0)];
    assert_eq!(journal.entries()[..2], expected);
}

/// Hands its route one message at start-up, as the `Entrypoint` docs' example does, and
/// keeps what the route made of it.
struct Once(Arc<Mutex<Option<micro_framework::Handled>>>);

#[micro_framework::async_trait]
impl micro_framework::entrypoints::Entrypoint for Once {
    fn describe(&self) -> String {
        "Once".into()
    }

    async fn run(
        self: Box<Self>,
        route: micro_framework::RouteHandle,
    ) -> micro_framework::Result<()> {
        if let Some(permit) = route.acquire().await {
            let handled = route.handle(permit, micro_framework::Message::default()).await;
            route.settled(&handled);
            *self.0.lock().unwrap() = Some(handled);
        }
        Ok(())
    }
}

/// An entrypoint of one's own that wraps one of the framework's (logging around it, say):
/// forwarding `Entrypoint::kind`, as the trait's docs show, keeps what the kind decides. Its
/// return type could not be named outside the crate: a wrapper had the default, and its
/// route lost its `AsyncBackOff` retries (the first failure dead-lettered) and its hooks.
mod a_wrapped_entrypoint {
    use super::common;

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::entrypoints::{Entrypoint, EntrypointKind};
    use micro_framework::prelude::*;
    use micro_framework::retry::AsyncBackOff;
    use micro_framework::testing::TestService;
    use micro_framework::RouteHandle;
    use serde_json::{json, Value};

    /// Delegates everything to the entrypoint it wraps.
    struct Logged<E>(E);

    #[micro_framework::async_trait]
    impl<E: Entrypoint> Entrypoint for Logged<E> {
        fn describe(&self) -> String {
            format!("Logged({})", self.0.describe())
        }
        fn queue(&self) -> Option<String> {
            self.0.queue()
        }
        async fn setup(&mut self, route: &RouteHandle) -> micro_framework::Result<()> {
            self.0.setup(route).await
        }
        async fn run(self: Box<Self>, route: RouteHandle) -> micro_framework::Result<()> {
            Box::new(self.0).run(route).await
        }
        fn kind(&self) -> EntrypointKind {
            self.0.kind()
        }
    }

    fn charge(
        Payload(_): Payload<Value>,
        Dep(attempts): Dep<Arc<AtomicUsize>>,
    ) -> Result<(), String> {
        attempts.fetch_add(1, Ordering::SeqCst);
        Err("the bank is down".into())
    }

    #[tokio::test]
    async fn keeps_its_async_backoff() {
        let uri = format!("memory://{}", common::unique("wrapped"));
        let shop = common::unique("shop");
        let attempts = Arc::new(AtomicUsize::new(0));
        let route = Route::new(charge)
            .entrypoint(Logged(EventListener::new(&shop, "paid")))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(10)))
            .dependency(Shared(attempts.clone()));
        let config = common::config(&uri, "billing");
        let dlq = format!("evt-{shop}-paid--{}.charge.dlq", config.service_name);
        let service = TestService::start(vec![route], config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({"id": 1})).await.unwrap();
        let dead_lettered = || async { service.queue_len(&dlq).await.unwrap_or(0) == 1 };
        common::wait_until_async(dead_lettered).await;
        service.stop().await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 3, "the first attempt and 2 retries");
    }

    #[tokio::test]
    async fn can_be_hooked_as_an_event_route() {
        fn echo(Payload(payload): Payload<Value>) -> Value {
            payload
        }
        let uri = format!("memory://{}", common::unique("wrapped_hook"));
        let route = Route::new(echo).entrypoint(Logged(EventListener::new("shop", "paid")));
        let service = TestService::start(vec![route], common::config(&uri, "echo")).await.unwrap();
        let result = service.hook("echo").unwrap().event::<Value>(&json!({"id": 1})).await;
        service.stop().await.unwrap();
        assert_eq!(result.unwrap(), json!({"id": 1}));
    }
}

/// An entrypoint written outside the framework cannot publish a broker retry: its
/// `AsyncBackOff` failure is final at once and the callback runs, as for a timer (was:
/// `Handled::Retry`, which such an entrypoint cannot act on: the failure was neither retried
/// nor called back).
#[tokio::test]
async fn an_entrypoint_of_ones_own_gets_no_broker_retry_and_its_callback_runs() {
    let journal = Arc::new(Journal::default());
    let handled = Arc::new(Mutex::new(None));
    let routes = vec![CallbackRoute::new(timed_job, timed_job_failed)
        .entrypoint(Once(handled.clone()))
        .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
        .dependency(Shared(journal.clone()))];
    let service = TestService::start(routes, config("memory://", "own_entrypoint")).await.unwrap();
    service.wait_for_route("timed_job", 1).await.unwrap();
    service.stop().await.unwrap();
    let handled = handled.lock().unwrap().clone();
    assert!(matches!(handled, Some(micro_framework::Handled::CalledBack(_))), "{handled:?}");
    let expected = [("job".to_owned(), 0), ("callback after: the job failed".to_owned(), 0)];
    assert_eq!(journal.entries(), expected);
}

// ---------------------------------------------------------------------------------------
// A stop while a call waits between in-worker retries (`BackOff`).

/// Fails its first attempt (retry 0); a later one answers the retry count it runs at.
fn fails_first(Payload(_): Payload<Value>, retry: BackOffData) -> Result<u32, std::io::Error> {
    match retry.retry_count {
        0 => Err(std::io::Error::other("the first attempt failed")),
        retries => Ok(retries),
    }
}

fn fails_first_failed(Payload(_): Payload<Value>, Dep(calls): Dep<Arc<VictimCalls>>) {
    calls.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// A service whose `fails_first` route retries in the worker for an hour, for events of `shop`.
fn waits_between_retries(shop: &str, called_back: &Arc<VictimCalls>) -> Vec<Route> {
    vec![CallbackRoute::new(fails_first, fails_first_failed)
        .entrypoint(EventListener::new(shop, "job"))
        .backoff(BackOff::new(3, Duration::from_secs(3600)))
        .dependency(Shared(called_back.clone()))]
}

/// Start `routes` with `config`, have an event of `shop` fail its first attempt, and stop the
/// service while the call waits for its retry: the call makes no further attempt (the next
/// would run after the stop returned, while the message is delivered again elsewhere), and the
/// message is not settled (no callback, no dead letter) but goes back to its queue.
async fn stop_while_waiting_for_a_retry(routes: Vec<Route>, config: &Config, shop: &str) {
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let route = service.route("fails_first").unwrap().clone();
    service.dispatch(shop, "job", &json!({})).await.unwrap();
    common::wait_until(|| route.stats().received_count() == 1, "the first attempt").await;
    service.stop().await.unwrap();
    let stats = route.stats();
    let counts = (stats.failed_count(), stats.called_back_count());
    assert_eq!(counts, (0, 0), "{}: (failed, called back)", config.amqp_uri);
}

/// A message whose call waits between in-worker retries when its service stops goes back to
/// its queue, not counted as a crash, with the retry made: the next instance goes on counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_hands_back_an_event_waiting_between_in_worker_retries() {
    for uri in broker_uris() {
        let shop = unique("backoffstop");
        // Without a redelivery allowed, a message that comes back counted as a crash is
        // dead-lettered.
        let config = config(&uri, "backoffstop")
            .with_max_redeliveries(0)
            .with_shutdown_timeout(Duration::from_secs(1));
        let keeper = micro_framework::transport::connect(&config).await.unwrap();
        let queue = format!("evt-{shop}-job--{}.fails_first", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let called_back = Arc::new(VictimCalls::default());
        stop_while_waiting_for_a_retry(waits_between_retries(&shop, &called_back), &config, &shop)
            .await;

        // Without a retry policy: its first attempt here succeeds only if it goes on counting.
        let routes = vec![Route::new(fails_first).entrypoint(EventListener::new(&shop, "job"))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        service.wait_for_route("fails_first", 1).await.unwrap();
        let stats = service.route("fails_first").unwrap().stats();
        let counts = (stats.succeeded_count(), stats.failed_count());
        assert_eq!(counts, (1, 0), "{uri}: (succeeded, failed) on the next instance");
        service.stop().await.unwrap();
        let dlq = format!("{queue}.dlq");
        let dead = micro_framework::testing::take_messages(keeper.as_ref(), &dlq).await.unwrap();
        assert!(dead.is_empty(), "{uri}: nothing is dead-lettered");
        let calls = called_back.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(calls, 0, "{uri}: the callback does not run");
        keeper.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

/// The same in a process mode, where the service makes the in-worker retries and sends each
/// attempt to a worker process: the message is back in its queue, with the retry made.
#[cfg(feature = "process")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_hands_back_an_event_waiting_between_in_worker_retries_in_a_process_mode() {
    use micro_framework::config::WorkerMode;
    use micro_framework::retry::HEADER_RETRY_COUNT;
    // Everything up to `start` runs in the worker processes too, which build the same routes.
    let shop = unique("backoffstopproc");
    let config = micro_framework::testing::test_config(&unique("backoffstopproc"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_shutdown_timeout(Duration::from_secs(1));
    let keeper = micro_framework::transport::connect(&config).await.unwrap();
    let queue = format!("evt-{shop}-job--{}.fails_first", config.service_name);
    let called_back = Arc::new(VictimCalls::default());
    stop_while_waiting_for_a_retry(waits_between_retries(&shop, &called_back), &config, &shop)
        .await;
    let back = micro_framework::testing::take_messages(keeper.as_ref(), &queue).await.unwrap();
    assert_eq!(back.len(), 1, "the message is back in {queue}");
    assert_eq!(header(&back[0], HEADER_RETRY_COUNT), &HeaderValue::Int(1), "{back:?}");
    assert!(!back[0].redelivered, "handed back, not requeued: {back:?}");
    let dlq = format!("{queue}.dlq");
    let dead = micro_framework::testing::take_messages(keeper.as_ref(), &dlq).await.unwrap();
    assert!(dead.is_empty(), "nothing is dead-lettered");
    keeper.close().await;
    common::cleanup(&config.amqp_uri, &[config.service_name.clone(), shop]).await;
}

/// Fails its first attempt (retry 0); a later one answers `n` and the retry count it runs at.
fn add_retries(
    micro_framework::amqp::rpc::Args((n,)): micro_framework::amqp::rpc::Args<(u32,)>,
    retry: BackOffData,
) -> Result<(u32, u32), std::io::Error> {
    match retry.retry_count {
        0 => Err(std::io::Error::other("the first attempt failed")),
        retries => Ok((n, retries)),
    }
}

/// An RPC request whose call waits between in-worker retries when the service stops is handed
/// back unanswered, as it came, with the retry made: the next instance answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_hands_back_an_rpc_request_waiting_between_in_worker_retries() {
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::amqp::rpc::Client;
    use micro_framework::config::Protocol;
    for uri in broker_uris() {
        for protocol in [Protocol::Nameko, Protocol::MicroFramework] {
            let config = config(&uri, "backoffstoprpc")
                .with_protocol(protocol)
                .with_max_redeliveries(0)
                .with_shutdown_timeout(Duration::from_secs(1));
            let keeper = micro_framework::transport::connect(&config).await.unwrap();
            let markers = [config.service_name.clone()];
            let routes = vec![Route::new(add_retries)
                .entrypoint(RPCListener::new())
                .backoff(BackOff::new(3, Duration::from_secs(3600)))];
            let service = TestService::start(routes, config.clone()).await.unwrap();
            let route = service.route("add_retries").unwrap().clone();
            let client = Arc::new(Client::connect(&config).await.unwrap());
            let caller = client.clone();
            let name = config.service_name.clone();
            let call = tokio::spawn(async move {
                caller.call::<(u32, u32)>(&name, "add_retries", [7], ()).await
            });
            common::wait_until(|| route.stats().received_count() == 1, "the first attempt").await;
            service.stop().await.unwrap();

            let routes = vec![Route::new(add_retries).entrypoint(RPCListener::new())];
            let service = TestService::start(routes, config.clone()).await.unwrap();
            let answer = call.await.unwrap();
            assert_eq!(answer, Ok((7, 1)), "{protocol:?} {uri}: answered by the next instance");
            service.stop().await.unwrap();
            if let Ok(client) = Arc::try_unwrap(client) {
                client.close().await;
            }
            keeper.close().await;
            common::cleanup(&uri, &markers).await;
        }
    }
}

fn timed_retries(Dep(journal): Dep<Arc<Journal>>) -> Result<(), std::io::Error> {
    journal.push("job", 0);
    Err(std::io::Error::other("the job failed"))
}

/// A timer's run has no message to hand back: waiting between in-worker retries when the
/// service stops, it ends failed at once with its last failure, saying why it was not retried;
/// the callback does not run (a stop starts no call, and the retries were not exhausted).
#[tokio::test]
async fn a_timer_run_waiting_between_in_worker_retries_fails_at_a_stop() {
    use micro_framework::entrypoints::TimeEntrypoint;
    let uri = broker_uris().remove(0);
    let journal = Arc::new(Journal::default());
    let routes = vec![CallbackRoute::new(timed_retries, timed_job_failed)
        .entrypoint(TimeEntrypoint::every(Duration::from_millis(20)))
        .backoff(BackOff::new(3, Duration::from_secs(3600)))
        .dependency(Shared(journal.clone()))];
    let config = config(&uri, "timedstop").with_shutdown_timeout(Duration::from_secs(1));
    let service = TestService::start(routes, config).await.unwrap();
    let route = service.route("timed_retries").unwrap().clone();
    let waiter = service.waiter("timed_retries").unwrap();
    common::wait_until(|| !journal.entries().is_empty(), "the first attempt").await;
    service.begin_stop();
    let call = waiter.wait().await.unwrap();
    let failure = call.result::<Value>().unwrap_err();
    assert_eq!(failure.message, "the job failed");
    assert!(failure.full_message().contains("not retried: the service is stopping"), "{failure:?}");
    service.wait_stopped().await.unwrap();
    let stats = route.stats();
    assert_eq!((stats.failed_count(), stats.called_back_count()), (1, 0), "(failed, called back)");
    assert_eq!(journal.entries(), [("job".to_owned(), 0)], "one attempt, no callback");
}

/// In a greedy mode a call goes on retrying in the worker while the stop waits for the calls
/// (it finishes what it received), and ends once the stop gives up on them: no attempt runs
/// after the service stopped, also for a route without a queue (a timer), whose calls the
/// stop leaves running past `SHUTDOWN_TIMEOUT`.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn a_greedy_service_ends_in_worker_retries_once_its_stop_gives_up() {
    use micro_framework::config::WorkerMode;
    use micro_framework::entrypoints::TimeEntrypoint;
    let uri = broker_uris().remove(0);
    let journal = Arc::new(Journal::default());
    let routes = vec![Route::new(timed_retries)
        .entrypoint(TimeEntrypoint::every(Duration::from_millis(20)))
        .backoff(BackOff::new(3, Duration::from_secs(3600)))
        .dependency(Shared(journal.clone()))];
    let config = config(&uri, "greedytimedstop")
        .with_worker_mode(WorkerMode::GreedyThread)
        .with_shutdown_timeout(Duration::from_millis(200));
    let service = TestService::start(routes, config).await.unwrap();
    let metrics = service.service().metrics().clone();
    common::wait_until(|| !journal.entries().is_empty(), "the first attempt").await;
    service.stop().await.unwrap();
    let running = || {
        metrics.render().lines().any(|line| {
            line.starts_with("tasks_number{")
                && line.contains("route=\"timed_retries\"")
                && !line.ends_with(" 0")
        })
    };
    common::wait_until(|| !running(), "the call waiting for its retry to end").await;
    assert_eq!(journal.entries(), [("job".to_owned(), 0)], "one attempt");
}

/// Fails its first attempt; the retry returns how long before it its `last_retry` was.
fn fails_then_tells_when(retry: BackOffData) -> Result<f64, String> {
    match retry.last_retry {
        None => Err("the first attempt fails".into()),
        Some(last_retry) => {
            Ok(std::time::SystemTime::now().duration_since(last_retry).unwrap().as_secs_f64())
        }
    }
}

/// `last_retry` is when the retry was scheduled, in the worker as on the broker: the retry
/// runs a whole delay after it (it was stamped after the delay, a moment before the retry).
#[tokio::test]
async fn an_in_worker_retry_sees_when_it_was_scheduled() {
    let routes = vec![Route::new(fails_then_tells_when)
        .entrypoint(EventListener::new("shop", "paid"))
        .backoff(BackOff::new(1, Duration::from_millis(1_500)))];
    let config = micro_framework::testing::memory_test_config("stamped");
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("fails_then_tells_when").unwrap();
    let since: f64 = hook.event(&json!({})).await.unwrap();
    service.stop().await.unwrap();
    // a whole delay before the retry (stamped after the delay, it was a moment before)
    assert!(since >= 1.0, "last_retry was {since} s before the retry");
}

/// Guards the greedy stop's wait for in-worker retries (was never checked: cut as the stop
/// began, not once it gave up, a retry due within `SHUTDOWN_TIMEOUT` did not run). A greedy
/// service finishes what it received, retries included, while its stop waits.
#[tokio::test]
async fn a_greedy_stop_lets_an_in_worker_retry_run_within_shutdown_timeout() {
    use micro_framework::config::WorkerMode;
    for uri in broker_uris() {
        let shop = unique("greedyretry");
        let config = config(&uri, "greedyretry")
            .with_worker_mode(WorkerMode::GreedyThread)
            .with_shutdown_timeout(Duration::from_secs(10));
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = format!("evt-{shop}-job--{}.flaky", config.service_name);
        let journal = Arc::new(Journal::default());
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(BackOff::new(1, Duration::from_millis(700)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "name": "job", "fail_until": 1 })).await.unwrap();
        common::wait_until(|| !journal.entries().is_empty(), "the first attempt").await;
        // the call now waits 700 ms for its retry; the stop waits up to 10 s for it
        service.stop().await.unwrap();
        let attempts = [("job".to_owned(), 0), ("job".to_owned(), 1)];
        assert_eq!(journal.entries(), attempts, "{uri}: the retry ran");
        let observer = micro_framework::transport::connect(&config).await.unwrap();
        let left = observer.queue_info(&queue).await.unwrap().message_count;
        observer.close().await;
        assert_eq!(left, 0, "{uri}: settled, not handed back");
        common::cleanup(&uri, &markers).await;
    }
}

type Seen = Arc<Mutex<Vec<i64>>>;

async fn record_async(Payload(i): Payload<i64>, Dep(seen): Dep<Seen>) {
    seen.lock().unwrap().push(i);
    tokio::task::yield_now().await;
}

fn record_sync(Payload(i): Payload<i64>, Dep(seen): Dep<Seen>) {
    seen.lock().unwrap().push(i);
}

/// With one worker and the default prefetch (one), a queue's events run in the order they
/// came, async and sync targets alike (a larger prefetch promises no order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_with_the_default_prefetch_runs_a_queue_in_order() {
    for uri in broker_uris() {
        for sync in [false, true] {
            let shop = unique("inorder");
            let seen: Seen = Arc::default();
            let config = config(&uri, "inorder").with_max_workers(1);
            let markers = [config.service_name.clone(), shop.clone()];
            let (route, name) = match sync {
                true => (Route::new(record_sync), "record_sync"),
                false => (Route::new(record_async), "record_async"),
            };
            let route = route
                .entrypoint(EventListener::new(&shop, "paid"))
                .dependency(Shared(seen.clone()));
            let service = TestService::start(vec![route], config).await.unwrap();
            for i in 0..200 {
                service.dispatch(&shop, "paid", &json!(i)).await.unwrap();
            }
            service.wait_for_route(name, 200).await.unwrap();
            service.stop().await.unwrap();
            common::cleanup(&uri, &markers).await;
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen, (0..200).collect::<Vec<_>>(), "{uri}, sync {sync}");
        }
    }
}

/// Dispatches an event over `MAX_MESSAGE_SIZE`: refused before it is sent, whatever the
/// attempt (`TransportError::LimitReached`, permanent).
async fn announces_too_much(
    producer: micro_framework::amqp::dependencies::Producer,
) -> Result<(), micro_framework::Error> {
    producer.dispatch("announced", &"x".repeat(4096)).await
}

/// A policy without a filter retries every error, those that must fail the same way again
/// included; the README's filter keeps the transport's permanent errors out of the retries.
#[tokio::test]
async fn a_filter_keeps_permanent_transport_errors_out_of_the_retries() {
    use micro_framework::testing::{call_route, memory_test_config};
    for filtered in [false, true] {
        let mut policy = BackOff::new(2, Duration::ZERO);
        if filtered {
            policy = policy.retry_if(|error| {
                !matches!(error.downcast_ref(), Some(micro_framework::Error::Transport(t)) if t.is_permanent())
            });
        }
        let route = Route::new(announces_too_much).backoff(policy);
        let config = memory_test_config(&unique("permanent")).with_max_message_size(1024);
        let message = micro_framework::Message::json(&json!({})).unwrap();
        let failure = call_route(route, config, message).await.unwrap_err();
        assert!(failure.message.contains("MAX_MESSAGE_SIZE"), "{failure:?}");
        assert_eq!(failure.retryable, !filtered, "{failure:?}");
    }
}

/// A retry whose delay ends while its route's queue is full under a policy's `max-length` with
/// `overflow: reject-publish` (RabbitMQ only; each policy matches this test's queue only, and
/// is cleared on drop). The README's known limit of classic delay queues, and the way out.
mod a_retry_coming_back_to_a_full_queue {
    use super::common;

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use common::{config, unique, Probe};
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::config::QueueType;
    use micro_framework::dependencies::Shared;
    use micro_framework::prelude::*;
    use micro_framework::retry::{AsyncBackOff, BackOffData};
    use micro_framework::testing::TestService;
    use serde_json::{json, Value};

    /// Quorum delay queues dead-letter at least once: the retry waits for room, and runs.
    #[tokio::test]
    async fn waits_for_room_under_quorum_queues() {
        let Some((retried, _)) = retry_into_a_full_queue(QueueType::Quorum).await else { return };
        assert!(retried, "the retry did not run");
    }

    /// A classic delay queue dead-letters at most once: the broker drops the retry (no run,
    /// no dead letter). Should RabbitMQ keep it one day, this fails, and the README's limit
    /// goes.
    #[tokio::test]
    async fn is_dropped_by_the_broker_from_a_classic_delay_queue() {
        let Some(seen) = retry_into_a_full_queue(QueueType::Classic).await else { return };
        assert_eq!(seen, (false, 0), "(retried, dead letters)");
    }

    /// A policy of this test's, cleared when dropped.
    struct Policy(String);

    impl Policy {
        fn set(pattern: &str, definition: &str) -> Policy {
            let name = unique("retry_policy");
            let output = std::process::Command::new("rabbitmqctl")
                .args([
                    "set_policy",
                    &name,
                    pattern,
                    definition,
                    "--apply-to",
                    "queues",
                    "--priority",
                    "100",
                ])
                .output()
                .expect("rabbitmqctl runs");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            Policy(name)
        }
    }

    impl Drop for Policy {
        fn drop(&mut self) {
            let _ =
                std::process::Command::new("rabbitmqctl").args(["clear_policy", &self.0]).output();
        }
    }

    /// What the target saw: (payload "name", retry count).
    #[derive(Default)]
    struct Journal(Mutex<Vec<(String, u32)>>);

    /// `fail` fails on its first attempt; `block` waits for the probe's gate; the others succeed.
    fn job(
        Payload(payload): Payload<Value>,
        retry: BackOffData,
        Dep(journal): Dep<Arc<Journal>>,
        Dep(probe): Dep<Arc<Probe>>,
    ) -> Result<(), std::io::Error> {
        let name = payload["name"].as_str().unwrap_or_default().to_owned();
        journal.0.lock().unwrap().push((name.clone(), retry.retry_count));
        match name.as_str() {
            "fail" if retry.retry_count == 0 => Err(std::io::Error::other("first attempt fails")),
            "block" => {
                probe.enter(payload.clone());
                probe.leave();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// (the retry ran again, dead letters) of a message whose retry's delay ended while its
    /// route's queue was full.
    async fn retry_into_a_full_queue(queue_type: QueueType) -> Option<(bool, usize)> {
        let uri = common::rabbitmq_uri()?;
        let shop = unique("fullshop");
        let config = config(&uri, "fullsvc")
            .with_max_workers(1)
            .with_prefetch_count(Some(1))
            .with_queue_type(queue_type);
        let queue = format!("evt-{shop}-job--{}.job", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let journal = Arc::new(Journal::default());
        let probe = Probe::closed();
        let routes = vec![Route::new(job)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(2000)))
            .dependency(Shared(journal.clone()))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let _policy = Policy::set(
            &format!("^{}$", regex_escape(&queue)),
            r#"{"max-length": 1, "overflow": "reject-publish"}"#,
        );
        tokio::time::sleep(Duration::from_millis(500)).await; // the policy applies

        service.dispatch(&shop, "job", &json!({"name": "fail"})).await.unwrap();
        common::wait_until(|| !journal.0.lock().unwrap().is_empty(), "the first attempt").await;
        // the worker busy, then one message ready: the queue is full
        service.dispatch(&shop, "job", &json!({"name": "block"})).await.unwrap();
        probe.wait_started(1).await;
        service.dispatch(&shop, "job", &json!({"name": "filler"})).await.unwrap();
        // the retry's delay (2 s) ends while the queue is full
        tokio::time::sleep(Duration::from_secs(4)).await;
        probe.open();
        tokio::time::sleep(Duration::from_secs(5)).await;

        let seen = journal.0.lock().unwrap().clone();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap_or_default();
        let delay_queues: Vec<String> = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "--no-table-headers", "name", "messages"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&queue))
            .map(str::to_owned)
            .collect();
        eprintln!("attempts: {seen:?}\ndead letters: {}\nqueues: {delay_queues:?}", dead.len());
        drop(_policy);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        let retried = seen.iter().any(|(name, retry)| name == "fail" && *retry == 1);
        Some((retried, dead.len()))
    }

    fn regex_escape(text: &str) -> String {
        text.chars()
            .flat_map(|c| match c {
                '.' | '-' | '$' | '^' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}'
                | '|' | '\\' => vec!['\\', c],
                _ => vec![c],
            })
            .collect()
    }
}
