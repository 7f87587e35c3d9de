//! Context headers as Nameko forwards them: every header of an incoming message is context
//! (its `nameko.` prefix stripped), sent again as `nameko.{key}` on the events and RPC
//! requests its call makes; broker and framework headers (`x-*`) are not. On both brokers,
//! and to a real Nameko 2.14.1 listener on RabbitMQ.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::peer::{prerequisites, Peer, NAMEKO};
use common::{broker_uris, config, unique, Probe};
use micro_framework::amqp::dependencies::{Producer, RpcProxy};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Client;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec,
    SharedTransport,
};
use micro_framework::Message;
use serde_json::{json, Value};

/// The headers of the incoming event: application context with and without the prefix, a
/// call-id stack, and headers a broker or a framework set, which must stop here.
fn incoming_headers() -> Headers {
    Headers::from([
        ("tenant".into(), HeaderValue::from("acme")),
        ("nameko.language".into(), HeaderValue::from("fr")),
        ("nameko.call_id_stack".into(), HeaderValue::Array(vec!["origin.start.1".into()])),
        ("x-delay".into(), HeaderValue::Int(5000)),
        ("x-custom-trace".into(), HeaderValue::from("t-1")),
        ("x-mf-last-error".into(), HeaderValue::from("an earlier failure")),
    ])
}

/// The context data expected downstream.
fn expected_data() -> Headers {
    Headers::from([
        ("language".into(), HeaderValue::from("fr")),
        ("tenant".into(), HeaderValue::from("acme")),
    ])
}

fn names(headers: &Headers) -> BTreeSet<&str> {
    headers.keys().map(String::as_str).collect()
}

/// Dispatches `forwarded` and calls `inspect` on this very service: both messages carry
/// this call's context headers.
async fn forward(producer: Producer, rpc: RpcProxy, config: Arc<Config>) -> Result<(), String> {
    let event = json!({ "forwarded": true });
    producer.dispatch("forwarded", &event).await.map_err(|error| error.to_string())?;
    let service = rpc.service(config.service_name.clone());
    let answer: bool = service
        .call("inspect", Vec::<Value>::new(), json!({}))
        .await
        .map_err(|error| format!("inspect failed: {error}"))?;
    answer.then_some(()).ok_or_else(|| "inspect answered false".into())
}

/// Records the headers of the RPC request and the context read from them.
fn inspect(
    MessageHeaders(headers): MessageHeaders,
    call: CallContext,
    Dep(probe): Dep<Arc<Probe>>,
) -> bool {
    let stack = call.call_id_stack.clone();
    let record = (headers, call.data, stack);
    probe.enter(serde_json::to_value(record).unwrap());
    probe.leave();
    true
}

async fn publish_event(transport: &SharedTransport, source: &str) {
    let mut properties = micro_framework::data::json_properties();
    properties.headers = incoming_headers();
    let message = OutgoingMessage { body: Bytes::from_static(b"{\"go\": 1}"), properties };
    let exchange = format!("{source}.events");
    transport.publish(&exchange, "go", message, PublishOptions::default()).await.unwrap();
}

#[tokio::test]
async fn events_and_rpc_requests_carry_the_context_of_every_application_header() {
    let source = unique("ctx_src");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "ctx_fwd");
        let service_name = config.service_name.clone();
        let routes = vec![
            Route::new(forward).entrypoint(EventListener::new(source.clone(), "go")),
            Route::new(inspect).entrypoint(RPCListener::new()).dependency(Shared(probe.clone())),
        ];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        // a queue of ours on the service's event exchange, to read what `forward` dispatches
        let captured = format!("{service_name}-captured");
        let transport = service.transport().clone();
        transport
            .declare_exchange(&ExchangeSpec::topic(format!("{service_name}.events")))
            .await
            .unwrap();
        transport.declare_queue(&QueueSpec::durable(captured.clone())).await.unwrap();
        let binding = BindingSpec {
            queue: captured.clone(),
            exchange: format!("{service_name}.events"),
            routing_key: "forwarded".into(),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();

        publish_event(&transport, &source).await;
        let waited = service.wait_for_route("forward", 1).await;
        let events: Vec<Message> = service.take_messages(&captured).await.unwrap();
        let failed = service.route("forward").unwrap().stats().failed_count();
        transport.delete_queue(&captured).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &[service_name.clone(), source.clone()]).await;
        waited.unwrap();
        assert_eq!(failed, 0, "forward failed");

        // the event: the context, prefixed, and nothing of the broker's or the framework's
        assert_eq!(events.len(), 1);
        let event = &events[0].properties.headers;
        assert_eq!(
            names(event),
            BTreeSet::from(["nameko.call_id_stack", "nameko.language", "nameko.tenant"]),
            "{event:?}"
        );
        assert_eq!(event["nameko.tenant"], HeaderValue::from("acme"));
        assert_eq!(event["nameko.language"], HeaderValue::from("fr"));
        let HeaderValue::Array(stack) = &event["nameko.call_id_stack"] else { panic!("{event:?}") };
        assert_eq!(stack.len(), 2);
        assert_eq!(stack[0], HeaderValue::from("origin.start.1"));

        // the RPC request: the same context, read back as context by `inspect`
        let seen = probe.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let (request, data, stack): (Headers, Headers, Vec<String>) =
            serde_json::from_value(seen[0].clone()).unwrap();
        assert_eq!(
            names(&request),
            BTreeSet::from(["nameko.call_id_stack", "nameko.language", "nameko.tenant"]),
            "{request:?}"
        );
        assert_eq!(request["nameko.tenant"], HeaderValue::from("acme"));
        assert_eq!(data, expected_data());
        assert_eq!(stack.len(), 3, "origin, forward, inspect: {stack:?}");
        assert_eq!(stack[0], "origin.start.1");
        assert!(stack[1].starts_with(&format!("{service_name}.forward.")), "{stack:?}");
    }
}

