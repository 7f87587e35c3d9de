//! The order a queue's messages run in, and fairness between the routes of one context:
//! one worker and the default prefetch run a queue in order in every worker mode; a message
//! redelivered after a crash, or handed back by a `thread`/`process` stop, goes to the tail
//! of a classic queue (a quorum queue keeps a crash's in place; greedy modes hand nothing
//! back); routes sharing a worker take turns; replies find their calls in any order.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker_uris, config, unique};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::config::QueueType;
use micro_framework::dependencies::{Dep, Shared};
use micro_framework::entrypoints::TimeEntrypoint;
use micro_framework::prelude::*;
use micro_framework::testing::{test_config, TestService};
use serde_json::{json, Value};

fn record(Payload(payload): Payload<Value>) {
    let path = payload["file"].as_str().unwrap();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    writeln!(file, "{}", payload["i"]).unwrap();
}

/// One worker and the default prefetch (one) run a queue in the order it came, in every
/// worker mode (`tests/retry.rs` checks the `thread` mode); in the process modes the target
/// runs in a worker process, and appends what it saw to a file named in the payload.
async fn check_in_order(mode: WorkerMode, tag: &str) {
    // Everything up to `start` runs in the worker processes too.
    let config = test_config(&format!("ordmode_{tag}")).with_worker_mode(mode).with_max_workers(1);
    let shop = format!("shop_ordmode_{tag}");
    let routes = vec![Route::new(record).entrypoint(EventListener::new(&shop, "job"))];
    let service = TestService::start(routes, config).await.unwrap();
    let file = std::env::temp_dir().join(format!("{}.txt", common::unique("mf-order")));
    let file = file.to_str().unwrap().to_owned();
    for i in 0..50 {
        service.dispatch(&shop, "job", &json!({"file": file, "i": i})).await.unwrap();
    }
    service.wait_for_route("record", 50).await.unwrap();
    service.stop().await.unwrap();
    let seen: Vec<u32> =
        std::fs::read_to_string(&file).unwrap().lines().map(|line| line.parse().unwrap()).collect();
    let _ = std::fs::remove_file(&file);
    assert_eq!(seen, (0..50).collect::<Vec<_>>(), "{mode:?}");
}

#[tokio::test]
async fn one_worker_runs_a_queue_in_order_in_greedy_thread_mode() {
    check_in_order(WorkerMode::GreedyThread, "gt").await;
}

#[cfg(feature = "process")]
#[tokio::test]
async fn one_worker_runs_a_queue_in_order_in_process_mode() {
    check_in_order(WorkerMode::Process, "p").await;
}

