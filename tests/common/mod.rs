//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod failing;
pub mod journaled;
pub mod logs;
pub mod peer;
pub mod queues;
pub mod raw_ws;
#[cfg(feature = "process")]
pub mod replacement;
pub mod switch;
pub mod tally;
pub mod targets;
pub mod ufw_caller;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use micro_framework::Config;

/// The brokers every transport-parameterized test runs against: a private in-process broker
/// and RabbitMQ when [`rabbitmq_uri`] finds it; RabbitMQ only when the switch
/// `TEST_AMQP_URI` is set (as `testing::test_config` does).
pub fn broker_uris() -> Vec<String> {
    let switched = std::env::var("TEST_AMQP_URI").is_ok_and(|uri| !uri.is_empty());
    let mut uris = Vec::new();
    if !switched {
        uris.push(format!("memory://test-{}", uuid::Uuid::new_v4()));
    }
    uris.extend(rabbitmq_uri());
    uris
}

/// RabbitMQ for tests: `TEST_AMQP_URI` (the switch that moves `testing::test_config` to
/// RabbitMQ) if set, else `MF_TEST_AMQP_URI` (RabbitMQ for the tests that always use it, the
/// suite staying on the in-process broker otherwise), default
/// `amqp://guest:guest@127.0.0.1:5672/`. When it is unreachable the test fails under
/// `CI=true` and is skipped loudly otherwise.
pub fn rabbitmq_uri() -> Option<String> {
    let uri = ["TEST_AMQP_URI", "MF_TEST_AMQP_URI"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|uri| !uri.is_empty()))
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/".to_owned());
    let address = url::Url::parse(&uri)
        .ok()
        .and_then(|url| Some(format!("{}:{}", url.host_str()?, url.port().unwrap_or(5672))));
    let reachable = address.as_deref().is_some_and(|address| {
        address.parse().is_ok_and(|socket| {
            std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2)).is_ok()
        })
    });
    if reachable {
        return Some(uri);
    }
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("RabbitMQ is unreachable at {address:?} and CI=true: RabbitMQ tests must run in CI");
    }
    eprintln!("SKIPPED: RabbitMQ unreachable at {address:?}; its part of this test did not run");
    None
}

/// A config for a uniquely named service (so queues never collide between tests).
pub fn config(uri: &str, service: &str) -> Config {
    Config::new(unique(service)).with_amqp_uri(uri.to_owned())
}

/// A test's metrics server: on, on a free loopback port.
pub trait MetricsOnAnyPort {
    /// The metrics server on, on a free loopback port (`Service::metrics_address` tells
    /// which).
    fn with_metrics_on_any_port(self) -> Self;
}

impl MetricsOnAnyPort for Config {
    fn with_metrics_on_any_port(self) -> Self {
        self.with_enable_metrics(true).with_metrics(micro_framework::config::MetricsConfig {
            host: "127.0.0.1".into(),
            port: 0,
        })
    }
}

/// `prefix` with a random suffix: exchange and service names that no other test shares.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The longest a [`Probe`] holds a call: longer than any test holds one.
const GATE_LIMIT: Duration = Duration::from_secs(120);

/// Counts calls, measures concurrency, and can hold calls until released.
#[derive(Debug, Default)]
pub struct Probe {
    pub started: AtomicU64,
    pub finished: AtomicU64,
    running: AtomicUsize,
    pub max_running: AtomicUsize,
    gate: Mutex<bool>,
    opened: Condvar,
    pub seen: Mutex<Vec<serde_json::Value>>,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Probe { gate: Mutex::new(true), ..Probe::default() })
    }

    /// A probe whose calls wait in `enter` until `open` is called.
    pub fn closed() -> Arc<Self> {
        Arc::new(Probe { gate: Mutex::new(false), ..Probe::default() })
    }

    /// Record a call starting, and wait for the gate.
    pub fn enter(&self, payload: serde_json::Value) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.seen.lock().unwrap().push(payload);
        // Bounded: a test that fails before it opens the gate would otherwise leave its calls
        // waiting for ever, and its runtime's end (which waits for blocking calls) with them.
        let gate = self.gate.lock().unwrap();
        let (gate, waited) =
            self.opened.wait_timeout_while(gate, GATE_LIMIT, |open| !*open).unwrap();
        drop(gate);
        if waited.timed_out() {
            eprintln!("a probe's gate was not opened within {GATE_LIMIT:?}: the call goes on");
        }
    }

    /// Record a call finishing.
    pub fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    pub fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Wait (up to 10 s) until `count` calls have started.
    pub async fn wait_started(&self, count: u64) {
        wait_until(|| self.started() >= count, "calls to start").await;
    }
}

