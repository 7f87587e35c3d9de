//! Tests against the local RabbitMQ (`amqp://guest:guest@127.0.0.1:5672/`).
//!
//! When the broker is unreachable they fail with `CI=true` and are skipped otherwise.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::gets::MAX_HOLDING;
use super::{RabbitMqOptions, RabbitMqTransport};
use crate::transport::{
    BindingSpec, ConsumeOptions, Consumer, Delivery, ExchangeKind, ExchangeSpec, HeaderValue,
    Headers, LostInFlight, OutgoingMessage, Properties, PublishOptions, QueueSpec, Transport,
    TransportError,
};

const BROKER: &str = "127.0.0.1:5672";
const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Tests that close connections at the broker take this lock for writing; the others for
/// reading, so a forced close never hits an unrelated test.
static BROKER_LOCK: RwLock<()> = RwLock::const_new(());

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn options(uri: &str) -> RabbitMqOptions {
    RabbitMqOptions {
        connection_name: Some(unique("rabbitmq-scratch-test")),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        publish_timeout: Duration::from_secs(20),
        ..RabbitMqOptions::new(uri)
    }
}

/// True when the broker answers; otherwise fails under CI or prints a loud skip notice.
async fn broker_up() -> bool {
    if TcpStream::connect(BROKER).await.is_ok() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "RabbitMQ unreachable at {BROKER}");
    eprintln!("SKIPPED: RabbitMQ unreachable at {BROKER}");
    false
}

/// The broker shared with the other tests: the read side of [`BROKER_LOCK`], held while the
/// test runs; `None` when the test is skipped (see [`broker_up`]).
async fn shared_broker() -> Option<RwLockReadGuard<'static, ()>> {
    if !broker_up().await {
        return None;
    }
    Some(BROKER_LOCK.read().await)
}

async fn connect(uri: &str) -> RabbitMqTransport {
    RabbitMqTransport::connect(options(uri)).await.unwrap()
}

fn plain_queue(name: &str) -> QueueSpec {
    QueueSpec { durable: false, ..QueueSpec::durable(name) }
}

fn message(body: &str, id: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: Bytes::from(body.to_owned()),
        properties: Properties { message_id: Some(id.to_owned()), ..Properties::default() },
    }
}

fn prefetch(n: u16) -> ConsumeOptions {
    ConsumeOptions { prefetch: n, ..ConsumeOptions::default() }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("no delivery within 10 s")
        .expect("consumer ended")
}

async fn publish(t: &RabbitMqTransport, queue: &str, body: &str) {
    t.publish("", queue, message(body, body), PublishOptions::default()).await.unwrap();
}

fn rich_headers() -> Headers {
    let mut death = Headers::new();
    death.insert("count".into(), HeaderValue::Int(3));
    death.insert("reason".into(), "rejected".into());
    death.insert("time".into(), HeaderValue::Timestamp(1_700_000_000));
    death.insert("routing-keys".into(), HeaderValue::Array(vec!["a.b".into()]));
    let mut headers = Headers::new();
    headers.insert(
        "nameko.call_id_stack".into(),
        HeaderValue::Array(vec!["svc.m.1".into(), "svc.n.2".into()]),
    );
    headers.insert("x-death".into(), HeaderValue::Array(vec![HeaderValue::Table(death)]));
    headers.insert("int".into(), HeaderValue::Int(-9_000_000_000));
    headers.insert("bool".into(), HeaderValue::Bool(true));
    headers.insert("float".into(), HeaderValue::Float(2.25));
    headers.insert("bytes".into(), HeaderValue::Bytes(vec![0, 1, 255]));
    headers.insert("void".into(), HeaderValue::Void);
    headers.insert("ts".into(), HeaderValue::Timestamp(1_600_000_000));
    headers.insert("unicode".into(), "héllo ✓".into());
    headers
}

#[tokio::test]
async fn roundtrip_with_every_property_and_header() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let exchange = unique("ex");
    let queue = unique("q");
    let spec = ExchangeSpec { durable: false, ..ExchangeSpec::topic(exchange.as_str()) };
    t.declare_exchange(&spec).await.unwrap();
    let mut arguments = Headers::new();
    arguments.insert("x-message-ttl".into(), HeaderValue::Int(60_000));
    arguments.insert("x-queue-type".into(), "classic".into());
    let info = t.declare_queue(&QueueSpec { arguments, ..plain_queue(&queue) }).await.unwrap();
    assert_eq!(info.message_count, 0);
    let binding = BindingSpec {
        queue: queue.clone(),
        exchange: exchange.clone(),
        routing_key: "orders.*".into(),
        arguments: Headers::new(),
    };
    t.bind_queue(&binding).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(5)).await.unwrap();
    let properties = Properties {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        headers: rich_headers(),
        delivery_mode: Some(2),
        priority: Some(4),
        correlation_id: Some("corr-1".into()),
        reply_to: Some("reply-q".into()),
        expiration: Some("50000".into()),
        message_id: Some("msg-1".into()),
        timestamp: Some(1_700_000_123),
        kind: Some("order.created".into()),
        user_id: Some("guest".into()),
        app_id: Some("tests".into()),
    };
    let outgoing = OutgoingMessage {
        body: Bytes::from_static(b"{\"id\": 1}"),
        properties: properties.clone(),
    };
    t.publish(&exchange, "orders.created", outgoing, PublishOptions { mandatory: true })
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.body, Bytes::from_static(b"{\"id\": 1}"));
    assert_eq!(delivery.exchange, exchange);
    assert_eq!(delivery.routing_key, "orders.created");
    assert!(!delivery.redelivered);
    assert_eq!(delivery.properties, properties);
    delivery.acker.ack().await.unwrap();
    assert!(matches!(delivery.acker.ack().await, Err(TransportError::AlreadySettled)));

    // basic.get, purge and counters.
    consumer.cancel();
    assert!(timeout(Duration::from_secs(5), consumer.next()).await.unwrap().is_none());
    publish(&t, &queue, "g1").await;
    publish(&t, &queue, "g2").await;
    let got = t.get(&queue).await.unwrap().expect("a message");
    assert_eq!(got.body, Bytes::from_static(b"g1"));
    got.acker.ack().await.unwrap();
    assert_eq!(t.queue_info(&queue).await.unwrap().message_count, 1);
    assert_eq!(t.purge_queue(&queue).await.unwrap(), 1);
    assert!(t.get(&queue).await.unwrap().is_none());
    assert_eq!(t.delete_queue(&queue).await.unwrap(), 0);
    t.delete_exchange(&exchange).await.unwrap();
    t.close().await;
    assert!(!t.is_connected());
}

#[tokio::test]
async fn exchange_kinds_and_queue_arguments() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let kinds =
        [ExchangeKind::Direct, ExchangeKind::Fanout, ExchangeKind::Topic, ExchangeKind::Headers];
    for kind in kinds {
        let name = unique("kind");
        let spec = ExchangeSpec {
            kind,
            durable: false,
            auto_delete: true,
            ..ExchangeSpec::topic(name.as_str())
        };
        t.declare_exchange(&spec).await.unwrap();
        t.delete_exchange(&name).await.unwrap();
    }
    let unknown = ExchangeSpec {
        kind: ExchangeKind::Custom("x-no-such-type".into()),
        ..ExchangeSpec::topic(unique("c"))
    };
    // The broker answers an unknown type with a connection error: the transport reconnects.
    assert!(t.declare_exchange(&unknown).await.is_err());
    wait_connected(&t).await;
    let dlx = unique("dlx");
    let queue = unique("q");
    let mut arguments = Headers::new();
    arguments.insert("x-expires".into(), HeaderValue::Int(600_000));
    arguments.insert("x-dead-letter-exchange".into(), dlx.as_str().into());
    arguments.insert("x-dead-letter-routing-key".into(), "dead".into());
    arguments.insert("x-queue-type".into(), "quorum".into());
    let spec = QueueSpec { arguments, ..QueueSpec::durable(queue.as_str()) };
    t.declare_queue(&spec).await.unwrap();
    t.declare_queue(&spec).await.unwrap();
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

