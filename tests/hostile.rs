//! Poison messages and hostile peers: what an attacker with publish rights can send a
//! service, and what must happen then. A poison message is settled once (dead-lettered with a
//! reason), never loops and never kills the connection; the messages behind it are handled
//! once; the service stays up. On every broker of `common::broker_uris()` unless said.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "metrics")]
use common::MetricsOnAnyPort;
use common::{broker_uris, config, unique};
use micro_framework::amqp::entrypoints::{EventListener, QueueListener};
use micro_framework::dependencies::Shared;
use micro_framework::logging::MAX_ERROR_TEXT;
use micro_framework::prelude::*;
use micro_framework::retry::AsyncBackOff;
use micro_framework::settle::{HEADER_ERROR, HEADER_HEADERS_DROPPED, HEADER_ORIGINAL_USER_ID};
use micro_framework::testing::TestService;
use micro_framework::transport::{
    ExchangeSpec, HeaderValue, Headers, Limit, OutgoingMessage, Properties, PublishOptions,
    QueueSpec, SharedTransport, TransportError,
};
use micro_framework::Message;
use serde_json::{json, Value};

/// Several of these tests are CPU-bound in a debug build (128 MiB of JSON through RabbitMQ, a
/// header 26,000 levels deep, frames full of headers) and wait for their outcome within
/// wall-clock limits: at most one test per core at a time, whatever `--test-threads` says (CI
/// runs six at a time, which on 2 cores made the deep header's dead letter miss its 10 s).
async fn cpu_slot() -> tokio::sync::SemaphorePermit<'static> {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(cores)).acquire().await.unwrap()
}

/// Counts the calls of a route.
#[derive(Default)]
struct Calls(AtomicU64);

impl Calls {
    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Always fails with an error that quotes the whole payload, as careless code does.
fn quoting(Payload(payload): Payload<Value>, Dep(calls): Dep<Arc<Calls>>) -> Result<(), String> {
    calls.0.fetch_add(1, Ordering::SeqCst);
    Err(format!("cannot handle {payload}"))
}

fn good(Payload(_): Payload<Value>, Dep(calls): Dep<Arc<Calls>>) {
    calls.0.fetch_add(1, Ordering::SeqCst);
}

/// A service with `quoting` on `{shop}/poison` (retried twice) and `good` on `{shop}/good`,
/// the calls of each, and the dead-letter queue of `quoting`. Its names contain `shop`.
async fn poison_and_good(uri: &str, shop: &str) -> (TestService, Arc<Calls>, Arc<Calls>, String) {
    let (bad_calls, good_calls) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
    let config = config(uri, &format!("hostile_{shop}"));
    let dlq = format!("evt-{shop}-poison--{}.quoting.dlq", config.service_name);
    let routes = vec![
        Route::new(quoting)
            .entrypoint(EventListener::new(shop, "poison"))
            .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
            .dependency(Shared(bad_calls.clone())),
        Route::new(good)
            .entrypoint(EventListener::new(shop, "good"))
            .dependency(Shared(good_calls.clone())),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    (service, bad_calls, good_calls, dlq)
}

/// Publish `body` with `properties` as event `event` of `shop`.
async fn publish_raw(
    transport: &SharedTransport,
    shop: &str,
    event: &str,
    body: Vec<u8>,
    properties: Properties,
) -> Result<(), TransportError> {
    let message = OutgoingMessage { body: body.into(), properties };
    let exchange = format!("{shop}.events");
    transport.publish(&exchange, event, message, PublishOptions::default()).await
}

/// Properties whose content header frame is `frame_len` bytes: one `padding` header.
fn filling_properties(frame_len: usize) -> Properties {
    // frame 8 + class, weight, size and flags 14 + delivery mode 1 + table length 4
    // + key "padding" 8 + type and string length 5
    let padding = "p".repeat(frame_len - 40);
    let headers = Headers::from([("padding".to_owned(), HeaderValue::from(padding))]);
    Properties { headers, delivery_mode: Some(2), ..Properties::default() }
}

fn header<'a>(message: &'a Message, key: &str) -> Option<&'a HeaderValue> {
    message.properties.headers.get(key)
}

/// Wait until `queue` holds `count` messages, then take them.
async fn dead_letters(service: &TestService, queue: &str, count: u32) -> Vec<Message> {
    common::wait_until_async(|| async { service.queue_len(queue).await.unwrap_or(0) >= count })
        .await;
    service.take_messages(queue).await.unwrap()
}

