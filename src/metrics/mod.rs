//! Prometheus metrics, with the Python original's names and labels (`context`, `route`) so
//! existing dashboards keep working, plus what operators need beyond them.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tasks_number` | gauge: calls running now | context, route |
//! | `tasks_number_total` | counter: calls started | context, route |
//! | `failed_tasks_total` | counter: calls whose last attempt failed (with `AsyncBackOff` each delivery is a call) | context, route |
//! | `task_duration_seconds` | histogram (`_sum`, `_count` as the original's summary) | context, route |
//! | `service_info` | gauge 1 with `max_workers`, `worker_mode` | context |
//! | `available_workers` | gauge: free worker slots | context |
//! | `messages_received_total` | counter: calls the route started (any entrypoint) | context, route |
//! | `retries_total` | counter: retries scheduled (`AsyncBackOff`) or run in the worker (`BackOff`, any route) | context, route |
//! | `dead_lettered_total` | counter: messages sent to the dead-letter queue | context, route |
//! | `broker_reconnects_total` | counter: reconnections to the broker | |
//! | `broker_connected` | gauge: 1 while connected to the broker and not stopping, else 0 | |
//! | `broker_node` | gauge: 1 for the RabbitMQ node in use (`host:port`), 0 for it while disconnected | node |
//! | `rpc_calls_total` | counter: RPC calls made by the service's targets | service, method, outcome |
//! | `rpc_call_duration_seconds` | histogram: their round trip | service, method |
//! | `ws_active_connections` | gauge: WebSocket connections open (the Python original's) | |
//! | `worker_processes` | gauge: worker processes running, idle or in a call (process modes; fewer than `MAX_WORKERS` while some are being replaced) | context |
//! | `worker_processes_replaced_total` | counter: worker processes replaced (`died_idle`, `died_in_call`, `time_limit`, `recycled`, `call_dropped`) | context, reason |
//! | `requests_refused_total` | counter: HTTP requests and WebSocket commands answered without a call (`too_large`, `unsupported_media_type`, `bad_input`, `stopping`, `busy`, `connection_limit`), and WebSocket handshakes from an origin not allowed (`origin`) or past `WEBSOCKET_MAX_CONNECTIONS` (`max_connections`), with empty context and route | context, route, reason |
//!
//! Served with `/health/live` and `/health/ready` by its server when `ENABLE_METRICS=true`.

/// The `prometheus` crate a service's registry ([`Metrics::registry`]) is of: metrics of
/// your own registered there are made with it, whatever version your crate depends on.
pub use prometheus;

mod failure_log;
mod history;
mod page;
mod quantile;
mod rpc_targets;
pub(crate) mod server;
pub(crate) mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use self::failure_log::FailureLog;
use self::rpc_targets::RpcTargets;
use self::status::{PoolStatus, RecentFailure};
use crate::data::Handled;

