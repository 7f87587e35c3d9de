//! micro-framework embedded in a bigger program: clients dropped without `close`, runtimes
//! dropped under a service or a call, two services in one process.
#![cfg(all(feature = "http", feature = "metrics"))]

mod common;

use std::time::Duration;

use common::{broker_uris, config, rabbitmq_uri};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Client, RpcError};
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::TransportError;
use micro_framework::Message;

/// Held by the tests that start a process and by the one that binds the same ports again and
/// again: a process being started holds a copy of every descriptor of this one until it runs
/// its program, a listener just closed here included, whose port is then still in use.
static SPAWNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The routing key of the caller's reply queue.
fn reply_to(message: Message) -> Option<String> {
    message.properties.reply_to
}

/// Answers after a second.
async fn slow() -> u32 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    1
}

/// Whether `queue` is gone from the broker, within 10 s.
async fn gone(service: &TestService, queue: &str) -> bool {
    for _ in 0..100 {
        if matches!(service.transport().queue_info(queue).await, Err(TransportError::NotFound(_))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A `Client` dropped without `close` (an early return with `?`, a client made per request)
/// deletes its reply queue as `close` does, once its last handle goes: a service proxy taken
/// from a client dropped at once still calls. It left the queue to `x-expires` (5 minutes),
/// one per client made.
#[tokio::test]
async fn a_client_dropped_without_close_deletes_its_reply_queue() {
    for uri in broker_uris() {
        let config = config(&uri, "answers");
        let name = config.service_name.clone();
        let routes = vec![Route::new(reply_to).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let client = Client::connect(&config).await.unwrap();
        let id: String = client.call(&name, "reply_to", (), ()).await.unwrap();
        let queue = format!("rpc.reply-standalone_rpc_proxy-{id}");
        drop(client);
        assert!(gone(&service, &queue).await, "{uri}: {queue} left");
        // the proxy keeps the client: its queue goes with the proxy
        let proxy = Client::connect(&config).await.unwrap().service(name.clone());
        let id: String = proxy.call("reply_to", (), ()).await.unwrap();
        let queue = format!("rpc.reply-standalone_rpc_proxy-{id}");
        let again: String = proxy.call("reply_to", (), ()).await.unwrap();
        assert_eq!(again, id);
        drop(proxy);
        assert!(gone(&service, &queue).await, "{uri}: {queue} left");
        // dropped on a thread of the program's own, outside the runtime
        let client = Client::connect(&config).await.unwrap();
        let id: String = client.call(&name, "reply_to", (), ()).await.unwrap();
        let queue = format!("rpc.reply-standalone_rpc_proxy-{id}");
        std::thread::spawn(move || drop(client)).join().unwrap();
        assert!(gone(&service, &queue).await, "{uri}: {queue} left");
        service.stop().await.unwrap();
        common::cleanup(&uri, &[name]).await;
    }
}

/// A runtime dropped (not shut down) under a client's call: no panic, no hang, and the
/// client's connection closes (its reply queue has no consumer left); the queue, which no task
/// can delete any more, is left to `x-expires`, as `Client::close` documents.
#[tokio::test]
async fn a_runtime_dropped_under_a_call_closes_the_clients_connection() {
    let Some(uri) = rabbitmq_uri() else { return };
    let config = config(&uri, "answers");
    let name = config.service_name.clone();
    let routes = vec![
        Route::new(reply_to).entrypoint(RPCListener::new()),
        Route::new(slow).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let (client_config, service_name) = (config.clone(), name.clone());
    let queue = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let queue = runtime.block_on(async {
            let client = Client::connect(&client_config).await.unwrap();
            let id: String = client.call(&service_name, "reply_to", (), ()).await.unwrap();
            tokio::spawn(async move {
                let _: Result<u32, _> = client.call(&service_name, "slow", (), ()).await;
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            format!("rpc.reply-standalone_rpc_proxy-{id}")
        });
        drop(runtime);
        queue
    })
    .await
    .unwrap();
    let transport = service.transport().clone();
    common::wait_until_async(|| async {
        let info = transport.queue_info(&queue).await.unwrap();
        info.consumer_count == 0
    })
    .await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &[name, queue]).await;
}

fn quiet() {}

/// A program that awaits `Runner::run` (two of them, one signal stopping both) keeps the
/// signals once they have returned: a handler of its own then hears the next SIGINT, where
/// the runners' watchers, left waiting for a second signal, ended the process with status
/// 130 at once. Nor is SIGINT's default action back: with no handler left, the program is
/// not ended by it. The test runs itself again as that program, which signals itself.
#[test]
fn signals_after_runner_run_returned_are_the_programs_own() {
    const AS_PROGRAM: &str = "EMBEDDING_SIGNALS_PROGRAM";
    if std::env::var_os(AS_PROGRAM).is_some() {
        let interrupt = || {
            let pid = std::process::id().to_string();
            std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let runner = || {
                let name = common::unique("signals");
                let config = Config::new(&name).with_amqp_uri(format!("memory://{name}"));
                let route = Route::new(quiet).entrypoint(EventListener::new("src", "e"));
                Runner::new(vec![route], config)
            };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                interrupt();
            });
            let (first, second) = tokio::join!(runner().run(), runner().run());
            first.unwrap();
            second.unwrap();
            // the program's own handler, for what it does after its services
            let own = tokio::spawn(tokio::signal::ctrl_c());
            tokio::time::sleep(Duration::from_millis(100)).await;
            interrupt();
            tokio::time::timeout(Duration::from_secs(10), own).await.unwrap().unwrap().unwrap();
            println!("own handler ran");
            // no listener left: a runner does not give SIGINT its default action back
            interrupt();
            tokio::time::sleep(Duration::from_millis(300)).await;
            println!("not ended by SIGINT");
        });
        return;
    }
    let spawning = SPAWNING.blocking_lock();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "signals_after_runner_run_returned_are_the_programs_own"])
        .args(["--nocapture"])
        .env(AS_PROGRAM, "1")
        .output()
        .unwrap();
    drop(spawning);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("own handler ran"), "{stdout}");
    assert!(stdout.contains("not ended by SIGINT"), "{stdout}");
}

