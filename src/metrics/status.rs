//! The service at a glance: what `/` and `/status.json` of the metrics server show, read from
//! the service's own metrics and its broker connection, with a short history sampled in the
//! background (throughput and failures over the last 15 minutes, duration percentiles over
//! the last 5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus::core::Collector;
use prometheus::proto;
use serde::Serialize;

use super::history::{History, Totals};
use super::quantile::{bucket_deltas, quantile};
use super::Metrics;
use crate::transport::SharedTransport;

/// How often the history is sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: 15 minutes.
const SAMPLES: usize = 90;
/// The window of the duration percentiles.
const PERCENTILE_WINDOW: Duration = Duration::from_secs(300);
/// How long the status waits for the broker to count the dead letters waiting.
const DEAD_LETTERS_LOOKUP: Duration = Duration::from_secs(2);

/// A route as the status shows it.
#[derive(Clone, Debug)]
pub(crate) struct RouteInfo {
    /// The route's name.
    pub name: String,
    /// Its runner context's metric label.
    pub context: String,
    /// The `route` label of its metrics.
    pub metric_label: String,
    /// Its entrypoint, described.
    pub entrypoint: String,
    /// The queue it consumes, if any.
    pub queue: Option<String>,
    /// Whether its failures end in `{queue}.dlq` (events, work queues): an RPC route's are
    /// replied, and it has no such queue to look up.
    pub dead_letters: bool,
}

/// Everything the status page shows, as served at `/status.json`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The service's name.
    pub service: String,
    /// The framework's version.
    pub framework_version: &'static str,
    /// When the service started (RFC 3339).
    pub started_at: String,
    /// Seconds since then.
    pub uptime_seconds: u64,
    /// The broker connection.
    pub broker: BrokerStatus,
    /// The worker pools, one per runner context.
    pub pools: Vec<PoolStatus>,
    /// The routes.
    pub routes: Vec<RouteStatus>,
    /// The last failures, newest first; absent unless `STATUS_SHOW_FAILURES=true` (error texts
    /// can hold user data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_failures: Option<Vec<RecentFailure>>,
}

/// The broker connection.
#[derive(Debug, Serialize)]
pub struct BrokerStatus {
    /// The broker's URI (or list of node URIs), password masked.
    pub uri: String,
    /// `host:port` of the broker node in use, while connected to RabbitMQ.
    pub node: Option<String>,
    /// Whether the service is connected now.
    pub connected: bool,
    /// Since when (RFC 3339), while connected.
    pub connected_since: Option<String>,
    /// Reconnections so far.
    pub reconnects: u64,
}

/// One worker pool.
#[derive(Debug, Serialize)]
pub struct PoolStatus {
    /// The runner context.
    pub context: String,
    /// `WORKER_MODE`.
    pub worker_mode: String,
    /// Its size.
    pub max_workers: u64,
    /// Slots running a call now.
    pub busy: u64,
    /// Free slots.
    pub free: u64,
    /// Worker processes running, idle or in a call, in the process modes: fewer than
    /// `max_workers` while some are being replaced (their slots count as free).
    pub processes: Option<u64>,
}

/// One route.
#[derive(Debug, Serialize)]
pub struct RouteStatus {
    /// The route's name.
    pub name: String,
    /// Its runner context.
    pub context: String,
    /// Its entrypoint, described.
    pub entrypoint: String,
    /// The queue it consumes, if any.
    pub queue: Option<String>,
    /// Messages waiting in `{queue}.dlq`, when the broker could say at once (none while
    /// disconnected).
    pub dead_letters_waiting: Option<u32>,
    /// Calls started.
    pub calls: u64,
    /// Calls whose last attempt failed (with `AsyncBackOff` each delivery is a call).
    pub failures: u64,
    /// Retries scheduled or run.
    pub retries: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Calls running now.
    pub in_flight: u64,
    /// Call durations over the last 5 minutes, in seconds: 50th, 95th and 99th percentiles
    /// (none without calls).
    pub duration_p50: Option<f64>,
    /// See `duration_p50`.
    pub duration_p95: Option<f64>,
    /// See `duration_p50`.
    pub duration_p99: Option<f64>,
    /// Calls and failures per 10-second interval over the last 15 minutes, oldest first.
    pub history: Vec<Interval>,
}

