//! The [`Runner`]: starts a service from its routes and config, and stops it gracefully.

mod context;
mod enabled;
mod listeners;
mod metric_labels;
mod signals;

use std::collections::BTreeMap;
#[cfg(feature = "process")]
use std::collections::HashMap;
#[cfg(any(feature = "http", feature = "websocket", feature = "metrics"))]
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use context::RunnerContext;
use enabled::EnabledEntrypoints;
use metric_labels::MetricLabels;

#[cfg(feature = "process")]
use crate::config::WorkerMode;
use crate::config::{Config, MAX_WORKERS_LIMIT};
use crate::data::TargetRole;
use crate::error::{Error, Result};
use crate::handler::dependencies::{self, set_up_all, tear_down, Dependency, SharedDependency};
use crate::handler::extract::TargetSetup;
use crate::handler::ServiceState;
#[cfg(feature = "metrics")]
use crate::metrics::Metrics;
use crate::pipeline::routes::Route;
#[cfg(feature = "process")]
use crate::pipeline::spawners::process::{worker_socket, ProcessPool, WorkerLink};
use crate::pipeline::spawners::WorkerPool;
use crate::pipeline::{RouteHandle, ServiceEnv, Serving};
use crate::transport::topology::{Recorder, Topology};
use crate::transport::SharedTransport;

/// Starts a service: connects to the broker, sets up dependencies and entrypoints, runs the
/// routes, and shuts down gracefully on SIGINT or SIGTERM (a second signal forces the exit).
///
/// ```no_run
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::EventListener;
/// use serde_json::Value;
///
/// fn on_paid(Payload(order): Payload<Value>) {
///     println!("paid: {order}");
/// }
///
/// fn main() -> micro_framework::Result<()> {
///     let config = Config::from_env()?;
///     let routes = vec![Route::new(on_paid).entrypoint(EventListener::new("shop", "paid"))];
///     Runner::new(routes, config).start()
/// }
/// ```
#[derive(Debug)]
pub struct Runner {
    contexts: Vec<RunnerContext>,
    config: Config,
    dependencies: Vec<SharedDependency>,
    entrypoints: EnabledEntrypoints,
    /// How worker processes re-execute the program: `None` for its own arguments.
    #[cfg(feature = "process")]
    worker_args: Option<Vec<std::ffi::OsString>>,
}

impl Runner {
    /// A runner for `routes`, all in one context sized by `MAX_WORKERS` and `WORKER_MODE`.
    pub fn new(routes: Vec<Route>, config: Config) -> Self {
        Runner {
            contexts: vec![RunnerContext::new(routes)],
            config,
            dependencies: Vec::new(),
            entrypoints: EnabledEntrypoints::All,
            #[cfg(feature = "process")]
            worker_args: None,
        }
    }

    /// Add a context: routes with their own worker pool.
    pub fn context(mut self, context: RunnerContext) -> Self {
        self.contexts.push(context);
        self
    }

    /// Start the entrypoints of the routes named in `routes` only; the other routes are set
    /// up (their dependencies) without their entrypoint, for tests to call them directly. A
    /// name that no route has stops the start.
    pub(crate) fn restrict_entrypoints(mut self, routes: &[&str]) -> Self {
        let names = routes.iter().map(|&name| name.to_owned()).collect();
        self.entrypoints = EnabledEntrypoints::Only(names);
        self
    }

    /// Re-execute the program with `args` (instead of its own) for worker processes, which
    /// lets [`Runner::spawn`] run process modes: for a test harness, where the program's own
    /// arguments would run every test again.
    #[cfg(feature = "process")]
    pub(crate) fn worker_args(mut self, args: Vec<std::ffi::OsString>) -> Self {
        self.worker_args = Some(args);
        self
    }

    /// Whether the service starts worker processes: a context with routes runs in a process
    /// worker mode.
    #[cfg(feature = "process")]
    pub(crate) fn starts_workers(&self) -> bool {
        self.contexts.iter().any(|context| {
            let mode = context.worker_mode.unwrap_or(self.config.worker_mode);
            mode.is_process() && !context.routes.is_empty()
        })
    }

    /// Provide `dependency` to every route that has none of the same output type.
    pub fn dependency<D: Dependency>(mut self, dependency: D) -> Self {
        dependencies::insert(&mut self.dependencies, dependencies::share(dependency));
        self
    }

