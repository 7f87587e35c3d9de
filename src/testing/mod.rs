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

mod broker;
mod broker_env;
mod call;
mod clock;
mod fakes;
mod hooks;
#[cfg(feature = "process")]
mod process;
mod restrict;
mod service;
#[cfg(feature = "test-rabbitmq")]
mod vhost;
mod waiter;
mod worker;

use std::time::Duration;

pub use crate::pipeline::FinishedCall;
pub use broker::{memory_test_config, test_config, try_test_config};
pub use broker_env::TEST_AMQP_URI_ENV;
pub use call::{call_route, take_messages};
pub use fakes::{DispatchedEvent, FakeProducer, FakeRpc, RecordedCall};
pub use hooks::{EntrypointHook, HookError};
#[cfg(feature = "http")]
pub use hooks::{HttpCall, HttpResponse};
pub use service::TestService;
#[cfg(feature = "test-rabbitmq")]
pub use vhost::{remove_stale_vhosts, TEST_RABBITMQ_API_ENV};
pub use waiter::RouteWaiter;
pub use worker::{worker, WorkerCall};

/// How long the `wait_*` helpers wait before failing.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);
