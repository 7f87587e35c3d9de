//! Where each kind of failure lands in the process worker mode (each call in a worker
//! process), read from the dead letters' headers (a worker's memory is not the test's).
#![cfg(feature = "process")]

mod common;

use std::time::Duration;

use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Dependency;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOff, BackOffPolicy};
use micro_framework::settle::{HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND};
use micro_framework::testing::{test_config, TestService};
use micro_framework::transport::HeaderValue;
use micro_framework::{BoxError, Failure, WorkerContext};
use serde_json::{json, Value};

fn refuses(Payload(_payload): Payload<Value>) -> Result<(), Failure> {
    Err(Failure::bad_input("the order has no id"))
}

#[derive(Clone)]
struct User;

/// Refuses every call for good, as an auth dependency that finds no token does.
struct Auth;

#[micro_framework::async_trait]
impl Dependency for Auth {
    type Output = User;
    async fn get(&self, _call: &WorkerContext) -> Result<User, BoxError> {
        Err(Box::new(Failure::bad_input("no auth token in the message")))
    }
}

fn as_user(Dep(_user): Dep<User>, Payload(_payload): Payload<Value>) {}

fn panics(Payload(_payload): Payload<Value>) {
    panic!("a bug");
}

fn fails(Payload(_payload): Payload<Value>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("the bank is down"))
}

fn callback_fails(Payload(_payload): Payload<Value>, failure: Failure) -> Result<(), String> {
    Err(format!("cannot report {}", failure.kind))
}