#[cfg(feature = "process")]
#[tokio::test]
async fn one_worker_runs_a_queue_in_order_in_greedy_process_mode() {
    check_in_order(WorkerMode::GreedyProcess, "gp").await;
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

async fn route_a(Payload(i): Payload<Value>, Dep(log): Dep<Log>) {
    log.push(format!("a{i}"));
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn route_b(Payload(i): Payload<Value>, Dep(log): Dep<Log>) {
    log.push(format!("b{i}"));
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn busy(Dep(log): Dep<Log>) {
    log.push("event".into());
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn tick(Dep(log): Dep<Log>) {
    log.push("tick".into());
}

/// Two event routes of one context of one worker, both with a backlog: they take turns, one
/// does not wait for the other's backlog to drain.
#[tokio::test]
async fn two_busy_routes_of_one_worker_take_turns() {
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "turns").with_max_workers(1);
        let markers = [config.service_name.clone(), shop.clone()];
        let log = Log::default();
        let routes = vec![
            Route::new(route_a).entrypoint(EventListener::new(&shop, "a")),
            Route::new(route_b).entrypoint(EventListener::new(&shop, "b")),
        ];
        let runner = Runner::new(routes, config).dependency(Shared(log.clone()));
        let service = TestService::start_runner(runner).await.unwrap();
        for i in 0..20 {
            service.dispatch(&shop, "a", &json!(i)).await.unwrap();
        }
        for i in 0..20 {
            service.dispatch(&shop, "b", &json!(i)).await.unwrap();
        }
        service.wait_for_route("route_a", 20).await.unwrap();
        service.wait_for_route("route_b", 20).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        let entries = log.entries();
        println!("{uri}: {entries:?}");
        let first_b = entries.iter().position(|e| e.starts_with('b')).unwrap();
        assert!(first_b < 6, "{uri}: b waited behind a's backlog: {entries:?}");
        // each route's own calls in order (one worker, a prefetch of one per consumer)
        for route in ["a", "b"] {
            let own: Vec<_> = entries.iter().filter(|e| e.starts_with(route)).cloned().collect();
            let expected: Vec<_> = (0..20).map(|i| format!("{route}{i}")).collect();
            assert_eq!(own, expected, "{uri}");
        }
    }
}

/// A timer sharing a one-worker context with a busy event route still fires about once per
/// interval: it waits behind at most the call running and the one received.
#[tokio::test]
async fn a_timer_beside_a_busy_route_of_one_worker_still_ticks() {
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "ticks").with_max_workers(1);
        let markers = [config.service_name.clone(), shop.clone()];
        let log = Log::default();
        let routes = vec![
            Route::new(busy).entrypoint(EventListener::new(&shop, "job")),
            Route::new(tick).entrypoint(TimeEntrypoint::every(Duration::from_millis(300))),
        ];
        let runner = Runner::new(routes, config).dependency(Shared(log.clone()));
        let service = TestService::start_runner(runner).await.unwrap();
        for i in 0..60 {
            service.dispatch(&shop, "job", &json!(i)).await.unwrap();
        }
        service.wait_for_route("busy", 60).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        // the 60 calls take 3 s at least: the timer ticked among them, not after them
        let entries = log.entries();
        let before_last_event = entries.iter().rposition(|e| e == "event").unwrap();
        let ticks = entries[..before_last_event].iter().filter(|e| *e == "tick").count();
        assert!(ticks >= 5, "{uri}: {ticks} ticks among the events: {entries:?}");
    }
}

async fn slow_echo(Args(i): micro_framework::amqp::rpc::Args<(i64,)>) -> i64 {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    i.0
}

async fn fast_echo(Args(i): micro_framework::amqp::rpc::Args<(i64,)>) -> i64 {
    tokio::time::sleep(Duration::from_millis(((i.0 * 7) % 50) as u64)).await;
    i.0
}

