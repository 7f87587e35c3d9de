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
//! pauses for `HTTP_HEADER_READ_TIMEOUT` between two reads fails (tower-http's
//! `TimeoutBody`, nginx's `client_body_timeout`): the request is answered 400 and the
//! connection closed, so a half-sent body cannot hold it either.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutBody;
use tower_service::Service;

use crate::clock::deadline_after;

/// The timeouts that close a silent client's connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// `HTTP_HEADER_READ_TIMEOUT`, also the longest pause of a request body.
    pub header_read: Duration,
    /// `HTTP_KEEP_ALIVE_TIMEOUT`.
    pub keep_alive: Duration,
}

/// Serve one connection until it ends, its deadline passes or (once `stopping` fires) its
/// running request is answered. `_slot` is its place under `HTTP_MAX_CONNECTIONS`, freed when
/// the connection ends.
pub(super) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    stopping: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new(timeouts));
    let io = TokioIo::new(Watched { stream, activity: activity.clone() });
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let open = Request::begin(requests.clone());
        let mut router = router.clone();
        let request = request.map(|body| TimeoutBody::new(timeouts.header_read, body));
        async move {
            let response = router.call(request).await;
            drop(open);
            response
        }
    });
    let mut builder = http1::Builder::new();
    // Activity does it (see the module documentation); hyper's would also need a timer.
    builder.header_read_timeout(None).keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut graceful = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!("HTTP connection of {peer} failed: {error}");
                }
                return;
            }
            why = activity.expired() => {
                return tracing::debug!("closing the HTTP connection of {peer}: {why}");
            }
            () = stopping.cancelled(), if !graceful => {
                // an idle connection closes now, a busy one after its response
                connection.as_mut().graceful_shutdown();
                graceful = true;
            }
        }
    }
}

/// What a connection is waiting for, and until when.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request head, which must be complete by the deadline.
    Head(Instant),
    /// This many requests being handled: no deadline.
    Busy(usize),
    /// The first byte of the next request, which must come by the deadline.
    Idle(Instant),
}

/// The phase of one connection, updated by its socket and its requests.
#[derive(Debug)]
struct Activity {
    timeouts: Timeouts,
    phase: Mutex<Phase>,
    /// Wakes [`Activity::expired`] when the deadline changes.
    changed: Notify,
}

impl Activity {
    fn new(timeouts: Timeouts) -> Self {
        let phase = Phase::Head(deadline_after(timeouts.header_read));
        Activity { timeouts, phase: Mutex::new(phase), changed: Notify::new() }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, phase: &mut Phase, next: Phase) {
        *phase = next;
        self.changed.notify_one();
    }

    /// Bytes came from the client: an idle connection is now reading a request head.
    fn bytes_read(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            self.set(&mut phase, Phase::Head(deadline_after(self.timeouts.header_read)));
        }
    }

    /// Bytes went to the client: the keep-alive wait counts from the last of a response.
    fn bytes_written(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            self.set(&mut phase, Phase::Idle(deadline_after(self.timeouts.keep_alive)));
        }
    }

    /// Resolves when the current deadline has passed, with what the client failed to do.
    async fn expired(&self) -> &'static str {
        loop {
            let changed = self.changed.notified();
            let phase = *self.phase();
            let (until, why) = match phase {
                Phase::Busy(_) => {
                    changed.await;
                    continue;
                }
                Phase::Head(until) => {
                    (until, "no complete request head in HTTP_HEADER_READ_TIMEOUT")
                }
                Phase::Idle(until) => (until, "no new request in HTTP_KEEP_ALIVE_TIMEOUT"),
            };
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(until) => {
                    // a byte may have come in meanwhile and set a later deadline
                    if self.deadline_passed() {
                        return why;
                    }
                }
            }
        }
    }

    fn deadline_passed(&self) -> bool {
        match *self.phase() {
            Phase::Busy(_) => false,
            Phase::Head(until) | Phase::Idle(until) => until <= Instant::now(),
        }
    }
}

/// A request being handled on a connection; dropped once its response is handed to hyper
/// (or the request is dropped), which starts the keep-alive wait when it was the last.
struct Request(Arc<Activity>);

impl Request {
    fn begin(activity: Arc<Activity>) -> Self {
        {
            let mut phase = activity.phase();
            let open = match *phase {
                Phase::Busy(open) => open + 1,
                Phase::Head(_) | Phase::Idle(_) => 1,
            };
            activity.set(&mut phase, Phase::Busy(open));
        }
        Request(activity)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let activity = &self.0;
        let mut phase = activity.phase();
        let next = match *phase {
            Phase::Busy(open) if open > 1 => Phase::Busy(open - 1),
            _ => Phase::Idle(deadline_after(activity.timeouts.keep_alive)),
        };
        activity.set(&mut phase, next);
    }
}

/// The client's socket, telling its [`Activity`] when bytes come in or go out.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    fn written(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(written)) = polled {
            if written > 0 {
                self.activity.bytes_written();
            }
        }
        polled
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
