//! [`QueueListener`]: consume any named queue, or, as the Python original's `QueueListener`,
//! a queue on an exchange it declares.

use std::sync::Arc;

use async_trait::async_trait;

use crate::amqp::naming::{dead_letter_queue, is_quorum, work_queue};
use crate::data::Message;
use crate::error::{Error, Result};
use crate::pipeline::consume::serve_route;
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
use crate::pipeline::settle::declare_retry_topology;
use crate::pipeline::Entrypoint;
use crate::pipeline::{RouteHandle, RouteQueues};
use crate::transport::{BindingSpec, ExchangeKind, ExchangeSpec, Headers};

/// Handles the messages of a named queue, declared durable (or only checked, with
/// [`QueueListener::passive`]) and optionally bound to exchanges.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::QueueListener;
/// use serde_json::Value;
///
/// fn import(Payload(row): Payload<Value>) {}
///
/// let route = Route::new(import)
///     .entrypoint(QueueListener::new("imports").bind("uploads", "csv.#"));
/// ```
///
/// [`QueueListener::on_exchange`] does what the Python original's
/// `QueueListener(exchange_name, routing_key)` does, with the same names and flags, so a
/// Python service and this one can share the queue:
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::QueueListener;
/// use micro_framework::transport::ExchangeKind;
/// use serde_json::Value;
///
/// fn import(Payload(row): Payload<Value>) {}
///
/// // exchange `uploads` (topic, durable, auto-delete), queue `uploads_csv_queue`
/// let python_like = Route::new(import).entrypoint(QueueListener::on_exchange("uploads", "csv"));
/// let direct = Route::new(import)
///     .name("import_direct")
///     .entrypoint(
///         QueueListener::on_exchange("jobs", "import")
///             .exchange_type(ExchangeKind::Direct)
///             .queue_name("imports"),
///     );
/// ```
#[derive(Clone, Debug)]
pub struct QueueListener {
    queue: String,
    passive: bool,
    bindings: Vec<(String, String)>,
    /// The exchange of [`QueueListener::on_exchange`], declared before the queue.
    exchange: Option<ExchangeSpec>,
    /// Set by [`QueueListener::exchange_type`].
    exchange_kind: Option<ExchangeKind>,
}

impl QueueListener {
    /// Consume `queue`, declaring it durable if it does not exist.
    pub fn new(queue: impl Into<String>) -> Self {
        QueueListener {
            queue: queue.into(),
            passive: false,
            bindings: Vec::new(),
            exchange: None,
            exchange_kind: None,
        }
    }

    /// Declare `exchange` as the Python original does (topic, durable, auto-delete: deleted
    /// by the broker when its last queue is unbound), and consume the durable queue
    /// `{exchange}_{routing_key}_queue` bound to it with `routing_key`.
    pub fn on_exchange(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        let (exchange, routing_key) = (exchange.into(), routing_key.into());
        let mut declared = ExchangeSpec::topic(exchange.clone());
        declared.auto_delete = true;
        QueueListener {
            exchange: Some(declared),
            ..QueueListener::new(format!("{exchange}_{routing_key}_queue"))
                .bind(exchange, routing_key)
        }
    }

    /// The type of the exchange [`QueueListener::on_exchange`] declares (default: topic).
    /// Without `on_exchange` no exchange is declared, and the start fails saying so.
    pub fn exchange_type(mut self, kind: ExchangeKind) -> Self {
        self.exchange_kind = Some(kind);
        self
    }

    /// Consume the queue `name` instead (the Python original's `queue_name`).
    pub fn queue_name(mut self, name: impl Into<String>) -> Self {
        self.queue = name.into();
        self
    }

    /// Do not declare the queue: it must exist (any arguments); start-up fails otherwise.
    pub fn passive(mut self) -> Self {
        self.passive = true;
        self
    }

