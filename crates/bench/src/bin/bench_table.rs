//! Every performance figure in one run, beside bare lapin on the same broker:
//! `cargo run --release -p micro-framework-bench --bin bench_table`.
//!
//! Against `AMQP_URI` (default `amqp://guest:guest@127.0.0.1:5672/`), in this order:
//!
//! 1. RPC (`bench_rpc`'s pairings that the table compares): with `MAX_WORKERS=16`, then
//!    `MAX_WORKERS=3`, five rounds each of 1,000 sequential calls and 4,000 calls by 16
//!    concurrent callers per pairing; each figure is the median round, each ratio the median
//!    of the rounds' ratios (bare lapin and the framework measured in the same round), shown
//!    with its range. The p50 rows come from 1,000 sequential calls of each of their
//!    pairings taken in turns, call by call, in each round with `MAX_WORKERS=16`
//!    (`bench_rpc`'s last lines);
//! 2. the process-mode overhead per call on the in-process broker and on RabbitMQ, and the
//!    idle memory of a service in thread mode and in process mode with 4 workers, and of
//!    one worker beside the floor, the binary running only a worker's runtime
//!    (`bench_footprint`'s, median of 3);
//! 3. events (`bench_events`' measure, 10,000 events × 3 rounds, `MAX_WORKERS` 10): publish
//!    and drain rates and the CPU time per drained event.
//!
//! It prints one table: each figure, bare lapin's, ours, the goal and whether it is met.

use micro_framework::prelude::*;
use micro_framework::Error;
use micro_framework_bench::footprint::{self, Footprint};
use micro_framework_bench::rpc::{
    find, pairings, percentile, round_trips, Figures, Pairing, ACKED_BARE, ASYNC_RESPONDER,
    BLOCKING_BARE, CONCURRENT, PERSISTENT_BARE, ROUND_TRIP_PAIRINGS, TRANSIENT_FRAMEWORK,
};
use micro_framework_bench::workers::serve_worker;

const RPC_CALLS: usize = 1000;
/// RPC rounds per `MAX_WORKERS`: one round's ratios swing by about ±0.15 on a 2-core machine
/// shared with the broker, so the table shows the median round and the range.
const RPC_ROUNDS: usize = 5;
const EVENTS: usize = 10_000;

/// The caller/responder pairings the table compares.
const TABLE_PAIRINGS: [(&str, &str); 8] = [
    ("bare lapin", "bare lapin"),
    (PERSISTENT_BARE, "bare lapin"),
    ("bare lapin", BLOCKING_BARE),
    (ACKED_BARE, "bare lapin"),
    (ACKED_BARE, BLOCKING_BARE),
    (TRANSIENT_FRAMEWORK, "micro-framework"),
    ("micro-framework", "micro-framework"),
    (TRANSIENT_FRAMEWORK, ASYNC_RESPONDER),
];

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
        let (mut rounds, mut p50s) = (Vec::new(), Vec::new());
        for round in 1..=RPC_ROUNDS {
            eprintln!("RPC, MAX_WORKERS {workers}, round {round} of {RPC_ROUNDS} ...");
            let wanted =
                |caller: &str, responder: &str| TABLE_PAIRINGS.contains(&(caller, responder));
            let results = runtime.block_on(pairings(&config, RPC_CALLS, CONCURRENT, wanted))?;
            rounds.push(Round::of(&results)?);
            if workers == 16 {
                let turns = runtime.block_on(round_trips(&config, RPC_CALLS))?;
                p50s.push(RoundTripP50s::of(&turns)?);
            }
        }
        rpc.push(RpcRow { workers, rounds, p50s });
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

/// One round of the compared pairings: bare lapin and the framework, each with transient
/// requests (`RPC_PERSISTENT_REQUESTS=false`) and with persistent ones (the framework's
/// default, as Nameko's).
struct Round {
    bare: Measured,
    persistent: Measured,
    /// Bare lapin computing its replies on the blocking pool, as a sync target runs.
    bare_blocking: Measured,
    /// Bare lapin's caller acking its replies, as the framework's caller does.
    bare_acked: Measured,
    /// The same, with bare lapin computing its replies on the blocking pool.
    bare_acked_blocking: Measured,
    ours: Measured,
    ours_persistent: Measured,
    /// Transient requests to an async target (the others call a sync one).
    ours_async: Measured,
}

/// The p50 (ms) of each pairing's sequential round trips taken in turns, in one round.
struct RoundTripP50s {
    bare: f64,
    bare_blocking: f64,
    ours: f64,
    ours_async: f64,
}