#[tokio::test]
async fn an_error_quoting_a_200_kb_event_is_bounded_and_dead_lettered_once() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, bad_calls, good_calls, dlq) = poison_and_good(&uri, &shop).await;
        let markers = [shop.clone()];
        let big = json!({ "blob": "b".repeat(200_000) });
        service.dispatch(&shop, "poison", &big).await.unwrap();
        service.dispatch(&shop, "good", &json!({ "n": 1 })).await.unwrap();

        let dead = dead_letters(&service, &dlq, 1).await;
        service.wait_for_route("good", 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(dead.len(), 1, "{uri}: dead-lettered once");
        assert_eq!(dead[0].decode().unwrap(), big, "{uri}: the body is kept whole");
        let error = header(&dead[0], HEADER_ERROR).and_then(HeaderValue::as_str).unwrap();
        assert!(error.len() < MAX_ERROR_TEXT + 64, "{uri}: error of {} bytes", error.len());
        assert!(error.ends_with("bytes in all)"), "{uri}: {}", &error[error.len() - 80..]);
        assert_eq!(bad_calls.count(), 3, "{uri}: first try and two retries");
        assert_eq!(good_calls.count(), 1, "{uri}: the good event, once");
        assert_eq!(service.transport().reconnects(), 0, "{uri}: the connection was never lost");
        assert_eq!(service.queue_len(&dlq).await.unwrap(), 0);
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_body_nested_deeper_than_128_levels_is_bad_input() {
    let _cpu = cpu_slot().await;
    // serde_json's guard against a stack overflow: the deep body is dead-lettered once, not
    // retried, and the service goes on (a body 127 levels deep is read)
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, bad_calls, good_calls, dlq) = poison_and_good(&uri, &shop).await;
        let markers = [shop.clone()];
        let nest = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let properties = || Properties {
            content_type: Some("application/json".into()),
            ..Properties::default()
        };
        let transport = service.transport().clone();
        publish_raw(&transport, &shop, "poison", nest(129).into_bytes(), properties())
            .await
            .unwrap();
        let dead = dead_letters(&service, &dlq, 1).await;
        let error = header(&dead[0], HEADER_ERROR).and_then(HeaderValue::as_str).unwrap();
        assert!(error.contains("recursion limit exceeded"), "{uri}: {error}");
        assert_eq!(bad_calls.count(), 0, "{uri}: never called, never retried");
        publish_raw(&transport, &shop, "good", nest(127).into_bytes(), properties()).await.unwrap();
        service.wait_for_route("good", 1).await.unwrap();
        assert_eq!(good_calls.count(), 1, "{uri}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn headers_that_fill_a_frame_are_dead_lettered_without_them_and_say_so() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, bad_calls, good_calls, dlq) = poison_and_good(&uri, &shop).await;
        let markers = [shop.clone()];
        // accepted by the broker, but no dead-letter header fits beside it
        let properties = filling_properties(131_000);
        let body = b"\x00not json\xff".to_vec();
        publish_raw(service.transport(), &shop, "poison", body.clone(), properties).await.unwrap();
        service.dispatch(&shop, "good", &json!({ "n": 1 })).await.unwrap();

        let dead = dead_letters(&service, &dlq, 1).await;
        service.wait_for_route("good", 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(dead.len(), 1, "{uri}: dead-lettered once");
        assert_eq!(dead[0].body.as_ref(), body.as_slice(), "{uri}: the body is kept");
        assert!(header(&dead[0], "padding").is_none(), "{uri}: the original header is dropped");
        let dropped = header(&dead[0], HEADER_HEADERS_DROPPED).and_then(HeaderValue::as_str);
        assert!(
            dropped.is_some_and(|text| text.starts_with("1 original headers dropped")),
            "{uri}: {dropped:?}"
        );
        assert!(header(&dead[0], HEADER_ERROR).is_some(), "{uri}: the reason is kept");
        assert_eq!(bad_calls.count(), 0, "{uri}: bad input never reaches the target");
        assert_eq!(good_calls.count(), 1, "{uri}: the good event, once");
        assert_eq!(service.transport().reconnects(), 0, "{uri}: the connection was never lost");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn a_retry_copy_that_cannot_fit_is_dead_lettered_at_once() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, bad_calls, good_calls, dlq) = poison_and_good(&uri, &shop).await;
        let markers = [shop.clone()];
        let properties = filling_properties(131_000);
        let body = serde_json::to_vec(&json!({ "order": 7 })).unwrap();
        publish_raw(service.transport(), &shop, "poison", body, properties).await.unwrap();
        service.dispatch(&shop, "good", &json!({ "n": 1 })).await.unwrap();

        let dead = dead_letters(&service, &dlq, 1).await;
        service.wait_for_route("good", 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(dead.len(), 1, "{uri}");
        let error = header(&dead[0], HEADER_ERROR).and_then(HeaderValue::as_str).unwrap();
        assert!(error.contains("not retried"), "{uri}: {error}");
        assert_eq!(bad_calls.count(), 1, "{uri}: no retry could be scheduled");
        assert_eq!(good_calls.count(), 1, "{uri}");
        assert_eq!(service.transport().reconnects(), 0, "{uri}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// After a publish the service refused: it still serves (its `good` route handles an event)
/// on the connection it had (none lost), then it stops and `shop`'s names are deleted.
async fn still_serving(service: TestService, good_calls: &Calls, uri: &str, shop: &str) {
    service.dispatch(shop, "good", &json!({ "n": 1 })).await.unwrap();
    service.wait_for_route("good", 1).await.unwrap();
    assert_eq!(good_calls.count(), 1);
    assert_eq!(service.transport().reconnects(), 0, "{uri}: the connection was never lost");
    service.stop().await.unwrap();
    common::cleanup(uri, &[shop.to_owned()]).await;
}

#[tokio::test]
async fn headers_too_big_for_a_frame_are_refused_before_the_broker_sees_them() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, _, good_calls, _) = poison_and_good(&uri, &shop).await;
        let refused =
            publish_raw(service.transport(), &shop, "good", vec![], filling_properties(131_073))
                .await;
        assert!(
            matches!(
                refused,
                Err(TransportError::LimitReached {
                    what: Limit::HeaderSize,
                    size: 131_073,
                    limit: 131_072,
                    ..
                })
            ),
            "{uri}: {refused:?}"
        );
        still_serving(service, &good_calls, &uri, &shop).await;
    }
}

/// Headers whose content header frame is exactly `frame_max` (131,072 bytes) fill one frame
/// and fit: they are sent, and delivered whole (a byte more is refused, as above).
#[tokio::test]
async fn headers_that_fill_a_frame_exactly_are_sent_and_delivered() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let queue = unique("full_frame");
        let transport = micro_framework::transport::connect(&config(&uri, "full_frame")).await;
        let transport = transport.unwrap();
        transport.declare_queue(&QueueSpec::durable(queue.clone())).await.unwrap();
        let properties = filling_properties(131_072);
        let message = OutgoingMessage { body: b"{}".to_vec().into(), properties };
        let sent = transport.publish("", &queue, message, PublishOptions::default()).await;
        let mut got = None;
        for _ in 0..100 {
            if sent.is_err() {
                break;
            }
            got = transport.get(&queue).await.unwrap();
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        transport.delete_queue(&queue).await.unwrap();
        transport.close().await;
        assert!(sent.is_ok(), "{uri}: a frame of exactly frame_max refused: {sent:?}");
        let got = got.expect("the message delivered");
        let padding = got.properties.headers.get("padding");
        assert!(
            matches!(padding, Some(HeaderValue::String(text)) if text.len() == 131_032),
            "{uri}: the header delivered whole"
        );
    }
}

