//! WebSocket RPC (the Python micro-framework's frames): `WebSocketEntrypoint` served by a
//! running service, called with raw frames and with `WebSocketRpcClient`. No broker traffic
//! is involved, so the services run on the in-process broker.
#![cfg(feature = "websocket")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{unique, wait_until};
use futures::{SinkExt, StreamExt};
use micro_framework::amqp::rpc::Args;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::websocket::{
    WebSocketEntrypoint, WebSocketRpcClient, WebSocketRpcError, MAX_CALLS_PER_CONNECTION,
    MAX_FRAME_SIZE,
};
use micro_framework::{Error, RunningService};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>) -> i64 {
    a + b
}

fn echo(Args(args): Args<Value>) -> Value {
    args
}

fn fail(Args((x,)): Args<(i64,)>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other(format!("bad {x}")))
}

fn panics() {
    panic!("kaboom");
}

/// Holds calls until the test opens it; counts the calls that started.
#[derive(Clone)]
struct Gate {
    open: Arc<Semaphore>,
    started: Arc<AtomicUsize>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { open: Arc::new(Semaphore::new(0)), started: Arc::default() }
    }
}

impl Gate {
    fn open(&self) {
        self.open.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    async fn wait_started(&self, count: usize) {
        wait_until(|| self.started.load(Ordering::SeqCst) >= count, "calls to start").await;
    }
}

/// Waits for the gate, then returns its argument.
async fn hold(Args((x,)): Args<(Value,)>, Dep(gate): Dep<Gate>) -> Value {
    gate.started.fetch_add(1, Ordering::SeqCst);
    drop(gate.open.acquire().await);
    x
}

fn ws_config(service: &str, max_workers: usize) -> Config {
    Config::new(unique(service))
        .with_amqp_uri(format!("memory://{}", unique("ws")))
        .with_websocket_ip("127.0.0.1".into())
        .with_websocket_port(0)
        .with_max_workers(max_workers)
}

async fn start(max_workers: usize, gate: &Gate) -> (RunningService, SocketAddr) {
    start_with(ws_config("wsmath", max_workers), gate).await
}

async fn start_with(config: Config, gate: &Gate) -> (RunningService, SocketAddr) {
    let routes = vec![
        Route::new(add).entrypoint(WebSocketEntrypoint::new()),
        Route::new(echo).entrypoint(WebSocketEntrypoint::new()),
        Route::new(fail).entrypoint(WebSocketEntrypoint::new()),
        Route::new(panics).entrypoint(WebSocketEntrypoint::new()),
        Route::new(hold).entrypoint(WebSocketEntrypoint::new()).dependency(Shared(gate.clone())),
    ];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.websocket_address().expect("the service listens");
    (service, address)
}

fn client(address: SocketAddr) -> WebSocketRpcClient {
    WebSocketRpcClient::new(address.ip().to_string(), address.port())
        .timeout(Duration::from_secs(10))
}

/// A plain WebSocket connection sending raw frames.
struct Raw(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Raw {
    async fn connect(address: SocketAddr) -> Raw {
        let (socket, _) =
            tokio_tungstenite::connect_async(format!("ws://{address}")).await.unwrap();
        Raw(socket)
    }

    async fn send(&mut self, frame: impl Into<String>) {
        self.0.send(Message::text(frame.into())).await.unwrap();
    }

    async fn call(&mut self, request: Value) -> Value {
        self.send(request.to_string()).await;
        self.recv().await
    }

    /// The next reply frame, as JSON.
    async fn recv(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.0.next())
                .await
                .expect("a reply in time")
                .expect("the connection is open")
                .expect("a readable frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(frame) => panic!("closed instead of replying: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The close code the server ends the connection with.
    async fn closed(&mut self) -> Option<CloseCode> {
        match tokio::time::timeout(Duration::from_secs(10), self.0.next()).await {
            Err(_) => panic!("the connection was not closed in time"),
            Ok(Some(Ok(Message::Close(frame)))) => frame.map(|frame| frame.code),
            Ok(Some(Ok(other))) => panic!("unexpected frame while closing: {other:?}"),
            Ok(Some(Err(_)) | None) => None,
        }
    }
}

fn exception(reply: &Value) -> (&str, &str) {
    let exception = &reply["exception"];
    (exception["exception"].as_str().unwrap_or_default(), exception["message"].as_str().unwrap())
}

#[tokio::test]
async fn commands_take_args_and_kwargs_and_reply_data() {
    let gate = Gate::default();
    let (service, address) = start(4, &gate).await;
    let mut raw = Raw::connect(address).await;
    let reply =
        raw.call(json!({"command": "add", "command_args": [1, 2], "command_kwargs": {}})).await;
    assert_eq!(reply, json!({"data": 3, "exception": null}));
    let reply =
        raw.call(json!({"command": "add", "command_args": [1], "command_kwargs": {"b": 5}})).await;
    assert_eq!(reply["data"], 6);
    let reply = raw.call(json!({"command": "add", "command_kwargs": {"a": 2, "b": 5}})).await;
    assert_eq!(reply["data"], 7);
    let reply = raw.call(json!({"command": "echo", "command_args": ["café ☕", [1, null]]})).await;
    assert_eq!(reply["data"], json!(["café ☕", [1, null]]));

    let targets = raw.call(json!({"command": "__list_targets__"})).await;
    let names: Vec<&str> =
        targets["data"].as_array().unwrap().iter().map(|t| t["target"].as_str().unwrap()).collect();
    assert_eq!(names, ["add", "echo", "fail", "hold", "panics"]);
    let detail = raw.call(json!({"command": "__get_target__", "command_args": ["add"]})).await;
    assert_eq!(detail["data"]["target"], "add");
    let missing = raw.call(json!({"command": "__get_target__", "command_args": ["zzz"]})).await;
    assert_eq!(exception(&missing), ("KeyError", "'zzz'"));

    let client = client(address);
    assert_eq!(client.call::<i64>("add", (20, 22), ()).await.unwrap(), 42);
    assert_eq!(client.call::<i64>("add", [1], json!({"b": 2})).await.unwrap(), 3);
    let echoed: Value = client.call("echo", (), json!({"k": [true]})).await.unwrap();
    assert_eq!(echoed, json!({"k": [true]}));
    let wrong_type = client.call::<String>("add", (1, 2), ()).await.unwrap_err();
    assert!(matches!(wrong_type, WebSocketRpcError::UnexpectedResult(_)), "{wrong_type:?}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn every_error_is_replied_and_the_connection_stays_open() {
    let gate = Gate::default();
    let (service, address) = start(4, &gate).await;
    let mut raw = Raw::connect(address).await;

    let failed = raw.call(json!({"command": "fail", "command_args": [7]})).await;
    assert_eq!(
        failed,
        json!({"data": null, "exception": {"exception": "Error", "message": "bad 7",
            "args": ["bad 7"], "kwargs": {}, "module": "std.io.error"}})
    );
    let unknown = raw.call(json!({"command": "nope"})).await;
    assert_eq!(
        exception(&unknown),
        ("RPCTargetDoesNotExist", "nope does not exist or is not exposed through a RPC method.")
    );
    assert_eq!(unknown["exception"]["module"], "micro_framework.exceptions");
    for frame in
        ["{not json", "[1, 2]", r#"{"cmd": "add"}"#, r#"{"command": "add", "command_args": 3}"#]
    {
        raw.send(frame).await;
        let reply = raw.recv().await;
        let (kind, message) = exception(&reply);
        assert_eq!(kind, "RPCMalformedMessage", "{frame}");
        assert!(message.starts_with("malformed message ("), "{message}");
    }
    let missing = raw.call(json!({"command": "add", "command_args": [1]})).await;
    let (kind, message) = exception(&missing);
    assert_eq!((kind, message), ("TypeError", "add(): missing field `b`"));
    assert_eq!(missing["exception"]["module"], Value::Null);
    let extra = raw.call(json!({"command": "add", "command_args": [1, 2, 3]})).await;
    assert!(exception(&extra).1.contains("takes 2 positional argument(s) but 3 were given"));
    let panicked = raw.call(json!({"command": "panics"})).await;
    assert_eq!(exception(&panicked), ("Panic", "target panicked: kaboom"));
    // still open, still serving
    assert_eq!(raw.call(json!({"command": "add", "command_args": [1, 1]})).await["data"], 2);

    let client = client(address);
    match client.call::<Value>("fail", [1], ()).await.unwrap_err() {
        WebSocketRpcError::Remote(error) => {
            assert_eq!((error.exception.as_str(), error.message.as_str()), ("Error", "bad 1"));
            assert_eq!(error.module.as_deref(), Some("std.io.error"));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let unknown = client.call::<Value>("nope", (), ()).await.unwrap_err();
    assert!(matches!(unknown, WebSocketRpcError::TargetDoesNotExist(_)), "{unknown:?}");
    let signature = client.call::<Value>("add", (), ()).await.unwrap_err();
    assert!(
        signature.to_string().starts_with("TypeError: add(): missing field `a`"),
        "{signature}"
    );
    let bad_args = client.call::<Value>("add", 1, ()).await.unwrap_err();
    assert!(matches!(bad_args, WebSocketRpcError::InvalidArguments(_)), "{bad_args:?}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_pool_refuses_calls_at_once_instead_of_queueing_them() {
    let gate = Gate::default();
    let (service, address) = start(1, &gate).await;
    let client = client(address);
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.call::<Value>("hold", ["first"], ()).await }
    });
    gate.wait_started(1).await;

    let started = std::time::Instant::now();
    let refused = client.call::<i64>("add", (1, 2), ()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once");
    assert_eq!(
        refused,
        WebSocketRpcError::MaxConnectionsReached(
            "No Available Workers: all 1 workers of context 'default' are busy".into()
        )
    );
    let mut raw = Raw::connect(address).await;
    let reply = raw.call(json!({"command": "add", "command_args": [1, 2]})).await;
    assert_eq!(reply["exception"]["exception"], "MaxConnectionsReached");
    assert_eq!(reply["exception"]["module"], "micro_framework.exceptions");

    // the Python client's way: try again until a worker is free
    let patient = tokio::spawn({
        let client = client.clone().retry_when_full(Duration::from_millis(50));
        async move { client.call::<i64>("add", (2, 3), ()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!patient.is_finished(), "retries while the pool is full");
    gate.open();
    assert_eq!(first.await.unwrap().unwrap(), json!("first"));
    assert_eq!(patient.await.unwrap().unwrap(), 5);
    assert_eq!(client.call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    // the refusals are counted: the client's, the raw one, and the patient client's tries
    #[cfg(feature = "metrics")]
    {
        let metrics = service.metrics().render();
        let busy = metrics.lines().find(|line| {
            line.starts_with("requests_refused_total{")
                && line.contains("reason=\"busy\"")
                && line.contains("route=\"add\"")
        });
        let count = busy.and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok());
        assert!(count.is_some_and(|count| count >= 3), "{metrics}");
    }
    service.stop().await.unwrap();
}

#[tokio::test]
async fn calls_of_one_connection_run_concurrently_and_replies_carry_their_ids() {
    let gate = Gate::default();
    let workers = MAX_CALLS_PER_CONNECTION + 8;
    let (service, address) = start(workers, &gate).await;
    let mut raw = Raw::connect(address).await;
    raw.send(json!({"command": "hold", "command_args": ["slow"], "id": "a"}).to_string()).await;
    gate.wait_started(1).await;
    let fast = raw.call(json!({"command": "add", "command_args": [1, 2], "id": 2})).await;
    assert_eq!(fast, json!({"data": 3, "exception": null, "id": 2}));
    for id in 1..MAX_CALLS_PER_CONNECTION {
        raw.send(json!({"command": "hold", "command_args": [id], "id": id}).to_string()).await;
    }
    gate.wait_started(MAX_CALLS_PER_CONNECTION).await;
    let over = raw.call(json!({"command": "add", "command_args": [1, 2], "id": "over"})).await;
    assert_eq!(over["id"], "over");
    assert_eq!(
        exception(&over),
        (
            "MaxConnectionsReached",
            "No Available Workers: 32 calls already running on this connection"
        )
    );
    gate.open();
    let mut ids = Vec::new();
    for _ in 0..MAX_CALLS_PER_CONNECTION {
        let reply = raw.recv().await;
        assert_eq!(reply["data"], reply["id"].as_u64().map_or(json!("slow"), |id| json!(id)));
        ids.push(reply["id"].clone());
    }
    assert!(ids.contains(&json!("a")));
    #[cfg(feature = "metrics")]
    {
        let metrics = service.metrics().render();
        let line = "requests_refused_total{context=\"default\",reason=\"connection_limit\",route=\"add\"} 1";
        assert!(metrics.lines().any(|l| l == line), "{line} not in {metrics}");
    }
    service.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_frames_close_the_connection_with_1009() {
    let gate = Gate::default();
    let (service, address) = start(2, &gate).await;
    // far over the limit too: the server stops reading at the frame's header, and the rest
    // of the frame once reset the connection, destroying the close frame
    for size in [MAX_FRAME_SIZE, 4 * MAX_FRAME_SIZE, 16 * MAX_FRAME_SIZE] {
        let mut raw = Raw::connect(address).await;
        let big = format!(r#"{{"command": "echo", "command_args": ["{}"]}}"#, "x".repeat(size));
        raw.send(big).await;
        assert_eq!(raw.closed().await, Some(CloseCode::Size), "a frame of {size} bytes");
    }
    // the server goes on
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_the_connection_with_1007() {
    let gate = Gate::default();
    let (service, address) = start(2, &gate).await;
    let mut raw = Raw::connect(address).await;
    let not_utf8 = b"{\"command\": \"echo\", \"command_args\": [\"\xff\xfe\"]}".to_vec();
    let frame = Frame::message(not_utf8, OpCode::Data(Data::Text), true);
    raw.0.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(raw.closed().await, Some(CloseCode::Invalid));
    // the server goes on
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    service.stop().await.unwrap();
}

/// A string of `n` bytes: a reply larger than the request.
fn repeat(Args((n,)): Args<(usize,)>) -> String {
    "x".repeat(n)
}

#[tokio::test]
async fn the_client_reads_replies_larger_than_the_frames_servers_read() {
    // The Python servers send results of any size and its client (websocket-client) reads
    // them; only the frames a server reads are bounded (1 MiB).
    let config = ws_config("wsrepeat", 2);
    let routes = vec![Route::new(repeat).entrypoint(WebSocketEntrypoint::new())];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.websocket_address().expect("the service listens");
    let size = 2 * MAX_FRAME_SIZE;
    let reply: String = client(address).call("repeat", [size], ()).await.unwrap();
    assert_eq!(reply.len(), size);
    service.stop().await.unwrap();
}

/// Calls `add(x, 1)` on the server its client dependency points at.
async fn add_remote(
    Args((x,)): Args<(i64,)>,
    Dep(math): Dep<WebSocketRpcClient>,
) -> Result<i64, WebSocketRpcError> {
    math.call("add", (x, 1), ()).await
}

/// The same from a sync target, blocking its worker thread.
fn add_remote_blocking(
    Args((x,)): Args<(i64,)>,
    Dep(math): Dep<WebSocketRpcClient>,
) -> Result<i64, WebSocketRpcError> {
    math.call_blocking("add", (), json!({"a": x, "b": 2}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_a_dependency_of_other_routes() {
    let gate = Gate::default();
    let (math, address) = start(4, &gate).await;
    let routes = vec![
        Route::new(add_remote).entrypoint(WebSocketEntrypoint::new()),
        Route::new(add_remote_blocking).entrypoint(WebSocketEntrypoint::new()),
    ];
    let caller = Runner::new(routes, ws_config("wscaller", 2))
        .dependency(client(address))
        .spawn()
        .await
        .unwrap();
    let caller_address = caller.websocket_address().unwrap();
    assert_ne!(caller_address, address, "each service has its own server");
    let front = client(caller_address);
    assert_eq!(front.call::<i64>("add_remote", [41], ()).await.unwrap(), 42);
    assert_eq!(front.call::<i64>("add_remote_blocking", [40], ()).await.unwrap(), 42);
    math.stop().await.unwrap();
    let down = front.call::<i64>("add_remote", [1], ()).await.unwrap_err();
    let WebSocketRpcError::Remote(error) = down else {
        panic!("expected a remote error: {down:?}")
    };
    assert_eq!(error.exception, "WebSocketRpcError");
    assert!(error.message.contains("cannot connect to ws://127.0.0.1:"), "{}", error.message);
    caller.stop().await.unwrap();
}

#[tokio::test]
async fn a_graceful_stop_finishes_running_calls_then_closes_with_1001() {
    let gate = Gate::default();
    let (mut service, address) = start(2, &gate).await;
    let mut raw = Raw::connect(address).await;
    raw.send(json!({"command": "hold", "command_args": ["last"]}).to_string()).await;
    let mut idle = Raw::connect(address).await;
    gate.wait_started(1).await;
    service.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(idle.closed().await, Some(CloseCode::Away));
    assert!(TcpStream::connect(address).await.is_err(), "no new connection once stopping");
    gate.open();
    assert_eq!(raw.recv().await, json!({"data": "last", "exception": null}));
    assert_eq!(raw.closed().await, Some(CloseCode::Away));
    service.wait_finished().await.unwrap();
    assert_eq!(service.websocket_address(), None);
}

#[tokio::test]
async fn an_address_in_use_stops_the_start_and_a_failed_start_frees_its_port() {
    let gate = Gate::default();
    let (first, address) = start(1, &gate).await;
    let taken = ws_config("wstaken", 1).with_websocket_port(address.port());
    let routes = vec![Route::new(add).entrypoint(WebSocketEntrypoint::new())];
    let error = Runner::new(routes, taken.clone()).spawn().await.unwrap_err();
    let Error::Listen { source, .. } = &error else { panic!("expected a listen error: {error}") };
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{error:?}");
    let message = format!("{error:?}");
    assert!(
        message.contains(&format!(
            "cannot listen for WebSocket connections on 127.0.0.1:{}",
            address.port()
        )) && message.contains("WEBSOCKET_PORT")
            && message.contains("in use"),
        "{message}"
    );
    // the topology is read without listening
    let routes = vec![Route::new(add).entrypoint(WebSocketEntrypoint::new())];
    Runner::new(routes, taken.clone()).topology().await.unwrap();
    first.stop().await.unwrap();

    // a start that fails after the socket was bound releases it
    let routes = vec![
        Route::new(add).entrypoint(WebSocketEntrypoint::new()),
        Route::new(echo).entrypoint(FailingSetup),
    ];
    assert!(Runner::new(routes, taken.clone()).spawn().await.is_err());
    let routes = vec![Route::new(add).entrypoint(WebSocketEntrypoint::new())];
    let again = Runner::new(routes, taken).spawn().await.unwrap();
    assert_eq!(again.websocket_address(), Some(address));
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    again.stop().await.unwrap();
}

/// An entrypoint whose set-up fails.
struct FailingSetup;

#[micro_framework::async_trait]
impl micro_framework::entrypoints::Entrypoint for FailingSetup {
    fn describe(&self) -> String {
        "FailingSetup".into()
    }

    async fn setup(
        &mut self,
        _route: &micro_framework::RouteHandle,
    ) -> micro_framework::Result<()> {
        Err(Error::Startup("set-up refused".into()))
    }

    async fn run(
        self: Box<Self>,
        _route: micro_framework::RouteHandle,
    ) -> micro_framework::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_while_active_ones_stay() {
    let gate = Gate::default();
    let config = ws_config("wsidle", 2).with_websocket_idle_timeout(Duration::from_secs(1));
    let (service, address) = start_with(config, &gate).await;
    let mut idle = Raw::connect(address).await;
    let mut active = Raw::connect(address).await;
    let mut waiting = Raw::connect(address).await;
    // a call that runs longer than the idle timeout: its client is not idle
    waiting.send(json!({"command": "hold", "command_args": ["long"]}).to_string()).await;
    gate.wait_started(1).await;
    let calls = async {
        for x in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let reply = active.call(json!({"command": "add", "command_kwargs": {"a": x, "b": 1}}));
            assert_eq!(reply.await["data"], json!(x + 1));
        }
    };
    let (code, ()) = tokio::join!(idle.closed(), calls);
    assert_eq!(code, Some(CloseCode::Normal), "an idle connection is closed, with a close frame");
    gate.open();
    assert_eq!(waiting.recv().await["data"], json!("long"));
    // and its connection is still open
    let reply = waiting.call(json!({"command": "add", "command_kwargs": {"a": 1, "b": 1}}));
    assert_eq!(reply.await["data"], json!(2));
    service.stop().await.unwrap();
}

/// A client's idle time counts from its last byte, not its last whole message: one that sends
/// a message in fragments, one every 300 ms over 3 s, against an idle timeout of 1 s, is
/// answered (it was closed as idle). Control frames may come between fragments.
#[tokio::test]
async fn a_client_sending_the_fragments_of_one_message_slowly_is_not_idle() {
    let gate = Gate::default();
    let config = ws_config("wsfragments", 2).with_websocket_idle_timeout(Duration::from_secs(1));
    let (service, address) = start_with(config, &gate).await;
    let fragment = |data: &[u8], opcode, is_final| {
        Message::Frame(Frame::message(data.to_vec(), opcode, is_final))
    };
    let request = json!({"command": "echo", "command_args": ["é".repeat(10)]}).to_string();
    let bytes = request.as_bytes();

    // at once, a ping between the fragments, split inside a two-byte 'é' (text is checked
    // on the whole message)
    let mut quick = Raw::connect(address).await;
    let (first, rest) = bytes.split_at(bytes.len() / 2 + 1);
    quick.0.send(fragment(first, OpCode::Data(Data::Text), false)).await.unwrap();
    quick.0.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    quick.0.send(fragment(rest, OpCode::Data(Data::Continue), true)).await.unwrap();
    assert_eq!(quick.recv().await["data"], json!(["é".repeat(10)]));

    // slowly
    let mut slow = Raw::connect(address).await;
    let chunks: Vec<&[u8]> = bytes.chunks(bytes.len().div_ceil(10)).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        let opcode = match index {
            0 => OpCode::Data(Data::Text),
            _ => OpCode::Data(Data::Continue),
        };
        let sent = slow.0.send(fragment(chunk, opcode, index == chunks.len() - 1)).await;
        assert!(sent.is_ok(), "fragment {index} refused: {sent:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(slow.recv().await["data"], json!(["é".repeat(10)]));
    service.stop().await.unwrap();
}

fn big() -> String {
    "x".repeat(900 * 1024)
}

#[tokio::test]
async fn a_client_that_reads_no_reply_is_dropped_and_holds_up_no_stop() {
    let config = ws_config("wsstuck", 4)
        .with_websocket_idle_timeout(Duration::from_secs(1))
        .with_shutdown_timeout(Duration::from_secs(60));
    let routes = vec![
        Route::new(big).entrypoint(WebSocketEntrypoint::new()),
        Route::new(add).entrypoint(WebSocketEntrypoint::new()),
    ];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.websocket_address().expect("the service listens");
    let mut stuck = Raw::connect(address).await;
    // ask for big replies and read none, until the buffers are full and a send waits
    let frame = json!({"command": "big"}).to_string();
    let asking = async {
        while stuck.0.send(Message::text(frame.clone())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), asking).await;
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    // a stop waits up to SHUTDOWN_TIMEOUT (60 s) for connections: the stuck one is gone
    let stopped = tokio::time::timeout(Duration::from_secs(20), service.stop()).await;
    assert!(stopped.is_ok(), "the stop waited for a client that reads nothing");
    drop(stuck);
}

#[tokio::test]
async fn a_client_that_reads_no_reply_holds_up_no_stop_with_the_default_idle_timeout() {
    // the default WEBSOCKET_IDLE_TIMEOUT (60 s): a send to the stuck client waited all of it,
    // and the stop with it
    let config = ws_config("wsstuckdefault", 4).with_shutdown_timeout(Duration::from_secs(60));
    let routes = vec![
        Route::new(big).entrypoint(WebSocketEntrypoint::new()),
        Route::new(add).entrypoint(WebSocketEntrypoint::new()),
    ];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.websocket_address().expect("the service listens");
    // a tiny receive buffer, so that the replies it does not read fill the buffers soon
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(address).await.unwrap();
    let (mut stuck, _) =
        tokio_tungstenite::client_async(format!("ws://{address}"), stream).await.unwrap();
    let frame = json!({"command": "big"}).to_string();
    let asking = async {
        while stuck.send(Message::text(frame.clone())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), asking).await;
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    let stopped = tokio::time::timeout(Duration::from_secs(10), service.stop()).await;
    assert!(stopped.is_ok(), "the stop waited for a client that reads nothing");
    drop(stuck);
}

/// A client that reads a large reply steadily gets all of it, however long sending it takes:
/// only one that takes no byte of it for WEBSOCKET_IDLE_TIMEOUT is dropped (it was cut once
/// the send had taken that long), as an HTTP client reading a long response is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_a_large_reply_steadily_gets_all_of_it() {
    let config = ws_config("wsslowreader", 2).with_websocket_idle_timeout(Duration::from_secs(1));
    let routes = vec![Route::new(repeat).entrypoint(WebSocketEntrypoint::new())];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.websocket_address().expect("the service listens");
    // a plain socket, read at the pace the test chooses
    let mut socket = common::raw_ws::open(address).await;
    let size: usize = 24 << 20;
    let request = json!({"command": "repeat", "command_args": [size]}).to_string();
    socket.write_all(&common::raw_ws::text_frame(&request)).await.unwrap();
    // about 6 MB a second: the reply takes about 4 s to read, four idle timeouts
    let expected = common::raw_ws::repeat_reply_len(size);
    let mut received: usize = 0;
    let mut buffer = vec![0u8; 64 * 1024];
    let started = std::time::Instant::now();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer)).await {
            Err(_) => break "silent for 5 s",
            Ok(Ok(0)) => break "closed by the server",
            Ok(Err(_)) => break "reset by the server",
            Ok(Ok(read)) => received += read,
        }
        if received >= expected {
            break "whole";
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = started.elapsed();
    service.stop().await.unwrap();
    assert_eq!(ended, "whole", "{received} of {expected} bytes in {elapsed:?}, then {ended}");
    assert!(elapsed > Duration::from_secs(2), "read in {elapsed:?}: too fast to test the timeout");
}

#[tokio::test]
async fn a_silent_socket_on_the_websocket_port_is_closed_after_the_idle_timeout() {
    let gate = Gate::default();
    let config = ws_config("wssilent", 2).with_websocket_idle_timeout(Duration::from_secs(1));
    let (service, address) = start_with(config, &gate).await;
    let mut silent = TcpStream::connect(address).await.unwrap();
    let mut half = TcpStream::connect(address).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nupgrade: websocket\r\n").await.unwrap();
    // within 5 s: the handshake's own limit (10 s) is not what closes them
    for socket in [&mut silent, &mut half] {
        let mut buffer = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "closed without a handshake: {read:?}");
    }
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_plain_http_request_on_the_websocket_port_gets_an_http_error() {
    // a health check or curl on the port got an empty reply ("Empty reply from server")
    let gate = Gate::default();
    let (service, address) = start(2, &gate).await;
    let cases = [
        ("GET /health HTTP/1.1\r\nhost: test\r\n\r\n", "HTTP/1.1 426 Upgrade Required\r\n"),
        (
            "POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 2\r\n\r\n{}",
            "HTTP/1.1 400 Bad Request\r\n",
        ),
        ("hello\r\n\r\n", "HTTP/1.1 400 Bad Request\r\n"),
    ];
    for (request, status) in cases {
        let mut socket = TcpStream::connect(address).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer));
        assert!(matches!(read.await, Ok(Ok(_))), "the connection is closed after the answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(status), "{request:?}: {answer:?}");
        assert!(answer.contains("connection: close\r\n"), "{answer:?}");
        assert!(answer.contains("this port serves WebSocket connections"), "{answer:?}");
    }
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    service.stop().await.unwrap();
}

/// RFC 6455 §4.2.2 and §4.4: a handshake of a version the server does not speak is refused
/// with the versions it speaks (`sec-websocket-version: 13`), so that a client can retry.
#[tokio::test]
async fn a_handshake_of_another_version_is_told_the_version_the_server_speaks() {
    let gate = Gate::default();
    let (service, address) = start(2, &gate).await;
    for version in ["sec-websocket-version: 8\r\n", ""] {
        let mut socket = TcpStream::connect(address).await.unwrap();
        let request = format!(
            "GET / HTTP/1.1\r\nhost: {address}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{version}\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer));
        assert!(matches!(read.await, Ok(Ok(_))), "the connection is closed after the answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{version:?}: {answer:?}");
        assert!(answer.contains("\r\nsec-websocket-version: 13\r\n"), "{version:?}: {answer:?}");
        assert!(answer.contains("\r\nupgrade: websocket\r\n"), "{version:?}: {answer:?}");
    }
    assert_eq!(client(address).call::<i64>("add", (1, 2), ()).await.unwrap(), 3);
    service.stop().await.unwrap();
}

/// The Python micro-framework exports `ws_active_connections`, the WebSocket connections
/// open: dashboards ported from it read the gauge, which rises with each client connected and
/// falls as each leaves.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn ws_active_connections_counts_the_open_websocket_connections() {
    let gate = Gate::default();
    let (service, address) = start(2, &gate).await;
    let open = |service: &RunningService| {
        let rendered = service.metrics().render();
        rendered
            .lines()
            .find_map(|line| line.strip_prefix("ws_active_connections "))
            .map(str::to_owned)
    };
    assert_eq!(open(&service).as_deref(), Some("0"));
    let mut first = Raw::connect(address).await;
    let mut second = Raw::connect(address).await;
    // a reply on each: both handshakes are done and counted
    for raw in [&mut first, &mut second] {
        let reply = raw.call(json!({"command": "echo", "command_args": [1]})).await;
        assert_eq!(reply["data"], json!([1]), "{reply}");
    }
    assert_eq!(open(&service).as_deref(), Some("2"));
    first.0.close(None).await.unwrap();
    second.0.close(None).await.unwrap();
    drop((first, second));
    wait_until(|| open(&service).as_deref() == Some("0"), "the connections to be counted closed")
        .await;
    service.stop().await.unwrap();
}

/// `WEBSOCKET_MAX_CONNECTIONS` connections are open at once, handshakes included: the next
/// handshake is answered `503` with the reason (a connection left waiting unaccepted, as an
/// HTTP one is, could wait for hours behind long-lived clients), the client reads it as
/// `MaxConnectionsReached` and retries when told to, and a connection that closes frees its
/// slot.
#[tokio::test]
async fn websocket_max_connections_are_open_at_once_and_the_next_handshake_is_told_503() {
    let gate = Gate::default();
    let config = ws_config("wsmaxconn", 2).with_websocket_max_connections(2);
    let (service, address) = start_with(config, &gate).await;
    let mut first = Raw::connect(address).await;
    // a socket that has not finished its handshake holds a slot too
    let mut silent = TcpStream::connect(address).await.unwrap();
    assert_eq!(first.call(json!({"command": "add", "command_args": [1, 2]})).await["data"], 3);

    let refused = tokio_tungstenite::connect_async(format!("ws://{address}")).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
        panic!("a third handshake is refused: {refused:?}");
    };
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("WEBSOCKET_MAX_CONNECTIONS"), "{body:?}");
    let error = client(address).call::<i64>("add", (1, 2), ()).await.unwrap_err();
    let WebSocketRpcError::MaxConnectionsReached(message) = &error else {
        panic!("a full server is MaxConnectionsReached to the client: {error:?}");
    };
    assert!(message.contains("503") && message.contains("WEBSOCKET_MAX_CONNECTIONS"), "{message}");
    #[cfg(feature = "metrics")]
    {
        let rendered = service.metrics().render();
        let refusals = r#"requests_refused_total{context="",reason="max_connections",route=""} 2"#;
        assert!(rendered.contains(refusals), "{rendered}");
    }

    // the connections open are served on; a slot freed serves the next
    assert_eq!(first.call(json!({"command": "add", "command_args": [2, 2]})).await["data"], 4);
    let retrying = client(address).retry_when_full(Duration::from_millis(50));
    let retried = tokio::spawn(async move { retrying.call::<i64>("add", (3, 4), ()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    silent.shutdown().await.unwrap();
    drop(silent);
    assert_eq!(retried.await.unwrap().unwrap(), 7);
    first.0.close(None).await.unwrap();
    drop(first);
    service.stop().await.unwrap();
}

/// A handshake's outcome: the connection, or the HTTP status it was refused with.
async fn handshake(address: SocketAddr) -> Result<Raw, u16> {
    let connecting = tokio_tungstenite::connect_async(format!("ws://{address}"));
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok((socket, _))) => Ok(Raw(socket)),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Ok(Err(error)) => panic!("handshake failed: {error}"),
        Err(_) => panic!("no answer to the handshake in 10 s"),
    }
}

/// Whether a handshake is served within `limit`, trying again while it is told `503`.
async fn served_within(address: SocketAddr, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    loop {
        match handshake(address).await {
            Ok(mut served) => {
                let _ = served.0.close(None).await;
                return true;
            }
            Err(503) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(503) => return false,
            Err(status) => panic!("refused with {status}"),
        }
    }
}

/// Each way a connection ends frees its slot of `WEBSOCKET_MAX_CONNECTIONS`: a client served
/// that closes, a reset in the middle of the handshake, a target that panics, the idle
/// timeout, a frame too big. And the first handshake once a slot is free is served, not told
/// `503` by a refusal the accept loop took while every slot was held.
#[tokio::test]
async fn every_way_a_connection_ends_frees_its_slot() {
    let gate = Gate::default();
    let config = ws_config("wsslots", 2)
        .with_websocket_max_connections(1)
        .with_websocket_idle_timeout(Duration::from_millis(500));
    let (service, address) = start_with(config, &gate).await;
    let free = Duration::from_secs(5);
    for round in 0..3 {
        let mut served = handshake(address).await.unwrap();
        let reply = served.call(json!({"command": "add", "command_args": [round, 1]})).await;
        assert_eq!(reply["data"], round + 1);
        assert_eq!(handshake(address).await.err(), Some(503), "round {round}: one slot");
        served.0.close(None).await.unwrap();
        while served.0.next().await.is_some() {}
        drop(served);
        // the slot is free once the server has seen the close
        tokio::time::sleep(Duration::from_millis(300)).await;
        let next = handshake(address).await;
        assert!(next.is_ok(), "round {round}: the freed slot serves the next: {:?}", next.err());
    }

    let mut half = TcpStream::connect(address).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    #[allow(deprecated)] // a linger of 0 is the point: a reset, not a close
    half.set_linger(Some(Duration::ZERO)).unwrap();
    drop(half);
    assert!(served_within(address, free).await, "after a reset mid-handshake");

    let mut panicking = handshake(address).await.unwrap();
    let reply = panicking.call(json!({"command": "panics"})).await;
    assert!(reply["exception"].is_object(), "{reply}");
    drop(panicking);
    assert!(served_within(address, free).await, "after a target's panic");

    let idle = handshake(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(served_within(address, free).await, "after the idle timeout");
    drop(idle);

    let mut too_big = handshake(address).await.unwrap();
    let _ = too_big.0.send(Message::text("x".repeat(2 * MAX_FRAME_SIZE))).await;
    drop(too_big);
    assert!(served_within(address, free).await, "after a frame too big");
    service.stop().await.unwrap();
}

/// Handshakes at once past the cap: exactly the cap is served, every other one told `503`,
/// round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_at_once_past_the_cap_are_served_up_to_it_and_the_rest_told_503() {
    let gate = Gate::default();
    let cap = 8;
    let config = ws_config("wsburst", 2).with_websocket_max_connections(cap);
    let (service, address) = start_with(config, &gate).await;
    for round in 0..3 {
        let tries: Vec<_> = (0..60).map(|_| tokio::spawn(handshake(address))).collect();
        let (mut served, mut refused) = (Vec::new(), 0);
        for outcome in futures::future::join_all(tries).await {
            match outcome.unwrap() {
                Ok(socket) => served.push(socket),
                Err(503) => refused += 1,
                Err(status) => panic!("refused with {status}"),
            }
        }
        assert_eq!((served.len(), refused), (cap, 60 - cap), "round {round}");
        for mut socket in served {
            socket.0.close(None).await.unwrap();
            while socket.0.next().await.is_some() {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    service.stop().await.unwrap();
}

/// Under `retry_when_full`, a server that stays full ends the call with
/// `MaxConnectionsReached` once the client's timeout is reached; without it the `503` is the
/// answer at once. Only a `503` is `MaxConnectionsReached`: another refusal of the handshake
/// (a proxy's `404`) is a connection error, not retried.
#[tokio::test]
async fn retry_when_full_gives_up_at_the_timeout_and_retries_only_a_503() {
    let gate = Gate::default();
    let config = ws_config("wsfull", 2).with_websocket_max_connections(1);
    let (service, address) = start_with(config, &gate).await;
    let _slot = handshake(address).await.unwrap();
    let retrying =
        client(address).timeout(Duration::from_secs(2)).retry_when_full(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let error = retrying.call::<i64>("add", (1, 2), ()).await.unwrap_err();
    assert!(matches!(error, WebSocketRpcError::MaxConnectionsReached(_)), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "retried: {:?}", started.elapsed());
    let error = client(address).call::<i64>("add", (1, 2), ()).await.unwrap_err();
    assert!(matches!(error, WebSocketRpcError::MaxConnectionsReached(_)), "{error:?}");
    service.stop().await.unwrap();

    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = proxy.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = proxy.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let answer =
                    "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let retrying = client(address)
        .timeout(Duration::from_secs(30))
        .retry_when_full(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let error = retrying.call::<i64>("add", (1, 2), ()).await.unwrap_err();
    assert!(matches!(error, WebSocketRpcError::Connection(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "not retried: {:?}", started.elapsed());
}

/// A stop while every slot and every refusal is held by silent clients, and more wait in the
/// backlog, ends once the call running is answered: nothing of the admission holds it.
#[tokio::test]
async fn a_stop_with_every_slot_and_refusal_held_ends_and_answers_the_running_call() {
    let gate = Gate::default();
    let config = ws_config("wsstopfull", 2).with_websocket_max_connections(2);
    let (service, address) = start_with(config, &gate).await;
    let mut calling = handshake(address).await.unwrap();
    calling
        .send(json!({"command": "hold", "command_args": [5], "correlation_id": "held"}).to_string())
        .await;
    gate.wait_started(1).await;
    let mut silent = Vec::new();
    for _ in 0..1 + 64 + 10 {
        silent.push(TcpStream::connect(address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(service.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open();
    let reply = calling.recv().await;
    assert_eq!(reply["data"], 5, "{reply}");
    tokio::time::timeout(Duration::from_secs(30), stopping).await.unwrap().unwrap().unwrap();
    drop(silent);
}