/// Calls and failures in one sampling interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Interval {
    /// Calls started in it.
    pub calls: u64,
    /// Calls failed in it.
    pub failures: u64,
}

/// A failure, when they are shown.
#[derive(Debug, Clone, Serialize)]
pub struct RecentFailure {
    /// The route.
    pub route: String,
    /// When (RFC 3339).
    pub at: String,
    /// The failure kind.
    pub kind: String,
    /// The error text (at most 4 KiB).
    pub error: String,
}

/// What the status needs besides the metrics: the routes, the history, the failures.
#[derive(Debug)]
pub(crate) struct StatusSource {
    service: String,
    broker_uri: String,
    started_at: SystemTime,
    routes: Vec<RouteInfo>,
    metrics: Metrics,
    transport: SharedTransport,
    history: Mutex<History>,
}

impl StatusSource {
    pub(crate) fn new(
        service: String,
        broker_uri: String,
        routes: Vec<RouteInfo>,
        metrics: Metrics,
        transport: SharedTransport,
    ) -> Arc<Self> {
        let started_at = SystemTime::now();
        let history = Mutex::new(History::new(SAMPLES, PERCENTILE_WINDOW));
        Arc::new(StatusSource {
            service,
            broker_uri,
            started_at,
            routes,
            metrics,
            transport,
            history,
        })
    }

    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record the counters now (every [`SAMPLE_EVERY`]).
    pub(crate) fn sample(&self) {
        let mut totals = Vec::with_capacity(self.routes.len());
        let mut buckets = Vec::new();
        let read = Counters::read(&self.metrics);
        for route in &self.routes {
            let (route_totals, route_buckets) = read.of(route);
            totals.push(route_totals);
            buckets.extend(route_buckets.iter().map(|(_, count)| count));
        }
        self.history().record(SystemTime::now(), totals, buckets);
    }

    /// Messages waiting in each route's dead-letter queue, in the order of the routes, as far
    /// as the broker answers within [`DEAD_LETTERS_LOOKUP`]. Not asked for routes that never
    /// dead-letter: their queue does not exist, and RabbitMQ closes the channel of each lookup
    /// of a missing queue, which lapin logs as an error. Not asked while disconnected: a
    /// broker operation waits for the reconnect (up to the publish timeout, 30 s), and the
    /// page would hang while the broker is away, when it is needed most, holding a connection
    /// slot of the metrics server meanwhile.
    async fn dead_letters_waiting(&self) -> Vec<Option<u32>> {
        let connected = self.transport.is_connected();
        let lookups = self.routes.iter().map(|route| async move {
            let queue = route.queue.as_deref().filter(|_| connected && route.dead_letters)?;
            let queue = format!("{queue}.dlq");
            let lookup =
                tokio::time::timeout(DEAD_LETTERS_LOOKUP, self.transport.queue_info(&queue));
            lookup.await.ok()?.ok().map(|info| info.message_count)
        });
        futures::future::join_all(lookups).await
    }

