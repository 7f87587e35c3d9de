//! The handler model end to end: translators, dependencies and their life cycle around a
//! call, on the in-process broker.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use micro_framework::dependencies::{Dependency, Shared};
use micro_framework::prelude::*;
use micro_framework::testing::{call_route, memory_test_config};
use micro_framework::{BoxError, FailureKind, Message, Outcome, WorkerContext};
use serde_json::{json, Value};

fn echo(Payload(payload): Payload<Value>) -> Value {
    payload
}

#[tokio::test]
async fn a_panicking_translator_is_bad_input_not_a_lost_message() {
    let pick = |payload: Value| -> Result<Value, String> {
        // a translator written for one shape, handed another
        Ok(json!(payload["order"].as_object().expect("an order").len()))
    };
    let route = Route::new(echo).translator(pick);
    let message = Message::json(&json!({ "no_order": 1 })).unwrap();
    let outcome = call_route(route, memory_test_config("translate"), message).await;
    let failure = outcome.unwrap_err();
    assert_eq!(failure.kind, FailureKind::BadInput, "{failure}");
    assert!(failure.message.contains("translator #1 panicked: an order"), "{failure}");
}

fn refuses(Payload(order): Payload<Value>) -> Result<(), micro_framework::Failure> {
    Err(micro_framework::Failure::bad_input(format!("order {order} has no id")))
}

