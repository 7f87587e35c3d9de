//! [`WebSocketRpcClient`]: call the commands of a WebSocket RPC server (the Python original's
//! `WebSocketRPCClient`), standalone or as a dependency.

use std::time::Duration;

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::clock::deadline_after;
use crate::data::nameko_wire::call_arguments;
use crate::data::ufw_wire::{parse_reply, request_frame, RemoteError};
use crate::data::BoxError;
use crate::handler::dependencies::Dependency;
use crate::handler::WorkerContext;
use crate::websocket::client_limits;
use crate::websocket::error::WebSocketRpcError;

/// How long a call waits for its reply unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls the commands of a WebSocket RPC server at `ws://{address}:{port}`, a Rust
/// [`WebSocketEntrypoint`](crate::websocket::WebSocketEntrypoint) service or a Python one.
/// Like the Python original, each call opens its own connection, sends one request and
/// reads one reply. Calls wait [`DEFAULT_TIMEOUT`] unless told otherwise.
///
/// Standalone, from any async code:
///
/// ```no_run
/// use micro_framework::websocket::WebSocketRpcClient;
/// use serde_json::json;
///
/// # async fn run() -> Result<(), micro_framework::websocket::WebSocketRpcError> {
/// let client = WebSocketRpcClient::new("127.0.0.1", 8765);
/// let sum: i64 = client.call("add", json!([1]), json!({"b": 2})).await?;
/// # Ok(()) }
/// ```
///
/// As a dependency (`Dep<WebSocketRpcClient>`), inside a target:
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::websocket::{WebSocketRpcClient, WebSocketRpcError};
///
/// async fn total(Dep(math): Dep<WebSocketRpcClient>) -> Result<i64, WebSocketRpcError> {
///     math.call("add", (1, 2), ()).await
/// }
///
/// let route = Route::new(total).dependency(WebSocketRpcClient::new("math.internal", 8765));
/// ```
#[derive(Clone, Debug)]
pub struct WebSocketRpcClient {
    url: String,
    timeout: Duration,
    retry_interval: Option<Duration>,
}

impl WebSocketRpcClient {
    /// A client of the server at `ws://{address}:{port}` (an IPv6 address is bracketed).
    pub fn new(address: impl AsRef<str>, port: u16) -> Self {
        let address = address.as_ref();
        let host = match address.contains(':') && !address.starts_with('[') {
            true => format!("[{address}]"),
            false => address.to_owned(),
        };
        WebSocketRpcClient::from_url(format!("ws://{host}:{port}"))
    }

    /// A client of the server at `url` (`ws://host:port`).
    pub fn from_url(url: impl Into<String>) -> Self {
        WebSocketRpcClient { url: url.into(), timeout: DEFAULT_TIMEOUT, retry_interval: None }
    }

    /// The server's URL.
    pub fn server(&self) -> &str {
        &self.url
    }

    /// Wait `timeout` for each call's reply (connecting included).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When the server has no free worker (`MaxConnectionsReached`), or refuses the
    /// connection because it holds `WEBSOCKET_MAX_CONNECTIONS` already (`503`, returned as
    /// `MaxConnectionsReached` too), try again every `interval` until the timeout, on a new
    /// connection each time, as the Python client does (every 0.5 s; useful behind a load
    /// balancer). By default the refusal is returned.
    pub fn retry_when_full(mut self, interval: Duration) -> Self {
        self.retry_interval = Some(interval);
        self
    }

    /// Call `command(*args, **kwargs)` and deserialize the result into `T` (use
    /// `serde_json::Value` to take anything). `args` must serialize to a JSON array (a tuple,
    /// `Vec`, `json!([...])`) and `kwargs` to an object; `()` stands for none.
    pub async fn call<T: DeserializeOwned>(
        &self,
        command: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, WebSocketRpcError> {
        let (args, kwargs) =
            call_arguments(args, kwargs).map_err(WebSocketRpcError::InvalidArguments)?;
        let frame = request_frame(command, args, kwargs);
        let deadline = deadline_after(self.timeout);
        loop {
            let outcome =
                tokio::time::timeout_at(deadline, self.exchange(&frame)).await.map_err(|_| {
                    WebSocketRpcError::Timeout {
                        command: command.to_owned(),
                        url: self.url.clone(),
                        after: self.timeout,
                    }
                })?;
            let error = match outcome {
                Ok(Ok(data)) => {
                    return serde_json::from_value(data)
                        .map_err(|error| WebSocketRpcError::UnexpectedResult(error.to_string()))
                }
                Ok(Err(remote)) => WebSocketRpcError::from(remote),
                Err(error) => error,
            };
            match (error, self.retry_interval) {
                (WebSocketRpcError::MaxConnectionsReached(why), Some(interval))
                    if deadline_after(interval) < deadline =>
                {
                    tracing::debug!("{} cannot take {command} now ({why}): trying again", self.url);
                    tokio::time::sleep(interval).await;
                }
                (error, _) => return Err(error),
            }
        }
    }

    /// [`WebSocketRpcClient::call`] for sync targets (which run on worker threads). Fails
    /// with `Unavailable` outside a tokio runtime, and on a current-thread runtime outside a
    /// sync target (its one thread would wait for itself).
    pub fn call_blocking<T: DeserializeOwned>(
        &self,
        command: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, WebSocketRpcError> {
        crate::handler::blocking::block_on("call_blocking", self.call(command, args, kwargs))
            .map_err(WebSocketRpcError::Unavailable)?
    }

    /// Send `frame` on a new connection and read the reply.
    async fn exchange(&self, frame: &str) -> Result<Result<Value, RemoteError>, WebSocketRpcError> {
        let lost = |error: String| {
            WebSocketRpcError::Connection(format!("connection to {} lost: {error}", self.url))
        };
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(&self.url, Some(client_limits()), true)
                .await
                .map_err(|error| self.not_connected(error))?;
        socket.send(Message::text(frame)).await.map_err(|error| lost(error.to_string()))?;
        let reply = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => break parse_reply(text.as_bytes()),
                Some(Ok(Message::Binary(bytes))) => break parse_reply(&bytes),
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|frame| format!(" ({} {})", frame.code, frame.reason));
                    return Err(lost(format!("closed before replying{}", why.unwrap_or_default())));
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(lost(error.to_string())),
                None => return Err(lost("closed before replying".into())),
            }
        };
        if let Err(error) = socket.close(None).await {
            tracing::debug!("cannot close the connection to {}: {error}", self.url);
        }
        reply.map_err(WebSocketRpcError::InvalidReply)
    }
}

impl WebSocketRpcClient {
    /// Why the connection could not be made: a server with every connection slot taken
    /// answers its handshake `503`, which means what `MaxConnectionsReached` means (come back
    /// later, or try elsewhere).
    fn not_connected(&self, error: WsError) -> WebSocketRpcError {
        match error {
            WsError::Http(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                let body = response.body().as_deref().map(String::from_utf8_lossy);
                let why = body.as_deref().map_or("", str::trim);
                WebSocketRpcError::MaxConnectionsReached(format!(
                    "{} refused the connection (503 Service Unavailable): {why}",
                    self.url
                ))
            }
            error => {
                WebSocketRpcError::Connection(format!("cannot connect to {}: {error}", self.url))
            }
        }
    }
}

/// A target takes the client as `Dep<WebSocketRpcClient>`.
#[async_trait]
impl Dependency for WebSocketRpcClient {
    type Output = WebSocketRpcClient;

    async fn get(&self, _call: &WorkerContext) -> Result<WebSocketRpcClient, BoxError> {
        Ok(self.clone())
    }
}
