//! Starting a planned service: connecting (with retries), setting up dependencies, worker
//! processes and entrypoints, undoing all of it when a step fails, then running the
//! entrypoints under the supervisor.

use std::collections::BTreeMap;
#[cfg(feature = "process")]
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::channels::check_channel_limit;
use super::plan::RoutePlan;
use super::running::{supervise, RunningService};
#[cfg(feature = "process")]
use super::Runner;
use crate::config::Config;
#[cfg(feature = "process")]
use crate::config::WorkerMode;
use crate::error::{Error, Result};
use crate::handler::dependencies::{set_up_all, tear_down, SharedDependency};
#[cfg(feature = "metrics")]
use crate::metrics::server::MetricsServer;
#[cfg(feature = "process")]
use crate::pipeline::spawners::process::{routes_digest, served_routes, ProcessPool, WorkerLink};
#[cfg(feature = "process")]
use crate::pipeline::spawners::WorkerPool;
use crate::pipeline::{RouteHandle, ServiceEnv, Serving};
use crate::transport::{SharedTransport, TransportError};

const CONNECT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Connect, retrying with exponential backoff (1 s doubling to 30 s) while trying again can
/// help, e.g. while the broker is unreachable (see
/// [`TransportError::is_permanent`](crate::transport::TransportError::is_permanent)).
/// Permanent errors (a bad URI, refused credentials, TLS refusals, unreadable TLS files) are
/// returned at once.
pub(super) async fn connect_retrying(config: &Config) -> Result<SharedTransport> {
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

/// The metrics server when `ENABLE_METRICS=true`, bound before the service connects (see
/// [`MetricsServer`]).
#[cfg(feature = "metrics")]
pub(super) async fn bind_metrics(config: &Config) -> Result<Option<MetricsServer>> {
    match config.enable_metrics {
        true => crate::metrics::server::bind(config).await.map(Some),
        false => Ok(None),
    }
}

/// Start the planned routes on `transport` (the service then attaches itself to
/// `metrics_server`); on failure the transport is closed.
pub(super) async fn start(
    plans: Vec<RoutePlan>,
    config: &Arc<Config>,
    transport: SharedTransport,
    worker_args: Option<Vec<std::ffi::OsString>>,
    #[cfg(feature = "metrics")] metrics_server: Option<MetricsServer>,
) -> Result<RunningService> {
    #[cfg(feature = "metrics")]
    let mut metrics_server = metrics_server;
    let started = start_routes(
        plans,
        config,
        transport.clone(),
        worker_args,
        #[cfg(feature = "metrics")]
        &mut metrics_server,
    );
    match started.await {
        Ok(service) => Ok(service),
        Err(error) => {
            // its port free when the error returns, for a program that tries again
            #[cfg(feature = "metrics")]
            close_metrics(metrics_server).await;
            transport.close().await;
            Err(error)
        }
    }
}

/// Stop the metrics server of a start that failed or was given up, and wait until its port
/// is free.
#[cfg(feature = "metrics")]
pub(super) async fn close_metrics(server: Option<MetricsServer>) {
    if let Some(server) = server {
        server.close().await;
    }
}

async fn start_routes(
    plans: Vec<RoutePlan>,
    config: &Arc<Config>,
    transport: SharedTransport,
    worker_args: Option<Vec<std::ffi::OsString>>,
    // taken once the service has started: on an error the caller closes it
    #[cfg(feature = "metrics")] metrics_server: &mut Option<MetricsServer>,
) -> Result<RunningService> {
    // before anything is declared: a start that cannot open every consumer fails here
    check_channel_limit(&plans, config, transport.as_ref())?;
    // the metrics server, bound already, renders what the service records
    #[cfg(feature = "metrics")]
    let env = match &*metrics_server {
        Some(server) => {
            ServiceEnv::with_metrics(config.clone(), transport.clone(), server.metrics().clone())
        }
        None => ServiceEnv::new(config.clone(), transport.clone())?,
    };
    #[cfg(not(feature = "metrics"))]
    let env = ServiceEnv::new(config.clone(), transport.clone())?;
    // Only those of the routes whose calls run in this process: a process-mode route's run in
    // its worker processes, which set its dependencies up themselves. Here no call would use
    // them, and one holding what only one copy may (a port, a lock file) would make every
    // worker fail to start. One shared with a thread-mode route is set up for that route.
    let in_this_process = plans.iter().filter(|plan| !plan.pool.mode().is_process());
    let all_dependencies = set_up_dependencies(in_this_process, config).await?;
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
    // the service's end stops its metrics server
    #[cfg(feature = "metrics")]
    let stopped =
        metrics_server.as_ref().map_or_else(CancellationToken::new, MetricsServer::stopped);
    #[cfg(not(feature = "metrics"))]
    let stopped = CancellationToken::new();
    // what the status page shows, taken before the entrypoints go to their tasks
    #[cfg(feature = "metrics")]
    let route_infos: Option<Vec<_>> = metrics_server.as_ref().map(|_| {
        started
            .started
            .iter()
            .map(|(handle, entrypoint)| crate::metrics::status::RouteInfo {
                name: handle.name().to_owned(),
                context: handle.pool().context().to_owned(),
                metric_label: handle.metric_label().to_owned(),
                entrypoint: entrypoint.describe(),
                queue: entrypoint.queue(),
                dead_letters: entrypoint.kind().0.dead_letters(),
            })
            .collect()
    });
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
            let ran = entrypoint.run(handle.clone()).await;
            // a route that ended before its consumer subscribed holds up no start
            drop(handle.take_subscribing());
            ran.map_err(|error| route_stopped(&name, error))
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
    let supervisor = tokio::spawn(supervise(
        tasks,
        env.clone(),
        all_dependencies,
        #[cfg(feature = "process")]
        processes,
        stopped.clone(),
    ));
    // Ready once every consumer has subscribed (a route failing meanwhile stops the service).
    // The routes run already: a caller that gives up on the start here (a timeout around
    // `spawn`) would leave them running with no handle to stop them, so that stops them.
    let given_up = env.stopping.clone().drop_guard();
    tokio::select! {
        () = env.subscriptions.all_subscribed() => {}
        () = env.stopping.cancelled() => {}
    }
    given_up.disarm();
    // a route that failed meanwhile (a consumer refused, a queue in exclusive use) stopped
    // the service: the start fails with its error, not returning a service already stopping
    if env.stopping.is_cancelled() {
        return Err(match supervisor.await {
            Ok(Err(error)) => error,
            Ok(Ok(())) => Error::Startup("the service stopped while it started".into()),
            Err(join) => Error::SupervisorFailed(join.to_string()),
        });
    }
    #[cfg(feature = "metrics")]
    let metrics_address = metrics_server.take().map(|server| {
        let route_infos = route_infos.unwrap_or_default();
        server.attach(route_infos, transport.clone(), env.stopping.clone())
    });
    tracing::info!(
        "service {} started with {} route(s) on {}",
        config.service_name,
        routes.len(),
        config.masked_amqp_uri()
    );
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
        handle.export_series();
        if !starts {
            tracing::info!(route = handle.name(), "route ready without its entrypoint");
            idle.push(handle);
            continue;
        }
        entrypoint
            .setup(&handle)
            .await
            .map_err(|error| refused_route_name(error, handle.name(), &env.config.service_name))?;
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

/// Set up once each dependency of the routes of `plans` (a runner-level dependency is shared
/// by routes), in route order; returns them for teardown.
async fn set_up_dependencies(
    plans: impl IntoIterator<Item = &RoutePlan>,
    config: &Arc<Config>,
) -> Result<Vec<SharedDependency>> {
    let mut unique: Vec<SharedDependency> = Vec::new();
    for dependency in plans.into_iter().flat_map(|plan| &plan.route.dependencies) {
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
            let routes = plans.iter().filter(|other| other.pool.context() == pool.context());
            let routes = routes_digest(routes.map(|plan| plan.route.name.as_str()));
            let processes = ProcessPool::start(
                &config.service_name,
                pool,
                &routes,
                env.transport.clone(),
                env.metrics.clone(),
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
/// entrypoints) and the dependencies, on a transport that goes through the service. A
/// worker that cannot serve tells the service why.
#[cfg(feature = "process")]
pub(super) async fn serve_as_worker(runner: Runner, socket: &str) -> Result<()> {
    let (mut config, mut plans) = runner.prepare()?;
    if let Some(service) = crate::pipeline::spawners::process::served_service_name() {
        Arc::make_mut(&mut config).service_name = service;
    }
    // named if this Runner turns out not to be the service's
    let some: Vec<String> = plans.iter().take(5).map(|plan| plan.route.name.clone()).collect();
    // Only the routes of the worker's own context: the others' dependencies would be set up
    // in every worker for nothing, and one holding what a single copy may (a port, a lock
    // file, a pool of connections sized for the service) would fail the start.
    let context = crate::pipeline::spawners::process::served_context();
    if let Some(context) = &context {
        plans.retain(|plan| plan.pool.context() == context);
    }
    let link = WorkerLink::connect(socket).await?;
    let names = plans.iter().map(|plan| plan.route.name.as_str());
    if served_routes().is_some_and(|digest| digest != routes_digest(names)) {
        let error = Error::Startup(format!(
            "a worker process of context {:?} found another Runner than the service's (its \
             routes: {some:?}): the program's main runs again in each worker process, and \
             the first Runner it starts takes the worker's part; a program that runs a service \
             in a process mode must start no other Runner before it (run each service as a \
             program of its own)",
            context.unwrap_or_default()
        ));
        return Err(link.refuse(error).await);
    }
    let (routes, set_up) = match set_up_worker(plans, &config, &link).await {
        Ok(set_up) => set_up,
        Err(error) => return Err(link.refuse(error).await),
    };
    link.serve(routes, tear_down(&set_up)).await
}

/// A worker's routes, by name, and its dependencies, set up.
#[cfg(feature = "process")]
async fn set_up_worker(
    plans: Vec<RoutePlan>,
    config: &Arc<Config>,
    link: &WorkerLink,
) -> Result<(HashMap<String, RouteHandle>, Vec<SharedDependency>)> {
    let env = ServiceEnv::new(config.clone(), link.transport())?;
    #[cfg(feature = "metrics")]
    env.metrics.record_rpc_calls_with(link.rpc_call_sink());
    let set_up = set_up_dependencies(&plans, config).await?;
    let mut routes = HashMap::new();
    for RoutePlan { mut route, pool, .. } in plans {
        route.entrypoint = None;
        let local = WorkerPool::new(1, WorkerMode::Thread, pool.context());
        let handle = RouteHandle::new(route, local, &env);
        routes.insert(handle.name().to_owned(), handle);
    }
    Ok((routes, set_up))
}

/// A route's set-up refused by the transport as a value AMQP cannot carry (a queue name over
/// 255 bytes, mostly) becomes a start-up error naming the route and `SERVICE_NAME`: the
/// transport's error names only the queue, and the names are made of both. A declaration
/// refused for other arguments than the queue's names the route too, and says why it
/// happens: most often a deploy that changed `QUEUE_TYPE`.
fn refused_route_name(error: Error, route: &str, service_name: &str) -> Error {
    match error {
        Error::Transport(TransportError::Invalid(text)) => Error::Startup(format!(
            "route '{route}': {text} (its names are made of SERVICE_NAME ({} bytes), the \
             route's name and its entrypoint's arguments)",
            service_name.len()
        )),
        Error::Transport(TransportError::PreconditionFailed(text))
            if text.contains("inequivalent arg") =>
        {
            Error::Startup(format!(
                "route '{route}': {text} (a queue or exchange keeps the arguments it was \
                 declared with, by an earlier deploy or another service: a change of \
                 QUEUE_TYPE or of a route's flags needs its queues drained and deleted first; \
                 micro-framework's README, \"Changing a queue's type\", says how)"
            ))
        }
        other => other,
    }
}

fn route_stopped(route: &str, error: Error) -> Error {
    Error::RouteStopped { route: route.to_owned(), source: Box::new(error) }
}
