//! The `micro-framework` binary against RabbitMQ: every subcommand, and the bad inputs
//! (malformed JSON, unknown service, broker down, missing queue). Without RabbitMQ the broker
//! tests fail when `CI=true` and print `SKIPPED:` otherwise.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Args;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::settle::mark_first_route;
use micro_framework::testing::TestService;
use micro_framework::transport::{HeaderValue, Headers};
use serde::Deserialize;
use serde_json::{json, Value};

mod support;

use support::*;

/// Poll `condition` every 10 ms for up to 10 s.
async fn wait_until(mut condition: impl FnMut() -> bool, what: &str) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn every_subcommand_has_help_with_examples() {
    for path in [
        &[][..],
        &["emit"],
        &["call"],
        &["dlq"],
        &["dlq", "list"],
        &["dlq", "show"],
        &["dlq", "replay"],
        &["dlq", "purge"],
        &["show-config"],
        &["topology"],
    ] {
        let mut args = path.to_vec();
        args.push("--help");
        let run = cli(None, &args).await;
        run.ok();
        assert!(run.stdout.contains("Usage: micro-framework"), "{args:?}: {run:?}");
        if !path.is_empty() && path != ["dlq"] {
            assert!(run.stdout.contains("Example"), "{args:?}: {run:?}");
        }
        assert!(!run.stdout.contains("guest:guest"), "credentials in help: {run:?}");
    }
}

