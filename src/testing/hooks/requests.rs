//! What a test's call is made of: its arguments and payloads, checked as a caller would send
//! them.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::data::nameko_wire::call_arguments;
use crate::data::Message;
use crate::testing::HookError;

/// The positional and keyword arguments of a call of `route`: `args` a list, `kwargs` a map
/// (either may be `()` for none), as an RPC or WebSocket caller sends them.
pub(crate) fn arguments(
    route: &str,
    args: impl Serialize,
    kwargs: impl Serialize,
) -> Result<(Vec<Value>, Map<String, Value>), HookError> {
    call_arguments(args, kwargs).map_err(|reason| HookError::request(route, reason))
}

/// The message of a call of `route`, once its payload is serialized.
pub(crate) fn encoded(
    route: &str,
    message: serde_json::Result<Message>,
) -> Result<Message, HookError> {
    message.map_err(|error| {
        HookError::request(route, format!("payload cannot be serialized: {error}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_a_list_and_a_map_or_nothing() {
        let (args, kwargs) = arguments("add", [1, 2], json!({"c": 3})).unwrap();
        assert_eq!((args, kwargs["c"].clone()), (vec![json!(1), json!(2)], json!(3)));
        let (args, kwargs) = arguments("add", (), ()).unwrap();
        assert!(args.is_empty() && kwargs.is_empty());
        let error = arguments("add", json!({"a": 1}), ()).unwrap_err().to_string();
        assert!(error.contains("route 'add' not called: args must be a list"), "{error}");
        let error = arguments("add", (), [1]).unwrap_err().to_string();
        assert!(error.contains("kwargs must be a map, got [1]"), "{error}");
    }

    #[test]
    fn unserializable_payloads_are_refused() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), 3);
        let error = arguments("add", (), &map).unwrap_err().to_string();
        assert!(error.contains("kwargs cannot be serialized"), "{error}");
        let error = encoded("on_paid", Message::json(&map)).unwrap_err().to_string();
        assert!(error.contains("payload cannot be serialized"), "{error}");
    }
}
