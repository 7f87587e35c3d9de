//! The HTTP server of the status page (`/`, `/status.json`), `/metrics`, `/health/live` and
//! `/health/ready` (axum), with the same timeouts and connection cap as the HTTP routes'
//! server. Read-only: every path answers `GET` alone. Bound before the service connects
//! (`bind`), it serves the service once attached (`MetricsServer::attach`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::page;
use super::status::{RouteInfo, StatusSource, SAMPLE_EVERY};
use super::Metrics;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::transport::SharedTransport;
use crate::web_server::{self, WebLimits};

struct ServerState {
    metrics: Metrics,
    show_failures: bool,
    /// The service, once its routes are set up: until then only `/health/live` and
    /// `/metrics` answer as they will, the rest say the service is starting.
    service: OnceLock<Started>,
}

/// What the server reads from the started service.
struct Started {
    transport: SharedTransport,
    stopping: CancellationToken,
    status: Arc<StatusSource>,
}

/// The metrics server, bound before the service connects to its broker: `/health/live`
/// answers while the process runs, a start that waits for the broker included, and a port in
/// use stops the start before anything consumes. The service is [attached](Self::attach)
/// once its routes are set up.
pub(crate) struct MetricsServer {
    address: SocketAddr,
    state: Arc<ServerState>,
    service_name: String,
    broker_uri: String,
    stopped: CancellationToken,
    /// The task serving: ends once `stopped` fires, its port free again.
    serving: tokio::task::JoinHandle<()>,
    /// Stops the server when it is dropped unattached: the start failed or was given up.
    unattached: DropGuard,
}

/// Bind `METRICS_HOST:METRICS_PORT` (port 0 picks a free one) and serve until the service's
/// `stopped` token ([`MetricsServer::stopped`]) fires, or until the server is dropped
/// unattached.
pub(crate) async fn bind(config: &Config) -> Result<MetricsServer> {
    let (host, port) = (config.metrics.host.as_str(), config.metrics.port);
    let listener =
        tokio::net::TcpListener::bind((host, port)).await.map_err(|source| Error::Listen {
            what: "serve metrics",
            address: format!("{host}:{port}"),
            keys: "METRICS_HOST, METRICS_PORT",
            source,
        })?;
    let address = listener.local_addr()?;
    let metrics = Metrics::new()
        .map_err(|error| Error::Startup(format!("cannot create metrics: {error}")))?;
    let show_failures = config.status_show_failures;
    let state = Arc::new(ServerState { metrics, show_failures, service: OnceLock::new() });
    let limits = WebLimits::from_config(config);
    let app = Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_text))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .with_state(state.clone());
    let stopped = CancellationToken::new();
    let serving = stopped.clone();
    let serving = tokio::spawn(async move {
        if let Err(error) =
            web_server::serve(listener, app, limits, serving, TaskTracker::new()).await
        {
            tracing::error!("metrics server failed: {error}");
        }
    });
    tracing::info!(
        "status on http://{address}/, metrics on /metrics, health on /health/live and /health/ready"
    );
    Ok(MetricsServer {
        address,
        state,
        service_name: config.service_name.clone(),
        broker_uri: config.masked_amqp_uri(),
        unattached: stopped.clone().drop_guard(),
        stopped,
        serving,
    })
}

impl MetricsServer {
    /// The metrics the server renders, for the service to record into.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// The token that stops the server: the service cancels it once it has stopped.
    pub(crate) fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }

    /// Stop serving, unattached (the start failed or was given up), and return once the port
    /// is free: dropped, the server let it go only when its task next ran, after the start's
    /// error had returned, and a program trying the start again at once found the port in use.
    pub(crate) async fn close(self) {
        self.stopped.cancel();
        let _ = self.serving.await;
    }

    /// Serve the started service's `routes` from now on; returns the bound address.
    pub(crate) fn attach(
        self,
        routes: Vec<RouteInfo>,
        transport: SharedTransport,
        stopping: CancellationToken,
    ) -> SocketAddr {
        let metrics = self.state.metrics.clone();
        let status = StatusSource::new(
            self.service_name,
            self.broker_uri,
            routes,
            metrics,
            transport.clone(),
        );
        tokio::spawn(sample(status.clone(), self.stopped.clone()));
        // attached once: the server is consumed
        let _ = self.state.service.set(Started { transport, stopping, status });
        self.unattached.disarm();
        self.address
    }
}

/// What `/`, `/status.json` and `/health/ready` answer before the routes are set up.
const STARTING: &str = "starting\n";

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

async fn status_page(State(state): State<Arc<ServerState>>) -> Response {
    let Some(service) = state.service.get() else { return starting() };
    let status = service.status.status(state.show_failures).await;
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        page::render(&status),
    )
        .into_response()
}

async fn status_json(State(state): State<Arc<ServerState>>) -> Response {
    let Some(service) = state.service.get() else { return starting() };
    let status = service.status.status(state.show_failures).await;
    let json = serde_json::to_string(&status).unwrap_or_else(|error| {
        serde_json::json!({ "error": format!("cannot encode the status: {error}") }).to_string()
    });
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], json)
        .into_response()
}

/// 503 `starting`: the service has not set up its routes yet.
fn starting() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [(header::CACHE_CONTROL, "no-store")], STARTING)
        .into_response()
}

