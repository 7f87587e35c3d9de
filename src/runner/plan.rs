//! Planning a start: each route checked, given its context's pool and the runner's shared
//! dependencies, before anything touches the broker.

use super::context::RunnerContext;
use super::metric_labels::MetricLabels;
use std::collections::HashSet;
use std::sync::Arc;

use crate::config::{Config, MAX_WORKERS_LIMIT};
use crate::data::TargetRole;
use crate::error::{Error, Result};
use crate::handler::dependencies::SharedDependency;
use crate::handler::extract::TargetSetup;
use crate::pipeline::retry::RetryMode;
use crate::pipeline::routes::Route;
#[cfg(feature = "process")]
use crate::pipeline::spawners::process::is_worker_process;
use crate::pipeline::spawners::WorkerPool;

/// A route checked and ready to start, with its pool.
pub(super) struct RoutePlan {
    pub route: Route,
    pub pool: WorkerPool,
    /// Whether its entrypoint starts (else the route is only set up).
    pub started: bool,
}

/// Check each context's routes and give each its context's pool, with the runner's shared
/// `dependencies` added where a route has none of the same type.
pub(super) fn plan_routes(
    contexts: Vec<RunnerContext>,
    dependencies: &[SharedDependency],
    config: &Config,
) -> Result<Vec<RoutePlan>> {
    let mut plans: Vec<RoutePlan> = Vec::new();
    // looked up per route: a scan of the plans made thousands of routes quadratic to plan
    let mut names: HashSet<String> = HashSet::new();
    let mut labels = MetricLabels::default();
    for context in contexts {
        let mode = context.worker_mode.unwrap_or(config.worker_mode);
        #[cfg(not(feature = "process"))]
        if mode.is_process() {
            return Err(Error::Startup(format!(
                "WORKER_MODE={mode}, but micro-framework was built without the `process` \
                 feature: enable the feature or use thread or greedy_thread"
            )));
        }
        let size = context.max_workers.unwrap_or(config.max_workers);
        if size == 0 || size > MAX_WORKERS_LIMIT {
            return Err(Error::Startup(format!(
                "a RunnerContext needs max_workers from 1 to {MAX_WORKERS_LIMIT}, got {size}"
            )));
        }
        // TASK_TIME_LIMIT=0 is refused by the configuration: a zero limit would fail every
        // async call at once
        if context.time_limit.is_some_and(|limit| limit.is_zero()) {
            return Err(Error::Startup(
                "a RunnerContext needs a time_limit above zero (leave it unset for \
                 TASK_TIME_LIMIT)"
                    .to_owned(),
            ));
        }
        let label = context.metric_label.unwrap_or_else(|| {
            if plans.is_empty() {
                "default".to_owned()
            } else {
                format!("context_{}", plans.len())
            }
        });
        if !context.routes.is_empty() {
            labels.add_context(&label)?;
        }
        let pool = WorkerPool::new(size, mode, &label)
            .with_time_limit(context.time_limit.or(config.task_time_limit));
        if !context.routes.is_empty() && !in_worker_process() {
            warn_time_limit_ignored(&pool, &context.routes, context.time_limit.is_some());
        }
        for mut route in context.routes {
            if route.name.trim().is_empty() {
                return Err(Error::Startup(
                    "a route has an empty name: give it one with Route::name, or none for its \
                     function's name"
                        .into(),
                ));
            }
            if !names.insert(route.name.clone()) {
                return Err(Error::Startup(format!(
                    "two routes are named '{}': give one another name with Route::name",
                    route.name
                )));
            }
            if route.entrypoint.is_none() {
                return Err(Error::Startup(format!(
                    "route '{}' has no entrypoint: add one with Route::entrypoint",
                    route.name
                )));
            }
            if !route.entrypoints_before.is_empty() {
                return Err(Error::Startup(format!(
                    "route '{}' was given {} entrypoints ({}, then {}): a route has one; for a \
                     target triggered in several ways, add a route for each, with a name of \
                     its own (Route::name)",
                    route.name,
                    route.entrypoints_before.len() + 1,
                    route.entrypoints_before.join(", "),
                    route.describe_entrypoint(),
                )));
            }
            if !in_worker_process() {
                warn_broker_retry_ignored(&route);
            }
            for dependency in dependencies {
                if !route.dependencies.iter().any(|d| d.output_type() == dependency.output_type()) {
                    route.dependencies.push(dependency.clone());
                }
            }
            check_targets(&route)?;
            labels.add_route(&label, &route.name, route.metric_label_for(config.protocol))?;
            plans.push(RoutePlan { route, pool: pool.clone(), started: true });
        }
    }
    warn_shadowed(dependencies, &plans);
    let processes = plans.iter().any(|plan| plan.pool.mode().is_process());
    if let (Some(tasks), false) = (config.max_tasks_per_child, processes) {
        tracing::warn!(
            "MAX_TASKS_PER_CHILD ({tasks}) has no effect: no context runs in a process worker mode"
        );
    }
    Ok(plans)
}

