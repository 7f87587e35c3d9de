//! The body of a retry in the Python original's layout: the call wrapped as
//! `{"fn_args": [payload], "fn_kwargs": {}, "_meta": {"backoff": {"retry_count": n,
//! "last_retry": seconds}, ...}}`. The payload travels as the exact JSON text it came as, and
//! `_meta` keys this framework does not know are kept as they came.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::data::Message;

/// The `_meta` key of the retry state.
const BACKOFF: &str = "backoff";

/// The `_meta` of a wrapped retry, every key kept as it came (empty for a first failure).
#[derive(Debug, Default)]
pub(crate) struct RetryMeta(BTreeMap<String, Box<RawValue>>);

/// A retry read from a backoff queue.
#[derive(Debug)]
pub(crate) struct Unwrapped {
    /// The payload of the call, as the JSON text it was wrapped as.
    pub payload: Box<RawValue>,
    /// `_meta.backoff.retry_count`, when the body has one.
    pub retry_count: Option<u32>,
    /// `_meta.backoff.last_retry`, when it is a time.
    pub last_retry: Option<SystemTime>,
    /// The whole `_meta`, for the next retry.
    pub meta: RetryMeta,
}

#[derive(Deserialize)]
#[serde(rename = "AsyncBackOff retry")]
struct WrappedIn {
    fn_args: Vec<Box<RawValue>>,
    fn_kwargs: Map<String, Value>,
    #[serde(rename = "_meta", default)]
    meta: Option<BTreeMap<String, Box<RawValue>>>,
}

#[derive(Serialize)]
struct WrappedOut<'a> {
    fn_args: [&'a RawValue; 1],
    fn_kwargs: Map<String, Value>,
    #[serde(rename = "_meta")]
    meta: &'a BTreeMap<String, Box<RawValue>>,
}

/// Read a wrapped retry; the error says what does not fit the layout.
pub(crate) fn unwrap(message: &Message) -> Result<Unwrapped, String> {
    let wrapped: WrappedIn = message.decode_into().map_err(|error| error.to_string())?;
    let [payload]: [Box<RawValue>; 1] = wrapped.fn_args.try_into().map_err(|args: Vec<_>| {
        format!("fn_args holds {} values; a route takes one payload", args.len())
    })?;
    if !wrapped.fn_kwargs.is_empty() {
        let names: Vec<&String> = wrapped.fn_kwargs.keys().collect();
        return Err(format!("fn_kwargs {names:?} given; a route takes one payload and no kwargs"));
    }
    let meta = wrapped.meta.unwrap_or_default();
    let (retry_count, last_retry) = match meta.get(BACKOFF) {
        None => (None, None),
        Some(raw) => read_backoff(raw)?,
    };
    Ok(Unwrapped { payload, retry_count, last_retry, meta: RetryMeta(meta) })
}

/// `retry_count` (an integer from 0) and `last_retry` (seconds, or `null`) of `_meta.backoff`.
fn read_backoff(raw: &RawValue) -> Result<(Option<u32>, Option<SystemTime>), String> {
    let backoff: Map<String, Value> = serde_json::from_str(raw.get())
        .map_err(|_| format!("_meta.backoff is not an object: {}", raw.get()))?;
    let retry_count = match backoff.get("retry_count") {
        Some(Value::Number(count)) if count.is_u64() => count.as_u64(),
        Some(other) => return Err(format!("_meta.backoff.retry_count is not a count: {other}")),
        None => return Err("_meta.backoff has no retry_count".to_owned()),
    };
    let last_retry = match backoff.get("last_retry") {
        None | Some(Value::Null) => None,
        Some(Value::Number(seconds)) => seconds
            .as_f64()
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .and_then(|since| UNIX_EPOCH.checked_add(since)),
        Some(other) => return Err(format!("_meta.backoff.last_retry is not a time: {other}")),
    };
    Ok((retry_count.map(|count| u32::try_from(count).unwrap_or(u32::MAX)), last_retry))
}

/// The payload of `message` as JSON text, to be wrapped: a JSON body as it is; a text body
/// as a JSON string; an empty body as `null`. Other bodies cannot be wrapped.
pub(crate) fn payload_of(message: &Message) -> Result<Box<RawValue>, String> {
    message.decode_into::<Box<RawValue>>().or_else(|_| {
        let value = message.decode().map_err(|error| error.to_string())?;
        serde_json::value::to_raw_value(&value).map_err(|error| error.to_string())
    })
}