#[tokio::test]
async fn float_headers_that_are_no_number_are_refused_before_the_broker_sees_them() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, _, good_calls, _) = poison_and_good(&uri, &shop).await;
        let nested = HeaderValue::Array(vec![HeaderValue::Float(f64::INFINITY)]);
        for odd in [HeaderValue::Float(f64::NAN), nested] {
            let mut properties = micro_framework::data::json_properties();
            properties.headers.insert("x-ratio".into(), odd);
            let refused = publish_raw(service.transport(), &shop, "good", vec![], properties).await;
            assert!(
                matches!(&refused, Err(TransportError::Invalid(reason)) if reason.contains("x-ratio")),
                "{uri}: {refused:?}"
            );
        }
        // RabbitMQ would have closed the whole connection (541) on such a double
        still_serving(service, &good_calls, &uri, &shop).await;
    }
}

/// A float that is no number nested in a table header is refused as one at the top or in an
/// array is: RabbitMQ cannot read it there either, and would close the whole connection.
#[tokio::test]
async fn a_float_that_is_no_number_inside_a_table_header_is_refused() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, _, good_calls, _) = poison_and_good(&uri, &shop).await;
        let table = Headers::from([("ratio".to_owned(), HeaderValue::Float(f64::NAN))]);
        let mut properties = micro_framework::data::json_properties();
        properties.headers.insert("x-stats".into(), HeaderValue::Table(table));
        let refused = publish_raw(service.transport(), &shop, "good", vec![], properties).await;
        assert!(
            matches!(&refused, Err(TransportError::Invalid(reason)) if reason.contains("x-stats")),
            "{uri}: {refused:?}"
        );
        still_serving(service, &good_calls, &uri, &shop).await;
    }
}

#[tokio::test]
async fn decimal_headers_keep_their_value_in_dead_letters() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("shop");
        let (service, _, _, dlq) = poison_and_good(&uri, &shop).await;
        let markers = [shop.clone()];
        let decimal = HeaderValue::Decimal { scale: 3, value: -12_345_678 };
        let properties = Properties {
            headers: Headers::from([("amount".to_owned(), decimal.clone())]),
            ..Properties::default()
        };
        publish_raw(service.transport(), &shop, "poison", b"{}".to_vec(), properties)
            .await
            .unwrap();
        let dead = dead_letters(&service, &dlq, 1).await;
        assert_eq!(header(&dead[0], "amount"), Some(&decimal), "{uri}");
        assert_eq!(decimal.decimal_text().as_deref(), Some("-12345.678"));
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// An array header nested `depth` levels deep.
fn nested(depth: usize) -> HeaderValue {
    let mut value = HeaderValue::Array(Vec::new());
    for _ in 1..depth {
        value = HeaderValue::Array(vec![value]);
    }
    value
}

/// RabbitMQ only: the frame parser runs in lapin's thread.
#[tokio::test]
async fn a_header_nested_as_deep_as_a_frame_allows_crashes_nothing() {
    let _cpu = cpu_slot().await;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let shop = unique("shop");
    let (service, bad_calls, good_calls, dlq) = poison_and_good(&uri, &shop).await;
    let markers = [shop.clone()];
    // 5 bytes a level: about the deepest a 131,072-byte frame holds
    let depth = 26_000;
    let properties = Properties {
        headers: Headers::from([("deep".to_owned(), nested(depth))]),
        ..Properties::default()
    };
    for event in ["good", "poison"] {
        publish_raw(service.transport(), &shop, event, b"{}".to_vec(), properties.clone())
            .await
            .unwrap();
    }
    service.dispatch(&shop, "good", &json!({ "n": 2 })).await.unwrap();

    let dead = dead_letters(&service, &dlq, 1).await;
    service.wait_for_route("good", 2).await.unwrap();
    assert_eq!(good_calls.count(), 2, "the deep message and the one behind it, once each");
    assert_eq!(bad_calls.count(), 3, "first try and two retries");
    let deep = header(&dead[0], "deep");
    assert!(deep == Some(&nested(depth)) || header(&dead[0], HEADER_HEADERS_DROPPED).is_some());
    assert_eq!(service.transport().reconnects(), 0);
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
}

