//! Nameko's RPC bodies: requests, replies, and errors as they travel in replies.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::data::{DecodeError, Failure, FailureKind};

/// Where Nameko's own exceptions live; callers rebuild the ones registered there.
const NAMEKO_EXCEPTIONS: &str = "nameko.exceptions";

/// An error as it travels in an RPC reply (Nameko's serialized exception). It is only data:
/// nothing in it is ever evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteException {
    /// The error's type name, e.g. `ValueError` or `MethodNotFound` (empty when a reply
    /// lacks it: Nameko reads each field with `.get`).
    #[serde(default)]
    pub exc_type: String,
    /// The type's path, e.g. `builtins.ValueError` or `nameko.exceptions.MethodNotFound`
    /// (empty when a reply lacks it).
    #[serde(default)]
    pub exc_path: String,
    /// The error's arguments (Nameko: strings).
    #[serde(default)]
    pub exc_args: Vec<Value>,
    /// The error's message (`str(exc)`; empty when a reply lacks it).
    #[serde(default)]
    pub value: String,
}

impl RemoteException {
    /// One of Nameko's exceptions (`MethodNotFound`, `IncorrectSignature`, ...), which Nameko
    /// callers rebuild as such.
    pub(crate) fn nameko(exc_type: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        RemoteException {
            exc_type: exc_type.to_owned(),
            exc_path: format!("{NAMEKO_EXCEPTIONS}.{exc_type}"),
            exc_args: vec![Value::String(value.clone())],
            value,
        }
    }

    /// The name of the Nameko exception this is, if it is one.
    pub(crate) fn nameko_type(&self) -> Option<&str> {
        self.exc_path.strip_prefix(NAMEKO_EXCEPTIONS)?.strip_prefix('.')
    }

    /// How a call's failure is replied: bad input is `IncorrectSignature`, an unserializable
    /// result `UnserializableValueError`, any other error is named after its Rust type (last
    /// path segment; the path with `.` separators) and a panic is `Panic`.
    pub(crate) fn from_failure(failure: &Failure) -> Self {
        if failure.kind == FailureKind::BadInput {
            return RemoteException::nameko("IncorrectSignature", failure.full_message());
        }
        if failure.kind == FailureKind::Unserializable {
            return RemoteException::nameko("UnserializableValueError", failure.full_message());
        }
        let (exc_type, exc_path) = match rust_type_path(&failure.error_type) {
            Some(path) => (path.rsplit('.').next().unwrap_or(&path).to_owned(), path),
            None => {
                let name = match failure.kind {
                    FailureKind::Panic => "Panic",
                    FailureKind::TimedOut => "TimedOut",
                    FailureKind::Crashed => "Crashed",
                    _ => "Error",
                };
                (name.to_owned(), format!("micro_framework.{name}"))
            }
        };
        let value = failure.full_message();
        RemoteException { exc_type, exc_path, exc_args: vec![Value::String(value.clone())], value }
    }
}

/// `std::io::error::Error` → `std.io.error.Error` (generic parameters and references dropped).
fn rust_type_path(type_name: &str) -> Option<String> {
    let base = type_name.split('<').next().unwrap_or_default().trim_start_matches('&').trim();
    let base = base.strip_prefix("dyn ").unwrap_or(base);
    (!base.is_empty()).then(|| base.replace("::", "."))
}

/// A call's positional and keyword arguments as JSON: `args` must serialize to a list and
/// `kwargs` to a map (`()` and `null` stand for none); the error says why not. What every
/// caller (RPC, WebSocket, test hooks) checks before building a request.
pub(crate) fn call_arguments(
    args: impl Serialize,
    kwargs: impl Serialize,
) -> Result<(Vec<Value>, Map<String, Value>), String> {
    let json = |what: &str, value: Result<Value, serde_json::Error>| {
        value.map_err(|error| format!("{what} cannot be serialized: {error}"))
    };
    let args = match json("args", serde_json::to_value(args))? {
        Value::Null => Vec::new(),
        Value::Array(args) => args,
        other => return Err(format!("args must be a list, got {other}")),
    };
    let kwargs = match json("kwargs", serde_json::to_value(kwargs))? {
        Value::Null => Map::new(),
        Value::Object(kwargs) => kwargs,
        other => return Err(format!("kwargs must be a map, got {other}")),
    };
    Ok((args, kwargs))
}

