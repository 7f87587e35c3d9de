//! A request body that must keep coming: no pause longer than `HTTP_HEADER_READ_TIMEOUT`
//! (nginx's `client_body_timeout`), and, on average, at least [`MIN_BODY_RATE`] bytes a
//! second once that timeout's grace has passed (Apache's `mod_reqtimeout` `MinRate`).
//!
//! A limit on pauses alone lets a client that sends a byte just before each one hold its
//! connection for as long as it likes: with the defaults, years for a 16 MiB body. The clock
//! starts when the body is first read, so a request that waits, unread, for room in its
//! route's body budget is not cut for waiting.
//!
//! A body dropped before its end (answered `413` unread, or with part of it read) tells the
//! connection's [`Activity`], so that the connection lingers when it closes.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::activity::Activity;

/// The slowest average rate a request body may arrive at, in bytes a second, after the grace
/// of one `HTTP_HEADER_READ_TIMEOUT`.
pub(crate) const MIN_BODY_RATE: u64 = 500;

/// A request body read under the limits of the module documentation.
pub(super) struct PacedBody {
    inner: Incoming,
    /// `HTTP_HEADER_READ_TIMEOUT`: the longest pause, and the grace before the rate counts.
    pause: Duration,
    /// Armed at the first read.
    clock: Option<Clock>,
    /// The body has ended, or failed: none of it is left for its client to send.
    ended: bool,
    /// Told when the body is dropped before its end.
    activity: Arc<Activity>,
}

struct Clock {
    started: Instant,
    last_frame: Instant,
    received: u64,
    deadline: Pin<Box<Sleep>>,
}

impl Clock {
    /// The earlier of the pause's end and the time by which `received` bytes were due.
    fn deadline(&self, pause: Duration) -> Instant {
        let due = Duration::from_secs_f64(self.received as f64 / MIN_BODY_RATE as f64);
        (self.last_frame + pause).min(self.started + pause + due)
    }
}

impl PacedBody {
    pub(super) fn new(inner: Incoming, pause: Duration, activity: Arc<Activity>) -> PacedBody {
        PacedBody { inner, pause, clock: None, ended: false, activity }
    }
}

/// Why a body was cut.
#[derive(Debug)]
pub(super) struct TooSlow {
    paused: bool,
    pause: Duration,
}

impl fmt::Display for TooSlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.pause.as_secs_f64();
        if self.paused {
            write!(f, "the request body paused longer than HTTP_HEADER_READ_TIMEOUT ({seconds} s)")
        } else {
            write!(
                f,
                "the request body came slower than {MIN_BODY_RATE} bytes/s after the first \
                 {seconds} s (HTTP_HEADER_READ_TIMEOUT)"
            )
        }
    }
}

impl StdError for TooSlow {}

impl Body for PacedBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let pause = this.pause;
        let clock = this.clock.get_or_insert_with(|| {
            let now = Instant::now();
            let deadline = Box::pin(tokio::time::sleep_until(now + pause));
            Clock { started: now, last_frame: now, received: 0, deadline }
        });
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                clock.last_frame = Instant::now();
                if let Some(data) = frame.data_ref() {
                    clock.received += data.remaining() as u64;
                }
                let deadline = clock.deadline(pause);
                clock.deadline.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                this.ended = true;
                Poll::Ready(other.map(|ended| ended.map_err(Into::into)))
            }
            Poll::Pending => match clock.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    // a client this slow is not waited for: no linger
                    this.ended = true;
                    let paused = Instant::now() >= clock.last_frame + pause;
                    Poll::Ready(Some(Err(Box::new(TooSlow { paused, pause }))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PacedBody {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            self.activity.body_left_unread();
        }
    }
}
