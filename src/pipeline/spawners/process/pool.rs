//! The service side: a pool of worker processes, each running one call at a time.

use std::ffi::OsString;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use super::launcher::{Launcher, Links, Worker};
use super::protocol::BorrowedCall;
use crate::data::Outcome;
use crate::data::{Failure, FailureKind};
use crate::error::{Chain, Error, Result};
use crate::metrics::{Metrics, ProcessCount};
use crate::pipeline::spawners::WorkerPool;
use crate::transport::SharedTransport;

const RESPAWN_PAUSE: Duration = Duration::from_secs(1);
/// Starts of one worker that may fail in a row before the pool gives up (see
/// [`ProcessPool::failed`]); also the early deaths in a row it takes before it gives up.
const START_ATTEMPTS: u32 = 5;
/// A worker that dies idle before any call within this time of its start died of its start
/// (a dependency's set-up that dooms it, a background thread that aborts): as a failed start,
/// it is replaced after [`RESPAWN_PAUSE`], and [`START_ATTEMPTS`] of them in a row with no
/// call answered between make the pool give up. Replaced at once, such workers were started
/// again as fast as the machine could, for ever, while the service looked ready.
const EARLY_DEATH: Duration = Duration::from_secs(10);

/// Worker processes of one runner context. A call takes an idle worker (the context's
/// permits guarantee there is one, or one being started), runs there, and gives it back; a
/// worker that dies or overruns the time limit is replaced, and one that reached
/// `MAX_TASKS_PER_CHILD` calls is recycled.
pub struct ProcessPool {
    idle: std::sync::Mutex<Idle>,
    /// One permit per idle worker: a call waits here for one without holding a lock that
    /// [`ProcessPool::shutdown`] needs. Closed by the shutdown.
    ready: Semaphore,
    /// Fired by the shutdown: a worker being started is given up on.
    stopped: CancellationToken,
    /// Why workers can no longer be started, once the pool gave up on them.
    failure: std::sync::OnceLock<String>,
    /// Fired once `failure` is set.
    failed: CancellationToken,
    /// Workers that died early ([`EARLY_DEATH`]) since a call was last answered.
    early_deaths: AtomicU32,
    /// Tracks the calls using workers, and the workers being started or ended, so that the
    /// shutdown returns once none is left.
    busy: TaskTracker,
    /// `worker_processes` of this pool's context.
    processes: ProcessCount,
    launcher: Launcher,
    size: usize,
    time_limit: Option<Duration>,
    max_tasks: Option<u32>,
}

/// Why a worker process was replaced: the `reason` of `worker_processes_replaced_total`.
#[derive(Clone, Copy, Debug)]
enum Replaced {
    /// It died idle (the OOM killer, an operator).
    DiedIdle,
    /// It died while it ran a call.
    DiedInCall,
    /// Killed with its call past `TASK_TIME_LIMIT`.
    TimeLimit,
    /// After `MAX_TASKS_PER_CHILD` calls.
    Recycled,
    /// Killed as its call's future was dropped while it ran.
    CallDropped,
}

impl Replaced {
    const ALL: [Replaced; 5] = [
        Replaced::DiedIdle,
        Replaced::DiedInCall,
        Replaced::TimeLimit,
        Replaced::Recycled,
        Replaced::CallDropped,
    ];

    fn label(self) -> &'static str {
        match self {
            Replaced::DiedIdle => "died_idle",
            Replaced::DiedInCall => "died_in_call",
            Replaced::TimeLimit => "time_limit",
            Replaced::Recycled => "recycled",
            Replaced::CallDropped => "call_dropped",
        }
    }
}

/// An idle worker of the pool kept for one call (its permit of `ready`): given back to the
/// pool when dropped unused.
pub(crate) struct Reserved<'a>(SemaphorePermit<'a>);

/// The idle workers, the processes of those lent to calls, and whether the pool is shut down
/// (then no worker goes back to it and none is started).
#[derive(Default)]
struct Idle {
    workers: Vec<Worker>,
    /// By pid. A call whose worker's process is no longer here was given up on by the
    /// shutdown, which killed the process.
    lent: Vec<(u32, Child)>,
    closed: bool,
}

impl std::fmt::Debug for ProcessPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPool")
            .field("time_limit", &self.time_limit)
            .field("max_tasks", &self.max_tasks)
            .finish()
    }
}