/// Dispatches `forwarded` with this call's context headers.
async fn relay(producer: Producer) -> micro_framework::Result<()> {
    producer.dispatch("forwarded", &json!({ "relayed": true })).await
}

#[tokio::test]
async fn a_nameko_listener_reads_the_forwarded_headers_as_its_context_data() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("ctx_src");
    let listener = unique("nk_ctx");
    let config = config(&uri, "ctx_relay");
    let service_name = config.service_name.clone();
    let mut peer = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[
            "listen",
            "--service",
            &listener,
            "--source",
            &service_name,
            "--event",
            "forwarded",
            "--count",
            "1",
        ],
    );
    peer.expect("ready").await;
    let routes = vec![Route::new(relay).entrypoint(EventListener::new(source.clone(), "go"))];
    let service = TestService::start(routes, config).await.unwrap();
    publish_event(service.transport(), &source).await;
    let lines = peer.finish().await;
    let waited = service.wait_for_route("relay", 1).await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &[service_name.clone(), source, listener.clone()]).await;
    waited.unwrap();

    let event = lines.iter().find(|line| line.get("payload").is_some()).unwrap();
    assert_eq!(event["payload"], json!({ "relayed": true }));
    // Nameko strips the prefix: exactly the application context, no x-* header
    assert_eq!(event["context_data"], json!({ "tenant": "acme", "language": "fr" }), "{event}");
    let parents = event["parent_call_id_stack"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{event}");
    assert_eq!(parents[0], "origin.start.1");
}

#[tokio::test]
async fn a_standalone_client_sends_a_call_id_stack_of_its_own_as_nameko_s_proxy_does() {
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "ctx_client");
        let service_name = config.service_name.clone();
        let routes = vec![Route::new(inspect)
            .entrypoint(RPCListener::new())
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let client = Client::connect(&config).await.unwrap();
        let first = client.call::<bool>(&service_name, "inspect", (), ()).await;
        let second = client.call::<bool>(&service_name, "inspect", (), ()).await;
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, std::slice::from_ref(&service_name)).await;
        assert_eq!((first, second), (Ok(true), Ok(true)));

        let seen = probe.seen.lock().unwrap().clone();
        let calls: Vec<(Headers, Headers, Vec<String>)> =
            seen.into_iter().map(|call| serde_json::from_value(call).unwrap()).collect();
        assert_eq!(calls.len(), 2);
        for (request, data, stack) in &calls {
            assert_eq!(names(request), BTreeSet::from(["nameko.call_id_stack"]), "{request:?}");
            assert!(data.is_empty(), "{data:?}");
            assert_eq!(stack.len(), 2, "the client, then inspect: {stack:?}");
            assert!(stack[0].starts_with("standalone_rpc_proxy.call."), "{stack:?}");
            assert!(stack[1].starts_with(&format!("{service_name}.inspect.")), "{stack:?}");
        }
        // one id for the client, as a Nameko proxy has one for its lifetime
        assert_eq!(calls[0].2[0], calls[1].2[0]);
    }
}

fn call_id_stack(call: micro_framework::CallContext) -> Vec<String> {
    call.call_id_stack
}

/// A route's call keeps `PARENT_CALLS_TRACKED` parents of the stack it received, the last
/// ones, and its own id.
#[tokio::test]
async fn a_routes_call_keeps_parent_calls_tracked_parents() {
    use micro_framework::transport::HeaderValue;
    let parents: Vec<HeaderValue> =
        (0..6).map(|i| HeaderValue::from(format!("up.m.{i}"))).collect();
    let mut message = Message::json(&serde_json::json!({})).unwrap();
    message.properties.headers.insert("nameko.call_id_stack".into(), HeaderValue::Array(parents));
    let config = micro_framework::testing::test_config("tracked").with_parent_calls_tracked(2);
    let stack: Vec<String> = micro_framework::testing::worker(Route::new(call_id_stack))
        .config(config)
        .message(message)
        .await
        .unwrap();
    assert_eq!(stack[..2], ["up.m.4", "up.m.5"]);
    assert_eq!(stack.len(), 3, "{stack:?}");
}
