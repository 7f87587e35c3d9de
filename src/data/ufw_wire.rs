//! The Python micro-framework's RPC format (its `RPCManager`), shared by its AMQP and WebSocket
//! RPC: requests `{"command", "command_args", "command_kwargs"}`, replies `{"data",
//! "exception"}`. Over AMQP the reply is JSON-encoded twice (a JSON string holding the reply).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::data::nameko_wire::{self, RemoteException};
use crate::data::{DecodeError, Failure, FailureKind};

/// Where the Python original's own exceptions live; its clients rebuild the ones found there.
const FRAMEWORK_EXCEPTIONS: &str = "micro_framework.exceptions";
/// How much of an unreadable frame an error message quotes.
const EXCERPT: usize = 200;
/// The built-in command listing every target.
pub(crate) const LIST_TARGETS: &str = "__list_targets__";
/// The built-in command describing one target.
pub(crate) const GET_TARGET: &str = "__get_target__";

/// True for the Python original's built-in commands, which its AMQP callers send to
/// `{service}._broadcast.{command}`.
pub(crate) fn is_builtin_command(command: &str) -> bool {
    command == LIST_TARGETS || command == GET_TARGET
}

/// A target as `__list_targets__` and `__get_target__` describe it. The Python original also
/// lists parameter names and the docstring, which a Rust route does not know: `null`.
pub(crate) fn target_detail(target: &str) -> Value {
    json!({ "target": target, "args": null, "kwargs": null, "docstring": null })
}

/// The answer to a built-in command, given `detail`, the detail of a served target by name,
/// and `targets`, every served target; `None` for any other command.
pub(crate) fn answer_builtin(
    request: &Request,
    detail: impl Fn(&str) -> Option<Value>,
    targets: impl FnOnce() -> Vec<Value>,
) -> Option<Result<Value, RemoteError>> {
    match request.command.as_str() {
        LIST_TARGETS => Some(Ok(Value::Array(targets()))),
        GET_TARGET => Some(get_target(request, detail)),
        _ => None,
    }
}

/// `__get_target__(target)`: a target's detail. As the Python original looks the target up in
/// a dict: an unknown one (a name, or any other key) is a `KeyError`, a list or an object a
/// `TypeError` (unhashable), no target at all a `TypeError` (missing argument).
fn get_target(
    request: &Request,
    detail: impl Fn(&str) -> Option<Value>,
) -> Result<Value, RemoteError> {
    let Some(target) = request.args.first().or_else(|| request.kwargs.get("target")) else {
        return Err(RemoteError::builtin(
            "TypeError",
            format!("{GET_TARGET}() missing 1 required positional argument: 'target'"),
        ));
    };
    // what Python's str(KeyError(target)) says: the key's repr
    let key = match target {
        Value::String(name) => match detail(name) {
            Some(found) => return Ok(found),
            None => format!("'{name}'"),
        },
        Value::Array(_) => return Err(unhashable("list")),
        Value::Object(_) => return Err(unhashable("dict")),
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(number) => number.to_string(),
    };
    Err(RemoteError { args: vec![target.clone()], ..RemoteError::builtin("KeyError", key) })
}

/// Python's error for a `kind` (`list`, `dict`) used as a dict key.
fn unhashable(kind: &str) -> RemoteError {
    RemoteError::builtin("TypeError", format!("unhashable type: '{kind}'"))
}

