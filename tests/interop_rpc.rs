//! RPC between this framework and Nameko 2.14.1 over RabbitMQ, with `nameko_peer.py`
//! (`rpc-call`: a `ClusterRpcProxy`; `rpc-serve`: a service with `echo(x)`, `add(a, b)` and
//! `fail()`) run as a subprocess (see tests/interop/README.md). The venv comes from
//! `.ci/python-env.sh`; its interpreter is found through `MF_INTEROP_PYTHON_NAMEKO`, else
//! `.venv*/bin/python`. Without RabbitMQ or the venv the tests fail under `CI=true` and are
//! skipped loudly otherwise.

mod common;

use common::targets::{add, echo, fail};

use common::peer::*;
use common::unique;

use common::config;
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::{CallContext, HeaderValue, Headers};
use serde::Deserialize;
use serde_json::{json, Value};

fn strings(value: &Value) -> Vec<String> {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|_| panic!("expected an array of strings, got {value}"))
}

fn sample() -> Value {
    json!({ "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

/// The call-id stack of this call.
fn stack(call: CallContext) -> Vec<String> {
    call.call_id_stack
}

#[derive(Deserialize)]
struct RelayArgs {
    service: String,
    x: Value,
}

/// Calls `service.echo(x)` (a Nameko service) from inside this call.
async fn relay(Args(to): Args<RelayArgs>, rpc: RpcProxy) -> Result<Value, RpcError> {
    rpc.service(to.service).call("echo", [to.x], ()).await
}

/// Delete the Rust service's request queue (RabbitMQ keeps durable queues).
async fn delete_queue(uri: &str, queue: &str) {
    let config = Config::new("interop_cleanup").with_amqp_uri(uri.to_owned());
    if let Ok(transport) = micro_framework::transport::connect(&config).await {
        let _ = transport.delete_queue(queue).await;
        transport.close().await;
    }
}

#[tokio::test]
async fn nameko_calls_a_rust_service() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let config = config(&uri, "rs_rpc");
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(echo).entrypoint(RPCListener::new()),
        Route::new(fail).entrypoint(RPCListener::new()),
        Route::new(stack).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config).await.unwrap();

    let calls: Vec<(&str, String, String, &[&str])> = vec![
        ("add", "[1]".into(), r#"{"b": 2}"#.into(), &[]),
        ("add", "[]".into(), r#"{"a": 5, "b": 6}"#.into(), &[]),
        ("echo", json!([sample()]).to_string(), "{}".into(), &[]),
        ("add", "[1]".into(), "{}".into(), &[]),
        ("add", "[1, 2, 3]".into(), "{}".into(), &[]),
        ("nope", "[]".into(), "{}".into(), &[]),
        ("fail", "[]".into(), "{}".into(), &[]),
        ("stack", "[]".into(), "{}".into(), &["--call-id-stack", "origin.run.1,middle.step.2"]),
    ];
    // all at once: each peer is a Python process that takes a moment to start
    let peers: Vec<Peer> = calls
        .iter()
        .map(|(method, args, kwargs, extra)| {
            let mut argv = vec![
                "rpc-call",
                "--service",
                &service_name,
                "--method",
                method,
                "--args",
                args,
                "--kwargs",
                kwargs,
            ];
            argv.extend_from_slice(extra);
            Peer::spawn(&python, NAMEKO, &uri, &argv)
        })
        .collect();
    let mut outcomes = Vec::new();
    for peer in peers {
        let lines = peer.finish().await;
        outcomes.push(lines.last().cloned().unwrap_or(Value::Null));
    }
    service.stop().await.unwrap();
    delete_queue(&uri, &format!("rpc-{service_name}")).await;

    assert_eq!(outcomes[0], json!({"result": 3}));
    assert_eq!(outcomes[1], json!({"result": 11}));
    assert_eq!(outcomes[2], json!({"result": sample()}));
    for (outcome, expected) in [
        (&outcomes[3], "missing field `b`"),
        (&outcomes[4], "takes 2 positional argument(s) but 3 were given"),
    ] {
        assert_eq!(outcome["error"]["exc_type"], "IncorrectSignature", "{outcome}");
        let value = outcome["error"]["value"].as_str().unwrap();
        assert!(value.contains(expected), "{value}");
    }
    assert_eq!(outcomes[5], json!({"error": {"exc_type": "MethodNotFound", "value": "nope"}}));
    assert_eq!(outcomes[6], json!({"error": {"exc_type": "Error", "value": "boom"}}));
    let stack = strings(&outcomes[7]["result"]);
    assert_eq!(stack.len(), 4, "{stack:?}");
    assert_eq!(&stack[..2], ["origin.run.1", "middle.step.2"]);
    assert!(stack[2].starts_with("standalone_rpc_proxy.call."), "{stack:?}");
    assert!(stack[3].starts_with(&format!("{service_name}.stack.")), "{stack:?}");
}

#[tokio::test]
async fn rust_calls_a_nameko_service() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let nameko = unique("nk_rpc");
    // add, echo, fail and relay's echo reach a method; the others are refused before
    let mut peer =
        Peer::spawn(&python, NAMEKO, &uri, &["rpc-serve", "--service", &nameko, "--count", "4"]);
    peer.expect("ready").await;

    let config = config(&uri, "rs_caller");
    let caller_name = config.service_name.clone();
    let client = Client::connect(&config).await.unwrap();
    let service =
        TestService::start(vec![Route::new(relay).entrypoint(RPCListener::new())], config)
            .await
            .unwrap();
    let nk = client.service(&nameko);
    let sum = nk.call::<i64>("add", [1], json!({"b": 2})).await;
    let echoed = nk.call::<Value>("echo", (), json!({"x": sample()})).await;
    let failed = nk.call::<Value>("fail", (), ()).await;
    let missing = nk.call::<Value>("nope", (), ()).await;
    let incorrect = nk.call::<Value>("add", [1], ()).await;
    let unknown = client.call::<Value>(&unique("nobody"), "echo", [1], ()).await;
    let relayed = client
        .call::<Value>(&caller_name, "relay", (), json!({"service": nameko, "x": "hop"}))
        .await;
    let lines = peer.finish().await;
    client.close().await;
    service.stop().await.unwrap();
    delete_queue(&uri, &format!("rpc-{caller_name}")).await;

    assert_eq!(sum, Ok(3));
    assert_eq!(echoed, Ok(sample()));
    match failed {
        Err(RpcError::RemoteError { exc_type, value, exc_path, exc_args }) => {
            assert_eq!((exc_type.as_str(), value.as_str()), ("ValueError", "boom"));
            assert_eq!(exc_path, "builtins.ValueError");
            assert_eq!(exc_args, vec![json!("boom")]);
        }
        other => panic!("expected a RemoteError, got {other:?}"),
    }
    assert_eq!(missing, Err(RpcError::MethodNotFound("nope".into())));
    assert!(matches!(incorrect, Err(RpcError::IncorrectSignature(_))), "{incorrect:?}");
    assert!(matches!(unknown, Err(RpcError::UnknownService(_))), "{unknown:?}");
    assert_eq!(relayed, Ok(json!("hop")));

    let calls: Vec<&Value> = lines.iter().filter(|line| line.get("call").is_some()).collect();
    assert_eq!(calls.len(), 4, "{lines:?}");
    assert_eq!(calls[0]["args"], json!([1, 2]));
    // the relayed call continues the Rust call's stack, which starts at the client
    let stack = strings(&calls[3]["call_id_stack"]);
    assert_eq!(stack.len(), 3, "{stack:?}");
    assert!(stack[0].starts_with("standalone_rpc_proxy.call."), "{stack:?}");
    assert!(stack[1].starts_with(&format!("{caller_name}.relay.")), "{stack:?}");
    assert!(stack[2].starts_with(&format!("{nameko}.echo.")), "{stack:?}");
}

/// Numbers as Python's `repr` writes them: floats whose shortest text a best-effort parser
/// reads one unit in the last place off (the first three), edge floats, and the 64-bit
/// integer limits.
const NUMBERS_REPR: &str = "[994.1414234139935, 958.7872702291189, 105.00455722256841, 0.1, \
    1e-300, 1.7976931348623157e+308, -0.0, 2.5e-05, 9223372036854775807, \
    -9223372036854775808, 18446744073709551615]";

fn numbers() -> Value {
    json!([
        994.141_423_413_993_5_f64,
        958.787_270_229_118_9_f64,
        105.004_557_222_568_41_f64,
        0.1_f64,
        1e-300_f64,
        f64::MAX,
        -0.0_f64,
        2.5e-05_f64,
        i64::MAX,
        i64::MIN,
        u64::MAX
    ])
}

#[tokio::test]
async fn numbers_from_nameko_come_back_from_a_rust_service_unchanged() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let config = config(&uri, "rs_numbers");
    let service_name = config.service_name.clone();
    let service = TestService::start(vec![Route::new(echo).entrypoint(RPCListener::new())], config)
        .await
        .unwrap();
    let args = format!("[{NUMBERS_REPR}]");
    let argv = [
        "rpc-call",
        "--service",
        &service_name,
        "--method",
        "echo",
        "--args",
        &args,
        "--result-repr",
    ];
    let lines = Peer::spawn(&python, NAMEKO, &uri, &argv).finish().await;
    service.stop().await.unwrap();
    delete_queue(&uri, &format!("rpc-{service_name}")).await;

    let outcome = lines.last().cloned().unwrap_or(Value::Null);
    assert_eq!(outcome["repr"], NUMBERS_REPR, "{outcome}");
}

/// Python integers past u64 arrive as floats, up to a float's range; one beyond it (10**400,
/// which Python's json writes in full) cannot be read: the call is answered
/// `IncorrectSignature` with a reason that says so.
#[tokio::test]
async fn integers_beyond_u64_from_nameko_arrive_as_floats_and_beyond_a_float_or_lone_surrogates_are_refused(
) {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let config = config(&uri, "rs_big_numbers");
    let service_name = config.service_name.clone();
    let service = TestService::start(vec![Route::new(echo).entrypoint(RPCListener::new())], config)
        .await
        .unwrap();
    let huge = format!("[1{}]", "0".repeat(400));
    let mut outcomes = Vec::new();
    // the third: a Python string may hold a lone surrogate, which json writes as an escape
    for args in ["[18446744073709551616]", huge.as_str(), r#"["a\ud800b"]"#] {
        let argv = [
            "rpc-call",
            "--service",
            &service_name,
            "--method",
            "echo",
            "--args",
            args,
            "--result-repr",
        ];
        let lines = Peer::spawn(&python, NAMEKO, &uri, &argv).finish().await;
        outcomes.push(lines.last().cloned().unwrap_or(Value::Null));
    }
    service.stop().await.unwrap();
    delete_queue(&uri, &format!("rpc-{service_name}")).await;

    assert_eq!(outcomes[0]["repr"], "1.8446744073709552e+19", "{}", outcomes[0]);
    let refused = &outcomes[1]["error"];
    assert_eq!(refused["exc_type"], "IncorrectSignature", "{refused}");
    let reason = refused["value"].as_str().unwrap_or_default();
    assert!(reason.contains("beyond a 64-bit float's range"), "{refused}");
    let refused = &outcomes[2]["error"];
    assert_eq!(refused["exc_type"], "IncorrectSignature", "{refused}");
    let reason = refused["value"].as_str().unwrap_or_default();
    assert!(reason.contains("lone UTF-16 surrogate"), "{refused}");
}

#[tokio::test]
async fn numbers_from_a_nameko_service_reach_a_rust_caller_unchanged() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let nameko = unique("nk_numbers");
    let mut peer =
        Peer::spawn(&python, NAMEKO, &uri, &["rpc-serve", "--service", &nameko, "--count", "1"]);
    peer.expect("ready").await;
    let client = Client::connect(&config(&uri, "rs_caller")).await.unwrap();
    let echoed = client.call::<Value>(&nameko, "echo", [numbers()], ()).await;
    let lines = peer.finish().await;
    client.close().await;

    assert_eq!(echoed, Ok(numbers()));
    // without context data, the call-id stack a Nameko proxy sends all the same
    let call = lines.iter().find(|line| line.get("call").is_some()).expect("the call's line");
    assert_eq!(call["context_data"], json!({}), "{call}");
    let stack = strings(&call["call_id_stack"]);
    assert_eq!(stack.len(), 2, "{stack:?}");
    assert!(stack[0].starts_with("standalone_rpc_proxy.call."), "{stack:?}");
    assert!(stack[1].starts_with(&format!("{nameko}.echo.")), "{stack:?}");
}

