//! Metrics and health endpoints.
#![cfg(feature = "metrics")]

mod common;

use std::time::Duration;

use common::{broker_uris, config, http_get, unique, MetricsOnAnyPort};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::prelude::*;
use micro_framework::retry::AsyncBackOff;
use micro_framework::testing::TestService;
use serde_json::{json, Value};

fn checked(Payload(payload): Payload<Value>) -> Result<(), String> {
    match payload["ok"].as_bool() {
        Some(true) => Ok(()),
        _ => Err("not ok".into()),
    }
}

fn line_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_known_traffic_and_health_endpoints_answer() {
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "metrics").with_metrics_on_any_port();
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(checked)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(10)))];
        let service = TestService::start(routes, config).await.unwrap();
        let address = service.service().metrics_address().unwrap();
        for ok in [true, true, true, false] {
            service.dispatch(&shop, "job", &json!({ "ok": ok })).await.unwrap();
        }
        // 3 successes, then the failing one: a retry, then dead-lettered.
        service.wait_for_route("checked", 5).await.unwrap();

        let (status, text) =
            tokio::task::spawn_blocking(move || http_get(address, "/metrics")).await.unwrap();
        assert_eq!(status, 200);
        let route = r#"{context="default",route="checked"}"#;
        let value = |name: &str| line_value(&text, &format!("{name}{route}"));
        assert_eq!(value("tasks_number_total"), Some(5.0), "{text}");
        assert_eq!(value("messages_received_total"), Some(5.0), "{text}");
        assert_eq!(value("failed_tasks_total"), Some(2.0), "{text}");
        assert_eq!(value("retries_total"), Some(1.0), "{text}");
        assert_eq!(value("dead_lettered_total"), Some(1.0), "{text}");
        assert_eq!(value("task_duration_seconds_count"), Some(5.0), "{text}");
        assert_eq!(value("tasks_number"), Some(0.0), "{text}");
        assert_eq!(line_value(&text, r#"available_workers{context="default"}"#), Some(3.0));
        assert!(text
            .contains(r#"service_info{context="default",max_workers="3",worker_mode="thread"} 1"#));

        let (live, _) =
            tokio::task::spawn_blocking(move || http_get(address, "/health/live")).await.unwrap();
        let (ready, _) =
            tokio::task::spawn_blocking(move || http_get(address, "/health/ready")).await.unwrap();
        assert_eq!((live, ready), (200, 200));
        service.begin_stop();
        let (ready, _) =
            tokio::task::spawn_blocking(move || http_get(address, "/health/ready")).await.unwrap();
        assert_ne!(ready, 200, "not ready once stopping");
        service.wait_stopped().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn health_and_metrics_name_the_broker_node_in_use() {
    for uri in broker_uris() {
        let shop = unique("shop");
        // On RabbitMQ, a list whose first entry is a dead node (port 1) of the same broker.
        let (list, node) = match uri.starts_with("memory://") {
            true => (uri.clone(), None),
            false => {
                let mut dead = url::Url::parse(&uri).unwrap();
                let node = format!("{}:{}", dead.host_str().unwrap(), dead.port().unwrap_or(5672));
                dead.set_port(Some(1)).unwrap();
                (format!("{dead}, {uri}"), Some(node))
            }
        };
        let config = config(&uri, "node").with_amqp_uri(list).with_metrics_on_any_port();
        let markers = [config.service_name.clone(), shop.clone()];
        let routes = vec![Route::new(checked).entrypoint(EventListener::new(&shop, "job"))];
        let service = TestService::start(routes, config).await.unwrap();
        let address = service.service().metrics_address().unwrap();
        let (ready, body) =
            tokio::task::spawn_blocking(move || http_get(address, "/health/ready")).await.unwrap();
        let (_, metrics) =
            tokio::task::spawn_blocking(move || http_get(address, "/metrics")).await.unwrap();
        let (_, status) =
            tokio::task::spawn_blocking(move || http_get(address, "/status.json")).await.unwrap();
        let status: Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["broker"]["node"], json!(node));
        assert_eq!(ready, 200);
        match &node {
            Some(node) => {
                assert_eq!(body, format!("ready\nbroker: {node}\n"));
                let line = format!("broker_node{{node=\"{node}\"}} 1");
                assert!(metrics.lines().any(|l| l == line), "{line} missing in {metrics}");
            }
            None => {
                assert_eq!(body, "ready\n");
                assert!(!metrics.contains("broker_node{"), "{metrics}");
            }
        }
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

#[tokio::test]
async fn the_topology_lists_what_a_service_declares_without_touching_the_broker() {
    // never contacted
    let config = Config::new("orders").with_amqp_uri("amqp://guest:guest@127.0.0.1:1/".into());
    let routes = vec![Route::new(checked)
        .entrypoint(EventListener::new("shop", "paid"))
        .backoff(AsyncBackOff::new(1, Duration::from_millis(10)))];
    let topology = Runner::new(routes, config).topology().await.unwrap();
    assert_eq!(topology.service, "orders");
    assert_eq!(topology.exchanges[0].name, "shop.events");
    let queues: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(queues, vec!["evt-shop-paid--orders.checked", "evt-shop-paid--orders.checked.dlq"]);
    assert_eq!(topology.bindings[0].routing_key, "paid");
    assert!(!topology.exchanges[0].auto_delete);
    // Nameko's option: the event exchanges a service declares go with their last binding
    let config = Config::new("orders")
        .with_amqp_uri("amqp://guest:guest@127.0.0.1:1/".into())
        .with_auto_delete_event_exchanges(true);
    let routes = vec![Route::new(checked).entrypoint(EventListener::new("shop", "paid"))];
    let topology = Runner::new(routes, config).topology().await.unwrap();
    assert_eq!(topology.exchanges[0].name, "shop.events");
    assert!(topology.exchanges[0].auto_delete, "{:?}", topology.exchanges);
}

#[tokio::test]
async fn the_topology_of_a_service_retrying_through_the_delayed_message_plugin_lists_its_backoff_queue(
) {
    let config = Config::new("orders")
        .with_amqp_uri("amqp://guest:guest@127.0.0.1:1/".into())
        .with_retry_delay(micro_framework::config::RetryDelay::DelayedMessagePlugin);
    let routes = vec![Route::new(checked)
        .entrypoint(EventListener::new("shop", "paid"))
        .backoff(AsyncBackOff::new(1, Duration::from_millis(10)))];
    let topology = Runner::new(routes, config).topology().await.unwrap();
    let exchanges: Vec<&str> = topology.exchanges.iter().map(|e| e.name.as_str()).collect();
    assert!(exchanges.contains(&"orders_backoff"), "{exchanges:?}");
    let queues: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
    assert!(queues.contains(&"orders.checked_backoff_queue"), "{queues:?}");
}

#[derive(serde::Deserialize)]
struct Number {
    n: i64,
}

fn double(
    micro_framework::amqp::rpc::Args(Number { n }): micro_framework::amqp::rpc::Args<Number>,
) -> i64 {
    n * 2
}

async fn caller(
    Payload(service): Payload<String>,
    rpc: micro_framework::amqp::dependencies::RpcProxy,
) -> Result<(), micro_framework::amqp::rpc::RpcError> {
    let _: i64 = rpc.service(service).call("double", [21], ()).await?;
    Ok(())
}

#[tokio::test]
async fn rpc_calls_made_are_counted_by_outcome() {
    for uri in broker_uris() {
        let shop = unique("shop");
        let config = config(&uri, "rpcmetrics");
        let service_name = config.service_name.clone();
        let markers = [service_name.clone(), shop.clone()];
        let routes = vec![
            Route::new(double).entrypoint(RPCListener::new()),
            Route::new(caller).entrypoint(EventListener::new(&shop, "go")),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        service.dispatch(&shop, "go", &service_name).await.unwrap();
        service.dispatch(&shop, "go", &unique("nobody")).await.unwrap();
        service.wait_for_route("caller", 2).await.unwrap();
        let text = service.service().metrics().render();
        let ok = format!(
            r#"rpc_calls_total{{method="double",outcome="ok",service="{service_name}"}} 1"#
        );
        assert!(text.contains(&ok), "{text}");
        assert!(text.contains(r#"outcome="unknown_service""#), "{text}");
        assert!(text.contains("rpc_call_duration_seconds_count"), "{text}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &markers).await;
    }
}

/// The metrics port is as exposed as the HTTP routes' one: silent clients are closed after
/// `HTTP_HEADER_READ_TIMEOUT`, and at most `HTTP_MAX_CONNECTIONS` are held.
#[tokio::test]
async fn the_metrics_server_closes_silent_clients() {
    use tokio::io::AsyncReadExt;
    let config = config(&format!("memory://{}", unique("metrics")), "metrics_hostile")
        .with_metrics_on_any_port()
        .with_http_header_read_timeout(Duration::from_secs(1))
        .with_http_max_connections(2);
    let routes = vec![Route::new(checked).entrypoint(EventListener::new("nowhere", "job"))];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().metrics_address().unwrap();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    for socket in &mut silent {
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "closed after the header-read timeout");
    }
    let (status, _) =
        tokio::task::spawn_blocking(move || http_get(address, "/health/live")).await.unwrap();
    assert_eq!(status, 200, "served once the silent clients are gone");
    service.stop().await.unwrap();
}

/// Fails with an error text that quotes the payload's `note` (as careless code does).
fn noted(Payload(payload): Payload<Value>) -> Result<(), String> {
    match payload["ok"].as_bool() {
        Some(true) => Ok(()),
        _ => Err(format!("refused: {}", payload["note"])),
    }
}

async fn status_service(uri: &str, shop: &str, show_failures: bool) -> TestService {
    let config = config(uri, &format!("status_{shop}"))
        .with_metrics_on_any_port()
        .with_status_show_failures(show_failures);
    let routes = vec![Route::new(noted).entrypoint(EventListener::new(shop, "job"))];
    TestService::start(routes, config).await.unwrap()
}

/// The status page and its JSON: routes with their counts, the pool, the broker; failures
/// only when `STATUS_SHOW_FAILURES` says so, their texts escaped.
#[tokio::test]
async fn the_status_page_shows_routes_counts_and_escaped_failures_when_asked() {
    for uri in broker_uris() {
        for show_failures in [false, true] {
            let shop = unique("shop");
            let service = status_service(&uri, &shop, show_failures).await;
            for ok in [true, true, false] {
                let payload = json!({ "ok": ok, "note": "<script>alert(1)</script>" });
                service.dispatch(&shop, "job", &payload).await.unwrap();
            }
            service.wait_for_route("noted", 3).await.unwrap();
            let address = service.service().metrics_address().unwrap();
            let get = move |path: &'static str| {
                tokio::task::spawn_blocking(move || http_get(address, path))
            };
            let (status, json) = get("/status.json").await.unwrap();
            assert_eq!(status, 200);
            let status: Value = serde_json::from_str(&json).unwrap();
            let route = &status["routes"][0];
            assert_eq!(route["name"], "noted");
            assert_eq!(route["entrypoint"], format!("EventListener({shop}.job)"));
            assert_eq!((route["calls"].as_u64(), route["failures"].as_u64()), (Some(3), Some(1)));
            assert_eq!(route["dead_lettered"], 1);
            assert_eq!(route["dead_letters_waiting"], 1, "{uri}: the DLQ's depth");
            assert!(route["duration_p50"].is_f64(), "{route}");
            assert_eq!(status["pools"][0]["max_workers"], 3);
            assert_eq!(status["broker"]["connected"], true);
            assert!(!status["broker"]["uri"].as_str().unwrap().contains(":guest@"));
            let failures = &status["recent_failures"];
            assert_eq!(failures.is_array(), show_failures, "{status}");

            let (code, page) = get("/").await.unwrap();
            assert_eq!(code, 200);
            assert!(page.contains("<td><b>noted</b>") && page.contains("http-equiv=\"refresh\""));
            assert!(!page.contains("<script>"), "nothing from a message runs: {page}");
            assert_eq!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), show_failures);
            assert_eq!(page.contains("Recent failures"), show_failures);
            service.stop().await.unwrap();
            common::cleanup(&uri, &[shop]).await;
        }
    }
}

/// A TCP proxy to RabbitMQ that can be cut: its connections dropped, new ones refused.
struct Proxy {
    port: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(broker: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks = std::sync::Arc::<std::sync::Mutex<Vec<_>>>::default();
        let pipes = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let broker = broker.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                pipes.lock().unwrap().push(pipe);
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy { port, tasks }
    }

    fn cut(&self) {
        self.tasks.lock().unwrap().drain(..).for_each(|task| task.abort());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// While the broker is away, the status page answers at once and says so: it does not wait
/// for a reconnect to count the dead letters (the publish timeout, 30 s, per route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_answers_at_once_while_the_broker_is_away() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let url = url::Url::parse(&uri).unwrap();
    let broker = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
    let proxy = Proxy::start(broker).await;
    let mut through_proxy = url.clone();
    through_proxy.set_port(Some(proxy.port)).unwrap();
    let shop = unique("shop");
    let service = status_service(through_proxy.as_str(), &shop, false).await;
    let address = service.service().metrics_address().unwrap();
    let get =
        move |path: &'static str| tokio::task::spawn_blocking(move || http_get(address, path));
    let (_, json) = get("/status.json").await.unwrap();
    let status: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["routes"][0]["dead_letters_waiting"], 0, "{status}");

    proxy.cut();
    common::wait_until_async(|| async { get("/health/ready").await.unwrap().0 == 503 }).await;
    for path in ["/status.json", "/"] {
        let started = std::time::Instant::now();
        let (code, body) = get(path).await.unwrap();
        let took = started.elapsed();
        assert_eq!(code, 200, "{path}: {body}");
        assert!(took < Duration::from_secs(5), "{path} took {took:?} while disconnected");
        if path == "/" {
            assert!(body.contains("id=\"broker\">not connected</b>"), "{body}");
        } else {
            let status: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(status["broker"]["connected"], false, "{status}");
            assert_eq!(status["routes"][0]["dead_letters_waiting"], Value::Null, "{status}");
        }
    }
    // the route ends with the broker unreachable: the stop reports it
    let stopped = tokio::time::timeout(Duration::from_secs(60), service.stop()).await;
    assert!(stopped.is_ok(), "stops while disconnected");
    common::cleanup(&uri, &[shop]).await;
}

async fn sleepy() -> &'static str {
    tokio::time::sleep(Duration::from_millis(500)).await;
    "slept"
}

/// HTTP clients that hang up before their answer: once their calls end, none counts as
/// running, and every worker slot is free again.
#[cfg(feature = "http")]
#[tokio::test]
async fn a_call_whose_http_client_hung_up_is_no_longer_counted_as_running() {
    use tokio::io::AsyncWriteExt;
    let uri = format!("memory://{}", unique("hangup"));
    let config = config(&uri, "hangup").with_web_server_address("127.0.0.1:0".into());
    let routes =
        vec![Route::new(sleepy).entrypoint(micro_framework::http::HttpEntrypoint::get("/sleepy"))];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.web_address().unwrap();
    let running = r#"tasks_number{context="default",route="sleepy"}"#;
    for started in 1..=3 {
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client.write_all(b"GET /sleepy HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let metrics = service.metrics().clone();
        let total = r#"tasks_number_total{context="default",route="sleepy"}"#;
        let call = || line_value(&metrics.render(), total) == Some(f64::from(started));
        common::wait_until(call, "a call").await;
        drop(client);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = service.metrics().render();
    assert_eq!(line_value(&text, running), Some(0.0), "{text}");
    let free = line_value(&text, r#"available_workers{context="default"}"#);
    assert_eq!(free, Some(3.0), "{text}");
    service.stop().await.unwrap();
}

/// Runs until its caller gives up on it.
async fn endless() {
    std::future::pending::<()>().await;
}

/// A call whose future is dropped before its end (a hook's call under a timeout, a custom
/// entrypoint's caller gone): it no longer counts as running, and its worker slot counts as
/// free again.
#[tokio::test]
async fn a_call_dropped_before_its_end_is_no_longer_counted_as_running() {
    let uri = format!("memory://{}", unique("dropped"));
    let routes = vec![Route::new(endless).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config(&uri, "dropped")).await.unwrap();
    let metrics = service.service().metrics();
    let running = r#"tasks_number{context="default",route="endless"}"#;
    let free = r#"available_workers{context="default"}"#;
    let counts = || {
        let text = metrics.render();
        (line_value(&text, running), line_value(&text, free))
    };
    let hook = service.hook("endless").unwrap();
    tokio::select! {
        ended = hook.rpc::<()>((), ()) => panic!("the endless call ended: {ended:?}"),
        () = common::wait_until(|| counts() == (Some(1.0), Some(2.0)), "a running call") => {}
    }
    // the call's future was dropped mid-call
    assert_eq!(counts(), (Some(0.0), Some(3.0)), "{}", metrics.render());
    service.stop().await.unwrap();
}

/// A free port on loopback, for a server of the test to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Liveness must not depend on the broker: a service that waits for an unreachable broker at
/// start-up keeps running (it retries), and an orchestrator probing `/health/live` would
/// restart it in a loop for the whole outage if the server came up only once connected.
#[tokio::test]
async fn health_live_answers_while_the_service_waits_for_an_unreachable_broker() {
    let port = free_port();
    // nothing listens on port 1: the start retries the broker until stopped
    let config = Config::new(unique("waiting"))
        .with_amqp_uri("amqp://guest:guest@127.0.0.1:1/".into())
        .with_enable_metrics(true)
        .with_metrics(micro_framework::config::MetricsConfig { host: "127.0.0.1".into(), port });
    let routes = vec![Route::new(checked).entrypoint(EventListener::new("shop", "paid"))];
    let stop = tokio_util::sync::CancellationToken::new();
    let running =
        tokio::spawn(Runner::new(routes, config).run_until(stop.clone().cancelled_owned()));
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let probe = |path: &'static str| tokio::task::spawn_blocking(move || http_get(address, path));
    common::wait_until_async(|| async { probe("/health/live").await.unwrap().0 == 200 }).await;
    let (ready, body) = probe("/health/ready").await.unwrap();
    let (metrics_status, metrics) = probe("/metrics").await.unwrap();
    let (status_page, _) = probe("/status.json").await.unwrap();
    assert!(!running.is_finished(), "the service waits for the broker");
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!((ready, body.as_str()), (503, "starting\n"));
    assert_eq!(metrics_status, 200);
    assert!(metrics.lines().any(|line| line == "broker_connected 0"), "{metrics}");
    assert_eq!(status_page, 503, "no routes to show yet");
    // the stop released the port
    common::wait_until_async(|| async { probe("/health/live").await.unwrap().0 == 0 }).await;
}

/// A metrics port in use stops the start before the broker is touched: the routes of an
/// instance that is about to fail must not consume (and take messages) meanwhile.
#[tokio::test]
async fn a_metrics_port_in_use_stops_the_start_before_the_broker_is_touched() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    // an unreachable broker: only a start that binds first fails for the port
    let config = Config::new(unique("port_taken"))
        .with_amqp_uri("amqp://guest:guest@127.0.0.1:1/".into())
        .with_enable_metrics(true)
        .with_metrics(micro_framework::config::MetricsConfig { host: "127.0.0.1".into(), port });
    let routes = vec![Route::new(checked).entrypoint(EventListener::new("shop", "paid"))];
    let error = Runner::new(routes, config).spawn().await.expect_err("the start fails");
    assert!(error.to_string().contains("cannot serve metrics"), "{error}");
}

fn pong() -> &'static str {
    "pong"
}

/// RPC routes answer their failures and never dead-letter: the status page must not look up
/// a `rpc-{service}.dlq`, which does not exist on RabbitMQ, where each lookup logs a channel
/// error (one per RPC route at every load of the page, which reloads itself every 5 s).
#[tokio::test]
async fn the_status_page_looks_up_no_dead_letter_queue_for_rpc_routes() {
    let uri = format!("memory://{}", unique("rpc_status"));
    let config = config(&uri, "rpc_status").with_metrics_on_any_port();
    // were it looked up, the page would count its messages: 0
    let broker = micro_framework::transport::connect(&config).await.unwrap();
    let dlq = format!("rpc-{}.dlq", config.service_name);
    broker.declare_queue(&micro_framework::transport::QueueSpec::durable(dlq)).await.unwrap();
    let routes = vec![Route::new(pong).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().metrics_address().unwrap();
    let (_, status) =
        tokio::task::spawn_blocking(move || http_get(address, "/status.json")).await.unwrap();
    service.stop().await.unwrap();
    broker.close().await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["routes"][0]["name"], "pong", "{status}");
    assert_eq!(status["routes"][0]["dead_letters_waiting"], Value::Null, "{status}");
}

/// The series of a Prometheus text: each sample's name and labels, without its value.
fn series(metrics: &str) -> std::collections::BTreeSet<String> {
    let samples = metrics.lines().filter(|line| !line.starts_with('#'));
    samples.filter_map(|line| line.rsplit_once(' ')).map(|(series, _)| series.to_owned()).collect()
}

/// The status page changes nothing: reading it (and its history's sampling) adds no series
/// to `/metrics`, where it added a `dead_lettered_total` and a `retries_total` at 0 for an
/// RPC route, which never dead-letters, and the series of a route not called yet.
#[tokio::test]
async fn reading_the_status_page_adds_no_series_to_the_metrics() {
    let uri = format!("memory://{}", unique("status_reads"));
    let config = config(&uri, "status_reads").with_metrics_on_any_port();
    let routes = vec![Route::new(pong).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().metrics_address().unwrap();
    let get = |path: &'static str| tokio::task::spawn_blocking(move || http_get(address, path));
    let (_, before) = get("/metrics").await.unwrap();
    let (status, page) = get("/status.json").await.unwrap();
    let (_, after) = get("/metrics").await.unwrap();
    service.stop().await.unwrap();
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["routes"][0]["calls"], 0, "{page}");
    let added: Vec<_> = series(&after).difference(&series(&before)).cloned().collect();
    assert!(added.is_empty(), "series added by reading /status.json: {added:#?}");
}

/// Fails its first attempt, then succeeds.
fn fails_once(
    Dep(attempts): Dep<std::sync::Arc<std::sync::atomic::AtomicU32>>,
) -> Result<(), String> {
    match attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => Err("the first attempt fails".into()),
        _ => Ok(()),
    }
}

fn always_fails() -> Result<(), String> {
    Err("always".into())
}

/// Retries in the worker (`BackOff`) count in `retries_total` on every route, an RPC one too;
/// a call counts in `failed_tasks_total` only if its last attempt fails, once.
#[tokio::test]
async fn retries_in_the_worker_are_counted_on_every_route_and_fail_a_call_only_at_its_end() {
    use micro_framework::amqp::rpc::Client;
    use micro_framework::dependencies::Shared;
    use micro_framework::retry::BackOff;
    let uri = format!("memory://{}", unique("worker_retries"));
    let config = config(&uri, "worker_retries").with_metrics_on_any_port();
    let backoff = || BackOff::new(2, Duration::from_millis(10));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let routes = vec![
        Route::new(fails_once)
            .entrypoint(RPCListener::new())
            .backoff(backoff())
            .dependency(Shared(attempts)),
        Route::new(always_fails).entrypoint(RPCListener::new()).backoff(backoff()),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let client = Client::connect(&config).await.unwrap();
    let name = &config.service_name;
    assert_eq!(client.call::<()>(name, "fails_once", (), ()).await, Ok(()));
    assert!(client.call::<()>(name, "always_fails", (), ()).await.is_err());
    client.close().await;
    let text = service.service().metrics().render();
    service.stop().await.unwrap();
    let count = |metric: &str, route: &str| {
        line_value(&text, &format!("{metric}{{context=\"default\",route=\"{route}\"}}"))
    };
    let counted = |route| {
        let names = ["messages_received_total", "tasks_number_total", "retries_total"];
        names.map(|metric| count(metric, route)).to_vec()
    };
    assert_eq!(counted("fails_once"), [Some(1.0), Some(1.0), Some(1.0)], "{text}");
    assert_eq!(count("failed_tasks_total", "fails_once").unwrap_or(0.0), 0.0, "{text}");
    assert_eq!(counted("always_fails"), [Some(1.0), Some(1.0), Some(2.0)], "{text}");
    assert_eq!(count("failed_tasks_total", "always_fails"), Some(1.0), "{text}");
}

#[cfg(all(feature = "http", feature = "websocket"))]
fn known_http() -> &'static str {
    "known"
}

#[cfg(all(feature = "http", feature = "websocket"))]
fn known_rpc() -> u32 {
    1
}

#[cfg(all(feature = "http", feature = "websocket"))]
fn known_ws() -> u32 {
    2
}

#[cfg(all(feature = "http", feature = "websocket"))]
fn known_event(Payload(_): Payload<Value>) {}

/// Names a peer or a client chooses (RPC methods, HTTP paths and methods, WebSocket commands,
/// event types none of the routes serves) add no series: labels come from the routes, so a
/// hostile client cannot grow `/metrics` without bound.
#[cfg(all(feature = "http", feature = "websocket"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_a_peer_or_a_client_chooses_add_no_series() {
    use micro_framework::amqp::rpc::Client;
    use micro_framework::http::HttpEntrypoint;
    use micro_framework::websocket::{WebSocketEntrypoint, WebSocketRpcClient};
    let uri = format!("memory://{}", unique("named_by_peers"));
    let shop = unique("shop");
    let config = config(&uri, "named_by_peers")
        .with_metrics_on_any_port()
        .with_web_server_address("127.0.0.1:0".into())
        .with_websocket_ip("127.0.0.1".into())
        .with_websocket_port(0);
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(known_http).entrypoint(HttpEntrypoint::get("/known")),
        Route::new(known_rpc).entrypoint(RPCListener::new()),
        Route::new(known_ws).entrypoint(WebSocketEntrypoint::new()),
        Route::new(known_event).entrypoint(EventListener::new(&shop, "known")),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let running = service.service();
    let (web, ws) = (running.web_address().unwrap(), running.websocket_address().unwrap());
    // one call of each route first, so that every series of the routes exists
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("http://{web}/known")).send().await.unwrap().status(), 200);
    let client = Client::connect(&config).await.unwrap();
    assert_eq!(client.call::<u32>(&service_name, "known_rpc", (), ()).await, Ok(1));
    let websocket =
        WebSocketRpcClient::new(ws.ip().to_string(), ws.port()).timeout(Duration::from_secs(10));
    assert_eq!(websocket.call::<u32>("known_ws", (), ()).await.unwrap(), 2);
    service.dispatch(&shop, "known", &json!({})).await.unwrap();
    service.wait_for_route("known_event", 1).await.unwrap();
    let before = running.metrics().render();

    for n in 0..5 {
        let unknown = format!("unknown_{n}");
        let answer = http.get(format!("http://{web}/{unknown}")).send().await.unwrap();
        assert_eq!(answer.status(), 404);
        let answer = http.post(format!("http://{web}/known")).body("x").send().await.unwrap();
        assert_eq!(answer.status(), 405);
        assert!(client.call::<Value>(&service_name, &unknown, (), ()).await.is_err());
        assert!(websocket.call::<Value>(&unknown, (), ()).await.is_err());
        service.dispatch(&shop, &unknown, &json!({})).await.unwrap();
    }
    let after = running.metrics().render();
    client.close().await;
    service.stop().await.unwrap();
    let added: Vec<_> = series(&after).difference(&series(&before)).cloned().collect();
    assert!(added.is_empty(), "series a client added by naming things: {added:#?}");
    assert!(!after.contains("unknown_"), "{after}");
}

/// A metric of one's own, made with the `prometheus` the crate re-exports and registered in
/// the service's registry, is rendered with the service's.
#[tokio::test]
async fn a_metric_of_ones_own_is_rendered_with_the_services() {
    use micro_framework::metrics::prometheus::{IntCounter, Opts};
    let uri = format!("memory://{}", unique("own_metric"));
    let routes = vec![Route::new(sleepy).entrypoint(RPCListener::new())];
    let service = Runner::new(routes, config(&uri, "own_metric")).spawn().await.unwrap();
    let orders = IntCounter::with_opts(Opts::new("orders_total", "orders taken")).unwrap();
    service.metrics().registry().register(Box::new(orders.clone())).unwrap();
    orders.inc_by(3);
    let text = service.metrics().render();
    assert_eq!(line_value(&text, "orders_total"), Some(3.0), "{text}");
    service.stop().await.unwrap();
}

fn as_text() -> String {
    "not a number".into()
}

async fn answer_late() -> u32 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    1
}

