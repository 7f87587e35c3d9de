//! Behaviour tests of the emulated `rabbitmq_delayed_message_exchange` plugin.

use std::time::{Duration, Instant};

use futures::StreamExt;

use super::tests::{binding, body, buffered, declare, exchange, get, message, ready, recv};
use super::{MemoryBroker, MemoryTransport};
use crate::transport::{
    ConsumeOptions, ExchangeKind, ExchangeSpec, HeaderValue, Headers, OutgoingMessage,
    PublishOptions, Transport, TransportError,
};

/// A connection to a fresh broker of its own with the plugin enabled.
fn with_plugin(name: &str) -> MemoryTransport {
    let uri = format!(
        "memory://{name}-{}?plugins=rabbitmq_delayed_message_exchange",
        uuid::Uuid::new_v4()
    );
    MemoryTransport::connect(&uri).expect("a memory:// URI with the plugin")
}

fn delayed(name: &str, kind: &str) -> ExchangeSpec {
    ExchangeSpec {
        kind: ExchangeKind::Custom("x-delayed-message".into()),
        arguments: Headers::from([("x-delayed-type".to_owned(), HeaderValue::from(kind))]),
        ..ExchangeSpec::topic(name)
    }
}

fn later(body: &str, delay: HeaderValue) -> OutgoingMessage {
    let mut message = message(body);
    message.properties.headers.insert("x-delay".into(), delay);
    message
}

#[tokio::test]
async fn the_plugin_is_enabled_by_name_only() {
    let stock = MemoryBroker::new("stock").connect();
    let error = stock.declare_exchange(&delayed("d", "direct")).await.unwrap_err();
    assert!(error.to_string().contains("unknown exchange type 'x-delayed-message'"), "{error}");
    let error = MemoryTransport::connect("memory://x?plugins=delayed").unwrap_err();
    assert!(
        matches!(&error, TransportError::InvalidUri(text) if text.contains("plugins=rabbitmq_delayed_message_exchange")),
        "{error}"
    );
    let t = with_plugin("enabled");
    t.declare_exchange(&delayed("d", "direct")).await.unwrap();
    t.declare_exchange(&delayed("d", "direct")).await.unwrap();
    let error = t.declare_exchange(&exchange("d", ExchangeKind::Direct)).await.unwrap_err();
    assert!(
        matches!(&error, TransportError::PreconditionFailed(text) if text.contains("'type'")),
        "{error}"
    );
    let no_type = ExchangeSpec { arguments: Headers::new(), ..delayed("e", "direct") };
    let error = t.declare_exchange(&no_type).await.unwrap_err();
    assert!(error.to_string().contains("'x-delayed-type' must be an existing"), "{error}");
    let error = t.declare_exchange(&delayed("f", "nope")).await.unwrap_err();
    assert!(error.to_string().contains("unknown exchange type 'nope'"), "{error}");
}

#[tokio::test]
async fn a_delayed_message_is_held_then_routed_like_the_delayed_type_with_x_delay_negated() {
    let t = with_plugin("held");
    t.declare_exchange(&delayed("later", "topic")).await.unwrap();
    declare(&t, "orders").await;
    declare(&t, "other").await;
    t.bind_queue(&binding("orders", "later", "order.*")).await.unwrap();
    t.bind_queue(&binding("other", "later", "invoice.#")).await.unwrap();
    let mut orders = t.consume("orders", ConsumeOptions::default()).await.unwrap();
    let sent = Instant::now();
    let options = PublishOptions::default();
    t.publish("later", "order.paid", later("held", HeaderValue::Int(150)), options).await.unwrap();
    t.publish("later", "order.new", message("now"), options).await.unwrap();
    let first = recv(&mut orders).await;
    assert_eq!(body(&first), "now");
    assert!(sent.elapsed() < Duration::from_millis(150));
    assert!(buffered(&mut orders).is_none(), "the delayed message waits");
    let second = recv(&mut orders).await;
    assert!(sent.elapsed() >= Duration::from_millis(150), "{:?}", sent.elapsed());
    assert_eq!(body(&second), "held");
    assert_eq!((second.exchange.as_str(), second.routing_key.as_str()), ("later", "order.paid"));
    assert_eq!(second.properties.headers.get("x-delay"), Some(&HeaderValue::Int(-150)));
    assert_eq!(ready(&t, "other").await, 0, "routed like a topic exchange");
    for delivery in [first, second] {
        delivery.acker.ack().await.unwrap();
    }
}

