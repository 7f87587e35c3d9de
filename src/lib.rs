//! # micro-framework
//!
//! Event-driven microservices over RabbitMQ, wire-compatible with Nameko 2.14 and the Python
//! `micro-framework` 2.1. A [`Runner`] starts a service from [`Route`]s and a [`Config`]; a
//! route links an [`Entrypoint`](entrypoints::Entrypoint) (an AMQP event, a timer, ...) to a
//! plain function whose parameters are extracted from the call's context.
//!
//! ```no_run
//! use micro_framework::prelude::*;
//! use micro_framework::amqp::entrypoints::EventListener;
//! use micro_framework::amqp::dependencies::Producer;
//! use serde_json::{json, Value};
//!
//! async fn test(Payload(order): Payload<Value>, producer: Producer) -> micro_framework::Result<()> {
//!     producer.dispatch("event_name", &json!({"order": order})).await
//! }
//!
//! fn test2(Payload(payload): Payload<Value>) {
//!     println!("Called after test function: {payload}");
//! }
//!
//! fn test_failure(Payload(payload): Payload<Value>, failure: Failure) {
//!     eprintln!("{payload} failed: {failure}");
//! }
//!
//! fn main() -> micro_framework::Result<()> {
//!     let config = Config::from_env()?;
//!     let routes = vec![
//!         CallbackRoute::new(test, test_failure)
//!             .entrypoint(EventListener::new("my_exchange", "my_routing_key")),
//!         Route::new(test2).entrypoint(EventListener::new("my_service", "event_name")),
//!     ];
//!     Runner::new(routes, config).start()
//! }
//! ```
#![deny(missing_docs)]

pub mod amqp;
pub mod config;
mod context;
pub mod dependencies;
pub mod entrypoints;
mod error;
pub mod extract;
mod failure;
#[cfg(test)]
mod fuzz_support;
pub mod http;
pub mod logging;
mod message;
pub mod metrics;
pub mod retry;
pub mod routes;
pub mod runner;
pub mod spawners;
pub mod targets;
pub mod testing;
pub mod translators;
pub mod websocket;
pub mod workers;

pub use async_trait::async_trait;
pub use config::Config;
pub use context::CallContext;
pub use dependencies::Dep;
pub use error::{BoxError, Error, Result};
pub use extract::{ExtractError, FromContext, MessageHeaders, Payload, RawBody};
pub use failure::{Failure, FailureKind};
pub use message::Message;
pub use routes::{CallbackRoute, Route};
pub use runner::{Runner, RunnerContext, RunningService};
pub use targets::Json;
pub use workers::{Handled, Outcome, RouteHandle, WorkerContext};

/// The names most services need: `use micro_framework::prelude::*;`.
pub mod prelude {
    pub use crate::config::{Config, WorkerMode};
    pub use crate::dependencies::Dep;
    pub use crate::extract::{MessageHeaders, Payload, RawBody};
    pub use crate::failure::Failure;
    pub use crate::routes::{CallbackRoute, Route};
    pub use crate::runner::{Runner, RunnerContext};
    pub use crate::targets::Json;
    pub use crate::CallContext;
}
