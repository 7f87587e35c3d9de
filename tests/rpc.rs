//! RPC (Nameko's protocol) on every broker of `common::broker_uris()`: `RPCListener`,
//! `Args`, `RpcProxy` and the standalone `Client`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{broker_uris, config, unique, Probe};
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOff};
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeSpec, Headers, OutgoingMessage, PublishOptions, QueueSpec,
    SharedTransport, TransportError,
};
use micro_framework::{CallContext, HeaderValue, Message};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>) -> i64 {
    a + b
}

fn mul(Args((a, b)): Args<(i64, i64)>) -> i64 {
    a * b
}

#[derive(Deserialize)]
struct Echo {
    x: Value,
}

fn echo(Args(Echo { x }): Args<Echo>) -> Value {
    x
}

fn fail(Args(()): Args<()>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("boom"))
}

fn panics() {
    panic!("kaboom");
}

fn unserializable() -> Json<HashMap<(i32, i32), i32>> {
    Json(HashMap::from([((1, 2), 3)]))
}

async fn slow(Args((millis,)): Args<(u64,)>) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    millis
}

/// The call-id stack of this call.
fn stack(call: CallContext) -> Vec<String> {
    call.call_id_stack
}

/// Records the call and returns nothing (for requests without reply_to).
fn record(Args(Echo { x }): Args<Echo>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(x);
    probe.leave();
}

#[derive(Deserialize)]
struct Relay {
    service: String,
    method: String,
}

/// Calls `service.method()` and returns its result.
async fn relay(Args(to): Args<Relay>, rpc: RpcProxy) -> Result<Value, RpcError> {
    rpc.call(&to.service, &to.method, (), ()).await
}

/// Calls `service.add(a, b)` from a sync target, waiting on the worker thread.
fn add_blocking(Args(to): Args<Relay>, rpc: RpcProxy) -> Result<i64, RpcError> {
    rpc.service(&to.service).call_blocking(&to.method, (20, 22), ())
}

/// Sends two calls at once, then awaits both.
async fn fan_out(Args(to): Args<Relay>, rpc: RpcProxy) -> Result<Vec<i64>, RpcError> {
    let service = rpc.service(&to.service);
    let first = service.call_async(&to.method, (1, 2), ()).await?;
    let second = service.call_async(&to.method, (), json!({"a": 3, "b": 4})).await?;
    Ok(vec![second.result().await?, first.result().await?])
}

/// The `reply_to` of the request: the caller's reply queue's routing key.
fn reply_to(message: Message) -> Option<String> {
    message.properties.reply_to
}

/// The delivery mode of the request: persistent (2) unless `RPC_PERSISTENT_REQUESTS` is off.
fn delivery_mode(message: Message) -> Option<u8> {
    message.properties.delivery_mode
}

fn math_routes(probe: &Arc<Probe>) -> Vec<Route> {
    vec![
        Route::new(reply_to).entrypoint(RPCListener::new()),
        Route::new(delivery_mode).entrypoint(RPCListener::new()),
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(mul).entrypoint(RPCListener::new()),
        Route::new(echo).entrypoint(RPCListener::new()),
        Route::new(fail).entrypoint(RPCListener::new()),
        Route::new(panics).entrypoint(RPCListener::new()),
        Route::new(unserializable).entrypoint(RPCListener::new()),
        Route::new(slow).entrypoint(RPCListener::new()),
        Route::new(stack).entrypoint(RPCListener::new()),
        Route::new(relay).entrypoint(RPCListener::new()),
        Route::new(add_blocking).entrypoint(RPCListener::new()),
        Route::new(fan_out).entrypoint(RPCListener::new()),
        Route::new(record).entrypoint(RPCListener::new()).dependency(Shared(probe.clone())),
    ]
}

async fn start_math(uri: &str) -> (TestService, String, Arc<Probe>) {
    let probe = Probe::new();
    let config = config(uri, "math");
    let name = config.service_name.clone();
    let service = TestService::start(math_routes(&probe), config).await.unwrap();
    (service, name, probe)
}

#[tokio::test]
async fn methods_take_args_kwargs_or_both_and_return_typed_results() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();

        let positional: i64 = client.call(&math, "add", (1, 2), ()).await.unwrap();
        let keywords: i64 = client.call(&math, "add", (), json!({"b": 2, "a": 5})).await.unwrap();
        let mixed: i64 = client.call(&math, "add", [10], json!({"b": 1})).await.unwrap();
        assert_eq!((positional, keywords, mixed), (3, 7, 11));
        let product: i64 = client.call(&math, "mul", (6, 7), ()).await.unwrap();
        assert_eq!(product, 42);
        let any = json!({"list": [1, 2.5, null, true], "text": "café ☕"});
        let echoed: Value = client.call(&math, "echo", [any.clone()], ()).await.unwrap();
        assert_eq!(echoed, any);
        let by_name: Value = client.service(&math).call("echo", (), json!({"x": 1})).await.unwrap();
        assert_eq!(by_name, json!(1));
        // a result that does not fit the type asked for
        let wrong = client.call::<String>(&math, "add", (1, 2), ()).await.unwrap_err();
        assert!(matches!(wrong, RpcError::UnexpectedResult(_)), "{wrong:?}");
        // arguments that cannot be sent
        let invalid = client.call::<Value>(&math, "add", 1, ()).await.unwrap_err();
        assert!(matches!(invalid, RpcError::InvalidArguments(_)), "{invalid:?}");

        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

