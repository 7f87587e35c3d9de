//! Thread mode against process mode:
//! `cargo run --release -p micro-framework-bench --bin bench_workers [-- MESSAGES]`.
//!
//! The same no-op route (`fn noop` on `EventListener("bench_src", "work")`, `MAX_WORKERS` from
//! the environment, default 4; `PAYLOAD_BYTES` of padding in each event, default 0) drains
//! MESSAGES (default 2000) pre-filled events in `thread` and in `process` mode, on the
//! in-process broker and on RabbitMQ (`AMQP_URI`, default `amqp://guest:guest@127.0.0.1:5672/`,
//! skipped if unreachable), in one run. It prints calls per second and the per-call overhead
//! of process mode (1/rate_process − 1/rate_thread),
//! then the CPU time per call in both modes (this process's from getrusage, the worker
//! processes' from /proc; on RabbitMQ the broker's is not counted) and their difference.

use micro_framework::Error;
use micro_framework_bench::workers::{rates, serve_worker};

fn main() -> micro_framework::Result<()> {
    if let Some(served) = serve_worker() {
        return served;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let messages: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|e| Error::Startup(format!("MESSAGES: {e}")))?,
        None => 2000,
    };
    let rabbit =
        std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());
    println!("bench_workers: {messages} no-op calls per run");
    for uri in ["memory://bench-workers", rabbit.as_str()] {
        let masked = micro_framework::config::mask_uri(uri);
        match runtime.block_on(rates(uri, messages)) {
            Ok(rates) => {
                println!(
                    "{masked:<40} thread {:>8.0} calls/s | process {:>8.0} calls/s | process overhead {:.0} µs/call",
                    rates.thread,
                    rates.process,
                    rates.overhead_us()
                );
                println!(
                    "{:<40} CPU per call: thread {:.1} µs | process {:.1} µs (workers included) | process adds {:.1} µs",
                    "",
                    rates.thread_cpu_us,
                    rates.process_cpu_us,
                    rates.cpu_overhead_us()
                );
            }
            Err(error) => println!("{masked}: skipped ({error})"),
        }
    }
    Ok(())
}
