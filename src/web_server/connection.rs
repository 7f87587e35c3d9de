//! One HTTP connection, served by hyper, closed when its client goes silent.
//!
//! hyper's own `header_read_timeout` is not used: it is armed as soon as a response is sent,
//! so it also counts the idle wait for the next request, and a keep-alive timeout longer than
//! it could never be reached. Instead [`Activity`] follows the connection (bytes read,
//! requests open) and gives it one deadline at a time, as nginx does:
//!
//! - from the accept, the first request head must arrive within `HTTP_HEADER_READ_TIMEOUT`;
//! - while a request is being handled, no deadline (the call has its own limits);
//! - once the last response is handed over, the next request must start (a first byte)
//!   within `HTTP_KEEP_ALIVE_TIMEOUT` of the last byte of a response written to the client,
//!   so a client that reads a long response steadily is not cut off, and one that stops
//!   reading it is closed as nginx's `send_timeout` closes it;
//! - from that first byte, its head must arrive within `HTTP_HEADER_READ_TIMEOUT`.
//!
//! Past the deadline the connection is dropped, which closes the socket. A request body that
//! pauses for `HTTP_HEADER_READ_TIMEOUT` between two reads, or trickles in slower than
//! [`paced_body::MIN_BODY_RATE`], fails ([`PacedBody`]): the request is answered 400 and the
//! connection closed, so a half-sent or trickled body cannot hold it either.
//!
//! A connection hyper closes after a response that left part of its request body unread (a
//! `413`) lingers ([`mod@linger`]): its write side shut, it reads and discards what its client
//! still sends, for a bounded time, so that the client sees the answer rather than a reset.
//! It keeps its place under `HTTP_MAX_CONNECTIONS` meanwhile (it holds a socket, and a
//! client that sends for ever must not get one more connection with each `413`), but no room
//! in its route's body budget nor a worker: the request was answered.
//!
//! When the service stops, a connection waiting for a request head (none yet, or part of
//! one) is closed at once, as it has no request to finish; hyper's graceful shutdown alone
//! would wait for the rest of a head it has begun to read (until `HTTP_HEADER_READ_TIMEOUT`,
//! longer than `SHUTDOWN_TIMEOUT`), so one slow client would hold every stop. A request
//! whose head has arrived is in progress, its body still arriving or not: it is answered
//! (within `SHUTDOWN_TIMEOUT`), then the connection closed; a client that takes no byte of
//! that answer for a few seconds is dropped, not waited for until `HTTP_KEEP_ALIVE_TIMEOUT`.
//! A lingering connection is closed at once: its request has been answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use self::activity::{Activity, Request};
use self::linger::linger;
use self::paced_body::PacedBody;
use super::Watched;

mod activity;
mod linger;
pub(crate) mod paced_body;

/// The timeouts that close a silent client's connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// `HTTP_HEADER_READ_TIMEOUT`, also the longest pause of a request body (see
    /// [`PacedBody`]).
    pub header_read: Duration,
    /// `HTTP_KEEP_ALIVE_TIMEOUT`.
    pub keep_alive: Duration,
}

/// Serve one connection until it ends, its deadline passes or `stopping` fires (then at once
/// if it awaits a request head, else once its running request is answered); linger if it
/// ends with a request body unread. `_slot` is its place under `HTTP_MAX_CONNECTIONS`, freed
/// when the connection (and its linger) ends.
pub(super) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    stopping: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new(timeouts));
    let io = TokioIo::new(Watched::new(stream, activity.clone()));
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let open = Request::begin(requests.clone());
        let mut router = router.clone();
        let activity = requests.clone();
        let answered = requests.clone();
        let request = request.map(|body| PacedBody::new(body, timeouts.header_read, activity));
        async move {
            let mut response = router.call(request).await;
            // Answered with its body left unread (a `413`, a `404`), the connection closes
            // (hyper closes it unless the rest had arrived already) and lingers: the answer
            // says so, as a server answering before the whole body should, so that a client
            // does not send its next request on it, to be read and thrown away.
            if answered.left_a_body_unread() {
                if let Ok(response) = &mut response {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(header::CONNECTION, close);
                }
            }
            drop(open);
            response
        }
    });
    let mut builder = http1::Builder::new();
    // Activity does it (see the module documentation); hyper's would also need a timer.
    builder.header_read_timeout(None).keep_alive(true);
    // Unpin (hyper boxes the service's futures), so it can be taken apart once it has ended
    let mut connection = builder.serve_connection(io, service);
    let mut graceful = false;
    let served = loop {
        tokio::select! {
            served = &mut connection => break served,
            why = activity.expired() => {
                return tracing::debug!("closing the HTTP connection of {peer}: {why}");
            }
            () = stopping.cancelled(), if !graceful => {
                // No race with hyper: it hands a complete head over (`Request::begin`) in
                // the same poll of `connection` that reads its last byte, in this task.
                if activity.awaits_head() {
                    return tracing::debug!(
                        "closing the HTTP connection of {peer}: stopping, no request in progress"
                    );
                }
                // hyper closes an idle connection now (one whose last response it is still
                // writing, once written), a busy one after its response
                std::pin::Pin::new(&mut connection).graceful_shutdown();
                activity.stopping();
                graceful = true;
            }
        }
    };
    let lingers = match served {
        // hyper answered a head it could not parse (`400`, `431` over its limits) itself: its
        // client may still be sending the rest
        Err(error) if error.is_parse() || error.is_parse_too_large() => {
            tracing::debug!("HTTP connection of {peer} sent an unreadable head: {error}");
            true
        }
        Err(error) => {
            tracing::debug!("HTTP connection of {peer} failed: {error}");
            false
        }
        Ok(()) => activity.left_a_body_unread(),
    };
    if lingers {
        let mut socket = connection.into_parts().io.into_inner();
        // hyper shut the write side after a response it served, not after its own answer to
        // an unreadable head; a socket that cannot be shut ends the linger at its first read
        let _ = socket.shutdown().await;
        let ended = linger(socket, &stopping).await;
        tracing::debug!("closing the HTTP connection of {peer} after lingering: {ended:?}");
    }
}
