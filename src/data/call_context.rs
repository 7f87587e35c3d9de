//! [`CallContext`]: call ids and context data that travel with every message, as Nameko
//! sends them in `nameko.*` headers.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::data::headers::{HeaderValue, Headers};

/// Prefix of Nameko's context headers.
pub(crate) const HEADER_PREFIX: &str = "nameko.";
const CALL_ID_STACK: &str = "call_id_stack";

/// The most bytes a header name holds: AMQP sends it as a short string. A message with a
/// longer one is refused whole (by the RabbitMQ client, and by `memory://` likewise).
const MAX_HEADER_NAME: usize = 255;

/// How much of an over-long key a warning quotes: enough to recognise it.
const QUOTED_START: usize = 32;

/// The context of one call: its id, the ids of the calls that led to it, and the context data
/// (`auth_token`, `language`, `user_id`, `tenant`, ...) received with the message.
///
/// As Nameko does, every header of the incoming message is context data, its `nameko.`
/// prefix stripped where present, and each key `k` goes out again as `nameko.k` on the
/// messages the call publishes (events, RPC requests). Broker and framework headers are not
/// context and never go out again: those starting with `x-` (`x-death`, `x-delay`,
/// `x-delivery-count`, `x-mf-*`, ...) and RabbitMQ's `CC` and `BCC`. With the prefix (a
/// Nameko service forwards its call's `x-death` as `nameko.x-death`), those the broker and
/// the frameworks set are dropped, by name; another key starting with `x-`
/// (`nameko.x-request-id`, a Nameko caller's) is context, as Nameko keeps it. When a message holds a
/// key both with and without the prefix, the prefixed header wins.
///
/// A key of more than 248 bytes stays context data but does not go out: `nameko.{key}` would
/// be over the 255 bytes a header name holds, and the broker would refuse every message the
/// call sends. [`CallContext::for_call`] warns of it, once for the call.
///
/// ```
/// use micro_framework::{CallContext, HeaderValue, Headers};
/// let mut headers = Headers::new();
/// headers.insert("nameko.call_id_stack".into(),
///     HeaderValue::Array(vec!["caller.run.1".into()]));
/// headers.insert("nameko.language".into(), "fr".into());
/// headers.insert("tenant".into(), "acme".into());
/// headers.insert("x-death".into(), HeaderValue::Array(vec![]));
/// let call = CallContext::for_call(&headers, "orders", "create", 10);
/// assert_eq!(call.call_id_stack[0], "caller.run.1");
/// assert!(call.call_id.starts_with("orders.create."));
/// assert_eq!(call.parent_call_id(), Some("caller.run.1"));
/// assert_eq!(call.data["language"], HeaderValue::from("fr"));
/// assert_eq!(call.data["tenant"], HeaderValue::from("acme"));
/// assert!(!call.data.contains_key("x-death"));
/// let out = call.outgoing_headers();
/// assert_eq!(out["nameko.tenant"], HeaderValue::from("acme"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CallContext {
    /// This call's id: `{service}.{method}.{uuid4}`.
    pub call_id: String,
    /// Parent call ids followed by this call's id, oldest first.
    pub call_id_stack: Vec<String>,
    /// Context data: the headers received (the `nameko.` prefix stripped), without the stack
    /// and without broker and framework headers.
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
        let call = Self::gathered(headers, parent_calls_tracked, Self::new_id(service, method));
        call.warn_of_keys_not_forwarded();
        call
    }

    /// A new call id of `service.method`: `{service}.{method}.{uuid4}`.
    pub(crate) fn new_id(service: &str, method: &str) -> String {
        format!("{service}.{method}.{}", Uuid::new_v4())
    }

    /// [`CallContext::for_call`] with the id `call_id`, without its warning: a worker
    /// process's call has the id its service gave it.
    pub(crate) fn gathered(
        headers: &Headers,
        parent_calls_tracked: usize,
        call_id: String,
    ) -> Self {
        let mut data = Headers::new();
        let mut stack = None;
        for (key, value) in headers {
            let (name, prefixed) = match key.strip_prefix(HEADER_PREFIX) {
                Some(name) => (name, true),
                None => (key.as_str(), false),
            };
            let context = match prefixed {
                true => !is_set_by_broker_or_framework(name),
                false => is_context_header(name),
            };
            if name.is_empty() || !context {
                continue;
            }
            if name == CALL_ID_STACK {
                if prefixed || stack.is_none() {
                    stack = Some(stack_entries(value));
                }
            } else if *value != HeaderValue::Void && (prefixed || !data.contains_key(name)) {
                data.insert(name.to_owned(), value.clone());
            }
        }
        let mut stack = stack.unwrap_or_default();
        stack.push(call_id.clone());
        let keep = parent_calls_tracked.saturating_add(1);
        if stack.len() > keep {
            stack.drain(..stack.len() - keep);
        }
        CallContext { call_id, call_id_stack: stack, data }
    }

    /// Warn, here rather than in [`outgoing_headers`](Self::outgoing_headers) (asked for by
    /// each dependency that sends), so that a call warns once, of the context keys too long to
    /// go out prefixed.
    pub(crate) fn warn_of_keys_not_forwarded(&self) {
        let left_out: Vec<String> =
            self.data.keys().filter(|key| !forwardable(key)).map(|key| quoted(key)).collect();
        if !left_out.is_empty() {
            tracing::warn!(
                call_id = %self.call_id,
                keys = ?left_out,
                "context headers not forwarded: as {HEADER_PREFIX}{{key}} their names would be \
                 over the {MAX_HEADER_NAME} bytes an AMQP header name holds, and the broker \
                 would refuse every message this call sends"
            );
        }
    }

    /// The id of the call that caused this one, if any.
    pub fn parent_call_id(&self) -> Option<&str> {
        let len = self.call_id_stack.len();
        (len >= 2).then(|| self.call_id_stack[len - 2].as_str())
    }

    /// The headers to send with a message caused by this call: `nameko.{key}` for each
    /// context value whose key fits (see [`CallContext`]) and `nameko.call_id_stack`.
    pub fn outgoing_headers(&self) -> Headers {
        let mut headers: Headers = self
            .data
            .iter()
            .filter(|(key, _)| forwardable(key))
            .map(|(key, value)| (format!("{HEADER_PREFIX}{key}"), value.clone()))
            .collect();
        if !self.call_id_stack.is_empty() {
            let stack = self.call_id_stack.iter().cloned().map(HeaderValue::String).collect();
            headers.insert(format!("{HEADER_PREFIX}{CALL_ID_STACK}"), HeaderValue::Array(stack));
        }
        headers
    }
}

