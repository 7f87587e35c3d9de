//! The events benchmark's measurement (see `bench_events`).

use std::time::{Duration, Instant};

use crate::bare::durable_bound_queue;
use crate::cpu::own_cpu;
use futures::stream::{self, StreamExt, TryStreamExt};
use futures::TryFutureExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::naming::event_exchange;
use micro_framework::prelude::*;
use micro_framework::Error;

const IN_FLIGHT: usize = 64;
const ROUNDS: usize = 3;

fn noop() {}

/// The measured service's one route: `noop` on `EventListener("bench_src", "ping")`.
pub fn routes() -> Vec<Route> {
    vec![Route::new(noop).entrypoint(EventListener::new("bench_src", "ping"))]
}

/// The service's config: the environment's, with `SERVICE_NAME` `bench_svc` and RabbitMQ on
/// 127.0.0.1 by default.
pub fn config() -> micro_framework::Result<Config> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("SERVICE_NAME").is_err() {
        vars.push(("SERVICE_NAME".into(), "bench_svc".into()));
    }
    if std::env::var("AMQP_URI").is_err() {
        vars.push(("AMQP_URI".into(), "amqp://guest:guest@127.0.0.1:5672/".into()));
    }
    Ok(Config::from_vars(vars)?)
}

fn lapin_error(error: lapin::Error) -> Error {
    Error::Startup(format!("bare lapin: {error}"))
}

/// Publish `messages` events ROUNDS times each way, then drain them, bare lapin and the
/// service, on `config`'s broker with its `MAX_WORKERS` (`bench_svc`'s config: see [`config`]).
pub async fn measure(config: &Config, messages: usize) -> micro_framework::Result<EventFigures> {
    let config = config.clone();
    // lapin reads an empty path as the empty vhost; the framework reads it as "/".
    let uri = match config.amqp_uri.strip_suffix('/') {
        Some(base) if base.matches('/').count() == 2 => format!("{base}/%2f"),
        _ => config.amqp_uri.clone(),
    };
    let prefetch = config.effective_prefetch();
    let padding = "x".repeat(crate::payload_bytes(100)?);
    let payload = serde_json::to_vec(&serde_json::json!({ "id": 1, "data": padding }))?;
    println!(
        "bench_events: {ROUNDS} x {messages} events, prefetch/MAX_WORKERS {prefetch}, {IN_FLIGHT} publishes \
         in flight, broker {}",
        config.masked_amqp_uri()
    );

    // Topology: the service's queue ("ping") and a bare queue ("ping-bare") on one exchange.
    let source = config.clone().with_service_name("bench_src".into());
    let transport = micro_framework::transport::connect(&source).await?;
    let producer = Producer::new(transport.clone(), &source);
    let exchange = event_exchange(&source, "bench_src").name;
    let setup = micro_framework::Runner::new(routes(), config.clone()).spawn().await?;
    setup.stop().await?;
    let service_queue = format!("evt-bench_src-ping--{}.noop", config.service_name);
    transport.purge_queue(&service_queue).await?;

    let connection =
        Connection::connect(&uri, ConnectionProperties::default()).await.map_err(lapin_error)?;
    let channel = connection.create_channel().await.map_err(lapin_error)?;
    let bare_queue = format!("bench-bare-{}", uuid::Uuid::new_v4().simple());
    durable_bound_queue(&channel, &bare_queue, &exchange, "ping-bare")
        .await
        .map_err(lapin_error)?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(lapin_error)?;

    // 1. Publishing with confirms: ROUNDS alternating rounds, best rate of each.
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2);
    let event: serde_json::Value = serde_json::from_slice(&payload)?;
    let (mut lapin_publish, mut producer_publish) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        stream::iter(0..messages)
            .map(|_| {
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "ping-bare".into(),
                        BasicPublishOptions::default(),
                        &payload,
                        properties.clone(),
                    )
                    .and_then(|confirm| confirm)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(
                0usize,
                |nacks, confirm| async move { Ok(nacks + usize::from(!confirm.is_ack())) },
            )
            .await
            .map_err(lapin_error)
            .and_then(|nacks| match nacks {
                0 => Ok(()),
                n => Err(Error::Startup(format!("bare lapin: {n} publishes nacked"))),
            })?;
        lapin_publish = lapin_publish.max(rate(messages, started.elapsed()));

        let started = Instant::now();
        stream::iter(0..messages)
            .map(|_| producer.dispatch("ping", &event))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        producer_publish = producer_publish.max(rate(messages, started.elapsed()));
    }
    let messages = messages * ROUNDS;

    // 2. Draining the pre-filled queues.
    let consumer_channel = connection.create_channel().await.map_err(lapin_error)?;
    consumer_channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(lapin_error)?;
    let mut consumer = consumer_channel
        .basic_consume(
            bare_queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(lapin_error)?;
    let (started, cpu_before) = (Instant::now(), own_cpu());
    for _ in 0..messages {
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| Error::Startup("bare consumer ended".into()))?
            .map_err(lapin_error)?;
        delivery.ack(BasicAckOptions::default()).await.map_err(lapin_error)?;
    }
    let lapin_drain = rate(messages, started.elapsed());
    let lapin_cpu = per_message(messages, own_cpu().saturating_sub(cpu_before));

    let (started, cpu_before) = (Instant::now(), own_cpu());
    let service = micro_framework::Runner::new(routes(), config.clone()).spawn().await?;
    let route = service.route("noop").ok_or_else(|| Error::Startup("no route noop".into()))?;
    tokio::time::timeout(Duration::from_secs(600), route.stats().wait_settled(messages as u64))
        .await
        .map_err(|_| Error::Timeout("bench_svc did not drain its queue".into()))?;
    let service_drain = rate(messages, started.elapsed());
    let service_cpu = per_message(messages, own_cpu().saturating_sub(cpu_before));
    service.stop().await?;

    channel
        .queue_delete(bare_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .map_err(lapin_error)?;
    let _ = connection.close(200, "bench done".into()).await;
    for queue in [format!("{service_queue}.dlq"), service_queue] {
        transport.delete_queue(&queue).await?;
    }
    transport.delete_exchange(&exchange).await?;
    transport.close().await;

    Ok(EventFigures {
        lapin_publish,
        producer_publish,
        lapin_drain,
        service_drain,
        lapin_cpu_us: lapin_cpu,
        service_cpu_us: service_cpu,
    })
}

/// Events per second, and CPU time of this process per drained event (µs).
pub struct EventFigures {
    pub lapin_publish: f64,
    pub producer_publish: f64,
    pub lapin_drain: f64,
    pub service_drain: f64,
    pub lapin_cpu_us: f64,
    pub service_cpu_us: f64,
}

/// CPU time per message, in microseconds.
fn per_message(messages: usize, cpu: Duration) -> f64 {
    cpu.as_secs_f64() * 1e6 / messages as f64
}

fn rate(messages: usize, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64()
}
