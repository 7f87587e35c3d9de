//! The runtime lapin's connections end on, built before any ends.
//!
//! lapin's I/O thread drops a connection's socket outside any tokio runtime, where
//! async-compat (the tokio side of lapin's runtime) enters a global runtime of its own, which
//! it builds at that first drop: a runtime thread and its descriptors. A first connection lost
//! while the process was out of file descriptors failed to build it: the I/O thread panicked,
//! the global stayed poisoned, and the end of every later connection panicked again (with
//! `panic = "abort"`, the process would end). Built at the first connect, it is there before
//! any connection is lost.

use std::sync::OnceLock;

/// Build async-compat's runtime, once per process, on a thread outside any tokio runtime
/// (where async-compat turns to it). A failure is logged: the process is already out of
/// threads or descriptors, and the connect that follows is likely to fail too.
pub(super) fn build() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let built = std::thread::Builder::new()
            .name("async-compat-init".into())
            .spawn(|| drop(async_compat::Compat::new(())))
            .map_err(|error| error.to_string())
            .and_then(|thread| thread.join().map_err(|_| "it panicked".to_owned()));
        if let Err(error) = built {
            tracing::error!(
                "cannot build the runtime the broker connections end on ({error}): each \
                 connection that ends will panic its I/O thread"
            );
        }
    });
}
