//! Where a sync target's call runs (in place or on a blocking thread), and how code on that
//! thread waits for a future (`call_blocking`, `dispatch_blocking`).

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::thread::LocalKey;

use tokio::runtime::RuntimeFlavor;

use crate::handler::outcome::{panic_message, TargetError, TargetResult};

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
pub(super) async fn run_blocking(
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::{self, ThreadId};

    use serde_json::Value;

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
