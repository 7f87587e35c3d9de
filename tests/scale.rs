//! Services far bigger than the examples: more consumers than the connection has channels,
//! hundreds of routes.

mod common;

#[cfg(feature = "metrics")]
use std::sync::atomic::{AtomicU64, Ordering};

use micro_framework::amqp::entrypoints::{EventListener, QueueListener, RPCListener};
use micro_framework::amqp::rpc::Client;
use micro_framework::config::Protocol;
use micro_framework::prelude::*;
use micro_framework::retry::AsyncBackOff;
use micro_framework::testing::{memory_test_config, TestService};
use micro_framework::transport::TransportError;

use common::{cleanup, rabbitmq_uri, unique};

fn noop() {}

fn one() -> i64 {
    1
}

/// Six event listeners, two micro-framework RPC targets (and their built-in commands) and
/// three Nameko RPC methods: ten consumers, each on a channel of its own, a channel for
/// declarations and one for publishing: twelve channels.
fn routes(source: &str) -> Vec<Route> {
    let mut routes: Vec<Route> = (0..6)
        .map(|i| {
            Route::new(noop).name(format!("on_{i}")).entrypoint(EventListener::new(source, "e"))
        })
        .collect();
    for i in 0..2 {
        let listener = RPCListener::new().protocol(Protocol::MicroFramework);
        routes.push(Route::new(one).name(format!("target_{i}")).entrypoint(listener));
    }
    for i in 0..3 {
        routes.push(Route::new(one).name(format!("method_{i}")).entrypoint(RPCListener::new()));
    }
    routes
}

/// A service whose consumers need more channels than its connection allows is refused at
/// start, before it declares anything, by an error naming the limit and what to raise. It
/// started, reported itself ready, and then stopped, route after route failing to open its
/// consumer's channel (a RabbitMQ service with more than 2047 event routes did so).
#[tokio::test]
async fn more_consumers_than_channel_max_stop_the_start_naming_the_limit() {
    let Some(uri) = rabbitmq_uri() else { return };
    let source = unique("wide_src");
    let config = common::config(&format!("{uri}?channel_max=11"), "wide");
    let service = config.service_name.clone();
    let started = TestService::start(routes(&source), config.clone()).await;
    let Err(error) = started else { panic!("started with 11 channels for 12") };
    let text = error.to_string();
    assert!(matches!(error, micro_framework::Error::Startup(_)), "{error:?}");
    assert!(text.contains("at least 12 AMQP channels"), "{text}");
    assert!(text.contains("connection allows 11"), "{text}");
    assert!(text.contains("channel_max (rabbitmq.conf)"), "{text}");

    // refused before the first declaration
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let queue = format!("evt-{source}-e--{service}.on_0");
    let missing = transport.queue_info(&queue).await.expect_err("not declared");
    assert!(matches!(missing, TransportError::NotFound(_)), "{missing:?}");
    transport.close().await;
    cleanup(&uri, &[source, service]).await;
}

/// The same routes start when the connection allows the twelve channels, and each serves:
/// the check refuses no service that fits.
#[tokio::test]
async fn as_many_consumers_as_channel_max_allows_start_and_serve() {
    let Some(uri) = rabbitmq_uri() else { return };
    let source = unique("fit_src");
    let config = common::config(&format!("{uri}?channel_max=12"), "fit");
    let name = config.service_name.clone();
    let service = TestService::start(routes(&source), config.clone()).await.expect("fits");
    service.dispatch(&source, "e", &1).await.unwrap();
    for i in 0..6 {
        service.wait_for_route(&format!("on_{i}"), 1).await.unwrap();
    }
    let client = Client::connect(&Config::new("caller").with_amqp_uri(uri.clone())).await.unwrap();
    for i in 0..3 {
        let answer: i64 = client.call(&name, &format!("method_{i}"), (), ()).await.unwrap();
        assert_eq!(answer, 1);
    }
    for i in 0..2 {
        let proxy = client.service(&name).protocol(Protocol::MicroFramework);
        let answer: i64 = proxy.call(&format!("target_{i}"), (), ()).await.unwrap();
        assert_eq!(answer, 1);
    }
    client.close().await;
    service.stop().await.unwrap();
    cleanup(&uri, &[source, name]).await;
}

