//! The in-memory broker refuses what AMQP carries as a short string (names, routing keys,
//! header names, most properties) over 255 bytes, with [`TransportError::Invalid`] naming the
//! field, as the RabbitMQ transport does before sending: what works on `memory://` must work
//! on RabbitMQ.

use std::fmt::Debug;

use futures::StreamExt;

use super::tests::{binding, message};
use super::{MemoryBroker, MemoryTransport};
use crate::transport::{
    ConsumeOptions, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, Properties,
    PublishOptions, QueueSpec, Transport, TransportError,
};

/// A name one byte longer than an AMQP short string holds.
fn too_long(letter: &str) -> String {
    letter.repeat(256)
}

/// The longest name an AMQP short string holds.
fn longest(letter: &str) -> String {
    letter.repeat(255)
}

/// A broker with a topic exchange `ev` and a queue `q`, and a connection to it.
async fn setup() -> MemoryTransport {
    let transport = MemoryBroker::new("short-strings").connect();
    transport.declare_exchange(&ExchangeSpec::topic("ev")).await.expect("exchange");
    transport.declare_queue(&QueueSpec::durable("q")).await.expect("queue");
    transport
}

#[track_caller]
fn assert_refused<T: Debug>(result: Result<T, TransportError>, field: &str) {
    match result {
        Err(TransportError::Invalid(text)) => {
            assert!(text.contains(field) && text.contains("256 bytes"), "{field}: {text}");
        }
        other => panic!("{field}: expected Invalid, got {other:?}"),
    }
}

async fn send(
    t: &MemoryTransport,
    key: &str,
    message: OutgoingMessage,
) -> Result<(), TransportError> {
    t.publish("", key, message, PublishOptions::default()).await
}

#[tokio::test]
async fn a_routing_key_over_255_bytes_is_refused_on_bind_and_publish() {
    let t = setup().await;
    let key = too_long("k");
    assert_refused(t.bind_queue(&binding("q", "ev", &key)).await, "routing key");
    let published = t.publish("ev", &key, message("x"), PublishOptions::default());
    assert_refused(published.await, "routing key");

    t.bind_queue(&binding("q", "ev", &longest("k"))).await.expect("255 bytes bind");
    t.publish("ev", &longest("k"), message("x"), PublishOptions::default()).await.expect("sent");
    assert_eq!(t.queue_info("q").await.expect("info").message_count, 1);
}

#[tokio::test]
async fn an_exchange_name_over_255_bytes_is_refused_wherever_it_is_sent() {
    let t = setup().await;
    let name = too_long("e");
    assert_refused(t.declare_exchange(&ExchangeSpec::topic(&name)).await, "exchange name");
    assert_refused(t.bind_queue(&binding("q", &name, "k")).await, "exchange name");
    let published = t.publish(&name, "k", message("x"), PublishOptions::default());
    assert_refused(published.await, "exchange name");
    assert_refused(t.delete_exchange(&name).await, "exchange name");

    t.declare_exchange(&ExchangeSpec::topic(longest("e"))).await.expect("255 bytes");
}

/// Not `NotFound`: the RabbitMQ transport refuses such a name before asking the broker.
#[tokio::test]
async fn a_queue_name_over_255_bytes_is_refused_by_every_operation_on_a_queue() {
    let t = setup().await;
    let name = too_long("q");
    assert_refused(t.queue_info(&name).await, "queue name");
    assert_refused(t.bind_queue(&binding(&name, "ev", "k")).await, "queue name");
    assert_refused(t.purge_queue(&name).await, "queue name");
    assert_refused(t.get(&name).await, "queue name");
    assert_refused(send(&t, &name, message("x")).await.map(|()| 0), "routing key");
    assert_refused(t.consume(&name, ConsumeOptions::default()).await, "queue name");
    assert_refused(t.delete_queue(&name).await, "queue name");
}

#[tokio::test]
async fn a_consumer_tag_over_255_bytes_is_refused() {
    let t = setup().await;
    let tagged = |tag: String| ConsumeOptions { consumer_tag: tag, ..ConsumeOptions::default() };
    assert_refused(t.consume("q", tagged(too_long("c"))).await, "consumer tag");
    let consumer = t.consume("q", tagged(longest("c"))).await.expect("255 bytes tag");
    assert_eq!(consumer.tag(), longest("c"));
}

/// Where a short-string property is held in [`Properties`].
type PropertyField = fn(&mut Properties) -> &mut Option<String>;

