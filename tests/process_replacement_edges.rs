//! The edges of the process modes' worker replacement: early deaths are counted "in a row"
//! only (an answered call between them starts the count again), the fifth gives up, each is
//! replaced after a second; an RPC request (either wire) or an event that waited for a
//! replacement worker when the stop gave up goes back as it came, to its own queue, and is
//! answered by the next start; a call that has its worker is no longer "waiting to start".
#![cfg(feature = "process")]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::config::Protocol;
use micro_framework::prelude::*;
use micro_framework::testing::{test_config, TestService};

fn pid() -> u32 {
    std::process::id()
}

/// `count` live workers of `service` none of which is in `killed`, once they have had the
/// time to be ready (idle in the pool: a kill then is a death while idle, not a failed start).
async fn fresh_workers(service: &str, killed: &HashSet<u32>, count: usize) -> Vec<u32> {
    fresh_workers_since(service, killed, count).await.0
}

/// [`fresh_workers`], and how long after the call the last of them was first seen.
async fn fresh_workers_since(
    service: &str,
    killed: &HashSet<u32>,
    count: usize,
) -> (Vec<u32>, Duration) {
    let since = std::time::Instant::now();
    loop {
        let fresh: Vec<u32> =
            common::workers_of(service).into_iter().filter(|w| !killed.contains(w)).collect();
        if fresh.len() >= count {
            let seen = since.elapsed();
            tokio::time::sleep(Duration::from_secs(2)).await;
            return (fresh, seen);
        }
        assert!(since.elapsed() < Duration::from_secs(20), "no {count} fresh workers: {fresh:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill(worker: u32) {
    let _ = std::process::Command::new("kill").args(["-KILL", &worker.to_string()]).status();
}

/// Workers killed while idle within 10 s of their start, before any call, are "early
/// deaths"; 5 *in a row*, with no call answered between, stop the service (a crash loop).
/// Here 4 such deaths, then a call answered, then one more: the answered call ends the row,
/// so the service keeps serving. (Without the reset of the count when a call is answered, the
/// fifth death ever stops the service: sporadic idle deaths of fresh workers, an OOM killer's
/// say, add up over days until a healthy service stops by itself.)
#[tokio::test]
async fn an_answered_call_between_early_deaths_keeps_the_service_serving() {
    let name = common::unique("early_reset");
    let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(2);
    let routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let mut killed = HashSet::new();
    // twice both idle workers, never called: 4 early deaths in a row
    for _ in 0..2 {
        for worker in fresh_workers(&name, &killed, 2).await {
            kill(worker);
            killed.insert(worker);
        }
    }
    let fresh = fresh_workers(&name, &killed, 2).await;
    assert!(service.is_ready(), "4 early deaths do not stop the service");
    // a call answered: the deaths so far are no longer in a row
    let client = Client::connect(&config).await.unwrap();
    let answered: u32 = client.call(&name, "pid", (), ()).await.unwrap();
    // the other worker, never called, dies idle: the first early death of a new row
    let other = fresh.into_iter().find(|worker| *worker != answered).expect("an uncalled worker");
    kill(other);
    killed.insert(other);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = service.is_ready();
    let again =
        tokio::time::timeout(Duration::from_secs(10), client.call::<u32>(&name, "pid", (), ()))
            .await;
    client.close().await;
    let stopped = service.stop().await;
    assert!(
        ready,
        "the service stopped by itself after 5 early deaths, though a call was answered between \
         the 4th and the 5th: {stopped:?}"
    );
    assert!(matches!(again, Ok(Ok(_))), "{again:?}");
}

/// Each worker that dies early (idle, before any call, within 10 s of its start) is replaced
/// after a second, not at once; and the fifth such death in a row, with no call answered
/// between, stops the service with an error for its supervisor (as the docs say: "5 in a row
/// stop the service").
#[tokio::test]
async fn the_fifth_early_death_in_a_row_stops_the_service_and_each_is_replaced_after_a_second() {
    let name = common::unique("early_five");
    let config = test_config(&name).with_worker_mode(WorkerMode::Process).with_max_workers(2);
    let routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let mut killed = HashSet::new();
    let mut replaced_after = Vec::new();
    // twice both idle workers, never called: 4 early deaths in a row
    let mut fresh = fresh_workers(&name, &killed, 2).await;
    for _ in 0..2 {
        for worker in fresh {
            kill(worker);
            killed.insert(worker);
        }
        let (next, after) = fresh_workers_since(&name, &killed, 2).await;
        (fresh, replaced_after) = (next, [replaced_after, vec![after]].concat());
    }
    let ready_after_four = service.is_ready();
    // a fifth, with no call answered since the first
    kill(fresh[0]);
    let since = std::time::Instant::now();
    while service.is_ready() && since.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still_ready = service.is_ready();
    let stopped = match still_ready {
        true => service.stop().await,
        false => tokio::time::timeout(Duration::from_secs(30), service.wait_stopped())
            .await
            .expect("the service stops by itself"),
    };
    assert!(ready_after_four, "4 early deaths stopped the service: {stopped:?}");
    assert!(!still_ready, "5 early deaths in a row did not stop the service");
    let error = stopped.expect_err("the service stops with an error");
    assert!(error.to_string().contains("(5 in a row"), "{error}");
    for after in replaced_after {
        assert!(after >= Duration::from_millis(800), "an early death replaced after {after:?}");
    }
}

fn aborts(Args(()): Args<()>, _: Dep<()>) {
    std::process::abort();
}

fn records(Args((file,)): Args<(String,)>, _: Dep<()>) -> String {
    std::fs::write(&file, "ran").unwrap();
    format!("ran {file}")
}

/// Under `PROTOCOL=micro_framework`, an RPC request whose call waits for a replacement worker
/// process (the only one died) when the stop gives up never ran: it goes back to its queue as
/// it came, and the next start of the service answers the caller still waiting. Its body had
/// been replaced by the route's `{"args", "kwargs"}` form, which is no micro-framework request
/// (no `command`): handed back so, the next start could not read it, and the caller never got
/// its answer.
#[tokio::test]
async fn a_micro_framework_rpc_request_waiting_for_a_replacement_at_the_stop_is_answered_later() {
    check_an_rpc_request_waiting_for_a_replacement(Protocol::MicroFramework).await;
}

/// The same in Nameko's wire format.
#[tokio::test]
async fn a_nameko_rpc_request_waiting_for_a_replacement_at_the_stop_is_answered_later() {
    check_an_rpc_request_waiting_for_a_replacement(Protocol::Nameko).await;
}

async fn check_an_rpc_request_waiting_for_a_replacement(protocol: Protocol) {
    let config = test_config(&common::unique("rpc_unstarted"))
        .with_protocol(protocol)
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_shutdown_timeout(Duration::from_secs(1));
    let name = config.service_name.clone();
    let armed = common::replacement::armed_file(&name);
    let routes = vec![
        Route::new(aborts)
            .entrypoint(RPCListener::new())
            .dependency(common::replacement::SlowStartWhenArmed),
        Route::new(records)
            .entrypoint(RPCListener::new())
            .dependency(common::replacement::SlowStartWhenArmed),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    // From here on only the test's own process runs: replacements now start slowly.
    std::fs::write(&armed, "slow").unwrap();
    let client = std::sync::Arc::new(Client::connect(&config).await.unwrap());
    let aborting = tokio::spawn({
        let (client, name) = (client.clone(), name.clone());
        async move { client.call::<serde_json::Value>(&name, "aborts", (), ()).await }
    });
    service.wait_for_route("aborts", 1).await.unwrap();
    // the worker died; its replacement takes 5 s to start. This call takes the free slot and
    // waits for the replacement.
    let ran = std::env::temp_dir().join(common::unique("mf-edges-ran"));
    let file = ran.to_string_lossy().into_owned();
    let recording = tokio::spawn({
        let (client, name, file) = (client.clone(), name.clone(), file.clone());
        async move {
            let call = client.call::<String>(&name, "records", (file,), ());
            tokio::time::timeout(Duration::from_secs(30), call).await
        }
    });
    let stats = service.route("records").unwrap().stats();
    common::wait_until(|| stats.received_count() == 1, "the call of records").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    #[cfg(feature = "metrics")]
    let metrics = service.service().metrics().clone();
    service.stop().await.unwrap();
    let _ = std::fs::remove_file(&armed);
    aborting.abort();
    // a call that never started is no failed call in the metrics
    #[cfg(feature = "metrics")]
    {
        let metrics = metrics.render();
        let failed = metrics.lines().find(|line| {
            line.starts_with("failed_tasks_total{") && line.contains("route=\"records\"")
        });
        let failed = failed.and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok());
        assert_eq!(failed.unwrap_or(0), 0, "the unstarted call counted as failed: {metrics}");
    }
    assert!(!ran.exists(), "the call ran before the stop: nothing to check");

    // the next start (thread mode) answers the request that never ran
    let again = config.clone().with_worker_mode(WorkerMode::Thread).with_max_redeliveries(0);
    let routes = vec![Route::new(records)
        .entrypoint(RPCListener::new())
        .dependency(common::replacement::SlowStartWhenArmed)];
    let service = TestService::start(routes, again).await.unwrap();
    let answer = recording.await.unwrap();
    let ran_now = ran.exists();
    let _ = std::fs::remove_file(&ran);
    service.stop().await.unwrap();
    assert!(
        matches!(&answer, Ok(Ok(said)) if *said == format!("ran {file}")) && ran_now,
        "the request that waited for a worker process at the stop was not answered by the next \
         start: {answer:?}, ran {ran_now}"
    );
}

fn record_event(Payload(event): Payload<serde_json::Value>, _: Dep<()>) {
    let file = event["file"].as_str().unwrap();
    std::fs::write(file, "ran").unwrap();
}

fn abort_event(Payload(_): Payload<serde_json::Value>, _: Dep<()>) {
    std::process::abort();
}

/// Events the other subscriber saw.
static SEEN_BY_OTHER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn other_subscriber(Payload(_): Payload<serde_json::Value>) {
    SEEN_BY_OTHER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// An event whose call waits for a replacement worker process when the stop gives up goes
/// back to *its* queue only, straight: another service subscribed to the same event already
/// had its copy and gets no second one. (Handed back through the event's exchange with its
/// routing key, as an RPC request is, it reached every queue bound to the event.)
#[tokio::test]
async fn an_unstarted_event_handed_back_at_the_stop_reaches_no_other_subscriber() {
    let shop = common::unique("shop");
    let config = test_config(&common::unique("evt_unstarted"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_shutdown_timeout(Duration::from_secs(1));
    let armed = common::replacement::armed_file(&config.service_name);
    let routes = vec![
        Route::new(abort_event)
            .entrypoint(micro_framework::amqp::entrypoints::EventListener::new(&shop, "abort"))
            .dependency(common::replacement::SlowStartWhenArmed),
        Route::new(record_event)
            .entrypoint(micro_framework::amqp::entrypoints::EventListener::new(&shop, "record"))
            .dependency(common::replacement::SlowStartWhenArmed),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    // From here on only the test's own process runs.
    let other = config
        .clone()
        .with_service_name(common::unique("other_subscriber"))
        .with_worker_mode(WorkerMode::Thread);
    let other_routes = vec![Route::new(other_subscriber)
        .entrypoint(micro_framework::amqp::entrypoints::EventListener::new(&shop, "record"))];
    let other = TestService::start(other_routes, other).await.unwrap();
    std::fs::write(&armed, "slow").unwrap();
    service.dispatch(&shop, "abort", &serde_json::json!({})).await.unwrap();
    service.wait_for_route("abort_event", 1).await.unwrap();
    let ran = std::env::temp_dir().join(common::unique("mf-edges-evt"));
    service.dispatch(&shop, "record", &serde_json::json!({"file": ran})).await.unwrap();
    let stats = service.route("record_event").unwrap().stats();
    common::wait_until(|| stats.received_count() == 1, "the call of record_event").await;
    let seen = || SEEN_BY_OTHER.load(std::sync::atomic::Ordering::SeqCst);
    common::wait_until(|| seen() == 1, "the other subscriber's copy").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    service.stop().await.unwrap();
    let _ = std::fs::remove_file(&armed);
    let never_ran = !ran.exists();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen_after = seen();
    other.stop().await.unwrap();
    let _ = std::fs::remove_file(&ran);
    assert!(never_ran, "the call ran before the stop: nothing to check");
    assert_eq!(seen_after, 1, "the other subscriber got the event again from the hand-back");
}

/// Notes its worker's pid in the file its payload names, then runs for a minute.
fn stuck(Payload(path): Payload<serde_json::Value>) {
    std::fs::write(path.as_str().unwrap(), std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// A call running in a worker process past `SHUTDOWN_TIMEOUT` (500 ms): the stop ends it with
/// no warning about unstarted messages (the call started). Holding the call's "unstarted"
/// token while it ran would hold the stop's give-up for `HAND_BACK_WAIT` (2 s) more, and log
/// that "messages that never started are not all handed back".
#[tokio::test]
async fn a_stop_past_its_timeout_does_not_wait_for_a_running_call_to_be_handed_back() {
    common::logs::capture(tracing::Level::WARN);
    let shop = common::unique("shop");
    let config = test_config(&common::unique("stuck_stop"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_shutdown_timeout(Duration::from_millis(500));
    let routes = vec![Route::new(stuck).entrypoint(EventListener::new(&shop, "stuck"))];
    let service = TestService::start(routes, config).await.unwrap();
    let marker = std::env::temp_dir().join(common::unique("mf-stuck"));
    service.dispatch(&shop, "stuck", &marker.to_string_lossy()).await.unwrap();
    let since = Instant::now();
    while !marker.exists() {
        assert!(since.elapsed() < Duration::from_secs(30), "the call never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = std::fs::remove_file(&marker);
    tokio::time::timeout(Duration::from_secs(30), service.stop())
        .await
        .expect("the stop ends")
        .unwrap();
    let logs = common::logs::logged();
    assert!(
        !logs.contains("messages that never started are not all handed back"),
        "a call running in a worker was waited for as an unstarted one: {logs}"
    );
}
