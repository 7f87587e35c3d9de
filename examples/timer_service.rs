//! The `timer_demo` service: `report` fires every second on every instance, `cleanup` every
//! two seconds on one instance of the cluster only (`.cluster_wide()`).
//!
//! Run two instances on RabbitMQ and watch `cleanup` fire in one of them; stop that one
//! (Ctrl-C) and the other takes over:
//!
//! ```text
//! AMQP_URI=amqp://guest:guest@127.0.0.1:5672/ cargo run --example timer_service   # terminal 1
//! AMQP_URI=amqp://guest:guest@127.0.0.1:5672/ cargo run --example timer_service   # terminal 2
//! ```
//!
//! With `AMQP_URI` unset it runs alone on the in-process broker.

use std::time::Duration;

use micro_framework::entrypoints::TimeEntrypoint;
use micro_framework::prelude::*;

/// Fires on every instance.
fn report() {
    println!("report: instance {} is alive", std::process::id());
}

/// Fires on one instance per tick, whichever leads.
fn cleanup() {
    println!("cleanup: instance {} leads this tick", std::process::id());
}

fn main() -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("AMQP_URI").is_err() {
        eprintln!("AMQP_URI is not set: using the in-process broker (memory://)");
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    vars.push(("SERVICE_NAME".into(), "timer_demo".into()));
    let config = Config::from_vars(vars)?;
    let routes = vec![
        Route::new(report).entrypoint(TimeEntrypoint::every(Duration::from_secs(1))),
        Route::new(cleanup)
            .entrypoint(TimeEntrypoint::every(Duration::from_secs(2)).cluster_wide()),
    ];
    eprintln!("timer_demo running: press Ctrl-C to stop");
    Runner::new(routes, config).start()
}
