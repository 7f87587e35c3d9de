//! Each decision of how a message is settled that a mutation of the code showed no other test
//! pinned: the RPC reply before the request's ack, the retry numbers, the crash count through
//! hand-backs and dead letters, the filter and the size limit at their edge, what a stop hands
//! back.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::Probe;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use serde_json::{json, Value};

/// A fresh in-process broker.
fn memory_uri() -> String {
    format!("memory://settle-decisions-{}", uuid::Uuid::new_v4())
}

/// The calls of a route.
#[derive(Default)]
struct Calls(AtomicU64);

impl Calls {
    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Counts its call.
fn record(Payload(_): Payload<Value>, Dep(calls): Dep<Arc<Calls>>) {
    calls.0.fetch_add(1, Ordering::SeqCst);
}

/// Holds its worker slot until its probe's gate opens.
fn hog(Payload(_): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(Value::Null);
    probe.leave();
}

/// A service of `config` (one worker slot) whose slot a call of `hog` holds, waiting at the
/// probe's gate, beside `record` of `shop`'s event `job`, whose calls are counted.
async fn one_slot_held(config: Config, shop: &str) -> (TestService, Arc<Probe>, Arc<Calls>) {
    let (probe, calls) = (Probe::closed(), Arc::new(Calls::default()));
    let routes = vec![
        Route::new(hog)
            .entrypoint(EventListener::new(shop, "hog"))
            .dependency(Shared(probe.clone())),
        Route::new(record)
            .entrypoint(EventListener::new(shop, "job"))
            .dependency(Shared(calls.clone())),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    service.dispatch(shop, "hog", &json!({})).await.unwrap();
    probe.wait_started(1).await;
    (service, probe, calls)
}

mod rpc_reply {
    //! The RPC server's reply-then-ack decision: a reply the broker refuses for now sends the
    //! request back to its queue (it is answered later); a reply refused for good acks the
    //! request, which is not run again. On the in-process broker, whose memory bound refuses
    //! publishes for now (`LimitReached { what: BrokerMemory }`, not permanent).

    use super::common;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use common::Probe;
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::amqp::rpc::Args;
    use micro_framework::dependencies::Shared;
    use micro_framework::prelude::*;
    use micro_framework::testing::TestService;
    use micro_framework::transport::memory::MemoryTransport;
    use micro_framework::transport::{
        BindingSpec, Headers, OutgoingMessage, PublishOptions, QueueSpec, Transport,
    };
    use micro_framework::Message;
    use serde_json::{json, Value};

    /// Waits at the probe's gate, then answers 7.
    fn held(Args(()): Args<()>, Dep(probe): Dep<Arc<Probe>>) -> u64 {
        probe.enter(json!(null));
        probe.leave();
        7
    }

    /// A service `held` on a fresh in-process broker, a raw connection to it, and a reply queue
    /// bound to `nameko-rpc` with `reply_to` as its key.
    async fn start(probe: &Arc<Probe>) -> (TestService, MemoryTransport, String, String) {
        let uri = format!("memory://settle-decisions-{}", uuid::Uuid::new_v4());
        let config = common::config(&uri, "mutrpc");
        let routes =
            vec![Route::new(held).entrypoint(RPCListener::new()).dependency(Shared(probe.clone()))];
        let service_name = config.service_name.clone();
        let service = TestService::start(routes, config).await.unwrap();
        let raw = MemoryTransport::connect(&uri).unwrap();
        let reply_to = uuid::Uuid::new_v4().to_string();
        let queue = format!("reply-{reply_to}");
        raw.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: "nameko-rpc".into(),
            routing_key: reply_to.clone(),
            arguments: Headers::new(),
        };
        raw.bind_queue(&binding).await.unwrap();
        let mut message = Message::json(&Value::Null).unwrap();
        message.properties.correlation_id = Some("call-1".into());
        message.properties.reply_to = Some(reply_to);
        let body = Bytes::from(json!({"args": [], "kwargs": {}}).to_string());
        let request = OutgoingMessage { body, properties: message.properties };
        let key = format!("{service_name}.held");
        raw.publish("nameko-rpc", &key, request, PublishOptions { mandatory: true }).await.unwrap();
        (service, raw, queue, format!("rpc-{service_name}"))
    }

    /// The reply's broker refuses it for now (its memory bound reached while the call runs): the
    /// request goes back to its queue (rustdoc of `reply_then_ack`: "one that may succeed later
    /// sends the request back to its queue after a pause"), runs again, and its caller is answered
    /// once the broker takes publishes again. Acked without its reply, the caller would wait for
    /// ever (guards against: the request acked when its reply failed for now; acked before the
    /// reply).
    #[tokio::test]
    async fn a_reply_refused_for_now_is_sent_once_the_broker_takes_it_again() {
        let probe = Probe::closed();
        let (service, raw, reply_queue, _) = start(&probe).await;
        probe.wait_started(1).await;
        // no room: the reply publish fails with LimitReached { BrokerMemory }, not permanent
        raw.broker().set_max_bytes(1);
        probe.open();
        tokio::time::sleep(Duration::from_millis(400)).await;
        raw.broker().set_max_bytes(256 * 1024 * 1024);
        let mut reply = None;
        for _ in 0..800 {
            if let Some(delivery) = raw.get(&reply_queue).await.unwrap() {
                delivery.acker.ack().await.unwrap();
                reply = Some(delivery);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reply = reply.expect(
            "no reply within 8 s: a request whose reply the broker refused for now was settled \
             without it (acked) instead of going back to its queue",
        );
        assert_eq!(reply.properties.correlation_id.as_deref(), Some("call-1"));
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["result"], json!(7), "{body}");
        service.stop().await.unwrap();
    }

    /// The reply's exchange is gone (a permanent error, `NotFound`): the request is acked without a
    /// reply and not run again ("a reply that fails for good is not sent (the request is acked:
    /// requeued, it would come back for ever)"). Guards against this: requeued, the target ran
    /// again and again.
    #[tokio::test]
    async fn a_reply_refused_for_good_acks_the_request_which_runs_once() {
        let probe = Probe::closed();
        let (service, raw, _, request_queue) = start(&probe).await;
        probe.wait_started(1).await;
        raw.delete_exchange("nameko-rpc").await.unwrap();
        probe.open();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            probe.started(),
            1,
            "a request whose reply failed for good ran again: it was sent back to its queue \
             instead of being acked"
        );
        let info = raw.queue_info(&request_queue).await.unwrap();
        assert_eq!(info.message_count, 0, "the request is settled, not back in {request_queue}");
        service.stop().await.unwrap();
    }
}

mod retries_and_counts {
    //! The retry number each retry asks its interval for, and the crash-loop guard's count
    //! through a stop's hand-back. On the in-process broker (the decisions are the core's).

