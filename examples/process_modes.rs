//! Process worker modes: `cargo run --example process_modes`.
//!
//! Service `process_demo` with one route, `work` on `EventListener("process_demo_src", "job")`,
//! whose calls run in worker processes: `WORKER_MODE` defaults to `process` here (the
//! environment may say `greedy_process`, or `thread` to compare), `MAX_WORKERS` to 2. A
//! worker process is this program started again with `MF_WORKER_SOCKET` in its environment:
//! `main` runs there too, up to `Runner::start`, which then serves calls from the service
//! instead of consuming. Each call prints the pid of the process it ran in; a thread of the
//! service emits a `job` event every second.
//!
//! With `AMQP_URI` unset it runs on the in-process broker (`memory://`); set
//! `AMQP_URI=amqp://guest:guest@127.0.0.1:5672/` to run it on RabbitMQ. Ctrl-C stops it
//! gracefully, worker processes included.

use std::time::Duration;

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use micro_framework::spawners::process::is_worker_process;
use serde::Deserialize;

/// The payload of `job` events.
#[derive(Deserialize)]
struct Job {
    job: u64,
}

/// Runs in a worker process in the process modes (its pid is not the service's), in the
/// service process in the thread modes.
fn work(Payload(Job { job }): Payload<Job>) {
    println!("work: job {job} in process {}", std::process::id());
}

fn main() -> micro_framework::Result<()> {
    let in_worker = is_worker_process();
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("AMQP_URI").is_err() {
        if !in_worker {
            eprintln!("AMQP_URI is not set: using the in-process broker (memory://)");
        }
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    for (key, default) in
        [("SERVICE_NAME", "process_demo"), ("WORKER_MODE", "process"), ("MAX_WORKERS", "2")]
    {
        if std::env::var(key).is_err() {
            vars.push((key.into(), default.into()));
        }
    }
    let config = Config::from_vars(vars)?;
    let routes = vec![Route::new(work).entrypoint(EventListener::new("process_demo_src", "job"))];
    if in_worker {
        // Set-up done here (before `Runner::start`) runs in every worker process too.
        eprintln!("worker process {} started", std::process::id());
        return Runner::new(routes, config).start();
    }
    eprintln!(
        "process_demo running in process {}, WORKER_MODE={}: press Ctrl-C to stop",
        std::process::id(),
        config.worker_mode.as_str()
    );
    emit_jobs(config.clone());
    Runner::new(routes, config).start()?;
    eprintln!("process_demo stopped");
    Ok(())
}

/// Plays the service `process_demo_src`: dispatches a `job` event once a second (from the
/// service process only).
fn emit_jobs(config: Config) {
    std::thread::spawn(move || -> micro_framework::Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let transport = micro_framework::transport::connect(&config).await?;
            let source = config.with_service_name("process_demo_src".into());
            let producer = Producer::new(transport, &source);
            for job in 1.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                producer.dispatch("job", &serde_json::json!({ "job": job })).await?;
            }
            Ok(())
        })
    });
}
