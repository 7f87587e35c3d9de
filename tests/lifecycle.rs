//! Lifecycle of the public API: what a call of a route alone and a dropped service handle
//! leave behind, dependencies that panic in their set-up or teardown, timers whose run
//! outlasts the stop, and blocking calls from sync targets under a plain `#[tokio::test]`.

mod common;

use common::journaled::{Fault, Journal, Journaled};
use common::{broker_uris, config};
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, RpcError};
use micro_framework::prelude::*;
use micro_framework::testing::{worker, TestService};
use micro_framework::transport::TransportError;
use micro_framework::Message;
use serde::Deserialize;

/// The `reply_to` of the request: the caller's reply queue's routing key.
fn reply_to(message: Message) -> Option<String> {
    message.properties.reply_to
}

#[derive(Deserialize)]
struct To {
    service: String,
}

/// Asks `service` for the routing key of its caller's reply queue.
async fn ask_reply_to(Args(to): Args<To>, rpc: RpcProxy) -> Result<String, RpcError> {
    rpc.call(&to.service, "reply_to", (), ()).await
}

#[tokio::test]
async fn a_call_of_a_route_alone_deletes_the_reply_queue_its_target_used() {
    for uri in broker_uris() {
        let config = config(&uri, "answers");
        let name = config.service_name.clone();
        let routes = vec![Route::new(reply_to).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let caller = common::config(&uri, "caller");
        let caller_name = caller.service_name.clone();
        let route = Route::new(ask_reply_to).entrypoint(RPCListener::new());
        let id: String = worker(route)
            .config(caller)
            .rpc((), serde_json::json!({"service": name}))
            .await
            .unwrap();
        let queue = format!("rpc.reply-{caller_name}-{id}");
        let left = service.transport().queue_info(&queue).await;
        assert!(matches!(left, Err(TransportError::NotFound(_))), "{queue}: {left:?}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &[name, caller_name]).await;
    }
}

fn on_paid() {}

#[tokio::test]
async fn a_test_service_dropped_without_stop_stops_consuming() {
    for uri in broker_uris() {
        let config = config(&uri, "orders");
        let name = config.service_name.clone();
        let shop = common::unique("shop");
        let routes = vec![Route::new(on_paid).entrypoint(EventListener::new(&shop, "paid"))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let queue = format!("evt-{shop}-paid--{name}.on_paid");
        let consumers =
            || async { service.transport().queue_info(&queue).await.unwrap().consumer_count };
        common::wait_until_async(|| async { consumers().await == 1 }).await;
        drop(service);
        let observer = micro_framework::transport::connect(&config).await.unwrap();
        common::wait_until_async(|| async {
            observer.queue_info(&queue).await.is_ok_and(|info| info.consumer_count == 0)
        })
        .await;
        observer.close().await;
        common::cleanup(&uri, &[name, shop]).await;
    }
}

/// A route whose two dependencies fail at `first` and `second`.
fn fragile_route(journal: &Journal, first: Fault, second: Fault) -> Route {
    Route::new(on_paid)
        .entrypoint(EventListener::new("shop", "paid"))
        .dependency(Journaled::new("first", journal, 1u8).failing(first))
        .dependency(Journaled::new("second", journal, 2u16).failing(second))
}

#[tokio::test]
async fn a_dependency_panicking_in_teardown_stops_the_service_all_the_same() {
    let journal = Journal::default();
    let config = micro_framework::testing::memory_test_config(&common::unique("teardown"));
    let route = fragile_route(&journal, Fault::TeardownPanics, Fault::None);
    let service = TestService::start(vec![route], config).await.unwrap();
    let transport = service.transport().clone();
    service.stop().await.unwrap();
    let seen = journal.lock().unwrap().clone();
    assert_eq!(seen, ["setup first", "setup second", "teardown second", "teardown first"]);
    assert!(!transport.is_connected(), "the service's connection is left open");
}

#[tokio::test]
async fn a_dependency_panicking_in_setup_fails_the_start_and_undoes_it() {
    let journal = Journal::default();
    let config = micro_framework::testing::memory_test_config(&common::unique("setup"));
    let route = fragile_route(&journal, Fault::None, Fault::SetupPanics);
    let error = TestService::start(vec![route], config).await.unwrap_err();
    assert!(format!("{error:?}").contains("second cannot set up"), "{error:?}");
    let seen = journal.lock().unwrap().clone();
    assert_eq!(seen, ["setup first", "setup second", "teardown first"]);
}

/// A timer's run that never ends by itself.
async fn stuck(Dep(started): Dep<std::sync::Arc<tokio::sync::Notify>>) {
    started.notify_one();
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_timer_run_past_shutdown_timeout_does_not_hold_up_the_stop() {
    let config = micro_framework::testing::memory_test_config(&common::unique("ticks"))
        .with_shutdown_timeout(std::time::Duration::from_millis(200));
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let route = Route::new(stuck)
        .entrypoint(micro_framework::entrypoints::TimeEntrypoint::every(
            std::time::Duration::from_millis(10),
        ))
        .dependency(micro_framework::dependencies::Shared(started.clone()));
    let service = TestService::start(vec![route], config).await.unwrap();
    started.notified().await;
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), service.stop()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "the stop waited for the timer's run: {stopped:?}");
}

fn tick() {}

#[tokio::test]
async fn a_timer_waiting_for_a_greedy_pool_s_slot_does_not_hold_up_the_stop() {
    // the pool's one slot is held by a run that never ends: the timer's next tick waits for it
    let config = micro_framework::testing::memory_test_config(&common::unique("greedy"))
        .with_shutdown_timeout(std::time::Duration::from_millis(200))
        .with_max_workers(1)
        .with_worker_mode(micro_framework::config::WorkerMode::GreedyThread);
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let every = |millis| {
        micro_framework::entrypoints::TimeEntrypoint::every(std::time::Duration::from_millis(
            millis,
        ))
    };
    let routes = vec![
        Route::new(stuck)
            .entrypoint(every(10))
            .dependency(micro_framework::dependencies::Shared(started.clone())),
        Route::new(tick).entrypoint(every(10)),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    started.notified().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), service.stop()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "the stop waited for a worker slot: {stopped:?}");
}

fn add(Args((a, b)): Args<(i64, i64)>) -> i64 {
    a + b
}

/// A sync target that calls and dispatches, waiting on its thread.
fn add_and_announce(
    Payload(to): Payload<To>,
    rpc: RpcProxy,
    producer: micro_framework::amqp::dependencies::Producer,
) -> Result<i64, micro_framework::BoxError> {
    let sum: i64 = rpc.service(&to.service).call_blocking("add", (20, 22), ())?;
    producer.dispatch_blocking("added", &sum)?;
    Ok(sum)
}

// a plain #[tokio::test]: a current-thread runtime, where sync targets run on its blocking pool
#[tokio::test]
async fn a_sync_target_calls_and_dispatches_blocking_under_a_plain_tokio_test() {
    let config = micro_framework::testing::memory_test_config(&common::unique("blocking"));
    let name = config.service_name.clone();
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(add_and_announce).entrypoint(EventListener::new("shop", "paid")),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("add_and_announce").unwrap();
    let sum = hook.event::<i64>(&serde_json::json!({"service": name})).await;
    assert_eq!(sum.map_err(|error| error.to_string()), Ok(42));
    service.stop().await.unwrap();
}

fn quiet() {}

/// `Runner::run` on a program's own runtime (`#[tokio::main]`) logs as `Runner::start` does
/// (was: nothing, and `LOG_FORMAT` did nothing). The test runs itself again as that program,
/// which stops on the SIGINT it sends itself.
#[test]
fn runner_run_logs_as_runner_start_does() {
    const AS_PROGRAM: &str = "LIFECYCLE_RUN_LOGS_PROGRAM";
    if std::env::var_os(AS_PROGRAM).is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let config = Config::new(common::unique("run_logs"))
                .with_amqp_uri(format!("memory://{}", common::unique("run_logs")));
            let routes = vec![Route::new(quiet)
                .name("quiet_route")
                .entrypoint(EventListener::new(common::unique("src"), "e"))];
            tokio::spawn(async {
                // a signal during the start stops the service once started
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let pid = std::process::id().to_string();
                std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
            });
            Runner::new(routes, config).run().await.unwrap();
        });
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "runner_run_logs_as_runner_start_does", "--nocapture"])
        .env(AS_PROGRAM, "1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("route ready: "), "{stderr}");
    assert!(stderr.contains("quiet_route"), "{stderr}");
    assert!(stderr.contains("service stopped"), "{stderr}");
}