/// A test asking a service of 300 routes for one it lacks gets an error naming the 20 routes
/// closest to the name asked for, the nearest first, and how many there are: it listed all
/// 300 (a 3000-route service's error was 25 kB long).
#[tokio::test]
async fn an_unknown_route_of_a_big_service_is_named_with_the_closest_routes() {
    let routes = (0..300)
        .map(|i| Route::new(noop).name(format!("on_{i}")).entrypoint(EventListener::new("s", "e")))
        .collect();
    let service = TestService::start(routes, memory_test_config("big")).await.unwrap();
    let Err(unknown) = service.route("on_1000") else { panic!("no route on_1000") };
    let text = unknown.to_string();
    assert!(
        text.starts_with("no route named 'on_1000' (300 routes, the closest: on_100, "),
        "{text}"
    );
    assert_eq!(text.matches("on_").count(), 21, "the name asked and 20 routes: {text}");
    let Err(unknown) = service.hook("on_1000") else { panic!("no route on_1000") };
    assert_eq!(unknown.to_string(), text);
    service.stop().await.unwrap();
}

/// A route whose retries would wait in a delay queue `{queue}.delay-{ms}` over the 255 bytes
/// of an AMQP name stops the start, naming the route: it started, and every failure went to
/// its dead letters at once, "not retried". One whose delay queue fits starts.
#[tokio::test]
async fn a_route_whose_delay_queue_name_is_too_long_stops_the_start() {
    // `evt-shop-{event}--long.retried`: 250 bytes (its `.dlq` fits), and 262 with
    // `.delay-10000`
    let retried = |event: String| {
        let backoff = AsyncBackOff::new(3, std::time::Duration::from_secs(10));
        Route::new(noop)
            .name("retried")
            .entrypoint(EventListener::new("shop", event))
            .backoff(backoff)
    };
    let config = memory_test_config("long");
    let Err(error) = TestService::start(vec![retried("e".repeat(227))], config).await else {
        panic!("started with a delay queue of 262 bytes")
    };
    let text = error.to_string();
    assert!(matches!(error, micro_framework::Error::Startup(_)), "{error:?}");
    assert!(text.contains("route 'retried'"), "{text}");
    assert!(text.contains("delay queue of 262 bytes (..."), "{text}");
    assert!(text.contains("--long.retried.delay-10000)"), "{text}");

    // 240 bytes: `.delay-10000` makes 252
    let service = TestService::start(vec![retried("e".repeat(217))], memory_test_config("long"))
        .await
        .expect("its delay queue fits");
    service.stop().await.unwrap();
}

/// A service is ready (its start returns, `/health/ready` answers 200) only once each of its
/// consumers has subscribed: with 300 routes the start returned while their consumers
/// subscribed one by one behind it (2.6 s with 2,000 routes), and a rolling deploy could stop
/// the instance it replaced with the queues left unconsumed meanwhile.
#[tokio::test]
async fn a_big_service_is_ready_once_every_queue_has_its_consumer() {
    let Some(uri) = rabbitmq_uri() else { return };
    let source = unique("ready_src");
    let config = common::config(&uri, "ready");
    let service_name = config.service_name.clone();
    let mut routes: Vec<Route> = (0..300)
        .map(|i| {
            Route::new(noop).name(format!("on_{i}")).entrypoint(EventListener::new(&source, "e"))
        })
        .collect();
    routes.push(Route::new(one).name("method").entrypoint(RPCListener::new()));
    let listener = RPCListener::new().protocol(Protocol::MicroFramework);
    routes.push(Route::new(one).name("target").entrypoint(listener));
    let service = Runner::new(routes, config.clone()).spawn().await.expect("it starts");
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    // the last routes first: the consumers subscribed in about the routes' order
    let mut queues: Vec<String> =
        (0..300).rev().map(|i| format!("evt-{source}-e--{service_name}.on_{i}")).collect();
    queues.insert(0, format!("rpc-{service_name}-target"));
    queues.insert(0, format!("rpc-{service_name}-broadcast"));
    queues.insert(0, format!("rpc-{service_name}"));
    let mut unconsumed = Vec::new();
    for queue in &queues {
        if transport.queue_info(queue).await.unwrap().consumer_count == 0 {
            unconsumed.push(queue.clone());
        }
    }
    assert!(
        unconsumed.is_empty(),
        "{} queues without a consumer: {unconsumed:?}",
        unconsumed.len()
    );
    service.stop().await.unwrap();

    // work queues alike
    let routes = (0..300).map(|i| {
        let queue = QueueListener::new(format!("{source}-jobs-{i}"));
        Route::new(noop).name(format!("job_{i}")).entrypoint(queue)
    });
    let service = Runner::new(routes.collect(), config).spawn().await.expect("it starts");
    let mut unconsumed = 0;
    for i in (0..300).rev() {
        let queue = format!("{source}-jobs-{i}");
        if transport.queue_info(&queue).await.unwrap().consumer_count == 0 {
            unconsumed += 1;
        }
    }
    assert_eq!(unconsumed, 0, "work queues without a consumer");
    transport.close().await;
    service.stop().await.unwrap();
    cleanup(&uri, &[source, service_name]).await;
}

