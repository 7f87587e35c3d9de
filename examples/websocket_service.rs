//! A WebSocket RPC service: `cargo run --example websocket_service`.
//!
//! Service `ws_math` (unless `SERVICE_NAME` says otherwise) serves two commands on
//! `WEBSOCKET_IP:WEBSOCKET_PORT` (default `0.0.0.0:8765`), in the Python micro-framework's
//! frames (`{"command", "command_args", "command_kwargs"}` → `{"data", "exception"}`):
//!
//! - `add(a, b)` returns `a + b`, for integers;
//! - `greet(name, greeting="Hello")` returns a greeting.
//!
//! With `AMQP_URI` unset it runs on the in-process broker (`memory://`; WebSocket calls need no
//! broker anyway). A `WebSocketRpcClient` then makes a few calls and prints what comes back,
//! and the service stops by itself; with `--serve` it keeps serving until Ctrl-C, e.g. for
//! `websocat ws://127.0.0.1:8765` and `{"command": "add", "command_args": [1, 2]}`.

use std::time::Duration;

use micro_framework::amqp::rpc::Args;
use micro_framework::prelude::*;
use micro_framework::websocket::{WebSocketEntrypoint, WebSocketRpcClient, WebSocketRpcError};
use serde::Deserialize;
use serde_json::{json, Value};

/// The arguments of `add`.
#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

/// `a + b` did not fit in 64 bits.
#[derive(Debug, thiserror::Error)]
#[error("{0} + {1} overflows")]
struct Overflow(i64, i64);

/// Adds two integers.
fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> Result<i64, Overflow> {
    a.checked_add(b).ok_or(Overflow(a, b))
}

/// The arguments of `greet`.
#[derive(Deserialize)]
struct GreetArgs {
    name: String,
    #[serde(default)]
    greeting: Option<String>,
}

/// Greets `name`.
async fn greet(Args(GreetArgs { name, greeting }): Args<GreetArgs>) -> String {
    format!("{}, {name}!", greeting.as_deref().unwrap_or("Hello"))
}

#[tokio::main]
async fn main() -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("AMQP_URI").is_err() {
        eprintln!("AMQP_URI is not set: using the in-process broker (memory://)");
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    if std::env::var("SERVICE_NAME").is_err() {
        vars.push(("SERVICE_NAME".into(), "ws_math".into()));
    }
    let config = Config::from_vars(vars)?;
    micro_framework::logging::init(config.log_format);
    let routes = vec![
        Route::new(add).entrypoint(WebSocketEntrypoint::new()),
        Route::new(greet).entrypoint(WebSocketEntrypoint::new()),
    ];
    let service = Runner::new(routes, config).spawn().await?;
    let address = service
        .websocket_address()
        .ok_or_else(|| micro_framework::Error::Startup("no WebSocket server".into()))?;
    eprintln!("serving ws://{address}");

    if std::env::args().any(|arg| arg == "--serve") {
        eprintln!("press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    } else {
        tokio::select! {
            _ = demo_calls(address.port()) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    service.stop().await?;
    eprintln!("websocket_service stopped");
    Ok(())
}

/// Calls the service as any client would, and prints the replies.
async fn demo_calls(port: u16) {
    let client = WebSocketRpcClient::new("127.0.0.1", port).timeout(Duration::from_secs(5));
    let sum = client.call::<i64>("add", [2], json!({"b": 40})).await;
    println!("add(2, b=40) -> {}", show(sum));
    let greeting = client.call::<String>("greet", ["Ada"], json!({"greeting": "Hi"})).await;
    println!("greet('Ada', greeting='Hi') -> {}", show(greeting));
    let overflow = client.call::<i64>("add", (i64::MAX, 1), ()).await;
    println!("add({}, 1) -> {}", i64::MAX, show(overflow));
    let unknown = client.call::<Value>("mul", (2, 3), ()).await;
    println!("mul(2, 3) -> {}", show(unknown));
    let missing = client.call::<i64>("add", [1], ()).await;
    println!("add(1) -> {}", show(missing));
}

fn show<T: std::fmt::Debug>(reply: Result<T, WebSocketRpcError>) -> String {
    match reply {
        Ok(result) => format!("{result:?}"),
        Err(error) => format!("error: {error}"),
    }
}
