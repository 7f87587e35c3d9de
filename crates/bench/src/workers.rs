//! Thread mode against process mode: the same no-op route drained in both, on one broker.
//!
//! The route is `fn noop` on `EventListener("bench_src", "work")`, `MAX_WORKERS` from the
//! environment (default 4); each event is `{"n": i, "padding": "xx.."}` with `PAYLOAD_BYTES`
//! bytes of padding (default 0). A binary that measures it re-executes itself for its worker
//! processes, which call [`serve_worker`] first thing.

use std::time::{Duration, Instant};

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::naming::{event_exchange, event_queue, HandlerType};
use micro_framework::config::WorkerMode;
use micro_framework::prelude::*;
use micro_framework::spawners::process::WORKER_SOCKET_ENV;
use micro_framework::transport::BindingSpec;
use micro_framework::Error;

use crate::cpu::{children_cpu, own_cpu};
use crate::payload_bytes;

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

/// When this process is a worker process of a measured service: serve its calls (as
/// `Runner::start` does) and return `Some` once the service hangs up; `None` otherwise.
pub fn serve_worker() -> Option<micro_framework::Result<()>> {
    std::env::var_os(WORKER_SOCKET_ENV)?;
    Some(config_for("memory://", WorkerMode::Process).and_then(|config| runner(config).start()))
}

/// Calls per second in thread mode and in process mode on `uri`, and the per-call overhead
/// of process mode in µs (1/rate_process − 1/rate_thread).
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// Calls per second in thread mode.
    pub thread: f64,
    /// Calls per second in process mode.
    pub process: f64,
    /// CPU time per call in thread mode (µs): this process's.
    pub thread_cpu_us: f64,
    /// CPU time per call in process mode (µs): this process's and its worker processes'.
    pub process_cpu_us: f64,
}

impl Rates {
    /// What process mode adds to each call, in µs.
    pub fn overhead_us(&self) -> f64 {
        (1.0 / self.process - 1.0 / self.thread) * 1e6
    }

    /// The CPU time process mode adds to each call, in µs: less sensitive than the rates to
    /// other programs sharing the machine.
    pub fn cpu_overhead_us(&self) -> f64 {
        self.process_cpu_us - self.thread_cpu_us
    }
}

/// What one drain measured.
struct Drained {
    /// Calls per second.
    rate: f64,
    /// CPU time per call (µs), worker processes included.
    cpu_us: f64,
}

/// Drain `messages` pre-filled no-op events in thread mode, then in process mode, on `uri`.
pub async fn rates(uri: &str, messages: u64) -> micro_framework::Result<Rates> {
    let thread = drain(uri, WorkerMode::Thread, messages).await?;
    let process = drain(uri, WorkerMode::Process, messages).await?;
    Ok(Rates {
        thread: thread.rate,
        process: process.rate,
        thread_cpu_us: thread.cpu_us,
        process_cpu_us: process.cpu_us,
    })
}

/// Calls per second draining `messages` pre-filled events in `mode`, and the CPU time per
/// call: this process's (getrusage; the in-process broker's included) and its worker
/// processes' (/proc). Both are measured from the consumer's start (worker processes already
/// started) until the queue is empty (the last prefetch-full of calls may still be running
/// then: an error of at most MAX_WORKERS / MESSAGES).
async fn drain(uri: &str, mode: WorkerMode, messages: u64) -> micro_framework::Result<Drained> {
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
    let padding = "x".repeat(payload_bytes(0)?);
    for i in 0..messages {
        producer.dispatch("work", &serde_json::json!({"n": i, "padding": padding})).await?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(runner(config).run_until(async {
        let _ = stopped.await;
    }));
    while transport.queue_info(&queue.name).await?.consumer_count == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cpu = || own_cpu() + children_cpu();
    let (started, cpu_before) = (Instant::now(), cpu());
    while transport.queue_info(&queue.name).await?.message_count > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (elapsed, cpu_spent) = (started.elapsed(), cpu().saturating_sub(cpu_before));
    let _ = stop.send(());
    service.await.map_err(|e| Error::Startup(e.to_string()))??;
    for name in [format!("{}.dlq", queue.name), queue.name.clone()] {
        transport.delete_queue(&name).await?;
    }
    transport.delete_exchange(&exchange.name).await?;
    transport.close().await;
    Ok(Drained {
        rate: messages as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu_spent.as_secs_f64() * 1e6 / messages as f64,
    })
}
