//! [`HandshakeCheck`]: what a WebSocket handshake is refused for before any command is read: a
//! server with every slot taken (`WEBSOCKET_MAX_CONNECTIONS`: `503`), or a web page's origin
//! not allowed (`WEBSOCKET_ALLOWED_ORIGINS`: `403`). Each refusal is counted, and answered
//! with its reason as text.

use std::net::SocketAddr;

use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response as Accepted,
};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, Response, StatusCode};

use crate::metrics::Metrics;
use crate::websocket::origin::OriginPolicy;

/// What a handshake from an origin not allowed is answered, with `403`.
const FORBIDDEN_BODY: &str =
    "this origin may not open WebSocket connections here (WEBSOCKET_ALLOWED_ORIGINS)\n";

/// What a handshake is answered when every slot is taken, with `503`.
const BUSY_BODY: &str =
    "too many WebSocket connections are open (WEBSOCKET_MAX_CONNECTIONS): try again later\n";

/// How long a client refused for a full server is asked to wait before it tries again.
const RETRY_AFTER_SECONDS: u32 = 1;

/// The handshake check of the connection of `peer`: refused, logged (an origin; a full
/// server logs in `Admissions`) and counted if `busy`, or if it comes from an origin `origins`
/// does not allow.
pub(super) struct HandshakeCheck<'a> {
    pub(super) origins: &'a OriginPolicy,
    pub(super) busy: bool,
    pub(super) metrics: &'a Metrics,
    pub(super) peer: SocketAddr,
}

impl Callback for HandshakeCheck<'_> {
    fn on_request(self, request: &Request, response: Accepted) -> Result<Accepted, ErrorResponse> {
        // a handshake names no command yet: counted under no context and no route
        if self.busy {
            self.metrics.refused("", "", "max_connections");
            let mut busy = refusal(StatusCode::SERVICE_UNAVAILABLE, BUSY_BODY);
            busy.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            return Err(busy);
        }
        let Some(origin) = self.origins.refused(request) else {
            return Ok(response);
        };
        tracing::warn!(
            "WebSocket handshake from {} refused: origin {origin:?} is not in \
             WEBSOCKET_ALLOWED_ORIGINS",
            self.peer
        );
        self.metrics.refused("", "", "origin");
        Err(refusal(StatusCode::FORBIDDEN, FORBIDDEN_BODY))
    }
}

/// A refused handshake's answer: `status`, `body` as text, and the connection closed.
fn refusal(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = Response::new(Some(body.to_owned()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}
