//! The room a route gives the request bodies it reads and holds at once.
//!
//! Bodies are read before a request waits for a worker (so that a client that leaves while
//! it waits is seen, and its request dropped), and a read body is held until its answer. Left
//! unbounded, the bodies of the requests waiting for a busy route add up to
//! `HTTP_MAX_CONNECTIONS` times `MAX_MESSAGE_SIZE`; the budget, twice the route's workers
//! times `MAX_MESSAGE_SIZE`, bounds them to what its calls could use, and a request whose body
//! does not fit waits, unread, for room.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::pipeline::RouteHandle;

/// A route's room for request bodies, in bytes.
#[derive(Clone, Debug)]
pub(super) struct BodyBudget {
    bytes: Arc<Semaphore>,
    /// `MAX_MESSAGE_SIZE`: the most a body takes.
    body_limit: usize,
}

impl BodyBudget {
    /// Room for twice the bodies `route`'s workers can take at once.
    pub(super) fn of(route: &RouteHandle) -> BodyBudget {
        let body_limit = route.config().max_message_size;
        let bodies = route.pool().size().saturating_mul(2).max(1);
        let bytes = body_limit.saturating_mul(bodies).min(Semaphore::MAX_PERMITS);
        BodyBudget { bytes: Arc::new(Semaphore::new(bytes)), body_limit }
    }

    /// The room the body `headers` announce needs: its `content-length`, or
    /// `MAX_MESSAGE_SIZE` for a body of unknown length (chunked); none for a request without
    /// a body. `Err` for a `content-length` over `MAX_MESSAGE_SIZE`, which is refused before
    /// the body is read.
    pub(super) fn room_for(&self, headers: &HeaderMap) -> Result<usize, TooLarge> {
        match announced_length(headers) {
            Some(length) if length > self.body_limit => Err(TooLarge),
            Some(length) => Ok(length),
            None if headers.contains_key(header::TRANSFER_ENCODING) => Ok(self.body_limit),
            None => Ok(0),
        }
    }

    /// Wait for `bytes` of room (from [`BodyBudget::room_for`]); `None` when it needs none.
    pub(super) async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        // `u32` is the most a semaphore hands out at once (a limit over 4 GiB takes that much)
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        if bytes == 0 {
            return None;
        }
        self.bytes.clone().acquire_many_owned(bytes).await.ok()
    }
}

/// A body announced over `MAX_MESSAGE_SIZE`.
#[derive(Debug)]
pub(super) struct TooLarge;

/// The body length `headers` announce in `content-length`, if any.
fn announced_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.trim().parse::<usize>().ok())
}