#[tokio::test]
async fn mandatory_unroutable_and_unknown_exchange() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let exchange = unique("ex");
    t.declare_exchange(&ExchangeSpec { durable: false, ..ExchangeSpec::topic(exchange.as_str()) })
        .await
        .unwrap();
    let err = t
        .publish(&exchange, "nowhere", message("x", "1"), PublishOptions { mandatory: true })
        .await;
    assert_eq!(
        err,
        Err(TransportError::Unroutable {
            exchange: exchange.clone(),
            routing_key: "nowhere".into()
        })
    );
    t.publish(&exchange, "nowhere", message("x", "2"), PublishOptions::default()).await.unwrap();
    let missing = unique("missing");
    let err = t.publish(&missing, "k", message("x", "3"), PublishOptions::default()).await;
    assert!(matches!(err, Err(TransportError::NotFound(_))), "{err:?}");
    t.publish(&exchange, "nowhere", message("x", "4"), PublishOptions::default()).await.unwrap();
    t.delete_exchange(&exchange).await.unwrap();
    t.close().await;
}

/// An exchange and a durable queue bound to it with `routed`, for mandatory publishes of
/// which a third go to `nowhere`.
struct MixedRouting {
    t: Arc<RabbitMqTransport>,
    exchange: String,
    queue: String,
}

impl MixedRouting {
    async fn declare(t: RabbitMqTransport) -> Self {
        let exchange = unique("ex");
        let spec = ExchangeSpec { durable: false, ..ExchangeSpec::topic(exchange.as_str()) };
        t.declare_exchange(&spec).await.unwrap();
        let queue = unique("q");
        t.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: exchange.clone(),
            routing_key: "routed".into(),
            arguments: Headers::new(),
        };
        t.bind_queue(&binding).await.unwrap();
        MixedRouting { t: Arc::new(t), exchange, queue }
    }

    /// Publish message `i`, persistent (a durable queue confirms those late, in batches),
    /// mandatory: whether it is routed, and the result.
    fn publish(&self, i: usize) -> impl Future<Output = (bool, Result<(), TransportError>)> {
        let (t, exchange) = (self.t.clone(), self.exchange.clone());
        async move {
            let routed = !i.is_multiple_of(3);
            let key = if routed { "routed" } else { "nowhere" };
            let mut outgoing = message(&i.to_string(), &i.to_string());
            outgoing.properties.delivery_mode = Some(2);
            let result = t.publish(&exchange, key, outgoing, PublishOptions { mandatory: true });
            (routed, result.await)
        }
    }

    /// How many of `results` are not their publish's routing, with a few of them.
    fn wrong(results: &[(bool, Result<(), TransportError>)]) -> (usize, Vec<String>) {
        let wrong: Vec<String> = results
            .iter()
            .filter(|(routed, result)| match result {
                Ok(()) => !routed,
                Err(TransportError::Unroutable { .. }) => *routed,
                Err(_) => true,
            })
            .map(|(routed, result)| format!("routed: {routed}, {result:?}"))
            .collect();
        (wrong.len(), wrong.into_iter().take(5).collect())
    }

    async fn delete(self) -> u32 {
        let left = self.t.delete_queue(&self.queue).await.unwrap();
        self.t.delete_exchange(&self.exchange).await.unwrap();
        self.t.close().await;
        left
    }
}

/// AMQP's `basic.return` names no delivery tag, and lapin hands a returned message to the
/// first confirm it settles after it: with several publishes in flight on one channel (a
/// multiple ack, or confirms settled in between), a routed publish could be told it was
/// unroutable and the unroutable one that it was confirmed. Each result must be its own.
#[tokio::test]
async fn each_of_many_concurrent_mandatory_publishes_learns_its_own_routing() {
    let Some(_shared) = shared_broker().await else { return };
    let mixed = MixedRouting::declare(connect(URI).await).await;
    let publishes = (0..2000).map(|i| mixed.publish(i));
    let results: Vec<_> = futures::stream::iter(publishes).buffer_unordered(64).collect().await;
    assert_eq!(MixedRouting::wrong(&results), (0, vec![]), "of 2000");
    assert_eq!(mixed.delete().await, 1333);
}

/// A mandatory publish abandoned in flight (its caller stopped waiting, as an RPC call that
/// ends on its reply) stays with the dispatcher until its confirm comes, whose returned
/// message may be another's: later publishes still learn their own routing, all on one
/// channel.
#[tokio::test]
async fn abandoned_mandatory_publishes_leave_the_later_ones_right_on_one_channel() {
    let Some(_shared) = shared_broker().await else { return };
    let options = options(URI);
    let name = options.connection_name.clone().unwrap_or_default();
    let mixed = MixedRouting::declare(RabbitMqTransport::connect(options).await.unwrap()).await;
    let abandoned = (0..200).map(|i| timeout(Duration::from_millis(1), mixed.publish(i)));
    futures::stream::iter(abandoned).buffer_unordered(200).collect::<Vec<_>>().await;
    let publishes = (0..600).map(|i| mixed.publish(i));
    let results: Vec<_> = futures::stream::iter(publishes).buffer_unordered(100).collect().await;
    assert_eq!(MixedRouting::wrong(&results), (0, vec![]), "of 600");
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "channels", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&listing.stdout);
    let line = text.lines().find(|line| line.contains(&name)).expect("the connection is listed");
    let channels: usize = line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap();
    // the mandatory publishes' channel, the shared confirm channel, the declarations' one
    assert!(channels <= 3, "{channels} channels open");
    mixed.delete().await;
}

/// Mandatory publishes in flight when the connection is cut are sent again once it is back,
/// and each still learns its own routing: the dispatcher of the dead connection's channel
/// lets go of them, none waits for its timeout.
#[tokio::test]
async fn mandatory_publishes_cut_in_flight_learn_their_routing_after_the_reconnect() {
    bounded(mandatory_cut_scenario()).await;
}

async fn mandatory_cut_scenario() {
    let Some(_shared) = shared_broker().await else { return };
    let proxy = Proxy::start().await;
    let mixed = MixedRouting::declare(connect(&proxy.uri()).await).await;
    let publishes: Vec<_> = (0..600).map(|i| mixed.publish(i)).collect();
    let burst = tokio::spawn(futures::stream::iter(publishes).buffer_unordered(64).collect());
    tokio::time::sleep(Duration::from_millis(5)).await;
    proxy.cut();
    wait_disconnected(&mixed.t).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();
    let results: Vec<_> = burst.await.unwrap();
    assert_eq!(MixedRouting::wrong(&results), (0, vec![]), "of 600");
    assert!(mixed.t.connection_generation() >= 2);
    wait_connected(&mixed.t).await;
    // at least once: a routed publish whose confirm was lost went again
    let left = mixed.delete().await;
    assert!(left >= 400, "{left} of the 400 routed publishes in the queue");
}

/// A publish that breaks the shared confirm channel (an unknown exchange) must not break the
/// publishes in flight beside it: their one retry goes on a channel of their own.
#[tokio::test]
async fn a_publish_to_a_missing_exchange_breaks_no_concurrent_publish() {
    missing_exchange_scenario(PublishOptions::default()).await;
}

/// The same on the mandatory publishes' channel: its dispatcher lets go of the publishes the
/// closed channel failed, and each is sent again on a channel of its own.
#[tokio::test]
async fn a_mandatory_publish_to_a_missing_exchange_breaks_no_concurrent_publish() {
    missing_exchange_scenario(PublishOptions { mandatory: true }).await;
}