    use super::common;
    use super::memory_uri;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use common::{config, unique};
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::prelude::*;
    use micro_framework::retry::{AsyncBackOff, BackOff, Interval};
    use micro_framework::testing::{take_messages, TestService};
    use micro_framework::transport::memory::MemoryTransport;
    use micro_framework::transport::{HeaderValue, OutgoingMessage, PublishOptions, Transport};
    use micro_framework::Message;
    use serde_json::{json, Value};

    fn always_fails(Payload(_): Payload<Value>) -> Result<(), std::io::Error> {
        Err(std::io::Error::other("always"))
    }

    /// Retry number `n` (1-based) waits `interval.delay(n)`, as `Interval` documents ("The delay
    /// before retry number `n` (1 for the first retry)"): with a linear interval of 100 ms + 200 ms
    /// a step, retry 1 waits 100 ms and retry 2 waits 300 ms, in `{queue}.delay-100` and
    /// `{queue}.delay-300`. Guards against this: the interval asked for the retry count before the
    /// retry (0, then 1), so retry 2 waited 100 ms too, and every growing interval lagged a step.
    #[tokio::test]
    async fn each_broker_retry_waits_the_interval_of_its_own_number() {
        let uri = memory_uri();
        let shop = unique("mutlin");
        let config = config(&uri, "mutlin");
        let queue = format!("evt-{shop}-job--{}.always_fails", config.service_name);
        let backoff = AsyncBackOff::new(2, Duration::from_millis(100))
            .interval(Interval::linear(Duration::from_millis(100), Duration::from_millis(200)));
        let routes = vec![Route::new(always_fails)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(backoff)];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({})).await.unwrap();
        let route = service.route("always_fails").unwrap().clone();
        common::wait_until(|| route.stats().failed_count() == 1, "the dead letter").await;
        let raw = MemoryTransport::connect(&uri).unwrap();
        let delay_queues: Vec<String> = raw
            .broker()
            .queue_names()
            .into_iter()
            .filter(|name| name.contains(".delay-"))
            .collect();
        let expected = vec![format!("{queue}.delay-100"), format!("{queue}.delay-300")];
        assert_eq!(
            delay_queues, expected,
            "retry 2 of Interval::linear(100 ms, 200 ms) must wait 300 ms (delay(2)), retry 1 100 ms"
        );
        service.stop().await.unwrap();
    }

