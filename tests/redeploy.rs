//! Redeploying on a live broker: a deploy that changes a queue's arguments, and a rolling
//! deploy that adds an RPC method. RabbitMQ only (the in-process broker has no second
//! instance of a service to roll over to).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{config, rabbitmq_uri, unique, Probe};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Client, RpcError};
use micro_framework::config::QueueType;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use serde_json::{json, Value};

fn handle(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

fn ping() -> &'static str {
    "pong"
}

fn added() -> &'static str {
    "new"
}

/// A deploy that switches `QUEUE_TYPE` from classic to quorum on queues holding messages:
/// RabbitMQ refuses the declaration, and the start fails at once with an error that names
/// the route, the queue and the argument and says what to do; the messages stay, unrun.
#[tokio::test]
async fn a_deploy_that_changes_the_queue_type_is_refused_clearly_and_loses_nothing() {
    let Some(uri) = rabbitmq_uri() else { return };
    let service = unique("redeploy_type");
    let source = unique("redeploy_src");
    let queue = format!("evt-{source}-tick--{service}.handle");
    let probe = Probe::new();
    let routes = || {
        vec![Route::new(handle)
            .entrypoint(EventListener::new(&source, "tick"))
            .dependency(Shared(probe.clone()))]
    };
    let classic = Config::new(&service).with_amqp_uri(uri.clone());
    TestService::start(routes(), classic.clone()).await.unwrap().stop().await.unwrap();
    let publisher = Config::new(&source).with_amqp_uri(uri.clone());
    let transport = micro_framework::transport::connect(&publisher).await.unwrap();
    let producer = Producer::new(transport.clone(), &publisher);
    for id in 0..3 {
        producer.dispatch("tick", &json!({ "id": id })).await.unwrap();
    }

    let quorum = classic.with_queue_type(QueueType::Quorum);
    let started =
        tokio::time::timeout(Duration::from_secs(30), TestService::start(routes(), quorum));
    let refused = match started.await.expect("the start ends") {
        Ok(service) => {
            service.stop().await.unwrap();
            None
        }
        Err(error) => Some(error.to_string()),
    };
    let left = transport.queue_info(&queue).await.map(|info| info.message_count);
    common::cleanup(&uri, &[service.clone(), source.clone()]).await;
    transport.close().await;

    let error = refused.expect("a quorum deploy started on a classic queue");
    for named in ["route 'handle'", &queue, "x-queue-type", "QUEUE_TYPE", "drained and deleted"] {
        assert!(error.contains(named), "the error does not say {named:?}: {error}");
    }
    assert_eq!(left.ok(), Some(3), "the messages waiting were not kept");
    assert_eq!(probe.started(), 0, "nothing runs");
}

/// Under Nameko's profile the methods of a service share one queue, `rpc-{service}`: while a
/// rolling deploy adds a method, the instances of the old version take their share of its
/// calls and answer `MethodNotFound`, as Nameko's would (the README says to deploy every
/// instance before callers use a new method).
#[tokio::test]
async fn a_method_added_in_a_rolling_deploy_is_not_found_by_the_old_instances() {
    let Some(uri) = rabbitmq_uri() else { return };
    let service = unique("redeploy_rpc");
    let config = Config::new(&service).with_amqp_uri(uri.clone());
    let old = vec![Route::new(ping).entrypoint(RPCListener::new())];
    let old = TestService::start(old, config.clone()).await.unwrap();
    let new = vec![
        Route::new(ping).entrypoint(RPCListener::new()),
        Route::new(added).entrypoint(RPCListener::new()),
    ];
    let new = TestService::start(new, config.clone()).await.unwrap();
    let client =
        Client::connect(&Config::new(unique("redeploy_caller")).with_amqp_uri(uri.clone()))
            .await
            .unwrap();
    let (mut answered, mut not_found, mut other) = (0, 0, Vec::new());
    for _ in 0..10 {
        match client.service(&service).call::<String>("added", (), ()).await {
            Ok(answer) if answer == "new" => answered += 1,
            Err(RpcError::MethodNotFound(_)) => not_found += 1,
            outcome => other.push(format!("{outcome:?}")),
        }
    }
    client.close().await;
    old.stop().await.unwrap();
    new.stop().await.unwrap();
    common::cleanup(&uri, &[service]).await;
    assert!(other.is_empty(), "{other:?}");
    // the broker takes turns between the two instances' consumers
    assert!(answered > 0 && not_found > 0, "{answered} answered, {not_found} not found");
}

fn handled(Payload(_): Payload<Value>) {}

/// A deploy that changes a route's flags (`reliable_delivery`) on queues that exist does not
/// start, its error naming the route, the queue and the argument (on the in-process broker,
/// which refuses as RabbitMQ does).
#[tokio::test]
async fn a_deploy_that_turns_reliable_delivery_off_is_refused_naming_the_route() {
    let uri = format!("memory://{}", unique("flags"));
    let shop = unique("flags_shop");
    let config = config(&uri, "flags");
    let queue = format!("evt-{shop}-go--{}.handled", config.service_name);
    let routes = |reliable: bool| {
        vec![Route::new(handled)
            .entrypoint(EventListener::new(&shop, "go").reliable_delivery(reliable))]
    };
    // the queue stays while the service is down: a keeper connection holds the broker
    let keeper = micro_framework::transport::memory::MemoryTransport::connect(&uri).unwrap();
    TestService::start(routes(true), config.clone()).await.unwrap().stop().await.unwrap();
    let error = match TestService::start(routes(false), config).await {
        Ok(service) => {
            service.stop().await.unwrap();
            panic!("a deploy with reliable_delivery(false) started on the durable queue")
        }
        Err(error) => error.to_string(),
    };
    drop(keeper);
    for named in ["route 'handled'", queue.as_str(), "inequivalent arg", "drained and deleted"] {
        assert!(error.contains(named), "the error does not say {named:?}: {error}");
    }
}
