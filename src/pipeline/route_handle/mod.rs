//! The worker pipeline: translate → provide dependencies → call the target → settle.
//!
//! Entrypoints hand each message to their route's [`RouteHandle`]: it waits for a worker slot
//! ([`RouteHandle::acquire`]), runs the pipeline, and on a failure runs the callback of a
//! `CallbackRoute` ([`RouteHandle::handle`]). The entrypoint then settles the message with its
//! source (ack, dead-letter, reply) from the [`Handled`] it gets back.

mod call;

#[cfg(feature = "process")]
pub(crate) use call::Attempt;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::call_watch::{CallWatch, FinishedCall};
use super::entrypoint_kind::EntrypointInfo;
use super::queue_claims::{QueueClaims, RouteQueues};
use super::shared::{SharedExtension, SharedExtensions};
use super::stats::RouteStats;
use super::subscriptions::{Subscribing, Subscriptions};
use crate::config::Config;
use crate::data::Handled;
use crate::handler::dependencies::SharedDependency;
use crate::handler::targets::ErasedTarget;
use crate::handler::translators::MessageTranslator;
use crate::handler::ServiceState;
use crate::metrics::{Metrics, RouteSeries};
use crate::pipeline::interrupted::Unstarted;
use crate::pipeline::retry::{BackOffPolicy, RetryMode};
use crate::pipeline::routes::Route;
use crate::pipeline::spawners::{WorkerPermit, WorkerPool};
use crate::transport::{QueueSpec, SharedTransport};

/// A running route, as its entrypoint sees it.
#[derive(Clone, Debug)]
pub struct RouteHandle {
    inner: Arc<RouteRuntime>,
}

#[derive(Debug)]
struct RouteRuntime {
    service: Arc<str>,
    name: Arc<str>,
    /// The `route` label of its metrics.
    metric_label: Arc<str>,
    /// The route's entrypoint as tests see it (kept when the entrypoint is not started).
    entrypoint: Option<EntrypointInfo>,
    target: ErasedTarget,
    callback: Option<ErasedTarget>,
    translators: Vec<Arc<dyn MessageTranslator>>,
    dependencies: Vec<SharedDependency>,
    backoff: Option<BackOffPolicy>,
    config: Arc<Config>,
    transport: SharedTransport,
    pool: WorkerPool,
    stopping: CancellationToken,
    given_up: CancellationToken,
    hand_backs: TaskTracker,
    stats: RouteStats,
    calls: CallWatch,
    state: ServiceState,
    metrics: Metrics,
    /// Its series of `metrics`, looked up on its first call.
    series: OnceLock<RouteSeries>,
    /// The route's dead-letter queue, once its entrypoint has declared it.
    dead_letter_queue: OnceLock<QueueSpec>,
    extensions: SharedExtensions,
    queue_claims: QueueClaims,
    subscriptions: Subscriptions,
    /// Held from its set-up until its consumer has subscribed (a route that consumes).
    subscribing: Mutex<Option<Subscribing>>,
}

/// How long a stop that gave up on its calls waits for the deliveries that never started to
/// be handed back ([`RouteHandle::give_up`]).
const HAND_BACK_WAIT: Duration = Duration::from_secs(2);

/// What the routes of one service share.
#[derive(Clone, Debug)]
pub(crate) struct ServiceEnv {
    pub config: Arc<Config>,
    pub transport: SharedTransport,
    pub stopping: CancellationToken,
    /// Fires once a stop has waited `SHUTDOWN_TIMEOUT` for the calls, or once every
    /// entrypoint has ended: none may start after.
    pub given_up: CancellationToken,
    /// The deliveries that waited for a worker slot and are handed back unstarted
    /// ([`Unstarted`]), which the give-up waits for.
    pub hand_backs: TaskTracker,
    pub state: ServiceState,
    pub metrics: Metrics,
    /// The shared extensions its routes made during set-up, for the runner to start.
    pub extensions: SharedExtensions,
    /// The queues its routes consume and dead-letter to, claimed as each is set up.
    pub queue_claims: QueueClaims,
    /// Its consumers that have not subscribed yet, which the start waits for.
    pub subscriptions: Subscriptions,
}

impl ServiceEnv {
    pub(crate) fn new(config: Arc<Config>, transport: SharedTransport) -> crate::Result<Self> {
        let metrics = Metrics::new()
            .map_err(|error| crate::Error::Startup(format!("cannot create metrics: {error}")))?;
        Ok(Self::with_metrics(config, transport, metrics))
    }