/// An error as it travels in a reply frame (`format_rpc_response`'s `exception`). It is only
/// data: nothing in it is ever evaluated.
///
/// ```
/// use micro_framework::amqp::rpc::RemoteError;
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

    /// The reply to a request that cannot be read.
    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        RemoteError::framework("RPCMalformedMessage", reason)
    }

    /// The reply to a command that names no target.
    pub(crate) fn target_does_not_exist(command: &str) -> Self {
        RemoteError::framework(
            "RPCTargetDoesNotExist",
            format!("{command} does not exist or is not exposed through a RPC method."),
        )
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
    /// Read a request (a frame, text or binary, or an AMQP body; JSON either way, or a JSON
    /// string holding it).
    pub(crate) fn parse(frame: &[u8]) -> Result<Request, Box<Malformed>> {
        let malformed = |id: Option<Value>, reason: String| {
            Box::new(Malformed {
                id,
                error: RemoteError::malformed(format!(
                    "malformed message ({reason}): {}",
                    excerpt(frame)
                )),
            })
        };
        let mut value: Value = serde_json::from_slice(frame)
            .map_err(|error| malformed(None, DecodeError::of_json(frame, &error).to_string()))?;
        if let Value::String(inner) = &value {
            // the Python original's server also takes a request JSON-encoded twice
            value = serde_json::from_str(inner).map_err(|error| {
                let why = DecodeError::of_json(inner.as_bytes(), &error);
                malformed(None, format!("a JSON string whose {why}"))
            })?;
        }
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

impl Request {
    /// The message a route handles for this request: its arguments as an RPC payload
    /// `{"args": [...], "kwargs": {...}}` (what `amqp::rpc::Args` reads), with
    /// `properties`, and the command as routing key.
    pub(crate) fn into_message(self, properties: crate::data::Properties) -> crate::data::Message {
        crate::data::Message {
            body: crate::data::nameko_wire::request_body(self.args, self.kwargs),
            properties,
            routing_key: self.command,
            ..crate::data::Message::default()
        }
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

/// The body of a request sent over AMQP: the request frame.
pub(crate) fn request_body(command: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> Bytes {
    Bytes::from(request_frame(command, args, kwargs))
}

/// The body of a reply sent over AMQP: the reply frame JSON-encoded again, as the Python
/// original's server sends it and its callers read it.
pub(crate) fn reply_body(outcome: &Result<Value, RemoteError>) -> Bytes {
    Bytes::from(Value::String(reply_frame(None, outcome)).to_string())
}

/// The outcome a reply carries: a reply frame, or a JSON string holding one (AMQP).
pub(crate) fn parse_reply(frame: &[u8]) -> Result<Result<Value, RemoteError>, String> {
    if let Ok(Value::String(inner)) = serde_json::from_slice::<Value>(frame) {
        return parse_frame(inner.as_bytes());
    }
    parse_frame(frame)
}

/// One reply frame, read as the Python original's client reads it (an `exception` that is
/// truthy is raised, else `data` is returned), except that a frame holding neither, or no
/// JSON object, is unreadable: the original always writes both, so it is some other message.
fn parse_frame(frame: &[u8]) -> Result<Result<Value, RemoteError>, String> {
    let unreadable = |reason: String| format!("unreadable reply ({reason}): {}", excerpt(frame));
    let reply: Value = serde_json::from_slice(frame)
        .map_err(|error| unreadable(DecodeError::of_json(frame, &error).to_string()))?;
    let Value::Object(mut reply) = reply else {
        return Err(unreadable("not a JSON object".into()));
    };
    match reply.remove("exception") {
        Some(error) if nameko_wire::truthy(&error) => serde_json::from_value(error)
            .map(Err)
            .map_err(|error| unreadable(format!("its exception: {error}"))),
        _ => reply
            .remove("data")
            .map(Ok)
            .ok_or_else(|| unreadable("neither data nor an exception".into())),
    }
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
    fn frames_holding_a_lone_surrogate_or_a_number_beyond_a_float_say_so_at_either_level() {
        // what Python's json writes for "a\ud800b", in a request, one JSON-encoded twice
        // (which the Python original's server takes too), and a reply
        let request = br#"{"command": "echo", "command_args": ["a\ud800b"]}"#;
        let twice = Value::String(String::from_utf8(request.to_vec()).unwrap()).to_string();
        for frame in [&request[..], twice.as_bytes()] {
            let reason = Request::parse(frame).unwrap_err().error.message;
            assert!(reason.contains("lone UTF-16 surrogate"), "{reason}");
        }
        let huge = format!(r#"{{"command": "echo", "command_args": [1{}]}}"#, "0".repeat(400));
        let reason = Request::parse(Value::String(huge).to_string().as_bytes()).unwrap_err();
        assert!(reason.error.message.contains("send it as a string"), "{}", reason.error.message);
        let reply = br#"{"data": "a\ud800b", "exception": null}"#;
        let wrapped = Value::String(String::from_utf8(reply.to_vec()).unwrap()).to_string();
        for frame in [&reply[..], wrapped.as_bytes()] {
            let unread = parse_reply(frame).unwrap_err();
            assert!(unread.contains("lone UTF-16 surrogate"), "{unread}");
        }
    }

    #[test]
    fn malformed_frames_say_why() {
        let reason = |frame: &[u8]| Request::parse(frame).unwrap_err().error.message;
        let huge = format!(r#"{{"command": "echo", "command_args": [1{}]}}"#, "0".repeat(400));
        assert!(
            reason(huge.as_bytes()).contains("send it as a string"),
            "{}",
            reason(huge.as_bytes())
        );
        assert!(reason(b"{oops").contains("not valid JSON"));
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
    fn get_target_fails_as_python_looks_the_target_up() {
        let served = |target: &str| (target == "add").then(|| target_detail(target));
        let answer = |args: Value| {
            let Value::Array(args) = args else { panic!("args: {args}") };
            let request =
                Request { id: None, command: GET_TARGET.into(), args, kwargs: Map::new() };
            answer_builtin(&request, served, Vec::new).unwrap()
        };
        assert_eq!(answer(json!(["add"])).unwrap()["target"], "add");
        // Python's `register.targets[target]`: KeyError(target), whatever its type ...
        for (target, message) in [
            (json!("nope"), "'nope'"),
            (json!(5), "5"),
            (json!(1.5), "1.5"),
            (json!(null), "None"),
            (json!(true), "True"),
        ] {
            let error = answer(json!([target.clone()])).unwrap_err();
            assert_eq!(
                (error.exception.as_str(), error.message.as_str(), &error.args, error.module),
                ("KeyError", message, &vec![target], None)
            );
        }
        // ... but a list or a dict cannot be a key
        let error = answer(json!([[1]])).unwrap_err();
        assert_eq!(
            (error.exception.as_str(), error.message.as_str()),
            ("TypeError", "unhashable type: 'list'")
        );
        let error = answer(json!([{"a": 1}])).unwrap_err();
        assert_eq!(error.message, "unhashable type: 'dict'");
        let error = answer(json!([])).unwrap_err();
        assert_eq!(
            (error.exception.as_str(), error.message.as_str()),
            ("TypeError", "__get_target__() missing 1 required positional argument: 'target'")
        );
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
    fn a_reply_frame_without_data_or_an_exception_is_invalid() {
        // the Python original always writes both keys; a frame with neither (or one that is
        // no object, which Python fails on) is some other message, not a successful `null`
        for odd in [&br#"{}"#[..], br#"{"result": 1, "error": null}"#, b"[7, null]", b"7"] {
            assert!(parse_reply(odd).is_err(), "{}", String::from_utf8_lossy(odd));
        }
        assert_eq!(parse_reply(br#"{"data": null, "exception": null}"#).unwrap(), Ok(Value::Null));
        assert_eq!(parse_reply(br#"{"data": 2}"#).unwrap(), Ok(json!(2)));
        let error = parse_reply(br#"{"exception": {"exception": "ValueError"}}"#).unwrap();
        assert_eq!(error.unwrap_err().exception, "ValueError");
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

    #[test]
    fn amqp_replies_are_encoded_twice_and_read_either_way() {
        let body = reply_body(&Ok(json!({"a": 1})));
        let encoded: Value = serde_json::from_slice(&body).unwrap();
        let Value::String(frame) = encoded else { panic!("not a JSON string: {encoded}") };
        assert_eq!(
            serde_json::from_str::<Value>(&frame).unwrap(),
            json!({"data": {"a": 1}, "exception": null})
        );
        assert_eq!(parse_reply(&body).unwrap(), Ok(json!({"a": 1})));
        assert_eq!(parse_reply(frame.as_bytes()).unwrap(), Ok(json!({"a": 1})));
        assert!(parse_reply(br#""not json""#).is_err());
        let request = Value::String(request_frame("add", vec![json!(1)], Map::new()));
        assert_eq!(Request::parse(request.to_string().as_bytes()).unwrap().command, "add");
    }
}
