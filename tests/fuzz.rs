//! Fuzzing (proptest) of everything that decodes input from the network or from files, through
//! the public API, on the in-process broker: message bodies, payload extraction, translators,
//! context and retry headers, RPC requests and replies, queue arguments and expirations, and
//! configuration text. Each property asserts no panic and a value or a clear error.
//!
//! Case counts come from `PROPTEST_CASES` (default 256; the end-to-end properties run a
//! fraction of it). Longer runs: `PROPTEST_CASES=100000 cargo test --release --test fuzz`.
//! Crate-private decoders (RPC wire of both profiles, process frames, URIs, AMQP tables,
//! media types, origins, configuration values) are fuzzed by
//! `cargo test --lib fuzz`.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::config::mask_uri;
use micro_framework::prelude::*;
use micro_framework::retry::{BackOffData, Interval};
use micro_framework::testing::{call_route, TestService, WAIT_LIMIT};
use micro_framework::translators::{JsonTranslator, MessageTranslator};
use micro_framework::transport::memory::MemoryTransport;
use micro_framework::transport::{
    BindingSpec, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec,
    Transport, TransportError,
};
use micro_framework::{CallContext, FailureKind, Message};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde::Deserialize;
use serde_json::{json, Value};

mod common;

// ---------------------------------------------------------------------------------------------
// Shared strategies and helpers

/// Cases from `PROPTEST_CASES` (default 256) divided by `cost`; no regression files (found
/// cases are kept as plain tests below).
fn cases(cost: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    ProptestConfig { cases: (base.cases / cost).max(1), failure_persistence: None, ..base }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Runtime::new().expect("runtime"))
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "nameko.call_id_stack",
            "nameko.user_id",
            "x-death",
            "x-mf-retry-count",
            "x-mf-last-retry",
            "x-mf-last-error",
            "x-mf-redeliveries",
            "x-delivery-count",
            "queue",
            "count",
        ])
        .prop_map(str::to_owned),
        "[a-z.-]{0,12}",
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    let int =
        prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MIN), Just(u32::MAX.into()), -2i64..20];
    let leaf = prop_oneof![
        Just(HeaderValue::Void),
        any::<bool>().prop_map(HeaderValue::Bool),
        int.prop_map(HeaderValue::Int),
        any::<f64>().prop_map(HeaderValue::Float),
        (any::<u8>(), any::<i32>())
            .prop_map(|(scale, value)| HeaderValue::Decimal { scale, value }),
        ".{0,16}".prop_map(HeaderValue::String),
        vec(any::<u8>(), 0..16).prop_map(HeaderValue::Bytes),
        prop_oneof![any::<u64>(), Just(u64::MAX)].prop_map(HeaderValue::Timestamp),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(HeaderValue::Array),
            btree_map(key(), inner, 0..6).prop_map(HeaderValue::Table),
        ]
    })
}

fn headers() -> impl Strategy<Value = Headers> {
    btree_map(key(), header_value(), 0..6)
}

/// An `x-death` entry of a delay queue with an odd count.
fn x_death() -> impl Strategy<Value = HeaderValue> {
    let count = prop_oneof![any::<i64>(), Just(i64::MAX)].prop_map(HeaderValue::Int);
    vec((count, prop_oneof![Just("q.delay-10".to_owned()), ".{0,8}"]), 0..4).prop_map(|deaths| {
        HeaderValue::Array(
            deaths
                .into_iter()
                .map(|(count, queue)| {
                    HeaderValue::Table(Headers::from([
                        ("count".to_owned(), count),
                        ("queue".to_owned(), HeaderValue::String(queue)),
                    ]))
                })
                .collect(),
        )
    })
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map("id|args|kwargs|a|b|.{0,4}", inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Bodies: random bytes, JSON text of any value, or JSON-looking text.
fn body() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        json_value().prop_map(|value| Bytes::from(value.to_string())),
        "[\\[\\]{}\",:0-9a-z ]{0,24}".prop_map(Bytes::from),
    ]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        prop::sample::select(vec![
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/xml",
            "",
            ";",
        ])
        .prop_map(|text| Some(text.to_owned())),
        ".{0,12}".prop_map(Some),
    ]
}