/// `micro-framework show-config | head -0`: the reader is gone before the command writes.
/// It ends quietly with exit 0, as `dlq` does (`println!` panicked: "failed printing to
/// stdout", exit 101).
#[test]
fn a_closed_output_ends_show_config_quietly() {
    use std::os::fd::FromRawFd;
    let mut ends = [0; 2];
    // SAFETY: `pipe` fills the two descriptors; the read end is closed at once, the write end
    // handed to the child's stdout, which owns it from then on
    let stdout = unsafe {
        assert_eq!(libc::pipe(ends.as_mut_ptr()), 0);
        libc::close(ends[0]);
        std::process::Stdio::from_raw_fd(ends[1])
    };
    let output = std::process::Command::new(BIN)
        .arg("show-config")
        .env("SERVICE_NAME", "closed_output")
        .stdout(stdout)
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

#[tokio::test]
async fn bad_input_is_one_error_line_and_a_non_zero_exit() {
    cli(None, &["emit", "shop", "paid", "{oops"]).await.one_error_line(2, "not valid JSON");
    cli(None, &["call", "math.add", "--args", "[1,"]).await.one_error_line(2, "--args");
    cli(None, &["call", "math.add", "--args", "{}"]).await.one_error_line(2, "JSON array");
    cli(None, &["call", "math.add", "--kwargs", "[]"]).await.one_error_line(2, "JSON object");
    cli(None, &["call", "math"]).await.one_error_line(2, "SERVICE.METHOD");
    cli(None, &["call", "math.add", "--timeout", "-1"]).await.one_error_line(2, "--timeout");
    // positive, but more seconds than a duration holds: said so, the number kept short
    let run = cli(None, &["call", "math.add", "--timeout", "1e300"]).await;
    run.one_error_line(2, "--timeout 1e300 is too large: at most 18446744073709551615 seconds");
    cli(None, &["emit", "shop"]).await.one_error_line(2, "required arguments");
    cli(None, &["frobnicate"]).await.one_error_line(2, "frobnicate");
    cli(None, &["show-config", "--format", "xml"]).await.one_error_line(2, "xml");
    let run = cli(None, &["--uri", "http://ops:hunter2@mq/", "dlq", "list", "q"]).await;
    run.one_error_line(2, "AMQP_URI");
    assert!(!run.stderr.contains("hunter2"), "{run:?}");

    // broker down, from --uri and from AMQP_URI: the password is masked
    for run in [
        cli(None, &["--uri", DOWN_URI, "emit", "shop", "paid", "{}"]).await,
        cli(Some(DOWN_URI), &["call", "math.add"]).await,
        cli(None, &["dlq", "list", "some_queue", "--uri", DOWN_URI]).await,
        cli(Some(DOWN_URI), &["dlq", "replay", "some_queue"]).await,
        cli(Some(DOWN_URI), &["dlq", "purge", "some_queue"]).await,
    ] {
        run.one_error_line(1, "cannot reach the broker");
        assert!(run.stderr.contains("guest:***@127.0.0.1:1"), "{run:?}");
        assert!(!run.stderr.contains("guest:guest"), "{run:?}");
    }
    let run = cli(Some("amqp://ops:hunter2@127.0.0.1:1/"), &["emit", "a", "b", "1"]).await;
    run.one_error_line(1, "ops:***@");
    assert!(!run.stderr.contains("hunter2"), "{run:?}");
}

#[tokio::test]
async fn a_blank_service_name_is_unset_and_emit_names_its_own_arguments() {
    // SERVICE_NAME exported empty (an env file's `SERVICE_NAME=`) is unset, as absent: the
    // command connects as micro-framework-cli instead of failing on a key it does not need
    for args in [&["dlq", "list", "some_queue"][..], &["call", "math.add"]] {
        let run = cli_env(Some(DOWN_URI), args, &[("SERVICE_NAME", " ")]).await;
        run.one_error_line(1, "cannot reach the broker");
    }
    // emit's source service and event name are its arguments, not SERVICE_NAME
    cli(Some(DOWN_URI), &["emit", "", "paid", "{}"])
        .await
        .one_error_line(2, "SOURCE_SERVICE is empty");
    cli(Some(DOWN_URI), &["emit", "my shop", "paid", "{}"])
        .await
        .one_error_line(2, "invalid SOURCE_SERVICE 'my shop': must not contain whitespace");
    cli(Some(DOWN_URI), &["emit", "shop", "", "{}"]).await.one_error_line(2, "EVENT_NAME is empty");
}

#[tokio::test]
async fn an_in_process_broker_is_refused_by_the_broker_commands() {
    // memory:// lives inside one process: the CLI would open a new, empty one and report
    // the service's queue or exchange as missing
    for args in [
        &["dlq", "list", "some_queue"][..],
        &["dlq", "purge", "some_queue"],
        &["emit", "shop", "paid", "{}"],
        &["call", "math.add"],
    ] {
        cli(Some("memory://orders"), args).await.one_error_line(2, "in-process broker");
    }
    // in any case, as a service reads it
    cli(Some("MEMORY://orders"), &["emit", "shop", "paid", "{}"])
        .await
        .one_error_line(2, "in-process broker");
    // show-config only reads it
    let env = [("SERVICE_NAME", "orders")];
    cli_env(Some("memory://orders"), &["show-config"], &env).await.ok();
}

/// Records the events it gets.
fn record(Payload(payload): Payload<Value>, Dep(seen): Dep<Arc<Mutex<Vec<Value>>>>) {
    seen.lock().unwrap().push(payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_dispatches_an_event_as_the_source_service() {
    let Some(uri) = rabbitmq() else { return };
    let (source, service) = (unique("cli_src"), unique("cli_listener"));
    let queue = format!("evt-{source}-paid--{service}.record");
    let (queues, exchanges) =
        (vec![format!("{queue}.dlq"), queue], vec![format!("{source}.events")]);
    cleaned(&uri, queues, exchanges, emit_body(uri.clone(), source, service)).await;
}

async fn emit_body(uri: String, source: String, service: String) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new(&source, "paid"))
        .dependency(Shared(seen.clone()))];
    let running = TestService::start(routes, config(&uri, &service)).await.unwrap();

    let run = cli(Some(&uri), &["emit", &source, "paid", r#"{"id": 7, "note": "café"}"#]).await;
    run.ok();
    let mut from_stdin = tokio::process::Command::new(BIN)
        .args(["--uri", &uri, "emit", &source, "paid", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = from_stdin.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, br#"{"id": 8}"#).await.unwrap();
    drop(stdin);
    assert!(from_stdin.wait().await.unwrap().success());
    run.ok();
    assert!(run.stdout.contains(&format!("{source}.events")), "{run:?}");
    wait_until(|| seen.lock().unwrap().len() == 2, "the events").await;
    assert_eq!(*seen.lock().unwrap(), vec![json!({"id": 7, "note": "café"}), json!({"id": 8})]);

    running.stop().await.unwrap();
}

/// An event no queue receives is an error (exit 1), and emitting to a source that has no
/// exchange leaves none behind: a mistyped source or event name is seen, not reported as
/// dispatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_fails_when_no_queue_receives_the_event() {
    let Some(uri) = rabbitmq() else { return };
    let (source, service) = (unique("cli_nobody"), unique("cli_listener"));
    let queue = format!("evt-{source}-paid--{service}.record");
    let (queues, exchanges) =
        (vec![format!("{queue}.dlq"), queue], vec![format!("{source}.events")]);
    cleaned(&uri, queues, exchanges, nobody_body(uri.clone(), source, service)).await;
}

async fn nobody_body(uri: String, source: String, service: String) {
    for _ in 0..2 {
        // the second run finds no exchange either: the first did not declare it
        let run = cli(Some(&uri), &["emit", &source, "paid", "{}"]).await;
        run.one_error_line(1, &format!("exchange {source}.events does not exist"));
    }
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new(&source, "paid"))
        .dependency(Shared(seen.clone()))];
    let running = TestService::start(routes, config(&uri, &service)).await.unwrap();
    let run = cli(Some(&uri), &["emit", &source, "refunded", "{}"]).await;
    run.one_error_line(1, "no queue is bound");
    cli(Some(&uri), &["emit", &source, "paid", "{}"]).await.ok();
    wait_until(|| seen.lock().unwrap().len() == 1, "the event").await;
    running.stop().await.unwrap();
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn add(Args(Add { a, b }): Args<Add>) -> i64 {
    a + b
}

fn fail(Args(()): Args<()>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("boom"))
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_secs(2)).await;
    "late"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_prints_results_and_remote_errors_as_json() {
    let Some(uri) = rabbitmq() else { return };
    let math = unique("cli_math");
    cleaned(&uri, vec![format!("rpc-{math}")], vec![], call_body(uri.clone(), math)).await;
}

async fn call_body(uri: String, math: String) {
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(fail).entrypoint(RPCListener::new()),
        Route::new(slow).entrypoint(RPCListener::new()),
    ];
    let running = TestService::start(routes, config(&uri, &math)).await.unwrap();
    let method = |name: &str| format!("{math}.{name}");

    let run = cli(Some(&uri), &["call", &method("add"), "--args", "[1, 2]"]).await;
    assert_eq!(run.ok().stdout.trim(), "3");
    let run =
        cli(None, &["--uri", &uri, "call", &method("add"), "--kwargs", r#"{"a":5,"b":6}"#]).await;
    assert_eq!(run.ok().stdout.trim(), "11");
    let mixed = ["call", &method("add"), "--args", "[1]", "--kwargs", r#"{"b": 2}"#];
    assert_eq!(cli(Some(&uri), &mixed).await.ok().stdout.trim(), "3");

    let run = cli(Some(&uri), &["call", &method("fail")]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let reply: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(reply["error"]["exc_type"], "Error", "{reply}");
    assert_eq!(reply["error"]["value"], "boom", "{reply}");
    // its reader gone (`| true` under `set -o pipefail`): still a failure, exit 1
    let mut closed = std::process::Command::new(BIN)
        .args(["call", &method("fail")])
        .env("AMQP_URI", &uri)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(closed.stdout.take());
    let status = tokio::task::spawn_blocking(move || closed.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(1), "a failed call with its output closed");
    let run = cli(Some(&uri), &["call", &method("nope")]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let reply: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(reply["error"]["exc_type"], "MethodNotFound", "{reply}");
    assert_eq!(reply["error"]["exc_args"], json!(["nope"]), "{reply}");
    // word for word as the README's CLI section shows it
    let readme = include_str!("../../../README.md");
    let shown = readme.split("$ micro-framework call bench_rpc.nope\n").nth(1).unwrap();
    let shown = &shown[..shown.find("\n$ ").unwrap() + 1];
    assert_eq!(run.stdout, shown);
    let run = cli(Some(&uri), &["call", &method("add"), "--args", r#"["x", 1]"#]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("IncorrectSignature"), "{run:?}");

    let run = cli(Some(&uri), &["call", &method("slow"), "--timeout", "0.3"]).await;
    run.one_error_line(1, "Timeout");
    let ghost = unique("cli_ghost");
    let run = cli(Some(&uri), &["call", &format!("{ghost}.add")]).await;
    run.one_error_line(1, &format!("no service '{ghost}' is listening (UnknownService)"));

    running.stop().await.unwrap();
}

/// Under the micro-framework protocol a missing target is the original's
/// `RPCTargetDoesNotExist`, not Nameko's `MethodNotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_names_remote_errors_as_the_services_protocol_does() {
    let Some(uri) = rabbitmq() else { return };
    let math = unique("cli_ufw");
    let queues = vec![format!("rpc-{math}-add"), format!("rpc-{math}-broadcast")];
    cleaned(&uri, queues, vec![], ufw_call_body(uri.clone(), math)).await;
}

async fn ufw_call_body(uri: String, math: String) {
    let routes = vec![Route::new(add).entrypoint(RPCListener::new())];
    let service =
        config(&uri, &math).with_protocol(micro_framework::config::Protocol::MicroFramework);
    let running = TestService::start(routes, service).await.unwrap();
    let protocol = [("PROTOCOL", "micro_framework")];
    let run =
        cli_env(Some(&uri), &["call", &format!("{math}.add"), "--args", "[1, 2]"], &protocol).await;
    assert_eq!(run.ok().stdout.trim(), "3");
    let run = cli_env(Some(&uri), &["call", &format!("{math}.nope")], &protocol).await;
    assert_eq!(run.code, 1, "{run:?}");
    let reply: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(reply["error"]["exc_type"], "RPCTargetDoesNotExist", "{reply}");
    assert_eq!(reply["error"]["exc_path"], "micro_framework.exceptions.RPCTargetDoesNotExist");
    running.stop().await.unwrap();
}

/// A micro-framework class-method target is `Class.method` (its target id) and its server
/// takes all after the first dot of the routing key as the target: `SERVICE.Class.method`
/// splits at the first dot under that protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_reaches_a_class_method_target_of_a_micro_framework_service() {
    let Some(uri) = rabbitmq() else { return };
    let math = unique("cli_cls");
    let queues = vec![format!("rpc-{math}-Calc.add"), format!("rpc-{math}-broadcast")];
    cleaned(&uri, queues, vec![], class_method_body(uri.clone(), math)).await;
}

async fn class_method_body(uri: String, math: String) {
    let routes = vec![Route::new(add).name("Calc.add").entrypoint(RPCListener::new())];
    let service =
        config(&uri, &math).with_protocol(micro_framework::config::Protocol::MicroFramework);
    let running = TestService::start(routes, service).await.unwrap();
    let protocol = [("PROTOCOL", "micro_framework")];
    let target = format!("{math}.Calc.add");
    let run = cli_env(Some(&uri), &["call", &target, "--args", "[1, 2]"], &protocol).await;
    running.stop().await.unwrap();
    assert_eq!(run.ok().stdout.trim(), "3");
}

async fn slower() -> &'static str {
    tokio::time::sleep(Duration::from_secs(5)).await;
    "later"
}

/// The reply queues bound to `exchange` on the local broker; `None` without `rabbitmqctl`.
fn reply_queues(exchange: &str) -> Option<Vec<String>> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_bindings", "-q", "--no-table-headers", "source_name", "destination_name"])
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    let bindings = String::from_utf8_lossy(&output.stdout);
    let bound = bindings.lines().filter_map(|line| line.split_once('\t'));
    let replies =
        bound.filter(|(source, queue)| *source == exchange && queue.starts_with("rpc.reply-"));
    Some(replies.map(|(_, queue)| queue.trim().to_owned()).collect())
}

/// A call interrupted (Ctrl-C) while it waits for its reply deletes its reply queue (which
/// would stay for `x-expires`: 5 minutes, 12 hours under the micro-framework protocol) and
/// exits with 130, as a shell reports SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_call_leaves_no_reply_queue() {
    let Some(uri) = rabbitmq() else { return };
    let (math, exchange) = (unique("cli_interrupted"), unique("cli_rpc"));
    let body = interrupted_body(uri.clone(), math.clone(), exchange.clone());
    cleaned(&uri, vec![format!("rpc-{math}")], vec![exchange], body).await;
}

async fn interrupted_body(uri: String, math: String, exchange: String) {
    let routes = vec![Route::new(slower).entrypoint(RPCListener::new())];
    let service = config(&uri, &math).with_rpc_exchange(exchange.clone());
    let running = TestService::start(routes, service).await.unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["--uri", &uri, "call", &format!("{math}.slower")])
        .env("RPC_EXCHANGE", &exchange)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut waited = 0;
    loop {
        match reply_queues(&exchange) {
            None => {
                eprintln!("SKIPPED: rabbitmqctl cannot list the queues");
                let _ = child.kill().await;
                return running.stop().await.unwrap();
            }
            Some(queues) if !queues.is_empty() => break,
            Some(_) => {
                waited += 1;
                assert!(waited < 20, "the call never declared its reply queue");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the call ends at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.starts_with("error: interrupted") && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(reply_queues(&exchange), Some(vec![]), "the reply queue is deleted");
    running.stop().await.unwrap();
}

/// Always fails, naming the event.
fn always_fails(Payload(event): Payload<Value>) -> Result<(), String> {
    Err(format!("boom {}", event["id"]))
}

fn dlq_lines(run: &Run) -> Vec<String> {
    run.stdout.lines().skip(1).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_shows_replays_and_purges_dead_letters() {
    let Some(uri) = rabbitmq() else { return };
    let (source, service) = (unique("cli_shop"), unique("cli_failing"));
    let queue = format!("evt-{source}-paid--{service}.always_fails");
    let dlq = format!("{queue}.dlq");
    let (queues, exchanges) = (vec![queue.clone(), dlq.clone()], vec![format!("{source}.events")]);
    cleaned(&uri, queues, exchanges, dlq_body(uri.clone(), source, service, queue, dlq)).await;
}

async fn dlq_body(uri: String, source: String, service: String, queue: String, dlq: String) {
    let routes = vec![Route::new(always_fails).entrypoint(EventListener::new(&source, "paid"))];
    // one worker: dead letters arrive in the order of the events
    let one_at_a_time = config(&uri, &service).with_max_workers(1);
    let running = TestService::start(routes, one_at_a_time).await.unwrap();
    for id in 0..3 {
        running.dispatch(&source, "paid", &json!({ "id": id })).await.unwrap();
    }
    running.wait_for_route("always_fails", 3).await.unwrap();
    running.stop().await.unwrap();
    let transport = connect(&uri).await;

    // list: by work queue or .dlq name, without consuming, in order
    let run = cli(Some(&uri), &["dlq", "list", &queue]).await;
    let lines = dlq_lines(run.ok());
    assert!(run.stdout.starts_with("INDEX"), "{run:?}");
    assert_eq!(lines.len(), 3, "{run:?}");
    for (index, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("{index} ")), "{line}");
        for part in ["always_fails", "error", &format!("boom {index}"), "  1  "] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
        assert!(line.ends_with('Z') && line.contains('T'), "failed-at as RFC 3339: {line}");
    }
    assert_eq!(cli(Some(&uri), &["dlq", "list", &dlq]).await.ok().stdout, run.stdout);
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 3);

    // show: one, or all
    let run = cli(Some(&uri), &["dlq", "show", &queue, "--index", "1"]).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(shown["body"], json!({"id": 1}), "{shown}");
    assert_eq!(shown["headers"]["x-mf-error"], "boom 1", "{shown}");
    assert_eq!(shown["headers"]["x-mf-original-queue"], queue.as_str(), "{shown}");
    assert_eq!(shown["properties"]["content_type"], "application/json", "{shown}");
    let all: Value =
        serde_json::from_str(&cli(Some(&uri), &["dlq", "show", &dlq]).await.stdout).unwrap();
    let bodies: Vec<&Value> = all.as_array().unwrap().iter().map(|m| &m["body"]).collect();
    assert_eq!(bodies, [&json!({"id": 0}), &json!({"id": 1}), &json!({"id": 2})]);
    cli(Some(&uri), &["dlq", "show", &queue, "--index", "9"]).await.one_error_line(1, "no index 9");

    // replay: back to the work queue, failure headers and counters removed, the route it was
    // first published with marked for its handler
    // --limit 0 would replay nothing and say "replayed 0 of 0" with dead letters there
    let run = cli(Some(&uri), &["dlq", "replay", &queue, "--limit", "0"]).await;
    run.one_error_line(2, "'--limit <N>'");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 3);
    let run = cli(Some(&uri), &["dlq", "replay", &queue, "--limit", "2"]).await;
    assert!(run.ok().stdout.contains("replayed 2 of 2"), "{run:?}");
    assert_eq!(transport.queue_info(&queue).await.unwrap().message_count, 2);
    let mut first_route = Headers::new();
    mark_first_route(&mut first_route, &format!("{source}.events"), "paid");
    for id in 0..2 {
        let replayed = transport.get(&queue).await.unwrap().expect("a replayed message");
        assert_eq!(serde_json::from_slice::<Value>(&replayed.body).unwrap(), json!({"id": id}));
        let headers = &replayed.properties.headers;
        let framework: Headers = headers
            .iter()
            .filter(|(key, _)| key.starts_with("x-mf-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(framework, first_route, "{headers:?}");
        assert!(!headers.contains_key("x-death"), "{headers:?}");
        assert_eq!(
            replayed.properties.content_type.as_deref(),
            Some("application/json"),
            "properties kept"
        );
        replayed.acker.ack().await.unwrap();
    }
    let lines = dlq_lines(&cli(Some(&uri), &["dlq", "list", &queue]).await);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("0 ") && lines[0].contains("boom 2"), "{lines:?}");

    // purge
    let run = cli(Some(&uri), &["dlq", "purge", &dlq]).await;
    assert!(run.ok().stdout.contains("purged 1 dead letters"), "{run:?}");
    let run = cli(Some(&uri), &["dlq", "list", &queue]).await;
    assert!(run.ok().stdout.is_empty() && run.stderr.contains("no dead letters"), "{run:?}");
    let run = cli(Some(&uri), &["dlq", "replay", &queue]).await;
    assert!(run.ok().stdout.contains("replayed 0 of 0"), "{run:?}");

    // missing queue
    let missing = unique("cli_missing");
    for command in ["list", "show", "replay", "purge"] {
        let run = cli(Some(&uri), &["dlq", command, &missing]).await;
        run.one_error_line(1, &format!("queue '{missing}.dlq' does not exist"));
    }

    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_reports_progress_and_keeps_letters_without_origin() {
    let Some(uri) = rabbitmq() else { return };
    let (target, dlq) = (unique("cli_target"), unique("cli_orphans") + ".dlq");
    let queues = vec![target.clone(), dlq.clone()];
    cleaned(&uri, queues, vec![], replay_body(uri.clone(), target, dlq)).await;
}

async fn replay_body(uri: String, target: String, dlq: String) {
    let transport = connect(&uri).await;
    for name in [&target, &dlq] {
        let spec = micro_framework::transport::QueueSpec::durable(name.as_str());
        transport.declare_queue(&spec).await.unwrap();
    }
    let publish = |origin: Option<&str>, n: usize| {
        let mut properties = micro_framework::transport::Properties::default();
        if let Some(origin) = origin {
            properties.headers.insert("x-mf-original-queue".into(), HeaderValue::from(origin));
            properties.headers.insert("x-mf-retry-count".into(), HeaderValue::Int(3));
        }
        properties.headers.insert("trace".into(), HeaderValue::from("kept"));
        let body = bytes_of(n);
        let message = micro_framework::transport::OutgoingMessage { body, properties };
        let transport = transport.clone();
        let dlq = dlq.clone();
        async move { transport.publish("", &dlq, message, Default::default()).await.unwrap() }
    };
    publish(None, 0).await;
    for n in 1..=3 {
        publish(Some(&target), n).await;
    }

    let run = cli(Some(&uri), &["dlq", "replay", &dlq]).await;
    run.one_error_line(1, "1 dead letters have no x-mf-original-queue header");
    assert!(run.stdout.contains("replayed 3 of 4"), "{run:?}");
    assert_eq!(transport.queue_info(&target).await.unwrap().message_count, 3);
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 1);
    let first = transport.get(&target).await.unwrap().unwrap();
    assert_eq!(&first.body[..], b"1");
    assert_eq!(first.properties.headers.get("trace"), Some(&HeaderValue::from("kept")));
    assert!(!first.properties.headers.contains_key("x-mf-retry-count"));
    assert!(!first.properties.headers.contains_key("x-mf-original-queue"));
    first.acker.ack().await.unwrap();

    // a long replay shows its progress on stderr
    transport.purge_queue(&dlq).await.unwrap();
    for n in 1..=120 {
        publish(Some(&target), n).await;
    }
    let run = cli(Some(&uri), &["dlq", "replay", &dlq, "--limit", "119"]).await;
    assert!(run.ok().stdout.contains("replayed 119 of 119"), "{run:?}");
    let progress: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(progress, ["replayed 100/119", "replayed 119/119"], "{run:?}");
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 1);

    // an original queue that is gone stops the replay; the dead letter stays
    transport.purge_queue(&dlq).await.unwrap();
    let gone = unique("cli_gone");
    publish(Some(&gone), 1).await;
    let run = cli(Some(&uri), &["dlq", "replay", &dlq]).await;
    run.one_error_line(1, &format!("replay stopped after 0: cannot publish to '{gone}'"));
    assert!(run.stdout.contains("replayed 0 of 1"), "{run:?}");
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 1);

    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_warns_of_dead_letters_that_lost_their_headers() {
    let Some(uri) = rabbitmq() else { return };
    let (target, dlq) = (unique("cli_target"), unique("cli_headless") + ".dlq");
    let queues = vec![target.clone(), dlq.clone()];
    cleaned(&uri, queues, vec![], headless_body(uri.clone(), target, dlq)).await;
}

async fn headless_body(uri: String, target: String, dlq: String) {
    let transport = connect(&uri).await;
    for name in [&target, &dlq] {
        let spec = micro_framework::transport::QueueSpec::durable(name.as_str());
        transport.declare_queue(&spec).await.unwrap();
    }
    for n in 0..3 {
        let mut properties = micro_framework::transport::Properties::default();
        properties.headers.insert("x-mf-original-queue".into(), HeaderValue::from(target.as_str()));
        if n > 0 {
            // as the framework marks a dead letter whose headers did not fit in a frame
            let dropped = "12 original headers dropped: with the dead-letter headers they made \
                           140000 bytes, over the frame_max of 131072 bytes";
            properties.headers.insert("x-mf-headers-dropped".into(), HeaderValue::from(dropped));
        }
        let message = micro_framework::transport::OutgoingMessage { body: bytes_of(n), properties };
        transport.publish("", &dlq, message, Default::default()).await.unwrap();
    }
    let run = cli(Some(&uri), &["dlq", "replay", &dlq]).await;
    assert!(run.ok().stdout.contains("replayed 3 of 3"), "{run:?}");
    let warnings: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(warnings.len(), 1, "{run:?}");
    assert!(warnings[0].starts_with("warning: 2 of the dead letters replayed"), "{run:?}");
    assert!(warnings[0].contains("x-mf-headers-dropped"), "{run:?}");
    assert_eq!(transport.queue_info(&target).await.unwrap().message_count, 3);
    transport.close().await;
}

fn bytes_of(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(n.to_string())
}

/// `--uri` is the broker of every command: `show-config` shows it as `AMQP_URI` (it showed
/// the environment's or the default, and took any `--uri` with exit 0), over the
/// environment's and a file's, and refuses one the service would refuse.
#[tokio::test]
async fn show_config_shows_the_uri_it_is_given() {
    let given = "amqp://ops:secret@prod-mq:5672/prod";
    let env = [("SERVICE_NAME", "orders")];
    for args in [&["--uri", given, "show-config"][..], &["show-config", "--uri", given]] {
        let run = cli_env(Some("amqp://u:pw@h:5672/"), args, &env).await;
        let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
        assert_eq!(shown["AMQP_URI"], "amqp://ops:***@prod-mq:5672/prod", "{args:?}");
    }
    // the environment's, replaced, is not read: a refused one did not stop it
    let args = ["--uri", given, "show-config"];
    let run = cli_env(Some("amqp://h/?heartbeat=abc"), &args, &env).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(shown["AMQP_URI"], "amqp://ops:***@prod-mq:5672/prod");
    let dir = std::env::temp_dir().join(unique("cli_config_uri"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("service.yaml");
    std::fs::write(&file, "SERVICE_NAME: billing\nAMQP_URI: amqp://u:pw@file-mq:5672/\n").unwrap();
    let path = file.to_str().unwrap();
    let run = cli_env(None, &["--uri", given, "show-config", "--file", path], &[]).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(shown["AMQP_URI"], "amqp://ops:***@prod-mq:5672/prod");
    // without --uri, the file's, whatever AMQP_URI the environment holds
    let run = cli_env(Some("amqp://u:pw@h:5672/"), &["show-config", "--file", path], &[]).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(shown["AMQP_URI"], "amqp://u:***@file-mq:5672/");
    std::fs::remove_dir_all(&dir).ok();
    cli_env(None, &["--uri", "not a uri", "show-config"], &env)
        .await
        .one_error_line(2, "invalid config AMQP_URI=\"not a uri\"");
}

#[tokio::test]
async fn show_config_with_a_uri_does_not_read_the_files() {
    // --uri replaces a file's AMQP_URI as it replaces the environment's: unread, so one that
    // names a variable set only where the service runs, or one refused, does not stop it
    let given = "amqp://ops:secret@prod-mq:5672/prod";
    let dir = std::env::temp_dir().join(unique("cli_config_unread"));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        ("unset.yaml", "SERVICE_NAME: billing\nAMQP_URI: ${CLI_TEST_UNSET_BROKER}\n"),
        ("refused.yaml", "SERVICE_NAME: billing\nAMQP_URI: amqp://\n"),
        ("merged.yaml", "base: &base\n  AMQP_URI: amqp://\nSERVICE_NAME: billing\n<<: *base\n"),
        // merged in from a mapping written in place, held by no other key
        (
            "merged_unset.yaml",
            "SERVICE_NAME: billing\n<<: {AMQP_URI: '${CLI_TEST_UNSET_BROKER}'}\n",
        ),
        ("unset.toml", "SERVICE_NAME = \"billing\"\nAMQP_URI = \"${CLI_TEST_UNSET_BROKER}\"\n"),
    ];
    for (name, text) in files {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let path = file.to_str().unwrap();
        let run = cli_env(None, &["--uri", given, "show-config", "--file", path], &[]).await;
        let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
        assert_eq!(shown["AMQP_URI"], "amqp://ops:***@prod-mq:5672/prod", "{name}");
        assert_eq!(shown["SERVICE_NAME"], "billing", "{name}");
        // without --uri, the file's is read, as a service reads it
        let run = cli_env(None, &["show-config", "--file", path], &[]).await;
        assert_eq!(run.code, 2, "{name}: {run:?}");
    }
    // the rest of the file is read and checked as a service reads it, and the given URI too
    let file = dir.join("workers.yaml");
    std::fs::write(&file, "SERVICE_NAME: billing\nAMQP_URI: amqp://\nMAX_WORKERS: x\n").unwrap();
    let path = file.to_str().unwrap();
    cli_env(None, &["--uri", given, "show-config", "--file", path], &[])
        .await
        .one_error_line(2, "invalid config MAX_WORKERS=\"x\"");
    let file = dir.join("good.yaml");
    std::fs::write(&file, "SERVICE_NAME: billing\n").unwrap();
    let path = file.to_str().unwrap();
    cli_env(None, &["--uri", "amqp://", "show-config", "--file", path], &[])
        .await
        .one_error_line(2, "invalid config AMQP_URI=\"amqp://\"");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn show_config_prints_the_effective_configuration_masked() {
    let dir = std::env::temp_dir().join(unique("cli_config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("service.yaml");
    std::fs::write(
        &file,
        "SERVICE_NAME: billing\nAMQP_URI: amqp://ops:${CLI_TEST_PASSWORD}@mq:5672/\n\
         MAX_WORKERS: ${CLI_TEST_WORKERS:4}\nAPI_TOKEN: abc123\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let env = [("CLI_TEST_PASSWORD", "hunter2")];

    let run = cli_env(None, &["show-config", "--file", path], &env).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(shown["SERVICE_NAME"], "billing");
    assert_eq!(shown["AMQP_URI"], "amqp://ops:***@mq:5672/");
    assert_eq!(shown["MAX_WORKERS"], 4);
    assert_eq!(shown["API_TOKEN"], "***");
    assert!(!run.stdout.contains("hunter2") && !run.stdout.contains("abc123"), "{run:?}");

    let run = cli_env(None, &["show-config", "--file", path, "--format", "yaml"], &env).await;
    assert!(run.ok().stdout.contains("SERVICE_NAME: billing"), "{run:?}");
    assert!(run.stdout.contains("amqp://ops:***@mq:5672/"), "{run:?}");

    // from the environment
    let env = [("SERVICE_NAME", "orders"), ("MAX_WORKERS", "8")];
    let run = cli_env(Some("amqp://u:pw@h:5672/"), &["show-config"], &env).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!((&shown["SERVICE_NAME"], &shown["MAX_WORKERS"]), (&json!("orders"), &json!(8)));
    assert_eq!(shown["AMQP_URI"], "amqp://u:***@h:5672/");
    // the nodes of a cluster, each entry masked; a bad list names its entry
    let list = "amqp://u:pw@h1:5672/, amqp://u:pw@h2:5672/";
    let run = cli_env(Some(list), &["show-config"], &env).await;
    let shown: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(shown["AMQP_URI"], "amqp://u:***@h1:5672/,amqp://u:***@h2:5672/");
    cli_env(Some("amqp://u:pw@h1/,,amqp://u:pw@h2/"), &["show-config"], &env)
        .await
        .one_error_line(2, "entry 2 of AMQP_URI is empty");

    // keys the service would ignore are named with the key they resemble, on stderr
    std::fs::write(dir.join("typo.yaml"), "SERVICE_NAME: billing\nMAX_WORKER: 4\n").unwrap();
    let typo = dir.join("typo.yaml");
    let run = cli(None, &["show-config", "--file", typo.to_str().unwrap()]).await;
    assert_eq!(
        run.ok().stderr,
        "warning: config key MAX_WORKER is not a micro-framework key (did you mean \
         MAX_WORKERS?); it is kept for Config::get\n"
    );
    let env = [("SERVICE_NAME", "orders"), ("AMQP_URL", "amqp://u:pw@mq/")];
    let run = cli_env(None, &["show-config"], &env).await;
    // (the test's own environment may add lines)
    assert!(
        run.ok().stderr.lines().any(|line| line
            == "warning: environment variable AMQP_URL is not a micro-framework key (did you \
                mean AMQP_URI?); it is ignored"),
        "{run:?}"
    );

    // bad input
    cli(None, &["show-config"]).await.one_error_line(2, "SERVICE_NAME");
    let missing = dir.join("missing.yaml");
    cli(None, &["show-config", "--file", missing.to_str().unwrap()])
        .await
        .one_error_line(2, "cannot read file");
    cli(None, &["show-config", "--file", path]).await.one_error_line(2, "CLI_TEST_PASSWORD");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The example service built next to the binary (`examples/topology_fixture.rs`).
fn fixture() -> PathBuf {
    let dir = Path::new(BIN).parent().expect("the binary's directory");
    let name = format!("topology_fixture{}", std::env::consts::EXE_SUFFIX);
    dir.join("examples").join(name)
}

#[tokio::test]
async fn topology_runs_the_service_binary_and_prints_tables() {
    let fixture = fixture();
    let binary = fixture.to_str().unwrap();
    assert!(fixture.exists(), "{binary} is built by cargo test");

    // the service prints its topology without a broker
    let run = cli(Some(DOWN_URI), &["topology", binary]).await;
    run.ok();
    for part in [
        "service topology_fixture",
        "shop.events",
        "topic",
        "evt-shop-paid--topology_fixture.on_paid",
        "rpc-topology_fixture",
        "nameko-rpc",
    ] {
        assert!(run.stdout.contains(part), "{part:?} not in {}", run.stdout);
    }
    let binding = run
        .stdout
        .lines()
        .find(|line| line.starts_with("shop.events ") && line.contains(" paid "))
        .expect("the binding line");
    assert!(binding.ends_with("evt-shop-paid--topology_fixture.on_paid"), "{binding}");

    let run = cli(None, &["topology", "--json", binary]).await;
    let document: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(document["service"], "topology_fixture");
    assert!(document["bindings"].as_array().is_some_and(|b| !b.is_empty()));

    // binaries that are not such services
    cli(None, &["topology", "/nonexistent/service"]).await.one_error_line(1, "cannot run");
    cli(None, &["topology", "true"]).await.one_error_line(1, "did not print a topology");
    let run = cli(None, &["topology", "sh", "-c", "echo starting >&2; exit 3"]).await;
    run.one_error_line(1, "starting");
    let run = cli(None, &["topology", "--timeout", "1", "sleep", "5"]).await;
    run.one_error_line(1, "printed no topology within 1s");
}

/// A service may print on stdout before its runner prints the topology (a banner, as
/// `examples/rpc_service.rs` does), even a JSON document: the command finds the runner's.
#[tokio::test]
async fn topology_finds_the_document_after_what_the_service_printed_first() {
    let fixture = fixture();
    let binary = fixture.to_str().unwrap();
    let script = format!("echo 'starting {{'; echo '{{\"service\": \"decoy\"}}'; exec '{binary}'");
    let run = cli(Some(DOWN_URI), &["topology", "sh", "-c", &script]).await;
    assert!(run.ok().stdout.contains("service topology_fixture"), "{run:?}");
    let run = cli(Some(DOWN_URI), &["topology", "--json", "sh", "-c", &script]).await;
    let document: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(document["service"], "topology_fixture");
}

/// Whether process `pid` still runs (a zombie nobody reaped yet does not).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// The process id a script wrote to `file`, once written.
async fn written_pid(file: &Path) -> String {
    for _ in 0..500 {
        if let Some(pid) = std::fs::read_to_string(file).ok().filter(|pid| pid.ends_with('\n')) {
            return pid.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} was never written", file.display());
}

/// Whether `pid` has ended within a few seconds (a killed process's parent may take a moment
/// to reap it).
async fn ends(pid: &str) -> bool {
    for _ in 0..300 {
        if !running(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A service started through a wrapper script that does not `exec` it, and a helper the
/// wrapper leaves in the background holding the output open: `topology` ends them all. It
/// killed only the wrapper, and waited for the end of the output, which the helper held
/// open, until its timeout. A daemon outside the group holding the output does not hold the
/// command either.
#[tokio::test]
async fn topology_ends_what_the_binary_left_running() {
    let fixture = fixture();
    let binary = fixture.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("mf-topology-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();

    // a helper in the background, then the service: the document comes, the helper is ended
    let helper = dir.join("helper.pid");
    let script = format!("sleep 300 & echo $! > '{}'; exec '{binary}'", helper.display());
    let run = cli(Some(DOWN_URI), &["topology", "--timeout", "20", "sh", "-c", &script]).await;
    assert!(run.ok().stdout.contains("service topology_fixture"), "{run:?}");
    let pid = written_pid(&helper).await;
    assert!(ends(&pid).await, "the helper {pid} runs on");

    // a daemon that left the group (`setsid`) holding the output: what the binary printed
    // before it exited is read, and the command ends (it waited for the daemon's end, past
    // its timeout)
    let daemon = dir.join("daemon.pid");
    let script = format!("setsid sleep 300 & echo $! > '{}'; exec '{binary}'", daemon.display());
    let run = cli(Some(DOWN_URI), &["topology", "--timeout", "20", "sh", "-c", &script]).await;
    let pid = written_pid(&daemon).await;
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    assert!(run.ok().stdout.contains("service topology_fixture"), "{run:?}");

    // a wrapper whose service never prints: the timeout ends the service too
    let service = dir.join("service.pid");
    let script = format!("sleep 300 & echo $! > '{}'; wait", service.display());
    let run = cli(None, &["topology", "--timeout", "1", "sh", "-c", &script]).await;
    run.one_error_line(1, "printed no topology within 1s");
    let pid = written_pid(&service).await;
    assert!(ends(&pid).await, "the service {pid} runs on");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A wrapper that goes on after its service printed the document (a restart loop's pause, a
/// cleanup step): the command prints the document once read and ends the wrapper. It waited
/// for the wrapper's exit and, at its timeout, said the binary printed no topology.
#[tokio::test]
async fn topology_of_a_wrapper_that_goes_on_after_the_document_is_read() {
    let fixture = fixture();
    let binary = fixture.to_str().unwrap();
    let script = format!("'{binary}'; sleep 20");
    let started = std::time::Instant::now();
    let run = cli(Some(DOWN_URI), &["topology", "--timeout", "5", "sh", "-c", &script]).await;
    let took = started.elapsed();
    assert!(run.ok().stdout.contains("service topology_fixture"), "after {took:?}: {run:?}");
    assert!(took < Duration::from_secs(5), "it waited for the timeout: {took:?}");
}

/// Ctrl-C while `topology` waits for the binary ends the binary and all it started, and
/// exits with 130; so do a supervisor's or `timeout`'s SIGTERM (143) and a closed terminal's
/// SIGHUP (129). The binary runs in a process group of its own (so that it can be ended
/// whole), which none of these reaches.
#[tokio::test]
async fn an_interrupted_topology_ends_the_binary_and_all_it_started() {
    for (signal, code, says) in [
        ("INT", 130, "error: interrupted"),
        ("TERM", 143, "error: SIGTERM"),
        ("HUP", 129, "error: SIGHUP"),
    ] {
        let dir = std::env::temp_dir().join(format!("mf-topology-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let service = dir.join("service.pid");
        let script = format!("sleep 300 & echo $! > '{}'; wait", service.display());
        let child = tokio::process::Command::new(BIN)
            .args(["topology", "sh", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = written_pid(&service).await;
        let cli_pid = child.id().unwrap().to_string();
        let flag = format!("-{signal}");
        let sent = std::process::Command::new("kill").args([&flag, &cli_pid]).status();
        assert!(sent.unwrap().success());
        let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("the command ends at once")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{signal}: {stderr}");
        assert!(stderr.starts_with(says) && stderr.lines().count() == 1, "{signal}: {stderr}");
        assert!(ends(&pid).await, "{signal}: the service {pid} runs on");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `MF_PRINT_TOPOLOGY=1` is honoured by every way to run a service, not `Runner::start`
/// alone: a service started with `Runner::spawn` or `Runner::run_until` served for real
/// (with the operator's AMQP_URI) until the command gave up on it.
#[tokio::test]
async fn topology_shows_services_started_with_spawn_or_run_until() {
    let fixture = fixture();
    let binary = fixture.to_str().unwrap();
    for how in ["--spawn", "--run-until"] {
        // no broker: only a service that does not connect answers
        let run = cli(Some(DOWN_URI), &["topology", "--timeout", "10", binary, how]).await;
        assert_eq!(run.code, 0, "{how}: {run:?}");
        assert!(run.stdout.contains("rpc-topology_fixture"), "{how}: {run:?}");
    }
}

/// `emit` sends the payload as written: an integer wider than 64 bits, which a Python peer
/// reads exactly, became `1.2345678901234568e+29`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_sends_the_payload_as_written() {
    let Some(uri) = rabbitmq() else { return };
    let source = unique("cli_wide");
    let queue = unique("cli_wide_q");
    let exchange = format!("{source}.events");
    let (queues, exchanges) = (vec![queue.clone()], vec![exchange.clone()]);
    let broker = uri.clone();
    cleaned(&broker, queues, exchanges, async move {
        use micro_framework::transport::{BindingSpec, ExchangeSpec, QueueSpec};
        let transport = connect(&uri).await;
        transport.declare_exchange(&ExchangeSpec::topic(&exchange)).await.unwrap();
        transport.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: exchange.clone(),
            routing_key: "paid".into(),
            arguments: Default::default(),
        };
        transport.bind_queue(&binding).await.unwrap();
        let payload =
            r#"{"id": 123456789012345678901234567890, "z": 1, "a": [18446744073709551616]}"#;
        cli(Some(&uri), &["emit", &source, "paid", payload]).await.ok();
        let delivery = transport.get(&queue).await.unwrap().expect("the event");
        assert_eq!(String::from_utf8_lossy(&delivery.body), payload);
        delivery.acker.ack().await.unwrap();
        transport.close().await;
    })
    .await;
}