/// One caller with many calls pending: each reply goes to its own call, and a slow call does
/// not hold the replies of the fast ones behind it (all come before the slow one).
#[tokio::test]
async fn a_caller_gets_each_reply_at_once_and_matched_to_its_call() {
    for uri in broker_uris() {
        let config = config(&uri, "echo").with_max_workers(8);
        let name = config.service_name.clone();
        let routes = vec![
            Route::new(slow_echo).entrypoint(RPCListener::new()),
            Route::new(fast_echo).entrypoint(RPCListener::new()),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        let client = Client::connect(&common::config(&uri, "caller")).await.unwrap();
        let slow = {
            let proxy = client.service(&name);
            tokio::spawn(async move { proxy.call::<i64>("slow_echo", (-1,), ()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fast = (0..40).map(|i| {
            let proxy = client.service(&name);
            async move { (i, proxy.call::<i64>("fast_echo", (i,), ()).await) }
        });
        for (i, result) in futures::future::join_all(fast).await {
            assert_eq!(result.unwrap(), i, "{uri}");
        }
        assert!(!slow.is_finished(), "{uri}: the fast replies waited for the slow one");
        assert_eq!(slow.await.unwrap().unwrap(), -1, "{uri}");
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[name]).await;
    }
}

fn in_order(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<common::Probe>>) {
    probe.enter(payload);
    probe.leave();
}

/// The message that ran when an instance died comes back redelivered: a quorum queue, which
/// counts its deliveries itself, runs it in its place; from a classic queue the crash-loop
/// guard publishes a copy carrying its count, which goes to the tail (as the README says).
#[tokio::test]
async fn a_message_back_after_a_crash_keeps_its_place_on_a_quorum_queue_only() {
    for uri in broker_uris() {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let shop = unique("shop");
            let config = config(&uri, "ordered").with_queue_type(queue_type).with_max_workers(1);
            let markers = [config.service_name.clone(), shop.clone()];
            let start = |probe: Arc<common::Probe>| {
                let routes = vec![Route::new(in_order)
                    .entrypoint(EventListener::new(&shop, "job"))
                    .dependency(Shared(probe))];
                TestService::start(routes, config.clone())
            };
            let first = common::Probe::closed();
            let service = start(first.clone()).await.unwrap();
            for i in 0..5 {
                service.dispatch(&shop, "job", &json!(i)).await.unwrap();
            }
            first.wait_started(1).await;
            // The instance dies while message 0 runs: its connection goes away.
            service.transport().close().await;
            first.open();
            let _ = service.stop().await;
            assert_eq!(first.seen.lock().unwrap().clone(), [json!(0)]);

            // The next instance (one worker, prefetch one) takes the queue over.
            let second = common::Probe::new();
            let service = start(second.clone()).await.unwrap();
            service.wait_for_route("in_order", 5).await.unwrap();
            let seen = second.seen.lock().unwrap().clone();
            service.stop().await.unwrap();
            common::cleanup(&uri, &markers).await;
            let expected = match queue_type {
                QueueType::Quorum => [0, 1, 2, 3, 4],
                _ => [1, 2, 3, 4, 0],
            };
            assert_eq!(seen, expected.map(|i| json!(i)), "{uri} {queue_type:?}");
        }
    }
}

#[derive(Clone)]
struct Slow(Arc<common::Probe>);
#[derive(Clone)]
struct Ordered(Arc<common::Probe>);

fn slow(Payload(payload): Payload<Value>, Dep(probe): Dep<Slow>) {
    probe.0.enter(payload);
    probe.0.leave();
}

fn ordered(Payload(payload): Payload<Value>, Dep(probe): Dep<Ordered>) {
    probe.0.enter(payload);
    probe.0.leave();
}

/// Two routes share one worker, each consumer holding one message (the prefetch): a
/// `thread`-mode stop hands back the one waiting for the worker, as a copy at the tail of its
/// queue (as the README says); a greedy stop runs what it received, so nothing moves.
#[tokio::test]
async fn a_stop_hands_a_message_waiting_for_the_one_worker_back_to_the_tail_unless_greedy() {
    check_stop_order(WorkerMode::Thread, [1, 2, 3, 4, 0]).await;
    check_stop_order(WorkerMode::GreedyThread, [0, 1, 2, 3, 4]).await;
}

async fn check_stop_order(mode: WorkerMode, expected: [i32; 5]) {
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "stopord").with_max_workers(1).with_worker_mode(mode);
        let markers = [config.service_name.clone(), shop.clone()];
        let start = |held: Arc<common::Probe>, seen: Arc<common::Probe>| {
            let routes = vec![
                Route::new(slow)
                    .entrypoint(EventListener::new(&shop, "slow"))
                    .dependency(Shared(Slow(held))),
                Route::new(ordered)
                    .entrypoint(EventListener::new(&shop, "ordered"))
                    .dependency(Shared(Ordered(seen))),
            ];
            TestService::start(routes, config.clone())
        };
        let held = common::Probe::closed();
        let seen = common::Probe::new();
        let service = start(held.clone(), seen.clone()).await.unwrap();
        service.dispatch(&shop, "slow", &json!("hold")).await.unwrap();
        held.wait_started(1).await;
        for i in 0..5 {
            service.dispatch(&shop, "ordered", &json!(i)).await.unwrap();
        }
        // message 0 of `ordered` is received and waits for the worker `slow` holds
        tokio::time::sleep(Duration::from_millis(500)).await;
        service.begin_stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        held.open();
        service.wait_stopped().await.unwrap();
        let before: Vec<Value> = seen.seen.lock().unwrap().clone();

        let next = common::Probe::new();
        let service = start(common::Probe::new(), next.clone()).await.unwrap();
        service.wait_for_route("ordered", 5 - before.len() as u64).await.unwrap();
        let mut ran = before;
        ran.extend(next.seen.lock().unwrap().clone());
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        assert_eq!(ran, expected.map(|i| json!(i)), "{uri} {mode:?}");
    }
}
