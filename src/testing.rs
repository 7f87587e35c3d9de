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

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::amqp::dependencies::Producer;
use crate::config::Config;
use crate::data::Message;
use crate::data::{Outcome, TargetRole};
use crate::error::{Error, Result};
use crate::pipeline::routes::Route;
use crate::pipeline::spawners::WorkerPool;
use crate::pipeline::{RouteHandle, ServiceEnv};
use crate::runner::{Runner, RunningService};
use crate::transport::{SharedTransport, Transport};

/// How long the `wait_*` helpers wait before failing.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// A config for `service` on a private in-process broker (`memory://test-{uuid}`), so tests
/// can run in parallel.
pub fn test_config(service: &str) -> Config {
    Config::new(service).with_amqp_uri(format!("memory://test-{}", uuid::Uuid::new_v4()))
}

/// A running service under test.
#[derive(Debug)]
pub struct TestService {
    service: RunningService,
    config: Config,
}

impl TestService {
    /// Start `routes` with `config` (see [`test_config`]).
    pub async fn start(routes: Vec<Route>, config: Config) -> Result<Self> {
        Self::start_runner(Runner::new(routes, config.clone()), config).await
    }

    /// Start a runner built by the test (contexts, runner dependencies); `config` must be
    /// the one the runner was built with.
    pub async fn start_runner(runner: Runner, config: Config) -> Result<Self> {
        Ok(TestService { service: runner.spawn().await?, config })
    }

    /// The broker connection of the service.
    pub fn transport(&self) -> &SharedTransport {
        self.service.transport()
    }

    /// The running service.
    pub fn service(&self) -> &RunningService {
        &self.service
    }

    /// See [`RunningService::is_ready`].
    pub fn is_ready(&self) -> bool {
        self.service.is_ready()
    }

    /// A running route.
    pub fn route(&self, name: &str) -> Result<&RouteHandle> {
        self.service.route(name).ok_or_else(|| Error::UnknownRoute(name.to_owned()))
    }

    /// Dispatch an event as `source_service` would.
    pub async fn dispatch<T: Serialize + ?Sized>(
        &self,
        source_service: &str,
        event: &str,
        payload: &T,
    ) -> Result<()> {
        let config = self.config.clone().with_service_name(source_service.to_owned());
        Producer::new(self.transport().clone(), &config).dispatch(event, payload).await
    }

    /// Wait until `route` has settled at least `count` messages in all.
    pub async fn wait_for_route(&self, route: &str, count: u64) -> Result<()> {
        let stats = self.route(route)?.stats();
        tokio::time::timeout(WAIT_LIMIT, stats.wait_settled(count)).await.map_err(|_| {
            Error::Timeout(format!(
                "route '{route}' settled {} of {count} messages in {WAIT_LIMIT:?}",
                stats.settled_count()
            ))
        })
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> Result<u32> {
        Ok(self.transport().queue_info(queue).await?.message_count)
    }

    /// Take (get and ack) every ready message of `queue`.
    pub async fn take_messages(&self, queue: &str) -> Result<Vec<Message>> {
        take_messages(self.transport().as_ref(), queue).await
    }

    /// Stop gracefully.
    pub async fn stop(self) -> Result<()> {
        self.service.stop().await
    }

    /// Begin a graceful stop and return the service, to inspect it while it stops.
    pub fn begin_stop(&self) {
        self.service.begin_stop();
    }

    /// Wait until a stop begun with [`TestService::begin_stop`] has finished.
    pub async fn wait_stopped(mut self) -> Result<()> {
        self.service.wait_finished().await
    }
}

/// Take (get and ack) every ready message of `queue`.
pub async fn take_messages(transport: &dyn Transport, queue: &str) -> Result<Vec<Message>> {
    let mut messages = Vec::new();
    while let Some(delivery) = transport.get(queue).await? {
        messages.push(delivery.message());
        delivery.acker.ack().await?;
    }
    Ok(messages)
}

/// Run `route`'s target once on `message`, without an entrypoint or a broker (dependencies
/// are set up and torn down around the call). Returns the call's outcome.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::testing::{call_route, test_config};
/// use micro_framework::Message;
///
/// fn double(Payload(n): Payload<i64>) -> i64 { n * 2 }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let outcome = call_route(Route::new(double), test_config("math"), Message::json(&21).unwrap()).await;
/// assert_eq!(outcome.unwrap(), serde_json::json!(42));
/// # });
/// ```
pub async fn call_route(route: Route, config: Config, message: Message) -> Outcome {
    let config = Arc::new(config);
    let transport = match crate::transport::connect(&config).await {
        Ok(transport) => transport,
        Err(error) => {
            return Err(crate::Failure::new(crate::FailureKind::Error, error.to_string()))
        }
    };
    let setup = crate::handler::dependencies::SetupContext {
        service_name: config.service_name.clone(),
        config: config.clone(),
    };
    for dependency in &route.dependencies {
        if let Err(error) = dependency.setup(&setup).await {
            return Err(crate::Failure::from_error(&error, dependency.name()));
        }
    }
    let dependencies = route.dependencies.clone();
    let pool = WorkerPool::new(config.max_workers, config.worker_mode, "default");
    let env = match ServiceEnv::new(config.clone(), transport.clone()) {
        Ok(env) => env,
        Err(error) => {
            return Err(crate::Failure::new(crate::FailureKind::Error, error.to_string()))
        }
    };
    let handle = RouteHandle::new(route, pool, &env);
    let outcome = handle.execute(TargetRole::Target, message, None).await;
    for dependency in &dependencies {
        dependency.teardown().await;
    }
    transport.close().await;
    outcome
}
