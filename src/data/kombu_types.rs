//! kombu's typed JSON envelopes. kombu 5.3 and later (the JSON encoder of Nameko's and
//! micro-framework's publishers) writes a `datetime`, `date`, `time`, `Decimal`, `UUID` or
//! `bytes` as `{"__type__": T, "__value__": V}`, which a target reading that value as text
//! would refuse. Read here as the text Python gives for it: `isoformat()` for dates and times
//! and `str()` for the others, which is what kombu writes, except for a UUID (kombu writes
//! `{"hex": ...}`, read as the hyphenated `str()` form). Bytes stay in kombu's form: the text
//! for UTF-8 bytes, base64 for others.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// The first key of an envelope as kombu writes it.
const MARKER: &[u8] = b"\"__type__\"";

/// The envelopes whose value kombu writes as the text itself.
const TEXTUAL: [&str; 6] = ["datetime", "date", "time", "decimal", "bytes", "base64"];

/// `value`, decoded from `body`, with each envelope in it read as its text. Only a body that
/// holds the marker is walked (a copy), so that other bodies cost a byte search and no more.
pub(crate) fn kombu_types_as_text<'v>(body: &[u8], value: &'v Value) -> Cow<'v, Value> {
    if !may_hold_kombu_types(body) {
        return Cow::Borrowed(value);
    }
    let mut read = value.clone();
    replace_envelopes(&mut read);
    Cow::Owned(read)
}

/// Whether `body` may hold an envelope (the marker, byte for byte).
pub(crate) fn may_hold_kombu_types(body: &[u8]) -> bool {
    memchr::memmem::find(body, MARKER).is_some()
}

/// Replace each envelope in `value` by its text; any other object is left as it is.
fn replace_envelopes(value: &mut Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(replace_envelopes),
        Value::Object(map) => match envelope_text(map) {
            Some(text) => *value = Value::String(text),
            None => map.values_mut().for_each(replace_envelopes),
        },
        _ => {}
    }
}

/// The text of `map` when it is exactly an envelope of a type kombu writes (kombu itself
/// refuses other types): these two keys only, its value of the form kombu gives it.
fn envelope_text(map: &Map<String, Value>) -> Option<String> {
    if map.len() != 2 {
        return None;
    }
    let kind = map.get("__type__")?.as_str()?;
    match (kind, map.get("__value__")?) {
        (kind, Value::String(text)) if TEXTUAL.contains(&kind) => Some(text.clone()),
        ("uuid", Value::Object(fields)) => uuid_text(fields),
        _ => None,
    }
}

