//! HTTP, WebSocket and timer targets that use a `Producer` or an `RpcProxy` while the
//! service's broker connection is down, and once it is back, in thread and process modes.
//! The service reaches RabbitMQ through a [`Switch`] (its connections cut, new ones refused,
//! then let through again); the peers (the RPC service called, the listener that records the
//! events) are connected straight to the broker.
#![cfg(all(feature = "http", feature = "websocket"))]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::switch::Switch;
use common::{rabbitmq_uri, wait_until, Probe};
use futures::{SinkExt, StreamExt};
use micro_framework::amqp::dependencies::{Producer, RpcProxy};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, RpcError};
use micro_framework::dependencies::Shared;
use micro_framework::http::{HttpEntrypoint, Path};
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::websocket::WebSocketEntrypoint;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Records the `done` events it hears.
fn record(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

fn ids(probe: &Probe) -> Vec<u64> {
    let mut ids: Vec<u64> =
        probe.seen.lock().unwrap().iter().filter_map(|v| v["id"].as_u64()).collect();
    ids.sort_unstable();
    ids
}

/// `POST /emit/{id}`: dispatches event `done` `{id}`, then answers `{"sent": id}`.
async fn emit(Path(id): Path<u64>, producer: Producer) -> Result<Value, micro_framework::Error> {
    producer.dispatch("done", &json!({ "id": id })).await?;
    Ok(json!({ "sent": id }))
}

/// WebSocket command `ws_emit(id)`: the same over WebSocket.
async fn ws_emit(
    Args((id,)): Args<(u64,)>,
    producer: Producer,
) -> Result<Value, micro_framework::Error> {
    producer.dispatch("done", &json!({ "id": id })).await?;
    Ok(json!({ "sent": id }))
}

/// `GET /ask`: calls `add(2, 40)` of the service named by the extra key `MATH`, 2 s timeout.
async fn ask(rpc: RpcProxy, config: Arc<Config>) -> Result<i64, RpcError> {
    let math: String = config.get("MATH").unwrap().unwrap();
    rpc.service(math).timeout(Duration::from_secs(2)).call("add", (2, 40), ()).await
}

/// WebSocket command `ws_ask`: the same over WebSocket.
async fn ws_ask(rpc: RpcProxy, config: Arc<Config>) -> Result<i64, RpcError> {
    ask(rpc, config).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(90)).build().unwrap()
}

/// The base URL of `service`'s HTTP server.
fn base_of(service: &TestService) -> String {
    format!("http://{}", service.service().web_address().unwrap())
}

/// Switch the broker off for `service`, once it has seen the outage.
async fn cut(switch: &Switch, service: &TestService) {
    switch.off();
    wait_until(|| !service.is_ready(), "the service to see the outage").await;
}