#[tokio::test]
async fn a_rust_client_sends_context_data_as_nameko_s_standalone_proxy_does() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let nameko = unique("nk_context");
    let mut peer =
        Peer::spawn(&python, NAMEKO, &uri, &["rpc-serve", "--service", &nameko, "--count", "2"]);
    peer.expect("ready").await;
    let data = Headers::from([
        ("auth_token".to_owned(), HeaderValue::from("t0k3n")),
        ("language".to_owned(), HeaderValue::from("fr")),
        ("user_id".to_owned(), HeaderValue::Int(42)),
        ("call_id_stack".to_owned(), HeaderValue::Array(vec!["gateway.handle.1".into()])),
    ]);
    let client = Client::connect(&config(&uri, "rs_caller")).await.unwrap().context_data(data);
    let first = client.call::<Value>(&nameko, "echo", ["a"], ()).await;
    let second = client.call::<Value>(&nameko, "echo", ["b"], ()).await;
    let lines = peer.finish().await;
    client.close().await;

    assert_eq!((first, second), (Ok(json!("a")), Ok(json!("b"))));
    let calls: Vec<&Value> = lines.iter().filter(|line| line.get("call").is_some()).collect();
    assert_eq!(calls.len(), 2, "{lines:?}");
    let expected = json!({"auth_token": "t0k3n", "language": "fr", "user_id": 42});
    let stacks: Vec<Vec<String>> = calls
        .iter()
        .map(|call| {
            assert_eq!(call["context_data"], expected, "{call}");
            strings(&call["call_id_stack"])
        })
        .collect();
    for stack in &stacks {
        assert_eq!(stack.len(), 3, "{stack:?}");
        assert_eq!(stack[0], "gateway.handle.1");
        assert!(stack[1].starts_with("standalone_rpc_proxy.call."), "{stack:?}");
        assert!(stack[2].starts_with(&format!("{nameko}.echo.")), "{stack:?}");
    }
    // one id for the client, as a Nameko proxy has one for its lifetime
    assert_eq!(stacks[0][1], stacks[1][1]);
}