impl ProcessPool {
    /// Start the worker processes of `workers`, a process-mode context's pool, for the
    /// service named `service`.
    pub(crate) async fn start(
        service: &str,
        workers: &WorkerPool,
        routes: &str,
        transport: SharedTransport,
        metrics: Metrics,
        max_tasks: Option<u32>,
        args: Option<Vec<OsString>>,
    ) -> Result<Arc<Self>> {
        let size = workers.size();
        let processes = metrics.worker_processes(workers.context());
        let pool = Arc::new_cyclic(|pool| ProcessPool {
            idle: std::sync::Mutex::default(),
            ready: Semaphore::new(0),
            stopped: CancellationToken::new(),
            failure: std::sync::OnceLock::new(),
            failed: CancellationToken::new(),
            early_deaths: AtomicU32::new(0),
            busy: TaskTracker::new(),
            processes,
            launcher: Launcher {
                transport,
                metrics,
                service: service.into(),
                context: workers.context().into(),
                routes: routes.into(),
                args,
                pool: pool.clone(),
            },
            size,
            time_limit: workers.time_limit(),
            max_tasks,
        });
        // each reason's count at 0 from the start: one that appeared at its first count, at
        // 1, would hide that count from `increase()`, which an alert on deaths reads
        for reason in Replaced::ALL {
            pool.launcher.metrics.worker_replaced_never(&pool.launcher.context, reason.label());
        }
        for _ in 0..size {
            let worker = pool.launcher.launch().await?;
            pool.give_back(worker);
        }
        Ok(pool)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Count the worker processes running, idle or lent, after `idle` changed them.
    fn count_processes(&self, idle: &Idle) {
        self.processes.set(idle.workers.len() + idle.lent.len());
    }

    /// An idle worker kept for a call, once there is one; `None` once the pool is shut down.
    /// A call that holds one has a worker process to go to ([`ProcessPool::call`]).
    pub(crate) async fn reserve(&self) -> Option<Reserved<'_>> {
        self.ready.acquire().await.ok().map(Reserved)
    }

    /// The links of an idle worker, once there is one (at once with a `reserved` one), whose
    /// process is now lent; `None` once the pool is shut down.
    async fn take(&self, reserved: Option<Reserved<'_>>) -> Option<Links> {
        let reserved = match reserved {
            Some(reserved) => reserved,
            None => self.reserve().await?,
        };
        reserved.0.forget();
        let mut idle = self.idle();
        let Worker { child, links } = idle.workers.pop()?;
        idle.lent.push((links.pid, child));
        Some(links)
    }

    /// Make `worker` idle, or end it if the pool is shut down.
    fn give_back(&self, worker: Worker) {
        let mut idle = self.idle();
        if idle.closed {
            drop(idle);
            tokio::spawn(self.busy.track_future(end(worker, false)));
            return;
        }
        idle.workers.push(worker);
        self.count_processes(&idle);
        self.ready.add_permits(1);
    }

    /// The control link of worker `pid` ended: its process exited, or sent what cannot be
    /// read. One that is idle died idle (the OOM killer, an operator): it is ended now (waited
    /// for, so that no zombie is left) and replaced, rather than when a call finds it dead.
    /// One lent to a call is that call's to replace.
    pub(super) fn gone(self: &Arc<Self>, pid: u32) {
        let worker = {
            let mut idle = self.idle();
            let Some(at) = idle.workers.iter().position(|worker| worker.links.pid == pid) else {
                return;
            };
            // Its permit goes with it. With none free, each idle worker is about to be taken
            // by a call, this one too, which then finds it dead and replaces it.
            let Ok(permit) = self.ready.try_acquire() else { return };
            permit.forget();
            let worker = idle.workers.swap_remove(at);
            self.count_processes(&idle);
            worker
        };
        let lived = worker.links.started.elapsed();
        let early = worker.links.done == 0 && lived < EARLY_DEATH;
        let pool = self.clone();
        // waited for first: how it ended (an OOM kill, an abort, an exit code) goes in the
        // warning, and in the error of a pool that gives up on such deaths
        tokio::spawn(self.busy.track_future(async move {
            let status = end(worker, false).await;
            match early {
                true => tracing::warn!(
                    "worker process {pid} died while idle {lived:?} after its start, before \
                     any call ({status}); a new worker replaces it in {RESPAWN_PAUSE:?}"
                ),
                false => tracing::warn!(
                    "worker process {pid} died while idle ({status}); a new worker replaces it"
                ),
            }
            pool.replaced(Replaced::DiedIdle);
            pool.respawn_after(early.then_some(status));
        }));
    }