/// `str(uuid.UUID(hex=...))` of kombu's `{"hex": "<32 hex digits>"}`: lowercase, 8-4-4-4-12.
fn uuid_text(fields: &Map<String, Value>) -> Option<String> {
    let hex = fields.get("hex")?.as_str()?;
    // 32 characters: only the simple form parses (the others are longer), as kombu writes it
    if fields.len() != 1 || hex.len() != 32 {
        return None;
    }
    uuid::Uuid::try_parse(hex).ok().map(|uuid| uuid.hyphenated().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `body` decodes to with its envelopes read as text.
    fn read(body: &str) -> Value {
        let value: Value = serde_json::from_str(body).unwrap();
        kombu_types_as_text(body.as_bytes(), &value).into_owned()
    }

    #[test]
    fn a_uuid_is_read_from_32_hex_digits_only_and_written_lowercase() {
        let text = |hex: &str| uuid_text(json!({ "hex": hex }).as_object().unwrap());
        let upper = "ABCDEF0123456789ABCDEF0123456789";
        assert_eq!(text(upper).as_deref(), Some("abcdef01-2345-6789-abcd-ef0123456789"));
        assert_eq!(text("g2345678123456781234567812345678"), None);
        assert_eq!(text("1234567-1234-1234-1234-123456789"), None);
        assert_eq!(text("12345678-1234-1234-1234-123456789012"), None);
        assert_eq!(text("+2345678123456781234567812345678"), None);
    }

    #[test]
    fn each_type_kombu_writes_reads_as_its_python_text() {
        // the body kombu 5.7's encoder writes for these values, byte for byte
        let body = r#"{"at": {"__type__": "datetime", "__value__": "2026-01-02T03:04:05.123456"},
            "tz": {"__type__": "datetime", "__value__": "2026-01-02T00:00:00+00:00"},
            "d": {"__type__": "date", "__value__": "2026-01-02"},
            "t": {"__type__": "time", "__value__": "03:04:05"},
            "n": {"__type__": "decimal", "__value__": "10.50"},
            "u": {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}},
            "b": {"__type__": "bytes", "__value__": "hi"},
            "b64": {"__type__": "base64", "__value__": "/w=="}}"#;
        let expected = json!({
            "at": "2026-01-02T03:04:05.123456", "tz": "2026-01-02T00:00:00+00:00",
            "d": "2026-01-02", "t": "03:04:05", "n": "10.50",
            "u": "12345678-1234-5678-1234-567812345678", "b": "hi", "b64": "/w==",
        });
        assert_eq!(read(body), expected);
    }

    #[test]
    fn envelopes_nested_in_arrays_and_objects_are_read() {
        let body = r#"{"args": [[{"__type__": "decimal", "__value__": "1E+2"}]],
            "kwargs": {"x": {"y": {"__type__": "date", "__value__": "2026-01-02"}}}}"#;
        assert_eq!(read(body), json!({"args": [["1E+2"]], "kwargs": {"x": {"y": "2026-01-02"}}}));
    }

    #[test]
    fn objects_that_are_not_exactly_an_envelope_are_left_as_they_are() {
        for body in [
            r#"{"__type__": "datetime", "__value__": "2026-01-02", "extra": 1}"#,
            r#"{"__type__": "datetime"}"#,
            r#"{"__type__": "mine", "__value__": "x"}"#,
            r#"{"__type__": 1, "__value__": "x"}"#,
            r#"{"__type__": "datetime", "__value__": 5}"#,
            r#"{"__type__": "uuid", "__value__": "12345678123456781234567812345678"}"#,
            r#"{"__type__": "uuid", "__value__": {"hex": "not hex"}}"#,
            r#"{"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678", "v": 4}}"#,
            r#"["__type__", "__value__"]"#,
        ] {
            let value: Value = serde_json::from_str(body).unwrap();
            assert_eq!(read(body), value, "{body}");
        }
    }

    /// `str(uuid.UUID(hex=...))` is lowercase whatever the case of the hex kombu was given.
    /// Mutant: the hex kept in its case.
    #[test]
    fn a_uuid_envelope_with_uppercase_hex_reads_as_the_lowercase_text() {
        let body = r#"{"id": {"__type__": "uuid", "__value__": {"hex": "ABCDEF0123456789ABCDEF0123456789"}}}"#;
        assert_eq!(read(body), json!({"id": "abcdef01-2345-6789-abcd-ef0123456789"}));
    }

    /// A `hex` that is not 32 digits is no UUID kombu writes: the object is left as it is.
    /// Mutant: the length not checked (a 31-digit hex read as a malformed UUID text, a shorter
    /// one panicking on its slices).
    #[test]
    fn a_uuid_envelope_whose_hex_is_not_32_digits_is_left_as_it_is() {
        for hex in
            ["ABCDEF0123456789ABCDEF012345678", "abcdef0123456789abcdef01234567890", "abcdef01"]
        {
            let payload = json!({"id": {"__type__": "uuid", "__value__": {"hex": hex}}});
            assert_eq!(read(&payload.to_string()), payload, "{hex}");
        }
    }

    #[test]
    fn only_a_body_with_the_marker_is_walked() {
        let body = br#"{"id": 1, "note": "a __type__"}"#;
        let value: Value = serde_json::from_slice(body).unwrap();
        assert!(matches!(kombu_types_as_text(body, &value), Cow::Borrowed(_)));
        let marked = br#"{"__type__": "date", "__value__": "2026-01-02"}"#;
        assert!(may_hold_kombu_types(marked));
        assert!(!may_hold_kombu_types(br#"{"type": "date"}"#));
    }
}
