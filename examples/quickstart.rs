//! The seed's example, runnable: `cargo run --example quickstart`.
//!
//! With `AMQP_URI` unset it runs on the in-process broker (`memory://`); set
//! `AMQP_URI=amqp://guest:guest@127.0.0.1:5672/` to run it on RabbitMQ. A background thread
//! plays another service and emits an event every second, so you can watch the routes fire,
//! a failure retried then called back, and a graceful stop on Ctrl-C.

use std::time::Duration;

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use micro_framework::retry::AsyncBackOff;

mod tasks {
    use micro_framework::amqp::dependencies::Producer;
    use micro_framework::prelude::*;
    use micro_framework::retry::BackOffData;
    use serde::Deserialize;
    use serde_json::{json, Value};

    /// The payload of `my_routing_key` events.
    #[derive(Debug, Deserialize)]
    pub struct Order {
        pub order: u64,
        #[serde(default)]
        pub fail: bool,
    }

    /// Handles `my_exchange.my_routing_key`, then dispatches `event_name`.
    pub async fn test(Payload(order): Payload<Order>, producer: Producer) -> Result<(), String> {
        if order.fail {
            return Err(format!("order {} cannot be processed", order.order));
        }
        println!("test: handling order {}", order.order);
        producer
            .dispatch("event_name", &json!({ "order": order.order }))
            .await
            .map_err(|error| error.to_string())
    }

    /// Handles the `event_name` events that `test` dispatches.
    pub fn test2(Payload(payload): Payload<Value>) {
        println!("test2: called after test function with {payload}");
    }

    /// Called when `test` failed and its retries are exhausted.
    pub fn test_failure(Payload(payload): Payload<Value>, failure: Failure, retry: BackOffData) {
        println!(
            "test_failure: {payload} failed after {} retries: {}",
            retry.retry_count, failure.message
        );
    }
}

fn main() -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("AMQP_URI").is_err() {
        eprintln!("AMQP_URI is not set: using the in-process broker (memory://)");
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    if std::env::var("SERVICE_NAME").is_err() {
        vars.push(("SERVICE_NAME".into(), "my_service".into()));
    }
    let config = Config::from_vars(vars)?;
    let service = config.service_name.clone();

    let routes = vec![
        CallbackRoute::new(tasks::test, tasks::test_failure)
            .entrypoint(EventListener::new("my_exchange", "my_routing_key"))
            // The seed retries 5 times 10 s apart; shortened so the demo shows it quickly.
            .backoff(AsyncBackOff::new(2, Duration::from_millis(500))),
        Route::new(tasks::test2).entrypoint(EventListener::new(service, "event_name")),
    ];
    emit_demo_events(config.clone());
    eprintln!("quickstart running: press Ctrl-C to stop");
    Runner::new(routes, config).start()?;
    eprintln!("quickstart stopped");
    Ok(())
}

/// Plays the service `my_exchange`: dispatches `my_routing_key` once a second; every third
/// order fails, to show the callback.
fn emit_demo_events(config: Config) {
    std::thread::spawn(move || -> micro_framework::Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let transport = micro_framework::transport::connect(&config).await?;
            let source = config.with_service_name("my_exchange".into());
            let producer = Producer::new(transport, &source);
            for order in 1.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let event = serde_json::json!({ "order": order, "fail": order % 3 == 0 });
                producer.dispatch("my_routing_key", &event).await?;
            }
            Ok(())
        })
    });
}
