//! WebSocket RPC, wire-compatible with the Python `micro-framework` 2.1.1
//! (`micro_framework.websocket`).
//!
//! - Serving: a route with the [`WebSocketEntrypoint`] is the command `{route name}`, served
//!   on `WEBSOCKET_IP:WEBSOCKET_PORT` (default `0.0.0.0:8765`; port 0 picks a free port,
//!   see [`RunningService::websocket_address`](crate::RunningService::websocket_address)).
//!   Its target takes the arguments through [`Args<T>`](crate::amqp::rpc::Args), exactly as
//!   an RPC target does.
//! - Calling: [`WebSocketRpcClient`], standalone or as a dependency (`Dep<WebSocketRpcClient>`).
//!
//! # Frames
//!
//! One JSON text frame per request (binary frames holding JSON are read too):
//!
//! ```json
//! {"command": "add", "command_args": [1], "command_kwargs": {"b": 2}}
//! ```
//!
//! `command_args` and `command_kwargs` may be left out. One JSON text frame per reply, the
//! result in `data` or the error in `exception` (the Python original's
//! `format_rpc_response`):
//!
//! ```json
//! {"data": 3, "exception": null}
//! {"data": null, "exception": {"exception": "RPCTargetDoesNotExist",
//!   "message": "nope does not exist or is not exposed through a RPC method.",
//!   "args": ["nope does not exist or is not exposed through a RPC method."],
//!   "kwargs": {}, "module": "micro_framework.exceptions"}}
//! ```
//!
//! | case | `exception` | `module` |
//! |---|---|---|
//! | unknown command | `RPCTargetDoesNotExist` | `micro_framework.exceptions` |
//! | frame not JSON, not an object, without a string `command`, args not a list | `RPCMalformedMessage` | `micro_framework.exceptions` |
//! | no free worker (the pool is full, or the service is stopping) | `MaxConnectionsReached` | `micro_framework.exceptions` |
//! | arguments that do not fit the target | `TypeError` | `null` |
//! | the target's error | its Rust type name, e.g. `Error` | its path, e.g. `std.io.error` |
//! | the target panicked | `Panic` | `micro_framework` |
//!
//! The Python original's built-in commands work too: `__list_targets__` lists the commands
//! (`{"target": name, "args": null, "kwargs": null, "docstring": null}`, as a Rust route
//! knows no parameter names) and `__get_target__(name)` describes one (`KeyError` if
//! unknown). A connection stays open after any error.
//!
//! The calls of one connection run concurrently and each reply is sent when its call
//! finishes. The Python original has no request id (its client opens a connection per call);
//! a client that sends several calls on one connection may add an `"id"` (any JSON value) to
//! each request: the reply carries it back.
//!
//! Origins: a handshake whose `Origin` header (which browsers add, naming the site of the page
//! opening the connection) is not in `WEBSOCKET_ALLOWED_ORIGINS` is answered `403` and closed,
//! no command read; one without the header, and any when the key is unset (the Python
//! server's behaviour), is taken.
//!
//! Differences from the Python server, all on bad input: a frame that is JSON but not a
//! request gets an `RPCMalformedMessage` reply (Python's handler raises and drops the
//! connection); `command_args` must be a list (Python unpacks any iterable); a command never
//! resolves to a method of the server (Python tries `getattr(manager, command)` first).
//!
//! Limits: a request frame of at most 1 MiB (the Python server's default; a larger one closes
//! the connection with 1009; replies are not bounded there, and `WebSocketRpcClient` reads
//! them up to 64 MiB, [`MAX_REPLY_SIZE`]), at most 32 calls running per connection, a call
//! only when a worker of the route's pool is free at once, at most `WEBSOCKET_MAX_CONNECTIONS`
//! connections open at once (default 1024; the next handshake is answered `503 Service
//! Unavailable`, which the client returns as `MaxConnectionsReached`). A client that sends no byte (pings
//! and fragments count) for `WEBSOCKET_IDLE_TIMEOUT` (default 60 s) while none of its calls
//! runs is closed with 1000 ("idle timeout"), and one that takes no byte of a reply for as
//! long is dropped; the handshake must be done within 10 s, or that timeout if shorter. On
//! shutdown the server stops accepting connections and reading frames, lets running calls
//! finish (up to `SHUTDOWN_TIMEOUT`) and reply, then closes each connection with 1001. Every frame read is started or refused at once, so
//! nothing received waits unstarted: `thread` and `greedy_thread` stop alike.
//!
//! ```
//! use micro_framework::prelude::*;
//! use micro_framework::amqp::rpc::Args;
//! use micro_framework::websocket::{WebSocketEntrypoint, WebSocketRpcClient};
//! use serde_json::json;
//!
//! #[derive(serde::Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! fn add(Args(Add { a, b }): Args<Add>) -> i64 { a + b }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::new("math")
//!     .with_amqp_uri("memory://".into())
//!     .with_websocket_ip("127.0.0.1".into())
//!     .with_websocket_port(0);
//! let routes = vec![Route::new(add).entrypoint(WebSocketEntrypoint::new())];
//! let service = Runner::new(routes, config).spawn().await?;
//!
//! let address = service.websocket_address().expect("listening");
//! let client = WebSocketRpcClient::new(address.ip().to_string(), address.port());
//! let sum: i64 = client.call("add", json!([1]), json!({"b": 2})).await?;
//! assert_eq!(sum, 3);
//! service.stop().await?;
//! # Ok(()) }
//! ```

mod admission;
mod client;
mod connection;
mod dispatch;
mod entrypoint;
mod error;
#[cfg(test)]
mod fuzz;
mod handshake;
mod origin;
mod registry;
mod server;
mod traffic;

use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use crate::data::ufw_wire::RemoteError;
pub use client::{WebSocketRpcClient, DEFAULT_TIMEOUT};
pub use entrypoint::WebSocketEntrypoint;
pub use error::WebSocketRpcError;

pub(crate) use admission::REFUSING;
pub(crate) use dispatch::command_message;
pub(crate) use server::WebSocketServer;

/// The largest frame (and message) read, in bytes: 1 MiB, the Python server's default.
pub const MAX_FRAME_SIZE: usize = 1 << 20;
/// The most calls one connection may have running; more are refused.
pub const MAX_CALLS_PER_CONNECTION: usize = 32;
/// How long a new connection has at most to complete its WebSocket handshake (less when
/// `WEBSOCKET_IDLE_TIMEOUT` is shorter).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The read buffer of a connection (tungstenite's default, 128 KiB, is allocated up front).
const READ_BUFFER: usize = 16 * 1024;

/// The largest reply (frame and message) [`WebSocketRpcClient`] reads, in bytes: 64 MiB. Servers,
/// the Python one included, send results of any size, and the Python client reads them: only
/// the requests a server reads are bounded by [`MAX_FRAME_SIZE`]. This bound keeps a server
/// from growing a client's memory without end.
pub const MAX_REPLY_SIZE: usize = 64 << 20;

/// The frame limits of a server's connections.
fn frame_limits() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_FRAME_SIZE))
        .max_frame_size(Some(MAX_FRAME_SIZE))
}

/// The frame limits of a client's connections: replies up to [`MAX_REPLY_SIZE`].
fn client_limits() -> WebSocketConfig {
    frame_limits().max_message_size(Some(MAX_REPLY_SIZE)).max_frame_size(Some(MAX_REPLY_SIZE))
}