/// A `Failure` a target returns keeps its kind: `Failure::bad_input` is bad input, never
/// retried (was: read as any error, kind `error`, retryable, its kind written into its
/// message again).
#[tokio::test]
async fn a_failure_a_target_returns_keeps_its_kind() {
    let route = Route::new(refuses)
        .backoff(micro_framework::retry::AsyncBackOff::new(3, std::time::Duration::ZERO));
    let message = Message::json(&json!({ "x": 1 })).unwrap();
    let failure = call_route(route, memory_test_config("failure_kept"), message).await.unwrap_err();
    let seen = (failure.kind, failure.retryable, failure.message.as_str());
    assert_eq!(seen, (FailureKind::BadInput, false, r#"order {"x":1} has no id"#), "{failure:?}");
}

fn refuses_for_good() -> Result<(), micro_framework::Failure> {
    let failure = micro_framework::Failure::new(FailureKind::Error, "the account is closed");
    Err(micro_framework::Failure { retryable: false, ..failure })
}

/// A `Failure` its target says is not to be retried is not, whatever the backoff.
#[tokio::test]
async fn a_failure_a_target_says_is_not_retryable_is_not_retried() {
    let route = Route::new(refuses_for_good)
        .backoff(micro_framework::retry::AsyncBackOff::new(3, std::time::Duration::ZERO));
    let message = Message::json(&json!({})).unwrap();
    let failure = call_route(route, memory_test_config("not_retryable"), message).await;
    let failure = failure.unwrap_err();
    assert_eq!((failure.kind, failure.retryable), (FailureKind::Error, false), "{failure:?}");
}

/// A dependency that refuses every call for good: an auth dependency that finds no token
/// (`Failure::bad_input`), or one whose failure it says is not to be retried.
struct Refusing {
    gets: Arc<AtomicU32>,
    bad_input: bool,
}

#[derive(Clone)]
struct User;

#[micro_framework::async_trait]
impl Dependency for Refusing {
    type Output = User;
    async fn get(&self, _call: &WorkerContext) -> Result<User, BoxError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let failure = match self.bad_input {
            true => micro_framework::Failure::bad_input("no auth token in the message"),
            false => micro_framework::Failure {
                retryable: false,
                ..micro_framework::Failure::new(FailureKind::Error, "account closed")
            },
        };
        Err(Box::new(failure))
    }
}

fn as_user(Dep(_user): Dep<User>) {}

/// A `Failure` a dependency's `get` returns keeps its kind and says whether it is retried, as
/// a target's does (it was read as any error: kind `error`, retried, its kind written into
/// its message).
#[tokio::test]
async fn a_failure_a_dependency_returns_keeps_its_kind_and_is_not_retried() {
    for (bad_input, kind) in [(true, FailureKind::BadInput), (false, FailureKind::Error)] {
        let gets = Arc::new(AtomicU32::new(0));
        let route = Route::new(as_user)
            .dependency(Refusing { gets: gets.clone(), bad_input })
            .backoff(micro_framework::retry::AsyncBackOff::new(3, std::time::Duration::ZERO));
        let message = Message::json(&json!({})).unwrap();
        let failure = call_route(route, memory_test_config("refusing"), message).await;
        let failure = failure.unwrap_err();
        assert_eq!((failure.kind, failure.retryable), (kind, false), "{failure:?}");
        assert_eq!(gets.load(Ordering::SeqCst), 1);
        let reason = if bad_input { "no auth token in the message" } else { "account closed" };
        let message = format!("dependency {} failed: {reason}", std::any::type_name::<Refusing>());
        assert_eq!(failure.message, message);
    }
}

#[derive(Debug, serde::Deserialize)]
struct Order {
    id: u64,
    note: String,
}

fn order(Payload(order): Payload<Order>) -> Value {
    json!([order.id, order.note])
}

#[tokio::test]
async fn a_payload_read_straight_from_the_body_accepts_and_refuses_as_its_json_value_did() {
    let call = |body: &'static [u8]| {
        let message = Message { body: body.into(), ..Message::json(&()).unwrap() };
        call_route(Route::new(order), memory_test_config("orders"), message)
    };
    let read = call(br#"{"id": 1, "note": "a"}"#).await.unwrap();
    assert_eq!(read, json!([1, "a"]));
    // a key given twice: the JSON value keeps the last, as Python's json does; the struct
    // alone would refuse it
    let twice = call(br#"{"id": 1, "note": "a", "id": 2}"#).await.unwrap();
    assert_eq!(twice, json!([2, "a"]));
    let misfit = call(br#"{"id": "one", "note": "a"}"#).await.unwrap_err();
    assert_eq!(misfit.kind, FailureKind::BadInput);
    assert!(
        misfit.message.ends_with(r#"fit handler::Order: invalid type: string "one", expected u64"#),
        "worded as from the value, with no position in the body: {misfit}"
    );
    let broken = call(b"{oops").await.unwrap_err();
    assert!(broken.message.contains("body is not valid JSON"), "{broken}");
}

#[tokio::test]
async fn a_struct_payload_given_an_array_is_refused_where_serde_would_fill_it_by_position() {
    let refused = |outcome: Outcome| {
        let failure = outcome.unwrap_err();
        assert_eq!(failure.kind, FailureKind::BadInput);
        let expected =
            "payload is an array, where handler::Order takes an object (its fields by name)";
        assert!(failure.message.contains(expected), "{failure}");
    };
    let positional = Message::json(&json!([1, "a"])).unwrap();
    let config = memory_test_config("orders");
    refused(call_route(Route::new(order), config.clone(), positional.clone()).await);
    // a translated payload too
    let translated = Route::new(order).translator(|payload: Value| Ok::<_, String>(payload));
    refused(call_route(translated, config.clone(), positional.clone()).await);
    // an optional struct too
    fn maybe_order(Payload(order): Payload<Option<Order>>) -> Value {
        json!(order.map(|order| order.id))
    }
    let failure = call_route(Route::new(maybe_order), config.clone(), positional.clone()).await;
    let failure = failure.unwrap_err();
    assert_eq!(failure.kind, FailureKind::BadInput);
    assert!(failure.message.contains("is an array, where core::option::Option<"), "{failure}");
    let null = Message::json(&Value::Null).unwrap();
    let none = call_route(Route::new(maybe_order), config.clone(), null).await;
    assert_eq!(none.unwrap(), Value::Null);
    // what takes a sequence still does
    fn pair(Payload((id, note)): Payload<(u64, String)>) -> Value {
        json!([id, note])
    }
    let outcome = call_route(Route::new(pair), config, positional).await;
    assert_eq!(outcome.unwrap(), json!([1, "a"]));
}

/// A struct refuses an array read straight from the body whatever whitespace JSON allows
/// before it (a pretty-printer's newline, a hand-written publisher's spaces).
#[tokio::test]
async fn a_struct_payload_given_an_array_after_whitespace_is_refused_too() {
    for body in ["[1, \"a\"]", " [1, \"a\"]", "\n\t[1, \"a\"]", "\r\n  [1,\"a\"]"] {
        let message =
            Message { body: body.as_bytes().to_vec().into(), ..Message::json(&()).unwrap() };
        let outcome = call_route(Route::new(order), memory_test_config("orders"), message).await;
        let failure = match outcome {
            Ok(value) => panic!("{body:?}: filled by position: {value}"),
            Err(failure) => failure,
        };
        assert_eq!(failure.kind, FailureKind::BadInput, "{body:?}: {failure}");
        assert!(failure.message.contains("payload is an array"), "{body:?}: {failure}");
    }
}

fn forward(Payload(raw): Payload<Box<serde_json::value::RawValue>>) -> String {
    raw.get().to_owned()
}

#[tokio::test]
async fn a_raw_payload_is_the_json_text_as_sent() {
    let body = r#"{"b": 1,  "a": [2, 3]}"#;
    let message = Message { body: body.as_bytes().to_vec().into(), ..Message::json(&()).unwrap() };
    let outcome = call_route(Route::new(forward), memory_test_config("raw"), message).await;
    assert_eq!(outcome.unwrap(), json!(body));
}

/// Writes what its dependency saw into a journal shared with the test.
#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    fn push(&self, entry: String) {
        self.0.lock().unwrap().push(entry);
    }
    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Session;

/// Opens a session for each call and closes it in `after_call`.
struct Sessions(Journal);

#[micro_framework::async_trait]
impl Dependency for Sessions {
    type Output = Session;
    async fn get(&self, _call: &WorkerContext) -> Result<Session, BoxError> {
        self.0.push("open".into());
        Ok(Session)
    }
    async fn after_call(&self, _session: &Session, outcome: &Outcome) {
        let verdict = if outcome.is_ok() { "commit" } else { "roll back" };
        self.0.push(verdict.into());
    }
}

#[derive(Clone)]
struct Client;

/// Cannot provide its value: the service it connects to is down, or it panics.
struct Unreachable {
    panics: bool,
}

#[micro_framework::async_trait]
impl Dependency for Unreachable {
    type Output = Client;
    async fn get(&self, _call: &WorkerContext) -> Result<Client, BoxError> {
        if self.panics {
            panic!("client pool poisoned");
        }
        Err("connection refused".into())
    }
}

fn uses_both(Dep(_session): Dep<Session>, Dep(_client): Dep<Client>) {}

#[tokio::test]
async fn a_dependency_that_fails_to_provide_lets_those_before_it_end_their_call() {
    for panics in [false, true] {
        let journal = Journal::default();
        let route = Route::new(uses_both)
            .dependency(Sessions(journal.clone()))
            .dependency(Unreachable { panics });
        let message = Message::json(&json!({})).unwrap();
        let failure = call_route(route, memory_test_config("deps"), message).await.unwrap_err();
        let expected = if panics { "client pool poisoned" } else { "connection refused" };
        assert!(failure.message.contains(expected), "{failure}");
        // the session opened for the call is rolled back, never left open
        assert_eq!(journal.entries(), ["open", "roll back"], "panics: {panics}");
    }
}

/// Panics in `after_call`.
struct BrokenCommit;

#[micro_framework::async_trait]
impl Dependency for BrokenCommit {
    type Output = Client;
    async fn get(&self, _call: &WorkerContext) -> Result<Client, BoxError> {
        Ok(Client)
    }
    async fn after_call(&self, _client: &Client, _outcome: &Outcome) {
        panic!("commit failed");
    }
}

#[tokio::test]
async fn a_panic_in_after_call_leaves_the_outcome_and_the_other_dependencies_alone() {
    let journal = Journal::default();
    let route = Route::new(uses_both)
        .dependency(BrokenCommit)
        .dependency(Sessions(journal.clone()))
        .dependency(Shared(1_u8));
    let message = Message::json(&json!({})).unwrap();
    let outcome = call_route(route, memory_test_config("after"), message).await;
    assert_eq!(outcome, Ok(Value::Null));
    assert_eq!(journal.entries(), ["open", "commit"]);
}

/// Hangs in `get` or in `after_call`, as a pool with no free connection or a stuck commit.
struct Stuck {
    in_get: bool,
}

#[micro_framework::async_trait]
impl Dependency for Stuck {
    type Output = Client;
    async fn get(&self, _call: &WorkerContext) -> Result<Client, BoxError> {
        if self.in_get {
            std::future::pending::<()>().await;
        }
        Ok(Client)
    }
    async fn after_call(&self, _client: &Client, _outcome: &Outcome) {
        std::future::pending::<()>().await;
    }
}

async fn hangs(Payload(hang): Payload<bool>, Dep(_session): Dep<Session>) {
    if hang {
        std::future::pending::<()>().await;
    }
}

async fn uses_both_async(Dep(_session): Dep<Session>, Dep(_client): Dep<Client>) {}

/// Start `routes` (each on the event `paid` of a new source) in a thread mode with one worker
/// and a time limit of 300 ms, dispatch `payloads` and wait for `calls` calls of `route`;
/// the kinds of the dead letters of `route`, in order.
async fn past_the_time_limit(routes: Vec<Route>, route: &str, payloads: &[Value]) -> Vec<String> {
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::config::WorkerMode;
    use micro_framework::settle::HEADER_ERROR_KIND;
    use micro_framework::testing::TestService;
    use std::time::Duration;

    let config = memory_test_config(&common::unique("limited"))
        .with_worker_mode(WorkerMode::Thread)
        .with_max_workers(1)
        .with_task_time_limit(Some(Duration::from_millis(300)));
    let shop = common::unique("shop");
    let queue = format!("evt-{shop}-paid--{}.{route}", config.service_name);
    let routes = routes
        .into_iter()
        .map(|route| route.entrypoint(EventListener::new(&shop, "paid")))
        .collect();
    let service = TestService::start(routes, config).await.unwrap();
    for payload in payloads {
        service.dispatch(&shop, "paid", payload).await.unwrap();
    }
    // one worker: each call after the first runs once the one before gave its slot up
    service.wait_for_route(route, payloads.len() as u64).await.unwrap();
    let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
    service.stop().await.unwrap();
    let kind = |message: &Message| message.properties.headers.get(HEADER_ERROR_KIND).cloned();
    dead.iter()
        .map(|message| kind(message).and_then(|kind| kind.as_str().map(str::to_owned)).unwrap())
        .collect()
}

#[tokio::test]
async fn a_call_cut_short_by_its_time_limit_rolls_its_session_back() {
    let journal = Journal::default();
    let routes = vec![Route::new(hangs).dependency(Sessions(journal.clone()))];
    let dead = past_the_time_limit(routes, "hangs", &[json!(true), json!(false)]).await;
    assert_eq!(dead, ["timed_out"]);
    // the session of the call cut short is rolled back, not left open
    assert_eq!(journal.entries(), ["open", "roll back", "open", "commit"]);
}

#[tokio::test]
async fn a_get_that_hangs_past_the_time_limit_lets_those_before_it_roll_back() {
    let journal = Journal::default();
    let route = Route::new(uses_both_async)
        .dependency(Sessions(journal.clone()))
        .dependency(Stuck { in_get: true });
    let dead = past_the_time_limit(vec![route], "uses_both_async", &[json!(1), json!(2)]).await;
    assert_eq!(dead, ["timed_out"; 2]);
    assert_eq!(journal.entries(), ["open", "roll back", "open", "roll back"]);
}

/// A sync function cannot be stopped mid-call, but its dependencies' `get`s are async and are
/// held to the limit all the same (they hung for ever).
#[tokio::test]
async fn a_get_that_hangs_past_the_time_limit_before_a_sync_function_is_cut_short() {
    let journal = Journal::default();
    let route = Route::new(uses_both)
        .dependency(Sessions(journal.clone()))
        .dependency(Stuck { in_get: true });
    let dead = past_the_time_limit(vec![route], "uses_both", &[json!(1), json!(2)]).await;
    assert_eq!(dead, ["timed_out"; 2]);
    assert_eq!(journal.entries(), ["open", "roll back", "open", "roll back"]);
}

#[tokio::test]
async fn an_after_call_that_hangs_past_the_time_limit_after_a_sync_function_frees_its_worker() {
    let journal = Journal::default();
    let route = Route::new(uses_both)
        .dependency(Sessions(journal.clone()))
        .dependency(Stuck { in_get: false });
    let dead = past_the_time_limit(vec![route], "uses_both", &[json!(1), json!(2)]).await;
    assert_eq!(dead, ["timed_out"; 2]);
    assert_eq!(journal.entries(), ["open", "commit", "open", "commit"]);
}

#[tokio::test]
async fn an_after_call_that_hangs_past_the_time_limit_frees_its_worker_and_fails_the_call() {
    let journal = Journal::default();
    let route = Route::new(uses_both_async)
        .dependency(Sessions(journal.clone()))
        .dependency(Stuck { in_get: false });
    // a success whose commit is not known to have taken effect is not acked as one
    let dead = past_the_time_limit(vec![route], "uses_both_async", &[json!(1), json!(2)]).await;
    assert_eq!(dead, ["timed_out"; 2]);
    assert_eq!(journal.entries(), ["open", "commit", "open", "commit"]);
}

#[derive(Debug, thiserror::Error)]
#[error("cannot save the order")]
struct SaveError(#[source] std::io::Error);

fn save(Payload(_): Payload<Value>) -> Result<(), SaveError> {
    Err(SaveError(std::io::Error::other("disk full")))
}

fn notify_and_fail(_failure: Failure) -> Result<(), String> {
    Err("mail server down".into())
}

#[tokio::test]
async fn a_failing_callback_keeps_why_the_target_failed_in_the_dead_letter() {
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::settle::HEADER_ERROR;
    use micro_framework::testing::TestService;

    let config = memory_test_config(&common::unique("callback"));
    let shop = common::unique("shop");
    let queue = format!("evt-{shop}-paid--{}.save", config.service_name);
    let routes = vec![
        CallbackRoute::new(save, notify_and_fail).entrypoint(EventListener::new(&shop, "paid"))
    ];
    let service = TestService::start(routes, config).await.unwrap();
    service.dispatch(&shop, "paid", &json!({ "id": 1 })).await.unwrap();
    service.wait_for_route("save", 1).await.unwrap();
    let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
    service.stop().await.unwrap();
    let reason = dead[0].properties.headers[HEADER_ERROR].as_str().unwrap().to_owned();
    assert!(reason.contains("mail server down"), "{reason}");
    assert!(reason.contains("cannot save the order: disk full"), "{reason}");
}

/// Counts its calls and fails each with an error that is no I/O error.
struct CountedOutage(Arc<std::sync::atomic::AtomicU32>);

#[micro_framework::async_trait]
impl Dependency for CountedOutage {
    type Output = Client;
    async fn get(&self, _call: &WorkerContext) -> Result<Client, BoxError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err("connection refused".into())
    }
}

fn needs_client(Dep(_client): Dep<Client>) {}

fn unserializable(
    Dep(calls): Dep<Arc<std::sync::atomic::AtomicU32>>,
) -> Json<std::collections::BTreeMap<Vec<u8>, u8>> {
    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    // a map keyed by non-strings has no JSON form
    Json(std::collections::BTreeMap::from([(vec![1], 1)]))
}

#[tokio::test]
async fn a_retry_filter_holds_for_every_failure_not_only_the_targets_errors() {
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::retry::BackOff;
    use micro_framework::testing::TestService;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    let io_only = || BackOff::new(2, Duration::from_millis(1)).retry_on::<std::io::Error>();
    let config = memory_test_config(&common::unique("filter"));
    let shop = common::unique("shop");
    let (gets, returns) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let routes = vec![
        Route::new(needs_client)
            .entrypoint(EventListener::new(&shop, "paid"))
            .dependency(CountedOutage(gets.clone()))
            .backoff(io_only()),
        Route::new(unserializable)
            .entrypoint(EventListener::new(&shop, "paid"))
            .dependency(Shared(returns.clone()))
            .backoff(io_only()),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    service.dispatch(&shop, "paid", &json!({})).await.unwrap();
    service.wait_for_route("needs_client", 1).await.unwrap();
    service.wait_for_route("unserializable", 1).await.unwrap();
    service.stop().await.unwrap();
    // neither failure is an I/O error: each fails at once, as the filter says
    assert_eq!(gets.load(Ordering::SeqCst), 1, "a dependency's error was retried");
    assert_eq!(returns.load(Ordering::SeqCst), 1, "an unserializable value was retried");
}

/// anyhow turns an `anyhow::Error` into a `Box<dyn Error>` of its own wrapper, whose type is
/// not the error it was made from and whose `source` skips that error: `retry_on::<E>()`
/// finds `E` in an `anyhow::Error` only below a context, as the README says.
#[test]
fn retry_on_finds_an_error_in_an_anyhow_error_only_below_a_context() {
    use micro_framework::retry::BackOff;
    use std::time::Duration;

    let filter = BackOff::new(1, Duration::from_millis(1)).retry_on::<std::io::Error>();
    let boxed = |error: anyhow::Error| -> Box<dyn std::error::Error + Send + Sync> { error.into() };
    let with_context = anyhow::Error::new(std::io::Error::other("disk")).context("reading");
    assert!(filter.accepts(Some(&*boxed(with_context))));
    let plain = anyhow::Error::new(std::io::Error::other("disk"));
    assert!(!filter.accepts(Some(&*boxed(plain))));
}

fn attempt(retry: micro_framework::retry::BackOffData) -> Value {
    json!({ "retry_count": retry.retry_count, "max_retries": retry.max_retries })
}

#[tokio::test]
async fn a_route_called_alone_sees_its_retry_state_as_in_a_service() {
    use micro_framework::retry::{AsyncBackOff, HEADER_RETRY_COUNT};
    use micro_framework::HeaderValue;
    use std::time::Duration;

    let route = || Route::new(attempt).backoff(AsyncBackOff::new(5, Duration::from_secs(1)));
    let first = Message::json(&json!({})).unwrap();
    let outcome = call_route(route(), memory_test_config("retry"), first.clone()).await;
    assert_eq!(outcome, Ok(json!({ "retry_count": 0, "max_retries": 5 })));
    let mut third = first;
    third.properties.headers.insert(HEADER_RETRY_COUNT.into(), HeaderValue::Int(2));
    let outcome = call_route(route(), memory_test_config("retry"), third).await;
    assert_eq!(outcome, Ok(json!({ "retry_count": 2, "max_retries": 5 })));
}

fn noop() {}

#[tokio::test]
async fn dependencies_are_torn_down_in_the_reverse_order_of_their_set_up() {
    use common::journaled::{Fault, Journal, Journaled};
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::testing::TestService;
    for third_fails in [false, true] {
        let journal = Journal::default();
        let mut route = Route::new(noop)
            .entrypoint(RPCListener::new())
            .dependency(Journaled::new("pool", &journal, 1u8))
            .dependency(Shared(Session))
            .dependency(Journaled::new("cache", &journal, 2u16));
        if third_fails {
            let broken = Journaled::new("broken", &journal, 3u32).failing(Fault::SetupFails);
            route = route.dependency(broken);
        }
        let started = TestService::start(vec![route], memory_test_config("lifecycle")).await;
        match started {
            Ok(service) => service.stop().await.unwrap(),
            Err(error) => {
                assert!(third_fails && format!("{error:?}").contains("broken cannot start"))
            }
        }
        let mut expected = vec!["setup pool", "setup cache"];
        if third_fails {
            expected.push("setup broken");
        }
        expected.extend(["teardown cache", "teardown pool"]);
        assert_eq!(journal.lock().unwrap().clone(), expected, "the third fails: {third_fails}");
    }
}

#[derive(Clone)]
struct Connection;

/// A database that is down: every `get` fails.
struct DownDatabase;

#[micro_framework::async_trait]
impl Dependency for DownDatabase {
    type Output = Connection;
    async fn get(&self, _call: &WorkerContext) -> Result<Connection, BoxError> {
        Err("database down".into())
    }
}

fn stores(Payload(_): Payload<Value>, Dep(_): Dep<Connection>) {}

fn report(failure: micro_framework::Failure, Dep(reports): Dep<Arc<Mutex<Vec<String>>>>) {
    reports.lock().unwrap().push(failure.message);
}

fn stores_the_failure(failure: micro_framework::Failure, Dep(_): Dep<Connection>) -> String {
    failure.message
}

/// The callback that reports a database down runs while it is down: a dependency that fails
/// for the callback gives it no value, and only a parameter asking for that value fails it.
#[tokio::test]
async fn a_callback_runs_when_a_dependency_it_does_not_take_fails() {
    use micro_framework::testing::{HookError, TestService};
    let reports: Arc<Mutex<Vec<String>>> = Arc::default();
    let routes = vec![
        CallbackRoute::new(stores, report)
            .name("reported")
            .entrypoint(micro_framework::amqp::entrypoints::EventListener::new("shop", "paid"))
            .dependency(DownDatabase)
            .dependency(Shared(reports.clone())),
        CallbackRoute::new(stores, stores_the_failure)
            .name("stored")
            .entrypoint(micro_framework::amqp::entrypoints::EventListener::new("shop", "paid"))
            .dependency(DownDatabase),
    ];
    let service = TestService::start(routes, memory_test_config("callbacks")).await.unwrap();
    let reported = service.hook("reported").unwrap().event::<Value>(&json!({})).await;
    assert!(matches!(&reported, Err(HookError::Failed { called_back: true, .. })), "{reported:?}");
    let seen = reports.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("DownDatabase failed: database down"), "{seen:?}");
    // a callback that takes the missing value fails with the dependency's failure
    let stored = service.hook("stored").unwrap().event::<Value>(&json!({})).await;
    let Err(HookError::Failed { failure, called_back: false, .. }) = &stored else {
        panic!("{stored:?}")
    };
    assert!(failure.message.contains("callback failed"), "{failure:?}");
    assert!(failure.message.contains("DownDatabase failed: database down"), "{failure:?}");
    service.stop().await.unwrap();
}

/// A database that cannot be reached at set-up.
struct UnreachableDatabase;

#[micro_framework::async_trait]
impl Dependency for UnreachableDatabase {
    type Output = Connection;
    async fn setup(
        &self,
        _setup: &micro_framework::dependencies::SetupContext,
    ) -> Result<(), BoxError> {
        Err("the database is unreachable".into())
    }
    async fn get(&self, _call: &WorkerContext) -> Result<Connection, BoxError> {
        Ok(Connection)
    }
}

#[tokio::test]
async fn a_call_alone_names_the_dependency_that_failed_to_set_up() {
    let route = Route::new(stores).dependency(UnreachableDatabase);
    let failure =
        call_route(route, memory_test_config("alone"), Message::json(&json!({})).unwrap())
            .await
            .unwrap_err();
    assert_eq!(
        failure.message,
        "dependency handler::UnreachableDatabase failed to set up: the database is unreachable"
    );
}

fn declined(Payload(_payload): Payload<Value>) -> Result<(), micro_framework::Failure> {
    let failure = micro_framework::Failure::new(FailureKind::Error, "card declined");
    Err(micro_framework::Failure { error_type: "PaymentDeclined".into(), ..failure })
}

fn unnamed(Payload(_payload): Payload<Value>) -> Result<(), micro_framework::Failure> {
    Err(micro_framework::Failure::new(FailureKind::Error, "no type named"))
}

/// The error type a returned `Failure` names is the one its dead letter and its RPC error
/// carry (`x-error-type`, `exc_type`); one that names none gets the target's error type.
#[tokio::test]
async fn a_failure_a_target_returns_keeps_the_error_type_it_names() {
    let message = || Message::json(&json!({})).unwrap();
    let failure = call_route(Route::new(declined), memory_test_config("declined"), message()).await;
    let failure = failure.unwrap_err();
    assert_eq!(failure.error_type, "PaymentDeclined", "{failure:?}");
    let failure = call_route(Route::new(unnamed), memory_test_config("unnamed"), message()).await;
    let failure = failure.unwrap_err();
    assert!(!failure.error_type.is_empty(), "no error type filled in: {failure:?}");
    assert_ne!(failure.error_type, "PaymentDeclined");
}

fn bad_but_retryable(Payload(_payload): Payload<Value>) -> Result<(), micro_framework::Failure> {
    Err(micro_framework::Failure {
        retryable: true,
        ..micro_framework::Failure::bad_input("no id in the order")
    })
}

/// Bad input is never retried, even when the `Failure` says it may be (the field is public:
/// `Failure { retryable: true, ..micro_framework::Failure::bad_input(..) }`), as the docs of `Failure::from_returned`
/// and of `Failure::retryable` say.
#[tokio::test]
async fn bad_input_a_target_returns_is_never_retried() {
    let route = Route::new(bad_but_retryable)
        .backoff(micro_framework::retry::AsyncBackOff::new(3, std::time::Duration::ZERO));
    let message = Message::json(&json!({})).unwrap();
    let failure = call_route(route, memory_test_config("bad_retryable"), message).await;
    let failure = failure.unwrap_err();
    assert_eq!((failure.kind, failure.retryable), (FailureKind::BadInput, false), "{failure:?}");
}

#[derive(serde::Serialize)]
struct Quote {
    price: u32,
}

fn quote_or_error(Payload(found): Payload<bool>) -> Result<Json<Quote>, String> {
    match found {
        true => Ok(Json(Quote { price: 7 })),
        false => Err("no quote".into()),
    }
}

fn quote_if_any(Payload(found): Payload<bool>) -> Option<Json<Quote>> {
    found.then_some(Json(Quote { price: 7 }))
}

/// A struct of one's own is returned in `Json`, also inside a `Result` or an `Option` (which
/// did not compile: `Json` was no serializable value).
#[tokio::test]
async fn a_struct_in_json_is_returned_inside_a_result_or_an_option() {
    use micro_framework::amqp::entrypoints::EventListener;
    let routes = vec![
        Route::new(quote_or_error).entrypoint(EventListener::new("shop", "quote")),
        Route::new(quote_if_any).entrypoint(EventListener::new("shop", "any")),
    ];
    let config = memory_test_config(&common::unique("json_in"));
    let service = micro_framework::testing::TestService::start(routes, config).await.unwrap();
    let call = |route: &'static str, found: bool| {
        let hook = service.hook(route).unwrap();
        async move { hook.event::<Value>(&json!(found)).await }
    };
    assert_eq!(call("quote_or_error", true).await.unwrap(), json!({"price": 7}));
    assert!(call("quote_or_error", false).await.is_err());
    assert_eq!(call("quote_if_any", true).await.unwrap(), json!({"price": 7}));
    assert_eq!(call("quote_if_any", false).await.unwrap(), Value::Null);
    service.stop().await.unwrap();
}