    /// Run the service on a new tokio runtime until SIGINT or SIGTERM. Logs go to stderr
    /// (filter with `RUST_LOG`) unless the program installed its own `tracing` subscriber.
    ///
    /// With `MF_PRINT_TOPOLOGY=1` in the environment it prints the exchanges, queues and
    /// bindings the service declares as JSON on stdout and returns without serving (see
    /// [`Runner::topology`]).
    pub fn start(self) -> Result<()> {
        crate::logging::init(self.config.log_format);
        let runtime = runtime()?;
        if std::env::var("MF_PRINT_TOPOLOGY").is_ok_and(|value| value == "1") {
            let topology = runtime.block_on(self.topology())?;
            println!("{}", serde_json::to_string_pretty(&topology)?);
            return Ok(());
        }
        let result = runtime.block_on(self.run());
        // A sync call still running past SHUTDOWN_TIMEOUT holds a blocking thread, and
        // dropping the runtime would wait for it without end (the task that listens for a
        // second signal is gone by then). The service has stopped and the call's message is
        // back in its queue, so the call is left behind and the program goes on to exit.
        runtime.shutdown_background();
        result
    }

    /// What the service declares (exchanges, queues, bindings), found by setting up its
    /// entrypoints on a private in-process broker: nothing is sent to the real broker.
    pub async fn topology(mut self) -> Result<Topology> {
        // with the delayed-message plugin emulated, so services that need it can list theirs
        self.config.amqp_uri = format!(
            "memory://topology-{}?plugins=rabbitmq_delayed_message_exchange",
            uuid::Uuid::new_v4()
        );
        let (config, plans) = self.prepare()?;
        let memory = crate::transport::connect(&config).await?;
        let recorder = Arc::new(Recorder::new(memory.clone(), &config.service_name));
        // Shared extensions (servers, consumers) are made by the set-ups but never started.
        let env = ServiceEnv::new(config.clone(), recorder.clone())?;
        let mut set_up = Ok(());
        for RoutePlan { mut route, pool, .. } in plans {
            let Some(mut entrypoint) = route.entrypoint.take() else { continue };
            set_up = entrypoint.setup(&RouteHandle::new(route, pool, &env)).await;
            if set_up.is_err() {
                break;
            }
        }
        env.state.clear();
        memory.close().await;
        set_up.map(|()| recorder.topology())
    }

    /// Run the service on the current runtime until SIGINT or SIGTERM, then stop it
    /// gracefully. A second signal exits the process at once. A broker that cannot be
    /// reached at start-up is tried again with backoff (each attempt logged) until it answers
    /// or a signal arrives.
    ///
    /// In process worker modes, the program's binary is started again for each worker
    /// process; there `run` serves calls from the service instead of consuming.
    ///
    /// A sync call still running past `SHUTDOWN_TIMEOUT` keeps its thread: a runtime of the
    /// program's own waits for it when dropped, so end that runtime with
    /// [`shutdown_background`](tokio::runtime::Runtime::shutdown_background) or
    /// [`shutdown_timeout`](tokio::runtime::Runtime::shutdown_timeout), as
    /// [`Runner::start`] does.
    pub async fn run(self) -> Result<()> {
        // a worker process ignores the stop signals: its service ends it
        #[cfg(feature = "process")]
        if worker_socket().is_some() {
            return self.run_until(std::future::pending()).await;
        }
        // Signals are watched in a task of their own from now on, also while the service
        // starts (a dependency's set-up, worker processes), which `run_until` does not
        // interrupt: the first one then stops the service once started, and a second one
        // exits at once, where both went unheard until the start ended.
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(stop_on_signals(stop.clone()));
        let result = self.run_until(stop.clone().cancelled_owned()).await;
        if !stop.is_cancelled() {
            // stopped by itself: no signal to wait for any more
            watcher.abort();
        }
        result
    }

