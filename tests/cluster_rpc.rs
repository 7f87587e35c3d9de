//! RPC over the test cluster: calls in flight when the caller's node goes. Run on the cluster
//! with `MF_CLUSTER_URIS` (see `tests/cluster.rs`); skipped without it.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, Cluster, Fault, FaultKind};
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::transport::SharedTransport;
use micro_framework::RunningService;

type Runs = Arc<Mutex<HashMap<u64, u32>>>;

async fn slow(Args((id, millis)): Args<(u64, u64)>, Dep(runs): Dep<Runs>) -> u64 {
    *runs.lock().unwrap().entry(id).or_default() += 1;
    tokio::time::sleep(Duration::from_millis(millis)).await;
    id
}

const TIMEOUT: Duration = Duration::from_secs(10);
const MARGIN: Duration = Duration::from_secs(2);

fn node_of(cluster: &Cluster, transport: &SharedTransport) -> usize {
    let address = transport.broker_node().expect("connected");
    cluster.node_at(&address).expect("a node of the cluster")
}

fn reply_queues(ask: usize) -> Vec<String> {
    match cluster::tool(
        "ctl",
        ask,
        &["list_queues", "-q", "--no-table-headers", "name", "consumers", "messages"],
    ) {
        Ok(list) => list
            .lines()
            .filter(|line| line.contains("rpc.reply-standalone"))
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect(),
        Err(error) => vec![format!("ERR {error}")],
    }
}

struct Rig {
    name: String,
    runs: Runs,
    service: RunningService,
    client: Arc<Client>,
}

async fn rig(cluster: &Cluster, service_node: usize, client_node: usize) -> Rig {
    tokio::task::spawn_blocking(cluster::await_formed).await.unwrap();
    let name = common::unique("crpc");
    let runs: Runs = Arc::default();
    let config = Config::new(name.clone()).with_amqp_uri(cluster.list()).with_max_workers(64);
    let routes =
        || vec![Route::new(slow).entrypoint(RPCListener::new()).dependency(Shared(runs.clone()))];
    let service = loop {
        let started = Runner::new(routes(), config.clone()).spawn().await.expect("service starts");
        if node_of(cluster, started.transport()) == service_node {
            break started;
        }
        started.stop().await.unwrap();
        // its request queue lives on the node that declared it first
        cluster.delete_named(1, &name).await;
    };
    let client_config =
        Config::new("unused").with_amqp_uri(cluster.list()).with_rpc_timeout(TIMEOUT);
    let client = loop {
        let client = Client::connect(&client_config).await.unwrap();
        if node_of(cluster, client.transport()) == client_node {
            break client;
        }
        client.close().await;
    };
    let id: u64 = client.call(&name, "slow", (0u64, 1u64), ()).await.expect("warm-up");
    assert_eq!(id, 0);
    Rig { name, runs, service, client: Arc::new(client) }
}

type Outcome = (u64, Duration, Result<u64, String>);

fn launch(
    rig: &Rig,
    ids: impl Iterator<Item = (u64, u64)>,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    ids.map(|(id, millis)| {
        let client = rig.client.clone();
        let name = rig.name.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let result = client.call::<u64>(&name, "slow", (id, millis), ()).await;
            (id, start.elapsed(), result.map_err(|e| e.to_string()))
        })
    })
    .collect()
}

/// Awaits the calls: how many were answered, those that failed, those that ended late.
async fn settle(
    label: &str,
    calls: Vec<tokio::task::JoinHandle<Outcome>>,
) -> (usize, Vec<String>, Vec<String>) {
    let (mut ok, mut failed, mut late) = (0, Vec::new(), Vec::new());
    for handle in calls {
        let (id, took, result) = handle.await.unwrap();
        println!("{label}: call {id} took {took:?}: {result:?}");
        if took > TIMEOUT + MARGIN {
            late.push(format!("call {id} took {took:?}"));
        }
        match result {
            Ok(got) => {
                assert_eq!(got, id, "{label}: call {id} got another call's answer");
                ok += 1
            }
            Err(error) => failed.push(format!("{id}: {error}")),
        }
    }
    (ok, failed, late)
}

async fn finish(cluster: &Cluster, rig: Rig, label: &str) {
    let twice = rig.runs.lock().unwrap().values().filter(|n| **n > 1).count();
    println!("{label}: ids run more than once: {twice}");
    let queues = tokio::task::spawn_blocking(|| reply_queues(1)).await.unwrap();
    println!("{label}: reply queues before close: {} {queues:?}", queues.len());
    let start = Instant::now();
    let client = Arc::try_unwrap(rig.client).expect("last handle");
    let closed = tokio::time::timeout(Duration::from_secs(60), client.close()).await;
    println!("{label}: client closed in {:?} ({closed:?})", start.elapsed());
    let start = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(60), rig.service.stop()).await;
    println!("{label}: service stopped in {:?} ({})", start.elapsed(), stopped.is_ok());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = tokio::task::spawn_blocking(|| reply_queues(1)).await.unwrap();
    println!("{label}: reply queues after close: {} {left:?}", left.len());
    cluster.delete_named(1, &rig.name).await;
}

