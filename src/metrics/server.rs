//! The HTTP server of `/metrics`, `/health/live` and `/health/ready` (axum), with the same
//! timeouts and connection cap as the HTTP routes' server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use crate::error::{Error, Result};
use crate::transport::SharedTransport;
use crate::web_server::{self, WebLimits};

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    transport: SharedTransport,
    stopping: CancellationToken,
}

/// Bind `host:port` (port 0 picks a free one) and serve until `stopped` fires. Returns the
/// bound address.
pub(crate) async fn serve(
    host: &str,
    port: u16,
    limits: WebLimits,
    metrics: Metrics,
    transport: SharedTransport,
    stopping: CancellationToken,
    stopped: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((host, port)).await.map_err(|error| {
        Error::Startup(format!("cannot serve metrics on {host}:{port} (METRICS): {error}"))
    })?;
    let address = listener.local_addr()?;
    let state = Arc::new(ServerState { metrics, transport, stopping });
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(error) = web_server::serve(listener, app, limits, stopped).await {
            tracing::error!("metrics server failed: {error}");
        }
    });
    tracing::info!("metrics on http://{address}/metrics, health on /health/live and /health/ready");
    Ok(address)
}

async fn metrics_text(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    state.metrics.set_reconnects(state.transport.reconnects());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

async fn ready(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    if state.transport.is_connected() && !state.stopping.is_cancelled() {
        (StatusCode::OK, "ready")
    } else if state.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to the broker")
    }
}