/// `POST /emit/1` answered 200, and its event arrived.
async fn first_event(http: &reqwest::Client, base: &str, probe: &Probe) {
    let answer = http.post(format!("{base}/emit/1")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    wait_until(|| ids(probe) == [1], "the first event").await;
}

/// `GET /ask` until it answers 200 (at most 20 s): each answer, with when it came.
async fn ask_until_answered(
    http: &reqwest::Client,
    base: &str,
) -> Vec<(reqwest::StatusCode, String, Duration)> {
    let mut after = Vec::new();
    let back = Instant::now();
    loop {
        let answer = http.get(format!("{base}/ask")).send().await.unwrap();
        let status = answer.status();
        after.push((status, answer.text().await.unwrap(), back.elapsed()));
        if status == 200 || back.elapsed() > Duration::from_secs(20) {
            return after;
        }
    }
}

/// Whether this is a worker process of the service under test: a process-mode test's body
/// runs there too, up to the service's start, and must not start the peers again (a second
/// math service there took requests the test's own did not count).
fn in_a_worker() -> bool {
    micro_framework::spawners::process::is_worker_process()
}

/// The listener of `source`'s `done` events, connected straight to the broker (none in a
/// worker process).
async fn listener(uri: &str, source: &str) -> (Option<TestService>, Arc<Probe>) {
    let probe = Probe::new();
    if in_a_worker() {
        return (None, probe);
    }
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new(source, "done"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, common::config(uri, "outage_listen")).await;
    (Some(service.unwrap()), probe)
}

/// The math service the targets call (`add`, counting its runs), named the same in the worker
/// processes, whose parent is this test's process; started in the test's own process only.
async fn math_service(uri: &str, tag: &str) -> (Option<TestService>, String, Arc<Probe>) {
    let pid = if in_a_worker() { std::os::unix::process::parent_id() } else { std::process::id() };
    let math = Config::new(format!("outage_math_{tag}_{pid}")).with_amqp_uri(uri.to_owned());
    let (name, probe) = (math.service_name.clone(), Probe::new());
    if in_a_worker() {
        return (None, name, probe);
    }
    let route = Route::new(counted_add)
        .name("add")
        .entrypoint(RPCListener::new())
        .dependency(Shared(probe.clone()));
    (Some(TestService::start(vec![route], math).await.unwrap()), name, probe)
}

/// Stop `service`, a peer started in the test's own process.
async fn stop(service: Option<TestService>) {
    service.expect("peers run in the test's own process").stop().await.unwrap();
}

/// An HTTP request whose target dispatches an event while the broker is away, the broker
/// back 3 s later: the request answers 200 and the event arrives (the publish waits for the
/// reconnection, within the publish timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_event_dispatched_during_an_outage_goes_out_once_the_broker_is_back() {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let config =
        common::config(&proxied, "outage_http_evt").with_web_server_address("127.0.0.1:0".into());
    let name = config.service_name.clone();
    let (listen, probe) = listener(&uri, &name).await;
    let routes = vec![Route::new(emit).entrypoint(HttpEntrypoint::post("/emit/{id}"))];
    let service = TestService::start(routes, config).await.unwrap();
    let base = base_of(&service);
    let http = client();
    first_event(&http, &base, &probe).await;

    cut(&switch, &service).await;
    let started = Instant::now();
    let request = tokio::spawn({
        let http = http.clone();
        let base = base.clone();
        async move { http.post(format!("{base}/emit/2")).send().await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    switch.on();
    let answer = request.await.unwrap().unwrap();
    let took = started.elapsed();
    let status = answer.status();
    let body = answer.text().await.unwrap();
    eprintln!("during the outage: {status} {body} after {took:?}");
    wait_until(|| service.is_ready(), "the service to reconnect").await;
    // and afterwards
    let answer = http.post(format!("{base}/emit/3")).send().await.unwrap();
    let after = answer.status();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = ids(&probe);
    service.stop().await.unwrap();
    stop(listen).await;
    common::cleanup(&uri, &[name]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(after, 200);
    assert_eq!(seen, [1, 2, 3], "every event answered 200 arrived once");
}

/// An HTTP request whose target calls another service over RPC while the broker is away: it
/// fails within the call's own 2 s timeout (not the publish timeout), and once the broker is
/// back the same route's calls succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_rpc_call_during_an_outage_fails_within_its_timeout_and_recovers() {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let (math_service, math_name, _) = math_service(&uri, "http").await;
    let mut config =
        common::config(&proxied, "outage_http_rpc").with_web_server_address("127.0.0.1:0".into());
    config.extra.insert("MATH".into(), json!(math_name));
    let name = config.service_name.clone();
    let routes = vec![Route::new(ask).entrypoint(HttpEntrypoint::get("/ask"))];
    let service = TestService::start(routes, config).await.unwrap();
    let base = base_of(&service);
    let http = client();
    let answer = http.get(format!("{base}/ask")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap(), json!(42));

    cut(&switch, &service).await;
    let started = Instant::now();
    let answer = http.get(format!("{base}/ask")).send().await.unwrap();
    let took = started.elapsed();
    let (status, body) = (answer.status(), answer.text().await.unwrap());
    eprintln!("during the outage: {status} {body} after {took:?}");

    switch.on();
    wait_until(|| service.is_ready(), "the service to reconnect").await;
    let after = ask_until_answered(&http, &base).await;
    eprintln!("after the outage: {after:?}");
    service.stop().await.unwrap();
    stop(math_service).await;
    common::cleanup(&uri, &[name, math_name]).await;
    assert_eq!(status, 500, "{body}");
    assert!(took < Duration::from_secs(5), "the call took {took:?} for a 2 s timeout");
    let (last, _, when) = after.last().unwrap();
    assert_eq!(*last, 200, "{after:?}");
    assert_eq!(after.len(), 1, "the first call after the reconnection fails: {after:?}");
    assert!(*when < Duration::from_secs(3), "{after:?}");
}

async fn ws_call(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    frame: Value,
) -> Value {
    socket.send(WsMessage::Text(frame.to_string().into())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), socket.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => return serde_json::from_str(&text).unwrap(),
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            other => panic!("no reply frame: {other:?}"),
        }
    }
}

/// A WebSocket connection open across an outage: a call sent during it that dispatches an
/// event is answered once the broker is back (its event sent), a call that makes an RPC call
/// is answered with an error, the connection stays open, and calls after the outage succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_connection_open_across_an_outage_keeps_working() {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let (math_service, math_name, _) = math_service(&uri, "ws").await;
    let mut config = common::config(&proxied, "outage_ws")
        .with_websocket_ip("127.0.0.1".into())
        .with_websocket_port(0);
    config.extra.insert("MATH".into(), json!(math_name));
    let name = config.service_name.clone();
    let (listen, probe) = listener(&uri, &name).await;
    let routes = vec![
        Route::new(ws_emit).entrypoint(WebSocketEntrypoint::new()),
        Route::new(ws_ask).entrypoint(WebSocketEntrypoint::new()),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().websocket_address().unwrap();
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{address}")).await.unwrap();
    let reply = ws_call(&mut socket, json!({"command": "ws_emit", "command_args": [1]})).await;
    assert_eq!(reply["data"], json!({"sent": 1}), "{reply}");
    let reply = ws_call(&mut socket, json!({"command": "ws_ask"})).await;
    assert_eq!(reply["data"], json!(42), "{reply}");

    cut(&switch, &service).await;
    let started = Instant::now();
    let asked = ws_call(&mut socket, json!({"command": "ws_ask"})).await;
    let ask_took = started.elapsed();
    // the event call, answered once the broker is back
    socket
        .send(WsMessage::Text(
            json!({"command": "ws_emit", "command_args": [2]}).to_string().into(),
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    switch.on();
    let emitted = match tokio::time::timeout(Duration::from_secs(60), socket.next()).await {
        Ok(Some(Ok(WsMessage::Text(text)))) => serde_json::from_str::<Value>(&text).unwrap(),
        other => panic!("no reply frame: {other:?}"),
    };
    wait_until(|| service.is_ready(), "the service to reconnect").await;
    let mut after = Vec::new();
    let back = Instant::now();
    loop {
        let reply = ws_call(&mut socket, json!({"command": "ws_ask"})).await;
        let ok = reply["data"] == json!(42);
        after.push((reply, back.elapsed()));
        if ok || back.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    let emit_after = ws_call(&mut socket, json!({"command": "ws_emit", "command_args": [3]})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = ids(&probe);
    eprintln!("asked {asked} in {ask_took:?}; emitted {emitted}; after {after:?}; {emit_after}");
    drop(socket);
    service.stop().await.unwrap();
    stop(listen).await;
    stop(math_service).await;
    common::cleanup(&uri, &[name, math_name]).await;
    assert_eq!(asked["exception"]["exception"], "RpcError", "{asked}");
    assert!(ask_took < Duration::from_secs(5), "{ask_took:?}");
    assert_eq!(emitted["data"], json!({"sent": 2}), "{emitted}");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(emit_after["data"], json!({"sent": 3}), "{emit_after}");
    assert_eq!(seen, [1, 2, 3]);
}

/// What each run of the timer said about its event.
static TIMER_RUNS: Mutex<Vec<(u64, bool)>> = Mutex::new(Vec::new());
static TIMER_COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn tick(producer: Producer) -> Result<(), micro_framework::Error> {
    let id = TIMER_COUNT.fetch_add(1, Ordering::SeqCst);
    let sent = producer.dispatch("done", &json!({ "id": id })).await;
    TIMER_RUNS.lock().unwrap().push((id, sent.is_ok()));
    sent
}

/// A timer whose target dispatches an event each 300 ms, across a 4 s outage: every run that
/// reported success has its event delivered (none lost while the target reported success;
/// one in flight at the cut may come twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timer_s_events_dispatched_across_an_outage_are_not_lost_silently() {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let config = common::config(&proxied, "outage_timer");
    let name = config.service_name.clone();
    let (listen, probe) = listener(&uri, &name).await;
    let routes = vec![Route::new(tick)
        .entrypoint(micro_framework::timer::TimeEntrypoint::every(Duration::from_millis(300)))];
    let service = TestService::start(routes, config).await.unwrap();
    wait_until(|| !ids(&probe).is_empty(), "a first event").await;
    switch.off();
    tokio::time::sleep(Duration::from_secs(4)).await;
    switch.on();
    wait_until(|| service.is_ready(), "the reconnection").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    service.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = ids(&probe);
    stop(listen).await;
    common::cleanup(&uri, &[name]).await;
    let runs = TIMER_RUNS.lock().unwrap().clone();
    eprintln!("runs {runs:?}; seen {seen:?}");
    let reported: Vec<u64> = runs.iter().filter(|(_, ok)| *ok).map(|(id, _)| *id).collect();
    let lost: Vec<u64> = reported.iter().copied().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "reported sent but never arrived: {lost:?}");
    // An id may come twice: a publish whose confirm the cut lost is sent again once the
    // broker is back (at least once, as the README says of confirms lost with a channel).
}

/// `add`, counting its runs in the probe (in the test's own process: the math service runs
/// in thread mode).
fn counted_add(Args((a, b)): Args<(i64, i64)>, Dep(runs): Dep<Arc<Probe>>) -> i64 {
    runs.enter(json!(null));
    runs.leave();
    a + b
}

/// `GET /ask`, counted by the math service.
async fn ask_counted(rpc: RpcProxy, config: Arc<Config>) -> Result<i64, RpcError> {
    ask(rpc, config).await
}

/// The scenario of both worker modes: an RPC call made by an HTTP target while the broker is
/// away fails with `Timeout` after 2 s; the broker comes back 4 s later. The call its caller
/// was told timed out must not run on the remote service afterwards (its caller may well
/// have retried it, and Nameko's proxy raises on a dead connection, sending nothing), and the
/// route's calls succeed again at once. Also an event dispatched during the outage goes out.
async fn outage_scenario(mode: micro_framework::config::WorkerMode, tag: &str) {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let (math_service, math_name, math_probe) = math_service(&uri, &format!("c{tag}")).await;
    let mut config = common::config(&proxied, &format!("outage_out_{tag}"))
        .with_web_server_address("127.0.0.1:0".into())
        .with_worker_mode(mode)
        .with_max_workers(2);
    config.extra.insert("MATH".into(), json!(math_name));
    let name = config.service_name.clone();
    let (listen, probe) = listener(&uri, &name).await;
    let routes = vec![
        Route::new(ask_counted).entrypoint(HttpEntrypoint::get("/ask")),
        Route::new(emit).entrypoint(HttpEntrypoint::post("/emit/{id}")),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let base = base_of(&service);
    let http = client();
    let answer = http.get(format!("{base}/ask")).send().await.unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    first_event(&http, &base, &probe).await;
    let runs_before = math_probe.started();

    cut(&switch, &service).await;
    let started = Instant::now();
    let answer = http.get(format!("{base}/ask")).send().await.unwrap();
    let took = started.elapsed();
    let (status, body) = (answer.status(), answer.text().await.unwrap());
    eprintln!("[{tag}] /ask during the outage: {status} {body} after {took:?}");
    let emitting = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move { http.post(format!("{base}/emit/2")).send().await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    switch.on();
    let emitted = emitting.await.unwrap().unwrap();
    let emitted_status = emitted.status();
    eprintln!(
        "[{tag}] /emit during the outage: {emitted_status} {}",
        emitted.text().await.unwrap()
    );
    wait_until(|| service.is_ready(), "the service to reconnect").await;
    // let whatever was held back go out and be run
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs_after_outage = math_probe.started();
    let after = ask_until_answered(&http, &base).await;
    eprintln!("[{tag}] /ask after the outage: {after:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = ids(&probe);
    service.stop().await.unwrap();
    stop(listen).await;
    stop(math_service).await;
    common::cleanup(&uri, &[name, math_name]).await;
    assert_eq!(status, 500, "{body}");
    assert!(took < Duration::from_secs(5), "the call took {took:?} for a 2 s timeout");
    assert_eq!(emitted_status, 200);
    assert_eq!(seen, [1, 2], "the event dispatched during the outage arrived once");
    assert_eq!(
        runs_after_outage, runs_before,
        "the call its caller was told timed out during the outage ran on the remote service \
         once the broker was back"
    );
    assert_eq!(after.len(), 1, "calls after the reconnection fail first: {after:?}");
    assert_eq!(after[0].0, 200, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thread_mode_an_rpc_call_timed_out_during_an_outage_does_not_run_later() {
    outage_scenario(micro_framework::config::WorkerMode::Thread, "thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_mode_an_rpc_call_timed_out_during_an_outage_does_not_run_later() {
    outage_scenario(micro_framework::config::WorkerMode::Process, "process").await;
}

/// `GET /ask_long`: `add(2, 40)` with a 15 s timeout, longer than the outage.
async fn ask_long(rpc: RpcProxy, config: Arc<Config>) -> Result<i64, RpcError> {
    let math: String = config.get("MATH").unwrap().unwrap();
    rpc.service(math).timeout(Duration::from_secs(15)).call("add", (2, 40), ()).await
}

/// An RPC call made during a 3 s outage with a timeout longer than it is answered once the
/// broker is back, and runs once.
async fn long_call_scenario(mode: micro_framework::config::WorkerMode, tag: &str) {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let (math_service, math_name, math_probe) = math_service(&uri, &format!("l{tag}")).await;
    let mut config = common::config(&proxied, &format!("outage_long_{tag}"))
        .with_web_server_address("127.0.0.1:0".into())
        .with_worker_mode(mode)
        .with_max_workers(2);
    config.extra.insert("MATH".into(), json!(math_name));
    let name = config.service_name.clone();
    let routes = vec![Route::new(ask_long).entrypoint(HttpEntrypoint::get("/ask_long"))];
    let service = TestService::start(routes, config).await.unwrap();
    let base = base_of(&service);
    let http = client();
    let answer = http.get(format!("{base}/ask_long")).send().await.unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    let runs_before = math_probe.started();
    cut(&switch, &service).await;
    let started = Instant::now();
    let asking = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move { http.get(format!("{base}/ask_long")).send().await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    switch.on();
    let answer = asking.await.unwrap().unwrap();
    let took = started.elapsed();
    let (status, body) = (answer.status(), answer.text().await.unwrap());
    eprintln!("[{tag}] /ask_long across the outage: {status} {body} after {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = math_probe.started() - runs_before;
    service.stop().await.unwrap();
    stop(math_service).await;
    common::cleanup(&uri, &[name, math_name]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(runs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_mode_an_rpc_call_across_a_short_outage_is_answered() {
    long_call_scenario(micro_framework::config::WorkerMode::Process, "process").await;
}

/// An HTTP call whose target dispatches an event during an outage and is cut short by its
/// 2 s `TASK_TIME_LIMIT` answers 500 `timed_out`; the broker back 4 s later, the event of
/// that failed call must not go out then (in a thread mode the cancelled dispatch sends
/// nothing; a client retrying the failed request would otherwise make two events).
async fn cut_short_scenario(mode: micro_framework::config::WorkerMode, tag: &str) {
    let Some(uri) = rabbitmq_uri() else { return };
    let (switch, proxied) = Switch::in_front_of(&uri).await;
    let config = common::config(&proxied, &format!("outage_cut_{tag}"))
        .with_web_server_address("127.0.0.1:0".into())
        .with_worker_mode(mode)
        .with_max_workers(2)
        .with_task_time_limit(Some(Duration::from_secs(2)));
    let name = config.service_name.clone();
    let (listen, probe) = listener(&uri, &name).await;
    let routes = vec![Route::new(emit).entrypoint(HttpEntrypoint::post("/emit/{id}"))];
    let service = TestService::start(routes, config).await.unwrap();
    let base = base_of(&service);
    let http = client();
    first_event(&http, &base, &probe).await;
    cut(&switch, &service).await;
    let answer = http.post(format!("{base}/emit/2")).send().await.unwrap();
    let (status, body) = (answer.status(), answer.text().await.unwrap());
    eprintln!("[{tag}] /emit/2 during the outage: {status} {body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    switch.on();
    wait_until(|| service.is_ready(), "the service to reconnect").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = ids(&probe);
    eprintln!("[{tag}] events seen: {seen:?}");
    service.stop().await.unwrap();
    stop(listen).await;
    common::cleanup(&uri, &[name]).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("timed_out"), "{body}");
    assert_eq!(seen, [1], "the event of the call that failed timed_out went out afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thread_mode_the_event_of_a_call_cut_short_during_an_outage_is_not_sent_later() {
    cut_short_scenario(micro_framework::config::WorkerMode::Thread, "thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_mode_the_event_of_a_call_cut_short_during_an_outage_is_not_sent_later() {
    cut_short_scenario(micro_framework::config::WorkerMode::Process, "process").await;
}
