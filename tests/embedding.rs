//! micro-framework embedded in a bigger program: clients dropped without `close`, runtimes
//! dropped under a service or a call, two services in one process.

mod common;

use std::time::Duration;

use common::{broker_uris, config, rabbitmq_uri};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Client;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::TransportError;
use micro_framework::Message;

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
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "signals_after_runner_run_returned_are_the_programs_own"])
        .args(["--nocapture"])
        .env(AS_PROGRAM, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("own handler ran"), "{stdout}");
    assert!(stdout.contains("not ended by SIGINT"), "{stdout}");
}
