//! [`Message`]: what an entrypoint hands to a worker, whatever its source.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::extensions::Extensions;
use crate::data::headers::Properties;
use crate::data::media_type;

/// One incoming message: its body and AMQP properties plus where it came from.
///
/// It is plain data (serializable) so that a call can run in another process.
///
/// ```
/// use micro_framework::Message;
/// let message = Message::json(&serde_json::json!({"id": 1})).unwrap();
/// assert_eq!(message.properties.content_type.as_deref(), Some("application/json"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The raw body.
    pub body: Bytes,
    /// AMQP properties, headers included.
    pub properties: Properties,
    /// The exchange it was published to (empty for timers and the default exchange).
    pub exchange: String,
    /// Its routing key (the event name for events, `service.method` for RPC).
    pub routing_key: String,
    /// True when the broker delivered it before.
    pub redelivered: bool,
    /// What its entrypoint adds beyond AMQP (an HTTP request's method, path and query, ...),
    /// as plain data, so that it crosses process boundaries with the message.
    #[serde(default, skip_serializing_if = "Extensions::is_empty")]
    pub extensions: Extensions,
}

impl Message {
    /// A message with a JSON body.
    pub fn json<T: Serialize + ?Sized>(payload: &T) -> Result<Self, serde_json::Error> {
        Ok(Message {
            body: Bytes::from(serde_json::to_vec(payload)?),
            properties: json_properties(),
            ..Message::default()
        })
    }

    /// Decode the body as JSON (an empty body is `null`; `text/plain` is a JSON string).
    ///
    /// ```
    /// use micro_framework::{DecodeError, Message};
    /// let mut message = Message::json(&[1, 2]).unwrap();
    /// assert_eq!(message.decode(), Ok(serde_json::json!([1, 2])));
    /// message.body = "{oops".into();
    /// assert!(matches!(message.decode(), Err(DecodeError::NotJson { .. })));
    /// ```
    pub fn decode(&self) -> Result<Value, DecodeError> {
        self.decode_into()
    }

    /// Decode the body as [`decode`](Message::decode) does, straight into `T`: checking a
    /// body's shape with `T` made of [`IgnoredAny`](serde::de::IgnoredAny) copies nothing.
    pub(crate) fn decode_into<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let content_type = self.properties.content_type.as_deref().unwrap_or("application/json");
        let essence = media_type::essence(content_type);
        let shape = |error: serde_json::Error| DecodeError::DoesNotFit(error.to_string());
        // kombu compresses a body when its publisher asks (`compression='zlib'`) and says so in
        // this header; read as JSON, such a body gives only a parse error at its first byte
        if let Some(compression) = self.properties.headers.get("compression") {
            let compression = compression.as_str().unwrap_or("?");
            return Err(DecodeError::Compressed(compression.to_owned()));
        }
        match essence.as_str() {
            _ if self.body.is_empty() => T::deserialize(Value::Null).map_err(shape),
            json if json.is_empty() || media_type::is_json(json) => {
                serde_json::from_slice(&self.body)
                    .map_err(|error| DecodeError::of_json(&self.body, &error))
            }
            "text/plain" => {
                std::str::from_utf8(&self.body).map_err(DecodeError::NotUtf8).and_then(|text| {
                    T::deserialize(serde::de::value::StrDeserializer::<serde_json::Error>::new(
                        text,
                    ))
                    .map_err(shape)
                })
            }
            other => Err(DecodeError::UnsupportedContentType(other.to_owned())),
        }
    }
}

/// Why a message's body could not be decoded ([`Message::decode`]): bad input, which a
/// route dead-letters and never retries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// kombu compressed the body (the compression its `compression` header names), which is
    /// not read.
    #[error(
        "body is compressed ({0}, kombu's `compression` header), which is not read: publish it \
         uncompressed"
    )]
    Compressed(String),
    /// The body is not JSON.
    #[error("body is not valid JSON{}: {error}", hint.map(|hint| format!(" ({hint})")).unwrap_or_default())]
    NotJson {
        /// What the JSON parser said.
        error: String,
        /// The likely cause, where one is known (a byte-order mark, Python's `NaN`, a
        /// Python value's repr).
        hint: Option<&'static str>,
    },
    /// The body is JSON holding a number beyond a 64-bit float's range, which is not read.
    #[error("body {beyond}: {0}", beyond = BEYOND_A_FLOAT)]
    NumberBeyondAFloat(String),
    /// A `text/plain` body that is not UTF-8. Where it is not is said in the message, which
    /// is the bad input's reason a dead letter or an error reply carries, so it is no
    /// [`source`](std::error::Error::source) too (a chain reporter would show it twice).
    #[error("text/plain body is not UTF-8: {0}")]
    NotUtf8(std::str::Utf8Error),
    /// The body does not fit the type it is decoded into.
    #[error("body does not fit: {0}")]
    DoesNotFit(String),
    /// A content type other than JSON or plain text.
    #[error(
        "unsupported content type '{0}' (expected application/json, application/*+json or \
         text/plain)"
    )]
    UnsupportedContentType(String),
}

