//! The JSON frames of micro-framework's WebSocket RPC (its `RPCManager` format): requests
//! `{"command", "command_args", "command_kwargs"}`, replies `{"data", "exception"}`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::amqp::rpc::RemoteException;
use crate::data::{Failure, FailureKind};

/// Where the Python original's own exceptions live; its clients rebuild the ones found there.
const FRAMEWORK_EXCEPTIONS: &str = "micro_framework.exceptions";
/// How much of an unreadable frame an error message quotes.
const EXCERPT: usize = 200;

/// An error as it travels in a reply frame (`format_rpc_response`'s `exception`). It is only
/// data: nothing in it is ever evaluated.
///
/// ```
/// use micro_framework::websocket::RemoteError;
/// let error: RemoteError = serde_json::from_str(
///     r#"{"exception": "ValueError", "message": "bad 1", "args": ["bad 1"], "kwargs": {}, "module": null}"#,
/// ).unwrap();
/// assert_eq!(error.to_string(), "ValueError: bad 1");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{exception}: {message}")]
pub struct RemoteError {
    /// The error's type name, e.g. `ValueError`, `RPCTargetDoesNotExist`.
    pub exception: String,
    /// The error's message (`str(exc)`).
    #[serde(default)]
    pub message: String,
    /// The error's arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// The error's keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// The module of the error's type (`None` for Python built-ins).
    #[serde(default)]
    pub module: Option<String>,
}

impl RemoteError {
    /// One of the Python original's exceptions (`RPCTargetDoesNotExist`, ...).
    pub(crate) fn framework(exception: &str, message: impl Into<String>) -> Self {
        RemoteError::new(exception, message.into(), Some(FRAMEWORK_EXCEPTIONS.to_owned()))
    }

    /// A Python built-in exception (`TypeError`, `KeyError`): Python clients rebuild it.
    pub(crate) fn builtin(exception: &str, message: impl Into<String>) -> Self {
        RemoteError::new(exception, message.into(), None)
    }

    fn new(exception: &str, message: String, module: Option<String>) -> Self {
        RemoteError {
            exception: exception.to_owned(),
            args: vec![Value::String(message.clone())],
            message,
            kwargs: Map::new(),
            module,
        }
    }

    /// True for the given exception of the Python original's.
    pub(crate) fn is_framework(&self, exception: &str) -> bool {
        self.exception == exception && self.module.as_deref() == Some(FRAMEWORK_EXCEPTIONS)
    }

    /// How a call's failure is replied: arguments that do not fit are a `TypeError` (as
    /// Python raises for a bad call), other errors are named after their Rust type (module:
    /// its path with `.` separators), a panic is `Panic`.
    pub(crate) fn from_failure(failure: &Failure) -> Self {
        let remote = RemoteException::from_failure(failure);
        if failure.kind == FailureKind::BadInput || remote.nameko_type().is_some() {
            // bad arguments, or a result serde cannot serialize (Python's json: TypeError)
            return RemoteError::builtin("TypeError", remote.value);
        }
        let module = remote.exc_path.rsplit_once('.').map(|(module, _)| module.to_owned());
        RemoteError {
            exception: remote.exc_type,
            message: remote.value,
            args: remote.exc_args,
            kwargs: Map::new(),
            module,
        }
    }
}

/// A call request, as read from a frame.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Request {
    /// Echoed in the reply when given (an extension: the Python original has no id).
    pub id: Option<Value>,
    pub command: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
}

/// A frame that is not a request, with the id to reply to if it had one.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Malformed {
    pub id: Option<Value>,
    pub error: RemoteError,
}

impl Request {
    /// Read a request frame (text or binary, JSON either way).
    pub(crate) fn parse(frame: &[u8]) -> Result<Request, Box<Malformed>> {
        let malformed = |id: Option<Value>, reason: String| {
            Box::new(Malformed {
                id,
                error: RemoteError::framework(
                    "RPCMalformedMessage",
                    format!("malformed message ({reason}): {}", excerpt(frame)),
                ),
            })
        };
        let value: Value = serde_json::from_slice(frame)
            .map_err(|error| malformed(None, format!("not JSON: {error}")))?;
        let Value::Object(mut object) = value else {
            return Err(malformed(None, "not a JSON object".into()));
        };
        let id = object.remove("id");
        let command = match object.remove("command") {
            Some(Value::String(command)) => command,
            Some(_) => return Err(malformed(id, "`command` is not a string".into())),
            None => return Err(malformed(id, "no `command`".into())),
        };
        let args = match object.remove("command_args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(args)) => args,
            Some(_) => return Err(malformed(id, "`command_args` is not a list".into())),
        };
        let kwargs = match object.remove("command_kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(kwargs)) => kwargs,
            Some(_) => return Err(malformed(id, "`command_kwargs` is not an object".into())),
        };
        Ok(Request { id, command, args, kwargs })
    }
}

