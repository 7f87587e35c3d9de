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

use std::any::{type_name, Any};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::LocalKey;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Serialize;
use serde_json::Value;
use tokio::runtime::RuntimeFlavor;

use crate::data::BoxError;
use crate::handler::extract::{ExtractError, FromContext, SetupError, TargetSetup};
use crate::handler::WorkerContext;

/// How a target's call ended, before it becomes an [`Outcome`](crate::data::Outcome).
#[doc(hidden)]
pub type TargetResult = Result<Value, TargetError>;

/// Why a target's call failed.
#[doc(hidden)]
#[derive(Debug)]
#[non_exhaustive]
pub enum TargetError {
    /// An argument could not be extracted.
    Extract(ExtractError),
    /// The target returned an error.
    Error {
        /// The error.
        error: BoxError,
        /// Its Rust type name.
        type_name: &'static str,
    },
    /// The target panicked, with the panic's message.
    Panic(String),
    /// The returned value could not be serialized.
    Unserializable(String),
}

impl From<ExtractError> for TargetError {
    fn from(error: ExtractError) -> Self {
        TargetError::Extract(error)
    }
}

/// A target's return value: `()`, a serializable value, or `Result<T, E>` for any error type.
pub trait IntoOutcome {
    /// Whether the result is an HTTP `Response` (feature `http`): only the result of
    /// a target declared to return one is read as one, so a plain value shaped like a
    /// response (a client's own data, echoed back) stays a value.
    #[doc(hidden)]
    const CARRIES_RESPONSE: bool = false;

    /// The call's result.
    #[doc(hidden)]
    fn into_outcome(self) -> TargetResult;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> TargetResult {
        Ok(Value::Null)
    }
}

impl<T: Serialize, E: Into<BoxError>> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> TargetResult {
        match self {
            Ok(value) => value.into_outcome_value(),
            Err(error) => {
                Err(TargetError::Error { error: error.into(), type_name: type_name::<E>() })
            }
        }
    }
}

/// Any serializable value, as a target's return value (`Json(my_struct)`), also inside a
/// `Result`, an `Option` or a `Vec`, which it serializes as the value it holds (see
/// [`RunningService`](crate::RunningService)'s example).
#[derive(Clone, Debug, PartialEq)]
pub struct Json<T>(pub T);

impl<T: Serialize> Serialize for Json<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<T: Serialize> IntoOutcome for Json<T> {
    fn into_outcome(self) -> TargetResult {
        self.0.into_outcome_value()
    }
}

trait SerializeOutcome {
    fn into_outcome_value(self) -> TargetResult;
}

impl<T: Serialize> SerializeOutcome for T {
    fn into_outcome_value(self) -> TargetResult {
        serde_json::to_value(self).map_err(|error| TargetError::Unserializable(error.to_string()))
    }
}

macro_rules! value_outcomes {
    ($($ty:ty),*) => {$(
        impl IntoOutcome for $ty {
            fn into_outcome(self) -> TargetResult {
                self.into_outcome_value()
            }
        }
    )*};
}

value_outcomes!(
    Value,
    String,
    &'static str,
    bool,
    i8,
    i16,
    i32,
    i64,
    isize,
    u8,
    u16,
    u32,
    u64,
    usize,
    f32,
    f64
);

impl<T: Serialize> IntoOutcome for Vec<T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

impl<T: Serialize> IntoOutcome for Option<T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

impl<T: Serialize> IntoOutcome for HashMap<String, T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

impl<T: Serialize> IntoOutcome for BTreeMap<String, T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

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

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