    /// Count a worker replaced for `reason` (`worker_processes_replaced_total`).
    fn replaced(&self, reason: Replaced) {
        self.launcher.metrics.worker_replaced(&self.launcher.context, reason.label());
    }

    /// Start a worker in the background, trying again until one starts or the pool is shut
    /// down, or gives up after `START_ATTEMPTS` failed starts in a row.
    fn respawn(self: &Arc<Self>) {
        self.respawn_after(None);
    }

    /// [`ProcessPool::respawn`], for a worker that died early ([`EARLY_DEATH`]), as
    /// `early_death` says, or not.
    fn respawn_after(self: &Arc<Self>, early_death: Option<String>) {
        // a call's future dropped while the runtime shuts down has no runtime to start on
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let pool = self.clone();
        // tracked, so that the shutdown waits for a worker started meanwhile to end
        runtime.spawn(self.busy.track_future(async move {
            if let Some(status) = early_death {
                let deaths = pool.early_deaths.fetch_add(1, Ordering::Relaxed) + 1;
                if deaths >= START_ATTEMPTS {
                    return pool.give_up(format!(
                        "worker processes die right after they start ({deaths} in a row, idle, \
                         before any call, within {EARLY_DEATH:?} of their start; the last: \
                         {status})"
                    ));
                }
                tokio::select! {
                    () = tokio::time::sleep(RESPAWN_PAUSE) => {}
                    () = pool.stopped.cancelled() => return,
                }
            }
            let mut failures = 0;
            while !pool.idle().closed {
                let launched = tokio::select! {
                    launched = pool.launcher.launch() => launched,
                    // a worker still starting is killed as its `Child` is dropped
                    _ = pool.stopped.cancelled() => return,
                };
                match launched {
                    Ok(new) => return pool.give_back(new),
                    Err(error) => {
                        // a dependency's error says which failed, its source why
                        let error = Chain(&error).to_string();
                        failures += 1;
                        if failures == START_ATTEMPTS {
                            return pool.give_up(format!(
                                "cannot start a worker process ({failures} attempts in a row, \
                                 the last: {error})"
                            ));
                        }
                        tracing::error!("cannot start a worker process: {error}; trying again");
                        tokio::time::sleep(RESPAWN_PAUSE).await;
                    }
                }
            }
        }));
    }

    /// Give up on starting workers: the service is to stop (see [`ProcessPool::failed`]);
    /// its supervisor logs why.
    fn give_up(&self, failure: String) {
        let _ = self.failure.set(failure);
        self.failed.cancel();
    }

    /// Once workers can no longer be started (the program's set-up fails in every new one,
    /// the process or file limit is reached): the pool would shrink to nothing and its calls
    /// wait for a worker for ever, holding their messages, so the service stops, with this
    /// error, for its supervisor to start it again; its calls' messages go back.
    pub(crate) async fn failed(&self) -> Error {
        self.failed.cancelled().await;
        Error::WorkerProcess(self.failure.get().cloned().unwrap_or_default())
    }