/// RabbitMQ only: a user that may publish sets `user_id` to its own name, legitimately; the
/// service's copies are published as another user.
#[tokio::test]
async fn a_message_carrying_its_publishers_user_id_is_settled_once() {
    let _cpu = cpu_slot().await;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("publisher");
    let shop = unique("shop");
    let (service, bad_calls, good_calls, dlq) = poison_and_good(&uri, &shop).await;
    let markers = [shop.clone()];
    let publisher = user.connect(&uri).await;
    let properties = Properties { user_id: Some(user.name.clone()), ..Properties::default() };
    for _ in 0..3 {
        publish_raw(&publisher, &shop, "poison", b"{\"n\": 1}".to_vec(), properties.clone())
            .await
            .unwrap();
    }
    publish_raw(&publisher, &shop, "good", b"{\"n\": 2}".to_vec(), properties).await.unwrap();

    let dead = dead_letters(&service, &dlq, 3).await;
    service.wait_for_route("good", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dead.len(), 3);
    for message in &dead {
        assert_eq!(message.properties.user_id, None);
        assert_eq!(
            header(message, HEADER_ORIGINAL_USER_ID),
            Some(&HeaderValue::from(user.name.as_str()))
        );
    }
    assert_eq!(bad_calls.count(), 9, "three messages, three attempts each, no more");
    assert_eq!(good_calls.count(), 1, "the good event behind them, once");
    publisher.close().await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
}

/// The `rpc_service` example on RabbitMQ, its log captured in a file.
struct RpcExample {
    child: std::process::Child,
    log: std::path::PathBuf,
    service: String,
}

impl RpcExample {
    fn start(uri: &str) -> RpcExample {
        RpcExample::start_with(uri, &[])
    }

    fn start_with(uri: &str, env: &[(&str, &str)]) -> RpcExample {
        let exe = std::env::current_exe().unwrap();
        let example = exe.parent().and_then(std::path::Path::parent).unwrap();
        let service = unique("hostile_rpc");
        let log = std::env::temp_dir().join(format!("{service}.log"));
        let child = std::process::Command::new(example.join("examples/rpc_service"))
            .env("AMQP_URI", uri)
            .env("SERVICE_NAME", &service)
            .env_remove("LOG_FORMAT")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("example built by cargo test");
        RpcExample { child, log, service }
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Stop with SIGINT and return the log.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        assert!(self.child.wait().unwrap().success(), "SIGINT stops the example cleanly");
        let log = std::fs::read_to_string(&self.log).unwrap();
        std::fs::remove_file(&self.log).unwrap();
        log
    }
}