#[tokio::test]
async fn every_error_kind_is_replied_and_the_request_acked() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let call = |method: &'static str, args: Value, kwargs: Value| {
            let proxy = client.service(&math);
            async move { proxy.call::<Value>(method, args, kwargs).await.unwrap_err() }
        };

        let missing = call("nope", json!([]), json!({})).await;
        assert_eq!(missing, RpcError::MethodNotFound("nope".into()));
        let unknown = client.call::<Value>("no_such_service_xyz", "add", (), ()).await;
        assert_eq!(unknown.unwrap_err(), RpcError::UnknownService("no_such_service_xyz".into()));

        for (args, kwargs, expected) in [
            (json!([1]), json!({}), "missing field `b`"),
            (json!([1, 2, 3]), json!({}), "takes 2 positional argument(s) but 3 were given"),
            (json!([1, 2]), json!({"c": 1}), "unexpected keyword argument 'c'"),
            (json!([1]), json!({"a": 1}), "multiple values for argument 'a'"),
            (json!(["one", 2]), json!({}), "invalid type"),
        ] {
            match call("add", args, kwargs).await {
                RpcError::IncorrectSignature(message) => {
                    assert!(message.contains(expected), "{message} lacks {expected}")
                }
                other => panic!("expected IncorrectSignature, got {other:?}"),
            }
        }
        assert!(matches!(
            call("fail", json!([1]), json!({})).await,
            RpcError::IncorrectSignature(_)
        ));

        match call("fail", json!([]), json!({})).await {
            RpcError::RemoteError { exc_type, value, exc_path, exc_args } => {
                assert_eq!((exc_type.as_str(), value.as_str()), ("Error", "boom"));
                assert_eq!(exc_path, "std.io.error.Error");
                assert_eq!(exc_args, vec![json!("boom")]);
            }
            other => panic!("expected RemoteError, got {other:?}"),
        }
        match call("panics", json!([]), json!({})).await {
            RpcError::RemoteError { exc_type, value, .. } => {
                assert_eq!(exc_type, "Panic");
                assert!(value.contains("kaboom"), "{value}");
            }
            other => panic!("expected RemoteError, got {other:?}"),
        }
        match call("unserializable", json!([]), json!({})).await {
            RpcError::RemoteError { exc_type, exc_path, .. } => {
                assert_eq!(exc_type, "UnserializableValueError");
                assert_eq!(exc_path, "nameko.exceptions.UnserializableValueError");
            }
            other => panic!("expected RemoteError, got {other:?}"),
        }

        // requests that are not {"args": [...], "kwargs": {...}}
        let raw = RawCaller::new(client.transport(), &math).await;
        let malformed = [
            (&b"{oops"[..], "body is not valid JSON"),
            (br#"{"args": []}"#, "Message missing `args` or `kwargs`"),
            (br#"{"args": {}, "kwargs": {}}"#, "Message missing `args` or `kwargs`"),
        ];
        for (body, why) in malformed {
            let reply = raw.request("add", Bytes::copy_from_slice(body), true).await;
            assert_eq!(reply["result"], Value::Null);
            assert_eq!(reply["error"]["exc_type"], "MalformedRequest", "{reply}");
            assert_eq!(reply["error"]["exc_path"], "nameko.exceptions.MalformedRequest");
            let value = reply["error"]["value"].as_str().unwrap_or_default();
            assert!(value.contains(why), "{value} should say {why}");
        }
        let reply =
            raw.request("add", json_body(&json!({"args": [1, 2], "kwargs": {}})), true).await;
        assert_eq!(reply, json!({"result": 3, "error": null}));

        // nothing was dead-lettered or left in the request queue
        assert_eq!(service.queue_len(&format!("rpc-{math}")).await.unwrap(), 0);
        raw.close().await;
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

#[tokio::test]
async fn calls_time_out_and_late_replies_are_dropped() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let quick = config(&uri, "caller").with_rpc_timeout(Duration::from_millis(300));
        let client = Client::connect(&quick).await.unwrap();

        let timed_out = client.call::<u64>(&math, "slow", [800], ()).await.unwrap_err();
        assert!(
            matches!(&timed_out, RpcError::Timeout { after, .. } if *after == Duration::from_millis(300)),
            "{timed_out:?}"
        );
        let proxy = client.service(&math).timeout(Duration::from_millis(100));
        let overridden = proxy.call::<u64>("slow", [400], ()).await.unwrap_err();
        assert!(
            matches!(&overridden, RpcError::Timeout { after, .. } if *after == Duration::from_millis(100))
        );
        // the late replies arrive meanwhile and are dropped; later calls get their own
        let patient = client.service(&math).timeout(Duration::from_secs(5));
        assert_eq!(patient.call::<u64>("slow", [900], ()).await.unwrap(), 900);
        assert_eq!(client.call::<i64>(&math, "add", (1, 1), ()).await.unwrap(), 2);

        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

/// Guards the deadline of a call (was never checked: a call failing only well after its
/// timeout, with the same `after` reported, went unnoticed). A 1 s timeout fails the call
/// within a generous bound, far below twice the timeout.
#[tokio::test]
async fn a_call_fails_when_its_timeout_runs_out() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let caller = config(&uri, "caller").with_rpc_timeout(Duration::from_secs(1));
        let client = Client::connect(&caller).await.unwrap();
        // the reply queue is set up by a first call, outside the call timed
        assert_eq!(client.call::<u64>(&math, "slow", [1], ()).await.unwrap(), 1);
        let started = std::time::Instant::now();
        let error = client.call::<u64>(&math, "slow", [2500], ()).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(error, RpcError::Timeout { .. }), "{uri}: {error:?}");
        assert!(took < Duration::from_millis(1900), "{uri}: a 1 s timeout took {took:?}");
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

// multi-threaded: `call_blocking` blocks a worker thread (as under `Runner::start`)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_calls_itself_from_async_and_sync_targets() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let to = |method: &str| json!({"service": math, "method": method});

        let own: Value = client.call(&math, "relay", (), to("stack")).await.unwrap();
        let own: Vec<String> = serde_json::from_value(own).unwrap();
        assert_eq!(own.len(), 3, "{own:?}");
        assert!(
            own[0].starts_with("standalone_rpc_proxy.call.")
                && own[1].starts_with(&format!("{math}.relay."))
                && own[2].starts_with(&format!("{math}.stack.")),
            "{own:?}"
        );
        let blocking: i64 = client.call(&math, "add_blocking", (), to("add")).await.unwrap();
        assert_eq!(blocking, 42);
        let both: Vec<i64> = client.call(&math, "fan_out", (), to("add")).await.unwrap();
        assert_eq!(both, vec![7, 3]);
        // a remote error comes back through the relay as the relay's own error
        let relayed = client.call::<Value>(&math, "relay", (), to("nope")).await.unwrap_err();
        match relayed {
            RpcError::RemoteError { exc_type, value, .. } => {
                assert_eq!(exc_type, "RpcError");
                assert!(value.contains("nope"), "{value}");
            }
            other => panic!("expected RemoteError, got {other:?}"),
        }

        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

/// The service `chain_next` calls.
#[derive(Clone)]
struct NextHop(String);

/// Calls `stack` of the next service.
async fn chain_next(rpc: RpcProxy, Dep(next): Dep<NextHop>) -> Result<Value, RpcError> {
    rpc.call(&next.0, "stack", (), ()).await
}

#[tokio::test]
async fn a_chain_of_services_keeps_the_call_id_stack() {
    for uri in broker_uris() {
        let probe = Probe::new();
        let (a, b, c) = (config(&uri, "chain_a"), config(&uri, "chain_b"), config(&uri, "chain_c"));
        let names = [a.service_name.clone(), b.service_name.clone(), c.service_name.clone()];
        let mut b_routes = math_routes(&probe);
        b_routes.push(
            Route::new(chain_next)
                .entrypoint(RPCListener::new())
                .dependency(Shared(NextHop(names[2].clone()))),
        );
        let services = vec![
            TestService::start(math_routes(&probe), a).await.unwrap(),
            TestService::start(b_routes, b).await.unwrap(),
            TestService::start(math_routes(&probe), c).await.unwrap(),
        ];
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        // client → A.relay → B.chain_next → C.stack
        let to_b = json!({"service": names[1], "method": "chain_next"});
        let stack: Vec<String> = client.call(&names[0], "relay", (), to_b).await.unwrap();
        assert_eq!(stack.len(), 4, "{stack:?}");
        assert!(stack[0].starts_with("standalone_rpc_proxy.call."), "{stack:?}");
        assert!(stack[1].starts_with(&format!("{}.relay.", names[0])), "{stack:?}");
        assert!(stack[2].starts_with(&format!("{}.chain_next.", names[1])), "{stack:?}");
        assert!(stack[3].starts_with(&format!("{}.stack.", names[2])), "{stack:?}");

        client.close().await;
        for service in services {
            service.stop().await.unwrap();
        }
        common::cleanup(&uri, &names).await;
    }
}

#[tokio::test]
async fn requests_are_persistent_unless_rpc_persistent_requests_is_off() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let persistent = Client::connect(&config(&uri, "caller")).await.unwrap();
        let transient_config = config(&uri, "caller").with_rpc_persistent_requests(false);
        let transient = Client::connect(&transient_config).await.unwrap();
        let mode = |client: &Client| {
            let call = client.service(math.clone());
            async move { call.call::<Option<u8>>("delivery_mode", json!([]), json!({})).await }
        };
        assert_eq!(mode(&persistent).await.unwrap(), Some(2), "{uri}");
        assert_eq!(mode(&transient).await.unwrap(), Some(1), "{uri}");
        persistent.close().await;
        transient.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

#[tokio::test]
async fn a_request_without_reply_to_is_handled_and_acked() {
    for uri in broker_uris() {
        let (service, math, probe) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let raw = RawCaller::new(client.transport(), &math).await;
        raw.request("record", json_body(&json!({"args": ["fire"], "kwargs": {}})), false).await;
        service.wait_for_route("record", 1).await.unwrap();
        assert_eq!(*probe.seen.lock().unwrap(), vec![json!("fire")]);
        assert_eq!(service.queue_len(&format!("rpc-{math}")).await.unwrap(), 0);
        assert_eq!(service.queue_len(&raw.queue).await.unwrap(), 0, "no reply sent");
        raw.close().await;
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

#[tokio::test]
async fn the_topology_shows_one_request_queue_for_all_methods() {
    let config = micro_framework::testing::test_config("math_topology");
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(mul).entrypoint(RPCListener::new()),
    ];
    let topology = Runner::new(routes, config).topology().await.unwrap();
    let queues: Vec<_> = topology.queues.iter().filter(|q| q.name.starts_with("rpc-")).collect();
    assert!(queues.iter().all(|q| q.name == "rpc-math_topology" && q.durable));
    assert!(queues.iter().all(|q| q.arguments.is_empty() && !q.exclusive && !q.auto_delete));
    let binding = topology.bindings.iter().find(|b| b.queue == "rpc-math_topology").unwrap();
    assert_eq!(
        (binding.exchange.as_str(), binding.routing_key.as_str()),
        ("nameko-rpc", "math_topology.*")
    );
    let exchange = topology.exchanges.iter().find(|e| e.name == "nameko-rpc").unwrap();
    assert!(exchange.kind == "topic" && exchange.durable && !exchange.auto_delete);
}

/// Fails until its third attempt.
fn flaky(Dep(attempts): Dep<Arc<AtomicU32>>) -> Result<u32, std::io::Error> {
    let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
    if attempt < 3 {
        Err(std::io::Error::other(format!("attempt {attempt}")))
    } else {
        Ok(attempt)
    }
}

#[tokio::test]
async fn in_worker_retries_run_before_the_reply_and_broker_retries_are_not_scheduled() {
    for uri in broker_uris() {
        let (in_worker, on_broker) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let config = config(&uri, "flaky");
        let name = config.service_name.clone();
        let pause = Duration::from_millis(10);
        let routes = vec![
            Route::new(flaky)
                .name("in_worker")
                .entrypoint(RPCListener::new())
                .backoff(BackOff::new(3, pause))
                .dependency(Shared(in_worker.clone())),
            Route::new(flaky)
                .name("on_broker")
                .entrypoint(RPCListener::new())
                .backoff(AsyncBackOff::new(3, pause))
                .dependency(Shared(on_broker.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        let client = Client::connect(&common::config(&uri, "caller")).await.unwrap();
        assert_eq!(client.call::<u32>(&name, "in_worker", (), ()).await, Ok(3));
        match client.call::<u32>(&name, "on_broker", (), ()).await {
            Err(RpcError::RemoteError { value, .. }) => assert_eq!(value, "attempt 1"),
            other => panic!("expected the first attempt's error, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(on_broker.load(Ordering::SeqCst), 1, "no retry after the reply");
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[name]).await;
    }
}

#[tokio::test]
async fn a_call_running_at_shutdown_still_gets_its_reply() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let running = client.service(&math).call_async("slow", [600], ()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        service.begin_stop();
        assert_eq!(running.result::<u64>().await, Ok(600));
        service.wait_stopped().await.unwrap();
        client.close().await;
        common::cleanup(&uri, &[math]).await;
    }
}

#[tokio::test]
async fn a_caller_losing_its_connection_fails_its_waiting_calls_at_once() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let proxy = client.service(&math).timeout(Duration::from_secs(20));
        // The caller's reply queue outlives its connection (x-expires, as Nameko's), so the
        // test deletes it: its name ends with the requests' reply_to.
        let own: String = proxy.call("reply_to", (), ()).await.unwrap();
        let waiting = proxy.call_async("slow", [1500], ()).await.unwrap();
        let started = std::time::Instant::now();
        client.transport().close().await;
        let lost = waiting.await.unwrap_err();
        assert!(matches!(lost, RpcError::Transport(_)), "{lost:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let after = proxy.call::<Value>("add", (1, 2), ()).await.unwrap_err();
        assert!(matches!(after, RpcError::Transport(_)), "{after:?}");
        // stopping waits for the slow call, whose reply then waits in the caller's queue
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math, own]).await;
    }
}

#[tokio::test]
async fn one_reply_queue_per_caller_removed_when_the_caller_stops() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let to = json!({"service": math, "method": "reply_to"});

        // two calls, each with its own RpcProxy, reply on the service's one queue
        let first: String = client.call(&math, "relay", (), to.clone()).await.unwrap();
        let second: String = client.call(&math, "relay", (), to).await.unwrap();
        assert_eq!(first, second);
        let service_queue = format!("rpc.reply-{math}-{first}");
        service.transport().queue_info(&service_queue).await.unwrap();

        let own: String = client.call(&math, "reply_to", (), ()).await.unwrap();
        assert_ne!(own, first);
        let client_queue = format!("rpc.reply-standalone_rpc_proxy-{own}");
        client.transport().queue_info(&client_queue).await.unwrap();
        client.close().await;
        let gone = service.transport().queue_info(&client_queue).await;
        assert!(matches!(gone, Err(TransportError::NotFound(_))), "{gone:?}");

        service.stop().await.unwrap();
        let observer = Client::connect(&config(&uri, "observer")).await.unwrap();
        let gone = observer.transport().queue_info(&service_queue).await;
        assert!(matches!(gone, Err(TransportError::NotFound(_))), "{gone:?}");
        observer.close().await;
        common::cleanup(&uri, &[math]).await;
    }
}