    /// Like [`Runner::run`], but stops gracefully when `stop` completes instead of on a
    /// signal (for programs that decide themselves when to stop; process modes included).
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        #[cfg(feature = "process")]
        if let Some(socket) = worker_socket() {
            return serve_as_worker(self, &socket).await;
        }
        let (config, plans) = self.prepare()?;
        tokio::pin!(stop);
        let transport = tokio::select! {
            transport = connect_retrying(&config) => transport?,
            _ = &mut stop => {
                tracing::info!("stopped before the broker answered: not started");
                return Ok(());
            }
        };
        let mut service = start(plans, &config, transport, None).await?;
        tokio::select! {
            _ = &mut stop => {}
            result = service.wait_finished() => return result,
        }
        service.stopping.cancel();
        service.wait_finished().await
    }

    /// Start the service on the current runtime and return a handle to it (for tests and
    /// programs that run more than a service). Fails at once if the broker is unreachable.
    /// Process worker modes need [`Runner::start`] or [`Runner::run`] (the binary is started
    /// again as a worker): `spawn` refuses them.
    pub async fn spawn(self) -> Result<RunningService> {
        #[cfg(feature = "process")]
        let worker_args = self.worker_args.clone();
        #[cfg(not(feature = "process"))]
        let worker_args: Option<Vec<std::ffi::OsString>> = None;
        let (config, plans) = self.prepare()?;
        let process_plan = plans.iter().find(|plan| plan.pool.mode().is_process());
        if let (Some(plan), None) = (process_plan, &worker_args) {
            return Err(Error::Startup(format!(
                "route '{}': WORKER_MODE={} runs calls in re-executed copies of the program, \
                 so it needs Runner::start or Runner::run (TestService::start in a test), \
                 not Runner::spawn",
                plan.route.name,
                plan.pool.mode()
            )));
        }
        let transport = crate::transport::connect(&config).await?;
        start(plans, &config, transport, worker_args).await
    }

    /// Validate the config and check every route, before touching the broker.
    fn prepare(self) -> Result<(Arc<Config>, Vec<RoutePlan>)> {
        self.config.validate()?;
        // the service logs them; each of its worker processes (every replacement too) would again
        if !in_worker_process() {
            for warning in self.config.warnings() {
                tracing::warn!("{warning}");
            }
        }
        #[cfg(not(feature = "metrics"))]
        if self.config.enable_metrics {
            return Err(Error::Startup(
                "ENABLE_METRICS=true, but micro-framework was built without the `metrics` \
                 feature: enable the feature or set ENABLE_METRICS=false"
                    .into(),
            ));
        }
        let config = Arc::new(self.config);
        let mut plans = plan_routes(self.contexts, &self.dependencies, &config)?;
        self.entrypoints.check(plans.iter().map(|plan| plan.route.name.as_str()))?;
        for plan in &mut plans {
            plan.started = self.entrypoints.enables(&plan.route.name);
        }
        let kinds: Vec<_> = plans
            .iter()
            .filter(|plan| plan.started)
            .filter_map(|plan| plan.route.entrypoint.as_ref().map(|entrypoint| entrypoint.kind()))
            .collect();
        listeners::check(&config, &kinds)?;
        Ok((config, plans))
    }
}

/// Cancel `stop` at the first SIGINT or SIGTERM, and exit the process at the second.
async fn stop_on_signals(stop: CancellationToken) {
    match signals::shutdown_signal().await {
        Ok(signal) => {
            tracing::info!("{signal} received: stopping gracefully (send it again to force)");
            stop.cancel();
        }
        Err(error) => {
            tracing::error!("cannot wait for signals ({error}); stopping");
            stop.cancel();
            return;
        }
    }
    if signals::shutdown_signal().await.is_ok() {
        tracing::error!("second signal: exiting now");
        std::process::exit(130);
    }
}

/// The runtime of [`Runner::start`]. A worker process runs one call at a time: one runtime
/// thread reads its control link (and runs what the call spawns) and a call thread from the
/// blocking pool reads the calls and runs them, sync targets included (so
/// `dispatch_blocking` works), where the default of one runtime thread per core would cost
/// every worker a thread, a stack and a malloc arena per core.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(feature = "process")]
    if worker_socket().is_some() && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

