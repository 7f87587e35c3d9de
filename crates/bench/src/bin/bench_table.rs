//! Every performance figure in one run, beside bare lapin on the same broker:
//! `cargo run --release -p micro-framework-bench --bin bench_table`.
//!
//! Against `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/`), in this order:
//!
//! 1. RPC (`bench_rpc`'s pairings): with `MAX_WORKERS=16`, then `MAX_WORKERS=3`, 1,000
//!    sequential calls and 4,000 calls by 16 concurrent callers each;
//! 2. the process-mode overhead per call on the in-process broker and on RabbitMQ, and the
//!    idle memory of a service in thread mode and in process mode with 4 workers
//!    (`bench_footprint`'s, median of 3);
//! 3. events (`bench_events`' measure, 10,000 events × 3 rounds, `MAX_WORKERS` 10): publish
//!    and drain rates and the CPU time per drained event.
//!
//! It prints one table: each figure, bare lapin's, ours, the goal and whether it is met.

use micro_framework::prelude::*;
use micro_framework::Error;
use micro_framework_bench::footprint::{self, Footprint};
use micro_framework_bench::rpc::{
    find, pairings, Figures, ASYNC_RESPONDER, PERSISTENT_BARE, TRANSIENT_FRAMEWORK,
};
use micro_framework_bench::workers::serve_worker;

const RPC_CALLS: usize = 1000;
const EVENTS: usize = 10_000;

fn main() -> micro_framework::Result<()> {
    if let Some(served) = footprint::serve_idle_service() {
        return served;
    }
    if let Some(served) = serve_worker() {
        return served;
    }
    let uri =
        std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rpc = Vec::new();
    for workers in [16, 3] {
        let vars = [
            ("SERVICE_NAME", "bench_rpc".to_owned()),
            ("AMQP_URI", uri.clone()),
            ("MAX_WORKERS", workers.to_string()),
        ];
        let config = Config::from_vars(vars.map(|(key, value)| (key.to_owned(), value)))?;
        eprintln!("RPC, MAX_WORKERS {workers} ...");
        let results = runtime.block_on(pairings(&config, RPC_CALLS))?;
        let pair = |caller: &str, responder: &str| {
            find(&results, caller, responder)
                .map(|figures| (figures.percentile(0.5), figures.rate, cpu(figures)))
                .ok_or_else(|| Error::Startup(format!("no {caller}/{responder} pairing")))
        };
        rpc.push(RpcRow {
            workers,
            bare: pair("bare lapin", "bare lapin")?,
            persistent: pair(PERSISTENT_BARE, "bare lapin")?,
            ours: pair(TRANSIENT_FRAMEWORK, "micro-framework")?,
            ours_persistent: pair("micro-framework", "micro-framework")?,
            ours_async: pair(TRANSIENT_FRAMEWORK, ASYNC_RESPONDER)?,
        });
    }
    eprintln!("footprint ...");
    let footprint = footprint::measure(&runtime, &uri)?;
    eprintln!("events ...");
    let vars = [("SERVICE_NAME", "bench_svc"), ("AMQP_URI", uri.as_str()), ("MAX_WORKERS", "10")];
    let config = Config::from_vars(vars.map(|(key, value)| (key.to_owned(), value.to_owned())))?;
    let events = runtime.block_on(micro_framework_bench::events::measure(&config, EVENTS))?;
    print_table(&rpc, &footprint, &events);
    Ok(())
}

/// Process and broker CPU per call (µs).
fn cpu(figures: &Figures) -> (f64, Option<f64>) {
    (figures.own_cpu_us, figures.broker_cpu_us)
}

/// "process / broker us" of a transient and a persistent pairing.
fn cpu_pair(transient: &RpcFigures, persistent: &RpcFigures) -> String {
    let broker = |cpu: Option<f64>| cpu.map_or_else(|| "-".to_owned(), |us| format!("{us:.0}"));
    let (transient, persistent) = (transient.2, persistent.2);
    format!(
        "{:.0} / {} us, {:.0} / {} us",
        transient.0,
        broker(transient.1),
        persistent.0,
        broker(persistent.1)
    )
}

/// p50 (ms), calls per second, and process / broker CPU per call (µs) of one pairing.
type RpcFigures = (f64, f64, (f64, Option<f64>));

/// The RPC figures with one `MAX_WORKERS`: bare lapin and the framework, each with transient
/// requests (`RPC_PERSISTENT_REQUESTS=false`) and with persistent ones (the framework's
/// default, as Nameko's).
struct RpcRow {
    workers: usize,
    bare: RpcFigures,
    persistent: RpcFigures,
    ours: RpcFigures,
    ours_persistent: RpcFigures,
    /// Transient requests to an async target (the others call a sync one).
    ours_async: RpcFigures,
}

