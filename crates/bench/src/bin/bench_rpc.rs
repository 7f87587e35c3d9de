//! RPC benchmark: `cargo run --release -p micro-framework-bench --bin bench_rpc [-- CALLS]`
//! against `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/`), `MAX_WORKERS` from the
//! environment (default 3, the framework's).
//!
//! Everything goes over the Nameko wire (topic exchange `nameko-rpc`, request queue
//! `rpc-bench_rpc` bound `bench_rpc.*`, JSON bodies, reply to `nameko-rpc` with the caller's
//! routing key), so each caller can call each responder. Sixteen pairings, in one run on the
//! same broker:
//!
//! | caller | responder | shows |
//! |---|---|---|
//! | bare lapin | bare lapin | the baseline |
//! | bare, persistent | bare lapin | the baseline with persistent requests, as Nameko's and ours |
//! | bare lapin | micro-framework | the service side alone |
//! | micro-framework `Client` | bare lapin | the calling side alone |
//! | micro-framework `Client` | micro-framework | both, requests persistent (the default) |
//! | `Client` with `RPC_PERSISTENT_REQUESTS=false` | micro-framework | both, requests transient |
//! | bare lapin, `Client` (transient) | `mf, async` | the same with an async target |
//! | bare lapin, `Client` (transient) | `bare, blocking` | bare lapin replying from the blocking pool |
//! | `bare, acked` | `bare lapin`, `bare, blocking` | bare lapin's caller acking replies, as ours |
//!
//! (and each caller with the first two responders, `bare, acked` also with the async
//! target); `PAIRINGS="caller/responder;..."` (e.g.
//! `PAIRINGS="bare lapin/bare lapin;mf, transient/bare lapin"`) measures only those, to profile
//! one pairing at a time. The framework's `echo` is a sync target,
//! run on the blocking pool's threads as sync targets are; `mf, async` serves it as an async
//! target; `bare, blocking` computes bare lapin's reply on the blocking pool
//! (`spawn_blocking`), where the framework runs its sync target. The last lines compare the
//! framework with bare lapin, both with transient requests and both with persistent ones, and
//! its sync target with `bare, blocking`, and both again beside `bare, acked`.
//!
//! The bare responder consumes with prefetch `MAX_WORKERS`, answers each request on a task of
//! its own, awaits the reply's publisher confirm, then acks the request (as the framework does).
//! The bare callers publish with `mandatory` and await each request's confirm, and consume
//! their exclusive reply queue without acks, but `bare, acked`, which acks each reply with the
//! framework caller's reply prefetch (1,000). The last columns are the CPU time per call of this
//! process (caller and responder) and of the local RabbitMQ node, while the concurrent callers
//! ran. For each pairing: the sequential round trip (p50,
//! p99) over CALLS calls (default 1000), and the throughput of 16 concurrent callers. Last,
//! without `PAIRINGS`, the sequential round trips of bare lapin at both ends, bare lapin on
//! the blocking pool and the framework's sync and async targets taken in turns, call by call,
//! so that the machine's slow spells fall on all four alike. `CALLERS=N` sets how many
//! callers call at once (16 unless set, as in `bench_table`). `PAYLOAD_BYTES=N` makes each
//! call's argument `[i, "xx.."]` with N bytes of padding, echoed back (the argument is `i`
//! unless set).

use micro_framework::prelude::*;
use micro_framework::Error;
use micro_framework_bench::rpc::{
    find, pairings, percentile, round_trips, RoundTrips, ACKED_BARE, ASYNC_RESPONDER,
    BLOCKING_BARE, CONCURRENT, PERSISTENT_BARE, TRANSIENT_FRAMEWORK,
};

fn main() -> micro_framework::Result<()> {
    let calls: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|e| Error::Startup(format!("CALLS: {e}")))?,
        None => 1000,
    };
    micro_framework_bench::payload_bytes(0)?;
    tokio::runtime::Runtime::new()?.block_on(bench(calls))
}

