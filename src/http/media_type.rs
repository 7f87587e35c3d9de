//! `HTTP_REQUIRE_JSON_CONTENT_TYPE`: whether a request declares its body JSON.
//!
//! A web page of any site can send a body labelled `text/plain`, form-encoded or not labelled
//! at all without a CORS preflight; a JSON content type needs one, which the service never
//! grants. Requiring it keeps browsers of other sites from calling a JSON route.

use axum::http::{header, HeaderMap};

/// Whether `headers` declare the body JSON: `application/json` or `application/*+json`
/// (RFC 6839's structured syntax suffix), in any case, parameters such as `charset` allowed.
pub(super) fn declares_json(headers: &HeaderMap) -> bool {
    let Some(declared) = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = declared.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.strip_prefix("application/") {
        Some("json") => true,
        Some(subtype) => subtype.len() > "+json".len() && subtype.ends_with("+json"),
        None => false,
    }
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

    fn with(content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(content_type) = content_type {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        }
        headers
    }

    #[test]
    fn json_and_json_suffixed_types_are_json_with_any_case_and_parameters() {
        for declared in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/vnd.api+json",
            "application/problem+JSON; charset=utf-8",
        ] {
            assert!(declares_json(&with(Some(declared))), "{declared}");
        }
    }

    #[test]
    fn other_types_and_none_are_not_json() {
        for declared in [
            None,
            Some(""),
            Some("text/plain"),
            Some("text/plain; charset=application/json"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("text/json"),
            Some("application/+json"),
            Some("application/jsonp"),
            Some("application/json-seq"),
            Some("application/vnd.api+json5"),
        ] {
            assert!(!declares_json(&with(declared)), "{declared:?}");
        }
    }

    #[test]
    fn the_declared_type_is_quoted_or_none() {
        assert_eq!(declared(&with(None)), "none");
        assert_eq!(declared(&with(Some("text/plain"))), "\"text/plain\"");
    }
}
