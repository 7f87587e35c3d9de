//! Dependencies: values provided to each call (a database session, an API client, ...),
//! with a life cycle around the service and around each call.
//!
//! See [`Dependency`] for an example; [`Shared`] gives every call a clone of one value.

use std::any::{type_name, Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;

use crate::config::Config;
use crate::data::Outcome;
use crate::data::{BoxError, TargetRole};
use crate::data::{Failure, FailureKind};
use crate::error::{Error, Result};
use crate::handler::extract::{ExtractError, FromContext, SetupError, TargetSetup};
use crate::handler::outcome::panic_message;
use crate::handler::WorkerContext;

/// What a dependency's `setup` sees.
#[derive(Clone, Debug)]
pub struct SetupContext {
    /// The service's name.
    pub service_name: String,
    /// The service's configuration.
    pub config: Arc<Config>,
}

/// A dependency: set up once when the service starts, asked for a value before each call
/// (the target receives it through [`Dep<Output>`]), told the call's outcome afterwards
/// (commit or roll back), and torn down when the service stops.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::dependencies::{Dependency, Dep};
/// use micro_framework::{BoxError, WorkerContext};
///
/// #[derive(Clone)]
/// struct Greeter(String);
///
/// struct GreeterDependency;
///
/// #[micro_framework::async_trait]
/// impl Dependency for GreeterDependency {
///     type Output = Greeter;
///     async fn get(&self, call: &WorkerContext) -> Result<Greeter, BoxError> {
///         Ok(Greeter(format!("hello from {}", call.route_name())))
///     }
/// }
///
/// fn greet(Dep(greeter): Dep<Greeter>) -> String {
///     greeter.0
/// }
///
/// let route = Route::new(greet).dependency(GreeterDependency);
/// assert_eq!(route.route_name(), "greet");
/// ```
#[async_trait]
pub trait Dependency: Send + Sync + 'static {
    /// The value a target receives.
    type Output: Clone + Send + Sync + 'static;

    /// Called once at start-up, before any call. An error stops the service from starting.
    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        Ok(())
    }

    /// The value for one call. An error fails the call.
    async fn get(&self, call: &WorkerContext) -> Result<Self::Output, BoxError>;

    /// Called after the call with the value it got and the call's outcome.
    async fn after_call(&self, _value: &Self::Output, _outcome: &Outcome) {}

    /// Called once when the service stops (or its start fails after this one's `setup`),
    /// in the reverse order of the dependencies' set-up.
    async fn teardown(&self) {}
}

/// Extractor of the value a [`Dependency`] with `Output = T` provided for the call (see
/// [`Dependency`]'s example). A service whose route has no such dependency (its own or the
/// runner's) does not start.
#[derive(Clone, Debug)]
pub struct Dep<T>(pub T);

impl<T> Deref for Dep<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone + Send + Sync + 'static> FromContext for Dep<T> {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        ctx.dependency::<T>().map(Dep).ok_or_else(|| {
            ExtractError::Unavailable(match ctx.dependency_failure::<T>() {
                Some(failure) => failure.to_owned(),
                None => format!("no dependency provides {}", type_name::<T>()),
            })
        })
    }

    fn check(setup: &TargetSetup) -> Result<(), SetupError> {
        if setup.provides(TypeId::of::<T>()) {
            Ok(())
        } else {
            Err(SetupError::new(format!(
                "parameter Dep<{}> cannot be provided: add a dependency whose Output is that type \
                 with Route::dependency or Runner::dependency",
                type_name::<T>()
            )))
        }
    }
}

/// The values provided for one call, by type (a target reads them through its parameters,
/// [`WorkerContext::dependency`](crate::WorkerContext::dependency) otherwise).
#[derive(Default)]
pub(crate) struct DependencyValues {
    values: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    /// Why the dependencies that failed to give a value (for a callback) did not.
    failures: HashMap<TypeId, String>,
}