/// Call `method` until the example answers (it may still be starting).
async fn first_answer(client: &micro_framework::amqp::rpc::Client, service: &str) {
    use micro_framework::amqp::rpc::RpcError;
    for _ in 0..200 {
        match client.call::<i64>(service, "add", [1, 2], json!({})).await {
            Err(RpcError::UnknownService(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => return assert_eq!(other.unwrap(), 3),
        }
    }
    panic!("the example never answered");
}

/// RabbitMQ only: big requests do not leave the service big. Not a performance figure: what
/// is kept after them is what was not given back (glibc's malloc keeps big freed buffers in
/// its heap unless its mmap threshold is fixed).
#[tokio::test]
async fn big_rpc_requests_leave_no_memory_behind() {
    let _cpu = cpu_slot().await;
    use micro_framework::amqp::rpc::Client;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let example = RpcExample::start(&uri);
    let client = Client::connect(&Config::new("caller").with_amqp_uri(uri.clone())).await.unwrap();
    first_answer(&client, &example.service).await;
    let before = example.rss_kib();
    let big = "x".repeat(8 << 20);
    for _ in 0..2 {
        let calls = (0..8).map(|_| {
            client.call::<Value>(&example.service, "echo", json!([big.clone()]), json!({}))
        });
        for echoed in futures::future::join_all(calls).await {
            assert_eq!(echoed.unwrap().as_str().map(str::len), Some(big.len()));
        }
    }
    let after = example.rss_kib();
    client.close().await;
    let service = example.service.clone();
    example.stop();
    common::cleanup(&uri, &[service]).await;
    assert!(
        after < before + 48 * 1024,
        "{before} KiB before 128 MiB of requests, {after} KiB after"
    );
}

/// RabbitMQ only (the example serves a real broker): text from the wire cannot forge a log
/// line, and an error quoting a 1 MB argument is bounded in the reply and in the log.
#[tokio::test]
async fn wire_text_cannot_forge_log_lines_and_echoes_are_bounded() {
    let _cpu = cpu_slot().await;
    use micro_framework::amqp::rpc::{Client, RpcError};
    let Some(uri) = common::rabbitmq_uri() else { return };
    let example = RpcExample::start(&uri);
    let client = Client::connect(&Config::new("caller").with_amqp_uri(uri.clone())).await.unwrap();
    first_answer(&client, &example.service).await;

    // no dot: the RPC exchange routes `{service}.{method}` with one word after the service
    let forged = "nothing\n2026-01-01T00:00:00Z ERROR forged: \u{1b}[2J\u{202e}evil";
    let unknown = client.call::<Value>(&example.service, forged, json!([]), json!({})).await;
    assert!(matches!(unknown, Err(RpcError::MethodNotFound(_))), "{unknown:?}");
    let huge = "9".repeat(1 << 20);
    let refused = client.call::<Value>(&example.service, "add", json!([huge, 1]), json!({})).await;
    let text = refused.unwrap_err().to_string();
    assert!(text.len() < MAX_ERROR_TEXT + 200, "a reply of {} bytes", text.len());
    assert!(text.contains("bytes in all"), "{text:.200}");
    client.close().await;

    let service = example.service.clone();
    let log = example.stop();
    common::cleanup(&uri, &[service]).await;
    assert!(!log.contains('\u{1b}') && !log.contains('\u{202e}'), "raw escapes in the log");
    for line in log.lines() {
        assert!(!line.contains("ERROR forged") || line.contains("\\n2026-01-01"), "forged: {line}");
        assert!(line.len() < 2 * MAX_ERROR_TEXT, "a log line of {} bytes", line.len());
    }
    assert!(!log.lines().any(|line| line.starts_with("2026-01-01")), "a forged line: {log}");
    assert!(log.contains("\\n2026-01-01T00:00:00Z ERROR forged"), "logged, escaped: {log}");
    assert!(log.contains("\\u{202e}evil"), "logged, escaped: {log}");
}

/// RabbitMQ only: every connection the broker closes is counted, in the transport and in
/// `broker_reconnects_total`.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn broker_reconnects_total_counts_every_reconnect() {
    let _cpu = cpu_slot().await;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("reconnecting");
    let shop = unique("shop");
    let (service, _, good_calls, _) = {
        let config = config(&user.uri(&uri), &format!("hostile_{shop}")).with_metrics_on_any_port();
        let calls = Arc::new(Calls::default());
        let routes = vec![Route::new(good)
            .entrypoint(EventListener::new(&shop, "good"))
            .dependency(Shared(calls.clone()))];
        (TestService::start(routes, config).await.unwrap(), (), calls, ())
    };
    let address = service.service().metrics_address().unwrap();
    for closed in 1..=3u64 {
        user.close_connections();
        // never less than what was counted before, even while the connection is down
        common::wait_until_async(|| async {
            let counted = service.transport().reconnects();
            assert!(counted >= closed - 1, "{counted} reconnects counted after {closed} closes");
            counted == closed && service.transport().is_connected()
        })
        .await;
    }
    service.dispatch(&shop, "good", &json!({ "n": 1 })).await.unwrap();
    service.wait_for_route("good", 1).await.unwrap();
    assert_eq!(good_calls.count(), 1);
    let metrics =
        tokio::task::spawn_blocking(move || common::http_get(address, "/metrics").1).await.unwrap();
    assert!(metrics.lines().any(|line| line == "broker_reconnects_total 3"), "{metrics}");
    service.stop().await.unwrap();
    common::cleanup(&uri, &[shop]).await;
}

fn blocking(Payload(_): Payload<Value>, Dep(probe): Dep<Arc<common::Probe>>) {
    probe.enter(Value::Null);
    probe.leave();
}

/// A message redelivered after a crash is counted by a copy; when the copy cannot fit, the
/// message is refused (dead-lettered without its headers) rather than handled uncounted,
/// which would let it crash the service for ever.
#[tokio::test]
async fn a_redelivery_that_cannot_be_counted_is_dead_lettered() {
    let _cpu = cpu_slot().await;
    use micro_framework::settle::HEADER_ERROR_KIND;
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, &format!("hostile_{shop}"));
        let queue = format!("evt-{shop}-job--{}.blocking", config.service_name);
        let start = |probe: Arc<common::Probe>| {
            let routes = vec![Route::new(blocking)
                .entrypoint(EventListener::new(&shop, "job"))
                .dependency(Shared(probe))];
            TestService::start(routes, config.clone())
        };
        let probe = common::Probe::closed();
        let service = start(probe.clone()).await.unwrap();
        let body = serde_json::to_vec(&json!({ "n": 1 })).unwrap();
        publish_raw(service.transport(), &shop, "job", body, filling_properties(131_000))
            .await
            .unwrap();
        probe.wait_started(1).await;
        // a crash: the connection goes away while the call runs
        service.transport().close().await;
        probe.open();
        let _ = service.stop().await;

        let probe = common::Probe::new();
        let service = start(probe.clone()).await.unwrap();
        let dead = dead_letters(&service, &format!("{queue}.dlq"), 1).await;
        assert_eq!(dead.len(), 1, "{uri}");
        assert_eq!(header(&dead[0], HEADER_ERROR_KIND), Some(&HeaderValue::from("crashed")));
        let error = header(&dead[0], HEADER_ERROR).and_then(HeaderValue::as_str).unwrap();
        assert!(error.contains("cannot be counted"), "{uri}: {error}");
        assert!(header(&dead[0], HEADER_HEADERS_DROPPED).is_some(), "{uri}");
        assert_eq!(probe.started(), 0, "{uri}: not handled again");
        assert_eq!(service.queue_len(&queue).await.unwrap(), 0, "{uri}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &[shop]).await;
    }
}

fn counted(Dep(calls): Dep<Arc<Calls>>) -> u64 {
    calls.0.fetch_add(1, Ordering::SeqCst) + 1
}

