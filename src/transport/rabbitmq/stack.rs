//! A default thread stack large enough for the deepest header a frame can hold.
//!
//! lapin parses frames in its own thread, with amq-protocol's recursive parser; the framework
//! converts, copies and drops header values recursively in the runtime's threads. A header of
//! nested arrays costs 5 bytes a level, so a 131,072-byte frame (RabbitMQ's `frame_max`) holds
//! about 26,200 levels: measured, parsing and dropping them needs 32 to 64 MiB of stack in a
//! release build and 128 to 256 MiB in a debug build, where std's default is 2 MiB (a
//! 5,000-deep header aborted the process, again at every restart while it was queued).
//!
//! No API sets the stack of lapin's thread, but every thread spawned without an explicit size
//! takes `RUST_MIN_STACK`, read once, at the first spawn. So it is set before `main` (when the
//! program did not set it), for lapin's thread and the tokio runtime's alike. Untouched stack
//! pages cost address space, not memory.

/// The stack every thread gets by default: enough for the deepest header, with a margin.
const THREAD_STACK_SIZE: usize = if cfg!(debug_assertions) { 512 << 20 } else { 128 << 20 };

/// Set `RUST_MIN_STACK` to [`THREAD_STACK_SIZE`] unless the program's environment sets it.
#[ctor::ctor(unsafe)]
fn default_thread_stack() {
    // Runs before `main`, while the process has one thread: nothing reads the environment
    // concurrently, and no thread was spawned yet.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK_SIZE.to_string());
    }
}