/// The start of `frame`, for error messages.
fn excerpt(frame: &[u8]) -> String {
    let text = String::from_utf8_lossy(frame);
    match text.char_indices().nth(EXCERPT) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.into_owned(),
    }
}

/// A request frame: `{"command": ..., "command_args": [...], "command_kwargs": {...}}`.
pub(crate) fn request_frame(command: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> String {
    json!({ "command": command, "command_args": args, "command_kwargs": kwargs }).to_string()
}

/// A reply frame: `{"data": ..., "exception": null | {...}}`, plus `"id"` when the request
/// had one.
pub(crate) fn reply_frame(id: Option<&Value>, outcome: &Result<Value, RemoteError>) -> String {
    let mut reply = match outcome {
        Ok(data) => json!({ "data": data, "exception": null }),
        Err(error) => json!({ "data": null, "exception": error }),
    };
    if let (Some(id), Some(reply)) = (id, reply.as_object_mut()) {
        reply.insert("id".into(), id.clone());
    }
    reply.to_string()
}

/// The outcome a reply frame carries.
pub(crate) fn parse_reply(frame: &[u8]) -> Result<Result<Value, RemoteError>, String> {
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        data: Value,
        #[serde(default)]
        exception: Option<RemoteError>,
    }
    let reply: Reply = serde_json::from_slice(frame)
        .map_err(|error| format!("unreadable reply ({error}): {}", excerpt(frame)))?;
    Ok(match reply.exception {
        Some(error) => Err(error),
        None => Ok(reply.data),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::BoxError;

    #[test]
    fn requests_take_python_frames_and_ids() {
        let frame = br#"{"command": "add", "command_args": [1], "command_kwargs": {"b": 2}}"#;
        let request = Request::parse(frame).unwrap();
        assert_eq!(request.command, "add");
        assert_eq!(request.args, vec![json!(1)]);
        assert_eq!(request.kwargs["b"], json!(2));
        assert_eq!(request.id, None);
        let bare = Request::parse(br#"{"command": "list", "id": 7}"#).unwrap();
        assert_eq!((bare.args.len(), bare.kwargs.len(), bare.id), (0, 0, Some(json!(7))));
    }

    #[test]
    fn malformed_frames_say_why() {
        let reason = |frame: &[u8]| Request::parse(frame).unwrap_err().error.message;
        assert!(reason(b"{oops").contains("not JSON"));
        assert!(reason(b"[1]").contains("not a JSON object"));
        assert!(reason(br#"{"cmd": 1}"#).contains("no `command`"));
        assert!(reason(br#"{"command": 1}"#).contains("not a string"));
        assert!(reason(br#"{"command": "a", "command_args": "ab"}"#).contains("not a list"));
        assert!(reason(br#"{"command": "a", "command_kwargs": []}"#).contains("not an object"));
        let long = reason(&[b'x'; 1000]);
        assert!(long.len() < 400 && long.ends_with("..."));
        let malformed = Request::parse(br#"{"id": "a"}"#).unwrap_err();
        assert_eq!(malformed.id, Some(json!("a")));
        assert!(malformed.error.is_framework("RPCMalformedMessage"));
    }

    #[test]
    fn replies_match_format_rpc_response() {
        let ok: Value = serde_json::from_str(&reply_frame(None, &Ok(json!(3)))).unwrap();
        assert_eq!(ok, json!({"data": 3, "exception": null}));
        let error = RemoteError::framework("RPCTargetDoesNotExist", "nope");
        let failed: Value =
            serde_json::from_str(&reply_frame(Some(&json!(1)), &Err(error.clone()))).unwrap();
        assert_eq!(
            failed,
            json!({"data": null, "id": 1, "exception": {
                "exception": "RPCTargetDoesNotExist", "message": "nope", "args": ["nope"],
                "kwargs": {}, "module": "micro_framework.exceptions"}})
        );
        assert_eq!(parse_reply(failed.to_string().as_bytes()).unwrap(), Err(error));
        assert_eq!(parse_reply(b"{\"data\": [1]}").unwrap(), Ok(json!([1])));
        assert!(parse_reply(b"nope").is_err());
    }

    #[test]
    fn failures_become_python_like_exceptions() {
        let bad = RemoteError::from_failure(&Failure::bad_input("add(): missing field `b`"));
        assert_eq!((bad.exception.as_str(), bad.module), ("TypeError", None));
        let error: BoxError = Box::new(std::io::Error::other("disk full"));
        let failure = Failure::from_error(&error, "std::io::error::Error");
        let remote = RemoteError::from_failure(&failure);
        assert_eq!(remote.exception, "Error");
        assert_eq!(remote.module.as_deref(), Some("std.io.error"));
        assert_eq!(remote.args, vec![json!("disk full")]);
        let panic = Failure::new(FailureKind::Panic, "target panicked: boom");
        assert_eq!(RemoteError::from_failure(&panic).exception, "Panic");
    }
}