/// Calls `method` of `service` as the event says (`"service method"`): `big` sends an
/// argument over `MAX_MESSAGE_SIZE`, `abandon` drops its reply unawaited.
async fn calls_as_told(
    Payload(what): Payload<String>,
    rpc: micro_framework::amqp::dependencies::RpcProxy,
) -> Result<(), String> {
    let (service, method) = what.split_once(' ').unwrap_or_default();
    let service = rpc.service(service).timeout(Duration::from_millis(300));
    let failed = |error: micro_framework::amqp::rpc::RpcError| error.kind().to_owned();
    match method {
        "big" => service.call::<i64>("double", ["x".repeat(4096)], ()).await.map(drop),
        "abandon" => service.call_async("answer_late", (), ()).await.map(drop),
        "nowhere" => {
            let nowhere = rpc.service(format!("{}-nowhere", what.split(' ').next().unwrap_or("")));
            nowhere.call_async("answer_late", (), ()).await.map(drop)
        }
        method => service.call::<u32>(method, (), ()).await.map(drop),
    }
    .map_err(failed)
}

/// Each RPC call a target makes is counted once, whatever ends it: a request that cannot be
/// sent (`transport`), a reply never awaited (`abandoned`), a timeout; a reply that does not
/// fit the caller's type counts `ok` (the service answered it).
#[tokio::test]
async fn every_rpc_call_a_target_makes_is_counted_once_with_its_outcome() {
    let shop = unique("shop");
    let config = micro_framework::testing::test_config(&unique("rpcoutcomes"))
        .with_max_message_size(1024)
        .with_max_workers(4);
    let name = config.service_name.clone();
    let routes = vec![
        Route::new(double).entrypoint(RPCListener::new()),
        Route::new(as_text).entrypoint(RPCListener::new()),
        Route::new(answer_late).entrypoint(RPCListener::new()),
        Route::new(calls_as_told).entrypoint(EventListener::new(&shop, "go")),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let mut failures = Vec::new();
    for method in ["big", "abandon", "as_text", "answer_late", "nowhere"] {
        let waiter = service.waiter("calls_as_told").unwrap();
        service.dispatch(&shop, "go", &format!("{name} {method}")).await.unwrap();
        failures.push(format!("{:?}", waiter.wait().await.unwrap().handled));
    }
    // the abandoned call's and the timed-out call's requests still run
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let text = service.service().metrics().render();
    service.stop().await.unwrap();
    let calls: Vec<&str> =
        text.lines().filter(|line| line.starts_with("rpc_calls_total")).collect();
    let nowhere = format!("{name}-nowhere");
    let expected = [
        ("double", "transport", &name),
        ("answer_late", "abandoned", &name),
        ("as_text", "ok", &name),
        ("answer_late", "timeout", &name),
        // sent with `call_async`, refused at once: counted with its error, not as abandoned
        ("answer_late", "unknown_service", &nowhere),
    ];
    for (method, outcome, service) in expected {
        let line = format!(
            r#"rpc_calls_total{{method="{method}",outcome="{outcome}",service="{service}"}} 1"#
        );
        assert!(calls.contains(&line.as_str()), "{line} not in {calls:#?}\n{failures:#?}");
    }
    assert_eq!(calls.len(), expected.len(), "{calls:#?}");
    assert!(failures[2].contains("unexpected_result"), "{failures:#?}");
}

fn flat_out_fails(Payload(_): Payload<Value>) -> Result<(), String> {
    Err("always".into())
}

/// A broker retry whose delay queue the broker refuses goes back to the route's queue marked
/// as the retry, and runs as one: it counts in `retries_total` as a retry scheduled does.
#[tokio::test]
async fn a_retry_handed_back_for_want_of_its_delay_queue_is_counted() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("retrycount");
    let shop = unique("shop");
    let config = config(&uri, "retrycount").with_amqp_uri(user.uri(&uri));
    let markers = [config.service_name.clone(), shop.clone()];
    let routes = vec![Route::new(flat_out_fails)
        .entrypoint(EventListener::new(&shop, "go"))
        .backoff(AsyncBackOff::new(2, Duration::from_millis(50)))];
    let service = TestService::start(routes, config).await.unwrap();
    // from now on no delay queue can be declared: each retry copy is refused
    user.permit(r"^(?!.*\.delay-).*$", ".*", ".*");
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.dispatch(&shop, "go", &json!({})).await.unwrap();
    let labels = r#"{context="default",route="flat_out_fails"}"#;
    let value = |name: &str| {
        let text = service.service().metrics().render();
        line_value(&text, &format!("{name}{labels}"))
    };
    common::wait_until(|| value("dead_lettered_total") == Some(1.0), "the dead letter").await;
    let counts = ["messages_received_total", "failed_tasks_total", "retries_total"].map(value);
    service.stop().await.unwrap();
    drop(user);
    common::cleanup(&uri, &markers).await;
    assert_eq!(counts, [Some(3.0), Some(3.0), Some(2.0)]);
}

