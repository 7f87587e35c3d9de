//! The RPC benchmark's pairings (see `bench_rpc`).
//!
//! Everything goes over the Nameko wire (topic exchange `nameko-rpc`, request queue
//! `rpc-bench_rpc` bound `bench_rpc.*`, JSON bodies, reply to `nameko-rpc` with the caller's
//! routing key), so each caller can call each responder.
//!
//! The bare responder consumes with prefetch `MAX_WORKERS`, answers each request on a task of
//! its own, awaits the reply's publisher confirm, then acks the request (as the framework does);
//! [`BLOCKING_BARE`] computes the reply on the blocking pool, as the framework runs a sync target.
//! The bare caller publishes with `mandatory` and awaits each request's confirm, and consumes
//! its exclusive reply queue without acks; [`ACKED_BARE`] acks each reply, with the reply
//! consumer's prefetch of the framework's caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bare::durable_bound_queue;
use crate::cpu::{broker_cpu, own_cpu};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::prelude::*;
use micro_framework::Error;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// How many callers call at once in the throughput phase, unless told otherwise (the
/// README's table is for 16).
pub const CONCURRENT: usize = 16;
const SERVICE: &str = "bench_rpc";
const EXCHANGE: &str = "nameko-rpc";

#[derive(Deserialize)]
struct EchoArgs {
    x: Value,
}

fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
    x
}

/// The same method as an async target: it runs on the runtime, without the blocking-pool
/// thread a sync target runs on.
mod async_target {
    use super::{Args, EchoArgs, Value};

    pub async fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
        x
    }
}

/// The framework's service with an async target (the other one's is sync); only the
/// transient callers call it.
pub const ASYNC_RESPONDER: &str = "mf, async";

/// The bare lapin responder that computes each reply on tokio's blocking pool
/// (`spawn_blocking`), where the framework runs a sync target: the like-for-like baseline of
/// the framework's sync target. Only the transient callers call it.
pub const BLOCKING_BARE: &str = "bare, blocking";

fn lapin_error(error: lapin::Error) -> Error {
    Error::Startup(format!("bare lapin: {error}"))
}

/// Sequential latencies (sorted), the throughput of concurrent callers of one pairing, and
/// the CPU time per call of this process (caller and responder) and of the broker.
pub struct Figures {
    /// The sequential round trips, sorted.
    pub latencies: Vec<Duration>,
    /// Calls per second of the concurrent callers.
    pub rate: f64,
    /// CPU time of this process per call (µs) while the concurrent callers ran.
    pub own_cpu_us: f64,
    /// CPU time of the local broker per call (µs), when it can be read.
    pub broker_cpu_us: Option<f64>,
}

impl Figures {
    /// The `p` quantile (0..=1) of the sequential round trips, in ms.
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies, p)
    }
}

/// The `p` quantile (0..=1) of `sorted` latencies, in ms.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

