//! Settling beyond the plain path, on every broker of `common::broker_uris()`: the retry state
//! a route reads is the one made for its own queue, and a message whose retry or dead letter
//! cannot be published goes back to its queue without being taken for a crash.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::queues::event_with_a_250_byte_queue;
use common::{broker_uris, config, unique};
use micro_framework::amqp::entrypoints::{EventListener, QueueListener};
use micro_framework::config::RetryDelay;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOffData};
use micro_framework::settle::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_ORIGINAL_CC,
};
use micro_framework::testing::{take_messages, TestService};
use micro_framework::transport::{
    HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec,
};
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

fn header<'a>(message: &'a micro_framework::Message, key: &str) -> &'a HeaderValue {
    message.properties.headers.get(key).unwrap_or(&HeaderValue::Void)
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

/// Take the messages of `queue` once there are some (for up to 10 s).
async fn wait_for_messages(service: &TestService, queue: &str) -> Vec<micro_framework::Message> {
    for _ in 0..500 {
        let messages = service.take_messages(queue).await.unwrap_or_default();
        if !messages.is_empty() {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no message came to {queue}");
}

/// A dead letter the broker refuses (a full `{queue}.dlq` that rejects publishes) leaves its
/// message unsettled: it goes back to the queue it came from (the backoff queue, still wrapped,
/// under the plugin layout) as an uncounted copy carrying its failure, and is dead-lettered
/// again, without running again, until the dead-letter queue takes it, with its own failure,
/// not as `crashed`.
#[tokio::test]
async fn a_refused_dead_letter_goes_back_uncounted_and_is_made_again_without_a_new_run() {
    common::logs::capture(tracing::Level::ERROR);
    for (uri, layout) in brokers_and_layouts() {
        let shop = unique("dlqfull");
        // With no redelivery allowed, one comeback counted as a crash refuses the message.
        let config = config(&uri, "dlqfull").with_max_redeliveries(0).with_retry_delay(layout);
        let markers = [config.service_name.clone(), shop.clone()];
        let service_name = config.service_name.clone();
        let queue = format!("evt-{shop}-job--{service_name}.flaky");
        let dlq = format!("{queue}.dlq");
        let journal = Arc::new(Journal::default());
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(20)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        let transport = service.transport();
        // A dead-letter queue full with one message, which refuses more: the broker nacks
        // each dead letter. (Deleting it would make room too, but a dead letter published as
        // it goes can be confirmed and lost with it.)
        transport.delete_queue(&dlq).await.unwrap();
        let full = Headers::from([
            ("x-max-length".to_owned(), HeaderValue::Int(1)),
            ("x-overflow".to_owned(), HeaderValue::from("reject-publish")),
        ]);
        let full = QueueSpec { arguments: full, ..QueueSpec::durable(&dlq) };
        transport.declare_queue(&full).await.unwrap();
        let filler = OutgoingMessage { body: "filler".into(), properties: Default::default() };
        transport.publish("", &dlq, filler, PublishOptions::default()).await.unwrap();
        service.dispatch(&shop, "job", &json!({})).await.unwrap();
        // the queue it goes back to: the work queue, or under the plugin the service's backoff
        // queue; either names the test's own shop or service
        let refused = || {
            let logs = common::logs::logged();
            let mine = |line: &&str| line.contains(&shop) || line.contains(&service_name);
            let lines = logs.lines().filter(|line| line.contains("cannot dead-letter"));
            lines.filter(mine).count()
        };
        common::wait_until(|| refused() >= 3, "the dead letter refused three times").await;
        assert_eq!(journal.entries(), [0, 1], "{uri} {layout:?}: not run again");
        let mut dead = service.take_messages(&dlq).await.unwrap();
        assert_eq!(&dead[0].body[..], b"filler", "{uri} {layout:?}");
        dead.remove(0);
        if dead.is_empty() {
            dead = wait_for_messages(&service, &dlq).await;
        }
        assert_eq!(journal.entries(), [0, 1], "{uri} {layout:?}: not run again");
        assert_eq!(dead.len(), 1, "{uri} {layout:?}");
        let kind = header(&dead[0], HEADER_ERROR_KIND);
        assert_eq!(kind, &HeaderValue::from("error"), "{uri} {layout:?}");
        assert_eq!(header(&dead[0], HEADER_ERROR), &HeaderValue::from("attempt 1 failed"));
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(2), "{uri} {layout:?}");
        assert_eq!(header(&dead[0], "x-mf-redeliveries"), &HeaderValue::Void, "{uri}: uncounted");
        let pending = header(&dead[0], "x-mf-dead-letter-pending");
        assert_eq!(pending, &HeaderValue::Void, "{uri} {layout:?}: the mark is the copy's own");
        assert_eq!(service.queue_len(&queue).await.unwrap(), 0, "{uri} {layout:?}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// A dead letter refused while the service's user may not write (403 on every publish, the
/// hand-back copy's too) holds its message unsettled and tries again, with pauses that grow:
/// the target does not run again, the refusals are not logged once a second, and once the
/// user may write again the message is dead-lettered once. Was: the hand-back copy refused,
/// the message was requeued, came back without its pending dead letter, could not be counted
/// either, and ran again, uncounted, once a second for as long as the refusal lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_with_every_publish_holds_its_message_without_running_it_again() {
    common::logs::capture(tracing::Level::ERROR);
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("mf_refused");
    let shop = unique("refused");
    let config = config(&user.uri(&uri), "refused").with_max_redeliveries(3);
    let markers = [config.service_name.clone(), shop.clone()];
    let service_name = config.service_name.clone();
    let queue = format!("evt-{shop}-job--{service_name}.flaky");
    let dlq = format!("{queue}.dlq");
    let journal = Arc::new(Journal::default());
    let routes = vec![Route::new(flaky)
        .entrypoint(EventListener::new(&shop, "job"))
        .dependency(Shared(journal.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let publisher =
        micro_framework::transport::connect(&Config::new(unique("pub")).with_amqp_uri(uri.clone()))
            .await
            .unwrap();
    user.permit(".*", "^$", ".*");
    let job = OutgoingMessage { body: "{}".into(), properties: Default::default() };
    let options = PublishOptions { mandatory: true };
    publisher.publish(&format!("{shop}.events"), "job", job, options).await.unwrap();
    common::wait_until(|| !journal.entries().is_empty(), "the first run").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(journal.entries(), [0], "not run again while every publish is refused");
    let logs = common::logs::logged();
    let errors = logs.lines().filter(|line| line.contains(&service_name)).count();
    assert!(errors <= 2, "{errors} error lines in 8 s:\n{logs}");
    user.permit(".*", ".*", ".*");
    let dead = wait_for_dead_letters(&*publisher, &dlq).await;
    assert_eq!(dead.len(), 1, "one dead letter once the user may write again");
    assert_eq!(header(&dead[0], HEADER_ERROR), &HeaderValue::from("attempt 0 failed"));
    assert_eq!(header(&dead[0], "x-mf-redeliveries"), &HeaderValue::Void, "uncounted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(take_messages(&*publisher, &dlq).await.unwrap().is_empty(), "only one");
    assert!(take_messages(&*publisher, &queue).await.unwrap().is_empty(), "nothing left");
    assert_eq!(journal.entries(), [0], "not run again once the dead letter was taken");
    service.stop().await.unwrap();
    publisher.close().await;
    common::cleanup(&uri, &markers).await;
}

/// Take the messages of `queue` through `transport` once there are some (for up to 20 s).
async fn wait_for_dead_letters(
    transport: &dyn micro_framework::transport::Transport,
    queue: &str,
) -> Vec<micro_framework::Message> {
    for _ in 0..200 {
        let messages = take_messages(transport, queue).await.unwrap();
        if !messages.is_empty() {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no message came to {queue}");
}

/// A retry the broker does not take (its delay queue cannot be declared: a queue of that name
/// is in the way) leaves its message unsettled: it goes back to its queue as an uncounted copy
/// carrying the retry, and runs again as that retry; so a message the broker never takes a
/// retry copy of still ends, dead-lettered once its retries are spent.
#[tokio::test]
async fn a_retry_that_cannot_be_scheduled_goes_back_uncounted_as_that_retry() {
    for uri in broker_uris() {
        let shop = unique("delaystuck");
        let config = config(&uri, "delaystuck").with_max_redeliveries(0);
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = format!("evt-{shop}-job--{}.flaky", config.service_name);
        let journal = Arc::new(Journal::default());
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        let transport = service.transport();
        // declared without the delay queue's arguments, it cannot be declared with them
        let in_the_way = QueueSpec::durable(format!("{queue}.delay-20"));
        transport.declare_queue(&in_the_way).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "fail_until": 99 })).await.unwrap();
        let dead = wait_for_messages(&service, &format!("{queue}.dlq")).await;
        assert_eq!(journal.entries(), [0, 1, 2], "{uri}: each run one retry");
        assert_eq!(dead.len(), 1, "{uri}");
        assert_eq!(header(&dead[0], HEADER_ERROR), &HeaderValue::from("attempt 2 failed"));
        assert_eq!(header(&dead[0], HEADER_ATTEMPTS), &HeaderValue::Int(3), "{uri}");
        assert_eq!(header(&dead[0], "x-mf-redeliveries"), &HeaderValue::Void, "{uri}: uncounted");
        transport.delete_queue(&in_the_way.name).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// Fails once the test lets it go on.
fn held_then_fails(Dep(probe): Dep<Arc<common::Probe>>) -> Result<(), std::io::Error> {
    probe.enter(Value::Null);
    probe.leave();
    Err(std::io::Error::other("failed during the stop"))
}

fn gives_up(Dep(journal): Dep<Arc<Journal>>) {
    journal.0.lock().unwrap().push(0);
}

/// A failure whose retry copy cannot be made runs the route's callback; when the service is
/// stopping the callback cannot start, and the message goes back to its queue as the stop
/// hands back unstarted ones: an uncounted copy, which the next start handles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_callback_a_stop_prevents_goes_back_uncounted() {
    for uri in broker_uris() {
        let shop = unique("cbstop");
        let config = config(&uri, "cbstop").with_max_redeliveries(0);
        let markers = [config.service_name.clone(), shop.clone()];
        // A queue of 250 bytes: its dead-letter queue fits, its delay queue does not.
        let (event, queue) =
            event_with_a_250_byte_queue(&shop, &config.service_name, "held_then_fails");
        let keeper = micro_framework::transport::connect(&config).await.unwrap();
        let called_back = Arc::new(Journal::default());
        let routes = |probe: &Arc<common::Probe>| {
            vec![CallbackRoute::new(held_then_fails, gives_up)
                .entrypoint(EventListener::new(&shop, &event))
                .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
                .dependency(Shared(probe.clone()))
                .dependency(Shared(called_back.clone()))]
        };
        let probe = common::Probe::closed();
        let service = TestService::start(routes(&probe), config.clone()).await.unwrap();
        service.dispatch(&shop, &event, &json!({})).await.unwrap();
        probe.wait_started(1).await;
        service.begin_stop();
        probe.open();
        service.wait_stopped().await.unwrap();
        assert!(called_back.entries().is_empty(), "{uri}: no callback during the stop");
        let left = take_messages(keeper.as_ref(), &queue).await.unwrap();
        assert_eq!(left.len(), 1, "{uri}: the message went back to {queue}");
        assert!(!left[0].redelivered, "{uri}: handed back as a fresh copy, not requeued");
        assert_eq!(header(&left[0], "x-mf-redeliveries"), &HeaderValue::Void, "{uri}");
        keeper.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

/// A dependency whose teardown at the stop closes what calls still running use (a pool, say),
/// and takes its time: the calls it ends fail because of the stop, not because of their
/// message, and settle before the connection closes.
struct ClosedAtStop(tokio::sync::watch::Sender<bool>);

#[micro_framework::async_trait]
impl micro_framework::dependencies::Dependency for ClosedAtStop {
    type Output = tokio::sync::watch::Receiver<bool>;

    async fn get(
        &self,
        _: &micro_framework::WorkerContext,
    ) -> Result<Self::Output, micro_framework::BoxError> {
        Ok(self.0.subscribe())
    }

    async fn teardown(&self) {
        let _ = self.0.send(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn uses_the_pool(
    Dep(mut closed): Dep<tokio::sync::watch::Receiver<bool>>,
    Dep(probe): Dep<Arc<common::Probe>>,
) -> Result<(), String> {
    probe.enter(json!("started"));
    probe.leave();
    let _ = closed.wait_for(|closed| *closed).await;
    Err("the pool is closed".into())
}

/// A call still running when the stop gives up on it (past `SHUTDOWN_TIMEOUT`) and failing
/// then, its dependencies torn down under it, is not dead-lettered: its message goes back to
/// its queue with the connection, for the next start to handle.
#[tokio::test]
async fn a_call_failing_after_the_stop_gave_up_on_it_is_not_dead_lettered() {
    for uri in broker_uris() {
        let shop = unique("gaveup");
        let config = config(&uri, "gaveup").with_shutdown_timeout(Duration::from_millis(200));
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = format!("evt-{shop}-job--{}.uses_the_pool", config.service_name);
        let probe = common::Probe::new();
        let routes = vec![Route::new(uses_the_pool)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(probe.clone()))];
        let (closed, _) = tokio::sync::watch::channel(false);
        let runner = Runner::new(routes, config.clone()).dependency(ClosedAtStop(closed));
        let service = TestService::start_runner(runner).await.unwrap();
        service.dispatch(&shop, "job", &json!({})).await.unwrap();
        probe.wait_started(1).await;
        service.stop().await.unwrap();
        let observer = micro_framework::transport::connect(&config).await.unwrap();
        let dead = take_messages(observer.as_ref(), &format!("{queue}.dlq")).await.unwrap();
        let left = observer.queue_info(&queue).await.unwrap().message_count;
        observer.close().await;
        assert!(dead.is_empty(), "{uri}: dead-lettered for what the stop did: {dead:?}");
        assert_eq!(left, 1, "{uri}: back in its queue");
        common::cleanup(&uri, &markers).await;
    }
}

/// A dead letter does not carry the crash count of the queue it came from
/// (`x-mf-redeliveries`, which a counted copy carries): a route consuming the dead-letter queue
/// would take it for its own, waiting the crash pause before each such message and refusing
/// it as `crashed` sooner.
#[tokio::test]
async fn a_dead_letter_leaves_the_crash_count_of_its_queue_behind() {
    for uri in broker_uris() {
        let shop = unique("counted");
        let config = config(&uri, "counted");
        let markers = [config.service_name.clone(), shop.clone()];
        let dlq = format!("evt-{shop}-job--{}.flaky.dlq", config.service_name);
        let journal = Arc::new(Journal::default());
        let routes = vec![Route::new(flaky)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        // as a copy counted once by the crash-loop guard comes back to its queue
        let counted = Headers::from([("x-mf-redeliveries".to_owned(), HeaderValue::Int(1))]);
        let properties =
            micro_framework::transport::Properties { headers: counted, ..Default::default() };
        let message = OutgoingMessage { body: "{}".into(), properties };
        let exchange = format!("{shop}.events");
        let transport = service.transport();
        transport.publish(&exchange, "job", message, PublishOptions::default()).await.unwrap();
        let dead = wait_for_messages(&service, &dlq).await;
        assert_eq!(journal.entries(), [0], "{uri}");
        assert_eq!(header(&dead[0], "x-mf-redeliveries"), &HeaderValue::Void, "{uri}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// A retry comes back to its queue through the event filter's queue, but the filter took the
/// message already: asked again, a filter that changed its mind (a flag turned off meanwhile)
/// would have the retry acked unrun, the failed message gone without a dead letter.
#[tokio::test]
async fn a_retry_is_not_filtered_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for uri in broker_uris() {
        let shop = unique("filtered");
        let config = config(&uri, "filtered");
        let markers = [config.service_name.clone(), shop.clone()];
        let journal = Arc::new(Journal::default());
        let open = Arc::new(AtomicBool::new(true));
        let gate = open.clone();
        // takes the first message it sees, and then none
        let listener =
            EventListener::new(&shop, "job").filter(move |_| gate.swap(false, Ordering::SeqCst));
        let routes = vec![Route::new(flaky)
            .entrypoint(listener)
            .backoff(AsyncBackOff::new(1, Duration::from_millis(20)))
            .dependency(Shared(journal.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "fail_until": 1 })).await.unwrap();
        let flaky = service.route("flaky").unwrap().clone();
        let settled = || flaky.stats().succeeded_count() + flaky.stats().skipped_count() >= 1;
        common::wait_until(settled, "the retry").await;
        assert_eq!(journal.entries(), [0, 1], "{uri}: retried");
        assert!(!open.load(Ordering::SeqCst));
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// Counts the calls of the route of a second work queue.
#[derive(Default)]
struct OtherQueueCalls(std::sync::atomic::AtomicU64);

fn always_fails(Payload(_): Payload<Value>, Dep(journal): Dep<Arc<Journal>>) -> Result<(), String> {
    journal.0.lock().unwrap().push(0);
    Err("always fails".into())
}

fn counts(Payload(_): Payload<Value>, Dep(calls): Dep<Arc<OtherQueueCalls>>) {
    calls.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// RabbitMQ routes a publish to its routing key and to each key of its `CC` header (a sender
/// fanning a job out to two work queues through the default exchange). A copy the service makes
/// of the job (a retry, a dead letter) carries no `CC` (nor `BCC`), which would route it to the
/// other queue again: the original `CC` is kept in `x-mf-original-cc` for operators.
#[tokio::test]
async fn a_failing_job_fanned_out_with_cc_is_not_copied_into_the_other_queue_again() {
    for (uri, layout) in brokers_and_layouts() {
        for retries in [Some(1), None] {
            let marker = unique("fanned");
            let (jobs, jobs2) = (format!("{marker}_jobs"), format!("{marker}_jobs2"));
            let config = config(&uri, "fanned").with_retry_delay(layout);
            let markers = [config.service_name.clone(), marker.clone()];
            let (journal, others) =
                (Arc::new(Journal::default()), Arc::new(OtherQueueCalls::default()));
            let mut failing = Route::new(always_fails)
                .entrypoint(QueueListener::new(&jobs))
                .dependency(Shared(journal.clone()));
            if let Some(retries) = retries {
                failing = failing.backoff(AsyncBackOff::new(retries, Duration::from_millis(20)));
            }
            let routes = vec![
                failing,
                Route::new(counts)
                    .entrypoint(QueueListener::new(&jobs2))
                    .dependency(Shared(others.clone())),
            ];
            let service = TestService::start(routes, config).await.unwrap();
            let cc = HeaderValue::Array(vec![HeaderValue::from(jobs2.as_str())]);
            let headers = Headers::from([("CC".to_owned(), cc.clone())]);
            let properties =
                micro_framework::transport::Properties { headers, ..Default::default() };
            let message = OutgoingMessage { body: "{}".into(), properties };
            let transport = service.transport();
            transport.publish("", &jobs, message, PublishOptions::default()).await.unwrap();

            let dead = wait_for_messages(&service, &format!("{jobs}.dlq")).await;
            // time for a copy routed to jobs2 to be handled there
            tokio::time::sleep(Duration::from_millis(500)).await;
            let what = format!("{uri} {layout:?} retries {retries:?}");
            let attempts = usize::try_from(retries.unwrap_or(0)).unwrap() + 1;
            assert_eq!(journal.entries().len(), attempts, "{what}");
            assert_eq!(others.0.load(std::sync::atomic::Ordering::SeqCst), 1, "{what}");
            assert_eq!(header(&dead[0], "CC"), &HeaderValue::Void, "{what}");
            assert_eq!(header(&dead[0], HEADER_ORIGINAL_CC), &cc, "{what}");
            service.stop().await.unwrap();
            common::cleanup(&uri, &markers).await;
        }
    }
}
