//! HTTP entrypoints against a running service, with a real client (reqwest).
#![cfg(feature = "http")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{broker_uris, cleanup, config, unique, wait_until, Probe};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Shared;
use micro_framework::http::{HttpEntrypoint, HttpRequest, Path, Query, Response};
use micro_framework::prelude::*;
use micro_framework::{Error, RunningService};
use serde::Deserialize;
use serde_json::{json, Value};

/// A config serving HTTP on a free loopback port, on a private in-process broker.
fn http_config(service: &str) -> Config {
    let uri = format!("memory://http-{}", uuid::Uuid::new_v4());
    config(&uri, service).with_web_server_address("127.0.0.1:0".into())
}

async fn spawn(routes: Vec<Route>, config: Config) -> (RunningService, String) {
    let service = Runner::new(routes, config).spawn().await.expect("service starts");
    let address = service.web_address().expect("HTTP served");
    (service, format!("http://{address}"))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

#[derive(Deserialize)]
struct Greeting {
    greeting: Option<String>,
}

fn hello(
    Path(name): Path<String>,
    Query(Greeting { greeting }): Query<Greeting>,
    request: HttpRequest,
) -> Value {
    json!({
        "hello": name,
        "greeting": greeting,
        "agent": request.header("x-agent"),
        "method": request.method,
    })
}

#[derive(Deserialize)]
struct Terms {
    a: i64,
    b: i64,
}

fn sum(Payload(Terms { a, b }): Payload<Terms>) -> Value {
    json!({ "sum": a + b })
}

#[derive(Deserialize)]
struct PostPath {
    user: u64,
    slug: String,
}

fn post(Path(PostPath { user, slug }): Path<PostPath>) -> Response {
    Response::status(201).header("location", format!("/users/{user}/posts/{slug}")).json(user)
}

fn missing() -> Response {
    Response::status(404).text("no such thing")
}

fn failing() -> Result<Value, std::io::Error> {
    Err(std::io::Error::other("disk on fire"))
}

fn panicking() -> Value {
    panic!("target panicked on purpose")
}

fn routes() -> Vec<Route> {
    vec![
        Route::new(hello).entrypoint(HttpEntrypoint::get("/hello/{name}")),
        Route::new(sum).entrypoint(HttpEntrypoint::post("/sum")),
        Route::new(post).entrypoint(HttpEntrypoint::put("/users/{user}/posts/{slug}")),
        Route::new(missing).entrypoint(HttpEntrypoint::get("/missing")),
        Route::new(failing).entrypoint(HttpEntrypoint::get("/failing")),
        Route::new(panicking).entrypoint(HttpEntrypoint::get("/panicking")),
    ]
}

#[tokio::test]
async fn path_query_headers_and_json_bodies() {
    let (service, base) = spawn(routes(), http_config("http_ok")).await;
    let http = client();

    let response = http
        .get(format!("{base}/hello/ada%20lovelace?greeting=hi"))
        .header("x-agent", "test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"hello": "ada lovelace", "greeting": "hi", "agent": "test", "method": "GET"})
    );

    let response = http.post(format!("{base}/sum")).json(&json!({"a": 2, "b": 3})).send().await;
    assert_eq!(response.unwrap().json::<Value>().await.unwrap(), json!({"sum": 5}));

    let response = http.put(format!("{base}/users/7/posts/intro")).send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["location"], "/users/7/posts/intro");
    assert_eq!(response.json::<Value>().await.unwrap(), json!(7));

    let response = http.get(format!("{base}/missing")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(response.text().await.unwrap(), "no such thing");

    assert_eq!(http.get(format!("{base}/nowhere")).send().await.unwrap().status(), 404);
    assert_eq!(http.delete(format!("{base}/sum")).send().await.unwrap().status(), 405);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_400_with_a_json_reason() {
    let (service, base) = spawn(routes(), http_config("http_bad")).await;
    let http = client();
    let cases = [
        (
            http.post(format!("{base}/sum"))
                .header("content-type", "application/json")
                .body("{\"a\": 2"),
            "not valid JSON",
        ),
        (
            http.post(format!("{base}/sum")).json(&json!({"a": "two", "b": 3})),
            "payload does not fit",
        ),
        (
            http.post(format!("{base}/sum")).header("content-type", "text/csv").body("1,2"),
            "unsupported content type",
        ),
        (http.put(format!("{base}/users/seven/posts/x")), "path parameters do not fit"),
        (http.get(format!("{base}/hello/ada?greeting=a&greeting=b")), "query string does not fit"),
    ];
    for (request, reason) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "bad_input", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(reason), "{message:?} should say {reason:?}");
    }
    assert_eq!(service.route("sum").unwrap().stats().failed_count(), 3);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn target_errors_and_panics_are_500_with_a_json_body() {
    let (service, base) = spawn(routes(), http_config("http_err")).await;
    let http = client();
    let response = http.get(format!("{base}/failing")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"error": "std::io::error::Error", "message": "disk on fire"}));

    let response = http.get(format!("{base}/panicking")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "panic");
    assert!(body["message"].as_str().unwrap().contains("target panicked on purpose"));

    // the service keeps serving
    assert_eq!(http.get(format!("{base}/hello/x")).send().await.unwrap().status(), 200);
    service.stop().await.unwrap();
}

