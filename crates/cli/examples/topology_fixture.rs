//! A small service for the `topology` tests: with `MF_PRINT_TOPOLOGY=1` it prints what it
//! declares and exits; otherwise it serves on `AMQP_URI` (default: local RabbitMQ).

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
    Runner::new(routes, config).start()
}