fn message(body: Bytes, content_type: Option<String>, headers: Headers) -> Message {
    let mut message = Message { body, ..Message::default() };
    message.properties.content_type = content_type;
    message.properties.headers = headers;
    message
}

// ---------------------------------------------------------------------------------------------
// Bodies, payloads, translators

#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
}

fn order_id(Payload(order): Payload<Order>) -> u64 {
    order.id
}

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn bodies_decode_or_fail_cleanly(body in body(), content_type in content_type()) {
        let json_like = content_type.as_deref().is_none_or(|text| {
            matches!(text.split(';').next().unwrap_or_default().trim(), "application/json" | "")
        });
        let message = message(body.clone(), content_type, Headers::new());
        match message.decode() {
            Ok(value) if json_like && !body.is_empty() => {
                prop_assert_eq!(Some(value), serde_json::from_slice::<Value>(&body).ok());
            }
            Ok(_) => {}
            Err(reason) => prop_assert!(!reason.to_string().is_empty()),
        }
    }

    #[test]
    fn json_translator_decodes_or_fails_cleanly(payload in prop_oneof![
        json_value(),
        json_value().prop_map(|value| Value::String(value.to_string())),
        "[\\[\\]{}\",:0-9 ]{0,16}".prop_map(Value::String),
    ]) {
        let translated = JsonTranslator.translate(payload.clone(), &Message::default());
        match (&payload, translated) {
            (Value::String(text), Ok(value)) => {
                prop_assert_eq!(Some(value), serde_json::from_str::<Value>(text).ok());
            }
            (Value::String(_), Err(_)) => {}
            (_, translated) => prop_assert_eq!(translated.ok(), Some(payload)),
        }
    }
}

#[test]
fn payloads_that_do_not_fit_are_bad_input() {
    let config = Config::new("fuzz").with_amqp_uri("memory://fuzz-payload".into());
    let mut runner = TestRunner::new(cases(8));
    let strategy = (body(), content_type());
    let result = runner.run(&strategy, |(body, content_type)| {
        let message = message(body, content_type, Headers::new());
        let expected = message.decode().ok().and_then(|value| Order::deserialize(value).ok());
        let route = Route::new(order_id).translator(JsonTranslator);
        let outcome = runtime().block_on(call_route(route, config.clone(), message.clone()));
        match (outcome, expected) {
            (Ok(id), Some(order)) => prop_assert_eq!(id, json!(order.id)),
            (Ok(id), None) => {
                // the JSON translator decoded a JSON document sent inside a string
                prop_assert!(id.is_u64(), "{id}");
            }
            (Err(failure), _) => prop_assert_eq!(failure.kind, FailureKind::BadInput),
        }
        Ok(())
    });
    result.unwrap();
}

/// Random documents as Python's json writes them (through kombu, as Nameko publishes; and
/// indented), each holding a float that is no number, a lone surrogate or an integer beyond
/// a float: a seeded batch of 300, made by the peers' interpreter (a fraction of a second).
const PYTHON_BODIES: &str = r#"
import json, random, sys
from kombu.utils.json import dumps
rng = random.Random(int(sys.argv[1]))
def text():
    return ''.join(rng.choice('ab\u00e9\u65e5\U0001F600"\\\n') for _ in range(rng.randrange(4)))
def leaf():
    return rng.choice([None, True, rng.randrange(-10**6, 10**6), rng.random() * 1e6, text()])
def document(special, depth=0):
    if depth == 3 or rng.random() < 0.3:
        return special
    siblings = [leaf() for _ in range(rng.randrange(3))]
    at = rng.randrange(len(siblings) + 1)
    siblings.insert(at, document(special, depth + 1))
    if rng.random() < 0.5:
        return siblings
    return {text() + str(i): value for i, value in enumerate(siblings)}
for _ in range(300):
    kind = rng.choice(['nan', 'surrogate', 'huge'])
    if kind == 'nan':
        special = rng.choice([float('nan'), float('inf'), float('-inf')])
    elif kind == 'surrogate':
        special = text() + chr(rng.randrange(0xd800, 0xe000)) + text()
    else:
        special = rng.choice([1, -1]) * 10 ** rng.randrange(309, 400) + rng.randrange(10**6)
    value = document(special)
    body = dumps(value) if rng.random() < 0.5 else json.dumps(value, indent=rng.choice([None, 2]))
    assert json.loads(body) is not None or value is None
    print(json.dumps([kind, body]))
