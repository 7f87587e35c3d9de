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
//! ];
//! assert_eq!(routes[0].route_name(), "created");
//! ```

use std::fmt;
use std::sync::Arc;

use crate::handler::dependencies::{self, Dependency, SharedDependency};
use crate::handler::targets::{ErasedTarget, Target};
use crate::handler::translators::MessageTranslator;
use crate::pipeline::retry::BackOffPolicy;
use crate::pipeline::Entrypoint;

/// A target function with the entrypoint that triggers it.
pub struct Route {
    pub(crate) name: String,
    pub(crate) target: ErasedTarget,
    pub(crate) callback: Option<ErasedTarget>,
    pub(crate) entrypoint: Option<Box<dyn Entrypoint>>,
    pub(crate) translators: Vec<Arc<dyn MessageTranslator>>,
    pub(crate) dependencies: Vec<SharedDependency>,
    pub(crate) backoff: Option<BackOffPolicy>,
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
            translators: Vec::new(),
            dependencies: Vec::new(),
            backoff: None,
        }
    }

    /// Set the route's name (the RPC method name, part of queue names).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Set what triggers the route.
    pub fn entrypoint(mut self, entrypoint: impl Entrypoint) -> Self {
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
    pub fn backoff(mut self, policy: BackOffPolicy) -> Self {
        self.backoff = Some(policy);
        self
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
            .finish()
    }
}

/// A route whose `callback` runs when the target fails and no retry remains. The callback
/// can take the same parameters as a target, plus the [`Failure`](crate::Failure).
#[derive(Debug)]
pub struct CallbackRoute;

impl CallbackRoute {
    /// A route calling `target`, and `callback` when `target` fails for good.
    // A constructor of `Route`, named after the seed's class.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<T: Target<M>, M, C: Target<N>, N>(target: T, callback: C) -> Route {
        let mut route = Route::new(target);
        route.callback = Some(ErasedTarget::new(callback));
        route
    }
}
