//! [`Producer`]: dispatch events to `{SERVICE_NAME}.events`, as Nameko's `EventDispatcher`.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::amqp::naming::event_exchange;
use crate::config::{Config, Protocol};
use crate::data::json_properties;
use crate::error::{Error, Result};
use crate::handler::extract::{ExtractError, FromContext};
use crate::handler::WorkerContext;
use crate::transport::limits::check_size;
use crate::transport::{
    ExchangeSpec, Headers, OutgoingMessage, PublishOptions, SharedTransport, TransportError,
};

/// One event on its way out: serialized, checked for size, with its headers.
#[derive(Debug)]
pub(crate) struct OutgoingEvent<'a> {
    /// The exchange of the dispatching service, `{service}.events`.
    pub exchange: &'a ExchangeSpec,
    /// The event's name, its routing key.
    pub event_type: &'a str,
    /// The message: JSON body and properties (context headers included).
    pub message: OutgoingMessage,
}

/// Where a [`Producer`]'s events go: the broker, or a fake that records them.
#[async_trait]
pub(crate) trait EventSink: Send + Sync + fmt::Debug {
    async fn send(&self, event: OutgoingEvent<'_>) -> Result<()>;
}

/// Exchanges a service instance already declared (kombu's `maybe_declare`).
#[derive(Debug, Default)]
struct DeclaredExchanges(Mutex<HashSet<String>>);

impl DeclaredExchanges {
    fn contains(&self, name: &str) -> bool {
        self.0.lock().map(|set| set.contains(name)).unwrap_or(false)
    }

    fn insert(&self, name: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.insert(name.to_owned());
        }
    }

    fn forget(&self, name: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(name);
        }
    }
}

/// When a [`BrokerSink`] declares its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declaring {
    /// Before its first event, as Nameko's dispatcher does (an exchange made with other
    /// flags then fails the dispatch, as it fails Nameko's), and again if it went.
    First,
    /// Only when it is missing, as micro-framework's producer, which never declares, meets an
    /// exchange that any peer may have made (a Nameko service's, with other flags).
    WhenMissing,
    /// Never (`DECLARE_EVENT_EXCHANGES=false`): a missing exchange fails the dispatch.
    Never,
}

impl Declaring {
    fn of(config: &Config) -> Declaring {
        match (config.declare_event_exchanges, config.protocol) {
            (false, _) => Declaring::Never,
            (true, Protocol::Nameko) => Declaring::First,
            (true, Protocol::MicroFramework) => Declaring::WhenMissing,
        }
    }
}

/// Publishes events on the broker, declaring the exchange as [`Declaring`] says.
#[derive(Debug)]
struct BrokerSink {
    transport: SharedTransport,
    declared: Arc<DeclaredExchanges>,
    declaring: Declaring,
}

#[async_trait]
impl EventSink for BrokerSink {
    async fn send(&self, event: OutgoingEvent<'_>) -> Result<()> {
        let exchange = &event.exchange.name;
        if self.declaring == Declaring::First && !self.declared.contains(exchange) {
            self.transport.declare_exchange(event.exchange).await?;
            self.declared.insert(exchange);
        }
        let publish = |message| {
            self.transport.publish(exchange, event.event_type, message, PublishOptions::default())
        };
        match publish(event.message.clone()).await {
            Err(TransportError::NotFound(reason)) if self.declaring == Declaring::Never => {
                return Err(TransportError::NotFound(format!(
                    "{reason} (DECLARE_EVENT_EXCHANGES is false: {exchange} is not declared \
                     here; the event was not sent)"
                ))
                .into());
            }
            // The exchange is missing, or went after it was declared (deleted by hand, or
            // auto-deleted with its last binding): RabbitMQ refused the message unrouted, so
            // declaring it and sending once more cannot duplicate it.
            Err(TransportError::NotFound(_)) => {
                self.declared.forget(exchange);
                self.transport.declare_exchange(event.exchange).await?;
                self.declared.insert(exchange);
                publish(event.message).await?;
            }
            other => other?,
        }
        Ok(())
    }
}