/// The headers with which the service's own copies (a hand-back, a counted redelivery, a
/// retry) carry the route they were first published with count only on a message published
/// straight to the queue: a request published to one method cannot be read as another's.
#[tokio::test]
async fn the_headers_of_a_copy_cannot_steer_a_request_to_another_method() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let raw = RawCaller::new(client.transport(), &math).await;
        let forged = Headers::from([
            ("x-mf-redelivered-exchange".to_owned(), HeaderValue::from("nameko-rpc")),
            ("x-mf-redelivered-routing-key".to_owned(), HeaderValue::from(format!("{math}.add"))),
        ]);
        let body = json_body(&json!({"args": [6, 7], "kwargs": {}}));
        let reply = raw.request_with("mul", body, true, forged).await;
        assert_eq!(reply["result"], json!(42), "run as mul, not add: {reply}");
        raw.close().await;
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

fn json_body(value: &Value) -> Bytes {
    Bytes::from(value.to_string())
}

/// Sends hand-made requests and reads the replies from its own queue.
struct RawCaller {
    transport: SharedTransport,
    service: String,
    queue: String,
    reply_to: String,
}

impl RawCaller {
    async fn new(transport: &SharedTransport, service: &str) -> RawCaller {
        let reply_to = uuid::Uuid::new_v4().to_string();
        let queue = format!("rpc.reply-{service}-raw-{reply_to}");
        transport.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: "nameko-rpc".into(),
            routing_key: reply_to.clone(),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();
        RawCaller { transport: transport.clone(), service: service.to_owned(), queue, reply_to }
    }