    /// Run one call in a worker process (the `reserved` one first, if given): this task
    /// writes the call and reads its outcome.
    pub(crate) async fn call(
        self: &Arc<Self>,
        call: BorrowedCall<'_>,
        mut reserved: Option<Reserved<'_>>,
    ) -> Outcome {
        // A worker that died while idle fails the write before anything reached it: the call
        // goes to another, as often as the pool has workers (plus a fresh one).
        let mut tries = 0;
        let (mut links, lent, busy) = loop {
            let Some(mut links) = self.take(reserved.take()).await else {
                // Shut down while this call waited for a worker: it never runs, and a failure
                // would dead-letter its message; it waits until the service drops it, which
                // hands the message back.
                return std::future::pending().await;
            };
            let lent = ReplaceOnDrop(Some((self, links.pid)));
            let busy = self.busy.token();
            let error = match links.calls.send(&call).await {
                Ok(()) => break (links, lent, busy),
                Err(error) => error,
            };
            lent.disarm();
            let Some(worker) = self.reclaim(links) else { return abandoned(busy).await };
            if error.kind() == std::io::ErrorKind::InvalidData {
                self.give_back(worker);
                // the same call would be refused again: no retry can send it
                let message = format!("the call cannot be sent to a worker process: {error}");
                return Err(Failure { retryable: false, ..failed(FailureKind::Error, message) });
            }
            let pid = worker.links.pid;
            let status = self.replace(worker, false).await;
            self.replaced(Replaced::DiedIdle);
            tracing::warn!(
                "worker process {pid} was gone before a call reached it ({error}, {status}); a \
                 new worker replaces it and another takes the call"
            );
            tries += 1;
            if tries > self.size {
                let message = format!(
                    "{tries} worker processes in a row were gone before the call reached them"
                );
                return Err(failed(FailureKind::Crashed, message));
            }
        };
        // No wait on the shutdown here (it would register with it on every call): the
        // shutdown kills the worker of a call still running, which ends the wait below.
        let answer = match self.time_limit {
            None => Ok(links.calls.outcome().await),
            Some(limit) => tokio::time::timeout(limit, links.calls.outcome()).await,
        };
        lent.disarm();
        let Some(mut worker) = self.reclaim(links) else { return abandoned(busy).await };
        let pid = worker.links.pid;
        match answer {
            Ok(Some(outcome)) => {
                self.early_deaths.store(0, Ordering::Relaxed);
                worker.links.done += 1;
                let done = worker.links.done;
                if self.max_tasks.is_some_and(|max| done >= max) {
                    tracing::debug!("worker process {pid} recycled after {done} calls");
                    self.replaced(Replaced::Recycled);
                    self.respawn();
                    tokio::spawn(self.busy.track_future(end(worker, false)));
                } else {
                    self.give_back(worker);
                }
                outcome
            }
            Ok(None) => {
                let status = self.replace(worker, false).await;
                self.replaced(Replaced::DiedInCall);
                let message = format!("worker process {pid} died during the call ({status})");
                tracing::error!("{message}; a new worker replaces it");
                Err(failed(FailureKind::Crashed, message))
            }
            Err(_) => {
                self.replace(worker, true).await;
                self.replaced(Replaced::TimeLimit);
                let limit = self.time_limit.unwrap_or_default();
                let message = format!(
                    "call ran past its time limit of {limit:?}: worker process {pid} killed"
                );
                tracing::error!("{message}; a new worker replaces it");
                Err(failed(FailureKind::TimedOut, message))
            }
        }
    }

    /// The worker lent with `links`, back from its call; `None` if the shutdown killed it
    /// meanwhile.
    fn reclaim(&self, links: Links) -> Option<Worker> {
        let child = self.lent_process(links.pid)?;
        Some(Worker { child, links })
    }

    /// The process of the worker lent with `pid`, no longer lent; `None` if the shutdown
    /// killed it meanwhile.
    fn lent_process(&self, pid: u32) -> Option<Child> {
        let mut idle = self.idle();
        let at = idle.lent.iter().position(|(lent, _)| *lent == pid)?;
        let (_, process) = idle.lent.swap_remove(at);
        self.count_processes(&idle);
        Some(process)
    }

    /// Start another worker in the background, then end `worker` (see [`end`]). Returns how
    /// it ended.
    async fn replace(self: &Arc<Self>, worker: Worker, kill: bool) -> String {
        // first, so that a call dropped while it waits for the old worker loses none
        self.respawn();
        end(worker, kill).await
    }

    /// Completes once [`ProcessPool::shutdown`] has begun: no call still running ends.
    pub(crate) async fn shutdown_begun(&self) {
        self.stopped.cancelled().await
    }

    /// Stop every idle worker (they exit when their socket closes), kill those whose calls
    /// still run (the service waited `SHUTDOWN_TIMEOUT` for them before), and start none any
    /// more. Returns once each has exited, and each call that ran has ended.
    pub(crate) async fn shutdown(&self) {
        let (workers, lent) = {
            let mut idle = self.idle();
            idle.closed = true;
            let all = (std::mem::take(&mut idle.workers), std::mem::take(&mut idle.lent));
            self.count_processes(&idle);
            all
        };
        self.ready.close();
        self.stopped.cancel();
        self.busy.close();
        let idle = futures::future::join_all(workers.into_iter().map(|worker| end(worker, false)));
        let lent = futures::future::join_all(lent.into_iter().map(|(pid, child)| async move {
            let status = exited(pid, child, true).await;
            tracing::warn!("worker process {pid} still ran a call at shutdown: {status}");
        }));
        futures::future::join(idle, lent).await;
        self.busy.wait().await;
    }
}

