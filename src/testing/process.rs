//! Process worker modes under a test harness. Worker processes are the program re-executed;
//! under `cargo test` the program is the test binary, so a worker runs it with only the
//! current test selected, and that test, once it reaches `TestService::start`, serves calls
//! instead of going on.

use std::cell::Cell;
use std::ffi::OsString;

use crate::pipeline::spawners::process::worker_socket;
use crate::runner::Runner;
use crate::testing::memory_test_config;

thread_local! {
    /// How many services that start worker processes the test on this thread has started.
    static PROCESS_STARTS: Cell<usize> = const { Cell::new(0) };
}

/// A worker's harness arguments carry which of its test's process-mode starts it serves as a
/// `--skip` filter that no test name matches (libtest takes no argument of ours), followed by
/// the start's number.
const SERVED_START: &str = "mf-worker-serves-process-start-";

/// In a worker process: serve calls with `runner`'s routes until the service closes the link,
/// then exit the process (the rest of the test never runs there). Otherwise: have worker
/// processes re-execute only the current test.
///
/// In a worker, only the start of the service it belongs to serves, told by its arguments
/// (the test's first, second, ... start of a service that starts worker processes). Any other
/// (a thread-mode helper, another process-mode service) becomes a service with no routes on
/// an in-process broker of its own, so that the test goes on to the start whose routes the
/// worker serves, and touches no broker meanwhile.
pub(crate) async fn prepare(runner: Runner) -> Runner {
    let start = runner.starts_workers().then(|| {
        let started = PROCESS_STARTS.get();
        PROCESS_STARTS.set(started + 1);
        started
    });
    if worker_socket().is_some() && start != Some(served_start()) {
        return Runner::new(Vec::new(), memory_test_config("not-served-in-a-worker"));
    }
    if worker_socket().is_some() {
        let code = match runner.run_until(std::future::pending()).await {
            Ok(()) => 0,
            Err(error) => {
                // `Debug`: the message and its causes
                eprintln!("worker process {}: {error:?}", std::process::id());
                1
            }
        };
        std::process::exit(code);
    }
    match (current_test(), start) {
        (Some(test), Some(start)) => runner.worker_args(test_harness_args(test, start)),
        _ => runner,
    }
}

/// Which process-mode start of its test this worker process serves: the first, unless its
/// arguments say otherwise (a program that is no test runs one service).
fn served_start() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .filter(|pair| pair[0] == "--skip")
        .find_map(|pair| pair[1].strip_prefix(SERVED_START)?.parse().ok())
        .unwrap_or(0)
}

/// The test running on this thread: libtest runs each test on a thread named after it. The
/// `main` thread is a program of its own (a doctest, an example): its own arguments serve.
fn current_test() -> Option<String> {
    let thread = std::thread::current();
    thread.name().filter(|name| *name != "main").map(str::to_owned)
}

/// libtest arguments that run `test` alone, with the worker's output shown; also when `test`
/// is `#[ignore]`d and runs because the test binary was given `--ignored`. The worker serves
/// the test's process-mode start number `start`.
fn test_harness_args(test: String, start: usize) -> Vec<OsString> {
    let served = format!("{SERVED_START}{start}");
    let args = [test.as_str(), "--exact", "--include-ignored", "--test-threads=1"];
    args.into_iter()
        .chain(["--nocapture", "--quiet", "--skip", &served])
        .map(OsString::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_test_is_named_by_its_thread() {
        let name = current_test().unwrap();
        assert!(name.ends_with("the_current_test_is_named_by_its_thread"), "{name}");
        let args = test_harness_args(name.clone(), 0);
        assert_eq!(args[0], OsString::from(name));
        assert_eq!(args[1], OsString::from("--exact"));
    }
}