fn answer() -> u32 {
    1
}

/// The calls `render` counts for route `answer` in `tasks_number_total`.
fn answered(render: &str) -> u64 {
    let line = render
        .lines()
        .find(|line| line.starts_with("tasks_number_total{") && line.contains("route=\"answer\""));
    line.and_then(|line| line.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

/// Two instances of one service in one process, each with its metrics server: each counts
/// its own calls only (no registry shared between them), and one stopping leaves the other
/// serving and counting.
#[tokio::test]
async fn two_instances_in_one_process_keep_their_own_metrics_and_outlive_each_other() {
    use common::MetricsOnAnyPort;
    for uri in broker_uris() {
        let config = config(&uri, "twins").with_metrics_on_any_port();
        let name = config.service_name.clone();
        let start = || {
            let routes = vec![Route::new(answer).entrypoint(RPCListener::new())];
            Runner::new(routes, config.clone()).spawn()
        };
        let (first, second) = (start().await.unwrap(), start().await.unwrap());
        assert_ne!(first.metrics_address(), second.metrics_address());
        let client = Client::connect(&config).await.unwrap();
        for _ in 0..20 {
            let one: u32 = client.call(&name, "answer", (), ()).await.unwrap();
            assert_eq!(one, 1);
        }
        let scrape = |service: &micro_framework::RunningService| {
            let address = service.metrics_address().unwrap();
            tokio::task::spawn_blocking(move || common::http_get(address, "/metrics").1)
        };
        let (by_first, by_second) = (scrape(&first).await.unwrap(), scrape(&second).await.unwrap());
        let counts = (answered(&by_first), answered(&by_second));
        assert_eq!(counts.0 + counts.1, 20, "{uri}: {counts:?}");
        assert_eq!(counts.0, answered(&first.metrics().render()), "{uri}");
        first.stop().await.unwrap();
        for _ in 0..5 {
            let one: u32 = client.call(&name, "answer", (), ()).await.unwrap();
            assert_eq!(one, 1);
        }
        let after = answered(&scrape(&second).await.unwrap());
        assert_eq!(after, counts.1 + 5, "{uri}");
        client.close().await;
        second.stop().await.unwrap();
        common::cleanup(&uri, &[name]).await;
    }
}

/// Holds its call for a second.
async fn held(Payload(_): Payload<serde_json::Value>) {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A runtime dropped (not stopped) under a service's running call: no panic, no hang, and
/// the message comes back to the next instance (at-least-once), since it was never acked.
#[tokio::test]
async fn a_runtime_dropped_under_a_running_call_hands_its_message_to_the_next_instance() {
    let Some(uri) = rabbitmq_uri() else { return };
    let config = config(&uri, "dropped");
    let (name, shop) = (config.service_name.clone(), common::unique("shop"));
    let routes = |shop: &str| vec![Route::new(held).entrypoint(EventListener::new(shop, "go"))];
    let (first_config, first_shop) = (config.clone(), shop.clone());
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let service = Runner::new(routes(&first_shop), first_config.clone()).spawn().await;
            let service = service.unwrap();
            let source = first_config.clone().with_service_name(first_shop.clone());
            let producer = micro_framework::amqp::dependencies::Producer::new(
                service.transport().clone(),
                &source,
            );
            producer.dispatch("go", &serde_json::json!({"n": 1})).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            // not stopped: the runtime is dropped under the service and its call
            drop(service);
        });
        drop(runtime);
    })
    .await
    .unwrap();
    let service = TestService::start(routes(&shop), config).await.unwrap();
    service.wait_for_route("held", 1).await.unwrap();
    service.stop().await.unwrap();
    common::cleanup(&uri, &[name, shop]).await;
}

