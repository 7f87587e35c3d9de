//! Service-owned state: two services in one process on the same in-process broker, each with
//! RPC, HTTP and WebSocket routes, see only their own routes, and stopping one leaves the
//! other serving.
#![cfg(all(feature = "http", feature = "websocket"))]

mod common;

use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::dependencies::Shared;
use micro_framework::http::HttpEntrypoint;
use micro_framework::prelude::*;
use micro_framework::websocket::{WebSocketEntrypoint, WebSocketRpcClient, WebSocketRpcError};
use micro_framework::RunningService;
use std::time::Duration;

use common::{http_get, unique};

/// The name of the service a call reached.
#[derive(Clone)]
struct Name(String);

fn who(Dep(Name(name)): Dep<Name>) -> String {
    name
}

fn who_rpc(Args(()): Args<()>, Dep(Name(name)): Dep<Name>) -> String {
    name
}

async fn start(broker: &str, name: &str, extra_method: &str) -> RunningService {
    let config = Config::new(name)
        .with_amqp_uri(broker.to_owned())
        .with_web_server_address("127.0.0.1:0".into())
        .with_websocket_ip("127.0.0.1".into())
        .with_websocket_port(0);
    let routes = vec![
        Route::new(who_rpc).name("who").entrypoint(RPCListener::new()),
        Route::new(who_rpc).name(extra_method).entrypoint(RPCListener::new()),
        Route::new(who).name("http_who").entrypoint(HttpEntrypoint::get("/who")),
        Route::new(who_rpc).name("ws_who").entrypoint(WebSocketEntrypoint::new()),
        Route::new(who_rpc)
            .name(format!("ws_{extra_method}"))
            .entrypoint(WebSocketEntrypoint::new()),
    ];
    Runner::new(routes, config).dependency(Shared(Name(name.to_owned()))).spawn().await.unwrap()
}

async fn assert_serves(client: &Client, service: &RunningService, name: &str, own: &str) {
    let answer: String = client.call(name, "who", (), ()).await.unwrap();
    assert_eq!(answer, name);
    let answer: String = client.call(name, own, (), ()).await.unwrap();
    assert_eq!(answer, name);
    let web = service.web_address().expect("HTTP served");
    assert_eq!(http_get(web, "/who"), (200, format!("\"{name}\"")));
    let ws = service.websocket_address().expect("WebSocket served");
    let ws = WebSocketRpcClient::new(ws.ip().to_string(), ws.port());
    let answer: String = ws.call("ws_who", (), ()).await.unwrap();
    assert_eq!(answer, name);
    let answer: String = ws.call(&format!("ws_{own}"), (), ()).await.unwrap();
    assert_eq!(answer, name);
}

async fn assert_does_not_serve(client: &Client, service: &RunningService, name: &str, other: &str) {
    let error = client.call::<String>(name, other, (), ()).await.unwrap_err();
    assert!(matches!(error, RpcError::MethodNotFound(_)), "{error}");
    let ws = service.websocket_address().expect("WebSocket served");
    let ws = WebSocketRpcClient::new(ws.ip().to_string(), ws.port());
    let error = ws.call::<String>(&format!("ws_{other}"), (), ()).await.unwrap_err();
    assert!(matches!(error, WebSocketRpcError::TargetDoesNotExist(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_in_one_process_see_only_their_own_routes() {
    let broker = format!("memory://{}", unique("two"));
    let (alpha, beta) = (unique("alpha"), unique("beta"));
    let first = start(&broker, &alpha, "only_alpha").await;
    let second = start(&broker, &beta, "only_beta").await;
    assert_ne!(first.web_address(), second.web_address());
    assert_ne!(first.websocket_address(), second.websocket_address());

    let client =
        Client::connect(&Config::new("caller").with_amqp_uri(broker.clone())).await.unwrap();
    assert_serves(&client, &first, &alpha, "only_alpha").await;
    assert_serves(&client, &second, &beta, "only_beta").await;
    assert_does_not_serve(&client, &first, &alpha, "only_beta").await;
    assert_does_not_serve(&client, &second, &beta, "only_alpha").await;

    let first_web = first.web_address().unwrap();
    first.stop().await.unwrap();
    assert_eq!(http_get(first_web, "/who").0, 0, "the stopped service's HTTP server is closed");
    // Its request queue outlives it (durable, as Nameko's): a request waits, unanswered.
    let quick = client.service(alpha.as_str()).timeout(Duration::from_millis(300));
    let error = quick.call::<String>("who", (), ()).await.unwrap_err();
    assert!(matches!(error, RpcError::Timeout { .. }), "{error}");
    assert_serves(&client, &second, &beta, "only_beta").await;

    client.close().await;
    second.stop().await.unwrap();
}
