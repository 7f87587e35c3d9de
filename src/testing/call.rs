//! Calling a route's target alone, and reading queues.

use std::sync::Arc;

use crate::amqp::rpc::ReplyListener;
use crate::config::Config;
use crate::data::Message;
use crate::data::{Outcome, TargetRole};
use crate::error::{Chain, Error, Result};
use crate::handler::dependencies::{set_up_all, tear_down};
use crate::pipeline::routes::Route;
use crate::pipeline::spawners::WorkerPool;
use crate::pipeline::{RouteHandle, ServiceEnv};
use crate::transport::{SharedTransport, Transport};

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
/// are set up and torn down around the call, and the reply queue of its RPC calls, if any, is
/// deleted after it). Returns the call's outcome.
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
    let outcome = call_with_dependencies(route, &config, transport.clone(), message).await;
    transport.close().await;
    outcome
}

/// Set up the route's dependencies, make the call, and tear down what was set up.
async fn call_with_dependencies(
    route: Route,
    config: &Arc<Config>,
    transport: SharedTransport,
    message: Message,
) -> Outcome {
    let dependencies = match set_up_all(route.dependencies.clone(), config).await {
        Ok(dependencies) => dependencies,
        Err(Error::Dependency { name, source }) => {
            let failure = crate::Failure::from_error(&source, &name);
            let message = format!("dependency {name} failed to set up: {}", failure.message);
            return Err(crate::Failure { message, ..failure });
        }
        Err(error) => {
            let message = Chain(&error).to_string();
            return Err(crate::Failure::new(crate::FailureKind::Error, message));
        }
    };
    let pool = WorkerPool::new(config.max_workers, config.worker_mode, "default");
    let outcome = match ServiceEnv::new(config.clone(), transport) {
        Ok(env) => {
            let outcome = RouteHandle::new(route, pool, &env)
                .execute(TargetRole::Target, message, None)
                .await;
            // As a service does when it stops: the reply queue of the target's RPC calls
            // would outlive the connection by its `x-expires` (5 min) on the caller's broker.
            if let Some(replies) = env.state.get::<ReplyListener>() {
                replies.close(&env.transport).await;
            }
            env.state.clear();
            outcome
        }
        Err(error) => Err(crate::Failure::new(crate::FailureKind::Error, error.to_string())),
    };
    tear_down(&dependencies).await;
    outcome
}
