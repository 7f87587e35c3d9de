//! Events between this framework and the real Python packages over RabbitMQ: Nameko 2.14.1
//! and micro-framework 2.1.1, run as subprocess peers (`tests/interop/*.py`, see the README
//! there). The venv comes from `.ci/python-env.sh`; its interpreter is found through
//! `MF_INTEROP_PYTHON_NAMEKO` / `MF_INTEROP_PYTHON_UFW`, else `.venv*/bin/python`.
//! Without RabbitMQ or the venv the tests fail under `CI=true` and are skipped loudly
//! otherwise.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, Probe};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::config::Protocol;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::CallContext;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const NAMEKO: &str = "nameko_peer.py";
const UFW: &str = "ufw_peer.py";
/// The peers' own limit (`--timeout`); they exit 3 when it passes.
const PEER_TIMEOUT_SECS: u64 = 30;
/// How long a test waits for one line of a peer (a bit more than the peer's own limit).
const LINE_WAIT: Duration = Duration::from_secs(PEER_TIMEOUT_SECS + 10);

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// The venv interpreter for `script`'s package, or `None` (after a loud `SKIPPED:` line)
/// when there is none; under `CI=true` a missing venv fails the test.
fn interop_python(script: &str) -> Option<PathBuf> {
    let (variable, own_venv) = if script == NAMEKO {
        ("MF_INTEROP_PYTHON_NAMEKO", ".venv-nameko")
    } else {
        ("MF_INTEROP_PYTHON_UFW", ".venv-ufw")
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => vec![PathBuf::from(path)],
        _ => vec![root.join(own_venv).join("bin/python"), root.join(".venv/bin/python")],
    };
    if let Some(python) = candidates.iter().find(|path| path.is_file()) {
        return Some(python.clone());
    }
    let message = format!(
        "no Python interop venv for {script} (looked at {candidates:?}; \
         run `bash .ci/python-env.sh` or set {variable})"
    );
    if is_ci() {
        panic!("{message} and CI=true: the interop tests must run in CI");
    }
    // straight to stderr, past the test harness's capture, so the skip is seen
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}; this interop test did not run");
    None
}

/// RabbitMQ and the interpreter for `script`, or `None` when the test is skipped.
fn prerequisites(script: &str) -> Option<(String, PathBuf)> {
    let uri = common::rabbitmq_uri()?;
    let python = interop_python(script)?;
    Some((uri, python))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A running Python peer: one JSON object per stdout line.
struct Peer {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    fn spawn(python: &Path, script: &str, uri: &str, args: &[&str]) -> Peer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
        let timeout = PEER_TIMEOUT_SECS.to_string();
        let mut child = Command::new(python)
            .arg(&path)
            .args(args)
            .args(["--uri", uri, "--timeout", &timeout])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {python:?} {path:?}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = String::new();
            let _ = stderr_pipe.read_to_string(&mut buffer).await;
            sink.lock().unwrap().push_str(&buffer);
        });
        Peer {
            name: format!("{script} {}", args.join(" ")),
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
        }
    }

    fn fail(&self, what: &str) -> ! {
        // give the stderr reader a moment to collect the traceback
        std::thread::sleep(Duration::from_millis(200));
        panic!("peer `{}`: {what}\n--- its stderr:\n{}", self.name, self.stderr.lock().unwrap())
    }

    /// The next line, or `None` at the end of its output.
    async fn next_line(&mut self) -> Option<Value> {
        let line = match tokio::time::timeout(LINE_WAIT, self.lines.next_line()).await {
            Err(_) => self.fail("printed nothing in time"),
            Ok(Err(error)) => self.fail(&format!("stdout unreadable: {error}")),
            Ok(Ok(line)) => line?,
        };
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| self.fail(&format!("printed a non-JSON line: {line}")));
        if value.get("failed").is_some() || value.get("timeout").is_some() {
            self.fail(&format!("reported {value}"));
        }
        Some(value)
    }

    /// Read lines until one has `key`; returns that line.
    async fn expect(&mut self, key: &str) -> Value {
        loop {
            match self.next_line().await {
                Some(line) if line.get(key).is_some() => return line,
                Some(_) => continue,
                None => self.fail(&format!("ended without a `{key}` line")),
            }
        }
    }

    /// Read the rest of the output and require exit code 0; returns the lines read.
    async fn finish(mut self) -> Vec<Value> {
        let mut lines = Vec::new();
        while let Some(line) = self.next_line().await {
            lines.push(line);
        }
        let status = match tokio::time::timeout(LINE_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => self.fail(&format!("cannot be waited for: {error}")),
            Err(_) => self.fail("did not exit in time"),
        };
        if !status.success() {
            self.fail(&format!("exited with {status}; its lines: {lines:?}"));
        }
        lines
    }
}