const CONNECT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Connect, retrying with exponential backoff (1 s doubling to 30 s) while trying again can
/// help, e.g. while the broker is unreachable (see
/// [`TransportError::is_permanent`](crate::transport::TransportError::is_permanent)).
/// Permanent errors (a bad URI, refused credentials, TLS refusals, unreadable TLS files) are
/// returned at once.
async fn connect_retrying(config: &Config) -> Result<SharedTransport> {
    let mut pause = Duration::from_secs(1);
    loop {
        match crate::transport::connect(config).await {
            Err(error) if !error.is_permanent() => {
                tracing::warn!(
                    "broker unreachable at {} ({error}); trying again in {pause:?}",
                    config.masked_amqp_uri()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(CONNECT_RETRY_MAX);
            }
            other => return Ok(other?),
        }
    }
}

/// Start the planned routes on `transport`; on failure the transport is closed.
async fn start(
    plans: Vec<RoutePlan>,
    config: &Arc<Config>,
    transport: SharedTransport,
    worker_args: Option<Vec<std::ffi::OsString>>,
) -> Result<RunningService> {
    match start_routes(plans, config, transport.clone(), worker_args).await {
        Ok(service) => Ok(service),
        Err(error) => {
            transport.close().await;
            Err(error)
        }
    }
}

/// A route checked and ready to start, with its pool.
struct RoutePlan {
    route: Route,
    pool: WorkerPool,
    /// Whether its entrypoint starts (else the route is only set up).
    started: bool,
}

fn plan_routes(
    contexts: Vec<RunnerContext>,
    shared: &[SharedDependency],
    config: &Config,
) -> Result<Vec<RoutePlan>> {
    let mut plans: Vec<RoutePlan> = Vec::new();
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
            if plans.iter().any(|plan| plan.route.name == route.name) {
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
            for dependency in shared {
                if !route.dependencies.iter().any(|d| d.output_type() == dependency.output_type()) {
                    route.dependencies.push(dependency.clone());
                }
            }
            check_targets(&route)?;
            labels.add_route(&label, &route.name, route.metric_label_for(config.protocol))?;
            plans.push(RoutePlan { route, pool: pool.clone(), started: true });
        }
    }
    let processes = plans.iter().any(|plan| plan.pool.mode().is_process());
    if let (Some(tasks), false) = (config.max_tasks_per_child, processes) {
        tracing::warn!(
            "MAX_TASKS_PER_CHILD ({tasks}) has no effect: no context runs in a process worker mode"
        );
    }
    Ok(plans)
}

/// Whether this process is a worker process of a service.
fn in_worker_process() -> bool {
    #[cfg(feature = "process")]
    return worker_socket().is_some();
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
        "{source} ({limit:?}) has no effect on the sync functions of context '{}' in \
         WORKER_MODE={mode} (routes {}): a thread cannot be stopped mid-call, only an async \
         function (or, in WORKER_MODE=process or greedy_process, a worker process)",
        pool.context(),
        sync.join(", ")
    );
}

fn check_targets(route: &Route) -> Result<()> {
    let provided: Vec<_> = route.dependencies.iter().map(|d| d.output_type()).collect();
    let targets = std::iter::once((TargetRole::Target, &route.target))
        .chain(route.callback.iter().map(|callback| (TargetRole::Callback, callback)));
    for (role, target) in targets {
        let setup = TargetSetup { route: route.name.clone(), role, provided: provided.clone() };
        (target.check)(&setup).map_err(|reason| {
            Error::Startup(format!("route '{}', function {}: {reason}", route.name, target.path))
        })?;
    }
    Ok(())
}