    /// Bind the queue to an existing `exchange` with `routing_key` (may be repeated).
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// The exchange to declare, if any, with its type; refuses what cannot be declared.
    fn exchange_to_declare(&self) -> Result<Option<ExchangeSpec>> {
        let Some(mut exchange) = self.exchange.clone() else {
            return match &self.exchange_kind {
                None => Ok(None),
                Some(kind) => Err(Error::Startup(format!(
                    "{}: exchange_type({}) names the type of the exchange that \
                     QueueListener::on_exchange declares, and this listener declares none",
                    self.describe(),
                    kind.as_str()
                ))),
            };
        };
        if exchange.name.is_empty() {
            return Err(Error::Startup(format!(
                "{}: QueueListener::on_exchange needs an exchange name (the default exchange \
                 cannot be declared)",
                self.describe()
            )));
        }
        if let Some(kind) = &self.exchange_kind {
            exchange.kind = kind.clone();
        }
        Ok(Some(exchange))
    }
}

#[async_trait]
impl Entrypoint for QueueListener {
    fn describe(&self) -> String {
        format!("QueueListener({})", self.queue)
    }

    fn queue(&self) -> Option<String> {
        Some(self.queue.clone())
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        if self.queue.is_empty() {
            return Err(Error::Startup(format!(
                "route '{}': QueueListener needs a queue name",
                route.name()
            )));
        }
        let exchange = self.exchange_to_declare()?;
        let dlq = dead_letter_queue(route.config(), &self.queue);
        let queues =
            RouteQueues { consumes: &self.queue, named_for: None, dead_letters: &dlq.name };
        route.claim_queues(queues)?;
        let transport = route.transport();
        // kombu's order: the exchange, the queue, then the binding
        if let Some(exchange) = &exchange {
            transport.declare_exchange(exchange).await?;
        }
        if self.passive {
            transport.queue_info(&self.queue).await?;
        } else {
            transport.declare_queue(&work_queue(route.config(), self.queue.clone())).await?;
        }
        for (exchange, routing_key) in &self.bindings {
            let binding = BindingSpec {
                queue: self.queue.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                arguments: Headers::new(),
            };
            transport.bind_queue(&binding).await?;
        }
        transport.declare_queue(&dlq).await?;
        route.set_dead_letter_queue(dlq);
        declare_retry_topology(route, &self.queue).await?;
        route.will_subscribe();
        Ok(())
    }

    async fn run(self: Box<Self>, route: RouteHandle) -> Result<()> {
        // A queue taken as it is (passive) is of a type the service does not know: it is
        // counted as any queue can be, with copies.
        let quorum = !self.passive && is_quorum(&work_queue(route.config(), self.queue.clone()));
        serve_route(route, self.queue, quorum, Arc::new(|_: &Message| Ok(true))).await
    }

    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::Queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_exchange_names_and_flags_are_the_python_originals() {
        let listener = QueueListener::on_exchange("uploads", "csv.#");
        assert_eq!(listener.queue, "uploads_csv.#_queue");
        assert_eq!(listener.bindings, [("uploads".to_owned(), "csv.#".to_owned())]);
        let exchange = listener.exchange_to_declare().unwrap().unwrap();
        assert_eq!(exchange.name, "uploads");
        assert_eq!(exchange.kind, ExchangeKind::Topic);
        assert!(exchange.durable && exchange.auto_delete && exchange.arguments.is_empty());

        let direct = QueueListener::on_exchange("jobs", "import")
            .exchange_type(ExchangeKind::Direct)
            .queue_name("imports");
        assert_eq!(direct.queue, "imports");
        assert_eq!(direct.exchange_to_declare().unwrap().unwrap().kind, ExchangeKind::Direct);
        assert_eq!(QueueListener::new("plain").exchange_to_declare().unwrap(), None);
    }

    #[test]
    fn what_cannot_be_declared_is_refused() {
        let misplaced = QueueListener::new("q").exchange_type(ExchangeKind::Fanout);
        let error = misplaced.exchange_to_declare().unwrap_err().to_string();
        assert!(
            error.contains("exchange_type(fanout)") && error.contains("declares none"),
            "{error}"
        );
        let unnamed = QueueListener::on_exchange("", "key");
        let error = unnamed.exchange_to_declare().unwrap_err().to_string();
        assert!(error.contains("needs an exchange name"), "{error}");
    }
}
