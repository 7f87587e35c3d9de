//! How `dlq list` and `dlq show` read a dead-letter queue without consuming it: the messages
//! go back in order, a quorum queue's counting of deliveries is warned of, a connection lost
//! while reading fails the command, binary bodies are shown compactly, and a reader closing
//! the output ends the command quietly. Without RabbitMQ the tests fail when `CI=true` and
//! print `SKIPPED:` otherwise.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use micro_framework::amqp::naming::dead_letter_queue;
use micro_framework::config::QueueType;
use micro_framework::transport::{HeaderValue, Headers, QueueSpec, SharedTransport};
use serde_json::Value;

mod support;

use support::*;

/// Publish a dead letter straight into `dlq`, its error `letter-{n}`, its body `n`.
async fn put_letter(transport: &SharedTransport, dlq: &str, n: usize) {
    let mut headers = Headers::new();
    headers.insert("x-mf-error".into(), HeaderValue::from(format!("letter-{n}")));
    put(transport, dlq, headers, n.to_string().as_bytes()).await;
}

/// The dead-letter queue of `queue` as a service declares it with `QUEUE_TYPE=queue_type`.
async fn declare_dlq(transport: &SharedTransport, uri: &str, queue: &str, queue_type: QueueType) {
    let config = config(uri, "cli_tests").with_queue_type(queue_type);
    transport.declare_queue(&dead_letter_queue(&config, queue)).await.expect("declared");
}

/// The bodies of `dlq show`, in the order it printed them.
fn shown_bodies(run: &Run) -> Vec<Value> {
    let shown: Value = serde_json::from_str(&run.ok().stdout).expect("JSON");
    shown.as_array().expect("an array").iter().map(|letter| letter["body"].clone()).collect()
}

/// The `letter-N` of each row of `dlq list`, in the order it printed them.
fn listed_letters(run: &Run) -> Vec<String> {
    run.ok()
        .stdout
        .lines()
        .skip(1)
        .map(|row| row.split_whitespace().find(|cell| cell.starts_with("letter-")).unwrap_or("?"))
        .map(str::to_owned)
        .collect()
}

fn letters(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("letter-{n}")).collect()
}

fn numbers(range: std::ops::Range<usize>) -> Vec<Value> {
    range.map(Value::from).collect()
}

/// What the test's own connection reads of `dlq`, in queue order (handed back at its close).
async fn queue_order(uri: &str, dlq: &str) -> Vec<Value> {
    let transport = connect(uri).await;
    let mut bodies = Vec::new();
    let mut held = Vec::new();
    while let Some(delivery) = transport.get(dlq).await.expect("get") {
        bodies.push(serde_json::from_slice(&delivery.body).expect("a number"));
        held.push(delivery.acker);
    }
    transport.close().await;
    drop(held);
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_leave_the_queue_in_order() {
    let Some(uri) = rabbitmq() else { return };
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let queue = unique("cli_order");
        let dlq = format!("{queue}.dlq");
        let body = in_order_body(uri.clone(), queue, dlq.clone(), queue_type);
        cleaned(&uri, vec![dlq], vec![], body).await;
    }
}

async fn in_order_body(uri: String, queue: String, dlq: String, queue_type: QueueType) {
    let transport = connect(&uri).await;
    declare_dlq(&transport, &uri, &queue, queue_type).await;
    for n in 0..5 {
        put_letter(&transport, &dlq, n).await;
    }
    let what = format!("{queue_type:?} dead-letter queue");
    for _ in 0..3 {
        let listed = cli(Some(&uri), &["dlq", "list", &queue]).await;
        assert_eq!(listed_letters(&listed), letters(0..5), "{what}: {listed:?}");
        let shown = cli(Some(&uri), &["dlq", "show", &queue]).await;
        assert_eq!(shown_bodies(&shown), numbers(0..5), "{what}: {shown:?}");
        // part of the queue read and handed back, the rest not read at all
        let one = cli(Some(&uri), &["dlq", "show", &queue, "--index", "2"]).await;
        let one: Value = serde_json::from_str(&one.ok().stdout).expect("JSON");
        assert_eq!(one["body"], 2, "{what}: {one}");
    }
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 5, "{what}");
    assert_eq!(queue_order(&uri, &dlq).await, numbers(0..5), "{what}");
    transport.close().await;
}