"#;

#[test]
fn what_pythons_json_writes_and_json_has_not_is_named() {
    let Some(python) = common::peer::interop_python(common::peer::NAMEKO) else { return };
    let seed = std::process::id().to_string();
    let output = std::process::Command::new(python)
        .args(["-c", PYTHON_BODIES, &seed])
        .output()
        .expect("the peers' Python runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = String::from_utf8(output.stdout).expect("ASCII lines");
    for line in lines.lines() {
        let (kind, body): (String, String) = serde_json::from_str(line).expect("a line");
        let message = Message { body: Bytes::from(body.clone()), ..Message::json(&()).unwrap() };
        let refused = message.decode().expect_err(&body).to_string();
        let named = match kind.as_str() {
            "nan" => "NaN and Infinity, which Python's json writes",
            "surrogate" => "lone UTF-16 surrogate",
            _ => "body holds a number beyond a 64-bit float's range",
        };
        assert!(refused.contains(named), "seed {seed}, {kind}: {body}\n{refused}");
    }
    assert_eq!(lines.lines().count(), 300);
}

// ---------------------------------------------------------------------------------------------
// Context and retry headers

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn call_id_stacks_of_any_shape_are_tolerated(
        headers in headers(),
        stack in header_value(),
        tracked in 0usize..16,
    ) {
        let mut headers = headers;
        headers.insert("nameko.call_id_stack".into(), stack);
        let call = CallContext::for_call(&headers, "svc", "m", tracked);
        prop_assert!(call.call_id.starts_with("svc.m."));
        prop_assert!(call.call_id_stack.len() <= tracked + 1);
        prop_assert_eq!(call.call_id_stack.last(), Some(&call.call_id));
        // what goes out comes back in as the same stack plus the next call
        let next = CallContext::for_call(&call.outgoing_headers(), "svc", "n", tracked);
        let mut expected = call.call_id_stack.clone();
        expected.push(next.call_id.clone());
        let keep = expected.len().saturating_sub(tracked + 1);
        prop_assert_eq!(&next.call_id_stack, &expected[keep..].to_vec());
    }

    #[test]
    fn retry_headers_of_any_shape_are_tolerated(
        headers in headers(),
        deaths in x_death(),
        count in header_value(),
        last_retry in header_value(),
        max_retries in any::<u32>(),
    ) {
        let mut headers = headers;
        headers.insert("x-death".into(), deaths);
        headers.insert("x-mf-retry-count".into(), count);
        headers.insert("x-mf-last-retry".into(), last_retry);
        let data = BackOffData::from_headers(&headers, max_retries);
        prop_assert_eq!(data.max_retries, max_retries);
        prop_assert_eq!(data.can_retry(), data.retry_count < max_retries);
    }

    #[test]
    fn intervals_never_overflow(
        start in any::<u64>(),
        step in any::<u64>(),
        factor in any::<f64>(),
        retry in any::<u32>(),
    ) {
        let (start, step) = (Duration::from_millis(start), Duration::from_millis(step));
        for interval in [
            Interval::Constant(start),
            Interval::linear(start, step),
            Interval::linear_capped(start, step, start),
            Interval::exponential(start, factor, step),
            Interval::Exponential { start, factor, max: step },
        ] {
            let _ = interval.delay(retry);
        }
        let capped = Interval::linear_capped(start, step, start.saturating_add(step));
        prop_assert!(capped.delay(retry) <= start.saturating_add(step));
    }
}

#[test]
fn a_huge_call_id_stack_is_trimmed() {
    let stack = (0..100_000).map(|i| HeaderValue::String(format!("caller.m.{i}"))).collect();
    let headers = Headers::from([("nameko.call_id_stack".into(), HeaderValue::Array(stack))]);
    let call = CallContext::for_call(&headers, "svc", "m", 10);
    assert_eq!(call.call_id_stack.len(), 11);
    assert_eq!(call.call_id_stack[0], "caller.m.99990");
}

