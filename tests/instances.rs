//! Several instances of one service: competing consumers on events and RPC (the in-process
//! broker and RabbitMQ at 5672), and on a 3-node cluster (`MF_CLUSTER_URIS`, comma-separated,
//! as `deploy/cluster/rabbitmq-cluster.sh uris` prints them) the singleton and broadcast
//! handler types across nodes and the cluster-wide timer, also when its leader's node stops.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{broker_uris, unique};
use futures::StreamExt;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::naming::HandlerType;
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::timer::TimeEntrypoint;
use serde_json::json;

/// What the instances of a test handled: (instance, id) in arrival order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(usize, u64)>>>);

impl Log {
    fn entries(&self) -> Vec<(usize, u64)> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// How many times each id was handled, over every instance.
    fn per_id(&self) -> BTreeMap<u64, usize> {
        let mut counts = BTreeMap::new();
        for (_, id) in self.entries() {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// The instances that handled something.
    fn instances(&self) -> BTreeSet<usize> {
        self.entries().into_iter().map(|(instance, _)| instance).collect()
    }

    /// Waits until `count` entries are logged (30 s at most), then a little longer so that a
    /// duplicate would show.
    async fn wait_for(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.len() < count {
            assert!(Instant::now() < deadline, "{} of {count} handled within 30 s", self.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The instance a route runs in, and the log it writes to.
#[derive(Clone)]
struct Instance {
    number: usize,
    log: Log,
}

fn record(Payload(id): Payload<u64>, Dep(me): Dep<Instance>) {
    me.log.0.lock().unwrap().push((me.number, id));
}

fn answer(Args((id,)): Args<(u64,)>, Dep(me): Dep<Instance>) -> usize {
    me.log.0.lock().unwrap().push((me.number, id));
    me.number
}

fn fired(Dep(me): Dep<Instance>) {
    me.log.0.lock().unwrap().push((me.number, 0));
}

/// Asserts every id of `0..count` was handled exactly once, by at least two instances.
fn assert_each_once_shared(log: &Log, count: u64) {
    let expected: BTreeMap<u64, usize> = (0..count).map(|id| (id, 1)).collect();
    assert_eq!(log.per_id(), expected, "every id exactly once");
    assert!(log.instances().len() >= 2, "one instance took everything: {:?}", log.instances());
}

const EVENTS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_instances_handle_each_event_once() {
    for uri in broker_uris() {
        let config = common::config(&uri, "pool");
        let source = unique("pool_src");
        let markers = [config.service_name.clone(), source.clone()];
        let log = Log::default();
        let mut instances = Vec::new();
        for number in 0..3 {
            let routes = vec![Route::new(record)
                .entrypoint(EventListener::new(&source, "job"))
                .dependency(Shared(Instance { number, log: log.clone() }))];
            instances.push(TestService::start(routes, config.clone()).await.unwrap());
        }
        for id in 0..EVENTS {
            instances[0].dispatch(&source, "job", &json!(id)).await.unwrap();
        }
        log.wait_for(EVENTS as usize).await;
        assert_each_once_shared(&log, EVENTS);
        for instance in instances {
            instance.stop().await.unwrap();
        }
        common::cleanup(&uri, &markers).await;
    }
}

/// The micro-framework profile has service-pool handlers only: its broadcast and singleton
/// handlers take Nameko's queues. Before, they took the service pool's queue, and two
/// broadcast instances shared each event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_instances_each_handle_every_event_under_the_micro_framework_profile() {
    use micro_framework::config::Protocol;
    for uri in broker_uris() {
        let config = common::config(&uri, "mf_bcast").with_protocol(Protocol::MicroFramework);
        let source = unique("bcast_src");
        let markers = [config.service_name.clone(), source.clone()];
        let log = Log::default();
        let mut instances = Vec::new();
        for number in 0..2 {
            let handler = HandlerType::Broadcast(Some(format!("instance{number}")));
            let routes = vec![Route::new(record)
                .entrypoint(EventListener::new(&source, "job").handler_type(handler))
                .dependency(Shared(Instance { number, log: log.clone() }))];
            instances.push(TestService::start(routes, config.clone()).await.unwrap());
        }
        for id in 0..EVENTS {
            instances[0].dispatch(&source, "job", &json!(id)).await.unwrap();
        }
        log.wait_for(2 * EVENTS as usize).await;
        assert!(log.per_id().values().all(|count| *count == 2), "{:?}", log.per_id());
        assert_eq!(log.instances(), BTreeSet::from([0, 1]));
        for instance in instances {
            instance.stop().await.unwrap();
        }
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_instances_answer_each_rpc_call_once() {
    for uri in broker_uris() {
        let config = common::config(&uri, "rpcpool");
        let caller = common::config(&uri, "rpccaller");
        let markers = [config.service_name.clone(), caller.service_name.clone()];
        let log = Log::default();
        let mut instances = Vec::new();
        for number in 0..3 {
            let routes = vec![Route::new(answer)
                .entrypoint(RPCListener::new())
                .dependency(Shared(Instance { number, log: log.clone() }))];
            instances.push(TestService::start(routes, config.clone()).await.unwrap());
        }
        let client = Client::connect(&caller).await.unwrap();
        let service = config.service_name.as_str();
        let calls = 90u64;
        let answers: Vec<usize> = futures::stream::iter(0..calls)
            .map(|id| {
                let client = &client;
                async move { client.call::<usize>(service, "answer", (id,), ()).await.unwrap() }
            })
            .buffer_unordered(30)
            .collect()
            .await;
        assert!(answers.iter().all(|number| *number < 3), "{answers:?}");
        log.wait_for(calls as usize).await;
        assert_each_once_shared(&log, calls);
        client.close().await;
        for instance in instances {
            instance.stop().await.unwrap();
        }
        common::cleanup(&uri, &markers).await;
    }
}

// ------------------------------------------------------------------------------- cluster

/// The cluster tests stop and start nodes: one at a time.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The URIs of the cluster's nodes, when the cluster tests were asked for (see
/// [`common::cluster::cluster`]: a loud skip otherwise, a failure when asked for and missing).
fn cluster_uris() -> Option<Vec<String>> {
    common::cluster::cluster().map(|cluster| cluster.uris)
}

/// `deploy/cluster/rabbitmq-cluster.sh ARGS...`, which must succeed; its output.
fn cluster_script(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cluster/rabbitmq-cluster.sh");
    let output = std::process::Command::new(script).args(args).output().expect("script runs");
    assert!(
        output.status.success(),
        "rabbitmq-cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The script's number (1, 2, 3) of the node of `uri`: its AMQP port is 5680 + number.
fn node_number(uri: &str) -> String {
    let port = url::Url::parse(uri).unwrap().port().expect("cluster URIs name their port");
    (port - 5680).to_string()
}

/// A node stopped with `stop_app`: started again when dropped, also when the test fails, so
/// the cluster is left healthy.
struct StoppedNode(String);

impl StoppedNode {
    fn stop(number: String) -> StoppedNode {
        cluster_script(&["ctl", &number, "stop_app"]);
        StoppedNode(number)
    }
}

impl Drop for StoppedNode {
    fn drop(&mut self) {
        cluster_script(&["ctl", &self.0, "start_app"]);
        cluster_script(&["ctl", &self.0, "await_startup"]);
    }
}

/// Deletes the queues and exchanges of the cluster whose names hold one of `markers`.
async fn cluster_cleanup(uris: &[String], markers: &[String]) {
    let config = Config::new("cleanup").with_amqp_uris(uris.iter().cloned());
    let list = |what: &str| cluster_script(&["ctl", "1", what, "-q", "--no-table-headers", "name"]);
    common::delete_marked(&config, list, markers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn singleton_and_broadcast_handlers_across_cluster_nodes() {
    let Some(uris) = cluster_uris() else { return };
    let _cluster = CLUSTER.lock().await;
    let source = unique("spread_src");
    let (alpha, beta, gamma) = (unique("alpha"), unique("beta"), unique("gamma"));
    let markers = [source.clone(), alpha.clone(), beta.clone(), gamma.clone()];
    let (singles, broadcasts) = (Log::default(), Log::default());
    let mut instances = Vec::new();
    // Singleton: two instances of `alpha` and one of `beta`, one per node, share one queue.
    for (number, service) in [&alpha, &alpha, &beta].into_iter().enumerate() {
        let route = Route::new(record)
            .entrypoint(EventListener::new(&source, "job").handler_type(HandlerType::Singleton))
            .dependency(Shared(Instance { number, log: singles.clone() }));
        let config = Config::new(service.as_str()).with_amqp_uri(uris[number].clone());
        instances.push(TestService::start(vec![route], config).await.unwrap());
    }
    // Broadcast: three instances of `gamma`, one per node, each with its own queue.
    for (number, uri) in uris.iter().enumerate() {
        let route = Route::new(record)
            .entrypoint(
                EventListener::new(&source, "job").handler_type(HandlerType::Broadcast(None)),
            )
            .dependency(Shared(Instance { number, log: broadcasts.clone() }));
        let config = Config::new(gamma.as_str()).with_amqp_uri(uri.clone());
        instances.push(TestService::start(vec![route], config).await.unwrap());
    }
    let events = 60;
    for id in 0..events {
        instances[(id % 3) as usize].dispatch(&source, "job", &json!(id)).await.unwrap();
    }
    singles.wait_for(events as usize).await;
    assert_each_once_shared(&singles, events);
    broadcasts.wait_for(3 * events as usize).await;
    let per_instance: BTreeSet<(usize, u64)> = broadcasts.entries().into_iter().collect();
    assert_eq!(broadcasts.len(), per_instance.len(), "an instance got an event twice");
    let expected: BTreeSet<(usize, u64)> =
        (0..3).flat_map(|number| (0..events).map(move |id| (number, id))).collect();
    assert_eq!(per_instance, expected, "every instance gets every event");
    for instance in instances {
        instance.stop().await.unwrap();
    }
    cluster_cleanup(&uris, &markers).await;
}

/// The timer's tick in the cluster test.
const TICK: Duration = Duration::from_millis(300);

/// Who fired in the next `window`: the firings of each instance.
async fn firings_in(log: &Log, window: Duration) -> BTreeMap<usize, usize> {
    let start = log.len();
    tokio::time::sleep(window).await;
    let mut counts = BTreeMap::new();
    for (number, _) in &log.entries()[start..] {
        *counts.entry(*number).or_insert(0) += 1;
    }
    counts
}

/// Asserts one instance fired in `window`, at most once per tick; returns it.
fn one_leader(counts: &BTreeMap<usize, usize>, window: Duration, when: &str) -> usize {
    let ticks = (window.as_millis() / TICK.as_millis()) as usize;
    assert_eq!(counts.len(), 1, "{when}: one instance fires, got {counts:?}");
    let (leader, fired) = counts.iter().next().map(|(l, f)| (*l, *f)).unwrap();
    assert!(fired <= ticks + 1, "{when}: {fired} firings in {ticks} ticks");
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_timer_fires_once_per_tick_when_its_leaders_node_stops() {
    let Some(uris) = cluster_uris() else { return };
    let _cluster = CLUSTER.lock().await;
    let service = unique("ticker");
    let log = Log::default();
    let mut instances = Vec::new();
    // One instance per node, each given its node only: where they run is known.
    for (number, uri) in uris.iter().enumerate() {
        let route = Route::new(fired)
            .entrypoint(TimeEntrypoint::every(TICK).cluster_wide())
            .dependency(Shared(Instance { number, log: log.clone() }));
        let config = Config::new(service.as_str()).with_amqp_uri(uri.clone());
        instances.push(TestService::start(vec![route], config).await.unwrap());
    }
    let window = TICK * 10;
    tokio::time::sleep(TICK * 3).await;
    let leader = one_leader(&firings_in(&log, window).await, window, "before");

    let stopped_node = StoppedNode::stop(node_number(&uris[leader]));
    let stopped = log.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log.entries()[stopped..].iter().any(|(number, _)| *number != leader) {
        assert!(Instant::now() < deadline, "no other instance leads 30 s after the node stopped");
        tokio::time::sleep(TICK).await;
    }
    let successor = one_leader(&firings_in(&log, window).await, window, "node stopped");
    assert_ne!(successor, leader);

    drop(stopped_node);
    // The old leader's instance reconnects (topology replayed) and stays a follower.
    tokio::time::sleep(TICK * 10).await;
    one_leader(&firings_in(&log, window).await, window, "node back");
    cluster_script(&["status"]);
    for instance in instances {
        instance.stop().await.unwrap();
    }
    cluster_cleanup(&uris, &[service]).await;
}
