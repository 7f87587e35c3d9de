//! Test-support service for the process worker modes (config from the environment).
//!
//! Routes (context `workers`, `WORKER_MODE` from the environment) on `{SERVICE_NAME}_src` events:
//! `whoami` dispatches `{id, pid}` as event `pid` through its `Producer` (from the worker
//! process, so through the service), `crash` aborts, `panics` panics, `spin` loops forever,
//! `sigkill` kills its own process, `callrpc` calls this service's RPC method `echo` (served in
//! thread mode, like `abort_rpc`, which aborts the service) from the worker and reports like `whoami`. Route `collect` (thread mode) prints each `pid` event as a
//! JSON line `{"whoami": id, "pid": worker pid, "service_pid": ...}`. `GET /whoami/{id}` (on
//! `WEB_SERVER_ADDRESS`, default a free loopback port) answers from a worker process;
//! `GET /sleep/{ms}` sleeps that long in a worker process, then answers its pid. While the
//! file named by `REFUSE_WORKERS_WHILE` exists, a worker process exits as it starts; the
//! first worker process to find the file named by `HANG_ONE_WORKER` removes it and hangs
//! in its set-up. With `SLOW_WORKER_START_MS` set, a worker process sleeps that long in
//! `main` before it starts its runner (a program's own slow set-up).
//!
//! In the service process (not in workers) a driver dispatches `SCENARIO`
//! (`route:id,route:id,...`) one event at a time, waiting for each to be settled or dead-
//! lettered, prints dead letters as `{"dead": id, "kind": ..., "error": ...}` and `DONE`.
//! With `BURST` set it dispatches the whole scenario at once and prints `DONE` at once.

use std::time::Duration;

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Args;
use micro_framework::config::WorkerMode;
use micro_framework::dependencies::{Dependency, SetupContext};
use micro_framework::http::{HttpEntrypoint, Path};
use micro_framework::prelude::*;
use micro_framework::settle::{HEADER_ERROR, HEADER_ERROR_KIND};
use micro_framework::spawners::process::WORKER_SOCKET_ENV;
use micro_framework::{BoxError, WorkerContext};
use serde_json::{json, Value};

/// `GET /whoami/{id}`: the worker process's pid and its parent's (the service).
fn http_whoami(Path(id): Path<u64>) -> Value {
    json!({ "whoami": id, "pid": std::process::id(), "parent": std::os::unix::process::parent_id() })
}

/// `GET /sleep/{ms}`: sleeps in the worker, then answers its pid.
fn http_sleep(Path(ms): Path<u64>) -> Value {
    std::thread::sleep(Duration::from_millis(ms));
    json!({ "slept": ms, "pid": std::process::id() })
}

/// A dependency whose set-up, in a worker process, never ends when it finds the file named
/// by `HANG_ONE_WORKER` (which it removes, so that only one worker hangs).
struct HangingSetUp;

#[micro_framework::async_trait]
impl Dependency for HangingSetUp {
    type Output = ();