impl Drop for Peer {
    /// A test that gives up (a failed assertion) asks a still running peer to stop: on
    /// SIGTERM the peers delete what they declared and exit by themselves (their own
    /// `--timeout` bounds them anyway), where a SIGKILL would leave durable queues behind.
    fn drop(&mut self) {
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Delete what a test declared on RabbitMQ (best effort: a test's own result matters more):
/// our listeners' work `queues` with their `.dlq`, and `exchanges`.
async fn clean_up(uri: &str, queues: &[String], exchanges: &[String]) {
    let config = Config { amqp_uri: uri.to_owned(), ..Config::new("interop_cleanup") };
    let Ok(transport) = micro_framework::amqp::connect(&config).await else { return };
    for queue in queues {
        let _ = transport.delete_queue(queue).await;
        let _ = transport.delete_queue(&format!("{queue}.dlq")).await;
    }
    for exchange in exchanges {
        let _ = transport.delete_exchange(exchange).await;
    }
    transport.close().await;
}

/// Records the payload and the call context of each call.
fn record_call(Payload(payload): Payload<Value>, call: CallContext, Dep(probe): Dep<Arc<Probe>>) {
    probe
        .enter(json!({ "payload": payload, "stack": call.call_id_stack, "call_id": call.call_id }));
    probe.leave();
}

/// Dispatches `relayed` with the received payload, from inside the call: the event carries
/// this call's context headers.
async fn relay(
    Payload(payload): Payload<Value>,
    call: CallContext,
    producer: Producer,
    Dep(probe): Dep<Arc<Probe>>,
) -> micro_framework::Result<()> {
    probe
        .enter(json!({ "payload": payload, "stack": call.call_id_stack, "call_id": call.call_id }));
    probe.leave();
    producer.dispatch("relayed", &payload).await
}

fn strings(value: &Value) -> Vec<String> {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|_| panic!("expected an array of strings, got {value}"))
}

fn sample_payload(i: usize) -> Value {
    json!({ "i": i, "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

// ---------------------------------------------------------------------------------------
// Nameko

#[tokio::test]
async fn nameko_events_reach_a_rust_listener_with_their_call_id_stack() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_src");
    let probe = Probe::new();
    let config = config(&uri, "rs_from_nameko");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record_call)
        .entrypoint(EventListener::new(source.clone(), "paid"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();

    let payload = sample_payload(1);
    let peer = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[
            "dispatch",
            "--service",
            &source,
            "--event",
            "paid",
            "--payload",
            &payload.to_string(),
            "--count",
            "2",
            "--call-id-stack",
            "origin.run.1,middle.step.2",
        ],
    );
    let lines = peer.finish().await;
    let sent: Vec<Vec<String>> = lines
        .iter()
        .filter(|line| line.get("sent").is_some())
        .map(|line| strings(&line["call_id_stack"]))
        .collect();
    assert_eq!(sent.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|line| line["dispatched"] == 2), "{lines:?}");

    let waited = service.wait_for_route("record_call", 2).await;
    let seen = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[format!("evt-{source}-paid--{service_name}.record_call")],
        &[format!("{source}.events")],
    )
    .await;
    waited.unwrap();

    assert_eq!(seen.len(), 2);
    for call in &seen {
        assert_eq!(call["payload"], payload);
        let stack = strings(&call["stack"]);
        let call_id = call["call_id"].as_str().unwrap();
        // Nameko's stack (given parents + its own `{source}.emit.{uuid}`), then ours
        assert_eq!(stack.len(), 4, "{stack:?}");
        assert!(sent.contains(&stack[..3].to_vec()), "{stack:?} not among {sent:?}");
        assert_eq!(&stack[..2], ["origin.run.1", "middle.step.2"]);
        assert!(stack[2].starts_with(&format!("{source}.emit.")), "{stack:?}");
        assert_eq!(stack[3], call_id);
        assert!(call_id.starts_with(&format!("{service_name}.record_call.")), "{call_id}");
    }
    assert_ne!(seen[0]["stack"][2], seen[1]["stack"][2], "each Nameko call has its own id");
}

#[tokio::test]
async fn a_rust_producer_reaches_a_nameko_listener_with_the_call_id_stack() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let trigger = unique("trigger");
    let listener = unique("nk_lst");
    let probe = Probe::new();
    let config = config(&uri, "rs_to_nameko");
    let service_name = config.service_name.clone();

    // Nameko declares `{service_name}.events` and its queue first; our producer then
    // declares the same exchange: any flag mismatch would fail the dispatch (406).
    let mut peer = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[
            "listen",
            "--service",
            &listener,
            "--source",
            &service_name,
            "--event",
            "relayed",
            "--count",
            "2",
        ],
    );
    let ready = peer.expect("ready").await;
    assert_eq!(ready["queue"], format!("evt-{service_name}-relayed--{listener}.handle"));

