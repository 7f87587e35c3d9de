//! [`WebSocketRpcError`]: why a WebSocket RPC call did not return a result.

use std::time::Duration;

use crate::data::ufw_wire::RemoteError;

/// Why a [`WebSocketRpcClient`](crate::websocket::WebSocketRpcClient) call did not return a
/// result. The Python original's own errors have their variants; any other remote error is
/// [`Remote`](WebSocketRpcError::Remote), only described, never evaluated.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WebSocketRpcError {
    /// The server has no such command (`RPCTargetDoesNotExist`).
    #[error("{0}")]
    TargetDoesNotExist(String),
    /// The server could not read the request (`RPCMalformedMessage`).
    #[error("{0}")]
    MalformedMessage(String),
    /// No worker was free to take the call (`MaxConnectionsReached`), or the server refused
    /// the connection, holding `WEBSOCKET_MAX_CONNECTIONS` already (`503`): try again later
    /// or elsewhere.
    #[error("{0}")]
    MaxConnectionsReached(String),
    /// The command failed; the error as the server described it (arguments that do not fit
    /// are a `TypeError`).
    #[error(transparent)]
    Remote(RemoteError),
    /// The server could not be reached, or the connection broke before the reply.
    #[error("{0}")]
    Connection(String),
    /// No reply came in time.
    #[error("no reply to {command} from {url} within {after:?}")]
    Timeout {
        /// The command called.
        command: String,
        /// The server called.
        url: String,
        /// How long the call waited.
        after: Duration,
    },
    /// The arguments could not be sent: `args` must serialize to a JSON array, `kwargs` to an
    /// object.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The result does not fit the type asked for.
    #[error("unexpected result: {0}")]
    UnexpectedResult(String),
    /// The reply could not be read.
    #[error("invalid reply: {0}")]
    InvalidReply(String),
    /// The call cannot be made here (`call_blocking` outside a multi-threaded runtime).
    #[error("cannot call: {0}")]
    Unavailable(String),
}

impl From<RemoteError> for WebSocketRpcError {
    fn from(error: RemoteError) -> Self {
        if error.is_framework("RPCTargetDoesNotExist") {
            WebSocketRpcError::TargetDoesNotExist(error.message)
        } else if error.is_framework("RPCMalformedMessage") {
            WebSocketRpcError::MalformedMessage(error.message)
        } else if error.is_framework("MaxConnectionsReached") {
            WebSocketRpcError::MaxConnectionsReached(error.message)
        } else {
            WebSocketRpcError::Remote(error)
        }
    }
}
