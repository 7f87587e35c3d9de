//! The tokio runtime [`Runner::start`](super::Runner::start) builds: its blocking pool sized for
//! the sync calls the service may run at once, and one runtime thread in a worker process.

#[cfg(feature = "process")]
use crate::pipeline::spawners::process::worker_socket;

/// Tokio's default size of a runtime's blocking pool.
const DEFAULT_BLOCKING_THREADS: usize = 512;

/// The runtime of [`Runner::start`](super::Runner::start). A worker process runs one call at
/// a time: one runtime thread reads its control link (and runs what the call spawns) and a
/// call thread from the blocking pool reads the calls and runs them, sync targets included
/// (so `dispatch_blocking` works), where the default of one runtime thread per core would
/// cost every worker a thread, a stack and a malloc arena per core.
///
/// Its blocking pool holds, beside tokio's default of 512 threads (for blocking work of any
/// kind), one for each sync call the thread-mode contexts may run at once, `sync_calls`:
/// with the default alone, 512 sync calls running in one context would leave those of every
/// other context waiting for a thread, and a `MAX_WORKERS` over 512 would not be reached.
/// The threads are started as calls need them.
pub(super) fn runtime(sync_calls: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.max_blocking_threads(DEFAULT_BLOCKING_THREADS.saturating_add(sync_calls));
    #[cfg(feature = "process")]
    if worker_socket().is_some() && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_runtime_holds_a_thread_for_each_sync_call_beside_the_default() {
        // more sync calls at once than tokio's default blocking pool holds
        let calls = DEFAULT_BLOCKING_THREADS + 8;
        let runtime = runtime(calls).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(calls + 1));
        let blocked: Vec<_> = (0..calls)
            .map(|_| {
                let barrier = barrier.clone();
                runtime.spawn_blocking(move || {
                    barrier.wait();
                })
            })
            .collect();
        // ends only once every call runs at once
        barrier.wait();
        runtime.block_on(futures::future::try_join_all(blocked)).unwrap();
        runtime.shutdown_background();
    }
}