async fn missing_exchange_scenario(options: PublishOptions) {
    let Some(_shared) = shared_broker().await else { return };
    let t = Arc::new(connect(URI).await);
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let missing = unique("missing");
    for round in 0..5 {
        let mut good = Vec::new();
        for i in 0..40 {
            let (t, queue) = (t.clone(), queue.clone());
            good.push(tokio::spawn(async move {
                let body = format!("{round}-{i}");
                t.publish("", &queue, message(&body, &body), options).await
            }));
        }
        let bad = {
            let (t, missing) = (t.clone(), missing.clone());
            tokio::spawn(
                async move { t.publish(&missing, "k", message("x", "bad"), options).await },
            )
        };
        for publish in good {
            assert_eq!(publish.await.unwrap(), Ok(()), "round {round}");
        }
        let bad = bad.await.unwrap();
        assert!(matches!(bad, Err(TransportError::NotFound(_))), "{bad:?}");
    }
    // a publish whose confirm was lost with the closed channel is sent again: at least once
    assert!(t.queue_info(&queue).await.unwrap().message_count >= 200);
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

#[tokio::test]
async fn prefetch_is_respected() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    for i in 0..10 {
        publish(&t, &queue, &format!("m{i}")).await;
    }
    let mut consumer = t.consume(&queue, prefetch(3)).await.unwrap();
    let mut held =
        vec![next(&mut consumer).await, next(&mut consumer).await, next(&mut consumer).await];
    assert!(
        timeout(Duration::from_millis(300), consumer.next()).await.is_err(),
        "a 4th delivery arrived"
    );
    held.remove(0).acker.ack().await.unwrap();
    held.push(next(&mut consumer).await);
    assert!(timeout(Duration::from_millis(300), consumer.next()).await.is_err(), "over prefetch");
    for delivery in held {
        delivery.acker.ack().await.unwrap();
    }
    drop(consumer);
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

#[tokio::test]
async fn nack_and_dropped_acker_requeue() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(1)).await.unwrap();
    publish(&t, &queue, "again").await;
    let first = next(&mut consumer).await;
    assert!(!first.redelivered);
    first.acker.nack(true).await.unwrap();
    let second = next(&mut consumer).await;
    assert!(second.redelivered);
    assert_eq!(second.body, Bytes::from_static(b"again"));
    drop(second);
    let third = next(&mut consumer).await;
    assert!(third.redelivered);
    third.acker.reject(false).await.unwrap();
    assert!(timeout(Duration::from_millis(300), consumer.next()).await.is_err());
    assert_eq!(t.queue_info(&queue).await.unwrap().message_count, 0);
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

#[tokio::test]
async fn channel_errors_are_mapped_and_harmless() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("q");
    t.declare_queue(&QueueSpec::durable(queue.as_str())).await.unwrap();
    let err = t.declare_queue(&plain_queue(&queue)).await;
    assert!(matches!(err, Err(TransportError::PreconditionFailed(_))), "{err:?}");
    let err = t.queue_info(&unique("missing")).await;
    assert!(matches!(err, Err(TransportError::NotFound(_))), "{err:?}");
    let err = t.consume(&unique("missing"), prefetch(1)).await;
    assert!(matches!(err, Err(TransportError::NotFound(_))), "{err:?}");
    // Still usable: declarations, publishes and consumers work.
    t.declare_queue(&QueueSpec::durable(queue.as_str())).await.unwrap();
    publish(&t, &queue, "ok").await;
    assert_eq!(t.queue_info(&queue).await.unwrap().message_count, 1);

    // An exclusive queue of another connection is locked.
    let other = connect(URI).await;
    let exclusive = unique("excl");
    other.declare_queue(&QueueSpec { exclusive: true, ..plain_queue(&exclusive) }).await.unwrap();
    let err = t.declare_queue(&QueueSpec { exclusive: true, ..plain_queue(&exclusive) }).await;
    assert!(matches!(err, Err(TransportError::ResourceLocked(_))), "{err:?}");
    let mut held =
        other.consume(&exclusive, ConsumeOptions { exclusive: true, ..prefetch(1) }).await.unwrap();
    let err = t.consume(&exclusive, prefetch(1)).await;
    assert!(matches!(err, Err(TransportError::ResourceLocked(_))), "{err:?}");
    held.cancel();
    // An exclusive consume of a queue that has a consumer is refused (403) as locked too.
    let _plain = t.consume(&queue, prefetch(1)).await.unwrap();
    let err = other.consume(&queue, ConsumeOptions { exclusive: true, ..prefetch(1) }).await;
    assert!(matches!(err, Err(TransportError::ResourceLocked(_))), "{err:?}");
    // A reserved name is refused (403), not locked.
    let reserved = ExchangeSpec::topic(format!("amq.{}", unique("reserved")));
    let err = t.declare_exchange(&reserved).await;
    assert!(matches!(err, Err(TransportError::AccessRefused(_))), "{err:?}");
    // Another reply code (503 COMMAND_INVALID) keeps its code.
    let bogus = ExchangeSpec {
        kind: ExchangeKind::Custom("x-no-such-type".into()),
        durable: false,
        ..ExchangeSpec::topic(unique("bogus"))
    };
    let err = t.declare_exchange(&bogus).await;
    assert!(matches!(err, Err(TransportError::Broker { code: 503, .. })), "{err:?}");
    wait_connected(&t).await;
    assert!(t.is_connected());
    t.delete_queue(&queue).await.unwrap();
    other.close().await;
    t.close().await;
}

#[tokio::test]
async fn bad_credentials_error_masks_the_password() {
    if !broker_up().await {
        return;
    }
    let secret = "Sup3rSecretPassw0rd";
    let uri = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f");
    let err = RabbitMqTransport::connect(options(&uri)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TransportError::Authentication(_)), "{err:?}");
    assert!(err.is_permanent(), "refused credentials are not tried again");
    assert!(!text.contains(secret), "{text}");
    assert!(text.contains("guest:***@127.0.0.1"), "{text}");
    assert!(!format!("{:?}", options(&uri)).contains(secret));
}

#[tokio::test]
async fn an_unknown_vhost_is_a_broker_refusal() {
    if !broker_up().await {
        return;
    }
    let uri = format!("amqp://guest:guest@{BROKER}/{}", unique("no-such-vhost"));
    let err = RabbitMqTransport::connect(options(&uri)).await.unwrap_err();
    assert!(matches!(err, TransportError::Broker { code: 530, .. }), "{err:?}");
    assert!(err.is_permanent());
}

#[tokio::test]
async fn broker_down_at_connect_is_a_connection_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let uri = format!("amqp://guest:hunter22@127.0.0.1:{port}/%2f");
    let err = RabbitMqTransport::connect(options(&uri)).await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable(_)), "{err:?}");
    assert!(!err.is_permanent(), "an unreachable broker is tried again");
    assert!(!err.to_string().contains("hunter22"), "{err}");
    assert!(err.to_string().contains(&format!("guest:***@127.0.0.1:{port}")), "{err}");
}

#[tokio::test]
async fn cancel_and_close_end_consumers() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(2)).await.unwrap();
    consumer.cancel();
    assert!(timeout(Duration::from_secs(5), consumer.next()).await.unwrap().is_none());
    let mut consumer = t.consume(&queue, prefetch(2)).await.unwrap();
    publish(&t, &queue, "unsettled").await;
    let delivery = next(&mut consumer).await;
    t.close().await;
    assert!(timeout(Duration::from_secs(5), consumer.next()).await.unwrap().is_none());
    assert!(matches!(delivery.acker.ack().await, Err(TransportError::Closed { .. })));
    assert!(matches!(
        t.publish("", &queue, message("x", "x"), PublishOptions::default()).await,
        Err(TransportError::Closed { .. })
    ));
    let check = connect(URI).await;
    let back = check.get(&queue).await.unwrap().expect("requeued on close");
    assert_eq!(back.body, Bytes::from_static(b"unsettled"));
    back.acker.ack().await.unwrap();
    check.delete_queue(&queue).await.unwrap();
    check.close().await;
}

/// Close our named connection at the broker, and no other: the broker is shared with other
/// test runs.
fn force_close(connection_name: &str) {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&listing.stdout);
    let pids: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(connection_name))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(!pids.is_empty(), "no connection named {connection_name} at the broker");
    for pid in pids {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "fault test"])
            .status()
            .expect("rabbitmqctl");
        assert!(status.success());
    }
}

/// Fail a test that hangs instead of blocking the run.
async fn bounded(test: impl Future<Output = ()>) {
    timeout(Duration::from_secs(120), test).await.expect("test did not finish within 120 s");
}

