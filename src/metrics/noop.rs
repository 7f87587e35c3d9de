//! Metrics when the crate is built without the `metrics` feature.
//!
//! [`Metrics`] has the recording methods of the real one (`src/metrics/mod.rs`), which the
//! pipeline and the RPC client call, and every one of them does nothing: nothing is counted,
//! there is no registry to render and no `/metrics` or `/health` server. The module is not
//! public, `RunningService::metrics` and `RunningService::metrics_address` do not exist, and
//! the runner refuses `ENABLE_METRICS=true` at start-up.

use std::convert::Infallible;
use std::time::Duration;

use crate::data::Handled;

/// Counts nothing (built without the `metrics` feature).
#[cfg(feature = "process")]
#[derive(Clone, Debug)]
pub(crate) struct ProcessCount;

#[cfg(feature = "process")]
impl ProcessCount {
    /// Does nothing.
    pub(crate) fn set(&self, _running: usize) {}
}

/// Records nothing (built without the `metrics` feature).
#[derive(Clone, Debug)]
pub(crate) struct Metrics;

impl Metrics {
    /// The no-op metrics; cannot fail.
    pub(crate) fn new() -> Result<Self, Infallible> {
        Ok(Metrics)
    }

    /// Does nothing.
    pub(crate) fn context(&self, _context: &str, _max_workers: usize, _worker_mode: &str) {}

    /// Nothing to look up.
    pub(crate) fn route_series(&self, _context: &str, _route: &str) -> RouteSeries {
        RouteSeries
    }

    /// Nothing to look up.
    pub(crate) fn route_started(
        &self,
        _context: &str,
        _route: &str,
        _retried: bool,
        _queued: bool,
    ) -> RouteSeries {
        RouteSeries
    }

    /// Does nothing.
    pub(crate) fn received(&self, _series: &RouteSeries) {}

    /// Does nothing.
    pub(crate) fn call_started(&self, _series: &RouteSeries) {}

    /// Does nothing.
    pub(crate) fn call_finished(
        &self,
        _series: &RouteSeries,
        _labels: (&str, &str),
        _elapsed: Duration,
        _failed: bool,
    ) {
    }

    /// Does nothing.
    pub(crate) fn call_dropped(&self, _series: &RouteSeries) {}

    /// Does nothing.
    pub(crate) fn available(&self, _series: &RouteSeries, _available: usize) {}

    /// Does nothing.
    pub(crate) fn settled(
        &self,
        _context: &str,
        _route: &str,
        _name: &str,
        _handled: &Handled,
        _queued: bool,
    ) {
    }

    /// Does nothing.
    pub(crate) fn retried(&self, _context: &str, _route: &str) {}

    /// Counts nothing.
    #[cfg(any(feature = "http", feature = "websocket"))]
    pub(crate) fn refused(&self, _context: &str, _route: &str, _reason: &str) {}

    /// Counts nothing.
    #[cfg(feature = "process")]
    pub(crate) fn worker_replaced(&self, _context: &str, _reason: &str) {}

    /// Counts nothing.
    #[cfg(feature = "process")]
    pub(crate) fn worker_processes(&self, _context: &str) -> ProcessCount {
        ProcessCount
    }

    /// Does nothing.
    #[cfg(feature = "process")]
    pub(crate) fn worker_replaced_never(&self, _context: &str, _reason: &str) {}

    /// Counts nothing.
    #[cfg(feature = "websocket")]
    pub(crate) fn websocket_connection(&self) -> OpenConnection {
        OpenConnection
    }

    /// Does nothing.
    pub(crate) fn rpc_call(
        &self,
        _service: &str,
        _method: &str,
        _outcome: &str,
        _elapsed: Duration,
    ) {
    }
}

/// No series (built without the `metrics` feature).
#[derive(Debug)]
pub(crate) struct RouteSeries;

/// No connection count (built without the `metrics` feature).
#[cfg(feature = "websocket")]
#[derive(Debug)]
pub(crate) struct OpenConnection;
