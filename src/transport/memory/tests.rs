//! Behaviour tests of the in-memory broker, through the `Transport` trait.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use futures::FutureExt;

use super::{MemoryBroker, MemoryTransport};
use crate::transport::{
    BindingSpec, ClosedPart, ConsumeOptions, Consumer, Delivery, ExchangeKind, ExchangeSpec,
    HeaderValue, Headers, Limit, OutgoingMessage, Properties, PublishOptions, QueueSpec, Transport,
    TransportError,
};

/// A fresh broker of its own and one connection to it.
fn setup() -> (Arc<MemoryBroker>, MemoryTransport) {
    let broker = MemoryBroker::new("test");
    let transport = broker.connect();
    (broker, transport)
}

pub(super) fn message(body: &str) -> OutgoingMessage {
    OutgoingMessage { body: body.to_owned().into(), properties: Properties::default() }
}

fn expiring(body: &str, ms: u64) -> OutgoingMessage {
    let mut message = message(body);
    message.properties.expiration = Some(ms.to_string());
    message
}

fn queue_with(name: &str, args: &[(&str, HeaderValue)]) -> QueueSpec {
    let mut spec = QueueSpec::durable(name);
    for (key, value) in args {
        spec.arguments.insert((*key).to_owned(), value.clone());
    }
    spec
}

pub(super) fn exchange(name: &str, kind: ExchangeKind) -> ExchangeSpec {
    ExchangeSpec { kind, ..ExchangeSpec::topic(name) }
}

pub(super) fn binding(queue: &str, exchange: &str, key: &str) -> BindingSpec {
    BindingSpec {
        queue: queue.to_owned(),
        exchange: exchange.to_owned(),
        routing_key: key.to_owned(),
        arguments: Headers::new(),
    }
}

fn prefetch(prefetch: u16) -> ConsumeOptions {
    ConsumeOptions { prefetch, ..ConsumeOptions::default() }
}

async fn publish(t: &MemoryTransport, exchange: &str, key: &str, body: &str) {
    t.publish(exchange, key, message(body), PublishOptions::default()).await.expect("publish");
}

pub(super) async fn declare(t: &MemoryTransport, name: &str) {
    t.declare_queue(&QueueSpec::durable(name)).await.expect("declare queue");
}

/// The next delivery, waiting at most 2 s (only reached when a test fails).
pub(super) async fn recv(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(2), consumer.next())
        .await
        .expect("a delivery within 2 s")
        .expect("consumer still open")
}

/// The delivery already buffered for the consumer, without waiting.
pub(super) fn buffered(consumer: &mut Consumer) -> Option<Delivery> {
    consumer.next().now_or_never().flatten()
}

pub(super) async fn get(t: &MemoryTransport, queue: &str) -> Delivery {
    t.get(queue).await.expect("get").expect("a ready message")
}

pub(super) fn body(delivery: &Delivery) -> &str {
    std::str::from_utf8(&delivery.body).expect("utf-8 body")
}

pub(super) async fn ready(t: &MemoryTransport, queue: &str) -> u32 {
    t.queue_info(queue).await.expect("queue info").message_count
}

/// Polls (every 5 ms, up to 2 s) until `condition` holds.
async fn eventually<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached within 2 s");
}

fn deaths(delivery: &Delivery) -> Vec<Headers> {
    match delivery.properties.headers.get("x-death") {
        Some(HeaderValue::Array(items)) => items
            .iter()
            .map(|item| match item {
                HeaderValue::Table(table) => table.clone(),
                other => panic!("x-death item is not a table: {other:?}"),
            })
            .collect(),
        other => panic!("no x-death array: {other:?}"),
    }
}

fn field<'a>(table: &'a Headers, key: &str) -> &'a HeaderValue {
    table.get(key).unwrap_or_else(|| panic!("no '{key}' in {table:?}"))
}

// ----- routing -----

#[tokio::test]
async fn topic_exchange_routes_by_pattern() {
    let (_broker, t) = setup();
    t.declare_exchange(&ExchangeSpec::topic("events")).await.unwrap();
    for (queue, pattern) in [("all-a", "a.#"), ("ends-c", "#.c"), ("a-star-c", "a.*.c")] {
        declare(&t, queue).await;
        t.bind_queue(&binding(queue, "events", pattern)).await.unwrap();
    }
    for key in ["a", "a.b", "a.b.c", "c", "a.c", "x.y"] {
        publish(&t, "events", key, key).await;
    }
    let drain = |queue: &'static str| {
        let t = &t;
        async move {
            let mut keys = Vec::new();
            while let Some(delivery) = t.get(queue).await.unwrap() {
                keys.push(delivery.routing_key.clone());
                delivery.acker.ack().await.unwrap();
            }
            keys
        }
    };
    assert_eq!(drain("all-a").await, ["a", "a.b", "a.b.c", "a.c"]);
    assert_eq!(drain("ends-c").await, ["a.b.c", "c", "a.c"]);
    assert_eq!(drain("a-star-c").await, ["a.b.c"]);
}

#[tokio::test]
async fn direct_fanout_and_default_exchanges() {
    let (_broker, t) = setup();
    t.declare_exchange(&exchange("direct", ExchangeKind::Direct)).await.unwrap();
    t.declare_exchange(&exchange("fanout", ExchangeKind::Fanout)).await.unwrap();
    declare(&t, "q1").await;
    declare(&t, "q2").await;
    t.bind_queue(&binding("q1", "direct", "k1")).await.unwrap();
    t.bind_queue(&binding("q2", "direct", "k2")).await.unwrap();
    t.bind_queue(&binding("q1", "fanout", "ignored")).await.unwrap();
    t.bind_queue(&binding("q2", "fanout", "")).await.unwrap();

    publish(&t, "direct", "k1", "to-q1").await;
    assert_eq!((ready(&t, "q1").await, ready(&t, "q2").await), (1, 0));
    publish(&t, "fanout", "whatever", "to-both").await;
    assert_eq!((ready(&t, "q1").await, ready(&t, "q2").await), (2, 1));
    publish(&t, "", "q2", "default").await;
    assert_eq!(ready(&t, "q2").await, 2);

    let first = get(&t, "q1").await;
    assert_eq!(
        (body(&first), first.exchange.as_str(), first.routing_key.as_str()),
        ("to-q1", "direct", "k1")
    );
    assert!(!first.redelivered);
    t.purge_queue("q2").await.unwrap();
    let mut props =
        Properties { content_type: Some("application/json".into()), ..Properties::default() };
    props.headers.insert("h".into(), HeaderValue::Int(7));
    props.correlation_id = Some("c-1".into());
    let sent = OutgoingMessage { body: "{}".into(), properties: props.clone() };
    t.publish("", "q2", sent, PublishOptions::default()).await.unwrap();
    let received = get(&t, "q2").await;
    assert_eq!((received.exchange.as_str(), received.routing_key.as_str()), ("", "q2"));
    assert_eq!(received.properties, props);

    let refused = t.declare_exchange(&ExchangeSpec::topic("")).await.unwrap_err();
    assert!(
        matches!(refused, TransportError::AccessRefused(ref text) if text.contains("default exchange"))
    );
    assert!(t.delete_exchange("").await.is_err());
}

