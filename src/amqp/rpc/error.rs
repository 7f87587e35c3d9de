//! [`RpcError`]: why an RPC call did not return a result.

use std::time::Duration;

use serde_json::Value;

use crate::data::nameko_wire::RemoteException;
use crate::data::ufw_wire::RemoteError;
use crate::transport::TransportError;

/// Why an RPC call did not return a result. Remote errors are only described: nothing in a
/// reply is evaluated.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No queue received the request: no service of that name is running.
    #[error("Unknown service `{0}`")]
    UnknownService(String),
    /// The service has no such method.
    #[error("method not found: {0}")]
    MethodNotFound(String),
    /// The arguments do not fit the method's parameters.
    #[error("incorrect signature: {0}")]
    IncorrectSignature(String),
    /// The service could not read the request.
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    /// The method failed; the error as the service described it.
    #[error("{exc_type} {value}")]
    RemoteError {
        /// The error's type name, e.g. `ValueError`.
        exc_type: String,
        /// The error's message.
        value: String,
        /// The type's path, e.g. `builtins.ValueError`.
        exc_path: String,
        /// The error's arguments.
        exc_args: Vec<Value>,
    },
    /// No reply came in time.
    #[error("no reply from {service}.{method} within {after:?}")]
    Timeout {
        /// The service called.
        service: String,
        /// The method called.
        method: String,
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
    /// The reply could not be read: not JSON, no JSON object, or holding neither a result
    /// nor an error.
    #[error("invalid reply: {0}")]
    InvalidReply(String),
    /// The call cannot be made here (`call_blocking` outside a multi-threaded runtime).
    #[error("cannot call: {0}")]
    Unavailable(String),
    /// The broker could not take the request, or the reply queue was lost.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl RpcError {
    /// A short name of the error's kind, e.g. for metrics labels (`unknown_service`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            RpcError::UnknownService(_) => "unknown_service",
            RpcError::MethodNotFound(_) => "method_not_found",
            RpcError::IncorrectSignature(_) => "incorrect_signature",
            RpcError::MalformedRequest(_) => "malformed_request",
            RpcError::RemoteError { .. } => "remote_error",
            RpcError::Timeout { .. } => "timeout",
            RpcError::InvalidArguments(_) => "invalid_arguments",
            RpcError::UnexpectedResult(_) => "unexpected_result",
            RpcError::InvalidReply(_) => "invalid_reply",
            RpcError::Unavailable(_) => "unavailable",
            RpcError::Transport(_) => "transport",
        }
    }
}

impl From<RemoteException> for RpcError {
    /// The three errors Nameko callers rebuild as such, as Nameko registers them; any other
    /// is a `RemoteError`. An `UnknownService` in a reply is not ours: the service called
    /// exists (it replied), a call of its own found no service, and Nameko callers are told
    /// so with a `RemoteError` too.
    fn from(error: RemoteException) -> Self {
        match error.nameko_type() {
            Some("MethodNotFound") => RpcError::MethodNotFound(error.value),
            Some("IncorrectSignature") => RpcError::IncorrectSignature(error.value),
            Some("MalformedRequest") => RpcError::MalformedRequest(error.value),
            _ => RpcError::RemoteError {
                exc_type: error.exc_type,
                value: error.value,
                exc_path: error.exc_path,
                exc_args: error.exc_args,
            },
        }
    }
}

impl From<RemoteError> for RpcError {
    /// The Python micro-framework's errors: an unknown target is `MethodNotFound`, a request
    /// it could not read `MalformedRequest`; anything else (a `TypeError` for arguments that
    /// do not fit included, as Python raises it) is a `RemoteError` with the module as path.
    fn from(error: RemoteError) -> Self {
        if error.is_framework("RPCTargetDoesNotExist") {
            return RpcError::MethodNotFound(error.message);
        }
        if error.is_framework("RPCMalformedMessage") {
            return RpcError::MalformedRequest(error.message);
        }
        let module = error.module.as_deref().unwrap_or("builtins");
        RpcError::RemoteError {
            exc_path: format!("{module}.{}", error.exception),
            exc_type: error.exception,
            value: error.message,
            exc_args: error.args,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_errors_become_rpc_errors_without_evaluating_anything() {
        let unknown = RemoteError::target_does_not_exist("nope");
        assert!(matches!(RpcError::from(unknown), RpcError::MethodNotFound(_)));
        let malformed = RemoteError::malformed("bad");
        assert!(matches!(RpcError::from(malformed), RpcError::MalformedRequest(_)));
        let builtin = RemoteError::builtin("ValueError", "bad 1");
        let RpcError::RemoteError { exc_type, exc_path, value, .. } = RpcError::from(builtin)
        else {
            panic!("not a remote error")
        };
        assert_eq!(
            (exc_type.as_str(), exc_path.as_str(), value.as_str()),
            ("ValueError", "builtins.ValueError", "bad 1")
        );
        // a class of the caller's own code is described, not looked up
        let custom =
            RemoteError { module: Some("os".into()), ..RemoteError::builtin("system", "rm -rf") };
        let RpcError::RemoteError { exc_path, .. } = RpcError::from(custom) else { panic!() };
        assert_eq!(exc_path, "os.system");
    }
}
