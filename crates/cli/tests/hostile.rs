//! The `micro-framework` binary against hostile peers: dead letters whose headers, routing keys
//! and bodies carry terminal escapes and forged lines, dead letters too big to hold together,
//! over-long names on the command line, and dead letters published by another broker user.
//! Without RabbitMQ the broker tests fail when `CI=true` and print `SKIPPED:` otherwise.

use std::time::Duration;

use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::Args;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{
    BindingSpec, ExchangeKind, ExchangeSpec, HeaderValue, Headers, OutgoingMessage, Properties,
    PublishOptions, QueueSpec,
};
use serde_json::Value;

mod support;

use support::*;

/// Terminal escapes and line forgeries: clear screen, set title, a C1 control sequence
/// introducer, next line (U+0085), a bidi override, a zero-width space, CR LF.
const HOSTILE: &str =
    "boom\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{85}\u{202e}dne\u{200b}\r\n9  forged  row";

/// True for what must never reach a terminal from the wire: control characters (the line
/// ends of the output apart) and the invisible formatting characters that reorder or hide text.
fn is_unsafe(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

fn assert_safe(what: &str, text: &str) {
    let found: Vec<String> =
        text.chars().filter(|c| is_unsafe(*c)).map(|c| format!("U+{:04X}", u32::from(c))).collect();
    assert!(found.is_empty(), "{what} holds {found:?}: {text:?}");
}

fn text(value: &str) -> HeaderValue {
    HeaderValue::from(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_show_and_replay_escape_hostile_wire_text() {
    let Some(uri) = rabbitmq() else { return };
    let queue = unique("cli_hostile");
    let (dlq, exchange) = (format!("{queue}.dlq"), unique("cli_hostile_fanout"));
    let (queues, exchanges) = (vec![dlq.clone()], vec![exchange.clone()]);
    cleaned(&uri, queues, exchanges, hostile_body(uri.clone(), queue, dlq, exchange)).await;
}

async fn hostile_body(uri: String, queue: String, dlq: String, exchange: String) {
    let transport = connect(&uri).await;
    transport.declare_queue(&QueueSpec::durable(dlq.as_str())).await.unwrap();
    let fanout = ExchangeSpec { kind: ExchangeKind::Fanout, ..ExchangeSpec::topic(&exchange) };
    transport.declare_exchange(&fanout).await.unwrap();
    let binding = BindingSpec {
        queue: dlq.clone(),
        exchange: exchange.clone(),
        routing_key: String::new(),
        arguments: Headers::new(),
    };
    transport.bind_queue(&binding).await.unwrap();

    // every header the table shows is hostile; the routing key and the body too
    let mut headers = Headers::new();
    for key in ["x-mf-route", "x-mf-error-kind", "x-mf-error", "x-mf-attempts", "x-mf-failed-at"] {
        headers.insert(key.into(), text(&format!("{key} {HOSTILE}")));
    }
    headers.insert("x-mf-original-queue".into(), text(&format!("gone{HOSTILE}")));
    headers.insert(format!("x-hostile-{HOSTILE}"), text(HOSTILE));
    let properties = Properties { headers, ..Properties::default() };
    let message = OutgoingMessage { body: HOSTILE.as_bytes().to_vec().into(), properties };
    let routing_key = format!("rk{HOSTILE}");
    transport.publish(&exchange, &routing_key, message, PublishOptions::default()).await.unwrap();
    // a JSON body whose strings hold the same
    let json_body = serde_json::to_vec(&serde_json::json!({ "note": HOSTILE })).unwrap();
    put(&transport, &dlq, Headers::new(), &json_body).await;

    // list: a header line and exactly two rows, nothing that drives the terminal
    let run = cli(Some(&uri), &["dlq", "list", &queue]).await;
    run.ok();
    assert_safe("dlq list", &run.stdout);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    assert!(lines[0].starts_with("INDEX"), "{run:?}");
    assert!(lines[1].starts_with("0 ") && lines[2].starts_with("1 "), "{run:?}");
    assert!(lines[1].contains("\\u{1b}[2J"), "escaped, not dropped: {run:?}");

    // show: valid JSON, nothing that drives the terminal, the values intact
    let run = cli(Some(&uri), &["dlq", "show", &queue]).await;
    run.ok();
    assert_safe("dlq show", &run.stdout);
    let shown: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(shown[0]["routing_key"], routing_key.as_str(), "{shown}");
    assert_eq!(shown[0]["body"], HOSTILE, "{shown}");
    assert_eq!(shown[0]["headers"]["x-mf-error"], format!("x-mf-error {HOSTILE}"), "{shown}");
    assert_eq!(shown[0]["headers"][format!("x-hostile-{HOSTILE}")], HOSTILE, "{shown}");
    assert_eq!(shown[1]["body"]["note"], HOSTILE, "{shown}");
    let one = cli(Some(&uri), &["dlq", "show", &queue, "--index", "1"]).await;
    assert_safe("dlq show --index", &one.ok().stdout);

    // replay: the error naming the hostile original queue stays one escaped line
    let run = cli(Some(&uri), &["dlq", "replay", &queue, "--limit", "1"]).await;
    run.one_error_line(1, "replay stopped after 0: cannot publish to 'gone");
    assert_safe("dlq replay stderr", run.stderr.trim_end_matches('\n'));
    assert_safe("dlq replay stdout", &run.stdout);
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 2);

    transport.close().await;
}

/// Replies a text that drives the terminal.
fn hostile_reply(Args(()): Args<()>) -> String {
    HOSTILE.to_owned()
}

/// Fails with a text that drives the terminal.
fn hostile_failure(Args(()): Args<()>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other(HOSTILE))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_prints_hostile_replies_escaped() {
    let Some(uri) = rabbitmq() else { return };
    let service = unique("cli_hostile_rpc");
    let queues = vec![format!("rpc-{service}")];
    cleaned(&uri, queues, vec![], hostile_call_body(uri.clone(), service)).await;
}

async fn hostile_call_body(uri: String, service: String) {
    let routes = vec![
        Route::new(hostile_reply).entrypoint(RPCListener::new()),
        Route::new(hostile_failure).entrypoint(RPCListener::new()),
    ];
    let running = TestService::start(routes, config(&uri, &service)).await.unwrap();

    let run = cli(Some(&uri), &["call", &format!("{service}.hostile_reply")]).await;
    assert_safe("call result", &run.ok().stdout);
    assert_eq!(serde_json::from_str::<Value>(&run.stdout).unwrap(), HOSTILE);
    let run = cli(Some(&uri), &["call", &format!("{service}.hostile_failure")]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_safe("call remote error", &run.stdout);
    let reply: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(reply["error"]["value"], HOSTILE, "{reply}");

    running.stop().await.unwrap();
}

/// How many 5 MB dead letters `dlq list` must stream.
const BIG_LETTERS: usize = 30;
const BIG_SIZE: usize = 5 << 20;
/// The peak RSS `dlq list` may reach: far less than the 150 MB the dead letters weigh.
const MAX_RSS_KIB: i64 = 100 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_streams_big_dead_letters_in_bounded_memory() {
    let Some(uri) = rabbitmq() else { return };
    let queue = unique("cli_big");
    let dlq = format!("{queue}.dlq");
    cleaned(&uri, vec![dlq.clone()], vec![], big_body(uri.clone(), queue, dlq)).await;
}

async fn big_body(uri: String, queue: String, dlq: String) {
    let transport = connect(&uri).await;
    transport.declare_queue(&QueueSpec::durable(dlq.as_str())).await.unwrap();
    let body = vec![b'x'; BIG_SIZE];
    for n in 0..BIG_LETTERS {
        let mut headers = Headers::new();
        headers.insert("x-mf-error".into(), text(&format!("letter-{n}")));
        put(&transport, &dlq, headers, &body).await;
    }

    let (first, peak_kib) = tokio::task::spawn_blocking({
        let (uri, queue) = (uri.clone(), queue.clone());
        move || run_measured(&uri, &["dlq", "list", &queue])
    })
    .await
    .unwrap();
    assert!(peak_kib < MAX_RSS_KIB, "dlq list peaked at {peak_kib} KiB");
    let rows: Vec<&str> = first.lines().skip(1).collect();
    assert_eq!(rows.len(), BIG_LETTERS, "{first}");
    for (n, row) in rows.iter().enumerate() {
        assert!(row.starts_with(&format!("{n} ")), "{row}");
        assert!(row.contains(&format!("letter-{n} ")) || row.contains(&format!("letter-{n}\t")));
    }
    // nothing consumed, nothing reordered
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, BIG_LETTERS as u32);
    let again = cli(Some(&uri), &["dlq", "list", &queue]).await;
    assert_eq!(again.ok().stdout, first);

    transport.close().await;
}

/// A name one byte over the 255 an AMQP short string holds.
fn over_long(len: usize) -> String {
    "n".repeat(len)
}

#[tokio::test]
async fn over_long_names_are_usage_errors_before_connecting() {
    // the broker is down: a name checked before connecting gives exit code 2, not 1
    // a source service whose exchange `{source}.events` would pass 255 bytes is refused as
    // a SERVICE_NAME is, past 208 bytes (its reply queue's bound)
    let exchange = over_long(256 - ".events".len());
    let run = cli(Some(DOWN_URI), &["emit", &exchange, "paid", "{}"]).await;
    run.one_error_line(2, "must be at most 208 bytes");
    let run = cli(Some(DOWN_URI), &["emit", "shop", &over_long(256), "{}"]).await;
    run.one_error_line(2, "255 bytes");
    cli(Some(DOWN_URI), &["emit", "shop", &over_long(255), "{}"])
        .await
        .one_error_line(1, "cannot reach the broker");

    let method = format!("svc.{}", over_long(252));
    cli(Some(DOWN_URI), &["call", &method]).await.one_error_line(2, "255 bytes");
    let method = format!("svc.{}", over_long(251));
    cli(Some(DOWN_URI), &["call", &method]).await.one_error_line(1, "cannot reach the broker");

    let queue = over_long(256 - ".dlq".len());
    for command in ["list", "show", "replay", "purge"] {
        let run = cli(Some(DOWN_URI), &["dlq", command, &queue]).await;
        run.one_error_line(2, "255 bytes");
        let run = cli(Some(DOWN_URI), &["dlq", command, &format!("{}.dlq", over_long(252))]).await;
        run.one_error_line(2, "255 bytes");
    }
    cli(Some(DOWN_URI), &["dlq", "list", &over_long(251)])
        .await
        .one_error_line(1, "cannot reach the broker");

    // settings from the environment that end up as short strings too
    let long_exchange = [("RPC_EXCHANGE", over_long(256))];
    let env: Vec<(&str, &str)> = long_exchange.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cli_env(Some(DOWN_URI), &["call", "svc.m"], &env).await.one_error_line(2, "255 bytes");
    let vhost = format!("{DOWN_URI}{}", over_long(256));
    for args in [&["emit", "shop", "paid", "{}"][..], &["call", "svc.m"], &["dlq", "purge", "q"]] {
        cli(Some(&vhost), args).await.one_error_line(2, "255 bytes");
    }
}

/// A broker user of the test's own, deleted when dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    /// Create a user allowed everything on vhost `/`; `None` (after `SKIPPED:`) when
    /// `rabbitmqctl` cannot, a failure under `CI=true`.
    fn create(password: &str) -> Option<Self> {
        let user = BrokerUser { name: unique("cli_user") };
        let created = rabbitmqctl(&["add_user", &user.name, password])
            && rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        if created {
            return Some(user);
        }
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("rabbitmqctl cannot create a broker user and CI=true");
        }
        eprintln!("SKIPPED: rabbitmqctl cannot create a broker user");
        None
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_moves_a_foreign_user_id_to_a_header() {
    let Some(uri) = rabbitmq() else { return };
    if uri != "amqp://guest:guest@127.0.0.1:5672/" {
        eprintln!("SKIPPED: the foreign-user test needs the local broker and its rabbitmqctl");
        return;
    }
    let password = uuid::Uuid::new_v4().simple().to_string();
    let Some(user) = BrokerUser::create(&password) else { return };
    let (target, dlq) = (unique("cli_target"), unique("cli_foreign") + ".dlq");
    let foreign_uri = format!("amqp://{}:{password}@127.0.0.1:5672/", user.name);
    let body =
        foreign_body(uri.clone(), foreign_uri, user.name.clone(), target.clone(), dlq.clone());
    cleaned(&uri, vec![target, dlq], vec![], body).await;
    drop(user);
}

async fn foreign_body(uri: String, foreign_uri: String, user: String, target: String, dlq: String) {
    let transport = connect(&uri).await;
    for name in [&target, &dlq] {
        transport.declare_queue(&QueueSpec::durable(name.as_str())).await.unwrap();
    }
    // the other user publishes the dead letter with its user_id, as the broker requires
    let foreign = connect(&foreign_uri).await;
    let mut headers = Headers::new();
    headers.insert("x-mf-original-queue".into(), text(&target));
    headers.insert("x-mf-error".into(), text("boom"));
    let properties = Properties { headers, user_id: Some(user.clone()), ..Properties::default() };
    let message = OutgoingMessage { body: bytes::Bytes::from_static(b"{}"), properties };
    foreign.publish("", &dlq, message, PublishOptions::default()).await.unwrap();
    foreign.close().await;

    let run = cli(Some(&uri), &["dlq", "replay", &dlq]).await;
    assert!(run.ok().stdout.contains("replayed 1 of 1"), "{run:?}");
    assert_eq!(transport.queue_info(&dlq).await.unwrap().message_count, 0);
    let replayed = transport.get(&target).await.unwrap().expect("the replayed message");
    assert_eq!(replayed.properties.user_id, None);
    let headers = &replayed.properties.headers;
    assert_eq!(headers.get("x-mf-original-user-id"), Some(&text(&user)), "{headers:?}");
    assert!(!headers.contains_key("x-mf-error"), "{headers:?}");
    replayed.acker.ack().await.unwrap();
    // settle the ack before the queues are deleted
    tokio::time::timeout(Duration::from_secs(10), transport.close()).await.unwrap();
}
