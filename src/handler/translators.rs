//! Message translators: transform a message's payload before the target sees it, applied in
//! order, each feeding the next.
//!
//! ```
//! use micro_framework::prelude::*;
//! use micro_framework::translators::JsonTranslator;
//! use serde_json::{json, Value};
//!
//! fn handle(Payload(order): Payload<Value>) {}
//!
//! let route = Route::new(handle)
//!     .translator(JsonTranslator)                                 // "{\"id\":1}" -> {"id": 1}
//!     .translator(|payload: Value| -> Result<Value, String> {      // keep the "id" field only
//!         Ok(json!({ "id": payload["id"].clone() }))
//!     });
//! ```
//!
//! A translator error is bad input: the message goes to the route's dead-letter queue.

use std::panic::AssertUnwindSafe;

use serde_json::Value;

use crate::data::BoxError;
use crate::data::Message;
use crate::handler::outcome::panic_message;

/// Transforms a payload.
pub trait MessageTranslator: Send + Sync + 'static {
    /// The translated payload; `message` is the original message (headers, routing key).
    fn translate(&self, payload: Value, message: &Message) -> Result<Value, BoxError>;
}

impl std::fmt::Debug for dyn MessageTranslator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageTranslator")
    }
}

impl<F, E> MessageTranslator for F
where
    F: Fn(Value) -> Result<Value, E> + Send + Sync + 'static,
    E: Into<BoxError>,
{
    fn translate(&self, payload: Value, _message: &Message) -> Result<Value, BoxError> {
        self(payload).map_err(Into::into)
    }
}

/// Decodes a payload that is a JSON document inside a string (as some publishers double
/// encode); other payloads pass unchanged. The Python micro-framework's `JSONTranslator`.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonTranslator;

impl MessageTranslator for JsonTranslator {
    fn translate(&self, payload: Value, _message: &Message) -> Result<Value, BoxError> {
        match payload {
            Value::String(text) => Ok(serde_json::from_str(&text)?),
            other => Ok(other),
        }
    }
}

/// Decode `message` and run the translators over its payload. A translator that panics on
/// the payload (an `expect` on a shape it assumed) fails as one that returns an error does:
/// the panic would otherwise end the task that holds the delivery, leaving it unsettled.
pub(crate) fn translate(
    translators: &[std::sync::Arc<dyn MessageTranslator>],
    message: &Message,
) -> Result<Value, String> {
    let mut payload = message.decode().map_err(|error| error.to_string())?;
    for (index, translator) in translators.iter().enumerate() {
        let translated =
            std::panic::catch_unwind(AssertUnwindSafe(|| translator.translate(payload, message)));
        payload = match translated {
            Ok(Ok(payload)) => payload,
            Ok(Err(error)) => return Err(format!("translator #{} failed: {error}", index + 1)),
            Err(panic) => {
                let panic = panic_message(panic.as_ref());
                return Err(format!("translator #{} panicked: {panic}", index + 1));
            }
        };
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    #[test]
    fn chains_in_order_and_reports_the_failing_translator() {
        let double = |v: Value| -> Result<Value, String> { Ok(json!(v.as_i64().unwrap_or(0) * 2)) };
        let add_one =
            |v: Value| -> Result<Value, String> { Ok(json!(v.as_i64().unwrap_or(0) + 1)) };
        let chain: Vec<Arc<dyn MessageTranslator>> =
            vec![Arc::new(JsonTranslator), Arc::new(double), Arc::new(add_one)];
        let message = Message::json("20").unwrap();
        assert_eq!(translate(&chain, &message).unwrap(), json!(41));

        let failing: Vec<Arc<dyn MessageTranslator>> = vec![Arc::new(JsonTranslator)];
        let error = translate(&failing, &Message::json("{not json").unwrap()).unwrap_err();
        assert!(error.starts_with("translator #1 failed"), "{error}");
    }
}
