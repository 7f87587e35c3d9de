//! Process-wide defaults set before `main`, for what no API of the crates underneath lets the
//! framework set later: the threads' stack size and the allocator's handling of big buffers.
//! Each applies only when the program's environment does not set it.
//!
//! **Stack.** lapin parses frames in its own thread, with amq-protocol's recursive parser; the
//! framework converts, copies and drops header values recursively in the runtime's threads. A
//! header of nested arrays costs 5 bytes a level, so a 131,072-byte frame (RabbitMQ's
//! `frame_max`) holds about 26,200 levels: measured, parsing and dropping them needs 32 to 64
//! MiB of stack in a release build and 256 to 320 MiB in a debug build, where std's default is
//! 2 MiB (a 5,000-deep header aborted the process, again at every restart while it was
//! queued). Every thread spawned without an explicit size takes `RUST_MIN_STACK`, read once at
//! the first spawn, so it is set here, for lapin's thread and the tokio runtime's alike, and
//! removed once a first thread has fixed it: programs the process starts do not inherit it.
//! Untouched stack pages cost address space, not memory.
//!
//! **Big buffers.** glibc's malloc serves a buffer over 128 KiB with its own mapping, but
//! after freeing one it raises that threshold to the freed size, up to 32 MiB: from then on
//! big message bodies come from the heap, which keeps them. Measured with `rpc_service`, 3
//! rounds of 8 concurrent 15 MiB requests left it at 405 MB once idle (16 MB before); with the
//! threshold fixed at 128 KiB it went back to 17.5 MB. `MALLOC_MMAP_THRESHOLD_` (or
//! `GLIBC_TUNABLES`) in the environment keeps the program's own choice.
//!
//! **A worker's watch on its service.** A worker exits once its service is gone (killed,
//! say): watched from before `main`, as a worker may hang in the program's own set-up.
//!
//! **Stop signals of a worker process.** A worker ignores SIGINT and SIGTERM (its service
//! stops it), but it first runs the program's `main` and set-up, where a Ctrl-C sent to the
//! whole process group killed it, and with it the service's start or a worker's replacement.
//! From its first instruction on, a worker catches them with a handler that does nothing
//! (not `SIG_IGN`, which the programs it runs would inherit); until then, from its start, the
//! service has them blocked for it, so that one sent before is caught too.

/// The stack every thread gets by default: enough for the deepest header, with a margin.
const THREAD_STACK_SIZE: usize = if cfg!(debug_assertions) { 512 << 20 } else { 128 << 20 };

/// Buffers from this size up get a mapping of their own, returned to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 128 * 1024;

#[ctor::ctor(unsafe)]
fn process_defaults() {
    // Runs before `main`, while the process has one thread: nothing reads the environment
    // concurrently (the thread `set_thread_stack_default` spawns has ended when it removes
    // the variable), and no other thread was spawned yet.
    #[cfg(all(unix, feature = "process"))]
    crate::pipeline::spawners::process::claim_worker_environment();
    #[cfg(all(unix, feature = "process"))]
    if crate::pipeline::spawners::process::worker_socket().is_some() {
        catch_stop_signals();
    }
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        set_thread_stack_default();
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: mallopt only changes a malloc parameter; any value is valid to pass.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
    // last: a thread that runs on, once the environment is set
    #[cfg(all(unix, feature = "process"))]
    if crate::pipeline::spawners::process::worker_socket().is_some() {
        crate::pipeline::spawners::process::exit_when_orphaned();
    }
}

/// Give every thread spawned without an explicit size [`THREAD_STACK_SIZE`], without handing
/// it to the programs the process starts: std reads `RUST_MIN_STACK` once, at the first
/// spawn, and keeps the value, so a first thread spawned here fixes it, and the variable goes
/// again (a program started later, a worker process included, would reserve that much for
/// each of its own threads; a worker sets it for itself as this process did).
fn set_thread_stack_default() {
    std::env::set_var("RUST_MIN_STACK", THREAD_STACK_SIZE.to_string());
    let first = std::thread::Builder::new().name("mf-stack-default".into()).spawn(|| {});
    // Without a first thread (none could be spawned), the variable stays for the next spawn.
    if first.is_ok_and(|thread| thread.join().is_ok()) {
        std::env::remove_var("RUST_MIN_STACK");
    }
}

/// Does nothing: the signal it catches is meant for the service.
#[cfg(all(unix, feature = "process"))]
extern "C" fn ignore_signal(_: libc::c_int) {}

/// Catch SIGINT and SIGTERM with [`ignore_signal`]; the worker's runtime replaces the handler
/// later with its own, which ignores them too.
#[cfg(all(unix, feature = "process"))]
fn catch_stop_signals() {
    let handler = ignore_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid one to fill; the handler does nothing, so it is
        // async-signal-safe; SA_RESTART resumes the system calls the signal interrupts.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    // blocked by the service from the worker's start until now: one sent meanwhile is
    // delivered here, to the handler that does nothing
    if let Err(error) = crate::pipeline::spawners::process::stop_signals(libc::SIG_UNBLOCK) {
        use std::io::Write as _;
        // not `eprintln!`, which panics when stderr is closed
        let _ = writeln!(
            std::io::stderr(),
            "a worker process cannot unblock SIGINT and SIGTERM: {error}"
        );
    }
}

#[cfg(test)]
mod tests {
    /// Whether the environment this process started with set `name` (what `/proc` shows is
    /// the environment at `exec`, before any `set_var`).
    #[cfg(target_os = "linux")]
    fn started_with(name: &str) -> bool {
        let environ = std::fs::read("/proc/self/environ").unwrap();
        let prefix = format!("{name}=");
        environ.split(|byte| *byte == 0).any(|entry| entry.starts_with(prefix.as_bytes()))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn programs_the_process_starts_do_not_inherit_its_stack_default() {
        if started_with("RUST_MIN_STACK") {
            eprintln!("skipped: the environment sets RUST_MIN_STACK, which children inherit");
            return;
        }
        let output = std::process::Command::new("sh")
            .args(["-c", "printf %s \"${RUST_MIN_STACK-unset}\""])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "unset");
    }

    /// Uses `depth` frames of 64 KiB of stack each.
    fn deep(depth: usize) -> u8 {
        let frame = std::hint::black_box([depth as u8; 64 * 1024]);
        match depth {
            0 => frame[0],
            _ => deep(depth - 1).wrapping_add(frame[frame.len() - 1]),
        }
    }

    #[test]
    fn threads_spawned_without_a_size_get_the_deep_stack() {
        // 16 MiB: eight times std's default of 2 MiB, which would overflow and abort
        let sum = std::thread::spawn(|| deep(256)).join().unwrap();
        std::hint::black_box(sum);
    }
}
