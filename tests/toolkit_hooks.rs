//! The testing toolkit's entrypoint hooks, restricted start and worker factory, on the
//! in-process broker: hooks reach routes through their entrypoints' messages and the real
//! pipeline, without the broker. (Needs the `http` and `websocket` features, which it tests.)
#![cfg(all(feature = "http", feature = "websocket"))]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{unique, Probe};
use micro_framework::amqp::entrypoints::{EventListener, QueueListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::config::Protocol;
use micro_framework::dependencies::Shared;
use micro_framework::entrypoints::TimeEntrypoint;
use micro_framework::http::{HttpEntrypoint, HttpRequest, Path, Query, Response};
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOff};
use micro_framework::testing::{test_config, worker, HookError, HttpCall, TestService};
use micro_framework::websocket::WebSocketEntrypoint;
use micro_framework::{Error, FailureKind, Message};
use serde::Deserialize;
use serde_json::{json, Value};

/// What the entrypoint handed the route: where the message came from, and its payload.
fn seen(message: Message, call: CallContext, Payload(payload): Payload<Value>) -> Value {
    json!({
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "content_type": message.properties.content_type,
        "delivery_mode": message.properties.delivery_mode,
        "language": call.data.get("language").and_then(|value| value.as_str()),
        "payload": payload,
    })
}

#[derive(Debug, Deserialize, PartialEq)]
struct Seen {
    exchange: String,
    routing_key: String,
    content_type: Option<String>,
    delivery_mode: Option<u8>,
    language: Option<String>,
    payload: Value,
}

fn config(service: &str) -> Config {
    test_config(&unique(service))
}

#[tokio::test]
async fn an_event_hook_hands_the_route_an_event_delivery_and_returns_its_result() {
    let config = config("orders");
    let routes = vec![Route::new(seen).entrypoint(EventListener::new("shop", "paid"))];
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("seen").unwrap().header("nameko.language", "fr");
    let seen: Seen = hook.event(&json!({"id": 7})).await.unwrap();
    let expected = Seen {
        exchange: "shop.events".into(),
        routing_key: "paid".into(),
        content_type: Some("application/json".into()),
        delivery_mode: Some(2),
        language: Some("fr".into()),
        payload: json!({"id": 7}),
    };
    assert_eq!(seen, expected);
    let stats = service.route("seen").unwrap().stats();
    assert_eq!((stats.received_count(), stats.succeeded_count(), stats.settled_count()), (1, 1, 1));
    service.stop().await.unwrap();
}

fn paid_amount(Payload(order): Payload<Value>) -> f64 {
    order["amount"].as_f64().unwrap_or_default()
}

#[tokio::test]
async fn an_event_the_filter_skips_is_not_handled() {
    let listener = EventListener::new("shop", "paid").filter(|order| order["amount"] != 0);
    let routes = vec![Route::new(paid_amount).entrypoint(listener)];
    let service = TestService::start(routes, config("orders")).await.unwrap();
    let hook = service.hook("paid_amount").unwrap();
    assert_eq!(hook.event::<f64>(&json!({"amount": 2.5})).await.unwrap(), 2.5);
    let skipped = hook.event::<f64>(&json!({"amount": 0})).await.unwrap_err();
    assert!(matches!(&skipped, HookError::Skipped { route } if route == "paid_amount"));
    assert!(skipped.to_string().contains("filter skipped the event"), "{skipped}");
    let stats = service.route("paid_amount").unwrap().stats();
    assert_eq!((stats.received_count(), stats.skipped_count(), stats.settled_count()), (1, 1, 2));
    service.stop().await.unwrap();
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>, message: Message) -> Value {
    json!({"sum": a + b, "exchange": message.exchange, "routing_key": message.routing_key})
}