impl RoundTripP50s {
    fn of(turns: &[micro_framework_bench::rpc::RoundTrips]) -> micro_framework::Result<Self> {
        let p50 = |(caller, responder): (&str, &str)| {
            turns
                .iter()
                .find(|turn| turn.caller == caller && turn.responder == responder)
                .map(|turn| percentile(&turn.latencies, 0.5))
                .ok_or_else(|| Error::Startup(format!("no {caller}/{responder} round trips")))
        };
        let [bare, bare_blocking, ours, ours_async] = ROUND_TRIP_PAIRINGS;
        Ok(RoundTripP50s {
            bare: p50(bare)?,
            bare_blocking: p50(bare_blocking)?,
            ours: p50(ours)?,
            ours_async: p50(ours_async)?,
        })
    }
}

/// What the table shows of one pairing in one round.
#[derive(Clone, Copy)]
struct Measured {
    /// Calls per second of the concurrent callers.
    rate: f64,
    /// Process CPU per call (µs).
    cpu_us: f64,
    /// Broker CPU per call (µs), NaN when it cannot be read.
    broker_us: f64,
}

impl From<&Figures> for Measured {
    fn from(figures: &Figures) -> Self {
        Measured {
            rate: figures.rate,
            cpu_us: figures.own_cpu_us,
            broker_us: figures.broker_cpu_us.unwrap_or(f64::NAN),
        }
    }
}

/// Picks one pairing's figures out of a round.
type Pick = fn(&Round) -> Measured;

impl Round {
    fn of(results: &[Pairing]) -> micro_framework::Result<Self> {
        let pair = |(caller, responder): (&str, &str)| {
            find(results, caller, responder)
                .map(Measured::from)
                .ok_or_else(|| Error::Startup(format!("no {caller}/{responder} pairing")))
        };
        let [bare, persistent, bare_blocking, bare_acked, bare_acked_blocking, ours, ours_persistent, ours_async] =
            TABLE_PAIRINGS;
        Ok(Round {
            bare: pair(bare)?,
            persistent: pair(persistent)?,
            bare_blocking: pair(bare_blocking)?,
            bare_acked: pair(bare_acked)?,
            bare_acked_blocking: pair(bare_acked_blocking)?,
            ours: pair(ours)?,
            ours_persistent: pair(ours_persistent)?,
            ours_async: pair(ours_async)?,
        })
    }
}

/// The rounds of one `MAX_WORKERS`.
struct RpcRow {
    workers: usize,
    rounds: Vec<Round>,
    /// Each round's round trips in turns (with `MAX_WORKERS=16` only).
    p50s: Vec<RoundTripP50s>,
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `values`, and their range as "rounds LOW to HIGH", each written by `show`.
fn median_range(values: Vec<f64>, show: impl Fn(f64) -> String) -> (f64, String) {
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(values), format!("rounds {} to {}", show(low), show(high)))
}

impl RpcRow {
    /// The median of `figure` of a pairing over the rounds.
    fn median(&self, pairing: Pick, figure: impl Fn(Measured) -> f64) -> f64 {
        median(self.rounds.iter().map(|round| figure(pairing(round))).collect())
    }

    /// "N calls/s (R x; rounds ...)": the median rate of `ours`, and the median and range
    /// of its ratio to `bare`'s rate in the same round.
    fn rate_vs(&self, bare: Pick, ours: Pick) -> (f64, String) {
        let ratios = self.rounds.iter().map(|round| ours(round).rate / bare(round).rate).collect();
        let (ratio, range) = median_range(ratios, |ratio| format!("{ratio:.2}"));
        let rate = self.median(ours, |figures| figures.rate);
        (ratio, format!("{rate:.0} calls/s ({ratio:.2}x; {range})"))
    }

    /// "process / broker us" of a pairing, medians.
    fn cpu_of(&self, pairing: Pick) -> String {
        let process = self.median(pairing, |figures| figures.cpu_us);
        let broker = self.median(pairing, |figures| figures.broker_us);
        let broker = if broker.is_nan() { "-".to_owned() } else { format!("{broker:.0}") };
        format!("{process:.0} / {broker} us")
    }

    /// "process / broker us" of the transient and the persistent pairing, medians.
    fn cpu(&self, transient: Pick, persistent: Pick) -> String {
        format!("{}, {}", self.cpu_of(transient), self.cpu_of(persistent))
    }
}