/// A caller that gives up on a start (a timeout around `Runner::spawn`) leaves no route
/// running: the start now waits after its routes began to consume, and a start dropped there
/// stops them. Given up at each point of the start in turn (1 ms later each time) until one
/// start ends in time, no queue keeps a consumer.
#[tokio::test]
async fn a_start_given_up_by_its_caller_leaves_no_consumer_behind() {
    let Some(uri) = rabbitmq_uri() else { return };
    let source = unique("given_up_src");
    let config = common::config(&uri, "given_up");
    let service_name = config.service_name.clone();
    let routes = || -> Vec<Route> {
        (0..30)
            .map(|i| {
                let listener = EventListener::new(&source, "e");
                Route::new(noop).name(format!("on_{i}")).entrypoint(listener)
            })
            .collect()
    };
    let queues: Vec<String> =
        (0..30).map(|i| format!("evt-{source}-e--{service_name}.on_{i}")).collect();
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let mut given_up = 0;
    for millis in 0.. {
        let limit = std::time::Duration::from_millis(millis);
        let spawned = tokio::time::timeout(limit, Runner::new(routes(), config.clone()).spawn());
        let Ok(started) = spawned.await else {
            given_up += 1;
            common::wait_until_async(|| async {
                for queue in &queues {
                    let info = transport.queue_info(queue).await;
                    if info.is_ok_and(|info| info.consumer_count > 0) {
                        return false;
                    }
                }
                true
            })
            .await;
            continue;
        };
        started.expect("it starts").stop().await.unwrap();
        break;
    }
    assert!(given_up > 0, "no start was given up");
    transport.close().await;
    cleanup(&uri, &[source, service_name]).await;
}

#[cfg(feature = "metrics")]
static TICKS: AtomicU64 = AtomicU64::new(0);

#[cfg(feature = "metrics")]
fn tick() {
    TICKS.fetch_add(1, Ordering::SeqCst);
}

/// After a reconnection the service is ready again only once each consumer has subscribed
/// again (each does by itself, one by one): `/health/ready` answered 200 as soon as the
/// connection was back, while up to 133 of 300 queues had no consumer yet. A cluster-wide
/// timer's lock consumer, read only at its ticks before, subscribes again at once too.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnection_the_service_is_ready_once_every_queue_has_its_consumer_again() {
    use common::MetricsOnAnyPort;
    use micro_framework::entrypoints::TimeEntrypoint;
    let Some(uri) = rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("ready_again");
    let source = unique("ready_again_src");
    let config = common::config(&uri, "ready_again")
        .with_amqp_uri(user.uri(&uri))
        .with_metrics_on_any_port();
    let service_name = config.service_name.clone();
    let mut routes: Vec<Route> = (0..300)
        .map(|i| {
            Route::new(noop).name(format!("on_{i}")).entrypoint(EventListener::new(&source, "e"))
        })
        .collect();
    let every = TimeEntrypoint::every(std::time::Duration::from_millis(300)).cluster_wide();
    routes.push(Route::new(tick).entrypoint(every));
    let service = Runner::new(routes, config).spawn().await.expect("it starts");
    let address = service.metrics_address().unwrap();
    let checker = micro_framework::transport::connect(&common::config(&uri, "checker")).await;
    let checker = checker.unwrap();
    // leading: it ran
    common::wait_until(|| TICKS.load(Ordering::SeqCst) > 0, "the timer to run").await;
    let queues: Vec<String> =
        (0..300).rev().map(|i| format!("evt-{source}-e--{service_name}.on_{i}")).collect();
    user.close_connections();
    common::wait_until(|| !service.is_ready(), "the service to see the loss").await;
    common::wait_until(|| service.is_ready(), "the service to be ready again").await;
    let (status, body) =
        tokio::task::spawn_blocking(move || common::http_get(address, "/health/ready"))
            .await
            .unwrap();
    let mut unconsumed = 0;
    for queue in &queues {
        if checker.queue_info(queue).await.unwrap().consumer_count == 0 {
            unconsumed += 1;
        }
    }
    checker.close().await;
    service.stop().await.unwrap();
    cleanup(&uri, &[source, service_name]).await;
    drop(user);
    assert_eq!(status, 200, "{body}");
    assert_eq!(unconsumed, 0, "ready while {unconsumed} of 300 queues had no consumer");
}

