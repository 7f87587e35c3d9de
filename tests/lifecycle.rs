//! Lifecycle of the public API: what a call of a route alone, a client and a service handle
//! leave behind when they end.

mod common;

use common::{broker_uris, config};
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, RpcError};
use micro_framework::prelude::*;
use micro_framework::testing::{worker, TestService};
use micro_framework::transport::TransportError;
use micro_framework::Message;
use serde::Deserialize;

/// The `reply_to` of the request: the caller's reply queue's routing key.
fn reply_to(message: Message) -> Option<String> {
    message.properties.reply_to
}

#[derive(Deserialize)]
struct To {
    service: String,
}

/// Asks `service` for the routing key of its caller's reply queue.
async fn ask_reply_to(Args(to): Args<To>, rpc: RpcProxy) -> Result<String, RpcError> {
    rpc.call(&to.service, "reply_to", (), ()).await
}

#[tokio::test]
async fn a_call_of_a_route_alone_deletes_the_reply_queue_its_target_used() {
    for uri in broker_uris() {
        let config = config(&uri, "answers");
        let name = config.service_name.clone();
        let routes = vec![Route::new(reply_to).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let caller = common::config(&uri, "caller");
        let caller_name = caller.service_name.clone();
        let route = Route::new(ask_reply_to).entrypoint(RPCListener::new());
        let id: String = worker(route)
            .config(caller)
            .rpc((), serde_json::json!({"service": name}))
            .await
            .unwrap();
        let queue = format!("rpc.reply-{caller_name}-{id}");
        let left = service.transport().queue_info(&queue).await;
        assert!(matches!(left, Err(TransportError::NotFound(_))), "{queue}: {left:?}");
        service.stop().await.unwrap();
        common::cleanup(&uri, &[name, caller_name]).await;
    }
}

fn on_paid() {}

#[tokio::test]
async fn a_test_service_dropped_without_stop_stops_consuming() {
    for uri in broker_uris() {
        let config = config(&uri, "orders");
        let name = config.service_name.clone();
        let routes = vec![Route::new(on_paid).entrypoint(EventListener::new("shop", "paid"))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let queue = format!("evt-shop-paid--{name}.on_paid");
        let consumers =
            || async { service.transport().queue_info(&queue).await.unwrap().consumer_count };
        common::wait_until_async(|| async { consumers().await == 1 }).await;
        drop(service);
        let observer = micro_framework::transport::connect(&config).await.unwrap();
        common::wait_until_async(|| async {
            observer.queue_info(&queue).await.is_ok_and(|info| info.consumer_count == 0)
        })
        .await;
        observer.close().await;
        common::cleanup(&uri, &[name]).await;
    }
}