fn slow(Dep(probe): Dep<Arc<Probe>>) -> Value {
    probe.enter(Value::Null);
    std::thread::sleep(Duration::from_millis(100));
    probe.leave();
    json!("done")
}

#[tokio::test]
async fn the_worker_pool_bounds_concurrent_calls() {
    let probe = Probe::new();
    let routes = vec![Route::new(slow)
        .entrypoint(HttpEntrypoint::get("/slow"))
        .dependency(Shared(probe.clone()))];
    let config = http_config("http_pool").with_max_workers(2);
    let (service, base) = spawn(routes, config).await;
    let http = client();
    let calls = (0..8).map(|_| http.get(format!("{base}/slow")).send());
    for response in futures::future::join_all(calls).await {
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().await.unwrap(), json!("done"));
    }
    let max = probe.max_running.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(max, 2, "8 concurrent requests, MAX_WORKERS=2: at most 2 calls at once");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn bodies_over_max_message_size_are_413() {
    let config = http_config("http_big").with_max_message_size(1024);
    let (service, base) = spawn(routes(), config).await;
    let http = client();
    let big = json!({"a": 1, "b": 2, "pad": "x".repeat(2000)});
    let response = http.post(format!("{base}/sum")).json(&big).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let small = json!({"a": 1, "b": 2});
    let response = http.post(format!("{base}/sum")).json(&small).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(service.route("sum").unwrap().stats().received_count(), 1);
    service.stop().await.unwrap();
}

fn gated(Dep(probe): Dep<Arc<Probe>>) -> Value {
    probe.enter(Value::Null);
    probe.leave();
    json!("finished")
}

#[tokio::test]
async fn a_stopping_service_finishes_running_calls_and_refuses_new_ones() {
    let probe = Probe::closed();
    let routes = vec![Route::new(gated)
        .entrypoint(HttpEntrypoint::get("/gated"))
        .dependency(Shared(probe.clone()))];
    let (service, base) = spawn(routes, http_config("http_stop")).await;
    let http = client();
    let running = tokio::spawn(http.get(format!("{base}/gated")).send());
    probe.wait_started(1).await;
    service.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = http.get(format!("{base}/gated")).send().await;
    assert!(late.is_err() || late.unwrap().status() == 503, "no new call once stopping");
    probe.open();
    let response = running.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!("finished"));
    let mut service = service;
    service.wait_finished().await.unwrap();
    assert_eq!(probe.started(), 1);
}

