//! The footprint figures (see `bench_footprint`), each the median of 3 runs:
//!
//! - `process_overhead_memory` / `process_overhead_rabbitmq`: what process mode adds to a
//!   no-op call (µs), as `bench_workers` measures it (2,000 events, `MAX_WORKERS=4`), and
//!   `process_cpu_overhead_*` the CPU time it adds to a call (µs; the service's and its
//!   workers', not the broker's), which other programs sharing the machine disturb less;
//! - `idle_rss_thread`: the resident memory (`VmRSS`, MB) of an idle service in thread mode,
//!   2 s after it started: one event route and one RPC route, on RabbitMQ (`AMQP_URI`,
//!   default `amqp://guest:guest@127.0.0.1:5672/`) or, if that cannot be reached, on the
//!   in-process broker;
//! - `idle_private_thread`: of that, the pages no other process maps (`Private_Clean` +
//!   `Private_Dirty` of `/proc/PID/smaps_rollup`): its own memory and the pages of the
//!   binary that no other process has mapped; `idle_anon_thread`: its own memory alone
//!   (`Anonymous`: heap, stacks, buffers), the rest being pages mapped from files;
//! - `idle_rss_process_4_workers`: the same service in process mode with 4 worker processes,
//!   service and workers added up; `idle_pss_process_4_workers` counts the pages they share
//!   (the binary's code) once.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpu::children_of;
use crate::workers::rates;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::naming::{event_queue, HandlerType};
use micro_framework::amqp::rpc::naming::rpc_queue;
use micro_framework::amqp::rpc::Args;
use micro_framework::prelude::*;
use micro_framework::Error;

const RUNS: usize = 3;
const MESSAGES: u64 = 2000;
/// How long the service idles after its start before it is measured.
const IDLE: Duration = Duration::from_secs(2);
const IDLE_SERVICE: &str = "idle-service";

fn noop() {}

/// The arguments of `echo`.
#[derive(serde::Deserialize)]
struct EchoArgs {
    x: serde_json::Value,
}

fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> serde_json::Value {
    x
}

/// When this process was started as the measured idle service (or one of its worker
/// processes): run it and return `Some` once it stops; `None` otherwise.
pub fn serve_idle_service() -> Option<micro_framework::Result<()>> {
    if std::env::args().nth(1).as_deref() != Some(IDLE_SERVICE) {
        return None;
    }
    let routes = vec![
        Route::new(noop).entrypoint(EventListener::new("bench_src", "idle")),
        Route::new(echo).entrypoint(RPCListener::new()),
    ];
    Some(
        Config::from_env()
            .map_err(Into::into)
            .and_then(|config| Runner::new(routes, config).start()),
    )
}

/// The footprint figures, each the median of 3 runs.
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    /// What process mode adds to a no-op call on the in-process broker (µs).
    pub overhead_memory_us: f64,
    /// The same on RabbitMQ (µs); `None` when RabbitMQ cannot be reached.
    pub overhead_rabbitmq_us: Option<f64>,
    /// The CPU time process mode adds to a no-op call on the in-process broker (µs).
    pub cpu_overhead_memory_us: f64,
    /// The same on RabbitMQ, the broker's own not counted (µs); `None` when unreachable.
    pub cpu_overhead_rabbitmq_us: Option<f64>,
    /// Resident memory of the idle service in thread mode (MB).
    pub idle_rss_thread_mb: f64,
    /// Of that, the pages no other process maps (MB).
    pub idle_private_thread_mb: f64,
    /// Of that, its anonymous memory: heap, stacks, buffers (MB).
    pub idle_anon_thread_mb: f64,
    /// Resident memory of the idle service in process mode with 4 workers, added up (MB).
    pub idle_rss_process_mb: f64,
    /// The same, shared pages counted once (PSS, MB).
    pub idle_pss_process_mb: f64,
}

