//! [`Topology`]: what a service declares (exchanges, queues, bindings), recorded by running
//! its entrypoints' set-up against a private in-process broker. `MF_PRINT_TOPOLOGY=1` makes
//! `Runner::start` print it as JSON, after the line [`TOPOLOGY_MARKER`], instead of serving
//! (the `micro-framework topology` command reads that).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use serde::Serialize;

use crate::transport::{
    BindingSpec, ConsumeOptions, Consumer, Delivery, ExchangeSpec, HeaderValue, OutgoingMessage,
    PublishOptions, QueueInfo, QueueSpec, SharedTransport, Transport, TransportError,
};

/// The line printed on stdout before the JSON document under `MF_PRINT_TOPOLOGY=1`: a reader
/// takes the document that follows it, whatever the program printed before (a banner, say).
pub const TOPOLOGY_MARKER: &str = "--- micro-framework topology ---";

/// An exchange a service declares.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExchangeEntry {
    /// Name.
    pub name: String,
    /// Type (`topic`, `direct`, ...).
    pub kind: String,
    /// Durable.
    pub durable: bool,
    /// Auto-delete.
    pub auto_delete: bool,
}

/// A queue a service declares.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueEntry {
    /// Name.
    pub name: String,
    /// Durable.
    pub durable: bool,
    /// Exclusive.
    pub exclusive: bool,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Arguments, as JSON.
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

/// A binding a service declares.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BindingEntry {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The routing key or pattern.
    pub routing_key: String,
}

/// Everything a service declares at start-up.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Topology {
    /// The service's name.
    pub service: String,
    /// Exchanges, in declaration order.
    pub exchanges: Vec<ExchangeEntry>,
    /// Queues, in declaration order.
    pub queues: Vec<QueueEntry>,
    /// Bindings, in declaration order.
    pub bindings: Vec<BindingEntry>,
}

fn json(value: &HeaderValue) -> serde_json::Value {
    match value {
        HeaderValue::Void => serde_json::Value::Null,
        HeaderValue::Bool(b) => (*b).into(),
        HeaderValue::Int(i) => (*i).into(),
        HeaderValue::Float(f) => (*f).into(),
        HeaderValue::Decimal { .. } => value.decimal_text().into(),
        HeaderValue::String(s) => s.clone().into(),
        HeaderValue::Bytes(b) => String::from_utf8_lossy(b).into_owned().into(),
        HeaderValue::Timestamp(t) => (*t).into(),
        HeaderValue::Array(items) => items.iter().map(json).collect(),
        HeaderValue::Table(table) => table
            .iter()
            .map(|(k, v)| (k.clone(), json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// Where each listed entry is, by what names it: a recorder looks an entry up per declaration,
/// and a scan of the lists made recording thousands of routes take time quadratic in their
/// number.
#[derive(Debug, Default)]
struct Places {
    exchanges: HashMap<String, usize>,
    queues: HashMap<String, usize>,
    bindings: HashMap<BindingEntry, usize>,
}

/// Add `entry` to `list` under `key`, or replace in place the entry it declares again: the
/// routes of a service declare what they share each (`nameko-rpc`, the one RPC request queue),
/// and the broker holds it once.
fn once<K: Hash + Eq, T>(list: &mut Vec<T>, places: &mut HashMap<K, usize>, key: K, entry: T) {
    match places.get(&key).and_then(|&place| list.get_mut(place)) {
        Some(listed) => *listed = entry,
        None => {
            places.insert(key, list.len());
            list.push(entry);
        }
    }
}

/// A transport that records declarations and passes every call on to `inner`.
#[derive(Debug)]
pub(crate) struct Recorder {
    inner: SharedTransport,
    topology: Arc<Mutex<(Topology, Places)>>,
}

impl Recorder {
    pub(crate) fn new(inner: SharedTransport, service: &str) -> Self {
        let topology = Topology { service: service.to_owned(), ..Topology::default() };
        Recorder { inner, topology: Arc::new(Mutex::new((topology, Places::default()))) }
    }

    pub(crate) fn topology(&self) -> Topology {
        self.record(|(topology, _)| topology.clone())
    }

    fn record<R>(&self, f: impl FnOnce(&mut (Topology, Places)) -> R) -> R {
        f(&mut self.topology.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait]
impl Transport for Recorder {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        self.inner.declare_exchange(spec).await?;
        let entry = ExchangeEntry {
            name: spec.name.clone(),
            kind: spec.kind.as_str().to_owned(),
            durable: spec.durable,
            auto_delete: spec.auto_delete,
        };
        self.record(|(t, places)| {
            once(&mut t.exchanges, &mut places.exchanges, entry.name.clone(), entry)
        });
        Ok(())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError> {
        let info = self.inner.declare_queue(spec).await?;
        let entry = QueueEntry {
            name: spec.name.clone(),
            durable: spec.durable,
            exclusive: spec.exclusive,
            auto_delete: spec.auto_delete,
            arguments: spec.arguments.iter().map(|(k, v)| (k.clone(), json(v))).collect(),
        };
        self.record(|(t, places)| {
            once(&mut t.queues, &mut places.queues, entry.name.clone(), entry)
        });
        Ok(info)
    }

    async fn queue_info(&self, queue: &str) -> Result<QueueInfo, TransportError> {
        self.inner.queue_info(queue).await
    }

    async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError> {
        self.inner.bind_queue(binding).await?;
        let entry = BindingEntry {
            queue: binding.queue.clone(),
            exchange: binding.exchange.clone(),
            routing_key: binding.routing_key.clone(),
        };
        self.record(|(t, places)| {
            once(&mut t.bindings, &mut places.bindings, entry.clone(), entry)
        });
        Ok(())
    }

    async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError> {
        self.inner.delete_queue(queue).await
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        self.inner.delete_exchange(exchange).await
    }

    async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError> {
        self.inner.purge_queue(queue).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
    ) -> Result<(), TransportError> {
        self.inner.publish(exchange, routing_key, message, options).await
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        self.inner.consume(queue, options).await
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
        self.inner.get(queue).await
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    fn consumers_subscribed(&self) -> bool {
        self.inner.consumers_subscribed()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::memory::MemoryTransport;

    /// Each route of a service declares what it uses, and routes share: the RPC routes of a
    /// service all declare `nameko-rpc`, the one request queue and its binding. Each is
    /// listed once, as the service declares it once on the broker.
    #[tokio::test]
    async fn what_several_routes_declare_alike_is_listed_once() {
        let uri = format!("memory://topology-{}", uuid::Uuid::new_v4());
        let memory: SharedTransport = Arc::new(MemoryTransport::connect(&uri).unwrap());
        let recorder = Recorder::new(memory, "math");
        let binding = BindingSpec {
            queue: "rpc-math".into(),
            exchange: "nameko-rpc".into(),
            routing_key: "math.*".into(),
            arguments: Default::default(),
        };
        for _route in 0..2 {
            recorder.declare_exchange(&ExchangeSpec::topic("nameko-rpc")).await.unwrap();
            recorder.declare_queue(&QueueSpec::durable("rpc-math")).await.unwrap();
            recorder.bind_queue(&binding).await.unwrap();
        }
        let topology = recorder.topology();
        let counts = (topology.exchanges.len(), topology.queues.len(), topology.bindings.len());
        assert_eq!(counts, (1, 1, 1), "{topology:#?}");
    }
}
