//! [`RunnerContext`]: routes that share one worker pool.

use std::time::Duration;

use crate::config::WorkerMode;
use crate::pipeline::routes::Route;

/// A group of routes sharing one worker pool with its own size, worker mode and metric label,
/// so that long tasks in one context cannot starve the routes of another.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::config::WorkerMode;
///
/// fn slow_report() {}
/// fn quick_lookup() {}
///
/// let config = Config::new("reports");
/// let runner = Runner::new(vec![Route::new(quick_lookup)], config).context(
///     RunnerContext::new(vec![Route::new(slow_report)])
///         .max_workers(2)
///         .worker_mode(WorkerMode::GreedyThread)
///         .metric_label("slow"),
/// );
/// ```
#[derive(Debug)]
pub struct RunnerContext {
    pub(crate) routes: Vec<Route>,
    pub(crate) max_workers: Option<usize>,
    pub(crate) worker_mode: Option<WorkerMode>,
    pub(crate) metric_label: Option<String>,
    pub(crate) time_limit: Option<Duration>,
}

impl RunnerContext {
    /// A context for `routes`, with the service's `MAX_WORKERS` and `WORKER_MODE` unless set.
    pub fn new(routes: Vec<Route>) -> Self {
        RunnerContext {
            routes,
            max_workers: None,
            worker_mode: None,
            metric_label: None,
            time_limit: None,
        }
    }

    /// How many calls of this context may run at once: from 1 to
    /// [`MAX_WORKERS_LIMIT`](crate::config::MAX_WORKERS_LIMIT), else the start fails.
    pub fn max_workers(mut self, max_workers: usize) -> Self {
        self.max_workers = Some(max_workers);
        self
    }

    /// The worker mode of this context.
    pub fn worker_mode(mut self, worker_mode: WorkerMode) -> Self {
        self.worker_mode = Some(worker_mode);
        self
    }

    /// Stop a call running longer than `limit`, in place of `TASK_TIME_LIMIT`: its worker is
    /// killed in the process modes; in the thread modes an async call is cancelled, and a sync
    /// one (which a thread cannot stop) runs on. A zero `limit` stops the start; a limit too
    /// long for the clock (`Duration::MAX`) is no limit.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }

    /// The `context` label of this context's metrics. By default the first context with
    /// routes is `default` and a later one `context_{n}`, `n` being the number of routes
    /// before it (under both profiles: the Python original's `context_{id(self)}` is a
    /// memory address, different at each start). An empty label, or one that another
    /// context has, stops the start.
    pub fn metric_label(mut self, label: impl Into<String>) -> Self {
        self.metric_label = Some(label.into());
        self
    }
}