impl DecodeError {
    /// Why `body`, which serde read as JSON with `error`, is not read: with its likely cause
    /// where one is known, as serde's message names none.
    pub(crate) fn of_json(body: &[u8], error: &serde_json::Error) -> DecodeError {
        if holds_a_number_beyond_a_float(error) {
            DecodeError::NumberBeyondAFloat(error.to_string())
        } else {
            DecodeError::NotJson { hint: hint(body, error), error: error.to_string() }
        }
    }
}

/// What a body holding a lone surrogate is told: the JSON is well-formed, and serde's message
/// ("unexpected end of hex escape") points elsewhere.
const LONE_SURROGATE: &str =
    "it holds a lone UTF-16 surrogate, an escape \\ud800 to \\udfff without its pair, which \
     Python strings allow and Unicode text does not: send valid text";

/// Whether serde's `error` reading `body` comes from a lone surrogate: serde names only the
/// escape it stopped at, and the body holds one in the `\\ud800`-`\\udfff` range.
fn holds_a_lone_surrogate(body: &[u8], error: &serde_json::Error) -> bool {
    let message = error.to_string();
    (message.contains("surrogate") || message.contains("end of hex escape"))
        && memchr::memmem::find_iter(body, b"\\u").any(|at| {
            body.get(at + 2..at + 4).is_some_and(|hex| {
                hex[0].eq_ignore_ascii_case(&b'd') && b"89abcdefABCDEF".contains(&hex[1])
            })
        })
}

/// What a body holding a number serde_json cannot read is told.
const BEYOND_A_FLOAT: &str = "holds a number beyond a 64-bit float's range (a Python \
    integer of more than 308 digits), which is not read: send it as a string";

/// Whether `error` is of valid JSON (which has no limit on numbers) holding a number beyond
/// what serde_json reads.
fn holds_a_number_beyond_a_float(error: &serde_json::Error) -> bool {
    error.to_string().starts_with("number out of range")
}

/// What serde's error does not say of a body that is not JSON, where a cause is known: its
/// message says only "expected value".
fn hint(body: &[u8], error: &serde_json::Error) -> Option<&'static str> {
    // Python's json refuses a byte-order mark too, but names it
    if body.starts_with(b"\xef\xbb\xbf") {
        return Some("it starts with a UTF-8 byte-order mark, which JSON does not allow");
    }
    if holds_a_lone_surrogate(body, error) {
        return Some(LONE_SURROGATE);
    }
    // Python's json writes a float that is no number this way unless told not to
    // (`allow_nan=False`), and so do kombu's and Nameko's serializers
    let at = body
        .split(|byte| *byte == b'\n')
        .nth(error.line().saturating_sub(1))
        .and_then(|line| line.get(error.column().saturating_sub(1)..));
    const NO_NUMBERS: [&[u8]; 3] = [b"NaN", b"Infinity", b"-Infinity"];
    // a publisher that sent `str(value)` instead of `json.dumps(value)`
    const PYTHON_REPR: [&[u8]; 4] = [b"'", b"True", b"False", b"None"];
    let starts =
        |tokens: &[&[u8]]| at.is_some_and(|rest| tokens.iter().any(|t| rest.starts_with(t)));
    if starts(&NO_NUMBERS) {
        Some(
            "NaN and Infinity, which Python's json writes for a float that is no number, are \
             not JSON: send null or a string instead",
        )
    } else if starts(&PYTHON_REPR) {
        Some(
            "it reads as a Python value's repr, with quotes ' or True, False, None: publish \
             json.dumps(value), not str(value)",
        )
    } else {
        None
    }
}