fn answers() -> u32 {
    1
}

/// A malformed RPC request is refused before any call: listed among the status page's
/// failures, counted in neither its calls nor its failures.
#[tokio::test]
async fn a_malformed_rpc_request_is_listed_but_is_no_call() {
    use micro_framework::transport::{OutgoingMessage, Properties, PublishOptions};
    let config = micro_framework::testing::test_config(&unique("malformed"))
        .with_metrics_on_any_port()
        .with_status_show_failures(true);
    let (name, exchange) = (config.service_name.clone(), config.rpc_exchange.clone());
    let service =
        TestService::start(vec![Route::new(answers).entrypoint(RPCListener::new())], config)
            .await
            .unwrap();
    let address = service.service().metrics_address().unwrap();
    let properties = Properties {
        reply_to: Some(unique("reply")),
        correlation_id: Some(unique("correlation")),
        ..micro_framework::data::json_properties()
    };
    let request = OutgoingMessage { body: b"not json".to_vec().into(), properties };
    let key = format!("{name}.answers");
    service.transport().publish(&exchange, &key, request, PublishOptions::default()).await.unwrap();
    let status = move || {
        let (_, status) = http_get(address, "/status.json");
        serde_json::from_str::<Value>(&status).unwrap()
    };
    let listed = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = status();
            if status["recent_failures"].as_array().is_some_and(|failures| !failures.is_empty())
                || std::time::Instant::now() > deadline
            {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    service.stop().await.unwrap();
    assert_eq!(listed["recent_failures"][0]["kind"], "bad_input", "{listed}");
    let route = &listed["routes"][0];
    assert_eq!(
        (route["calls"].as_u64(), route["failures"].as_u64()),
        (Some(0), Some(0)),
        "{route}"
    );
}

/// `LOG_FORMAT=json`: one object per line, with the call's span as `span` (and in `spans`).
#[tokio::test]
async fn a_json_log_line_carries_the_calls_span() {
    let program = std::env::current_exe().unwrap();
    let dir = program.parent().unwrap().parent().unwrap();
    let retry_demo = dir.join("examples/retry_demo");
    assert!(retry_demo.exists(), "run `cargo build --examples` first: {}", retry_demo.display());
    // it serves until stopped: its lines are read until the first failed call's
    let mut demo = tokio::process::Command::new(&retry_demo)
        .env("LOG_FORMAT", "json")
        .env("WORKER_MODE", "thread")
        .env_remove("AMQP_URI")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = demo.stderr.take().unwrap();
    let first_failure = async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let parsed = serde_json::from_str::<Value>(&line).ok();
            let message = parsed.as_ref().and_then(|line| line["fields"]["message"].as_str());
            if message.is_some_and(|message| message.starts_with("call failed")) {
                return parsed.unwrap();
            }
            seen.push(line);
        }
        panic!("no JSON line of a failed call in:\n{}", seen.join("\n"))
    };
    let failed = tokio::time::timeout(Duration::from_secs(60), first_failure).await.unwrap();
    demo.kill().await.unwrap();
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["target"], "micro_framework::pipeline::route_handle::call");
    let span = &failed["span"];
    assert_eq!(
        (span["name"].as_str(), span["service"].as_str()),
        (Some("call"), Some("retry_demo"))
    );
    for field in ["route", "call_id", "parent_call_id", "retry"] {
        assert!(span.get(field).is_some(), "{field} missing: {failed}");
    }
    assert_eq!(failed["spans"][0], *span);
}