async fn measure<F, Fut>(
    calls: usize,
    concurrent: usize,
    call: F,
) -> micro_framework::Result<Figures>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = micro_framework::Result<()>> + Send,
{
    // warm up: the reply queue is declared on the first call
    for i in 0..CONCURRENT {
        call(i).await?;
    }
    let mut latencies = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        call(i).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let (own_before, broker_before) = (own_cpu(), broker_cpu());
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..concurrent {
        let call = call.clone();
        callers.spawn(async move {
            for i in (caller..calls * 4).step_by(concurrent) {
                call(i).await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = callers.join_next().await {
        done.map_err(|e| Error::Startup(e.to_string()))??;
    }
    let elapsed = started.elapsed();
    let per_call = |cpu: Duration| cpu.as_secs_f64() * 1e6 / (calls * 4) as f64;
    Ok(Figures {
        latencies,
        rate: (calls * 4) as f64 / elapsed.as_secs_f64(),
        own_cpu_us: per_call(own_cpu().saturating_sub(own_before)),
        broker_cpu_us: broker_cpu()
            .zip(broker_before)
            .map(|(after, before)| per_call(after.saturating_sub(before))),
    })
}

/// The argument of the `i`th call: `i`, or `[i, "xx.."]` with `PAYLOAD_BYTES` of padding
/// (none when it cannot be read: the binaries check it first).
fn argument(i: usize) -> Value {
    static PADDING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let padding = PADDING.get_or_init(|| "x".repeat(crate::payload_bytes(0).unwrap_or(0)));
    match padding.is_empty() {
        true => json!(i),
        false => json!([i, padding]),
    }
}

/// A caller of `bench_rpc.echo`.
#[derive(Clone)]
enum Caller {
    Bare(BareCaller),
    Framework(Arc<Client>),
}

impl Caller {
    /// Call `service`'s `echo` with `i` ([`argument`]).
    async fn echo(&self, service: &str, i: usize) -> micro_framework::Result<()> {
        let sent = argument(i);
        let result = match self {
            Caller::Bare(bare) => bare.call(service, &sent).await?,
            Caller::Framework(client) => client
                .call::<Value>(service, "echo", [&sent], json!({}))
                .await
                .map_err(|e| Error::Startup(e.to_string()))?,
        };
        (result == sent).then_some(()).ok_or_else(|| Error::Startup("wrong echo".into()))
    }
}

/// The bare caller whose requests are persistent (delivery mode 2), as Nameko's and the
/// framework's are by default; the other bare caller's are transient.
pub const PERSISTENT_BARE: &str = "bare, persistent";

/// The bare caller that acks each reply, its reply consumer's prefetch bounding the replies
/// it holds, as the framework's caller does (the other bare callers take theirs without
/// acks): bare lapin with the framework's guarantees. Transient requests.
pub const ACKED_BARE: &str = "bare, acked";

/// The reply consumer's prefetch of [`ACKED_BARE`]: the framework caller's.
const ACKED_REPLY_PREFETCH: u16 = 1000;

/// The framework's caller with `RPC_PERSISTENT_REQUESTS=false`: transient requests, as the
/// bare lapin caller sends them.
pub const TRANSIENT_FRAMEWORK: &str = "mf, transient";

/// One caller/responder pairing and its figures.
pub struct Pairing {
    pub caller: &'static str,
    pub responder: &'static str,
    pub figures: Figures,
}

/// The pairings of the bare lapin and micro-framework callers (each with transient and
/// persistent requests) with the bare lapin and the framework's responders (a sync target),
/// and of the transient callers with the framework's async target, measured with
/// `calls` sequential calls and `calls * 4` made by `concurrent` callers at once, on
/// `config`'s broker with its `MAX_WORKERS` (its service name is used for the framework's
/// service). Only the pairings `wanted(caller, responder)` accepts are measured.
pub async fn pairings(
    config: &Config,
    calls: usize,
    concurrent: usize,
    wanted: impl Fn(&str, &str) -> bool,
) -> micro_framework::Result<Vec<Pairing>> {
    let config = config.clone().with_service_name(SERVICE.to_owned());
    let uri = lapin_uri(&config.amqp_uri);
    let bare_caller = Caller::Bare(BareCaller::connect(&uri, false, false).await?);
    let persistent_caller = Caller::Bare(BareCaller::connect(&uri, true, false).await?);
    let acked_caller = Caller::Bare(BareCaller::connect(&uri, false, true).await?);
    let client = Caller::Framework(Arc::new(Client::connect(&config).await?));
    let transient_config = config.clone().with_rpc_persistent_requests(false);
    let transient_client = Caller::Framework(Arc::new(Client::connect(&transient_config).await?));
    let callers = [
        ("bare lapin", &bare_caller),
        (PERSISTENT_BARE, &persistent_caller),
        (ACKED_BARE, &acked_caller),
        ("micro-framework", &client),
        (TRANSIENT_FRAMEWORK, &transient_client),
    ];
    // the async target and bare lapin on the blocking pool answer the transient callers only
    let measured = |caller: &str, responder: &str| {
        let transient = ["bare lapin", ACKED_BARE, TRANSIENT_FRAMEWORK].contains(&caller);
        let transient_only = responder == ASYNC_RESPONDER || responder == BLOCKING_BARE;
        (!transient_only || transient) && wanted(caller, responder)
    };
    let mut results = Vec::new();
    for responder in ["bare lapin", BLOCKING_BARE, "micro-framework", ASYNC_RESPONDER] {
        if !callers.iter().any(|&(caller, _)| measured(caller, responder)) {
            continue;
        }
        let stop = start_responder(responder, &uri, &config, SERVICE).await?;
        for &(caller_name, caller) in &callers {
            if !measured(caller_name, responder) {
                continue;
            }
            let caller = caller.clone();
            let figures = measure(calls, concurrent, move |i| {
                let caller = caller.clone();
                async move { caller.echo(SERVICE, i).await }
            })
            .await?;
            results.push(Pairing { caller: caller_name, responder, figures });
        }
        stop.stop().await?;
    }
    if let Caller::Framework(client) = transient_client {
        close_client(client, &[]).await?;
    }
    if let Caller::Framework(client) = client {
        close_client(client, &[SERVICE]).await?;
    }
    Ok(results)
}

/// Starts `responder` (a responder's name) serving `service` on `config`'s broker.
async fn start_responder(
    responder: &str,
    uri: &str,
    config: &Config,
    service: &str,
) -> micro_framework::Result<Responder> {
    if !is_framework(responder) {
        let blocking = responder == BLOCKING_BARE;
        let bare = BareResponder::start(uri, config, blocking, service).await?;
        return Ok(Responder::Bare(bare));
    }
    let route = if responder == ASYNC_RESPONDER {
        Route::new(async_target::echo)
    } else {
        Route::new(echo)
    };
    let config = config.clone().with_service_name(service.to_owned());
    let routes = vec![route.entrypoint(RPCListener::new())];
    Ok(Responder::Framework(Runner::new(routes, config).spawn().await?))
}

/// Whether `responder` (a responder's name) is one of the framework's.
fn is_framework(responder: &str) -> bool {
    !matches!(responder, "bare lapin" | BLOCKING_BARE)
}

/// Deletes the request queues of the framework's `services` (they leave them, as Nameko's
/// do), then closes `client` once no other holder is left.
async fn close_client(client: Arc<Client>, services: &[&str]) -> micro_framework::Result<()> {
    for service in services {
        client.transport().delete_queue(&format!("rpc-{service}")).await?;
    }
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    Ok(())
}

/// The pairings whose sequential round trips [`round_trips`] measures in turns: the p50
/// goal's (bare lapin's, the framework's sync target) and the two that explain it.
pub const ROUND_TRIP_PAIRINGS: [(&str, &str); 4] = [
    ("bare lapin", "bare lapin"),
    ("bare lapin", BLOCKING_BARE),
    (TRANSIENT_FRAMEWORK, "micro-framework"),
    (TRANSIENT_FRAMEWORK, ASYNC_RESPONDER),
];

/// The sequential round trips of one pairing, sorted.
pub struct RoundTrips {
    pub caller: &'static str,
    pub responder: &'static str,
    pub latencies: Vec<Duration>,
}

/// `calls` sequential round trips of each of [`ROUND_TRIP_PAIRINGS`], taken in turns: one
/// call of each pairing, then the next of each, the order rotating. Each responder serves
/// a service of its own, all at once, so a slow spell of the machine (on a 2-core machine
/// shared with the broker, bare lapin's p50 moves by a fifth from one minute to the next)
/// falls on every pairing alike instead of on whichever ran then.
pub async fn round_trips(
    config: &Config,
    calls: usize,
) -> micro_framework::Result<Vec<RoundTrips>> {
    let uri = lapin_uri(&config.amqp_uri);
    let bare_caller = Caller::Bare(BareCaller::connect(&uri, false, false).await?);
    let transient_config = config.clone().with_rpc_persistent_requests(false);
    let client = Arc::new(Client::connect(&transient_config).await?);
    let framework_caller = Caller::Framework(client.clone());
    // each pairing's responder serves a service of its own, so that all serve at once
    let services: Vec<String> =
        (0..ROUND_TRIP_PAIRINGS.len()).map(|turn| format!("{SERVICE}_{turn}")).collect();
    let mut responders = Vec::with_capacity(services.len());
    let mut turns = Vec::with_capacity(services.len());
    let mut framework_services = Vec::new();
    for ((caller, responder), service) in ROUND_TRIP_PAIRINGS.into_iter().zip(&services) {
        responders.push(start_responder(responder, &uri, config, service).await?);
        if is_framework(responder) {
            framework_services.push(service.as_str());
        }
        let caller = if caller == TRANSIENT_FRAMEWORK { &framework_caller } else { &bare_caller };
        turns.push((caller, service.as_str()));
    }
    let mut latencies = vec![Vec::with_capacity(calls); turns.len()];
    // the first calls of each warm up (the reply queues are declared on the first call)
    for i in 0..CONCURRENT + calls {
        for turn in 0..turns.len() {
            let pairing = (turn + i) % turns.len();
            let (caller, service) = turns[pairing];
            let started = Instant::now();
            caller.echo(service, i).await?;
            if i >= CONCURRENT {
                latencies[pairing].push(started.elapsed());
            }
        }
    }
    for responder in responders {
        responder.stop().await?;
    }
    drop(framework_caller);
    close_client(client, &framework_services).await?;
    Ok(ROUND_TRIP_PAIRINGS
        .into_iter()
        .zip(latencies)
        .map(|((caller, responder), mut latencies)| {
            latencies.sort();
            RoundTrips { caller, responder, latencies }
        })
        .collect())
}

/// `uri` as lapin reads it: lapin reads an empty path as the empty vhost, the framework as
/// "/".
fn lapin_uri(uri: &str) -> String {
    match uri.strip_suffix('/') {
        Some(base) if base.matches('/').count() == 2 => format!("{base}/%2f"),
        _ => uri.to_owned(),
    }
}

/// The figures of the pairing of `caller` and `responder`.
pub fn find<'a>(results: &'a [Pairing], caller: &str, responder: &str) -> Option<&'a Figures> {
    results.iter().find(|p| p.caller == caller && p.responder == responder).map(|p| &p.figures)
}

enum Responder {
    Bare(BareResponder),
    Framework(micro_framework::runner::RunningService),
}

impl Responder {
    async fn stop(self) -> micro_framework::Result<()> {
        match self {
            Responder::Bare(bare) => bare.stop().await,
            Responder::Framework(service) => service.stop().await,
        }
    }
}

/// A bare lapin responder on the service's request queue.
struct BareResponder {
    connection: Connection,
    queue: String,
}

impl BareResponder {
    /// Serve `service`; `blocking`: compute each reply on tokio's blocking pool, as the
    /// framework runs a sync target, rather than on the request's task.
    async fn start(
        uri: &str,
        config: &Config,
        blocking: bool,
        service: &str,
    ) -> micro_framework::Result<Self> {
        let connection =
            Connection::connect(uri, ConnectionProperties::default()).await.map_err(lapin_error)?;
        let channel = connection.create_channel().await.map_err(lapin_error)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(lapin_error)?;
        channel
            .basic_qos(config.effective_prefetch(), BasicQosOptions::default())
            .await
            .map_err(lapin_error)?;
        let queue = format!("rpc-{service}");
        declare_exchange(&channel).await?;
        durable_bound_queue(&channel, &queue, EXCHANGE, &format!("{service}.*"))
            .await
            .map_err(lapin_error)?;
        let mut incoming = channel
            .basic_consume(
                queue.as_str().into(),
                "bare-responder".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lapin_error)?;
        tokio::spawn(async move {
            while let Some(Ok(mut delivery)) = incoming.next().await {
                let channel = channel.clone();
                tokio::spawn(async move {
                    let body = std::mem::take(&mut delivery.data);
                    let answer = move || {
                        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
                        serde_json::to_vec(&json!({ "result": request["args"][0], "error": null }))
                            .unwrap_or_default()
                    };
                    let reply = if blocking {
                        tokio::task::spawn_blocking(answer).await.unwrap_or_default()
                    } else {
                        answer()
                    };
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
                            EXCHANGE.into(),
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
        Ok(BareResponder { connection, queue })
    }

    async fn stop(self) -> micro_framework::Result<()> {
        let channel = self.connection.create_channel().await.map_err(lapin_error)?;
        channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(lapin_error)?;
        let _ = self.connection.close(200, "bench done".into()).await;
        Ok(())
    }
}

async fn declare_exchange(channel: &Channel) -> micro_framework::Result<()> {
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(lapin_error)
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A bare lapin caller with its own exclusive reply queue, consumed without acks, or with an
/// ack for each reply (`acked`).
#[derive(Clone)]
struct BareCaller {
    channel: Channel,
    persistent: bool,
    reply_to: String,
    pending: Pending,
}

impl BareCaller {
    async fn connect(uri: &str, persistent: bool, acked: bool) -> micro_framework::Result<Self> {
        let connection =
            Connection::connect(uri, ConnectionProperties::default()).await.map_err(lapin_error)?;
        let channel = connection.create_channel().await.map_err(lapin_error)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(lapin_error)?;
        declare_exchange(&channel).await?;
        if acked {
            channel
                .basic_qos(ACKED_REPLY_PREFETCH, BasicQosOptions::default())
                .await
                .map_err(lapin_error)?;
        }
        let replies = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(lapin_error)?;
        let reply_to = replies.name().as_str().to_owned();
        channel
            .queue_bind(
                reply_to.as_str().into(),
                EXCHANGE.into(),
                reply_to.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lapin_error)?;
        let mut reply_stream = channel
            .basic_consume(
                reply_to.as_str().into(),
                "bare-caller".into(),
                BasicConsumeOptions { no_ack: !acked, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(lapin_error)?;
        let pending: Pending = Arc::default();
        let waiting = pending.clone();
        tokio::spawn(async move {
            // the acks go beside the consumer, so that an ack's write holds up no reply
            let mut acks = FuturesUnordered::new();
            loop {
                let delivery = tokio::select! {
                    delivery = reply_stream.next() => delivery,
                    Some(_) = acks.next(), if !acks.is_empty() => continue,
                };
                let Some(Ok(delivery)) = delivery else { break };
                let id =
                    delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
                let waiter = id.and_then(|id| waiting.lock().ok().and_then(|mut p| p.remove(&id)));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(delivery.data);
                }
                if acked {
                    let acker = delivery.acker;
                    acks.push(async move { acker.ack(BasicAckOptions::default()).await });
                }
            }
        });
        Ok(BareCaller { channel, persistent, reply_to, pending })
    }

    async fn call(&self, service: &str, argument: &Value) -> micro_framework::Result<Value> {
        let id = uuid::Uuid::new_v4().to_string();
        let (answer, answered) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id.clone(), answer);
        }
        let body = serde_json::to_vec(&json!({ "args": [argument], "kwargs": {} }))?;
        let properties = BasicProperties::default()
            .with_correlation_id(id.as_str().into())
            .with_reply_to(self.reply_to.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(if self.persistent { 2 } else { 1 });
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let routing_key = format!("{service}.echo");
        self.channel
            .basic_publish(EXCHANGE.into(), routing_key.as_str().into(), options, &body, properties)
            .await
            .map_err(lapin_error)?
            .await
            .map_err(lapin_error)?;
        let reply = answered.await.map_err(|_| Error::Startup("no reply".into()))?;
        let mut reply: Value = serde_json::from_slice(&reply)?;
        Ok(reply["result"].take())
    }
}