async fn bench(calls: usize) -> micro_framework::Result<()> {
    let concurrent = match std::env::var_os("CALLERS") {
        None => CONCURRENT,
        Some(callers) => match callers.to_str().and_then(|callers| callers.parse().ok()) {
            Some(callers) if callers > 0 => callers,
            _ => {
                return Err(Error::Startup(format!(
                    "CALLERS={callers:?}: write how many callers call at once, 1 or more"
                )))
            }
        },
    };
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.push(("SERVICE_NAME".into(), "bench_rpc".into()));
    if std::env::var("AMQP_URI").is_err() {
        vars.push(("AMQP_URI".into(), "amqp://guest:guest@127.0.0.1:5672/".into()));
    }
    let config = Config::from_vars(vars)?;
    println!(
        "bench_rpc: {calls} sequential calls, then {} calls by {} concurrent callers; MAX_WORKERS {}, broker {}",
        calls * 4,
        concurrent,
        config.max_workers,
        config.masked_amqp_uri()
    );
    let only = std::env::var("PAIRINGS").ok();
    let wanted = |caller: &str, responder: &str| {
        only.as_deref().is_none_or(|only| {
            only.split(';').any(|pairing| pairing == format!("{caller}/{responder}"))
        })
    };
    let results = pairings(&config, calls, concurrent, wanted).await?;
    if results.is_empty() {
        return Err(Error::Startup(format!(
            "PAIRINGS={:?} names no pairing: write caller/responder as the table prints them",
            only.unwrap_or_default()
        )));
    }
    println!(
        "{:<16} {:<16} {:>7} {:>7} {:>13} {:>12} {:>12}",
        "caller",
        "responder",
        "p50 ms",
        "p99 ms",
        format!("{concurrent} callers/s"),
        "CPU us/call",
        "broker us/call"
    );
    for pairing in &results {
        let figures = &pairing.figures;
        let broker = figures.broker_cpu_us.map_or_else(|| "-".to_owned(), |us| format!("{us:.0}"));
        println!(
            "{:<16} {:<16} {:>7.2} {:>7.2} {:>13.0} {:>12.0} {broker:>12}",
            pairing.caller,
            pairing.responder,
            figures.percentile(0.5),
            figures.percentile(0.99),
            figures.rate,
            figures.own_cpu_us,
        );
    }
    let comparisons = [
        ("transient requests", "bare lapin", "bare lapin", TRANSIENT_FRAMEWORK, "micro-framework"),
        (
            "persistent requests",
            PERSISTENT_BARE,
            "bare lapin",
            "micro-framework",
            "micro-framework",
        ),
        (
            "transient requests, async target",
            "bare lapin",
            "bare lapin",
            TRANSIENT_FRAMEWORK,
            ASYNC_RESPONDER,
        ),
        (
            "transient requests, both on the blocking pool",
            "bare lapin",
            BLOCKING_BARE,
            TRANSIENT_FRAMEWORK,
            "micro-framework",
        ),
        (
            "transient requests, async target, replies acked",
            ACKED_BARE,
            "bare lapin",
            TRANSIENT_FRAMEWORK,
            ASYNC_RESPONDER,
        ),
        (
            "transient requests, both on the blocking pool, replies acked",
            ACKED_BARE,
            BLOCKING_BARE,
            TRANSIENT_FRAMEWORK,
            "micro-framework",
        ),
    ];
    for (what, bare_caller, bare_responder, our_caller, our_responder) in comparisons {
        if let (Some(bare), Some(ours)) =
            (find(&results, bare_caller, bare_responder), find(&results, our_caller, our_responder))
        {
            println!(
                "micro-framework / bare, {what}: throughput {:.2}x, p50 {:+.2} ms",
                ours.rate / bare.rate,
                ours.percentile(0.5) - bare.percentile(0.5)
            );
        }
    }
    if only.is_none() {
        print_round_trips(&round_trips(&config, calls).await?);
    }
    Ok(())
}

fn print_round_trips(pairings: &[RoundTrips]) {
    println!("sequential round trips in turns (one call of each pairing after the other):");
    let bare = pairings.first().map_or(0.0, |bare| percentile(&bare.latencies, 0.5));
    for pairing in pairings {
        let p50 = percentile(&pairing.latencies, 0.5);
        println!(
            "{:<16} {:<16} p50 {p50:.2} ms ({:+.2} ms over bare lapin's), p99 {:.2} ms",
            pairing.caller,
            pairing.responder,
            p50 - bare,
            percentile(&pairing.latencies, 0.99)
        );
    }
}
