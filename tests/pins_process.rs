//! Pins from a mutation review of the process worker mode: a value too large for the worker
//! link fails its call as a crash does, with no error for the route's retry filter to match.
#![cfg(feature = "process")]

mod common;

use std::time::Duration;

use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::config::WorkerMode;
use micro_framework::dependencies::Dependency;
use micro_framework::prelude::*;
use micro_framework::retry::BackOff;
use micro_framework::testing::{test_config, TestService};
use micro_framework::{BoxError, WorkerContext};
use serde_json::{json, Value};

/// A session: notes in its file what it was told of each call, a line each.
struct Session(std::path::PathBuf);

#[micro_framework::async_trait]
impl Dependency for Session {
    type Output = u8;
    async fn get(&self, _call: &WorkerContext) -> Result<u8, BoxError> {
        Ok(1)
    }
    async fn after_call(&self, _value: &u8, outcome: &micro_framework::Outcome) {
        use std::io::Write;
        let told = match outcome {
            Ok(_) => "commit".to_owned(),
            Err(failure) => format!("rollback {}", failure.kind),
        };
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.0).unwrap();
        file.write_all(format!("{told}\n").as_bytes()).unwrap();
    }
}

/// A report of 257 MiB: over the worker link's 256 MiB frames.
fn big_report(Dep(_session): Dep<u8>, Payload(_job): Payload<Value>) -> String {
    "x".repeat(257 << 20)
}

/// A route whose backoff retries I/O errors alone: the value too large for the link is no
/// such error, and the call fails at once, its session told once (rolled back). Mutant: the
/// failure left retryable whatever the filter, the call run again.
#[tokio::test]
async fn a_value_too_large_for_the_worker_link_is_not_retried_past_a_retry_filter() {
    // Everything up to `start` also runs in each worker process: the session's file is the
    // one the test named, in its environment, which the workers inherit.
    let session_env = "PINS_PROCESS_BIG_SESSION";
    if std::env::var_os(session_env).is_none() {
        std::env::set_var(session_env, std::env::temp_dir().join(common::unique("pinsession")));
    }
    let path = std::path::PathBuf::from(std::env::var_os(session_env).unwrap());
    let config = test_config(&common::unique("pinsbig"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1);
    let backoff = BackOff::new(1, Duration::from_millis(1)).retry_on::<std::io::Error>();
    let routes = vec![Route::new(big_report)
        .entrypoint(EventListener::new(common::unique("pinshop"), "job"))
        .dependency(Session(path.clone()))
        .backoff(backoff)];
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("big_report").unwrap();
    let called = hook.event::<serde::de::IgnoredAny>(&json!({"id": 1})).await;
    service.stop().await.unwrap();
    let told = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let error = called.map(|_| ()).unwrap_err().to_string();
    assert!(error.contains("the call's outcome cannot be sent to the service"), "{error}");
    assert_eq!(told.lines().collect::<Vec<_>>(), ["rollback error"]);
}