    /// The env of a service recording into `metrics` (those its metrics server renders).
    pub(crate) fn with_metrics(
        config: Arc<Config>,
        transport: SharedTransport,
        metrics: Metrics,
    ) -> Self {
        // In the service's state too, for what calls record (RPC client timings).
        let state = ServiceState::default();
        state.get_or_insert_with(|| metrics.clone());
        ServiceEnv {
            config,
            transport,
            stopping: CancellationToken::new(),
            given_up: CancellationToken::new(),
            hand_backs: TaskTracker::new(),
            state,
            metrics,
            extensions: SharedExtensions::default(),
            queue_claims: QueueClaims::default(),
            subscriptions: Subscriptions::default(),
        }
    }
}

impl RouteHandle {
    /// The running form of `route` (whose entrypoint the caller has taken) in `pool`.
    pub(crate) fn new(route: Route, pool: WorkerPool, env: &ServiceEnv) -> Self {
        RouteHandle {
            inner: Arc::new(RouteRuntime {
                service: env.config.service_name.as_str().into(),
                name: route.name.as_str().into(),
                metric_label: route.metric_label_for(env.config.protocol).into(),
                entrypoint: route.entrypoint_info,
                target: route.target,
                callback: route.callback,
                translators: route.translators,
                dependencies: route.dependencies,
                backoff: route.backoff,
                config: env.config.clone(),
                transport: env.transport.clone(),
                pool,
                stopping: env.stopping.clone(),
                given_up: env.given_up.clone(),
                hand_backs: env.hand_backs.clone(),
                stats: RouteStats::default(),
                calls: CallWatch::default(),
                state: env.state.clone(),
                metrics: env.metrics.clone(),
                series: OnceLock::new(),
                dead_letter_queue: OnceLock::new(),
                extensions: env.extensions.clone(),
                queue_claims: env.queue_claims.clone(),
                subscriptions: env.subscriptions.clone(),
                subscribing: Mutex::new(None),
            }),
        }
    }

