//! Fuzzing what an RPC peer sends: reply bodies, request arguments, error descriptions.

use proptest::prelude::*;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::bind;
use super::error::RpcError;
use crate::data::fuzz_support::{self, config};
use crate::data::nameko_wire::{parse_reply, request_arguments, truthy, RemoteException};
use crate::data::{Failure, FailureKind};

/// Any JSON value, nested a few levels, its keys biased to the ones the RPC codecs read.
fn json_value() -> impl Strategy<Value = Value> {
    let keys = prop_oneof![
        prop::sample::select(vec!["args", "kwargs", "a", "b", "exc_type", "value"])
            .prop_map(str::to_owned),
        ".{0,6}"
    ];
    fuzz_support::json_value(keys.boxed())
}

/// An `error` field of a reply: well formed, or with odd types for its fields.
fn error_field() -> impl Strategy<Value = Value> {
    let field = || prop_oneof![".{0,8}".prop_map(Value::from), json_value()];
    prop_oneof![
        Just(Value::Null),
        json_value(),
        (field(), field(), field(), field()).prop_map(|(exc_type, exc_path, exc_args, value)| {
            json!({"exc_type": exc_type, "exc_path": exc_path, "exc_args": exc_args, "value": value})
        }),
    ]
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Greet {
    name: String,
    #[serde(default)]
    greeting: Option<String>,
}

fn bind_all(args: &[Value], kwargs: &Map<String, Value>) {
    let _ = bind::<Add>("m", args, kwargs);
    let _ = bind::<Greet>("m", args, kwargs);
    let _ = bind::<Value>("m", args, kwargs);
    let _ = bind::<(i64, String)>("m", args, kwargs);
    let _ = bind::<()>("m", args, kwargs);
    let _ = bind::<Vec<u8>>("m", args, kwargs);
    let _ = bind::<std::collections::HashMap<String, bool>>("m", args, kwargs);
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn reply_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_reply(&body);
    }

    #[test]
    fn replies_with_odd_errors_are_values(result in json_value(), error in error_field()) {
        let body = serde_json::to_vec(&json!({"result": result, "error": error})).unwrap();
        match parse_reply(&body) {
            // Nameko raises an error only when it is truthy
            Ok(Ok(_)) => prop_assert!(!truthy(&error)),
            Ok(Err(remote)) => {
                if let Some(exc_type) = error.get("exc_type") {
                    prop_assert_eq!(Some(remote.exc_type.as_str()), exc_type.as_str());
                }
                let described = RpcError::from(remote).to_string();
                prop_assert!(!described.is_empty());
            }
            Err(reason) => prop_assert!(reason.starts_with("unreadable RPC reply")),
        }
    }

    #[test]
    fn remote_exceptions_decode_or_fail_cleanly(error in error_field()) {
        if let Ok(remote) = serde_json::from_value::<RemoteException>(error) {
            let _ = remote.nameko_type();
            let _ = RpcError::from(remote).kind();
        }
    }

    #[test]
    fn request_arguments_bind_or_fail_cleanly(payload in json_value(), args in json_value(), kwargs in json_value()) {
        let _ = request_arguments(&payload);
        let request = json!({"args": args, "kwargs": kwargs});
        match request_arguments(&request) {
            Some((args, kwargs)) => bind_all(args, kwargs),
            None => prop_assert!(!(request["args"].is_array() && request["kwargs"].is_object())),
        }
    }

    #[test]
    fn failures_become_remote_errors(error_type in ".{0,40}", message in ".{0,40}", kind in 0..5usize) {
        let kinds = [FailureKind::BadInput, FailureKind::Error, FailureKind::Panic,
            FailureKind::TimedOut, FailureKind::Crashed];
        let failure = Failure { error_type, ..Failure::new(kinds[kind], message) };
        let remote = RemoteException::from_failure(&failure);
        prop_assert_eq!(remote.value, failure.full_message());
    }
}
