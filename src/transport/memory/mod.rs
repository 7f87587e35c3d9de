//! An in-process AMQP 0-9-1 broker modelled on RabbitMQ, for tests and single-process
//! deployments.
//!
//! [`MemoryBroker`] holds exchanges (default, direct, fanout, topic, headers), queues
//! (TTL, `x-expires`, dead-lettering with `x-death`, `x-max-length`, quorum delivery
//! counts, exclusive and auto-delete queues) and unsettled deliveries, and routes a message
//! by its `CC` and `BCC` headers too, as RabbitMQ does. [`MemoryTransport`] is a connection
//! to it and implements [`Transport`](crate::transport::Transport).
//! `memory://` reaches the process-wide default broker, `memory://NAME` a named one.
//!
//! Like a stock RabbitMQ, it refuses the exchange type `x-delayed-message` unless the
//! broker enables its emulation of the `rabbitmq_delayed_message_exchange` plugin
//! ([`MemoryBroker::enable_delayed_message_plugin`], or on connect
//! `memory://NAME?plugins=rabbitmq_delayed_message_exchange`).
//!
//! ```
//! # async fn demo() -> Result<(), micro_framework::transport::TransportError> {
//! use futures::StreamExt;
//! use micro_framework::transport::memory::MemoryTransport;
//! use micro_framework::transport::{
//!     BindingSpec, ConsumeOptions, ExchangeSpec, OutgoingMessage, PublishOptions, QueueSpec,
//!     Transport,
//! };
//!
//! let transport = MemoryTransport::connect("memory://doc-example")?;
//! transport.declare_exchange(&ExchangeSpec::topic("events")).await?;
//! transport.declare_queue(&QueueSpec::durable("billing")).await?;
//! transport
//!     .bind_queue(&BindingSpec {
//!         queue: "billing".into(),
//!         exchange: "events".into(),
//!         routing_key: "order.#".into(),
//!         arguments: Default::default(),
//!     })
//!     .await?;
//! let message = OutgoingMessage { body: "paid".into(), ..Default::default() };
//! transport.publish("events", "order.paid", message, PublishOptions::default()).await?;
//!
//! let mut consumer = transport.consume("billing", ConsumeOptions::default()).await?;
//! if let Some(delivery) = consumer.next().await {
//!     assert_eq!(delivery.body, "paid");
//!     delivery.acker.ack().await?;
//! }
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

mod acker;
mod arguments;
mod broker;
mod client_checks;
mod dead_letter;
mod delayed;
#[cfg(test)]
mod delayed_tests;
mod queue;
mod routing;
mod sender_selected;
#[cfg(test)]
mod sender_selected_tests;
#[cfg(test)]
mod short_string_tests;
mod state;
#[cfg(test)]
mod tests;
mod transport;

pub use broker::MemoryBroker;
pub use transport::MemoryTransport;
