//! [`CallContext`]: call ids and context data that travel with every message, as Nameko
//! sends them in `nameko.*` headers.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::data::headers::{HeaderValue, Headers};

/// Prefix of Nameko's context headers.
pub const HEADER_PREFIX: &str = "nameko.";
const CALL_ID_STACK: &str = "call_id_stack";

/// The context of one call: its id, the ids of the calls that led to it, and the context data
/// (`auth_token`, `language`, `user_id`, ...) received with the message.
///
/// ```
/// use micro_framework::{CallContext, HeaderValue, Headers};
/// let mut headers = Headers::new();
/// headers.insert("nameko.call_id_stack".into(),
///     HeaderValue::Array(vec!["caller.run.1".into()]));
/// headers.insert("nameko.language".into(), "fr".into());
/// let call = CallContext::for_call(&headers, "orders", "create", 10);
/// assert_eq!(call.call_id_stack[0], "caller.run.1");
/// assert!(call.call_id.starts_with("orders.create."));
/// assert_eq!(call.parent_call_id(), Some("caller.run.1"));
/// assert_eq!(call.data["language"], HeaderValue::from("fr"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CallContext {
    /// This call's id: `{service}.{method}.{uuid4}`.
    pub call_id: String,
    /// Parent call ids followed by this call's id, oldest first.
    pub call_id_stack: Vec<String>,
    /// Context data received in `nameko.*` headers (prefix stripped), without the stack.
    pub data: Headers,
}

impl CallContext {
    /// The context of a new call of `service.method` made for a message with these headers.
    /// The stack keeps the last `parent_calls_tracked` parents plus this call.
    pub fn for_call(
        headers: &Headers,
        service: &str,
        method: &str,
        parent_calls_tracked: usize,
    ) -> Self {
        let mut data = Headers::new();
        let mut stack = Vec::new();
        for (key, value) in headers {
            let Some(name) = key.strip_prefix(HEADER_PREFIX) else { continue };
            if name == CALL_ID_STACK {
                stack = stack_entries(value);
            } else if *value != HeaderValue::Void {
                data.insert(name.to_owned(), value.clone());
            }
        }
        let call_id = format!("{service}.{method}.{}", Uuid::new_v4());
        stack.push(call_id.clone());
        let keep = parent_calls_tracked + 1;
        if stack.len() > keep {
            stack.drain(..stack.len() - keep);
        }
        CallContext { call_id, call_id_stack: stack, data }
    }

    /// The id of the call that caused this one, if any.
    pub fn parent_call_id(&self) -> Option<&str> {
        let len = self.call_id_stack.len();
        (len >= 2).then(|| self.call_id_stack[len - 2].as_str())
    }

    /// The headers to send with a message caused by this call: `nameko.{key}` for each
    /// context value and `nameko.call_id_stack`.
    pub fn outgoing_headers(&self) -> Headers {
        let mut headers: Headers = self
            .data
            .iter()
            .map(|(key, value)| (format!("{HEADER_PREFIX}{key}"), value.clone()))
            .collect();
        if !self.call_id_stack.is_empty() {
            let stack = self.call_id_stack.iter().cloned().map(HeaderValue::String).collect();
            headers.insert(format!("{HEADER_PREFIX}{CALL_ID_STACK}"), HeaderValue::Array(stack));
        }
        headers
    }
}

/// A call-id stack as senders encode it: an array of strings, or a lone string.
/// Entries of other types are skipped rather than failing the call.
fn stack_entries(value: &HeaderValue) -> Vec<String> {
    match value {
        HeaderValue::Array(items) => items.iter().filter_map(entry_text).collect(),
        other => entry_text(other).into_iter().collect(),
    }
}

fn entry_text(value: &HeaderValue) -> Option<String> {
    match value {
        HeaderValue::String(text) => Some(text.clone()),
        HeaderValue::Bytes(bytes) => String::from_utf8(bytes.clone()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_stack_to_tracked_parents_plus_own() {
        let parents = (0..20).map(|i| HeaderValue::String(format!("p.{i}"))).collect();
        let headers = Headers::from([("nameko.call_id_stack".into(), HeaderValue::Array(parents))]);
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        assert_eq!(call.call_id_stack.len(), 11);
        assert_eq!(call.call_id_stack[0], "p.10");
        assert_eq!(call.call_id_stack.last(), Some(&call.call_id));
    }

    #[test]
    fn odd_stack_types_are_tolerated_and_foreign_headers_not_propagated() {
        let headers = Headers::from([
            ("nameko.call_id_stack".into(), HeaderValue::Int(3)),
            ("x-death".into(), HeaderValue::Array(vec![])),
            ("nameko.user_id".into(), HeaderValue::Int(7)),
        ]);
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        assert_eq!(call.call_id_stack, vec![call.call_id.clone()]);
        let out = call.outgoing_headers();
        assert_eq!(out.get("nameko.user_id"), Some(&HeaderValue::Int(7)));
        assert!(!out.contains_key("nameko.x-death"));
        assert!(
            matches!(out.get("nameko.call_id_stack"), Some(HeaderValue::Array(a)) if a.len() == 1)
        );
    }
}
