//! Routes: an entrypoint linked to a target function, with its translators and dependencies.
//!
//! ```
//! use micro_framework::prelude::*;
//! use micro_framework::amqp::entrypoints::EventListener;
//! use serde_json::Value;
//!
//! fn created(Payload(order): Payload<Value>) {}
//! fn created_failed(Payload(order): Payload<Value>, failure: Failure) {}
//!
//! let routes: Vec<Route> = vec![
//!     Route::new(created).entrypoint(EventListener::new("orders", "created")),
//!     CallbackRoute::new(created, created_failed)
//!         .name("created_with_callback")
//!         .entrypoint(EventListener::new("orders", "created")),
//!     Route::new(created)
//!         .name("created_again")
//!         .metric_label("orders_created")
//!         .entrypoint(EventListener::new("orders", "created")),
//! ];
//! assert_eq!(routes[0].route_name(), "created");
//! ```

use std::fmt;
use std::sync::Arc;

use crate::config::Protocol;
use crate::handler::dependencies::{self, Dependency, SharedDependency};
use crate::handler::targets::{ErasedTarget, Target};
use crate::handler::translators::MessageTranslator;
use crate::pipeline::entrypoint_kind::EntrypointInfo;
use crate::pipeline::retry::BackOffPolicy;
use crate::pipeline::Entrypoint;

/// A target function with the entrypoint that triggers it, and what its calls need: a name,
/// translators, dependencies and a retry policy. Here a target that fails its first attempt
/// is retried in the worker by [`BackOff`](crate::pipeline::retry::BackOff):
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use micro_framework::amqp::entrypoints::EventListener;
/// use micro_framework::dependencies::Shared;
/// use micro_framework::prelude::*;
/// use micro_framework::retry::BackOff;
/// use micro_framework::testing::{test_config, TestService};
///
/// fn charge(
///     Payload(cents): Payload<u32>,
///     Dep(tries): Dep<Arc<AtomicU32>>,
/// ) -> Result<u32, String> {
///     match tries.fetch_add(1, Ordering::Relaxed) {
///         0 => Err("card reader busy".into()),
///         _ => Ok(cents),
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let route = Route::new(charge)
///     .entrypoint(EventListener::new("shop", "paid"))
///     .dependency(Shared(Arc::new(AtomicU32::new(0))))
///     .backoff(BackOff::new(1, Duration::from_millis(10)));
/// let service = TestService::start(vec![route], test_config("billing")).await.unwrap();
/// let charged: u32 = service.hook("charge").unwrap().event(&7).await.unwrap();
/// assert_eq!(charged, 7);
/// service.stop().await.unwrap();
/// # });
/// ```
pub struct Route {
    pub(crate) name: String,
    pub(crate) target: ErasedTarget,
    pub(crate) callback: Option<ErasedTarget>,
    pub(crate) entrypoint: Option<Box<dyn Entrypoint>>,
    /// The entrypoints given before the last one, described: a route has one, and the
    /// start refuses a route given more (a Nameko user would expect each to trigger it).
    pub(crate) entrypoints_before: Vec<String>,
    /// What the entrypoint is, kept once the entrypoint is taken to be set up and run.
    pub(crate) entrypoint_info: Option<EntrypointInfo>,
    pub(crate) translators: Vec<Arc<dyn MessageTranslator>>,
    pub(crate) dependencies: Vec<SharedDependency>,
    pub(crate) backoff: Option<BackOffPolicy>,
    pub(crate) metric_label: Option<String>,
}

impl Route {
    /// A route calling `target`, named after the function (`tasks::test` → `test`).
    pub fn new<T: Target<M>, M>(target: T) -> Self {
        let target = ErasedTarget::new(target);
        Route {
            name: target.default_name().to_owned(),
            target,
            callback: None,
            entrypoint: None,
            entrypoints_before: Vec::new(),
            entrypoint_info: None,
            translators: Vec::new(),
            dependencies: Vec::new(),
            backoff: None,
            metric_label: None,
        }
    }

    /// Set the route's name (the RPC method name, part of queue names).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Set what triggers the route. A route has one entrypoint: for a target triggered in
    /// two ways, add two routes (each with a name of its own); a route given two stops the
    /// start.
    pub fn entrypoint(mut self, entrypoint: impl Entrypoint) -> Self {
        if let Some(before) = self.entrypoint.take() {
            self.entrypoints_before.push(before.describe());
        }
        self.entrypoint_info = Some(EntrypointInfo::of(&entrypoint));
        self.entrypoint = Some(Box::new(entrypoint));
        self
    }

    /// Add a translator; translators run in the order added.
    pub fn translator(mut self, translator: impl MessageTranslator) -> Self {
        self.translators.push(Arc::new(translator));
        self
    }

