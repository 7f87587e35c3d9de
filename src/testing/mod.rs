//! Test helpers: run a service on the in-process broker, dispatch events, wait for routes,
//! inspect queues, call a route directly.
//!
//! ```
//! use micro_framework::prelude::*;
//! use micro_framework::amqp::entrypoints::EventListener;
//! use micro_framework::testing::{test_config, TestService};
//! use serde_json::{json, Value};
//!
//! fn on_paid(Payload(order): Payload<Value>) -> Result<(), String> {
//!     if order["id"] == 1 { Ok(()) } else { Err("unknown order".into()) }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let routes = vec![Route::new(on_paid).entrypoint(EventListener::new("shop", "paid"))];
//! let service = TestService::start(routes, test_config("orders")).await.unwrap();
//! service.dispatch("shop", "paid", &json!({"id": 1})).await.unwrap();
//! service.dispatch("shop", "paid", &json!({"id": 2})).await.unwrap();
//! service.wait_for_route("on_paid", 2).await.unwrap();
//! let dead = service.take_messages("evt-shop-paid--orders.on_paid.dlq").await.unwrap();
//! assert_eq!(dead.len(), 1);
//! service.stop().await.unwrap();
//! # });
//! ```

mod call;
mod clock;
mod fakes;
mod hooks;
mod restrict;
mod service;
mod waiter;
mod worker;

use std::time::Duration;

use crate::config::Config;

pub use crate::pipeline::FinishedCall;
pub use call::{call_route, take_messages};
pub use fakes::{DispatchedEvent, FakeProducer, FakeRpc, RecordedCall};
pub use hooks::{EntrypointHook, HookError};
#[cfg(feature = "http")]
pub use hooks::{HttpCall, HttpResponse};
pub use service::TestService;
pub use waiter::RouteWaiter;
pub use worker::{worker, WorkerCall};

/// How long the `wait_*` helpers wait before failing.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// A config for `service` on a private in-process broker (`memory://test-{uuid}`), so tests
/// can run in parallel.
pub fn test_config(service: &str) -> Config {
    Config::new(service).with_amqp_uri(format!("memory://test-{}", uuid::Uuid::new_v4()))
}