/// A request whose reply can never be sent (here: the RPC exchange is gone) is acked without a
/// reply once its target ran, rather than requeued to run again for ever.
#[tokio::test]
async fn an_rpc_request_whose_reply_can_never_be_sent_runs_once() {
    let _cpu = cpu_slot().await;
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::transport::{BindingSpec, ExchangeSpec};
    for uri in broker_uris() {
        let marker = unique("noreply");
        let config =
            config(&uri, &format!("svc_{marker}")).with_rpc_exchange(format!("rpc_{marker}"));
        let queue = format!("rpc-{}", config.service_name);
        let calls = Arc::new(Calls::default());
        let routes = vec![Route::new(counted)
            .entrypoint(RPCListener::new())
            .dependency(Shared(calls.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        // a caller of its own: on the service's connection, the failing replies would close
        // the channel this publish shares with them
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        // requests come through another exchange; the one replies go to is deleted
        let side = ExchangeSpec::topic(format!("side_{marker}"));
        transport.declare_exchange(&side).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: side.name.clone(),
            routing_key: format!("{}.*", config.service_name),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();
        transport.delete_exchange(&config.rpc_exchange).await.unwrap();
        let properties = Properties {
            reply_to: Some(unique("reply")),
            correlation_id: Some(unique("corr")),
            ..micro_framework::data::json_properties()
        };
        let request =
            OutgoingMessage { body: br#"{"args": [], "kwargs": {}}"#.to_vec().into(), properties };
        let routing_key = format!("{}.counted", config.service_name);
        transport
            .publish(&side.name, &routing_key, request, PublishOptions::default())
            .await
            .unwrap();

        common::wait_until(|| calls.count() >= 1, "the call").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(calls.count(), 1, "{uri}: run once, not again and again");
        assert_eq!(service.queue_len(&queue).await.unwrap(), 0, "{uri}: acked");
        transport.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[marker]).await;
    }
}

/// A service whose route `good` listens to `{shop}.job` and has handled one event.
struct Consuming {
    service: TestService,
    config: Config,
    shop: String,
    queue: String,
    calls: Arc<Calls>,
    markers: [String; 2],
}

async fn consuming(uri: &str, name: &str) -> Consuming {
    let shop = unique(name);
    let config = config(uri, name);
    let markers = [config.service_name.clone(), shop.clone()];
    let queue = format!("evt-{shop}-job--{}.good", config.service_name);
    let calls = Arc::new(Calls::default());
    let routes = vec![Route::new(good)
        .entrypoint(EventListener::new(&shop, "job"))
        .dependency(Shared(calls.clone()))];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    service.dispatch(&shop, "job", &json!({ "id": 0 })).await.unwrap();
    service.wait_for_route("good", 1).await.unwrap();
    Consuming { service, config, shop, queue, calls, markers }
}

/// Publish `{shop}.job` events (mandatory) until one is routed: the service has declared its
/// queue and binding again.
async fn routed_once_bound(operator: &SharedTransport, shop: &str) {
    let exchange = format!("{shop}.events");
    let mandatory = PublishOptions { mandatory: true };
    let event = || OutgoingMessage {
        body: b"{\"id\": 1}".to_vec().into(),
        properties: micro_framework::data::json_properties(),
    };
    let routed = || async { operator.publish(&exchange, "job", event(), mandatory).await.is_ok() };
    common::wait_until_async(routed).await;
}

/// And with no ERROR line: nothing failed (the queue was consumed while missing first, and
/// the broker's refusal closed a channel, which lapin logs as an error).
#[tokio::test]
async fn a_queue_deleted_under_the_service_is_declared_again_with_its_binding() {
    let _cpu = cpu_slot().await;
    common::logs::capture(tracing::Level::WARN);
    for uri in broker_uris() {
        let Consuming { service, config, shop, queue, calls, markers } =
            consuming(&uri, "qgone").await;
        // an operator deletes it, on a connection of their own
        let operator = micro_framework::transport::connect(&config).await.unwrap();
        operator.delete_queue(&queue).await.unwrap();
        // the service declares it again, then binds it: until then an event is unroutable
        routed_once_bound(&operator, &shop).await;
        common::wait_until(|| calls.count() >= 2, "the event, bound again and consumed").await;
        operator.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        let logged = common::logs::logged();
        let errors: Vec<_> =
            logged.lines().filter(|l| l.contains("ERROR") && l.contains(&queue)).collect();
        assert!(errors.is_empty(), "{uri}: a recovery logged as errors: {errors:#?}");
    }
}

#[tokio::test]
async fn a_queue_deleted_with_its_exchange_is_declared_again_with_both_and_bound() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let Consuming { service, config, shop, queue, calls, markers } =
            consuming(&uri, "xgone").await;
        // an operator deletes the exchange the service declared, then its queue
        let operator = micro_framework::transport::connect(&config).await.unwrap();
        operator.delete_exchange(&format!("{shop}.events")).await.unwrap();
        operator.delete_queue(&queue).await.unwrap();
        // the exchange, the queue and its binding come back: until then an event is unroutable
        routed_once_bound(&operator, &shop).await;
        common::wait_until(|| calls.count() >= 2, "the event, exchange and binding back").await;
        operator.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// A queue deleted, then declared again by another with other arguments (not durable) before
/// the service's recovery: the service's own declaration is refused (406), and it consumes the
/// queue as it is (it stopped consuming it for good, the refusal logged each second).
#[tokio::test]
async fn a_queue_declared_again_by_another_with_other_arguments_is_consumed_again() {
    let _cpu = cpu_slot().await;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let marker = unique("redeclared");
    let config = config(&uri, "redeclared");
    let markers = [config.service_name.clone(), marker.clone()];
    let queue = format!("{marker}-q");
    let calls = Arc::new(Calls::default());
    let routes = vec![Route::new(good)
        .entrypoint(QueueListener::new(queue.clone()))
        .dependency(Shared(calls.clone()))];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let operator = micro_framework::transport::connect(&config).await.unwrap();
    let job = || OutgoingMessage {
        body: b"{}".to_vec().into(),
        properties: micro_framework::data::json_properties(),
    };
    operator.publish("", &queue, job(), PublishOptions::default()).await.unwrap();
    service.wait_for_route("good", 1).await.unwrap();
    operator.delete_queue(&queue).await.unwrap();
    let spec = micro_framework::transport::QueueSpec {
        durable: false,
        ..micro_framework::transport::QueueSpec::durable(queue.clone())
    };
    operator.declare_queue(&spec).await.unwrap();
    operator.publish("", &queue, job(), PublishOptions::default()).await.unwrap();
    common::wait_until(|| calls.count() >= 2, "the queue consumed as it is").await;
    operator.close().await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
}

#[tokio::test]
async fn a_queue_declared_again_whose_binding_fails_is_not_consumed_unbound() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let marker = unique("bgone");
        let config = config(&uri, "bgone");
        let markers = [config.service_name.clone(), marker.clone()];
        let (queue, exchange) = (format!("{marker}-q"), format!("{marker}-x"));
        // an exchange of the operator's, which the service binds its queue to
        let operator = micro_framework::transport::connect(&config).await.unwrap();
        let topic = ExchangeSpec::topic(exchange.clone());
        operator.declare_exchange(&topic).await.unwrap();
        let calls = Arc::new(Calls::default());
        let routes = vec![Route::new(good)
            .entrypoint(QueueListener::new(queue.clone()).bind(exchange.clone(), "job"))
            .dependency(Shared(calls.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let job = || OutgoingMessage {
            body: b"{}".to_vec().into(),
            properties: micro_framework::data::json_properties(),
        };
        let options = PublishOptions::default();
        operator.publish(&exchange, "job", job(), options).await.unwrap();
        service.wait_for_route("good", 1).await.unwrap(); // consuming
                                                          // both deleted: the queue comes back, its binding cannot while the exchange is gone
        operator.delete_exchange(&exchange).await.unwrap();
        operator.delete_queue(&queue).await.unwrap();
        // the service declares it again
        common::wait_until_async(|| async { operator.queue_info(&queue).await.is_ok() }).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // the operator declares the exchange again: the service binds its queue, then consumes
        operator.declare_exchange(&topic).await.unwrap();
        // the queue is bound again once the exchange is back
        let mandatory = PublishOptions { mandatory: true };
        let bound = || async { operator.publish(&exchange, "job", job(), mandatory).await.is_ok() };
        common::wait_until_async(bound).await;
        common::wait_until(|| calls.count() >= 2, "the event, consumed once bound").await;
        operator.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn an_event_whose_filter_panics_is_dead_lettered_once_as_bad_input() {
    let _cpu = cpu_slot().await;
    use micro_framework::settle::HEADER_ERROR_KIND;
    for uri in broker_uris() {
        let shop = unique("filterpanic");
        let config = config(&uri, &format!("hostile_{shop}"));
        let dlq = format!("evt-{shop}-job--{}.good.dlq", config.service_name);
        let (calls, filtered) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
        let seen = filtered.clone();
        // A filter that assumes a field every event has, until one comes without it.
        let listener = EventListener::new(&shop, "job").filter(move |payload| {
            seen.0.fetch_add(1, Ordering::SeqCst);
            payload["amount"].as_f64().expect("an amount") > 10.0
        });
        let routes = vec![Route::new(good).entrypoint(listener).dependency(Shared(calls.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "note": "no amount" })).await.unwrap();
        let dead = dead_letters(&service, &dlq, 1).await;
        assert_eq!(dead.len(), 1, "{uri}");
        assert_eq!(header(&dead[0], HEADER_ERROR_KIND), Some(&HeaderValue::from("bad_input")));
        let error = header(&dead[0], HEADER_ERROR).and_then(HeaderValue::as_str).unwrap_or("");
        assert!(error.contains("filter panicked: an amount"), "{error}");
        assert_eq!(filtered.count(), 1, "the poison event went through the filter once");
        // The events behind it are filtered and handled as ever.
        service.dispatch(&shop, "job", &json!({ "amount": 20 })).await.unwrap();
        service.dispatch(&shop, "job", &json!({ "amount": 5 })).await.unwrap();
        common::wait_until(|| calls.count() == 1 && filtered.count() == 3, "two more events").await;
        // The test hook settles it as the listener does: a failed call, bad input.
        let hook = service.hook("good").unwrap();
        let hooked = hook.event::<()>(&json!({ "note": "no amount" })).await.unwrap_err();
        let kind = hooked.failure().map(|failure| failure.kind);
        assert_eq!(kind, Some(micro_framework::FailureKind::BadInput), "{hooked}");
        service.stop().await.unwrap();
        assert_eq!(calls.count(), 1, "the target never saw the poison event");
        common::cleanup(&uri, &[shop.clone(), config.service_name.clone()]).await;
    }
}

/// Each attempt's `(id, retry_count)`.
type Attempts = Arc<std::sync::Mutex<Vec<(u64, u32)>>>;

/// Fails every first attempt; records each attempt's `(id, retry_count)`.
fn fails_first(
    Payload(event): Payload<Value>,
    retry: micro_framework::retry::BackOffData,
    Dep(attempts): Dep<Attempts>,
) -> Result<(), String> {
    let id = event["id"].as_u64().unwrap_or(u64::MAX);
    attempts.lock().unwrap().push((id, retry.retry_count));
    match retry.retry_count {
        0 => Err("the first attempt fails".into()),
        _ => Ok(()),
    }
}

/// Any publisher can set `x-death`, which RabbitMQ reads when a retry copy leaves its delay
/// queue: one it cannot read crashed that queue, and the retries waiting in it were lost.
#[tokio::test]
async fn a_forged_x_death_loses_no_retry_of_any_event() {
    let _cpu = cpu_slot().await;
    for uri in broker_uris() {
        let shop = unique("xdeath");
        let config = config(&uri, &format!("hostile_{shop}"));
        let queue = format!("evt-{shop}-job--{}.fails_first", config.service_name);
        let markers = [config.service_name.clone(), shop.clone()];
        let attempts = Attempts::default();
        let routes = vec![Route::new(fails_first)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(300)))
            .dependency(Shared(attempts.clone()))];
        let service = TestService::start(routes, config).await.unwrap();
        for id in 0..3 {
            service.dispatch(&shop, "job", &json!({ "id": id })).await.unwrap();
        }
        let table = |fields: Vec<(&str, HeaderValue)>| {
            HeaderValue::Table(
                fields.into_iter().map(|(key, value)| (key.to_owned(), value)).collect(),
            )
        };
        let forged = [
            (10, HeaderValue::Array(vec![HeaderValue::Int(1)])),
            (
                11,
                HeaderValue::Array(vec![table(vec![
                    ("queue", HeaderValue::from(format!("{queue}.delay-300"))),
                    ("reason", HeaderValue::from("expired")),
                    ("count", HeaderValue::from("many")),
                ])]),
            ),
        ];
        for (id, x_death) in forged {
            let mut properties = micro_framework::data::json_properties();
            properties.headers.insert("x-death".into(), x_death);
            let body = json!({ "id": id }).to_string().into_bytes();
            publish_raw(service.transport(), &shop, "job", body, properties).await.unwrap();
        }
        service.dispatch(&shop, "job", &json!({ "id": 3 })).await.unwrap();
        let retried = || {
            let attempts = attempts.lock().unwrap();
            let mut ids: Vec<u64> =
                attempts.iter().filter(|(_, retry)| *retry == 1).map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids
        };
        let all = vec![0, 1, 2, 3, 10, 11];
        for _ in 0..100 {
            if retried() == all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seen = retried();
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
        assert_eq!(seen, all, "events whose retry never came, on {uri}");
    }
}

fn count(Payload(_): Payload<Value>, Dep(calls): Dep<Arc<Calls>>) {
    calls.0.fetch_add(1, Ordering::SeqCst);
}

/// Publish, with py-amqp (which writes a short string's bytes as they are, as RabbitMQ
/// carries them), one event `event` of `source` whose `message_id` is not UTF-8.
fn publish_a_message_id_that_is_not_utf8(source: &str, event: &str) -> bool {
    let Some(python) = common::peer::interop_python(common::peer::NAMEKO) else { return false };
    let script = format!(
        "import amqp\n\
         c = amqp.Connection('127.0.0.1:5672', userid='guest', password='guest')\n\
         c.connect()\n\
         ch = c.channel()\n\
         m = amqp.Message(b'{{}}', content_type='application/json', message_id=b'\\xff\\xfe')\n\
         ch.basic_publish(m, exchange='{source}.events', routing_key='{event}')\n\
         c.close()\n"
    );
    let out = std::process::Command::new(python).arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    true
}

/// A message whose short-string property is not UTF-8 cannot be read by the AMQP client
/// (nor by py-amqp): the connection drops, and RabbitMQ delivers it again first on the next.
/// The service says so, and waits longer and longer between reconnects rather than
/// reconnecting as fast as the broker answers (tens of times a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_amqp_client_cannot_read_is_named_and_costs_few_reconnects() {
    let _cpu = cpu_slot().await;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let source = unique("unreadable");
    let calls = Arc::new(Calls::default());
    let config = config(&uri, &format!("unreadable_{source}"));
    let markers = [config.service_name.clone(), source.clone()];
    let route =
        Route::new(count).entrypoint(EventListener::new(&source, "any")).dependency(Shared(calls));
    common::logs::capture(tracing::Level::WARN);
    let service = TestService::start(vec![route], config).await.unwrap();
    if !publish_a_message_id_that_is_not_utf8(&source, "any") {
        // no Python peer (skipped loudly outside CI): what the service declared goes too
        service.stop().await.unwrap();
        return common::cleanup(&uri, &markers).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reconnects = service.transport().reconnects();
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
    let logged = common::logs::logged();
    assert!(logged.contains("cannot read a frame the broker sent"), "{logged}");
    assert!(logged.contains("not UTF-8"), "{logged}");
    // 0, 0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s between them: 8 in 6 s (hundreds before)
    assert!((1..=20).contains(&reconnects), "{reconnects} reconnects in 6 s");
}
