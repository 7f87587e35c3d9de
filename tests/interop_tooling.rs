//! The Python packages' own caller tooling against a Rust service over RabbitMQ, compared
//! with the same tool against a Python service where it matters: Nameko 2.14.1's
//! `ClusterRpcProxy.call_async` (`nameko_peer.py rpc-call-async`), its standalone
//! `event_dispatcher` with options (`standalone-dispatch`) and the `nameko shell` CLI
//! (`shell`); micro-framework 2.1.1's RPC proxies as its users call them (`ufw_peer.py
//! rpc-client`: `discover_targets`, `RPCTarget.call_async`, `get_target_async`,
//! `call_target(..., _wait_response=False)`). Peers run as subprocesses (see
//! tests/interop/README.md). Without RabbitMQ or the venv the tests fail under `CI=true` and
//! are skipped loudly otherwise.

mod common;

use common::targets::{add, echo, EchoArgs};

use std::sync::Arc;
use std::time::Duration;

use common::peer::*;
use common::{config, unique, Probe};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Args;
use micro_framework::config::Protocol;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::{CallContext, HeaderValue};
use serde_json::{json, Value};
use tokio::sync::Barrier;

/// How many `gather` calls must be in flight at once before any of them returns.
const GATHERED: usize = 3;
/// The longest a `gather` call waits for the others: a failing test ends instead of hanging.
const GATHER_LIMIT: Duration = Duration::from_secs(20);

fn sample() -> Value {
    json!({ "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

/// Named so that Nameko callers see the same `exc_type` as from a Python `ValueError`, and
/// micro-framework's callers rebuild a Python `ValueError` (they rebuild built-ins by name).
#[derive(Debug)]
struct ValueError(String);

impl std::fmt::Display for ValueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}

/// `fail()` as `nameko_peer.py rpc-serve`'s: `ValueError("boom")`.
fn fail() -> Result<(), ValueError> {
    Err(ValueError("boom".into()))
}

/// `fail(x)` as `ufw_peer.py rpc-serve`'s: `ValueError("bad {x}")`.
fn fail_with(Args(EchoArgs { x }): Args<EchoArgs>) -> Result<(), ValueError> {
    let shown = x.as_str().map_or_else(|| x.to_string(), str::to_owned);
    Err(ValueError(format!("bad {shown}")))
}

#[derive(Debug)]
struct NotAllInFlight;

impl std::fmt::Display for NotAllInFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fewer than {GATHERED} gather calls were in flight at once")
    }
}

impl std::error::Error for NotAllInFlight {}

/// Returns `x` once `GATHERED` calls of it are running at once: each reply proves the caller
/// had them all in flight before it read any.
async fn gather(
    Args(EchoArgs { x }): Args<EchoArgs>,
    Dep(barrier): Dep<Arc<Barrier>>,
) -> Result<Value, NotAllInFlight> {
    tokio::time::timeout(GATHER_LIMIT, barrier.wait()).await.map_err(|_| NotAllInFlight)?;
    Ok(x)
}

/// Records the argument of a call that nobody waits for.
fn note(Args(EchoArgs { x }): Args<EchoArgs>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(x);
    probe.leave();
}

/// Records an event's payload, call-id stack and context data (as plain JSON).
fn record_event(Payload(payload): Payload<Value>, call: CallContext, Dep(probe): Dep<Arc<Probe>>) {
    let data: serde_json::Map<String, Value> =
        call.data.iter().map(|(key, value)| (key.clone(), plain(value))).collect();
    probe.enter(json!({ "payload": payload, "stack": call.call_id_stack, "data": data }));
    probe.leave();
}

/// A header value as Python code sees it, in JSON.
fn plain(value: &HeaderValue) -> Value {
    match value {
        HeaderValue::Void => Value::Null,
        HeaderValue::Bool(b) => json!(b),
        HeaderValue::Int(i) => json!(i),
        HeaderValue::Float(f) => json!(f),
        HeaderValue::String(s) => json!(s),
        HeaderValue::Array(items) => items.iter().map(plain).collect(),
        HeaderValue::Table(table) => {
            Value::Object(table.iter().map(|(k, v)| (k.clone(), plain(v))).collect())
        }
        other => json!(format!("{other:?}")),
    }
}

fn strings(value: &Value) -> Vec<String> {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|_| panic!("expected an array of strings, got {value}"))
}

/// Delete what a test's Rust service declared (RabbitMQ keeps durable queues and
/// exchanges): `queues` with their dead-letter queues, and `exchanges`.
async fn delete(uri: &str, queues: &[String], exchanges: &[String]) {
    let config = Config::new("interop_cleanup").with_amqp_uri(uri.to_owned());
    let transport = micro_framework::transport::connect(&config).await.expect("cleanup connects");
    for queue in queues {
        transport.delete_queue(queue).await.expect("queue deleted");
        transport.delete_queue(&format!("{queue}.dlq")).await.expect("queue deleted");
    }
    for exchange in exchanges {
        transport.delete_exchange(exchange).await.expect("exchange deleted");
    }
    transport.close().await;
}