/// The metrics of one service, in their own registry (several services can share a process).
///
/// A metric of your own, made with the re-exported [`prometheus`] and registered in the
/// service's registry, is served with the service's at `/metrics`:
///
/// ```
/// use micro_framework::amqp::entrypoints::RPCListener;
/// use micro_framework::metrics::prometheus::{IntCounter, Opts};
/// use micro_framework::prelude::*;
/// use micro_framework::testing::{test_config, TestService};
///
/// fn take_order() -> u32 { 1 }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let routes = vec![Route::new(take_order).entrypoint(RPCListener::new())];
/// let service = TestService::start(routes, test_config("orders")).await.unwrap();
/// let metrics = service.service().metrics();
/// let orders = IntCounter::with_opts(Opts::new("orders_total", "orders taken")).unwrap();
/// metrics.registry().register(Box::new(orders.clone())).unwrap();
/// orders.inc();
/// assert!(metrics.render().contains("orders_total 1"));
/// service.stop().await.unwrap();
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    running: IntGaugeVec,
    started: IntCounterVec,
    failed: IntCounterVec,
    duration: HistogramVec,
    info: GaugeVec,
    available: IntGaugeVec,
    received: IntCounterVec,
    retries: IntCounterVec,
    dead_lettered: IntCounterVec,
    reconnects: IntCounter,
    rpc_calls: IntCounterVec,
    rpc_duration: HistogramVec,
    connected: IntGauge,
    node: IntGaugeVec,
    ws_connections: IntGauge,
    refused: IntCounterVec,
    replaced: IntCounterVec,
    processes: IntGaugeVec,
    /// The `node` label last set in `node`.
    last_node: Arc<Mutex<Option<String>>>,
    /// Each context's pool: (size, worker mode).
    pools: Arc<Mutex<BTreeMap<String, (usize, String)>>>,
    failures: Arc<FailureLog>,
    /// Where RPC calls are recorded instead, when set: a worker process hands them to its
    /// service, whose registry is the one served.
    rpc_calls_elsewhere: Arc<OnceLock<RpcCallSink>>,
    /// The `(service, method)` pairs labelled in `rpc_calls` and `rpc_duration`.
    rpc_targets: Arc<RpcTargets>,
}

/// Records an RPC call made (service, method, outcome, round trip) somewhere else.
pub(crate) struct RpcCallSink(pub(crate) Box<RecordRpcCall>);

/// What records an RPC call: service, method, outcome, round trip.
type RecordRpcCall = dyn Fn(&str, &str, &str, Duration) + Send + Sync;

impl std::fmt::Debug for RpcCallSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RpcCallSink")
    }
}

