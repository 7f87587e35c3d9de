//! Process worker modes under `cargo test`: `TestService::start` re-executes this test binary
//! with only the current test selected; there the test body runs again up to
//! `TestService::start`, which serves calls and exits the worker process.
#![cfg(feature = "process")]

mod common;

use micro_framework::amqp::dependencies::Producer;
#[cfg(feature = "metrics")]
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::dependencies::{Dependency, SetupContext};
use micro_framework::prelude::*;
use micro_framework::spawners::process::WORKER_SOCKET_ENV;
use micro_framework::testing::{test_config, TestService};
use micro_framework::{BoxError, CallContext, FailureKind, FromContext, WorkerContext};

fn pid() -> u32 {
    std::process::id()
}

fn boom() -> u32 {
    panic!("boom in a worker process")
}

fn abort() -> u32 {
    std::process::abort()
}

async fn start(mode: WorkerMode) -> TestService {
    // Everything up to `start` runs in the worker processes too: the same routes are built.
    let config = test_config(&common::unique("procs")).with_worker_mode(mode).with_max_workers(1);
    let routes = vec![
        Route::new(pid).entrypoint(RPCListener::new()),
        Route::new(boom).entrypoint(RPCListener::new()),
        Route::new(abort).entrypoint(RPCListener::new()),
    ];
    TestService::start(routes, config).await.unwrap()
}

async fn worker_pid(service: &TestService) -> u32 {
    service.hook("pid").unwrap().rpc((), ()).await.unwrap()
}