/// The worker processes on the status page: counted in a process mode, `null` in the others.
mod processes_on_the_status_page {
    use super::common;

    use common::{config, unique, MetricsOnAnyPort};
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::prelude::*;
    use micro_framework::testing::TestService;
    use serde_json::Value;

    fn pid() -> u32 {
        std::process::id()
    }

    /// `/status.json`'s `pools [{..., processes}]` and the page's column: the worker processes
    /// running in a process mode.
    #[cfg(feature = "process")]
    #[tokio::test]
    async fn the_status_page_shows_the_worker_processes_of_a_process_mode() {
        use micro_framework::config::WorkerMode;
        let name = unique("status_procs");
        let config = micro_framework::testing::test_config(&name)
            .with_worker_mode(WorkerMode::Process)
            .with_max_workers(2)
            .with_metrics_on_any_port();
        let routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let address = service.service().metrics_address().unwrap();
        let (_, status) =
            tokio::task::spawn_blocking(move || common::http_get(address, "/status.json"))
                .await
                .unwrap();
        let (_, page) =
            tokio::task::spawn_blocking(move || common::http_get(address, "/")).await.unwrap();
        service.stop().await.unwrap();
        let status: Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["pools"][0]["processes"], serde_json::json!(2), "{status}");
        assert!(page.contains("<th>processes</th>"), "{page}");
        assert!(page.contains("<td>2</td><td>2</td></tr>"), "size 2 and 2 processes: {page}");
    }

    /// And `null` outside the process modes.
    #[tokio::test]
    async fn the_status_page_shows_no_processes_in_the_thread_mode() {
        let uri = format!("memory://{}", unique("status_thread"));
        let config = config(&uri, "status_thread").with_metrics_on_any_port();
        let routes = vec![Route::new(pid).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let address = service.service().metrics_address().unwrap();
        let (_, status) =
            tokio::task::spawn_blocking(move || common::http_get(address, "/status.json"))
                .await
                .unwrap();
        let metrics = service.service().metrics().render();
        service.stop().await.unwrap();
        let status: Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["pools"][0]["processes"], Value::Null, "{status}");
        assert!(!metrics.contains("worker_processes{"), "{metrics}");
    }
}

