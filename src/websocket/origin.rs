//! [`OriginPolicy`]: which web pages may open a WebSocket connection
//! (`WEBSOCKET_ALLOWED_ORIGINS`). A browser lets a page of any site open a WebSocket to any
//! address it reaches (localhost, an intranet) and sends no preflight: the `Origin` header it
//! always adds is the only sign of the page's site, so the check is the server's.

use std::collections::HashSet;
use std::net::SocketAddr;

use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response as Accepted,
};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, Response, StatusCode};

use crate::config::origins::{serialize, ANY_ORIGIN};
use crate::config::Config;
use crate::metrics::Metrics;

/// What a refused handshake is answered, with `403`.
const FORBIDDEN_BODY: &str =
    "this origin may not open WebSocket connections here (WEBSOCKET_ALLOWED_ORIGINS)\n";

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

/// The handshake check of the connection of `peer`: one from an origin `policy` does not allow
/// is refused, logged and counted.
pub(super) struct OriginCheck<'a> {
    pub(super) policy: &'a OriginPolicy,
    pub(super) metrics: &'a Metrics,
    pub(super) peer: SocketAddr,
}

impl Callback for OriginCheck<'_> {
    fn on_request(self, request: &Request, response: Accepted) -> Result<Accepted, ErrorResponse> {
        let Some(origin) = self.policy.refused(request) else {
            return Ok(response);
        };
        tracing::warn!(
            "WebSocket handshake from {} refused: origin {origin:?} is not in \
             WEBSOCKET_ALLOWED_ORIGINS",
            self.peer
        );
        // a handshake names no command yet: counted under no context and no route
        self.metrics.refused("", "", "origin");
        Err(forbidden())
    }
}

/// The answer to a handshake from an origin not allowed: `403`, the reason as text, and the
/// connection closed.
fn forbidden() -> ErrorResponse {
    let mut response = Response::new(Some(FORBIDDEN_BODY.to_owned()));
    *response.status_mut() = StatusCode::FORBIDDEN;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(FORBIDDEN_BODY.len()));
    response
}