async fn metrics_text(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    match state.service.get() {
        Some(service) => {
            let transport = &service.transport;
            state.metrics.set_reconnects(transport.reconnects());
            state
                .metrics
                .set_connected(transport.is_connected() && !service.stopping.is_cancelled());
            // the node last in use also while disconnected: a first scrape during an outage
            // names the node lost
            let in_use = transport.broker_node();
            let node = in_use.clone().or_else(|| transport.last_broker_node());
            state.metrics.set_broker_node(node.as_deref(), in_use.is_some());
        }
        // not connected yet
        None => state.metrics.set_connected(false),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// 200 `ready` while connected, every consumer subscribed and not stopping, else 503 with the
/// reason (`starting` until the service has connected and set up its routes); a line
/// `broker: host:port` names the RabbitMQ node in use.
async fn ready(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let Some(service) = state.service.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, STARTING.to_owned());
    };
    let (transport, stopping) = (&service.transport, &service.stopping);
    let status = match crate::transport::not_ready(transport.as_ref()) {
        _ if stopping.is_cancelled() => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
        None => (StatusCode::OK, "ready"),
    };
    match transport.broker_node() {
        Some(node) => (status.0, format!("{}\nbroker: {node}\n", status.1)),
        None => (status.0, format!("{}\n", status.1)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::config::MetricsConfig;
    use crate::transport::{
        BindingSpec, ConsumeOptions, Consumer, Delivery, ExchangeSpec, OutgoingMessage,
        PublishOptions, QueueInfo, QueueSpec, Transport, TransportError,
    };

    /// A connected broker whose answer to a queue lookup never comes: the in-process one, with
    /// `queue_info` hanging.
    #[derive(Debug)]
    struct UnansweredLookups(SharedTransport);

    #[async_trait]
    impl Transport for UnansweredLookups {
        async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
            self.0.declare_exchange(spec).await
        }

        async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError> {
            self.0.declare_queue(spec).await
        }

        async fn queue_info(&self, _queue: &str) -> Result<QueueInfo, TransportError> {
            std::future::pending().await
        }

        async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError> {
            self.0.bind_queue(binding).await
        }

        async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError> {
            self.0.delete_queue(queue).await
        }

        async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError> {
            self.0.delete_exchange(exchange).await
        }

        async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError> {
            self.0.purge_queue(queue).await
        }

        async fn publish(
            &self,
            exchange: &str,
            routing_key: &str,
            message: OutgoingMessage,
            options: PublishOptions,
        ) -> Result<(), TransportError> {
            self.0.publish(exchange, routing_key, message, options).await
        }

        async fn consume(
            &self,
            queue: &str,
            options: ConsumeOptions,
        ) -> Result<Consumer, TransportError> {
            self.0.consume(queue, options).await
        }

        async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
            self.0.get(queue).await
        }

        fn is_connected(&self) -> bool {
            self.0.is_connected()
        }

        fn connected_since(&self) -> Option<std::time::SystemTime> {
            self.0.connected_since()
        }

        async fn close(&self) {
            self.0.close().await
        }
    }

    /// The broker is connected but does not answer the dead-letter lookup: the status page
    /// answers anyway (after `DEAD_LETTERS_LOOKUP`), without the count of dead letters waiting.
    #[tokio::test]
    async fn the_status_page_answers_when_the_connected_broker_does_not() {
        let name = format!("status-unanswered-{}", uuid::Uuid::new_v4());
        let config = Config::new(name.as_str())
            .with_amqp_uri(format!("memory://{name}"))
            .with_metrics(MetricsConfig { host: "127.0.0.1".into(), port: 0 });
        let broker = crate::transport::connect(&config).await.unwrap();
        let queue = format!("evt-shop-paid--{name}.on_paid");
        // a lookup that answered would count its messages: 0
        broker.declare_queue(&QueueSpec::durable(format!("{queue}.dlq"))).await.unwrap();
        let route = RouteInfo {
            name: "on_paid".into(),
            context: "default".into(),
            metric_label: "on_paid".into(),
            entrypoint: "EventListener(shop.paid)".into(),
            queue: Some(queue),
            dead_letters: true,
        };
        let transport: SharedTransport = Arc::new(UnansweredLookups(broker.clone()));
        let server = bind(&config).await.unwrap();
        let stopped = server.stopped();
        let address = server.attach(vec![route], transport, CancellationToken::new());
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let request = http.get(format!("http://{address}{path}")).send();
            let answer = async { request.await?.text().await };
            tokio::time::timeout(Duration::from_secs(10), answer)
        };
        let json = get("/status.json").await.expect("/status.json answers").unwrap();
        let status: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(status["broker"]["connected"], true, "{status}");
        let route = &status["routes"][0];
        assert_eq!(route["name"], "on_paid", "{status}");
        assert_eq!(route["dead_letters_waiting"], serde_json::Value::Null, "{status}");
        let page = get("/").await.expect("/ answers").unwrap();
        assert!(page.contains("id=\"broker\">connected</b>"), "{page}");
        // dead-lettered 0, in DLQ unknown, in flight 0
        assert!(page.contains("<td>0</td><td>-</td><td>0</td>"), "{page}");
        stopped.cancel();
        broker.close().await;
    }
}
