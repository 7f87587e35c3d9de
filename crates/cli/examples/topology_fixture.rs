//! A small service for the `topology` tests: with `MF_PRINT_TOPOLOGY=1` it prints what it
//! declares and exits; otherwise it serves on `AMQP_URI` (default: local RabbitMQ). It starts
//! with `Runner::start`, or with `Runner::spawn` given `--spawn`, `Runner::run_until` given
//! `--run-until`.

use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::prelude::*;
use serde_json::Value;

/// Handles `shop`'s `paid` events.
fn on_paid(Payload(order): Payload<Value>) {
    println!("paid: {order}");
}

/// An RPC method.
fn ping() -> &'static str {
    "pong"
}

fn main() -> micro_framework::Result<()> {
    let amqp_uri = std::env::var("AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".to_owned());
    let config = Config::new("topology_fixture").with_amqp_uri(amqp_uri);
    let routes = vec![
        Route::new(on_paid).entrypoint(EventListener::new("shop", "paid")),
        Route::new(ping).entrypoint(RPCListener::new()),
    ];
    let runner = Runner::new(routes, config);
    let runtime = || tokio::runtime::Runtime::new().map_err(micro_framework::Error::from);
    match std::env::args().nth(1).as_deref() {
        Some("--spawn") => runtime()?.block_on(async {
            let mut service = runner.spawn().await?;
            service.wait_finished().await
        }),
        Some("--run-until") => runtime()?.block_on(runner.run_until(std::future::pending())),
        _ => runner.start(),
    }
}