/// The positional and keyword arguments of a request payload, if it is one.
pub(crate) fn request_arguments(payload: &Value) -> Option<(&Vec<Value>, &Map<String, Value>)> {
    match (payload.get("args"), payload.get("kwargs")) {
        (Some(Value::Array(args)), Some(Value::Object(kwargs))) => Some((args, kwargs)),
        _ => None,
    }
}

/// The body of a request: `{"args": [...], "kwargs": {...}}`.
pub(crate) fn request_body(args: Vec<Value>, kwargs: Map<String, Value>) -> Bytes {
    /// Written from the arguments themselves rather than from copies of them in a new
    /// `Value`; its keys in the order `json!` sorts them.
    #[derive(Serialize)]
    struct Request {
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    }
    values_body(&Request { args, kwargs })
}

/// The body of a reply: `{"result": ..., "error": null | {...}}`.
pub(crate) fn reply_body(outcome: &Result<Value, RemoteException>) -> Bytes {
    /// A result's reply, written from the result itself rather than from a copy of it in a
    /// new `Value`; its keys in the order `json!` sorts them, as in an error's reply.
    #[derive(Serialize)]
    struct Succeeded<'a> {
        error: (),
        result: &'a Value,
    }
    match outcome {
        Ok(result) => values_body(&Succeeded { error: (), result }),
        Err(error) => Bytes::from(json!({ "result": null, "error": error }).to_string()),
    }
}

/// `body` in JSON, for a body made of JSON values only: writing it cannot fail, as a `Value`
/// has only string keys and nothing else it holds can fail.
fn values_body(body: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(body).unwrap_or_default())
}

/// The outcome a reply body carries, read as Nameko's proxy reads it: an error that is
/// truthy (in Python's sense) is raised, else the `result` is returned. A body that is no
/// JSON object, or holds neither, is unreadable: no successful `null`.
pub(crate) fn parse_reply(body: &[u8]) -> Result<Result<Value, RemoteException>, String> {
    let reply: Value = serde_json::from_slice(body)
        .map_err(|error| format!("unreadable RPC reply: {}", DecodeError::of_json(body, &error)))?;
    let Value::Object(mut reply) = reply else {
        return Err("unreadable RPC reply: not a JSON object".into());
    };
    match reply.remove("error") {
        Some(error) if truthy(&error) => serde_json::from_value(error)
            .map(Err)
            .map_err(|error| format!("unreadable RPC reply: its error: {error}")),
        _ => reply
            .remove("result")
            .map(Ok)
            .ok_or_else(|| "unreadable RPC reply: it holds neither a result nor an error".into()),
    }
}