    /// Add a dependency, replacing one that provides the same type (which is how tests swap
    /// a real dependency for a fake).
    pub fn dependency<D: Dependency>(mut self, dependency: D) -> Self {
        dependencies::insert(&mut self.dependencies, dependencies::share(dependency));
        self
    }

    /// Retry failures with this policy ([`AsyncBackOff`](crate::pipeline::retry::AsyncBackOff) or
    /// [`BackOff`](crate::pipeline::retry::BackOff)) before calling back or dead-lettering.
    /// An `AsyncBackOff` retries only messages taken from a queue (events, work queues); on an
    /// RPC, HTTP, WebSocket or timer route it retries nothing (the start-up warns of it): use
    /// `BackOff` there.
    pub fn backoff(mut self, policy: BackOffPolicy) -> Self {
        self.backoff = Some(policy);
        self
    }

    /// Set the `route` label of the route's metrics. By default it is the route's name, or
    /// under `PROTOCOL=micro_framework` the Python original's `Route__{name}` (a callback
    /// route: `CallbackRoute__{name}`). An empty label, or one that another route of the same
    /// context has, stops the start.
    pub fn metric_label(mut self, label: impl Into<String>) -> Self {
        self.metric_label = Some(label.into());
        self
    }

    /// The `route` label of the route's metrics under `protocol`: the one set with
    /// [`Route::metric_label`], or the profile's default.
    pub(crate) fn metric_label_for(&self, protocol: Protocol) -> String {
        if let Some(label) = &self.metric_label {
            return label.clone();
        }
        match protocol {
            Protocol::Nameko => self.name.clone(),
            // The Python original's `str(route).replace(" -> ", "__")`, its class then its
            // target's name.
            Protocol::MicroFramework => {
                let class = if self.callback.is_some() { "CallbackRoute" } else { "Route" };
                format!("{class}__{}", self.name)
            }
        }
    }

    /// The route's name.
    pub fn route_name(&self) -> &str {
        &self.name
    }

    /// The path of the target function, e.g. `my_service::tasks::test`.
    pub fn target_path(&self) -> &'static str {
        self.target.path
    }

    /// What triggers the route, as text.
    pub fn describe_entrypoint(&self) -> String {
        self.entrypoint.as_ref().map_or_else(|| "no entrypoint".to_owned(), |e| e.describe())
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("callback", &self.callback)
            .field("entrypoint", &self.describe_entrypoint())
            .field("metric_label", &self.metric_label)
            .finish()
    }
}

/// A route whose `callback` runs when the target fails and no retry remains. The callback
/// can take the same parameters as a target, plus the [`Failure`](crate::Failure). Here the
/// broker redelivers a failed event twice, 5 s apart
/// ([`AsyncBackOff`](crate::pipeline::retry::AsyncBackOff)), before `refund` runs:
///
/// ```
/// use std::time::Duration;
/// use micro_framework::amqp::entrypoints::EventListener;
/// use micro_framework::prelude::*;
/// use micro_framework::retry::AsyncBackOff;
/// use serde_json::Value;
///
/// fn charge(Payload(order): Payload<Value>) -> Result<(), String> {
///     Err(format!("card declined for {order}"))
/// }
///
/// fn refund(Payload(order): Payload<Value>, failure: Failure) {
///     eprintln!("refunding {order}: {failure}");
/// }
///
/// let route: Route = CallbackRoute::new(charge, refund)
///     .entrypoint(EventListener::new("shop", "paid"))
///     .backoff(AsyncBackOff::new(2, Duration::from_secs(5)));
/// assert_eq!(route.route_name(), "charge");
/// ```
#[derive(Debug)]
pub struct CallbackRoute;

impl CallbackRoute {
    /// A route calling `target`, and `callback` when `target` fails for good.
    // A constructor of `Route`, named after the Python micro-framework's class.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<T: Target<M>, M, C: Target<N>, N>(target: T, callback: C) -> Route {
        let mut route = Route::new(target);
        route.callback = Some(ErasedTarget::new(callback));
        route
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() {}
    fn created_failed() {}

    #[test]
    fn metric_labels_follow_the_profile_unless_set() {
        let plain = Route::new(created);
        let called_back = CallbackRoute::new(created, created_failed).name("with_callback");
        assert_eq!(plain.metric_label_for(Protocol::Nameko), "created");
        assert_eq!(called_back.metric_label_for(Protocol::Nameko), "with_callback");
        assert_eq!(plain.metric_label_for(Protocol::MicroFramework), "Route__created");
        assert_eq!(
            called_back.metric_label_for(Protocol::MicroFramework),
            "CallbackRoute__with_callback"
        );
        let labelled = Route::new(created).metric_label("mine");
        for protocol in Protocol::ALL {
            assert_eq!(labelled.metric_label_for(*protocol), "mine");
        }
    }
}
