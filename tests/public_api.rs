//! What a user can build on the public API alone: an event producer equivalent to the
//! framework's `Producer` (same exchange, context headers, declared-exchange cache, size
//! limit), written outside the crate.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::naming::event_exchange;
use micro_framework::data::json_properties;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{ExchangeSpec, OutgoingMessage, PublishOptions, SharedTransport};
use micro_framework::{BoxError, ExtractError, FromContext, Headers, WorkerContext};
use serde_json::{json, Value};

/// Exchanges this service instance declared already, kept in its `ServiceState`.
#[derive(Default)]
struct Declared(Mutex<HashSet<String>>);

/// A hand-written producer: what `Producer` does, with nothing but the public API.
struct MyProducer {
    transport: SharedTransport,
    exchange: ExchangeSpec,
    headers: Headers,
    declared: Arc<Declared>,
    max_message_size: usize,
}

impl FromContext for MyProducer {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(MyProducer {
            transport: ctx.transport().clone(),
            exchange: event_exchange(ctx.config(), ctx.service_name()),
            headers: ctx.call().outgoing_headers(),
            declared: ctx.service_state().get_or_default(),
            max_message_size: ctx.config().max_message_size,
        })
    }
}

impl MyProducer {
    async fn dispatch(&self, event: &str, payload: &Value) -> Result<(), BoxError> {
        let body = serde_json::to_vec(payload)?;
        if body.len() > self.max_message_size {
            return Err(format!("event {event} of {} bytes is too large", body.len()).into());
        }
        let first_use = self.declared.0.lock().unwrap().insert(self.exchange.name.clone());
        if first_use {
            self.transport.declare_exchange(&self.exchange).await?;
        }
        let mut properties = json_properties();
        properties.headers = self.headers.clone();
        let message = OutgoingMessage { body: body.into(), properties };
        self.transport
            .publish(&self.exchange.name, event, message, PublishOptions::default())
            .await?;
        Ok(())
    }
}

async fn relay(Payload(order): Payload<Value>, producer: MyProducer) -> Result<(), BoxError> {
    producer.dispatch("relayed", &order).await
}

/// Records the call-id stack each relayed event arrived with.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Value, usize)>>>);

fn record(Payload(order): Payload<Value>, call: CallContext, Dep(seen): Dep<Seen>) {
    seen.0.lock().unwrap().push((order, call.call_id_stack.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_written_on_the_public_api_works_like_producer() {
    for uri in common::broker_uris() {
        let config = common::config(&uri, "relay");
        let service_name = config.service_name.clone();
        let shop = common::unique("shop");
        let seen = Seen::default();
        let routes = vec![
            Route::new(relay).entrypoint(EventListener::new(&shop, "paid")),
            Route::new(record)
                .entrypoint(EventListener::new(&service_name, "relayed"))
                .dependency(micro_framework::dependencies::Shared(seen.clone())),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        for id in 0..3 {
            service.dispatch(&shop, "paid", &json!({ "id": id })).await.unwrap();
        }
        service.wait_for_route("record", 3).await.unwrap();
        let mut got = seen.0.lock().unwrap().clone();
        got.sort_by_key(|(order, _)| order["id"].as_i64());
        let expected: Vec<(Value, usize)> = (0..3).map(|id| (json!({ "id": id }), 2)).collect();
        assert_eq!(got, expected, "each relayed event continues the relaying call's stack");
        service.stop().await.unwrap();
        common::cleanup(&uri, &[service_name, shop]).await;
    }
}