fn logged(Payload(_): Payload<Value>) {}

fn quiet() {}

/// Each route's counters are exported at 0 from the start, before its first call: a counter
/// that appeared at its first count, at 1, hid that count from `increase()` and `rate()`, so
/// an alert on a route's first failures stayed silent. Only the counters a route can move:
/// retries where it has a policy that retries there, dead letters where it consumes a queue.
#[tokio::test]
async fn route_counters_are_exported_at_zero_from_the_start() {
    use micro_framework::retry::BackOff;
    let uri = format!("memory://{}", unique("counters_at_zero"));
    let shop = unique("shop");
    let config = config(&uri, "counters_at_zero");
    let routes = vec![
        Route::new(checked)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(10))),
        Route::new(logged).entrypoint(EventListener::new(&shop, "note")),
        Route::new(always_fails)
            .entrypoint(RPCListener::new())
            .backoff(BackOff::new(1, Duration::from_millis(10))),
        // an AsyncBackOff retries nothing on an RPC route (the start warns of it)
        Route::new(quiet)
            .entrypoint(RPCListener::new())
            .backoff(AsyncBackOff::new(1, Duration::from_millis(10))),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let text = service.service().metrics().render();
    let count = |text: &str, metric: &str, route: &str| {
        line_value(text, &format!("{metric}{{context=\"default\",route=\"{route}\"}}"))
    };
    let metrics = [
        "messages_received_total",
        "tasks_number_total",
        "task_duration_seconds_count",
        "failed_tasks_total",
        "retries_total",
        "dead_lettered_total",
    ];
    let exported = |route| metrics.map(|metric| count(&text, metric, route));
    let (zero, none) = (Some(0.0), None);
    assert_eq!(exported("checked"), [zero, zero, zero, zero, zero, zero], "{text}");
    assert_eq!(exported("logged"), [zero, zero, zero, zero, none, zero], "{text}");
    assert_eq!(exported("always_fails"), [zero, zero, zero, zero, zero, none], "{text}");
    assert_eq!(exported("quiet"), [zero, zero, zero, zero, none, none], "{text}");

    // the first failure is an increase of a series that was there
    service.dispatch(&shop, "job", &json!({ "ok": false })).await.unwrap();
    service.wait_for_route("checked", 2).await.unwrap();
    let text = service.service().metrics().render();
    service.stop().await.unwrap();
    let counted = ["failed_tasks_total", "retries_total", "dead_lettered_total"]
        .map(|metric| count(&text, metric, "checked"));
    assert_eq!(counted, [Some(2.0), Some(1.0), Some(1.0)], "{text}");
}

/// A route a test starts without its entrypoint (`TestService::start_only`) is called through
/// its hook, and a hook's call counts as its route's: its counters are exported at 0 from
/// the start too, as handed messages from a queue (its retries and dead letters counted).
#[tokio::test]
async fn a_route_started_without_its_entrypoint_exports_its_counters_at_zero_too() {
    let uri = format!("memory://{}", unique("idle_at_zero"));
    let shop = unique("shop");
    let routes = vec![
        Route::new(checked)
            .entrypoint(EventListener::new(&shop, "job"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(10))),
        Route::new(logged).entrypoint(EventListener::new(&shop, "note")),
    ];
    let service =
        TestService::start_only(routes, config(&uri, "idle_at_zero"), &["logged"]).await.unwrap();
    let text = service.service().metrics().render();
    service.stop().await.unwrap();
    let count = |metric: &str| {
        line_value(&text, &format!("{metric}{{context=\"default\",route=\"checked\"}}"))
    };
    let exported =
        ["tasks_number_total", "failed_tasks_total", "retries_total", "dead_lettered_total"]
            .map(count);
    assert_eq!(exported, [Some(0.0); 4], "{text}");
}
