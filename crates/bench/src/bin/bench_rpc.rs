//! RPC benchmark: `cargo run --release -p micro-framework-bench --bin bench_rpc [-- CALLS]`
//! against `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/`).
//!
//! In one run on the same broker: the `bench_rpc` service's `echo(x)` (as in
//! `examples/rpc_service.rs`, `MAX_WORKERS` from the environment) called through
//! [`micro_framework::amqp::rpc::Client`], beside a bare lapin request/reply (a responder that
//! replies to `reply_to` with the correlation id, a client with its own reply queue, publisher
//! confirms on both sides as the framework does). For each: sequential round-trip latency
//! (p50, p99) over CALLS calls (default 1000), and throughput with 16 concurrent callers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::prelude::*;
use micro_framework::Error;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

const CONCURRENT: usize = 16;

#[derive(Deserialize)]
struct EchoArgs {
    x: Value,
}

fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
    x
}

fn lapin_error(error: lapin::Error) -> Error {
    Error::Startup(format!("bare lapin: {error}"))
}

fn main() -> micro_framework::Result<()> {
    let calls: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|e| Error::Startup(format!("CALLS: {e}")))?,
        None => 1000,
    };
    tokio::runtime::Runtime::new()?.block_on(bench(calls))
}

/// Sequential latencies (sorted) and concurrent throughput of `call`.
async fn measure<F, Fut>(calls: usize, call: F) -> micro_framework::Result<(Vec<Duration>, f64)>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = micro_framework::Result<()>> + Send,
{
    let mut latencies = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        call(i).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CONCURRENT {
        let call = call.clone();
        callers.spawn(async move {
            for i in (caller..calls).step_by(CONCURRENT) {
                call(i).await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = callers.join_next().await {
        done.map_err(|e| Error::Startup(e.to_string()))??;
    }
    Ok((latencies, calls as f64 / started.elapsed().as_secs_f64()))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

async fn bench(calls: usize) -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.push(("SERVICE_NAME".into(), "bench_rpc".into()));
    if std::env::var("AMQP_URI").is_err() {
        vars.push(("AMQP_URI".into(), "amqp://guest:guest@127.0.0.1:5672/".into()));
    }
    let config = Config::from_vars(vars)?;
    println!(
        "bench_rpc: {calls} calls, {CONCURRENT} concurrent callers, MAX_WORKERS {}, broker {}",
        config.max_workers,
        config.masked_amqp_uri()
    );

    let routes = vec![Route::new(echo).entrypoint(RPCListener::new())];
    let service = Runner::new(routes, config.clone()).spawn().await?;
    let client = Arc::new(Client::connect(&config).await?);
    let framework = measure(calls, move |i| {
        let client = client.clone();
        async move {
            let result: Value = client
                .call("bench_rpc", "echo", json!([i]), json!({}))
                .await
                .map_err(|e| Error::Startup(e.to_string()))?;
            (result == json!(i)).then_some(()).ok_or_else(|| Error::Startup("wrong echo".into()))
        }
    })
    .await?;
    service.stop().await?;

    let bare = bare_lapin(&config, calls).await?;
    for (name, (latencies, rate)) in [("bare lapin", &bare), ("micro-framework", &framework)] {
        println!(
            "{name:<16} p50 {:>6.2} ms | p99 {:>6.2} ms | {CONCURRENT} callers {rate:>7.0} calls/s",
            percentile(latencies, 0.5),
            percentile(latencies, 0.99)
        );
    }
    println!(
        "ratio micro-framework / bare: throughput {:.2}, p50 latency {:.2}",
        framework.1 / bare.1,
        percentile(&framework.0, 0.5) / percentile(&bare.0, 0.5)
    );
    Ok(())
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A bare lapin responder and client, measured like the framework.
async fn bare_lapin(
    config: &Config,
    calls: usize,
) -> micro_framework::Result<(Vec<Duration>, f64)> {
    // lapin reads an empty path as the empty vhost; the framework reads it as "/".
    let uri = match config.amqp_uri.strip_suffix('/') {
        Some(base) if base.matches('/').count() == 2 => format!("{base}/%2f"),
        _ => config.amqp_uri.clone(),
    };
    let connection =
        Connection::connect(&uri, ConnectionProperties::default()).await.map_err(lapin_error)?;
    let requests = format!("bench-bare-rpc-{}", uuid::Uuid::new_v4().simple());
    let server = connection.create_channel().await.map_err(lapin_error)?;
    server.confirm_select(ConfirmSelectOptions::default()).await.map_err(lapin_error)?;
    server
        .basic_qos(config.effective_prefetch(), BasicQosOptions::default())
        .await
        .map_err(lapin_error)?;
    server
        .queue_declare(
            requests.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(lapin_error)?;
    let mut incoming = server
        .basic_consume(
            requests.as_str().into(),
            "server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(lapin_error)?;
    let responder = server.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = incoming.next().await {
            let channel = responder.clone();
            tokio::spawn(async move {
                let request: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                let reply =
                    serde_json::to_vec(&json!({ "result": request["args"][0], "error": null }))
                        .unwrap_or_default();
                let (Some(reply_to), Some(correlation)) = (
                    delivery.properties.reply_to().clone(),
                    delivery.properties.correlation_id().clone(),
                ) else {
                    return;
                };
                let properties = BasicProperties::default()
                    .with_correlation_id(correlation)
                    .with_content_type("application/json".into());
                if let Ok(confirm) = channel
                    .basic_publish(
                        "".into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        &reply,
                        properties,
                    )
                    .await
                {
                    let _ = confirm.await;
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            });
        }
    });

    let client = connection.create_channel().await.map_err(lapin_error)?;
    client.confirm_select(ConfirmSelectOptions::default()).await.map_err(lapin_error)?;
    let replies = client
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(lapin_error)?;
    let reply_queue = replies.name().as_str().to_owned();
    let mut reply_stream = client
        .basic_consume(
            reply_queue.as_str().into(),
            "client".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(lapin_error)?;
    let pending: Pending = Arc::default();
    let waiting = pending.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = reply_stream.next().await {
            let id = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
            let waiter = id.and_then(|id| waiting.lock().ok().and_then(|mut p| p.remove(&id)));
            if let Some(waiter) = waiter {
                let _ = waiter.send(delivery.data);
            }
        }
    });
    let call = BareCall { channel: client, requests: requests.clone(), reply_queue, pending };
    let result = measure(calls, move |i| {
        let call = call.clone();
        async move { call.call(i).await }
    })
    .await;
    server
        .queue_delete(requests.as_str().into(), QueueDeleteOptions::default())
        .await
        .map_err(lapin_error)?;
    let _ = connection.close(200, "bench done".into()).await;
    result
}

#[derive(Clone)]
struct BareCall {
    channel: Channel,
    requests: String,
    reply_queue: String,
    pending: Pending,
}

impl BareCall {
    async fn call(&self, i: usize) -> micro_framework::Result<()> {
        let id = uuid::Uuid::new_v4().to_string();
        let (answer, answered) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id.clone(), answer);
        }
        let body = serde_json::to_vec(&json!({ "args": [i], "kwargs": {} }))?;
        let properties = BasicProperties::default()
            .with_correlation_id(id.as_str().into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_content_type("application/json".into());
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        self.channel
            .basic_publish("".into(), self.requests.as_str().into(), options, &body, properties)
            .await
            .map_err(lapin_error)?
            .await
            .map_err(lapin_error)?;
        let reply = answered.await.map_err(|_| Error::Startup("no reply".into()))?;
        let reply: Value = serde_json::from_slice(&reply)?;
        (reply["result"] == json!(i))
            .then_some(())
            .ok_or_else(|| Error::Startup("wrong echo".into()))
    }
}
