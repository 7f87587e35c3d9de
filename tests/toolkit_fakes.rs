//! The recording fakes of `testing` replacing `Producer` and `RpcProxy` (`FakeProducer`,
//! `FakeRpc`) at route and runner level, on every broker of `common::broker_uris()`; and the
//! real `Producer` and `RpcProxy`, still sending through the broker.

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use common::{broker_uris, config, Probe};
use micro_framework::amqp::dependencies::{Producer, RpcProxy};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::naming::event_exchange;
use micro_framework::amqp::rpc::{Args, RpcError};
use micro_framework::config::Protocol;
use micro_framework::dependencies::{Dependency, Shared};
use micro_framework::prelude::*;
use micro_framework::testing::{test_config, FakeProducer, FakeRpc, TestService};
use micro_framework::transport::{BindingSpec, Headers, QueueSpec, TransportError};
use micro_framework::{BoxError, Error, HeaderValue, WorkerContext};
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Deserialize)]
struct Order {
    id: u64,
    items: Vec<String>,
}

/// Asks `prices.quote` for each item (in euros), then dispatches `order_priced`.
async fn price(
    Payload(order): Payload<Order>,
    rpc: RpcProxy,
    producer: Producer,
) -> Result<i64, BoxError> {
    let prices = rpc.service("prices");
    let mut total = 0;
    for item in &order.items {
        let price: i64 = prices.call("quote", (item,), json!({"currency": "EUR"})).await?;
        total += price;
    }
    producer.dispatch("order_priced", &json!({"id": order.id, "total": total})).await?;
    Ok(total)
}

/// `price` for sync targets, on a worker thread.
fn price_blocking(
    Payload(order): Payload<Order>,
    rpc: RpcProxy,
    producer: Producer,
) -> Result<i64, BoxError> {
    let prices = rpc.service("prices");
    let mut total = 0;
    for item in &order.items {
        let price: i64 = prices.call_blocking("quote", (item,), json!({"currency": "EUR"}))?;
        total += price;
    }
    producer.dispatch_blocking("order_priced", &json!({"id": order.id, "total": total}))?;
    Ok(total)
}

/// Dispatches `noted` with the payload.
async fn note(Payload(payload): Payload<Value>, producer: Producer) -> micro_framework::Result<()> {
    producer.dispatch("noted", &payload).await
}

/// Stubs `prices.quote`: 3 for a pen, 10 for anything else, in the currency asked for.
fn price_list() -> FakeRpc {
    let rpc = FakeRpc::new();
    rpc.answers("prices", "quote", |args, kwargs| match kwargs.get("currency") {
        Some(currency) if currency == "EUR" => Ok(json!(if args[0] == "pen" { 3 } else { 10 })),
        other => Err(RpcError::RemoteError {
            exc_type: "ValueError".into(),
            value: format!("no currency {other:?}"),
            exc_path: "builtins.ValueError".into(),
            exc_args: vec![],
        }),
    });
    rpc
}