async fn start_routes(
    plans: Vec<RoutePlan>,
    config: &Arc<Config>,
    transport: SharedTransport,
    worker_args: Option<Vec<std::ffi::OsString>>,
) -> Result<RunningService> {
    let env = ServiceEnv::new(config.clone(), transport.clone())?;
    let all_dependencies = set_up_dependencies(&plans, config).await?;
    #[cfg(feature = "process")]
    let processes = match start_processes(&plans, config, &env, worker_args).await {
        Ok(processes) => processes,
        Err(error) => {
            tear_down(&all_dependencies).await;
            return Err(error);
        }
    };
    #[cfg(not(feature = "process"))]
    let _ = worker_args;
    // A start that fails midway undoes what it has done: a test (or a program) that goes on
    // after the error keeps no dependency set up, no worker process, no shared state.
    let abandon = || async {
        env.state.clear();
        #[cfg(feature = "process")]
        for pool in &processes {
            pool.shutdown().await;
        }
        tear_down(&all_dependencies).await;
    };
    let started = match set_up_routes(plans, &env).await {
        Ok(started) => started,
        Err(error) => {
            abandon().await;
            return Err(error);
        }
    };
    let stopped = CancellationToken::new();
    #[cfg(feature = "metrics")]
    let metrics_address = match config.enable_metrics {
        false => None,
        true => {
            let route_infos = started
                .started
                .iter()
                .map(|(handle, entrypoint)| crate::metrics::status::RouteInfo {
                    name: handle.name().to_owned(),
                    context: handle.pool().context().to_owned(),
                    metric_label: handle.metric_label().to_owned(),
                    entrypoint: entrypoint.describe(),
                    queue: entrypoint.queue(),
                })
                .collect();
            let served = crate::metrics::server::serve(
                config,
                route_infos,
                env.metrics.clone(),
                transport.clone(),
                env.stopping.clone(),
                stopped.clone(),
            )
            .await;
            match served {
                Ok(address) => Some(address),
                Err(error) => {
                    abandon().await;
                    return Err(error);
                }
            }
        }
    };
    let mut tasks = JoinSet::new();
    for (name, serving) in started.serving {
        tasks.spawn(async move { serving.await.map_err(|error| route_stopped(name, error)) });
    }
    let mut routes: BTreeMap<_, _> =
        started.idle.into_iter().map(|handle| (handle.name().to_owned(), handle)).collect();
    for (handle, entrypoint) in started.started {
        routes.insert(handle.name().to_owned(), handle.clone());
        tasks.spawn(async move {
            let name = handle.name().to_owned();
            entrypoint.run(handle).await.map_err(|error| route_stopped(&name, error))
        });
    }
    // a pool that can no longer start worker processes stops the service
    #[cfg(feature = "process")]
    for pool in &processes {
        let (pool, stopping) = (pool.clone(), env.stopping.clone());
        tasks.spawn(async move {
            tokio::select! {
                failure = pool.failed() => Err(failure),
                _ = stopping.cancelled() => Ok(()),
            }
        });
    }
    tracing::info!(
        "service {} started with {} route(s) on {}",
        config.service_name,
        routes.len(),
        config.masked_amqp_uri()
    );
    let supervisor = tokio::spawn(supervise(
        tasks,
        env.clone(),
        all_dependencies,
        #[cfg(feature = "process")]
        processes,
        stopped.clone(),
    ));
    Ok(RunningService {
        state: env.state.clone(),
        stopping: env.stopping,
        stopped,
        routes,
        transport,
        #[cfg(feature = "metrics")]
        metrics: env.metrics,
        #[cfg(feature = "metrics")]
        metrics_address,
        supervisor: Some(supervisor),
    })
}

/// Set up every route's entrypoint (unless it does not start), then start the shared
/// extensions they made.
async fn set_up_routes(plans: Vec<RoutePlan>, env: &ServiceEnv) -> Result<SetUp> {
    let (mut started, mut idle) = (Vec::new(), Vec::new());
    for RoutePlan { mut route, pool, started: starts } in plans {
        env.metrics.context(pool.context(), pool.size(), pool.mode().as_str());
        let Some(mut entrypoint) = route.entrypoint.take() else { continue };
        let handle = RouteHandle::new(route, pool, env);
        if !starts {
            tracing::info!(route = handle.name(), "route ready without its entrypoint");
            idle.push(handle);
            continue;
        }
        entrypoint.setup(&handle).await?;
        tracing::info!(route = handle.name(), "route ready: {}", entrypoint.describe());
        started.push((handle, entrypoint));
    }
    let mut serving = Vec::new();
    for (name, extension) in env.extensions.take() {
        serving.push((name, extension.start().await?));
    }
    Ok(SetUp { started, idle, serving })
}