fn fails(Payload(_): Payload<Value>) -> Result<(), String> {
    Err("always".into())
}

/// Regression: extreme retry and redelivery headers used to overflow (a panic in debug
/// builds, the message left unsettled): `x-mf-retry-count` = u32::MAX, `x-death` counts
/// summing past i64::MAX, `x-mf-last-retry` at the end of time, `x-delivery-count` = i64::MAX.
/// Now each failing message is dead-lettered and the service goes on.
#[test]
fn extreme_retry_headers_are_dead_lettered() {
    let death = HeaderValue::Table(Headers::from([
        ("count".to_owned(), HeaderValue::Int(i64::MAX)),
        ("queue".to_owned(), HeaderValue::from("q.delay-10")),
    ]));
    let cases = [
        ("x-mf-retry-count", HeaderValue::Int(u32::MAX.into())),
        ("x-death", HeaderValue::Array(vec![death.clone(), death])),
        ("x-mf-last-retry", HeaderValue::Timestamp(u64::MAX)),
        ("x-delivery-count", HeaderValue::Int(i64::MAX)),
        ("x-mf-redeliveries", HeaderValue::Int(i64::MAX)),
    ];
    runtime().block_on(async {
        let config = Config::new("fuzz_retry")
            .with_amqp_uri(format!("memory://fuzz-{}", uuid::Uuid::new_v4()));
        let route = Route::new(fails).entrypoint(EventListener::new("src", "ev"));
        let service = TestService::start(vec![route], config).await.unwrap();
        for (name, value) in &cases {
            let mut message = OutgoingMessage { body: Bytes::from("{}"), ..Default::default() };
            message.properties.headers.insert((*name).to_owned(), value.clone());
            let options = PublishOptions { mandatory: true };
            service.transport().publish("src.events", "ev", message, options).await.unwrap();
        }
        service.wait_for_route("fails", cases.len() as u64).await.unwrap();
        let dead = service.take_messages("evt-src-ev--fuzz_retry.fails.dlq").await.unwrap();
        assert_eq!(dead.len(), cases.len());
        service.stop().await.unwrap();
    });
}

