//! Fault tests on RabbitMQ: connections closed, the service SIGKILLed, SIGTERM mid-stream.
//! Each counts unique message ids so that a loss shows.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "metrics")]
use common::MetricsOnAnyPort;
use common::{rabbitmq_uri, rabbitmqctl, wait_until, wait_until_async, Probe};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use serde_json::{json, Value};

/// Fault tests disturb the broker for everyone: one at a time (`write`). Those that only close
/// their own user's connections may run together (`read`), but not beside one of the others:
/// it may have stopped the broker, and `rabbitmqctl` then fails to create their user.
static SERIAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn record(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

fn unique_ids(probe: &Probe) -> HashSet<u64> {
    probe.seen.lock().unwrap().iter().filter_map(|v| v["id"].as_u64()).collect()
}

async fn publisher(uri: &str) -> Producer {
    let config = Config::new("fault_src").with_amqp_uri(uri.to_owned());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    Producer::new(transport, &config)
}

async fn delete_queues(uri: &str, queue: &str) {
    let config = Config::new("cleanup").with_amqp_uri(uri.to_owned());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    transport.delete_queue(queue).await.unwrap();
    transport.delete_queue(&format!("{queue}.dlq")).await.unwrap();
    transport.delete_exchange("fault_src.events").await.unwrap();
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_every_connection_mid_stream_loses_nothing() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let probe = Probe::new();
    let config = common::config(&uri, "faultconn");
    let queue = format!("evt-fault_src-job--{}.record", config.service_name);
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new("fault_src", "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let producer = publisher(&uri).await;
    let total = 1000u64;
    let mut closing = None;
    for id in 0..total {
        if id == total / 3 {
            let close = || rabbitmqctl(&["close_all_connections", "fault test"]);
            closing = Some(tokio::task::spawn_blocking(close));
        }
        // The close lands while the middle third is published: `rabbitmqctl` takes a second
        // or more to start, the publishes less, so a close left to itself could land after
        // the test (its service's connection untouched) on the next test's service.
        if id == 2 * total / 3 {
            closing.take().unwrap().await.unwrap();
        }
        producer.dispatch("job", &json!({ "id": id })).await.unwrap();
    }
    wait_until(|| unique_ids(&probe).len() as u64 == total, "every id handled").await;
    let reconnected = || service.service().transport().reconnects() >= 1 && service.is_ready();
    wait_until(reconnected, "the service to reconnect").await;
    // The service is back to work by itself.
    producer.dispatch("job", &json!({ "id": total })).await.unwrap();
    wait_until(|| unique_ids(&probe).contains(&total), "a message after recovery").await;
    service.stop().await.unwrap();
    delete_queues(&uri, &queue).await;
}

/// The test-support service `event_recorder` (tests/support), built by `cargo test`.
fn recorder_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(Path::parent).unwrap();
    debug.join("examples").join("event_recorder")
}

fn spawn_recorder(uri: &str, service: &str, mode: &str, file: &Path) -> Child {
    Command::new(recorder_binary())
        .env("AMQP_URI", uri)
        .env("SERVICE_NAME", service)
        .env("WORKER_MODE", mode)
        .env("MAX_WORKERS", "4")
        .env("WORK_MS", "30")
        .env("RECORD_FILE", file)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("event_recorder starts (built by cargo test as an example)")
}

fn recorded(file: &Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    panic!("the service did not exit within 30 s");
}

async fn wait_queue_ready(uri: &str, queue: &str) {
    let config = Config::new("observer").with_amqp_uri(uri.to_owned());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    for _ in 0..600 {
        if transport.queue_info(queue).await.is_ok_and(|info| info.consumer_count > 0) {
            transport.close().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nobody consumes {queue}");
}

/// Publish `total` jobs to a recorder in `mode`, interrupt it with `interruption` once a
/// fifth is recorded, restart it, and check that every id was recorded.
async fn interrupt_mid_stream(mode: &str, interruption: &str) {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let dir = std::env::temp_dir().join(format!("mf-fault-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("record.txt");
    let service = format!("faultproc_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let queue = format!("evt-fault_src-job--{service}.job");

    let mut child = spawn_recorder(&uri, &service, mode, &file);
    wait_queue_ready(&uri, &queue).await;
    let producer = publisher(&uri).await;
    let total = 500u64;
    for id in 0..total {
        producer.dispatch("job", &json!({ "id": id })).await.unwrap();
    }
    wait_until(|| recorded(&file).len() as u64 >= total / 5, "a fifth recorded").await;
    signal(&child, interruption);
    let status = wait_exit(&mut child).await;
    if interruption == "TERM" {
        assert!(status.success(), "graceful stop in {mode} mode exits 0, got {status}");
    }
    let before_restart = recorded(&file).len();
    assert!((before_restart as u64) < total, "interrupted before the end");

    let mut child = spawn_recorder(&uri, &service, mode, &file);
    wait_until(
        || recorded(&file).into_iter().collect::<HashSet<_>>().len() as u64 == total,
        "every id recorded after the restart",
    )
    .await;
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).await.success());
    let all = recorded(&file);
    eprintln!(
        "{mode}/{interruption}: {} calls for {total} ids ({} duplicates)",
        all.len(),
        all.len() as u64 - total
    );
    delete_queues(&uri, &queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    interrupt_mid_stream("thread", "KILL").await;
}

#[tokio::test]
async fn sigterm_mid_stream_in_thread_mode_loses_nothing() {
    interrupt_mid_stream("thread", "TERM").await;
}

#[tokio::test]
async fn sigterm_mid_stream_in_greedy_thread_mode_loses_nothing() {
    interrupt_mid_stream("greedy_thread", "TERM").await;
}

#[tokio::test]
async fn a_broker_down_at_start_up_is_retried_with_a_clear_log_line() {
    let dir = std::env::temp_dir().join(format!("mf-down-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(recorder_binary())
        .env("AMQP_URI", "amqp://guest:s3cret@127.0.0.1:1/")
        .env("SERVICE_NAME", "down_test")
        .env("RECORD_FILE", dir.join("record.txt"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the service keeps trying, it does not exit");
    signal(&child, "TERM");
    let status = wait_exit(&mut child).await;
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("broker unreachable at amqp://guest:***@127.0.0.1:1/"), "{log}");
    assert!(log.matches("trying again").count() >= 2, "{log}");
    assert!(!log.contains("s3cret"), "password leaked: {log}");
    assert!(!log.contains("panicked"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A recorder (`name`, with `env`) busy with one long call: the child, its queue and its
/// folder.
async fn recorder_in_a_long_call(
    uri: &str,
    name: &str,
    env: &[(&str, &str)],
) -> (Child, String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("mf-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let service = format!("{name}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let queue = format!("evt-fault_src-job--{service}.job");
    let mut command = Command::new(recorder_binary());
    command
        .env("AMQP_URI", uri)
        .env("SERVICE_NAME", &service)
        .env("RECORD_FILE", dir.join("record.txt"))
        .env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().unwrap();
    wait_queue_ready(uri, &queue).await;
    publisher(uri).await.dispatch("job", &json!({ "id": 1 })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    (child, queue, dir)
}

/// The unfinished call's message was not acked: it is back in `queue`. Then clean up.
async fn unfinished_call_is_back(uri: &str, queue: &str, dir: PathBuf) {
    let config = Config::new("observer").with_amqp_uri(uri.to_owned());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    wait_until_async(|| {
        let transport = transport.clone();
        let queue = queue.to_owned();
        async move { transport.queue_info(&queue).await.is_ok_and(|info| info.message_count == 1) }
    })
    .await;
    transport.close().await;
    delete_queues(uri, queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_second_signal_forces_the_exit_while_calls_run() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let (mut child, queue, dir) =
        recorder_in_a_long_call(&uri, "faultforce", &[("WORK_MS", "20000")]).await;
    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the first signal waits for the running call");
    signal(&child, "TERM");
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(130), "the second signal exits at once");
    unfinished_call_is_back(&uri, &queue, dir).await;
}

#[tokio::test]
async fn the_service_exits_after_shutdown_timeout_with_a_sync_call_still_running() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let env = [("WORK_MS", "60000"), ("SHUTDOWN_TIMEOUT", "1")];
    let (mut child, queue, dir) = recorder_in_a_long_call(&uri, "faulttimeout", &env).await;
    signal(&child, "TERM");
    // one signal only: the call sleeps for a minute, and SHUTDOWN_TIMEOUT is 1 s
    let status = wait_exit(&mut child).await;
    assert!(status.success(), "a graceful stop that gave up on a call: {status:?}");
    unfinished_call_is_back(&uri, &queue, dir).await;
}

#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_while_the_broker_is_away_and_back_after_reconnect() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let config = common::config(&uri, "faultready").with_metrics_on_any_port();
    let queue = format!("evt-fault_src-job--{}.record", config.service_name);
    let probe = Probe::new();
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new("fault_src", "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().metrics_address().unwrap();
    let ready = move || common::http_get(address, "/health/ready").0;
    let (status, body) = common::http_get(address, "/health/ready");
    assert_eq!(status, 200, "{body}");

    rabbitmqctl(&["stop_app"]);
    let mut seen_unready = false;
    for _ in 0..200 {
        if tokio::task::spawn_blocking(ready).await.unwrap() == 503 {
            seen_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    assert!(seen_unready, "/health/ready answered 200 while RabbitMQ was stopped");
    wait_until(|| common::http_get(address, "/health/ready").0 == 200, "ready again").await;
    let metrics = common::http_get(address, "/metrics").1;
    assert!(
        metrics.lines().any(|l| l.starts_with("broker_reconnects_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Back to work by itself.
    publisher(&uri).await.dispatch("job", &json!({ "id": 7 })).await.unwrap();
    wait_until(|| unique_ids(&probe).contains(&7), "a message after the broker came back").await;
    service.stop().await.unwrap();
    delete_queues(&uri, &queue).await;
}

fn slow_answer(Dep(probe): Dep<Arc<Probe>>) -> u64 {
    probe.enter(Value::Null);
    probe.leave();
    42
}

/// A reply published while the caller is disconnected waits in its reply queue (durable, not
/// exclusive, as Nameko's) and reaches the call once the caller is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_reply_sent_while_the_caller_is_disconnected_still_arrives() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    // The caller logs in as its own user, so its connection alone can be closed and kept
    // out (no permissions) while the service replies.
    let user = common::unique("mf_caller");
    rabbitmqctl(&["add_user", &user, "secret"]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let probe = Probe::closed();
    let config = common::config(&uri, "replywait");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(slow_answer)
        .entrypoint(micro_framework::amqp::entrypoints::RPCListener::new())
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let caller_uri = uri.replacen("guest:guest", &format!("{user}:secret"), 1);
    let caller = Config::new("caller").with_amqp_uri(caller_uri);
    let client = micro_framework::amqp::rpc::Client::connect(&caller).await.unwrap();
    let call = client
        .service(service_name.clone())
        .timeout(Duration::from_secs(30))
        .call_async("slow_answer", (), ())
        .await
        .unwrap();
    probe.wait_started(1).await;
    rabbitmqctl(&["clear_permissions", "-p", "/", &user]);
    rabbitmqctl(&["close_all_user_connections", &user, "reply test"]);
    wait_until(|| !client.transport().is_connected(), "the caller to be disconnected").await;
    probe.open(); // the service replies while the caller is away
    wait_until(
        || service.route("slow_answer").is_ok_and(|r| r.stats().settled_count() >= 1),
        "the reply",
    )
    .await;
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let answer: u64 = call.result().await.expect("the reply waited for the caller");
    assert_eq!(answer, 42);
    client.close().await;
    service.stop().await.unwrap();
    rabbitmqctl(&["delete_user", &user]);
    common::cleanup(&uri, &[service_name]).await;
}

#[tokio::test]
async fn a_second_signal_forces_the_exit_while_the_service_starts() {
    let Some(uri) = rabbitmq_uri() else { return };
    let dir = std::env::temp_dir().join(format!("mf-faultstart-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("record.txt");
    let mut child = Command::new(recorder_binary())
        .env("AMQP_URI", uri)
        .env("SERVICE_NAME", common::unique("faultstart"))
        .env("RECORD_FILE", &file)
        .env("SETUP_MS", "120000")
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("event_recorder starts (built by cargo build --examples)");
    wait_until(
        || std::fs::read_to_string(&file).is_ok_and(|text| text.contains("setup")),
        "the dependency's set-up to begin",
    )
    .await;
    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the first signal waits for the start");
    signal(&child, "TERM");
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(130), "the second signal exits at once");
    let _ = std::fs::remove_dir_all(dir);
}

type UpstreamWriter = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

/// A TCP proxy to the broker. A cut closes both sides of each connection, or the client's
/// side only: the broker then keeps the old connection (and its exclusive consumers) until
/// its heartbeat timeout, as when the client notices a network failure first. Its
/// broker-to-client direction can be slowed to 16 KiB every 50 ms (`slow`).
struct Proxy {
    address: std::net::SocketAddr,
    slow: Arc<std::sync::atomic::AtomicBool>,
    held: Arc<std::sync::Mutex<Vec<UpstreamWriter>>>,
    pipes: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(broker: std::net::SocketAddr) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held: Arc<std::sync::Mutex<Vec<UpstreamWriter>>> = Arc::default();
        let pipes: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (slow_too, held_too, pipes_too) = (slow.clone(), held.clone(), Arc::clone(&pipes));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else { continue };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, upstream_write) = upstream.into_split();
                // Held here too: a cut of the client's side leaves the broker's side open.
                let writer = Arc::new(tokio::sync::Mutex::new(upstream_write));
                let up = {
                    let writer = writer.clone();
                    tokio::spawn(async move {
                        let mut buffer = vec![0u8; 65536];
                        while let Ok(read @ 1..) = client_read.read(&mut buffer).await {
                            if writer.lock().await.write_all(&buffer[..read]).await.is_err() {
                                break;
                            }
                        }
                    })
                };
                let slow = slow_too.clone();
                let down = tokio::spawn(async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    while let Ok(read @ 1..) = upstream_read.read(&mut buffer).await {
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                        if slow.load(std::sync::atomic::Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                });
                pipes_too.lock().unwrap().extend([up, down]);
                held_too.lock().unwrap().push(writer);
            }
        });
        Proxy { address, slow, held, pipes, accept }
    }

    /// A proxy to the broker of `uri`, and the URI that connects through it.
    async fn in_front_of(uri: &str) -> (Proxy, url::Url) {
        let url = url::Url::parse(uri).unwrap();
        let broker = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
        let proxy = Proxy::start(broker.parse().unwrap()).await;
        let mut proxied = url.clone();
        proxied.set_port(Some(proxy.address.port())).unwrap();
        (proxy, proxied)
    }

    /// Close the client's side of every connection; the broker's stays open.
    fn cut_client_side(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    /// Close both sides of every connection.
    fn cut(&self) {
        self.cut_client_side();
        self.held.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The caller notices its connection is lost before the broker does (its side of the network
/// failed): the broker keeps the old connection, and the exclusive consumer of the caller's
/// reply queue, until its heartbeat timeout. The call's reply, sent meanwhile, reaches the
/// call once the broker lets go, rather than the call failing and the reply queue being
/// deleted with the reply in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_reply_reaches_a_caller_that_saw_its_connection_drop_first() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let probe = Probe::closed();
    let config = common::config(&uri, "replyhalf");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(slow_answer)
        .entrypoint(micro_framework::amqp::entrypoints::RPCListener::new())
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let (proxy, caller_uri) = Proxy::in_front_of(&uri).await;
    let caller = Config::new(common::unique("halfcaller"))
        .with_amqp_uri(caller_uri.to_string())
        .with_amqp_heartbeat(3);
    let client = micro_framework::amqp::rpc::Client::connect(&caller).await.unwrap();
    let call = client
        .service(service_name.clone())
        .timeout(Duration::from_secs(60))
        .call_async("slow_answer", (), ())
        .await
        .unwrap();
    probe.wait_started(1).await;
    let reconnects = client.transport().reconnects();
    proxy.cut_client_side();
    // seen while it lasts, or by the reconnection that ends it: through the proxy, which
    // still takes connections, that can take less than a poll's 5 ms
    let transport = client.transport();
    let saw_the_loss = || !transport.is_connected() || transport.reconnects() > reconnects;
    wait_until(saw_the_loss, "the caller to see the loss").await;
    probe.open(); // the service replies while the broker still holds the old connection
    let answer = call.result::<u64>().await;
    client.close().await;
    service.stop().await.unwrap();
    drop(proxy);
    common::cleanup(&uri, &[service_name, caller.service_name.clone()]).await;
    assert_eq!(answer.expect("the reply reached the call"), 42);
}

async fn answer_later(
    micro_framework::amqp::rpc::Args((id, millis)): micro_framework::amqp::rpc::Args<(u64, u64)>,
) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    id
}

/// The same, with the default heartbeat (60 s) and `RPC_TIMEOUT` (30 s), and calls in
/// flight: the broker would hold the old connection, and send it the replies to the old
/// reply queue, past the calls' timeout. Within a second of its reconnection the caller sets
/// up a new reply queue, bound with the old one's routing key too: the calls in flight get
/// their replies through it, and a new call goes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_of_a_caller_that_saw_its_connection_drop_first_are_answered_after_it_reconnects() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let config = common::config(&uri, "replyhalf2").with_max_workers(32);
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(answer_later).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config).await.unwrap();
    let (proxy, caller_uri) = Proxy::in_front_of(&uri).await;
    let caller = Config::new(common::unique("halfcaller")).with_amqp_uri(caller_uri.to_string());
    let client = Arc::new(micro_framework::amqp::rpc::Client::connect(&caller).await.unwrap());
    let _: u64 = client.call(&service_name, "answer_later", (0u64, 0u64), ()).await.unwrap();
    let in_flight: Vec<_> = (1..=20u64)
        .map(|id| {
            let (client, service_name) = (client.clone(), service_name.clone());
            tokio::spawn(async move {
                let answer = client.call::<u64>(&service_name, "answer_later", (id, 2000u64), ());
                (id, answer.await)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconnects = client.transport().reconnects();
    proxy.cut_client_side();
    // the reconnection through the proxy can come within a poll's 5 ms of the loss
    let transport = client.transport();
    let reconnected = || transport.reconnects() > reconnects && transport.is_connected();
    wait_until(reconnected, "the caller to see the loss and reconnect").await;
    // no new call first: the caller hands the calls over by itself
    let mut answers = Vec::new();
    for call in in_flight {
        answers.push(call.await.unwrap());
    }
    let reconnected = std::time::Instant::now();
    let new_call = client.service(service_name.clone()).timeout(Duration::from_secs(5));
    let new_answer = new_call.call::<u64>("answer_later", (100u64, 0u64), ()).await;
    let new_call_took = reconnected.elapsed();
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    service.stop().await.unwrap();
    drop(proxy);
    common::cleanup(&uri, &[service_name, caller.service_name.clone()]).await;
    assert_eq!(new_answer.expect("a new call after the reconnection"), 100, "{new_call_took:?}");
    for (id, answer) in answers {
        assert_eq!(answer.expect("answered 2 s after it started"), id);
    }
}

fn seven() -> u32 {
    7
}

async fn relay(
    micro_framework::amqp::rpc::Args((target,)): micro_framework::amqp::rpc::Args<(String,)>,
    rpc: micro_framework::amqp::dependencies::RpcProxy,
) -> Result<u32, String> {
    rpc.service(target).call::<u32>("seven", (), ()).await.map_err(|error| error.to_string())
}

/// The names of the queues whose name holds `marker`.
fn queues_named(marker: &str) -> Vec<String> {
    let listed = common::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name"]);
    listed.lines().filter(|name| name.contains(marker)).map(str::to_owned).collect()
}

/// After each reconnection a caller sets up a new reply queue; the old one, which no call
/// waits on, goes: one reply queue of the caller's at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_replaced_after_a_reconnection_goes() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.read().await;
    let user = common::TemporaryUser::create("replaced");
    let target_config = common::config(&uri, "seven");
    let target_name = target_config.service_name.clone();
    let target_routes = vec![Route::new(seven).entrypoint(RPCListener::new())];
    let target = TestService::start(target_routes, target_config).await.unwrap();
    let caller_config = common::config(&uri, "relaying").with_amqp_uri(user.uri(&uri));
    let caller_name = caller_config.service_name.clone();
    let caller_routes = vec![Route::new(relay).entrypoint(RPCListener::new())];
    let caller = TestService::start(caller_routes, caller_config).await.unwrap();
    let relayed = || async {
        let hook = caller.hook("relay").unwrap();
        for _ in 0..50 {
            if let Ok(answer) = hook.rpc::<u32>((target_name.clone(),), ()).await {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the caller never relayed");
    };
    assert_eq!(relayed().await, 7);
    let marker = format!("rpc.reply-{caller_name}-");
    let mut counts = vec![queues_named(&marker).len()];
    for _ in 0..2 {
        let before = caller.transport().reconnects();
        user.close_connections();
        wait_until(|| caller.transport().reconnects() > before, "the reconnection").await;
        wait_until(|| caller.transport().is_connected(), "the caller to reconnect").await;
        assert_eq!(relayed().await, 7);
        // the old queue goes once its consumer ends, a second or so after the replacement
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while queues_named(&marker).len() > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        counts.push(queues_named(&marker).len());
    }
    caller.stop().await.unwrap();
    target.stop().await.unwrap();
    common::cleanup(&uri, &[caller_name, target_name]).await;
    drop(user);
    assert_eq!(counts, [1, 1, 1]);
}

#[cfg(feature = "process")]
async fn relay_within_4s(
    micro_framework::amqp::rpc::Args((target,)): micro_framework::amqp::rpc::Args<(String,)>,
    rpc: micro_framework::amqp::dependencies::RpcProxy,
) -> Result<u32, String> {
    let target = rpc.service(target).timeout(Duration::from_secs(4));
    target.call::<u32>("seven", (), ()).await.map_err(|error| format!("inner call: {error}"))
}

/// In a process mode a target's calls go through the service's connection, and their reply
/// queue too: the service tells its workers of its reconnections, so that a worker's caller
/// also sets up a new reply queue after one its side saw first.
#[cfg(feature = "process")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_calls_through_a_new_reply_queue_after_its_service_reconnects() {
    let Some(uri) = rabbitmq_uri() else { return };
    let (proxy, proxied) = Proxy::in_front_of(&uri).await;
    let config = common::config(&uri, "prelay")
        .with_amqp_uri(proxied.to_string())
        .with_worker_mode(WorkerMode::Process)
        .with_max_workers(2);
    let relay_name = config.service_name.clone();
    let routes = vec![Route::new(relay_within_4s).entrypoint(RPCListener::new())];
    // first: a worker process runs this test up to here, and serves this service
    let service = TestService::start(routes, config).await.unwrap();
    let _serial = SERIAL.write().await;
    let target_config = common::config(&uri, "pseven");
    let target_name = target_config.service_name.clone();
    let target_routes = vec![Route::new(seven).entrypoint(RPCListener::new())];
    let target = TestService::start(target_routes, target_config).await.unwrap();
    let hook = service.hook("relay_within_4s").unwrap();
    let relayed = || hook.rpc::<u32>((target_name.clone(),), ());
    assert_eq!(relayed().await.unwrap(), 7);
    proxy.cut_client_side();
    wait_until(|| !service.transport().is_connected(), "the service to see the loss").await;
    wait_until(|| service.transport().is_connected(), "the service to reconnect").await;
    // the workers are told within a second
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = relayed().await;
    service.stop().await.unwrap();
    target.stop().await.unwrap();
    drop(proxy);
    common::cleanup(&uri, &[relay_name, target_name]).await;
    assert_eq!(after.expect("answered through a new reply queue"), 7);
}

/// Begin an outage for `user`'s connections alone: the broker closes them and refuses the
/// user (no permissions) until [`outage_ends`].
fn outage_begins(user: &common::TemporaryUser) {
    rabbitmqctl(&["clear_permissions", "-p", "/", &user.name]);
    user.close_connections();
}

fn outage_ends(user: &common::TemporaryUser) {
    rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
}

/// The ids of the messages in `queue`, taken out of it.
async fn ids_in_queue(uri: &str, queue: &str) -> Vec<u64> {
    let config = Config::new("observer").with_amqp_uri(uri.to_owned());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let messages = micro_framework::testing::take_messages(&*transport, queue).await.unwrap();
    transport.close().await;
    let mut ids: Vec<u64> = messages
        .iter()
        .filter_map(|message| serde_json::from_slice::<Value>(&message.body).ok()?["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

/// A service whose broker is away (its user locked out, its connection closed), holding one
/// running call (gated by `probe`) and three messages of `queue` it never started.
struct Outage {
    user: common::TemporaryUser,
    probe: Arc<Probe>,
    queue: String,
    service: TestService,
}

/// [`Outage`], for a service named after `name`: one worker, four messages prefetched.
async fn outage_with_unstarted_messages(uri: &str, name: &str) -> Outage {
    let user = common::TemporaryUser::create(name);
    let probe = Probe::closed();
    let config = common::config(&user.uri(uri), name)
        .with_max_workers(1)
        .with_prefetch_count(Some(4))
        .with_shutdown_timeout(Duration::from_secs(20));
    let queue = format!("evt-fault_src-job--{}.record", config.service_name);
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new("fault_src", "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let producer = publisher(uri).await;
    for id in 0..4u64 {
        producer.dispatch("job", &json!({ "id": id })).await.unwrap();
    }
    probe.wait_started(1).await;
    outage_begins(&user);
    wait_until(|| !service.transport().is_connected(), "the service to lose its connection").await;
    Outage { user, probe, queue, service }
}

/// A stop while the broker is away, the service holding messages it never started (one
/// worker, four prefetched): the broker requeued them with the lost connection, so the stop
/// publishes no copy of them (it published one once the broker was back, then failed to ack
/// the original: each was queued twice), and waits for no reconnect to do so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_broker_outage_queues_each_unstarted_message_once() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let Outage { user, probe, queue, service } =
        outage_with_unstarted_messages(&uri, "faultoutage").await;
    let stop = tokio::spawn(service.stop());
    // the unstarted messages are dealt with while the broker is away; then it is back
    tokio::time::sleep(Duration::from_millis(1500)).await;
    outage_ends(&user);
    probe.open();
    stop.await.unwrap().unwrap();
    let in_queue = ids_in_queue(&uri, &queue).await;
    delete_queues(&uri, &queue).await;
    assert_eq!(in_queue, [0, 1, 2, 3], "each message once (the one that ran unacked)");
}

fn ping() {}

/// Calls `ping` on this very service: the service sets up a reply queue of its own.
async fn ask(rpc: micro_framework::amqp::dependencies::RpcProxy, config: Arc<Config>) -> bool {
    rpc.service(config.service_name.clone()).call::<()>("ping", (), ()).await.is_ok()
}

/// A service with nothing to do, stopped while the broker is away, stops within its
/// `SHUTDOWN_TIMEOUT` (2 s here) and a few seconds, nothing running. Its consumer was
/// cancelled by the broker (its queue deleted) just before the outage, so the service was
/// consuming again, waiting for a connection (was: up to the publish timeout, 30 s, the stop
/// unheard); and it has a reply queue of its own to delete at the stop, which waits for the
/// broker 5 s at most (it expires by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_service_stopped_during_a_broker_outage_stops_promptly() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let user = common::TemporaryUser::create("faultidle");
    let config =
        common::config(&user.uri(&uri), "faultidle").with_shutdown_timeout(Duration::from_secs(2));
    let queue = format!("evt-fault_src-job--{}.record", config.service_name);
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(record)
            .entrypoint(EventListener::new("fault_src", "job"))
            .dependency(Shared(Probe::new())),
        Route::new(ping).entrypoint(RPCListener::new()),
        Route::new(ask).entrypoint(RPCListener::new()),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let caller = Config::new(common::unique("faultidle_caller")).with_amqp_uri(uri.clone());
    let client = micro_framework::amqp::rpc::Client::connect(&caller).await.unwrap();
    assert!(client.call::<bool>(&service_name, "ask", (), ()).await.unwrap());
    client.close().await;
    delete_queues(&uri, &queue).await;
    outage_begins(&user);
    wait_until(|| !service.transport().is_connected(), "the service to lose its connection").await;
    // the service tries to consume again every second since its consumer ended: the next
    // try, without a connection, waits for one
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = std::time::Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(20), service.stop()).await;
    let took = started.elapsed();
    outage_ends(&user);
    common::cleanup(&uri, &[service_name]).await;
    assert!(stopped.is_ok(), "the stop still waits after 20 s");
    assert!(took < Duration::from_secs(12), "the stop took {took:?}");
}

/// A stop while the broker is away waits for the calls running, not for the broker: the
/// messages it never started need no hand-back (the broker requeued them with the lost
/// connection), so it ends once the running call does (was: each hand-back waited for the
/// broker, the stop all of `SHUTDOWN_TIMEOUT`, then it warned of calls still running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_broker_outage_waits_for_the_running_calls_only() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let Outage { user, probe, queue, service } =
        outage_with_unstarted_messages(&uri, "faultwait").await;
    let started = std::time::Instant::now();
    let stop = tokio::spawn(service.stop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    probe.open();
    let stopped = tokio::time::timeout(Duration::from_secs(15), stop).await;
    let took = started.elapsed();
    outage_ends(&user);
    let in_queue = ids_in_queue(&uri, &queue).await;
    delete_queues(&uri, &queue).await;
    assert!(stopped.is_ok(), "the stop still waits after 15 s");
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
    assert_eq!(in_queue, [0, 1, 2, 3], "every message back in its queue");
}

/// A delivery the broker had sent when the connection was lost, but which never reached the
/// service (4 MiB through a slow link), comes back `redelivered` as one a crash brought back
/// would: the transport never saw it, so it could not know. The channel's prefetch bounds
/// such deliveries, and their redeliveries on the next connection are not counted: with
/// `MAX_REDELIVERIES=0` it runs once (was: dead-lettered `crashed`, never run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_off_in_transit_by_a_lost_connection_runs_once_uncounted() {
    use std::sync::atomic::Ordering;
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let broker = url::Url::parse(&uri).unwrap();
    let broker_address =
        format!("{}:{}", broker.host_str().unwrap(), broker.port().unwrap_or(5672));
    let proxy = Proxy::start(broker_address.parse().unwrap()).await;
    let mut service_uri = broker.clone();
    service_uri.set_port(Some(proxy.address.port())).unwrap();
    let shop = common::unique("transit");
    let config = common::config(service_uri.as_str(), "transit")
        .with_max_redeliveries(0)
        .with_max_workers(1);
    let dlq = format!("evt-{shop}-job--{}.record.dlq", config.service_name);
    let markers = [config.service_name.clone(), shop.clone()];
    let probe = Probe::new();
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new(&shop, "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let shop_config = Config::new(shop.clone()).with_amqp_uri(uri.clone());
    let transport = micro_framework::transport::connect(&shop_config).await.unwrap();
    let producer = Producer::new(transport.clone(), &shop_config);
    proxy.slow.store(true, Ordering::SeqCst);
    let pad = "z".repeat(4 * 1024 * 1024);
    producer.dispatch("job", &json!({ "id": 7, "pad": pad })).await.unwrap();
    // 4 MiB at 16 KiB per 50 ms take about 13 s: cut after 1 s, the message in transit
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(probe.seen.lock().unwrap().len(), 0, "still in transit at the cut");
    proxy.slow.store(false, Ordering::SeqCst);
    proxy.cut();
    wait_until(|| service.transport().reconnects() > 0, "the reconnect").await;
    wait_until(|| !probe.seen.lock().unwrap().is_empty(), "the message's run").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = service.take_messages(&dlq).await.unwrap();
    assert!(dead.is_empty(), "dead-lettered unrun: {:?}", dead[0].properties.headers);
    assert_eq!(unique_ids(&probe), HashSet::from([7]));
    assert_eq!(probe.seen.lock().unwrap().len(), 1, "once");
    transport.close().await;
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
}

/// README: `broker_node{node}` reads 0 for the node last in use while disconnected. A service
/// scraped only once its connection is down (Prometheus may first scrape during an outage)
/// had no such series: the node was recorded by scrapes made while connected.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn broker_node_reads_0_while_disconnected_without_a_scrape_while_connected() {
    let Some(uri) = rabbitmq_uri() else { return };
    let _serial = SERIAL.read().await;
    let user = common::TemporaryUser::create("node_unscraped");
    let config = common::config(&user.uri(&uri), "node_unscraped").with_metrics_on_any_port();
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new("fault_src", "job"))
        .dependency(Shared(Probe::new()))];
    let service = TestService::start(routes, config).await.unwrap();
    let node = service.transport().broker_node().expect("connected to RabbitMQ");
    let address = service.service().metrics_address().unwrap();
    outage_begins(&user);
    wait_until(|| !service.transport().is_connected(), "the service to lose its connection").await;
    let (_, metrics) =
        tokio::task::spawn_blocking(move || common::http_get(address, "/metrics")).await.unwrap();
    outage_ends(&user);
    service.stop().await.unwrap();
    common::cleanup(&uri, &[service_name]).await;
    let line = format!("broker_node{{node=\"{node}\"}} 0");
    assert!(metrics.lines().any(|l| l == line), "{line} missing in {metrics}");
}

/// Waits at the probe's gate, then fails its first attempt (a retry, or the only one).
fn fails_first_after_gate(
    Payload(payload): Payload<Value>,
    retry: micro_framework::retry::BackOffData,
    Dep(probe): Dep<Arc<Probe>>,
) -> Result<(), std::io::Error> {
    probe.enter(json!({ "retry_count": retry.retry_count, "payload": payload }));
    probe.leave();
    match retry.retry_count {
        0 => Err(std::io::Error::other("the first attempt fails")),
        _ => Ok(()),
    }
}

/// One message failing its first attempt while its connection is lost: the broker requeues it
/// with its channel and delivers it again, so settling the failure too (a dead letter, a retry
/// copy) would make the message exist twice.
async fn fail_while_the_connection_is_lost(retries: u32) -> (Vec<u32>, usize) {
    let uri = rabbitmq_uri().expect("RabbitMQ");
    let user = common::TemporaryUser::create("lostfail");
    let uri = user.uri(&uri);
    let source = common::unique("lostfail_src");
    let config = common::config(&uri, "lostfail").with_max_workers(1);
    let dlq = format!("evt-{source}-job--{}.fails_first_after_gate.dlq", config.service_name);
    let markers = [config.service_name.clone(), source.clone()];
    let probe = Probe::closed();
    let mut route = Route::new(fails_first_after_gate)
        .entrypoint(EventListener::new(&source, "job"))
        .dependency(Shared(probe.clone()));
    if retries > 0 {
        let backoff =
            micro_framework::retry::AsyncBackOff::new(retries, Duration::from_millis(200));
        route = route.backoff(backoff);
    }
    let service = TestService::start(vec![route], config).await.unwrap();
    service.dispatch(&source, "job", &json!({ "id": 1 })).await.unwrap();
    probe.wait_started(1).await;
    user.close_connections();
    wait_until(|| service.transport().reconnects() > 0, "the reconnect").await;
    probe.open();
    // the first run's failure, then its redelivery (uncounted), then any retry
    wait_until(|| probe.started() >= 2 + u64::from(retries > 0), "the runs").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dead = service.take_messages(&dlq).await.unwrap().len();
    let runs: Vec<u32> = {
        let seen = probe.seen.lock().unwrap();
        seen.iter().map(|run| run["retry_count"].as_u64().unwrap() as u32).collect()
    };
    service.stop().await.unwrap();
    common::cleanup(&uri, &markers).await;
    (runs, dead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_whose_connection_was_lost_while_it_ran_is_dead_lettered_once() {
    let Some(_) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let (runs, dead) = fail_while_the_connection_is_lost(0).await;
    assert_eq!(runs, [0, 0], "run, then run again as redelivered");
    assert_eq!(dead, 1, "one message, one dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_connection_was_lost_while_it_ran_is_scheduled_once() {
    let Some(_) = rabbitmq_uri() else { return };
    let _serial = SERIAL.write().await;
    let (runs, dead) = fail_while_the_connection_is_lost(3).await;
    assert_eq!(runs, [0, 0, 1], "one retry: its run lost with the connection forks no other");
    assert_eq!(dead, 0);
}