    /// The retry numbers an `Interval::custom` function was asked for.
    #[derive(Default)]
    struct Asked(Mutex<Vec<u32>>);

    /// The same for in-worker retries (`BackOff`): the interval is asked for retry 1, then 2.
    #[tokio::test]
    async fn each_in_worker_retry_asks_the_interval_for_its_own_number() {
        let uri = memory_uri();
        let shop = unique("mutcus");
        let config = config(&uri, "mutcus");
        let asked = Arc::new(Asked::default());
        let recorder = asked.clone();
        let interval = Interval::custom(move |retry| {
            recorder.0.lock().unwrap().push(retry);
            Duration::from_millis(10)
        });
        let backoff = BackOff::new(2, Duration::from_millis(10)).interval(interval);
        let routes = vec![Route::new(always_fails)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(backoff)];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({})).await.unwrap();
        let route = service.route("always_fails").unwrap().clone();
        common::wait_until(|| route.stats().failed_count() == 1, "the dead letter").await;
        assert_eq!(
            *asked.0.lock().unwrap(),
            vec![1, 2],
            "Interval::custom is documented as called with the retry number, 1 for the first retry"
        );
        service.stop().await.unwrap();
    }

    /// A message that already came back unsettled twice (a counted copy, `x-mf-redeliveries: 2`)
    /// and is handed back unstarted by a stop goes back "with the count it had" (README, Crash
    /// loops): handed back with no count, a poison message whose service is stopped between its
    /// crashes (a deploy, an autoscaler) would be run again for ever, its count reset at each stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_counted_message_handed_back_at_a_stop_keeps_its_count() {
        let uri = memory_uri();
        let shop = unique("mutcnt");
        let config = config(&uri, "mutcnt").with_max_workers(1);
        let queue = format!("evt-{shop}-job--{}.record", config.service_name);
        let keeper = MemoryTransport::connect(&uri).unwrap();
        let (service, probe, calls) = super::one_slot_held(config, &shop).await;
        // a counted copy, as the crash-loop guard publishes one: straight to the queue
        let mut message = Message::json(&json!({ "id": 1 })).unwrap();
        message.properties.headers.insert("x-mf-redeliveries".into(), HeaderValue::Int(2));
        let copy = OutgoingMessage { body: message.body.clone(), properties: message.properties };
        keeper.publish("", &queue, copy, PublishOptions { mandatory: true }).await.unwrap();
        // past its crash pause (1 s), it waits for the slot the hog holds
        tokio::time::sleep(Duration::from_millis(1500)).await;
        service.begin_stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        probe.open();
        service.wait_stopped().await.unwrap();
        assert_eq!(calls.count(), 0, "the waiting call never ran");
        let back = take_messages(&keeper, &queue).await.unwrap();
        assert_eq!(back.len(), 1, "handed back once: {back:?}");
        assert_eq!(
            back[0].properties.headers.get("x-mf-redeliveries"),
            Some(&HeaderValue::Int(2)),
            "the hand-back of a counted message lost its count of redeliveries: {:?}",
            back[0].properties.headers
        );
    }

    /// "`x-delivery-count` is read only on a redelivery from a queue the route declared as a quorum
    /// queue (on any other queue it is whatever the publisher wrote)" (README, Crash loops): a
    /// fresh message of a quorum queue whose publisher wrote `x-delivery-count: 9`, handed back
    /// unstarted by a stop, goes back uncounted. Guards against this: the hand-back read the
    /// publisher's count as the broker's, and the copy carried `x-mf-redeliveries: 9`, past
    /// `MAX_REDELIVERIES`: refused as `crashed` when it comes back redelivered once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publishers_delivery_count_is_not_carried_by_a_hand_back_from_a_quorum_queue() {
        let uri = memory_uri();
        let shop = unique("mutfdc");
        let config = config(&uri, "mutfdc")
            .with_max_workers(1)
            .with_queue_type(micro_framework::config::QueueType::Quorum);
        let queue = format!("evt-{shop}-job--{}.record", config.service_name);
        let keeper = MemoryTransport::connect(&uri).unwrap();
        let (service, probe, calls) = super::one_slot_held(config, &shop).await;
        let mut message = Message::json(&json!({ "id": 1 })).unwrap();
        message.properties.headers.insert("x-delivery-count".into(), HeaderValue::Int(9));
        let event = OutgoingMessage { body: message.body.clone(), properties: message.properties };
        let exchange = format!("{shop}.events");
        keeper.publish(&exchange, "job", event, PublishOptions { mandatory: true }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.begin_stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        probe.open();
        service.wait_stopped().await.unwrap();
        assert_eq!(calls.count(), 0, "the waiting call never ran");
        let back = take_messages(&keeper, &queue).await.unwrap();
        assert_eq!(back.len(), 1, "handed back once: {back:?}");
        let headers = &back[0].properties.headers;
        assert_eq!(
            headers.get("x-mf-redeliveries"),
            None,
            "a fresh message's x-delivery-count (the publisher's) was carried as a count of \
             crashes by its hand-back: {headers:?}"
        );
    }
}