#[test]
fn events_with_odd_headers_are_settled() {
    runtime().block_on(async {
        let config = Config::new("fuzz_events")
            .with_amqp_uri(format!("memory://fuzz-{}", uuid::Uuid::new_v4()));
        let routes = vec![
            Route::new(fails).entrypoint(EventListener::new("src", "bad")),
            Route::new(order_id).entrypoint(EventListener::new("src", "order")),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        let mut runner = TestRunner::new(cases(4));
        let strategy = vec((headers(), body(), content_type(), any::<bool>()), 1..8);
        let sent = [std::cell::Cell::new(0u64), std::cell::Cell::new(0u64)];
        // A message with `x-mf-redeliveries` (a counted copy of one that may have crashed the
        // service) waits 1 s before it runs, holding its prefetch slot: give each a second
        // more, the bound were they to wait one after the other.
        let paused = std::cell::Cell::new(0u64);
        let result = runner.run(&strategy, |messages| {
            for (headers, body, content_type, bad) in messages {
                let pauses = u64::from(headers.contains_key("x-mf-redeliveries"));
                let mut message = OutgoingMessage { body, ..Default::default() };
                message.properties.headers = headers;
                message.properties.content_type = content_type;
                let (event, index) = if bad { ("bad", 0) } else { ("order", 1) };
                let published = tokio::task::block_in_place(|| {
                    runtime().block_on(service.transport().publish(
                        "src.events",
                        event,
                        message,
                        PublishOptions::default(),
                    ))
                });
                if published.is_ok() {
                    sent[index].set(sent[index].get() + 1);
                    paused.set(paused.get() + pauses);
                }
            }
            Ok(())
        });
        result.unwrap();
        let limit = WAIT_LIMIT + Duration::from_secs(paused.get());
        service.wait_for_route_within("fails", sent[0].get(), limit).await.unwrap();
        service.wait_for_route_within("order_id", sent[1].get(), limit).await.unwrap();
        assert!(service.is_ready());
        service.stop().await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// RPC: requests to a service, replies to a client

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>) -> i64 {
    a.wrapping_add(b)
}

fn request_body() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        body(),
        (json_value(), json_value()).prop_map(|(args, kwargs)| {
            Bytes::from(json!({"args": args, "kwargs": kwargs}).to_string())
        }),
        (any::<i64>(), any::<i64>())
            .prop_map(|(a, b)| Bytes::from(json!({"args": [a], "kwargs": {"b": b}}).to_string())),
    ]
}

/// A service answers every request it can route, well formed or not, with a
/// `{"result", "error"}` reply, and keeps serving.
#[test]
fn rpc_requests_of_any_shape_get_a_reply() {
    runtime().block_on(async {
        let uri = format!("memory://fuzz-{}", uuid::Uuid::new_v4());
        let config = Config::new("fuzz_math").with_amqp_uri(uri.clone());
        let routes = vec![Route::new(add).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let transport = MemoryTransport::connect(&uri).unwrap();
        let replies = QueueSpec { exclusive: true, ..QueueSpec::durable("fuzz-replies") };
        transport.declare_queue(&replies).await.unwrap();
        let binding = BindingSpec {
            queue: replies.name.clone(),
            exchange: "nameko-rpc".into(),
            routing_key: "fuzz-reply".into(),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();
        let strategy = vec(
            (
                request_body(),
                content_type(),
                prop_oneof![Just("add".to_owned()), "[a-z_]{0,8}"],
                prop::option::of(".{0,20}"),
                any::<bool>(),
                headers(),
            ),
            1..6,
        );
        let mut runner = TestRunner::new(cases(8));
        let result = runner.run(&strategy, |requests| {
            let mut expected = 0;
            for (body, content_type, method, correlation_id, reply, headers) in requests {
                let mut message = OutgoingMessage { body, ..Default::default() };
                message.properties.content_type = content_type;
                message.properties.correlation_id = correlation_id;
                message.properties.reply_to = reply.then(|| "fuzz-reply".to_owned());
                message.properties.headers = headers;
                let key = format!("fuzz_math.{method}");
                let options = PublishOptions { mandatory: true };
                let sent = tokio::task::block_in_place(|| {
                    runtime().block_on(transport.publish("nameko-rpc", &key, message, options))
                });
                prop_assert!(sent.is_ok(), "{sent:?}");
                expected += usize::from(reply);
            }
            let received = tokio::task::block_in_place(|| {
                runtime().block_on(take_replies(&transport, &replies.name, expected))
            });
            prop_assert_eq!(received.len(), expected);
            for body in received {
                let reply: Value = serde_json::from_slice(&body).unwrap();
                prop_assert!(reply.get("result").is_some() && reply.get("error").is_some());
            }
            Ok(())
        });
        result.unwrap();
        let client = Client::connect(&Config::new("caller").with_amqp_uri(uri)).await;
        let client = client.unwrap();
        let sum: i64 = client.call("fuzz_math", "add", json!([1, 2]), json!({})).await.unwrap();
        assert_eq!(sum, 3);
        client.close().await;
        transport.close().await;
        service.stop().await.unwrap();
    });
}

/// Get `count` messages from `queue`, waiting up to 10 s for them.
async fn take_replies(transport: &MemoryTransport, queue: &str, count: usize) -> Vec<Bytes> {
    let mut bodies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bodies.len() < count && tokio::time::Instant::now() < deadline {
        match transport.get(queue).await.unwrap() {
            Some(delivery) => {
                bodies.push(delivery.body.clone());
                delivery.acker.ack().await.unwrap();
            }
            None => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
    // nothing more than expected
    tokio::time::sleep(Duration::from_millis(5)).await;
    while let Some(delivery) = transport.get(queue).await.unwrap() {
        bodies.push(delivery.body.clone());
        delivery.acker.ack().await.unwrap();
    }
    bodies
}

fn reply_body() -> impl Strategy<Value = Bytes> {
    let field = || prop_oneof![".{0,8}".prop_map(Value::from), json_value()];
    prop_oneof![
        body(),
        (json_value(), json_value()).prop_map(|(result, error)| {
            Bytes::from(json!({"result": result, "error": error}).to_string())
        }),
        (field(), field(), field(), field()).prop_map(|(exc_type, exc_path, exc_args, value)| {
            let error = json!({"exc_type": exc_type, "exc_path": exc_path, "exc_args": exc_args, "value": value});
            Bytes::from(json!({"result": null, "error": error}).to_string())
        }),
    ]
}

/// A client turns any reply into a result or an error value, never a panic or a hang.
#[test]
fn rpc_replies_of_any_shape_are_results_or_errors() {
    runtime().block_on(async {
        let uri = format!("memory://fuzz-{}", uuid::Uuid::new_v4());
        let server = MemoryTransport::connect(&uri).unwrap();
        server.declare_exchange(&ExchangeSpec::topic("nameko-rpc")).await.unwrap();
        server.declare_queue(&QueueSpec::durable("rpc-fake")).await.unwrap();
        let binding = BindingSpec {
            queue: "rpc-fake".into(),
            exchange: "nameko-rpc".into(),
            routing_key: "fake.*".into(),
            arguments: Headers::new(),
        };
        server.bind_queue(&binding).await.unwrap();
        let config =
            Config::new("caller").with_amqp_uri(uri).with_rpc_timeout(Duration::from_secs(5));
        let client = Client::connect(&config).await.unwrap();
        let mut runner = TestRunner::new(cases(4));
        let result = runner.run(&(reply_body(), content_type()), |(body, content_type)| {
            let outcome = tokio::task::block_in_place(|| {
                runtime().block_on(async {
                    let call = client.call::<Value>("fake", "m", json!([]), json!({}));
                    let answer = answer(&server, body, content_type);
                    tokio::join!(call, answer).0
                })
            });
            match outcome {
                Ok(_)
                | Err(RpcError::InvalidReply(_))
                | Err(RpcError::RemoteError { .. })
                | Err(RpcError::MethodNotFound(_))
                | Err(RpcError::IncorrectSignature(_))
                | Err(RpcError::MalformedRequest(_))
                | Err(RpcError::UnknownService(_)) => {}
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
            Ok(())
        });
        result.unwrap();
        client.close().await;
        server.close().await;
    });
}

/// Take the next request of `rpc-fake` and reply `body` to it.
async fn answer(server: &MemoryTransport, body: Bytes, content_type: Option<String>) {
    let request = loop {
        match server.get("rpc-fake").await.unwrap() {
            Some(request) => break request,
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    request.acker.ack().await.unwrap();
    let mut reply = OutgoingMessage { body, ..Default::default() };
    reply.properties.content_type = content_type;
    reply.properties.correlation_id = request.properties.correlation_id.clone();
    let reply_to = request.properties.reply_to.clone().unwrap_or_default();
    server.publish("nameko-rpc", &reply_to, reply, PublishOptions::default()).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The in-process broker: queue arguments and per-message expirations

fn argument() -> impl Strategy<Value = (String, HeaderValue)> {
    let name = prop::sample::select(vec![
        "x-message-ttl",
        "x-expires",
        "x-max-length",
        "x-max-length-bytes",
        "x-overflow",
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-queue-type",
        "x-delivery-limit",
        "x-single-active-consumer",
        "x-max-priority",
    ]);
    let value = prop_oneof![
        header_value(),
        prop_oneof![Just(315_360_000_000i64), Just(315_360_000_001), Just(i64::MAX), 0i64..100]
            .prop_map(HeaderValue::Int),
        prop::sample::select(vec!["drop-head", "reject-publish-dlx", "quorum", "classic", ""])
            .prop_map(HeaderValue::from),
    ];
    (name.prop_map(str::to_owned), value)
}

fn expiration() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        prop::sample::select(vec![
            "0",
            "315360000000",
            "315360000001",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "+5",
            "",
            " 5",
        ])
        .prop_map(|text| Some(text.to_owned())),
        any::<u64>().prop_map(|ms| Some(ms.to_string())),
        ".{0,6}".prop_map(Some),
    ]
}

#[test]
fn queue_arguments_and_expirations_are_checked() {
    let transport = MemoryTransport::connect("memory://fuzz-arguments").unwrap();
    let mut runner = TestRunner::new(cases(1));
    let strategy = (btree_map("[a-z-]{0,4}", Just(()), 0..1), vec(argument(), 0..5), expiration());
    let result = runner.run(&strategy, |(_, arguments, expiration)| {
        runtime().block_on(async {
            let name = format!("q-{}", uuid::Uuid::new_v4());
            let spec = QueueSpec {
                arguments: arguments.into_iter().collect(),
                ..QueueSpec::durable(&name)
            };
            let declared = transport.declare_queue(&spec).await;
            if let Err(error) = &declared {
                prop_assert!(!error.to_string().is_empty());
            }
            let mut message = OutgoingMessage::default();
            message.properties.expiration = expiration.clone();
            let published = transport.publish("", &name, message, PublishOptions::default()).await;
            let valid = expiration.as_deref().is_none_or(|text| {
                let digits = text.strip_prefix('+').unwrap_or(text);
                !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && digits.parse::<u64>().is_ok_and(|ms| ms <= 315_360_000_000)
            });
            match published {
                Err(TransportError::PreconditionFailed(text)) => {
                    prop_assert!(!valid && text.starts_with("invalid expiration"), "{text}")
                }
                other => prop_assert!(
                    valid
                        && (other.is_ok()
                            || declared.is_err()
                            || other == Err(TransportError::Nacked)),
                    "{other:?}"
                ),
            }
            if declared.is_ok() {
                let _ = transport.get(&name).await;
                transport.delete_queue(&name).await.unwrap();
            }
            Ok(())
        })
    });
    result.unwrap();
}

/// Regression: a TTL past what `Instant` can hold panicked the in-process broker; RabbitMQ
/// refuses anything over ten years, and now so does it, with RabbitMQ's words.
#[test]
fn out_of_range_ttls_are_refused_like_rabbitmq() {
    runtime().block_on(async {
        let transport = MemoryTransport::connect("memory://fuzz-ttl").unwrap();
        for argument in ["x-message-ttl", "x-expires"] {
            let spec = QueueSpec {
                arguments: Headers::from([(argument.into(), HeaderValue::Int(i64::MAX))]),
                ..QueueSpec::durable("ttl")
            };
            let error = transport.declare_queue(&spec).await.unwrap_err().to_string();
            assert!(error.contains(&format!("{{value_too_large,{}}}", i64::MAX)), "{error}");
        }
        transport.declare_queue(&QueueSpec::durable("ttl")).await.unwrap();
        for expiration in ["315360000001", "18446744073709551615"] {
            let mut message = OutgoingMessage::default();
            message.properties.expiration = Some(expiration.into());
            let error = transport.publish("", "ttl", message, PublishOptions::default()).await;
            let expected =
                format!("invalid expiration '{expiration}': {{value_too_large,{expiration}}}");
            assert_eq!(error, Err(TransportError::PreconditionFailed(expected)));
        }
        transport.delete_queue("ttl").await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// Configuration text, environment values, masking

const SECRET: &str = "Secret-77";

fn yaml_text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        prop::sample::select(vec![
            "SERVICE_NAME: ",
            "svc",
            "\n",
            "AMQP_URI: ",
            "amqp://u:Secret-77@h/",
            "${",
            "}",
            ":",
            "${HOME}",
            "${NOPE:",
            "${NOPE}",
            "MAX_WORKERS: ",
            "-1",
            "99999999999999999999",
            "1e400",
            "METRICS:\n  PORT: ",
            "[",
            "]",
            "{",
            "&a ",
            "*a",
            "!!binary ",
            "'",
            "\"",
            "#",
            "- ",
            "  ",
            "RPC_TIMEOUT: ",
            ".nan",
            ".inf",
            "0x10",
            "~",
            "null",
            "WORKER_MODE: ",
            "process",
            "PREFETCH_COUNT: ",
            "0",
            "TASK_TIME_LIMIT: ",
            "1.5",
            "DB_PASSWORD: ",
            "EXTRA_URL: ",
            "<<: *a",
            "---\n",
            "? ",
            "|\n",
            "\t",
        ])
        .prop_map(str::to_owned),
        ".{0,6}",
    ];
    vec(fragment, 0..24).prop_map(|parts| parts.concat())
}

fn toml_text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        prop::sample::select(vec![
            "SERVICE_NAME = ",
            "\"svc\"",
            "\n",
            "AMQP_URI = ",
            "\"amqp://u:Secret-77@h/\"",
            "${",
            "}",
            "${NOPE:5}",
            "MAX_WORKERS = ",
            "-1",
            "99999999999999999999",
            "inf",
            "nan",
            "[METRICS]\n",
            "PORT = ",
            "RPC_TIMEOUT = ",
            "1979-05-27T07:32:00Z",
            "[",
            "]",
            "{",
            "=",
            "'''",
            "\"\"\"",
            "#",
            "é",
            "[[A]]\n",
            "x.y = 1\n",
            "0x10",
            "true",
            "1_000",
        ])
        .prop_map(str::to_owned),
        ".{0,6}",
    ];
    vec(fragment, 0..24).prop_map(|parts| parts.concat())
}

fn env(name: &str) -> Option<String> {
    (name == "HOME").then(|| "/root".to_owned())
}

fn check_config(
    result: Result<Config, micro_framework::config::ConfigError>,
) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => {
            prop_assert!(config.validate().is_ok());
            let shown =
                format!("{config:?} {}", serde_json::to_string(&config.to_masked_map()).unwrap());
            prop_assert!(!shown.contains(SECRET), "{}", shown);
        }
        Err(error) => prop_assert!(!error.to_string().contains(SECRET), "{error}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn yaml_text_gives_a_config_or_an_error(text in prop_oneof![yaml_text(), ".{0,64}"]) {
        check_config(Config::from_yaml_str(&text, &env))?;
    }

    #[test]
    fn toml_text_gives_a_config_or_an_error(text in prop_oneof![toml_text(), ".{0,64}"]) {
        check_config(Config::from_toml_str(&text, &env))?;
    }

    #[test]
    fn env_values_give_a_config_or_an_error(
        values in vec((
            prop::sample::select(vec![
                "AMQP_URI", "AMQP_HEARTBEAT", "MAX_WORKERS", "WORKER_MODE", "MAX_TASKS_PER_CHILD",
                "ENABLE_METRICS", "METRICS_PORT", "PREFETCH_COUNT", "RPC_TIMEOUT",
                "SHUTDOWN_TIMEOUT", "TASK_TIME_LIMIT", "MAX_REDELIVERIES", "PROTOCOL", "QUEUE_TYPE",
                "HTTP_HEADER_READ_TIMEOUT", "HTTP_KEEP_ALIVE_TIMEOUT", "HTTP_MAX_CONNECTIONS",
                "WEBSOCKET_IDLE_TIMEOUT", "WEBSOCKET_ALLOWED_ORIGINS", "HTTP_REQUIRE_JSON_CONTENT_TYPE",
                "WEBSOCKET_MAX_CONNECTIONS",
            ]),
            prop_oneof![
                ".{0,10}",
                "-?[0-9]{0,24}(\\.[0-9]{0,3})?",
                "amqps?://u:Secret-77@[a-z:/ %@]{0,10}",
                Just("1e400".to_owned()),
                Just("NaN".to_owned()),
            ],
        ), 0..5),
    ) {
        let mut vars = vec![("SERVICE_NAME".to_owned(), "svc".to_owned())];
        vars.extend(values.into_iter().map(|(key, value)| (key.to_owned(), value)));
        check_config(Config::from_vars(vars))?;
    }

    #[test]
    fn passwords_never_survive_masking(
        user in "[a-z]{0,6}",
        password in "[A-Za-z0-9~!$&'()*+,;=%:@/-]{1,12}",
        host in "[a-z0-9.:\\[\\]]{0,12}",
        rest in "[a-z0-9/?=&]{0,10}",
    ) {
        let uri = format!("amqp://{user}:{SECRET}{password}@{host}/{rest}");
        let masked = mask_uri(&uri);
        prop_assert!(!masked.contains(SECRET), "{masked}");
        let config = Config::new("svc").with_amqp_uri(uri);
        let shown = format!("{config:?}");
        prop_assert!(!shown.contains(SECRET), "{}", shown);
        if let Err(error) = Config::from_vars([("SERVICE_NAME".into(), "svc".into()), ("AMQP_URI".into(), config.amqp_uri)]) {
            prop_assert!(!error.to_string().contains(SECRET), "{error}");
        }
    }
}
