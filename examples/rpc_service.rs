//! An RPC service: `cargo run --example rpc_service`.
//!
//! Service `bench_rpc` (unless `SERVICE_NAME` says otherwise) serves two RPC methods, callable
//! from Nameko or from this framework, positionally or by keyword:
//!
//! - `echo(x)` returns `x`, any JSON value;
//! - `add(a, b)` returns `a + b`, for integers.
//!
//! Missing or extra arguments are replied as `IncorrectSignature`. With `AMQP_URI` unset it
//! runs on the in-process broker (`memory://`) and calls itself once a second through a
//! `Client`, so there is something to see; with
//! `AMQP_URI=amqp://guest:guest@127.0.0.1:5672/` it serves RabbitMQ, e.g. for
//! `nameko shell`: `n.rpc.bench_rpc.add(1, b=2)`.

use std::time::Duration;

use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

/// The arguments of `echo`.
#[derive(Deserialize)]
struct EchoArgs {
    x: Value,
}

/// Returns its argument.
fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
    x
}

/// The arguments of `add`.
#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

/// `a + b` did not fit in 64 bits.
#[derive(Debug, thiserror::Error)]
#[error("{0} + {1} overflows")]
struct Overflow(i64, i64);

/// Adds two integers.
fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> Result<i64, Overflow> {
    a.checked_add(b).ok_or(Overflow(a, b))
}

fn main() -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    let in_process = std::env::var("AMQP_URI").is_err();
    if in_process {
        println!("AMQP_URI is not set: using the in-process broker (memory://)");
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    if std::env::var("SERVICE_NAME").is_err() {
        vars.push(("SERVICE_NAME".into(), "bench_rpc".into()));
    }
    let config = Config::from_vars(vars)?;
    let routes = vec![
        Route::new(echo).entrypoint(RPCListener::new()),
        Route::new(add).entrypoint(RPCListener::new()),
    ];
    if in_process {
        call_demo(config.clone());
    }
    let name = config.service_name.clone();
    println!("{name} serving echo(x) and add(a, b): press Ctrl-C to stop");
    Runner::new(routes, config).start()?;
    println!("{name} stopped");
    Ok(())
}

/// Plays a caller on the in-process broker: calls each method once a second, the last one
/// with a wrong signature.
fn call_demo(config: Config) {
    std::thread::spawn(move || -> micro_framework::Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let client = Client::connect(&config).await?;
            let service = client.service(config.service_name.as_str());
            for i in 0_i64.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let echoed = service.call::<Value>("echo", [json!({ "i": i })], ()).await;
                let added = service.call::<i64>("add", [i], json!({ "b": 10 })).await;
                let wrong = service.call::<i64>("add", [i], ()).await;
                println!("echo: {echoed:?}\nadd: {added:?}\nadd(i): {wrong:?}");
            }
            Ok(())
        })
    });
}