/// The caller's node stops with 20 calls waiting, whose replies come 6 s later: the caller,
/// reconnected to another node, sets up a new reply queue bound with the old one's routing
/// key, and every call gets its own reply through it (each ran once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_waiting_when_the_callers_node_stops_are_answered() {
    let Some(cluster) = cluster::cluster() else { return };
    let label = "calls waiting, the caller's node stopped";
    let rig = rig(&cluster, 1, 2).await;
    let calls = launch(&rig, (1..=20u64).map(|id| (id, 6000)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = tokio::task::spawn_blocking(|| Fault::inject(2, FaultKind::Stopped)).await.unwrap();
    let (ok, failed, late) = settle(label, calls).await;
    let runs = rig.runs.lock().unwrap().len();
    tokio::task::spawn_blocking(move || fault.undo()).await.unwrap();
    finish(&cluster, rig, label).await;
    assert!(late.is_empty(), "{label}: {late:?}");
    assert_eq!(runs, 21, "{label}: every call ran (with the warm-up)");
    assert_eq!((ok, failed), (20, Vec::<String>::new()), "{label}");
}

fn durable_reply_queues(ask: usize) -> Vec<String> {
    let listed = cluster::tool("ctl", ask, &["list_queues", "-q", "--no-table-headers", "name"]);
    listed
        .expect("rabbitmqctl")
        .lines()
        .filter(|name| name.contains("ufw-reply-"))
        .map(str::to_owned)
        .collect()
}

/// The micro-framework profile's reply queue is durable: one whose node stops cannot be
/// deleted then, and would come back with its node, holding replies no call waits for, for
/// the 12 h of its `x-expires`. It is deleted once its node is back, at the latest when the
/// caller closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_reply_queue_of_a_stopped_node_is_deleted_once_it_is_back() {
    let Some(cluster) = cluster::cluster() else { return };
    tokio::task::spawn_blocking(cluster::await_formed).await.unwrap();
    let before = tokio::task::spawn_blocking(|| durable_reply_queues(1)).await.unwrap();
    assert!(before.is_empty(), "reply queues of other tests: {before:?}");
    let name = common::unique("crpcufw");
    let runs: Runs = Arc::default();
    let protocol = micro_framework::config::Protocol::MicroFramework;
    let routes = vec![Route::new(slow)
        .entrypoint(RPCListener::new().protocol(protocol))
        .dependency(Shared(runs.clone()))];
    let config = Config::new(name.clone())
        .with_amqp_uri(cluster.uri(1).into())
        .with_max_workers(16)
        .with_protocol(protocol);
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let client_config = Config::new("unused")
        .with_amqp_uri(cluster.list())
        .with_rpc_timeout(TIMEOUT)
        .with_protocol(protocol);
    let client = loop {
        let client = Client::connect(&client_config).await.unwrap();
        if node_of(&cluster, client.transport()) == 2 {
            break Arc::new(client);
        }
        client.close().await;
    };
    let _: u64 = client.call(&name, "slow", (0u64, 1u64), ()).await.expect("warm-up");
    let rig = Rig { name: name.clone(), runs, service, client: client.clone() };
    let calls = launch(&rig, (1..=10u64).map(|id| (id, 5000)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fault = tokio::task::spawn_blocking(|| Fault::inject(2, FaultKind::Stopped)).await.unwrap();
    let (ok, failed, late) = settle("durable reply queue", calls).await;
    tokio::task::spawn_blocking(move || fault.undo()).await.unwrap();
    let after: u64 = client.call(&name, "slow", (99u64, 1u64), ()).await.expect("a call after");
    let Rig { service, client: rig_client, .. } = rig;
    drop(rig_client);
    Arc::try_unwrap(client).expect("the last handle").close().await;
    service.stop().await.unwrap();
    let left = tokio::task::spawn_blocking(|| durable_reply_queues(1)).await.unwrap();
    for queue in &left {
        let _ = cluster::tool("ctl", 1, &["delete_queue", queue]);
    }
    cluster.delete_named(1, &name).await;
    assert_eq!((ok, failed, late, after), (10, Vec::new(), Vec::new(), 99));
    assert!(left.is_empty(), "reply queues left after the caller closed: {left:?}");
}
