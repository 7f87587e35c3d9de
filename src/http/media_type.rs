//! `HTTP_REQUIRE_JSON_CONTENT_TYPE`: whether a request declares its body JSON.
//!
//! A web page of any site can send a body labelled `text/plain`, form-encoded or not labelled
//! at all without a CORS preflight; a JSON content type needs one, which the service never
//! grants. Requiring it keeps browsers of other sites from calling a JSON route.

use axum::http::{header, HeaderMap};

use crate::data::media_type::{essence, is_json};

/// Whether `headers` declare the body JSON: `application/json` or `application/*+json`, in
/// any case, parameters such as `charset` allowed (as [`Message::decode`] reads them).
///
/// [`Message::decode`]: crate::Message::decode
pub(super) fn declares_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|declared| is_json(&essence(declared)))
}

/// The `Content-Type` of `headers` as an error message quotes it (none, or its text).
pub(super) fn declared(headers: &HeaderMap) -> String {
    match headers.get(header::CONTENT_TYPE) {
        None => "none".to_owned(),
        Some(value) => format!("{:?}", String::from_utf8_lossy(value.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(content_type: Option<&[u8]>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(content_type) = content_type {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_bytes(content_type).unwrap());
        }
        headers
    }

    #[test]
    fn a_body_is_declared_json_by_a_json_content_type_only() {
        assert!(declares_json(&with(Some(b"application/vnd.api+json; charset=utf-8"))));
        assert!(!declares_json(&with(Some(b"text/plain"))));
        assert!(!declares_json(&with(None)));
        assert!(!declares_json(&with(Some(b"application/json\xff"))), "not text");
    }

    #[test]
    fn the_declared_type_is_quoted_or_none() {
        assert_eq!(declared(&with(None)), "none");
        assert_eq!(declared(&with(Some(b"text/plain"))), "\"text/plain\"");
    }
}

/// Fuzzing the JSON requirement against what browsers send without a preflight.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::data::fuzz_support::config;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    /// Whether a browser sends `value` as `Content-Type` without a CORS preflight: the Fetch
    /// standard's CORS-safelisted request-header (at most 128 bytes, no unsafe byte, and a
    /// MIME type, as WHATWG parses it, of a form or of plain text).
    fn safelisted(value: &[u8]) -> bool {
        let unsafe_byte =
            |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f || b"\"():<>?@[\\]{}".contains(b);
        let Ok(text) = std::str::from_utf8(value) else { return false };
        let http_space = |c: char| matches!(c, '\t' | '\n' | '\r' | ' ');
        let token = |part: &str| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
        };
        let essence = text.trim_matches(http_space).split_once('/').and_then(|(kind, rest)| {
            let subtype = rest.split(';').next().unwrap_or_default().trim_end_matches(http_space);
            (token(kind) && token(subtype))
                .then(|| format!("{kind}/{subtype}").to_ascii_lowercase())
        });
        value.len() <= 128
            && !value.iter().any(unsafe_byte)
            && essence.is_some_and(|essence| {
                ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]
                    .contains(&essence.as_str())
            })
    }

    /// `Content-Type` values around the safelisted and the JSON ones.
    fn content_type() -> impl Strategy<Value = Vec<u8>> {
        let essence = prop::sample::select(vec![
            "text/plain",
            "TEXT/Plain",
            "multipart/form-data",
            "application/x-www-form-urlencoded",
            "application/json",
            "application/vnd.api+json",
            "text/json",
            "application/+json",
        ]);
        let text = (
            "[ \t]{0,2}",
            essence,
            "[ \t]{0,2}",
            // parameters, some naming a JSON type (a page may write any)
            "([;,][ \t]?[a-z]{0,7}(=([a-zA-Z0-9/+\"=;,-]{0,24}|application/json))?){0,3}",
        )
            .prop_map(|(before, essence, after, parameters)| {
                format!("{before}{essence}{after}{parameters}")
            });
        prop_oneof![
            3 => text.prop_map(String::into_bytes),
            1 => prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..32),
        ]
    }

    proptest! {
        #![proptest_config(config(1))]

        #[test]
        fn what_a_page_sends_without_a_preflight_is_never_declared_json(value in content_type()) {
            let Ok(value) = HeaderValue::from_bytes(&value) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.clone());
            if safelisted(value.as_bytes()) {
                prop_assert!(!declares_json(&headers), "{:?}", value);
            }
            prop_assert!(!declared(&headers).is_empty());
        }
    }
}
