//! [`OriginPolicy`]: which web pages may open a WebSocket connection
//! (`WEBSOCKET_ALLOWED_ORIGINS`). A browser lets a page of any site open a WebSocket to any
//! address it reaches (localhost, an intranet) and sends no preflight: the `Origin` header it
//! always adds is the only sign of the page's site, so the check is the server's.

use std::collections::HashSet;

use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};

use crate::config::origins::{serialize, ANY_ORIGIN};
use crate::config::Config;

/// The origins a server takes handshakes from.
#[derive(Debug)]
pub(super) enum OriginPolicy {
    /// Every origin (the key empty, or `*`), as the Python original.
    Any,
    /// These origins, serialized as browsers send them.
    Only(HashSet<String>),
}

impl OriginPolicy {
    /// The policy of `config`'s `WEBSOCKET_ALLOWED_ORIGINS`, which the runner validated.
    pub(super) fn of(config: &Config) -> OriginPolicy {
        let entries = &config.websocket_allowed_origins;
        if entries.is_empty() || entries.iter().any(|entry| entry == ANY_ORIGIN) {
            return OriginPolicy::Any;
        }
        OriginPolicy::Only(entries.iter().filter_map(|entry| serialize(entry).ok()).collect())
    }

    /// The `Origin` of `request` that is not allowed, as sent, if there is one. A handshake
    /// without the header is taken: browsers always send it, other clients (this crate's,
    /// scripts) need not, and a page cannot remove it.
    pub(super) fn refused(&self, request: &Request) -> Option<String> {
        let OriginPolicy::Only(allowed) = self else {
            return None;
        };
        let is_allowed = |value: &HeaderValue| {
            let origin = value.to_str().ok().and_then(|text| serialize(text).ok());
            origin.is_some_and(|origin| allowed.contains(&origin))
        };
        let refused = request.headers().get_all(header::ORIGIN).iter().find(|v| !is_allowed(v));
        refused.map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    }
}