/// Poll `condition` every 5 ms for up to 10 s; panic with `what` if it never holds.
pub async fn wait_until(mut condition: impl FnMut() -> bool, what: &str) {
    for _ in 0..2000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Delete the queues and exchanges of RabbitMQ whose names contain one of `markers` (the
/// unique names a test used), so tests leave nothing behind. Nothing to do on `memory://`.
pub async fn cleanup(uri: &str, markers: &[String]) {
    if uri.starts_with("memory://") {
        return;
    }
    let rabbitmqctl = |what: &str| {
        let output = std::process::Command::new("rabbitmqctl")
            .args([what, "-q", "--no-table-headers", "name"])
            .output()
            .expect("rabbitmqctl runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let config = Config::new("cleanup").with_amqp_uri(uri.to_owned());
    delete_marked(&config, rabbitmqctl, markers).await;
}

/// Delete, through `config`'s broker, the queues and exchanges whose names contain one of
/// `markers`, among those `list` names (`list("list_queues")`, `list("list_exchanges")`: the
/// output of `rabbitmqctl WHAT -q --no-table-headers name` on a node of that broker).
pub async fn delete_marked(config: &Config, list: impl Fn(&str) -> String, markers: &[String]) {
    let marked = |what: &str| -> Vec<String> {
        list(what)
            .lines()
            .map(|line| line.trim().to_owned())
            .filter(|name| markers.iter().any(|marker| name.contains(marker.as_str())))
            .collect()
    };
    let transport = micro_framework::transport::connect(config).await.expect("cleanup connects");
    for queue in marked("list_queues") {
        transport.delete_queue(&queue).await.expect("queue deleted");
    }
    for exchange in marked("list_exchanges") {
        transport.delete_exchange(&exchange).await.expect("exchange deleted");
    }
    transport.close().await;
}

/// A plain HTTP/1.1 GET on loopback: (status, body). Errors (e.g. connection refused) are
/// returned as status 0.
pub fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
    else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// Poll the async `condition` every 20 ms for up to 10 s; panic if it never holds.
pub async fn wait_until_async<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for a condition");
}

/// A RabbitMQ user with all permissions on `/`, deleted when dropped.
pub struct TemporaryUser {
    pub name: String,
    password: String,
}

impl TemporaryUser {
    pub fn create(prefix: &str) -> TemporaryUser {
        let user = TemporaryUser { name: unique(prefix), password: unique("pw") };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    /// `uri` with this user's credentials.
    pub fn uri(&self, uri: &str) -> String {
        let mut url = url::Url::parse(uri).expect("a broker URI");
        url.set_username(&self.name).expect("a user name");
        url.set_password(Some(&self.password)).expect("a password");
        url.to_string()
    }

    /// A transport connected as this user to the broker of `uri`.
    pub async fn connect(&self, uri: &str) -> micro_framework::transport::SharedTransport {
        let config = Config::new(unique("user")).with_amqp_uri(self.uri(uri));
        micro_framework::transport::connect(&config).await.expect("the user connects")
    }

    /// Set this user's permissions on `/`: the `configure`, `write` and `read` patterns.
    pub fn permit(&self, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&["set_permissions", "-p", "/", &self.name, configure, write, read]);
    }

    /// Have the broker close every connection of this user.
    pub fn close_connections(&self) {
        rabbitmqctl(&["close_all_user_connections", &self.name, "closed by a test"]);
    }
}

impl Drop for TemporaryUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

/// `rabbitmqctl ARGS` on the local node, which must succeed; what it printed.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output =
        std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The live worker processes of `service`: children of this process started for it (found by
/// the service name in their environment), zombies left out.
pub fn workers_of(service: &str) -> Vec<u32> {
    let marker = format!("MF_WORKER_SERVICE_NAME={service}\0");
    let mut workers = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // after the name: the state (a zombie's is `Z`, `X` once dead), then the parent
        let mut fields = stat.rsplit(')').next().unwrap_or_default().split_whitespace();
        let (state, parent) = (fields.next(), fields.next());
        if parent != Some(&std::process::id().to_string()) || matches!(state, Some("Z" | "X")) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if String::from_utf8_lossy(&environ).contains(&marker) {
            workers.push(pid);
        }
    }
    workers
}

/// The example `name`, built (`cargo build --examples`), beside the running test binary.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().and_then(std::path::Path::parent).unwrap().join("examples");
    let example = examples.join(name);
    assert!(example.exists(), "run `cargo build --examples` first: {}", example.display());
    example
}
