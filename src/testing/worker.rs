//! [`worker`]: one call of a route's target with dependency values the test chooses, without
//! a service (Nameko's `worker_factory`).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::amqp::entrypoints::{event_delivery, rpc_request};
use crate::config::Config;
use crate::data::{Headers, Message};
use crate::handler::dependencies::{Dependency, Shared};
use crate::pipeline::entrypoint_kind::Kind;
use crate::pipeline::routes::Route;
use crate::testing::hooks::{arguments, encoded, typed};
use crate::testing::{call_route, test_config, HookError};

/// One call of `route`'s target, to make with [`WorkerCall::event`], [`WorkerCall::rpc`] or
/// [`WorkerCall::message`] once its dependencies are chosen.
///
/// The call runs the route's translators and dependencies around the target, as a service
/// would, once (no retry, no callback), on the broker of [`test_config`] (a private in-process
/// broker, or a fresh RabbitMQ vhost when `TEST_AMQP_URI` is set) and without an
/// entrypoint: the route needs none. Nameko's `worker_factory` replaces every dependency with a
/// mock by itself; Rust cannot make a mock of any type, so the test replaces the dependencies
/// it wants to with [`WorkerCall::with`] (a value) or [`WorkerCall::dependency`] (a
/// [`Dependency`], such as a recording fake), and the others are the route's own.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::testing::worker;
///
/// #[derive(Clone)]
/// struct Prices { vat: f64 }
///
/// fn with_vat(Payload(net): Payload<f64>, Dep(prices): Dep<Prices>) -> f64 {
///     net * (1.0 + prices.vat)
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let gross: f64 = worker(Route::new(with_vat)).with(Prices { vat: 0.5 }).event(&10.0).await.unwrap();
/// assert_eq!(gross, 15.0);
/// # });
/// ```
#[derive(Debug)]
pub struct WorkerCall {
    route: Route,
    /// The config given, if any (see [`WorkerCall::call_config`]).
    config: Option<Config>,
}

/// A call of `route`'s target, for the service `worker` on the broker of [`test_config`]
/// (change it with [`WorkerCall::config`]).
pub fn worker(route: Route) -> WorkerCall {
    WorkerCall { route, config: None }
}

impl WorkerCall {
    /// Give the target `value` as its `Dep<T>`, replacing the route's dependency that
    /// provides a `T`, if any.
    pub fn with<T: Clone + Send + Sync + 'static>(self, value: T) -> Self {
        self.dependency(Shared(value))
    }

    /// Use `dependency`, replacing the route's dependency with the same output type, if any.
    pub fn dependency<D: Dependency>(mut self, dependency: D) -> Self {
        self.route = self.route.dependency(dependency);
        self
    }

    /// Call as a service with `config` would (its name, its broker, its limits).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Call with the event `payload`: delivered as from the source service's exchange when
    /// the route has an [`EventListener`](crate::amqp::entrypoints::EventListener) (its
    /// filter is not applied), a JSON message otherwise.
    pub async fn event<T: DeserializeOwned>(
        mut self,
        payload: &(impl Serialize + ?Sized),
    ) -> Result<T, HookError> {
        let config = self.call_config();
        let name = self.route.route_name();
        let message = match self.kind() {
            Some(Kind::Event { source_service, event_name, .. }) => {
                event_delivery(&config, source_service, event_name, payload, Headers::new())
            }
            _ => Message::json(payload),
        };
        let message = encoded(name, message)?;
        self.message(message).await
    }

    /// Call with the RPC arguments `args` (a list, or `()`) and `kwargs` (a map, or `()`),
    /// as a request for the route's method, which the target reads with
    /// [`Args`](crate::amqp::rpc::Args).
    pub async fn rpc<T: DeserializeOwned>(
        mut self,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, HookError> {
        let config = self.call_config();
        let name = self.route.route_name();
        let (args, kwargs) = arguments(name, args, kwargs)?;
        let protocol = match self.kind() {
            Some(Kind::Rpc { protocol, .. }) => *protocol,
            _ => None,
        };
        let message = rpc_request(&config, protocol, name, args, kwargs, Headers::new());
        self.message(message).await
    }

    /// Call with `message` as it is.
    pub async fn message<T: DeserializeOwned>(mut self, message: Message) -> Result<T, HookError> {
        let name = self.route.route_name().to_owned();
        let config = self.call_config();
        match call_route(self.route, config, message).await {
            Ok(value) => typed(&name, value),
            Err(failure) => Err(HookError::Failed { route: name, failure, called_back: false }),
        }
    }

    /// The config of the call: the one given, else `test_config("worker")`, made only now,
    /// so that a config given after [`worker`] leaves no RabbitMQ vhost made for nothing.
    fn call_config(&mut self) -> Config {
        self.config.get_or_insert_with(|| test_config("worker")).clone()
    }

    fn kind(&self) -> Option<&Kind> {
        self.route.entrypoint_info.as_ref().map(|entrypoint| &entrypoint.kind)
    }
}