/// Measure the footprint figures, RabbitMQ at `rabbit` (the in-process broker for the idle
/// services when it cannot be reached). The binary must call [`serve_idle_service`] and
/// [`serve_worker`] first thing in `main`: the idle service re-executes it.
pub fn measure(
    runtime: &tokio::runtime::Runtime,
    rabbit: &str,
) -> micro_framework::Result<Footprint> {
    let mut overheads = Vec::new();
    for uri in ["memory://bench-footprint", rabbit] {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            match runtime.block_on(rates(uri, MESSAGES)) {
                Ok(rates) => runs.push(rates),
                Err(error) => {
                    eprintln!("{}: skipped ({error})", micro_framework::config::mask_uri(uri));
                    break;
                }
            }
        }
        overheads.push((runs.len() == RUNS).then(|| {
            let wall = median(runs.iter().map(|rates| rates.overhead_us()).collect());
            let cpu = median(runs.iter().map(|rates| rates.cpu_overhead_us()).collect());
            (wall, cpu)
        }));
    }
    let memory = overheads[0]
        .ok_or_else(|| Error::Startup("process overhead on memory:// not measured".into()))?;
    let broker = if reachable(rabbit) { rabbit.to_owned() } else { "memory://".to_owned() };
    eprintln!("idle services on {}", micro_framework::config::mask_uri(&broker));
    let mut idle = Vec::new();
    for mode in ["thread", "process"] {
        let runs =
            (0..RUNS).map(|_| idle_footprint(&broker, mode)).collect::<Result<Vec<_>, _>>()?;
        let figure = |of: fn(&Memory) -> f64| median(runs.iter().map(of).collect());
        idle.push(Memory {
            rss: figure(|memory| memory.rss),
            pss: figure(|memory| memory.pss),
            private: figure(|memory| memory.private),
            anon: figure(|memory| memory.anon),
        });
    }
    Ok(Footprint {
        overhead_memory_us: memory.0,
        overhead_rabbitmq_us: overheads[1].map(|(wall, _)| wall),
        cpu_overhead_memory_us: memory.1,
        cpu_overhead_rabbitmq_us: overheads[1].map(|(_, cpu)| cpu),
        idle_rss_thread_mb: idle[0].rss,
        idle_private_thread_mb: idle[0].private,
        idle_anon_thread_mb: idle[0].anon,
        idle_rss_process_mb: idle[1].rss,
        idle_pss_process_mb: idle[1].pss,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn reachable(uri: &str) -> bool {
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return false };
    runtime.block_on(async {
        let vars = [("SERVICE_NAME", "bench_footprint"), ("AMQP_URI", uri)];
        let Ok(config) = Config::from_vars(vars.map(|(key, value)| (key.into(), value.into())))
        else {
            return false;
        };
        match micro_framework::transport::connect(&config).await {
            Ok(transport) => {
                transport.close().await;
                true
            }
            Err(_) => false,
        }
    })
}

/// The memory of processes, added up (MB).
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    /// Resident (`VmRSS`).
    rss: f64,
    /// Proportional: each shared page divided among the processes that map it (`Pss`).
    pss: f64,
    /// Mapped by no other process (`Private_Clean` + `Private_Dirty`).
    private: f64,
    /// Anonymous: heap, stacks, buffers (`Anonymous`).
    anon: f64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        Memory {
            rss: status_kb(pid, "VmRSS:") / 1000.0,
            pss: rollup_kb(pid, "Pss:") / 1000.0,
            private: (rollup_kb(pid, "Private_Clean:") + rollup_kb(pid, "Private_Dirty:")) / 1000.0,
            anon: rollup_kb(pid, "Anonymous:") / 1000.0,
        }
    }

    fn add(self, other: Memory) -> Memory {
        Memory {
            rss: self.rss + other.rss,
            pss: self.pss + other.pss,
            private: self.private + other.private,
            anon: self.anon + other.anon,
        }
    }
}

/// Start the idle service in `mode`, wait until it has started and idled, and return the
/// memory of it and its worker processes, added up.
fn idle_footprint(broker: &str, mode: &str) -> micro_framework::Result<Memory> {
    let service = format!("bench_footprint_{}", uuid::Uuid::new_v4().simple());
    let mut child = Command::new(std::env::current_exe()?)
        .arg(IDLE_SERVICE)
        .env("AMQP_URI", broker)
        .env("SERVICE_NAME", &service)
        .env("WORKER_MODE", mode)
        .env("MAX_WORKERS", "4")
        .env("RUST_LOG", "info")
        .env_remove("LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let measured = wait_started(&mut child).map(|()| {
        std::thread::sleep(IDLE);
        let pids = std::iter::once(child.id()).chain(children_of(child.id()));
        pids.map(Memory::of).fold(Memory::default(), Memory::add)
    });
    // SIGTERM: a graceful stop, which closes the connection.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    delete_queues(broker, &service)?;
    measured
}

/// Delete the queues the idle service declared (its work queues are durable).
fn delete_queues(broker: &str, service: &str) -> micro_framework::Result<()> {
    if broker.starts_with("memory://") {
        return Ok(());
    }
    let vars = [("SERVICE_NAME", service), ("AMQP_URI", broker)];
    let config = Config::from_vars(vars.map(|(key, value)| (key.into(), value.into())))?;
    let event = event_queue(&config, &HandlerType::ServicePool, "bench_src", "idle", "noop");
    let names = [format!("{}.dlq", event.name), event.name, rpc_queue(&config).name];
    tokio::runtime::Runtime::new()?.block_on(async {
        let transport = micro_framework::transport::connect(&config).await?;
        for name in &names {
            transport.delete_queue(name).await?;
        }
        transport.close().await;
        Ok(())
    })
}

/// Read the service's log until it says it started (30 s at most); the rest of the log is
/// drained in the background so the service never blocks on it.
fn wait_started(child: &mut Child) -> micro_framework::Result<()> {
    let stderr = child.stderr.take().ok_or_else(|| Error::Startup("no stderr".into()))?;
    let (started, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("started with") {
                let _ = started.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    wait.recv_timeout(deadline - Instant::now())
        .map_err(|_| Error::Startup("the idle service did not start in 30 s".into()))
}

fn status_kb(pid: u32, field: &str) -> f64 {
    field_kb(&format!("/proc/{pid}/status"), field)
}

fn rollup_kb(pid: u32, field: &str) -> f64 {
    field_kb(&format!("/proc/{pid}/smaps_rollup"), field)
}

/// A `Field:   1234 kB` line of a /proc file, in kB (KiB).
fn field_kb(path: &str, field: &str) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text.lines().find(|line| line.starts_with(field));
    let kb = line.and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok());
    kb.unwrap_or(0.0) * 1.024
}
