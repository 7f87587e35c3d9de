//! Targets: the plain functions (`fn` or `async fn`) that routes call.
//!
//! Any function whose parameters all implement [`FromContext`] (up to 12) and whose return
//! type implements [`IntoOutcome`] is a target:
//!
//! ```
//! use micro_framework::prelude::*;
//! use serde_json::Value;
//!
//! fn sync_target(Payload(value): Payload<Value>) {}
//! async fn async_target(Payload(n): Payload<u32>) -> Result<u32, std::io::Error> { Ok(n + 1) }
//!
//! let _ = Route::new(sync_target);
//! let _ = Route::new(async_target);
//! ```
//!
//! Sync targets run on OS threads of a blocking pool, or on the calling thread when their
//! call is a lone one in its worker pool (in a worker process, on its call thread); async
//! ones run on the runtime. A panic is caught and becomes a failure.

use std::any::type_name;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::handler::blocking::run_blocking;
use crate::handler::extract::{FromContext, SetupError, TargetSetup};
use crate::handler::outcome::panic_message;
pub use crate::handler::outcome::{IntoOutcome, Json, TargetError, TargetResult};
use crate::handler::WorkerContext;

/// A function a route can call. `M` is a marker that tells sync and async functions and their
/// parameter lists apart; it is inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the target of a route",
    label = "not a target",
    note = "a target is a `fn` or `async fn` of at most 12 parameters that each implement \
            `FromContext` (`Payload<T>`, `Dep<T>`, `Args<T>`, ...), returning a type that \
            implements `IntoOutcome`: `()`, `String`, a number, `Value`, a `Vec`, `Option` or \
            map of serializable values, `Json<T>` for any other serializable `T` (a struct of \
            yours), or a `Result` of those whose error converts into `BoxError` (`Send + Sync`)",
    note = "an `async fn`'s future must be `Send`: hold no `std::sync::MutexGuard`, `Rc` or \
            `RefCell` borrow across an `.await`"
)]
pub trait Target<M>: Clone + Send + Sync + 'static {
    /// Whether the target returns an HTTP response (see [`IntoOutcome`]).
    #[doc(hidden)]
    const CARRIES_RESPONSE: bool = false;

    /// Whether the target is an `async fn`, which a time limit can cancel at an `.await`
    /// (a sync one holds its thread to the end).
    #[doc(hidden)]
    const ASYNC: bool = false;

    /// Check at start-up that every parameter can be provided on the route.
    #[doc(hidden)]
    fn check(setup: &TargetSetup) -> Result<(), SetupError>;
    /// Run the target with arguments extracted from `ctx`.
    #[doc(hidden)]
    fn invoke(&self, ctx: WorkerContext) -> BoxFuture<'static, TargetResult>;
}

/// Marker of sync targets.
#[doc(hidden)]
#[derive(Debug)]
pub struct SyncTarget;

/// Marker of async targets.
#[doc(hidden)]
#[derive(Debug)]
pub struct AsyncTarget;

macro_rules! impl_target {
    ($($param:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, R, $($param,)*> Target<(SyncTarget, ($($param,)*))> for F
        where
            F: Fn($($param),*) -> R + Clone + Send + Sync + 'static,
            R: IntoOutcome,
            $($param: FromContext,)*
        {
            const CARRIES_RESPONSE: bool = R::CARRIES_RESPONSE;

            fn check(setup: &TargetSetup) -> Result<(), SetupError> {
                $($param::check(setup)?;)*
                Ok(())
            }

            fn invoke(&self, ctx: WorkerContext) -> BoxFuture<'static, TargetResult> {
                let function = self.clone();
                let lone_call = ctx.lone_call;
                Box::pin(async move {
                    let call = move || -> TargetResult {
                        $(let $param = $param::from_context(&ctx)?;)*
                        function($($param),*).into_outcome()
                    };
                    run_blocking(call, lone_call).await
                })
            }
        }

        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, $($param,)*> Target<(AsyncTarget, ($($param,)*))> for F
        where
            F: Fn($($param),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoOutcome,
            $($param: FromContext,)*
        {
            const CARRIES_RESPONSE: bool = R::CARRIES_RESPONSE;
            const ASYNC: bool = true;

            fn check(setup: &TargetSetup) -> Result<(), SetupError> {
                $($param::check(setup)?;)*
                Ok(())
            }

            fn invoke(&self, ctx: WorkerContext) -> BoxFuture<'static, TargetResult> {
                let function = self.clone();
                let call = async move {
                    $(let $param = $param::from_context(&ctx)?;)*
                    function($($param),*).await.into_outcome()
                };
                Box::pin(AssertUnwindSafe(call).catch_unwind().map(|result| match result {
                    Ok(result) => result,
                    Err(panic) => Err(TargetError::Panic(panic_message(panic.as_ref()))),
                }))
            }
        }
    };
}

impl_target!();
impl_target!(T1);
impl_target!(T1, T2);
impl_target!(T1, T2, T3);
impl_target!(T1, T2, T3, T4);
impl_target!(T1, T2, T3, T4, T5);
impl_target!(T1, T2, T3, T4, T5, T6);
impl_target!(T1, T2, T3, T4, T5, T6, T7);
impl_target!(T1, T2, T3, T4, T5, T6, T7, T8);
impl_target!(T1, T2, T3, T4, T5, T6, T7, T8, T9);
impl_target!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10);
impl_target!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11);
impl_target!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12);

type Invoke = dyn Fn(WorkerContext) -> BoxFuture<'static, TargetResult> + Send + Sync;

/// A target with its types erased, as routes keep it.
#[derive(Clone)]
pub(crate) struct ErasedTarget {
    /// The function's path, e.g. `my_service::tasks::test`.
    pub path: &'static str,
    pub check: fn(&TargetSetup) -> Result<(), SetupError>,
    pub invoke: Arc<Invoke>,
    /// Whether the function is an `async fn` (see [`Target::ASYNC`]).
    pub asynchronous: bool,
    /// Whether the function returns an HTTP response (see [`IntoOutcome`]).
    #[cfg(feature = "http")]
    pub carries_response: bool,
}

impl ErasedTarget {
    pub(crate) fn new<T: Target<M>, M>(target: T) -> Self {
        ErasedTarget {
            path: type_name::<T>(),
            check: T::check,
            invoke: Arc::new(move |ctx| target.invoke(ctx)),
            asynchronous: T::ASYNC,
            #[cfg(feature = "http")]
            carries_response: T::CARRIES_RESPONSE,
        }
    }

    /// The default route name: the function's name, the last segment of its path.
    pub(crate) fn default_name(&self) -> &'static str {
        self.path.rsplit("::").find(|segment| !segment.starts_with("{{")).unwrap_or(self.path)
    }
}

impl std::fmt::Debug for ErasedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path)
    }
}
