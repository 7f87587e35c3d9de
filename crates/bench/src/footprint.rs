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
//!   (the binary's code) once;
//! - `idle_rss_one_worker`: one worker process of that service (the mean of the 4), and
//!   `idle_binary_one_worker` the pages of the program's file it maps (code, constants);
//! - `idle_rss_floor` and `idle_binary_floor`: the same for the least a worker could be,
//!   this binary started again to build only the runtime a worker builds, with a thread of
//!   its blocking pool and the runtime each waiting on a socket, as a worker's two links do.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpu::children_of;
use crate::workers::rates;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::naming::{event_exchange, event_queue, HandlerType};
use micro_framework::amqp::rpc::naming::rpc_queue;
use micro_framework::amqp::rpc::Args;
use micro_framework::prelude::*;
use micro_framework::Error;

const RUNS: usize = 3;
const MESSAGES: u64 = 2000;
/// How long the service idles after its start before it is measured.
const IDLE: Duration = Duration::from_secs(2);
const IDLE_SERVICE: &str = "idle-service";
const IDLE_FLOOR: &str = "idle-floor";
/// What a measured idle process prints once it started.
const STARTED: &str = "started with";

fn noop() {}

/// The arguments of `echo`.
#[derive(serde::Deserialize)]
struct EchoArgs {
    x: serde_json::Value,
}

fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> serde_json::Value {
    x
}

