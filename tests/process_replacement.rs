//! Worker processes being replaced: a call that waited for a replacement when the stop gave
//! up goes back as an unstarted message does; workers that die right after their start are
//! a crash loop, paced and given up on as failed starts are.
#![cfg(feature = "process")]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::dependencies::{Dependency, SetupContext};
use micro_framework::prelude::*;
use micro_framework::settle::{HEADER_ERROR, HEADER_ERROR_KIND};
use micro_framework::spawners::process::is_worker_process;
use micro_framework::testing::{test_config, TestService};
use micro_framework::transport::HeaderValue;
use micro_framework::{BoxError, WorkerContext};
use serde_json::{json, Value};

fn aborts(Payload(_): Payload<Value>, _: Dep<()>) {
    std::process::abort();
}

fn records(Payload(event): Payload<Value>, _: Dep<()>) {
    let file = event["file"].as_str().unwrap();
    std::fs::write(file, "ran").unwrap();
}

fn header<'a>(message: &'a micro_framework::Message, key: &str) -> &'a HeaderValue {
    message.properties.headers.get(key).unwrap_or(&HeaderValue::Void)
}

/// A call waiting for the replacement of a worker that died (its slot taken, no worker
/// process yet) when the stop gives up never ran: its message goes back as the stop hands
/// back unstarted ones, a fresh copy the crash-loop guard does not count. It was left to the
/// connection's close, came back redelivered, and was counted as a crash: with
/// `MAX_REDELIVERIES=0` the next start dead-lettered it unrun. On the in-process broker (or
/// `TEST_AMQP_URI`'s virtual host).
#[tokio::test]
async fn a_call_waiting_for_a_replacement_worker_at_the_stop_goes_back_uncounted() {
    check_a_call_waiting_for_a_replacement_at_the_stop(test_config(&common::unique("killed_stop")))
        .await;
}

/// On RabbitMQ, quorum queues (the broker's `x-delivery-count`).
#[tokio::test]
async fn on_rabbitmq_quorum_a_call_waiting_for_a_replacement_worker_at_the_stop_goes_back_uncounted(
) {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let config = common::config(&uri, "killed_stop_q")
        .with_queue_type(micro_framework::config::QueueType::Quorum);
    check_a_call_waiting_for_a_replacement_at_the_stop(config).await;
}

/// The same when the replacement can never start (its set-up fails: a database down): after
/// 5 attempts the service stops by itself, for its supervisor to restart it, and the call
/// that waited for a worker goes back uncounted (a service restarted that often,
/// `MAX_REDELIVERIES`, dead-lettered it as `crashed`, never having run it).
#[tokio::test]
async fn a_call_waiting_for_a_worker_that_can_never_start_goes_back_uncounted() {
    let config = test_config(&common::unique("killed_never"));
    check_a_call_waiting_for_a_replacement(config, "fail").await;
}

async fn check_a_call_waiting_for_a_replacement_at_the_stop(config: Config) {
    check_a_call_waiting_for_a_replacement(config, "slow").await;
}