async fn check_calls_run_in_worker_processes(mode: WorkerMode) {
    let service = start(mode).await;
    // From here on only the test's own process runs.
    let first = worker_pid(&service).await;
    assert_ne!(first, std::process::id(), "the call ran in the test's process");
    assert_eq!(worker_pid(&service).await, first, "one worker serves call after call");

    let panicked = service.hook("boom").unwrap().rpc::<u32>((), ()).await.unwrap_err();
    let failure = panicked.failure().expect("the call's failure").clone();
    assert_eq!(failure.kind, FailureKind::Panic, "{failure:?}");
    assert!(failure.message.contains("boom in a worker process"), "{failure:?}");
    assert_eq!(worker_pid(&service).await, first, "a panic costs the call, not the worker");

    let aborted = service.hook("abort").unwrap().rpc::<u32>((), ()).await.unwrap_err();
    let failure = aborted.failure().expect("the call's failure").clone();
    assert_eq!(failure.kind, FailureKind::Crashed, "{failure:?}");

    // The abort cost that call and its process, not the test: a new worker serves.
    let next = worker_pid(&service).await;
    assert_ne!(next, std::process::id());
    assert_ne!(next, first, "the crashed worker was replaced");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn process_mode_runs_each_call_in_a_re_executed_test_binary() {
    check_calls_run_in_worker_processes(WorkerMode::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_process_mode_runs_under_a_multi_threaded_runtime_too() {
    check_calls_run_in_worker_processes(WorkerMode::GreedyProcess).await;
}

#[tokio::test]
async fn runner_spawn_still_refuses_process_modes() {
    let config = test_config("procs_spawn").with_worker_mode(WorkerMode::Process);
    let routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
    let error = Runner::new(routes, config).spawn().await.unwrap_err().to_string();
    assert!(error.contains("TestService::start in a test"), "{error}");
}

/// Calls `pid` on its own service (named by the event): an RPC call made by a target that
/// runs in a worker process.
#[cfg(feature = "metrics")]
async fn calls_pid(Payload(service): Payload<String>, rpc: RpcProxy) -> Result<u32, String> {
    rpc.service(service).call("pid", (), ()).await.map_err(|error| error.to_string())
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn rpc_calls_made_in_worker_processes_are_in_the_services_metrics() {
    let shop = common::unique("shop");
    // two workers: `calls_pid` holds one while `pid` answers on the other
    let config = test_config(&common::unique("procs_metrics"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(2);
    let name = config.service_name.clone();
    let routes = vec![
        Route::new(pid).entrypoint(RPCListener::new()),
        Route::new(calls_pid).entrypoint(EventListener::new(&shop, "go")),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let waiter = service.waiter("calls_pid").unwrap();
    service.dispatch(&shop, "go", &name).await.unwrap();
    let worker = waiter.wait().await.unwrap().result::<u32>().unwrap();
    assert_ne!(worker, std::process::id(), "the call ran in the test's process");

    // the worker hands the record on after the call returns: look until it is there
    let wanted = format!(r#"rpc_calls_total{{method="pid",outcome="ok",service="{name}"}} 1"#);
    let metrics = service.service().metrics();
    common::wait_until(|| metrics.render().contains(&wanted), &wanted).await;
    let text = metrics.render();
    let duration = format!(r#"rpc_call_duration_seconds_count{{method="pid",service="{name}"}} 1"#);
    assert!(text.contains(&duration), "{duration} not in:\n{text}");
    service.stop().await.unwrap();
}

/// Appends a line to the file `marker`: one per attempt, whatever process makes it.
fn note_attempt(marker: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(marker).unwrap();
    file.write_all(b"attempt\n").unwrap();
}

fn attempts(marker: &std::path::Path) -> usize {
    std::fs::read_to_string(marker).unwrap_or_default().lines().count()
}

/// Notes its attempt, then kills its worker process.
fn crash_noted(Payload(marker): Payload<String>) {
    note_attempt(&marker);
    std::process::abort();
}

/// Notes its attempt, then overruns any time limit.
fn overrun_noted(Payload(marker): Payload<String>) {
    note_attempt(&marker);
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

/// A retry filter holds for what a worker process adds too: a crash and a time-out have no
/// error to match, so with `retry_on` they fail at once, as a panic does.
#[tokio::test]
async fn a_retry_filter_holds_for_crashes_and_time_outs_in_worker_processes() {
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::retry::BackOff;
    use std::time::Duration;
    let io_only = || BackOff::new(2, Duration::from_millis(1)).retry_on::<std::io::Error>();
    let shop = common::unique("shop");
    let config = test_config(&common::unique("procs_filter"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_task_time_limit(Some(Duration::from_millis(500)));
    let routes = vec![
        Route::new(crash_noted).entrypoint(EventListener::new(&shop, "crash")).backoff(io_only()),
        Route::new(overrun_noted)
            .entrypoint(EventListener::new(&shop, "overrun"))
            .backoff(io_only()),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let dir = std::env::temp_dir();
    for (event, route) in [("crash", "crash_noted"), ("overrun", "overrun_noted")] {
        let marker = dir.join(format!("{}-{event}", common::unique("mf-attempts")));
        service.dispatch(&shop, event, &marker.to_string_lossy()).await.unwrap();
        service.wait_for_route(route, 1).await.unwrap();
        let made = attempts(&marker);
        let _ = std::fs::remove_file(&marker);
        assert_eq!(made, 1, "{route}: a failure the filter cannot match was retried");
    }
    service.stop().await.unwrap();
}

/// Writes its worker's pid to the file `marker`, then runs for an hour.
fn stuck_noted(Payload(marker): Payload<String>) {
    std::fs::write(&marker, std::process::id().to_string()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

/// Whether process `pid` exists (a zombie too: it was never waited for).
fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A stop ends every worker process, also one whose call still runs past `SHUTDOWN_TIMEOUT`
/// (its message goes back to the queue): none is left running, nor as a zombie, once the
/// stop has returned.
#[tokio::test]
async fn a_stop_ends_the_workers_of_calls_still_running_past_the_shutdown_timeout() {
    use micro_framework::amqp::entrypoints::EventListener;
    use std::time::Duration;
    let shop = common::unique("shop");
    let config = test_config(&common::unique("procs_stop"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_shutdown_timeout(Duration::from_millis(500));
    let routes = vec![Route::new(stuck_noted).entrypoint(EventListener::new(&shop, "stuck"))];
    let service = TestService::start(routes, config).await.unwrap();
    let marker = std::env::temp_dir().join(common::unique("mf-stuck"));
    service.dispatch(&shop, "stuck", &marker.to_string_lossy()).await.unwrap();
    let mut worker = None;
    for _ in 0..600 {
        worker = std::fs::read_to_string(&marker).ok().and_then(|pid| pid.parse::<u32>().ok());
        if worker.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&marker);
    let worker = worker.expect("the call started in a worker process");
    tokio::time::timeout(Duration::from_secs(30), service.stop())
        .await
        .expect("the stop ends")
        .unwrap();
    let left = exists(worker);
    if left {
        let _ = std::process::Command::new("kill").args(["-KILL", &worker.to_string()]).status();
    }
    assert!(!left, "worker process {worker} is left after the stop returned");
}

/// An ignored process-mode test (a slow one, say), run by the next test with `--ignored`.
#[tokio::test]
#[ignore = "run by an_ignored_test_run_with_ignored_gets_its_worker_processes"]
async fn an_ignored_process_mode_test() {
    let service = start(WorkerMode::Process).await;
    assert_ne!(worker_pid(&service).await, std::process::id());
    service.stop().await.unwrap();
}

/// `cargo test -- --ignored` runs an ignored test, and its worker processes (this test binary
/// again, with only that test selected) must run it too, to reach `TestService::start`.
#[test]
fn an_ignored_test_run_with_ignored_gets_its_worker_processes() {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["an_ignored_process_mode_test", "--exact", "--ignored", "--test-threads=1"])
        .env_remove(WORKER_SOCKET_ENV)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let logged = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}\n{printed}\n{logged}", output.status);
    assert!(printed.contains("1 passed"), "{printed}\n{logged}");
}

/// A test may start a helper service (thread mode: a fake of a service the one under test
/// calls) before the process-mode service it tests: the worker processes, which run the test
/// again, serve the process-mode service's routes, not the helper's.
#[tokio::test]
async fn a_process_mode_service_started_after_a_thread_mode_one_runs_its_own_routes() {
    let helper_routes = vec![Route::new(boom).entrypoint(RPCListener::new())];
    let helper =
        TestService::start(helper_routes, test_config(&common::unique("helper"))).await.unwrap();
    let config = test_config(&common::unique("procs_after"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let worker = service.hook("pid").unwrap().rpc::<u32>((), ()).await;
    service.stop().await.unwrap();
    helper.stop().await.unwrap();
    let worker = worker.map_err(|error| error.to_string());
    assert!(worker.as_ref().is_ok_and(|pid| *pid != std::process::id()), "{worker:?}");
}

fn other_pid() -> u32 {
    std::process::id()
}

/// Two process-mode services in one test (one calls the other, say): the worker processes of
/// each, which run the test again, serve their own service's routes.
#[tokio::test]
async fn two_process_mode_services_in_one_test_each_run_their_own_routes() {
    let first_config = test_config(&common::unique("procs_first"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let first_routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
    let first = TestService::start(first_routes, first_config).await.unwrap();
    let second_config = test_config(&common::unique("procs_second"))
        .with_worker_mode(WorkerMode::GreedyProcess)
        .with_max_workers(1);
    let second_routes = vec![Route::new(other_pid).entrypoint(RPCListener::new())];
    let second = TestService::start(second_routes, second_config).await.unwrap();
    let in_first = first.hook("pid").unwrap().rpc::<u32>((), ()).await;
    let in_second = second.hook("other_pid").unwrap().rpc::<u32>((), ()).await;
    second.stop().await.unwrap();
    first.stop().await.unwrap();
    let (in_first, in_second) =
        (in_first.map_err(|error| error.to_string()), in_second.map_err(|error| error.to_string()));
    let ran_in_a_worker = |pid: &u32| *pid != std::process::id();
    assert!(in_first.as_ref().is_ok_and(ran_in_a_worker), "{in_first:?}");
    assert!(in_second.as_ref().is_ok_and(ran_in_a_worker), "{in_second:?}");
    assert_ne!(in_first, in_second, "one worker process served both services");
}

/// Dispatches an event as its service, and returns its call's id stack.
async fn announce(call: CallContext, events: Producer) -> micro_framework::Result<Vec<String>> {
    events.dispatch("announced", &"hello").await?;
    Ok(call.call_id_stack)
}

fn on_announced(Payload(greeting): Payload<String>) -> String {
    greeting
}

/// A test's unique service name is new in each worker's run of the test body: the worker
/// runs its calls as the service that started it all the same.
#[tokio::test]
async fn a_worker_process_runs_its_calls_as_the_service_that_started_it() {
    let config = test_config(&common::unique("announcer"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let name = config.service_name.clone();
    let routes = vec![
        Route::new(announce).entrypoint(RPCListener::new()),
        Route::new(on_announced).entrypoint(EventListener::new(&name, "announced")),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let waiter = service.waiter("on_announced").unwrap();
    let stack: Vec<String> = service.hook("announce").unwrap().rpc((), ()).await.unwrap();
    let heard = waiter.wait().await.map(|call| call.result::<String>());
    service.stop().await.unwrap();
    assert!(stack[0].starts_with(&format!("{name}.announce.")), "{stack:?}");
    assert_eq!(heard.unwrap().unwrap(), "hello", "the event went to another exchange");
}

/// Starts the `process_modes` example as a program of its own (in thread mode, on an
/// in-process broker), stops it with SIGTERM after a second, and reports what it printed.
fn starts_a_program() -> String {
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().and_then(std::path::Path::parent).unwrap().join("examples");
    let mut child = std::process::Command::new(examples.join("process_modes"))
        .env("WORKER_MODE", "thread")
        .env("SERVICE_NAME", common::unique("child"))
        .env_remove("AMQP_URI")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cargo build --examples first");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let running = child.try_wait().unwrap().is_none();
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    format!(
        "running after 1 s: {running}; {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A program a target starts from a worker process inherits the worker's environment: a
/// micro-framework program took itself for a worker of the service (it exited at once,
/// orphaned, having printed nothing, and ignored SIGTERM). It runs as itself.
#[tokio::test]
async fn a_program_a_target_starts_in_a_worker_process_runs_as_itself() {
    let config = test_config(&common::unique("starter"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let routes = vec![Route::new(starts_a_program).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let report: String = service.hook("starts_a_program").unwrap().rpc((), ()).await.unwrap();
    service.stop().await.unwrap();
    assert!(report.starts_with("running after 1 s: true"), "{report}");
    assert!(report.contains("process_demo running in process"), "{report}");
    assert!(report.contains("process_demo stopped"), "stopped by SIGTERM: {report}");
}

/// Fails to set up in worker processes (a resource the service's own process holds: a port
/// it bound, a lock file it took); with a flag file, only in those started once it exists.
struct HeldByTheService(Option<std::path::PathBuf>);

#[micro_framework::async_trait]
impl Dependency for HeldByTheService {
    type Output = u8;
    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        let flagged = self.0.as_ref().is_none_or(|flag| flag.exists());
        if std::env::var_os(WORKER_SOCKET_ENV).is_some() && flagged {
            return Err("port 9464 is in use".into());
        }
        Ok(())
    }
    async fn get(&self, _call: &WorkerContext) -> Result<u8, BoxError> {
        Ok(1)
    }
}

fn uses_held(Dep(_): Dep<u8>) -> u32 {
    std::process::id()
}

/// A dependency that fails to set up in a worker process fails the start with the error
/// it fails with in the service's own process: naming the dependency and saying why (was: "a
/// worker process did not say it was ready").
#[tokio::test]
async fn a_dependency_failing_to_set_up_in_a_worker_process_is_named_in_the_start_error() {
    let config = test_config(&common::unique("held"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let routes = vec![Route::new(uses_held)
        .entrypoint(RPCListener::new())
        .dependency(HeldByTheService(None))];
    let error = TestService::start(routes, config).await.unwrap_err();
    // its message and its source's, as `Debug` (and `main`, and a chain reporter) shows them
    let text = format!("{error:?}");
    assert!(matches!(error, micro_framework::Error::Dependency { .. }), "{error:?}");
    assert!(text.contains("HeldByTheService"), "the dependency is not named: {text}");
    assert!(text.contains("port 9464 is in use"), "its error is not given: {text}");
}

/// A worker process sets up only the dependencies of its own context's routes: a
/// thread-mode context's dependency that only one copy may hold (here, one that fails in a
/// worker process) does not stop the start (was: every worker set up every route's
/// dependencies, and the start failed naming it).
#[tokio::test]
async fn a_worker_process_sets_up_only_its_own_contexts_dependencies() {
    let config = test_config(&common::unique("own_context"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let in_threads = RunnerContext::new(vec![Route::new(uses_held)
        .entrypoint(RPCListener::new())
        .dependency(HeldByTheService(None))])
    .worker_mode(WorkerMode::Thread)
    .metric_label("threads");
    let runner = Runner::new(vec![Route::new(pid).entrypoint(RPCListener::new())], config)
        .context(in_threads);
    let service = TestService::start_runner(runner).await.unwrap();
    let in_worker: u32 = service.hook("pid").unwrap().rpc((), ()).await.unwrap();
    assert_ne!(in_worker, std::process::id(), "the process context's call ran in a worker");
    let in_service: u32 = service.hook("uses_held").unwrap().rpc((), ()).await.unwrap();
    assert_eq!(in_service, std::process::id(), "the thread context's call ran in the service");
    service.stop().await.unwrap();
}

/// Where a dependency is set up, noted in the file `SET_UPS_ENV` names (the same in the
/// worker processes, which run the test again): its name and the process's id, a line each.
const SET_UPS_ENV: &str = "TOOLKIT_PROCESS_SET_UPS";

fn note_set_up(name: &str) -> Result<(), BoxError> {
    use std::io::Write;
    let path = std::env::var_os(SET_UPS_ENV).ok_or("no file to note the set-up in")?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(format!("{name} {}\n", std::process::id()).as_bytes())?;
    Ok(())
}

/// A pool of connections, for the process-mode route alone.
struct Pool;

#[micro_framework::async_trait]
impl Dependency for Pool {
    type Output = u32;
    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        note_set_up("pool")
    }
    async fn get(&self, _call: &WorkerContext) -> Result<u32, BoxError> {
        Ok(std::process::id())
    }
}

/// A cache every route of the runner shares, thread-mode and process-mode alike.
struct Cache;

#[micro_framework::async_trait]
impl Dependency for Cache {
    type Output = u16;
    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        note_set_up("cache")
    }
    async fn get(&self, _call: &WorkerContext) -> Result<u16, BoxError> {
        Ok(1)
    }
}

fn uses_pool(Dep(pid): Dep<u32>, Dep(_cache): Dep<u16>) -> u32 {
    pid
}

fn uses_cache(Dep(_cache): Dep<u16>) -> u32 {
    std::process::id()
}

/// The service's own process sets up only the dependencies of the routes whose calls it runs:
/// a process-mode route's are set up in its worker processes alone (was: in the service too,
/// where no call uses them, so that one binding a fixed port made every worker fail to
/// start); one it shares with a thread-mode route is set up there for that route.
#[tokio::test]
async fn the_service_process_sets_up_only_the_dependencies_of_its_thread_mode_routes() {
    if std::env::var_os(SET_UPS_ENV).is_none() {
        std::env::set_var(SET_UPS_ENV, std::env::temp_dir().join(common::unique("set-ups")));
    }
    let path = std::path::PathBuf::from(std::env::var_os(SET_UPS_ENV).unwrap());
    let config = test_config(&common::unique("set_ups"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(2);
    let in_threads =
        RunnerContext::new(vec![Route::new(uses_cache).entrypoint(RPCListener::new())])
            .worker_mode(WorkerMode::Thread)
            .metric_label("threads");
    let routes = vec![Route::new(uses_pool).entrypoint(RPCListener::new()).dependency(Pool)];
    let runner = Runner::new(routes, config).context(in_threads).dependency(Cache);
    let service = TestService::start_runner(runner).await.unwrap();
    let in_worker: u32 = service.hook("uses_pool").unwrap().rpc((), ()).await.unwrap();
    let in_service: u32 = service.hook("uses_cache").unwrap().rpc((), ()).await.unwrap();
    service.stop().await.unwrap();
    let noted = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let here = std::process::id();
    assert_ne!(in_worker, here, "the process-mode call ran in a worker");
    assert_eq!(in_service, here, "the thread-mode call ran in the service");
    let mut set_up: Vec<(&str, bool)> = noted
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, pid)| (name, pid == here.to_string()))
        .collect();
    set_up.sort_unstable();
    // each of the 2 workers sets up both; the service the thread-mode route's cache alone
    let expected =
        [("cache", false), ("cache", false), ("cache", true), ("pool", false), ("pool", false)];
    assert_eq!(set_up, expected, "(name, in the service's process): {noted}");
}

/// The replacement of a recycled worker fails to set up a dependency (the resource was taken
/// meanwhile), again and again: the service stops with an error that names the dependency
/// and says why.
#[tokio::test]
async fn replacement_workers_failing_to_set_up_a_dependency_stop_the_service_naming_it() {
    // the same file in the worker processes, which run this test again
    const FLAG_ENV: &str = "TOOLKIT_PROCESS_HELD_FLAG";
    if std::env::var_os(FLAG_ENV).is_none() {
        std::env::set_var(FLAG_ENV, std::env::temp_dir().join(common::unique("held-flag")));
    }
    let flag = std::path::PathBuf::from(std::env::var_os(FLAG_ENV).unwrap());
    let mut config = test_config(&common::unique("held_later"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    config.max_tasks_per_child = Some(1);
    let held = HeldByTheService(Some(flag.clone()));
    let routes = vec![Route::new(uses_held).entrypoint(RPCListener::new()).dependency(held)];
    let service = TestService::start(routes, config).await.unwrap();
    std::fs::write(&flag, b"").unwrap();
    let ran: u32 = service.hook("uses_held").unwrap().rpc((), ()).await.unwrap();
    assert_ne!(ran, std::process::id());
    // the worker is recycled after that call, and no replacement can start
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), service.wait_stopped());
    let stopped = stopped.await.expect("the service stops once no worker can start");
    let _ = std::fs::remove_file(&flag);
    let text = stopped.unwrap_err().to_string();
    assert!(text.contains("cannot start a worker process"), "{text}");
    assert!(text.contains("HeldByTheService"), "the dependency is not named: {text}");
    assert!(text.contains("port 9464 is in use"), "its error is not given: {text}");
}

/// Keeps a producer made from its call's context and dispatches `flushed` with it when
/// torn down (an outbox flushed at the stop).
struct Outbox(std::sync::Mutex<Option<Producer>>);

#[micro_framework::async_trait]
impl Dependency for Outbox {
    type Output = u16;
    async fn get(&self, call: &WorkerContext) -> Result<u16, BoxError> {
        let producer = Producer::from_context(call).map_err(|error| error.to_string())?;
        *self.0.lock().unwrap() = Some(producer);
        Ok(1)
    }
    async fn teardown(&self) {
        let producer = self.0.lock().unwrap().take();
        if let Some(producer) = producer {
            if let Err(error) = producer.dispatch("flushed", &std::process::id()).await {
                eprintln!("the outbox cannot flush in {}: {error}", std::process::id());
            }
        }
    }
}

fn buffered(Dep(_): Dep<u16>) {}

fn flushed(Payload(_pid): Payload<u32>) {}

/// A dependency's teardown in a worker process uses the broker as in a thread mode (was: its
/// broker operations waited for answers the service no longer sent, until the worker was
/// killed 5 s later, and the event was lost).
#[tokio::test]
async fn a_dependency_torn_down_in_a_worker_process_can_still_dispatch() {
    let config = test_config(&common::unique("outbox"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(buffered)
        .entrypoint(RPCListener::new())
        .dependency(Outbox(Default::default()))];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    // a service of its own on the same broker (its virtual host under TEST_AMQP_URI, which
    // it keeps while it runs) listens to the event the outbox flushes at the stop
    let observer = config
        .clone()
        .with_service_name(format!("{service_name}_observer"))
        .with_worker_mode(WorkerMode::Thread);
    let flushed =
        Route::new(flushed).entrypoint(EventListener::new(service_name.clone(), "flushed"));
    let observer = TestService::start(vec![flushed], observer).await.unwrap();
    service.hook("buffered").unwrap().rpc::<()>((), ()).await.unwrap();
    let stopping = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(30), service.stop())
        .await
        .expect("the stop ends")
        .unwrap();
    let took = stopping.elapsed();
    let seen = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        observer.wait_for_route("flushed", 1),
    )
    .await;
    observer.stop().await.unwrap();
    assert!(seen.is_ok_and(|seen| seen.is_ok()), "the worker's outbox was not flushed at teardown");
    assert!(took < std::time::Duration::from_secs(4), "the stop took {took:?}");
}

#[cfg(feature = "http")]
fn outlasts_the_stop() -> &'static str {
    std::thread::sleep(std::time::Duration::from_secs(3));
    "done"
}

/// An HTTP call whose worker process a stop ends past `SHUTDOWN_TIMEOUT` is answered (`500`,
/// kind `crashed`) when the stop ends it (was: its client waited with no answer for as long
/// as the runtime lived; a WebSocket call, through the same `RouteHandle::handle`, had no
/// reply and no close frame).
#[cfg(feature = "http")]
async fn check_an_http_call_a_stop_ends_is_answered(mode: WorkerMode) {
    use micro_framework::http::HttpEntrypoint;
    let config = test_config(&common::unique("ended_http"))
        .with_worker_mode(mode)
        .with_max_workers(1)
        .with_web_server_address("127.0.0.1:0".to_owned())
        .with_shutdown_timeout(std::time::Duration::from_secs(1));
    let routes = vec![Route::new(outlasts_the_stop).entrypoint(HttpEntrypoint::get("/outlasts"))];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().web_address().unwrap();
    let request = tokio::spawn(reqwest::get(format!("http://{address}/outlasts")));
    // the request has reached the route (and its call its worker) before the stop
    let stats = service.route("outlasts_the_stop").unwrap().stats();
    common::wait_until(|| stats.received_count() == 1, "the request").await;
    service.stop().await.unwrap();
    let limit = std::time::Duration::from_secs(30);
    let response = tokio::time::timeout(limit, request).await.expect("answered").unwrap();
    let response = response.expect("an answer, not a dropped connection");
    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "crashed", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("the service stopped before the call ended"), "{body}");
}

#[cfg(feature = "http")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_call_a_process_mode_stop_ends_is_answered() {
    check_an_http_call_a_stop_ends_is_answered(WorkerMode::Process).await;
}

#[cfg(feature = "http")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_call_a_greedy_process_mode_stop_ends_is_answered() {
    check_an_http_call_a_stop_ends_is_answered(WorkerMode::GreedyProcess).await;
}

#[cfg(feature = "http")]
async fn sleeps_on(Payload(_): Payload<serde_json::Value>) -> Result<(), String> {
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// Writes the id of its call to the file the event names, then runs past any time limit.
async fn notes_its_id_then_sleeps(Payload(path): Payload<String>, call: CallContext) {
    std::fs::write(path, &call.call_id).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
}

/// A call killed past `TASK_TIME_LIMIT` is logged by the service, which alone sees it, in the
/// call's span (its route, and the id it has in its worker), and as failed.
#[tokio::test]
async fn a_call_its_worker_process_did_not_end_is_logged_in_its_span() {
    common::logs::capture(tracing::Level::INFO);
    let shop = common::unique("shop");
    let config = test_config(&common::unique("killedlog"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_task_time_limit(Some(std::time::Duration::from_millis(300)));
    let routes =
        vec![Route::new(notes_its_id_then_sleeps).entrypoint(EventListener::new(&shop, "go"))];
    let service = TestService::start(routes, config).await.unwrap();
    let noted = std::env::temp_dir().join(common::unique("call-id"));
    let waiter = service.waiter("notes_its_id_then_sleeps").unwrap();
    service.dispatch(&shop, "go", &noted.display().to_string()).await.unwrap();
    let finished = waiter.wait().await.unwrap();
    service.stop().await.unwrap();
    let call_id = std::fs::read_to_string(&noted).unwrap();
    std::fs::remove_file(&noted).unwrap();
    assert!(format!("{:?}", finished.handled).contains("TimedOut"), "{finished:?}");
    let logs = common::logs::logged();
    let in_span = |text: &str| {
        let route = "route=notes_its_id_then_sleeps";
        let id = format!("call_id={call_id}");
        logs.lines().any(|line| line.contains(text) && line.contains(route) && line.contains(&id))
    };
    assert!(in_span("ran past its time limit"), "{call_id}: {logs}");
    assert!(in_span("call failed") && logs.contains("kind=timed_out"), "{call_id}: {logs}");
}

#[cfg(feature = "metrics")]
fn fails_each_time(Payload(_): Payload<serde_json::Value>) -> Result<(), String> {
    Err("always".into())
}

/// The route's counts after one message through `route` (named `name`) in `mode`.
#[cfg(feature = "metrics")]
async fn counts_after_one_message(mode: WorkerMode, route: Route, name: &str) -> Vec<Option<f64>> {
    let shop = common::unique("shop");
    let config = test_config(&common::unique("counts"))
        .with_worker_mode(mode)
        .with_max_workers(2)
        .with_task_time_limit(Some(std::time::Duration::from_millis(300)));
    let service =
        TestService::start(vec![route.entrypoint(EventListener::new(&shop, "go"))], config)
            .await
            .unwrap();
    service.dispatch(&shop, "go", &serde_json::json!({})).await.unwrap();
    service.wait_for_route(name, 1).await.unwrap();
    let text = service.service().metrics().render();
    service.stop().await.unwrap();
    let labels = format!(r#"{{context="default",route="{name}"}}"#);
    let names = [
        "messages_received_total",
        "tasks_number_total",
        "failed_tasks_total",
        "retries_total",
        "dead_lettered_total",
        "tasks_number",
    ];
    let mut counts: Vec<Option<f64>> = names
        .iter()
        .map(|metric| {
            let prefix = format!("{metric}{labels} ");
            let line = text.lines().find(|line| line.starts_with(&prefix));
            line.and_then(|line| line[prefix.len()..].parse().ok())
        })
        .collect();
    let free =
        text.lines().find_map(|line| line.strip_prefix(r#"available_workers{context="default"} "#));
    counts.push(free.and_then(|free| free.parse().ok()));
    counts
}

/// One message failing each time, retried twice in the worker: one call (a retry in the
/// worker is not received again), failed and dead-lettered, nothing left in flight, every
/// slot free; the same in each mode. (One service per test: process-mode tests run the
/// test's body again in each worker, up to its service's start.)
#[cfg(feature = "metrics")]
async fn in_worker_retries_are_counted(mode: WorkerMode) {
    let delay = std::time::Duration::from_millis(20);
    let retried =
        Route::new(fails_each_time).backoff(micro_framework::retry::BackOff::new(2, delay));
    let counts = counts_after_one_message(mode, retried, "fails_each_time").await;
    let [one, two] = [Some(1.0), Some(2.0)];
    assert_eq!(counts, [one, one, one, two, one, Some(0.0), two], "{mode:?}");
}

/// One message cut short by the time limit: counted as in [`in_worker_retries_are_counted`],
/// with no retry.
#[cfg(feature = "metrics")]
async fn time_limits_are_counted(mode: WorkerMode) {
    let counts = counts_after_one_message(mode, Route::new(sleeps_on), "sleeps_on").await;
    let [one, two] = [Some(1.0), Some(2.0)];
    assert_eq!(counts, [one, one, one, None, one, Some(0.0), two], "{mode:?}");
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn in_worker_retries_are_counted_in_thread_mode() {
    in_worker_retries_are_counted(WorkerMode::Thread).await;
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn in_worker_retries_are_counted_in_process_mode() {
    in_worker_retries_are_counted(WorkerMode::Process).await;
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn time_limits_are_counted_in_thread_mode() {
    time_limits_are_counted(WorkerMode::Thread).await;
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn time_limits_are_counted_in_process_mode() {
    time_limits_are_counted(WorkerMode::Process).await;
}

/// Where the worker that runs the call is: its pid and the path of its socket.
fn whereabouts() -> serde_json::Value {
    serde_json::json!([std::process::id(), std::env::var(WORKER_SOCKET_ENV).unwrap_or_default()])
}

/// A stopped service leaves no worker process (not even a zombie: each is reaped), and no
/// socket directory of a worker (each goes once its worker is connected).
#[tokio::test]
async fn a_process_mode_stop_leaves_no_worker_and_no_socket_behind() {
    let config = test_config(&common::unique("leftovers"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let routes = vec![Route::new(whereabouts).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let (pid, socket): (u32, String) =
        service.hook("whereabouts").unwrap().rpc((), ()).await.unwrap();
    assert_ne!(pid, std::process::id());
    let directory = std::path::Path::new(&socket).parent().unwrap().to_owned();
    service.stop().await.unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "worker {pid} left");
    assert!(!directory.exists(), "{} left", directory.display());
}

/// A process-mode service dropped without `stop` ends its worker processes as a stopped one
/// does: on RabbitMQ (`TEST_AMQP_URI`) its virtual host was deleted at the drop, while the
/// service still stopped, and its workers could live on for 30 s.
#[tokio::test]
async fn a_dropped_process_mode_service_leaves_no_worker_behind() {
    let name = common::unique("dropped");
    let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(2);
    let routes = vec![Route::new(whereabouts).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let _: (u32, String) = service.hook("whereabouts").unwrap().rpc((), ()).await.unwrap();
    assert_eq!(common::workers_of(&name).len(), 2, "its two workers");
    drop(service);
    let gone = async {
        while !common::workers_of(&name).is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let waited = tokio::time::timeout(std::time::Duration::from_secs(10), gone).await;
    assert!(
        waited.is_ok(),
        "{:?} still run 10 s after their service was dropped",
        common::workers_of(&name)
    );
}
