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

    /// Whether `headers` announce a body over `MAX_MESSAGE_SIZE` (by its `content-length`),
    /// which is refused before it is read.
    pub(super) fn announces_too_much(&self, headers: &HeaderMap) -> bool {
        announced_length(headers).is_some_and(|length| length > self.body_limit)
    }

    /// Wait for room for the body `headers` announce: its `content-length`, or
    /// `MAX_MESSAGE_SIZE` for a body of unknown length (chunked); none for a request without
    /// a body. `None` when it needs no room.
    pub(super) async fn reserve(&self, headers: &HeaderMap) -> Option<OwnedSemaphorePermit> {
        let size = match announced_length(headers) {
            Some(length) => length.min(self.body_limit),
            None if headers.contains_key(header::TRANSFER_ENCODING) => self.body_limit,
            None => 0,
        };
        // a body announced larger than the limit is refused before this (see
        // `announces_too_much`), and `u32` is the most a semaphore hands out at once (a limit
        // over 4 GiB takes that much)
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        if size == 0 {
            return None;
        }
        self.bytes.clone().acquire_many_owned(size).await.ok()
    }
}

/// The body length `headers` announce in `content-length`, if any.
fn announced_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.trim().parse::<usize>().ok())
}
