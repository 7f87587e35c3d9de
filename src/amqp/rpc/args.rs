//! [`Args<T>`]: the arguments of an RPC request, as a target's parameter.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::amqp::rpc::binding::bind_struct;
use crate::data::kombu_types_as_text;
use crate::data::nameko_wire::request_arguments;
use crate::handler::extract::{ExtractError, FromContext, SetupError, TargetSetup};
use crate::handler::named_fields::has_named_fields;
use crate::handler::WorkerContext;

/// The arguments of an RPC request (`{"args": [...], "kwargs": {...}}`), deserialized into
/// `T`. Arguments that do not fit are bad input, replied as `IncorrectSignature`. A value a
/// Nameko caller's kombu wrote as a typed envelope (a Python `datetime`, `date`, `time`,
/// `Decimal`, `UUID` or `bytes`) reads as its text, as in [`Payload`](crate::Payload).
///
/// - A struct with named fields (`#[derive(Deserialize)]`) binds like a Python signature:
///   positional arguments fill the fields in declaration order (fields with
///   `#[serde(skip_deserializing)]` left out), keyword arguments fill them by name (as
///   renamed, or by an alias), and both can be mixed. Too many positional arguments, a
///   keyword argument that names no field or repeats a positional one, and a missing field
///   (unless `#[serde(default)]`) do not fit.
/// - Any other type (a tuple, `Vec<_>`, a map, `Value`) is deserialized from the positional
///   arguments (a JSON array) when no keyword argument is given, or from the keyword
///   arguments (a JSON object) when no positional one is; mixing both does not fit.
///   `Args<()>` accepts no argument at all.
///
/// A target without `Args` ignores the request's arguments. On an `EventListener` or a
/// timer, whose messages are no calls, `Args` stops the start (take the payload with
/// [`Payload`](crate::Payload)); a `QueueListener`'s messages may be calls (a task's `args`
/// and `kwargs`), so it is taken there.
///
/// ```
/// use micro_framework::amqp::rpc::Args;
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// // add(1, 2), add(1, b=2), add(a=1, b=2)
/// fn add(Args(Add { a, b }): Args<Add>) -> i64 { a + b }
///
/// // positional only: mul(2, 3)
/// fn mul(Args((a, b)): Args<(i64, i64)>) -> i64 { a * b }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Args<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromContext for Args<T> {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        let payload = ctx.payload().map_err(|error| ExtractError::BadInput(error.to_string()))?;
        let payload = kombu_types_as_text(&ctx.message().body, payload);
        let (args, kwargs) = request_arguments(&payload).ok_or_else(|| {
            ExtractError::BadInput(
                "not an RPC request: expected {\"args\": [...], \"kwargs\": {...}}".into(),
            )
        })?;
        bind(ctx.route_name(), args, kwargs).map(Args).map_err(ExtractError::BadInput)
    }

    /// Refused where no message is a call: every event (or timer firing) would fail as bad
    /// input, an event ending in the dead-letter queue, with a service that starts fine.
    fn check(setup: &TargetSetup) -> Result<(), SetupError> {
        match &setup.no_call_arguments {
            Some(entrypoint) => Err(SetupError::new(format!(
                "Args<T> takes the arguments of an RPC request or a WebSocket call, and \
                 {entrypoint} hands its route no call: take its payload with Payload<T>"
            ))),
            None => Ok(()),
        }
    }
}

