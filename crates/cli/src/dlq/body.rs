//! A dead letter's body as `dlq show` prints it: `body`, with `body_encoding` saying how to
//! read it and `body_size` its length in bytes.

use serde_json::{Map, Value};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Insert `body`, `body_encoding` and `body_size` into `described`:
/// - `json`: a body that is JSON, as that JSON value;
/// - `text`: a body that is UTF-8 text but not JSON, as that text;
/// - `base64`: any other body (binary), its bytes in base64.
///
/// The encoding is always given: without it a text body and a JSON body that is a string
/// (`"abc"`, with its quotes) would print alike.
pub fn insert(described: &mut Map<String, Value>, body: &[u8]) {
    let (value, encoding) = match serde_json::from_slice::<Value>(body) {
        Ok(json) => (json, "json"),
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => (Value::from(text), "text"),
            // base64: 4/3 of the body, where an array of byte values took ~10 bytes of output
            // and a 32-byte JSON value per byte of the body
            Err(_) => (Value::from(STANDARD.encode(body)), "base64"),
        },
    };
    described.insert("body".into(), value);
    described.insert("body_encoding".into(), encoding.into());
    described.insert("body_size".into(), body.len().into());
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn described(body: &[u8]) -> Value {
        let mut map = Map::new();
        insert(&mut map, body);
        Value::Object(map)
    }

    #[test]
    fn bodies_say_how_they_are_encoded() {
        assert_eq!(
            described(br#"{"id": 1}"#),
            json!({"body": {"id": 1}, "body_encoding": "json", "body_size": 9})
        );
        assert_eq!(
            described(br#""abc""#),
            json!({"body": "abc", "body_encoding": "json", "body_size": 5})
        );
        assert_eq!(
            described(b"abc"),
            json!({"body": "abc", "body_encoding": "text", "body_size": 3})
        );
        assert_eq!(
            described(&[0xff, 0x00, 0x41]),
            json!({"body": "/wBB", "body_encoding": "base64", "body_size": 3})
        );
    }
}