#[tokio::test]
async fn x_delay_is_read_as_the_plugin_reads_it() {
    let t = with_plugin("values");
    t.declare_exchange(&delayed("later", "direct")).await.unwrap();
    declare(&t, "q").await;
    t.bind_queue(&binding("q", "later", "k")).await.unwrap();
    let options = PublishOptions::default();
    for at_once in [HeaderValue::Int(0), HeaderValue::Int(-5), HeaderValue::Bool(true)] {
        t.publish("later", "k", later("at once", at_once), options).await.unwrap();
    }
    assert_eq!(ready(&t, "q").await, 3);
    for held in [HeaderValue::from("40"), HeaderValue::Float(40.7)] {
        t.publish("later", "k", later("held", held), options).await.unwrap();
    }
    assert_eq!(ready(&t, "q").await, 3, "held, not routed yet");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ready(&t, "q").await, 5);
    for _ in 0..3 {
        get(&t, "q").await.acker.ack().await.unwrap();
    }
    let released = get(&t, "q").await;
    assert_eq!(released.properties.headers.get("x-delay"), Some(&HeaderValue::Int(-40)));
    released.acker.ack().await.unwrap();
    get(&t, "q").await.acker.ack().await.unwrap();
    let error = t
        .publish("later", "k", later("bad", HeaderValue::from("soon")), options)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("x-delay 'soon' is not an integer"), "{error}");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(ready(&t, "q").await, 0, "a refused publish holds nothing");
}

#[tokio::test]
async fn a_mandatory_publish_of_a_held_message_is_returned_yet_delivered() {
    let t = with_plugin("mandatory");
    t.declare_exchange(&delayed("later", "direct")).await.unwrap();
    declare(&t, "q").await;
    t.bind_queue(&binding("q", "later", "k")).await.unwrap();
    let mandatory = PublishOptions { mandatory: true };
    let error = t.publish("later", "k", later("held", HeaderValue::Int(30)), mandatory).await;
    assert!(matches!(error, Err(TransportError::Unroutable { .. })), "{error:?}");
    t.publish("later", "k", message("now"), mandatory).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(ready(&t, "q").await, 2);
}

#[tokio::test]
async fn an_alternate_exchange_gets_a_held_message_at_once() {
    let t = with_plugin("alternate");
    t.declare_exchange(&exchange("spill", ExchangeKind::Fanout)).await.unwrap();
    let mut with_alternate = delayed("later", "direct");
    with_alternate.arguments.insert("alternate-exchange".into(), "spill".into());
    t.declare_exchange(&with_alternate).await.unwrap();
    for queue in ["q", "spilled"] {
        declare(&t, queue).await;
    }
    t.bind_queue(&binding("q", "later", "k")).await.unwrap();
    t.bind_queue(&binding("spilled", "spill", "")).await.unwrap();
    let options = PublishOptions::default();
    t.publish("later", "k", later("held", HeaderValue::Int(30)), options).await.unwrap();
    assert_eq!((ready(&t, "q").await, ready(&t, "spilled").await), (0, 1));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!((ready(&t, "q").await, ready(&t, "spilled").await), (1, 1));
}

#[tokio::test]
async fn a_held_message_whose_exchange_is_gone_is_dropped() {
    let t = with_plugin("gone");
    t.declare_exchange(&delayed("later", "direct")).await.unwrap();
    declare(&t, "q").await;
    t.bind_queue(&binding("q", "later", "k")).await.unwrap();
    let options = PublishOptions::default();
    t.publish("later", "k", later("held", HeaderValue::Int(30)), options).await.unwrap();
    t.delete_exchange("later").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(ready(&t, "q").await, 0);
}

#[tokio::test]
async fn held_messages_count_against_the_memory_bound() {
    let name = format!("bound-{}", uuid::Uuid::new_v4());
    let uri = format!("memory://{name}?max_bytes=1000&plugins=rabbitmq_delayed_message_exchange");
    let t = MemoryTransport::connect(&uri).unwrap();
    t.declare_exchange(&delayed("later", "direct")).await.unwrap();
    declare(&t, "q").await;
    t.bind_queue(&binding("q", "later", "k")).await.unwrap();
    let options = PublishOptions::default();
    let big = "x".repeat(600);
    t.publish("later", "k", later(&big, HeaderValue::Int(60_000)), options).await.unwrap();
    let error = t.publish("later", "k", later(&big, HeaderValue::Int(60_000)), options).await;
    assert!(matches!(error, Err(TransportError::LimitReached { .. })), "{error:?}");
}

#[tokio::test(start_paused = true)]
async fn a_paused_clock_holds_a_delayed_message_exactly_its_delay() {
    let t = with_plugin("paused");
    t.declare_exchange(&delayed("later", "direct")).await.unwrap();
    declare(&t, "orders").await;
    t.bind_queue(&binding("orders", "later", "order")).await.unwrap();
    let options = PublishOptions::default();
    let half_an_hour = HeaderValue::Int(30 * 60 * 1000);
    t.publish("later", "order", later("held", half_an_hour), options).await.unwrap();
    let sent = tokio::time::Instant::now();
    let mut orders = t.consume("orders", ConsumeOptions::default()).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(3600), orders.next()).await;
    let delivery = delivery.expect("delivered within the hour").expect("consumer open");
    let held = sent.elapsed();
    assert!(held >= Duration::from_secs(1800), "{held:?}");
    assert!(held < Duration::from_millis(1_800_010), "{held:?}");
    assert_eq!(body(&delivery), "held");
}