mod after_the_stop {
    //! How deliveries are settled, checked after the service stopped: a message the filter skips
    //! is acked; a retry's refused dead letter and a held failed message come back as what they
    //! were.

    use super::common;
    use super::{record, Calls};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use common::{config, unique};
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::dependencies::Shared;
    use micro_framework::prelude::*;
    use micro_framework::testing::{take_messages, TestService};
    use serde_json::{json, Value};

    /// "Decides whether a message is for the route; others are acked and skipped" (the rustdoc of
    /// `Accept`). Skipped but left unacked, the message counts as skipped and is out of the ready
    /// count (what `foundation.rs::a_payload_filter_skips_events_...` checks, before the stop),
    /// but it goes back to its queue when the service stops, to be skipped again by the next
    /// instance, or, with a filter that changed, run. Checked after the stop, on the in-process
    /// broker and on RabbitMQ.
    #[tokio::test]
    async fn a_skipped_message_is_acked_not_back_in_its_queue_after_the_stop() {
        for uri in common::broker_uris() {
            let shop = unique("mutskip");
            let config = config(&uri, "mutskip");
            let markers = [config.service_name.clone(), shop.clone()];
            let queue = format!("evt-{shop}-paid--{}.record", config.service_name);
            let calls = Arc::new(Calls::default());
            let listener =
                EventListener::new(&shop, "paid").filter(|p| p["amount"].as_i64() > Some(100));
            let routes =
                vec![Route::new(record).entrypoint(listener).dependency(Shared(calls.clone()))];
            // a connection of the test's, which keeps the in-process broker's queues after the stop
            let keeper = micro_framework::transport::connect(&config).await.unwrap();
            let service = TestService::start(routes, config).await.unwrap();
            for amount in [50, 150] {
                service.dispatch(&shop, "paid", &json!({ "amount": amount })).await.unwrap();
            }
            let route = service.route("record").unwrap().clone();
            common::wait_until(|| route.stats().skipped_count() == 1, "the skip").await;
            common::wait_until(|| calls.count() == 1, "the call").await;
            service.stop().await.unwrap();
            let left = take_messages(keeper.as_ref(), &queue).await.unwrap();
            assert!(
                left.is_empty(),
                "{uri}: the skipped message was not acked: back in {queue} after the stop: {:?}",
                left.iter()
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                    .collect::<Vec<_>>()
            );
            keeper.close().await;
            common::cleanup(&uri, &markers).await;
        }
    }