/// A config built in code takes nothing from the environment, whatever it holds: the
/// program's `AMQP_URI`, `MAX_WORKERS`, `SERVICE_NAME` or `WORKER_MODE` (of another tool,
/// or invalid here) change neither the runner's nor the client's. The test runs itself
/// again with such an environment.
#[test]
fn a_config_built_in_code_ignores_the_environment() {
    const AS_PROGRAM: &str = "EMBEDDING_ENV_PROGRAM";
    if std::env::var_os(AS_PROGRAM).is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let name = common::unique("in_code");
            let config = Config::new(&name).with_amqp_uri(format!("memory://{name}"));
            let routes = vec![Route::new(answer).entrypoint(RPCListener::new())];
            let service = Runner::new(routes, config.clone()).spawn().await.unwrap();
            let client = Client::connect(&config).await.unwrap();
            let one: u32 = client.call(&name, "answer", (), ()).await.unwrap();
            assert_eq!(one, 1);
            client.close().await;
            service.stop().await.unwrap();
            println!("served from code");
        });
        return;
    }
    let spawning = SPAWNING.blocking_lock();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_config_built_in_code_ignores_the_environment", "--nocapture"])
        .env(AS_PROGRAM, "1")
        .env("AMQP_URI", "amqp://nobody:secret@127.0.0.1:1/")
        .env("MAX_WORKERS", "many")
        .env("SERVICE_NAME", "not a name")
        .env("WORKER_MODE", "fibers")
        .env("RPC_TIMEOUT", "0")
        .output()
        .unwrap();
    drop(spawning);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("served from code"), "{stdout}");
}

fn hello() -> &'static str {
    "hello"
}