fn labelled(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

/// The count of a pool's worker processes running, idle or in a call (`worker_processes`).
#[cfg(feature = "process")]
#[derive(Clone, Debug)]
pub(crate) struct ProcessCount(IntGauge);

#[cfg(feature = "process")]
impl ProcessCount {
    pub(crate) fn set(&self, running: usize) {
        self.0.set(gauge(running));
    }
}

impl Metrics {
    /// A fresh set of metrics in a new registry.
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let route = &["context", "route"];
        let metrics = Metrics {
            registry: Registry::new(),
            running: IntGaugeVec::new(
                Opts::new("tasks_number", "Number of tasks being run at the moment"),
                route,
            )?,
            started: labelled("tasks_number_total", "Total number of tasks", route)?,
            failed: labelled(
                "failed_tasks_total",
                "Total number of tasks that have failed",
                route,
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new("task_duration_seconds", "Duration time of a task"),
                route,
            )?,
            info: GaugeVec::new(
                Opts::new("service_info", "Information regarding the service"),
                &["context", "max_workers", "worker_mode"],
            )?,
            available: IntGaugeVec::new(
                Opts::new("available_workers", "Number of workers available"),
                &["context"],
            )?,
            received: labelled(
                "messages_received_total",
                "Calls a route started (any entrypoint)",
                route,
            )?,
            retries: labelled("retries_total", "Retries scheduled or run", route)?,
            dead_lettered: labelled(
                "dead_lettered_total",
                "Messages sent to a dead-letter queue",
                route,
            )?,
            reconnects: IntCounter::new("broker_reconnects_total", "Reconnections to the broker")?,
            rpc_calls: labelled(
                "rpc_calls_total",
                "RPC calls made, by outcome",
                &["service", "method", "outcome"],
            )?,
            rpc_duration: HistogramVec::new(
                HistogramOpts::new("rpc_call_duration_seconds", "Round trip of RPC calls made"),
                &["service", "method"],
            )?,
            connected: IntGauge::new(
                "broker_connected",
                "1 while connected to the broker and not stopping, else 0",
            )?,
            node: IntGaugeVec::new(
                Opts::new("broker_node", "1 for the broker node in use (host:port)"),
                &["node"],
            )?,
            // the Python original's name and help
            ws_connections: IntGauge::new("ws_active_connections", "Number of Active Connections")?,
            refused: labelled(
                "requests_refused_total",
                "HTTP requests, WebSocket commands and handshakes answered without a call, by reason",
                &["context", "route", "reason"],
            )?,
            replaced: labelled(
                "worker_processes_replaced_total",
                "Worker processes replaced, by reason",
                &["context", "reason"],
            )?,
            processes: IntGaugeVec::new(
                Opts::new("worker_processes", "Worker processes running, idle or in a call"),
                &["context"],
            )?,
            last_node: Arc::default(),
            pools: Arc::default(),
            failures: Arc::default(),
            rpc_calls_elsewhere: Arc::default(),
            rpc_targets: Arc::default(),
        };
        let registry = &metrics.registry;
        registry.register(Box::new(metrics.running.clone()))?;
        registry.register(Box::new(metrics.started.clone()))?;
        registry.register(Box::new(metrics.failed.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.info.clone()))?;
        registry.register(Box::new(metrics.available.clone()))?;
        registry.register(Box::new(metrics.received.clone()))?;
        registry.register(Box::new(metrics.retries.clone()))?;
        registry.register(Box::new(metrics.dead_lettered.clone()))?;
        registry.register(Box::new(metrics.reconnects.clone()))?;
        registry.register(Box::new(metrics.rpc_calls.clone()))?;
        registry.register(Box::new(metrics.rpc_duration.clone()))?;
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.node.clone()))?;
        registry.register(Box::new(metrics.ws_connections.clone()))?;
        registry.register(Box::new(metrics.refused.clone()))?;
        registry.register(Box::new(metrics.replaced.clone()))?;
        registry.register(Box::new(metrics.processes.clone()))?;
        Ok(metrics)
    }

    /// Describe a context (its pool) once at start-up.
    pub(crate) fn context(&self, context: &str, max_workers: usize, worker_mode: &str) {
        self.info.with_label_values(&[context, &max_workers.to_string(), worker_mode]).set(1.0);
        self.available.with_label_values(&[context]).set(gauge(max_workers));
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.insert(context.to_owned(), (max_workers, worker_mode.to_owned()));
    }

    /// The pools now, busy and free slots.
    fn pools(&self) -> Vec<PoolStatus> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools
            .iter()
            .map(|(context, (size, mode))| {
                let max_workers = size.to_owned() as u64;
                let free = u64::try_from(self.available.with_label_values(&[context]).get())
                    .unwrap_or(0)
                    .min(max_workers);
                let processes = status::series_labelled(&self.processes, &[("context", context)]);
                PoolStatus {
                    context: context.clone(),
                    worker_mode: mode.clone(),
                    max_workers,
                    busy: max_workers - free,
                    free,
                    processes: processes.map(|series| series.get_gauge().get_value() as u64),
                }
            })
            .collect()
    }

    fn recent_failures(&self) -> Vec<RecentFailure> {
        self.failures.newest_first()
    }

    /// The series of a route's calls, looked up once: a call then records into them without
    /// hashing its labels. Each series appears in `/metrics` from this lookup on.
    pub(crate) fn route_series(&self, context: &str, route: &str) -> RouteSeries {
        RouteSeries {
            received: self.received.with_label_values(&[context, route]),
            running: self.running.with_label_values(&[context, route]),
            started: self.started.with_label_values(&[context, route]),
            duration: self.duration.with_label_values(&[context, route]),
            available: self.available.with_label_values(&[context]),
        }
    }

    /// [`Metrics::route_series`] for a route the service starts, with its failures counted at
    /// 0 from the start: its retries if it has a retry policy (`retried`), its dead letters
    /// if it consumes a queue (`queued`). A counter that appeared at its first count, at 1,
    /// would hide that count from `increase()` and `rate()`, which alerts read.
    pub(crate) fn route_started(
        &self,
        context: &str,
        route: &str,
        retried: bool,
        queued: bool,
    ) -> RouteSeries {
        let labels = [context, route];
        self.failed.with_label_values(&labels);
        if retried {
            self.retries.with_label_values(&labels);
        }
        if queued {
            self.dead_lettered.with_label_values(&labels);
        }
        self.route_series(context, route)
    }

    /// A message was delivered to a route.
    pub(crate) fn received(&self, series: &RouteSeries) {
        series.received.inc();
    }

    /// A call started.
    pub(crate) fn call_started(&self, series: &RouteSeries) {
        series.running.inc();
        series.started.inc();
    }

    /// A call of the route labelled `context`, `route` ended after `elapsed`, failed or not.
    pub(crate) fn call_finished(
        &self,
        series: &RouteSeries,
        (context, route): (&str, &str),
        elapsed: Duration,
        failed: bool,
    ) {
        series.running.dec();
        series.duration.observe(elapsed.as_secs_f64());
        if failed {
            self.failed.with_label_values(&[context, route]).inc();
        }
    }

    /// A call of the route was dropped before its end (its outcome and duration unknown).
    pub(crate) fn call_dropped(&self, series: &RouteSeries) {
        series.running.dec();
    }

    /// Free slots of a route's context changed.
    pub(crate) fn available(&self, series: &RouteSeries, available: usize) {
        series.available.set(gauge(available));
    }

    /// How a message's handling ended, on the route named `name` whose label is `route`.
    /// Retries and dead letters are counted for a route that consumes a queue (`queued`):
    /// the others answer their failures instead (an RPC reply, an HTTP or WebSocket error, a
    /// timer's log line), and these count in `failed_tasks_total` only.
    pub(crate) fn settled(
        &self,
        context: &str,
        route: &str,
        name: &str,
        handled: &Handled,
        queued: bool,
    ) {
        if let Handled::Failed(failure)
        | Handled::Retry { failure, .. }
        | Handled::CalledBack(failure) = handled
        {
            // the status page lists failures by route name, as it lists the routes
            self.failures.record(name, failure);
        }
        match handled {
            Handled::Retry { .. } if queued => {
                self.retries.with_label_values(&[context, route]).inc();
            }
            Handled::Failed(_) if queued => {
                self.dead_lettered.with_label_values(&[context, route]).inc();
            }
            _ => {}
        }
    }

    /// An in-worker retry.
    pub(crate) fn retried(&self, context: &str, route: &str) {
        self.retries.with_label_values(&[context, route]).inc();
    }

    /// An RPC call made to `service.method` ended with `outcome` (`ok`, or the error kind)
    /// after `elapsed`.
    pub(crate) fn rpc_call(&self, service: &str, method: &str, outcome: &str, elapsed: Duration) {
        if let Some(sink) = self.rpc_calls_elsewhere.get() {
            return (sink.0)(service, method, outcome, elapsed);
        }
        let (service, method) = self.rpc_targets.labels(service, method);
        self.rpc_calls.with_label_values(&[service, method, outcome]).inc();
        self.rpc_duration.with_label_values(&[service, method]).observe(elapsed.as_secs_f64());
    }

    /// Record the RPC calls made from now on with `sink` instead, in this value and its
    /// clones (a worker process's, whose registry nobody serves). Set once; later calls
    /// change nothing.
    #[cfg(feature = "process")]
    pub(crate) fn record_rpc_calls_with(&self, sink: RpcCallSink) {
        let _ = self.rpc_calls_elsewhere.set(sink);
    }

    /// Whether the service is connected to its broker and not stopping (read when scraped).
    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// The broker node last connected to (read when scraped): its series reads 1 while
    /// `connected`, else 0; the previous node's series is removed.
    pub(crate) fn set_broker_node(&self, node: Option<&str>, connected: bool) {
        let Some(node) = node else { return };
        let mut last = self.last_node.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = last.as_deref().filter(|previous| *previous != node) {
            let _ = self.node.remove_label_values(&[previous]);
        }
        self.node.with_label_values(&[node]).set(i64::from(connected));
        *last = Some(node.to_owned());
    }

    /// A WebSocket connection opened (its handshake done): counted in `ws_active_connections`
    /// until the value returned is dropped.
    #[cfg(feature = "websocket")]
    pub(crate) fn websocket_connection(&self) -> OpenConnection {
        self.ws_connections.inc();
        OpenConnection(self.ws_connections.clone())
    }

    /// A request for the route labelled `context`, `route` was answered without a call, for
    /// `reason`: a client refused (a body too large, the service stopping, no worker free)
    /// is an operator's sign as much as a failed call is. A WebSocket handshake refused, which
    /// names no route yet, is counted with both labels empty.
    #[cfg(any(feature = "http", feature = "websocket"))]
    pub(crate) fn refused(&self, context: &str, route: &str, reason: &str) {
        self.refused.with_label_values(&[context, route, reason]).inc();
    }

    /// A worker process of `context` was replaced, for `reason`: an idle worker killed by
    /// the OOM killer fails no call, and would otherwise show in no metric.
    #[cfg(feature = "process")]
    pub(crate) fn worker_replaced(&self, context: &str, reason: &str) {
        self.replaced.with_label_values(&[context, reason]).inc();
    }

    /// The count of worker processes of `context` replaced for `reason`, shown at 0.
    #[cfg(feature = "process")]
    pub(crate) fn worker_replaced_never(&self, context: &str, reason: &str) {
        self.replaced.with_label_values(&[context, reason]);
    }

    /// The count of the worker processes of `context` running, looked up once for its pool:
    /// the free slots of `available_workers` do not show a worker being replaced.
    #[cfg(feature = "process")]
    pub(crate) fn worker_processes(&self, context: &str) -> ProcessCount {
        ProcessCount(self.processes.with_label_values(&[context]))
    }

    /// Set the reconnection count (read from the transport).
    pub(crate) fn set_reconnects(&self, total: u64) {
        let current = self.reconnects.get();
        if total > current {
            self.reconnects.inc_by(total - current);
        }
    }

    /// The registry, to add metrics of your own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoded = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        match encoded {
            Ok(()) => String::from_utf8_lossy(&buffer).into_owned(),
            Err(error) => format!("# cannot encode metrics: {error}\n"),
        }
    }
}

