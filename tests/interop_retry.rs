//! Broker retries between this framework and the real Python package micro-framework 2.1.1
//! under `RETRY_DELAY=delayed_message_plugin`: a retry its `AsyncBackOff` schedules is run by
//! ours, and one ours schedules is read by its `AsyncBackOff`. RabbitMQ here has no
//! delayed-message plugin, so the broker is the in-process one with the plugin emulated, and
//! the Python package runs without a broker (`ufw_peer.py backoff-retry` / `backoff-receive`:
//! its own code, its publish captured at kombu's producer). Without the venv the tests fail
//! under `CI=true` and are skipped loudly otherwise.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::peer::{interop_python, Peer, UFW};
use common::{config, unique};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::config::RetryDelay;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOffData};
use micro_framework::settle::HEADER_ATTEMPTS;
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeKind, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, Properties,
    PublishOptions, QueueSpec,
};
use serde_json::{json, Value};

/// A private in-process broker with the delayed-message plugin emulated.
fn plugin_broker() -> String {
    format!("memory://test-{}?plugins=rabbitmq_delayed_message_exchange", uuid::Uuid::new_v4())
}

/// (payload "name", retry count) of each call, in order.
#[derive(Default)]
struct Journal(Mutex<Vec<(String, u32)>>);

/// Always fails, recording each attempt.
fn flaky(
    Payload(payload): Payload<Value>,
    retry: BackOffData,
    Dep(journal): Dep<Arc<Journal>>,
) -> Result<(), std::io::Error> {
    let name = payload["name"].as_str().unwrap_or_default().to_owned();
    journal.0.lock().unwrap().push((name, retry.retry_count));
    Err(std::io::Error::other(format!("attempt {} failed", retry.retry_count)))
}

/// A service whose route `flaky` listens to `{shop}.job` events and retries through the
/// delayed-message plugin: the service, its name and its shop.
async fn start(
    uri: &str,
    prefix: &str,
    max_retries: u32,
    journal: &Arc<Journal>,
) -> (TestService, String, String) {
    let config = config(uri, prefix).with_retry_delay(RetryDelay::DelayedMessagePlugin);
    let service_name = config.service_name.clone();
    let shop = unique("shop");
    let routes = vec![Route::new(flaky)
        .entrypoint(EventListener::new(&shop, "job"))
        .backoff(AsyncBackOff::new(max_retries, Duration::from_millis(30)))
        .dependency(Shared(journal.clone()))];
    (TestService::start(routes, config).await.unwrap(), service_name, shop)
}

/// A queue bound beside the backoff queue of `service_name`'s route `flaky`: it gets each
/// retry as published.
async fn spy_on_retries(service: &TestService, service_name: &str) -> String {
    let spy = unique("spy");
    service.transport().declare_queue(&QueueSpec::durable(&spy)).await.unwrap();
    let binding = BindingSpec {
        queue: spy.clone(),
        exchange: format!("{service_name}_backoff"),
        routing_key: "flaky_backoff".into(),
        arguments: Headers::new(),
    };
    service.transport().bind_queue(&binding).await.unwrap();
    spy
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_else(|| panic!("expected a string, got {value}"))
}

/// An AMQP field value of a JSON value the Python peer printed (numbers and strings).
fn field(value: &Value) -> HeaderValue {
    match value {
        Value::Number(number) if number.is_i64() => HeaderValue::Int(number.as_i64().unwrap()),
        Value::Number(number) => HeaderValue::Float(number.as_f64().unwrap()),
        Value::String(text) => HeaderValue::from(text.as_str()),
        other => panic!("no field value for {other}"),
    }
}