/// The call-id stack in `headers`.
fn call_id_stack(headers: &Headers) -> Vec<String> {
    match headers.get("nameko.call_id_stack") {
        Some(HeaderValue::Array(ids)) => ids
            .iter()
            .map(|id| match id {
                HeaderValue::String(id) => id.clone(),
                other => panic!("a call id is a string: {other:?}"),
            })
            .collect(),
        other => panic!("no call-id stack in {headers:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fakes_record_what_a_route_dispatches_and_calls_and_send_nothing() {
    for uri in broker_uris() {
        let config = config(&uri, "shop");
        let service_name = config.service_name.clone();
        let source = common::unique("orders");
        let (events, rpc) = (FakeProducer::new(), price_list());
        let route = Route::new(price)
            .entrypoint(EventListener::new(&source, "order_placed"))
            .dependency(events.clone())
            .dependency(rpc.clone());
        let service = TestService::start(vec![route], config.clone()).await.unwrap();
        // A queue on the service's real event exchange: a fake must leave it empty.
        let spy = format!("{service_name}-spy");
        service
            .transport()
            .declare_exchange(&event_exchange(&config, &service_name))
            .await
            .unwrap();
        service.transport().declare_queue(&QueueSpec::durable(&spy)).await.unwrap();
        let binding = BindingSpec {
            queue: spy.clone(),
            exchange: format!("{service_name}.events"),
            routing_key: "#".into(),
            arguments: Headers::new(),
        };
        service.transport().bind_queue(&binding).await.unwrap();

        let order = json!({"id": 7, "items": ["pen", "book"]});
        service.dispatch(&source, "order_placed", &order).await.unwrap();
        service.wait_for_route("price", 1).await.unwrap();

        events.assert_dispatched("order_priced", &json!({"id": 7, "total": 13}));
        let dispatched = events.dispatched();
        assert_eq!(dispatched.len(), 1, "{uri}: {dispatched:?}");
        assert_eq!(dispatched[0].source_service, service_name);
        let stack = call_id_stack(&dispatched[0].headers);
        assert_eq!(stack.len(), 1, "{stack:?}");
        assert!(stack[0].starts_with(&format!("{service_name}.price.")), "{stack:?}");

        rpc.assert_called("prices", "quote");
        let calls = rpc.calls_to("prices", "quote");
        let args: Vec<_> = calls.iter().map(|call| call.args.clone()).collect();
        assert_eq!(args, vec![vec![json!("pen")], vec![json!("book")]]);
        let mut currency = Map::new();
        currency.insert("currency".into(), json!("EUR"));
        assert!(calls.iter().all(|call| call.kwargs == currency), "{calls:?}");
        assert!(calls.iter().all(|call| call.protocol == Protocol::Nameko), "{calls:?}");
        assert!(calls.iter().all(|call| call_id_stack(&call.headers) == stack), "{calls:?}");

        assert_eq!(service.queue_len(&spy).await.unwrap(), 0, "{uri}: the fake sent an event");
        service.transport().delete_queue(&spy).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &[service_name, source]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runner_level_fakes_serve_every_route_and_a_route_fake_wins() {
    for uri in broker_uris() {
        let config = config(&uri, "notes");
        let source = common::unique("source");
        let (shared, own) = (FakeProducer::new(), FakeProducer::new());
        let routes = vec![
            Route::new(note).name("first").entrypoint(EventListener::new(&source, "first")),
            Route::new(note).name("second").entrypoint(EventListener::new(&source, "second")),
            Route::new(note)
                .name("own")
                .entrypoint(EventListener::new(&source, "own"))
                .dependency(own.clone()),
        ];
        let runner = Runner::new(routes, config.clone()).dependency(shared.clone());
        let service = TestService::start_runner(runner).await.unwrap();
        for (event, route) in [("first", "first"), ("second", "second"), ("own", "own")] {
            service.dispatch(&source, event, &json!({"from": event})).await.unwrap();
            service.wait_for_route(route, 1).await.unwrap();
        }
        let payloads = |fake: &FakeProducer| -> Vec<Value> {
            let mut payloads: Vec<_> = fake.dispatched().into_iter().map(|e| e.payload).collect();
            payloads.sort_by_key(Value::to_string);
            payloads
        };
        assert_eq!(payloads(&shared), vec![json!({"from": "first"}), json!({"from": "second"})]);
        assert_eq!(payloads(&own), vec![json!({"from": "own"})]);
        service.stop().await.unwrap();
        common::cleanup(&uri, &[config.service_name.clone(), source]).await;
    }
}

/// A runner-level fake that every route's own dependency shadows reaches no route: the start
/// warns, naming it and what to do (was: silent, and the test ran with the real dependency).
#[tokio::test]
async fn a_runner_level_fake_that_reaches_no_route_is_warned_of() {
    common::logs::capture(tracing::Level::WARN);
    let source = common::unique("source");
    let route = Route::new(note)
        .name("shadowed_everywhere")
        .entrypoint(EventListener::new(&source, "e"))
        .dependency(FakeProducer::new());
    let runner = Runner::new(vec![route], test_config("shadowed")).dependency(FakeProducer::new());
    let service = TestService::start_runner(runner).await.unwrap();
    service.stop().await.unwrap();
    let logs = common::logs::logged();
    assert!(
        logs.contains(
            "::FakeProducer reaches no route: each route has its own dependency of the same \
             output type, and a route's own is kept (replace it with Route::dependency on the \
             route)"
        ),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_targets_use_the_fakes_in_both_thread_modes() {
    for uri in broker_uris() {
        for mode in [WorkerMode::Thread, WorkerMode::GreedyThread] {
            let mut config = config(&uri, "sync");
            config.worker_mode = mode;
            let source = common::unique("orders");
            let runner = Runner::new(
                vec![Route::new(price_blocking)
                    .entrypoint(EventListener::new(&source, "order_placed"))],
                config.clone(),
            )
            .dependency(price_list());
            let events = FakeProducer::new();
            let service =
                TestService::start_runner(runner.dependency(events.clone())).await.unwrap();
            let order = json!({"id": 1, "items": ["pen", "pen", "lamp"]});
            service.dispatch(&source, "order_placed", &order).await.unwrap();
            service.wait_for_route("price_blocking", 1).await.unwrap();
            events.assert_dispatched("order_priced", &json!({"id": 1, "total": 16}));
            service.stop().await.unwrap();
            common::cleanup(&uri, &[config.service_name.clone(), source]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unstubbed_calls_fail_at_once_naming_what_is_stubbed() {
    let rpc = FakeRpc::new();
    let nameko = rpc.proxy(&test_config("caller"));
    let error = nameko.call::<Value>("billing", "charge", (), ()).await.unwrap_err();
    assert_eq!(
        error,
        RpcError::UnknownService("billing: not stubbed in FakeRpc, nothing is stubbed".into())
    );

    rpc.returns("billing", "charge", 1).returns("billing", "refund", 2);
    match nameko.service("billing").call_async("void", (), ()).await.unwrap_err() {
        RpcError::MethodNotFound(message) => assert_eq!(
            message,
            "billing.void is not stubbed in FakeRpc, stubbed: billing.charge, billing.refund"
        ),
        other => panic!("expected MethodNotFound, got {other:?}"),
    }
    match nameko.call::<Value>("ledger", "add", (), ()).await.unwrap_err() {
        RpcError::UnknownService(message) => {
            assert!(message.starts_with("ledger: "), "{message}");
            assert!(message.ends_with("stubbed: billing.charge, billing.refund"), "{message}");
        }
        other => panic!("expected UnknownService, got {other:?}"),
    }
    // The micro-framework protocol has a queue per target: an unknown service is an unknown
    // method, as the broker reports it.
    let ufw = rpc.proxy(&test_config("caller").with_protocol(Protocol::MicroFramework));
    let error = ufw.call::<Value>("ledger", "add", (), ()).await.unwrap_err();
    assert!(
        matches!(&error, RpcError::MethodNotFound(m) if m.starts_with("ledger.add is not stubbed")),
        "{error:?}"
    );
    // Failed calls were made, so they are recorded.
    let made: Vec<_> =
        rpc.calls().into_iter().map(|c| format!("{}.{}", c.service, c.method)).collect();
    assert_eq!(made, ["billing.charge", "billing.void", "ledger.add", "ledger.add"]);
    assert_eq!(rpc.calls()[3].protocol, Protocol::MicroFramework);
}

#[tokio::test(flavor = "multi_thread")]
async fn stubs_return_fail_and_answer_through_every_call_style() {
    let rpc = FakeRpc::new();
    let remote = RpcError::RemoteError {
        exc_type: "ValueError".into(),
        value: "no such account".into(),
        exc_path: "builtins.ValueError".into(),
        exc_args: vec![json!("no such account")],
    };
    rpc.returns("math", "pi", 2.5)
        .fails("bank", "withdraw", remote.clone())
        .answers("math", "add", |args, kwargs| {
            let sum = args.iter().chain(kwargs.values()).filter_map(Value::as_i64).sum::<i64>();
            Ok(json!(sum))
        })
        .returns("bad", "value", HashMap::from([((1, 2), 3)]));
    let proxy = rpc.proxy(&test_config("caller"));
    let math = proxy.service("math");

    assert_eq!(math.call::<f64>("pi", (), ()).await.unwrap(), 2.5);
    assert_eq!(math.call::<i64>("add", (1, 2), json!({"c": 4})).await.unwrap(), 7);
    let later = math.call_async("add", [5, 6], ()).await.unwrap();
    assert_eq!(later.await.unwrap(), json!(11));
    assert_eq!(proxy.call::<()>("bank", "withdraw", (), ()).await.unwrap_err(), remote);
    let unfit = math.call::<String>("pi", (), ()).await.unwrap_err();
    assert!(matches!(unfit, RpcError::UnexpectedResult(_)), "{unfit:?}");
    let unserializable = proxy.call::<Value>("bad", "value", (), ()).await.unwrap_err();
    assert!(
        matches!(&unserializable, RpcError::InvalidReply(m) if m.contains("bad.value cannot be serialized")),
        "{unserializable:?}"
    );
    // The last stub wins.
    rpc.fails("math", "pi", RpcError::MethodNotFound("pi retired".into()));
    assert!(matches!(math.call::<f64>("pi", (), ()).await, Err(RpcError::MethodNotFound(_))));
    // The micro-framework command, stubbed like any method.
    rpc.returns("math", "__list_targets__", json!([{"target": "add"}]));
    let targets = math.clone().protocol(Protocol::MicroFramework).list_targets().await.unwrap();
    assert_eq!(targets, vec![json!({"target": "add"})]);
    assert_eq!(rpc.calls().last().unwrap().protocol, Protocol::MicroFramework);
    assert_eq!(rpc.calls_to("math", "add").len(), 2);

    // Forgetting the calls keeps the stubs.
    rpc.clear();
    assert!(rpc.calls().is_empty());
    assert_eq!(math.call::<i64>("add", (1,), ()).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fakes_refuse_what_the_real_ones_refuse_and_record_none_of_it() {
    let mut small = test_config("limits");
    small.max_message_size = 64;

    let events = FakeProducer::new();
    let producer = events.producer(&small);
    let big = "x".repeat(100);
    match producer.dispatch("big", &big).await.unwrap_err() {
        Error::Transport(TransportError::LimitReached { size, limit, .. }) => {
            assert_eq!((size, limit), (102, 64));
        }
        other => panic!("expected a size limit, got {other:?}"),
    }
    let unserializable = HashMap::from([((1, 2), 3)]);
    let error = producer.dispatch("odd", &unserializable).await.unwrap_err();
    assert!(matches!(error, Error::Encode(_)), "{error:?}");
    assert!(events.dispatched().is_empty(), "{:?}", events.dispatched());
    producer.dispatch("small", &json!({"ok": true})).await.unwrap();
    assert_eq!(events.dispatched_of("small").len(), 1);
    assert_eq!(events.dispatched()[0].source_service, "limits");
    assert!(events.dispatched()[0].headers.is_empty(), "outside a call: no context headers");
    assert_eq!(producer.exchange(), "limits.events");

    let rpc = FakeRpc::new();
    rpc.returns("svc", "method", 1);
    let proxy = rpc.proxy(&small);
    let error = proxy.call::<Value>("svc", "method", "not an array", ()).await.unwrap_err();
    assert!(matches!(error, RpcError::InvalidArguments(_)), "{error:?}");
    let error = proxy.call::<Value>("svc", "method", (), [1]).await.unwrap_err();
    assert!(matches!(error, RpcError::InvalidArguments(_)), "{error:?}");
    let error = proxy.call::<Value>("svc", "method", (&big,), ()).await.unwrap_err();
    assert!(matches!(error, RpcError::Transport(TransportError::LimitReached { .. })), "{error:?}");
    assert!(rpc.calls().is_empty(), "{:?}", rpc.calls());
}

/// The panic message of `check`.
fn panic_message(check: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(check)).expect_err("the assertion fails");
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload.downcast_ref::<&str>().map(|m| m.to_string()).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn assertions_fail_listing_what_was_recorded() {
    let events = FakeProducer::new();
    let message = panic_message(|| events.assert_dispatched("paid", &json!({"id": 1})));
    assert_eq!(
        message,
        "no event paid with payload {\"id\":1} was dispatched; dispatched: nothing"
    );

    let producer = events.producer(&test_config("shop"));
    producer.dispatch("paid", &json!({"id": 2})).await.unwrap();
    producer.dispatch("shipped", &json!({"id": 1})).await.unwrap();
    events.assert_dispatched("paid", &json!({"id": 2}));
    let message = panic_message(|| events.assert_dispatched("paid", &json!({"id": 1})));
    assert_eq!(
        message,
        "no event paid with payload {\"id\":1} was dispatched; dispatched:\n  \
         paid from shop: {\"id\":2}\n  shipped from shop: {\"id\":1}"
    );
    events.clear();
    assert!(events.dispatched().is_empty());

    let rpc = FakeRpc::new();
    let message = panic_message(|| rpc.assert_called("math", "add"));
    assert_eq!(message, "math.add was not called; calls made: none");
    rpc.returns("math", "mul", 6);
    rpc.proxy(&test_config("caller"))
        .call::<i64>("math", "mul", (2, 3), json!({"x": 1}))
        .await
        .unwrap();
    rpc.assert_called("math", "mul");
    let message = panic_message(|| rpc.assert_called("math", "add"));
    assert_eq!(
        message,
        "math.add was not called; calls made:\n  math.mul args [2,3] kwargs {\"x\":1}"
    );
}

/// A user's own replacement of the built-in producer: events go out as service `audit`.
struct AuditProducer(String);

#[micro_framework::async_trait]
impl Dependency for AuditProducer {
    type Output = Producer;

    async fn get(&self, call: &WorkerContext) -> Result<Producer, BoxError> {
        let config = call.config().as_ref().clone().with_service_name(self.0.clone());
        Ok(Producer::new(call.transport().clone(), &config))
    }
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>) -> i64 {
    a + b
}

/// Calls `math.add` through the real proxy and dispatches the sum through the real producer.
async fn add_and_tell(
    Payload(math): Payload<String>,
    rpc: RpcProxy,
    producer: Producer,
) -> Result<(), BoxError> {
    let sum: i64 = rpc.call(&math, "add", (), json!({"a": 2, "b": 3})).await?;
    producer.dispatch("added", &sum).await?;
    Ok(())
}

/// Records the payload and the call-id stack it came with.
fn record(Payload(sum): Payload<i64>, call: CallContext, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(json!({"sum": sum, "stack": call.call_id_stack}));
    probe.leave();
}

#[tokio::test(flavor = "multi_thread")]
async fn real_producer_and_rpc_proxy_still_send_through_the_broker() {
    for uri in broker_uris() {
        let (math_config, shop_config) = (config(&uri, "math"), config(&uri, "shop"));
        let (math_name, shop_name) =
            (math_config.service_name.clone(), shop_config.service_name.clone());
        let (source, audit) = (common::unique("source"), common::unique("audit"));
        let probe = Probe::new();
        let math_routes = vec![
            Route::new(add).entrypoint(RPCListener::new()),
            Route::new(record)
                .name("from_shop")
                .entrypoint(EventListener::new(&shop_name, "added"))
                .dependency(Shared(probe.clone())),
            Route::new(record)
                .name("from_audit")
                .entrypoint(EventListener::new(&audit, "added"))
                .dependency(Shared(probe.clone())),
        ];
        let math = TestService::start(math_routes, math_config).await.unwrap();
        let shop_routes = vec![
            Route::new(add_and_tell).entrypoint(EventListener::new(&source, "go")),
            Route::new(add_and_tell)
                .name("add_and_audit")
                .entrypoint(EventListener::new(&source, "go_audited"))
                .dependency(AuditProducer(audit.clone())),
        ];
        let shop = TestService::start(shop_routes, shop_config).await.unwrap();

        shop.dispatch(&source, "go", &math_name).await.unwrap();
        math.wait_for_route("from_shop", 1).await.unwrap();
        shop.dispatch(&source, "go_audited", &math_name).await.unwrap();
        math.wait_for_route("from_audit", 1).await.unwrap();

        let seen = probe.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{uri}: {seen:?}");
        let stacks: Vec<Vec<String>> = seen
            .iter()
            .map(|record| {
                assert_eq!(record["sum"], json!(5), "{record}");
                serde_json::from_value(record["stack"].clone()).unwrap()
            })
            .collect();
        // The built-in producer sent the shop call's id: the stack continues it.
        assert_eq!(stacks[0].len(), 2, "{stacks:?}");
        assert!(stacks[0][0].starts_with(&format!("{shop_name}.add_and_tell.")), "{stacks:?}");
        assert!(stacks[0][1].starts_with(&format!("{math_name}.from_shop.")), "{stacks:?}");
        // The replacement, made with Producer::new, sends no context headers.
        assert_eq!(stacks[1].len(), 1, "{stacks:?}");
        assert!(stacks[1][0].starts_with(&format!("{math_name}.from_audit.")), "{stacks:?}");
        shop.stop().await.unwrap();
        math.stop().await.unwrap();
        common::cleanup(&uri, &[math_name, shop_name, source, audit]).await;
    }
}

/// In a worker process (the process worker modes run calls in re-executed copies of the
/// program, which find the worker socket in their environment) a fake fails the call, saying
/// why, instead of recording where the test never looks.
#[cfg(feature = "process")]
mod in_a_worker_process {
    use micro_framework::amqp::dependencies::{Producer, RpcProxy};
    use micro_framework::amqp::rpc::RpcError;
    use micro_framework::prelude::*;
    use micro_framework::spawners::process::WORKER_SOCKET_ENV;
    use micro_framework::testing::{call_route, test_config, FakeProducer, FakeRpc};
    use micro_framework::Message;
    use serde_json::Value;

    async fn dispatch_one(producer: Producer) -> micro_framework::Result<()> {
        producer.dispatch("anything", &1).await
    }

    async fn call_one(rpc: RpcProxy) -> Result<Value, RpcError> {
        rpc.call("anyone", "anything", (), ()).await
    }

    /// This test runs itself again as a worker would run.
    #[tokio::test(flavor = "multi_thread")]
    async fn fakes_refuse_to_serve_calls() {
        if std::env::var_os(WORKER_SOCKET_ENV).is_none() {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["in_a_worker_process::fakes_refuse_to_serve_calls", "--exact"])
                .env(WORKER_SOCKET_ENV, "/nonexistent/worker.sock")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(stdout.contains("1 passed"), "the test ran as a worker: {stdout}");
            return;
        }
        let message = Message::json(&Value::Null).unwrap();
        let events = FakeProducer::new();
        let route = Route::new(dispatch_one).dependency(events.clone());
        let failure = call_route(route, test_config("worker"), message.clone()).await.unwrap_err();
        assert!(
            failure.message.contains("FakeProducer cannot serve a call in a worker process"),
            "{failure:?}"
        );
        assert!(failure.message.contains("WORKER_MODE=thread or greedy_thread"), "{failure:?}");
        let route = Route::new(call_one).dependency(FakeRpc::new());
        let failure = call_route(route, test_config("worker"), message).await.unwrap_err();
        assert!(
            failure.message.contains("FakeRpc cannot serve a call in a worker process"),
            "{failure:?}"
        );
        assert!(events.dispatched().is_empty());
    }
}

/// Dispatches `forwarded` with the call's context headers.
async fn forward(producer: Producer) -> micro_framework::Result<()> {
    producer.dispatch("forwarded", &json!({})).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fake_producer_refuses_headers_a_broker_would_refuse() {
    let events = FakeProducer::new();
    let route = || Route::new(forward).dependency(events.clone());
    let mut message = micro_framework::Message::json(&json!({})).unwrap();
    // context data that came in (no frame limit on a direct call) and would go out with the
    // event: more than RabbitMQ's default frame of 131,072 bytes
    let token = HeaderValue::from("t".repeat(140_000).as_str());
    message.properties.headers.insert("nameko.authorization".into(), token);
    let outcome = micro_framework::testing::call_route(route(), test_config("fwd"), message).await;
    let failure = outcome.unwrap_err();
    assert!(failure.message.contains("frame_max"), "{failure:?}");
    assert!(events.dispatched().is_empty(), "{:?}", events.dispatched());

    let mut message = micro_framework::Message::json(&json!({})).unwrap();
    message.properties.headers.insert("nameko.authorization".into(), "t".into());
    micro_framework::testing::call_route(route(), test_config("fwd"), message).await.unwrap();
    assert_eq!(events.dispatched_of("forwarded").len(), 1);
}
