//! [`Producer`]: dispatch events to `{SERVICE_NAME}.events`, as Nameko's `EventDispatcher`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;

use crate::amqp::naming::event_exchange;
use crate::config::Config;
use crate::data::json_properties;
use crate::error::{Error, Result};
use crate::handler::extract::{ExtractError, FromContext};
use crate::handler::WorkerContext;
use crate::transport::limits::check_size;
use crate::transport::{ExchangeSpec, Headers, OutgoingMessage, PublishOptions, SharedTransport};

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
}

/// Dispatches events of this service: exchange `{SERVICE_NAME}.events` (declared on first
/// use), routing key = event name, persistent JSON body, publisher-confirmed. Inside a target
/// it sends the call's context headers (`nameko.call_id_stack`, ...).
///
/// ```no_run
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
    transport: SharedTransport,
    exchange: ExchangeSpec,
    headers: Headers,
    declared: Arc<DeclaredExchanges>,
    max_message_size: usize,
}

impl Producer {
    /// A producer outside any call: it dispatches as `config.service_name`, without context
    /// headers.
    pub fn new(transport: SharedTransport, config: &Config) -> Self {
        Producer {
            exchange: event_exchange(config, &config.service_name),
            transport,
            headers: Headers::new(),
            declared: Arc::default(),
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
        check_size(&format!("event {event_type}"), body.len(), self.max_message_size)?;
        if !self.declared.contains(&self.exchange.name) {
            self.transport.declare_exchange(&self.exchange).await?;
            self.declared.insert(&self.exchange.name);
        }
        let mut properties = json_properties();
        properties.headers = self.headers.clone();
        let message = OutgoingMessage { body, properties };
        self.transport
            .publish(&self.exchange.name, event_type, message, PublishOptions::default())
            .await?;
        Ok(())
    }

    /// [`Producer::dispatch`] for sync targets (which run on worker threads). Fails with
    /// [`Error::Blocking`] when called outside a multi-threaded tokio runtime.
    pub fn dispatch_blocking<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        payload: &T,
    ) -> Result<()> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| {
            Error::Blocking(format!("dispatch_blocking needs a runtime: {error}"))
        })?;
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            return Err(Error::Blocking(
                "dispatch_blocking cannot run on a current-thread runtime".into(),
            ));
        }
        tokio::task::block_in_place(|| runtime.block_on(self.dispatch(event_type, payload)))
    }
}

impl FromContext for Producer {
    fn from_context(ctx: &WorkerContext) -> std::result::Result<Self, ExtractError> {
        Ok(Producer {
            transport: ctx.transport().clone(),
            exchange: event_exchange(ctx.config(), ctx.service_name()),
            headers: ctx.call().outgoing_headers(),
            declared: ctx.service_state().get_or_default(),
            max_message_size: ctx.config().max_message_size,
        })
    }
}
