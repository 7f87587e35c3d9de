//! [`MemoryTransport`]: a connection to a [`MemoryBroker`], implementing [`Transport`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::transport::{
    BindingSpec, ClosedPart, ConsumeOptions, Consumer, Delivery, ExchangeSpec, OutgoingMessage,
    PublishOptions, QueueInfo, QueueSpec, Transport, TransportError,
};

use super::broker::MemoryBroker;
use super::client_checks;
use super::delayed::PLUGIN;
use crate::transport::declarations::{Declaration, Declarations};
use crate::transport::limits::{check_headers, RABBITMQ_FRAME_MAX};

/// A connection to an in-process [`MemoryBroker`].
///
/// It owns the exclusive queues it declares and the deliveries it hands out: closing or
/// dropping it ends its consumers, requeues its unsettled deliveries and deletes its
/// exclusive queues, like a closed AMQP connection.
pub struct MemoryTransport {
    broker: Arc<MemoryBroker>,
    connection: u64,
    closed: AtomicBool,
    opened_at: std::time::SystemTime,
    /// What this connection declared, for [`Transport::declare_again`]. Queues that expire by
    /// themselves (`x-expires`) and their bindings are not kept, as the RabbitMQ transport
    /// forgets them once their lease runs out.
    declared: std::sync::Mutex<Declarations>,
}

impl MemoryTransport {
    pub(super) fn new(broker: Arc<MemoryBroker>, connection: u64) -> Self {
        let opened_at = std::time::SystemTime::now();
        MemoryTransport {
            broker,
            connection,
            closed: AtomicBool::new(false),
            opened_at,
            declared: std::sync::Mutex::default(),
        }
    }

    /// Connects to `memory://` (the default broker) or `memory://NAME` (the broker `NAME`).
    /// The same name within a process always reaches the same broker. `?max_bytes=N` bounds
    /// the memory of its ready messages (see [`MemoryBroker::set_max_bytes`]);
    /// `?plugins=rabbitmq_delayed_message_exchange` enables the emulation of that plugin (see
    /// [`MemoryBroker::enable_delayed_message_plugin`]).
    pub fn connect(uri: &str) -> Result<Self, TransportError> {
        let Some(name) = uri.strip_prefix("memory://") else {
            let scheme = uri.split_once("://").map_or("(none)", |(scheme, _)| scheme);
            return Err(TransportError::InvalidUri(format!(
                "the in-memory transport needs a memory:// or memory://NAME URI, got scheme \
                 '{scheme}'"
            )));
        };
        let (name, query) = name.split_once('?').unwrap_or((name, ""));
        let broker = MemoryBroker::named(name.trim_end_matches('/'));
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match (key.as_ref(), value.parse::<u64>()) {
                ("max_bytes", Ok(max_bytes)) if max_bytes > 0 => broker.set_max_bytes(max_bytes),
                ("plugins", _) if value == PLUGIN => broker.enable_delayed_message_plugin(),
                _ => {
                    return Err(TransportError::InvalidUri(format!(
                        "invalid memory:// option {key}={value}: expected max_bytes=N (N > 0) \
                         or plugins={PLUGIN}"
                    )))
                }
            }
        }
        Ok(broker.connect())
    }

    /// The broker this transport is connected to.
    pub fn broker(&self) -> &Arc<MemoryBroker> {
        &self.broker
    }

    fn open(&self) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            Err(TransportError::Closed {
                what: ClosedPart::Transport,
                reason: "the in-memory transport is closed".to_owned(),
            })
        } else {
            Ok(())
        }
    }

    fn declared(&self) -> std::sync::MutexGuard<'_, Declarations> {
        self.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close_now(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let connection = self.connection;
            self.broker.with_state(|state| state.close_connection(connection, Instant::now()));
        }
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        self.open()?;
        client_checks::exchange(spec)?;
        self.broker.with_state(|state| state.declare_exchange(spec))?;
        self.declared().record(Declaration::Exchange(spec.clone()));
        Ok(())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError> {
        self.open()?;
        client_checks::queue(spec)?;
        let info = self
            .broker
            .with_state(|state| state.declare_queue(self.connection, spec, Instant::now()))?;
        if !spec.arguments.contains_key("x-expires") {
            self.declared().record(Declaration::Queue(spec.clone()));
        }
        Ok(info)
    }

    async fn queue_info(&self, queue: &str) -> Result<QueueInfo, TransportError> {
        self.open()?;
        client_checks::queue_name(queue)?;
        self.broker.with_state(|state| state.queue_info(self.connection, queue, Instant::now()))
    }

    async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError> {
        self.open()?;
        client_checks::binding(binding)?;
        self.broker.with_state(|state| state.bind(self.connection, binding))?;
        let mut declared = self.declared();
        if declared.has_queue(&binding.queue) {
            declared.record(Declaration::Binding(binding.clone()));
        }
        Ok(())
    }

    async fn declare_again(&self, queue: &str) -> Result<bool, TransportError> {
        let declarations = self.declared().again(queue);
        let recorded = !declarations.is_empty();
        for declaration in &declarations {
            match declaration {
                Declaration::Exchange(spec) => self.declare_exchange(spec).await?,
                Declaration::Queue(spec) => self.declare_queue(spec).await.map(|_| ())?,
                Declaration::Binding(spec) => self.bind_queue(spec).await?,
            }
        }
        Ok(recorded)
    }

    async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError> {
        self.open()?;
        client_checks::queue_name(queue)?;
        self.declared().remove_queue(queue);
        self.broker.with_state(|state| state.delete_queue(self.connection, queue))
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        self.open()?;
        client_checks::exchange_name(exchange)?;
        // forgotten with the bindings to it, as the RabbitMQ transport forgets them
        self.declared().remove_exchange(exchange);
        self.broker.with_state(|state| state.delete_exchange(exchange))
    }

    async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError> {
        self.open()?;
        client_checks::queue_name(queue)?;
        self.broker.with_state(|state| state.purge(self.connection, queue, Instant::now()))
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
    ) -> Result<(), TransportError> {
        self.open()?;
        client_checks::publish(exchange, routing_key, &message.properties)?;
        check_headers(&message.properties, RABBITMQ_FRAME_MAX)?;
        self.broker.with_state(|state| {
            state.publish(exchange, routing_key, message, options, Instant::now())
        })
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        self.open()?;
        client_checks::queue_name(queue)?;
        client_checks::consumer_tag(&options.consumer_tag)?;
        let now = Instant::now();
        let created =
            self.broker.with_state(|state| state.consume(self.connection, queue, &options, now))?;
        let broker = Arc::downgrade(&self.broker);
        let (queue, queue_id, id) = (queue.to_owned(), created.queue_id, created.id);
        Ok(Consumer::new(created.tag, created.deliveries, move || {
            if let Some(broker) = broker.upgrade() {
                broker.with_state(|state| state.cancel(&queue, queue_id, id, Instant::now()));
            }
        }))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
        self.open()?;
        client_checks::queue_name(queue)?;
        self.broker.with_state(|state| state.get(self.connection, queue, Instant::now()))
    }

    fn is_connected(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    fn connected_since(&self) -> Option<std::time::SystemTime> {
        self.is_connected().then_some(self.opened_at)
    }

    async fn close(&self) {
        self.close_now();
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        self.close_now();
    }
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("broker", &self.broker.name())
            .field("connection", &self.connection)
            .field("connected", &self.is_connected())
            .finish()
    }
}