#[tokio::test]
async fn mandatory_unroutable_and_missing_exchange() {
    let (_broker, t) = setup();
    t.declare_exchange(&ExchangeSpec::topic("events")).await.unwrap();
    let mandatory = PublishOptions { mandatory: true };
    let error = t.publish("events", "nobody", message("x"), mandatory).await.unwrap_err();
    assert_eq!(
        error,
        TransportError::Unroutable { exchange: "events".into(), routing_key: "nobody".into() }
    );
    let error = t.publish("", "no-such-queue", message("x"), mandatory).await.unwrap_err();
    assert!(matches!(error, TransportError::Unroutable { .. }));
    t.publish("events", "nobody", message("x"), PublishOptions::default()).await.unwrap();
    let error =
        t.publish("missing", "k", message("x"), PublishOptions::default()).await.unwrap_err();
    assert_eq!(error, TransportError::NotFound("no exchange 'missing' in vhost '/'".into()));
}

#[tokio::test]
async fn headers_exchange_and_alternate_exchange() {
    let (_broker, t) = setup();
    t.declare_exchange(&exchange("hdr", ExchangeKind::Headers)).await.unwrap();
    declare(&t, "pdf").await;
    let mut args = Headers::new();
    args.insert("format".into(), "pdf".into());
    t.bind_queue(&BindingSpec { arguments: args, ..binding("pdf", "hdr", "") }).await.unwrap();
    let mut pdf = message("doc");
    pdf.properties.headers.insert("format".into(), "pdf".into());
    t.publish("hdr", "", pdf, PublishOptions::default()).await.unwrap();
    publish(&t, "hdr", "", "no-headers").await;
    assert_eq!(ready(&t, "pdf").await, 1);

    let mut with_ae = ExchangeSpec::topic("main");
    with_ae.arguments.insert("alternate-exchange".into(), "fallback".into());
    t.declare_exchange(&with_ae).await.unwrap();
    t.declare_exchange(&exchange("fallback", ExchangeKind::Fanout)).await.unwrap();
    declare(&t, "unrouted").await;
    t.bind_queue(&binding("unrouted", "fallback", "")).await.unwrap();
    t.publish("main", "x", message("lost?"), PublishOptions { mandatory: true }).await.unwrap();
    assert_eq!(ready(&t, "unrouted").await, 1);
}

/// Bindings are looked up by queue and key: one differing in its arguments only is another
/// binding (a headers exchange routes by either), and those of a deleted queue are gone, so
/// a queue declared again under the name is bound anew.
#[tokio::test]
async fn bindings_of_one_queue_and_key_differ_by_their_arguments_and_go_with_their_queue() {
    let (_broker, t) = setup();
    t.declare_exchange(&exchange("hdr", ExchangeKind::Headers)).await.unwrap();
    declare(&t, "docs").await;
    for format in ["pdf", "txt", "pdf"] {
        let arguments = Headers::from([("format".to_owned(), HeaderValue::from(format))]);
        t.bind_queue(&BindingSpec { arguments, ..binding("docs", "hdr", "") }).await.unwrap();
    }
    for format in ["pdf", "txt", "odt"] {
        let mut doc = message(format);
        doc.properties.headers.insert("format".into(), format.into());
        t.publish("hdr", "", doc, PublishOptions::default()).await.unwrap();
    }
    assert_eq!(ready(&t, "docs").await, 2, "pdf and txt, once each");

    t.declare_exchange(&exchange("direct", ExchangeKind::Direct)).await.unwrap();
    t.bind_queue(&binding("docs", "direct", "k")).await.unwrap();
    t.delete_queue("docs").await.unwrap();
    declare(&t, "docs").await;
    publish(&t, "direct", "k", "unbound").await;
    assert_eq!(ready(&t, "docs").await, 0, "its bindings went with the queue");
    t.bind_queue(&binding("docs", "direct", "k")).await.unwrap();
    publish(&t, "direct", "k", "bound again").await;
    assert_eq!(ready(&t, "docs").await, 1);
}

// ----- consumers -----

#[tokio::test]
async fn prefetch_limits_unacked_deliveries() {
    let (_broker, t) = setup();
    declare(&t, "work").await;
    for i in 0..5 {
        publish(&t, "", "work", &i.to_string()).await;
    }
    let mut consumer = t.consume("work", prefetch(2)).await.unwrap();
    let first = buffered(&mut consumer).expect("first delivery");
    let second = buffered(&mut consumer).expect("second delivery");
    assert!(buffered(&mut consumer).is_none(), "a third delivery exceeds prefetch 2");
    assert_eq!(ready(&t, "work").await, 3);
    first.acker.ack().await.unwrap();
    let third = buffered(&mut consumer).expect("credit freed by the ack");
    assert_eq!(body(&third), "2");
    assert!(buffered(&mut consumer).is_none());
    second.acker.ack().await.unwrap();
    third.acker.ack().await.unwrap();
    assert_eq!(body(&buffered(&mut consumer).unwrap()), "3");
    assert_eq!(body(&buffered(&mut consumer).unwrap()), "4");
}

#[tokio::test]
async fn round_robin_between_consumers_with_credit() {
    let (_broker, t) = setup();
    declare(&t, "work").await;
    let mut a = t.consume("work", prefetch(0)).await.unwrap();
    let mut b = t.consume("work", prefetch(1)).await.unwrap();
    for i in 0..4 {
        publish(&t, "", "work", &i.to_string()).await;
    }
    // b (prefetch 1) takes one, then only a has credit. Deliveries are held (not settled).
    let held_by_a: Vec<Delivery> = std::iter::from_fn(|| buffered(&mut a)).collect();
    let a_bodies: Vec<&str> = held_by_a.iter().map(body).collect();
    let b_first = buffered(&mut b).expect("b got one");
    assert_eq!(body(&b_first), "1");
    assert!(buffered(&mut b).is_none());
    assert_eq!(a_bodies, ["0", "2", "3"]);
    assert_eq!(t.queue_info("work").await.unwrap().consumer_count, 2);
}