    /// The service's shared extension of type `T`, made with `make` by the first route that
    /// asks (during set-up). The runner starts and runs it once every route is set up.
    pub fn shared_extension<T: SharedExtension>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        let mut made = self.inner.extensions.lock();
        if let Some(extension) = self.inner.state.get::<T>() {
            return extension;
        }
        let extension = self.inner.state.get_or_insert_with(make);
        SharedExtensions::add(&mut made, extension.clone());
        extension
    }

    /// The values shared by every route and call of this service instance.
    pub fn service_state(&self) -> &ServiceState {
        &self.inner.state
    }

    /// Claim `queues` for the route, before its entrypoint declares them: refused when another
    /// route of the service consumes one of them, or dead-letters to the one it would consume
    /// (the naming rules can give two routes one name).
    pub(crate) fn claim_queues(&self, queues: RouteQueues<'_>) -> crate::Result<()> {
        let claimed = self.inner.queue_claims.claim(self.name(), queues);
        claimed.map_err(crate::Error::Startup)
    }

    /// What a consumer of the service made during its start holds until it has subscribed,
    /// so that the start waits for it (`None` once the start has stopped waiting).
    pub(crate) fn subscribing(&self) -> Option<Subscribing> {
        self.inner.subscriptions.subscribing()
    }

    /// The route consumes a queue once it runs: the start waits until it has subscribed.
    /// Called at its set-up; [`RouteHandle::take_subscribing`] hands the hold to its consumer.
    pub(crate) fn will_subscribe(&self) {
        *self.subscribing_slot() = self.subscribing();
    }

    /// The hold [`RouteHandle::will_subscribe`] made, for the route's consumer; also taken
    /// (and dropped) when the route's run ends, however it ends.
    pub(crate) fn take_subscribing(&self) -> Option<Subscribing> {
        self.subscribing_slot().take()
    }

    fn subscribing_slot(&self) -> std::sync::MutexGuard<'_, Option<Subscribing>> {
        self.inner.subscribing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Record `dlq`, the route's dead-letter queue, which its entrypoint has declared: dead
    /// letters declare it again when it is gone (deleted by hand, say), and before each one
    /// when it has an `x-expires` lease, which a declaration renews.
    pub(crate) fn set_dead_letter_queue(&self, dlq: QueueSpec) {
        // A route is set up once: a second call would set the same queue.
        let _ = self.inner.dead_letter_queue.set(dlq);
    }

    /// The route's dead-letter queue, if its entrypoint has one.
    pub(crate) fn dead_letter_queue(&self) -> Option<&QueueSpec> {
        self.inner.dead_letter_queue.get()
    }

    /// The route's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The route among every service's: `{service}.{route}`, which its retry copies name.
    pub(crate) fn identity(&self) -> String {
        format!("{}.{}", self.service_name(), self.name())
    }

    /// The `route` label of the route's metrics.
    pub(crate) fn metric_label(&self) -> &str {
        &self.inner.metric_label
    }

    /// Whether the route's target is declared to return an HTTP response.
    #[cfg(feature = "http")]
    pub(crate) fn target_carries_response(&self) -> bool {
        self.inner.target.carries_response
    }

    /// The route's entrypoint, as test hooks see it; `None` for a route without one.
    pub(crate) fn entrypoint(&self) -> Option<&EntrypointInfo> {
        self.inner.entrypoint.as_ref()
    }

    /// The service's name.
    pub fn service_name(&self) -> &str {
        &self.inner.service
    }

    /// The service's configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    /// The broker connection.
    pub fn transport(&self) -> &SharedTransport {
        &self.inner.transport
    }

    /// Count a request for the route answered without a call, for `reason` (a label of
    /// `requests_refused_total`).
    #[cfg(any(feature = "http", feature = "websocket"))]
    pub(crate) fn refused(&self, reason: &str) {
        self.inner.metrics.refused(self.inner.pool.context(), self.metric_label(), reason);
    }

    /// The service's metrics.
    #[cfg(feature = "websocket")]
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The worker pool this route runs in.
    pub(crate) fn pool(&self) -> &WorkerPool {
        &self.inner.pool
    }

    /// Fires when the service begins to shut down.
    pub fn stopping(&self) -> &CancellationToken {
        &self.inner.stopping
    }

    /// The route's retry policy, if any.
    pub fn backoff(&self) -> Option<&BackOffPolicy> {
        self.inner.backoff.as_ref()
    }

    /// Counters of this route.
    pub fn stats(&self) -> &RouteStats {
        &self.inner.stats
    }

    /// How many unacknowledged messages a consumer of this route may hold: `PREFETCH_COUNT`,
    /// or the pool's size.
    pub fn prefetch(&self) -> u16 {
        self.inner
            .config
            .prefetch_count
            .unwrap_or_else(|| u16::try_from(self.inner.pool.size()).unwrap_or(u16::MAX))
    }

    /// Wait for a worker slot; `None` when the service is stopping and the worker mode hands
    /// unstarted messages back, or when the stop has given up waiting for the calls
    /// (past `SHUTDOWN_TIMEOUT`).
    pub async fn acquire(&self) -> Option<WorkerPermit> {
        // A free slot is taken without waiting on the give-up token (which would register
        // with it on every call); the flag read after it refuses the slot once given up.
        let permit = tokio::select! {
            biased;
            permit = self.inner.pool.acquire(&self.inner.stopping) => permit,
            _ = self.inner.given_up.cancelled() => None,
        };
        permit.filter(|_| !self.given_up())
    }

    /// Resolves once the route starts no new call ([`WorkerPool::closed_to_new_calls`]): an
    /// entrypoint still reading a request can refuse it then, rather than read it to its end.
    #[cfg(feature = "http")]
    pub(crate) async fn closed_to_new_calls(&self) {
        self.inner.pool.closed_to_new_calls(&self.inner.stopping).await;
    }

    /// Record that the service's stop waited `SHUTDOWN_TIMEOUT` for its calls and gave up:
    /// from now on no call of the service starts ([`RouteHandle::acquire`] is `None`, in
    /// greedy modes too). A greedy mode's messages still waiting for a slot would otherwise
    /// run once one is free, after the stop returned, and again elsewhere.
    ///
    /// Those deliveries are handed back unstarted, as fresh copies the crash-loop guard does
    /// not count: waited for up to [`HAND_BACK_WAIT`], before the connection closes. (Left to
    /// the connection, they came back redelivered, counted as crashes although they never
    /// ran.)
    pub(crate) async fn give_up(&self) {
        self.inner.given_up.cancel();
        let hand_backs = &self.inner.hand_backs;
        hand_backs.close();
        if tokio::time::timeout(HAND_BACK_WAIT, hand_backs.wait()).await.is_err() {
            tracing::warn!(
                route = self.name(),
                "messages that never started are not all handed back after {HAND_BACK_WAIT:?}: \
                 the rest go back with the connection"
            );
        }
    }

    /// A worker slot, as [`RouteHandle::acquire`]; without one, the delivery that waited for
    /// it is to be handed back unstarted, which the stop's give-up waits for while the
    /// returned [`Unstarted`] lives.
    pub(crate) async fn acquire_or_unstarted(&self) -> Result<WorkerPermit, Unstarted> {
        // taken before the wait: the give-up, which ends the wait, finds it already counted
        let unstarted = self.unstarted();
        self.acquire().await.ok_or(unstarted)
    }

    /// A delivery about to wait for what its call needs to start: if it gets none, it is to
    /// be handed back unstarted, which the stop's give-up waits for while this lives.
    fn unstarted(&self) -> Unstarted {
        Unstarted::new(self.inner.hand_backs.token())
    }

    /// Completes once the route's calls still running can no longer end: in a process mode,
    /// once the stop shuts its worker processes down (past `SHUTDOWN_TIMEOUT`; those still
    /// running a call are killed, and a call waiting for one gets none). Never in a thread
    /// mode, whose calls run to their end.
    pub(crate) async fn calls_abandoned(&self) {
        #[cfg(feature = "process")]
        if let Some(processes) = self.inner.pool.processes() {
            return processes.shutdown_begun().await;
        }
        std::future::pending().await
    }

    /// Whether the service's stop gave up waiting for its calls ([`RouteHandle::give_up`]).
    pub(crate) fn given_up(&self) -> bool {
        self.inner.given_up.is_cancelled()
    }

    /// Whether `handled` failed after the stop gave up on the calls (past `SHUTDOWN_TIMEOUT`):
    /// the stop tears their dependencies down, so the failure may be its doing, not the
    /// message's. Such a message is left unsettled: it goes back to its queue with the
    /// connection, as those of the calls not ended, and is neither dead-lettered, retried nor
    /// answered (an RPC caller would be told the stop's error for a call that runs again).
    pub(crate) fn failed_after_giving_up(&self, handled: &Handled, queue: &str) -> bool {
        let failed = !matches!(handled, Handled::Succeeded(_) | Handled::CalledBack(_));
        if failed && self.given_up() {
            tracing::warn!(
                route = self.name(),
                "a call failed after the stop gave up on it: its message goes back to {queue}"
            );
        }
        failed && self.given_up()
    }

    /// A worker slot if one is free now: for entrypoints that refuse work when the pool is
    /// full (HTTP, WebSocket) instead of waiting.
    pub fn try_acquire(&self) -> Option<WorkerPermit> {
        self.inner.pool.try_acquire(&self.inner.stopping)
    }

    /// Whether the route's calls run in worker processes: a call may then end
    /// [`Ended::Unstarted`](crate::pipeline::interrupted::Ended::Unstarted).
    pub(crate) fn runs_in_processes(&self) -> bool {
        self.inner.pool.mode().is_process()
    }

    /// Whether a call of this route may end
    /// [`Ended::Interrupted`](crate::pipeline::interrupted::Ended::Interrupted): it retries in
    /// the worker.
    pub(crate) fn retries_in_worker(&self) -> bool {
        self.inner.backoff.as_ref().is_some_and(|policy| policy.mode == RetryMode::InWorker)
    }

    /// Whether the route's entrypoint can schedule a broker retry (`AsyncBackOff`): it takes
    /// a message from a queue, to publish again and come back to. A timer's firing, an RPC
    /// request (answered), an HTTP or WebSocket call have none: for them no retry remains
    /// after a failure. A route called without its entrypoint (a test hook) decides itself.
    fn retries_on_broker(&self) -> bool {
        self.inner.entrypoint.as_ref().is_none_or(|info| info.kind.dead_letters())
    }

    /// Whether the route has a callback (a `CallbackRoute`).
    pub(crate) fn has_callback(&self) -> bool {
        self.inner.callback.is_some()
    }

    /// Export the route's series in `/metrics` from the start, each at 0, before its first
    /// call: alerts read the first failure as a count's increase.
    pub(crate) fn export_series(&self) {
        let (metrics, context, label) =
            (&self.inner.metrics, self.inner.pool.context(), self.metric_label());
        let queued = self.retries_on_broker();
        let retried = self.retries_in_worker() || (queued && self.inner.backoff.is_some());
        self.inner.series.get_or_init(|| metrics.route_started(context, label, retried, queued));
    }

    /// Record that a message was settled (for counters and test waits).
    pub fn settled(&self, handled: &Handled) {
        self.inner.stats.settled(handled);
        let (context, label) = (self.inner.pool.context(), self.metric_label());
        // a route whose entrypoint never started is handed messages as from a queue
        let queued = self.inner.entrypoint.as_ref().is_none_or(|info| info.kind.dead_letters());
        self.inner.metrics.settled(context, label, self.name(), handled, queued);
    }

    /// Record that a message was acknowledged without a call (filtered out).
    pub fn skipped(&self) {
        self.inner.stats.skipped();
    }

    /// Receive the route's calls that finish from now on (what test waiters use).
    pub(crate) fn watch_calls(&self) -> tokio::sync::broadcast::Receiver<FinishedCall> {
        self.inner.calls.watch()
    }
}