/// The body of a retry of `payload`: `meta` with `backoff.retry_count` and
/// `backoff.last_retry` set (other keys of `backoff` kept).
pub(crate) fn wrap(
    payload: &RawValue,
    meta: &RetryMeta,
    retry_count: u32,
    last_retry: SystemTime,
) -> Result<Vec<u8>, String> {
    let mut backoff = match meta.0.get(BACKOFF) {
        Some(raw) => serde_json::from_str::<Map<String, Value>>(raw.get()).unwrap_or_default(),
        None => Map::new(),
    };
    let seconds = last_retry.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    backoff.insert("retry_count".into(), retry_count.into());
    backoff.insert("last_retry".into(), seconds.into());
    let mut meta = meta.0.clone();
    let backoff = serde_json::value::to_raw_value(&backoff).map_err(|error| error.to_string())?;
    meta.insert(BACKOFF.into(), backoff);
    let wrapped = WrappedOut { fn_args: [payload], fn_kwargs: Map::new(), meta: &meta };
    serde_json::to_vec(&wrapped).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(body: &str) -> Message {
        Message { body: Bytes::from(body.to_owned()), ..Message::default() }
    }

    #[test]
    fn a_python_retry_unwraps_to_its_exact_payload_and_state() {
        let body = r#"{"fn_args": [{"b": 1, "a": 123456789012345678901234567890}], "fn_kwargs": {},
            "_meta": {"trace": [1, 2], "backoff": {"retry_count": 2, "last_retry": 1700000000.25}}}"#;
        let unwrapped = unwrap(&message(body)).unwrap();
        assert_eq!(unwrapped.payload.get(), r#"{"b": 1, "a": 123456789012345678901234567890}"#);
        assert_eq!(unwrapped.retry_count, Some(2));
        let expected = UNIX_EPOCH + Duration::from_secs_f64(1_700_000_000.25);
        assert_eq!(unwrapped.last_retry, Some(expected));
        let plain = unwrap(&message(r#"{"fn_args": ["x"], "fn_kwargs": {}}"#)).unwrap();
        assert_eq!(
            (plain.payload.get(), plain.retry_count, plain.last_retry),
            (r#""x""#, None, None)
        );
    }

    #[test]
    fn rewrapping_keeps_unknown_meta_and_sets_the_retry_state() {
        let body = r#"{"fn_args": [[1, 2.50]], "fn_kwargs": {},
            "_meta": {"trace": {"id": "t"}, "backoff": {"retry_count": 2, "last_retry": null, "mine": 1}}}"#;
        let unwrapped = unwrap(&message(body)).unwrap();
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        let wrapped = wrap(&unwrapped.payload, &unwrapped.meta, 3, at).unwrap();
        let value: Value = serde_json::from_slice(&wrapped).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "fn_args": [[1, 2.5]],
                "fn_kwargs": {},
                "_meta": {"trace": {"id": "t"},
                          "backoff": {"retry_count": 3, "last_retry": 1_700_000_000.5, "mine": 1}}
            })
        );
        assert!(String::from_utf8(wrapped).unwrap().contains("[[1, 2.50]]"), "the payload's text");
        let first = wrap(&unwrapped.payload, &RetryMeta::default(), 1, at).unwrap();
        let value: Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(
            value["_meta"],
            serde_json::json!({"backoff": {"retry_count": 1, "last_retry": 1_700_000_000.5}})
        );
    }

    #[test]
    fn malformed_bodies_say_what_does_not_fit() {
        for (body, expected) in [
            ("not json", "not valid JSON"),
            ("[1]", "invalid type"),
            (r#"{"fn_kwargs": {}}"#, "missing field `fn_args`"),
            (r#"{"fn_args": [1]}"#, "missing field `fn_kwargs`"),
            (r#"{"fn_args": "x", "fn_kwargs": {}}"#, "invalid type"),
            (r#"{"fn_args": [], "fn_kwargs": {}}"#, "fn_args holds 0 values"),
            (r#"{"fn_args": [1, 2], "fn_kwargs": {}}"#, "fn_args holds 2 values"),
            (r#"{"fn_args": [1], "fn_kwargs": {"x": 1}}"#, r#"fn_kwargs ["x"] given"#),
            (r#"{"fn_args": [1], "fn_kwargs": [], "_meta": {}}"#, "invalid type"),
            (r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": 3}"#, "invalid type"),
            (r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": {"backoff": [1]}}"#, "not an object"),
            (r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": {"backoff": {}}}"#, "no retry_count"),
            (
                r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": {"backoff": {"retry_count": -1}}}"#,
                "retry_count is not a count: -1",
            ),
            (
                r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": {"backoff": {"retry_count": 1.5}}}"#,
                "retry_count is not a count: 1.5",
            ),
            (
                r#"{"fn_args": [1], "fn_kwargs": {}, "_meta": {"backoff": {"retry_count": 1, "last_retry": "now"}}}"#,
                "last_retry is not a time",
            ),
        ] {
            let error = unwrap(&message(body)).unwrap_err();
            assert!(error.contains(expected), "{body}: {error}");
        }
    }

    #[test]
    fn payloads_are_json_text_and_other_bodies_are_refused() {
        assert_eq!(payload_of(&message(" {\"a\": 1} ")).unwrap().get(), "{\"a\": 1}");
        assert_eq!(payload_of(&message("")).unwrap().get(), "null");
        let mut text = message("héllo");
        text.properties.content_type = Some("text/plain".into());
        assert_eq!(payload_of(&text).unwrap().get(), "\"héllo\"");
        assert!(payload_of(&message("{oops")).unwrap_err().contains("not valid JSON"));
        let mut binary = message("\u{0}");
        binary.properties.content_type = Some("application/octet-stream".into());
        assert!(payload_of(&binary).unwrap_err().contains("unsupported content type"));
    }
}
