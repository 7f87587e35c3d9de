//! The footprint figures: `cargo run --release -p micro-framework-bench --bin bench_footprint`.
//!
//! Prints one line per figure, `label value unit`, each the median of 3 runs:
//!
//! - `process_overhead_memory` / `process_overhead_rabbitmq`: what process mode adds to a
//!   no-op call (µs), as `bench_workers` measures it (2,000 events, `MAX_WORKERS=4`), and
//!   `process_cpu_overhead_memory` / `process_cpu_overhead_rabbitmq` the CPU time it adds
//!   (µs; the service's and its workers', not the broker's);
//! - `idle_rss_thread`: the resident memory (`VmRSS`, MB) of an idle service in thread mode,
//!   2 s after it started: one event route and one RPC route, on RabbitMQ (`AMQP_URI`,
//!   default `amqp://guest:guest@127.0.0.1:5672/`) or, if that cannot be reached, on the
//!   in-process broker;
//! - `idle_private_thread`: of that, the pages no other process maps (`Private_Clean` +
//!   `Private_Dirty`), and `idle_anon_thread` its anonymous memory alone (heap, stacks,
//!   buffers), the rest being mapped from files (the binary, libc);
//! - `idle_rss_process_4_workers`: the same service in process mode with 4 worker processes,
//!   service and workers added up; `idle_pss_process_4_workers` counts the pages they share
//!   (the binary's code) once;
//! - `idle_rss_one_worker`: one of its worker processes (the mean of the 4), and
//!   `idle_binary_one_worker` the pages of the program's file it maps;
//! - `idle_rss_floor` and `idle_binary_floor`: the same for the least a worker could be, this
//!   binary started again to run only a worker's runtime, waiting on two sockets.

use micro_framework_bench::footprint::{measure, serve_idle_service};
use micro_framework_bench::workers::serve_worker;

fn main() -> micro_framework::Result<()> {
    if let Some(served) = serve_idle_service() {
        return served;
    }
    if let Some(served) = serve_worker() {
        return served;
    }
    let rabbit =
        std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = measure(&runtime, &rabbit)?;
    println!("process_overhead_memory {:.0} us", figures.overhead_memory_us);
    if let Some(overhead) = figures.overhead_rabbitmq_us {
        println!("process_overhead_rabbitmq {overhead:.0} us");
    }
    println!("process_cpu_overhead_memory {:.0} us", figures.cpu_overhead_memory_us);
    if let Some(overhead) = figures.cpu_overhead_rabbitmq_us {
        println!("process_cpu_overhead_rabbitmq {overhead:.0} us");
    }
    println!("idle_rss_thread {:.1} MB", figures.idle_rss_thread_mb);
    println!("idle_private_thread {:.1} MB", figures.idle_private_thread_mb);
    println!("idle_anon_thread {:.1} MB", figures.idle_anon_thread_mb);
    println!("idle_rss_process_4_workers {:.1} MB", figures.idle_rss_process_mb);
    println!("idle_pss_process_4_workers {:.1} MB", figures.idle_pss_process_mb);
    println!("idle_rss_one_worker {:.1} MB", figures.idle_rss_worker_mb);
    println!("idle_binary_one_worker {:.1} MB", figures.idle_binary_worker_mb);
    println!("idle_rss_floor {:.1} MB", figures.idle_rss_floor_mb);
    println!("idle_binary_floor {:.1} MB", figures.idle_binary_floor_mb);
    Ok(())
}
