//! The [`Runner`]: starts a service from its routes and config, and stops it gracefully.

mod channels;
mod context;
mod enabled;
mod listeners;
mod metric_labels;
mod open_files;
mod plan;
mod running;
mod runtime;
mod signals;
mod start;

use std::io::Write;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use context::RunnerContext;
use enabled::EnabledEntrypoints;
use plan::{in_worker_process, plan_routes, RoutePlan};
pub use running::RunningService;
use runtime::runtime;
use signals::stop_on_signals;
use start::{connect_retrying, start};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::handler::dependencies::{self, Dependency, SharedDependency};
use crate::handler::outcome::panic_message;
use crate::pipeline::routes::Route;
#[cfg(feature = "process")]
use crate::pipeline::spawners::process::worker_socket;
use crate::pipeline::{RouteHandle, ServiceEnv};
use crate::transport::topology::{Recorder, Topology};

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
    /// The config the runner was built with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

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

    /// The calls the thread-mode contexts with routes may run at once, added up: each sync
    /// call of theirs holds a thread of the runtime's blocking pool.
    fn thread_mode_workers(&self) -> usize {
        let contexts = self.contexts.iter().filter(|context| !context.routes.is_empty());
        contexts
            .filter(|context| !context.worker_mode.unwrap_or(self.config.worker_mode).is_process())
            .map(|context| context.max_workers.unwrap_or(self.config.max_workers))
            .fold(0, usize::saturating_add)
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
    /// bindings the service declares as JSON on stdout, after a line
    /// [`TOPOLOGY_MARKER`](crate::transport::topology::TOPOLOGY_MARKER), and returns without
    /// serving (see [`Runner::topology`]).
    ///
    /// Inside a running tokio runtime (`#[tokio::main]`), where tokio refuses to start
    /// another, it returns an error saying to use [`Runner::run`]`.await` instead.
    pub fn start(self) -> Result<()> {
        crate::logging::init(self.config.log_format);
        let runtime = runtime(self.thread_mode_workers())?;
        // Tokio alone knows whether this thread drives a runtime (a blocking thread of one, or
        // one that only entered one, may start another): it panics before running anything.
        let run = std::panic::AssertUnwindSafe(|| runtime.block_on(self.run()));
        let result = match std::panic::catch_unwind(run) {
            Ok(result) => result,
            Err(panic) if panic_message(&*panic).starts_with(RUNTIME_IN_RUNTIME) => {
                Err(Error::Startup(
                    "Runner::start runs the service on a tokio runtime of its own, which cannot \
                     start inside this one (#[tokio::main]): use `Runner::run(...).await` there"
                        .to_owned(),
                ))
            }
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // A sync call still running past SHUTDOWN_TIMEOUT holds a blocking thread, and
        // dropping the runtime would wait for it without end (the task that listens for a
        // second signal is gone by then). The service has stopped and the call's message is
        // back in its queue, so the call is left behind and the program goes on to exit.
        runtime.shutdown_background();
        result
    }

    /// Print the topology on stdout, after the line
    /// [`TOPOLOGY_MARKER`](crate::transport::topology::TOPOLOGY_MARKER).
    async fn print_topology(self) -> Result<()> {
        let topology = self.topology().await?;
        let document = serde_json::to_string_pretty(&topology)?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}\n{document}", crate::transport::topology::TOPOLOGY_MARKER)?;
        // before a caller ends the process
        stdout.flush()?;
        Ok(())
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
    /// or a signal arrives; with `ENABLE_METRICS=true`, `/health/live` answers meanwhile.
    ///
    /// In process worker modes, the program's binary is started again for each worker
    /// process; there `run` serves calls from the service instead of consuming.
    ///
    /// With `MF_PRINT_TOPOLOGY=1` it prints the topology and returns without serving, as
    /// [`Runner::start`] does. It logs as `start` does, unless the program installed its own
    /// `tracing` subscriber.
    ///
    /// A sync call still running past `SHUTDOWN_TIMEOUT` keeps its thread: a runtime of the
    /// program's own waits for it when dropped, so end that runtime with
    /// [`shutdown_background`](tokio::runtime::Runtime::shutdown_background) or
    /// [`shutdown_timeout`](tokio::runtime::Runtime::shutdown_timeout), as
    /// [`Runner::start`] does.
    pub async fn run(self) -> Result<()> {
        crate::logging::init(self.config.log_format);
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
        let result = self.run_until(stop.cancelled_owned()).await;
        // Stopped (by a signal or by itself): the signals are the program's again. Left
        // waiting for a second one, the watcher ended the process at the next, on the
        // program's runtime, whatever the program did after its service.
        watcher.abort();
        result
    }

    /// Like [`Runner::run`], but stops gracefully when `stop` completes instead of on a
    /// signal (for programs that decide themselves when to stop; process modes included).
    ///
    /// With `MF_PRINT_TOPOLOGY=1` it prints the topology and returns without serving, as
    /// [`Runner::start`] and [`Runner::run`] do.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        if topology_asked() {
            return self.print_topology().await;
        }
        #[cfg(feature = "process")]
        if let Some(socket) = worker_socket() {
            return start::serve_as_worker(self, &socket).await;
        }
        let (config, plans) = self.prepare()?;
        // before connecting: `/health/live` answers while the broker is awaited
        #[cfg(feature = "metrics")]
        let metrics_server = start::bind_metrics(&config).await?;
        tokio::pin!(stop);
        let connected = tokio::select! {
            transport = connect_retrying(&config) => transport.map(Some),
            _ = &mut stop => {
                tracing::info!("stopped before the broker answered: not started");
                Ok(None)
            }
        };
        let transport = match connected {
            Ok(Some(transport)) => transport,
            // not started: the metrics port is free when this returns
            given_up => {
                #[cfg(feature = "metrics")]
                start::close_metrics(metrics_server).await;
                return given_up.map(|_| ());
            }
        };
        let started = start(
            plans,
            &config,
            transport,
            None,
            #[cfg(feature = "metrics")]
            metrics_server,
        );
        let mut service = started.await?;
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
    ///
    /// With `MF_PRINT_TOPOLOGY=1` it prints the topology (as [`Runner::start`] does) and ends
    /// the process with status 0, without serving or touching the broker: there is no
    /// service to hand back, and a program going on would serve with what it started next.
    pub async fn spawn(self) -> Result<RunningService> {
        if topology_asked() {
            self.print_topology().await?;
            std::process::exit(0);
        }
        self.spawn_service().await
    }

    /// [`Runner::spawn`] without the `MF_PRINT_TOPOLOGY` check: for
    /// the test toolkit's `TestService`, which a test harness runs, never the `topology`
    /// command.
    pub(crate) async fn spawn_service(self) -> Result<RunningService> {
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
        // a metrics port in use stops the start before the broker is touched
        #[cfg(feature = "metrics")]
        let metrics_server = start::bind_metrics(&config).await?;
        let transport = match crate::transport::connect(&config).await {
            Ok(transport) => transport,
            Err(error) => {
                // the metrics port is free when the error returns
                #[cfg(feature = "metrics")]
                start::close_metrics(metrics_server).await;
                return Err(error.into());
            }
        };
        start(
            plans,
            &config,
            transport,
            worker_args,
            #[cfg(feature = "metrics")]
            metrics_server,
        )
        .await
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
            .filter_map(|plan| plan.route.entrypoint.as_ref().map(|entrypoint| entrypoint.kind().0))
            .collect();
        listeners::check(&config, &kinds)?;
        // a worker process inherits the raised limit, and its service warns
        if !in_worker_process() {
            open_files::raise_and_check(&config, &kinds);
        }
        Ok((config, plans))
    }
}

/// Whether `MF_PRINT_TOPOLOGY=1` asks the runner to print the topology instead of serving.
fn topology_asked() -> bool {
    std::env::var("MF_PRINT_TOPOLOGY").is_ok_and(|value| value == "1")
}

/// How tokio's panic at a runtime started inside a running one begins.
const RUNTIME_IN_RUNTIME: &str = "Cannot start a runtime from within a runtime";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sync_calls_of_thread_mode_contexts_are_added_up() {
        let every_hour = std::time::Duration::from_secs(3600);
        let route = || Route::new(|| 1).entrypoint(crate::timer::TimeEntrypoint::every(every_hour));
        let config = Config::new("s").with_max_workers(600);
        let runner = Runner::new(vec![route()], config)
            .context(RunnerContext::new(vec![route()]).max_workers(50))
            .context(RunnerContext::new(vec![]).max_workers(1000))
            .context(
                RunnerContext::new(vec![route()]).worker_mode(crate::config::WorkerMode::Process),
            );
        assert_eq!(runner.thread_mode_workers(), 650);
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
