//! The HTTP server of the status page (`/`, `/status.json`), `/metrics`, `/health/live` and
//! `/health/ready` (axum), with the same timeouts and connection cap as the HTTP routes'
//! server. Read-only: every path answers `GET` alone.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::page;
use super::status::{RouteInfo, StatusSource, SAMPLE_EVERY};
use super::Metrics;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::transport::SharedTransport;
use crate::web_server::{self, WebLimits};

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    transport: SharedTransport,
    stopping: CancellationToken,
    status: Arc<StatusSource>,
    show_failures: bool,
}

/// Bind `METRICS_HOST:METRICS_PORT` (port 0 picks a free one) and serve until `stopped` fires.
/// Returns the bound address.
pub(crate) async fn serve(
    config: &Config,
    routes: Vec<RouteInfo>,
    metrics: Metrics,
    transport: SharedTransport,
    stopping: CancellationToken,
    stopped: CancellationToken,
) -> Result<SocketAddr> {
    let (host, port) = (config.metrics.host.as_str(), config.metrics.port);
    let listener = tokio::net::TcpListener::bind((host, port)).await.map_err(|error| {
        Error::Startup(format!("cannot serve metrics on {host}:{port} (METRICS): {error}"))
    })?;
    let address = listener.local_addr()?;
    let status = StatusSource::new(
        config.service_name.clone(),
        config.masked_amqp_uri(),
        routes,
        metrics.clone(),
        transport.clone(),
    );
    tokio::spawn(sample(status.clone(), stopped.clone()));
    let show_failures = config.status_show_failures;
    let limits = WebLimits::from_config(config);
    let state = Arc::new(ServerState { metrics, transport, stopping, status, show_failures });
    let app = Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_text))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(error) =
            web_server::serve(listener, app, limits, stopped, TaskTracker::new()).await
        {
            tracing::error!("metrics server failed: {error}");
        }
    });
    tracing::info!(
        "status on http://{address}/, metrics on /metrics, health on /health/live and /health/ready"
    );
    Ok(address)
}

/// Sample the status history until the service has stopped.
async fn sample(status: Arc<StatusSource>, stopped: CancellationToken) {
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = ticks.tick() => status.sample(),
        }
    }
}

async fn status_page(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let status = state.status.status(state.show_failures).await;
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        page::render(&status),
    )
}

async fn status_json(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let status = state.status.status(state.show_failures).await;
    let json = serde_json::to_string(&status).unwrap_or_else(|error| {
        serde_json::json!({ "error": format!("cannot encode the status: {error}") }).to_string()
    });
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], json)
}

async fn metrics_text(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    state.metrics.set_reconnects(state.transport.reconnects());
    let ready = state.transport.is_connected() && !state.stopping.is_cancelled();
    state.metrics.set_connected(ready);
    state.metrics.set_broker_node(state.transport.broker_node().as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// 200 `ready` while connected and not stopping, else 503 with the reason; a line
/// `broker: host:port` names the RabbitMQ node in use.
async fn ready(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let status = if state.transport.is_connected() && !state.stopping.is_cancelled() {
        (StatusCode::OK, "ready")
    } else if state.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to the broker")
    };
    match state.transport.broker_node() {
        Some(node) => (status.0, format!("{}\nbroker: {node}\n", status.1)),
        None => (status.0, format!("{}\n", status.1)),
    }
}