    fn fails(
        Payload(_): Payload<Value>,
        Dep(calls): Dep<Arc<Calls>>,
    ) -> Result<(), std::io::Error> {
        calls.0.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::other("always"))
    }

    /// Under `RETRY_DELAY=delayed_message_plugin`, a retry's dead letter the broker refuses for a
    /// while goes back to the backoff queue "still wrapped" (tests/settle.rs), and, once taken, is
    /// the dead letter its retry would have made at once: `x-mf-original-queue` the route's queue,
    /// where `micro-framework dlq replay` sends it back. Guards against this: handed back
    /// unwrapped, it came back as "not a retry" and was dead-lettered as it came,
    /// `x-mf-original-queue` the backoff queue, to which a replay would send a bare payload that it
    /// dead-letters again.
    #[tokio::test]
    async fn a_retry_dead_letter_refused_for_a_while_names_the_routes_queue_once_taken() {
        use micro_framework::config::RetryDelay;
        use micro_framework::retry::AsyncBackOff;
        use micro_framework::settle::{HEADER_ATTEMPTS, HEADER_ORIGINAL_QUEUE};
        use micro_framework::transport::{
            HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec,
        };
        let uri = format!(
            "memory://settle-decisions-{}?plugins=rabbitmq_delayed_message_exchange",
            uuid::Uuid::new_v4()
        );
        let shop = unique("mutwrap");
        let config = config(&uri, "mutwrap").with_retry_delay(RetryDelay::DelayedMessagePlugin);
        let queue = format!("evt-{shop}-job--{}.fails", config.service_name);
        let dlq = format!("{queue}.dlq");
        let calls = Arc::new(Calls::default());
        let routes = vec![Route::new(fails)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, std::time::Duration::from_millis(20)))
            .dependency(Shared(calls.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        let transport = service.transport().clone();
        // a dead-letter queue full with one message, which refuses more
        transport.delete_queue(&dlq).await.unwrap();
        let full = Headers::from([
            ("x-max-length".to_owned(), HeaderValue::Int(1)),
            ("x-overflow".to_owned(), HeaderValue::from("reject-publish")),
        ]);
        transport
            .declare_queue(&QueueSpec { arguments: full, ..QueueSpec::durable(&dlq) })
            .await
            .unwrap();
        let filler = OutgoingMessage { body: "filler".into(), properties: Default::default() };
        transport.publish("", &dlq, filler, PublishOptions::default()).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "n": 1 })).await.unwrap();
        common::wait_until(|| calls.count() == 2, "the first run and its retry").await;
        // refused at least twice, then room for it
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let filler = service.take_messages(&dlq).await.unwrap();
        assert_eq!(filler.len(), 1, "only the filler so far");
        let mut dead = Vec::new();
        for _ in 0..500 {
            dead = service.take_messages(&dlq).await.unwrap();
            if !dead.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(dead.len(), 1, "one dead letter once the dead-letter queue has room");
        assert_eq!(calls.count(), 2, "not run again");
        let headers = &dead[0].properties.headers;
        assert_eq!(
            headers.get(HEADER_ORIGINAL_QUEUE),
            Some(&HeaderValue::from(queue.as_str())),
            "the dead letter of a retry refused for a while must name the route's queue (where \
             `dlq replay` sends it), as the retry's dead letter taken at once does: {headers:?}"
        );
        assert_eq!(headers.get(HEADER_ATTEMPTS), Some(&HeaderValue::Int(2)), "{headers:?}");
        service.stop().await.unwrap();
    }

    fn held_fails(
        Payload(_): Payload<Value>,
        Dep(probe): Dep<Arc<common::Probe>>,
    ) -> Result<(), String> {
        probe.enter(Value::Null);
        probe.leave();
        Err("fails".into())
    }

    /// A failed message whose dead letter and hand-back the broker both refuse is held unsettled; a
    /// stop meanwhile "hands it back once more" (rustdoc of `hold`): it goes back as a copy
    /// carrying its pending dead letter, uncounted, not marked redelivered, to be dead-lettered
    /// unrun by the next instance. Guards against this: the stop left it unsettled, to go back with
    /// the connection as a redelivery without its failure: counted as a crash (refused as `crashed`
    /// with `MAX_REDELIVERIES=0`), or run again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_message_is_handed_back_with_its_pending_dead_letter_at_a_stop() {
        let uri = format!("memory://settle-decisions-{}", uuid::Uuid::new_v4());
        let shop = unique("muthold");
        let config = config(&uri, "muthold");
        let queue = format!("evt-{shop}-job--{}.held_fails", config.service_name);
        let probe = common::Probe::closed();
        let routes = vec![Route::new(held_fails)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(probe.clone()))];
        let keeper = micro_framework::transport::memory::MemoryTransport::connect(&uri).unwrap();
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "n": 1 })).await.unwrap();
        probe.wait_started(1).await;
        // every publish refused for now: the dead letter, then the hand-back copy
        keeper.broker().set_max_bytes(1);
        probe.open();
        // the hold tried once (after 1 s) and now waits 2 s before its next try
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        keeper.broker().set_max_bytes(256 * 1024 * 1024);
        service.begin_stop();
        service.wait_stopped().await.unwrap();
        let back = take_messages(&keeper, &queue).await.unwrap();
        let dead = take_messages(&keeper, &format!("{queue}.dlq")).await.unwrap();
        assert_eq!(probe.started(), 1, "the failed message ran again");
        // handed back at the stop, or (the copy reached the consumer before it was cancelled)
        // dead-lettered unrun from it
        let handed_back = back.len() == 1
            && dead.is_empty()
            && back[0].properties.headers.contains_key("x-mf-dead-letter-pending")
            && !back[0].properties.headers.contains_key("x-mf-redeliveries")
            && !back[0].redelivered;
        let dead_lettered = back.is_empty() && dead.len() == 1;
        assert!(
            handed_back || dead_lettered,
            "the stop left the held message unsettled: it came back as a redelivery (counted as a \
             crash) instead of a copy carrying its pending dead letter; in {queue}: {back:?}; \
             dead letters: {dead:?}"
        );
    }
}