fn print_table(
    rpc: &[RpcRow],
    footprint: &Footprint,
    events: &micro_framework_bench::events::EventFigures,
) {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let met = |ok: bool| if ok { "yes" } else { "no" }.to_owned();
    if let Some(row) = rpc.iter().find(|row| row.workers == 16) {
        type PickP50 = fn(&RoundTripP50s) -> f64;
        let bare: PickP50 = |round| round.bare;
        let sync: PickP50 = |round| round.ours;
        let p50_rows: [(&str, PickP50, PickP50, bool); 3] = [
            ("RPC sequential round trip, p50 (transient requests)", bare, sync, true),
            (
                "the same, an async target (the others are sync)",
                bare,
                |round| round.ours_async,
                false,
            ),
            (
                "the sync target beside bare lapin computing its reply on the blocking pool",
                |round| round.bare_blocking,
                sync,
                false,
            ),
        ];
        let median_of = |pick: PickP50| median(row.p50s.iter().map(pick).collect());
        for (what, base, ours, goal) in p50_rows {
            let added = row.p50s.iter().map(|round| ours(round) - base(round)).collect();
            let (added, range) = median_range(added, |ms| format!("{ms:+.2}"));
            rows.push([
                what.into(),
                format!("{:.2} ms", median_of(base)),
                format!("{:.2} ms ({added:+.2} ms; {range})", median_of(ours)),
                if goal { "at most bare + 0.10 ms" } else { "-" }.into(),
                if goal { met(added <= 0.10) } else { "-".into() },
            ]);
        }
    }
    for row in rpc {
        let workers = row.workers;
        let bare_rate =
            |pairing: Pick| format!("{:.0} calls/s", row.median(pairing, |figures| figures.rate));
        // a rate row with the goal of 0.9x `bare`'s rate, round by round
        let mut goal_row = |what: String, bare: Pick, ours: Pick, goal: &str| {
            let (ratio, shown) = row.rate_vs(bare, ours);
            rows.push([what, bare_rate(bare), shown, goal.into(), met(ratio >= 0.9)]);
        };
        goal_row(
            format!("RPC, 16 concurrent callers, `MAX_WORKERS={workers}` (transient requests)"),
            |round| round.bare,
            |round| round.ours,
            "at least 0.9x bare",
        );
        goal_row(
            "the same, an async target (it runs on the runtime, as bare lapin's reply)".into(),
            |round| round.bare,
            |round| round.ours_async,
            "at least 0.9x bare",
        );
        goal_row(
            "the sync target beside bare lapin computing its reply on the blocking pool, as a \
             sync target runs (`spawn_blocking`)"
                .into(),
            |round| round.bare_blocking,
            |round| round.ours,
            "at least 0.9x that",
        );
        rows.push([
            "the same, persistent requests (the default, as Nameko's)".into(),
            bare_rate(|round| round.persistent),
            row.rate_vs(|round| round.persistent, |round| round.ours_persistent).1,
            "-".into(),
            "-".into(),
        ]);
        // bare lapin with the framework caller's guarantee: its replies acked, the reply
        // consumer's prefetch bounding how many a caller holds
        for (what, bare, ours) in [
            (
                "the async target beside bare lapin acking its replies (prefetch 1,000), as the \
                 framework's caller does",
                (|round| round.bare_acked) as Pick,
                (|round| round.ours_async) as Pick,
            ),
            (
                "the sync target beside bare lapin acking its replies and computing them on the \
                 blocking pool",
                |round| round.bare_acked_blocking,
                |round| round.ours,
            ),
        ] {
            rows.push([
                what.into(),
                bare_rate(bare),
                row.rate_vs(bare, ours).1,
                "-".into(),
                "-".into(),
            ]);
        }
        rows.push([
            format!("RPC CPU per call, `MAX_WORKERS={workers}`: process / broker (transient, persistent)"),
            row.cpu(|round| round.bare, |round| round.persistent),
            row.cpu(|round| round.ours, |round| round.ours_persistent),
            "-".into(),
            "-".into(),
        ]);
        rows.push([
            "the same, transient: bare lapin on the blocking pool / the framework's async target"
                .into(),
            row.cpu_of(|round| round.bare_blocking),
            row.cpu_of(|round| round.ours_async),
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
        "the same in CPU time added per call (service and workers; not the broker's)".into(),
        "-".into(),
        format!(
            "{:.0} / {} us",
            footprint.cpu_overhead_memory_us,
            footprint
                .cpu_overhead_rabbitmq_us
                .map_or_else(|| "-".to_owned(), |us| format!("{us:.0}"))
        ),
        "-".into(),
        "-".into(),
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
        "the same, one worker process (bare: this binary running only a worker's runtime)".into(),
        format!(
            "{:.1} MB (program file {:.1} MB)",
            footprint.idle_rss_floor_mb, footprint.idle_binary_floor_mb
        ),
        format!(
            "{:.1} MB (program file {:.1} MB)",
            footprint.idle_rss_worker_mb, footprint.idle_binary_worker_mb
        ),
        "-".into(),
        "-".into(),
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