/// Properties of a persistent JSON message (`application/json`, `utf-8`, delivery mode 2).
pub fn json_properties() -> Properties {
    Properties {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        delivery_mode: Some(2),
        ..Properties::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_json_text_and_empty_bodies() {
        let json = Message::json(&[1, 2]).unwrap();
        assert_eq!(json.decode().unwrap(), serde_json::json!([1, 2]));
        let mut text = Message { body: Bytes::from_static(b"hi"), ..Message::default() };
        text.properties.content_type = Some("text/plain; charset=utf-8".into());
        assert_eq!(text.decode().unwrap(), Value::String("hi".into()));
        assert_eq!(Message::default().decode().unwrap(), Value::Null);
        let mut shouted = Message { body: Bytes::from_static(b"[3]"), ..Message::default() };
        shouted.properties.content_type = Some("Application/JSON; Charset=UTF-8".into());
        assert_eq!(shouted.decode().unwrap(), serde_json::json!([3]), "media types ignore case");
    }

    #[test]
    fn extensions_travel_with_the_message() {
        let mut message = Message::json(&1).unwrap();
        message.extensions.insert("http", &serde_json::json!({"method": "GET"})).unwrap();
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), message);
        let plain = serde_json::to_value(Message::default()).unwrap();
        assert!(plain.get("extensions").is_none(), "no extensions on broker messages");
    }

    #[test]
    fn a_number_beyond_a_float_is_named_and_told_to_travel_as_a_string() {
        // 2**64 still reads, as a float; 10**400 (Python writes it in full) reads as none
        let big =
            Message { body: Bytes::from_static(b"[18446744073709551616]"), ..Message::default() };
        assert_eq!(big.decode().unwrap(), serde_json::json!([1.8446744073709552e19]));
        let huge = format!("[1{}]", "0".repeat(400));
        let huge = Message { body: Bytes::from(huge), ..Message::default() };
        let error = huge.decode().unwrap_err().to_string();
        assert!(error.starts_with("body holds a number beyond a 64-bit float's range"), "{error}");
        assert!(error.contains("send it as a string"), "{error}");
    }

    #[test]
    fn reads_json_suffixed_content_types_as_json() {
        let mut message = Message::json(&[1, 2]).unwrap();
        message.properties.content_type = Some("application/vnd.api+json; charset=utf-8".into());
        assert_eq!(message.decode(), Ok(serde_json::json!([1, 2])));
    }

    #[test]
    fn refuses_bad_json_and_unknown_content_types() {
        let bad = Message { body: Bytes::from_static(b"{oops"), ..Message::default() };
        assert!(bad.decode().unwrap_err().to_string().contains("not valid JSON"));
        let mut binary = Message { body: Bytes::from_static(b"\x00"), ..Message::default() };
        binary.properties.content_type = Some("application/octet-stream".into());
        let refused = binary.decode().unwrap_err().to_string();
        assert!(refused.contains("unsupported content type"), "{refused}");
        assert!(refused.contains("application/*+json or text/plain)"), "what is read: {refused}");
    }

    #[test]
    fn names_the_floats_python_writes_that_json_has_not() {
        for body in [&b"{\"ratio\": NaN}"[..], b"[1,\n Infinity]", b"{\"x\": -Infinity}"] {
            let message = Message { body: Bytes::copy_from_slice(body), ..Message::default() };
            let refused = message.decode().unwrap_err().to_string();
            assert!(refused.contains("NaN and Infinity, which Python's json writes"), "{refused}");
        }
        let other = Message { body: Bytes::from_static(b"{\"x\": Nope}"), ..Message::default() };
        let refused = other.decode().unwrap_err().to_string();
        assert!(!refused.contains("NaN") && !refused.contains("repr"), "{refused}");
    }

    #[test]
    fn names_a_lone_surrogate_which_python_strings_allow() {
        for body in [&br#"["a\ud800b"]"#[..], br#"{"x": "\udc00"}"#, br#"["\uD83D\u0041"]"#] {
            let message = Message { body: Bytes::copy_from_slice(body), ..Message::default() };
            let refused = message.decode().unwrap_err().to_string();
            assert!(refused.contains("lone UTF-16 surrogate"), "{refused}");
        }
        let paired = Message::json(&"\u{1F600}").unwrap();
        assert!(paired.decode().is_ok());
        let truncated = Message { body: Bytes::from_static(br#"["\u12"]"#), ..Message::default() };
        let refused = truncated.decode().unwrap_err().to_string();
        assert!(!refused.contains("surrogate"), "{refused}");
    }

    /// Hex digits are read in either case (Java's and .NET's encoders write `\uDBFF`): a lone
    /// surrogate whose second digit is an upper-case letter is named too.
    #[test]
    fn names_a_lone_surrogate_written_in_upper_case_hex() {
        for body in [&br#"["\uDBFFx"]"#[..], br#"{"x": "\uDC00"}"#, br#"["a\udAff"]"#] {
            let message = Message { body: Bytes::copy_from_slice(body), ..Message::default() };
            let refused = message.decode().unwrap_err().to_string();
            assert!(refused.contains("lone UTF-16 surrogate"), "{refused}");
        }
    }

    #[test]
    fn names_a_python_repr_sent_for_json() {
        for body in [&b"{'id': 1}"[..], b"{\"ok\": True}", b"[1, None]", b"{\"a\": 'x'}"] {
            let message = Message { body: Bytes::copy_from_slice(body), ..Message::default() };
            let refused = message.decode().unwrap_err().to_string();
            assert!(refused.contains("json.dumps(value), not str(value)"), "{refused}");
        }
    }

    #[test]
    fn names_compressed_bodies_and_byte_order_marks() {
        let mut zipped = Message::json(&1).unwrap();
        zipped.properties.headers.insert("compression".into(), "application/x-gzip".into());
        let refused = zipped.decode().unwrap_err().to_string();
        assert!(refused.contains("compressed (application/x-gzip"), "{refused}");
        let marked = Message { body: Bytes::from_static(b"\xef\xbb\xbf{}"), ..Message::default() };
        let refused = marked.decode().unwrap_err().to_string();
        assert!(
            refused.contains("not valid JSON (it starts with a UTF-8 byte-order mark"),
            "{refused}"
        );
    }
}
