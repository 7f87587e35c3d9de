//! Calling a route's target alone, and reading queues.

use std::sync::Arc;

use crate::config::Config;
use crate::data::Message;
use crate::data::{Outcome, TargetRole};
use crate::error::Result;
use crate::pipeline::routes::Route;
use crate::pipeline::spawners::WorkerPool;
use crate::pipeline::{RouteHandle, ServiceEnv};
use crate::transport::Transport;

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
    // declared first, dropped last: after the call's connection is gone
    let _broker = crate::testing::broker::BrokerLease::for_config(&config);
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