#[tokio::test]
async fn an_rpc_hook_passes_args_and_kwargs_as_a_caller_would() {
    let config = config("math");
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(add)
            .name("add_ufw")
            .entrypoint(RPCListener::new().protocol(Protocol::MicroFramework)),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("add").unwrap();
    let reply: Value = hook.rpc([1], json!({"b": 2})).await.unwrap();
    let routing_key = format!("{service_name}.add");
    assert_eq!(reply, json!({"sum": 3, "exchange": "nameko-rpc", "routing_key": routing_key}));
    let reply: Value =
        service.hook("add_ufw").unwrap().rpc((), json!({"a": 1, "b": 1})).await.unwrap();
    assert_eq!((reply["sum"].clone(), reply["exchange"].clone()), (json!(2), json!("ufw-rpc")));
    assert_eq!(reply["routing_key"], format!("{service_name}.add_ufw"));

    let misfit = hook.rpc::<Value>([1, 2, 3], ()).await.unwrap_err();
    let failure = misfit.failure().expect("a failure");
    assert_eq!(failure.kind, FailureKind::BadInput);
    assert!(failure.message.contains("add() takes 2 positional argument(s) but 3"), "{misfit}");
    let not_a_list = hook.rpc::<Value>(json!({"a": 1}), ()).await.unwrap_err();
    assert!(matches!(not_a_list, HookError::Request { .. }), "{not_a_list}");
    assert!(not_a_list.to_string().contains("args must be a list"), "{not_a_list}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_websocket_hook_calls_the_command_with_its_arguments() {
    let config = config("math").with_websocket_ip("127.0.0.1".into()).with_websocket_port(0);
    let routes = vec![Route::new(add).entrypoint(WebSocketEntrypoint::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let reply: Value = service.hook("add").unwrap().websocket([2, 3], ()).await.unwrap();
    assert_eq!((reply["sum"].clone(), reply["routing_key"].clone()), (json!(5), json!("add")));
    service.stop().await.unwrap();
}

#[derive(Deserialize)]
struct Page {
    page: Option<u32>,
}

fn order(
    Path(id): Path<u64>,
    Query(Page { page }): Query<Page>,
    request: HttpRequest,
    Payload(body): Payload<Value>,
) -> Response {
    if id == 0 {
        return Response::status(404).text("no order 0");
    }
    Response::status(201).header("x-order", id.to_string()).json(json!({
        "id": id,
        "page": page,
        "method": request.method,
        "agent": request.header("user-agent"),
        "body": body,
    }))
}

fn broken(Path(id): Path<u64>) -> Result<u64, std::io::Error> {
    Err(std::io::Error::other(format!("order {id} is broken")))
}

#[tokio::test]
async fn an_http_hook_answers_as_the_http_server_does() {
    let config = config("shop").with_web_server_address("127.0.0.1:0".into());
    let config = config.with_max_message_size(1024);
    let routes = vec![
        Route::new(order).entrypoint(HttpEntrypoint::post("/orders/{id}")),
        Route::new(broken).entrypoint(HttpEntrypoint::get("/broken/{id}")),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("order").unwrap();
    let call = HttpCall::post("/orders/7?page=2").header("user-agent", "tests").json(&json!([1]));
    let response = hook.http(call).await.unwrap();
    assert_eq!(response.status, 201);
    assert_eq!(response.header("X-Order"), Some("7"));
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body: Value = response.json().unwrap();
    let expected = json!({"id": 7, "page": 2, "method": "POST", "agent": "tests", "body": [1]});
    assert_eq!(body, expected);

    let missing = hook.http(HttpCall::post("/orders/0")).await.unwrap();
    assert_eq!((missing.status, missing.text()), (404, "no order 0".to_owned()));
    let bad = hook.http(HttpCall::post("/orders/x")).await.unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json::<Value>().unwrap()["error"], "bad_input");
    let too_large = hook.http(HttpCall::post("/orders/7").body(vec![b'1'; 2048])).await.unwrap();
    assert_eq!(too_large.status, 413);
    let failed = service.hook("broken").unwrap().http(HttpCall::get("/broken/3")).await.unwrap();
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json::<Value>().unwrap()["message"], "order 3 is broken");

    for call in [HttpCall::get("/orders/7"), HttpCall::post("/other")] {
        let error = hook.http(call).await.unwrap_err();
        assert!(matches!(error, HookError::Request { .. }), "{error}");
        assert!(error.to_string().contains("is not for the route's POST /orders/{id}"), "{error}");
    }
    let invalid = hook.http(HttpCall::post("/orders/7").header("bad name", "x")).await;
    assert!(matches!(invalid, Err(HookError::Request { .. })), "{invalid:?}");
    let stats = service.route("order").unwrap().stats();
    assert_eq!((stats.received_count(), stats.succeeded_count(), stats.failed_count()), (3, 2, 1));
    service.stop().await.unwrap();
}

fn fired(Payload(at): Payload<String>) -> String {
    at
}

#[tokio::test]
async fn a_timer_hook_fires_the_route_with_the_time_as_the_timer_writes_it() {
    let timer = TimeEntrypoint::every(Duration::from_secs(3600));
    let routes = vec![Route::new(fired).entrypoint(timer)];
    let service = TestService::start(routes, config("clock")).await.unwrap();
    let hook = service.hook("fired").unwrap();
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    assert_eq!(hook.timer_at::<String>(at).await.unwrap(), "2023-11-14T22:13:20.123456");
    let now: String = hook.timer().await.unwrap();
    assert!(now.len() >= 19 && now.starts_with("20") && now.contains('T'), "{now}");
    // a time a Python datetime cannot hold is refused, not a panic
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
    let refused = hook.timer_at::<String>(far).await.unwrap_err();
    assert!(matches!(refused, HookError::Request { .. }), "{refused:?}");
    assert!(refused.to_string().contains("years 1 to 9999"), "{refused}");
    let ancient = SystemTime::UNIX_EPOCH - Duration::from_secs(62_200_000_000);
    let refused = hook.timer_at::<String>(ancient).await.unwrap_err();
    assert!(matches!(refused, HookError::Request { .. }), "{refused:?}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_raw_message_reaches_any_route_as_it_is() {
    let queue = unique("imports");
    let routes = vec![Route::new(seen).entrypoint(QueueListener::new(queue.clone()))];
    let service = TestService::start(routes, config("importer")).await.unwrap();
    let mut message = Message::json(&json!({"row": 1})).unwrap();
    message.routing_key = "csv".into();
    let seen: Seen = service.hook("seen").unwrap().message(message).await.unwrap();
    assert_eq!((seen.routing_key.as_str(), seen.payload), ("csv", json!({"row": 1})));
    let wrong = service.hook("seen").unwrap().event::<Value>(&json!({})).await.unwrap_err();
    assert!(wrong.to_string().contains(&format!("QueueListener({queue})")), "{wrong}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_hook_of_another_kind_or_an_unknown_route_is_refused_by_name() {
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(paid_amount).entrypoint(EventListener::new("shop", "paid")),
    ];
    let service = TestService::start(routes, config("math")).await.unwrap();
    let rpc = service.hook("add").unwrap();
    let errors = [
        rpc.event::<Value>(&json!({})).await.unwrap_err(),
        rpc.timer::<Value>().await.unwrap_err(),
        rpc.websocket::<Value>((), ()).await.unwrap_err(),
        rpc.http(HttpCall::get("/")).await.unwrap_err(),
        service.hook("paid_amount").unwrap().rpc::<Value>((), ()).await.unwrap_err(),
    ];
    let expected = ["an EventListener", "a TimeEntrypoint", "a WebSocketEntrypoint"];
    for (error, expected) in errors.iter().zip(expected) {
        assert!(matches!(error, HookError::WrongEntrypoint { .. }), "{error}");
        let text = error.to_string();
        assert_eq!(text, format!("route 'add' is triggered by RPCListener, not by {expected}"));
    }
    assert!(errors[3].to_string().ends_with("not by an HttpEntrypoint"), "{}", errors[3]);
    assert_eq!(
        errors[4].to_string(),
        "route 'paid_amount' is triggered by EventListener(shop.paid), not by an RPCListener"
    );
    let unknown = service.hook("ad").unwrap_err();
    assert_eq!(unknown.to_string(), "no route named 'ad' (routes: add, paid_amount)");
    assert_eq!(service.route("add").unwrap().stats().received_count(), 0);
    service.stop().await.unwrap();
}

fn refuse(Payload(id): Payload<u64>) -> Result<u64, std::io::Error> {
    Err(std::io::Error::other(format!("order {id} refused")))
}

fn noted(Payload(id): Payload<u64>, failure: Failure, Dep(notes): Dep<Arc<Probe>>) {
    notes.enter(json!({"id": id, "failure": failure.message}));
    notes.leave();
}

#[tokio::test]
async fn a_failure_is_returned_with_nothing_acked_or_dead_lettered() {
    let notes = Probe::new();
    let config = config("orders");
    let routes = vec![
        Route::new(refuse).entrypoint(EventListener::new("shop", "paid")),
        CallbackRoute::new(refuse, noted)
            .name("refuse_noted")
            .dependency(Shared(notes.clone()))
            .entrypoint(EventListener::new("shop", "paid")),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let error = service.hook("refuse").unwrap().event::<u64>(&5).await.unwrap_err();
    let HookError::Failed { route, failure, called_back } = &error else { panic!("{error}") };
    assert_eq!((route.as_str(), *called_back), ("refuse", false));
    assert_eq!((failure.kind, failure.message.as_str()), (FailureKind::Error, "order 5 refused"));
    assert_eq!(error.to_string(), "route 'refuse' failed: error: order 5 refused");
    let queue = format!("evt-shop-paid--{}.refuse", config.service_name);
    assert_eq!(service.queue_len(&format!("{queue}.dlq")).await.unwrap(), 0);
    assert_eq!(service.queue_len(&queue).await.unwrap(), 0);
    assert_eq!(service.route("refuse").unwrap().stats().failed_count(), 1);

    let error = service.hook("refuse_noted").unwrap().event::<u64>(&6).await.unwrap_err();
    assert!(matches!(error, HookError::Failed { called_back: true, .. }), "{error}");
    assert_eq!(*notes.seen.lock().unwrap(), [json!({"id": 6, "failure": "order 6 refused"})]);
    assert_eq!(service.route("refuse_noted").unwrap().stats().called_back_count(), 1);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_result_that_does_not_fit_the_type_is_an_error_quoting_it() {
    let routes = vec![Route::new(paid_amount).entrypoint(EventListener::new("shop", "paid"))];
    let service = TestService::start(routes, config("orders")).await.unwrap();
    let error = service.hook("paid_amount").unwrap().event::<String>(&json!({"amount": 1.5})).await;
    let error = error.unwrap_err();
    let HookError::Result { value, expected, .. } = &error else { panic!("{error}") };
    assert_eq!((value, *expected), (&json!(1.5), "alloc::string::String"));
    assert!(error.to_string().starts_with("route 'paid_amount' returned 1.5, which does not fit"));
    service.stop().await.unwrap();
}

#[derive(Clone)]
struct Rate(f64);

fn converted(Payload(amount): Payload<f64>, Dep(rate): Dep<Rate>) -> f64 {
    amount * rate.0
}

/// Doubles a payload that a translator found in an envelope `{"amount": x}`.
fn unwrap_amount(payload: Value) -> Result<Value, String> {
    payload.get("amount").cloned().ok_or_else(|| "no amount".to_owned())
}

#[tokio::test]
async fn hooks_run_the_routes_translators_and_dependencies() {
    let routes = vec![Route::new(converted)
        .translator(unwrap_amount)
        .dependency(Shared(Rate(2.0)))
        .entrypoint(EventListener::new("bank", "deposited"))];
    let service = TestService::start(routes, config("ledger")).await.unwrap();
    let hook = service.hook("converted").unwrap();
    assert_eq!(hook.event::<f64>(&json!({"amount": 4.0})).await.unwrap(), 8.0);
    let error = hook.event::<f64>(&json!({"sum": 4.0})).await.unwrap_err();
    let failure = error.failure().unwrap();
    assert_eq!(failure.kind, FailureKind::BadInput);
    assert!(failure.message.contains("no amount"), "{error}");
    service.stop().await.unwrap();
}

/// Fails the first `fail` attempts of the test, counted in `attempts`.
fn flaky(Dep(attempts): Dep<Arc<AtomicU32>>, Payload(fail): Payload<u32>) -> Result<u32, String> {
    let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
    if attempt <= fail {
        Err(format!("attempt {attempt} failed"))
    } else {
        Ok(attempt)
    }
}

#[tokio::test]
async fn in_worker_retries_run_and_broker_retries_are_not_scheduled() {
    let (here, broker) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let config = config("flaky");
    let routes = vec![
        Route::new(flaky)
            .name("retried_here")
            .backoff(BackOff::new(3, Duration::from_millis(1)))
            .dependency(Shared(here.clone()))
            .entrypoint(EventListener::new("jobs", "run")),
        Route::new(flaky)
            .name("retried_on_broker")
            .backoff(AsyncBackOff::new(3, Duration::from_millis(1)))
            .dependency(Shared(broker.clone()))
            .entrypoint(EventListener::new("jobs", "run")),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    assert_eq!(service.hook("retried_here").unwrap().event::<u32>(&2).await.unwrap(), 3);
    let error = service.hook("retried_on_broker").unwrap().event::<u32>(&2).await.unwrap_err();
    assert_eq!(error.failure().unwrap().message, "attempt 1 failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(broker.load(Ordering::SeqCst), 1, "no retry came back from the broker");
    let queue = format!("evt-jobs-run--{}.retried_on_broker", config.service_name);
    assert_eq!(service.queue_len(&queue).await.unwrap(), 0);
    let stats = service.route("retried_on_broker").unwrap().stats();
    assert_eq!((stats.retried_count(), stats.failed_count()), (0, 1));
    service.stop().await.unwrap();
}

fn held(Payload(id): Payload<u64>, Dep(probe): Dep<Arc<Probe>>) -> u64 {
    probe.enter(json!(id));
    probe.leave();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_call_waits_for_a_worker_slot() {
    let probe = Probe::closed();
    let routes = vec![Route::new(held)
        .dependency(Shared(probe.clone()))
        .entrypoint(EventListener::new("shop", "paid"))];
    let service = TestService::start(routes, config("orders").with_max_workers(1)).await.unwrap();
    let hook = service.hook("held").unwrap();
    let (first, second) = (hook.clone(), hook.clone());
    let first = tokio::spawn(async move { first.event::<u64>(&1).await });
    probe.wait_started(1).await;
    let second = tokio::spawn(async move { second.event::<u64>(&2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(probe.started(), 1, "the second call waits for the only worker");
    probe.open();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 2);
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 1);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_stopping_service_takes_no_hook_call() {
    let routes = vec![Route::new(paid_amount).entrypoint(EventListener::new("shop", "paid"))];
    let service = TestService::start(routes, config("orders")).await.unwrap();
    let hook = service.hook("paid_amount").unwrap();
    service.begin_stop();
    let error = hook.event::<f64>(&json!({"amount": 1})).await.unwrap_err();
    assert!(matches!(error, HookError::Stopping { .. }), "{error}");
    service.wait_stopped().await.unwrap();
}

#[tokio::test]
async fn a_restricted_service_starts_only_the_entrypoints_named() {
    let config = config("orders");
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(paid_amount).entrypoint(EventListener::new("shop", "paid")),
        Route::new(paid_amount).name("refunded").entrypoint(EventListener::new("shop", "refunded")),
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(fired).entrypoint(TimeEntrypoint::every(Duration::from_millis(10))),
    ];
    let service = TestService::start_only(routes, config.clone(), &["paid_amount"]).await.unwrap();
    service.dispatch("shop", "paid", &json!({"amount": 1})).await.unwrap();
    service.dispatch("shop", "refunded", &json!({"amount": 2})).await.unwrap();
    service.wait_for_route("paid_amount", 1).await.unwrap();
    let transport = service.transport();
    assert!(transport
        .queue_info(&format!("evt-shop-paid--{service_name}.paid_amount"))
        .await
        .is_ok());
    for queue in [
        format!("evt-shop-refunded--{service_name}.refunded"),
        format!("evt-shop-refunded--{service_name}.refunded.dlq"),
        format!("rpc-{service_name}"),
    ] {
        assert!(transport.queue_info(&queue).await.is_err(), "{queue} was declared");
    }
    let client = Client::connect(&config).await.unwrap();
    let unserved = client.call::<Value>(&service_name, "add", [1, 2], ()).await;
    assert!(matches!(unserved, Err(RpcError::UnknownService(_))), "{unserved:?}");
    client.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    for route in ["refunded", "add", "fired"] {
        assert_eq!(service.route(route).unwrap().stats().received_count(), 0, "{route} ran");
    }

    let refunded = service.hook("refunded").unwrap();
    assert_eq!(refunded.event::<f64>(&json!({"amount": 2})).await.unwrap(), 2.0);
    let sum: Value = service.hook("add").unwrap().rpc([1, 2], ()).await.unwrap();
    assert_eq!(sum["sum"], 3);
    assert!(service.hook("fired").unwrap().timer::<String>().await.is_ok());
    service.stop().await.unwrap();
}

#[tokio::test]
async fn restricting_to_an_unknown_route_stops_the_start() {
    let routes = vec![Route::new(paid_amount).entrypoint(EventListener::new("shop", "paid"))];
    let error = TestService::start_only(routes, config("orders"), &["paid_amount", "paid_amout"])
        .await
        .unwrap_err();
    // typed, as a hook's unknown route is: the name asked for and the routes there are
    assert!(
        matches!(&error, Error::UnknownRoute { route, known }
            if route == "paid_amout" && known == &["paid_amount"]),
        "{error}"
    );
    assert_eq!(error.to_string(), "no route named 'paid_amout' (routes: paid_amount)");
}

#[tokio::test]
async fn the_worker_factory_calls_a_target_with_chosen_dependencies() {
    let route = || {
        Route::new(converted)
            .translator(unwrap_amount)
            .dependency(Shared(Rate(2.0)))
            .entrypoint(EventListener::new("bank", "deposited"))
    };
    let real: f64 = worker(route()).event(&json!({"amount": 3.0})).await.unwrap();
    assert_eq!(real, 6.0);
    let replaced: f64 =
        worker(route()).with(Rate(10.0)).event(&json!({"amount": 3.0})).await.unwrap();
    assert_eq!(replaced, 30.0);
    let untranslated = worker(route()).event::<f64>(&3.0).await.unwrap_err();
    assert_eq!(untranslated.failure().unwrap().kind, FailureKind::BadInput);

    let missing = worker(Route::new(converted)).event::<f64>(&3.0).await.unwrap_err();
    assert!(missing.to_string().contains("no dependency provides"), "{missing}");
    let failed = worker(Route::new(refuse)).event::<u64>(&4).await.unwrap_err();
    assert_eq!(failed.failure().unwrap().message, "order 4 refused");

    let named = worker(Route::new(add)).config(test_config("calculator"));
    let reply: Value = named.rpc([1], json!({"b": 2})).await.unwrap();
    let expected = json!({"sum": 3, "exchange": "nameko-rpc", "routing_key": "calculator.add"});
    assert_eq!(reply, expected);
    let event: Seen = worker(Route::new(seen).entrypoint(EventListener::new("shop", "paid")))
        .event(&json!({"id": 1}))
        .await
        .unwrap();
    assert_eq!((event.exchange.as_str(), event.routing_key.as_str()), ("shop.events", "paid"));
    let raw: Seen = worker(Route::new(seen)).message(Message::json(&2).unwrap()).await.unwrap();
    assert_eq!((raw.exchange.as_str(), raw.payload), ("", json!(2)));
    let mistyped = worker(Route::new(add)).rpc::<String>([1, 2], ()).await.unwrap_err();
    assert!(matches!(mistyped, HookError::Result { .. }), "{mistyped}");
}

#[derive(Debug, thiserror::Error)]
#[error("cannot save order")]
struct SaveError(#[source] std::io::Error);

fn save(Payload(_): Payload<Value>) -> Result<(), SaveError> {
    Err(SaveError(std::io::Error::other("disk full")))
}

/// A hook's error, shown as a test reports it (`?`, `unwrap`), says what went wrong: the
/// target's error and its causes (it showed "route 'save' failed: error: cannot save order").
#[tokio::test]
async fn a_hooks_error_shows_the_causes_of_the_targets_error() {
    let route = Route::new(save).entrypoint(EventListener::new("shop", "paid"));
    let service = TestService::start(vec![route], test_config(&unique("orders"))).await.unwrap();
    let error = service.hook("save").unwrap().event::<Value>(&json!({"id": 1})).await.unwrap_err();
    service.stop().await.unwrap();
    assert_eq!(error.to_string(), "route 'save' failed: error: cannot save order: disk full");
}

/// A hook's call counts as the route's, as one its entrypoint took: in `wait_for_route`'s
/// settled count, in a waiter and in the route's metrics.
#[tokio::test]
async fn a_hook_call_counts_as_a_call_of_its_route() {
    let routes = vec![Route::new(paid_amount).entrypoint(EventListener::new("shop", "paid"))];
    let service = TestService::start(routes, config("orders")).await.unwrap();
    let waiter = service.waiter("paid_amount").unwrap();
    let hook = service.hook("paid_amount").unwrap();
    assert_eq!(hook.event::<f64>(&json!({"amount": 2.5})).await.unwrap(), 2.5);
    let call = waiter.wait().await.unwrap();
    assert_eq!(call.result::<f64>().unwrap(), 2.5);
    let hook = service.hook("paid_amount").unwrap();
    assert_eq!(hook.event::<f64>(&json!({"amount": 1})).await.unwrap(), 1.0);
    let limit = Duration::from_secs(2);
    service.wait_for_route_within("paid_amount", 2, limit).await.unwrap();
    #[cfg(feature = "metrics")]
    {
        let metrics = service.service().metrics().render();
        let started = r#"tasks_number_total{context="default",route="paid_amount"} 2"#;
        assert!(metrics.lines().any(|line| line == started), "{metrics}");
    }
    service.stop().await.unwrap();
}
