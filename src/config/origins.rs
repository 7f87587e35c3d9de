//! `WEBSOCKET_ALLOWED_ORIGINS`: the web origins whose pages may open a WebSocket connection,
//! each compared as a browser writes its `Origin` header (the Fetch standard's serialization:
//! scheme and host in lower case, the scheme's default port left out).

use url::Url;

use super::ConfigError;

/// The key, as errors name it.
const KEY: &str = "WEBSOCKET_ALLOWED_ORIGINS";

/// The entry that allows every origin; it must be the only one.
pub(crate) const ANY_ORIGIN: &str = "*";

/// `text` as a browser serializes that origin (`HTTPS://App.Example.com:443` is
/// `https://app.example.com`), or why it is no `http(s)://host[:port]` origin.
pub(crate) fn serialize(text: &str) -> Result<String, String> {
    let example = "expected scheme://host[:port], e.g. https://app.example.com";
    if text == "null" {
        // the origin of sandboxed frames and local files, which a page of any site can make
        return Err("null is the origin a page of any site can give itself (a sandboxed \
                    frame), so it cannot be allowed"
            .to_owned());
    }
    if text.contains(char::is_whitespace) {
        return Err("an origin holds no whitespace".to_owned());
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(example.to_owned());
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err("the scheme of a web page's origin is http or https".to_owned());
    }
    if rest.contains('*') {
        return Err("wildcards are not supported: list each origin".to_owned());
    }
    if rest.contains('@') {
        return Err("an origin has no user name or password".to_owned());
    }
    let url = Url::parse(text).map_err(|error| format!("{example} ({error})"))?;
    if rest.contains(['/', '?', '#', '\\']) {
        let origin = url.origin().ascii_serialization();
        return Err(format!(
            "an origin has no path, query or fragment, not even `/` (write {origin})"
        ));
    }
    Ok(url.origin().ascii_serialization())
}

/// Checks the entries of `WEBSOCKET_ALLOWED_ORIGINS`: each an origin, or `*` alone.
pub(super) fn validate(entries: &[String]) -> Result<(), ConfigError> {
    let refuse = |reason: String| ConfigError::new(KEY, entries.join(","), reason);
    if entries.len() > 1 && entries.iter().any(|entry| entry == ANY_ORIGIN) {
        return Err(refuse(format!(
            "`{ANY_ORIGIN}` allows every origin and must be the only entry"
        )));
    }
    for entry in entries.iter().filter(|entry| *entry != ANY_ORIGIN) {
        if entry.is_empty() {
            return Err(refuse("holds an empty entry (a stray comma?)".to_owned()));
        }
        if let Err(reason) = serialize(entry) {
            return Err(refuse(format!("{entry:?} is no origin: {reason}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::serialize;

    #[test]
    fn origins_are_compared_as_browsers_serialize_them() {
        for (given, serialized) in [
            ("https://app.example.com", "https://app.example.com"),
            ("HTTPS://App.Example.COM", "https://app.example.com"),
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://localhost:80", "http://localhost"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("https://app.example.com:80", "https://app.example.com:80"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("https://bücher.example", "https://xn--bcher-kva.example"),
        ] {
            assert_eq!(serialize(given).as_deref(), Ok(serialized), "{given}");
        }
    }

    #[test]
    fn what_is_no_origin_is_refused_saying_why() {
        for (given, reason) in [
            ("app.example.com", "expected scheme://host[:port]"),
            ("https://app.example.com/", "not even `/` (write https://app.example.com)"),
            ("https://app.example.com/app", "no path"),
            ("https://app.example.com?x=1", "no path, query"),
            ("https://app.example.com#top", "fragment"),
            ("ws://app.example.com", "http or https"),
            ("file:///tmp", "http or https"),
            ("https://*.example.com", "wildcards"),
            ("https://u:p@app.example.com", "no user name"),
            ("https://", "expected scheme://host[:port]"),
            ("https://app.example.com:99999", "expected scheme://host[:port]"),
            (" https://app.example.com", "whitespace"),
            ("https://app.example.com ", "whitespace"),
            ("null", "sandboxed"),
        ] {
            let error = serialize(given).expect_err(given);
            assert!(error.contains(reason), "{given}: {error}");
        }
    }
}