/// Start a process-mode service with `routes` (each on the event `paid`, with
/// AsyncBackOff(2, ..)), dispatch one event, and read each route's dead letter: (route, kind,
/// attempts, error).
async fn dead_letters(routes: Vec<Route>) -> Vec<(String, HeaderValue, HeaderValue, String)> {
    let names: Vec<String> = routes.iter().map(|route| route.route_name().to_owned()).collect();
    let config = test_config(&common::unique("fail_proc"))
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(2)
        .with_max_message_size(1024);
    let service_name = config.service_name.clone();
    let service = TestService::start(routes, config).await.unwrap();
    service.dispatch(SHOP, "paid", &json!({"order": 1})).await.unwrap();
    let mut seen = Vec::new();
    for route in names {
        let dlq = format!("evt-{SHOP}-paid--{service_name}.{route}.dlq");
        let mut dead = Vec::new();
        for _ in 0..200 {
            dead = service.take_messages(&dlq).await.unwrap();
            if !dead.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(dead.len(), 1, "{route}: dead-lettered once");
        let header =
            |key: &str| dead[0].properties.headers.get(key).cloned().unwrap_or(HeaderValue::Void);
        let error = header(HEADER_ERROR).as_str().unwrap_or_default().to_owned();
        let (kind, attempts) = (header(HEADER_ERROR_KIND), header(HEADER_ATTEMPTS));
        eprintln!("{route}: kind {kind:?}, attempts {attempts:?}, {error:?}");
        seen.push((route, kind, attempts, error));
    }
    service.stop().await.unwrap();
    seen
}

const SHOP: &str = "process_failures_shop";

fn on_paid(route: Route) -> Route {
    route
        .entrypoint(EventListener::new(SHOP, "paid"))
        .backoff(AsyncBackOff::new(2, Duration::from_millis(20)))
}

fn kind_and_attempts(
    seen: &[(String, HeaderValue, HeaderValue, String)],
) -> Vec<(String, HeaderValue, HeaderValue)> {
    seen.iter()
        .map(|(route, kind, attempts, _)| (route.clone(), kind.clone(), attempts.clone()))
        .collect()
}

fn expected(list: &[(&str, &str, i64)]) -> Vec<(String, HeaderValue, HeaderValue)> {
    list.iter()
        .map(|(route, kind, attempts)| {
            ((*route).to_owned(), HeaderValue::from(*kind), HeaderValue::Int(*attempts))
        })
        .collect()
}

/// What holds in a thread holds in a worker process: a target's own bad input, and a
/// dependency's, is never retried (its kind crosses the worker link); a panic and an error
/// are retried to the end of the backoff; a failing callback's dead letter says why the target
/// failed.
#[tokio::test]
async fn in_a_worker_process_failures_land_where_they_do_in_a_thread() {
    let routes = vec![
        on_paid(Route::new(refuses)),
        on_paid(Route::new(as_user).dependency(Auth)),
        on_paid(Route::new(panics)),
        on_paid(CallbackRoute::new(fails, callback_fails).name("fails")),
    ];
    let seen = dead_letters(routes).await;
    let expected = expected(&[
        ("refuses", "bad_input", 1),
        ("as_user", "bad_input", 1),
        ("panics", "panic", 3),
        ("fails", "error", 3),
    ]);
    assert_eq!(kind_and_attempts(&seen), expected);
    let callback = &seen[3].3;
    assert!(
        callback.starts_with("callback failed: cannot report error (after: the bank is down"),
        "{callback}"
    );
}

const UNSENDABLE_SHOP: &str = "process_failures_unsendable_shop";

/// Takes no payload: the body is never parsed.
fn takes_nothing() {}

/// A call whose message cannot be sent to a worker process (a body over the worker link's
/// 256 MiB frames, with `MAX_MESSAGE_SIZE` raised above it) fails at once: the same call
/// would be refused again (it was retried to the end of the backoff, even by a filter that
/// matches no such failure).
#[tokio::test]
async fn a_call_too_large_for_the_worker_link_is_not_retried() {
    // Everything up to `start` also runs in each worker process.
    let routes = vec![Route::new(takes_nothing)
        .entrypoint(EventListener::new(UNSENDABLE_SHOP, "paid"))
        .backoff(BackOff::new(2, Duration::from_millis(1)))];
    let broker = format!("memory://unsendable-{}?max_bytes=2000000000", uuid::Uuid::new_v4());
    let config = Config::new(common::unique("unsendable"))
        .with_amqp_uri(broker)
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(1)
        .with_max_message_size(300 << 20);
    let service_name = config.service_name.clone();
    let service = TestService::start(routes, config).await.unwrap();
    // a JSON string of 257 MiB: over the worker link's 256 MiB frames
    let payload = "x".repeat(257 << 20);
    service.dispatch(UNSENDABLE_SHOP, "paid", &payload).await.unwrap();
    drop(payload);
    let dlq = format!("evt-{UNSENDABLE_SHOP}-paid--{service_name}.takes_nothing.dlq");
    let mut dead = Vec::new();
    for _ in 0..600 {
        dead = service.take_messages(&dlq).await.unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    service.stop().await.unwrap();
    assert_eq!(dead.len(), 1, "dead-lettered once");
    let header =
        |key: &str| dead[0].properties.headers.get(key).cloned().unwrap_or(HeaderValue::Void);
    eprintln!(
        "kind {:?}, attempts {:?}, error {:?}",
        header(HEADER_ERROR_KIND),
        header(HEADER_ATTEMPTS),
        header(HEADER_ERROR)
    );
    assert_eq!(
        header(HEADER_ATTEMPTS),
        HeaderValue::Int(1),
        "a call that can never be sent was retried"
    );
    let error = header(HEADER_ERROR);
    let error = error.as_str().unwrap_or_default();
    assert!(error.contains("cannot be sent to a worker process: frame too large"), "{error}");
}

/// A database session: commits when told the call succeeded, rolls back otherwise; notes
/// what it was told in its file, a line each.
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

/// Saves in its session, and returns a report of 257 MiB: over the worker link's 256 MiB
/// frames.
fn big_report(Dep(_session): Dep<u8>, Payload(_job): Payload<Value>) -> String {
    "x".repeat(257 << 20)
}

/// Run `big_report` once in `mode` (one retry in the worker); the call's result and what
/// its session was told.
async fn big_outcome(mode: WorkerMode) -> (Result<(), String>, Vec<String>) {
    big_outcome_with(mode, BackOff::new(1, Duration::from_millis(1)), &format!("{mode:?}")).await
}

/// [`big_outcome`] with `backoff`; `test` names the test's session file.
async fn big_outcome_with(
    mode: WorkerMode,
    backoff: BackOffPolicy,
    test: &str,
) -> (Result<(), String>, Vec<String>) {
    // Everything up to `start` also runs in each worker process: the session's file is the
    // one the test named, in its environment, which the workers inherit.
    let session_env = format!("PROCESS_FAILURES_BIG_SESSION_{test}");
    if std::env::var_os(&session_env).is_none() {
        std::env::set_var(&session_env, std::env::temp_dir().join(common::unique("bigsession")));
    }
    let path = std::path::PathBuf::from(std::env::var_os(&session_env).unwrap());
    let config =
        test_config(&common::unique("bigoutcome")).with_worker_mode(mode).with_max_workers(1);
    let routes = vec![Route::new(big_report)
        .entrypoint(EventListener::new(common::unique("bigshop"), "job"))
        .dependency(Session(path.clone()))
        .backoff(backoff)];
    let service = TestService::start(routes, config).await.unwrap();
    let hook = service.hook("big_report").unwrap();
    let called = hook.event::<serde::de::IgnoredAny>(&json!({"id": 1})).await;
    service.stop().await.unwrap();
    let told = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let called = called.map(|_| ()).map_err(|error| error.to_string());
    eprintln!("{mode:?}: call {called:?}, session told {told:?}");
    (called, told.lines().map(str::to_owned).collect())
}

/// In a thread the report is the call's value, and the session commits it.
#[tokio::test]
async fn a_big_outcome_in_a_thread_commits_its_session() {
    let (called, told) = big_outcome(WorkerMode::Thread).await;
    assert_eq!(called, Ok(()));
    assert_eq!(told, ["commit"]);
}

/// An outcome too large for the worker link fails the call before its dependencies are told,
/// as an RPC result over `MAX_MESSAGE_SIZE` does: the session rolls back each attempt (was:
/// the value was found too large only once they were told, and each attempt committed for a
/// call then dead-lettered). Like a crash, the failure has no error to match: retried here,
/// as the route has no retry filter.
#[tokio::test]
async fn an_outcome_too_large_for_the_worker_link_fails_before_its_dependencies_are_told() {
    let (called, told) = big_outcome(WorkerMode::Process).await;
    let error = called.unwrap_err();
    assert!(error.contains("the call's outcome cannot be sent to the service"), "{error}");
    assert_eq!(told, ["rollback error", "rollback error"]);
}

/// A route whose backoff retries I/O errors alone: the value too large for the link is no
/// such error, and the call fails at once, its session told once (rolled back). Mutant: the
/// failure left retryable whatever the filter, the call run again.
#[tokio::test]
async fn a_value_too_large_for_the_worker_link_is_not_retried_past_a_retry_filter() {
    let backoff = BackOff::new(1, Duration::from_millis(1)).retry_on::<std::io::Error>();
    let (called, told) = big_outcome_with(WorkerMode::Process, backoff, "FILTERED").await;
    let error = called.unwrap_err();
    assert!(error.contains("the call's outcome cannot be sent to the service"), "{error}");
    assert_eq!(told, ["rollback error"]);
}