#[cfg(feature = "process")]
thread_local! {
    /// Set on a thread that runs calls one at a time and nothing else (a worker process's
    /// call thread): sync targets run right there rather than on a blocking thread.
    static SYNC_TARGETS_HERE: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    /// Set on a blocking-pool thread while it runs a sync target.
    static ON_BLOCKING_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the thread-local `flag` set, cleared again after it, also when it panics.
fn with_flag<R>(flag: &'static LocalKey<Cell<bool>>, f: impl FnOnce() -> R) -> R {
    struct Reset(&'static LocalKey<Cell<bool>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    flag.set(true);
    let _reset = Reset(flag);
    f()
}

/// Run `call` as a sync target on this blocking-pool thread.
fn on_blocking_pool(call: impl FnOnce() -> TargetResult) -> TargetResult {
    with_flag(&ON_BLOCKING_POOL, call)
}

/// Wait for `future` from the thread of a sync target (`call_blocking`, `dispatch_blocking`),
/// or say why it cannot wait here (`what` names the caller): outside a runtime, and on a
/// current-thread runtime's own thread, where the future would wait for the very thread it
/// blocks. On a current-thread runtime (a plain `#[tokio::test]`) sync targets run on its
/// blocking pool, where `Handle::block_on` may wait: the runtime's thread drives the I/O.
pub(crate) fn block_on<F: Future>(what: &str, future: F) -> Result<F::Output, String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|error| format!("{what} needs a runtime: {error}"))?;
    match runtime.runtime_flavor() {
        RuntimeFlavor::CurrentThread if ON_BLOCKING_POOL.get() => Ok(runtime.block_on(future)),
        RuntimeFlavor::CurrentThread => {
            Err(format!("{what} cannot run on a current-thread runtime outside a sync target"))
        }
        _ => Ok(tokio::task::block_in_place(|| runtime.block_on(future))),
    }
}

/// Run `f`, in which sync targets are called on this thread. For a thread outside the
/// runtime's workers that drives calls with a multi-threaded runtime's `Handle::block_on`,
/// one at a time: a target there is what it would be on a blocking thread (it may block,
/// `block_in_place` and `Handle::block_on` work), without the hop there and back.
#[cfg(feature = "process")]
pub(crate) fn run_sync_targets_here<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&SYNC_TARGETS_HERE, f)
}

/// Run a sync target's call on this thread when it is a `lone_call` (no other call of its
/// worker pool runs, and none ended just before) or inside [`run_sync_targets_here`], else
/// on a blocking thread; a panic becomes a failure either way.
///
/// A lone call skips the hop to a blocking thread and back, which is most of its added
/// latency: `block_in_place` runs it right here and hands this runtime thread's
/// other tasks to another thread, so a target that blocks holds up nothing. Under load that
/// hand-over on every call costs more than the hop (measured with concurrent HTTP clients),
/// hence only lone calls; and only on a multi-threaded runtime, where `block_in_place` exists.
async fn run_blocking(
    call: impl FnOnce() -> TargetResult + Send + 'static,
    lone_call: bool,
) -> TargetResult {
    #[cfg(feature = "process")]
    let lone_call = lone_call || SYNC_TARGETS_HERE.get();
    if lone_call && may_block_here() {
        let ran = tokio::task::block_in_place(|| std::panic::catch_unwind(AssertUnwindSafe(call)));
        return ran.unwrap_or_else(|panic| Err(TargetError::Panic(panic_message(panic.as_ref()))));
    }
    match tokio::task::spawn_blocking(|| on_blocking_pool(call)).await {
        Ok(result) => result,
        Err(join) => match join.try_into_panic() {
            Ok(panic) => Err(TargetError::Panic(panic_message(panic.as_ref()))),
            Err(join) => Err(TargetError::Panic(join.to_string())),
        },
    }
}

/// Whether this thread may block through `block_in_place`: a multi-threaded runtime's (on a
/// current-thread runtime it would panic), or one outside any runtime's workers.
fn may_block_here() -> bool {
    tokio::runtime::Handle::try_current()
        .map_or(true, |runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread)
}

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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::{self, ThreadId};

    use super::*;

    /// The thread of the task that ran a sync call, and the thread the call ran on.
    async fn threads(lone_call: bool) -> (ThreadId, ThreadId) {
        let caller = thread::current().id();
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let call = move || {
            *record.lock().unwrap() = Some(thread::current().id());
            Ok(Value::Null)
        };
        run_blocking(call, lone_call).await.unwrap();
        let ran = seen.lock().unwrap().unwrap();
        (caller, ran)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_call_runs_on_the_calling_thread_and_others_on_a_blocking_one() {
        let (caller, ran) = tokio::spawn(threads(true)).await.unwrap();
        assert_eq!(caller, ran, "a lone call: no hop");
        let (caller, ran) = tokio::spawn(threads(false)).await.unwrap();
        assert_ne!(caller, ran, "any other: a blocking thread");
    }

    #[tokio::test]
    async fn a_current_thread_runtime_sends_even_a_lone_call_to_a_blocking_thread() {
        let (caller, ran) = threads(true).await;
        assert_ne!(caller, ran, "block_in_place would panic here");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_place_is_a_failure() {
        let ran = run_blocking(|| panic!("boom"), true).await;
        assert!(matches!(ran, Err(TargetError::Panic(message)) if message == "boom"));
    }
}
