//! The public errors as a program's error reporting shows them: `anyhow`'s `{:#}` and `{:?}`
//! (`eyre` alike), or any loop over `source()`. Each message shows once: an error says its
//! source in its own message or returns it from `source()`, never both (the Rust API
//! guidelines, C-GOOD-ERR). Every error is made by a real failure where that is cheap.
#![cfg(feature = "websocket")]

#[path = "common/failing.rs"]
mod failing;
#[path = "common/logs.rs"]
mod logs;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use failing::Failing;
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::rpc::Client;
use micro_framework::dependencies::{Dependency, SetupContext};
use micro_framework::prelude::*;
use micro_framework::testing::{call_route, memory_test_config, FakeProducer, TestService};
use micro_framework::websocket::WebSocketRpcClient;
use micro_framework::WorkerContext;
use micro_framework::{BoxError, DecodeError, Error, ExtractError, Message, SetupError};
use serde_json::{json, Value};

/// `error` as `anyhow` reports it on one line (`{:#}`), once checked that no message of its
/// chain holds its source's, and that the innermost message shows once in `{:#}` and `{:?}`.
/// The bound is the one `anyhow`, `eyre` and `Box<dyn Error + Send + Sync>` ask of an error.
fn reported<E: StdError + Send + Sync + 'static>(error: E) -> String {
    let mut link: &(dyn StdError + 'static) = &error;
    while let Some(source) = link.source() {
        let (outer, inner) = (link.to_string(), source.to_string());
        assert!(!outer.contains(&inner), "{outer:?} repeats its source's message {inner:?}");
        link = source;
    }
    let innermost = link.to_string();
    let error = anyhow::Error::new(error);
    let (one_line, debug) = (format!("{error:#}"), format!("{error:?}"));
    assert_eq!(one_line.matches(&innermost).count(), 1, "{one_line}");
    assert_eq!(debug.matches(&innermost).count(), 1, "{debug}");
    one_line
}

fn noop() {}

/// A route that stops the service is reported with its cause once (it showed twice: `route
/// 'noop' stopped: closed: the queue was deleted: closed: the queue was deleted`); its `Debug`,
/// what a `main` returning the error prints, and the service's log line keep the cause.
#[tokio::test]
async fn a_route_stopping_the_service_is_reported_with_its_cause_once() {
    logs::capture(tracing::Level::ERROR);
    let routes = vec![Route::new(noop).entrypoint(Failing { panic: false })];
    let config = memory_test_config("route_stops");
    let mut service = Runner::new(routes, config).spawn().await.expect("it starts");
    let error = tokio::time::timeout(Duration::from_secs(10), service.wait_finished())
        .await
        .expect("the service stops by itself")
        .expect_err("with the route's error");
    assert!(matches!(error, Error::RouteStopped { .. }), "{error:?}");
    let whole = "route 'noop' stopped: closed: the queue was deleted";
    assert_eq!(error.to_string(), "route 'noop' stopped");
    assert_eq!(format!("{error:?}"), whole);
    assert_eq!(reported(error), whole);
    let logged = logs::logged();
    assert!(logged.contains(&format!("{whole}; stopping the service")), "{logged}");
}

/// Cannot be set up.
struct Unreachable;

#[micro_framework::async_trait]
impl Dependency for Unreachable {
    type Output = ();
    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        Err("the database is unreachable".into())
    }
    async fn get(&self, _call: &WorkerContext) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A dependency that fails to set up is reported with its error once (it showed twice).
#[tokio::test]
async fn a_dependency_failing_to_set_up_is_reported_with_its_error_once() {
    let route =
        Route::new(noop).entrypoint(EventListener::new("shop", "paid")).dependency(Unreachable);
    let error = TestService::start(vec![route], memory_test_config("dependency_fails"))
        .await
        .expect_err("the dependency cannot be set up");
    assert!(matches!(error, Error::Dependency { .. }), "{error:?}");
    let whole = "dependency error_reports::Unreachable failed to set up: the database is \
                 unreachable";
    assert_eq!(format!("{error:?}"), whole);
    assert_eq!(reported(error), whole);
}

/// Refuses, for a reason of its own: an error two sources deep under the framework's.
#[derive(Debug)]
struct PoolRefused(std::io::Error);

impl std::fmt::Display for PoolRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the pool refused a connection")
    }
}