#[tokio::test]
async fn broken_http_routes_stop_the_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy =
        http_config("http_busy").with_web_server_address(taken.local_addr().unwrap().to_string());
    let route = || Route::new(missing);
    let cases: Vec<(Vec<Route>, Config, &str)> = vec![
        (
            vec![route().entrypoint(HttpEntrypoint::get("/x"))],
            busy,
            "cannot serve HTTP on 127.0.0.1:",
        ),
        (
            vec![
                Route::new(missing).name("a").entrypoint(HttpEntrypoint::get("/x")),
                Route::new(missing).name("b").entrypoint(HttpEntrypoint::get("/x")),
            ],
            http_config("http_dup"),
            "routes a and b both serve HTTP GET /x",
        ),
        (
            vec![
                Route::new(missing).name("a").entrypoint(HttpEntrypoint::get("/x/{id}")),
                Route::new(missing).name("b").entrypoint(HttpEntrypoint::get("/x/{name}")),
            ],
            http_config("http_conflict"),
            "route b: cannot serve HTTP GET /x/{name}",
        ),
        (
            vec![route().entrypoint(HttpEntrypoint::get("x"))],
            http_config("http_path"),
            "must start with '/'",
        ),
        (
            vec![route().entrypoint(HttpEntrypoint::new("BREW", "/x"))],
            http_config("http_method"),
            "unsupported HTTP method",
        ),
    ];
    for (routes, config, reason) in cases {
        let error = Runner::new(routes, config).spawn().await.expect_err("start refused");
        assert!(matches!(error, Error::Startup(_)), "{error:?}");
        assert!(error.to_string().contains(reason), "{error} should say {reason:?}");
    }
    // a refused start frees the address it bound
    let free = http_config("http_free");
    let probe_address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = free.with_web_server_address(probe_address.to_string());
    let routes = vec![
        Route::new(missing).name("a").entrypoint(HttpEntrypoint::get("/x")),
        Route::new(missing).name("b").entrypoint(HttpEntrypoint::get("/x")),
    ];
    assert!(Runner::new(routes, config).spawn().await.is_err());
    assert!(std::net::TcpListener::bind(probe_address).is_ok(), "address freed");
}

async fn create_order(
    Payload(order): Payload<Value>,
    producer: Producer,
) -> micro_framework::Result<Value> {
    producer.dispatch("order_created", &order).await?;
    Ok(json!({"created": order["id"]}))
}

fn record(Payload(order): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(order);
    probe.leave();
}

#[tokio::test]
async fn http_targets_use_dependencies_like_any_target() {
    for uri in broker_uris() {
        let probe = Probe::new();
        let service = unique("http_deps");
        let routes = vec![
            Route::new(create_order).entrypoint(HttpEntrypoint::post("/orders")),
            Route::new(record)
                .entrypoint(EventListener::new(service.clone(), "order_created"))
                .dependency(Shared(probe.clone())),
        ];
        let config = Config::new(service.clone())
            .with_amqp_uri(uri.clone())
            .with_web_server_address("127.0.0.1:0".into());
        let (running, base) = spawn(routes, config).await;
        let response = client().post(format!("{base}/orders")).json(&json!({"id": 9})).send().await;
        assert_eq!(response.unwrap().json::<Value>().await.unwrap(), json!({"created": 9}));
        wait_until(|| probe.finished.load(std::sync::atomic::Ordering::SeqCst) == 1, "event").await;
        assert_eq!(probe.seen.lock().unwrap().clone(), vec![json!({"id": 9})]);
        running.stop().await.unwrap();
        cleanup(&uri, &[service]).await;
    }
}

/// The `http_service` example, as the README runs it.
#[tokio::test]
async fn the_http_service_example_answers_hello_and_sum() {
    let exe = std::env::current_exe().unwrap();
    let example =
        exe.parent().and_then(std::path::Path::parent).unwrap().join("examples/http_service");
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut child = std::process::Command::new(example)
        .env("WEB_SERVER_ADDRESS", address.to_string())
        .env_remove("AMQP_URI")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("example built by cargo test");
    let base = format!("http://{address}");
    let http = client();
    let mut hello = None;
    for _ in 0..200 {
        if let Ok(response) = http.get(format!("{base}/hello/ada")).send().await {
            hello = Some(response.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hello, Some(json!({"hello": "ada"})));
    let sum =
        http.post(format!("{base}/sum")).json(&json!({"a": 2, "b": 40})).send().await.unwrap();
    assert_eq!(sum.json::<Value>().await.unwrap(), json!({"sum": 42}));
    let bad = http.post(format!("{base}/sum")).json(&json!({"a": 2})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    assert!(child.wait().unwrap().success(), "SIGINT stops the example cleanly");
}