/// The request queues of a micro-framework-profile service serving `targets`.
fn ufw_rpc_queues(service: &str, targets: &[&str]) -> Vec<String> {
    targets.iter().chain(&["broadcast"]).map(|target| format!("rpc-{service}-{target}")).collect()
}

/// The lines of a finished peer that have `key`.
fn with_key<'a>(lines: &'a [Value], key: &str) -> Vec<&'a Value> {
    lines.iter().filter(|line| line.get(key).is_some()).collect()
}

// ---------------------------------------------------------------------------------------
// Nameko

#[tokio::test]
async fn nameko_call_async_holds_several_calls_to_a_rust_service_in_flight_and_keeps_them_apart() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let config = config(&uri, "rs_async").with_max_workers(8);
    let service_name = config.service_name.clone();
    let barrier = Arc::new(Barrier::new(GATHERED));
    let routes = vec![
        Route::new(gather).entrypoint(RPCListener::new()).dependency(Shared(barrier)),
        Route::new(fail).entrypoint(RPCListener::new()),
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(echo).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let calls = json!([
        ["gather", [1], {}],
        ["fail", [], {}],
        ["gather", [2], {}],
        ["add", [1], {"b": 2}],
        ["gather", [3], {}],
        ["echo", [sample()], {}],
    ]);
    let argv = ["rpc-call-async", "--service", &service_name, "--calls", &calls.to_string()];
    let lines = Peer::spawn(&python, NAMEKO, &uri, &argv).finish().await;
    service.stop().await.unwrap();
    delete(&uri, &[format!("rpc-{service_name}")], &[]).await;

    let read = with_key(&lines, "index");
    let order: Vec<u64> = read.iter().map(|line| line["index"].as_u64().unwrap()).collect();
    assert_eq!(order, [5, 4, 3, 2, 1, 0], "read in the reverse order of sending: {lines:?}");
    let outcome = |index: usize| {
        let line = read[5 - index];
        line.get("result").map_or_else(|| json!({"error": line["error"]}), Clone::clone)
    };
    // the failure, answered while the gathered calls still waited, disturbs none of them
    assert_eq!(
        outcome(1),
        json!({"error": {"class": "RemoteError", "exc_type": "ValueError", "value": "boom"}})
    );
    assert_eq!([outcome(0), outcome(2), outcome(4)], [json!(1), json!(2), json!(3)]);
    assert_eq!(outcome(3), json!(3));
    assert_eq!(outcome(5), sample());
}

#[tokio::test]
async fn nameko_call_async_gets_the_same_from_a_rust_service_as_from_a_nameko_one() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let nameko = unique("nk_async");
    // add, fail and echo reach a method; nope is refused before
    let mut python_service =
        Peer::spawn(&python, NAMEKO, &uri, &["rpc-serve", "--service", &nameko, "--count", "3"]);
    let config = config(&uri, "rs_async_pair");
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(fail).entrypoint(RPCListener::new()),
        Route::new(echo).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    python_service.expect("ready").await;

    let calls = json!([
        ["add", [1], {"b": 2}],
        ["fail", [], {}],
        ["echo", [sample()], {}],
        ["nope", [], {}],
    ])
    .to_string();
    let to_python = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["rpc-call-async", "--service", &nameko, "--calls", &calls],
    );
    let to_rust = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["rpc-call-async", "--service", &service_name, "--calls", &calls],
    );
    let from_python = to_python.finish().await;
    let from_rust = to_rust.finish().await;
    python_service.finish().await;
    service.stop().await.unwrap();
    delete(&uri, &[format!("rpc-{service_name}")], &[]).await;

    assert_eq!(from_rust, from_python);
    assert_eq!(
        with_key(&from_rust, "error"),
        [
            &json!({"index": 3, "method": "nope",
                "error": {"class": "MethodNotFound", "exc_type": "MethodNotFound", "value": "nope"}}),
            &json!({"index": 1, "method": "fail",
                "error": {"class": "RemoteError", "exc_type": "ValueError", "value": "boom"}}),
        ]
    );
    assert_eq!(with_key(&from_rust, "result").len(), 2, "{from_rust:?}");
}

/// The standalone dispatcher's options: context headers (prefixed, a parent call-id stack, an
/// unprefixed one), publisher confirms, mandatory delivery, a retry policy, a priority.
fn dispatcher_options(confirms: bool) -> Value {
    json!({
        "headers": {
            "nameko.tenant": "acme",
            "nameko.user_id": 42,
            "nameko.call_id_stack": ["gateway.handle.1"],
            "lang": "fr",
        },
        "use_confirms": confirms,
        "mandatory": confirms,
        "retry": true,
        "retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 0.2},
        "priority": 3,
    })
}