/// Bind `args` and `kwargs` to `T`, with Python-like messages naming `method`.
pub(super) fn bind<T: DeserializeOwned>(
    method: &str,
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<T, String> {
    if has_named_fields::<T>() {
        return bind_struct(args, kwargs).map_err(|misfit| misfit.naming(method));
    }
    let misfit = |error: serde_json::Error| format!("{method}(): {error}");
    if kwargs.is_empty() {
        match T::deserialize(Value::Array(args.to_vec())) {
            Ok(value) => Ok(value),
            Err(error) if args.is_empty() => T::deserialize(Value::Null).map_err(|_| misfit(error)),
            Err(error) => Err(misfit(error)),
        }
    } else if args.is_empty() {
        T::deserialize(Value::Object(kwargs.clone())).map_err(|error| {
            // a Python caller reads "expected a tuple" as nothing about its keywords; only a
            // signature that refuses any map takes no keywords (an inner value's misfit can
            // say "invalid type: map" too)
            let takes_no_map = T::deserialize(Value::Object(Map::new()))
                .is_err_and(|refused| refused.to_string().starts_with("invalid type: map"));
            if takes_no_map {
                let names: Vec<String> = kwargs.keys().map(|name| format!("'{name}'")).collect();
                format!(
                    "{method}() takes positional arguments only, got keyword arguments {} \
                     (bind to a struct with named fields to take them)",
                    names.join(", ")
                )
            } else {
                misfit(error)
            }
        })
    } else {
        Err(format!(
            "{method}() takes positional or keyword arguments, not both (bind to a struct with \
             named fields to mix them)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Add {
        a: i64,
        b: i64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Greet {
        name: String,
        #[serde(default)]
        greeting: Option<String>,
    }

    fn call<T: DeserializeOwned>(args: Value, kwargs: Value) -> Result<T, String> {
        let (Value::Array(args), Value::Object(kwargs)) = (args, kwargs) else { panic!() };
        bind("m", &args, &kwargs)
    }

    #[test]
    fn structs_bind_like_python_signatures() {
        let add = Add { a: 1, b: 2 };
        assert_eq!(call::<Add>(json!([1, 2]), json!({})), Ok(add));
        assert_eq!(call::<Add>(json!([1]), json!({"b": 2})).unwrap().b, 2);
        assert_eq!(call::<Add>(json!([]), json!({"b": 2, "a": 1})).unwrap().a, 1);
        assert!(call::<Add>(json!([1]), json!({})).unwrap_err().contains("missing field `b`"));
        assert!(call::<Add>(json!([1, 2, 3]), json!({})).unwrap_err().contains("takes 2"));
        assert!(call::<Add>(json!([1]), json!({"a": 2})).unwrap_err().contains("multiple values"));
        assert!(call::<Add>(json!([1, 2]), json!({"c": 3})).unwrap_err().contains("unexpected"));
        assert!(call::<Add>(json!(["x", 2]), json!({})).is_err());
        let greet: Greet = call(json!(["Ada"]), json!({})).unwrap();
        assert_eq!(greet, Greet { name: "Ada".into(), greeting: None });
    }

    #[test]
    fn keyword_arguments_to_a_positional_signature_are_named() {
        let refused = call::<(String, i64)>(json!([]), json!({"sku": "apple", "n": 2}));
        assert_eq!(
            refused.unwrap_err(),
            "m() takes positional arguments only, got keyword arguments 'n', 'sku' (bind to a \
             struct with named fields to take them)"
        );
        let map: Map<String, Value> = call(json!([]), json!({"sku": "apple"})).unwrap();
        assert_eq!(map["sku"], "apple");
        // a signature that takes keywords, one of them ill-typed: serde's misfit, not the above
        let ill_typed = call::<std::collections::HashMap<String, Vec<i64>>>(
            json!([]),
            json!({"a": [1], "b": {"x": 1}}),
        );
        let misfit = ill_typed.unwrap_err();
        assert!(misfit.starts_with("m(): invalid type: map, expected a sequence"), "{misfit}");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Aliased {
        #[serde(alias = "first")]
        a: i64,
        b: i64,
    }

    #[test]
    fn aliased_fields_bind_positionally() {
        // add(1, 2) on a struct whose first field has an alias
        assert_eq!(call::<Aliased>(json!([1, 2]), json!({})), Ok(Aliased { a: 1, b: 2 }));
    }

    #[test]
    fn aliases_bind_by_keyword_and_count_once() {
        assert_eq!(call::<Aliased>(json!([]), json!({"first": 1, "b": 2})).unwrap().a, 1);
        let too_many = call::<Aliased>(json!([1, 2, 3]), json!({})).unwrap_err();
        assert_eq!(too_many, "m() takes 2 positional argument(s) but 3 were given");
        let twice = call::<Aliased>(json!([1]), json!({"first": 2})).unwrap_err();
        assert_eq!(twice, "m() got multiple values for argument 'a'");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        #[serde(rename = "x")]
        a: i64,
        #[serde(skip_deserializing)]
        skipped: i64,
        b: i64,
    }

    #[test]
    fn renamed_skipped_and_strict_fields_bind_like_parameters() {
        assert_eq!(call::<Strict>(json!([1, 2]), json!({})), Ok(Strict { a: 1, skipped: 0, b: 2 }));
        assert_eq!(call::<Strict>(json!([1]), json!({"b": 2})).unwrap().b, 2);
        let too_many = call::<Strict>(json!([1, 2, 3]), json!({})).unwrap_err();
        assert_eq!(too_many, "m() takes 2 positional argument(s) but 3 were given");
        let unknown = call::<Strict>(json!([1, 2]), json!({"skipped": 3})).unwrap_err();
        assert_eq!(unknown, "m() got an unexpected keyword argument 'skipped'");
        let unknown = call::<Add>(json!([1]), json!({"b": 2, "c": 3})).unwrap_err();
        assert_eq!(unknown, "m() got an unexpected keyword argument 'c'");
        let mistyped = call::<Add>(json!(["x", 2]), json!({})).unwrap_err();
        assert!(mistyped.starts_with("m(): invalid type"), "{mistyped}");
    }

    #[test]
    fn other_types_take_one_kind_of_arguments() {
        assert_eq!(call::<(i64, i64)>(json!([1, 2]), json!({})), Ok((1, 2)));
        assert!(call::<(i64, i64)>(json!([1, 2, 3]), json!({})).is_err());
        assert!(call::<(i64, i64)>(json!([1]), json!({})).is_err());
        assert_eq!(call::<Value>(json!([]), json!({"x": 1})), Ok(json!({"x": 1})));
        assert!(call::<Value>(json!([1]), json!({"x": 1})).unwrap_err().contains("not both"));
        assert_eq!(call::<()>(json!([]), json!({})), Ok(()));
        assert!(call::<()>(json!([1]), json!({})).is_err());
    }
}
