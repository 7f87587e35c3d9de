//! The events benchmark, and the service it measures.
//!
//! - `cargo run --release -p micro-framework-bench --bin bench_events -- serve`: runs the
//!   service `bench_svc` (config from the environment) with one route, `fn noop` on
//!   `EventListener("bench_src", "ping")` (queue `evt-bench_src-ping--bench_svc.noop`).
//! - `cargo run --release -p micro-framework-bench --bin bench_events [-- bench [MESSAGES]]`:
//!   against `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/`), in one run:
//!   1. publish MESSAGES persistent JSON events with confirms (`{"id": 1, "data": "xx.."}`,
//!      `PAYLOAD_BYTES` of padding, 100 unless set), bare lapin vs [`Producer`], three
//!      alternating rounds, best rate of each;
//!   2. drain all of them (3 × MESSAGES per queue): a bare lapin consumer (prefetch = `MAX_WORKERS`, ack each) vs the
//!      `bench_svc` service with `MAX_WORKERS` from the environment.
//!
//!   It prints both rates and their ratios, and the CPU time of this process per drained
//!   event (getrusage) for each.

use micro_framework::prelude::*;
use micro_framework::Error;
use micro_framework_bench::events::{config, measure, routes};

fn main() -> micro_framework::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("serve") => Runner::new(routes(), config()?).start(),
        None | Some("bench") => {
            let messages = args.next().map(|a| a.parse()).transpose().map_err(bad_arg)?;
            let runtime = tokio::runtime::Runtime::new()?;
            let f = runtime.block_on(measure(&config()?, messages.unwrap_or(20_000)))?;
            println!("publish with confirms: bare lapin {:>9.0} msg/s | Producer  {:>9.0} msg/s | ratio {:.2}", f.lapin_publish, f.producer_publish, f.producer_publish / f.lapin_publish);
            println!("drain (consume + ack): bare lapin {:>9.0} msg/s | bench_svc {:>9.0} msg/s | ratio {:.2}", f.lapin_drain, f.service_drain, f.service_drain / f.lapin_drain);
            println!("CPU per drained event: bare lapin {:>9.1} us    | bench_svc {:>9.1} us    | ratio {:.2}", f.lapin_cpu_us, f.service_cpu_us, f.service_cpu_us / f.lapin_cpu_us);
            Ok(())
        }
        Some(other) => Err(Error::Startup(format!("unknown command {other:?}: serve or bench"))),
    }
}

fn bad_arg(error: std::num::ParseIntError) -> Error {
    Error::Startup(format!("MESSAGES must be a number: {error}"))
}