/// The warning of `dlq list`/`dlq show` on a quorum queue's counted deliveries.
const COUNTING_WARNING: &str = "counts a delivery";

fn warnings(run: &Run) -> usize {
    run.stderr.lines().filter(|line| line.contains(COUNTING_WARNING)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_quorum_dlq_again_warns_that_it_counts_deliveries() {
    let Some(uri) = rabbitmq() else { return };
    let (quorum, classic) = (unique("cli_warn_quorum"), unique("cli_warn_classic"));
    let queues = vec![format!("{quorum}.dlq"), format!("{classic}.dlq")];
    cleaned(&uri, queues, vec![], warning_body(uri.clone(), quorum, classic)).await;
}

async fn warning_body(uri: String, quorum: String, classic: String) {
    let transport = connect(&uri).await;
    declare_dlq(&transport, &uri, &quorum, QueueType::Quorum).await;
    declare_dlq(&transport, &uri, &classic, QueueType::Classic).await;
    for n in 0..3 {
        put_letter(&transport, &format!("{quorum}.dlq"), n).await;
        put_letter(&transport, &format!("{classic}.dlq"), n).await;
    }
    // never delivered before: RabbitMQ 3.x writes x-delivery-count 0 (a warning), 4.x nothing
    let first = cli(Some(&uri), &["dlq", "list", &quorum]).await;
    assert!(warnings(first.ok()) <= 1, "{first:?}");
    // handed back once: each message carries x-delivery-count now (RabbitMQ before 4.3)
    for args in [&["dlq", "list", &quorum][..], &["dlq", "show", &quorum]] {
        let again = cli(Some(&uri), args).await;
        assert_eq!(warnings(again.ok()), 1, "{args:?}: {again:?}");
        assert!(again.stderr.contains("delivery-limit"), "{again:?}");
        assert!(again.stderr.starts_with("warning: "), "{again:?}");
    }
    for _ in 0..3 {
        let run = cli(Some(&uri), &["dlq", "list", &classic]).await;
        assert_eq!(warnings(run.ok()), 0, "{run:?}");
        assert_eq!(run.stderr, "", "{run:?}");
    }
    transport.close().await;
}

fn management(method: &str, path: &str) -> String {
    let output = std::process::Command::new("curl")
        .args(["-s", "-u", "guest:guest", "-X", method])
        .arg(format!("http://127.0.0.1:15672/api/{path}"))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The broker's name of the connection whose client calls itself `connection_name`.
fn connection_named(connection_name: &str) -> Option<String> {
    let list: Value = serde_json::from_str(&management("GET", "connections")).ok()?;
    list.as_array()?.iter().find_map(|connection| {
        (connection["client_properties"]["connection_name"] == connection_name)
            .then(|| connection["name"].as_str().map(str::to_owned))
            .flatten()
    })
}

fn percent_encoded(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// More rows than a pipe holds (64 KiB): a CLI nobody reads blocks on its output.
const MANY: usize = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_reading_fails_the_command() {
    let Some(uri) = rabbitmq() else { return };
    if management("GET", "overview").is_empty() {
        eprintln!("SKIPPED: no management API on 127.0.0.1:15672");
        return;
    }
    for command in ["list", "show"] {
        let queue = unique("cli_lost");
        let dlq = format!("{queue}.dlq");
        cleaned(&uri, vec![dlq.clone()], vec![], lost_body(uri.clone(), queue, dlq, command)).await;
    }
}

async fn lost_body(uri: String, queue: String, dlq: String, command: &'static str) {
    let transport = connect(&uri).await;
    transport.declare_queue(&QueueSpec::durable(dlq.as_str())).await.unwrap();
    for n in 0..MANY {
        put_letter(&transport, &dlq, n).await;
    }
    // the connection is named after SERVICE_NAME: found by it in the management API
    let service = unique("cli_lost_conn");
    let mut child = std::process::Command::new(BIN)
        .args(["dlq", command, &queue])
        .env("AMQP_URI", &uri)
        .env("SERVICE_NAME", &service)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // nobody reads its output yet: the CLI blocks once the pipe is full, mid-queue
    let started = Instant::now();
    let name = loop {
        if let Some(name) = connection_named(&service) {
            break name;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no CLI connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    management("DELETE", &format!("connections/{}", percent_encoded(&name)));
    // the transport reconnects by itself meanwhile
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (stdout, stderr, status) = tokio::task::spawn_blocking(move || {
        let mut stdout = String::new();
        child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (stdout, stderr, child.wait().unwrap())
    })
    .await
    .unwrap();
    let run = Run { code: status.code().unwrap_or(-1), stdout, stderr };
    run.one_error_line(1, "connection to the broker was lost");
    assert!(run.stderr.contains("run the command again"), "{}", run.stderr);
    // what was printed stops short, and repeats nothing
    let printed: Vec<String> = if command == "list" {
        run.stdout.lines().skip(1).map(str::to_owned).collect()
    } else {
        run.stdout
            .lines()
            .filter(|line| line.starts_with("    \"index\""))
            .map(str::to_owned)
            .collect()
    };
    assert!(printed.len() < MANY, "{} of {MANY} printed", printed.len());
    for (n, line) in printed.iter().enumerate() {
        let expected = if command == "list" { format!("letter-{n} ") } else { format!(": {n},") };
        assert!(line.contains(&expected), "line {n}: {line}");
    }
    // nothing consumed
    let started = Instant::now();
    while transport.queue_info(&dlq).await.unwrap().message_count != MANY as u32 {
        assert!(started.elapsed() < Duration::from_secs(10), "dead letters lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    transport.close().await;
}

/// A body of a few MiB that is not UTF-8 (every byte value, 0xff included).
const BINARY_SIZE: usize = 3 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_show_prints_binary_bodies_as_base64_in_bounded_memory() {
    let Some(uri) = rabbitmq() else { return };
    let queue = unique("cli_binary");
    let dlq = format!("{queue}.dlq");
    cleaned(&uri, vec![dlq.clone()], vec![], binary_body(uri.clone(), queue, dlq)).await;
}

async fn binary_body(uri: String, queue: String, dlq: String) {
    let transport = connect(&uri).await;
    transport.declare_queue(&QueueSpec::durable(dlq.as_str())).await.unwrap();
    let binary: Vec<u8> = (0..BINARY_SIZE).map(|n| (n % 251) as u8 ^ 0x80).collect();
    assert!(std::str::from_utf8(&binary).is_err());
    put(&transport, &dlq, Headers::new(), &binary).await;
    put(&transport, &dlq, Headers::new(), b"plain text").await;
    put(&transport, &dlq, Headers::new(), br#""a JSON string""#).await;

    let (stdout, peak_kib) = tokio::task::spawn_blocking({
        let (uri, queue) = (uri.clone(), queue.clone());
        move || run_measured(&uri, &["dlq", "show", &queue, "--index", "0"])
    })
    .await
    .unwrap();
    assert!(
        stdout.len() * 10 < binary.len() * 14,
        "{} bytes printed for a body of {}",
        stdout.len(),
        binary.len()
    );
    // the body, its copy in base64 and the JSON that holds it, and the process itself
    let peak_mib = peak_kib >> 10;
    assert!(peak_mib < 64, "dlq show peaked at {peak_mib} MiB for a 3 MiB body");
    let shown: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(shown["body_encoding"], "base64", "{}", &stdout[..stdout.len().min(500)]);
    assert_eq!(shown["body_size"], BINARY_SIZE, "{}", &stdout[..stdout.len().min(500)]);
    let decoded = STANDARD.decode(shown["body"].as_str().expect("text")).expect("base64");
    assert!(decoded == binary, "another body");

    // text and JSON bodies say what they are: a JSON string is not a text body
    let all = cli(Some(&uri), &["dlq", "show", &queue]).await;
    let all: Value = serde_json::from_str(&all.ok().stdout).unwrap();
    let encodings: Vec<&Value> =
        all.as_array().unwrap().iter().map(|l| &l["body_encoding"]).collect();
    assert_eq!(encodings, ["base64", "text", "json"]);
    assert_eq!(all[1]["body"], "plain text");
    assert_eq!(all[2]["body"], "a JSON string");
    assert_eq!(all[2]["body_size"], 15);
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_output_ends_dlq_list_and_show_quietly() {
    let Some(uri) = rabbitmq() else { return };
    let queue = unique("cli_head");
    let dlq = format!("{queue}.dlq");
    cleaned(&uri, vec![dlq.clone()], vec![], head_body(uri.clone(), queue, dlq)).await;
}

async fn head_body(uri: String, queue: String, dlq: String) {
    let transport = connect(&uri).await;
    transport.declare_queue(&QueueSpec::durable(dlq.as_str())).await.unwrap();
    for n in 0..MANY {
        put_letter(&transport, &dlq, n).await;
    }
    for command in ["list", "show"] {
        // `micro-framework dlq list q | head -2`
        let (cli_uri, cli_queue) = (uri.clone(), queue.clone());
        let (head, stderr, status) = tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new(BIN)
                .args(["dlq", command, &cli_queue])
                .env("AMQP_URI", &cli_uri)
                .env_remove("SERVICE_NAME")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let head: Vec<String> = BufReader::new(child.stdout.take().unwrap())
                .lines()
                .take(2)
                .collect::<Result<_, _>>()
                .unwrap();
            // the reader is gone: the pipe is closed
            let mut stderr = String::new();
            child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            (head, stderr, child.wait().unwrap())
        })
        .await
        .unwrap();
        assert_eq!(head.len(), 2, "{command}: {head:?}");
        assert_eq!(stderr, "", "{command}");
        assert_eq!(status.code(), Some(0), "{command}: {status}");
        // the messages read are back, in order
        assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, MANY as u32);
        let listed = cli(Some(&uri), &["dlq", "list", &queue]).await;
        assert_eq!(listed_letters(&listed), letters(0..MANY), "after {command}");
    }
    transport.close().await;
}

/// A replay that stops early hands back the dead letters it holds (those it could not
/// publish, or without an original queue): a quorum queue delivers messages handed back
/// after those never read, so handing back the held ones alone moved them behind the rest,
/// the oldest dead letters becoming the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_stops_early_leaves_the_queue_in_order() {
    let Some(uri) = rabbitmq() else { return };
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let queue = unique("cli_replay_order");
        let queues = vec![queue.clone(), format!("{queue}.dlq")];
        cleaned(&uri, queues, vec![], replay_order_body(uri.clone(), queue, queue_type)).await;
    }
}

async fn replay_order_body(uri: String, queue: String, queue_type: QueueType) {
    let transport = connect(&uri).await;
    declare_dlq(&transport, &uri, &queue, queue_type).await;
    transport.declare_queue(&QueueSpec::durable(queue.clone())).await.expect("declared");
    let dlq = format!("{queue}.dlq");
    let gone = unique("cli_replay_gone");
    // letter-1 has no original queue, letter-3's is gone, the others go back to `queue`
    for n in 0..6 {
        let mut headers = Headers::new();
        headers.insert("x-mf-error".into(), HeaderValue::from(format!("letter-{n}")));
        let original = match n {
            1 => None,
            3 => Some(gone.as_str()),
            _ => Some(queue.as_str()),
        };
        if let Some(original) = original {
            headers.insert("x-mf-original-queue".into(), HeaderValue::from(original));
        }
        put(&transport, &dlq, headers, n.to_string().as_bytes()).await;
    }
    let what = format!("{queue_type:?} dead-letter queue");
    // the limit reached with letter-1 held
    let run = cli(Some(&uri), &["dlq", "replay", &queue, "--limit", "2"]).await;
    assert_eq!(run.code, 1, "{what}: {run:?}");
    let listed = cli(Some(&uri), &["dlq", "list", &queue]).await;
    assert_eq!(listed_letters(&listed), letters(1..6), "{what}: {listed:?}");
    // stopped at letter-3 with letter-1 held
    let run = cli(Some(&uri), &["dlq", "replay", &queue]).await;
    assert_eq!(run.code, 1, "{what}: {run:?}");
    assert!(run.stderr.contains("replay stopped after 1"), "{what}: {run:?}");
    let listed = cli(Some(&uri), &["dlq", "list", &queue]).await;
    let expected = ["letter-1", "letter-3", "letter-4", "letter-5"];
    assert_eq!(listed_letters(&listed), expected, "{what}: {listed:?}");
    transport.close().await;
}

/// SIGINT to a running command, as Ctrl-C sends it.
fn interrupt(pid: u32) {
    let sent = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
    assert!(sent.is_ok_and(|status| status.success()), "kill -INT {pid}");
}

/// The bodies of `queue` in its order (each read, then all handed back in order).
async fn bodies_in_order(transport: &SharedTransport, queue: &str) -> Vec<u64> {
    let mut bodies = Vec::new();
    let mut held = Vec::new();
    while let Some(delivery) = transport.get(queue).await.expect("get") {
        bodies.push(std::str::from_utf8(&delivery.body).unwrap().parse().unwrap());
        held.push(delivery.acker);
    }
    for acker in &held {
        acker.nack(true).await.unwrap();
    }
    bodies
}

#[tokio::test]
async fn a_list_interrupted_by_ctrl_c_hands_a_quorum_queue_back_in_order() {
    // killed by the signal, it left the broker to hand its messages back channel by channel:
    // 168 of 300 moved
    let Some(uri) = rabbitmq() else { return };
    let queue = unique("cli_list_int");
    let dlq = dead_letter_queue(&config(&uri, "x").with_queue_type(QueueType::Quorum), &queue);
    let names = vec![dlq.name.clone()];
    let broker = uri.clone();
    cleaned(&broker, names, vec![], async move {
        let transport = connect(&uri).await;
        transport.declare_queue(&dlq).await.unwrap();
        for n in 0..300u64 {
            put(&transport, &dlq.name, Headers::new(), n.to_string().as_bytes()).await;
        }
        let mut child = std::process::Command::new(BIN)
            .args(["dlq", "list", &queue])
            .env("AMQP_URI", &uri)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut rows = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..100 {
            rows.next().expect("a row").unwrap();
        }
        interrupt(child.id());
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!(status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("of 300 dead letters; all are back in"), "{stderr}");
        let order = bodies_in_order(&transport, &dlq.name).await;
        assert_eq!(order, (0..300).collect::<Vec<_>>());
        transport.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_replay_interrupted_by_ctrl_c_replays_nothing_twice_and_says_how_far_it_went() {
    // killed midway, a copy was sometimes in the work queue while its dead letter came back
    // (401 messages of 400), and nothing said how many had been replayed
    let Some(uri) = rabbitmq() else { return };
    let queue = unique("cli_replay_int");
    let dlq = dead_letter_queue(&config(&uri, "x"), &queue);
    let names = vec![queue.clone(), dlq.name.clone()];
    let broker = uri.clone();
    cleaned(&broker, names, vec![], async move {
        let transport = connect(&uri).await;
        transport.declare_queue(&QueueSpec::durable(queue.clone())).await.unwrap();
        transport.declare_queue(&dlq).await.unwrap();
        for trial in 0..3u32 {
            transport.purge_queue(&queue).await.unwrap();
            transport.purge_queue(&dlq.name).await.unwrap();
            for n in 0..400u64 {
                let mut headers = Headers::new();
                headers.insert("x-mf-original-queue".into(), HeaderValue::from(queue.as_str()));
                put(&transport, &dlq.name, headers, n.to_string().as_bytes()).await;
            }
            let child = std::process::Command::new(BIN)
                .args(["dlq", "replay", &queue])
                .env("AMQP_URI", &uri)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let started = Instant::now();
            let count = |name: String| {
                let transport = transport.clone();
                async move { transport.queue_info(&name).await.unwrap().message_count }
            };
            while count(queue.clone()).await < 20 + trial * 50
                && started.elapsed() < Duration::from_secs(20)
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            interrupt(child.id());
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(130), "{stderr}");
            let said = stderr.lines().find(|line| line.starts_with("error: interrupted: replayed"));
            let said = said.unwrap_or_else(|| panic!("no summary: {stderr}"));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (work, dead) = (count(queue.clone()).await, count(dlq.name.clone()).await);
            assert_eq!(work + dead, 400, "trial {trial}: {work} replayed + {dead} left: {said}");
            assert!(said.contains(&format!("replayed {work} of 400")), "{said}");
        }
        transport.close().await;
    })
    .await;
}