    let routes = vec![Route::new(relay)
        .entrypoint(EventListener::new(trigger.clone(), "go"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    for i in 0..2 {
        service.dispatch(&trigger, "go", &sample_payload(i)).await.unwrap();
    }
    let lines = peer.finish().await;
    let waited = service.wait_for_route("relay", 2).await;
    let relayed = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[format!("evt-{trigger}-go--{service_name}.relay")],
        &[format!("{trigger}.events"), format!("{service_name}.events")],
    )
    .await;
    waited.unwrap();

    let events: Vec<&Value> = lines.iter().filter(|line| line.get("payload").is_some()).collect();
    assert_eq!(events.len(), 2, "{lines:?}");
    for event in events {
        let i = event["payload"]["i"].as_u64().unwrap() as usize;
        assert_eq!(event["payload"], sample_payload(i));
        let ours = relayed.iter().find(|call| call["payload"]["i"] == i).unwrap();
        // the header arrives as a list of str (not bytes): exactly our call's stack
        let parents = strings(&event["parent_call_id_stack"]);
        assert_eq!(parents, strings(&ours["stack"]));
        assert_eq!(parents, [ours["call_id"].as_str().unwrap()]);
        assert!(parents[0].starts_with(&format!("{service_name}.relay.")), "{parents:?}");
        let stack = strings(&event["call_id_stack"]);
        assert_eq!(stack.len(), 2);
        assert!(stack[1].starts_with(&format!("{listener}.handle.")), "{stack:?}");
        assert_eq!(event["context_data"], json!({}), "no other nameko.* headers were sent");
    }
}

#[tokio::test]
async fn the_call_id_stack_survives_nameko_to_rust_to_nameko() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_origin");
    let listener = unique("nk_end");
    let probe = Probe::new();
    let config = config(&uri, "rs_middle");
    let service_name = config.service_name.clone();

    let mut end = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["listen", "--service", &listener, "--source", &service_name, "--event", "relayed"],
    );
    end.expect("ready").await;
    let routes = vec![Route::new(relay)
        .entrypoint(EventListener::new(source.clone(), "go"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let start = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["dispatch", "--service", &source, "--event", "go", "--payload", "[1, \"two\"]"],
    );
    let sent = start.finish().await;
    let lines = end.finish().await;
    let waited = service.wait_for_route("relay", 1).await;
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[format!("evt-{source}-go--{service_name}.relay")],
        &[format!("{source}.events"), format!("{service_name}.events")],
    )
    .await;
    waited.unwrap();

    let origin = strings(&sent.iter().find(|l| l.get("sent").is_some()).unwrap()["call_id_stack"]);
    let event = lines.iter().find(|line| line.get("payload").is_some()).unwrap();
    assert_eq!(event["payload"], json!([1, "two"]));
    let stack = strings(&event["call_id_stack"]);
    // origin's `emit`, our `relay`, the listener's `handle`
    assert_eq!(stack.len(), 3, "{stack:?}");
    assert_eq!(stack[..1], origin[..]);
    assert!(stack[1].starts_with(&format!("{service_name}.relay.")), "{stack:?}");
    assert!(stack[2].starts_with(&format!("{listener}.handle.")), "{stack:?}");
}

// ---------------------------------------------------------------------------------------
// micro-framework 2.1.1

fn ufw_config(uri: &str, service: &str) -> Config {
    Config { protocol: Protocol::MicroFramework, ..config(uri, service) }
}

#[tokio::test]
async fn micro_framework_events_reach_a_rust_listener() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let source = unique("ufw_src");
    let probe = Probe::new();
    let config = ufw_config(&uri, "rs_from_ufw");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record_call)
        .entrypoint(EventListener::new(source.clone(), "paid"))
        .dependency(Shared(probe.clone()))];
    // Our listener declares `{source}.events` (auto_delete) and the queue first: the
    // micro-framework producer never declares, it needs them to exist.
    let service = TestService::start(routes, config).await.unwrap();

    let payload = sample_payload(3);
    let peer = Peer::spawn(
        &python,
        UFW,
        &uri,
        &[
            "dispatch",
            "--service",
            &source,
            "--event",
            "paid",
            "--payload",
            &payload.to_string(),
            "--count",
            "2",
        ],
    );
    let lines = peer.finish().await;
    assert!(lines.iter().any(|line| line["dispatched"] == 2), "{lines:?}");

    let waited = service.wait_for_route("record_call", 2).await;
    let seen = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    // the exchange is auto_delete: it goes with the queue
    clean_up(&uri, &[format!("{source}.paid__{service_name}.record_call")], &[]).await;
    waited.unwrap();

    assert_eq!(seen.len(), 2);
    for call in &seen {
        assert_eq!(call["payload"], payload);
        // micro-framework sends no context headers: the stack is just this call
        let call_id = call["call_id"].as_str().unwrap();
        assert_eq!(strings(&call["stack"]), [call_id]);
        assert!(call_id.starts_with(&format!("{service_name}.record_call.")), "{call_id}");
    }
}