/// When this process was started as a measured idle process (the idle service, one of its
/// worker processes, or the floor): run it and return `Some` once it stops; `None` otherwise.
pub fn serve_idle_service() -> Option<micro_framework::Result<()>> {
    match std::env::args().nth(1).as_deref() {
        Some(IDLE_SERVICE) => {}
        Some(IDLE_FLOOR) => return Some(idle_floor()),
        _ => return None,
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

/// The least a worker process could be: the runtime a worker builds (one runtime thread and
/// a blocking pool), a thread of the pool in a blocking read of a socket (a worker's call
/// thread on its calls link) and the runtime reading another (its control link), forever.
fn idle_floor() -> micro_framework::Result<()> {
    use std::io::Read;
    use tokio::io::AsyncReadExt;

    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async {
        let (calls, _calls_peer) = std::os::unix::net::UnixStream::pair()?;
        let (mut control, _control_peer) = tokio::net::UnixStream::pair()?;
        let call_thread = tokio::task::spawn_blocking(move || (&calls).read(&mut [0u8; 1]));
        eprintln!("floor process {STARTED} its runtime");
        let mut byte = [0u8; 1];
        tokio::select! {
            read = control.read(&mut byte) => read.map(drop)?,
            read = call_thread => read.map_err(std::io::Error::other)?.map(drop)?,
        }
        Ok(())
    })
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
    /// Resident memory of one of those worker processes (the mean of the 4, MB).
    pub idle_rss_worker_mb: f64,
    /// Of that, the pages of the program's file (MB).
    pub idle_binary_worker_mb: f64,
    /// Resident memory of the floor process: this binary running only a worker's runtime
    /// (MB).
    pub idle_rss_floor_mb: f64,
    /// Of that, the pages of the program's file (MB).
    pub idle_binary_floor_mb: f64,
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
    let runs =
        |mode| (0..RUNS).map(|_| idle_footprint(&broker, mode)).collect::<Result<Vec<_>, _>>();
    let (thread, process) = (runs("thread")?, runs("process")?);
    let total = |runs: &[Vec<Memory>]| Memory::median(runs.iter().map(|run| Memory::sum(run)));
    let (thread_total, process_total) = (total(&thread), total(&process));
    // each run's processes: the service first, then its workers
    let worker = Memory::median(process.iter().map(|run| Memory::mean(&run[1..])));
    let floors = (0..RUNS).map(|_| floor_footprint()).collect::<Result<Vec<_>, _>>()?;
    let floor = Memory::median(floors.into_iter());
    Ok(Footprint {
        overhead_memory_us: memory.0,
        overhead_rabbitmq_us: overheads[1].map(|(wall, _)| wall),
        cpu_overhead_memory_us: memory.1,
        cpu_overhead_rabbitmq_us: overheads[1].map(|(_, cpu)| cpu),
        idle_rss_thread_mb: thread_total.rss,
        idle_private_thread_mb: thread_total.private,
        idle_anon_thread_mb: thread_total.anon,
        idle_rss_process_mb: process_total.rss,
        idle_pss_process_mb: process_total.pss,
        idle_rss_worker_mb: worker.rss,
        idle_binary_worker_mb: worker.binary,
        idle_rss_floor_mb: floor.rss,
        idle_binary_floor_mb: floor.binary,
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
#[derive(Clone, Copy, Debug)]
struct Memory {
    /// Resident (`VmRSS`).
    rss: f64,
    /// Proportional: each shared page divided among the processes that map it (`Pss`).
    pss: f64,
    /// Mapped by no other process (`Private_Clean` + `Private_Dirty`).
    private: f64,
    /// Anonymous: heap, stacks, buffers (`Anonymous`).
    anon: f64,
    /// Resident pages mapped from the program's file: its code and constants.
    binary: f64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        Memory {
            rss: status_kb(pid, "VmRSS:") / 1000.0,
            pss: rollup_kb(pid, "Pss:") / 1000.0,
            private: (rollup_kb(pid, "Private_Clean:") + rollup_kb(pid, "Private_Dirty:")) / 1000.0,
            anon: rollup_kb(pid, "Anonymous:") / 1000.0,
            binary: binary_kb(pid) / 1000.0,
        }
    }

    /// Each field through `combine` over the fields of `memories`.
    fn each(memories: &[Memory], combine: impl Fn(Vec<f64>) -> f64) -> Memory {
        let field = |of: fn(&Memory) -> f64| combine(memories.iter().map(of).collect());
        Memory {
            rss: field(|memory| memory.rss),
            pss: field(|memory| memory.pss),
            private: field(|memory| memory.private),
            anon: field(|memory| memory.anon),
            binary: field(|memory| memory.binary),
        }
    }

    fn sum(memories: &[Memory]) -> Memory {
        Memory::each(memories, |values| values.iter().sum())
    }

    fn mean(memories: &[Memory]) -> Memory {
        Memory::each(memories, |values| values.iter().sum::<f64>() / values.len().max(1) as f64)
    }

    fn median(memories: impl Iterator<Item = Memory>) -> Memory {
        Memory::each(&memories.collect::<Vec<_>>(), median)
    }
}

/// Start the idle service in `mode`, wait until it has started and idled, and return the
/// memory of it and of each of its worker processes (the service first).
fn idle_footprint(broker: &str, mode: &str) -> micro_framework::Result<Vec<Memory>> {
    let service = format!("bench_footprint_{}", uuid::Uuid::new_v4().simple());
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg(IDLE_SERVICE)
        .env("AMQP_URI", broker)
        .env("SERVICE_NAME", &service)
        .env("WORKER_MODE", mode)
        .env("MAX_WORKERS", "4")
        .env("RUST_LOG", "info")
        .env_remove("LOG_FORMAT");
    let (mut child, measured) = idled(command)?;
    // SIGTERM: a graceful stop, which closes the connection.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    delete_queues(broker, &service)?;
    measured
}

/// Start the floor process, wait until it has started and idled, and return its memory.
fn floor_footprint() -> micro_framework::Result<Memory> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg(IDLE_FLOOR);
    let (mut child, measured) = idled(command)?;
    let _ = child.kill();
    let _ = child.wait();
    measured.map(|processes| Memory::sum(&processes))
}

/// Start `command`, wait until it has started and idled, and return it with the memory of
/// it and of each of its child processes (itself first), for the caller to stop it.
fn idled(
    mut command: Command,
) -> micro_framework::Result<(Child, micro_framework::Result<Vec<Memory>>)> {
    let mut child =
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let measured = wait_started(&mut child).map(|()| {
        std::thread::sleep(IDLE);
        let pids = std::iter::once(child.id()).chain(children_of(child.id()));
        pids.map(Memory::of).collect()
    });
    Ok((child, measured))
}

/// Delete the queues the idle service declared (its work queues are durable), and the event
/// exchange it declared for its listener.
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
        transport.delete_exchange(&event_exchange(&config, "bench_src").name).await?;
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
            if line.contains(STARTED) {
                let _ = started.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    wait.recv_timeout(deadline - Instant::now())
        .map_err(|_| Error::Startup("the idle process did not start in 30 s".into()))
}

/// /proc writes `kB` for KiB; the figures are in kB of 1,000 bytes.
const KB_PER_KIB: f64 = 1.024;

fn status_kb(pid: u32, field: &str) -> f64 {
    field_kb(&format!("/proc/{pid}/status"), field)
}

fn rollup_kb(pid: u32, field: &str) -> f64 {
    field_kb(&format!("/proc/{pid}/smaps_rollup"), field)
}

/// The resident pages (kB) of the mappings of `pid`'s own program file.
fn binary_kb(pid: u32) -> f64 {
    let Ok(program) = std::fs::read_link(format!("/proc/{pid}/exe")) else { return 0.0 };
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    mapped_rss_kib(&smaps, &program.to_string_lossy()) * KB_PER_KIB
}

/// The `Rss:` (KiB) of the mappings of `file` in the text of a `/proc/PID/smaps`: each
/// mapping's header line names its file, its `Rss:` line follows.
fn mapped_rss_kib(smaps: &str, file: &str) -> f64 {
    let mut in_file = false;
    let mut kib = 0.0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if in_file {
                kib += kib_value(rss).unwrap_or(0.0);
            }
        } else if line.split_whitespace().next().is_some_and(is_address_range) {
            in_file = line.split_whitespace().nth(5) == Some(file);
        }
    }
    kib
}

