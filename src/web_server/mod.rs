//! The HTTP servers of a service (its HTTP routes, its metrics and health endpoints): an
//! axum router served connection by connection, with the limits a reverse proxy sets.
//!
//! At most `HTTP_MAX_CONNECTIONS` connections are served at once: a connection is accepted
//! only when a slot is free, so the next ones wait in the kernel's listen backlog (their
//! requests unread, not lost) and are accepted, in order, as connections close. Silent clients
//! are closed by the timeouts of [`connection`], so they cannot hold the slots for ever.
//!
//! The WebSocket server's connections are watched by the same socket, [`Watched`]: its idle
//! timeout counts from a client's last byte too.

mod accept_errors;
#[cfg(any(feature = "http", feature = "metrics"))]
mod connection;
#[cfg(any(feature = "http", feature = "metrics"))]
mod server;
mod watched;

#[cfg(feature = "websocket")]
pub(crate) use accept_errors::AcceptErrors;
#[cfg(any(feature = "http", feature = "metrics"))]
pub(crate) use server::{serve, WebLimits};
pub(crate) use watched::{Watched, Watcher};