#[tokio::test]
async fn a_rust_producer_reaches_a_micro_framework_listener() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let source = unique("rs_ufw_src");
    let listener = unique("ufw_lst");
    let mut peer = Peer::spawn(
        &python,
        UFW,
        &uri,
        &["listen", "--service", &listener, "--source", &source, "--event", "paid", "--count", "2"],
    );
    let ready = peer.expect("ready").await;
    assert_eq!(ready["queue"], format!("{source}.paid__{listener}.handle"));

    // the exchange micro-framework declared is auto_delete: ours must declare it the same way
    let config = ufw_config(&uri, "unused");
    let config = Config { service_name: source.clone(), ..config };
    let transport = micro_framework::amqp::connect(&config).await.unwrap();
    let producer = Producer::new(transport.clone(), &config);
    assert_eq!(producer.exchange(), format!("{source}.events"));
    for i in 0..2 {
        producer.dispatch("paid", &sample_payload(i)).await.unwrap();
    }
    transport.close().await;

    let lines = peer.finish().await;
    let mut payloads: Vec<Value> =
        lines.iter().filter_map(|line| line.get("payload").cloned()).collect();
    payloads.sort_by_key(|payload| payload["i"].as_u64());
    assert_eq!(payloads, [sample_payload(0), sample_payload(1)], "{lines:?}");
}
