//! Retries on the broker: `cargo run --example retry_demo` (in-process broker when `AMQP_URI`
//! is unset; config from the environment, `SERVICE_NAME` defaults to `retry_demo`).
//!
//! - `flaky` on `EventListener("retry_src", "job")` fails on the first two attempts of each
//!   message and succeeds on the third (`AsyncBackOff` of 3 retries, 200 ms), printing
//!   `handled <i> after <n> retries`.
//! - `doomed` on `EventListener("retry_src", "doom")` always fails (`AsyncBackOff` of 2
//!   retries, 200 ms, no callback): its messages end in `evt-retry_src-doom--retry_demo.doomed.dlq`.
//!
//! With `DEMO_EVENTS=N` (default 3) it also emits N `job` and one `doom` event itself, then
//! keeps serving until Ctrl-C.

use std::time::Duration;

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOffData};
use serde_json::{json, Value};

fn flaky(Payload(job): Payload<Value>, retry: BackOffData) -> Result<(), String> {
    if retry.retry_count < 2 {
        return Err(format!("attempt {} of job {} failed", retry.retry_count + 1, job["i"]));
    }
    println!("handled {} after {} retries", job["i"], retry.retry_count);
    Ok(())
}

fn doomed(Payload(job): Payload<Value>, retry: BackOffData) -> Result<(), String> {
    Err(format!("job {job} can never succeed (retry {})", retry.retry_count))
}

fn main() -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("AMQP_URI").is_err() {
        eprintln!("AMQP_URI is not set: using the in-process broker (memory://)");
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    if std::env::var("SERVICE_NAME").is_err() {
        vars.push(("SERVICE_NAME".into(), "retry_demo".into()));
    }
    let config = Config::from_vars(vars)?;
    let events = std::env::var("DEMO_EVENTS").ok().and_then(|n| n.parse().ok()).unwrap_or(3);
    let routes = vec![
        Route::new(flaky)
            .entrypoint(EventListener::new("retry_src", "job"))
            .backoff(AsyncBackOff::new(3, Duration::from_millis(200))),
        Route::new(doomed)
            .entrypoint(EventListener::new("retry_src", "doom"))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(200))),
    ];
    if events > 0 {
        emit(config.clone(), events);
    }
    Runner::new(routes, config).start()
}

/// Plays the service `retry_src`: `events` jobs and one doomed message, once the routes are up.
fn emit(config: Config, events: u64) {
    std::thread::spawn(move || -> micro_framework::Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let transport = micro_framework::transport::connect(&config).await?;
            let source = config.with_service_name("retry_src".into());
            let producer = Producer::new(transport, &source);
            for i in 0..events {
                producer.dispatch("job", &json!({ "i": i })).await?;
            }
            producer.dispatch("doom", &json!({ "i": "doomed" })).await
        })
    });
}