/// The routes set up with their entrypoints, those set up without, and what each started
/// shared extension serves.
struct SetUp {
    started: Vec<(RouteHandle, Box<dyn crate::pipeline::Entrypoint>)>,
    idle: Vec<RouteHandle>,
    serving: Vec<(&'static str, Serving)>,
}

/// Set up every dependency of the planned routes once (a runner-level dependency is shared
/// by routes), in route order; returns them for teardown.
async fn set_up_dependencies(
    plans: &[RoutePlan],
    config: &Arc<Config>,
) -> Result<Vec<SharedDependency>> {
    let mut unique: Vec<SharedDependency> = Vec::new();
    for dependency in plans.iter().flat_map(|plan| &plan.route.dependencies) {
        if !unique.iter().any(|known| Arc::ptr_eq(known, dependency)) {
            unique.push(dependency.clone());
        }
    }
    set_up_all(unique, config).await
}

/// Start the worker processes of the process-mode contexts.
#[cfg(feature = "process")]
async fn start_processes(
    plans: &[RoutePlan],
    config: &Config,
    env: &ServiceEnv,
    worker_args: Option<Vec<std::ffi::OsString>>,
) -> Result<Vec<Arc<ProcessPool>>> {
    let mut started: Vec<Arc<ProcessPool>> = Vec::new();
    for plan in plans {
        let pool = &plan.pool;
        if pool.mode().is_process() && pool.processes().is_none() {
            tracing::info!("starting {} worker processes ({})", pool.size(), pool.context());
            let processes = ProcessPool::start(
                pool.size(),
                env.transport.clone(),
                env.metrics.clone(),
                pool.time_limit(),
                config.max_tasks_per_child,
                worker_args.clone(),
            )
            .await;
            let processes = match processes {
                Ok(processes) => processes,
                Err(error) => {
                    for pool in &started {
                        pool.shutdown().await;
                    }
                    return Err(error);
                }
            };
            pool.set_processes(processes.clone());
            started.push(processes);
        }
    }
    Ok(started)
}

/// Serve calls as a worker process of the service at `socket`: set up the routes (not their
/// entrypoints) and the dependencies, on a transport that goes through the service.
#[cfg(feature = "process")]
async fn serve_as_worker(runner: Runner, socket: &str) -> Result<()> {
    let (config, plans) = runner.prepare()?;
    let link = WorkerLink::connect(socket).await?;
    let env = ServiceEnv::new(config.clone(), link.transport())?;
    #[cfg(feature = "metrics")]
    env.metrics.record_rpc_calls_with(link.rpc_call_sink());
    let mut routes = HashMap::new();
    let set_up = set_up_dependencies(&plans, &config).await?;
    for RoutePlan { mut route, pool, .. } in plans {
        route.entrypoint = None;
        let local = WorkerPool::new(1, WorkerMode::Thread, pool.context());
        let handle = RouteHandle::new(route, local, &env);
        routes.insert(handle.name().to_owned(), handle);
    }
    let served = link.serve(routes).await;
    tear_down(&set_up).await;
    served
}

fn route_stopped(route: &str, error: Error) -> Error {
    Error::RouteStopped { route: route.to_owned(), source: Box::new(error) }
}

/// Wait for every entrypoint to end; an entrypoint failing, or a pool of worker processes
/// that can no longer start any, stops the whole service.
async fn supervise(
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
        tracing::error!("{failure}; stopping the service");
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
        replies.delete_queues(&env.transport).await;
    }
    env.state.clear();
    env.transport.close().await;
    stopped.cancel();
    tracing::info!("service stopped");
    first_error.map_or(Ok(()), Err)
}

/// A service started with [`Runner::spawn`].
#[derive(Debug)]
pub struct RunningService {
    #[cfg_attr(not(any(feature = "http", feature = "websocket")), allow(dead_code))]
    state: ServiceState,
    stopping: CancellationToken,
    /// Fires once the service has stopped (its calls settled, its connection closed).
    stopped: CancellationToken,
    routes: BTreeMap<String, RouteHandle>,
    transport: SharedTransport,
    #[cfg(feature = "metrics")]
    metrics: Metrics,
    #[cfg(feature = "metrics")]
    metrics_address: Option<SocketAddr>,
    supervisor: Option<tokio::task::JoinHandle<Result<()>>>,
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

    /// Ready to work: connected to the broker (consumers resume by themselves after a
    /// reconnect) and not stopping.
    pub fn is_ready(&self) -> bool {
        self.transport.is_connected() && !self.stopping.is_cancelled()
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

/// What a build without an optional feature refuses at start-up.
#[cfg(all(test, not(all(feature = "metrics", feature = "process"))))]
mod without_features {
    use super::*;

    fn refusal(config: Config) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        match runtime.block_on(Runner::new(Vec::new(), config).spawn()) {
            Err(Error::Startup(reason)) => reason,
            other => panic!("expected a start-up refusal, got {other:?}"),
        }
    }

    #[cfg(not(feature = "metrics"))]
    #[test]
    fn enable_metrics_is_refused_without_the_metrics_feature() {
        let config = Config::new("nometrics").with_amqp_uri("memory://".into());
        let reason = refusal(config.with_enable_metrics(true));
        assert!(reason.contains("built without the `metrics` feature"), "{reason}");
    }

    #[cfg(not(feature = "process"))]
    #[test]
    fn process_modes_are_refused_without_the_process_feature() {
        use crate::config::WorkerMode;
        for mode in [WorkerMode::Process, WorkerMode::GreedyProcess] {
            let config = Config::new("noprocess").with_amqp_uri("memory://".into());
            let reason = refusal(config.with_worker_mode(mode));
            assert!(reason.contains("built without the `process` feature"), "{reason}");
            assert!(reason.contains(mode.as_str()), "{reason}");
        }
    }
}