async fn wait_disconnected(t: &RabbitMqTransport) {
    timeout(Duration::from_secs(10), async {
        while t.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("outage not detected within 10 s");
}

/// Wait until `t` has reconnected since it had made `before` reconnections: a link cut on the
/// client's side only may be down for no longer than one reconnection takes, too short for
/// [`wait_disconnected`]'s polls to see.
async fn wait_reconnected(t: &RabbitMqTransport, before: u64) {
    timeout(Duration::from_secs(20), async {
        while t.reconnects() == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("not reconnected within 20 s");
}

async fn wait_connected(t: &RabbitMqTransport) {
    timeout(Duration::from_secs(20), async {
        while !t.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("not reconnected within 20 s");
}

/// Acks everything and collects message ids until `count` distinct ids arrived.
fn collect(mut consumer: Consumer, count: usize) -> JoinHandle<HashSet<String>> {
    tokio::spawn(async move {
        let mut ids = HashSet::new();
        while ids.len() < count {
            match timeout(Duration::from_secs(30), consumer.next()).await {
                Ok(Some(delivery)) => {
                    let _ = delivery.acker.ack().await;
                    ids.extend(delivery.properties.message_id);
                }
                _ => break,
            }
        }
        ids
    })
}

#[tokio::test]
async fn reconnects_and_resumes_after_forced_close() {
    bounded(forced_close_scenario()).await;
}

async fn forced_close_scenario() {
    if !broker_up().await {
        return;
    }
    let _exclusive = BROKER_LOCK.write().await;
    let opts = options(URI);
    let name = opts.connection_name.clone().unwrap_or_default();
    let t = Arc::new(RabbitMqTransport::connect(opts).await.unwrap());
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let consumer = t.consume(&queue, prefetch(20)).await.unwrap();
    let collector = collect(consumer, 200);
    let mut killer = None;
    let mut while_down = 0;
    for i in 0..200 {
        if i == 50 {
            let name = name.clone();
            killer = Some(tokio::task::spawn_blocking(move || force_close(&name)));
        }
        if i == 150 {
            // The close has landed mid-stream by now, whatever rabbitmqctl's start-up time.
            killer.take().expect("killer").await.unwrap();
        }
        if !t.is_connected() {
            while_down += 1;
        }
        let id = format!("id-{i}");
        t.publish("", &queue, message(&id, &id), PublishOptions::default()).await.unwrap();
        if i >= 50 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    eprintln!("publishes issued while disconnected: {while_down}");
    wait_connected(&t).await;
    let ids = timeout(Duration::from_secs(40), collector).await.unwrap().unwrap();
    let missing: Vec<_> =
        (0..200).map(|i| format!("id-{i}")).filter(|id| !ids.contains(id)).collect();
    assert!(missing.is_empty(), "missing ids: {missing:?}");
    assert!(t.connection_generation() >= 2, "the connection was never closed");
    assert!(t.is_connected());
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

/// A TCP proxy to the broker whose connections can be cut and refused, to simulate outages
/// without touching the broker, or go silent: bytes stop flowing both ways while the sockets
/// stay open (a peer gone quiet, a firewall dropping packets).
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, silent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (flag, quiet, list) = (down.clone(), silent.clone(), pipes.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(BROKER).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                let up = tokio::spawn(pipe(client_read, upstream_write, quiet.clone()));
                let down = tokio::spawn(pipe(upstream_read, client_write, quiet.clone()));
                list.lock().unwrap().extend([up, down]);
            }
        });
        Proxy { port, down, silent, pipes, accept }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    /// The broker's URI through the proxy.
    fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// Copy `from` to `to` until `silent` is set, then hold both open, passing nothing on.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 65536];
    while let Ok(read @ 1..) = from.read(&mut buffer).await {
        if silent.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn publishes_during_an_outage_succeed_after_reconnect() {
    bounded(outage_scenario()).await;
}

async fn outage_scenario() {
    let Some(_shared) = shared_broker().await else { return };
    let proxy = Proxy::start().await;
    let t = Arc::new(connect(&proxy.uri()).await);
    let exchange = unique("ex");
    let queue = unique("q");
    t.declare_exchange(&ExchangeSpec { durable: false, ..ExchangeSpec::topic(exchange.as_str()) })
        .await
        .unwrap();
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let binding = BindingSpec {
        queue: queue.clone(),
        exchange: exchange.clone(),
        routing_key: "#".into(),
        arguments: Headers::new(),
    };
    t.bind_queue(&binding).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(50)).await.unwrap();
    publish(&t, &queue, "before").await;
    let before = next(&mut consumer).await;

    // A burst in flight when the connection is cut: lost confirms are retried, not lost.
    let burst = {
        let (t, queue) = (t.clone(), queue.clone());
        tokio::spawn(async move {
            let publishes = (0..300).map(|i| {
                let (t, queue) = (t.clone(), queue.clone());
                async move {
                    let id = format!("burst-{i}");
                    t.publish("", &queue, message(&id, &id), PublishOptions::default()).await
                }
            });
            futures::stream::iter(publishes).buffer_unordered(32).collect::<Vec<_>>().await
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    proxy.cut();
    wait_disconnected(&t).await;
    assert!(matches!(before.acker.ack().await, Err(TransportError::Closed { .. })));
    let publishes: Vec<_> = (0..20)
        .map(|i| {
            let t = t.clone();
            let exchange = exchange.clone();
            tokio::spawn(async move {
                let id = format!("out-{i}");
                t.publish(&exchange, "k", message(&id, &id), PublishOptions { mandatory: true })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!t.is_connected());
    proxy.restore();
    for publish in publishes {
        publish.await.unwrap().unwrap();
    }
    for result in burst.await.unwrap() {
        result.unwrap();
    }
    wait_connected(&t).await;
    let mut ids = HashSet::new();
    while ids.len() < 321 {
        let delivery = next(&mut consumer).await;
        // Deliveries of the cut channel cannot be acked any more: the broker redelivers them.
        match delivery.acker.ack().await {
            Ok(()) | Err(TransportError::Closed { .. }) => {}
            Err(other) => panic!("ack failed: {other}"),
        }
        ids.extend(delivery.properties.message_id);
    }
    assert!(ids.contains("before"));
    assert!(t.connection_generation() >= 2);
    t.delete_queue(&queue).await.unwrap();
    t.delete_exchange(&exchange).await.unwrap();
    t.close().await;
}

#[tokio::test]
async fn receives_headers_encoded_like_py_amqp() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};

    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(1)).await.unwrap();

    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("queue".into(), long("orders"));
    let mut headers = FieldTable::default();
    headers.insert(
        "nameko.call_id_stack".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![long("svc.m.1"), long("svc.n.2")])),
    );
    headers.insert("small".into(), AMQPValue::ShortShortInt(-3));
    headers.insert("medium".into(), AMQPValue::LongInt(70_000));
    headers.insert("unsigned".into(), AMQPValue::LongUInt(4_000_000_000));
    headers.insert("single".into(), AMQPValue::Float(0.5));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    let connection =
        lapin::Connection::connect(URI, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();

    let delivery = next(&mut consumer).await;
    let h = &delivery.properties.headers;
    assert_eq!(
        h["nameko.call_id_stack"],
        HeaderValue::Array(vec!["svc.m.1".into(), "svc.n.2".into()])
    );
    assert_eq!(h["small"], HeaderValue::Int(-3));
    assert_eq!(h["medium"], HeaderValue::Int(70_000));
    assert_eq!(h["unsigned"], HeaderValue::Int(4_000_000_000));
    assert_eq!(h["single"], HeaderValue::Float(0.5));
    let HeaderValue::Array(deaths) = &h["x-death"] else { panic!("x-death: {:?}", h["x-death"]) };
    let HeaderValue::Table(death) = &deaths[0] else { panic!("x-death[0]: {:?}", deaths[0]) };
    assert_eq!(death["count"], HeaderValue::Int(1));
    assert_eq!(death["queue"], HeaderValue::String("orders".into()));
    delivery.acker.ack().await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

/// `amqp://` URIs of `ports` on this host, as a list.
fn node_list(ports: &[u16]) -> String {
    let uris: Vec<String> =
        ports.iter().map(|port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f")).collect();
    uris.join(",")
}

#[tokio::test]
async fn a_list_with_dead_nodes_connects_to_the_live_one() {
    let Some(_shared) = shared_broker().await else { return };
    // Ports 1 and 2 refuse connections; whatever the order, the live node is found.
    let list = format!("{},{URI}", node_list(&[1, 2]));
    for seed in 0..4 {
        let t = RabbitMqTransport::connect(RabbitMqOptions {
            node_order_seed: Some(seed),
            ..options(&list)
        })
        .await
        .unwrap();
        assert_eq!(t.broker_node().as_deref(), Some(BROKER));
        let queue = unique("q");
        t.declare_queue(&plain_queue(&queue)).await.unwrap();
        t.delete_queue(&queue).await.unwrap();
        t.close().await;
        assert_eq!(t.broker_node(), None, "no node once closed");
    }
    let error = RabbitMqTransport::connect(options(&node_list(&[1, 2]))).await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, TransportError::Unreachable(_)), "{error:?}");
    assert!(text.contains("127.0.0.1:1") && text.contains("127.0.0.1:2"), "{text}");
    assert!(!text.contains("guest:guest"), "{text}");
}

#[tokio::test]
async fn transports_spread_over_the_listed_nodes() {
    let Some(_shared) = shared_broker().await else { return };
    let proxies = [Proxy::start().await, Proxy::start().await, Proxy::start().await];
    let ports: Vec<u16> = proxies.iter().map(|proxy| proxy.port).collect();
    let list = node_list(&ports);
    let mut nodes = HashSet::new();
    // Six instances with seeds 0..6: the shuffle starts them on every node of three.
    for seed in 0..6 {
        let t = RabbitMqTransport::connect(RabbitMqOptions {
            node_order_seed: Some(seed),
            ..options(&list)
        })
        .await
        .unwrap();
        nodes.extend(t.broker_node());
        t.close().await;
    }
    let expected: HashSet<String> = ports.iter().map(|port| format!("127.0.0.1:{port}")).collect();
    assert_eq!(nodes, expected);
}

#[tokio::test]
async fn a_lost_node_fails_over_to_the_next_one() {
    bounded(failover_scenario()).await;
}

async fn failover_scenario() {
    let Some(_shared) = shared_broker().await else { return };
    let proxies = [Proxy::start().await, Proxy::start().await];
    let list = node_list(&[proxies[0].port, proxies[1].port]);
    let t = connect(&list).await;
    let first = t.broker_node().unwrap();
    let (lost, other) = match first == format!("127.0.0.1:{}", proxies[0].port) {
        true => (&proxies[0], &proxies[1]),
        false => (&proxies[1], &proxies[0]),
    };
    let queue = unique("q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(5)).await.unwrap();
    // The node stays down: the transport moves to the other one, replays the queue and
    // resumes the consumer there.
    lost.cut();
    timeout(Duration::from_secs(10), async {
        while t.connection_generation() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no reconnection to the other node");
    assert_eq!(t.broker_node(), Some(format!("127.0.0.1:{}", other.port)));
    publish(&t, &queue, "after").await;
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.body.as_ref(), b"after");
    delivery.acker.ack().await.unwrap();
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

/// A queue the broker deleted by itself (`x-expires` ran out; a shared auto-delete queue lost
/// its last consumer) is not created again by the replay; an ordinary queue deleted behind
/// the transport's back still is.
#[tokio::test]
async fn queues_the_broker_deleted_by_itself_stay_deleted_after_a_reconnect() {
    bounded(async {
        let Some(_shared) = shared_broker().await else { return };
        let proxy = Proxy::start().await;
        let t = connect(&proxy.uri()).await;
        let check = connect(URI).await;
        let expiring = unique("replay-expires");
        let auto = unique("replay-auto-delete");
        let plain = unique("replay-plain");
        let mut spec = plain_queue(&expiring);
        spec.arguments.insert("x-expires".into(), HeaderValue::Int(1000));
        t.declare_queue(&spec).await.unwrap();
        t.declare_queue(&QueueSpec { auto_delete: true, ..plain_queue(&auto) }).await.unwrap();
        t.declare_queue(&plain_queue(&plain)).await.unwrap();
        // Another client's consumer leaves the auto-delete queue: the broker deletes it.
        let mut consumer = check.consume(&auto, prefetch(1)).await.unwrap();
        consumer.cancel();
        drop(consumer);
        check.delete_queue(&plain).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3000)).await;
        for queue in [&expiring, &auto] {
            let info = check.queue_info(queue).await;
            assert!(matches!(info, Err(TransportError::NotFound(_))), "{queue} is still there");
        }
        proxy.cut();
        wait_disconnected(&t).await;
        proxy.restore();
        wait_connected(&t).await;
        let back = [check.queue_info(&expiring).await, check.queue_info(&auto).await];
        let replayed = check.queue_info(&plain).await;
        for queue in [&expiring, &auto, &plain] {
            let _ = check.delete_queue(queue).await;
        }
        t.close().await;
        check.close().await;
        assert!(back.iter().all(Result::is_err), "a deleted queue was created again: {back:?}");
        assert!(replayed.is_ok(), "the ordinary queue was not replayed: {replayed:?}");
    })
    .await;
}

/// A consumer of this transport keeps an `x-expires` queue in use: it is replayed, and the
/// consumer resumes on it.
#[tokio::test]
async fn a_consumed_expiring_queue_is_replayed() {
    bounded(async {
        let Some(_shared) = shared_broker().await else { return };
        let proxy = Proxy::start().await;
        let t = connect(&proxy.uri()).await;
        let queue = unique("replay-consumed-expires");
        let mut spec = QueueSpec { auto_delete: true, ..plain_queue(&queue) };
        spec.arguments.insert("x-expires".into(), HeaderValue::Int(1000));
        t.declare_queue(&spec).await.unwrap();
        let mut consumer = t.consume(&queue, prefetch(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.cut();
        wait_disconnected(&t).await;
        proxy.restore();
        wait_connected(&t).await;
        publish(&t, &queue, "after").await;
        let delivery = next(&mut consumer).await;
        delivery.acker.ack().await.unwrap();
        drop(consumer);
        t.delete_queue(&queue).await.unwrap();
        t.close().await;
        assert_eq!(delivery.body, Bytes::from_static(b"after"));
    })
    .await;
}

/// A proxy whose cut closes the client's side only: the broker keeps the old connection (and
/// its exclusive queues) until its heartbeat timeout.
struct HalfProxy {
    port: u16,
    held: Arc<Mutex<Vec<UpstreamWriter>>>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

type UpstreamWriter = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

impl HalfProxy {
    async fn start() -> HalfProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held: Arc<Mutex<Vec<UpstreamWriter>>> = Arc::default();
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (held2, pipes2) = (held.clone(), pipes.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(BROKER).await else { continue };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, uw) = upstream.into_split();
                // The writer outlives the pipes: the broker's socket stays open after a cut.
                let uw = Arc::new(tokio::sync::Mutex::new(uw));
                held2.lock().unwrap().push(uw.clone());
                let up = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if uw.lock().await.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                });
                pipes2.lock().unwrap().extend([up, down]);
            }
        });
        HalfProxy { port, held, pipes, accept }
    }

    fn cut_client_side(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=3", self.port)
    }
}

impl Drop for HalfProxy {
    fn drop(&mut self) {
        self.cut_client_side();
        self.accept.abort();
        self.held.lock().unwrap().clear();
    }
}

/// A transport connected through a [`HalfProxy`], with the broker to itself (the tests cut
/// the client's side only, leaving the broker a connection that only missed heartbeats end:
/// 3 s here); `None` when the test is skipped (see [`broker_up`]).
async fn behind_a_half_proxy(
) -> Option<(RwLockWriteGuard<'static, ()>, HalfProxy, RabbitMqTransport)> {
    if !broker_up().await {
        return None;
    }
    let exclusive = BROKER_LOCK.write().await;
    let proxy = HalfProxy::start().await;
    let options = RabbitMqOptions { heartbeat: 3, ..options(&proxy.uri()) };
    let t = RabbitMqTransport::connect(options).await.unwrap();
    Some((exclusive, proxy, t))
}

/// Cut the client's side of `proxy` and wait until `t` has reconnected.
async fn cut_client_side_and_reconnect(proxy: &HalfProxy, t: &RabbitMqTransport) {
    let reconnects = t.reconnects();
    proxy.cut_client_side();
    wait_reconnected(t, reconnects).await;
    wait_connected(t).await;
}

/// Publish to `exchange` with routing key `key` until `consumer` receives one, for up to
/// 60 s: while the old connection lives, its queue or consumer takes them. The error says
/// why none arrived, for the test to assert once it has cleaned up.
async fn publish_until_one_arrives(
    t: &RabbitMqTransport,
    exchange: &str,
    key: &str,
    consumer: &mut Consumer,
) -> Result<Delivery, &'static str> {
    let delivered = timeout(Duration::from_secs(60), async {
        loop {
            let body = format!("after-{}", uuid::Uuid::new_v4().simple());
            t.publish(exchange, key, message(&body, &body), PublishOptions::default())
                .await
                .unwrap();
            if let Ok(delivery) = timeout(Duration::from_millis(500), consumer.next()).await {
                break delivery;
            }
        }
    })
    .await;
    match delivered {
        Err(_) => Err("the consumer did not resume within 60 s"),
        Ok(None) => Err("the consumer ended"),
        Ok(Some(delivery)) => Ok(delivery),
    }
}

/// The client sees the connection die before the broker does: the replay finds the exclusive
/// queue still held by the old connection, declares it again once the broker drops that
/// connection, and the consumer resumes on it.
#[tokio::test]
async fn an_exclusive_queue_held_by_the_old_connection_is_declared_again() {
    timeout(Duration::from_secs(120), async {
        let Some((_exclusive, proxy, t)) = behind_a_half_proxy().await else { return };
        let exchange = unique("reclaim-x");
        let queue = unique("reclaim-q");
        let topic = ExchangeSpec { durable: false, ..ExchangeSpec::topic(exchange.as_str()) };
        t.declare_exchange(&topic).await.unwrap();
        let spec = QueueSpec { exclusive: true, auto_delete: true, ..plain_queue(&queue) };
        t.declare_queue(&spec).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: exchange.clone(),
            routing_key: "#".into(),
            arguments: Headers::new(),
        };
        t.bind_queue(&binding).await.unwrap();
        let mut consumer = t.consume(&queue, prefetch(5)).await.unwrap();
        cut_client_side_and_reconnect(&proxy, &t).await;
        let delivered = publish_until_one_arrives(&t, &exchange, "k", &mut consumer).await;
        let info = t.queue_info(&queue).await;
        drop(consumer);
        let _ = t.delete_queue(&queue).await;
        let _ = t.delete_exchange(&exchange).await;
        t.close().await;
        drop(proxy);
        assert!(delivered.unwrap().body.starts_with(b"after-"));
        assert!(info.is_ok(), "the exclusive queue {queue} is gone: {info:?}");
    })
    .await
    .expect("test did not finish");
}

/// The client sees the connection die before the broker does: the old connection's exclusive
/// consumer still holds the (shared) queue, so resuming the exclusive consumer is refused
/// (`403`, "in exclusive use") until the broker drops that connection. The consumer waits for
/// it, as an RPC caller's reply consumer must: ending would lose the replies on their way.
#[tokio::test]
async fn an_exclusive_consumer_held_by_the_old_connection_resumes() {
    timeout(Duration::from_secs(120), async {
        let Some((_exclusive, proxy, t)) = behind_a_half_proxy().await else { return };
        let queue = unique("exclusive-consumer-q");
        t.declare_queue(&plain_queue(&queue)).await.unwrap();
        let exclusive = ConsumeOptions { exclusive: true, ..prefetch(5) };
        let mut consumer = t.consume(&queue, exclusive).await.unwrap();
        cut_client_side_and_reconnect(&proxy, &t).await;
        let delivered = publish_until_one_arrives(&t, "", &queue, &mut consumer).await;
        drop(consumer);
        let _ = t.delete_queue(&queue).await;
        t.close().await;
        drop(proxy);
        assert!(delivered.unwrap().body.starts_with(b"after-"));
    })
    .await
    .expect("test did not finish");
}

/// A declaration RabbitMQ answers by closing the whole connection (`503 COMMAND_INVALID`, an
/// exchange type no plugin provides) fails alone: the publishes in flight beside it lost
/// their confirms with the connection, and are sent again once it is back, as after any
/// other connection loss, rather than failing with the declaration's error.
#[tokio::test]
async fn a_declaration_that_closes_the_connection_fails_no_publish_in_flight() {
    bounded(async {
        let Some(_shared) = shared_broker().await else { return };
        let t = Arc::new(connect(URI).await);
        let queue = unique("hard-error-q");
        t.declare_queue(&QueueSpec::durable(queue.as_str())).await.unwrap();
        let mut rounds = Vec::new();
        for round in 0..3 {
            let publishes: Vec<_> = (0..300)
                .map(|i| {
                    let (t, queue) = (t.clone(), queue.clone());
                    async move {
                        let id = format!("{round}-{i}");
                        let mut outgoing = message(&id, &id);
                        // persistent on a durable queue: confirmed late, so many are in flight
                        outgoing.properties.delivery_mode = Some(2);
                        let options = PublishOptions { mandatory: i % 2 == 0 };
                        t.publish("", &queue, outgoing, options).await
                    }
                })
                .collect();
            let burst = futures::stream::iter(publishes).buffer_unordered(100).collect();
            let burst: JoinHandle<Vec<_>> = tokio::spawn(burst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let declared = declare_a_bogus_exchange(&t).await;
            let failed: Vec<_> = burst.await.unwrap().into_iter().filter_map(Result::err).collect();
            rounds.push((round, declared, failed));
        }
        let reconnects = t.reconnects();
        let left = t.delete_queue(&queue).await.unwrap();
        t.close().await;
        only_the_declarations_failed(rounds);
        assert!(reconnects >= 1, "the connection was never closed");
        assert!(left >= 900, "{left} of 900 publishes in the queue");
    })
    .await;
}

/// Sets RabbitMQ's memory high watermark so low that a memory alarm blocks every publishing
/// connection; the default (0.4) comes back on drop, also when the test fails.
struct MemoryAlarm;

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let alarm = MemoryAlarm;
        let status = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.0000001"])
            .status()
            .expect("rabbitmqctl");
        assert!(status.success());
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .status();
    }
}

/// A publish the broker holds back (`connection.blocked`, here by a memory alarm) times out
/// with an error that says so, rather than only that no confirm came; once the alarm ends,
/// the connection publishes again.
#[tokio::test]
async fn a_publish_blocked_by_a_resource_alarm_times_out_naming_the_block() {
    bounded(async {
        if !broker_up().await {
            return;
        }
        let _exclusive = BROKER_LOCK.write().await;
        let short = RabbitMqOptions { publish_timeout: Duration::from_secs(2), ..options(URI) };
        let t = RabbitMqTransport::connect(short).await.unwrap();
        let queue = unique("blocked-q");
        t.declare_queue(&plain_queue(&queue)).await.unwrap();
        publish(&t, &queue, "before").await;
        let blocked = {
            let _alarm = MemoryAlarm::raise();
            t.publish("", &queue, message("during", "during"), PublishOptions::default()).await
        };
        let after = t.publish("", &queue, message("after", "after"), PublishOptions::default());
        let after = after.await;
        let _ = t.delete_queue(&queue).await;
        t.close().await;
        let Err(TransportError::TimedOut(text)) = blocked else {
            panic!("a blocked publish: {blocked:?}")
        };
        assert!(text.contains("blocks publishing"), "{text}");
        assert_eq!(after, Ok(()));
    })
    .await;
}

/// A node that accepts the TCP connection and never answers is given up after the URI's
/// `connection_timeout` (milliseconds), not the 10 s default.
#[tokio::test]
async fn the_uris_connection_timeout_bounds_a_connection_attempt() {
    bounded(async {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                sockets.push(socket);
            }
        });
        let uri = format!("amqp://guest:guest@{address}/%2f?connection_timeout=300");
        let refused = RabbitMqTransport::connect(RabbitMqOptions::new(uri)).await;
        held.abort();
        let Err(TransportError::Unreachable(why)) = refused else { panic!("{refused:?}") };
        assert!(why.ends_with("timed out after 300ms"), "{why}");
    })
    .await;
}

