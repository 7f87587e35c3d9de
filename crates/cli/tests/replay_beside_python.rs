//! `dlq replay` beside a Python micro-framework 2.1.1 instance (`tests/interop/ufw_peer.py`
//! of the repository, its venv from `.ci/python-env.sh`): pins what the README and the
//! command's help say, that such an instance acks a replayed message unhandled. Without
//! RabbitMQ or the venv the test fails under `CI=true` and is skipped loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use micro_framework::transport::{
    HeaderValue, OutgoingMessage, Properties, QueueSpec, SharedTransport,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

mod support;

use support::*;

/// The venv interpreter with micro-framework 2.1.1, or `None` after a loud `SKIPPED:`.
fn ufw_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates: Vec<PathBuf> = match std::env::var_os("MF_INTEROP_PYTHON_UFW") {
        Some(path) if !path.is_empty() => vec![PathBuf::from(path)],
        _ => vec![root.join(".venv-ufw/bin/python"), root.join(".venv/bin/python")],
    };
    if let Some(python) = candidates.into_iter().find(|path| path.is_file()) {
        return Some(python);
    }
    let message = "no Python venv with micro-framework (run `bash .ci/python-env.sh`)";
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{message} and CI=true");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// `ufw_peer.py listen` of `service` for `source`/`paid`, keeping its queue at its end.
fn listen(
    python: &Path,
    uri: &str,
    service: &str,
    source: &str,
) -> (Child, Lines<BufReader<ChildStdout>>) {
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/ufw_peer.py");
    let argv = ["listen", "--service", service, "--source", source, "--event", "paid"];
    let mut child = Command::new(python)
        .arg(peer)
        .args(argv)
        .args(["--count", "1", "--keep-queue", "--uri", uri, "--timeout", "30"])
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the peer starts");
    let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    (child, lines)
}

/// The peer's next JSON line, `None` at its end.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<Value> {
    let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line()).await;
    let line = line.expect("a line in time").expect("readable")?;
    Some(serde_json::from_str(&line).expect("a JSON line"))
}

/// Wait until `queue` holds no ready message (delivered to its consumer), for up to 10 s.
async fn drained(transport: &SharedTransport, queue: &str) {
    for _ in 0..100 {
        if transport.queue_info(queue).await.unwrap().message_count == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{queue} was not consumed");
}

/// Documented (README, `dlq replay --help`): micro-framework 2.1.1 looks a handler up by the
/// delivery's exchange and routing key; a replayed copy comes through the default exchange,
/// so its instance acks it unhandled and the message is gone. Should this fail, replay has
/// become safe beside such an instance: change the README and the help with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_beside_a_micro_framework_instance_is_acked_unhandled() {
    let help = cli(None, &["dlq", "replay", "--help"]).await;
    assert!(help.ok().stdout.contains("finds no handler for such a"), "{help:?}");
    let Some(uri) = rabbitmq() else { return };
    let Some(python) = ufw_python() else { return };
    let (service, source) = (unique("replay_svc"), unique("replay_src"));
    let queue = format!("{source}.paid__{service}.handle");
    let queues = vec![queue.clone(), format!("{queue}.dlq")];
    cleaned(&uri, queues, vec![], replay_body(uri.clone(), python, service, source, queue)).await;
}

async fn replay_body(uri: String, python: PathBuf, service: String, source: String, queue: String) {
    let (mut peer, mut lines) = listen(&python, &uri, &service, &source);
    let ready = next_line(&mut lines).await.expect("a ready line");
    assert_eq!(ready["queue"], queue.as_str(), "{ready}");
    let transport = connect(&uri).await;
    let dlq = format!("{queue}.dlq");
    transport.declare_queue(&QueueSpec::durable(dlq.as_str())).await.unwrap();
    let mut properties =
        Properties { content_type: Some("application/json".into()), ..Properties::default() };
    properties.headers.insert("x-mf-original-queue".into(), HeaderValue::from(&*queue));
    let message = OutgoingMessage { body: bytes::Bytes::from_static(br#"{"id": 7}"#), properties };
    transport.publish("", &dlq, message, Default::default()).await.unwrap();

    cli(Some(&uri), &["dlq", "replay", &dlq]).await.ok();
    drained(&transport, &queue).await;
    // the peer acks at once, in its consumer; then its stop would hand back an unacked copy
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = peer.id().expect("running").to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut handled = Vec::new();
    while let Some(line) = next_line(&mut lines).await {
        handled.extend(line.get("payload").cloned());
    }
    peer.wait().await.unwrap();
    assert_eq!(handled, Vec::<Value>::new(), "the micro-framework instance handled it");
    assert_eq!(transport.queue_info(&queue).await.unwrap().message_count, 0, "acked");
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 0, "replayed");
    transport.close().await;
}
