//! AMQP RPC between this framework and micro-framework 2.1.1 (PyPI) over RabbitMQ, in the
//! Python original's wire format, both ways, with `ufw_peer.py` (`rpc-call` / `rpc-list`: the
//! package's own RPC client; `rpc-serve`: a `Runner` with `RPCListener` targets `add(a, b)`,
//! `echo(x)`, `fail(x)`, `slow(seconds)`) run as a subprocess (see tests/interop/README.md).
//! Without RabbitMQ or the venv the tests fail under `CI=true` and are skipped loudly
//! otherwise.

mod common;

use common::targets::{add, echo, fail};

use std::time::Duration;

use common::config;
use common::peer::*;
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Client, RpcError};
use micro_framework::config::Protocol;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use serde_json::{json, Value};

fn sample() -> Value {
    json!({ "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

#[tokio::test]
async fn micro_framework_calls_a_rust_service() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let config = config(&uri, "rs_ufw_rpc").with_protocol(Protocol::MicroFramework);
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(echo).entrypoint(RPCListener::new()),
        Route::new(fail).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config).await.unwrap();

    let calls: Vec<(&str, String, String)> = vec![
        ("add", "[1]".into(), r#"{"b": 2}"#.into()),
        ("add", "[]".into(), r#"{"a": 5, "b": 6}"#.into()),
        ("echo", json!([sample()]).to_string(), "{}".into()),
        ("add", "[1]".into(), "{}".into()),
        ("nope", "[]".into(), "{}".into()),
        ("fail", "[]".into(), "{}".into()),
    ];
    // all at once: each peer is a Python process that takes a moment to start
    let peers: Vec<Peer> = calls
        .iter()
        .map(|(target, args, kwargs)| {
            let argv = [
                "rpc-call",
                "--service",
                &service_name,
                "--target",
                target,
                "--args",
                args,
                "--kwargs",
                kwargs,
            ];
            Peer::spawn(&python, UFW, &uri, &argv)
        })
        .collect();
    let list = Peer::spawn(&python, UFW, &uri, &["rpc-list", "--service", &service_name]);
    let mut outputs = Vec::new();
    for peer in peers {
        let lines = peer.finish().await;
        let answer = lines
            .into_iter()
            .find(|line| line.get("result").is_some() || line.get("error").is_some());
        outputs.push(answer.expect("a result or an error line"));
    }
    assert_eq!(outputs[0]["result"], json!(3));
    assert_eq!(outputs[1]["result"], json!(11));
    assert_eq!(outputs[2]["result"], sample());
    // arguments that do not fit: the Python caller rebuilds a plain TypeError
    assert_eq!(outputs[3]["error"]["type"], "TypeError", "{}", outputs[3]);
    assert!(outputs[3]["error"]["str"].as_str().unwrap().contains("add"), "{}", outputs[3]);
    // no queue for the target: the package's own RPCTargetDoesNotExist
    assert_eq!(outputs[4]["error"]["type"], "RPCTargetDoesNotExist", "{}", outputs[4]);
    // a Rust error: the Python caller cannot import its module and gets an RPCException
    assert_eq!(outputs[5]["error"]["type"], "RPCException", "{}", outputs[5]);
    assert_eq!(outputs[5]["error"]["exc_type"], "Error", "{}", outputs[5]);
    assert_eq!(outputs[5]["error"]["value"], "boom", "{}", outputs[5]);

    let lines = list.finish().await;
    let targets = lines.iter().find_map(|line| line.get("targets")).expect("a targets line");
    let mut names: Vec<&str> =
        targets.as_array().unwrap().iter().map(|t| t["target"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["add", "echo", "fail"]);

    // every request was answered and acked
    for target in ["add", "echo", "fail", "broadcast"] {
        assert_eq!(service.queue_len(&format!("rpc-{service_name}-{target}")).await.unwrap(), 0);
    }
    service.stop().await.unwrap();
    common::cleanup(&uri, &[service_name]).await;
}

#[tokio::test]
async fn a_rust_client_calls_a_micro_framework_service() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let service_name = common::unique("py_ufw_rpc");
    let mut peer = Peer::spawn(&python, UFW, &uri, &["rpc-serve", "--service", &service_name]);
    peer.expect("ready").await;

    let client = Client::connect(&config(&uri, "caller").with_protocol(Protocol::MicroFramework))
        .await
        .unwrap();
    let python_service = client.service(&service_name);
    assert_eq!(python_service.call::<i64>("add", [1], json!({"b": 2})).await.unwrap(), 3);
    assert_eq!(python_service.call::<Value>("echo", [sample()], ()).await.unwrap(), sample());

    let failed = python_service.call::<Value>("fail", [1], ()).await.unwrap_err();
    assert!(
        matches!(&failed, RpcError::RemoteError { exc_type, value, exc_path, .. }
            if exc_type == "ValueError" && value == "bad 1" && exc_path == "builtins.ValueError"),
        "{failed:?}"
    );
    let misfit = python_service.call::<Value>("add", [1], ()).await.unwrap_err();
    assert!(
        matches!(&misfit, RpcError::RemoteError { exc_type, .. } if exc_type == "TypeError"),
        "{misfit:?}"
    );
    let unknown = python_service.call::<Value>("nope", (), ()).await.unwrap_err();
    assert!(matches!(&unknown, RpcError::MethodNotFound(_)), "{unknown:?}");

    let targets = python_service.list_targets().await.unwrap();
    let add_detail = targets.iter().find(|t| t["target"] == "add").expect("add is listed");
    assert_eq!(add_detail["args"], json!(["a", "b"]), "{add_detail}");

    let quick = python_service.clone().timeout(Duration::from_millis(300));
    let timed_out = quick.call::<Value>("slow", [2], ()).await.unwrap_err();
    assert!(matches!(timed_out, RpcError::Timeout { .. }), "{timed_out:?}");

    // the Python service ran the first call with the arguments sent
    let first = peer.expect("call").await;
    assert_eq!(
        (&first["call"], &first["args"], &first["kwargs"]),
        (&json!("add"), &json!([1]), &json!({"b": 2})),
        "{first}"
    );
    drop(peer); // SIGTERM: the peer deletes its queues
    client.close().await;
}