/// A call's failure that the service, not its worker, saw: logged as the worker logs the
/// others (in the call's span).
fn failed(kind: FailureKind, message: String) -> Failure {
    tracing::warn!(kind = %kind, "call failed: {message}");
    Failure::new(kind, message)
}

/// A call whose worker the shutdown killed, past `SHUTDOWN_TIMEOUT`: as a call that waits for
/// a worker at that point, it never settles, and its message goes back to the broker.
async fn abandoned(busy: TaskTrackerToken) -> Outcome {
    drop(busy);
    std::future::pending().await
}

/// End `worker`: close its calls link, which ends it, killing it if `kill` or if it did not
/// exit within 5 s. Returns how it ended.
///
/// Its control link stays open until it has exited: the worker tears its dependencies down
/// as it ends, and their broker traffic (a last batch of events dispatched) still goes
/// through the service.
async fn end(worker: Worker, kill: bool) -> String {
    let Worker { child, links: Links { pid, calls, control, .. } } = worker;
    drop(calls);
    let status = exited(pid, child, kill).await;
    drop(control);
    status
}

/// Wait for worker process `pid` to exit, killing it first if `kill`, or if it did not exit
/// within 5 s. Returns how it ended.
async fn exited(pid: u32, mut child: Child, kill: bool) -> String {
    if kill {
        let _ = child.start_kill();
    }
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(error)) => error.to_string(),
        Err(_) => {
            tracing::warn!(
                "worker process {pid} did not exit in 5 s after its link closed; killed"
            );
            let _ = child.start_kill();
            "did not exit, killed".to_owned()
        }
    }
}

/// Held by a call while it uses worker `pid`. A call's future dropped then (its caller went
/// away: an HTTP client that hung up) drops the worker's links, and this its process, which
/// kills it, as it may be in the middle of the call or of a frame; and starts its
/// replacement, on a task of its own since the call's future is gone.
struct ReplaceOnDrop<'a>(Option<(&'a Arc<ProcessPool>, u32)>);