impl DependencyValues {
    /// The value of type `T`, cloned.
    pub(crate) fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.values.get(&TypeId::of::<T>()).and_then(|value| value.downcast_ref::<T>()).cloned()
    }

    /// Why the dependency of output `T` gave no value for this call, if it failed to.
    pub(crate) fn failure<T: 'static>(&self) -> Option<&str> {
        self.failures.get(&TypeId::of::<T>()).map(String::as_str)
    }
}

impl fmt::Debug for DependencyValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DependencyValues").field("count", &self.values.len()).finish()
    }
}

/// A dependency with its output type erased, as routes store them.
#[async_trait]
pub(crate) trait ErasedDependency: Send + Sync {
    fn output_type(&self) -> TypeId;
    fn name(&self) -> &'static str;
    async fn setup(&self, setup: &SetupContext) -> Result<(), BoxError>;
    async fn provide(
        &self,
        call: &WorkerContext,
        into: &mut DependencyValues,
    ) -> Result<(), BoxError>;
    async fn after_call(&self, values: &DependencyValues, outcome: &Outcome);
    async fn teardown(&self);
}

pub(crate) struct Erased<D>(pub D);

#[async_trait]
impl<D: Dependency> ErasedDependency for Erased<D> {
    fn output_type(&self) -> TypeId {
        TypeId::of::<D::Output>()
    }

    fn name(&self) -> &'static str {
        type_name::<D>()
    }

    async fn setup(&self, setup: &SetupContext) -> Result<(), BoxError> {
        self.0.setup(setup).await
    }

    async fn provide(
        &self,
        call: &WorkerContext,
        into: &mut DependencyValues,
    ) -> Result<(), BoxError> {
        let value = self.0.get(call).await?;
        into.values.insert(TypeId::of::<D::Output>(), Box::new(value));
        Ok(())
    }

    async fn after_call(&self, values: &DependencyValues, outcome: &Outcome) {
        if let Some(value) = values.values.get(&self.output_type()) {
            if let Some(value) = value.downcast_ref::<D::Output>() {
                self.0.after_call(value, outcome).await;
            }
        }
    }

    async fn teardown(&self) {
        self.0.teardown().await
    }
}

/// A shared, type-erased dependency.
pub(crate) type SharedDependency = Arc<dyn ErasedDependency>;

/// Erase a dependency for storage in a route.
pub(crate) fn share<D: Dependency>(dependency: D) -> SharedDependency {
    Arc::new(Erased(dependency))
}

/// Add `dependency` to `list`, replacing one that provides the same type.
pub(crate) fn insert(list: &mut Vec<SharedDependency>, dependency: SharedDependency) {
    list.retain(|existing| existing.output_type() != dependency.output_type());
    list.push(dependency);
}

/// Set up `dependencies` in order; when one fails, those already set up are torn down (in
/// reverse order) and the error names the one that failed.
pub(crate) async fn set_up_all(
    dependencies: Vec<SharedDependency>,
    config: &Arc<Config>,
) -> Result<Vec<SharedDependency>> {
    let setup = SetupContext { service_name: config.service_name.clone(), config: config.clone() };
    for (done, dependency) in dependencies.iter().enumerate() {
        // a panic here would leave the connection open and the dependencies before it set up
        let set_up = AssertUnwindSafe(dependency.setup(&setup)).catch_unwind().await;
        let source = match set_up {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error,
            Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())).into(),
        };
        tear_down(&dependencies[..done]).await;
        return Err(Error::Dependency { name: dependency.name().to_owned(), source });
    }
    Ok(dependencies)
}