/// An open WebSocket connection, counted in `ws_active_connections` while it lives.
#[cfg(feature = "websocket")]
#[derive(Debug)]
pub(crate) struct OpenConnection(IntGauge);

#[cfg(feature = "websocket")]
impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The series every call of one route records into (see [`Metrics::route_series`]).
#[derive(Debug)]
pub(crate) struct RouteSeries {
    received: IntCounter,
    running: IntGauge,
    started: IntCounter,
    duration: Histogram,
    available: IntGauge,
}

fn gauge(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::rpc_targets::{MAX_RPC_TARGETS, OTHER_TARGETS};
    use super::*;

    #[test]
    fn rpc_calls_to_more_methods_than_the_cap_share_one_series() {
        let metrics = Metrics::new().unwrap();
        let elapsed = Duration::from_millis(1);
        for n in 0..MAX_RPC_TARGETS + 50 {
            metrics.rpc_call("gateway", &format!("method_{n}"), "ok", elapsed);
        }
        let rendered = metrics.render();
        let series = rendered.lines().filter(|line| line.starts_with("rpc_calls_total{")).count();
        assert_eq!(series, MAX_RPC_TARGETS + 1);
        let other = format!(
            r#"rpc_calls_total{{method="{OTHER_TARGETS}",outcome="ok",service="{OTHER_TARGETS}"}} 50"#
        );
        assert!(rendered.contains(&other), "{other}");
    }
}