    /// The status now.
    pub(crate) async fn status(&self, show_failures: bool) -> Status {
        let now = SystemTime::now();
        let read = Counters::read(&self.metrics);
        let current: Vec<_> = self.routes.iter().map(|route| read.of(route)).collect();
        let retries = BySeries::of(&self.metrics.retries);
        let dead_lettered = BySeries::of(&self.metrics.dead_lettered);
        let running = BySeries::of(&self.metrics.running);
        // cheap: the samples share their counters
        let history = self.history().clone();
        let window_start = history.window_start(now);
        let metrics = &self.metrics;
        let dead_letters = self.dead_letters_waiting().await;
        let mut routes = Vec::new();
        for (index, ((route, (now_totals, now_buckets)), dead_letters_waiting)) in
            self.routes.iter().zip(current).zip(dead_letters).enumerate()
        {
            // a sample keeps the counts only: the bounds are the same in every one
            let since: Option<Vec<(f64, u64)>> =
                window_start.and_then(|start| start.buckets(index)).map(|counts| {
                    now_buckets
                        .iter()
                        .map(|(bound, _)| *bound)
                        .zip(counts.iter().copied())
                        .collect()
                });
            let recent = bucket_deltas(&now_buckets, since.as_deref());
            let points = history
                .samples()
                .map(|sample| sample.totals(index))
                .chain(std::iter::once(now_totals))
                .collect::<Vec<_>>();
            routes.push(RouteStatus {
                name: route.name.clone(),
                context: route.context.clone(),
                entrypoint: route.entrypoint.clone(),
                queue: route.queue.clone(),
                dead_letters_waiting,
                calls: now_totals.calls,
                failures: now_totals.failures,
                retries: retries.count(route),
                dead_lettered: dead_lettered.count(route),
                in_flight: running
                    .get(route)
                    .map_or(0, |series| series.get_gauge().get_value() as u64),
                duration_p50: quantile(&recent, 0.5),
                duration_p95: quantile(&recent, 0.95),
                duration_p99: quantile(&recent, 0.99),
                history: points
                    .windows(2)
                    .map(|pair| Interval {
                        calls: pair[1].calls.saturating_sub(pair[0].calls),
                        failures: pair[1].failures.saturating_sub(pair[0].failures),
                    })
                    .collect(),
            });
        }
        let transport = &self.transport;
        Status {
            service: self.service.clone(),
            framework_version: env!("CARGO_PKG_VERSION"),
            started_at: rfc3339(self.started_at),
            uptime_seconds: now.duration_since(self.started_at).unwrap_or_default().as_secs(),
            broker: BrokerStatus {
                uri: self.broker_uri.clone(),
                node: transport.broker_node(),
                connected: transport.is_connected(),
                connected_since: transport.connected_since().map(rfc3339),
                reconnects: transport.reconnects(),
            },
            pools: metrics.pools(),
            routes,
            recent_failures: show_failures.then(|| metrics.recent_failures()),
        }
    }
}

/// A family's series by their `context` and `route` labels, read once for all the routes,
/// without creating any: `with_label_values` would add each it reads, at 0, to `/metrics` (a
/// `dead_lettered_total` for an RPC route that never dead-letters), where reading the status
/// is to change nothing.
struct BySeries(HashMap<(String, String), proto::Metric>);

impl BySeries {
    fn of(family: &impl Collector) -> Self {
        let mut by_route = HashMap::new();
        for series in family.collect().into_iter().flat_map(|mut family| family.take_metric()) {
            let label = |name: &str| {
                let pair = series.get_label().iter().find(|pair| pair.name() == name);
                pair.map(|pair| pair.value().to_owned())
            };
            if let (Some(context), Some(route)) = (label("context"), label("route")) {
                by_route.insert((context, route), series);
            }
        }
        BySeries(by_route)
    }

    fn get(&self, route: &RouteInfo) -> Option<&proto::Metric> {
        self.0.get(&(route.context.clone(), route.metric_label.clone()))
    }

    /// The count of a counter's series of `route`; 0 while it has none.
    fn count(&self, route: &RouteInfo) -> u64 {
        self.get(route).map_or(0, |series| series.get_counter().get_value() as u64)
    }
}

/// What the history samples of each route, read once for all of them.
struct Counters {
    started: BySeries,
    failed: BySeries,
    duration: BySeries,
}

impl Counters {
    fn read(metrics: &Metrics) -> Self {
        Counters {
            started: BySeries::of(&metrics.started),
            failed: BySeries::of(&metrics.failed),
            duration: BySeries::of(&metrics.duration),
        }
    }

    /// A route's calls and failures so far, and its duration histogram as (upper bound,
    /// cumulative count) of its finite buckets, then (infinity, all observations).
    fn of(&self, route: &RouteInfo) -> (Totals, Vec<(f64, u64)>) {
        let buckets = match self.duration.get(route) {
            Some(series) => {
                let histogram = series.get_histogram();
                histogram
                    .get_bucket()
                    .iter()
                    .map(|bucket| (bucket.upper_bound(), bucket.cumulative_count()))
                    .chain(std::iter::once((f64::INFINITY, histogram.get_sample_count())))
                    .collect()
            }
            // the bounds `HistogramOpts::new` gives every series, no call in any
            None => prometheus::DEFAULT_BUCKETS
                .iter()
                .chain(std::iter::once(&f64::INFINITY))
                .map(|bound| (*bound, 0))
                .collect(),
        };
        let totals =
            Totals { calls: self.started.count(route), failures: self.failed.count(route) };
        (totals, buckets)
    }
}