    async fn setup(&self, _: &SetupContext) -> Result<(), BoxError> {
        let file = std::env::var_os("HANG_ONE_WORKER").map(std::path::PathBuf::from);
        let worker = std::env::var(WORKER_SOCKET_ENV).is_ok();
        if worker && file.is_some_and(|file| std::fs::remove_file(file).is_ok()) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn get(&self, _: &WorkerContext) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A sync target that reports through the service while it runs (`dispatch_blocking` waits
/// for the service's answer over the worker link).
fn whoami(Payload(event): Payload<Value>, producer: Producer) -> micro_framework::Result<()> {
    producer.dispatch_blocking("pid", &json!({ "id": event["id"], "pid": std::process::id() }))
}

/// Calls this service's RPC method `echo` from the worker process, then reports like `whoami`.
async fn callrpc(
    Payload(event): Payload<Value>,
    rpc: RpcProxy,
    producer: Producer,
    config: std::sync::Arc<Config>,
) -> Result<(), String> {
    let echoed: Value = rpc
        .service(config.service_name.clone())
        .call("echo", [event["id"].clone()], ())
        .await
        .map_err(|error| error.to_string())?;
    let report = json!({ "id": echoed, "pid": std::process::id() });
    producer.dispatch("pid", &report).await.map_err(|error| error.to_string())
}

#[derive(serde::Deserialize)]
struct EchoArgs {
    x: Value,
}

fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
    x
}

/// Works for 300 ms, then reports like `whoami`.
async fn slow(Payload(event): Payload<Value>, producer: Producer) -> micro_framework::Result<()> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    producer.dispatch("pid", &json!({ "id": event["id"], "pid": std::process::id() })).await
}

fn crash(Payload(_): Payload<Value>) {
    std::process::abort();
}

/// RPC method `abort_rpc`: aborts the whole service (it runs in thread mode).
fn abort_rpc(Args(()): Args<()>) {
    std::process::abort();
}

fn panics(Payload(_): Payload<Value>) {
    panic!("this target panics");
}

#[allow(clippy::empty_loop)]
fn spin(Payload(_): Payload<Value>) {
    loop {}
}

fn sigkill(Payload(_): Payload<Value>) {
    let _ =
        std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
    std::thread::sleep(Duration::from_secs(10));
}

fn collect(Payload(event): Payload<Value>) {
    let line =
        json!({ "whoami": event["id"], "pid": event["pid"], "service_pid": std::process::id() });
    println!("{line}");
}

fn main() -> micro_framework::Result<()> {
    let mut config = Config::from_env()?;
    if std::env::var("WEB_SERVER_ADDRESS").is_err() {
        config.web_server_address = "127.0.0.1:0".into(); // parallel runs share no port
    }
    let service = config.service_name.clone();
    let mode = config.worker_mode;
    let source = source_of(&service);
    let source = source.as_str();
    let workers = vec![
        Route::new(whoami).entrypoint(EventListener::new(source, "whoami")),
        Route::new(crash).entrypoint(EventListener::new(source, "crash")),
        Route::new(panics).entrypoint(EventListener::new(source, "panics")),
        Route::new(spin).entrypoint(EventListener::new(source, "spin")),
        Route::new(sigkill).entrypoint(EventListener::new(source, "sigkill")),
        Route::new(callrpc).entrypoint(EventListener::new(source, "callrpc")),
        Route::new(slow).entrypoint(EventListener::new(source, "slow")),
        Route::new(http_whoami).entrypoint(HttpEntrypoint::get("/whoami/{id}")),
        Route::new(http_sleep)
            .entrypoint(HttpEntrypoint::get("/sleep/{ms}"))
            .dependency(HangingSetUp),
    ];
    let collector = vec![
        Route::new(collect).entrypoint(EventListener::new(service.clone(), "pid")),
        Route::new(echo).entrypoint(RPCListener::new()),
        Route::new(abort_rpc).entrypoint(RPCListener::new()),
    ];
    if std::env::var_os("OTHER_RUNNER_FIRST").is_some() {
        // A second service in the program, started first: in the service process it serves
        // beside the one below; in a worker process it is the first Runner, which takes the
        // worker's part (had it started on a thread, it would have raced the one below).
        let other = config.clone().with_service_name(format!("{service}_other"));
        let routes = vec![Route::new(echo).name("other_echo").entrypoint(RPCListener::new())];
        let runner = Runner::new(routes, other.with_worker_mode(WorkerMode::Thread));
        if std::env::var(WORKER_SOCKET_ENV).is_ok() {
            let refused = runner.start();
            eprintln!("the other Runner in a worker process: {refused:?}");
        } else {
            std::thread::spawn(move || runner.start());
        }
    }
    if std::env::var(WORKER_SOCKET_ENV).is_err() {
        drive(config.clone());
    } else if std::env::var_os("REFUSE_WORKERS_WHILE")
        .is_some_and(|file| std::path::Path::new(&file).exists())
    {
        return Err(micro_framework::Error::Startup("worker start-up refused by the test".into()));
    } else if let Some(ms) =
        std::env::var("SLOW_WORKER_START_MS").ok().and_then(|ms| ms.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    Runner::new(collector, config.with_worker_mode(WorkerMode::Thread))
        .context(RunnerContext::new(workers).worker_mode(mode).metric_label("workers"))
        .start()
}

/// The service that dispatches the scenario's events: `{service}_src`, so parallel runs
/// share no exchange.
fn source_of(service: &str) -> String {
    format!("{service}_src")
}

/// Dispatch the scenario, one event at a time, and report dead letters.
fn drive(config: Config) {
    std::thread::spawn(move || -> micro_framework::Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let transport = micro_framework::transport::connect(&config).await?;
            let source = config.clone().with_service_name(source_of(&config.service_name));
            let producer = Producer::new(transport.clone(), &source);
            let scenario = std::env::var("SCENARIO").unwrap_or_default();
            let queue_of = |route: &str| {
                format!("evt-{}-{route}--{}.{route}", source_of(&config.service_name), config.service_name)
            };
            // Events sent before the service consumes would reach no queue: wait for it.
            for _ in 0..600 {
                let consumed = transport.queue_info(&queue_of("slow")).await;
                if consumed.is_ok_and(|info| info.consumer_count > 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for step in scenario.split(',').filter(|step| !step.is_empty()) {
                let (route, id) = step.split_once(':').unwrap_or((step, "0"));
                producer.dispatch(route, &json!({ "id": id })).await?;
                if std::env::var("BURST").is_ok() {
                    continue;
                }
                let queue = queue_of(route);
                // Wait until the message left its queue and was settled one way or another.
                for _ in 0..600 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Some(dead) = transport.get(&format!("{queue}.dlq")).await? {
                        let header = |key: &str| {
                            dead.properties.headers.get(key).and_then(|v| v.as_str()).unwrap_or("").to_owned()
                        };
                        println!("{}", json!({ "dead": id, "kind": header(HEADER_ERROR_KIND), "error": header(HEADER_ERROR) }));
                        dead.acker.ack().await?;
                        break;
                    }
                    let info = transport.queue_info(&queue).await?;
                    if (route == "whoami" || route == "callrpc") && info.message_count == 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            println!("DONE");
            Ok(())
        })
    });
}
