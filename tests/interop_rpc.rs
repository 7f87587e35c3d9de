//! RPC between this framework and Nameko 2.14.1 over RabbitMQ, with `nameko_peer.py`
//! (`rpc-call`: a `ClusterRpcProxy`; `rpc-serve`: a service with `echo(x)`, `add(a, b)` and
//! `fail()`) run as a subprocess (see tests/interop/README.md). The venv comes from
//! `.ci/python-env.sh`; its interpreter is found through `MF_INTEROP_PYTHON_NAMEKO`, else
//! `.venv*/bin/python`. Without RabbitMQ or the venv the tests fail under `CI=true` and are
//! skipped loudly otherwise.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::config;
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::CallContext;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const NAMEKO: &str = "nameko_peer.py";
/// The peers' own limit (`--timeout`); they exit 3 when it passes.
const PEER_TIMEOUT_SECS: u64 = 30;
/// How long a test waits for one line of a peer (a bit more than the peer's own limit).
const LINE_WAIT: Duration = Duration::from_secs(PEER_TIMEOUT_SECS + 10);

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// The venv interpreter for `script`'s package, or `None` (after a loud `SKIPPED:` line)
/// when there is none; under `CI=true` a missing venv fails the test.
fn interop_python(script: &str) -> Option<PathBuf> {
    let (variable, own_venv) = ("MF_INTEROP_PYTHON_NAMEKO", ".venv-nameko");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => vec![PathBuf::from(path)],
        _ => vec![root.join(own_venv).join("bin/python"), root.join(".venv/bin/python")],
    };
    if let Some(python) = candidates.iter().find(|path| path.is_file()) {
        return Some(python.clone());
    }
    let message = format!(
        "no Python interop venv for {script} (looked at {candidates:?}; \
         run `bash .ci/python-env.sh` or set {variable})"
    );
    if is_ci() {
        panic!("{message} and CI=true: the interop tests must run in CI");
    }
    // straight to stderr, past the test harness's capture, so the skip is seen
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}; this interop test did not run");
    None
}

/// RabbitMQ and the interpreter for `script`, or `None` when the test is skipped.
fn prerequisites(script: &str) -> Option<(String, PathBuf)> {
    let uri = common::rabbitmq_uri()?;
    let python = interop_python(script)?;
    Some((uri, python))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A running Python peer: one JSON object per stdout line.
struct Peer {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    fn spawn(python: &Path, script: &str, uri: &str, args: &[&str]) -> Peer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
        let timeout = PEER_TIMEOUT_SECS.to_string();
        let mut child = Command::new(python)
            .arg(&path)
            .args(args)
            .args(["--uri", uri, "--timeout", &timeout])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {python:?} {path:?}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = String::new();
            let _ = stderr_pipe.read_to_string(&mut buffer).await;
            sink.lock().unwrap().push_str(&buffer);
        });
        Peer {
            name: format!("{script} {}", args.join(" ")),
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
        }
    }

    fn fail(&self, what: &str) -> ! {
        // give the stderr reader a moment to collect the traceback
        std::thread::sleep(Duration::from_millis(200));
        panic!("peer `{}`: {what}\n--- its stderr:\n{}", self.name, self.stderr.lock().unwrap())
    }

    /// The next line, or `None` at the end of its output.
    async fn next_line(&mut self) -> Option<Value> {
        let line = match tokio::time::timeout(LINE_WAIT, self.lines.next_line()).await {
            Err(_) => self.fail("printed nothing in time"),
            Ok(Err(error)) => self.fail(&format!("stdout unreadable: {error}")),
            Ok(Ok(line)) => line?,
        };
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| self.fail(&format!("printed a non-JSON line: {line}")));
        if value.get("failed").is_some() || value.get("timeout").is_some() {
            self.fail(&format!("reported {value}"));
        }
        Some(value)
    }

    /// Read lines until one has `key`; returns that line.
    async fn expect(&mut self, key: &str) -> Value {
        loop {
            match self.next_line().await {
                Some(line) if line.get(key).is_some() => return line,
                Some(_) => continue,
                None => self.fail(&format!("ended without a `{key}` line")),
            }
        }
    }

    /// Read the rest of the output and require exit code 0; returns the lines read.
    async fn finish(mut self) -> Vec<Value> {
        let mut lines = Vec::new();
        while let Some(line) = self.next_line().await {
            lines.push(line);
        }
        let status = match tokio::time::timeout(LINE_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => self.fail(&format!("cannot be waited for: {error}")),
            Err(_) => self.fail("did not exit in time"),
        };
        if !status.success() {
            self.fail(&format!("exited with {status}; its lines: {lines:?}"));
        }
        lines
    }
}

impl Drop for Peer {
    /// A test that gives up (a failed assertion) asks a still running peer to stop: on
    /// SIGTERM the peers delete what they declared and exit by themselves (their own
    /// `--timeout` bounds them anyway), where a SIGKILL would leave durable queues behind.
    fn drop(&mut self) {
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn strings(value: &Value) -> Vec<String> {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|_| panic!("expected an array of strings, got {value}"))
}

fn sample() -> Value {
    json!({ "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> i64 {
    a + b
}

#[derive(Deserialize)]
struct EchoArgs {
    x: Value,
}

fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
    x
}

fn fail() -> Result<(), std::io::Error> {
    Err(std::io::Error::other("boom"))
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
    let config = Config { amqp_uri: uri.to_owned(), ..Config::new("interop_cleanup") };
    if let Ok(transport) = micro_framework::amqp::connect(&config).await {
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
    // the relayed call continues the Rust call's stack
    let stack = strings(&calls[3]["call_id_stack"]);
    assert_eq!(stack.len(), 2, "{stack:?}");
    assert!(stack[0].starts_with(&format!("{caller_name}.relay.")), "{stack:?}");
    assert!(stack[1].starts_with(&format!("{nameko}.echo.")), "{stack:?}");
}
