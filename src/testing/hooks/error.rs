//! [`HookError`]: why a call made by a test (a hook's, a worker's) brought no result back.

use std::any::type_name;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::data::{bounded, Failure, Handled, MAX_ERROR_TEXT};
use crate::error::known_routes;

/// Why a call made through an [`EntrypointHook`](crate::testing::EntrypointHook) or a
/// [`WorkerCall`](crate::testing::WorkerCall) brought no result back.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::EventListener;
/// use micro_framework::testing::{test_config, HookError, TestService};
///
/// fn on_paid(Payload(id): Payload<u64>) -> Result<u64, String> {
///     if id > 0 { Ok(id) } else { Err("no order 0".into()) }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let routes = vec![Route::new(on_paid).entrypoint(EventListener::new("shop", "paid"))];
/// let service = TestService::start(routes, test_config("orders")).await.unwrap();
/// let hook = service.hook("on_paid").unwrap();
/// let error = hook.event::<u64>(&0).await.unwrap_err();
/// assert_eq!(error.failure().unwrap().message, "no order 0");
/// assert!(matches!(hook.event::<String>(&7).await, Err(HookError::Result { .. })));
/// assert!(matches!(hook.rpc::<u64>([7], ()).await, Err(HookError::WrongEntrypoint { .. })));
/// assert!(matches!(service.hook("on_refund"), Err(HookError::UnknownRoute { .. })));
/// service.stop().await.unwrap();
/// # });
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// The service has no route of this name.
    #[error("no route named '{route}' ({})", known_routes(route, known))]
    UnknownRoute {
        /// The name asked for.
        route: String,
        /// The names of the service's routes.
        known: Vec<String>,
    },
    /// The route's entrypoint is not the kind the hook's method calls as.
    #[error("route '{route}' is triggered by {actual}, not by {expected}")]
    WrongEntrypoint {
        /// The route.
        route: String,
        /// The entrypoint the method calls as, e.g. `an EventListener`.
        expected: &'static str,
        /// The route's entrypoint, as it describes itself (`no entrypoint` when it has none).
        actual: String,
    },
    /// The call failed: its failure, also when a `CallbackRoute`'s callback handled it.
    #[error("route '{route}' failed: {failure}")]
    Failed {
        /// The route.
        route: String,
        /// Why the call failed (the target's error, bad input, a panic, ...).
        failure: Failure,
        /// True when the route's callback ran and handled the failure.
        called_back: bool,
    },
    /// The call succeeded, but its result does not fit the type asked for.
    #[error(
        "route '{route}' returned {}, which does not fit {expected}: {reason}",
        excerpt(value)
    )]
    Result {
        /// The route.
        route: String,
        /// The type asked for.
        expected: &'static str,
        /// The result.
        value: Value,
        /// What does not fit.
        reason: String,
    },
    /// The event listener's filter skipped the event: the target was not called.
    #[error("route '{route}': the event listener's filter skipped the event")]
    Skipped {
        /// The route.
        route: String,
    },
    /// The service is stopping and hands unstarted calls back: the target was not called.
    #[error("route '{route}' not called: the service is stopping")]
    Stopping {
        /// The route.
        route: String,
    },
    /// The call cannot be made as asked (a payload that cannot be serialized, RPC arguments
    /// that are not a list, an HTTP request for another path, ...).
    #[error("route '{route}' not called: {reason}")]
    Request {
        /// The route.
        route: String,
        /// What is wrong with the call.
        reason: String,
    },
}

impl HookError {
    /// The call's failure, when the call failed.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            HookError::Failed { failure, .. } => Some(failure),
            _ => None,
        }
    }

    pub(crate) fn request(route: &str, reason: impl Into<String>) -> Self {
        HookError::Request { route: route.to_owned(), reason: reason.into() }
    }
}

/// The result of `route`'s call as `T`, or why there is none. A broker-side retry is not
/// scheduled for a test's call: its failure is the call's.
pub(crate) fn call_result<T: DeserializeOwned>(
    route: &str,
    handled: Handled,
) -> Result<T, HookError> {
    let failed =
        |failure, called_back| HookError::Failed { route: route.to_owned(), failure, called_back };
    match handled {
        Handled::Succeeded(value) => typed(route, value),
        Handled::CalledBack(failure) => Err(failed(failure, true)),
        Handled::Failed(failure) | Handled::Retry { failure, .. } => Err(failed(failure, false)),
    }
}

/// `value`, the result of `route`'s call, as `T`.
pub(crate) fn typed<T: DeserializeOwned>(route: &str, value: Value) -> Result<T, HookError> {
    T::deserialize(&value).map_err(|error| HookError::Result {
        route: route.to_owned(),
        expected: type_name::<T>(),
        reason: error.to_string(),
        value,
    })
}

/// A result as quoted in an error: at most [`MAX_ERROR_TEXT`] bytes of its JSON.
fn excerpt(value: &Value) -> String {
    bounded(&value.to_string(), MAX_ERROR_TEXT).into_owned()
}