#[tokio::test]
async fn nack_and_reject_requeue_at_original_position() {
    let (_broker, t) = setup();
    declare(&t, "work").await;
    for body in ["a", "b", "c"] {
        publish(&t, "", "work", body).await;
    }
    let a = get(&t, "work").await;
    let b = get(&t, "work").await;
    b.acker.nack(true).await.unwrap();
    a.acker.reject(true).await.unwrap();
    let again: Vec<(String, bool)> = {
        let mut out = Vec::new();
        while let Some(d) = t.get("work").await.unwrap() {
            out.push((body(&d).to_owned(), d.redelivered));
            d.acker.ack().await.unwrap();
        }
        out
    };
    assert_eq!(again, [("a".to_owned(), true), ("b".to_owned(), true), ("c".to_owned(), false)]);

    publish(&t, "", "work", "d").await;
    let d = get(&t, "work").await;
    d.acker.ack().await.unwrap();
    assert_eq!(d.acker.ack().await.unwrap_err(), TransportError::AlreadySettled);
    assert!(d.acker.nack(true).await.is_err());
    publish(&t, "", "work", "e").await;
    let e = get(&t, "work").await;
    e.acker.reject(false).await.unwrap();
    assert_eq!(ready(&t, "work").await, 0, "reject without requeue and without DLX drops");
}

#[tokio::test]
async fn dropping_an_acker_requeues() {
    let (_broker, t) = setup();
    declare(&t, "work").await;
    publish(&t, "", "work", "m").await;
    let mut consumer = t.consume("work", prefetch(1)).await.unwrap();
    let delivery = recv(&mut consumer).await;
    assert!(!delivery.redelivered);
    drop(delivery);
    let again = recv(&mut consumer).await;
    assert_eq!(body(&again), "m");
    assert!(again.redelivered);
    again.acker.ack().await.unwrap();
    assert_eq!(ready(&t, "work").await, 0);
}

#[tokio::test]
async fn cancel_stops_new_deliveries_but_keeps_unsettled_ones_valid() {
    let (_broker, t) = setup();
    declare(&t, "work").await;
    publish(&t, "", "work", "1").await;
    let mut consumer = t.consume("work", prefetch(5)).await.unwrap();
    consumer.cancel();
    publish(&t, "", "work", "2").await;
    let held = recv(&mut consumer).await;
    assert!(consumer.next().await.is_none());
    held.acker.ack().await.unwrap();
    assert_eq!(
        t.queue_info("work").await.unwrap(),
        crate::transport::QueueInfo { message_count: 1, consumer_count: 0 }
    );
}

#[tokio::test]
async fn close_ends_consumers_and_requeues_unsettled() {
    let (broker, t) = setup();
    declare(&t, "work").await;
    publish(&t, "", "work", "1").await;
    publish(&t, "", "work", "2").await;
    let other = broker.connect();
    let mut consumer = other.consume("work", prefetch(5)).await.unwrap();
    let first = recv(&mut consumer).await;
    assert!(other.is_connected());
    other.close().await;
    assert!(!other.is_connected());
    let buffered_after_close = recv(&mut consumer).await;
    assert_eq!(body(&buffered_after_close), "2");
    assert!(consumer.next().await.is_none());
    assert!(matches!(
        first.acker.ack().await,
        Err(TransportError::Closed { what: ClosedPart::Transport, .. })
    ));
    assert!(matches!(
        other.queue_info("work").await,
        Err(TransportError::Closed { what: ClosedPart::Transport, .. })
    ));
    let again = get(&t, "work").await;
    assert_eq!((body(&again), again.redelivered), ("1", true));
    assert_eq!(body(&get(&t, "work").await), "2");

    // Dropping a transport closes it too.
    let dropped = broker.connect();
    let fetched = get(&dropped, "work").await;
    assert_eq!(ready(&t, "work").await, 0);
    drop(dropped);
    assert_eq!(ready(&t, "work").await, 1);
    drop(fetched);
    assert_eq!(ready(&t, "work").await, 1);
}

// ----- TTL and dead-lettering -----

#[tokio::test]
async fn ttl_dead_letters_and_counts_deaths_over_two_cycles() {
    let (_broker, t) = setup();
    declare(&t, "work").await;
    let delay = queue_with(
        "delay",
        &[
            ("x-message-ttl", HeaderValue::Int(30)),
            ("x-dead-letter-exchange", "".into()),
            ("x-dead-letter-routing-key", "work".into()),
        ],
    );
    t.declare_queue(&delay).await.unwrap();
    let mut sent = expiring("job", 60_000);
    sent.properties.message_id = Some("m-1".into());
    t.publish("", "delay", sent, PublishOptions::default()).await.unwrap();

    // No consumer and no further call: the timer moves the message.
    eventually(|| async { ready(&t, "work").await == 1 }).await;
    let first = get(&t, "work").await;
    assert_eq!((first.exchange.as_str(), first.routing_key.as_str()), ("", "work"));
    assert_eq!(first.properties.expiration, None, "expiration is removed on dead-lettering");
    assert_eq!(first.properties.message_id.as_deref(), Some("m-1"));
    let death = &deaths(&first)[0];
    assert_eq!(field(death, "count"), &HeaderValue::Int(1));
    assert_eq!(field(death, "reason"), &HeaderValue::from("expired"));
    assert_eq!(field(death, "queue"), &HeaderValue::from("delay"));
    assert_eq!(field(death, "exchange"), &HeaderValue::from(""));
    assert_eq!(field(death, "routing-keys"), &HeaderValue::Array(vec!["delay".into()]));
    assert_eq!(field(death, "original-expiration"), &HeaderValue::from("60000"));
    assert!(matches!(field(death, "time"), HeaderValue::Timestamp(_)));
    let headers = &first.properties.headers;
    assert_eq!(headers.get("x-first-death-reason"), Some(&"expired".into()));
    assert_eq!(headers.get("x-first-death-queue"), Some(&"delay".into()));
    assert_eq!(headers.get("x-first-death-exchange"), Some(&"".into()));

    // The framework's retry: republish the delivery to the delay queue, wait for it again.
    let mut consumer = t.consume("work", prefetch(1)).await.unwrap();
    let again = OutgoingMessage { body: first.body.clone(), properties: first.properties.clone() };
    first.acker.ack().await.unwrap();
    t.publish("", "delay", again, PublishOptions::default()).await.unwrap();
    let second = recv(&mut consumer).await;
    let second_deaths = deaths(&second);
    assert_eq!(second_deaths.len(), 1);
    assert_eq!(field(&second_deaths[0], "count"), &HeaderValue::Int(2));
    assert_eq!(field(&second_deaths[0], "original-expiration"), &HeaderValue::from("60000"));
}