    /// Publish `body` to `{service}.{method}`; with `reply`, wait for the reply and return it.
    async fn request(&self, method: &str, body: Bytes, reply: bool) -> Value {
        self.request_with(method, body, reply, Headers::new()).await
    }

    /// [`RawCaller::request`] with these `headers`.
    async fn request_with(
        &self,
        method: &str,
        body: Bytes,
        reply: bool,
        headers: Headers,
    ) -> Value {
        let mut message = Message::json(&Value::Null).unwrap();
        message.properties.headers = headers;
        message.properties.correlation_id = Some("raw-1".into());
        if reply {
            message.properties.reply_to = Some(self.reply_to.clone());
        }
        let outgoing = OutgoingMessage { body, properties: message.properties };
        let routing_key = format!("{}.{method}", self.service);
        let options = PublishOptions { mandatory: true };
        self.transport.publish("nameko-rpc", &routing_key, outgoing, options).await.unwrap();
        if !reply {
            return Value::Null;
        }
        for _ in 0..1000 {
            if let Some(delivery) = self.transport.get(&self.queue).await.unwrap() {
                delivery.acker.ack().await.unwrap();
                assert_eq!(delivery.properties.correlation_id.as_deref(), Some("raw-1"));
                assert_eq!(delivery.properties.content_type.as_deref(), Some("application/json"));
                assert_eq!(delivery.properties.delivery_mode, Some(1), "a transient reply");
                return serde_json::from_slice(&delivery.body).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no reply to the raw request");
    }

    async fn close(&self) {
        self.transport.delete_queue(&self.queue).await.unwrap();
    }
}

/// Replies that stop reaching the caller's reply queue while its consumer is not told (here
/// its binding is removed behind the caller's back; in a cluster, the queue's node may stop):
/// the call times out, the probe sent after the timeout does not come back, and the queue is
/// deleted; the next call sets up a new one and gets its reply.
#[tokio::test]
async fn a_reply_queue_that_replies_no_longer_reach_is_replaced_after_a_timeout() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let (service, math, _) = start_math(&uri).await;
    let client = Client::connect(&config(&uri, "caller")).await.unwrap();
    let own: String = client.call(&math, "reply_to", (), ()).await.unwrap();
    let queue = format!("rpc.reply-standalone_rpc_proxy-{own}");

    // lapin reads an empty path as the vhost "", RabbitMQ's default is "/"
    let lapin_uri = uri.trim_end_matches('/');
    let connection = lapin::Connection::connect(lapin_uri, Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let (exchange, key) = ("nameko-rpc".into(), own.as_str().into());
    channel.queue_unbind(queue.as_str().into(), exchange, key, Default::default()).await.unwrap();
    connection.close(200, "unbound".into()).await.unwrap();

    let quick = client.service(&math).timeout(Duration::from_millis(500));
    let lost = quick.call::<i64>("add", (), json!({"a": 1, "b": 2})).await.unwrap_err();
    assert!(matches!(lost, RpcError::Timeout { .. }), "{lost:?}");
    let transport = client.transport().clone();
    common::wait_until_async(|| {
        let (transport, queue) = (transport.clone(), queue.clone());
        async move { matches!(transport.queue_info(&queue).await, Err(TransportError::NotFound(_))) }
    })
    .await;
    let replaced: String = client.call(&math, "reply_to", (), ()).await.unwrap();
    assert_ne!(replaced, own, "a new reply queue");
    let sum: i64 = client.call(&math, "add", (), json!({"a": 1, "b": 2})).await.unwrap();
    assert_eq!(sum, 3);
    client.close().await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &[math]).await;
}

/// The next request in `queue`, taken: its `reply_to` and `correlation_id`.
async fn next_request(transport: &SharedTransport, queue: &str) -> (String, String) {
    for _ in 0..250 {
        if let Some(request) = transport.get(queue).await.unwrap() {
            let properties = &request.properties;
            let reply_to = properties.reply_to.clone().expect("reply_to");
            let correlation_id = properties.correlation_id.clone().expect("correlation_id");
            request.acker.ack().await.unwrap();
            return (reply_to, correlation_id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no request reached {queue}");
}

/// A call still waiting on a reply queue the caller retired (its replies stopped reaching it)
/// gets its reply through the queue set up in its place, bound with the retired queue's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_a_call_on_a_retired_reply_queue_reaches_it_through_the_new_queue() {
    for uri in broker_uris() {
        let exchange = unique("retired_rpc");
        let service = unique("by_hand");
        let queue = format!("rpc-{service}");
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: exchange.clone(),
            routing_key: format!("{service}.*"),
            arguments: Headers::new(),
        };
        // the "service" answers by hand, on a connection of its own
        let transport = micro_framework::transport::connect(&config(&uri, "by_hand")).await;
        let transport = transport.unwrap();
        transport.declare_exchange(&ExchangeSpec::topic(exchange.clone())).await.unwrap();
        transport.declare_queue(&QueueSpec::durable(queue.clone())).await.unwrap();
        transport.bind_queue(&binding).await.unwrap();
        let caller = config(&uri, "caller").with_rpc_exchange(exchange.clone());
        let client = Client::connect(&caller).await.unwrap();
        let proxy = client.service(service.clone()).timeout(Duration::from_secs(30));
        // a call that waits on the first reply queue
        let waiting = proxy.call_async("slow", (), ()).await.unwrap();
        let (old_key, correlation_id) = next_request(&transport, &queue).await;

        // the reply path breaks: the exchange declared again, the reply queue's binding gone
        transport.delete_exchange(&exchange).await.unwrap();
        transport.declare_exchange(&ExchangeSpec::topic(exchange.clone())).await.unwrap();
        transport.bind_queue(&binding).await.unwrap();
        let probe = OutgoingMessage { body: Bytes::from_static(b"{}"), ..Default::default() };
        let options = PublishOptions { mandatory: true };
        let routed = transport.publish(&exchange, &old_key, probe, options).await;
        assert!(routed.is_err(), "{uri}: the reply path is broken: {routed:?}");
        // a call that times out has the probe find it out and retire the queue (2 s); a call
        // still waits on it, so it stays
        let short = proxy.clone().timeout(Duration::from_millis(200));
        let timed_out = short.call::<Value>("slow", (), ()).await;
        assert!(matches!(timed_out, Err(RpcError::Timeout { .. })), "{uri}: {timed_out:?}");
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        // the next call sets up a new reply queue
        let next = proxy.call_async("slow", (), ()).await.unwrap();
        let _ = next_request(&transport, &queue).await; // the short call's
        let (new_key, _) = next_request(&transport, &queue).await;
        assert_ne!(new_key, old_key, "{uri}: a new reply queue");

        // the service answers the first call now, to the reply_to it was given
        let mut properties = micro_framework::data::json_properties();
        properties.correlation_id = Some(correlation_id);
        let body = json_body(&json!({"result": 42, "error": null}));
        let reply = OutgoingMessage { body, properties };
        transport.publish(&exchange, &old_key, reply, PublishOptions::default()).await.unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), waiting.result::<u64>()).await;

        drop(next);
        client.close().await;
        transport.close().await;
        common::cleanup(&uri, &[exchange, service]).await;
        assert!(matches!(answered, Ok(Ok(42))), "{uri}: {answered:?}");
    }
}