impl StdError for PoolRefused {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// Cannot be set up: its pool refuses, because the database refuses.
struct Refusing;

#[micro_framework::async_trait]
impl Dependency for Refusing {
    type Output = ();
    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by db");
        Err(Box::new(PoolRefused(refused)))
    }
    async fn get(&self, _call: &WorkerContext) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Every cause of a chain deeper than one shows, in order, in the error's `Debug` and in a
/// test call's failure (`call_route`), not only the first.
#[tokio::test]
async fn every_cause_of_a_deeper_chain_is_reported_once_in_order() {
    let whole = "dependency error_reports::Refusing failed to set up: the pool refused a \
                 connection: refused by db";
    let route =
        Route::new(noop).entrypoint(EventListener::new("shop", "paid")).dependency(Refusing);
    let error = TestService::start(vec![route], memory_test_config("dependency_chain"))
        .await
        .expect_err("the dependency cannot be set up");
    assert_eq!(format!("{error:?}"), whole);
    assert_eq!(reported(error), whole);

    let route = Route::new(noop).dependency(Refusing);
    let config = memory_test_config("dependency_chain_call");
    let failure = call_route(route, config, Message::json(&json!({})).unwrap()).await.unwrap_err();
    assert_eq!(failure.full_message(), whole);
}

async fn dispatches_a_map_with_tuple_keys(producer: Producer) -> micro_framework::Result<()> {
    producer.dispatch("odd", &HashMap::from([((1, 2), 3)])).await
}

/// A value that cannot be encoded is reported with serde's reason once, and a target that
/// returns that error fails with the reason once (its failure's message said it twice:
/// `cannot encode message: key must be a string: key must be a string`).
#[tokio::test]
async fn an_event_that_cannot_be_encoded_is_reported_with_the_reason_once() {
    let config = memory_test_config("encode");
    let producer = FakeProducer::new().producer(&config);
    let error = producer.dispatch("odd", &HashMap::from([((1, 2), 3)])).await.unwrap_err();
    assert!(matches!(error, Error::Encode(_)), "{error:?}");
    assert_eq!(reported(error), "cannot encode message: key must be a string");

    let route = Route::new(dispatches_a_map_with_tuple_keys);
    let failure = call_route(route, config, Message::json(&json!({})).unwrap()).await.unwrap_err();
    assert_eq!(failure.full_message(), "cannot encode message: key must be a string");
    assert_eq!(reported(failure), "error: cannot encode message: key must be a string");
}

/// A `text/plain` body that is not UTF-8 says where in its message, and only there.
#[test]
fn a_text_body_that_is_not_utf8_is_reported_once() {
    let mut message = Message { body: vec![b'a', 0xff].into(), ..Message::default() };
    message.properties.content_type = Some("text/plain".into());
    let error = message.decode().unwrap_err();
    assert!(matches!(error, DecodeError::NotUtf8(_)), "{error:?}");
    assert_eq!(
        reported(error),
        "text/plain body is not UTF-8: invalid utf-8 sequence of 1 bytes from index 1"
    );
}

fn refuses(Payload(id): Payload<u64>) -> Result<(), String> {
    Err(format!("no order {id}"))
}

/// The other public errors carry no source, or forward it whole (`#[error(transparent)]`):
/// each reads once under a chain reporter.
#[tokio::test]
async fn every_other_public_error_is_reported_once() {
    // configuration
    let vars = [("WORKER_MODE".to_owned(), "fibers".to_owned())];
    let config_error = Config::from_vars(vars).unwrap_err();
    let shown = reported(config_error.clone());
    assert!(shown.starts_with("invalid config WORKER_MODE=\"fibers\": expected one of"), "{shown}");
    assert_eq!(reported(Error::from(config_error)), shown);

    // transport: nothing listens on the port
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = Config::new("s").with_amqp_uri(format!("amqp://guest:guest@127.0.0.1:{port}/"));
    let transport_error = micro_framework::transport::connect(&down).await.unwrap_err();
    let shown = reported(transport_error.clone());
    assert!(shown.starts_with("broker connection error: "), "{shown}");
    assert_eq!(reported(Error::from(transport_error)), shown);

    // RPC: no such service
    let config = memory_test_config("rpc_errors");
    let client = Client::connect(&config).await.unwrap();
    let error = client.call::<Value>("nobody", "m", (), ()).await.unwrap_err();
    assert_eq!(reported(error), "Unknown service `nobody`");
    client.close().await;

    // a test's hook: the call failed, an unknown route
    let routes = vec![Route::new(refuses).entrypoint(EventListener::new("shop", "paid"))];
    let service = TestService::start(routes, memory_test_config("hook_errors")).await.unwrap();
    let hook = service.hook("refuses").unwrap();
    let error = hook.event::<()>(&7).await.unwrap_err();
    let failure = error.failure().cloned().expect("the call failed");
    assert_eq!(reported(error), "route 'refuses' failed: error: no order 7");
    assert_eq!(reported(failure), "error: no order 7");
    let error = service.hook("refunds").unwrap_err();
    assert_eq!(reported(error), "no route named 'refunds' (routes: refuses)");
    service.stop().await.unwrap();

    // WebSocket RPC: nothing listens on the port
    let client = WebSocketRpcClient::new("127.0.0.1", port).timeout(Duration::from_secs(5));
    let error = client.call::<Value>("echo", (), ()).await.unwrap_err();
    let shown = reported(error);
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");

    // extractors, and a reply's error
    assert_eq!(reported(ExtractError::BadInput("no id".into())), "no id");
    assert_eq!(reported(SetupError::new("only in a callback")), "only in a callback");
    let remote: micro_framework::amqp::rpc::RemoteError =
        serde_json::from_value(json!({"exception": "ValueError", "message": "bad 1"})).unwrap();
    assert_eq!(reported(remote), "ValueError: bad 1");
}