/// A loopback port free when this returns, below Linux's ephemeral range (32768-60999): the
/// test binds it again and again, and a port of that range may meanwhile become the local
/// port of an outgoing connection (another test's), which refuses the bind ("in use").
fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A program that tries its start again (the broker not up yet, an exchange not declared
/// yet) finds its ports free: a failed start releases the metrics and HTTP ports it bound,
/// and the next start on the same ports serves; so does a stop, for a program that starts
/// its service again.
#[tokio::test]
async fn a_failed_start_releases_its_ports_for_the_next_try() {
    let _no_process_starting = SPAWNING.lock().await;
    let uri = format!("memory://{}", common::unique("retry_start"));
    let (web, metrics) = (free_port(), free_port());
    let shop = common::unique("shop");
    let config = config(&uri, "retrying")
        .with_web_server_address(format!("127.0.0.1:{web}"))
        .with_enable_metrics(true)
        .with_metrics(micro_framework::config::MetricsConfig {
            host: "127.0.0.1".into(),
            port: metrics,
        });
    let routes = || {
        vec![
            Route::new(hello).entrypoint(micro_framework::http::HttpEntrypoint::get("/hello")),
            Route::new(quiet).entrypoint(EventListener::new(&shop, "e")),
        ]
    };
    // the shop's exchange is not there yet, and the service may not declare it
    let waiting = config.clone().with_declare_event_exchanges(false);
    for attempt in 0..2 {
        let error = Runner::new(routes(), waiting.clone()).spawn().await.unwrap_err();
        assert!(
            !matches!(error, micro_framework::Error::Listen { .. }),
            "attempt {attempt}: {error:?}"
        );
    }
    let unreachable = config.clone().with_amqp_uri("amqp://127.0.0.1:1/".into());
    for attempt in 0..2 {
        let error = Runner::new(routes(), unreachable.clone()).spawn().await.unwrap_err();
        assert!(
            !matches!(error, micro_framework::Error::Listen { .. }),
            "attempt {attempt}: {error:?}"
        );
    }
    // a run given up before the broker answered
    for attempt in 0..2 {
        let run = Runner::new(routes(), unreachable.clone()).run_until(async {}).await;
        assert!(run.is_ok(), "attempt {attempt}: {run:?}");
    }
    // and a service stopped gives them back for the next (a program restarting it)
    for _ in 0..2 {
        let service = Runner::new(routes(), config.clone()).spawn().await.unwrap();
        let address = service.web_address().unwrap();
        assert_eq!(address.port(), web);
        let (status, body) =
            tokio::task::spawn_blocking(move || common::http_get(address, "/hello")).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "\"hello\""));
        service.stop().await.unwrap();
    }
}

/// The logger of `Runner::start` and `Runner::run` writes no message whole: lapin's warning
/// for each message the broker returns as unroutable (an RPC call to a service that is not
/// there) held the request's headers and body, at every such call. The test runs itself
/// again as a program that logs as a runner does and calls a missing service.
#[test]
fn a_call_to_a_missing_service_logs_no_message_whole() {
    const AS_PROGRAM: &str = "EMBEDDING_RETURNED_PROGRAM";
    if std::env::var_os(AS_PROGRAM).is_some() {
        micro_framework::logging::init(Default::default());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let uri = std::env::var("RETURNED_URI").unwrap();
            let client = Client::connect(&Config::new("x").with_amqp_uri(uri)).await.unwrap();
            let missing = common::unique("missing");
            let called: Result<u32, _> = client.call(&missing, "m", ["secret"], ()).await;
            assert!(matches!(called, Err(RpcError::UnknownService(_))), "{called:?}");
            client.close().await;
        });
        return;
    }
    let Some(uri) = rabbitmq_uri() else { return };
    let spawning = SPAWNING.blocking_lock();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_call_to_a_missing_service_logs_no_message_whole", "--nocapture"])
        .env(AS_PROGRAM, "1")
        .env("RETURNED_URI", &uri)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    drop(spawning);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("returned us a message"), "{stderr}");
    assert!(!stderr.contains("data: ["), "{stderr}");
}