async fn check_a_call_waiting_for_a_replacement(config: Config, how: &str) {
    let what = match how {
        "fail" => "could not start",
        _ => "was still starting",
    };
    let shop = common::unique("shop");
    let config = config
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_shutdown_timeout(Duration::from_secs(1));
    let armed = common::replacement::armed_file(&config.service_name);
    let keeper = micro_framework::transport::connect(&config).await.unwrap();
    let queue = format!("evt-{shop}-record--{}.records", config.service_name);
    let routes = vec![
        Route::new(aborts)
            .entrypoint(EventListener::new(&shop, "abort"))
            .dependency(common::replacement::SlowStartWhenArmed),
        Route::new(records)
            .entrypoint(EventListener::new(&shop, "record"))
            .dependency(common::replacement::SlowStartWhenArmed),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    // From here on only the test's own process runs: replacements now start slowly.
    std::fs::write(&armed, how).unwrap();
    service.dispatch(&shop, "abort", &json!({})).await.unwrap();
    service.wait_for_route("aborts", 1).await.unwrap();
    #[cfg(feature = "metrics")]
    assert_eq!(replaced(&service, "died_in_call"), 1, "the worker that aborted is counted");
    // the worker died; its replacement takes 5 s to start. This call takes the free slot
    // and waits for the replacement.
    let ran = std::env::temp_dir().join(common::unique("mf-replacement-ran"));
    service.dispatch(&shop, "record", &json!({"file": ran})).await.unwrap();
    let stats = service.route("records").unwrap().stats();
    common::wait_until(|| stats.received_count() == 1, "the call of records").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    match how {
        // the service stops by itself, with the error naming why workers cannot start
        "fail" => {
            let stopped = tokio::time::timeout(Duration::from_secs(30), service.wait_stopped());
            let error = stopped.await.expect("the service stops by itself").unwrap_err();
            assert!(error.to_string().contains("cannot start a worker process"), "{error}");
        }
        _ => service.stop().await.unwrap(),
    }
    let _ = std::fs::remove_file(&armed);
    let never_ran = !ran.exists();
    let _ = std::fs::remove_file(&ran);

    assert!(never_ran, "the call ran before the stop: nothing to check");

    // The next start of the service (here in thread mode, with MAX_REDELIVERIES=0): the
    // message, which never ran, should run now.
    let again = config.clone().with_worker_mode(WorkerMode::Thread).with_max_redeliveries(0);
    let routes = vec![Route::new(records)
        .entrypoint(EventListener::new(&shop, "record"))
        .dependency(common::replacement::SlowStartWhenArmed)];
    let service = TestService::start(routes, again).await.unwrap();
    let dlq = format!("{queue}.dlq");
    let since = std::time::Instant::now();
    let mut dead = Vec::new();
    while !ran.exists() && dead.is_empty() && since.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        dead = micro_framework::testing::take_messages(keeper.as_ref(), &dlq).await.unwrap();
    }
    let ran_now = ran.exists();
    let _ = std::fs::remove_file(&ran);
    service.stop().await.unwrap();
    keeper.close().await;
    common::cleanup(&config.amqp_uri, &[config.service_name.clone(), shop]).await;
    let described: Vec<_> = dead
        .iter()
        .map(|m| (header(m, HEADER_ERROR_KIND).clone(), header(m, HEADER_ERROR).clone()))
        .collect();
    assert!(
        ran_now && dead.is_empty(),
        "the message of a call that never reached a worker process (its replacement {what} \
         when the service stopped) came back counted as a crash: with MAX_REDELIVERIES=0 the next \
         start dead-lettered it without running it: ran {ran_now}, dead letters {described:?}"
    );
}

/// In a worker process, its set-up starts a thread that aborts the worker 300 ms later (a
/// background task of the dependency that dies), once the file `MF_TEST_DIE_SOON`
/// names exists.
struct DiesSoonAfterStart;

#[micro_framework::async_trait]
impl Dependency for DiesSoonAfterStart {
    type Output = ();

    async fn setup(&self, _: &SetupContext) -> Result<(), BoxError> {
        let armed = std::env::var_os("MF_TEST_DIE_SOON")
            .is_some_and(|file| std::path::Path::new(&file).exists());
        if is_worker_process() && armed {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                std::process::abort();
            });
        }
        Ok(())
    }

    async fn get(&self, _: &WorkerContext) -> Result<(), BoxError> {
        Ok(())
    }
}

fn pid(_: Dep<()>) -> u32 {
    std::process::id()
}