/// Whether `word` is the `start-end` address range that opens a mapping in `smaps`.
fn is_address_range(word: &str) -> bool {
    word.split_once('-').is_some_and(|(start, end)| {
        [start, end].iter().all(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
    })
}

/// A `Field:   1234 kB` line of a /proc file, in kB.
fn field_kb(path: &str, field: &str) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text.lines().find(|line| line.starts_with(field));
    let kib = line.and_then(|line| kib_value(line.split_once(':')?.1));
    kib.unwrap_or(0.0) * KB_PER_KIB
}

/// The number of a /proc field's value `   1234 kB` (KiB).
fn kib_value(value: &str) -> Option<f64> {
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{kib_value, mapped_rss_kib};

    #[test]
    fn the_rss_of_a_files_mappings_is_added_up_and_others_left_out() {
        let smaps = "\
55a463984000-55a463c7a000 r--p 00000000 00:2a 123 /bin/service
Size:               3032 kB
Rss:                 796 kB
AnonHugePages:         0 kB
55a463c7a000-55a464471000 r-xp 002f6000 00:2a 123 /bin/service
Rss:                3716 kB
7fd591308000-7fd59132e000 r--p 00000000 00:2a 456 /usr/lib/libc.so.6
Rss:                 152 kB
7ffdd1f71000-7ffdd1f92000 rw-p 00000000 00:00 0 [stack]
Rss:                  60 kB
";
        assert_eq!(mapped_rss_kib(smaps, "/bin/service"), 4512.0);
        assert_eq!(mapped_rss_kib(smaps, "/usr/lib/libc.so.6"), 152.0);
        assert_eq!(mapped_rss_kib(smaps, "/bin/other"), 0.0);
    }

    #[test]
    fn a_proc_fields_value_is_read_in_kib() {
        assert_eq!(kib_value("    8964 kB"), Some(8964.0));
        assert_eq!(kib_value("\t 12 kB"), Some(12.0));
        assert_eq!(kib_value(" 3 pages"), None);
    }
}