/// A reply queue whose consumer ended for good (here the queue was deleted behind the
/// caller's back) is not set up again when the connection comes back: the transport replays
/// its declarations after a reconnect, and a queue no call uses would be declared and bound
/// again, with no consumer, on every reconnect. After the reconnection calls go to a new
/// queue, and the one before, which no call waits on, goes too.
#[tokio::test]
async fn an_ended_reply_queue_is_not_declared_again_after_a_reconnect() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let (service, math, _) = start_math(&uri).await;
    let user = common::TemporaryUser::create("replies");
    let client = Client::connect(&config(&user.uri(&uri), "caller")).await.unwrap();
    let first: String = client.call(&math, "reply_to", (), ()).await.unwrap();
    let ended = format!("rpc.reply-standalone_rpc_proxy-{first}");
    service.transport().delete_queue(&ended).await.unwrap();
    // the broker cancels the consumer (a call waiting on it then fails); the next calls use
    // a new queue
    let mut second = first.clone();
    for _ in 0..100 {
        match client.call::<String>(&math, "reply_to", (), ()).await {
            Ok(reply_to) if reply_to != first => {
                second = reply_to;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_ne!(second, first, "a new reply queue once the first one's consumer ended");

    user.close_connections();
    let transport = client.transport().clone();
    common::wait_until(|| transport.reconnects() >= 1 && transport.is_connected(), "reconnect")
        .await;
    let again: String = client.call(&math, "reply_to", (), ()).await.unwrap();
    assert_ne!(again, second, "a new queue after the reconnection");
    let gone = service.transport().queue_info(&ended).await;
    assert!(matches!(gone, Err(TransportError::NotFound(_))), "{gone:?}");
    let replaced = format!("rpc.reply-standalone_rpc_proxy-{second}");
    let mut left = service.transport().queue_info(&replaced).await;
    for _ in 0..100 {
        if matches!(left, Err(TransportError::NotFound(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = service.transport().queue_info(&replaced).await;
    }
    assert!(matches!(left, Err(TransportError::NotFound(_))), "{left:?}");
    client.close().await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &[math]).await;
}

#[tokio::test]
async fn an_rpc_queue_deleted_under_the_service_is_declared_again_with_its_binding() {
    for uri in broker_uris() {
        let (service, math, _) = start_math(&uri).await;
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        assert_eq!(client.call::<i64>(&math, "add", (1, 2), ()).await.unwrap(), 3);
        // an operator deletes it, on a connection of their own
        let operator =
            micro_framework::transport::connect(&config(&uri, "operator")).await.unwrap();
        let queue = format!("rpc-{math}");
        operator.delete_queue(&queue).await.unwrap();
        // the service declares it again, then binds it: until then a call is unroutable
        // (`UnknownService` at once), after it the call is answered
        let math_service = client.service(&math).timeout(Duration::from_secs(10));
        let answered =
            || async { math_service.call::<i64>("add", (2, 3), ()).await.ok() == Some(5) };
        common::wait_until_async(answered).await;
        operator.close().await;
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

fn hog(Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(Value::Null);
    probe.leave();
}

/// How many times `victim` ran.
#[derive(Debug, Default)]
struct VictimCalls(AtomicU32);

fn victim(Dep(calls): Dep<Arc<VictimCalls>>) {
    calls.0.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_rpc_service_past_its_shutdown_timeout_starts_no_more_calls() {
    use micro_framework::config::{Protocol, WorkerMode};
    for uri in broker_uris() {
        for protocol in [Protocol::Nameko, Protocol::MicroFramework] {
            let config = config(&uri, "greedyrpc")
                .with_protocol(protocol)
                .with_max_workers(1)
                .with_worker_mode(WorkerMode::GreedyThread)
                .with_shutdown_timeout(Duration::from_millis(500));
            let name = config.service_name.clone();
            // Keeps the in-process broker (and the request queues) alive between the starts.
            let keeper = micro_framework::transport::connect(&config).await.unwrap();
            let client = Client::connect(&common::config(&uri, "caller").with_protocol(protocol))
                .await
                .unwrap();
            let calls = Arc::new(VictimCalls::default());
            let routes = |probe: &Arc<Probe>| {
                let listener = || RPCListener::new().protocol(protocol);
                vec![
                    Route::new(hog).entrypoint(listener()).dependency(Shared(probe.clone())),
                    Route::new(victim).entrypoint(listener()).dependency(Shared(calls.clone())),
                ]
            };
            let probe = Probe::closed();
            let service = TestService::start(routes(&probe), config.clone()).await.unwrap();
            let proxy = client.service(&name).protocol(protocol);
            let _hog = proxy.call_async("hog", (), ()).await.unwrap();
            probe.wait_started(1).await;
            let _victim = proxy.call_async("victim", (), ()).await.unwrap();
            // The victim's request waits for the one worker slot, which the hog holds past
            // SHUTDOWN_TIMEOUT: the stop gives up on both, and their requests go back to
            // their queues with the connection.
            tokio::time::sleep(Duration::from_millis(300)).await;
            service.stop().await.unwrap();
            probe.open();
            // The slot is free now, but the service has stopped: nothing of it may start.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let ran = calls.0.load(Ordering::SeqCst);
            assert_eq!(ran, 0, "{protocol:?} on {uri}: a call started after the stop returned");

            let service = TestService::start(routes(&probe), config.clone()).await.unwrap();
            service.wait_for_route("victim", 1).await.unwrap();
            service.stop().await.unwrap();
            assert_eq!(calls.0.load(Ordering::SeqCst), 1, "the victim's request runs once");
            client.close().await;
            keeper.close().await;
            common::cleanup(&uri, &[name]).await;
        }
    }
}

fn held(Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(json!(null));
    probe.leave();
}

/// The request queue's one consumer holds as many requests as the pools of its methods have
/// workers, each pool counted once: requests held past that only wait in this instance, where
/// another could run them and a lost connection would hand them out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_consumer_holds_one_pools_worth_of_requests_however_many_methods_share_it() {
    for uri in broker_uris() {
        let probe = Probe::closed();
        let service_config = config(&uri, "held").with_max_workers(2);
        let service_name = service_config.service_name.clone();
        let method = |name: &str| {
            Route::new(held)
                .name(name)
                .entrypoint(RPCListener::new())
                .dependency(Shared(probe.clone()))
        };
        // five methods in the service's pool of 2, one in a context of its own with 1 worker
        let runner =
            Runner::new((0..5).map(|i| method(&format!("m{i}"))).collect(), service_config)
                .context(RunnerContext::new(vec![method("alone")]).max_workers(1));
        let service = TestService::start_runner(runner).await.unwrap();
        let client = Client::connect(&config(&uri, "caller")).await.unwrap();
        let proxy = client.service(&service_name).timeout(Duration::from_secs(60));
        let mut calls = Vec::new();
        for _ in 0..12 {
            calls.push(proxy.call_async("m0", (), json!({})).await.unwrap());
        }
        probe.wait_started(2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queue = format!("rpc-{service_name}");
        let ready = service.transport().queue_info(&queue).await.unwrap().message_count;
        probe.open();
        drop(calls);
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[service_name]).await;
        // 2 running, 1 held for the context's pool: 3 taken from the queue
        assert_eq!(ready, 9, "requests left in the queue on {uri}");
    }
}

/// A method named with a dot could never be called (Nameko's binding `{service}.*` matches
/// one word): the start refuses it, where the service started and every call of it failed
/// `UnknownService`.
#[tokio::test]
async fn a_method_named_with_a_dot_is_refused_at_start() {
    for uri in broker_uris() {
        let config = config(&uri, "dotted");
        let name = config.service_name.clone();
        let route = Route::new(add).name("orders.create").entrypoint(RPCListener::new());
        let refused = TestService::start(vec![route], config).await.map(drop);
        let Err(micro_framework::Error::Startup(why)) = refused else {
            panic!("{uri}: {refused:?}")
        };
        assert!(why.contains("RPC method 'orders.create' could never be called"), "{why}");
        common::cleanup(&uri, &[name]).await;
    }
}

/// An RPC call failing after the stop gave up on it (past `SHUTDOWN_TIMEOUT`), because the
/// stop tore its dependencies down (here the reply listener of the `RpcProxy` it waits on):
/// the request goes back to its queue unanswered, as an event's message does, under each
/// profile and thread mode. Was: replied with the stop's own error ("the reply queue's
/// consumer ended") and acked, or replied and requeued, to run again, by a race.
mod a_call_failing_after_the_give_up {
    use super::common;

    use std::time::Duration;

    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::amqp::rpc::{Args, Client, RpcError};
    use micro_framework::config::{Protocol, WorkerMode};
    use micro_framework::prelude::*;
    use micro_framework::testing::TestService;

    async fn slow(Args((millis,)): Args<(u64,)>) -> u64 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        millis
    }

    async fn relay(
        Args((target,)): Args<(String,)>,
        rpc: micro_framework::amqp::dependencies::RpcProxy,
    ) -> Result<u64, String> {
        let target = rpc.service(target).timeout(Duration::from_secs(30));
        target.call::<u64>("slow", (6000,), ()).await.map_err(|error| error.to_string())
    }

    fn relay_failed(_failure: Failure) {}

    async fn goes_back_unanswered(protocol: Protocol, mode: WorkerMode, callback: bool) {
        for uri in common::broker_uris() {
            let target_config = common::config(&uri, "slow_target").with_protocol(protocol);
            let target_name = target_config.service_name.clone();
            let routes = vec![Route::new(slow).entrypoint(RPCListener::new())];
            let target = TestService::start(routes, target_config).await.unwrap();
            let relay_config = common::config(&uri, "relay")
                .with_protocol(protocol)
                .with_worker_mode(mode)
                .with_shutdown_timeout(Duration::from_secs(1));
            let relay_name = relay_config.service_name.clone();
            let route = match callback {
                true => CallbackRoute::new(relay, relay_failed),
                false => Route::new(relay),
            };
            let routes = vec![route.entrypoint(RPCListener::new())];
            let relay_service = TestService::start(routes, relay_config).await.unwrap();
            let caller = Config::new("caller")
                .with_amqp_uri(uri.clone())
                .with_protocol(protocol)
                .with_rpc_timeout(Duration::from_secs(3));
            let client = Client::connect(&caller).await.unwrap();
            let proxy = client.service(relay_name.as_str());
            let name = target_name.clone();
            let call = tokio::spawn(async move { proxy.call::<u64>("relay", (name,), ()).await });
            tokio::time::sleep(Duration::from_millis(700)).await;
            relay_service.stop().await.unwrap();
            let answer = call.await.unwrap();
            let queue = match protocol {
                Protocol::Nameko => format!("rpc-{relay_name}"),
                Protocol::MicroFramework => format!("rpc-{relay_name}-relay"),
            };
            let observer = micro_framework::transport::connect(&caller).await.unwrap();
            let back = observer.queue_info(&queue).await.unwrap().message_count;
            observer.close().await;
            client.close().await;
            target.stop().await.unwrap();
            common::cleanup(&uri, &[target_name, relay_name]).await;
            let case = format!("{uri} {protocol:?} {mode:?} callback: {callback}");
            assert!(matches!(answer, Err(RpcError::Timeout { .. })), "{case}: {answer:?}");
            assert_eq!(back, 1, "{case}: the request is back in {queue}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn goes_back_unanswered_in_the_thread_mode() {
        goes_back_unanswered(Protocol::Nameko, WorkerMode::Thread, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn goes_back_unanswered_in_the_greedy_thread_mode() {
        goes_back_unanswered(Protocol::Nameko, WorkerMode::GreedyThread, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn goes_back_unanswered_under_the_micro_framework_profile() {
        goes_back_unanswered(Protocol::MicroFramework, WorkerMode::GreedyThread, false).await;
    }

    /// A callback route's callback is not run with the stop's error either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn goes_back_unanswered_from_a_callback_route() {
        goes_back_unanswered(Protocol::Nameko, WorkerMode::Thread, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn goes_back_unanswered_from_a_callback_route_under_the_micro_framework_profile() {
        goes_back_unanswered(Protocol::MicroFramework, WorkerMode::GreedyThread, true).await;
    }
}

/// A Nameko request without a `correlation_id` is answered, as Nameko's own server answers it
/// (its `Responder` publishes to `reply_to` whatever the id); only micro-framework's profile
/// needs one (`tests/ufw_rpc.rs`).
#[tokio::test]
async fn a_nameko_request_without_a_correlation_id_is_answered() {
    for uri in broker_uris() {
        let config = config(&uri, "nk_no_corr");
        let service_name = config.service_name.clone();
        let routes = vec![Route::new(echo).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let transport = service.transport();
        let queue = format!("rpc.reply-{service_name}");
        transport.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: "nameko-rpc".into(),
            routing_key: queue.clone(),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();
        let mut properties = Message::json(&Value::Null).unwrap().properties;
        properties.reply_to = Some(queue.clone());
        properties.correlation_id = None;
        let body = Bytes::from(json!({"args": [1], "kwargs": {}}).to_string());
        let request = OutgoingMessage { body, properties };
        let key = format!("{service_name}.echo");
        transport.publish("nameko-rpc", &key, request, PublishOptions::default()).await.unwrap();
        service.wait_for_route("echo", 1).await.unwrap();
        let replies = service.queue_len(&queue).await.unwrap();
        transport.delete_queue(&queue).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &[service_name]).await;
        assert_eq!(replies, 1, "the reply on {uri}");
    }
}

/// A Nameko-wire request for a method the service does not have, refused as a crash (it came
/// back unsettled past `MAX_REDELIVERIES`), is answered and counted under no route, as its
/// `MethodNotFound` is: it was counted as a failure of the service's first RPC route.
#[tokio::test]
async fn a_request_for_an_unknown_method_refused_as_a_crash_counts_for_no_route() {
    for uri in broker_uris() {
        let config = config(&uri, "refused_unknown").with_max_redeliveries(0);
        let name = config.service_name.clone();
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        let routes = || {
            vec![
                Route::new(add).entrypoint(RPCListener::new()),
                Route::new(echo).entrypoint(RPCListener::new()),
            ]
        };
        // the service declares its request queue, then stops: it stays (durable)
        TestService::start(routes(), config.clone()).await.unwrap().stop().await.unwrap();
        let request = OutgoingMessage {
            body: Bytes::from_static(br#"{"args": [], "kwargs": {}}"#),
            properties: Default::default(),
        };
        let routing_key = format!("{name}.nope");
        let options = PublishOptions::default();
        transport.publish(&config.rpc_exchange, &routing_key, request, options).await.unwrap();
        let queue = format!("rpc-{name}");
        // back to its queue unsettled, redelivered: a crash, for the next consumer
        common::queues::put_back_redelivered(&transport, &queue).await;

        let service = TestService::start(routes(), config).await.unwrap();
        for _ in 0..500 {
            if transport.queue_info(&queue).await.unwrap().message_count == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // a request is settled just after its reply is sent: let a count come, if any
        tokio::time::sleep(Duration::from_millis(300)).await;
        for route in ["add", "echo"] {
            let failed = service.route(route).unwrap().stats().failed_count();
            assert_eq!(failed, 0, "{uri}: the refused request counted for route {route}");
        }
        service.stop().await.unwrap();
        transport.close().await;
        common::cleanup(&uri, &[name]).await;
    }
}