/// Every short-string property, by the name the RabbitMQ transport gives it.
fn short_string_properties() -> Vec<(&'static str, PropertyField)> {
    vec![
        ("content_type", |p| &mut p.content_type),
        ("content_encoding", |p| &mut p.content_encoding),
        ("correlation_id", |p| &mut p.correlation_id),
        ("reply_to", |p| &mut p.reply_to),
        ("expiration", |p| &mut p.expiration),
        ("message_id", |p| &mut p.message_id),
        ("kind", |p| &mut p.kind),
        ("user_id", |p| &mut p.user_id),
        ("app_id", |p| &mut p.app_id),
    ]
}

#[tokio::test]
async fn every_short_string_property_over_255_bytes_is_refused() {
    let t = setup().await;
    for (field, property) in short_string_properties() {
        let mut long = message("x");
        *property(&mut long.properties) = Some(too_long("p"));
        assert_refused(send(&t, "q", long).await, field);
    }
    assert_eq!(t.queue_info("q").await.expect("info").message_count, 0);
}

#[tokio::test]
async fn short_string_properties_of_255_bytes_go_through() {
    let t = setup().await;
    // expiration and user_id have meanings of their own; the rest is only carried
    let carried = short_string_properties()
        .into_iter()
        .filter(|(field, _)| !matches!(*field, "expiration" | "user_id"));
    let mut full = message("x");
    for (_, property) in carried {
        *property(&mut full.properties) = Some(longest("p"));
    }
    send(&t, "q", full).await.expect("255 bytes properties");
    let mut consumer = t.consume("q", ConsumeOptions::default()).await.expect("consume");
    let delivery = consumer.next().await.expect("delivery");
    assert_eq!(delivery.properties.correlation_id, Some(longest("p")));
    assert_eq!(delivery.properties.kind, Some(longest("p")));
}

fn with_header(name: String, value: HeaderValue) -> OutgoingMessage {
    let mut message = message("x");
    message.properties.headers.insert(name, value);
    message
}

fn table(name: String) -> HeaderValue {
    HeaderValue::Table(Headers::from([(name, HeaderValue::from("v"))]))
}

#[tokio::test]
async fn a_header_name_over_255_bytes_is_refused_at_any_depth() {
    let t = setup().await;
    let top = with_header(too_long("h"), "v".into());
    assert_refused(send(&t, "q", top).await, "header name");
    let nested = with_header("outer".into(), table(too_long("h")));
    assert_refused(send(&t, "q", nested).await, "header name");
    let in_array = with_header("list".into(), HeaderValue::Array(vec![table(too_long("h"))]));
    assert_refused(send(&t, "q", in_array).await, "header name");

    let deep = HeaderValue::Array(vec![table(longest("h"))]);
    send(&t, "q", with_header(longest("h"), deep)).await.expect("255 bytes names");
}

#[tokio::test]
async fn an_argument_name_over_255_bytes_is_refused_in_every_declaration() {
    let t = setup().await;
    let arguments = Headers::from([(too_long("a"), HeaderValue::from("v"))]);
    let exchange = ExchangeSpec { arguments: arguments.clone(), ..ExchangeSpec::topic("ev2") };
    assert_refused(t.declare_exchange(&exchange).await, "argument name");
    let queue = QueueSpec { arguments: arguments.clone(), ..QueueSpec::durable("q2") };
    assert_refused(t.declare_queue(&queue).await, "argument name");
    let bound = crate::transport::BindingSpec { arguments, ..binding("q", "ev", "k") };
    assert_refused(t.bind_queue(&bound).await, "argument name");
}

/// One refused publish changes nothing: the connection and the broker go on as before.
#[tokio::test]
async fn a_refused_name_leaves_the_connection_usable() {
    let t = setup().await;
    assert_refused(send(&t, "q", with_header(too_long("h"), "v".into())).await, "header name");
    assert!(t.is_connected());
    send(&t, "q", message("after")).await.expect("publish after a refusal");
    assert_eq!(t.queue_info("q").await.expect("info").message_count, 1);
}

/// A connection made by URI checks the same (the check is the connection's, as the RabbitMQ
/// client's is).
#[tokio::test]
async fn a_connection_made_by_uri_refuses_the_same() {
    let t = MemoryTransport::connect("memory://short-strings-by-uri").expect("connect");
    t.declare_queue(&QueueSpec::durable("q")).await.expect("queue");
    let mut long = message("x");
    long.properties.correlation_id = Some(too_long("c"));
    assert_refused(send(&t, "q", long).await, "correlation_id");
}
