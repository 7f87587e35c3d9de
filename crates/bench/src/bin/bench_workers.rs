//! Thread mode against process mode:
//! `cargo run --release -p micro-framework-bench --bin bench_workers [-- MESSAGES]`.
//!
//! The same no-op route (`fn noop` on `EventListener("bench_src", "work")`, `MAX_WORKERS` from
//! the environment, default 4) drains MESSAGES (default 2000) pre-filled events in `thread`
//! and in `process` mode, on the in-process broker and on RabbitMQ (`AMQP_URI`, default
//! `amqp://guest:guest@127.0.0.1:5672/`, skipped if unreachable), in one run. It prints calls
//! per second and the per-call overhead of process mode (1/rate_process − 1/rate_thread).
//! The time is measured until the queue is empty (the last prefetch-full of calls may still be
//! running then: an error of at most MAX_WORKERS / MESSAGES).

use std::time::{Duration, Instant};

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::naming::{event_exchange, event_queue, HandlerType};
use micro_framework::config::WorkerMode;
use micro_framework::prelude::*;
use micro_framework::spawners::process::WORKER_SOCKET_ENV;
use micro_framework::transport::BindingSpec;
use micro_framework::Error;

fn noop() {}

fn runner(config: Config) -> Runner {
    let routes = vec![Route::new(noop).entrypoint(EventListener::new("bench_src", "work"))];
    Runner::new(routes, config)
}

fn config_for(uri: &str, mode: WorkerMode) -> micro_framework::Result<Config> {
    let workers = std::env::var("MAX_WORKERS").unwrap_or_else(|_| "4".into());
    Ok(Config::from_vars([
        ("SERVICE_NAME".to_owned(), "bench_workers".to_owned()),
        ("AMQP_URI".to_owned(), uri.to_owned()),
        ("WORKER_MODE".to_owned(), mode.as_str().to_owned()),
        ("MAX_WORKERS".to_owned(), workers),
    ])?)
}

fn main() -> micro_framework::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    if std::env::var(WORKER_SOCKET_ENV).is_ok() {
        // A worker process of a measured service: it only needs the same routes.
        let config = config_for("memory://", WorkerMode::Process)?;
        return runtime.block_on(runner(config).run_until(std::future::pending()));
    }
    let messages: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|e| Error::Startup(format!("MESSAGES: {e}")))?,
        None => 2000,
    };
    let rabbit =
        std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());
    println!("bench_workers: {messages} no-op calls per run");
    for uri in ["memory://bench-workers", rabbit.as_str()] {
        let mut rates = Vec::new();
        for mode in [WorkerMode::Thread, WorkerMode::Process] {
            match runtime.block_on(drain(uri, mode, messages)) {
                Ok(rate) => rates.push(rate),
                Err(error) => {
                    println!("{}: skipped ({error})", mask(uri));
                    break;
                }
            }
        }
        if let [thread, process] = rates[..] {
            let overhead = (1.0 / process - 1.0 / thread) * 1e6;
            println!(
                "{:<40} thread {thread:>8.0} calls/s | process {process:>8.0} calls/s | process overhead {overhead:.0} µs/call",
                mask(uri)
            );
        }
    }
    Ok(())
}

fn mask(uri: &str) -> String {
    micro_framework::config::mask_uri(uri)
}

async fn drain(uri: &str, mode: WorkerMode, messages: u64) -> micro_framework::Result<f64> {
    let config = config_for(uri, mode)?;
    let transport = micro_framework::transport::connect(&config).await?;
    let exchange = event_exchange(&config, "bench_src");
    let queue = event_queue(&config, &HandlerType::ServicePool, "bench_src", "work", "noop");
    transport.declare_exchange(&exchange).await?;
    transport.declare_queue(&queue).await?;
    let binding = BindingSpec {
        queue: queue.name.clone(),
        exchange: exchange.name.clone(),
        routing_key: "work".into(),
        arguments: Default::default(),
    };
    transport.bind_queue(&binding).await?;
    transport.purge_queue(&queue.name).await?;
    let source = config.clone().with_service_name("bench_src".into());
    let producer = Producer::new(transport.clone(), &source);
    for i in 0..messages {
        producer.dispatch("work", &i).await?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(runner(config).run_until(async {
        let _ = stopped.await;
    }));
    // The clock starts when the consumer is attached (worker processes already started).
    while transport.queue_info(&queue.name).await?.consumer_count == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    while transport.queue_info(&queue.name).await?.message_count > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    service.await.map_err(|e| Error::Startup(e.to_string()))??;
    for name in [format!("{}.dlq", queue.name), queue.name.clone()] {
        transport.delete_queue(&name).await?;
    }
    transport.close().await;
    Ok(messages as f64 / elapsed.as_secs_f64())
}