/// On a connection gone silent (no heartbeats to notice it), every operation ends with
/// `TimedOut` within the publish timeout, also those that must open a channel first: the
/// first mandatory publish, a `basic.get`, a consume, a declaration, a `queue_info`.
#[tokio::test]
async fn operations_needing_a_channel_on_a_silent_connection_time_out() {
    bounded(async {
        let Some(_shared) = shared_broker().await else { return };
        let proxy = Proxy::start().await;
        let quick = RabbitMqOptions {
            heartbeat: 0,
            publish_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            ..options(&proxy.uri())
        };
        let t = RabbitMqTransport::connect(quick).await.unwrap();
        let direct = connect(URI).await;
        let queue = unique("silent-q");
        direct.declare_queue(&plain_queue(&queue)).await.unwrap();
        let declared_queue = plain_queue(&unique("silent-declared"));
        proxy.silence();
        // Far beyond the publish timeout: a bound for the hang, not a measure.
        let bound = Duration::from_secs(10);
        let mandatory = PublishOptions { mandatory: true };
        let (published, got, consumed, declared, info) = tokio::join!(
            timeout(bound, t.publish("", &queue, message("m", "m"), mandatory)),
            timeout(bound, async { t.get(&queue).await.map(|_| ()) }),
            timeout(bound, async { t.consume(&queue, prefetch(1)).await.map(|_| ()) }),
            timeout(bound, t.declare_queue(&declared_queue)),
            timeout(bound, t.queue_info(&queue)),
        );
        direct.delete_queue(&queue).await.unwrap();
        direct.close().await;
        t.close().await;
        drop(proxy);
        let timed_out = |what: &str, result: Result<Result<(), TransportError>, _>| match result {
            Ok(Err(TransportError::TimedOut(_))) => {}
            other => panic!("{what} on a silent connection: {other:?}"),
        };
        timed_out("the first mandatory publish", published);
        timed_out("a get", got);
        timed_out("a consume", consumed);
        timed_out("a declaration", declared.map(|r| r.map(|_| ())));
        timed_out("a queue_info", info.map(|r| r.map(|_| ())));
    })
    .await;
}