#[tokio::test]
async fn nameko_s_standalone_event_dispatcher_reaches_a_rust_listener_as_it_reaches_a_nameko_handler(
) {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_standalone");
    let nameko = unique("nk_lst");
    let mut python_listener = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["listen", "--service", &nameko, "--source", &source, "--event", "paid", "--count", "2"],
    );
    let probe = Probe::new();
    let config = config(&uri, "rs_standalone");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record_event)
        .entrypoint(EventListener::new(source.clone(), "paid"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    python_listener.expect("ready").await;

    let payload = sample().to_string();
    let dispatch = |event: &str, confirms: bool| {
        let options = dispatcher_options(confirms).to_string();
        let argv = ["standalone-dispatch", "--service", &source, "--event", event];
        let argv = [&argv[..], &["--payload", &payload, "--options", &options]].concat();
        Peer::spawn(&python, NAMEKO, &uri, &argv)
    };
    // all at once: each peer is a Python process that takes a moment to start
    let peers = [dispatch("paid", true), dispatch("paid", false), dispatch("unheard", true)];
    let [confirmed, unconfirmed, unroutable] = peers.map(Peer::finish);
    let (confirmed, unconfirmed) = (confirmed.await, unconfirmed.await);
    // mandatory: the same options to an event nobody listens to come back
    let unroutable = unroutable.await;
    let heard = python_listener.finish().await;
    let waited = service.wait_for_route("record_event", 2).await;
    let seen = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    let queue = format!("evt-{source}-paid--{service_name}.record_event");
    delete(&uri, &[queue], &[format!("{source}.events")]).await;
    waited.unwrap();

    for lines in [&confirmed, &unconfirmed] {
        assert_eq!(lines.last(), Some(&json!({"dispatched": 1})), "{lines:?}");
    }
    assert_eq!(unroutable.last(), Some(&json!({"dispatched": 0})), "{unroutable:?}");
    assert_eq!(with_key(&unroutable, "error")[0]["error"]["exc_type"], "UndeliverableMessage");

    let heard = with_key(&heard, "payload");
    assert_eq!((heard.len(), seen.len()), (2, 2), "{heard:?} {seen:?}");
    for (ours, theirs) in seen.iter().zip(heard) {
        assert_eq!(ours["payload"], sample());
        assert_eq!(theirs["payload"], sample());
        // the same context data as Nameko's handler reads: prefix stripped, stack apart
        assert_eq!(ours["data"], json!({"tenant": "acme", "user_id": 42, "lang": "fr"}));
        assert_eq!(ours["data"], theirs["context_data"]);
        let stack = strings(&ours["stack"]);
        assert_eq!(stack.len(), 2, "{stack:?}");
        assert_eq!(stack[..1], strings(&theirs["parent_call_id_stack"]));
        assert_eq!(stack[0], "gateway.handle.1");
        assert!(stack[1].starts_with(&format!("{service_name}.record_event.")), "{stack:?}");
    }
}

#[tokio::test]
async fn nameko_shell_calls_a_rust_method_and_dispatches_to_a_rust_listener() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_shell");
    let probe = Probe::new();
    let config = config(&uri, "rs_shell");
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(record_event)
            .entrypoint(EventListener::new(source.clone(), "shelled"))
            .dependency(Shared(probe.clone())),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let payload = sample().to_string();
    let argv = [
        "shell",
        "--service",
        &service_name,
        "--method",
        "add",
        "--args",
        "[1]",
        "--kwargs",
        r#"{"b": 2}"#,
        "--source",
        &source,
        "--event",
        "shelled",
        "--payload",
        &payload,
    ];
    let lines = Peer::spawn(&python, NAMEKO, &uri, &argv).finish().await;
    let waited = service.wait_for_route("record_event", 1).await;
    let seen = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    let queues = [
        format!("rpc-{service_name}"),
        format!("evt-{source}-shelled--{service_name}.record_event"),
    ];
    delete(&uri, &queues, &[format!("{source}.events")]).await;
    waited.unwrap();

    assert_eq!(with_key(&lines, "result"), [&json!({"result": 3})], "{lines:?}");
    assert_eq!(with_key(&lines, "dispatched"), [&json!({"dispatched": true})], "{lines:?}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["payload"], sample());
    // the shell's dispatcher sends no context headers: the stack starts here
    assert_eq!(seen[0]["data"], json!({}));
    let stack = strings(&seen[0]["stack"]);
    assert_eq!(stack.len(), 1, "{stack:?}");
    assert!(stack[0].starts_with(&format!("{service_name}.record_event.")), "{stack:?}");
}

// ---------------------------------------------------------------------------------------
// micro-framework 2.1.1

/// The lines of `rpc-client` about the calls `add`, `echo` and `fail`, by target.
fn shared_call_lines(lines: &[Value]) -> Vec<Value> {
    let mut calls: Vec<Value> = with_key(lines, "index")
        .into_iter()
        .filter(|line| ["add", "echo", "fail"].contains(&line["target"].as_str().unwrap_or("")))
        .map(|line| {
            let mut line = line.clone();
            line.as_object_mut().map(|fields| fields.remove("index"));
            line
        })
        .collect();
    calls.sort_by_key(|line| line["target"].as_str().unwrap_or("").to_owned());
    calls
}

#[tokio::test]
async fn micro_framework_s_rpc_proxies_call_a_rust_service_as_they_call_a_python_one() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let python_name = unique("py_ufw_client");
    let mut python_service =
        Peer::spawn(&python, UFW, &uri, &["rpc-serve", "--service", &python_name, "--count", "3"]);
    let probe = Probe::new();
    let config =
        config(&uri, "rs_ufw_client").with_protocol(Protocol::MicroFramework).with_max_workers(8);
    let service_name = config.service_name.clone();
    let barrier = Arc::new(Barrier::new(GATHERED));
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(echo).entrypoint(RPCListener::new()),
        Route::new(fail_with).name("fail").entrypoint(RPCListener::new()),
        Route::new(gather).entrypoint(RPCListener::new()).dependency(Shared(barrier)),
        Route::new(note).entrypoint(RPCListener::new()).dependency(Shared(probe.clone())),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    python_service.expect("ready").await;

    let shared =
        [json!(["fail", [7], {}]), json!(["add", [1], {"b": 2}]), json!(["echo", [sample()], {}])];
    let gathered = (1..=GATHERED).map(|i| json!(["gather", [i], {}]));
    let rust_calls: Value = gathered.chain(shared.iter().cloned()).collect();
    let rust_calls = rust_calls.to_string();
    let python_calls = Value::from(shared.to_vec()).to_string();
    let rust_argv = [
        "rpc-client",
        "--service",
        &service_name,
        "--discover",
        "--calls",
        &rust_calls,
        "--get-target",
        "add",
        "--send",
        r#"["note", ["quiet"], {}]"#,
    ];
    let to_rust = Peer::spawn(&python, UFW, &uri, &rust_argv);
    let python_argv =
        ["rpc-client", "--service", &python_name, "--calls", &python_calls, "--get-target", "add"];
    let to_python = Peer::spawn(&python, UFW, &uri, &python_argv);
    let from_rust = to_rust.finish().await;
    let from_python = to_python.finish().await;
    python_service.finish().await;
    let waited = service.wait_for_route("note", 1).await;
    let note_queue = service.queue_len(&format!("rpc-{service_name}-note")).await;
    let noted = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    let targets = ["add", "echo", "fail", "gather", "note"];
    delete(&uri, &ufw_rpc_queues(&service_name, &targets), &[]).await;
    waited.unwrap();

    let discovered = with_key(&from_rust, "discovered");
    assert_eq!(discovered, [&json!({"discovered": ["add", "echo", "fail", "gather", "note"]})]);
    let order: Vec<u64> =
        with_key(&from_rust, "index").iter().map(|line| line["index"].as_u64().unwrap()).collect();
    assert_eq!(order, [5, 4, 3, 2, 1, 0], "read in the reverse order of sending: {from_rust:?}");
    for i in 1..=GATHERED {
        let line = with_key(&from_rust, "index")[GATHERED + 3 - i];
        assert_eq!((&line["target"], &line["result"]), (&json!("gather"), &json!(i)), "{line}");
    }
    // add, echo and the failing call, as from the Python service: a ValueError rebuilt
    assert_eq!(shared_call_lines(&from_rust), shared_call_lines(&from_python));
    let fail_line = &shared_call_lines(&from_rust)[2];
    assert_eq!(
        fail_line["error"],
        json!({"type": "ValueError", "module": "builtins", "str": "bad 7"}),
        "{fail_line}"
    );
    // __get_target__: the same target; a Rust route knows no parameter names or docstring
    let detail = |lines: &[Value]| with_key(lines, "get_target")[0]["result"].clone();
    assert_eq!(
        detail(&from_rust),
        json!({"target": "add", "args": null, "kwargs": null, "docstring": null})
    );
    assert_eq!(detail(&from_python)["target"], "add");
    // without a reply asked for, the target ran and its request was acked
    assert_eq!(with_key(&from_rust, "sent_without_reply").len(), 1, "{from_rust:?}");
    assert_eq!(noted, [json!("quiet")]);
    assert_eq!(note_queue.unwrap(), 0);
}
