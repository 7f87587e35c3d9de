//! `TestService::waiter`: wait for the next call of a route (Nameko's `entrypoint_waiter`).

use std::time::Duration;

use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::prelude::*;
use micro_framework::testing::{test_config, TestService};
use serde_json::{json, Value};

fn on_paid(Payload(order): Payload<Value>) -> Result<u64, String> {
    order["id"].as_u64().ok_or_else(|| format!("no id in {order}"))
}

fn double(Args((n,)): Args<(i64,)>) -> i64 {
    n * 2
}

async fn start() -> TestService {
    start_with(test_config("orders")).await
}

async fn start_with(config: Config) -> TestService {
    let routes = vec![
        Route::new(on_paid).entrypoint(EventListener::new("shop", "paid")),
        Route::new(double).entrypoint(RPCListener::new()),
    ];
    TestService::start(routes, config).await.unwrap()
}

#[tokio::test]
async fn a_waiter_hands_back_the_matching_call_and_its_outcome() {
    let service = start().await;
    // a call finished before the waiter was made is not seen
    service.dispatch("shop", "paid", &json!({"id": 7})).await.unwrap();
    service.wait_for_route("on_paid", 1).await.unwrap();

    let second = service.waiter("on_paid").unwrap().matching(|order| order["id"] == 2);
    let any = service.waiter("on_paid").unwrap();
    for id in [1, 2, 3] {
        service.dispatch("shop", "paid", &json!({ "id": id })).await.unwrap();
    }
    let call = second.wait().await.unwrap();
    assert_eq!(call.payload(), json!({"id": 2}));
    assert_eq!(call.result::<u64>().unwrap(), 2);
    assert_eq!(call.message.routing_key, "paid");
    let first = any.wait().await.unwrap().result::<u64>().unwrap();
    assert!([1, 2, 3].contains(&first), "{first}");
    // calls run concurrently: let them all finish before the next waiters
    service.wait_for_route("on_paid", 4).await.unwrap();

    let failing = service.waiter("on_paid").unwrap();
    service.dispatch("shop", "paid", &json!({"ref": "x"})).await.unwrap();
    let failure = failing.wait().await.unwrap().result::<u64>().unwrap_err();
    service.wait_for_route("on_paid", 5).await.unwrap();
    assert_eq!(failure.message, r#"no id in {"ref":"x"}"#);
    // a result that does not fit the type asked for
    let typed = service.waiter("on_paid").unwrap();
    service.dispatch("shop", "paid", &json!({"id": 4})).await.unwrap();
    let misfit = typed.wait().await.unwrap().result::<String>().unwrap_err();
    assert!(misfit.message.contains("does not fit"), "{}", misfit.message);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_waiter_sees_rpc_calls_too() {
    let config = test_config("orders");
    let service = start_with(config.clone()).await;
    let waiter = service.waiter("double").unwrap();
    let client = Client::connect(&config.with_service_name("caller".into())).await.unwrap();
    let doubled: i64 = client.call("orders", "double", [21], ()).await.unwrap();
    assert_eq!(doubled, 42);
    let call = waiter.wait().await.unwrap();
    assert_eq!(call.result::<i64>().unwrap(), 42);
    assert_eq!(call.payload(), json!({"args": [21], "kwargs": {}}));
    client.close().await;
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_waiter_that_sees_no_matching_call_says_which_route_and_what_it_saw() {
    let service = start().await;
    let waiter = service
        .waiter("on_paid")
        .unwrap()
        .matching(|order| order["id"] == 99)
        .timeout(Duration::from_millis(300));
    service.dispatch("shop", "paid", &json!({"id": 1})).await.unwrap();
    let error = waiter.wait().await.unwrap_err().to_string();
    assert!(error.contains("route 'on_paid': no matching call finished within 300ms"), "{error}");
    assert!(error.contains("1 other call(s) seen") && error.contains(r#"{"id":1}"#), "{error}");

    let unknown = service.waiter("nope").unwrap_err().to_string();
    assert!(unknown.contains("nope"), "{unknown}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_waiter_whose_service_stops_says_so_rather_than_timing_out() {
    let service = start().await;
    let waiter = service.waiter("on_paid").unwrap().timeout(Duration::from_secs(60));
    let waiting = tokio::spawn(waiter.wait());
    service.stop().await.unwrap();
    let error = waiting.await.unwrap().unwrap_err();
    assert!(matches!(error, micro_framework::Error::Stopped(_)), "{error:?}");
    assert!(error.to_string().contains("route 'on_paid' stopped before the call came"), "{error}");
}

#[tokio::test]
async fn a_waiter_whose_service_stopped_while_held_by_the_test_says_so() {
    let service = start().await;
    let waiter = service.waiter("on_paid").unwrap().timeout(Duration::from_secs(30));
    let waiting = tokio::spawn(waiter.wait());
    // begin_stop keeps the service's handle, to look at it while it stops and after
    service.begin_stop();
    let error = waiting.await.unwrap().unwrap_err();
    assert!(matches!(error, micro_framework::Error::Stopped(_)), "{error:?}");
    service.wait_stopped().await.unwrap();
}

/// `wait_for_route` on a service that stopped says so at once, as a waiter does (was: it
/// waited its whole limit and reported a timeout).
#[tokio::test]
async fn a_wait_for_a_route_of_a_stopped_service_says_so_rather_than_timing_out() {
    let service = start().await;
    service.begin_stop();
    let waited = service.wait_for_route_within("on_paid", 1, Duration::from_secs(60)).await;
    let error = waited.unwrap_err();
    assert!(matches!(error, micro_framework::Error::Stopped(_)), "{error:?}");
    let expected = "stopped: route 'on_paid' settled 0 of 1 messages before its service stopped";
    assert_eq!(error.to_string(), expected);
    service.wait_stopped().await.unwrap();
}

#[tokio::test]
async fn a_wait_for_a_route_the_service_lacks_names_the_routes_it_has() {
    let service = start().await;
    let expected = "no route named 'on_payed' (routes: double, on_paid)";
    assert_eq!(service.waiter("on_payed").unwrap_err().to_string(), expected);
    assert_eq!(service.wait_for_route("on_payed", 1).await.unwrap_err().to_string(), expected);
    service.stop().await.unwrap();
}
