//! WebSocket RPC between this framework and micro-framework 2.1.1 (PyPI), with `ufw_peer.py`
//! run as a subprocess (see tests/interop/README.md): `ws-call` calls a Rust service the way
//! the package's client does (its `WSConnection`, `format_rpc_command`,
//! `parse_rpc_response`), `ws-serve` runs a Python service with `WebSocketEntrypoint` routes
//! that `WebSocketRpcClient` calls. No broker is involved. Without the venv the tests fail
//! under `CI=true` and are skipped loudly otherwise.
#![cfg(feature = "websocket")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::peer::{interop_python, Peer, UFW};
use common::{unique, wait_until};
use micro_framework::amqp::rpc::Args;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::websocket::{WebSocketEntrypoint, WebSocketRpcClient, WebSocketRpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// The peers never touch the broker; `Peer::spawn` passes a URI all the same.
const UNUSED_URI: &str = "amqp://guest:guest@127.0.0.1:5672/";

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>) -> i64 {
    a + b
}

fn echo(Args((x,)): Args<(Value,)>) -> Value {
    x
}

fn fail(Args((x,)): Args<(i64,)>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other(format!("bad {x}")))
}

/// Holds calls until the test adds permits; counts the calls that started.
#[derive(Clone)]
struct Gate(Arc<Semaphore>, Arc<AtomicUsize>);

async fn hold(Args((x,)): Args<(Value,)>, Dep(gate): Dep<Gate>) -> Value {
    gate.1.fetch_add(1, Ordering::SeqCst);
    drop(gate.0.acquire().await);
    x
}

fn sample() -> Value {
    json!({ "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

#[tokio::test]
async fn the_python_client_calls_a_rust_service() {
    let Some(python) = interop_python(UFW) else { return };
    let gate = Gate(Arc::new(Semaphore::new(0)), Arc::default());
    let config = Config::new(unique("wsinterop"))
        .with_amqp_uri(format!("memory://{}", unique("ws")))
        .with_websocket_ip("127.0.0.1".into())
        .with_websocket_port(0);
    let routes = vec![
        Route::new(add).entrypoint(WebSocketEntrypoint::new()),
        Route::new(echo).entrypoint(WebSocketEntrypoint::new()),
        Route::new(fail).entrypoint(WebSocketEntrypoint::new()),
    ];
    // `hold` has a pool of its own, of one worker
    let held = RunnerContext::new(vec![Route::new(hold)
        .entrypoint(WebSocketEntrypoint::new())
        .dependency(Shared(gate.clone()))])
    .max_workers(1);
    let service = Runner::new(routes, config).context(held).spawn().await.unwrap();
    let address = service.websocket_address().unwrap();
    let client = WebSocketRpcClient::new("127.0.0.1", address.port());
    let first = tokio::spawn(async move { client.call::<Value>("hold", ["first"], ()).await });
    wait_until(|| gate.1.load(Ordering::SeqCst) == 1, "the first hold to start").await;

    let calls = json!([
        ["add", [1], {"b": 2}],
        ["echo", [sample()], {}],
        ["fail", [7], {}],
        ["nope", [], {}],
        ["add", [1], {}],
        ["hold", ["second"], {}],
        ["__list_targets__", [], {}],
    ]);
    let url = format!("ws://{address}");
    let args = ["ws-call", "--url", &url, "--calls", &calls.to_string()];
    let lines = Peer::spawn(&python, UFW, UNUSED_URI, &args).finish().await;
    let line = |command: &str, nth: usize| {
        lines.iter().filter(|line| line["command"] == command).nth(nth).cloned().unwrap()
    };
    assert_eq!(line("add", 0)["raw"], json!({"data": 3, "exception": null}));
    assert_eq!(line("add", 0)["result"], 3);
    assert_eq!(line("echo", 0)["result"], sample());
    // a Rust error type: not importable in Python, rebuilt as the package's RPCException
    assert_eq!(
        line("fail", 0)["error"],
        json!({"type": "RPCException", "module": "micro_framework.exceptions", "str": "Error bad 7"})
    );
    assert_eq!(line("fail", 0)["raw"]["exception"]["module"], "std.io.error");
    assert_eq!(
        line("nope", 0)["error"],
        json!({"type": "RPCTargetDoesNotExist", "module": "micro_framework.exceptions",
            "str": "nope does not exist or is not exposed through a RPC method."})
    );
    assert_eq!(
        line("add", 1)["error"],
        json!({"type": "TypeError", "module": "builtins", "str": "add(): missing field `b`"})
    );
    let refused = line("hold", 0)["error"].clone();
    assert_eq!(refused["type"], "MaxConnectionsReached");
    assert_eq!(refused["module"], "micro_framework.exceptions");
    assert!(refused["str"].as_str().unwrap().starts_with("No Available Workers"), "{refused}");
    let targets: Vec<Value> =
        serde_json::from_value(line("__list_targets__", 0)["result"].clone()).unwrap();
    assert_eq!(targets.len(), 4);
    assert_eq!(
        targets[0],
        json!({"target": "add", "args": null, "kwargs": null, "docstring": null})
    );

    gate.0.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), "first");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn the_rust_client_calls_a_python_service() {
    let Some(python) = interop_python(UFW) else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port_arg = port.to_string();
    let args = ["ws-serve", "--port", &port_arg, "--max-workers", "1"];
    let mut peer = Peer::spawn(&python, UFW, UNUSED_URI, &args);
    peer.expect("ready").await;
    let client = WebSocketRpcClient::new("127.0.0.1", port).timeout(Duration::from_secs(10));

    assert_eq!(client.call::<i64>("add", [1], json!({"b": 2})).await.unwrap(), 3);
    assert_eq!(client.call::<i64>("add", (), json!({"a": 4, "b": 2})).await.unwrap(), 6);
    match client.call::<Value>("fail", [1], ()).await.unwrap_err() {
        WebSocketRpcError::Remote(error) => {
            assert_eq!((error.exception.as_str(), error.message.as_str()), ("ValueError", "bad 1"));
            assert_eq!((error.args, error.module), (vec![json!("bad 1")], None));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(
        client.call::<Value>("nope", (), ()).await.unwrap_err(),
        WebSocketRpcError::TargetDoesNotExist(
            "nope does not exist or is not exposed through a RPC method.".into()
        )
    );
    match client.call::<Value>("add", [1], ()).await.unwrap_err() {
        WebSocketRpcError::Remote(error) => {
            assert_eq!(error.exception, "TypeError");
            assert!(error.message.ends_with("missing 1 required positional argument: 'b'"));
        }
        other => panic!("expected a TypeError, got {other:?}"),
    }

    // one worker: a call while `slow` runs is refused, or retried until a worker is free
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.call::<f64>("slow", [1.0], ()).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        client.call::<i64>("add", (1, 1), ()).await.unwrap_err(),
        WebSocketRpcError::MaxConnectionsReached("No Available Workers".into())
    );
    let patient = client.clone().retry_when_full(Duration::from_millis(100));
    assert_eq!(patient.call::<i64>("add", (2, 2), ()).await.unwrap(), 4);
    assert_eq!(slow.await.unwrap().unwrap(), 1.0);

    assert_eq!(client.call::<String>("quit_peer", (), ()).await.unwrap(), "stopping");
    peer.finish().await;
}