/// The same for consumers starting while a declaration makes RabbitMQ close the connection:
/// a `basic.consume` never causes such an error, and each starts on the next connection
/// rather than failing with the declaration's error.
#[tokio::test]
async fn a_declaration_that_closes_the_connection_fails_no_consume_starting() {
    beside_declarations_that_close_the_connection("hard-error-consumed-q", |t, queue| async move {
        t.consume(&queue, prefetch(1)).await.map(drop)
    })
    .await;
}

fn rabbitmqctl(args: &[&str]) {
    let status =
        std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
    assert!(status.status.success(), "rabbitmqctl {args:?} failed");
}

/// A broker user of one test, deleted on drop (also when the test fails).
struct TestUser(String);

impl TestUser {
    fn create() -> TestUser {
        let user = TestUser(unique("mf-transport-user"));
        rabbitmqctl(&["add_user", &user.0, "secret"]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
        user
    }

    fn uri(&self) -> String {
        format!("amqp://{}:secret@{BROKER}/%2f", self.0)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["delete_user", &self.0]).output();
    }
}

/// An operation that times out waiting for a reconnection the broker keeps refusing says
/// why the reconnection fails, not only that it timed out.
#[tokio::test]
async fn an_operation_waiting_for_a_refused_reconnection_names_the_refusal() {
    bounded(async {
        if !broker_up().await {
            return;
        }
        let user = TestUser::create();
        let quick =
            RabbitMqOptions { publish_timeout: Duration::from_secs(2), ..options(&user.uri()) };
        let t = RabbitMqTransport::connect(quick).await.unwrap();
        // The user loses the vhost and its connection: every reconnection is refused.
        rabbitmqctl(&["clear_permissions", "-p", "/", &user.0]);
        rabbitmqctl(&["close_all_user_connections", &user.0, "transport test"]);
        wait_disconnected(&t).await;
        let published = t.publish("", "anywhere", message("x", "x"), PublishOptions::default());
        let published = published.await;
        t.close().await;
        drop(user);
        let Err(TransportError::Unreachable(text)) = published else {
            panic!("a publish while reconnections are refused: {published:?}")
        };
        assert!(text.contains("NOT_ALLOWED"), "{text}");
    })
    .await;
}