/// Workers that die 300 ms after each start, idle, are a crash loop as much as workers
/// that cannot start: each is replaced after a second, and 5 in a row stop the service with
/// an error for its supervisor. They were restarted at once, 52 in 8 s, for ever, while the
/// service looked ready.
#[tokio::test]
async fn workers_dying_right_after_their_start_stop_the_service() {
    let armed = std::env::temp_dir().join(common::unique("mf-replacement-armed"));
    if !is_worker_process() {
        std::env::set_var("MF_TEST_DIE_SOON", &armed);
    }
    let name = common::unique("dying_loop");
    let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(2);
    let routes =
        vec![Route::new(pid).entrypoint(RPCListener::new()).dependency(DiesSoonAfterStart)];
    let service = TestService::start(routes, config).await.unwrap();
    // From here on only the test's own process runs: arm the workers started from now on.
    std::fs::write(&armed, b"").unwrap();
    // the first two workers were not armed: have them replaced by killing them
    for worker in common::workers_of(&name) {
        let _ = std::process::Command::new("kill").args(["-KILL", &worker.to_string()]).status();
    }
    let mut seen = HashSet::new();
    let since = Instant::now();
    while service.is_ready() {
        seen.extend(common::workers_of(&name));
        assert!(since.elapsed() < Duration::from_secs(30), "{} workers, still serving", seen.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&armed);
    let stopped = tokio::time::timeout(Duration::from_secs(30), service.wait_stopped());
    let stopped = stopped.await.expect("the service stops by itself");
    let error = stopped.expect_err("the service stops with an error");
    assert!(error.to_string().contains("worker processes die right after they start"), "{error}");
    // paced at a second: the two killed, then at most a few more
    assert!(seen.len() <= 8, "{} worker processes started", seen.len());
}

/// How many worker processes of `service` were replaced for `reason`, as its metrics say.
#[cfg(feature = "metrics")]
fn replaced(service: &TestService, reason: &str) -> u64 {
    let metrics = service.service().metrics().render();
    let line = metrics.lines().find(|line| {
        line.starts_with("worker_processes_replaced_total{")
            && line.contains(&format!("reason=\"{reason}\""))
    });
    line.and_then(|line| line.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

fn own_pid() -> u32 {
    std::process::id()
}

/// Idle workers SIGKILLed soon after their start (the OOM killer at a memory spike, or an
/// operator) make the pool give up after 5: the warnings and the error the service stops
/// with say how they died, so that an OOM kill can be told from a set-up that dooms them
/// (they said neither).
#[tokio::test]
async fn the_error_of_a_pool_whose_idle_workers_keep_dying_says_how_they_died() {
    common::logs::capture(tracing::Level::WARN);
    let name = common::unique("oom_loop");
    let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(1);
    let routes = vec![Route::new(own_pid).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let mut killed = HashSet::new();
    let since = Instant::now();
    while service.is_ready() {
        for worker in common::workers_of(&name) {
            if killed.insert(worker) {
                let pid = worker.to_string();
                let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(40),
            "{} killed, still serving",
            killed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    #[cfg(feature = "metrics")]
    let died_idle = replaced(&service, "died_idle");
    let stopped = tokio::time::timeout(Duration::from_secs(30), service.wait_stopped());
    let error = stopped.await.expect("the service stops by itself").expect_err("with an error");
    let error = error.to_string();
    assert!(error.contains("the last: signal: 9 (SIGKILL)"), "{error}");
    // each death counted, also where no call failed
    #[cfg(feature = "metrics")]
    assert!(died_idle >= 5, "{died_idle} counted of {} killed", killed.len());
    let logs = common::logs::logged();
    // this test's workers (the other tests of the binary log beside it)
    let ours = |line: &&str| killed.iter().any(|pid| line.contains(&format!("process {pid} ")));
    let deaths: Vec<&str> =
        logs.lines().filter(|line| line.contains("died while idle")).filter(ours).collect();
    assert!(deaths.len() >= 5, "{logs}");
    assert!(deaths.iter().all(|line| line.contains("(signal: 9 (SIGKILL))")), "{deaths:#?}");
}

#[cfg(feature = "metrics")]
fn quick() -> &'static str {
    "done"
}

#[cfg(feature = "metrics")]
fn stuck() -> &'static str {
    std::thread::sleep(Duration::from_secs(30));
    "late"
}

/// `worker_processes` counts the worker processes running: one killed is missing from it
/// until its replacement runs (a slot of `available_workers` shows free all along: slots are
/// not processes).
#[cfg(feature = "metrics")]
#[tokio::test]
async fn the_worker_processes_running_are_counted_while_one_is_replaced() {
    let name = common::unique("processes_running");
    let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(2);
    let routes = vec![Route::new(own_pid).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let running = || {
        let metrics = service.service().metrics().render();
        let line = metrics.lines().find(|line| line.starts_with("worker_processes{"));
        line.and_then(|line| line.rsplit(' ').next()?.parse::<u32>().ok())
    };
    assert_eq!(running(), Some(2));
    // every reason's count is there at 0 from the start, where an alert's `increase()` sees
    // the first replacement
    let metrics = service.service().metrics().render();
    let reasons = ["died_idle", "died_in_call", "time_limit", "recycled", "call_dropped"];
    for reason in reasons {
        let zero =
            format!("worker_processes_replaced_total{{context=\"default\",reason=\"{reason}\"}} 0");
        assert!(metrics.lines().any(|line| line == zero), "{zero}: {metrics}");
    }
    let workers = common::workers_of(&name);
    assert_eq!(workers.len(), 2, "{workers:?}");
    let pid = workers[0].to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    // killed within 10 s of its start, it is replaced after a pause of a second
    common::wait_until(|| running() == Some(1), "the killed worker to be counted out").await;
    common::wait_until(|| running() == Some(2), "its replacement to be counted").await;
    service.stop().await.unwrap();
}

/// A worker recycled after `MAX_TASKS_PER_CHILD` calls, and one killed with its call past
/// `TASK_TIME_LIMIT`, are counted in `worker_processes_replaced_total` by reason.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn replaced_workers_are_counted_by_reason() {
    use micro_framework::amqp::rpc::Client;
    let config = test_config(&common::unique("replaced"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_max_tasks_per_child(Some(1))
        .with_task_time_limit(Some(Duration::from_secs(1)));
    let name = config.service_name.clone();
    let routes = vec![
        Route::new(quick).entrypoint(RPCListener::new()),
        Route::new(stuck).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let client = Client::connect(&config).await.unwrap();
    assert_eq!(client.call::<String>(&name, "quick", (), ()).await.unwrap(), "done");
    assert!(client.call::<String>(&name, "stuck", (), ()).await.is_err(), "past its limit");
    client.close().await;
    let (recycled, timed_out) = (replaced(&service, "recycled"), replaced(&service, "time_limit"));
    service.stop().await.unwrap();
    assert_eq!((recycled, timed_out), (1, 1));
}

/// The worker processes on the status page and in `worker_processes`, through a call, a death
/// during a call and the stop.
#[cfg(feature = "metrics")]
mod processes_counted {
    use super::common;

    use std::time::Duration;

    use common::{http_get, MetricsOnAnyPort};
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::amqp::rpc::Client;
    use micro_framework::prelude::*;
    use micro_framework::testing::{test_config, TestService};
    use serde_json::Value;

    /// Runs in a worker process for a second and a half.
    fn slow() -> u32 {
        std::thread::sleep(Duration::from_millis(1500));
        1
    }

    async fn pool(address: std::net::SocketAddr) -> Value {
        let (code, json) =
            tokio::task::spawn_blocking(move || http_get(address, "/status.json")).await.unwrap();
        assert_eq!(code, 200, "{json}");
        let status: Value = serde_json::from_str(&json).unwrap();
        status["pools"][0].clone()
    }

    fn gauge(metrics: &micro_framework::metrics::Metrics) -> Option<u64> {
        let text = metrics.render();
        let line = text.lines().find(|line| line.starts_with("worker_processes{"))?;
        line.rsplit(' ').next()?.parse().ok()
    }

    /// The status page's pool: idle, 0 busy, 2 free, 2 processes; during a call, 1 busy, 1 free,
    /// and still 2 processes (the one lent to the call runs); after the stop `worker_processes`
    /// is 0 (the stop ends every worker).
    #[tokio::test]
    async fn the_status_pool_counts_busy_slots_and_running_processes_through_a_call_and_the_stop() {
        let name = common::unique("pool_status");
        let config = test_config(&name)
            .with_worker_mode(WorkerMode::Process)
            .with_max_workers(2)
            .with_metrics_on_any_port();
        let routes = vec![Route::new(slow).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let address = service.service().metrics_address().expect("the metrics server listens");
        let metrics = service.service().metrics().clone();

        let idle = pool(address).await;
        assert_eq!(idle["max_workers"], 2, "{idle}");
        assert_eq!(
            (idle["busy"].as_u64(), idle["free"].as_u64()),
            (Some(0), Some(2)),
            "idle: {idle}"
        );
        assert_eq!(idle["processes"].as_u64(), Some(2), "idle: the processes running: {idle}");

        let client = Client::connect(&config).await.unwrap();
        let call = {
            let name = config.service_name.clone();
            tokio::spawn(async move {
                let answer = client.call::<u32>(&name, "slow", (), ()).await;
                client.close().await;
                answer
            })
        };
        let mut during = Value::Null;
        for _ in 0..100 {
            during = pool(address).await;
            if during["busy"].as_u64() == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            (during["busy"].as_u64(), during["free"].as_u64()),
            (Some(1), Some(1)),
            "during a call: {during}"
        );
        assert_eq!(
            during["processes"].as_u64(),
            Some(2),
            "during a call the worker lent to it runs too: {during}"
        );
        assert_eq!(gauge(&metrics), Some(2), "worker_processes during a call");
        assert_eq!(call.await.unwrap().unwrap(), 1);

        service.stop().await.unwrap();
        assert_eq!(
            gauge(&metrics),
            Some(0),
            "worker_processes after the stop, which ended every worker process"
        );
    }

    /// Writes its worker process's pid into `file`, then runs for three seconds.
    fn slow_pid(
        micro_framework::amqp::rpc::Args((file,)): micro_framework::amqp::rpc::Args<(String,)>,
    ) -> u32 {
        std::fs::write(&file, std::process::id().to_string()).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        std::process::id()
    }

    /// An idle worker killed while the other runs a call leaves 1 running (the lent one), not 0,
    /// until its replacement starts (a second later: it died before any call, within 10 s of its
    /// start).
    #[tokio::test]
    async fn an_idle_worker_killed_during_a_call_leaves_the_lent_one_counted() {
        let name = common::unique("pool_lent");
        let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(2);
        let routes = vec![Route::new(slow_pid).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let metrics = service.service().metrics().clone();
        assert_eq!(gauge(&metrics), Some(2));

        let file = std::env::temp_dir().join(format!("{name}.pid"));
        let client = Client::connect(&config).await.unwrap();
        let call = {
            let (name, file) = (config.service_name.clone(), file.to_string_lossy().into_owned());
            tokio::spawn(async move {
                let answer = client.call::<u32>(&name, "slow_pid", (file,), ()).await;
                client.close().await;
                answer
            })
        };
        common::wait_until(
            || std::fs::read_to_string(&file).is_ok_and(|pid| !pid.is_empty()),
            "the call to start",
        )
        .await;
        let busy: u32 = std::fs::read_to_string(&file).unwrap().parse().unwrap();
        let workers = common::workers_of(&name);
        let idle = workers.iter().find(|pid| **pid != busy).expect("an idle worker").to_string();
        let _ = std::process::Command::new("kill").args(["-KILL", &idle]).status();
        common::wait_until(|| gauge(&metrics) != Some(2), "the killed worker to be counted out")
            .await;
        assert_eq!(
            gauge(&metrics),
            Some(1),
            "worker_processes after the idle worker died while the other runs a call: the lent \
             worker still runs"
        );
        assert_eq!(call.await.unwrap().unwrap(), busy);
        let _ = std::fs::remove_file(&file);
        service.stop().await.unwrap();
    }

    fn quick() -> u32 {
        7
    }

    /// A worker recycled after `MAX_TASKS_PER_CHILD` calls is no longer counted once its call is
    /// taken back, until its replacement starts: with one worker, `worker_processes` reads 0 for
    /// the moment the replacement takes to start (it would go on counting the recycled worker for
    /// as long as a replacement could not start).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recycled_worker_is_counted_out_until_its_replacement_starts() {
        let name = common::unique("pool_recycled");
        let config = test_config(&name)
            .with_worker_mode(WorkerMode::Process)
            .with_max_workers(1)
            .with_max_tasks_per_child(Some(1));
        let routes = vec![Route::new(quick).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let metrics = service.service().metrics().clone();
        assert_eq!(gauge(&metrics), Some(1));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (metrics, stop) = (metrics.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    seen.extend(gauge(&metrics));
                    std::thread::sleep(Duration::from_micros(500));
                }
                seen
            })
        };
        let client = Client::connect(&config).await.unwrap();
        assert_eq!(client.call::<u32>(&config.service_name, "quick", (), ()).await.unwrap(), 7);
        client.close().await;
        common::wait_until(
            || metrics.render().contains("reason=\"recycled\"} 1"),
            "the worker to be recycled",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = watcher.await.unwrap();
        assert!(
            seen.contains(&0),
            "worker_processes never read 0 between the recycled worker's call and its \
             replacement's start: {seen:?}"
        );
        assert_eq!(gauge(&metrics), Some(1), "the replacement is counted");
        service.stop().await.unwrap();
    }
}
