//! Security checks: passwords never reach an error or a log line (trace level included), and
//! RPC reply queues and correlation ids are random uuid4s that no one else can consume.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{rabbitmq_uri, unique};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Client;
use micro_framework::prelude::*;
use micro_framework::testing::{test_config, TestService};
use micro_framework::transport::ConsumeOptions;
use micro_framework::Message;
use serde_json::{json, Value};
use uuid::{Uuid, Variant, Version};

/// A password with characters that must be percent-encoded in a URI, and its encoded form.
const PASSWORD: &str = "Mf/p@ss:Wd-93xq";
const ENCODED: &str = "Mf%2Fp%40ss%3AWd-93xq";

fn assert_hidden(text: &str, what: &str) {
    for secret in [PASSWORD, ENCODED, "93xq"] {
        assert!(!text.contains(secret), "{what} shows the password: {text}");
    }
}

fn noop(Payload(_): Payload<Value>) {}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_logged_without_the_password() {
    common::logs::capture(tracing::Level::TRACE);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let uri = format!("amqp://mf_user:{ENCODED}@127.0.0.1:{port}/");
    let config = Config::new(unique("sec_down")).with_amqp_uri(uri.clone());
    assert_hidden(&format!("{config:?}"), "Config's Debug");
    assert_hidden(&serde_json::to_string(&config.to_masked_map()).unwrap(), "to_masked_map");
    assert_hidden(
        &format!("{:?}", micro_framework::transport::rabbitmq::RabbitMqOptions::new(&uri)),
        "options",
    );

    let error = micro_framework::transport::connect(&config).await.unwrap_err().to_string();
    assert!(error.contains("mf_user:***@127.0.0.1"), "{error}");
    assert_hidden(&error, "the connection error");
    let error = Client::connect(&config).await.unwrap_err().to_string();
    assert_hidden(&error, "the client's connection error");

    let routes = vec![Route::new(noop).entrypoint(EventListener::new("s", "e"))];
    let stop = tokio::time::sleep(Duration::from_millis(2500));
    Runner::new(routes, config).run_until(stop).await.unwrap();
    let logs = common::logs::logged();
    assert!(logs.contains(&format!("broker unreachable at amqp://mf_user:***@127.0.0.1:{port}/")));
    assert_hidden(&logs, "the logs");
}

/// A RabbitMQ user of this test, deleted when dropped.
struct User(String);

impl User {
    fn add() -> User {
        let name = unique("mf_sec_user");
        ctl(&["add_user", &name, PASSWORD]);
        ctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        User(name)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        ctl(&["delete_user", &self.0]);
    }
}

fn ctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_traffic_and_refusals_never_log_the_password() {
    common::logs::capture(tracing::Level::TRACE);
    let Some(uri) = rabbitmq_uri() else { return };
    let address = uri.split('@').nth(1).unwrap().to_owned();

    // refused credentials: an error at once, without the password
    let refused = Config::new("sec").with_amqp_uri(format!("amqp://guest:{ENCODED}@{address}"));
    let error = micro_framework::transport::connect(&refused).await.unwrap_err().to_string();
    assert!(error.contains("ACCESS_REFUSED") || error.contains("refused"), "{error}");
    assert_hidden(&error, "the refusal");
    let routes = vec![Route::new(noop).entrypoint(EventListener::new("s", "e"))];
    let error = Runner::new(routes, refused).spawn().await.unwrap_err().to_string();
    assert_hidden(&error, "the start-up error");

    // a working connection of a user with that password, every log level on
    let user = User::add();
    let config = Config::new(unique("sec_up"))
        .with_amqp_uri(format!("amqp://{}:{ENCODED}@{address}", user.0));
    let source = unique("sec_src");
    let routes = vec![Route::new(noop).entrypoint(EventListener::new(&source, "e"))];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    service.dispatch(&source, "e", &json!({})).await.unwrap();
    service.wait_for_route("noop", 1).await.unwrap();
    service.stop().await.unwrap();
    common::cleanup(&uri, &[source, config.service_name]).await;
    drop(user);
    let logs = common::logs::logged();
    assert!(logs.contains("lapin::"), "lapin's own trace logs are captured too");
    assert_hidden(&logs, "the logs");
}

fn reply_to(message: Message) -> Option<String> {
    message.properties.reply_to
}

/// A uuid4: 122 random bits, in canonical form.
fn assert_uuid4(text: &str) {
    let id = Uuid::parse_str(text).unwrap_or_else(|_| panic!("{text} is not a uuid"));
    assert_eq!((id.get_version(), id.get_variant()), (Some(Version::Random), Variant::RFC4122));
    assert_eq!(id.hyphenated().to_string(), text);
}

#[tokio::test(flavor = "multi_thread")]
async fn reply_queues_and_correlation_ids_are_random_and_private() {
    let config = test_config("sec_rpc");
    let routes = vec![Route::new(reply_to).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let caller = config.clone().with_service_name("caller".into());
    let (first, second) =
        (Client::connect(&caller).await.unwrap(), Client::connect(&caller).await.unwrap());

    let mut keys = Vec::new();
    for client in [&first, &second] {
        let key: String = client.call("sec_rpc", "reply_to", json!([]), json!({})).await.unwrap();
        assert_uuid4(&key);
        let reply = client.service("sec_rpc").call_async("reply_to", (), ()).await.unwrap();
        assert_uuid4(reply.correlation_id());
        reply.await.unwrap();
        keys.push(key);
    }
    assert_ne!(keys[0], keys[1], "each caller has its own reply queue");

    // even a known name cannot be consumed by another connection: its consumer is exclusive
    let queue = format!("rpc.reply-standalone_rpc_proxy-{}", keys[0]);
    assert_eq!(first.transport().queue_info(&queue).await.unwrap().consumer_count, 1);
    let other = micro_framework::transport::connect(&config).await.unwrap();
    assert!(other.consume(&queue, ConsumeOptions::default()).await.is_err());
    other.close().await;
    first.close().await;
    second.close().await;
    service.stop().await.unwrap();
}