/// `Runner::start` inside a tokio runtime (a `fn main` moved under `#[tokio::main]`) returns
/// an error that says to await `Runner::run` there, where tokio panicked with "Cannot start a
/// runtime from within a runtime", which names neither.
#[tokio::test]
async fn runner_start_inside_a_runtime_says_to_await_runner_run() {
    let config = Config::new(common::unique("in_runtime"))
        .with_amqp_uri(format!("memory://{}", common::unique("in_runtime")));
    let routes = vec![Route::new(quiet).entrypoint(EventListener::new("src", "e"))];
    let error = Runner::new(routes, config).start().unwrap_err();
    assert!(error.to_string().contains("use `Runner::run(...).await` there"), "{error}");
}

/// Where tokio does start a runtime inside another, `Runner::start` runs: on a blocking
/// thread of a runtime (`spawn_blocking`), and on a thread that only entered one
/// (`Runtime::enter`). The test runs itself again as that program, with `MF_PRINT_TOPOLOGY=1`
/// (its start prints the topology and returns without serving).
#[test]
fn runner_start_runs_where_tokio_starts_a_runtime_inside_another() {
    const AS_PROGRAM: &str = "LIFECYCLE_START_ELSEWHERE_PROGRAM";
    let runner = || {
        let config = Config::new(common::unique("elsewhere"))
            .with_amqp_uri(format!("memory://{}", common::unique("elsewhere")));
        Runner::new(vec![Route::new(quiet).entrypoint(EventListener::new("src", "e"))], config)
    };
    if std::env::var_os(AS_PROGRAM).is_some() {
        let other = tokio::runtime::Runtime::new().unwrap();
        let blocking =
            other.block_on(async { tokio::task::spawn_blocking(move || runner().start()).await });
        blocking.unwrap().expect("start on a blocking thread");
        let _entered = other.enter();
        runner().start().expect("start under Runtime::enter");
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "runner_start_runs_where_tokio_starts_a_runtime_inside_another"])
        .args(["--nocapture"])
        .env(AS_PROGRAM, "1")
        .env("MF_PRINT_TOPOLOGY", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let marker = micro_framework::transport::topology::TOPOLOGY_MARKER;
    assert_eq!(stdout.matches(marker).count(), 2, "{stdout}");
}