#[tokio::test]
async fn rejected_messages_cycle_through_a_delay_queue() {
    let (_broker, t) = setup();
    let work = queue_with(
        "work",
        &[("x-dead-letter-exchange", "".into()), ("x-dead-letter-routing-key", "retry".into())],
    );
    let retry = queue_with(
        "retry",
        &[
            ("x-message-ttl", HeaderValue::Int(20)),
            ("x-dead-letter-exchange", "".into()),
            ("x-dead-letter-routing-key", "work".into()),
        ],
    );
    t.declare_queue(&work).await.unwrap();
    t.declare_queue(&retry).await.unwrap();
    publish(&t, "", "work", "job").await;
    let mut consumer = t.consume("work", prefetch(1)).await.unwrap();
    for round in 1..=2 {
        let delivery = recv(&mut consumer).await;
        if round == 2 {
            let found = deaths(&delivery);
            let summary: Vec<(String, i64)> = found
                .iter()
                .map(|d| {
                    let queue = field(d, "queue").as_str().unwrap().to_owned();
                    (
                        format!("{queue}/{}", field(d, "reason").as_str().unwrap()),
                        field(d, "count").as_i64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(summary, [("retry/expired".to_owned(), 1), ("work/rejected".to_owned(), 1)]);
            assert_eq!(
                delivery.properties.headers.get("x-first-death-reason"),
                Some(&"rejected".into())
            );
        }
        delivery.acker.reject(false).await.unwrap();
    }
    let third = recv(&mut consumer).await;
    let summary: Vec<i64> =
        deaths(&third).iter().map(|d| field(d, "count").as_i64().unwrap()).collect();
    assert_eq!(summary, [2, 2], "retry/expired then work/rejected, both counted twice");
    third.acker.ack().await.unwrap();
}

#[tokio::test]
async fn automatic_dead_letter_cycle_is_dropped_like_rabbitmq() {
    let (_broker, t) = setup();
    let ping = queue_with(
        "ping",
        &[
            ("x-message-ttl", HeaderValue::Int(10)),
            ("x-dead-letter-exchange", "".into()),
            ("x-dead-letter-routing-key", "pong".into()),
        ],
    );
    let pong = queue_with(
        "pong",
        &[
            ("x-message-ttl", HeaderValue::Int(10)),
            ("x-dead-letter-exchange", "".into()),
            ("x-dead-letter-routing-key", "ping".into()),
        ],
    );
    t.declare_queue(&ping).await.unwrap();
    t.declare_queue(&pong).await.unwrap();
    declare(&t, "observer").await;
    publish(&t, "", "ping", "loop").await;
    // ping -> pong -> (ping would close a cycle without rejection: dropped)
    eventually(|| async { ready(&t, "ping").await == 0 && ready(&t, "pong").await == 0 }).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!((ready(&t, "ping").await, ready(&t, "pong").await), (0, 0));
}

/// `queue/reason` of each `x-death` entry, in order.
fn death_summary(delivery: &Delivery) -> Vec<String> {
    deaths(delivery)
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                field(d, "queue").as_str().unwrap(),
                field(d, "reason").as_str().unwrap()
            )
        })
        .collect()
}

/// A queue that dead-letters through the default exchange to `next`, with `extra` arguments.
fn dead_letters_to(name: &str, next: &str, extra: &[(&str, HeaderValue)]) -> QueueSpec {
    let mut spec = queue_with(
        name,
        &[("x-dead-letter-exchange", "".into()), ("x-dead-letter-routing-key", next.into())],
    );
    for (key, value) in extra {
        spec.arguments.insert((*key).to_owned(), value.clone());
    }
    spec
}

#[tokio::test]
async fn x_death_entries_are_regrouped_in_reverse_as_on_rabbitmq() {
    // Checked on RabbitMQ 3.10: a list of two or more deaths is reversed before a death is
    // recorded, so the newest comes first and the others follow oldest first.
    let (_broker, t) = setup();
    t.declare_queue(&dead_letters_to("a", "b", &[("x-max-length", HeaderValue::Int(1))]))
        .await
        .unwrap();
    t.declare_queue(&dead_letters_to("b", "a", &[])).await.unwrap();
    publish(&t, "", "a", "first").await;
    get(&t, "a").await.acker.reject(false).await.unwrap();
    get(&t, "b").await.acker.reject(false).await.unwrap();
    // "first" is back in a: one more message pushes it out (maxlen) to b
    publish(&t, "", "a", "second").await;
    let dead = get(&t, "b").await;
    assert_eq!(body(&dead), "first");
    assert_eq!(death_summary(&dead), ["a/maxlen", "a/rejected", "b/rejected"]);
    assert_eq!(dead.properties.headers.get("x-first-death-queue"), Some(&"a".into()));
    dead.acker.ack().await.unwrap();
}

#[tokio::test]
async fn a_cycle_is_detected_on_the_regrouped_x_death_as_on_rabbitmq() {
    // a -(expired)-> b -(expired)-> c -(rejected)-> a -(expired)-> b: on RabbitMQ 3.10 the
    // last hop closes a cycle without rejection (x-death then reads a/expired, b/expired,
    // c/rejected), and the message is dropped.
    let (_broker, t) = setup();
    let ttl = [("x-message-ttl", HeaderValue::Int(20))];
    t.declare_queue(&dead_letters_to("a", "b", &ttl)).await.unwrap();
    t.declare_queue(&dead_letters_to("b", "c", &ttl)).await.unwrap();
    t.declare_queue(&dead_letters_to("c", "a", &[])).await.unwrap();
    publish(&t, "", "a", "loop").await;
    eventually(|| async { ready(&t, "c").await == 1 }).await;
    let dead = get(&t, "c").await;
    assert_eq!(death_summary(&dead), ["b/expired", "a/expired"]);
    dead.acker.reject(false).await.unwrap();
    eventually(|| async { ready(&t, "a").await == 0 }).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let left = (ready(&t, "a").await, ready(&t, "b").await, ready(&t, "c").await);
    assert_eq!(left, (0, 0, 0), "dropped when expiring from a, as RabbitMQ does");
}

#[tokio::test(start_paused = true)]
async fn a_passive_declare_keeps_an_expiring_queue_in_use() {
    // RabbitMQ restarts the x-expires countdown on a passive declare too: a queue polled for
    // its length (queue_len in tests, a health check) stays.
    let (broker, t) = setup();
    t.declare_queue(&queue_with("polled", &[("x-expires", HeaderValue::Int(100))])).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        t.queue_info("polled").await.expect("polled within x-expires: still there");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    tokio::task::yield_now().await;
    assert!(!broker.queue_names().contains(&"polled".to_owned()), "unused: expired");
}

