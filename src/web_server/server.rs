//! One server: its listener, its cap on connections, its stop.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::accept_errors::AcceptErrors;
use super::connection::{serve_connection, Timeouts};
use crate::config::Config;
use crate::error::Result;

/// What one server allows its clients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WebLimits {
    timeouts: Timeouts,
    max_connections: usize,
    shutdown_timeout: Duration,
}

impl WebLimits {
    /// `HTTP_HEADER_READ_TIMEOUT`, `HTTP_KEEP_ALIVE_TIMEOUT`, `HTTP_MAX_CONNECTIONS` and
    /// `SHUTDOWN_TIMEOUT`.
    pub(crate) fn from_config(config: &Config) -> WebLimits {
        WebLimits {
            timeouts: Timeouts {
                header_read: config.http_header_read_timeout,
                keep_alive: config.http_keep_alive_timeout,
            },
            max_connections: config.http_max_connections,
            shutdown_timeout: config.shutdown_timeout,
        }
    }
}

/// Accept connections while a slot is free, until `stopping` fires; then close the open
/// connections that await a request head, let the others answer their running requests, and
/// the `calls` run on in tasks of their own (those whose client hung up) end, at most
/// `SHUTDOWN_TIMEOUT` in all.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: WebLimits,
    stopping: CancellationToken,
    calls: TaskTracker,
) -> Result<()> {
    let timeouts = limits.timeouts;
    // validate() keeps it far below MAX_PERMITS, past which Semaphore::new panics
    let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let connections = TaskTracker::new();
    let mut accept_errors = AcceptErrors::new("an HTTP connection");
    loop {
        let slot = tokio::select! {
            biased;
            () = stopping.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = stopping.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    accept_errors.accepted();
                    accepted
                }
                Err(error) => {
                    accept_errors.failed(error).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        connections.spawn(serve_connection(stream, peer, router, timeouts, stopping.clone(), slot));
    }
    drop(listener);
    connections.close();
    calls.close();
    let limit = limits.shutdown_timeout;
    let ended = async {
        connections.wait().await;
        calls.wait().await;
    };
    if tokio::time::timeout(limit, ended).await.is_err() {
        tracing::warn!("HTTP requests still running after SHUTDOWN_TIMEOUT ({limit:?}); no longer waiting for them");
    }
    Ok(())
}
