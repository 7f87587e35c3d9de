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