/// The series of `family` with `labels` (name, value), read without creating it.
pub(super) fn series_labelled(
    family: &impl Collector,
    labels: &[(&str, &str)],
) -> Option<proto::Metric> {
    let matches = |series: &proto::Metric| {
        labels.iter().all(|(name, value)| {
            series.get_label().iter().any(|pair| pair.name() == *name && pair.value() == *value)
        })
    };
    family.collect().into_iter().flat_map(|mut family| family.take_metric()).find(matches)
}

/// `at` in RFC 3339, to the second, in UTC.
pub(super) fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> RouteInfo {
        RouteInfo {
            name: name.into(),
            context: "default".into(),
            metric_label: name.into(),
            entrypoint: format!("Rpc({name})"),
            queue: None,
            dead_letters: false,
        }
    }

    /// The history holds routes by their position: each route's chart and percentiles are
    /// its own.
    #[tokio::test]
    async fn each_route_shows_its_own_history_and_percentiles() {
        let name = format!("status-history-{}", uuid::Uuid::new_v4());
        let config = crate::Config::new(name.as_str()).with_amqp_uri(format!("memory://{name}"));
        let transport = crate::transport::connect(&config).await.unwrap();
        let metrics = Metrics::new().unwrap();
        let routes = vec![route("quick"), route("slow")];
        let source = StatusSource::new(name, String::new(), routes, metrics.clone(), transport);
        let call = |route: &str, seconds: f64, failed: bool| {
            let series = metrics.route_series("default", route);
            metrics.call_started(&series);
            let elapsed = Duration::from_secs_f64(seconds);
            metrics.call_finished(&series, ("default", route), elapsed, failed);
        };
        source.sample();
        for _ in 0..3 {
            call("slow", 2.0, false);
        }
        call("slow", 2.0, true);
        source.sample();
        call("quick", 0.004, false);
        let status = source.status(false).await;
        let shown = |index: usize| {
            let route: &RouteStatus = &status.routes[index];
            let history: Vec<_> = route.history.iter().map(|i| (i.calls, i.failures)).collect();
            (route.name.as_str(), route.calls, route.failures, history, route.duration_p50)
        };
        let (name, calls, failures, history, p50) = shown(0);
        assert_eq!((name, calls, failures), ("quick", 1, 0));
        assert_eq!(history, vec![(0, 0), (1, 0)]);
        assert!(p50.is_some_and(|p50| p50 <= 0.005), "{p50:?}");
        let (name, calls, failures, history, p50) = shown(1);
        assert_eq!((name, calls, failures), ("slow", 4, 1));
        assert_eq!(history, vec![(4, 1), (0, 0)]);
        assert!(p50.is_some_and(|p50| p50 > 1.0 && p50 <= 2.5), "{p50:?}");
    }

    /// A route without a call yet has no histogram series: it reads the bounds every series
    /// gets, at 0, so that each route's buckets sit at the same place in a sample (the
    /// history finds a route's buckets by its position).
    #[test]
    fn a_route_without_calls_reads_the_bounds_of_one_with_calls_at_zero() {
        let metrics = Metrics::new().unwrap();
        let series = metrics.route_series("default", "busy");
        metrics.call_started(&series);
        metrics.call_finished(&series, ("default", "busy"), Duration::from_millis(3), false);
        let read = Counters::read(&metrics);
        let (_, busy) = read.of(&route("busy"));
        let (idle_totals, idle) = read.of(&route("idle"));
        assert_eq!(idle_totals, Totals::default());
        let bounds = |buckets: &[(f64, u64)]| buckets.iter().map(|(b, _)| *b).collect::<Vec<_>>();
        assert_eq!(bounds(&idle), bounds(&busy));
        assert!(idle.iter().all(|(_, count)| *count == 0), "{idle:?}");
        assert_eq!(busy.last(), Some(&(f64::INFINITY, 1)));
    }
}
