//! `QueueListener::on_exchange`: the Python original's `QueueListener(exchange_name,
//! routing_key)`, same names and flags, so both can share the queue; on both brokers, and on
//! RabbitMQ with the exchange and queue declared by micro-framework 2.1.1's own code.

mod common;

use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use common::peer::{prerequisites, UFW};
use common::{broker_uris, config, unique, Probe};
use micro_framework::amqp::entrypoints::QueueListener;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeKind, ExchangeSpec, Headers, OutgoingMessage, PublishOptions, QueueSpec,
    SharedTransport,
};
use micro_framework::Error;
use serde_json::{json, Value};

fn record(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

/// Declare `{exchange}_{key}_queue` on `exchange` with the flags the Python original uses
/// (kombu: exchange topic, durable, auto-delete; queue durable, no arguments).
async fn declare_as_python(transport: &SharedTransport, exchange: &str, key: &str) {
    let mut spec = ExchangeSpec::topic(exchange);
    spec.auto_delete = true;
    transport.declare_exchange(&spec).await.unwrap();
    let queue = format!("{exchange}_{key}_queue");
    transport.declare_queue(&QueueSpec::durable(queue.clone())).await.unwrap();
    let binding = BindingSpec {
        queue,
        exchange: exchange.to_owned(),
        routing_key: key.to_owned(),
        arguments: Headers::new(),
    };
    transport.bind_queue(&binding).await.unwrap();
}

async fn publish(transport: &SharedTransport, exchange: &str, key: &str, payload: Value) {
    let message = OutgoingMessage {
        body: Bytes::from(payload.to_string()),
        properties: micro_framework::data::json_properties(),
    };
    transport.publish(exchange, key, message, PublishOptions { mandatory: true }).await.unwrap();
}

async fn start_error(routes: Vec<Route>, config: Config) -> Error {
    match TestService::start(routes, config).await {
        Err(error) => error,
        Ok(_) => panic!("the service started"),
    }
}

/// The reason of a start-up error (what the framework refuses before the broker sees it).
async fn refusal(routes: Vec<Route>, config: Config) -> String {
    match start_error(routes, config).await {
        Error::Startup(reason) => reason,
        other => panic!("expected a start-up error, got {other}"),
    }
}

#[tokio::test]
async fn on_exchange_shares_its_queue_with_the_python_flags_on_both_brokers() {
    for uri in broker_uris() {
        let exchange = unique("uploads");
        let queue = format!("{exchange}_csv_queue");
        let probe = Probe::new();
        let config = config(&uri, "queue_listener");
        let setup = micro_framework::transport::connect(&config).await.unwrap();
        // a Python service declared them first: ours must declare the same
        declare_as_python(&setup, &exchange, "csv").await;
        publish(&setup, &exchange, "csv", json!(1)).await;
        let routes = vec![Route::new(record)
            .entrypoint(QueueListener::on_exchange(exchange.clone(), "csv"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        // and a Python service starting after ours declares the same again
        declare_as_python(&setup, &exchange, "csv").await;
        publish(&setup, &exchange, "csv", json!(2)).await;
        let waited = service.wait_for_route("record", 2).await;
        service.stop().await.unwrap();
        waited.unwrap();
        let mut seen = probe.seen.lock().unwrap().clone();
        seen.sort_by_key(|value| value.as_i64());
        assert_eq!(seen, [json!(1), json!(2)]);

        // the exchange is auto-delete: it goes with its last binding
        setup.delete_queue(&queue).await.unwrap();
        setup.delete_queue(&format!("{queue}.dlq")).await.unwrap();
        let redeclared = setup.declare_exchange(&ExchangeSpec::topic(exchange.clone())).await;
        assert!(redeclared.is_ok(), "{exchange} outlived its last binding: {redeclared:?}");
        setup.delete_exchange(&exchange).await.unwrap();
        setup.close().await;
        common::cleanup(&uri, &[exchange]).await;
    }
}

#[tokio::test]
async fn on_exchange_refuses_an_exchange_with_other_flags_and_misplaced_options() {
    for uri in broker_uris() {
        let exchange = unique("strict");
        let config = config(&uri, "queue_listener");
        let setup = micro_framework::transport::connect(&config).await.unwrap();
        // declared durable and kept (not auto-delete): RabbitMQ refuses the Python flags
        setup.declare_exchange(&ExchangeSpec::topic(exchange.clone())).await.unwrap();
        let listener = QueueListener::on_exchange(exchange.clone(), "csv");
        let routes = vec![Route::new(record).entrypoint(listener).dependency(Shared(Probe::new()))];
        let error = start_error(routes, config.clone()).await.to_string();
        assert!(error.contains("inequivalent arg 'auto_delete'"), "{error}");

        let misplaced =
            QueueListener::new(format!("{exchange}-q")).exchange_type(ExchangeKind::Direct);
        let routes =
            vec![Route::new(record).entrypoint(misplaced).dependency(Shared(Probe::new()))];
        let error = refusal(routes, config.clone()).await;
        assert!(
            error.contains("exchange_type(direct)") && error.contains("declares none"),
            "{error}"
        );

        let unnamed = QueueListener::on_exchange("", "csv");
        let routes = vec![Route::new(record).entrypoint(unnamed).dependency(Shared(Probe::new()))];
        let error = refusal(routes, config.clone()).await;
        assert!(error.contains("needs an exchange name"), "{error}");

        let no_queue = QueueListener::new("");
        let routes = vec![Route::new(record).entrypoint(no_queue).dependency(Shared(Probe::new()))];
        let error = refusal(routes, config.clone()).await;
        assert!(error.contains("QueueListener needs a queue name"), "{error}");

        setup.delete_exchange(&exchange).await.unwrap();
        setup.close().await;
        common::cleanup(&uri, &[exchange]).await;
    }
}

/// Declares the exchange and queue of micro-framework 2.1.1's
/// `QueueListener(exchange, routing_key)` with its own objects (`get_exchange`, `get_queue`:
/// the names and flags are its own), then publishes `payload` through kombu unless it is `-`.
/// Prints the names and flags it declared.
const PYTHON_QUEUE_LISTENER: &str = r#"
import asyncio, json, sys
from kombu import Connection, Producer
from micro_framework.amqp.entrypoints import QueueListener

uri, exchange_name, routing_key, payload = sys.argv[1:5]
listener = QueueListener(exchange_name, routing_key)

async def declared():
    return await listener.get_exchange(), await listener.get_queue()

exchange, queue = asyncio.run(declared())
with Connection(uri) as connection:
    channel = connection.channel()
    queue(channel).declare()
    if payload != "-":
        Producer(channel).publish(
            json.loads(payload), exchange=exchange, routing_key=routing_key, serializer="json"
        )
print(json.dumps({
    "queue": queue.name, "exchange": exchange.name, "type": exchange.type,
    "durable": exchange.durable, "auto_delete": exchange.auto_delete,
}))
"#;

fn python_queue_listener(
    python: &std::path::Path,
    uri: &str,
    exchange: &str,
    payload: &str,
) -> Value {
    let output = Command::new(python)
        .args(["-c", PYTHON_QUEUE_LISTENER, uri, exchange, "csv", payload])
        .output()
        .expect("python runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python QueueListener failed:\n{stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("no JSON line:\n{stderr}"))
}

#[tokio::test]
async fn on_exchange_and_the_python_queue_listener_share_one_queue() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let exchange = unique("py_uploads");
    let probe = Probe::new();
    let config = config(&uri, "queue_listener");

    let declared = {
        let (python, uri, exchange) = (python.clone(), uri.clone(), exchange.clone());
        tokio::task::spawn_blocking(move || python_queue_listener(&python, &uri, &exchange, "1"))
            .await
            .unwrap()
    };
    let expected = json!({
        "queue": format!("{exchange}_csv_queue"), "exchange": exchange, "type": "topic",
        "durable": true, "auto_delete": true,
    });
    assert_eq!(declared, expected);

    let routes = vec![Route::new(record)
        .entrypoint(QueueListener::on_exchange(exchange.clone(), "csv"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let again = {
        let (python, uri, exchange) = (python.clone(), uri.clone(), exchange.clone());
        tokio::task::spawn_blocking(move || python_queue_listener(&python, &uri, &exchange, "2"))
            .await
            .unwrap()
    };
    let waited = service.wait_for_route("record", 2).await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &[exchange]).await;
    assert_eq!(again, expected);
    waited.unwrap();
    let mut seen = probe.seen.lock().unwrap().clone();
    seen.sort_by_key(|value| value.as_i64());
    assert_eq!(seen, [json!(1), json!(2)]);
}