/// Dispatches events of this service: exchange `{SERVICE_NAME}.events` (declared before the
/// first event under the Nameko profile, only when missing under micro-framework's, never
/// with `DECLARE_EVENT_EXCHANGES=false`), routing key = event name, persistent JSON body,
/// publisher-confirmed. Inside a target it sends the call's context headers
/// (`nameko.call_id_stack`, ...).
///
/// A dependency whose `Output` is `Producer` (on the route or the runner) replaces the one
/// built from the broker, e.g. `testing::FakeProducer` in tests.
///
/// ```
/// use micro_framework::amqp::dependencies::Producer;
/// use serde_json::json;
///
/// async fn paid(producer: Producer) -> micro_framework::Result<()> {
///     producer.dispatch("order_paid", &json!({"order": 1})).await
/// }
///
/// fn paid_sync(producer: Producer) -> micro_framework::Result<()> {
///     producer.dispatch_blocking("order_paid", &json!({"order": 1}))
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Producer {
    sink: Arc<dyn EventSink>,
    exchange: ExchangeSpec,
    headers: Headers,
    max_message_size: usize,
}

impl Producer {
    /// A producer outside any call: it dispatches as `config.service_name`, without context
    /// headers.
    pub fn new(transport: SharedTransport, config: &Config) -> Self {
        let declaring = Declaring::of(config);
        let sink = BrokerSink { transport, declared: Arc::default(), declaring };
        Producer::with_sink(Arc::new(sink), config, &config.service_name, Headers::new())
    }

    /// A producer of `service` that sends its events to `sink` with `headers`.
    pub(crate) fn with_sink(
        sink: Arc<dyn EventSink>,
        config: &Config,
        service: &str,
        headers: Headers,
    ) -> Self {
        Producer {
            sink,
            exchange: event_exchange(config, service),
            headers,
            max_message_size: config.max_message_size,
        }
    }

    /// The exchange events go to.
    pub fn exchange(&self) -> &str {
        &self.exchange.name
    }

    /// Dispatch `payload` as event `event_type`; resolves once the broker confirmed it.
    pub async fn dispatch<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        payload: &T,
    ) -> Result<()> {
        let body = Bytes::from(serde_json::to_vec(payload)?);
        check_size(format_args!("event {event_type}"), body.len(), self.max_message_size)?;
        let mut properties = json_properties();
        properties.headers = self.headers.clone();
        let message = OutgoingMessage { body, properties };
        self.sink.send(OutgoingEvent { exchange: &self.exchange, event_type, message }).await
    }

    /// [`Producer::dispatch`] for sync targets (which run on worker threads). Fails with
    /// [`Error::Blocking`] outside a tokio runtime, and on a current-thread runtime outside a
    /// sync target (its one thread would wait for itself).
    pub fn dispatch_blocking<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        payload: &T,
    ) -> Result<()> {
        crate::handler::blocking::block_on("dispatch_blocking", self.dispatch(event_type, payload))
            .map_err(Error::Blocking)?
    }
}

impl FromContext for Producer {
    /// The call's dependency of type `Producer` if there is one, else a producer on the
    /// call's broker connection.
    fn from_context(ctx: &WorkerContext) -> std::result::Result<Self, ExtractError> {
        if let Some(provided) = ctx.dependency::<Producer>() {
            return Ok(provided);
        }
        let sink = BrokerSink {
            transport: ctx.transport().clone(),
            declared: ctx.service_state().get_or_default(),
            declaring: Declaring::of(ctx.config()),
        };
        Ok(Producer::with_sink(
            Arc::new(sink),
            ctx.config(),
            ctx.service_name(),
            ctx.call().outgoing_headers(),
        ))
    }
}
