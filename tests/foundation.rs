//! The foundation's behaviour, on every broker of `common::broker_uris()`.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{broker_uris, config, wait_until, Probe};
use micro_framework::amqp::entrypoints::{EventListener, QueueListener};
use micro_framework::config::WorkerMode;
use micro_framework::dependencies::Shared;
use micro_framework::entrypoints::TimeEntrypoint;
use micro_framework::prelude::*;
use micro_framework::settle::{HEADER_ERROR, HEADER_ERROR_KIND, HEADER_ROUTE};
use micro_framework::testing::TestService;
use micro_framework::translators::JsonTranslator;
use micro_framework::transport::{HeaderValue, OutgoingMessage, PublishOptions};
use micro_framework::{CallContext, Error};
use serde::Deserialize;
use serde_json::{json, Value};

fn queue_of(service: &str, source: &str, event: &str, method: &str) -> String {
    format!("evt-{source}-{event}--{service}.{method}")
}

fn header<'a>(message: &'a micro_framework::Message, key: &str) -> &'a str {
    message.properties.headers.get(key).and_then(HeaderValue::as_str).unwrap_or_default()
}

fn record(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

#[tokio::test]
async fn events_reach_their_route_and_are_acked_after_success() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "events");
        let markers = [config.service_name.clone(), shop.clone()];
        let service_name = config.service_name.clone();
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(&shop, "paid"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        for i in 0..5 {
            service.dispatch(&shop, "paid", &json!({ "i": i })).await.unwrap();
        }
        service.dispatch(&shop, "refunded", &json!({ "other": true })).await.unwrap();
        service.wait_for_route("record", 5).await.unwrap();
        let queue = queue_of(&service_name, &shop, "paid", "record");
        assert_eq!(service.queue_len(&queue).await.unwrap(), 0);
        let mut seen: Vec<i64> =
            probe.seen.lock().unwrap().iter().map(|v| v["i"].as_i64().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_message_is_not_acked_before_its_outcome_is_settled() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::closed();
        let config = config(&uri, "unacked");
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = queue_of(&config.service_name, &shop, "paid", "record");
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(&shop, "paid"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({ "i": 1 })).await.unwrap();
        probe.wait_started(1).await;
        // The call is running: the broker must still own the message. Losing the connection
        // now hands it back to the queue.
        service.transport().close().await;
        probe.open();
        let _ = service.stop().await;
        let reconnected =
            micro_framework::transport::connect(&Config::new("o").with_amqp_uri(uri.clone()))
                .await
                .unwrap();
        assert_eq!(reconnected.queue_info(&queue).await.unwrap().message_count, 1);
        reconnected.delete_queue(&queue).await.unwrap();
        reconnected.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
}

fn typed(Payload(order): Payload<Order>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(json!(order.id));
    probe.leave();
}

#[tokio::test]
async fn bad_input_goes_to_the_dead_letter_queue_with_the_reason() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "badinput");
        let markers = [config.service_name.clone(), shop.clone()];
        let service_name = config.service_name.clone();
        let failing_translator = |payload: Value| -> Result<Value, String> {
            if payload.get("reject").is_some() {
                Err("rejected by translator".into())
            } else {
                Ok(payload)
            }
        };
        let routes = vec![
            Route::new(typed)
                .entrypoint(EventListener::new(&shop, "paid"))
                .dependency(Shared(probe.clone())),
            Route::new(record)
                .entrypoint(EventListener::new(&shop, "translated"))
                .translator(failing_translator)
                .dependency(Shared(probe.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({ "id": "not a number" })).await.unwrap();
        let raw = OutgoingMessage { body: Bytes::from_static(b"{oops"), ..Default::default() };
        service
            .transport()
            .publish(&format!("{shop}.events"), "paid", raw, PublishOptions::default())
            .await
            .unwrap();
        service.dispatch(&shop, "translated", &json!({ "reject": 1 })).await.unwrap();
        service.dispatch(&shop, "paid", &json!({ "id": 7 })).await.unwrap();
        service.wait_for_route("typed", 3).await.unwrap();
        service.wait_for_route("record", 1).await.unwrap();

        let paid_queue = queue_of(&service_name, &shop, "paid", "typed");
        let dead = service.take_messages(&format!("{paid_queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 2, "wrong shape and undecodable body");
        assert!(dead.iter().all(|m| header(m, HEADER_ERROR_KIND) == "bad_input"));
        assert!(dead.iter().all(|m| header(m, HEADER_ROUTE) == "typed"));
        // three workers handle the messages at once: the dead letters may come in either order
        let (undecodable, wrong_shape) = match dead[0].body == Bytes::from_static(b"{oops") {
            true => (&dead[0], &dead[1]),
            false => (&dead[1], &dead[0]),
        };
        assert!(header(wrong_shape, HEADER_ERROR).contains("payload does not fit"));
        assert!(header(undecodable, HEADER_ERROR).contains("not valid JSON"));
        assert_eq!(undecodable.body, Bytes::from_static(b"{oops"), "body kept as received");

        let translated_queue = queue_of(&service_name, &shop, "translated", "record");
        let dead = service.take_messages(&format!("{translated_queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert!(header(&dead[0], HEADER_ERROR).contains("rejected by translator"));

        // The service kept running: the good message was handled.
        assert_eq!(*probe.seen.lock().unwrap(), vec![json!(7)]);
        assert_eq!(service.queue_len(&paid_queue).await.unwrap(), 0);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

fn fails(Payload(payload): Payload<Value>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other(format!("cannot handle {payload}")))
}

fn panics(Payload(_): Payload<Value>) {
    panic!("boom");
}

fn on_failure(Payload(payload): Payload<Value>, failure: Failure, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(json!({ "payload": payload, "error": failure.message }));
    probe.leave();
}

#[tokio::test]
async fn the_callback_runs_after_a_failure_and_failures_without_one_are_dead_lettered() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "callback");
        let markers = [config.service_name.clone(), shop.clone()];
        let service_name = config.service_name.clone();
        let routes = vec![
            CallbackRoute::new(fails, on_failure)
                .entrypoint(EventListener::new(&shop, "paid"))
                .dependency(Shared(probe.clone())),
            Route::new(panics).entrypoint(EventListener::new(&shop, "paid")),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({ "id": 1 })).await.unwrap();
        service.wait_for_route("fails", 1).await.unwrap();
        service.wait_for_route("panics", 1).await.unwrap();

        let seen = probe.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![json!({ "payload": { "id": 1 }, "error": "cannot handle {\"id\":1}" })]
        );
        let fails_queue = queue_of(&service_name, &shop, "paid", "fails");
        assert_eq!(service.queue_len(&fails_queue).await.unwrap(), 0);
        assert_eq!(service.queue_len(&format!("{fails_queue}.dlq")).await.unwrap(), 0);

        let panics_queue = queue_of(&service_name, &shop, "paid", "panics");
        let dead = service.take_messages(&format!("{panics_queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(header(&dead[0], HEADER_ERROR_KIND), "panic");
        assert!(header(&dead[0], HEADER_ERROR).contains("boom"));
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

async fn hangs_when_told(Payload(hang): Payload<bool>) {
    if hang {
        std::future::pending::<()>().await;
    }
}

#[tokio::test]
async fn an_async_call_past_its_time_limit_is_cancelled_in_a_thread_mode() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let config = config(&uri, "limited")
            .with_worker_mode(WorkerMode::Thread)
            .with_max_workers(1)
            .with_task_time_limit(Some(Duration::from_millis(300)));
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = queue_of(&config.service_name, &shop, "paid", "hangs_when_told");
        let routes =
            vec![Route::new(hangs_when_told).entrypoint(EventListener::new(&shop, "paid"))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!(true)).await.unwrap();
        service.dispatch(&shop, "paid", &json!(false)).await.unwrap();
        // one slot: the second call runs once the first gave it up
        service.wait_for_route("hangs_when_told", 2).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1, "{uri}");
        assert_eq!(dead[0].body, Bytes::from_static(b"true"));
        assert_eq!(header(&dead[0], HEADER_ERROR_KIND), "timed_out");
        assert_eq!(
            header(&dead[0], HEADER_ERROR),
            "call ran past its time limit of 300ms: cancelled"
        );
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_time_limit_too_long_for_the_clock_is_no_limit() {
    // the deadline `now + limit` overflowed and every async call panicked
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let huge = Duration::from_secs_f64(1e19);
        for (what, context_limit) in [("TASK_TIME_LIMIT", None), ("context", Some(Duration::MAX))] {
            let config = config(&uri, "unlimited")
                .with_worker_mode(WorkerMode::Thread)
                .with_task_time_limit(Some(huge));
            let markers = [config.service_name.clone(), shop.clone()];
            let queue = queue_of(&config.service_name, &shop, "paid", "hangs_when_told");
            let routes =
                vec![Route::new(hangs_when_told).entrypoint(EventListener::new(&shop, "paid"))];
            let context = match context_limit {
                Some(limit) => RunnerContext::new(routes).time_limit(limit),
                None => RunnerContext::new(routes),
            };
            let runner = Runner::new(Vec::new(), config).context(context);
            let service = TestService::start_runner(runner).await.unwrap();
            service.dispatch(&shop, "paid", &json!(false)).await.unwrap();
            service.wait_for_route("hangs_when_told", 1).await.unwrap();
            let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
            assert!(dead.is_empty(), "{uri} {what}: {:?}", header(&dead[0], HEADER_ERROR));
            service.stop().await.unwrap();
            common::cleanup(&uri, &markers).await;
        }
    }
}

fn failing_callback(Payload(_): Payload<Value>, _failure: Failure) -> Result<(), String> {
    Err("callback broke too".into())
}

#[tokio::test]
async fn a_failing_callback_dead_letters_the_message() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let config = config(&uri, "badcallback");
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = queue_of(&config.service_name, &shop, "paid", "fails");
        let routes = vec![CallbackRoute::new(fails, failing_callback)
            .entrypoint(EventListener::new(&shop, "paid"))];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({ "id": 1 })).await.unwrap();
        service.wait_for_route("fails", 1).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert!(header(&dead[0], HEADER_ERROR).contains("callback broke too"));
        assert!(header(&dead[0], HEADER_ERROR).contains("cannot handle"));
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn translators_are_chained_in_order() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "translators");
        let markers = [config.service_name.clone(), shop.clone()];
        let add_seen = |mut payload: Value| -> Result<Value, String> {
            payload["steps"] = json!(["json"]);
            Ok(payload)
        };
        let add_second = |mut payload: Value| -> Result<Value, String> {
            payload["steps"].as_array_mut().ok_or("no steps")?.push(json!("second"));
            Ok(payload)
        };
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(&shop, "paid"))
            .translator(JsonTranslator)
            .translator(add_seen)
            .translator(add_second)
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        // A double-encoded payload: a JSON string holding a JSON object.
        service.dispatch(&shop, "paid", &json!("{\"id\": 3}")).await.unwrap();
        service.wait_for_route("record", 1).await.unwrap();
        assert_eq!(
            *probe.seen.lock().unwrap(),
            vec![json!({ "id": 3, "steps": ["json", "second"] })]
        );
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn max_workers_is_never_exceeded() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "workers").with_max_workers(3).with_prefetch_count(Some(20));
        let markers = [config.service_name.clone(), shop.clone()];
        fn slow(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
            probe.enter(payload);
            std::thread::sleep(Duration::from_millis(5));
            probe.leave();
        }
        async fn slow_async(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
            probe.enter(payload);
            tokio::time::sleep(Duration::from_millis(5)).await;
            probe.leave();
        }
        let routes = vec![
            Route::new(slow)
                .entrypoint(EventListener::new(&shop, "paid"))
                .dependency(Shared(probe.clone())),
            Route::new(slow_async)
                .entrypoint(EventListener::new(&shop, "paid"))
                .dependency(Shared(probe.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        for i in 0..40 {
            service.dispatch(&shop, "paid", &json!(i)).await.unwrap();
        }
        service.wait_for_route("slow", 40).await.unwrap();
        service.wait_for_route("slow_async", 40).await.unwrap();
        assert_eq!(probe.finished.load(Ordering::SeqCst), 80);
        let max = probe.max_running.load(Ordering::SeqCst);
        assert!(max <= 3, "{max} calls ran at once with MAX_WORKERS=3");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// Starts `total` messages with 2 workers and a prefetch of 6, stops while 2 calls run and
/// returns (handled, left in the queue).
async fn stop_mid_stream(uri: &str, mode: WorkerMode) -> (u64, u32) {
    let shop = common::unique("shop");
    let probe = Probe::closed();
    let config = config(uri, "shutdown")
        .with_max_workers(2)
        .with_prefetch_count(Some(6))
        .with_worker_mode(mode);
    let queue = queue_of(&config.service_name, &shop, "paid", "record");
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new(&shop, "paid"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    for i in 0..10 {
        service.dispatch(&shop, "paid", &json!(i)).await.unwrap();
    }
    probe.wait_started(2).await;
    // 6 delivered (prefetch), 4 still queued at the signal.
    let transport = service.transport().clone();
    for _ in 0..2000 {
        if transport.queue_info(&queue).await.unwrap().message_count == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(transport.queue_info(&queue).await.unwrap().message_count, 4);
    service.begin_stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    probe.open();
    service.wait_stopped().await.unwrap();
    let observer = micro_framework::transport::connect(&config).await.unwrap();
    let left = observer.queue_info(&queue).await.unwrap().message_count;
    observer.close().await;
    common::cleanup(uri, &[config.service_name.clone(), shop]).await;
    (probe.finished.load(Ordering::SeqCst), left)
}

#[tokio::test]
async fn thread_mode_finishes_running_calls_and_hands_the_rest_back() {
    for uri in broker_uris() {
        let (handled, left) = stop_mid_stream(&uri, WorkerMode::Thread).await;
        assert_eq!((handled, left), (2, 8));
    }
}

#[tokio::test]
async fn greedy_thread_mode_finishes_everything_received() {
    for uri in broker_uris() {
        let (handled, left) = stop_mid_stream(&uri, WorkerMode::GreedyThread).await;
        assert_eq!((handled, left), (6, 4));
    }
}

#[tokio::test]
async fn unprovidable_parameters_and_duplicate_names_are_refused_at_start() {
    #[derive(Clone)]
    struct Database;
    fn needs_db(Dep(_db): Dep<Database>) {}
    fn wants_failure(_failure: Failure) {}
    fn plain() {}

    let uri = &broker_uris()[0];
    let start =
        |routes: Vec<Route>| async { TestService::start(routes, config(uri, "refuse")).await };

    let error = start(vec![Route::new(needs_db).entrypoint(EventListener::new("a", "b"))])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Startup(_)));
    assert!(error.to_string().contains("Dep<"), "{error}");
    assert!(error.to_string().contains("needs_db"), "{error}");

    let error = start(vec![Route::new(wants_failure).entrypoint(EventListener::new("a", "b"))])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("only available to the callback"), "{error}");

    let error = start(vec![
        Route::new(plain).entrypoint(EventListener::new("a", "b")),
        Route::new(plain).entrypoint(EventListener::new("a", "c")),
    ])
    .await
    .unwrap_err();
    assert!(error.to_string().contains("two routes are named 'plain'"), "{error}");

    let error = start(vec![Route::new(plain)]).await.unwrap_err();
    assert!(error.to_string().contains("no entrypoint"), "{error}");

    let routes = vec![Route::new(plain).entrypoint(EventListener::new("a", "b"))];
    let bad = config(uri, "refuse").with_max_workers(0);
    let error = TestService::start(routes, bad).await.unwrap_err();
    assert!(error.to_string().contains("MAX_WORKERS"), "{error}");
}

#[tokio::test]
async fn args_where_no_message_is_a_call_stops_the_start_naming_the_entrypoint() {
    // an event's payload and a timer's firing carry no call arguments: every call would fail
    fn positional(Args((n,)): Args<(i64,)>) -> i64 {
        n
    }
    fn on_failure(Args(_): Args<Value>, _failure: Failure) {}
    fn payload(Payload(_): Payload<Value>) {}
    for uri in broker_uris() {
        let start = |route: Route| TestService::start(vec![route], config(&uri, "args"));
        let listener = || EventListener::new("shop", "paid");

        let error = start(Route::new(positional).entrypoint(listener())).await.unwrap_err();
        assert!(matches!(error, Error::Startup(_)), "{error:?}");
        let error = error.to_string();
        assert!(error.starts_with("cannot start: route 'positional', function "), "{error}");
        let expected = "::positional: Args<T> takes the arguments of an RPC request or a \
                        WebSocket call, and EventListener(shop.paid) hands its route no call: \
                        take its payload with Payload<T>";
        assert!(error.ends_with(expected), "{error}");

        let timer = TimeEntrypoint::every(Duration::from_secs(60));
        let error = start(Route::new(positional).entrypoint(timer)).await.unwrap_err();
        assert!(error.to_string().contains("TimeEntrypoint"), "{error}");

        let callback = CallbackRoute::new(payload, on_failure).entrypoint(listener());
        let error = start(callback).await.unwrap_err();
        assert!(error.to_string().contains("Args<T> takes the arguments"), "{error}");

        // a work queue's messages may be calls (a task's `args` and `kwargs`): taken there
        let config = config(&uri, "args_queue");
        let queue = format!("{}-tasks", config.service_name);
        let route = Route::new(positional).entrypoint(QueueListener::new(queue.clone()));
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        let service = TestService::start(vec![route], config).await.expect("Args on a queue");
        service.stop().await.unwrap();
        for name in [queue.clone(), format!("{queue}.dlq")] {
            transport.delete_queue(&name).await.unwrap();
        }
        transport.close().await;
    }
}

#[tokio::test]
async fn the_timer_fires_again_after_a_failing_run_and_runs_never_overlap() {
    let probe = Probe::new();
    async fn tick(Dep(probe): Dep<Arc<Probe>>) -> Result<(), String> {
        probe.enter(Value::Null);
        tokio::time::sleep(Duration::from_millis(15)).await;
        probe.leave();
        if probe.finished.load(Ordering::SeqCst) == 1 {
            Err("first run fails".into())
        } else {
            Ok(())
        }
    }
    let routes = vec![Route::new(tick)
        .entrypoint(TimeEntrypoint::every(Duration::from_millis(5)))
        .dependency(Shared(probe.clone()))];
    let config = config(&broker_uris()[0], "timer").with_max_workers(4);
    let service = TestService::start(routes, config).await.unwrap();
    service.wait_for_route("tick", 4).await.unwrap();
    service.stop().await.unwrap();
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 1);
    assert!(probe.finished.load(Ordering::SeqCst) >= 4);
}

#[tokio::test]
async fn a_timer_with_a_zero_interval_is_refused_at_start_up() {
    fn tick() {}
    let routes = vec![Route::new(tick).entrypoint(TimeEntrypoint::every(Duration::ZERO))];
    let error = TestService::start(routes, config("memory://", "zero_timer")).await.unwrap_err();
    assert!(matches!(error, Error::Startup(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("route tick: TimeEntrypoint::every needs an interval above zero"),
        "{error}"
    );
}

/// A firing time as the timer passes it: Python's `datetime.utcnow().isoformat()`, i.e.
/// `YYYY-MM-DDTHH:MM:SS` followed by `.` and six digits unless the microseconds are zero.
fn is_python_isoformat(text: &str) -> bool {
    let digits = |range: std::ops::Range<usize>| {
        text.get(range).is_some_and(|part| part.bytes().all(|b| b.is_ascii_digit()))
    };
    let punctuation = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    let base = text.len() >= 19
        && punctuation.iter().all(|(at, byte)| text.as_bytes()[*at] == *byte)
        && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19].into_iter().all(digits);
    base && match text.len() {
        19 => true,
        26 => text.as_bytes()[19] == b'.' && digits(20..26) && &text[20..] != "000000",
        _ => false,
    }
}

#[tokio::test]
async fn the_timer_passes_its_firing_time_as_the_python_original_does() {
    assert!(is_python_isoformat("2026-12-01T11:53:06.123456"));
    assert!(is_python_isoformat("2026-12-01T11:53:06"));
    for wrong in ["2026-12-01T11:53:06.000000", "2026-12-01 11:53:06", "2026-12-01T11:53:06Z"] {
        assert!(!is_python_isoformat(wrong), "{wrong}");
    }

    let probe = Probe::new();
    fn fired(Payload(at): Payload<String>, Dep(probe): Dep<Arc<Probe>>) {
        probe.enter(Value::String(at));
        probe.leave();
    }
    let routes = vec![Route::new(fired)
        .entrypoint(TimeEntrypoint::every(Duration::from_millis(20)))
        .dependency(Shared(probe.clone()))];
    let before = chrono::Utc::now().naive_utc();
    let service = TestService::start(routes, config(&broker_uris()[0], "fired_at")).await.unwrap();
    service.wait_for_route("fired", 3).await.unwrap();
    service.stop().await.unwrap();
    let after = chrono::Utc::now().naive_utc();
    let times = fired_times(&probe);
    assert!(times.len() >= 3, "{times:?}");
    let mut previous = before;
    for text in times {
        assert!(is_python_isoformat(&text), "{text}");
        let at = chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f").unwrap();
        // naive UTC, in firing order, between the start and the stop
        assert!(previous <= at && at <= after, "{before} <= {at} <= {after}");
        previous = at;
    }
}

/// The firing times the probe saw, in order.
fn fired_times(probe: &Probe) -> Vec<String> {
    let seen = probe.seen.lock().unwrap();
    seen.iter().map(|value| value.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn events_dispatched_by_a_target_carry_the_call_id_stack() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "chain");
        let markers = [config.service_name.clone(), shop.clone()];
        let service_name = config.service_name.clone();
        async fn relay(
            Payload(payload): Payload<Value>,
            producer: micro_framework::amqp::dependencies::Producer,
        ) -> micro_framework::Result<()> {
            producer.dispatch("relayed", &payload).await
        }
        fn sink(call: CallContext, Dep(probe): Dep<Arc<Probe>>) {
            probe.enter(json!(call.call_id_stack));
            probe.leave();
        }
        let routes = vec![
            Route::new(relay).entrypoint(EventListener::new(&shop, "paid")),
            Route::new(sink)
                .entrypoint(EventListener::new(service_name.clone(), "relayed"))
                .dependency(Shared(probe.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "paid", &json!({})).await.unwrap();
        service.wait_for_route("sink", 1).await.unwrap();
        let stack = probe.seen.lock().unwrap()[0].clone();
        let stack: Vec<String> = serde_json::from_value(stack).unwrap();
        assert_eq!(stack.len(), 2);
        assert!(stack[0].starts_with(&format!("{service_name}.relay.")));
        assert!(stack[1].starts_with(&format!("{service_name}.sink.")));
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_producer_whose_exchange_went_declares_it_again_and_sends() {
    // `{service}.events` deleted by hand, or auto-deleted with its last binding
    // (AUTO_DELETE_EVENT_EXCHANGES): the producer had it as declared for ever, and every
    // dispatch failed with NOT_FOUND until the service restarted
    for uri in broker_uris() {
        let config = config(&uri, "regone");
        let exchange = format!("{}.events", config.service_name);
        let queue = common::unique("regone_q");
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        let producer =
            micro_framework::amqp::dependencies::Producer::new(transport.clone(), &config);
        producer.dispatch("e", &json!(1)).await.unwrap();
        transport.delete_exchange(&exchange).await.unwrap();
        for n in 2..5 {
            producer.dispatch("e", &json!(n)).await.expect("declared again and sent");
            if n == 2 {
                let spec = micro_framework::transport::QueueSpec::durable(&queue);
                transport.declare_queue(&spec).await.unwrap();
                let binding = micro_framework::transport::BindingSpec {
                    queue: queue.clone(),
                    exchange: exchange.clone(),
                    routing_key: "e".into(),
                    arguments: Default::default(),
                };
                transport.bind_queue(&binding).await.unwrap();
            }
        }
        let mut bodies = Vec::new();
        while let Some(delivery) = transport.get(&queue).await.unwrap() {
            bodies.push(String::from_utf8_lossy(&delivery.body).into_owned());
            delivery.acker.ack().await.unwrap();
        }
        assert_eq!(bodies, ["3", "4"], "each dispatch after the binding, once");
        transport.delete_queue(&queue).await.unwrap();
        transport.delete_exchange(&exchange).await.unwrap();
        transport.close().await;
    }
}

/// A queue bound to `exchange` (declared with `auto_delete`) with key `key`, as a peer made
/// them.
async fn peer_topology(
    transport: &micro_framework::transport::SharedTransport,
    exchange: &str,
    auto_delete: bool,
    queue: &str,
    key: &str,
) {
    use micro_framework::transport::{BindingSpec, ExchangeSpec, QueueSpec};
    let spec = ExchangeSpec { auto_delete, ..ExchangeSpec::topic(exchange) };
    transport.declare_exchange(&spec).await.unwrap();
    transport.declare_queue(&QueueSpec::durable(queue)).await.unwrap();
    let binding = BindingSpec {
        queue: queue.into(),
        exchange: exchange.into(),
        routing_key: key.into(),
        arguments: Default::default(),
    };
    transport.bind_queue(&binding).await.unwrap();
}

async fn bodies_in(
    transport: &micro_framework::transport::SharedTransport,
    queue: &str,
) -> Vec<String> {
    let mut bodies = Vec::new();
    while let Some(delivery) = transport.get(queue).await.unwrap() {
        bodies.push(String::from_utf8_lossy(&delivery.body).into_owned());
        delivery.acker.ack().await.unwrap();
    }
    bodies
}

#[tokio::test]
async fn a_micro_framework_producer_sends_to_the_exchange_a_nameko_service_made() {
    // micro-framework 2.1.1's producer never declares, so it sends to the exchange a Nameko
    // service made (not auto-delete); this one declared it auto-delete first, and every
    // dispatch failed: "inequivalent arg 'auto_delete'"
    use micro_framework::amqp::dependencies::Producer;
    use micro_framework::config::Protocol;
    for uri in broker_uris() {
        let config = config(&uri, "mfprod").with_protocol(Protocol::MicroFramework);
        let exchange = format!("{}.events", config.service_name);
        let queue = common::unique("mfprod_q");
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        peer_topology(&transport, &exchange, false, &queue, "paid").await;
        let producer = Producer::new(transport.clone(), &config);
        for n in 0..3 {
            producer.dispatch("paid", &json!(n)).await.expect("sent");
        }
        assert_eq!(bodies_in(&transport, &queue).await, ["0", "1", "2"], "{uri}");
        // a missing exchange is declared as micro-framework's listeners declare it
        transport.delete_queue(&queue).await.unwrap();
        transport.delete_exchange(&exchange).await.unwrap();
        producer.dispatch("paid", &json!(3)).await.expect("declared, then sent");
        peer_topology(&transport, &exchange, true, &queue, "paid").await;
        producer.dispatch("paid", &json!(4)).await.unwrap();
        assert_eq!(bodies_in(&transport, &queue).await, ["4"], "{uri}");
        transport.delete_queue(&queue).await.unwrap();
        transport.delete_exchange(&exchange).await.unwrap();
        transport.close().await;
    }
}

#[tokio::test]
async fn a_nameko_profile_producer_declares_its_exchange_first_as_nameko_does() {
    // an exchange made with other flags fails the dispatch, as it fails Nameko's dispatcher,
    // rather than the event going where Nameko's would not
    use micro_framework::amqp::dependencies::Producer;
    for uri in broker_uris() {
        let config = config(&uri, "nkprod");
        let exchange = format!("{}.events", config.service_name);
        let queue = common::unique("nkprod_q");
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        peer_topology(&transport, &exchange, true, &queue, "paid").await;
        let producer = Producer::new(transport.clone(), &config);
        let error = producer.dispatch("paid", &json!(1)).await.unwrap_err().to_string();
        assert!(error.contains("auto_delete"), "{uri}: {error}");
        assert!(bodies_in(&transport, &queue).await.is_empty(), "{uri}");
        transport.delete_queue(&queue).await.unwrap();
        transport.delete_exchange(&exchange).await.unwrap();
        transport.close().await;
    }
}

fn count_event(Payload(_): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(Value::Null);
    probe.leave();
}

#[tokio::test]
async fn declare_event_exchanges_false_takes_the_exchange_the_broker_holds() {
    // Nameko's DECLARE_EVENT_EXCHANGES=False: the source's exchange, made auto-delete by a
    // micro-framework peer, is used as it is; the start was refused ("inequivalent arg")
    use micro_framework::amqp::dependencies::Producer;
    for uri in broker_uris() {
        let config = config(&uri, "nodecl").with_declare_event_exchanges(false);
        let source = common::unique("nodecl_src");
        let source_exchange = format!("{source}.events");
        let keep = common::unique("nodecl_keep");
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        peer_topology(&transport, &source_exchange, true, &keep, "other").await;
        let probe = Probe::new();
        let route = Route::new(count_event)
            .entrypoint(EventListener::new(&source, "paid"))
            .dependency(Shared(probe.clone()));
        let service = TestService::start(vec![route], config.clone()).await.expect("starts");
        let message = OutgoingMessage { body: Bytes::from_static(b"{}"), ..Default::default() };
        transport
            .publish(&source_exchange, "paid", message, PublishOptions::default())
            .await
            .unwrap();
        probe.wait_started(1).await;
        service.stop().await.unwrap();
        // its own exchange is not declared either: a dispatch to a missing one fails, saying why
        let producer = Producer::new(transport.clone(), &config);
        let error = producer.dispatch("e", &json!(1)).await.unwrap_err().to_string();
        assert!(error.contains("DECLARE_EVENT_EXCHANGES is false"), "{uri}: {error}");
        assert!(error.contains("the event was not sent"), "{uri}: {error}");
        // and a listener whose source has no exchange fails its start
        let missing = common::unique("nodecl_none");
        let route = Route::new(count_event)
            .entrypoint(EventListener::new(&missing, "paid"))
            .dependency(Shared(probe.clone()));
        let refused = TestService::start(vec![route], config.clone()).await.map(drop);
        assert!(refused.is_err(), "{uri}: started with no exchange to bind to");
        transport.delete_queue(&keep).await.unwrap();
        transport.delete_exchange(&source_exchange).await.unwrap();
        transport.close().await;
        common::cleanup(&uri, &[config.service_name.clone(), source.clone(), missing]).await;
    }
}

#[tokio::test]
async fn dependencies_see_setup_each_call_its_outcome_and_teardown() {
    let shop = common::unique("shop");
    use micro_framework::dependencies::{Dependency, SetupContext};
    use micro_framework::{BoxError, Outcome, WorkerContext};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Journal(Mutex<Vec<String>>);
    struct Tracked(Arc<Journal>);

    #[micro_framework::async_trait]
    impl Dependency for Tracked {
        type Output = String;
        async fn setup(&self, setup: &SetupContext) -> Result<(), BoxError> {
            self.0 .0.lock().unwrap().push(format!("setup {}", !setup.service_name.is_empty()));
            Ok(())
        }
        async fn get(&self, call: &WorkerContext) -> Result<String, BoxError> {
            Ok(format!("session for {}", call.route_name()))
        }
        async fn after_call(&self, value: &String, outcome: &Outcome) {
            let verdict = if outcome.is_ok() { "commit" } else { "rollback" };
            self.0 .0.lock().unwrap().push(format!("{verdict} {value}"));
        }
        async fn teardown(&self) {
            self.0 .0.lock().unwrap().push("teardown".into());
        }
    }

    fn uses(Payload(ok): Payload<bool>, Dep(session): Dep<String>) -> Result<(), String> {
        assert_eq!(session, "session for uses");
        if ok {
            Ok(())
        } else {
            Err("no".into())
        }
    }

    let journal = Arc::new(Journal::default());
    let uri = broker_uris().swap_remove(0);
    let config = config(&uri, "deps");
    let markers = [config.service_name.clone(), shop.clone()];
    let routes = vec![Route::new(uses).entrypoint(EventListener::new(&shop, "paid"))];
    let runner = Runner::new(routes, config.clone()).dependency(Tracked(journal.clone()));
    let service = TestService::start_runner(runner).await.unwrap();
    service.dispatch(&shop, "paid", &true).await.unwrap();
    service.wait_for_route("uses", 1).await.unwrap();
    service.dispatch(&shop, "paid", &false).await.unwrap();
    service.wait_for_route("uses", 2).await.unwrap();
    service.stop().await.unwrap();
    // the first broker is RabbitMQ under TEST_AMQP_URI
    common::cleanup(&uri, &markers).await;
    let entries = journal.0.lock().unwrap().clone();
    assert_eq!(
        entries,
        vec!["setup true", "commit session for uses", "rollback session for uses", "teardown"]
    );
}

#[tokio::test]
async fn a_payload_filter_skips_events_without_losing_them_to_the_dead_letter_queue() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "filter");
        let markers = [config.service_name.clone(), shop.clone()];
        let queue = queue_of(&config.service_name, &shop, "paid", "record");
        let routes = vec![Route::new(record)
            .entrypoint(
                EventListener::new(&shop, "paid").filter(|p| p["amount"].as_i64() > Some(100)),
            )
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        for amount in [50, 150, 99, 300] {
            service.dispatch(&shop, "paid", &json!({ "amount": amount })).await.unwrap();
        }
        service.wait_for_route("record", 4).await.unwrap();
        assert_eq!(service.route("record").unwrap().stats().skipped_count(), 2);
        wait_until(|| probe.finished.load(Ordering::SeqCst) == 2, "two handled").await;
        let transport = service.transport().clone();
        assert_eq!(transport.queue_info(&queue).await.unwrap().message_count, 0);
        assert_eq!(transport.queue_info(&format!("{queue}.dlq")).await.unwrap().message_count, 0);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_runner_context_keeps_long_tasks_from_starving_other_routes() {
    let shop = common::unique("shop");
    for uri in broker_uris() {
        let blocked = Probe::closed();
        let quick = Probe::new();
        let config = config(&uri, "contexts").with_max_workers(1);
        let markers = [config.service_name.clone(), shop.clone()];
        fn slow(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
            probe.enter(payload);
            probe.leave();
        }
        let runner = Runner::new(
            vec![Route::new(record)
                .entrypoint(EventListener::new(&shop, "quick"))
                .dependency(Shared(quick.clone()))],
            config.clone(),
        )
        .context(
            RunnerContext::new(vec![Route::new(slow)
                .entrypoint(EventListener::new(&shop, "slow"))
                .dependency(Shared(blocked.clone()))])
            .max_workers(1)
            .metric_label("slow"),
        );
        let service = TestService::start_runner(runner).await.unwrap();
        service.dispatch(&shop, "slow", &json!(1)).await.unwrap();
        blocked.wait_started(1).await;
        for i in 0..3 {
            service.dispatch(&shop, "quick", &json!(i)).await.unwrap();
        }
        // The slow context's only worker is busy; the default context still works.
        service.wait_for_route("record", 3).await.unwrap();
        blocked.open();
        service.wait_for_route("slow", 1).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Mailer(&'static str);

fn notify(Dep(mailer): Dep<Mailer>) -> &'static str {
    mailer.0
}

#[tokio::test]
async fn a_test_can_replace_a_dependency_and_call_a_route_directly() {
    use micro_framework::testing::{call_route, test_config};
    let real = Route::new(notify).dependency(Shared(Mailer("smtp")));
    let faked = real.dependency(Shared(Mailer("fake")));
    let outcome = call_route(faked, test_config("mail"), micro_framework::Message::default()).await;
    assert_eq!(outcome.unwrap(), json!("fake"));

    let outcome = call_route(
        Route::new(typed).dependency(Shared(Probe::new())),
        test_config("mail"),
        micro_framework::Message::json(&json!({"id": "x"})).unwrap(),
    )
    .await;
    assert_eq!(outcome.unwrap_err().kind, micro_framework::FailureKind::BadInput);
}

#[tokio::test]
async fn a_queue_listener_consumes_a_named_queue_and_its_bindings() {
    use micro_framework::transport::ExchangeSpec;
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "queues");
        let markers = [config.service_name.clone()];
        let queue = format!("{}-jobs", config.service_name);
        let exchange = format!("{}-uploads", config.service_name);
        let setup = micro_framework::transport::connect(&config).await.unwrap();
        setup.declare_exchange(&ExchangeSpec::topic(exchange.clone())).await.unwrap();
        let routes = vec![Route::new(record)
            .entrypoint(QueueListener::new(queue.clone()).bind(exchange.clone(), "csv.#"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        let publish = |key: &'static str, body: &'static str| {
            let transport = setup.clone();
            let exchange = exchange.clone();
            async move {
                let message = OutgoingMessage { body: Bytes::from(body), ..Default::default() };
                transport.publish(&exchange, key, message, PublishOptions::default()).await
            }
        };
        publish("csv.daily.eu", "1").await.unwrap();
        publish("json.daily", "2").await.unwrap();
        setup
            .publish(
                "",
                &queue,
                OutgoingMessage { body: Bytes::from("3"), ..Default::default() },
                PublishOptions { mandatory: true },
            )
            .await
            .unwrap();
        service.wait_for_route("record", 2).await.unwrap();
        let mut seen = probe.seen.lock().unwrap().clone();
        seen.sort_by_key(|v| v.as_i64());
        assert_eq!(seen, vec![json!(1), json!(3)]);
        service.stop().await.unwrap();

        let missing = QueueListener::new(format!("{queue}-missing")).passive();
        let routes = vec![Route::new(record).entrypoint(missing).dependency(Shared(probe.clone()))];
        let error = TestService::start(routes, common::config(&uri, "queues")).await.unwrap_err();
        assert!(
            error.to_string().contains("not found") || error.to_string().contains("NOT_FOUND"),
            "{error}"
        );
        for name in [queue.clone(), format!("{queue}.dlq")] {
            setup.delete_queue(&name).await.unwrap();
        }
        setup.delete_exchange(&exchange).await.unwrap();
        setup.close().await;
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_cluster_wide_timer_fires_on_one_instance_and_fails_over() {
    use std::sync::atomic::AtomicU64;
    async fn tick(Dep(count): Dep<Arc<AtomicU64>>) {
        count.fetch_add(1, Ordering::SeqCst);
    }
    for uri in broker_uris() {
        let config = config(&uri, "cluster");
        let markers = [config.service_name.clone()];
        let mut instances = Vec::new();
        for _ in 0..3 {
            let count = Arc::new(AtomicU64::new(0));
            let routes = vec![Route::new(tick)
                .entrypoint(TimeEntrypoint::every(Duration::from_millis(40)).cluster_wide())
                .dependency(Shared(count.clone()))];
            let service = TestService::start(routes, config.clone()).await.unwrap();
            instances.push((Some(service), count));
        }
        let total = |instances: &Vec<(Option<TestService>, Arc<AtomicU64>)>| -> u64 {
            instances.iter().map(|(_, count)| count.load(Ordering::SeqCst)).sum()
        };
        wait_until(|| total(&instances) >= 6, "six ticks").await;
        let firing: Vec<usize> =
            (0..3).filter(|&i| instances[i].1.load(Ordering::SeqCst) > 0).collect();
        assert_eq!(firing.len(), 1, "one instance fires each tick");
        let leader = firing[0];
        let before: Vec<u64> = instances.iter().map(|(_, c)| c.load(Ordering::SeqCst)).collect();
        // The leader dies: its broker connection goes away under it.
        let dead = instances[leader].0.take().unwrap();
        dead.transport().close().await;
        // Another instance takes over within a bounded number of ticks (10 = 400 ms here).
        let taken_over =
            || (0..3).any(|i| i != leader && instances[i].1.load(Ordering::SeqCst) > before[i]);
        tokio::time::timeout(Duration::from_millis(400 * 10), async {
            while !taken_over() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("another instance leads after the leader stopped");
        let successors: Vec<usize> = (0..3)
            .filter(|&i| i != leader && instances[i].1.load(Ordering::SeqCst) > before[i])
            .collect();
        assert_eq!(successors.len(), 1, "still one instance at a time");
        let _ = dead.stop().await;
        for (service, _) in instances {
            if let Some(service) = service {
                service.stop().await.unwrap();
            }
        }
        common::cleanup(&uri, &markers).await;
    }
}

/// A follower of a cluster-wide timer is not refused at its ticks: on a connection of a few
/// channels it never runs out of them (a follower refused the lock at every tick closed a
/// channel each time, and reconnected when they ran out), and the leader removes the messages
/// by which it checks for the lock queue. It takes over once the leader stops, and leaves
/// nothing on the broker when it stops.
#[tokio::test]
async fn a_follower_keeps_its_connection_takes_over_and_leaves_no_lock_queue() {
    use micro_framework::transport::TransportError;
    use std::sync::atomic::AtomicU64;
    async fn tick(Dep(count): Dep<Arc<AtomicU64>>) {
        count.fetch_add(1, Ordering::SeqCst);
    }
    let Some(uri) = common::rabbitmq_uri() else { return };
    let config = config(&uri, "follower");
    let service = config.service_name.clone();
    let start = |config: Config| async move {
        let count = Arc::new(AtomicU64::new(0));
        let routes = vec![Route::new(tick)
            .entrypoint(TimeEntrypoint::every(Duration::from_millis(40)).cluster_wide())
            .dependency(Shared(count.clone()))];
        (TestService::start(routes, config).await.unwrap(), count)
    };
    let (leader, led) = start(config.clone()).await;
    wait_until(|| led.load(Ordering::SeqCst) > 0, "the first instance leads").await;
    let separator = if uri.contains('?') { '&' } else { '?' };
    let few_channels = format!("{uri}{separator}channel_max=8");
    let (follower, followed) = start(config.clone().with_amqp_uri(few_channels)).await;
    // Eighty ticks: a follower refused at every tick ran out of its 8 channels within 16, and
    // the leader's consumer takes 64 messages unacknowledged.
    let led_before = led.load(Ordering::SeqCst);
    wait_until(|| led.load(Ordering::SeqCst) >= led_before + 80, "eighty ticks").await;
    assert_eq!(follower.transport().reconnects(), 0, "the follower kept its connection");
    assert_eq!(followed.load(Ordering::SeqCst), 0, "the follower never fired while led");
    let queue = format!("timer-{service}-tick.lock");
    let info = leader.transport().queue_info(&queue).await.unwrap();
    assert_eq!(info.message_count, 0, "the leader removes the follower's messages");
    leader.stop().await.unwrap();
    wait_until(|| followed.load(Ordering::SeqCst) > 0, "the follower takes over").await;
    follower.stop().await.unwrap();
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let left = transport.queue_info(&queue).await;
    transport.close().await;
    common::cleanup(&uri, &[service]).await;
    assert!(matches!(left, Err(TransportError::NotFound(_))), "the lock queue is gone: {left:?}");
}

/// The broker closes the connection of a cluster-wide timer's leader: once it is back, one
/// instance fires (the old leader's connection declares the lock queue again, which must not
/// leave the queue held by a connection whose instance does not know it leads); when that
/// one stops, the other leads, and when its connection is closed in turn, alone, it leads
/// again after reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_passes_on_when_the_broker_closes_the_leaders_connection() {
    use std::sync::atomic::AtomicU64;
    async fn tick(Dep(count): Dep<Arc<AtomicU64>>) {
        count.fetch_add(1, Ordering::SeqCst);
    }
    const TICK: Duration = Duration::from_millis(40);
    let Some(uri) = common::rabbitmq_uri() else { return };
    let config = config(&uri, "handover");
    let service = config.service_name.clone();
    let users = [common::TemporaryUser::create("lead_a"), common::TemporaryUser::create("lead_b")];
    let (mut services, mut counts) = (Vec::new(), Vec::new());
    for user in &users {
        let count = Arc::new(AtomicU64::new(0));
        let routes = vec![Route::new(tick)
            .entrypoint(TimeEntrypoint::every(TICK).cluster_wide())
            .dependency(Shared(count.clone()))];
        let config = config.clone().with_amqp_uri(user.uri(&uri));
        services.push(Some(TestService::start(routes, config).await.unwrap()));
        counts.push(count);
    }
    let transports: Vec<_> =
        services.iter().map(|s| s.as_ref().unwrap().transport().clone()).collect();
    let count = |i: usize| counts[i].load(Ordering::SeqCst);
    let transport = |i: usize| &transports[i];
    wait_until(|| count(0) + count(1) >= 3, "three ticks").await;
    let leader = if count(0) > 0 { 0 } else { 1 };
    let follower = 1 - leader;
    assert_eq!(count(follower), 0, "one instance fires");

    users[leader].close_connections();
    wait_until(|| transport(leader).reconnects() > 0, "the old leader reconnects").await;
    let before = [count(0), count(1)];
    wait_until(|| count(0) + count(1) >= before[0] + before[1] + 20, "twenty ticks").await;
    let fired = [count(0) - before[0], count(1) - before[1]];
    assert!(fired.contains(&0), "one instance fires once back: {fired:?}");
    let (leader, follower) = if fired[0] > 0 { (0, 1) } else { (1, 0) };

    services[follower].take().unwrap().stop().await.unwrap();
    let old = count(leader);
    wait_until(|| count(leader) > old, "the old leader leads again").await;

    let reconnects = transport(leader).reconnects();
    users[leader].close_connections();
    wait_until(|| transport(leader).reconnects() > reconnects, "it reconnects").await;
    let old = count(leader);
    wait_until(|| count(leader) >= old + 3, "alone, it leads after reconnecting").await;
    services[leader].take().unwrap().stop().await.unwrap();
    drop(transports);
    common::cleanup(&uri, &[service]).await;
}

/// A leader whose lock queue goes while it stays connected (an operator or a policy deletes
/// it) gives up leadership: one instance fires after, not the old leader and a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lock_queue_is_deleted_gives_up_leadership_so_one_instance_fires() {
    use std::sync::atomic::AtomicU64;
    async fn tick(Dep(count): Dep<Arc<AtomicU64>>) {
        count.fetch_add(1, Ordering::SeqCst);
    }
    const TICK: Duration = Duration::from_millis(50);
    type Instances = [(TestService, Arc<AtomicU64>)];
    fn counts(instances: &Instances) -> Vec<u64> {
        instances.iter().map(|(_, count)| count.load(Ordering::SeqCst)).collect()
    }
    /// How often each instance fires in the next `window`.
    async fn firings(instances: &Instances, window: Duration) -> Vec<u64> {
        let before = counts(instances);
        tokio::time::sleep(window).await;
        counts(instances).iter().zip(before).map(|(after, before)| after - before).collect()
    }
    for uri in broker_uris() {
        let config = config(&uri, "lock_lost");
        let service = config.service_name.clone();
        let mut instances = Vec::new();
        for _ in 0..2 {
            let count = Arc::new(AtomicU64::new(0));
            let routes = vec![Route::new(tick)
                .entrypoint(TimeEntrypoint::every(TICK).cluster_wide())
                .dependency(Shared(count.clone()))];
            let started = TestService::start(routes, config.clone()).await.unwrap();
            instances.push((started, count));
        }
        wait_until(|| counts(&instances).iter().sum::<u64>() >= 4, "four ticks").await;
        let fired = firings(&instances, TICK * 10).await;
        let leaders: Vec<usize> = (0..2).filter(|&i| fired[i] > 0).collect();
        assert_eq!(leaders.len(), 1, "{uri}: one leader before: {fired:?}");
        // The lock queue goes while the leader stays connected: its own connection deletes it.
        let lock = format!("timer-{service}-tick.lock");
        instances[leaders[0]].0.transport().delete_queue(&lock).await.unwrap();
        tokio::time::sleep(TICK * 10).await;
        let fired = firings(&instances, TICK * 20).await;
        for (instance, _) in instances {
            instance.stop().await.unwrap();
        }
        common::cleanup(&uri, &[service]).await;
        let firing: Vec<usize> = (0..2).filter(|&i| fired[i] > 0).collect();
        assert_eq!(firing.len(), 1, "{uri}: one instance fires after the lock went: {fired:?}");
        assert!(fired[firing[0]] <= 21, "{uri}: at most once a tick: {fired:?}");
    }
}

/// One instance of a cluster-wide timer in the tests below: how often it fired, and whether
/// its runs are held (a run that goes on, as a long job does: its timer asks nothing of its
/// leadership until the run ends).
struct HeldTicks {
    fired: std::sync::atomic::AtomicU64,
    hold: tokio::sync::watch::Sender<bool>,
    /// A run found `hold` set, and waits (or waited) for its release.
    held: std::sync::atomic::AtomicBool,
}

impl HeldTicks {
    fn new() -> Arc<HeldTicks> {
        let hold = tokio::sync::watch::Sender::new(false);
        Arc::new(HeldTicks { fired: Default::default(), hold, held: Default::default() })
    }

    /// The route `tick`: a cluster-wide timer firing every `tick` into these ticks.
    fn timer(self: &Arc<Self>, tick: Duration) -> Route {
        Route::new(held_tick)
            .name("tick")
            .entrypoint(TimeEntrypoint::every(tick).cluster_wide())
            .dependency(Shared(self.clone()))
    }
}

async fn held_tick(Dep(ticks): Dep<Arc<HeldTicks>>) {
    ticks.fired.fetch_add(1, Ordering::SeqCst);
    let released = |hold: &bool| {
        if *hold {
            ticks.held.store(true, Ordering::SeqCst);
        }
        !*hold
    };
    let _ = ticks.hold.subscribe().wait_for(released).await;
}

/// Two instances of a service with a cluster-wide timer (every `tick`), each reaching the
/// broker through a switch of its own, metrics on; `config` is the service's, its URI
/// RabbitMQ's. The leader's run is held, then its switch is cut: the broker drops its
/// connection (and the lock queue with it) at once, and it cannot reconnect before the
/// follower took the lock; then it is switched on again, and has reconnected when this
/// returns. Returns the instances, their ticks, the switches, the leader's index.
async fn take_over_while_the_leader_is_away(
    config: &Config,
    tick: Duration,
) -> (Vec<TestService>, Vec<Arc<HeldTicks>>, Vec<common::switch::Switch>, usize) {
    use common::switch::Switch;
    let (mut services, mut ticks, mut switches) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let (switch, proxied) = Switch::in_front_of(&config.amqp_uri).await;
        let instance = HeldTicks::new();
        let routes = vec![instance.timer(tick)];
        let config = config.clone().with_amqp_uri(proxied);
        services.push(TestService::start(routes, config).await.unwrap());
        ticks.push(instance);
        switches.push(switch);
    }
    let fired = |i: usize| ticks[i].fired.load(Ordering::SeqCst);
    wait_until(|| fired(0) + fired(1) >= 3, "three ticks").await;
    let leader = if fired(0) > 0 { 0 } else { 1 };
    let follower = 1 - leader;
    assert_eq!(fired(follower), 0, "one instance fires");
    // The leader's next run is held: from then on only its lock consumer's own task can tell
    // that its leadership ended with its connection.
    ticks[leader].hold.send_replace(true);
    let held = || ticks[leader].held.load(Ordering::SeqCst);
    wait_until(held, "the leader's held run").await;
    // Away until the follower holds the lock queue: the leader's reconnection finds it
    // held by another connection (refused, `405`), which its transport takes for a queue of
    // its own previous connection still held at the broker, and reclaims.
    switches[leader].off();
    wait_until(|| fired(follower) > 0, "the follower to take over").await;
    switches[leader].on();
    let transport = services[leader].transport().clone();
    wait_until(|| transport.reconnects() > 0, "the old leader to reconnect").await;
    (services, ticks, switches, leader)
}

/// The broker loses a cluster-wide timer's leader while a run of it goes on (a long job), and
/// the follower takes the lock queue before the old leader is back. Once back, the old leader
/// is ready again (`is_ready`, `/health/ready`) within seconds, though its timer asks nothing
/// of its leadership until the run ends: its lock consumer, subscribing again to the queue
/// the follower now holds, would wait as for a queue its own previous connection still held
/// (a reclaim, up to three heartbeats), the instance not ready all along. After it, one
/// instance fires per tick, and nothing is left on the broker once both stop.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_leader_is_ready_again_once_back_though_the_follower_took_the_lock_meanwhile() {
    use common::MetricsOnAnyPort;
    use micro_framework::transport::TransportError;
    const TICK: Duration = Duration::from_millis(100);
    let Some(uri) = common::rabbitmq_uri() else { return };
    let config = config(&uri, "away").with_metrics_on_any_port();
    let service = config.service_name.clone();
    let (services, ticks, switches, leader) =
        take_over_while_the_leader_is_away(&config, TICK).await;
    let follower = 1 - leader;
    let fired = |i: usize| ticks[i].fired.load(Ordering::SeqCst);

    // (a) both ready again, the old leader's run still held
    wait_until(|| services.iter().all(TestService::is_ready), "both instances to be ready").await;
    for (i, instance) in services.iter().enumerate() {
        let address = instance.service().metrics_address().expect("metrics on");
        let (status, body) =
            tokio::task::spawn_blocking(move || common::http_get(address, "/health/ready"))
                .await
                .unwrap();
        assert_eq!(status, 200, "instance {i} (leader: {leader}): {body}");
    }

    // (b) once the old leader's run ends, it follows: one instance fires, once a tick
    ticks[leader].hold.send_replace(false);
    let settled = fired(follower) + 5;
    wait_until(|| fired(follower) >= settled, "five more ticks of the new leader").await;
    let before = [fired(0), fired(1)];
    tokio::time::sleep(TICK * 30).await;
    let stretch = [fired(0) - before[0], fired(1) - before[1]];

    // (c) nothing left on the broker once both stop
    for instance in services {
        instance.stop().await.unwrap();
    }
    drop(switches);
    let mut left = Vec::new();
    for what in ["list_queues", "list_exchanges"] {
        let names = common::rabbitmqctl(&[what, "-q", "--no-table-headers", "name"]);
        left.extend(
            names.lines().filter(|name| name.contains(service.as_str())).map(str::to_owned),
        );
    }
    let left = left.join(", ");
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let lock = transport.queue_info(&format!("timer-{service}-tick.lock")).await;
    transport.close().await;
    common::cleanup(&uri, &[service]).await;

    assert_eq!(stretch[leader], 0, "the old leader fires no more: {stretch:?}");
    // thirty ticks: at most one run each (and one more at the edges)
    assert!((1..=32).contains(&stretch[follower]), "the new leader fires once a tick: {stretch:?}");
    assert!(left.is_empty(), "left on the broker: {left}");
    assert!(matches!(lock, Err(TransportError::NotFound(_))), "the lock queue is gone: {lock:?}");
}

/// A leader that lost the lock queue to the follower while it was away does not take the
/// queue for one its previous connection still holds: its transport replays the lock queue's
/// declaration on reconnecting (refused: the follower holds it), then declares it again and
/// again in the background (each refusal closes a channel, whose number lapin never opens
/// again) for three heartbeats, and logs an ERROR that it gives up and the queue's consumers
/// end, until its timer next asks for leadership (a long run here; a timer whose interval
/// outlasts three heartbeats, 185 s by default, likewise). Heartbeats of 2 s: 11 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_leader_does_not_reclaim_the_lock_queue_the_follower_took() {
    const TICK: Duration = Duration::from_millis(100);
    let Some(uri) = common::rabbitmq_uri() else { return };
    common::logs::capture(tracing::Level::WARN);
    let separator = if uri.contains('?') { '&' } else { '?' };
    let config = config(&format!("{uri}{separator}heartbeat=2"), "reclaim");
    let service = config.service_name.clone();
    let (services, ticks, switches, leader) =
        take_over_while_the_leader_is_away(&config, TICK).await;
    // the reclaim's window (three heartbeats and 5 s) and a margin, the old leader's run held
    tokio::time::sleep(Duration::from_secs(14)).await;
    ticks[leader].hold.send_replace(false);
    let lock = format!("timer-{service}-tick.lock");
    let logged = common::logs::logged();
    let about_the_lock: Vec<&str> = logged.lines().filter(|line| line.contains(&lock)).collect();
    for instance in services {
        instance.stop().await.unwrap();
    }
    drop(switches);
    common::cleanup(&uri, &[service]).await;
    // The reconnection itself may meet the follower's queue once or twice (the replay of the
    // declaration, the consumer's resume): refusals beyond are the reclaim's.
    let refused = about_the_lock.iter().filter(|line| line.contains("RESOURCE_LOCKED")).count();
    let given_up: Vec<&&str> =
        about_the_lock.iter().filter(|line| line.contains("ERROR micro_framework")).collect();
    assert!(given_up.is_empty(), "{given_up:#?} ({refused} refusals naming the lock)");
    assert!(refused <= 2, "{refused} refusals naming the lock: {about_the_lock:#?}");
}

/// The consequence for firing: the follower that took over stops (a rolling deploy) while the
/// old leader's run still goes on; the old leader's transport, still reclaiming, declares the
/// lock queue again, on a connection whose instance does not know it leads. A new instance
/// then never fires: its check finds the lock queue held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_leads_once_the_instance_that_took_over_stops() {
    use micro_framework::transport::TransportError;
    const TICK: Duration = Duration::from_millis(100);
    let Some(uri) = common::rabbitmq_uri() else { return };
    let config = config(&uri, "redeploy");
    let service = config.service_name.clone();
    let (mut services, ticks, switches, leader) =
        take_over_while_the_leader_is_away(&config, TICK).await;
    services.remove(1 - leader).stop().await.unwrap();
    let old_leader = services.pop().unwrap();
    // Up to two reclaim attempts (5 s apart at most) for the lock queue to come back, if it
    // does (it must not).
    let checker = micro_framework::transport::connect(&config).await.unwrap();
    let lock = format!("timer-{service}-tick.lock");
    // (each check the broker refuses closes a channel: every half second is enough)
    for _ in 0..20 {
        let info = checker.queue_info(&lock).await;
        if !matches!(info, Err(TransportError::NotFound(_))) {
            break;
        }
        tokio::time::sleep(TICK * 5).await;
    }
    let came_back = !matches!(checker.queue_info(&lock).await, Err(TransportError::NotFound(_)));
    checker.close().await;
    let new = HeldTicks::new();
    let new_instance = TestService::start(vec![new.timer(TICK)], config.clone()).await.unwrap();
    // thirty ticks of the new instance
    let mut fired = false;
    for _ in 0..30 {
        tokio::time::sleep(TICK).await;
        if new.fired.load(Ordering::SeqCst) > 0 {
            fired = true;
            break;
        }
    }
    ticks[leader].hold.send_replace(false);
    new_instance.stop().await.unwrap();
    old_leader.stop().await.unwrap();
    drop(switches);
    common::cleanup(&uri, &[service]).await;
    assert!(fired, "the new instance never fired (the lock queue came back: {came_back})");
}

/// A leader that stops lets another instance lead at its next tick: its timer stops at once,
/// and so must its hold on the lock queue. The queue went only with the connection, which
/// closes once every other route has finished its calls (up to `SHUTDOWN_TIMEOUT`, 30 s by
/// default) and the dependencies are torn down: meanwhile no instance fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_leads_while_the_leader_is_still_stopping() {
    use micro_framework::amqp::entrypoints::QueueListener;
    const TICK: Duration = Duration::from_millis(100);
    let Some(uri) = common::rabbitmq_uri() else { return };
    let config = config(&uri, "stopping");
    let service = config.service_name.clone();
    let jobs = common::unique("stopping_jobs");
    // the leader: the timer, and a route whose call goes on while the leader stops
    let (led, job) = (HeldTicks::new(), HeldTicks::new());
    job.hold.send_replace(true);
    let busy = Route::new(held_tick)
        .name("job")
        .entrypoint(QueueListener::new(&jobs))
        .dependency(Shared(job.clone()));
    let leader = TestService::start(vec![led.timer(TICK), busy], config.clone()).await.unwrap();
    wait_until(|| led.fired.load(Ordering::SeqCst) > 0, "the first instance to lead").await;
    let followed = HeldTicks::new();
    let follower = TestService::start(vec![followed.timer(TICK)], config.clone()).await.unwrap();
    tokio::time::sleep(TICK * 5).await;
    assert_eq!(followed.fired.load(Ordering::SeqCst), 0, "one instance fires");
    let message = OutgoingMessage { body: Bytes::from("1"), properties: Default::default() };
    leader.transport().publish("", &jobs, message, PublishOptions::default()).await.unwrap();
    wait_until(|| job.fired.load(Ordering::SeqCst) > 0, "the job to start").await;

    leader.begin_stop();
    // thirty ticks of the follower while the leader finishes its job
    let mut took_over = false;
    for _ in 0..30 {
        tokio::time::sleep(TICK).await;
        if followed.fired.load(Ordering::SeqCst) > 0 {
            took_over = true;
            break;
        }
    }
    job.hold.send_replace(false);
    leader.wait_stopped().await.unwrap();
    wait_until(|| followed.fired.load(Ordering::SeqCst) > 0, "the follower to lead").await;
    follower.stop().await.unwrap();
    common::cleanup(&uri, &[service, jobs]).await;
    assert!(took_over, "no instance fired for thirty ticks while the leader was stopping");
}

/// RabbitMQ routes a publish with each key of its `CC` and `BCC` headers too, through the same
/// exchange, and removes `BCC` from what it delivers: the in-process broker does the same.
#[tokio::test]
async fn cc_and_bcc_route_a_publish_to_their_keys_too_and_bcc_is_not_delivered() {
    use micro_framework::transport::{Headers, Properties, QueueSpec};
    for uri in broker_uris() {
        let marker = common::unique("cc");
        let names: Vec<String> = ["a", "b", "c"].iter().map(|n| format!("{marker}_{n}")).collect();
        let transport = micro_framework::transport::connect(&config(&uri, "cc")).await.unwrap();
        for name in &names {
            transport.declare_queue(&QueueSpec::durable(name.clone())).await.unwrap();
        }
        let keys = |name: &str| HeaderValue::Array(vec![HeaderValue::from(name)]);
        let headers = Headers::from([
            ("CC".to_owned(), keys(&names[1])),
            ("BCC".to_owned(), keys(&names[2])),
        ]);
        let properties = Properties { headers, ..Properties::default() };
        let message = OutgoingMessage { body: Bytes::from("1"), properties };
        transport.publish("", &names[0], message, PublishOptions::default()).await.unwrap();
        for name in &names {
            let delivery = transport.get(name).await.unwrap();
            let delivery = delivery.unwrap_or_else(|| panic!("{uri}: nothing in {name}"));
            let headers = &delivery.properties.headers;
            assert_eq!(headers.get("CC"), Some(&keys(&names[1])), "{uri} {name}");
            assert!(!headers.contains_key("BCC"), "{uri} {name}: {headers:?}");
            delivery.acker.ack().await.unwrap();
            assert_eq!(transport.queue_info(name).await.unwrap().message_count, 0, "{uri}");
        }
        for name in &names {
            transport.delete_queue(name).await.unwrap();
        }
        transport.close().await;
    }
}
