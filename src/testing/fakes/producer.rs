//! [`FakeProducer`]: a [`Producer`] that records the events it dispatches.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::amqp::dependencies::{EventSink, OutgoingEvent, Producer};
use crate::config::Config;
use crate::data::{BoxError, Headers};
use crate::error::Result;
use crate::handler::dependencies::Dependency;
use crate::handler::WorkerContext;
use crate::testing::fakes::refuse_in_worker_process;
use crate::transport::limits::{check_headers, RABBITMQ_FRAME_MAX};

/// An event a [`FakeProducer`] recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchedEvent {
    /// The service that dispatched it (its exchange is `{source_service}.events`).
    pub source_service: String,
    /// The event's name.
    pub event_type: String,
    /// The payload, as the JSON the real producer would send.
    pub payload: Value,
    /// The headers the real producer would send: the call's context headers
    /// (`nameko.call_id_stack`, ...).
    pub headers: Headers,
}

/// Replaces the [`Producer`] of the routes it is added to: their events are recorded instead
/// of sent. Payloads are serialized and checked against `MAX_MESSAGE_SIZE`, and headers
/// against RabbitMQ's default frame size and for float values that are no number, as the real
/// producer does, so an event that cannot be sent fails here too (and is not recorded).
/// Clones share their records.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::dependencies::Producer;
/// use micro_framework::testing::{call_route, test_config, FakeProducer};
/// use micro_framework::Message;
/// use serde_json::json;
///
/// async fn pay(Payload(order): Payload<u64>, producer: Producer) -> micro_framework::Result<()> {
///     producer.dispatch("order_paid", &json!({"order": order})).await
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let events = FakeProducer::new();
/// let route = Route::new(pay).dependency(events.clone());
/// call_route(route, test_config("shop"), Message::json(&7).unwrap()).await.unwrap();
/// events.assert_dispatched("order_paid", &json!({"order": 7}));
/// assert_eq!(events.dispatched()[0].source_service, "shop");
/// # });
/// ```
#[derive(Clone, Debug, Default)]
pub struct FakeProducer {
    events: Arc<Mutex<Vec<DispatchedEvent>>>,
}

impl FakeProducer {
    /// A fake with nothing recorded.
    pub fn new() -> Self {
        FakeProducer::default()
    }

    /// A producer outside any call that records here: it dispatches as
    /// `config.service_name`, without context headers (as [`Producer::new`]).
    pub fn producer(&self, config: &Config) -> Producer {
        self.producer_of(config, &config.service_name, Headers::new())
    }

    fn producer_of(&self, config: &Config, service: &str, headers: Headers) -> Producer {
        let sink = RecordingSink { source: service.to_owned(), events: self.events.clone() };
        Producer::with_sink(Arc::new(sink), config, service, headers)
    }

    fn events(&self) -> MutexGuard<'_, Vec<DispatchedEvent>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every event dispatched so far, in order.
    pub fn dispatched(&self) -> Vec<DispatchedEvent> {
        self.events().clone()
    }

    /// The events named `event_type` dispatched so far, in order.
    pub fn dispatched_of(&self, event_type: &str) -> Vec<DispatchedEvent> {
        self.events().iter().filter(|event| event.event_type == event_type).cloned().collect()
    }

    /// Panic unless an event named `event_type` with exactly this payload (compared as
    /// JSON) was dispatched; the message lists what was.
    pub fn assert_dispatched<T: Serialize + ?Sized>(&self, event_type: &str, payload: &T) {
        let expected = match serde_json::to_value(payload) {
            Ok(expected) => expected,
            Err(error) => {
                panic!("the expected payload of {event_type} cannot be serialized: {error}")
            }
        };
        let events = self.events();
        if events.iter().any(|event| event.event_type == event_type && event.payload == expected) {
            return;
        }
        let mut seen = String::new();
        for event in events.iter() {
            let _ = write!(
                seen,
                "\n  {} from {}: {}",
                event.event_type, event.source_service, event.payload
            );
        }
        if seen.is_empty() {
            seen.push_str(" nothing");
        }
        panic!("no event {event_type} with payload {expected} was dispatched; dispatched:{seen}");
    }

    /// Forget every recorded event.
    pub fn clear(&self) {
        self.events().clear();
    }
}

#[async_trait]
impl Dependency for FakeProducer {
    type Output = Producer;

    /// A producer of the call's service, with the call's context headers, recording here.
    async fn get(&self, call: &WorkerContext) -> std::result::Result<Producer, BoxError> {
        refuse_in_worker_process("FakeProducer")?;
        Ok(self.producer_of(call.config(), call.service_name(), call.call().outgoing_headers()))
    }
}

/// Records each event in place of sending it.
#[derive(Debug)]
struct RecordingSink {
    source: String,
    events: Arc<Mutex<Vec<DispatchedEvent>>>,
}

#[async_trait]
impl EventSink for RecordingSink {
    async fn send(&self, event: OutgoingEvent<'_>) -> Result<()> {
        check_headers(&event.message.properties, RABBITMQ_FRAME_MAX)?;
        let payload = serde_json::from_slice(&event.message.body)?;
        let recorded = DispatchedEvent {
            source_service: self.source.clone(),
            event_type: event.event_type.to_owned(),
            payload,
            headers: event.message.properties.headers,
        };
        self.events.lock().unwrap_or_else(PoisonError::into_inner).push(recorded);
        Ok(())
    }
}
