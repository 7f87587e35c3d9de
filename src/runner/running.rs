//! A started service: [`RunningService`], the handle [`Runner::spawn`](super::Runner::spawn)
//! returns, and the supervisor that stops the service when an entrypoint fails and tears it
//! down once every entrypoint has ended.

use std::collections::BTreeMap;
#[cfg(any(feature = "http", feature = "websocket", feature = "metrics"))]
use std::net::SocketAddr;
#[cfg(feature = "process")]
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Chain, Error, Result};
use crate::handler::dependencies::{tear_down, SharedDependency};
use crate::handler::ServiceState;
#[cfg(feature = "metrics")]
use crate::metrics::Metrics;
#[cfg(feature = "process")]
use crate::pipeline::spawners::process::ProcessPool;
use crate::pipeline::{RouteHandle, ServiceEnv};
use crate::transport::SharedTransport;

/// Wait for every entrypoint to end; an entrypoint failing, or a pool of worker processes
/// that can no longer start any, stops the whole service.
pub(super) async fn supervise(
    mut tasks: JoinSet<Result<()>>,
    env: ServiceEnv,
    dependencies: Vec<SharedDependency>,
    #[cfg(feature = "process")] processes: Vec<Arc<ProcessPool>>,
    stopped: CancellationToken,
) -> Result<()> {
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let failure = match joined {
            Ok(Ok(())) => continue,
            Ok(Err(failure)) => failure,
            Err(join) => Error::EntrypointPanicked(join.to_string()),
        };
        // with its causes: a route's error says which route stopped, its source why
        tracing::error!("{}; stopping the service", Chain(&failure));
        env.stopping.cancel();
        first_error.get_or_insert(failure);
    }
    // Every entrypoint has ended: the calls they left running past SHUTDOWN_TIMEOUT (a
    // timer's run, which gives up on no queue) start nothing more, and a greedy mode's
    // in-worker retries end.
    env.given_up.cancel();
    tear_down(&dependencies).await;
    #[cfg(feature = "process")]
    for pool in &processes {
        pool.shutdown().await;
    }
    if let Some(replies) = env.state.get::<crate::amqp::rpc::ReplyListener>() {
        replies.close(&env.transport).await;
    }
    env.state.clear();
    env.transport.close().await;
    stopped.cancel();
    tracing::info!("service stopped");
    first_error.map_or(Ok(()), Err)
}

/// A service started with [`Runner::spawn`](super::Runner::spawn), which returns once every
/// route is set up; it runs on the caller's runtime until [`stop`](RunningService::stop).
///
/// ```
/// use micro_framework::amqp::entrypoints::RPCListener;
/// use micro_framework::amqp::rpc::Client;
/// use micro_framework::prelude::*;
/// use serde_json::{json, Value};
///
/// #[derive(serde::Serialize)]
/// struct Health { ok: bool }
///
/// fn health() -> Json<Health> {
///     Json(Health { ok: true })
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::new("status").with_amqp_uri("memory://doc-running-service".into());
/// let routes = vec![Route::new(health).entrypoint(RPCListener::new())];
/// let service = Runner::new(routes, config.clone()).spawn().await?;
/// assert!(service.is_ready());
///
/// let client = Client::connect(&config).await?;
/// let reply: Value = client.call("status", "health", json!([]), json!({})).await?;
/// assert_eq!(reply, json!({"ok": true}));
/// client.close().await;
/// service.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RunningService {
    #[cfg_attr(not(any(feature = "http", feature = "websocket")), allow(dead_code))]
    pub(super) state: ServiceState,
    pub(super) stopping: CancellationToken,
    /// Fires once the service has stopped (its calls settled, its connection closed).
    pub(super) stopped: CancellationToken,
    pub(super) routes: BTreeMap<String, RouteHandle>,
    pub(super) transport: SharedTransport,
    #[cfg(feature = "metrics")]
    pub(super) metrics: Metrics,
    #[cfg(feature = "metrics")]
    pub(super) metrics_address: Option<SocketAddr>,
    pub(super) supervisor: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl RunningService {
    /// A running route by name.
    pub fn route(&self, name: &str) -> Option<&RouteHandle> {
        self.routes.get(name)
    }

    /// The names of the running routes.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// The service's broker connection.
    pub fn transport(&self) -> &SharedTransport {
        &self.transport
    }

    /// Ready to work: connected to the broker, each consumer subscribed (after a reconnect
    /// each subscribes again by itself) and not stopping.
    pub fn is_ready(&self) -> bool {
        crate::transport::not_ready(self.transport.as_ref()).is_none()
            && !self.stopping.is_cancelled()
    }

    /// The service's metrics (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where `/metrics` and `/health/*` are served (`ENABLE_METRICS=true`; feature `metrics`).
    #[cfg(feature = "metrics")]
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// Where the WebSocket entrypoints listen (`WEBSOCKET_IP:WEBSOCKET_PORT`; with port 0 the
    /// port the system picked), while the service runs and has any (feature `websocket`).
    #[cfg(feature = "websocket")]
    pub fn websocket_address(&self) -> Option<SocketAddr> {
        self.state.get::<crate::websocket::WebSocketServer>()?.address()
    }

    /// Where the service's HTTP entrypoints are served (`WEB_SERVER_ADDRESS`; port 0 picks a
    /// free one), while it runs (feature `http`).
    #[cfg(feature = "http")]
    pub fn web_address(&self) -> Option<SocketAddr> {
        self.state.get::<crate::http::WebSite>()?.address()
    }

    /// Fires once the service has stopped, by itself or told to: for test waiters, whose
    /// routes the handle keeps.
    pub(crate) fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    /// Begin a graceful stop without waiting for it.
    pub fn begin_stop(&self) {
        self.stopping.cancel();
    }

    /// Stop gracefully and wait until the service has stopped.
    pub async fn stop(mut self) -> Result<()> {
        self.stopping.cancel();
        self.wait_finished().await
    }

    /// Wait until the service stops by itself (an entrypoint failed, or its worker processes
    /// could no longer be started) or is stopped.
    pub async fn wait_finished(&mut self) -> Result<()> {
        match self.supervisor.as_mut() {
            None => Ok(()),
            Some(supervisor) => {
                let result = supervisor.await;
                self.supervisor = None;
                result.map_err(|join| Error::SupervisorFailed(join.to_string()))?
            }
        }
    }
}