/// Whether Python counts `value` as true: not `None`, `False`, zero or empty.
pub(crate) fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(value) => *value,
        Value::Number(number) => number.as_f64().is_some_and(|number| number != 0.0),
        Value::String(text) => !text.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(fields) => !fields.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::BoxError;

    #[test]
    fn failures_are_named_after_their_rust_type() {
        let error: BoxError = Box::new(std::io::Error::other("disk full"));
        let failure = Failure::from_error(&error, "std::io::error::Error");
        let remote = RemoteException::from_failure(&failure);
        assert_eq!(remote.exc_type, "Error");
        assert_eq!(remote.exc_path, "std.io.error.Error");
        assert_eq!(remote.value, "disk full");
        assert_eq!(remote.exc_args, vec![json!("disk full")]);
        let boxed =
            Failure { error_type: "alloc::boxed::Box<dyn core::error::Error>".into(), ..failure };
        assert_eq!(RemoteException::from_failure(&boxed).exc_type, "Box");
        let panic = Failure::new(FailureKind::Panic, "target panicked: boom");
        assert_eq!(RemoteException::from_failure(&panic).exc_path, "micro_framework.Panic");
        let bad = RemoteException::from_failure(&Failure::bad_input("missing field `b`"));
        assert_eq!(bad.exc_path, "nameko.exceptions.IncorrectSignature");
        assert_eq!(bad.nameko_type(), Some("IncorrectSignature"));
    }

    #[test]
    fn replies_round_trip() {
        let ok = reply_body(&Ok(json!(3)));
        assert_eq!(parse_reply(&ok).unwrap(), Ok(json!(3)));
        let error = RemoteException::nameko("MethodNotFound", "nope");
        let failed = reply_body(&Err(error.clone()));
        assert_eq!(parse_reply(&failed).unwrap(), Err(error));
        assert!(parse_reply(b"{oops").is_err());
        // what Python's `json` writes for `float("nan")`: refused, not read as something else
        let unread = parse_reply(br#"{"result": NaN, "error": null}"#).unwrap_err();
        assert!(unread.starts_with("unreadable RPC reply"), "{unread}");
        assert!(unread.contains("NaN and Infinity"), "the cause named: {unread}");
        // what a Nameko service returning 10**400 sends: Python's json writes it in full
        let huge = format!(r#"{{"result": 1{}, "error": null}}"#, "0".repeat(400));
        let unread = parse_reply(huge.as_bytes()).unwrap_err();
        assert!(unread.contains("beyond a 64-bit float's range"), "{unread}");
        // what a Nameko service returning "a\ud800b" sends: Python strings hold lone surrogates
        let unread = parse_reply(br#"{"result": "a\ud800b", "error": null}"#).unwrap_err();
        assert!(unread.contains("lone UTF-16 surrogate"), "{unread}");
    }

    /// Only a reply holding a lone surrogate is told of one: any other unreadable reply is
    /// told what the parser said, with no hint pointing elsewhere.
    #[test]
    fn an_unreadable_reply_is_told_of_a_surrogate_only_when_it_holds_one() {
        for unreadable in [&b"{oops"[..], br#"{"result": NaN, "error": null}"#, br#"["\u12"]"#] {
            let error = parse_reply(unreadable).unwrap_err();
            assert!(error.starts_with("unreadable RPC reply: "), "{error}");
            assert!(!error.contains("surrogate"), "{error}");
        }
        let error = parse_reply(br#"{"result": "\uDC00", "error": null}"#).unwrap_err();
        assert!(
            error.starts_with(
                "unreadable RPC reply: body is not valid JSON (it holds a lone UTF-16 surrogate"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_reply_without_a_result_or_an_error_is_invalid_and_what_nameko_reads_is_read() {
        // Nameko's proxy reads `body.get('error')`, raises it if truthy, else returns
        // `body['result']`: a reply lacking both, or not an object, is no successful `null`
        for odd in [&br#"{}"#[..], br#"{"data": 1, "exception": null}"#, b"[7, null]", b"7"] {
            assert!(parse_reply(odd).is_err(), "{}", String::from_utf8_lossy(odd));
        }
        assert_eq!(parse_reply(br#"{"result": null, "error": null}"#).unwrap(), Ok(Value::Null));
        assert_eq!(parse_reply(br#"{"result": 4}"#).unwrap(), Ok(json!(4)));
        // a falsy error is no error
        assert_eq!(parse_reply(br#"{"result": 5, "error": {}}"#).unwrap(), Ok(json!(5)));
        // Nameko builds a RemoteError from `.get`s: an error lacking `exc_path` is one
        let remote =
            parse_reply(br#"{"result": null, "error": {"exc_type": "ValueError", "value": "x"}}"#)
                .unwrap()
                .unwrap_err();
        assert_eq!((remote.exc_type.as_str(), remote.exc_path.as_str()), ("ValueError", ""));
        assert_eq!(remote.value, "x");
        // an error that is no object cannot be rebuilt (Nameko fails on it too)
        assert!(parse_reply(br#"{"result": null, "error": "boom"}"#).is_err());
    }

    #[test]
    fn a_request_has_the_bytes_of_the_json_macro_form() {
        let args = vec![json!({"y": [1, 2.5], "x": "é"}), Value::Null];
        let kwargs = json!({"b": {"d": 1, "c": null}, "a": [true]});
        let Value::Object(kwargs) = kwargs else { unreachable!() };
        let expected = json!({ "args": args, "kwargs": kwargs }).to_string();
        assert_eq!(request_body(args, kwargs), Bytes::from(expected));
        assert_eq!(request_body(Vec::new(), Map::new()), Bytes::from(r#"{"args":[],"kwargs":{}}"#));
    }

    #[test]
    fn a_result_reply_has_the_bytes_of_the_json_macro_form() {
        let result = json!({"b": [1, "x", {"d": 2.5, "c": null}], "a": "é"});
        let expected = json!({ "result": result, "error": null }).to_string();
        assert_eq!(reply_body(&Ok(result)), Bytes::from(expected));
        assert_eq!(reply_body(&Ok(Value::Null)), Bytes::from(r#"{"error":null,"result":null}"#));
    }
}
