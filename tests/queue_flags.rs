//! The flags of every queue the framework declares, against what newer RabbitMQ versions refuse
//! by default: RabbitMQ 4.3 refuses a queue both transient and not exclusive
//! (`transient_nonexcl_queues`, closing the connection), and the tests here run on 3.10,
//! which takes it. So the check reads the flags the broker holds.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::naming::HandlerType;
use micro_framework::amqp::rpc::{Args, Client};
use micro_framework::config::Protocol;
use micro_framework::prelude::*;
use micro_framework::retry::AsyncBackOff;
use micro_framework::testing::TestService;
use micro_framework::timer::TimeEntrypoint;
use serde_json::{json, Value};

fn echo(Args((x,)): Args<(Value,)>) -> Value {
    x
}

fn fails() -> Result<(), std::io::Error> {
    Err(std::io::Error::other("fails, to be retried"))
}

fn handled() {}

/// Each queue of the broker's `/` virtual host: its name, and whether it is durable and
/// whether exclusive.
fn queues() -> Vec<(String, bool, bool)> {
    common::rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "durable",
        "exclusive",
    ])
    .lines()
    .filter_map(|line| {
        let mut fields = line.split('\t');
        let (name, durable, exclusive) = (fields.next()?, fields.next()?, fields.next()?);
        Some((name.to_owned(), durable == "true", exclusive == "true"))
    })
    .collect()
}

/// A service with every kind of queue (event handlers reliable, unreliable, broadcast and
/// singleton; a retry's delay queue; RPC; a cluster-wide timer's lock) and a caller, under
/// both profiles: every queue they declare is durable or exclusive.
#[tokio::test]
async fn every_queue_the_framework_declares_is_durable_or_exclusive() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    for protocol in [Protocol::Nameko, Protocol::MicroFramework] {
        let before: BTreeSet<String> = queues().into_iter().map(|(name, ..)| name).collect();
        let config = common::config(&uri, "flags").with_protocol(protocol);
        let service = config.service_name.clone();
        let source = common::unique("flags_source");
        let event = |handler| EventListener::new(&source, "job").handler_type(handler);
        let routes = vec![
            Route::new(fails)
                .name("reliable")
                .entrypoint(EventListener::new(&source, "job"))
                .backoff(AsyncBackOff::new(1, Duration::from_millis(20))),
            Route::new(handled)
                .name("unreliable")
                .entrypoint(EventListener::new(&source, "job").reliable_delivery(false)),
            Route::new(handled).name("broadcast").entrypoint(event(HandlerType::Broadcast(None))),
            Route::new(handled).name("singleton").entrypoint(event(HandlerType::Singleton)),
            Route::new(echo).name("echo").entrypoint(RPCListener::new()),
            Route::new(handled)
                .name("tick")
                .entrypoint(TimeEntrypoint::every(Duration::from_millis(20)).cluster_wide()),
        ];
        let running = TestService::start(routes, config).await.unwrap();
        let caller = common::config(&uri, "flags_caller").with_protocol(protocol);
        let client = Client::connect(&caller).await.unwrap();
        let echoed: Value = client.call(&service, "echo", [json!(1)], ()).await.unwrap();
        assert_eq!(echoed, json!(1));
        running.dispatch(&source, "job", &json!({})).await.unwrap();
        // the first attempt and its retry, which went through the delay queue
        running.wait_for_route("reliable", 2).await.unwrap();
        running.wait_for_route("tick", 1).await.unwrap();

        let declared: Vec<_> =
            queues().into_iter().filter(|(name, ..)| !before.contains(name)).collect();
        client.close().await;
        running.stop().await.unwrap();
        common::cleanup(&uri, &[service, source, caller.service_name]).await;
        let names: Vec<&str> = declared.iter().map(|(name, ..)| name.as_str()).collect();
        for kind in [".delay-", "rpc", ".lock", ".dlq"] {
            assert!(
                names.iter().any(|name| name.contains(kind)),
                "{protocol:?}: {kind} in {names:?}"
            );
        }
        let refused: Vec<_> =
            declared.iter().filter(|(_, durable, exclusive)| !durable && !exclusive).collect();
        assert!(refused.is_empty(), "{protocol:?}: transient and shared: {refused:?}");
    }
}
