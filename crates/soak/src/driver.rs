//! The driver: starts the services, sends the load, injects the faults, drains, reports and
//! cleans up.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use micro_framework::amqp::dependencies::{Producer, ServiceProxy};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::rpc::Client;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::transport::SharedTransport;
use micro_framework::RunningService;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker;
use crate::faults::{self, Fault};
use crate::fleet::Fleet;
use crate::services::busy_dir;
use crate::tracker::{Flow, Report, Tracker};
use crate::{Names, Options, Role};

/// Load before the first fault.
const WARMUP: Duration = Duration::from_secs(4);
/// Load after a recovery before the next fault.
const SETTLE: Duration = Duration::from_secs(2);
/// A fault not recovered from within this long fails the soak.
const RECOVERY_LIMIT: Duration = Duration::from_secs(90);
/// How long the driver's RPC calls wait for a reply before trying again.
const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// Pause before sending again after a failed publish or call.
const RESEND_PAUSE: Duration = Duration::from_millis(500);
/// Ids being sent at once, at most (bounds the driver's memory during an outage).
const MAX_IN_FLIGHT: usize = 5000;
/// How many lost ids are printed.
const LOST_SAMPLES: usize = 10;

/// What the driver talks to the broker with.
struct Rig {
    tracker: Arc<Tracker>,
    collector: RunningService,
    transport: SharedTransport,
    producer: Producer,
    client: Client,
    work: ServiceProxy,
}

/// A fault of the run and how long it took to recover from it.
struct Record {
    fault: Fault,
    recovery: Option<Duration>,
}

/// The collector route: B's `handled` reports.
async fn collect(Payload(report): Payload<Report>, Dep(tracker): Dep<Arc<Tracker>>) {
    tracker.report(report);
}

pub fn main(options: Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soak: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(options))
}

async fn run(options: Options) -> ExitCode {
    let names = Names { run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned() };
    let dir = std::env::temp_dir().join(names.marker());
    if let Err(error) = std::fs::create_dir_all(busy_dir(&dir)) {
        eprintln!("soak: cannot create {}: {error}", dir.display());
        return ExitCode::FAILURE;
    }
    init_logs(&dir);
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("soak: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "soak {}: {} s of load at {} ids/s (2/3 events through A and B, 1/3 RPC calls to B), \
         a fault every {} s{}; logs in {}",
        names.marker(),
        options.seconds,
        options.rate,
        options.interval,
        if options.broker_restart { "" } else { " (no broker restart)" },
        dir.display()
    );
    let user = match broker::SoakUser::create(&options.uri, &names.marker()).await {
        Ok(user) => user,
        Err(error) => {
            eprintln!("soak: cannot create the broker user {}: {error}", names.marker());
            return ExitCode::FAILURE;
        }
    };
    let rig = match connect(&user.uri, &names).await {
        Ok(rig) => rig,
        Err(error) => {
            eprintln!("soak: {error}");
            user.delete().await;
            return ExitCode::FAILURE;
        }
    };
    let mut fleet = Fleet {
        names: names.clone(),
        dir: dir.clone(),
        user,
        observed: vec![
            rig.transport.clone(),
            rig.client.transport().clone(),
            rig.collector.transport().clone(),
        ],
        tracker: rig.tracker.clone(),
        findings: Arc::default(),
        exe,
        children: HashMap::new(),
    };
    let stop_load = CancellationToken::new();
    let give_up = CancellationToken::new();
    // On SIGINT or SIGTERM the run stops where it is (a stopped broker app is started again
    // when its guard drops) and still reports and cleans up.
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => terminate.recv().await,
            Err(_) => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        outcome = soak(&options, &mut fleet, &rig, &stop_load, &give_up) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted by SIGINT".to_owned()),
        _ = terminate => Err("interrupted by SIGTERM".to_owned()),
    };
    stop_load.cancel();
    give_up.cancel();
    report_and_clean_up(&options, fleet, rig, outcome, &dir).await
}