fn print_table(
    rpc: &[RpcRow],
    footprint: &Footprint,
    events: &micro_framework_bench::events::EventFigures,
) {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let met = |ok: bool| if ok { "yes" } else { "no" }.to_owned();
    if let Some(RpcRow { bare, ours, ours_async, .. }) = rpc.iter().find(|row| row.workers == 16) {
        rows.push([
            "RPC sequential round trip, p50 (transient requests)".into(),
            format!("{:.2} ms", bare.0),
            format!("{:.2} ms", ours.0),
            "at most bare + 0.10 ms".into(),
            met(ours.0 <= bare.0 + 0.10),
        ]);
        rows.push([
            "the same, an async target (the others are sync)".into(),
            format!("{:.2} ms", bare.0),
            format!("{:.2} ms", ours_async.0),
            "-".into(),
            "-".into(),
        ]);
    }
    for RpcRow { workers, bare, persistent, ours, ours_persistent, ours_async } in rpc {
        rows.push([
            format!("RPC, 16 concurrent callers, `MAX_WORKERS={workers}` (transient requests)"),
            format!("{:.0} calls/s", bare.1),
            format!("{:.0} calls/s ({:.2}x)", ours.1, ours.1 / bare.1),
            "at least 0.9x bare".into(),
            met(ours.1 >= 0.9 * bare.1),
        ]);
        rows.push([
            "the same, an async target".into(),
            format!("{:.0} calls/s", bare.1),
            format!("{:.0} calls/s ({:.2}x)", ours_async.1, ours_async.1 / bare.1),
            "-".into(),
            "-".into(),
        ]);
        rows.push([
            "the same, persistent requests (the default, as Nameko's)".into(),
            format!("{:.0} calls/s", persistent.1),
            format!("{:.0} calls/s ({:.2}x)", ours_persistent.1, ours_persistent.1 / persistent.1),
            "-".into(),
            "-".into(),
        ]);
        rows.push([
            format!("RPC CPU per call, `MAX_WORKERS={workers}`: process / broker (transient, persistent)"),
            cpu_pair(bare, persistent),
            cpu_pair(ours, ours_persistent),
            "-".into(),
            "-".into(),
        ]);
    }
    rows.push([
        "process-mode overhead per call (memory:// / RabbitMQ)".into(),
        "-".into(),
        format!(
            "{:.0} / {} us",
            footprint.overhead_memory_us,
            footprint.overhead_rabbitmq_us.map_or_else(|| "-".to_owned(), |us| format!("{us:.0}"))
        ),
        "at most 30 us on both".into(),
        met(footprint.overhead_memory_us <= 30.0
            && footprint.overhead_rabbitmq_us.is_some_and(|us| us <= 30.0)),
    ]);
    rows.push([
        "idle RSS of a thread-mode service".into(),
        "-".into(),
        format!("{:.1} MB", footprint.idle_rss_thread_mb),
        "at most 10 MB".into(),
        met(footprint.idle_rss_thread_mb <= 10.0),
    ]);
    rows.push([
        "idle RSS, process mode with 4 workers (service + workers)".into(),
        "-".into(),
        format!(
            "{:.1} MB (PSS {:.1} MB)",
            footprint.idle_rss_process_mb, footprint.idle_pss_process_mb
        ),
        "at most 25 MB".into(),
        met(footprint.idle_rss_process_mb <= 25.0),
    ]);
    rows.push([
        "event publish with confirms".into(),
        format!("{:.0} msg/s", events.lapin_publish),
        format!(
            "{:.0} msg/s ({:.2}x)",
            events.producer_publish,
            events.producer_publish / events.lapin_publish
        ),
        "not slower".into(),
        "-".into(),
    ]);
    rows.push([
        "event drain, `MAX_WORKERS=10`".into(),
        format!("{:.0} msg/s", events.lapin_drain),
        format!(
            "{:.0} msg/s ({:.2}x)",
            events.service_drain,
            events.service_drain / events.lapin_drain
        ),
        "not slower".into(),
        "-".into(),
    ]);
    rows.push([
        "CPU time per drained event (getrusage)".into(),
        format!("{:.1} us", events.lapin_cpu_us),
        format!(
            "{:.1} us ({:.2}x)",
            events.service_cpu_us,
            events.service_cpu_us / events.lapin_cpu_us
        ),
        "-".into(),
        "-".into(),
    ]);
    println!("| figure | bare lapin | micro-framework | goal | met |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}
