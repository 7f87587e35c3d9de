//! What a service warns about at start-up: settings it ignores, named with what to do.

mod common;

use std::time::Duration;

use common::unique;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;

fn noop() {}

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
    // TASK_TIME_LIMIT and MAX_TASKS_PER_CHILD only act on worker processes: in a thread
    // mode a call is never stopped, which a user relying on the limit must know
    start_with(&[("TASK_TIME_LIMIT", "5"), ("MAX_TASKS_PER_CHILD", "100")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let logs = common::logs::logged();
    assert!(
        logs.contains(
            "TASK_TIME_LIMIT (5s) has no effect on context 'default' in WORKER_MODE=thread: \
             only a worker process can be stopped mid-call (WORKER_MODE=process or \
             greedy_process)"
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