/// The message the peer printed, as the package's producer would send it.
fn as_published(publish: &Value) -> OutgoingMessage {
    let headers: Headers = publish["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .map(|(name, value)| (name.clone(), field(value)))
        .collect();
    let properties = Properties {
        content_type: Some(text(&publish["content_type"]).to_owned()),
        content_encoding: Some(text(&publish["content_encoding"]).to_owned()),
        delivery_mode: publish["properties"]["delivery_mode"].as_u64().map(|mode| mode as u8),
        priority: publish["properties"]["priority"].as_u64().map(|priority| priority as u8),
        headers,
        ..Properties::default()
    };
    OutgoingMessage { body: text(&publish["body"]).to_owned().into(), properties }
}

#[tokio::test]
async fn a_retry_the_python_package_schedules_is_run_by_ours_with_its_count() {
    let Some(python) = interop_python(UFW) else { return };
    let uri = plugin_broker();
    let journal = Arc::new(Journal::default());
    let (service, service_name, shop) = start(&uri, "py_to_rs", 3, &journal).await;
    // Python's text of the payload (a number no 64-bit type holds, spaces after separators).
    let payload = r#"{"name": "py", "big": 123456789012345678901234567890, "text": "caf\u00e9"}"#;
    let meta = r#"{"trace": {"id": 7}, "backoff": {"retry_count": 1, "last_retry": 1700000000.5}}"#;
    let args = [
        "backoff-retry",
        "--service",
        &service_name,
        "--target",
        "flaky",
        "--payload",
        payload,
        "--meta",
        meta,
        "--max-retries",
        "3",
        "--interval",
        "40",
    ];
    let lines = Peer::spawn(&python, UFW, "memory://", &args).finish().await;
    let scheduled = &lines[0];
    assert_eq!(scheduled["can_retry"], true, "{scheduled}");

    // The package declares exactly what ours declared: re-declaring it as kombu does is no
    // inequivalence, and ours consumes its queue.
    let exchange = &scheduled["exchange"];
    assert_eq!(exchange["name"], format!("{service_name}_backoff"));
    let transport = service.transport();
    let kombu_exchange = ExchangeSpec {
        name: text(&exchange["name"]).to_owned(),
        kind: ExchangeKind::Custom(text(&exchange["type"]).to_owned()),
        durable: exchange["durable"] == true,
        auto_delete: exchange["auto_delete"] == true,
        arguments: Headers::from([(
            "x-delayed-type".to_owned(),
            field(&exchange["arguments"]["x-delayed-type"]),
        )]),
    };
    transport.declare_exchange(&kombu_exchange).await.unwrap();
    let queue = &scheduled["queue"];
    assert_eq!(queue["name"], format!("{service_name}.flaky_backoff_queue"));
    assert_eq!(queue["arguments"], Value::Null);
    let kombu_queue = QueueSpec {
        name: text(&queue["name"]).to_owned(),
        durable: queue["durable"] == true,
        exclusive: queue["exclusive"] == true,
        auto_delete: queue["auto_delete"] == true,
        arguments: Headers::new(),
    };
    let info = transport.declare_queue(&kombu_queue).await.unwrap();
    assert_eq!(info.consumer_count, 1, "ours consumes the package's backoff queue");
    let binding = BindingSpec {
        queue: kombu_queue.name.clone(),
        exchange: kombu_exchange.name.clone(),
        routing_key: text(&queue["routing_key"]).to_owned(),
        arguments: Headers::new(),
    };
    transport.bind_queue(&binding).await.unwrap();
    let spy = spy_on_retries(&service, &service_name).await;

    let publish = &scheduled["publish"];
    assert_eq!(publish["headers"], json!({ "x-delay": 40 }), "{publish}");
    let (exchange, routing_key) = (text(&publish["exchange"]), text(&publish["routing_key"]));
    let options = PublishOptions { mandatory: publish["mandatory"] == true };
    transport.publish(exchange, routing_key, as_published(publish), options).await.unwrap();

    service.wait_for_route("flaky", 2).await.unwrap();
    let calls = journal.0.lock().unwrap().clone();
    assert_eq!(calls, vec![("py".to_owned(), 2), ("py".to_owned(), 3)], "the count goes on");
    let dlq = format!("evt-{shop}-job--{service_name}.flaky.dlq");
    let dead = service.take_messages(&dlq).await.unwrap();
    assert_eq!(dead.len(), 1, "max_retries 3 reached at the third retry");
    assert_eq!(dead[0].properties.headers.get(HEADER_ATTEMPTS), Some(&HeaderValue::Int(4)));
    assert_eq!(&dead[0].body[..], payload.as_bytes(), "the payload, exactly as Python wrote it");
    let retries = service.take_messages(&spy).await.unwrap();
    let ours: Vec<Value> = retries
        .iter()
        .map(|retry| serde_json::from_slice::<Value>(&retry.body).unwrap())
        .filter(|body| body["_meta"]["backoff"]["retry_count"] == 3)
        .collect();
    assert_eq!(ours.len(), 1, "{retries:?}");
    assert_eq!(ours[0]["_meta"]["trace"], json!({ "id": 7 }), "the package's _meta is kept");
    let wrapped = String::from_utf8(retries.last().unwrap().body.to_vec()).unwrap();
    assert!(wrapped.contains(payload), "the payload's exact text travels on: {wrapped}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_retry_ours_schedules_is_read_by_the_python_package() {
    let Some(python) = interop_python(UFW) else { return };
    let uri = plugin_broker();
    let journal = Arc::new(Journal::default());
    let (service, service_name, shop) = start(&uri, "rs_to_py", 2, &journal).await;
    let spy = spy_on_retries(&service, &service_name).await;
    let payload = json!({ "name": "rs", "text": "café ☕", "list": [1, 2.5, null] });
    service.dispatch(&shop, "job", &payload).await.unwrap();
    service.wait_for_route("flaky", 3).await.unwrap();
    let retries = service.take_messages(&spy).await.unwrap();
    assert_eq!(retries.len(), 2);
    for (n, retry) in retries.iter().enumerate() {
        let retry_count = n as u64 + 1;
        assert_eq!(retry.properties.headers.get("x-delay"), Some(&HeaderValue::Int(-30)));
        let body = std::str::from_utf8(&retry.body).unwrap();
        let properties = &retry.properties;
        let args = [
            "backoff-receive",
            "--service",
            &service_name,
            "--target",
            "flaky",
            "--body",
            body,
            "--content-type",
            properties.content_type.as_deref().unwrap(),
            "--content-encoding",
            properties.content_encoding.as_deref().unwrap(),
            "--max-retries",
            "2",
        ];
        let lines = Peer::spawn(&python, UFW, "memory://", &args).finish().await;
        let call = &lines[0];
        assert_eq!(call["fn_args"], json!([payload]), "{call}");
        assert_eq!(call["fn_kwargs"], json!({}), "{call}");
        assert_eq!(call["_meta"]["backoff"]["retry_count"], retry_count, "{call}");
        assert_eq!(call["backoff_data"]["retry_count"], retry_count, "{call}");
        assert!(call["backoff_data"]["last_retry"].as_f64().unwrap() > 1.6e9, "{call}");
        // max_retries 2: the package would retry after the first retry, not after the second.
        assert_eq!(call["can_retry"], retry_count < 2, "{call}");
    }
    service.stop().await.unwrap();
}