/// Put the values of `dependencies` for the call `ctx` in `values`, asked for in order. When
/// one fails or panics, those that gave a value already see the call fail in `after_call`, as
/// after any failed call: a session opened for the call is rolled back, never left open. The
/// failure names the dependency; a [`Failure`] it returned keeps its kind. It is retryable when
/// `retryable` says so of its error (none for a panic), as the route's retry policy says of a
/// target's, unless a returned `Failure` says it is not (bad input never is). `values` is the caller's so
/// that, when it drops this future midway (a call past its time limit), it still holds the
/// values given so far, to tell them.
///
/// For a callback (`role`), a dependency that fails gives no value and the others go on: a
/// callback that reports the failure of a database must run while that database is down, and
/// only a parameter asking for the missing value fails it, with the dependency's failure.
pub(crate) async fn provide_all(
    dependencies: &[SharedDependency],
    ctx: &WorkerContext,
    role: TargetRole,
    retryable: impl Fn(Option<&(dyn std::error::Error + 'static)>) -> bool,
    values: &mut DependencyValues,
) -> std::result::Result<(), Failure> {
    for dependency in dependencies {
        let name = dependency.name();
        // a panic here would end the task that holds the delivery, leaving it unsettled
        let provided = AssertUnwindSafe(dependency.provide(ctx, values)).catch_unwind().await;
        let failure = match provided {
            Ok(Ok(())) => continue,
            // a Failure it returned keeps its kind, and is not retried when it says so
            Ok(Err(error)) => {
                let failure = Failure::from_returned(&error, name);
                Failure {
                    message: format!("dependency {name} failed: {}", failure.message),
                    retryable: failure.retryable && retryable(Some(&*error)),
                    ..failure
                }
            }
            Err(panic) => Failure {
                retryable: retryable(None),
                ..Failure::new(
                    FailureKind::Panic,
                    format!("dependency {name} panicked: {}", panic_message(panic.as_ref())),
                )
            },
        };
        if role == TargetRole::Callback {
            tracing::warn!(route = ctx.route_name(), "for the callback: {}", failure.message);
            values.failures.insert(dependency.output_type(), failure.message);
            continue;
        }
        after_all(dependencies, values, &Err(failure.clone())).await;
        return Err(failure);
    }
    Ok(())
}

/// Tell each of `dependencies` that gave a value in `values` the call's `outcome`, in order.
/// A panic in one is logged: the outcome stands, and the others are still told.
pub(crate) async fn after_all(
    dependencies: &[SharedDependency],
    values: &DependencyValues,
    outcome: &Outcome,
) {
    for dependency in dependencies {
        let told = AssertUnwindSafe(dependency.after_call(values, outcome)).catch_unwind().await;
        if let Err(panic) = told {
            tracing::error!(
                dependency = dependency.name(),
                "after_call panicked: {}",
                panic_message(panic.as_ref())
            );
        }
    }
}

/// Tear `dependencies` down in the reverse order of their set-up: one set up later may use
/// one set up before it (a cache on a connection pool) until its own teardown.
pub(crate) async fn tear_down(dependencies: &[SharedDependency]) {
    for dependency in dependencies.iter().rev() {
        tear_down_one(dependency).await;
    }
}

/// Tear `dependency` down. A panic is logged: the others are still torn down, and the stop
/// goes on (worker processes ended, reply queues deleted, the connection closed).
async fn tear_down_one(dependency: &SharedDependency) {
    let torn_down = AssertUnwindSafe(dependency.teardown()).catch_unwind().await;
    if let Err(panic) = torn_down {
        tracing::error!(
            dependency = dependency.name(),
            "teardown panicked: {}",
            panic_message(panic.as_ref())
        );
    }
}

impl fmt::Debug for dyn ErasedDependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dependency that gives every call a clone of one value (a connection pool, a client,
/// shared state), like axum's `State`.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use micro_framework::prelude::*;
/// use micro_framework::dependencies::Shared;
///
/// fn count(Dep(counter): Dep<Arc<AtomicU64>>) {
///     counter.fetch_add(1, Ordering::Relaxed);
/// }
///
/// let route = Route::new(count).dependency(Shared(Arc::new(AtomicU64::new(0))));
/// ```
#[derive(Clone, Debug)]
pub struct Shared<T>(pub T);

#[async_trait]
impl<T: Clone + Send + Sync + 'static> Dependency for Shared<T> {
    type Output = T;

    async fn get(&self, _call: &WorkerContext) -> Result<T, BoxError> {
        Ok(self.0.clone())
    }
}
