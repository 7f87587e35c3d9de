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
//!
//! # Architecture
//!
//! Each layer is a module that imports only the layers below it (unit tests aside), none of
//! its own row:
//!
//! ```text
//! testing                        helpers to run, call, wait for and fake
//! runner                         Runner, RunningService, the state a service instance owns
//! amqp · timer · http · websocket · process_defaults
//!                                protocols and entrypoints; defaults set before `main`
//! pipeline                       Route, Entrypoint, RouteHandle, SharedExtension, the consume
//!                                loop, worker pools and processes, retries, settlement
//! handler · metrics              extractors, targets, dependencies, translators,
//!                                WorkerContext; counters and their server
//! web_server                     the HTTP servers' connections
//! error                          the crate's Error
//! transport · logging            the Transport trait, memory://, RabbitMQ; Consumer is a Stream
//! config · data · clock          Config; Message, Headers, Failure, CallContext, Outcome, the
//!                                RPC bodies; the wall clock
//! ```
//!
//! One message goes from its transport's [`Consumer`](transport::Consumer) stream through the
//! one consume loop (crash-loop guard included) to its route's [`RouteHandle`], which waits for
//! a worker slot, translates the [`Message`], provides the dependencies and calls the target (in
//! this process or a worker process), retries as the backoff says, and returns a [`Handled`]
//! that the loop settles: ack, a delayed retry copy, or a confirmed dead letter then ack.
//! Parts shared by several entrypoints of a service (the RPC consumer, the HTTP and WebSocket
//! servers) are [`SharedExtension`](entrypoints::SharedExtension)s owned by that service
//! instance.
#![deny(missing_docs)]

pub mod amqp;
mod clock;
pub mod config;
pub mod data;
mod error;
mod handler;
#[cfg(feature = "http")]
pub mod http;
pub mod logging;
#[cfg(feature = "metrics")]
pub mod metrics;
// Without the `metrics` feature: the same recording API, compiled to nothing (not public).
#[cfg(not(feature = "metrics"))]
#[path = "metrics/noop.rs"]
mod metrics;
mod pipeline;
mod process_defaults;
pub mod runner;
pub mod testing;
pub mod timer;
pub mod transport;
#[cfg(any(feature = "http", feature = "metrics", feature = "websocket"))]
mod web_server;
#[cfg(feature = "websocket")]
pub mod websocket;

pub use handler::{dependencies, extract, targets, translators};
pub use pipeline::{retry, routes, settle, spawners};

/// Entrypoints: what triggers a route. The [`Entrypoint`](entrypoints::Entrypoint) trait, the
/// timer; the AMQP entrypoints live in [`amqp::entrypoints`].
#[cfg_attr(feature = "http", doc = "The HTTP ones are in [`http`].")]
#[cfg_attr(feature = "websocket", doc = "The WebSocket ones are in [`websocket`].")]
pub mod entrypoints {
    pub use crate::pipeline::entrypoint_kind::EntrypointKind;
    pub use crate::pipeline::{Entrypoint, Serving, SharedExtension};
    pub use crate::timer::{Schedule, TimeEntrypoint};
}

pub use async_trait::async_trait;
pub use config::Config;
pub use data::{
    BoxError, CallContext, DecodeError, Extensions, Failure, FailureKind, Handled, HeaderValue,
    Headers, Message, Outcome, Properties, TargetRole,
};
pub use error::{Error, Result};
pub use handler::dependencies::Dep;
pub use handler::extract::{
    ExtractError, FromContext, MessageHeaders, Payload, RawBody, SetupError,
};
pub use handler::targets::Json;
pub use handler::{ServiceState, WorkerContext};
pub use pipeline::routes::{CallbackRoute, Route};
pub use pipeline::{RouteHandle, RouteStats};
pub use runner::{Runner, RunnerContext, RunningService};

/// The names most services need: `use micro_framework::prelude::*;`.
pub mod prelude {
    pub use crate::amqp::rpc::Args;
    pub use crate::config::{Config, WorkerMode};
    pub use crate::data::Failure;
    pub use crate::handler::dependencies::{Dep, Shared};
    pub use crate::handler::extract::{MessageHeaders, Payload, RawBody};
    pub use crate::handler::targets::Json;
    pub use crate::pipeline::routes::{CallbackRoute, Route};
    pub use crate::runner::{Runner, RunnerContext};
    pub use crate::CallContext;
}