/// What breaks a route's consumer in the readiness tests below.
enum ConsumerFault {
    /// The service's user may declare the queue, no longer read it; its connection drops.
    ReadRefusedAfterAReconnection,
    /// The user may no longer declare the queue, which is deleted.
    QueueDeletedNotDeclarable,
}

/// How many of `checks` checks 100 ms apart found a service of one `QueueListener` route
/// ready while its queue had no consumer, after `fault`.
async fn ready_while_unconsumed(prefix: &str, fault: ConsumerFault, checks: u32) -> (u32, String) {
    use micro_framework::amqp::entrypoints::QueueListener;
    let Some(uri) = rabbitmq_uri() else { return (0, String::new()) };
    let user = common::TemporaryUser::create(prefix);
    let queue = unique(&format!("{prefix}_jobs"));
    let config = common::config(&uri, prefix).with_amqp_uri(user.uri(&uri));
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(noop).name("job").entrypoint(QueueListener::new(&queue))];
    let service = Runner::new(routes, config).spawn().await.expect("it starts");
    let checker = micro_framework::transport::connect(&common::config(&uri, "checker")).await;
    let checker = checker.unwrap();
    assert!(service.is_ready());
    match fault {
        ConsumerFault::ReadRefusedAfterAReconnection => {
            user.permit(".*", ".*", "^$");
            user.close_connections();
            common::wait_until(|| !service.is_ready(), "the service to see the loss").await;
        }
        ConsumerFault::QueueDeletedNotDeclarable => {
            user.permit("^$", ".*", ".*");
            checker.delete_queue(&queue).await.unwrap();
        }
    }
    let mut ready_unconsumed = 0;
    for _ in 0..checks {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let unconsumed = checker.queue_info(&queue).await.map_or(true, |q| q.consumer_count == 0);
        if service.is_ready() && unconsumed {
            ready_unconsumed += 1;
        }
    }
    service.stop().await.unwrap();
    for name in [queue.clone(), format!("{queue}.dlq")] {
        let _ = checker.delete_queue(&name).await;
    }
    checker.close().await;
    cleanup(&uri, &[queue.clone(), service_name]).await;
    drop(user);
    (ready_unconsumed, queue)
}

/// A route whose consumer the broker will not take back after a reconnection (the service's
/// user may no longer read its queue) keeps the service not ready while it tries again: the
/// transport forgot a consumer once it gave up resuming it (after a few refusals, 2 to 3 s),
/// and the service said it was ready with that queue unconsumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_whose_consumer_cannot_subscribe_again_keeps_the_service_not_ready() {
    let fault = ConsumerFault::ReadRefusedAfterAReconnection;
    let (ready_unconsumed, queue) = ready_while_unconsumed("ready_refused", fault, 60).await;
    assert_eq!(ready_unconsumed, 0, "ready at {ready_unconsumed} of 60 checks, {queue} unconsumed");
}

/// Likewise without a reconnection: a consumer the broker cancels (its queue deleted) that
/// the route cannot make again (the user may no longer declare the queue) keeps the service
/// not ready while the route tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_whose_queue_is_deleted_and_cannot_be_declared_again_keeps_the_service_not_ready() {
    let fault = ConsumerFault::QueueDeletedNotDeclarable;
    let (ready_unconsumed, queue) = ready_while_unconsumed("ready_deleted", fault, 30).await;
    assert_eq!(ready_unconsumed, 0, "ready at {ready_unconsumed} of 30 checks, {queue} unconsumed");
}
