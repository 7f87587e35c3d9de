//! Fuzzing the `Origin` check of handshakes against the `url` crate: a browser's `Origin` is
//! taken exactly when it is the origin of an allowed entry.

use proptest::prelude::*;
use tokio_tungstenite::tungstenite::handshake::server::Request;
use url::Url;

use super::origin::OriginPolicy;
use crate::config::fuzz::origin_text;
use crate::config::Config;
use crate::data::fuzz_support::config;

/// An origin as the configuration may hold it, which the `url` crate reads.
fn url_origin() -> impl Strategy<Value = String> {
    origin_text().prop_filter("a URL", |text| Url::parse(text).is_ok())
}

/// A handshake request carrying `origins` as `Origin` headers.
fn handshake(origins: &[Vec<u8>]) -> Request {
    let mut request = Request::builder().uri("/");
    for origin in origins {
        request = request.header("origin", origin.as_slice());
    }
    request.body(()).unwrap_or_default()
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn a_browsers_origin_is_taken_exactly_when_an_entry_is_that_origin(
        entries in prop::collection::vec(url_origin(), 1..4),
        other in url_origin(),
        pick in any::<prop::sample::Index>(),
    ) {
        let config = Config::new("svc").with_websocket_allowed_origins(entries.clone());
        prop_assert!(config.validate().is_ok(), "{:?}", entries);
        let urls: Vec<Url> = entries.iter().filter_map(|entry| Url::parse(entry).ok()).collect();
        let policy = OriginPolicy::of(&config);
        // what a browser sends: an allowed page's origin, or another page's
        let other = Url::parse(&other).map_err(|error| TestCaseError::fail(error.to_string()))?;
        for page in [&urls[pick.index(urls.len())], &other] {
            let sent = page.origin().ascii_serialization();
            let allowed = urls.iter().any(|url| url.origin() == page.origin());
            let refused = policy.refused(&handshake(&[sent.clone().into_bytes()]));
            prop_assert_eq!(refused.is_none(), allowed, "{} with {:?}", sent, entries);
        }
    }

    #[test]
    fn any_origin_headers_are_taken_or_refused(
        entries in prop::collection::vec(url_origin(), 1..3),
        headers in prop::collection::vec(prop_oneof![
            // the bytes a header value may hold
            prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..24),
            origin_text().prop_map(String::into_bytes),
        ], 0..3),
    ) {
        let config = Config::new("svc").with_websocket_allowed_origins(entries.clone());
        prop_assert!(config.validate().is_ok(), "{:?}", entries);
        let refused = OriginPolicy::of(&config).refused(&handshake(&headers));
        if let Some(origin) = refused {
            prop_assert!(headers.iter().any(|header| String::from_utf8_lossy(header) == origin));
        }
    }
}