/// Whether the context key `key` can go out as `nameko.{key}`.
fn forwardable(key: &str) -> bool {
    HEADER_PREFIX.len() + key.len() <= MAX_HEADER_NAME
}

/// `key` for a log line: its start and its length, as a whole key may be 255 bytes.
fn quoted(key: &str) -> String {
    let start: String = key.chars().take(QUOTED_START).collect();
    format!("{start}... ({} bytes)", key.len())
}

/// Whether a received header is context data: not one the broker or a framework set for
/// itself (`x-*`; `CC` and `BCC`, which RabbitMQ routes on), which must not travel on to the
/// next message.
fn is_context_header(key: &str) -> bool {
    let broker_or_framework = key.get(..2).is_some_and(|start| start.eq_ignore_ascii_case("x-"))
        || key == "CC"
        || key == "BCC";
    !broker_or_framework
}

/// Whether `name`, received with the `nameko.` prefix, is a header the broker or a framework
/// set for itself: a Nameko service forwards every header of its call, a broker's `x-death`
/// too, as `nameko.x-death`. Only those names: a Nameko caller's own context key may start
/// with `x-` (`nameko.x-request-id`), and Nameko keeps it.
fn is_set_by_broker_or_framework(name: &str) -> bool {
    const NAMES: [&str; 4] = ["x-death", "x-delay", "x-delivery-count", "x-received-from"];
    const STARTS: [&str; 4] = ["x-first-death-", "x-last-death-", "x-shovelled", "x-mf-"];
    let lower = name.to_ascii_lowercase();
    name == "CC"
        || name == "BCC"
        || NAMES.contains(&lower.as_str())
        || STARTS.iter().any(|start| lower.starts_with(start))
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
    use crate::data::captured_logs::warnings_of;

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
    fn tracking_every_parent_keeps_the_whole_stack() {
        let parents = (0..3).map(|i| HeaderValue::String(format!("p.{i}"))).collect();
        let headers = Headers::from([("nameko.call_id_stack".into(), HeaderValue::Array(parents))]);
        let call = CallContext::for_call(&headers, "svc", "m", usize::MAX);
        assert_eq!(call.call_id_stack.len(), 4);
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

    fn text(value: &str) -> HeaderValue {
        HeaderValue::String(value.into())
    }

    #[test]
    fn every_application_header_is_context_and_goes_out_prefixed() {
        let headers = Headers::from([
            ("tenant".into(), text("acme")),
            ("nameko.language".into(), text("fr")),
            ("trace".into(), HeaderValue::Bytes(b"t1".to_vec())),
            (
                "limits".into(),
                HeaderValue::Table(Headers::from([("rps".into(), HeaderValue::Int(5))])),
            ),
            ("empty".into(), HeaderValue::Void),
            ("nameko.".into(), text("no name")),
        ]);
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        let expected = Headers::from([
            ("tenant".into(), text("acme")),
            ("language".into(), text("fr")),
            ("trace".into(), HeaderValue::Bytes(b"t1".to_vec())),
            (
                "limits".into(),
                HeaderValue::Table(Headers::from([("rps".into(), HeaderValue::Int(5))])),
            ),
        ]);
        assert_eq!(call.data, expected);
        let out = call.outgoing_headers();
        let names: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "nameko.call_id_stack",
                "nameko.language",
                "nameko.limits",
                "nameko.tenant",
                "nameko.trace"
            ]
        );
        assert_eq!(out["nameko.tenant"], text("acme"));
        // and the next service reads back the same context
        assert_eq!(CallContext::for_call(&out, "next", "n", 10).data, expected);
    }

    #[test]
    fn broker_and_framework_headers_are_not_context() {
        let foreign = [
            "x-death",
            "x-delay",
            "x-delivery-count",
            "x-first-death-queue",
            "x-mf-retry-count",
            "x-mf-error",
            "x-mf-redeliveries",
            "X-Custom",
            "CC",
            "BCC",
        ];
        let mut headers: Headers = foreign.iter().map(|key| (key.to_string(), text("v"))).collect();
        // as a Nameko service forwards them: every header of its call, prefixed
        let set_for_themselves = foreign.iter().filter(|key| **key != "X-Custom");
        headers.extend(set_for_themselves.map(|key| (format!("nameko.{key}"), text("v"))));
        headers.insert("nameko.x-first-death-queue".into(), text("v"));
        headers.insert("tenant".into(), text("acme"));
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        assert_eq!(call.data, Headers::from([("tenant".into(), text("acme"))]));
        let out = call.outgoing_headers();
        for key in foreign {
            assert!(!out.contains_key(&format!("nameko.{key}")), "{key} went out");
            assert!(!out.contains_key(key), "{key} went out");
        }
    }

    /// A Nameko caller's own context key may start with `x-`: Nameko sends it prefixed and
    /// keeps it, and so does the chain here.
    #[test]
    fn a_callers_own_key_starting_with_x_stays_context_under_the_prefix() {
        let headers = Headers::from([
            ("nameko.x-request-id".into(), text("r-1")),
            ("nameko.x-death".into(), HeaderValue::Array(vec![])),
        ]);
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        assert_eq!(call.data, Headers::from([("x-request-id".into(), text("r-1"))]));
        assert_eq!(call.outgoing_headers()["nameko.x-request-id"], text("r-1"));
    }

    /// Also for a key read before its prefixed twin in the map's order (`auth` sorts before
    /// `nameko.auth`; `tenant` after `nameko.tenant`, where the first read would win anyway).
    #[test]
    fn the_prefixed_header_wins_for_a_key_that_sorts_before_the_prefix() {
        for key in ["auth", "lang", "a", "nameko"] {
            let headers = Headers::from([
                (key.to_owned(), text("bare")),
                (format!("nameko.{key}"), text("prefixed")),
            ]);
            let call = CallContext::for_call(&headers, "svc", "m", 10);
            assert_eq!(call.data.get(key), Some(&text("prefixed")), "{key}: {:?}", call.data);
            let out = call.outgoing_headers();
            assert_eq!(out.get(&format!("nameko.{key}")), Some(&text("prefixed")), "{out:?}");
        }
    }

    #[test]
    fn the_prefixed_header_wins_and_the_stack_is_never_data() {
        let headers = Headers::from([
            ("tenant".into(), text("bare")),
            ("nameko.tenant".into(), text("prefixed")),
            ("call_id_stack".into(), HeaderValue::Array(vec![text("bare.m.1")])),
            ("nameko.call_id_stack".into(), HeaderValue::Array(vec![text("real.m.1")])),
        ]);
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        assert_eq!(call.data, Headers::from([("tenant".into(), text("prefixed"))]));
        assert_eq!(call.call_id_stack, ["real.m.1".to_owned(), call.call_id.clone()]);

        // a bare stack alone is a stack, as Nameko reads it, and never context data
        let bare = Headers::from([("call_id_stack".into(), text("bare.m.1"))]);
        let call = CallContext::for_call(&bare, "svc", "m", 10);
        assert!(call.data.is_empty());
        assert_eq!(call.call_id_stack, ["bare.m.1".to_owned(), call.call_id.clone()]);
        let out = call.outgoing_headers();
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("nameko.call_id_stack"));
    }

    /// A peer may send any header name up to the 255 bytes of an AMQP short string; one of
    /// 249 bytes or more would go out as `nameko.{name}`, over 255, and the broker would
    /// refuse every message of the call.
    #[test]
    fn a_key_too_long_to_go_out_prefixed_stays_context_but_is_not_forwarded() {
        let fits = "f".repeat(255 - HEADER_PREFIX.len());
        let over = "o".repeat(256 - HEADER_PREFIX.len());
        let longest_legal = "l".repeat(255);
        let headers = Headers::from([
            (fits.clone(), text("fits")),
            (over.clone(), text("over")),
            (longest_legal.clone(), text("legal in, too long out")),
            (format!("{HEADER_PREFIX}{}", "p".repeat(248)), text("prefixed")),
            ("tenant".into(), text("acme")),
        ]);
        let call = CallContext::for_call(&headers, "svc", "m", 10);
        assert_eq!(call.data.len(), 5, "the handler still reads every key");
        let out = call.outgoing_headers();
        assert!(out.keys().all(|name| name.len() <= 255), "{:?}", out.keys());
        assert_eq!(out[&format!("{HEADER_PREFIX}{fits}")], text("fits"));
        assert_eq!(out[&format!("{HEADER_PREFIX}{}", "p".repeat(248))], text("prefixed"));
        assert_eq!(out["nameko.tenant"], text("acme"));
        assert!(!out.contains_key(&format!("{HEADER_PREFIX}{over}")));
        assert!(!out.contains_key(&format!("{HEADER_PREFIX}{longest_legal}")));
        assert_eq!(out.len(), 4, "three keys and the stack: {:?}", out.keys());
    }

    #[test]
    fn a_call_warns_once_of_the_keys_it_does_not_forward() {
        let over = "o".repeat(249);
        let headers = Headers::from([(over, text("v")), ("l".repeat(255), text("v"))]);
        let ((), logged) = warnings_of(|| {
            let call = CallContext::for_call(&headers, "svc", "m", 10);
            // each dependency of the call asks for the headers: the warning is the call's
            call.outgoing_headers();
            call.outgoing_headers();
        });
        assert_eq!(logged.matches("WARN").count(), 1, "{logged}");
        // each key named by its start and length, not in full
        assert!(logged.contains(&format!("{}... (249 bytes)", "o".repeat(32))), "{logged}");
        assert!(logged.contains(&format!("{}... (255 bytes)", "l".repeat(32))), "{logged}");
        assert!(!logged.contains(&"o".repeat(33)), "{logged}");

        let fitting = Headers::from([("f".repeat(248), text("v"))]);
        let ((), quiet) = warnings_of(|| {
            CallContext::for_call(&fitting, "svc", "m", 10).outgoing_headers();
        });
        assert_eq!(quiet, "");
    }
}