/// Log the driver's own framework parts (collector, producer, client) to `{dir}/driver.log`.
fn init_logs(dir: &std::path::Path) {
    let Ok(file) = std::fs::File::create(dir.join("driver.log")) else { return };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

async fn connect(uri: &str, names: &Names) -> Result<Rig, String> {
    let tracker = Arc::new(Tracker::default());
    let config = names.config(uri, names.driver());
    let routes = vec![Route::new(collect)
        .entrypoint(EventListener::new(names.service(Role::B), "handled"))
        .dependency(Shared(tracker.clone()))];
    let collector = Runner::new(routes, config.clone().with_max_workers(4))
        .spawn()
        .await
        .map_err(|error| format!("cannot start the collector: {error:?}"))?;
    let transport = micro_framework::transport::connect(&config)
        .await
        .map_err(|error| format!("cannot connect: {error}"))?;
    let producer = Producer::new(transport.clone(), &config);
    let client =
        Client::connect(&config).await.map_err(|error| format!("cannot connect: {error}"))?;
    let work = client.service(names.service(Role::B)).timeout(CALL_TIMEOUT);
    Ok(Rig { tracker, collector, transport, producer, client, work })
}

/// Start the services, run the load with the faults, drain. Returns the faults' records.
async fn soak(
    options: &Options,
    fleet: &mut Fleet,
    rig: &Rig,
    stop_load: &CancellationToken,
    give_up: &CancellationToken,
) -> Result<Vec<Record>, String> {
    fleet.spawn(Role::A)?;
    fleet.spawn(Role::B)?;
    let names = &fleet.names;
    for queue in [
        format!("evt-{}-job--{}.on_job", names.driver(), names.service(Role::A)),
        format!("evt-{}-forward--{}.on_forward", names.service(Role::A), names.service(Role::B)),
        format!("rpc-{}", names.service(Role::B)),
    ] {
        wait_consumed(&rig.transport, &queue, Duration::from_secs(60)).await?;
    }

    let started = Instant::now();
    let end = started + Duration::from_secs(options.seconds);
    tokio::spawn(load(
        rig.producer.clone(),
        rig.work.clone(),
        rig.tracker.clone(),
        options.rate,
        stop_load.clone(),
        give_up.clone(),
    ));

    let mut records = Vec::new();
    let interval = Duration::from_secs(options.interval);
    // A fault needs this much load after it to show its recovery.
    let room = interval.min(Duration::from_secs(8));
    let mut planned = started + WARMUP;
    let mut earliest = planned;
    for fault in faults::schedule(options.broker_restart) {
        let at = planned.max(earliest);
        if at + room > end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let number = records.len() + 1;
        let injected = faults::inject(fault, fleet).await.map_err(|error| {
            format!("fault {number} {}: cannot inject it: {error}", fault.name())
        })?;
        let recovered = loop {
            if let Some(at) = rig.tracker.recovered() {
                break Some(at);
            }
            if injected.effective.elapsed() > RECOVERY_LIMIT {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let since = |at: Instant| at.saturating_duration_since(injected.began);
        let recovery = recovered.map(|(events, rpc)| since(events.max(rpc)));
        let (sent, done) = rig.tracker.progress();
        println!(
            "fault {number} at t={:.1}s {} ({}): {} [sent {sent}, done {done}]",
            injected.began.duration_since(started).as_secs_f64(),
            fault.name(),
            injected.detail,
            match (recovery, recovered) {
                (Some(recovery), Some((events, rpc))) => format!(
                    "recovered in {} ms (events {} ms, RPC {} ms)",
                    recovery.as_millis(),
                    since(events).as_millis(),
                    since(rpc).as_millis()
                ),
                _ => format!("NOT recovered within {} s", RECOVERY_LIMIT.as_secs()),
            }
        );
        records.push(Record { fault, recovery });
        if recovery.is_none() {
            break;
        }
        earliest = Instant::now() + SETTLE;
        planned += interval;
    }
    tokio::time::sleep_until(end.into()).await;
    stop_load.cancel();

    let drain_started = Instant::now();
    let limit = Duration::from_secs(options.drain);
    while rig.tracker.outstanding() > 0 && drain_started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outstanding = rig.tracker.outstanding();
    if outstanding == 0 {
        println!(
            "drain: every id done {} ms after the load stopped",
            drain_started.elapsed().as_millis()
        );
    } else {
        println!("drain: {outstanding} ids still outstanding after {} s", limit.as_secs());
    }
    // Late duplicates (redelivered in-flight work) still count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    give_up.cancel();
    Ok(records)
}

async fn wait_consumed(
    transport: &SharedTransport,
    queue: &str,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if transport.queue_info(queue).await.is_ok_and(|info| info.consumer_count > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("nobody consumes {queue} after {} s", limit.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send ids at `rate` until `stop`: two events for one RPC call.
async fn load(
    producer: Producer,
    work: ServiceProxy,
    tracker: Arc<Tracker>,
    rate: f64,
    stop: CancellationToken,
    give_up: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    for id in 0u64.. {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = async {
                ticker.tick().await;
                in_flight.clone().acquire_owned().await
            } => permit,
        };
        let Ok(permit) = permit else { break };
        let flow = if id % 3 == 2 { Flow::Rpc } else { Flow::Event };
        tracker.sent(id, flow);
        let (tracker, give_up) = (tracker.clone(), give_up.clone());
        match flow {
            Flow::Event => {
                let producer = producer.clone();
                tokio::spawn(async move {
                    send_event(&producer, &tracker, id, &give_up).await;
                    drop(permit);
                });
            }
            Flow::Rpc => {
                let work = work.clone();
                tokio::spawn(async move {
                    call(&work, &tracker, id, &give_up).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Dispatch `job{id}` until the broker confirmed it.
async fn send_event(producer: &Producer, tracker: &Tracker, id: u64, give_up: &CancellationToken) {
    loop {
        match producer.dispatch("job", &json!({ "id": id })).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!("job {id}: dispatch failed ({error}); sending it again");
                tracker.publish_retry();
            }
        }
        tokio::select! {
            _ = give_up.cancelled() => return,
            _ = tokio::time::sleep(RESEND_PAUSE) => {}
        }
    }
}

/// Call `work(id)` until it replies (at-least-once: a call whose reply was lost runs again).
async fn call(work: &ServiceProxy, tracker: &Tracker, id: u64, give_up: &CancellationToken) {
    loop {
        let outcome = tokio::select! {
            _ = give_up.cancelled() => return,
            outcome = work.call::<u64>("work", [id], ()) => outcome,
        };
        match outcome {
            Ok(value) if value == id => {
                tracker.replied(id);
                return;
            }
            Ok(value) => tracing::error!("work({id}) replied {value}"),
            Err(error) => {
                tracing::warn!("work({id}) failed ({error}); calling again");
                tracker.rpc_retry();
            }
        }
        tokio::select! {
            _ = give_up.cancelled() => return,
            _ = tokio::time::sleep(RESEND_PAUSE) => {}
        }
    }
}

/// Stop everything, print the report (its last line is the summary), clean the broker.
async fn report_and_clean_up(
    options: &Options,
    mut fleet: Fleet,
    rig: Rig,
    outcome: Result<Vec<Record>, String>,
    dir: &std::path::Path,
) -> ExitCode {
    let mut failed = false;
    let records = outcome.unwrap_or_else(|error| {
        println!("soak stopped early: {error}");
        failed = true;
        Vec::new()
    });
    let marker = fleet.names.marker();
    let dead: Vec<(String, u64)> = broker::queues(&marker)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, messages)| name.ends_with(".dlq") && *messages > 0)
        .collect();
    fleet.stop_all().await;
    let summary = rig.tracker.summary();
    let Rig { collector, transport, client, .. } = rig;
    if let Err(error) = collector.stop().await {
        // `Debug`: the message and its causes (a stopped route says why only in its source)
        println!("collector: {error:?}");
    }
    client.close().await;
    let cleaned = broker::clean_up(&transport, &marker).await;
    transport.close().await;
    fleet.user.delete().await;
    let user_left = broker::user_exists(&fleet.user.name).await.unwrap_or(true);
    match cleaned {
        Ok((deleted, left)) if left.is_empty() && !user_left => println!(
            "broker: deleted the {deleted} queues and exchanges of {marker} and its user; \
             nothing left"
        ),
        Ok((_, left)) => {
            println!("broker: still there after the clean-up: {left:?} (user: {user_left})");
            failed = true;
        }
        Err(error) => {
            println!("broker: clean-up failed: {error}");
            failed = true;
        }
    }

    println!(
        "reports={} (unknown ids {}), RPC calls retried={}, publishes retried={}",
        summary.reports, summary.unknown_reports, summary.rpc_retries, summary.publish_retries
    );
    for (queue, messages) in &dead {
        // Every route retries for ever or replies: a dead letter means a policy gap.
        println!("dead letters: {messages} in {queue}");
        failed = true;
    }
    let findings = fleet.findings.lock().unwrap_or_else(PoisonError::into_inner).clone();
    for finding in &findings {
        println!("finding: {finding}");
        failed = true;
    }
    let unrecovered: Vec<&str> =
        records.iter().filter(|r| r.recovery.is_none()).map(|r| r.fault.name()).collect();
    if !unrecovered.is_empty() {
        println!("not recovered: {unrecovered:?}");
        failed = true;
    }
    let lost = summary.lost.len() as u64;
    if lost > 0 {
        let samples: Vec<String> = summary
            .lost
            .iter()
            .take(LOST_SAMPLES)
            .map(|(id, flow, why)| format!("{id} ({flow:?}, {why})"))
            .collect();
        println!("lost ids (first {} of {lost}): {}", samples.len(), samples.join(", "));
        failed = true;
    }
    if failed || options.keep_logs {
        println!("logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
    let max_recovery = records.iter().filter_map(|r| r.recovery).max().unwrap_or_default();
    println!(
        "sent={} handled={} duplicates={} lost={lost} max_recovery_ms={}",
        summary.sent,
        summary.handled,
        summary.duplicates,
        max_recovery.as_millis()
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