#[tokio::test]
async fn a_missing_service_behind_a_nameko_service_is_a_remote_error_not_unknown_service() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let nameko = unique("nk_nested");
    let mut peer =
        Peer::spawn(&python, NAMEKO, &uri, &["rpc-serve", "--service", &nameko, "--count", "1"]);
    peer.expect("ready").await;
    let client = Client::connect(&config(&uri, "rs_caller")).await.unwrap();
    let failed = client.call::<Value>(&nameko, "call_missing", ["ghost"], ()).await;
    peer.finish().await;
    client.close().await;

    // the service called exists: its own call failed, as a Nameko caller is told too
    match failed {
        Err(RpcError::RemoteError { exc_type, value, exc_path, .. }) => {
            assert_eq!(exc_type, "UnknownService");
            assert_eq!(value, "Unknown service `ghost`");
            assert_eq!(exc_path, "nameko.exceptions.UnknownService");
        }
        other => panic!("expected a RemoteError, got {other:?}"),
    }
}

/// Echoes the Python-typed keyword arguments it reads as text (see [`PythonTypes`]).
fn python_types(Args(values): Args<PythonTypes>) -> Value {
    serde_json::to_value(values).unwrap()
}

/// A Nameko caller's `datetime`, `date`, `time`, `Decimal`, `UUID` and `bytes` arguments
/// (kombu's `{"__type__": T, "__value__": V}` envelopes) reach a Rust target as text.
#[tokio::test]
async fn dates_decimals_uuids_and_bytes_from_a_nameko_caller_reach_a_rust_target_as_text() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let config = config(&uri, "rs_rpc_typed");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(python_types).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let argv = ["rpc-call", "--service", &service_name, "--method", "python_types"];
    let lines = Peer::spawn(&python, NAMEKO, &uri, &[&argv[..], &["--python-types"]].concat())
        .finish()
        .await;
    service.stop().await.unwrap();
    delete_queue(&uri, &format!("rpc-{service_name}")).await;
    assert_eq!(lines.last(), Some(&json!({ "result": python_types_as_text() })), "{lines:?}");
}
