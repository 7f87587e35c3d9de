//! Process worker modes under a test harness. Worker processes are the program re-executed;
//! under `cargo test` the program is the test binary, so a worker runs it with only the
//! current test selected, and that test, once it reaches `TestService::start`, serves calls
//! instead of going on.

use std::ffi::OsString;

use crate::pipeline::spawners::process::worker_socket;
use crate::runner::Runner;
use crate::testing::memory_test_config;

/// In a worker process: serve calls with `runner`'s routes until the service closes the link,
/// then exit the process (the rest of the test never runs there). Otherwise: have worker
/// processes re-execute only the current test.
///
/// A service that starts no worker processes (a thread-mode helper the test starts before
/// the process-mode service it tests) is not the one a worker serves: there it becomes a
/// service with no routes on an in-process broker of its own, so that the test goes on to
/// the start whose routes the worker serves, and touches no broker meanwhile.
pub(crate) async fn prepare(runner: Runner) -> Runner {
    if worker_socket().is_some() && !runner.starts_workers() {
        return Runner::new(Vec::new(), memory_test_config("not-served-in-a-worker"));
    }
    if worker_socket().is_some() {
        let code = match runner.run_until(std::future::pending()).await {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("worker process {}: {error}", std::process::id());
                1
            }
        };
        std::process::exit(code);
    }
    match current_test() {
        Some(test) => runner.worker_args(test_harness_args(test)),
        None => runner,
    }
}

/// The test running on this thread: libtest runs each test on a thread named after it. The
/// `main` thread is a program of its own (a doctest, an example): its own arguments serve.
fn current_test() -> Option<String> {
    let thread = std::thread::current();
    thread.name().filter(|name| *name != "main").map(str::to_owned)
}

/// libtest arguments that run `test` alone, with the worker's output shown; also when `test`
/// is `#[ignore]`d and runs because the test binary was given `--ignored`.
fn test_harness_args(test: String) -> Vec<OsString> {
    [test.as_str(), "--exact", "--include-ignored", "--test-threads=1", "--nocapture", "--quiet"]
        .into_iter()
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
        let args = test_harness_args(name.clone());
        assert_eq!(args[0], OsString::from(name));
        assert_eq!(args[1], OsString::from("--exact"));
    }
}