impl ReplaceOnDrop<'_> {
    /// The call itself gives the worker back or replaces it.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ReplaceOnDrop<'_> {
    fn drop(&mut self) {
        if let Some((pool, pid)) = self.0 {
            tracing::warn!(
                "a call ended by its caller while it ran: its worker is killed, replaced"
            );
            drop(pool.lent_process(pid));
            pool.replaced(Replaced::CallDropped);
            pool.respawn();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::entrypoints::RPCListener;
    use crate::amqp::rpc::Args;
    use crate::config::WorkerMode;
    use crate::pipeline::routes::Route;
    use crate::testing::{memory_test_config, TestService};

    /// How long the test waits for what the pool does in the background.
    const WAIT: Duration = Duration::from_secs(30);

    /// Writes its worker's pid to the file `marker`, then runs until its worker is killed.
    fn stuck(Args((marker,)): Args<(String,)>) -> Result<(), String> {
        std::fs::write(&marker, std::process::id().to_string()).map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(3600));
        Ok(())
    }

    fn pid() -> u32 {
        std::process::id()
    }

    /// The pid the file `marker` holds, once written.
    async fn pid_in(marker: &std::path::Path) -> u32 {
        let since = tokio::time::Instant::now();
        while since.elapsed() < WAIT {
            let written = std::fs::read_to_string(marker).unwrap_or_default();
            if let Ok(pid) = written.parse() {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no call started in {WAIT:?}");
    }

    /// Whether process `pid` runs (exists, and is neither a zombie nor dead).
    fn running(pid: u32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rfind(')').is_some_and(|end| !stat[end + 2..].starts_with(['Z', 'X']))
    }

    fn idle_pids(pool: &ProcessPool) -> Vec<u32> {
        pool.idle().workers.iter().map(|worker| worker.links.pid).collect()
    }

    /// A call's future dropped while a worker runs it (its caller gave up on it) kills that
    /// worker, and a replacement takes its place: the pool is whole again and serves calls.
    #[tokio::test]
    async fn a_call_dropped_while_a_worker_runs_it_has_the_worker_replaced() {
        // Up to `start`, this runs in the worker processes too.
        let config = memory_test_config("pool-dropped")
            .with_worker_mode(WorkerMode::Process)
            .with_max_workers(2);
        let routes = vec![
            Route::new(stuck).entrypoint(RPCListener::new()),
            Route::new(pid).entrypoint(RPCListener::new()),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        let pool = service.route("stuck").unwrap().pool().processes().unwrap().clone();
        let workers = idle_pids(&pool);
        assert_eq!(workers.len(), 2, "{workers:?}");
        let marker = std::env::temp_dir().join(format!("mf-pool-dropped-{}", uuid::Uuid::new_v4()));
        let hook = service.hook("stuck").unwrap();
        let call = hook.rpc::<()>((marker.to_string_lossy(),), ());
        let ran_it = tokio::select! {
            ended = call => panic!("the stuck call ended: {ended:?}"),
            pid = pid_in(&marker) => pid,
        };
        // the call's future was dropped while its worker ran it
        let _ = std::fs::remove_file(&marker);
        assert!(workers.contains(&ran_it), "{ran_it} is not one of {workers:?}");
        let since = tokio::time::Instant::now();
        let whole = |idle: &[u32]| idle.len() == 2 && !idle.contains(&ran_it);
        while (running(ran_it) || !whole(&idle_pids(&pool))) && since.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!running(ran_it), "worker {ran_it}, which ran the dropped call, still runs");
        let idle = idle_pids(&pool);
        assert!(whole(&idle), "idle workers {idle:?} {WAIT:?} after {ran_it}'s call was dropped");
        let next_call = service.hook("pid").unwrap();
        let next = tokio::time::timeout(WAIT, next_call.rpc::<u32>((), ()));
        let next = next.await.expect("a next call runs");
        assert!(next.as_ref().is_ok_and(|pid| idle.contains(pid)), "{next:?}, idle {idle:?}");
        #[cfg(feature = "metrics")]
        {
            let counted = service.service().metrics().render();
            let line =
                "worker_processes_replaced_total{context=\"default\",reason=\"call_dropped\"} 1";
            assert!(counted.lines().any(|counted| counted == line), "{counted}");
        }
        service.stop().await.unwrap();
    }

    /// A shutdown while a call still runs (past `SHUTDOWN_TIMEOUT`) kills the call's worker
    /// and returns once it has exited; the call never settles (its message goes back).
    #[tokio::test]
    async fn a_shutdown_kills_the_worker_of_a_running_call_which_never_settles() {
        use crate::data::{BackOffData, Message, TargetRole};
        // Up to `start`, this runs in the worker processes too.
        let config = memory_test_config("pool-shutdown")
            .with_worker_mode(WorkerMode::Process)
            .with_max_workers(1);
        let routes = vec![Route::new(stuck).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let pool = service.route("stuck").unwrap().pool().processes().unwrap().clone();
        let marker = std::env::temp_dir().join(format!("mf-pool-stop-{}", uuid::Uuid::new_v4()));
        let args = serde_json::json!({"args": [marker.to_string_lossy()], "kwargs": {}});
        let message = Message::json(&args).unwrap();
        let calling = pool.clone();
        let call = tokio::spawn(async move {
            let retry = BackOffData::from_headers(&message.properties.headers, 0);
            let call = BorrowedCall {
                route: "stuck",
                call_id: "svc.stuck.1",
                role: TargetRole::Target,
                message: &message,
                failure: None,
                retry: &retry,
            };
            calling.call(call, None).await
        });
        let ran_it = pid_in(&marker).await;
        let _ = std::fs::remove_file(&marker);
        tokio::time::timeout(WAIT, pool.shutdown()).await.expect("the shutdown ends");
        let left = std::path::Path::new(&format!("/proc/{ran_it}")).exists();
        // on this single-threaded runtime the call ran as far as it could meanwhile
        call.abort();
        let settled = call.await;
        assert!(!left, "worker {ran_it}, which ran the call, is left after the shutdown");
        assert!(settled.as_ref().is_err_and(|e| e.is_cancelled()), "settled: {settled:?}");
        service.stop().await.unwrap();
    }
}