#[tokio::test]
async fn per_message_expiration_only_at_the_head() {
    let (_broker, t) = setup();
    let spec = queue_with(
        "work",
        &[("x-dead-letter-exchange", "".into()), ("x-dead-letter-routing-key", "expired".into())],
    );
    t.declare_queue(&spec).await.unwrap();
    declare(&t, "expired").await;
    publish(&t, "", "work", "long-lived").await;
    t.publish("", "work", expiring("short", 20), PublishOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(ready(&t, "work").await, 2, "the expired message waits behind the head");
    get(&t, "work").await.acker.ack().await.unwrap();
    assert_eq!(ready(&t, "work").await, 0, "once at the head it expires");
    let dead = get(&t, "expired").await;
    assert_eq!(body(&dead), "short");
    assert_eq!(dead.properties.expiration, None);

    // Alone in the queue, it expires through the timer.
    t.publish("", "work", expiring("alone", 20), PublishOptions::default()).await.unwrap();
    eventually(|| async { ready(&t, "expired").await == 1 }).await;

    let mut bad = message("bad");
    bad.properties.expiration = Some("soon".into());
    let error = t.publish("", "work", bad, PublishOptions::default()).await.unwrap_err();
    assert!(matches!(error, TransportError::PreconditionFailed(_)));
}

#[tokio::test]
async fn max_length_drop_head_and_reject_publish() {
    let (_broker, t) = setup();
    let spec = queue_with(
        "bounded",
        &[
            ("x-max-length", HeaderValue::Int(2)),
            ("x-dead-letter-exchange", "".into()),
            ("x-dead-letter-routing-key", "overflow".into()),
        ],
    );
    t.declare_queue(&spec).await.unwrap();
    declare(&t, "overflow").await;
    for body in ["1", "2", "3"] {
        publish(&t, "", "bounded", body).await;
    }
    assert_eq!(ready(&t, "bounded").await, 2);
    assert_eq!(body(&get(&t, "bounded").await), "2");
    let dropped = get(&t, "overflow").await;
    assert_eq!(body(&dropped), "1");
    assert_eq!(field(&deaths(&dropped)[0], "reason"), &HeaderValue::from("maxlen"));

    let strict = queue_with(
        "strict",
        &[("x-max-length", HeaderValue::Int(1)), ("x-overflow", "reject-publish".into())],
    );
    t.declare_queue(&strict).await.unwrap();
    publish(&t, "", "strict", "kept").await;
    let error = t.publish("", "strict", message("refused"), PublishOptions::default()).await;
    assert_eq!(error, Err(TransportError::Nacked));
    assert_eq!(body(&get(&t, "strict").await), "kept");
}

#[tokio::test]
async fn quorum_queues_overflow_as_rabbitmq_3_10_quorum_queues_do() {
    let (_broker, t) = setup();
    let quorum = |name: &str, overflow: &str, max: i64| {
        queue_with(
            name,
            &[
                ("x-queue-type", "quorum".into()),
                ("x-max-length", HeaderValue::Int(max)),
                ("x-overflow", overflow.into()),
            ],
        )
    };
    // reject-publish: the publish that crosses the limit is taken, the next refused
    t.declare_queue(&quorum("strict", "reject-publish", 2)).await.unwrap();
    let mut outcomes = Vec::new();
    for body in ["1", "2", "3", "4"] {
        outcomes.push(t.publish("", "strict", message(body), PublishOptions::default()).await);
    }
    assert_eq!(outcomes, [Ok(()), Ok(()), Ok(()), Err(TransportError::Nacked)]);
    assert_eq!(ready(&t, "strict").await, 3);
    // reject-publish-dlx is taken as drop-head: every publish taken, the oldest dropped
    t.declare_queue(&quorum("dlx", "reject-publish-dlx", 1)).await.unwrap();
    for body in ["1", "2", "3"] {
        publish(&t, "", "dlx", body).await;
    }
    assert_eq!(body(&get(&t, "dlx").await), "3");
}

#[tokio::test]
async fn queue_arguments_are_checked_and_compared_as_rabbitmq_3_10_does() {
    let (_broker, t) = setup();
    let refused = |args: &[(&str, HeaderValue)]| queue_with("checked", args);
    for args in [
        vec![("x-queue-type", HeaderValue::from("bogus"))],
        vec![("x-queue-mode", HeaderValue::from("bogus"))],
        vec![("x-queue-version", HeaderValue::Int(3))],
    ] {
        let declared = t.declare_queue(&refused(&args)).await;
        assert!(matches!(declared, Err(TransportError::PreconditionFailed(_))), "{declared:?}");
    }
    t.declare_queue(&queue_with("lazy", &[("x-queue-mode", "lazy".into())])).await.unwrap();
    let other = queue_with("lazy", &[("x-queue-mode", "default".into())]);
    let declared = t.declare_queue(&other).await;
    assert!(matches!(declared, Err(TransportError::PreconditionFailed(_))), "{declared:?}");
    let v2 = queue_with("versioned", &[("x-queue-version", HeaderValue::Int(2))]);
    t.declare_queue(&v2).await.unwrap();
    let v1 = queue_with("versioned", &[("x-queue-version", HeaderValue::Int(1))]);
    let declared = t.declare_queue(&v1).await;
    assert!(matches!(declared, Err(TransportError::PreconditionFailed(_))), "{declared:?}");
}

// ----- declarations -----

#[tokio::test]
async fn queue_names_over_255_bytes_are_refused_as_amqp_refuses_them() {
    let (_broker, t) = setup();
    declare(&t, &"q".repeat(255)).await;
    let error = t.declare_queue(&QueueSpec::durable("q".repeat(256))).await.unwrap_err();
    assert!(
        matches!(&error, TransportError::Invalid(text) if text.contains("256 bytes")),
        "{error:?}"
    );
}

#[tokio::test]
async fn inequivalent_declarations_fail() {
    let (_broker, t) = setup();
    t.declare_exchange(&ExchangeSpec::topic("x")).await.unwrap();
    t.declare_exchange(&ExchangeSpec::topic("x")).await.unwrap();
    let error = t
        .declare_exchange(&ExchangeSpec { auto_delete: true, ..ExchangeSpec::topic("x") })
        .await
        .unwrap_err();
    assert_eq!(
        error,
        TransportError::PreconditionFailed(
            "inequivalent arg 'auto_delete' for exchange 'x' in vhost '/': received 'true' but \
             current is 'false'"
                .into()
        )
    );
    let error = t.declare_exchange(&exchange("x", ExchangeKind::Fanout)).await.unwrap_err();
    assert!(
        matches!(error, TransportError::PreconditionFailed(ref text) if text.contains("'type'"))
    );
    let delayed = exchange("d", ExchangeKind::Custom("x-delayed-message".into()));
    let error = t.declare_exchange(&delayed).await.unwrap_err();
    assert!(error.to_string().contains("unknown exchange type 'x-delayed-message'"), "{error}");

    declare(&t, "q").await;
    let info = t.declare_queue(&QueueSpec::durable("q")).await.unwrap();
    assert_eq!(info.message_count, 0);
    let error = t
        .declare_queue(&QueueSpec { durable: false, ..QueueSpec::durable("q") })
        .await
        .unwrap_err();
    assert_eq!(
        error,
        TransportError::PreconditionFailed(
            "inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false' but current \
             is 'true'"
                .into()
        )
    );
    let ttl = queue_with("q", &[("x-message-ttl", HeaderValue::Int(1000))]);
    let error = t.declare_queue(&ttl).await.unwrap_err();
    assert!(
        matches!(error, TransportError::PreconditionFailed(ref text) if text.contains("x-message-ttl"))
    );
    let classic = queue_with("q", &[("x-queue-type", "classic".into())]);
    t.declare_queue(&classic).await.unwrap();
    let error = t.declare_queue(&queue_with("bad", &[("x-message-ttl", "1".into())])).await;
    assert!(matches!(error, Err(TransportError::PreconditionFailed(_))));
}

#[tokio::test]
async fn each_queue_type_refuses_the_arguments_of_the_others() {
    // Checked on RabbitMQ 3.10: a classic queue declared with a quorum queue's delivery limit
    // fails to declare (it is not ignored), and a quorum queue refuses classic-only modes.
    let (_broker, t) = setup();
    let quorum = |name: &str, arg: (&str, HeaderValue)| {
        queue_with(name, &[("x-queue-type", "quorum".into()), arg])
    };
    let refused = [
        (queue_with("c1", &[("x-delivery-limit", HeaderValue::Int(5))]), "x-delivery-limit"),
        (
            queue_with("c2", &[("x-quorum-initial-group-size", HeaderValue::Int(1))]),
            "x-quorum-initial-group-size",
        ),
        (quorum("q1", ("x-queue-mode", "lazy".into())), "x-queue-mode"),
        (quorum("q2", ("x-max-priority", HeaderValue::Int(5))), "x-max-priority"),
    ];
    for (spec, arg) in refused {
        let error = t.declare_queue(&spec).await.unwrap_err();
        let kind = if spec.arguments.contains_key("x-queue-type") { "quorum" } else { "classic" };
        assert_eq!(
            error,
            TransportError::PreconditionFailed(format!(
                "invalid arg '{arg}' for queue '{}' in vhost '/' of queue type rabbit_{kind}_queue",
                spec.name
            ))
        );
    }
    t.declare_queue(&quorum("q3", ("x-delivery-limit", HeaderValue::Int(5)))).await.unwrap();
    t.declare_queue(&queue_with("c3", &[("x-queue-mode", "lazy".into())])).await.unwrap();
}

#[tokio::test]
async fn exclusive_queue_belongs_to_its_connection() {
    let (broker, t) = setup();
    let other = broker.connect();
    let spec = QueueSpec { exclusive: true, durable: false, ..QueueSpec::durable("mine") };
    t.declare_queue(&spec).await.unwrap();
    t.declare_queue(&spec).await.unwrap();
    assert!(matches!(other.declare_queue(&spec).await, Err(TransportError::ResourceLocked(_))));
    assert!(matches!(
        other.consume("mine", prefetch(1)).await,
        Err(TransportError::ResourceLocked(_))
    ));
    assert!(matches!(other.get("mine").await, Err(TransportError::ResourceLocked(_))));
    publish(&other, "", "mine", "anyone may publish").await;
    assert_eq!(ready(&t, "mine").await, 1);
    t.close().await;
    assert!(!broker.queue_names().contains(&"mine".to_owned()));
}

#[tokio::test]
async fn exclusive_consumer_locks_the_queue() {
    let (_broker, t) = setup();
    declare(&t, "q").await;
    let exclusive = ConsumeOptions { exclusive: true, ..prefetch(1) };
    let mut first = t.consume("q", exclusive.clone()).await.unwrap();
    assert!(matches!(t.consume("q", prefetch(1)).await, Err(TransportError::ResourceLocked(_))));
    first.cancel();
    let _shared = t.consume("q", prefetch(1)).await.unwrap();
    assert!(matches!(t.consume("q", exclusive).await, Err(TransportError::ResourceLocked(_))));
}

#[tokio::test]
async fn auto_delete_queue_and_exchange() {
    let (broker, t) = setup();
    let spec = QueueSpec { auto_delete: true, ..QueueSpec::durable("temp") };
    t.declare_queue(&spec).await.unwrap();
    let ex = ExchangeSpec { auto_delete: true, ..ExchangeSpec::topic("temp-x") };
    t.declare_exchange(&ex).await.unwrap();
    t.bind_queue(&binding("temp", "temp-x", "#")).await.unwrap();
    assert!(broker.queue_names().contains(&"temp".to_owned()), "no consumer yet: kept");
    let mut first = t.consume("temp", prefetch(1)).await.unwrap();
    let mut second = t.consume("temp", prefetch(1)).await.unwrap();
    first.cancel();
    assert!(broker.queue_names().contains(&"temp".to_owned()));
    second.cancel();
    assert!(!broker.queue_names().contains(&"temp".to_owned()));
    assert!(!broker.exchange_names().contains(&"temp-x".to_owned()), "lost its last binding");
}

#[tokio::test]
async fn unused_queue_expires() {
    let (broker, t) = setup();
    t.declare_queue(&queue_with("short", &[("x-expires", HeaderValue::Int(30))])).await.unwrap();
    t.declare_queue(&queue_with("busy", &[("x-expires", HeaderValue::Int(30))])).await.unwrap();
    let _consumer = t.consume("busy", prefetch(1)).await.unwrap();
    publish(&t, "", "short", "lost with the queue").await;
    eventually(|| async { !broker.queue_names().contains(&"short".to_owned()) }).await;
    assert!(broker.queue_names().contains(&"busy".to_owned()), "a consumed queue is in use");
    assert!(matches!(t.queue_info("short").await, Err(TransportError::NotFound(_))));
}

/// A queue whose messages expire after `ttl_ms` into `dead_letters`.
fn expiring_into(name: &str, ttl_ms: i64, dead_letters: &str) -> QueueSpec {
    queue_with(
        name,
        &[
            ("x-message-ttl", HeaderValue::Int(ttl_ms)),
            ("x-dead-letter-exchange", "".into()),
            ("x-dead-letter-routing-key", dead_letters.into()),
        ],
    )
}

/// Polls without a runtime (every 5 ms, up to 2 s) until `queue` holds `count` messages.
fn wait_ready_without_runtime(t: &MemoryTransport, queue: &str, count: u32) {
    for _ in 0..400 {
        if futures::executor::block_on(ready(t, queue)) == count {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{queue} never held {count} messages");
}

#[test]
fn ttls_fire_where_no_runtime_is_current() {
    let (_broker, t) = setup();
    futures::executor::block_on(async {
        declare(&t, "expired").await;
        t.declare_queue(&expiring_into("waiting", 20, "expired")).await.unwrap();
        publish(&t, "", "waiting", "soon gone").await;
    });
    wait_ready_without_runtime(&t, "expired", 1);
}

#[test]
fn pending_deadlines_outlive_the_runtime_that_set_them() {
    let (_broker, t) = setup();
    let mut published = 0;
    for (queue, then) in [("unpolled", Duration::ZERO), ("sleeping", Duration::from_millis(5))] {
        // The message must still wait when its runtime is dropped, or the drop proves nothing:
        // a thread descheduled past the TTL (a loaded machine) sees it expired already, and
        // tries again, on a queue of its own, with the TTL doubled.
        let mut ttl = 50;
        loop {
            let queue = format!("{queue}-{ttl}");
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                declare(&t, "expired").await;
                t.declare_queue(&expiring_into(&queue, ttl, "expired")).await.unwrap();
                publish(&t, "", &queue, &queue).await;
                // the timer task has run and sleeps until the TTL, or has not run yet
                tokio::time::sleep(then).await;
            });
            drop(runtime);
            published += 1;
            if futures::executor::block_on(ready(&t, &queue)) == 1 {
                break;
            }
            // the last TTL, 800 ms, still expires within the 2 s waited below
            assert!(ttl < 800, "expired before a TTL of {ttl} ms was over, every time");
            ttl *= 2;
        }
    }
    wait_ready_without_runtime(&t, "expired", published);
}

#[tokio::test]
async fn purge_delete_get_and_missing_entities() {
    let (_broker, t) = setup();
    declare(&t, "q").await;
    assert!(t.get("q").await.unwrap().is_none());
    for body in ["1", "2", "3"] {
        publish(&t, "", "q", body).await;
    }
    let held = get(&t, "q").await;
    assert_eq!(t.purge_queue("q").await.unwrap(), 2);
    held.acker.nack(true).await.unwrap();
    assert_eq!(ready(&t, "q").await, 1);
    let mut consumer = t.consume("q", prefetch(0)).await.unwrap();
    let _delivered = recv(&mut consumer).await;
    publish(&t, "", "q", "4").await;
    publish(&t, "", "q", "5").await;
    assert_eq!(t.delete_queue("q").await.unwrap(), 0);
    let mut rest = 0;
    while consumer.next().await.is_some() {
        rest += 1;
    }
    assert_eq!(rest, 2, "buffered deliveries, then the consumer ends");
    assert_eq!(t.delete_queue("q").await.unwrap(), 0);

    for error in [
        t.queue_info("q").await.unwrap_err(),
        t.get("q").await.unwrap_err(),
        t.consume("q", prefetch(1)).await.unwrap_err(),
        t.bind_queue(&binding("q", "amq.topic", "#")).await.unwrap_err(),
        t.purge_queue("q").await.unwrap_err(),
    ] {
        assert_eq!(error, TransportError::NotFound("no queue 'q' in vhost '/'".into()));
    }
    declare(&t, "q").await;
    let error = t.bind_queue(&binding("q", "nope", "#")).await.unwrap_err();
    assert_eq!(error, TransportError::NotFound("no exchange 'nope' in vhost '/'".into()));
    t.declare_exchange(&ExchangeSpec::topic("gone")).await.unwrap();
    t.bind_queue(&binding("q", "gone", "#")).await.unwrap();
    t.delete_exchange("gone").await.unwrap();
    assert!(matches!(
        t.publish("gone", "k", message("x"), PublishOptions::default()).await,
        Err(TransportError::NotFound(_))
    ));
}

#[tokio::test]
async fn quorum_queue_counts_deliveries() {
    let (_broker, t) = setup();
    t.declare_queue(&queue_with("qq", &[("x-queue-type", "quorum".into())])).await.unwrap();
    publish(&t, "", "qq", "m").await;
    let first = get(&t, "qq").await;
    // RabbitMQ 3.10 adds the count to every basic.get of a quorum queue (a consumer's first
    // delivery has none: quorum_queue_hands_back_behind_the_messages_never_delivered)
    assert_eq!(first.properties.headers.get("x-delivery-count"), Some(&HeaderValue::Int(0)));
    first.acker.reject(true).await.unwrap();
    let second = get(&t, "qq").await;
    assert!(second.redelivered);
    assert_eq!(second.properties.headers.get("x-delivery-count"), Some(&HeaderValue::Int(1)));
    drop(second);
    let third = get(&t, "qq").await;
    assert_eq!(third.properties.headers.get("x-delivery-count"), Some(&HeaderValue::Int(2)));
    third.acker.ack().await.unwrap();

    let error = t
        .declare_queue(&QueueSpec {
            durable: false,
            ..queue_with("bad-qq", &[("x-queue-type", "quorum".into())])
        })
        .await
        .unwrap_err();
    assert!(matches!(error, TransportError::PreconditionFailed(_)));

    // Classic queues do not add the header.
    declare(&t, "classic").await;
    publish(&t, "", "classic", "m").await;
    get(&t, "classic").await.acker.nack(true).await.unwrap();
    assert_eq!(get(&t, "classic").await.properties.headers.get("x-delivery-count"), None);
}

/// Checked on RabbitMQ 3.10: a message handed back to a quorum queue (nacked, rejected, or
/// dropped unsettled) comes again after the messages never delivered, where a classic queue
/// puts it back at its place; a consumer's first delivery carries no delivery count.
#[tokio::test]
async fn quorum_queue_hands_back_behind_the_messages_never_delivered() {
    let (_broker, t) = setup();
    declare(&t, "classic").await;
    t.declare_queue(&queue_with("qq", &[("x-queue-type", "quorum".into())])).await.unwrap();
    for queue in ["classic", "qq"] {
        for body in ["m1", "m2", "m3", "m4"] {
            publish(&t, "", queue, body).await;
        }
        let (m1, m2, m3) = (get(&t, queue).await, get(&t, queue).await, get(&t, queue).await);
        m2.acker.nack(true).await.unwrap();
        m1.acker.reject(true).await.unwrap();
        drop(m3);
        let mut read = Vec::new();
        for _ in 0..4 {
            let delivery = get(&t, queue).await;
            read.push(String::from_utf8(delivery.body.to_vec()).unwrap());
            delivery.acker.ack().await.unwrap();
        }
        match queue {
            "classic" => assert_eq!(read, ["m1", "m2", "m3", "m4"]),
            _ => assert_eq!(read, ["m4", "m2", "m1", "m3"]),
        }
    }
    publish(&t, "", "qq", "fresh").await;
    let mut consumer = t.consume("qq", prefetch(1)).await.unwrap();
    let first = consumer.next().await.unwrap();
    assert_eq!(first.properties.headers.get("x-delivery-count"), None);
    first.acker.ack().await.unwrap();
}

#[tokio::test]
async fn quorum_queue_takes_back_in_front_what_a_closed_connection_held() {
    let (broker, t) = setup();
    t.declare_queue(&queue_with("qq", &[("x-queue-type", "quorum".into())])).await.unwrap();
    for body in ["m1", "m2", "m3", "m4"] {
        publish(&t, "", "qq", body).await;
    }
    let holder = broker.connect();
    let (m1, m2) = (get(&holder, "qq").await, get(&holder, "qq").await);
    holder.close().await;
    drop((m1, m2));
    let mut read = Vec::new();
    for _ in 0..4 {
        let delivery = get(&t, "qq").await;
        let count = delivery.properties.headers.get("x-delivery-count").cloned();
        read.push((String::from_utf8(delivery.body.to_vec()).unwrap(), count));
        delivery.acker.ack().await.unwrap();
    }
    let once = Some(HeaderValue::Int(1));
    let fresh = Some(HeaderValue::Int(0));
    let expected = [
        ("m1".to_owned(), once.clone()),
        ("m2".to_owned(), once),
        ("m3".to_owned(), fresh.clone()),
        ("m4".to_owned(), fresh),
    ];
    assert_eq!(read, expected);
}

#[tokio::test]
async fn uris_reach_shared_brokers() {
    let a = MemoryTransport::connect("memory://registry-test").unwrap();
    let b = MemoryTransport::connect("memory://registry-test").unwrap();
    let other = MemoryTransport::connect("memory://registry-test-other").unwrap();
    assert!(Arc::ptr_eq(a.broker(), b.broker()));
    assert!(!Arc::ptr_eq(a.broker(), other.broker()));
    assert!(MemoryTransport::connect("memory://").is_ok());
    let error = MemoryTransport::connect("amqp://user:secret@localhost").unwrap_err();
    assert!(matches!(error, TransportError::InvalidUri(ref text) if !text.contains("secret")));
    assert!(error.is_permanent());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_and_consumers() {
    let (broker, t) = setup();
    declare(&t, "load").await;
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let connection = broker.connect();
        let mut consumer = connection.consume("load", prefetch(50)).await.unwrap();
        consumers.push(tokio::spawn(async move {
            let _connection = connection;
            let mut count = 0u32;
            while let Some(delivery) = consumer.next().await {
                delivery.acker.ack().await.unwrap();
                count += 1;
                if count.is_multiple_of(1000) {
                    tokio::task::yield_now().await;
                }
            }
            count
        }));
    }
    let mut publishers = Vec::new();
    for p in 0..4 {
        let connection = broker.connect();
        publishers.push(tokio::spawn(async move {
            for i in 0..2500 {
                let body = format!("{p}-{i}");
                connection
                    .publish("", "load", message(&body), PublishOptions::default())
                    .await
                    .unwrap();
            }
        }));
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    eventually(|| async { ready(&t, "load").await == 0 }).await;
    t.delete_queue("load").await.unwrap();
    let mut total = 0;
    for consumer in consumers {
        total += consumer.await.unwrap();
    }
    assert_eq!(total, 10_000);
}

#[tokio::test]
async fn a_delivery_limit_below_one_drops_a_message_at_its_first_requeue() {
    // Checked on RabbitMQ 3.10: a quorum queue accepts `x-delivery-limit` 0 and -1 alike, and
    // both drop the message the first time it is handed back.
    let (_broker, t) = setup();
    for limit in [-1, 0] {
        let name = format!("limited{limit}");
        let args =
            [("x-queue-type", "quorum".into()), ("x-delivery-limit", HeaderValue::Int(limit))];
        t.declare_queue(&queue_with(&name, &args)).await.unwrap();
        publish(&t, "", &name, "once").await;
        get(&t, &name).await.acker.reject(true).await.unwrap();
        assert_eq!(ready(&t, &name).await, 0, "limit {limit}");
    }
}

/// The bound on ready messages counts those of every queue, and frees what a message taken,
/// a queue purged or a queue deleted held (it is kept as a running total, not added up over
/// the queues on each publish).
#[tokio::test]
async fn the_memory_bound_counts_every_queue_and_frees_what_leaves() {
    let (broker, t) = setup();
    // room for three messages of 100 bytes (each counts 256 bytes more)
    broker.set_max_bytes(3 * 356);
    for queue in ["a", "b", "c"] {
        declare(&t, queue).await;
    }
    let hundred = "x".repeat(100);
    let full = |result: Result<(), TransportError>| {
        matches!(result, Err(TransportError::LimitReached { what: Limit::BrokerMemory, .. }))
    };
    for queue in ["a", "b", "c"] {
        t.publish("", queue, message(&hundred), PublishOptions::default()).await.unwrap();
    }
    assert!(full(t.publish("", "a", message(&hundred), PublishOptions::default()).await));
    get(&t, "a").await.acker.ack().await.unwrap();
    t.publish("", "a", message(&hundred), PublishOptions::default()).await.unwrap();
    assert_eq!(t.purge_queue("b").await.unwrap(), 1);
    t.publish("", "b", message(&hundred), PublishOptions::default()).await.unwrap();
    assert!(full(t.publish("", "c", message(&hundred), PublishOptions::default()).await));
    t.delete_queue("c").await.unwrap();
    declare(&t, "c").await;
    t.publish("", "c", message(&hundred), PublishOptions::default()).await.unwrap();
    assert!(full(t.publish("", "c", message(&hundred), PublishOptions::default()).await));
}
