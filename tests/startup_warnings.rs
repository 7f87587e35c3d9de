//! What a service warns about at start-up (settings it ignores, named with what to do), and
//! that a clean stop logs no error.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::unique;
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Client;
use micro_framework::prelude::*;

fn noop() {}

/// Calls `ping` on this very service: the service sets up a reply queue of its own.
async fn ask(rpc: RpcProxy, config: Arc<Config>) -> Result<(), String> {
    let service = rpc.service(config.service_name.clone());
    service.call("ping", (), ()).await.map_err(|error| error.to_string())
}

/// Start and stop a service of one event route with `vars` as its environment.
async fn start_with(vars: &[(&str, &str)]) {
    common::logs::capture(tracing::Level::WARN);
    let uri = format!("memory://{}", unique("warnings"));
    let mut all = vec![("SERVICE_NAME", "warned"), ("AMQP_URI", uri.as_str())];
    all.extend_from_slice(vars);
    let config = Config::from_vars(all.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let routes = vec![Route::new(noop).entrypoint(EventListener::new(unique("src"), "e"))];
    let service = Runner::new(routes, config.unwrap()).spawn().await.expect("it starts");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn an_environment_variable_that_resembles_a_key_is_named_at_start_up() {
    start_with(&[("AMQP_URL", "amqp://u:pw@mq/")]).await;
    let logs = common::logs::logged();
    assert!(
        logs.contains(
            "environment variable AMQP_URL is not a micro-framework key (did you mean \
             AMQP_URI?); it is ignored"
        ),
        "{logs}"
    );
}

#[tokio::test]
async fn limits_of_worker_processes_in_a_thread_mode_are_named_at_start_up() {
    // MAX_TASKS_PER_CHILD only acts on worker processes, and TASK_TIME_LIMIT cannot stop a
    // sync function in a thread mode, which a user relying on the limit must know
    start_with(&[("TASK_TIME_LIMIT", "5"), ("MAX_TASKS_PER_CHILD", "100")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let logs = common::logs::logged();
    assert!(
        logs.contains(
            "TASK_TIME_LIMIT (5s) cannot stop the sync functions of context 'default' in \
             WORKER_MODE=thread (routes noop): a thread cannot be stopped mid-call, only an \
             async function (or, in WORKER_MODE=process or greedy_process, a worker \
             process); it holds their dependencies' get and after_call only"
        ),
        "{logs}"
    );
    assert!(
        logs.contains(
            "MAX_TASKS_PER_CHILD (100) has no effect: no context runs in a process worker mode"
        ),
        "{logs}"
    );
}

async fn noop_async() {}

#[tokio::test]
async fn a_time_limit_that_cancels_every_function_of_a_thread_mode_is_not_warned_of() {
    common::logs::capture(tracing::Level::WARN);
    let uri = format!("memory://{}", unique("warnings"));
    let config = Config::new(unique("unwarned")).with_amqp_uri(uri);
    // a label of its own: the other tests of this binary log their warnings beside it
    let label = unique("async_only").replace('-', "_");
    let routes = vec![Route::new(noop_async).entrypoint(EventListener::new(unique("src"), "e"))];
    let context =
        RunnerContext::new(routes).time_limit(Duration::from_secs(5)).metric_label(&label);
    let service = Runner::new(vec![], config).context(context).spawn().await.expect("it starts");
    service.stop().await.unwrap();
    let logs = common::logs::logged();
    assert!(!logs.contains(&format!("context '{label}'")), "{logs}");
}

fn fails_once_called() -> Result<(), String> {
    Err("down".into())
}

/// An `AsyncBackOff` retries a message from a queue (events, work queues): on any other
/// entrypoint it retries nothing, which a start-up warning says, naming the route (it passed
/// unseen, a policy a user believed in that never ran). On an event route it is not warned of.
#[tokio::test]
async fn an_async_backoff_on_a_route_without_a_queue_is_named_at_start_up() {
    use micro_framework::retry::AsyncBackOff;
    common::logs::capture(tracing::Level::WARN);
    let config = Config::new(unique("warned")).with_amqp_uri(format!("memory://{}", unique("w")));
    let backoff = || AsyncBackOff::new(3, Duration::from_millis(10));
    let (rpc, event) = (unique("rpc_retried"), unique("event_retried"));
    let routes = vec![
        Route::new(fails_once_called).name(&rpc).entrypoint(RPCListener::new()).backoff(backoff()),
        Route::new(fails_once_called)
            .name(&event)
            .entrypoint(EventListener::new(unique("src"), "e"))
            .backoff(backoff()),
    ];
    let service = Runner::new(routes, config).spawn().await.expect("it starts");
    service.stop().await.unwrap();
    let logs = common::logs::logged();
    let warning = format!(
        "route '{rpc}': its AsyncBackOff retries nothing, as RPCListener takes no message from \
         a queue to publish again: its first failure is final (BackOff retries in the worker)"
    );
    assert!(logs.contains(&warning), "{logs}");
    assert!(!logs.contains(&format!("route '{event}'")), "{logs}");
}

#[tokio::test]
async fn an_amqp_uri_option_that_nothing_reads_is_named_at_start_up() {
    common::logs::capture(tracing::Level::WARN);
    // port 1: nothing listens, the start fails at once, after the warning
    let config =
        Config::new(unique("warned")).with_amqp_uri("amqp://u:pw@127.0.0.1:1/?ssl=1".into());
    let routes = vec![Route::new(noop).entrypoint(EventListener::new(unique("src"), "e"))];
    Runner::new(routes, config).spawn().await.map(drop).expect_err("no broker on port 1");
    let logs = common::logs::logged();
    assert!(
        logs.contains(
            "AMQP_URI option ssl is not used: micro-framework reads heartbeat, frame_max, \
             channel_max and connection_timeout (TLS is amqps://)"
        ),
        "{logs}"
    );
}

#[tokio::test]
async fn a_clean_stop_on_rabbitmq_logs_no_error() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    common::logs::capture(tracing::Level::WARN);
    let (service, source) = (unique("quiet"), unique("src"));
    // the consumers' channels close as the service stops: each stop is a chance for a race
    // between their close and the connection's to show
    for _ in 0..3 {
        let config = Config::new(service.clone()).with_amqp_uri(uri.clone());
        let routes = vec![
            Route::new(noop).entrypoint(EventListener::new(source.clone(), "e")),
            Route::new(noop).name("ping").entrypoint(RPCListener::new()),
            Route::new(ask).entrypoint(RPCListener::new()),
        ];
        let running = Runner::new(routes, config).spawn().await.expect("it starts");
        // the service's own reply queue, set up by its call of itself, is deleted at the stop
        let caller = Config::new(unique("quiet_caller")).with_amqp_uri(uri.clone());
        let client = Client::connect(&caller).await.unwrap();
        client.call::<()>(&service, "ask", (), ()).await.expect("ask calls ping");
        client.close().await;
        running.stop().await.unwrap();
    }
    common::cleanup(&uri, &[service, source]).await;
    let logs = common::logs::logged();
    let errors: Vec<&str> = logs.lines().filter(|line| line.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // a reply queue deleted under its own consumer had the broker cancel the consumer
    let cancelled: Vec<&str> =
        logs.lines().filter(|line| line.contains("consumer cancelled by the broker")).collect();
    assert!(cancelled.is_empty(), "{cancelled:#?}");
}

/// A `BackOff` (in the worker) on an RPC route retries: the start-up must not tell the user
/// "its AsyncBackOff retries nothing" of it. The `AsyncBackOff` route beside it is warned of,
/// so that the logs were captured.
#[tokio::test]
async fn an_in_worker_backoff_on_an_rpc_route_is_not_warned_of() {
    use micro_framework::retry::{AsyncBackOff, BackOff};
    common::logs::capture(tracing::Level::WARN);
    let config = Config::new(unique("warned")).with_amqp_uri(format!("memory://{}", unique("w")));
    let (in_worker, broker) = (unique("rpc_in_worker"), unique("rpc_broker"));
    let routes = vec![
        Route::new(fails_once_called)
            .name(&in_worker)
            .entrypoint(RPCListener::new())
            .backoff(BackOff::new(3, Duration::from_millis(10))),
        Route::new(fails_once_called)
            .name(&broker)
            .entrypoint(RPCListener::new())
            .backoff(AsyncBackOff::new(3, Duration::from_millis(10))),
    ];
    let service = Runner::new(routes, config).spawn().await.expect("it starts");
    service.stop().await.unwrap();
    let logs = common::logs::logged();
    assert!(
        logs.contains(&format!("route '{broker}': its AsyncBackOff retries nothing")),
        "{logs}"
    );
    assert!(
        !logs.contains(&format!("route '{in_worker}'")),
        "an in-worker BackOff was warned of as an AsyncBackOff that retries nothing: {logs}"
    );
}