/// A queue declared for the connection only is not declared again after a reconnect, where
/// one declared as usual is: a timer's lock, declared again, took the lock back on a
/// connection whose instance no longer knew it led.
#[tokio::test]
async fn a_queue_declared_for_the_connection_only_is_not_declared_again_after_a_reconnect() {
    bounded(async {
        if !broker_up().await {
            return;
        }
        let user = TestUser::create();
        let t = RabbitMqTransport::connect(options(&user.uri())).await.unwrap();
        let kept = QueueSpec { exclusive: true, ..plain_queue(&unique("kept")) };
        let lock = QueueSpec { exclusive: true, ..plain_queue(&unique("lock")) };
        t.declare_queue(&kept).await.unwrap();
        t.declare_queue_for_connection(&lock).await.unwrap();
        rabbitmqctl(&["close_all_user_connections", &user.0, "transport test"]);
        timeout(Duration::from_secs(10), async {
            while !(t.reconnects() == 1 && t.is_connected()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("reconnected");
        let kept_again = t.queue_info(&kept.name).await;
        let lock_again = t.queue_info(&lock.name).await;
        t.close().await;
        drop(user);
        assert!(kept_again.is_ok(), "{kept_again:?}");
        assert!(matches!(lock_again, Err(TransportError::NotFound(_))), "{lock_again:?}");
    })
    .await;
}

/// The same for `basic.get`s in flight when a declaration makes RabbitMQ close the
/// connection: a get never causes such an error, and each is made again on the next
/// connection rather than failing with the declaration's error.
#[tokio::test]
async fn a_declaration_that_closes_the_connection_fails_no_get_in_flight() {
    beside_declarations_that_close_the_connection("hard-error-got-q", |t, queue| async move {
        t.get(&queue).await.map(drop)
    })
    .await;
}

/// `operation` on a queue of its own, 30 at once, in three rounds, each beside a declaration
/// that makes RabbitMQ close the connection: none of them fails.
async fn beside_declarations_that_close_the_connection<F, Fut>(prefix: &str, operation: F)
where
    F: Fn(Arc<RabbitMqTransport>, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), TransportError>> + Send + 'static,
{
    bounded(async {
        let Some(_shared) = shared_broker().await else { return };
        let t = Arc::new(connect(URI).await);
        let queue = unique(prefix);
        t.declare_queue(&plain_queue(&queue)).await.unwrap();
        let mut rounds = Vec::new();
        for round in 0..3 {
            let started: Vec<_> =
                (0..30).map(|_| tokio::spawn(operation(t.clone(), queue.clone()))).collect();
            let declared = declare_a_bogus_exchange(&t).await;
            let mut failed = Vec::new();
            for operation in started {
                if let Err(error) = operation.await.unwrap() {
                    failed.push(error);
                }
            }
            rounds.push((round, declared, failed));
        }
        t.delete_queue(&queue).await.unwrap();
        t.close().await;
        only_the_declarations_failed(rounds);
    })
    .await;
}

/// Declares an exchange of a type no plugin provides, which RabbitMQ answers by closing the
/// whole connection (`503 COMMAND_INVALID`).
async fn declare_a_bogus_exchange(t: &RabbitMqTransport) -> Result<(), TransportError> {
    let bogus = ExchangeSpec {
        kind: ExchangeKind::Custom("x-no-such-type".into()),
        durable: false,
        ..ExchangeSpec::topic(unique("bogus"))
    };
    t.declare_exchange(&bogus).await
}

/// Each round's declaration failed with the broker's `503`, and nothing beside it failed.
fn only_the_declarations_failed(
    rounds: Vec<(u32, Result<(), TransportError>, Vec<TransportError>)>,
) {
    for (round, declared, failed) in rounds {
        assert!(matches!(declared, Err(TransportError::Broker { code: 503, .. })), "{declared:?}");
        assert!(failed.is_empty(), "round {round}: {} failed, first {:?}", failed.len(), failed[0]);
    }
}

/// The redelivery of a delivery in flight when its connection was lost is marked as the
/// broker's return (settled late or not at all), with the count of deliveries it had before,
/// and one requeued by a nack is not: `quorum` says which queue type. Returns the queue's count
/// on the first delivery back.
async fn returned_scenario(quorum: bool) -> Option<i64> {
    let opts = options(URI);
    let name = opts.connection_name.clone().unwrap_or_default();
    let t = connect_with(opts).await;
    let queue = unique("returns-q");
    let mut arguments = Headers::new();
    if quorum {
        arguments.insert("x-queue-type".into(), "quorum".into());
    }
    t.declare_queue(&QueueSpec { arguments, ..QueueSpec::durable(queue.as_str()) }).await.unwrap();
    let mut consumer = t.consume(&queue, prefetch(10)).await.unwrap();
    for body in ["kept", "settled late", "nacked"] {
        publish(&t, &queue, body).await;
    }
    let kept = next(&mut consumer).await;
    let late = next(&mut consumer).await;
    let nacked = next(&mut consumer).await;
    assert!(!kept.redelivered && kept.acker.lost_in_flight().is_none());
    nacked.acker.nack(true).await.unwrap();
    let requeued = next(&mut consumer).await;
    assert_eq!(requeued.body, Bytes::from_static(b"nacked"));
    assert!(requeued.redelivered);
    assert_eq!(requeued.acker.lost_in_flight(), None, "a nack's requeue is no loss");
    let requeued_count =
        requeued.properties.headers.get("x-delivery-count").and_then(HeaderValue::as_i64);
    assert!(!kept.acker.channel_lost(), "its connection lives");
    let before = t.reconnects();
    tokio::task::spawn_blocking(move || force_close(&name)).await.unwrap();
    wait_reconnected(&t, before).await;
    assert!(kept.acker.channel_lost(), "its connection was lost");
    assert!(late.acker.ack().await.is_err(), "its channel is gone");
    let mut back = Vec::new();
    for _ in 0..3 {
        back.push(next(&mut consumer).await);
    }
    for delivery in &back {
        assert!(delivery.redelivered, "{:?}", delivery.body);
        let lost = delivery.acker.lost_in_flight();
        let before = match delivery.body == Bytes::from_static(b"nacked") {
            true => requeued_count.unwrap_or(0),
            false => 0,
        };
        assert_eq!(
            lost,
            Some(LostInFlight { delivery_count_before: before }),
            "{:?}",
            delivery.body
        );
        delivery.acker.ack().await.unwrap();
    }
    let count = back[0].properties.headers.get("x-delivery-count").and_then(HeaderValue::as_i64);
    drop(kept);
    drop(consumer);
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
    count
}

async fn connect_with(options: RabbitMqOptions) -> RabbitMqTransport {
    RabbitMqTransport::connect(options).await.unwrap()
}

#[tokio::test]
async fn the_redelivery_of_a_delivery_in_flight_at_a_lost_connection_is_marked_returned() {
    if !broker_up().await {
        return;
    }
    let _exclusive = BROKER_LOCK.write().await;
    bounded(async {
        assert_eq!(returned_scenario(false).await, None);
        // RabbitMQ 3.10 counts the loss; the transport tells the count without it.
        let count = returned_scenario(true).await;
        eprintln!("a quorum queue's x-delivery-count after a lost connection: {count:?}");
    })
    .await;
}

/// A `basic.get` the broker refuses closes the channel it ran on, and RabbitMQ takes back
/// every unsettled delivery of that channel: a get must never run on one that holds the
/// deliveries of earlier gets, whatever the refusal (`404` of a missing queue, `405` of
/// another connection's exclusive queue).
#[tokio::test]
async fn a_refused_get_leaves_the_deliveries_of_earlier_gets_settleable() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let other = connect(URI).await;
    let queue = unique("held-get-q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let locked = unique("held-get-excl");
    other.declare_queue(&QueueSpec { exclusive: true, ..plain_queue(&locked) }).await.unwrap();
    for body in ["acked", "requeued", "rejected"] {
        publish(&t, &queue, body).await;
    }
    let acked = t.get(&queue).await.unwrap().expect("a message");
    let requeued = t.get(&queue).await.unwrap().expect("a message");
    let err = t.get(&unique("held-get-missing")).await;
    assert!(matches!(err, Err(TransportError::NotFound(_))), "{err:?}");
    let rejected = t.get(&queue).await.unwrap().expect("a message");
    let err = t.get(&locked).await;
    assert!(matches!(err, Err(TransportError::ResourceLocked(_))), "{err:?}");

    acked.acker.ack().await.unwrap();
    requeued.acker.nack(true).await.unwrap();
    rejected.acker.reject(false).await.unwrap();
    // a nack has no answer: the broker may requeue it after a get on another channel
    let mut back = None;
    for _ in 0..100 {
        back = t.get(&queue).await.unwrap();
        if back.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = back.expect("the requeued message");
    assert_eq!(back.body, Bytes::from_static(b"requeued"));
    back.acker.ack().await.unwrap();
    assert!(t.get(&queue).await.unwrap().is_none(), "a settled message came back");
    t.delete_queue(&queue).await.unwrap();
    other.close().await;
    t.close().await;
}

/// The same when the refused get is of the held deliveries' own queue, deleted meanwhile.
#[tokio::test]
async fn a_get_of_a_queue_deleted_meanwhile_leaves_its_earlier_deliveries_settleable() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("deleted-get-q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    publish(&t, &queue, "held").await;
    let held = t.get(&queue).await.unwrap().expect("a message");
    let other = connect(URI).await;
    other.delete_queue(&queue).await.unwrap();
    other.close().await;
    let err = t.get(&queue).await;
    assert!(matches!(err, Err(TransportError::NotFound(_))), "{err:?}");
    held.acker.ack().await.unwrap();
    t.close().await;
}

/// A caller holding more deliveries than [`MAX_HOLDING`] channels keep them settleable through
/// a refused get, without a channel per delivery; channels its settled deliveries no longer
/// hold are closed, and a loop of gets each settled before the next runs on one channel.
#[tokio::test]
async fn gets_open_channels_only_while_deliveries_hold_them() {
    let Some(_shared) = shared_broker().await else { return };
    let t = connect(URI).await;
    let queue = unique("holding-get-q");
    t.declare_queue(&plain_queue(&queue)).await.unwrap();
    let count = MAX_HOLDING + 8;
    for i in 0..count {
        publish(&t, &queue, &format!("m{i}")).await;
    }
    let mut held = Vec::new();
    while let Some(delivery) = t.get(&queue).await.unwrap() {
        held.push(delivery);
    }
    assert_eq!(held.len(), count);
    assert_eq!(
        t.gets.channels_open().await,
        MAX_HOLDING,
        "the deliveries past the bound share one"
    );
    let err = t.get(&unique("holding-get-missing")).await;
    assert!(matches!(err, Err(TransportError::NotFound(_))), "{err:?}");
    for delivery in held {
        delivery.acker.ack().await.unwrap();
    }
    for i in 0..10 {
        publish(&t, &queue, &format!("n{i}")).await;
    }
    while let Some(delivery) = t.get(&queue).await.unwrap() {
        delivery.acker.ack().await.unwrap();
        assert_eq!(t.gets.channels_open().await, 1);
    }
    assert_eq!(t.queue_info(&queue).await.unwrap().message_count, 0);
    t.delete_queue(&queue).await.unwrap();
    t.close().await;
}

/// lapin never opens again a channel number whose channel the broker closed over a refused
/// operation: once its numbers wrap, every open on such a number failed with that channel's
/// old error and kept the number, until no channel could be opened on the connection (a
/// cluster-wide timer's follower, refused its lock at every tick, got there within 2 x 2047
/// ticks). The transport reconnects instead; each refusal keeps its own error.
#[tokio::test]
async fn refused_operations_do_not_use_up_the_channels_of_a_connection() {
    let Some(_broker) = shared_broker().await else { return };
    let transport = connect(&format!("{URI}?channel_max=8")).await;
    let missing = unique("never-declared");
    for attempt in 0..30 {
        match transport.queue_info(&missing).await {
            Err(TransportError::NotFound(_)) => {}
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    let queue = unique("after-refusals");
    transport.declare_queue(&plain_queue(&queue)).await.unwrap();
    transport.delete_queue(&queue).await.unwrap();
    transport.close().await;
}

/// A declaration is recorded for the replay after a reconnect only once the broker accepted
/// it. A cluster-wide timer's follower, refused the leader's exclusive lock queue at every
/// tick, reconnected within such a refusal (its channels used up, see above): its replay
/// declared the lock queue it never held, took the refusal for its previous connection still
/// holding the queue, and set out to reclaim it.
#[tokio::test]
async fn a_declaration_the_broker_refuses_is_not_replayed() {
    let Some(_broker) = shared_broker().await else { return };
    let leader = connect(URI).await;
    let lock = QueueSpec { exclusive: true, ..plain_queue(&unique("lock")) };
    leader.declare_queue(&lock).await.unwrap();
    // A reclaim waits `reconnect_min` before its first attempt: it stays pending meanwhile.
    let options = RabbitMqOptions {
        reconnect_min: Duration::from_secs(60),
        reconnect_max: Duration::from_secs(60),
        ..options(&format!("{URI}?channel_max=8"))
    };
    let follower = RabbitMqTransport::connect(options).await.unwrap();
    for attempt in 0..30 {
        match follower.declare_queue(&lock).await {
            Err(TransportError::ResourceLocked(_)) => {}
            other => panic!("attempt {attempt}: {other:?}"),
        }
        if follower.reconnects() > 0 {
            break;
        }
    }
    assert_eq!(follower.reconnects(), 1, "the refusals used up the channels: a reconnect");
    let reclaimed = follower.shared.reclaims.pending(&lock.name);
    assert!(!reclaimed, "the replay declared the queue the broker refused");
    // Once the leader is gone, the follower takes the queue over.
    leader.close().await;
    follower.declare_queue(&lock).await.unwrap();
    follower.close().await;
}