/// Warns of each runner-level dependency no route was given: every route has its own of the
/// same output type, which it keeps. A test that swaps in a fake with `Runner::dependency` for
/// a dependency its routes add themselves would otherwise run with the real one, unwarned.
fn warn_shadowed(dependencies: &[SharedDependency], plans: &[RoutePlan]) {
    if plans.is_empty() || in_worker_process() {
        return;
    }
    let given = |dependency: &SharedDependency| {
        let route_has = |plan: &RoutePlan| {
            plan.route.dependencies.iter().any(|given| Arc::ptr_eq(given, dependency))
        };
        plans.iter().any(route_has)
    };
    for dependency in dependencies.iter().filter(|dependency| !given(dependency)) {
        tracing::warn!(
            "Runner::dependency {} reaches no route: each route has its own dependency of \
             the same output type, and a route's own is kept (replace it with \
             Route::dependency on the route)",
            dependency.name()
        );
    }
}

/// Warns of an `AsyncBackOff` on a route whose entrypoint takes no message from a queue (an
/// RPC request is replied, an HTTP or WebSocket call answered, a timer's run logged, and an
/// entrypoint written outside the framework cannot publish): there is no message to publish
/// again, so its first failure is final, and a policy that retries nothing would otherwise
/// pass unseen.
fn warn_broker_retry_ignored(route: &Route) {
    let (Some(policy), Some(entrypoint)) = (&route.backoff, &route.entrypoint) else { return };
    if policy.mode != RetryMode::Broker || entrypoint.kind().0.dead_letters() {
        return;
    }
    tracing::warn!(
        "route '{}': its AsyncBackOff retries nothing, as {} takes no message from a queue to \
         publish again: its first failure is final (BackOff retries in the worker)",
        route.name,
        entrypoint.describe()
    );
}

/// Whether this process is a worker process of a service.
pub(super) fn in_worker_process() -> bool {
    #[cfg(feature = "process")]
    return is_worker_process();
    #[cfg(not(feature = "process"))]
    false
}

/// Warns that the time limit of `pool` (from `RunnerContext::time_limit` when `from_context`,
/// else `TASK_TIME_LIMIT`) does nothing to the sync functions of its `routes` in a thread mode:
/// a thread cannot be stopped mid-call (an async function is cancelled, a worker process
/// killed), and a user relying on the limit must know which calls it does not bound.
fn warn_time_limit_ignored(pool: &WorkerPool, routes: &[Route], from_context: bool) {
    let mode = pool.mode();
    let Some(limit) = pool.time_limit().filter(|_| !mode.is_process()) else { return };
    let sync: Vec<&str> = routes
        .iter()
        .filter(|route| {
            std::iter::once(&route.target)
                .chain(&route.callback)
                .any(|function| !function.asynchronous)
        })
        .map(|route| route.name.as_str())
        .collect();
    if sync.is_empty() {
        return;
    }
    let source = if from_context { "RunnerContext::time_limit" } else { "TASK_TIME_LIMIT" };
    tracing::warn!(
        "{source} ({limit:?}) cannot stop the sync functions of context '{}' in \
         WORKER_MODE={mode} (routes {}): a thread cannot be stopped mid-call, only an async \
         function (or, in WORKER_MODE=process or greedy_process, a worker process); it \
         holds their dependencies' get and after_call only",
        pool.context(),
        sync.join(", ")
    );
}

fn check_targets(route: &Route) -> Result<()> {
    let provided: Vec<_> = route.dependencies.iter().map(|d| d.output_type()).collect();
    let no_call_arguments = route
        .entrypoint_info
        .as_ref()
        .filter(|info| info.kind.never_a_call())
        .map(|info| info.description.clone());
    let targets = std::iter::once((TargetRole::Target, &route.target))
        .chain(route.callback.iter().map(|callback| (TargetRole::Callback, callback)));
    for (role, target) in targets {
        let setup = TargetSetup {
            route: route.name.clone(),
            role,
            provided: provided.clone(),
            no_call_arguments: no_call_arguments.clone(),
        };
        (target.check)(&setup).map_err(|reason| {
            Error::Startup(format!("route '{}', function {}: {reason}", route.name, target.path))
        })?;
    }
    Ok(())
}
