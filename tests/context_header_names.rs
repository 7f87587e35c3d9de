//! A context header whose name a peer may legally send (up to the 255 bytes of an AMQP short
//! string) but that would go out as `nameko.{name}` over 255 bytes is not forwarded: the
//! events and RPC requests of the call go out without it, instead of every one of them being
//! refused by the broker. On both brokers (`memory://` refuses such a name as RabbitMQ does).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::{broker_uris, config, logs, unique, Probe};
use micro_framework::amqp::dependencies::{Producer, RpcProxy};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec,
};
use micro_framework::Message;
use serde_json::{json, Value};

/// A legal header name (250 bytes) that would be 257 bytes as `nameko.{name}`.
fn unforwardable() -> String {
    "u".repeat(250)
}

/// Dispatches `forwarded` and calls `inspect` on this very service, with this call's
/// context headers.
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

/// Records the names of the headers of the RPC request.
fn inspect(MessageHeaders(headers): MessageHeaders, Dep(probe): Dep<Arc<Probe>>) -> bool {
    let names: BTreeSet<String> = headers.into_keys().collect();
    probe.enter(json!(names));
    probe.leave();
    true
}

fn names(headers: &Headers) -> BTreeSet<&str> {
    headers.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn a_call_sends_its_messages_without_a_context_key_too_long_to_forward() {
    logs::capture(tracing::Level::WARN);
    let source = unique("ctx_long_src");
    for uri in broker_uris() {
        let probe = Probe::new();
        let config = config(&uri, "ctx_long");
        let service_name = config.service_name.clone();
        let routes = vec![
            Route::new(forward).entrypoint(EventListener::new(source.clone(), "go")),
            Route::new(inspect).entrypoint(RPCListener::new()).dependency(Shared(probe.clone())),
        ];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let transport = service.transport().clone();
        let events_exchange = format!("{service_name}.events");
        let captured = format!("{service_name}-captured");
        transport.declare_exchange(&ExchangeSpec::topic(events_exchange.clone())).await.unwrap();
        transport.declare_queue(&QueueSpec::durable(captured.clone())).await.unwrap();
        let binding = BindingSpec {
            queue: captured.clone(),
            exchange: events_exchange,
            routing_key: "forwarded".into(),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();

        let mut properties = micro_framework::data::json_properties();
        properties.headers = Headers::from([
            ("tenant".into(), HeaderValue::from("acme")),
            (unforwardable(), HeaderValue::from("legal on the wire")),
        ]);
        let message = OutgoingMessage { body: Bytes::from_static(b"{\"go\": 1}"), properties };
        let source_exchange = format!("{source}.events");
        transport
            .publish(&source_exchange, "go", message, PublishOptions::default())
            .await
            .unwrap();

        let waited = service.wait_for_route("forward", 1).await;
        let events: Vec<Message> = service.take_messages(&captured).await.unwrap();
        let failed = service.route("forward").unwrap().stats().failed_count();
        transport.delete_queue(&captured).await.unwrap();
        service.stop().await.unwrap();
        common::cleanup(&uri, &[service_name.clone(), source.clone()]).await;
        waited.unwrap();
        assert_eq!(failed, 0, "forward failed on {uri}");

        let expected = BTreeSet::from(["nameko.call_id_stack", "nameko.tenant"]);
        assert_eq!(events.len(), 1, "{uri}");
        assert_eq!(names(&events[0].properties.headers), expected, "event on {uri}");
        let seen = probe.seen.lock().unwrap().clone();
        assert_eq!(seen, [json!(expected)], "RPC request on {uri}");
    }
    // named by its start and length, once for the call
    let logged = logs::logged();
    let named = format!("{}... (250 bytes)", "u".repeat(32));
    assert!(logged.contains(&named), "{logged}");
}
