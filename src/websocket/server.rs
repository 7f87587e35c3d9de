//! The WebSocket server of a service instance: accept connections until the service stops,
//! then let every connection finish its calls.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::pipeline::RouteHandle;
use crate::websocket::connection::serve_client;
use crate::websocket::registry::WsRegistry;

/// How long to wait after a failed `accept` (out of file descriptors, say) before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serve `listener` for every command of `registry` until the service stops; `route` is the
/// route whose entrypoint runs the server. Running calls get `SHUTDOWN_TIMEOUT` to finish.
pub(crate) async fn serve(
    registry: Arc<WsRegistry>,
    route: RouteHandle,
    listener: std::net::TcpListener,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|error| Error::Startup(format!("cannot serve WebSocket connections: {error}")))?;
    let stopping = route.stopping().clone();
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            _ = stopping.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_client(registry.clone(), stream, peer, stopping.clone()));
                }
                Err(error) => {
                    tracing::warn!("cannot accept a WebSocket connection: {error}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }
    drop(listener);
    connections.close();
    let limit = route.config().shutdown_timeout;
    if tokio::time::timeout(limit, connections.wait()).await.is_err() {
        tracing::warn!(
            "WebSocket calls still running after SHUTDOWN_TIMEOUT ({limit:?}); their clients get no reply"
        );
    }
    WsRegistry::forget(route.transport());
    Ok(())
}