mod edges {
    //! Edges of the consume loop: a body of exactly `MAX_MESSAGE_SIZE` still goes through the
    //! filter (events) and is served (RPC); a counted copy's dead letter drops its crash count; a
    //! hand-back copy refused at a stop requeues. On the in-process broker.

    use super::common;
    use super::{memory_uri, record, Calls};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use common::{config, unique};
    use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
    use micro_framework::amqp::rpc::Args;
    use micro_framework::dependencies::Shared;
    use micro_framework::prelude::*;
    use micro_framework::testing::{take_messages, TestService};
    use micro_framework::transport::memory::MemoryTransport;
    use micro_framework::transport::{
        BindingSpec, HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec, Transport,
    };
    use micro_framework::Message;
    use serde_json::{json, Value};

    /// A body of exactly `MAX_MESSAGE_SIZE` is within the limit (limits.rs: "a body of exactly
    /// `MAX_MESSAGE_SIZE` bytes is handled"), so the event filter reads it like any other: one
    /// the filter rejects is skipped, not run. A mutation (`<=` made `<` where the consume loop
    /// decides whether the filter may read it): the filter was passed by, and the target ran a
    /// message its filter rejects, since the call's own check lets exactly the limit through.
    #[tokio::test]
    async fn a_body_of_exactly_max_message_size_still_goes_through_the_filter() {
        let uri = memory_uri();
        let shop = unique("mutedge");
        let config = config(&uri, "mutedge").with_max_message_size(1024);
        let calls = Arc::new(Calls::default());
        let listener = EventListener::new(&shop, "data").filter(|_| false);
        let routes =
            vec![Route::new(record).entrypoint(listener).dependency(Shared(calls.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        // a JSON string of 1024 bytes, quotes included
        let body = Bytes::from(json!("f".repeat(1022)).to_string());
        assert_eq!(body.len(), 1024);
        let message =
            OutgoingMessage { body, properties: micro_framework::data::json_properties() };
        let exchange = format!("{shop}.events");
        service
            .transport()
            .publish(&exchange, "data", message, PublishOptions::default())
            .await
            .unwrap();
        let route = service.route("record").unwrap().clone();
        common::wait_until(
            || route.stats().received_count() + route.stats().skipped_count() >= 1,
            "the event",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            (calls.count(), route.stats().skipped_count()),
            (0, 1),
            "a body of exactly MAX_MESSAGE_SIZE passed by the filter that rejects every message, \
             and ran (calls, skipped)"
        );
        service.stop().await.unwrap();
    }

    fn length(Args((x,)): Args<(String,)>) -> usize {
        x.len()
    }

    /// An RPC request of exactly `MAX_MESSAGE_SIZE` bytes is served; the README's limit ("largest
    /// body a service accepts or sends") includes it. Guards against this: refused as
    /// `MalformedRequest`.
    #[tokio::test]
    async fn an_rpc_request_of_exactly_max_message_size_is_served() {
        let uri = memory_uri();
        let config = config(&uri, "mutrpcedge").with_max_message_size(1024);
        let service_name = config.service_name.clone();
        let routes = vec![Route::new(length).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let raw = MemoryTransport::connect(&uri).unwrap();
        let reply_to = uuid::Uuid::new_v4().to_string();
        let queue = format!("reply-{reply_to}");
        raw.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: "nameko-rpc".into(),
            routing_key: reply_to.clone(),
            arguments: Headers::new(),
        };
        raw.bind_queue(&binding).await.unwrap();
        let overhead = json!({"args": [""], "kwargs": {}}).to_string().len();
        let body = json!({"args": ["x".repeat(1024 - overhead)], "kwargs": {}}).to_string();
        assert_eq!(body.len(), 1024);
        let mut message = Message::json(&Value::Null).unwrap();
        message.properties.correlation_id = Some("edge-1".into());
        message.properties.reply_to = Some(reply_to);
        let request = OutgoingMessage { body: Bytes::from(body), properties: message.properties };
        let key = format!("{service_name}.length");
        raw.publish("nameko-rpc", &key, request, PublishOptions { mandatory: true }).await.unwrap();
        let mut reply = None;
        for _ in 0..500 {
            if let Some(delivery) = raw.get(&queue).await.unwrap() {
                delivery.acker.ack().await.unwrap();
                reply = Some(serde_json::from_slice::<Value>(&delivery.body).unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reply = reply.expect("a reply");
        assert_eq!(
            reply["error"],
            Value::Null,
            "a request of exactly MAX_MESSAGE_SIZE was refused: {reply}"
        );
        assert_eq!(reply["result"], json!(1024 - overhead), "{reply}");
        service.stop().await.unwrap();
    }

    fn fails(Payload(_): Payload<Value>) -> Result<(), String> {
        Err("fails".into())
    }

    /// A dead letter does not carry the crash count of its queue (README: "A dead letter does not
    /// carry the count either: it is its queue's"). `settle.rs::a_dead_letter_leaves_the_crash_
    /// count_of_its_queue_behind` publishes its `x-mf-redeliveries` through the exchange, where the
    /// consume loop drops it as a publisher's before anything is dead-lettered, so it passes with
    /// the removal in `dead_letter` deleted. Here the count comes as a counted copy does:
    /// straight to the queue, where it is read.
    #[tokio::test]
    async fn the_dead_letter_of_a_counted_copy_leaves_its_crash_count_behind() {
        let uri = memory_uri();
        let shop = unique("mutdlc");
        let config = config(&uri, "mutdlc");
        let queue = format!("evt-{shop}-job--{}.fails", config.service_name);
        let routes = vec![Route::new(fails).entrypoint(EventListener::new(&shop, "job"))];
        let service = TestService::start(routes, config).await.unwrap();
        let mut message = Message::json(&json!({})).unwrap();
        message.properties.headers.insert("x-mf-redeliveries".into(), HeaderValue::Int(1));
        let copy = OutgoingMessage { body: message.body.clone(), properties: message.properties };
        service
            .transport()
            .publish("", &queue, copy, PublishOptions { mandatory: true })
            .await
            .unwrap();
        let route = service.route("fails").unwrap().clone();
        common::wait_until(|| route.stats().failed_count() == 1, "the dead letter").await;
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].properties.headers.get("x-mf-redeliveries"),
            None,
            "the dead letter carries its queue's crash count: {:?}",
            dead[0].properties.headers
        );
        service.stop().await.unwrap();
    }

    /// A message waiting for a worker slot when the service stops is handed back as a copy; when
    /// the broker refuses that copy, "the message is requeued instead" (README, Crash loops).
    /// `settle.rs::a_message_whose_hand_back_copy_is_refused_is_requeued_not_lost`, which says it
    /// guards this requeue, no longer reaches it (its message is now held, not requeued): it
    /// passes with `nack(true)` made `nack(false)`, which drops the message. Here the copy of a
    /// stop's hand-back is refused (the in-process broker's memory bound).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_back_copy_refused_at_a_stop_requeues_the_message() {
        let uri = memory_uri();
        let shop = unique("mutreq");
        let config = config(&uri, "mutreq").with_max_workers(1);
        let queue = format!("evt-{shop}-job--{}.record", config.service_name);
        let keeper = MemoryTransport::connect(&uri).unwrap();
        let (service, probe, calls) = super::one_slot_held(config, &shop).await;
        service.dispatch(&shop, "job", &json!({ "id": 1 })).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // the hand-back copy is refused: no room
        keeper.broker().set_max_bytes(1);
        service.begin_stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        probe.open();
        service.wait_stopped().await.unwrap();
        keeper.broker().set_max_bytes(256 * 1024 * 1024);
        assert_eq!(calls.count(), 0, "never ran");
        let back = take_messages(&keeper, &queue).await.unwrap();
        assert_eq!(
            back.len(),
            1,
            "the message whose hand-back copy was refused was lost: {back:?}"
        );
    }
}

/// The consume loop: a counted copy's crash pause, and the deliveries buffered at a stop.
mod consume_loop {
    use super::common;

    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use common::{config, unique};
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::dependencies::Shared;
    use micro_framework::prelude::*;
    use micro_framework::testing::TestService;
    use micro_framework::transport::memory::MemoryTransport;
    use micro_framework::transport::{HeaderValue, OutgoingMessage, PublishOptions, Transport};
    use micro_framework::Message;
    use serde_json::{json, Value};

    #[derive(Default)]
    struct Runs(Mutex<Vec<(i64, Instant)>>);

    fn record(Payload(payload): Payload<Value>, Dep(runs): Dep<Arc<Runs>>) {
        let id = payload["id"].as_i64().unwrap_or(-1);
        runs.0.lock().unwrap().push((id, Instant::now()));
    }

    /// "A counted copy waits 1 s before it runs again, so a crash loop is no hot loop" (README,
    /// Crash loops): a counted copy (`x-mf-redeliveries: 1`, published straight to its queue as
    /// the crash-loop guard publishes it) runs a second after it arrives, not at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_counted_copy_waits_its_crash_pause_before_it_runs() {
        let uri = format!("memory://settle-decisions-{}", uuid::Uuid::new_v4());
        let shop = unique("pause");
        let config = config(&uri, "pause");
        let queue = format!("evt-{shop}-job--{}.record", config.service_name);
        let runs = Arc::new(Runs::default());
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(runs.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        let raw = MemoryTransport::connect(&uri).unwrap();
        let publish = |id: i64, counted: bool| {
            let raw = &raw;
            let queue = queue.clone();
            async move {
                let mut message = Message::json(&json!({ "id": id })).unwrap();
                if counted {
                    message
                        .properties
                        .headers
                        .insert("x-mf-redeliveries".into(), HeaderValue::Int(1));
                }
                let copy =
                    OutgoingMessage { body: message.body.clone(), properties: message.properties };
                raw.publish("", &queue, copy, PublishOptions { mandatory: true }).await.unwrap();
                Instant::now()
            }
        };
        let ran_after = |id: i64, sent: Instant| {
            let runs = runs.clone();
            async move {
                for _ in 0..500 {
                    if let Some((_, at)) = runs.0.lock().unwrap().iter().find(|(run, _)| *run == id)
                    {
                        return at.duration_since(sent);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("message {id} never ran");
            }
        };
        let sent = publish(1, false).await;
        // a fresh message first: the route consumes
        ran_after(1, sent).await;
        let sent = publish(2, true).await;
        let counted = ran_after(2, sent).await;
        assert!(
            counted >= Duration::from_millis(900),
            "a counted copy (x-mf-redeliveries: 1) ran {counted:?} after it arrived: no crash pause \
             (README: \"A counted copy waits 1 s before it runs again\")"
        );
        service.stop().await.unwrap();
    }

    /// Deliveries still buffered in the consumer when the stop begins (published, and the stop
    /// begun, before the consume loop ran again: a current-thread runtime) are still handed to the
    /// handler, which hands them back as fresh copies, none marked redelivered nor counted: dropped
    /// unsettled, they would come back with the connection's close marked redelivered, each to be
    /// counted as a crash at the next start (dead-lettered `crashed`, unrun, under
    /// `MAX_REDELIVERIES=0`).
    #[tokio::test]
    async fn deliveries_buffered_at_the_stop_go_back_uncounted() {
        let uri = format!("memory://settle-decisions-{}", uuid::Uuid::new_v4());
        let shop = unique("drain");
        let config = config(&uri, "drain");
        let queue = format!("evt-{shop}-job--{}.record", config.service_name);
        let runs = Arc::new(Runs::default());
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(&shop, "job"))
            .dependency(Shared(runs.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        let raw = MemoryTransport::connect(&uri).unwrap();
        let burst = 10;
        for id in 0..burst {
            let message = Message::json(&json!({ "id": id })).unwrap();
            let copy =
                OutgoingMessage { body: message.body.clone(), properties: message.properties };
            raw.publish("", &queue, copy, PublishOptions { mandatory: true }).await.unwrap();
        }
        service.begin_stop();
        service.wait_stopped().await.unwrap();
        let ran = runs.0.lock().unwrap().len();
        let back = micro_framework::testing::take_messages(&raw, &queue).await.unwrap();
        let redelivered: Vec<_> = back
            .iter()
            .filter(|message| {
                message.redelivered
                    || message.properties.headers.contains_key("x-mf-redelivered")
                    || message.properties.headers.contains_key("x-mf-redeliveries")
            })
            .map(|message| String::from_utf8_lossy(&message.body).into_owned())
            .collect();
        assert_eq!(ran + back.len(), burst as usize, "ran {ran}, back {}", back.len());
        assert!(
            redelivered.is_empty(),
            "{} of {} messages buffered at the stop came back marked redelivered (left unsettled \
             to the connection's close, to be counted as crashes): {redelivered:?}",
            redelivered.len(),
            back.len()
        );
    }
}
