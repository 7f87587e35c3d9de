//! Media types as bodies declare them (`Content-Type`): which are read as JSON.

/// The essence of the media type `content_type`: its type and subtype, in lower case (media
/// types are case-insensitive), without parameters (`; charset=utf-8`).
pub(crate) fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// Whether the media type `essence` (see [`essence`]) is JSON: `application/json`, or
/// `application/*+json` (RFC 6839's structured syntax suffix, e.g. JSON:API's
/// `application/vnd.api+json`).
pub(crate) fn is_json(essence: &str) -> bool {
    match essence.strip_prefix("application/") {
        Some("json") => true,
        Some(subtype) => subtype.len() > "+json".len() && subtype.ends_with("+json"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_json_suffixed_types_are_json_in_any_case_with_parameters() {
        for declared in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/vnd.api+json",
            "application/problem+JSON; charset=utf-8",
        ] {
            assert!(is_json(&essence(declared)), "{declared}");
        }
    }

    #[test]
    fn other_types_are_not_json() {
        for declared in [
            "",
            "text/plain",
            "text/plain; charset=application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/json",
            "application/+json",
            "application/jsonp",
            "application/json-seq",
            "application/vnd.api+json5",
        ] {
            assert!(!is_json(&essence(declared)), "{declared:?}");
        }
    }
}
