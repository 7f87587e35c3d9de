//! The instances benchmark: how fast 1, 2 and 4 instances of one service, competing for one
//! queue, drain it, on a single RabbitMQ node and on a cluster, in one run.
//!
//! `cargo run --release -p micro-framework-bench --bin bench_instances [-- MESSAGES]`
//!
//! - The single node is `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/`); the
//!   cluster is `MF_CLUSTER_URIS` (the comma-separated node URIs that
//!   `deploy/cluster/rabbitmq-cluster.sh uris` prints), skipped when unset.
//! - Instances are separate [`Runner`]s in this process, each with its own connection (on
//!   the cluster each shuffles the node list, so they spread over the nodes); `fn noop` on
//!   `EventListener("bench_inst_src", "ping")`, `MAX_WORKERS` and `QUEUE_TYPE` from the
//!   environment.
//! - For each broker and instance count: MESSAGES (default 20,000) persistent JSON events are
//!   published with confirms into the service's queue, then the instances start and the time
//!   until all of them have settled every message gives the drain rate.
//!
//! It prints a table of the drain rates and the speed-up over one instance.

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::naming::event_exchange;
use micro_framework::prelude::*;
use micro_framework::{Error, RunningService};

const SOURCE: &str = "bench_inst_src";
const IN_FLIGHT: usize = 64;
const INSTANCES: [usize; 3] = [1, 2, 4];

fn noop() {}

fn routes() -> Vec<Route> {
    vec![Route::new(noop).entrypoint(EventListener::new(SOURCE, "ping"))]
}

/// The configuration of the environment with `AMQP_URI` = `uri` and a service name of its own.
fn config(uri: &str) -> micro_framework::Result<Config> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    let service = format!("bench_inst_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    vars.push(("SERVICE_NAME".into(), service));
    vars.push(("AMQP_URI".into(), uri.to_owned()));
    Ok(Config::from_vars(vars)?)
}

fn main() -> micro_framework::Result<()> {
    let messages = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|error| Error::Startup(format!("MESSAGES must be a number: {error}")))?,
        None => 20_000,
    };
    let single = std::env::var("AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".to_owned());
    let cluster = std::env::var("MF_CLUSTER_URIS").ok().filter(|uris| !uris.trim().is_empty());
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(bench(messages, &single, cluster.as_deref()))
}

async fn bench(messages: u64, single: &str, cluster: Option<&str>) -> micro_framework::Result<()> {
    let mut brokers = vec![("single node", single)];
    match cluster {
        Some(uris) => brokers.push(("cluster", uris)),
        None => println!("cluster: skipped (MF_CLUSTER_URIS is not set)"),
    }
    let sample = config(single)?;
    println!(
        "bench_instances: {messages} events per run, MAX_WORKERS/prefetch {} per instance, \
         queue type {}",
        sample.effective_prefetch(),
        sample.queue_type.as_str()
    );
    let mut rows = Vec::new();
    for (name, uri) in brokers {
        let config = config(uri)?;
        println!("{name}: {}", config.masked_amqp_uri());
        let mut one = None;
        for instances in INSTANCES {
            let rate = drain(&config, messages, instances).await?;
            let base = *one.get_or_insert(rate);
            rows.push((name, instances, rate, rate / base));
        }
        clean_up(&config).await?;
    }
    println!("| broker | instances | drain rate | vs 1 instance |");
    println!("|---|---|---|---|");
    for (name, instances, rate, speed_up) in rows {
        println!("| {name} | {instances} | {rate:.0} msg/s | {speed_up:.2} |");
    }
    Ok(())
}

/// Fills the service's queue with `messages` events, then times `instances` instances
/// draining it; the rate in messages per second.
async fn drain(config: &Config, messages: u64, instances: usize) -> micro_framework::Result<f64> {
    // The first instance declares the queue; it stops before the queue is filled.
    Runner::new(routes(), config.clone()).spawn().await?.stop().await?;
    let source = config.clone().with_service_name(SOURCE.into());
    let transport = micro_framework::transport::connect(&source).await?;
    let producer = Producer::new(transport.clone(), &source);
    let event = serde_json::json!({ "id": 1, "data": "x".repeat(100) });
    stream::iter(0..messages)
        .map(|_| producer.dispatch("ping", &event))
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    transport.close().await;

    let started = Instant::now();
    let mut running: Vec<RunningService> = Vec::with_capacity(instances);
    for _ in 0..instances {
        running.push(Runner::new(routes(), config.clone()).spawn().await?);
    }
    let deadline = started + Duration::from_secs(600);
    loop {
        let settled: u64 = running
            .iter()
            .filter_map(|service| service.route("noop"))
            .map(|route| route.stats().settled_count())
            .sum();
        if settled >= messages {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("{settled} of {messages} drained in 600 s")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    for service in running {
        service.stop().await?;
    }
    Ok(rate)
}

/// Deletes the service's queues and the events exchange.
async fn clean_up(config: &Config) -> micro_framework::Result<()> {
    let transport = micro_framework::transport::connect(config).await?;
    let queue = format!("evt-{SOURCE}-ping--{}.noop", config.service_name);
    for name in [format!("{queue}.dlq"), queue] {
        transport.delete_queue(&name).await?;
    }
    transport.delete_exchange(&event_exchange(config, SOURCE).name).await?;
    transport.close().await;
    Ok(())
}
