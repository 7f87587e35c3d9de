//! Process worker modes, through the test-support service `process_service`
//! (tests/support/process_service.rs), on every broker of `common::broker_uris()`.
#![cfg(all(feature = "process", feature = "http"))]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The test-support binary, built by `cargo test` as an example.
fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().join("examples").join("process_service")
}

/// How long a scenario may take before the test fails (instead of hanging CI).
const SCENARIO_LIMIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Run the service with `scenario` until it prints `DONE`; returns its JSON lines.
fn run(uri: &str, mode: &str, scenario: &str, extra: &[(&str, &str)]) -> Vec<Value> {
    run_then(uri, mode, scenario, extra, |_| {})
}

/// [`run`], with `check` called with the service's name once the scenario is done, before
/// the service is stopped.
fn run_then(
    uri: &str,
    mode: &str,
    scenario: &str,
    extra: &[(&str, &str)],
    check: impl FnOnce(&str),
) -> Vec<Value> {
    let service = common::unique("procsvc");
    let log_file = std::env::temp_dir().join(format!("{service}.log"));
    let mut command = Command::new(binary());
    command
        .env("AMQP_URI", uri)
        .env("SERVICE_NAME", &service)
        .env("WORKER_MODE", mode)
        .env("MAX_WORKERS", "2")
        .env("TASK_TIME_LIMIT", "1")
        .env("SCENARIO", scenario)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log_file).unwrap()));
    for (key, value) in extra {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("process_service starts (built by cargo test)");
    let stdout = child.stdout.take().unwrap();
    let (sender, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + SCENARIO_LIMIT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(left) {
            Ok(line) if line == "DONE" => break,
            Ok(line) => lines.push(serde_json::from_str(&line).unwrap_or(Value::String(line))),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let logs = std::fs::read_to_string(&log_file).unwrap_or_default();
                panic!(
                    "scenario {scenario} did not finish in {SCENARIO_LIMIT:?}: {lines:?}\n{logs}"
                );
            }
        }
    }
    check(&service);
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "the service stops gracefully: {status}");
    let logs = std::fs::read_to_string(&log_file).unwrap_or_default();
    let _ = std::fs::remove_file(&log_file);
    assert!(!logs.contains("did not exit"), "worker processes exit when their link closes: {logs}");
    if !uri.starts_with("memory://") {
        let uri = uri.to_owned();
        let markers = [service];
        tokio::runtime::Runtime::new().unwrap().block_on(common::cleanup(&uri, &markers));
    }
    lines
}

fn pids(lines: &[Value]) -> Vec<u64> {
    lines.iter().filter_map(|line| line["pid"].as_u64()).collect()
}

fn service_pid(lines: &[Value]) -> u64 {
    lines.iter().find_map(|line| line["service_pid"].as_u64()).unwrap()
}

fn dead(lines: &[Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter(|line| line.get("dead").is_some())
        .map(|line| {
            (line["dead"].as_str().unwrap().to_owned(), line["kind"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn calls_run_in_other_processes_and_failures_cost_one_call() {
    for uri in common::broker_uris() {
        // Each run of process_service is its own process: memory:// is private to it.
        let uri = if uri.starts_with("memory://") { "memory://".to_owned() } else { uri };
        let scenario =
            "whoami:1,crash:2,whoami:3,panics:4,spin:5,sigkill:6,whoami:7,whoami:8,callrpc:9";
        let lines = run(&uri, "process", scenario, &[]);
        let service = service_pid(&lines);
        let workers = pids(&lines);
        assert_eq!(workers.len(), 5, "{lines:?}");
        let rpc = lines.iter().find(|line| line["whoami"] == "9");
        assert!(rpc.is_some(), "an RpcProxy call from a worker process got its reply: {lines:?}");
        assert!(workers.iter().all(|pid| *pid != service), "calls ran in the service: {lines:?}");
        assert_eq!(
            dead(&lines),
            vec![
                ("2".to_owned(), "crashed".to_owned()),
                ("4".to_owned(), "panic".to_owned()),
                ("5".to_owned(), "timed_out".to_owned()),
                ("6".to_owned(), "crashed".to_owned()),
            ],
            "{lines:?}"
        );
    }
}

/// The queues on the local RabbitMQ whose names start with `prefix`.
fn queues_named(prefix: &str) -> Vec<String> {
    let names = common::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name"]);
    names
        .lines()
        .map(str::trim)
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_reply_queues_of_recycled_workers_are_deleted() {
    for uri in common::broker_uris().into_iter().filter(|uri| !uri.starts_with("memory://")) {
        let scenario = "callrpc:1,callrpc:2,callrpc:3";
        let extra = [("MAX_TASKS_PER_CHILD", "1")];
        let mut left = Vec::new();
        let lines = run_then(&uri, "process", scenario, &extra, |service| {
            // every worker that called was recycled: its reply queue goes with it
            let prefix = format!("rpc.reply-{service}-");
            for _ in 0..100 {
                left = queues_named(&prefix);
                if left.is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        assert_eq!(pids(&lines).len(), 3, "{lines:?}");
        assert!(left.is_empty(), "reply queues of recycled workers left: {left:?}");
    }
}

#[test]
fn workers_are_recycled_after_max_tasks_per_child() {
    for uri in common::broker_uris() {
        let uri = if uri.starts_with("memory://") { "memory://".to_owned() } else { uri };
        let scenario = "whoami:1,whoami:2,whoami:3,whoami:4";
        let lines = run(&uri, "greedy_process", scenario, &[("MAX_TASKS_PER_CHILD", "1")]);
        let workers: HashSet<u64> = pids(&lines).into_iter().collect();
        assert_eq!(workers.len(), 4, "a new process for every call: {lines:?}");
    }
}

#[test]
fn without_recycling_workers_are_reused() {
    let lines = run("memory://", "process", "whoami:1,whoami:2,whoami:3,whoami:4", &[]);
    let workers: HashSet<u64> = pids(&lines).into_iter().collect();
    assert!(workers.len() <= 2, "MAX_WORKERS=2 processes serve every call: {lines:?}");
}

/// Messages left in `queue` on RabbitMQ.
fn left_in(uri: &str, queue: &str) -> u32 {
    let config = micro_framework::Config::new("o").with_amqp_uri(uri.to_owned());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        let left = transport.queue_info(queue).await.unwrap().message_count;
        transport.close().await;
        left
    })
}

#[test]
fn a_stop_in_process_modes_finishes_or_hands_back_and_loses_nothing() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    for mode in ["process", "greedy_process"] {
        let service = common::unique("procstop");
        let scenario: Vec<String> = (1..=10).map(|i| format!("slow:{i}")).collect();
        let mut child = Command::new(binary())
            .env("AMQP_URI", &uri)
            .env("SERVICE_NAME", &service)
            .env("WORKER_MODE", mode)
            .env("MAX_WORKERS", "2")
            .env("PREFETCH_COUNT", "6")
            .env("SCENARIO", scenario.join(","))
            .env("BURST", "1")
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut printed = 0;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("whoami") {
                printed += 1;
                // A first call finished: 2 run now, 4 more wait in the prefetch, 3 queued.
                let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                break;
            }
        }
        printed += lines.map_while(Result::ok).filter(|line| line.contains("whoami")).count();
        assert!(child.wait().unwrap().success(), "{mode}: graceful stop exits 0");
        let work = left_in(&uri, &format!("evt-{service}_src-slow--{service}.slow"));
        let reports = left_in(&uri, &format!("evt-{service}-pid--{service}.collect"));
        let handled = printed as u32 + reports;
        assert_eq!(
            handled + work,
            10,
            "{mode}: handled {handled}, left {work}: none lost or doubled"
        );
        if mode == "process" {
            assert!(handled <= 4, "{mode} hands unstarted messages back (handled {handled})");
        } else {
            assert!(handled >= 6, "{mode} finishes what it received (handled {handled})");
        }
        let markers = [service];
        tokio::runtime::Runtime::new().unwrap().block_on(common::cleanup(&uri, &markers));
    }
}

#[tokio::test]
async fn http_calls_run_in_worker_processes() {
    let uri = format!("memory://http-proc-{}", uuid::Uuid::new_v4());
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut child = Command::new(binary())
        .env("AMQP_URI", uri)
        .env("SERVICE_NAME", common::unique("prochttp"))
        .env("WORKER_MODE", "process")
        .env("MAX_WORKERS", "2")
        .env("WEB_SERVER_ADDRESS", address.to_string())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("process_service starts (built by cargo test)");
    let http = reqwest::Client::new();
    let mut answer = None;
    for _ in 0..400 {
        if let Ok(response) = http.get(format!("http://{address}/whoami/7")).send().await {
            answer = Some(response.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let answer = answer.expect("the service answers HTTP");
    assert_eq!(answer["whoami"], 7);
    assert_eq!(answer["parent"], child.id(), "answered by a worker process of the service");
    assert_ne!(answer["pid"], child.id());
    let bad = http.get(format!("http://{address}/whoami/seven")).send().await.unwrap();
    assert_eq!(bad.status(), 400, "bad input through a worker process is still 400");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(child.wait().unwrap().success(), "the service stops gracefully");
}

/// A request whose target aborts the service (thread mode) crash-loops it no more than
/// `MAX_REDELIVERIES` times: the caller then gets an error reply and the service lives on.
/// The test plays the supervisor that restarts the service after each crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_request_that_keeps_aborting_the_service_is_answered_with_an_error() {
    use micro_framework::amqp::rpc::{Client, RpcError};
    use micro_framework::Config;
    use std::time::Duration;
    let Some(uri) = common::rabbitmq_uri() else { return };
    let service = common::unique("rpcabort");
    let log_file = std::env::temp_dir().join(format!("{service}.log"));
    let start = || {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_file).unwrap();
        Command::new(binary())
            .env("AMQP_URI", &uri)
            .env("SERVICE_NAME", &service)
            .env("WORKER_MODE", "thread")
            .env("MAX_REDELIVERIES", "2")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("process_service starts (built by cargo test)")
    };
    let logs = || std::fs::read_to_string(&log_file).unwrap_or_default();
    let mut child = Supervised(start());
    let client = Client::connect(&Config::new("caller").with_amqp_uri(uri.clone())).await.unwrap();
    // The service is up once it answers (before, its queue does not exist).
    let probe = client.service(service.as_str()).timeout(Duration::from_secs(30));
    let mut echoed = probe.call::<Value>("echo", (1,), ()).await;
    for _ in 0..300 {
        if !matches!(echoed, Err(RpcError::UnknownService(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        echoed = probe.call("echo", (1,), ()).await;
    }
    assert_eq!(echoed.unwrap(), serde_json::json!(1));
    let caller = client.service(service.as_str()).timeout(Duration::from_secs(120));
    let call = tokio::spawn(async move { caller.call::<Value>("abort_rpc", (), ()).await });
    // The supervisor: restart the service whenever it dies, until it has stayed up for 3 s
    // after the caller got its answer.
    let (mut crashes, mut crashes_before_answer) = (0, None);
    let mut up_since = std::time::Instant::now();
    while crashes_before_answer.is_none() || up_since.elapsed() < Duration::from_secs(3) {
        if crashes_before_answer.is_none() && call.is_finished() {
            crashes_before_answer = Some(crashes);
        }
        match child.0.try_wait().unwrap() {
            Some(_) => {
                crashes += 1;
                assert!(crashes <= 6, "still crash-looping after {crashes} crashes:\n{}", logs());
                child = Supervised(start());
                up_since = std::time::Instant::now();
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let error = call.await.unwrap().unwrap_err();
    match &error {
        RpcError::RemoteError { exc_type, value, .. } => {
            assert_eq!(exc_type, "Crashed", "{error}");
            assert!(value.contains("MAX_REDELIVERIES=2"), "{error}");
        }
        other => panic!("expected the Crashed remote error, got {other}"),
    }
    // Three deliveries (two redeliveries allowed), then the answer. On a classic queue an ack
    // sent just before a crash can be lost with the connection: a copy of the request may
    // then cost a crash more before it is refused too; the service then lives on.
    let answered_after = crashes_before_answer.unwrap_or_default();
    assert!((3..=5).contains(&answered_after), "answered after {answered_after} crashes");
    let echoed = probe.call::<Value>("echo", (2,), ()).await;
    assert_eq!(echoed.ok(), Some(serde_json::json!(2)), "and still serves:\n{}", logs());
    let _ = std::fs::remove_file(&log_file);
    let _ = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    assert!(child.0.wait().unwrap().success(), "the service stops gracefully");
    client.close().await;
    common::cleanup(&uri, &[service]).await;
}

/// A child process killed when the test ends, even by a failed assertion.
struct Supervised(std::process::Child);

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.0.try_wait().is_ok_and(|status| status.is_none()) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A process_service answering HTTP at `address` in process mode with two workers; when
/// dropped it is killed with its worker processes and its log removed.
struct HttpService {
    child: std::process::Child,
    address: std::net::SocketAddr,
    log: PathBuf,
    /// The service's `TMPDIR`, where its workers' sockets are: a worker killed here while it
    /// starts (or before it is started) leaves its socket's folder, which this removes.
    tmp: PathBuf,
}

impl Drop for HttpService {
    fn drop(&mut self) {
        for pid in children(self.child.id()) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl HttpService {
    /// Start `exe` with `extra` environment; in a process group of its own if `group`, as a
    /// shell starts a job.
    fn start(exe: &Path, extra: &[(&str, &str)], group: bool) -> Self {
        use std::os::unix::process::CommandExt;
        let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let name = common::unique("prochang");
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let tmp = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&tmp).unwrap();
        let mut command = Command::new(exe);
        command
            .env("AMQP_URI", format!("memory://{name}"))
            .env("SERVICE_NAME", &name)
            .env("WORKER_MODE", "process")
            .env("MAX_WORKERS", "2")
            .env("WEB_SERVER_ADDRESS", address.to_string())
            .env("TMPDIR", &tmp)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        for (key, value) in extra {
            command.env(key, value);
        }
        if group {
            command.process_group(0);
        }
        let child = command.spawn().expect("process_service starts (built by cargo test)");
        let service = HttpService { child, address, log, tmp };
        for _ in 0..400 {
            if service.get("/whoami/0", std::time::Duration::from_secs(5)).is_ok() {
                return service;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the service does not answer HTTP:\n{}", service.logs());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path`, waiting at most `limit`: the status and the JSON body.
    fn get(&self, path: &str, limit: std::time::Duration) -> Result<(u16, Value), String> {
        get(self.address, path, limit)
    }

    /// Whether the service exits within `limit`.
    fn exits_within(&mut self, limit: std::time::Duration) -> bool {
        let since = std::time::Instant::now();
        while since.elapsed() < limit {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    }

    /// Send `GET /sleep/1500` and hang up 300 ms later, while it runs in a worker process.
    fn hang_up_mid_call(&self) {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(self.address).unwrap();
        stream.write_all(b"GET /sleep/1500 HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(stream);
    }
}

fn get(
    address: std::net::SocketAddr,
    path: &str,
    limit: std::time::Duration,
) -> Result<(u16, Value), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::builder().timeout(limit).build().unwrap();
        let response = http
            .get(format!("http://{address}{path}"))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        Ok((status, response.json::<Value>().await.unwrap_or(Value::Null)))
    })
}

/// The live processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Some((state, ppid)) = stat(pid) else { continue };
        if ppid == parent && state != "Z" {
            found.push(pid);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z")
}

/// Whether any thread of process `pid` is still running. A killed process's leader turns
/// zombie first, and `/proc/{pid}/fd` then shows the leader's (empty) file table while its
/// other threads still hold the sockets open; each of those leaves `/proc/{pid}/task` only
/// after it has closed its files.
fn threads_running(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|entries| {
        entries.flatten().any(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Z (zombie) and X (dead) threads have closed their files
            stat.rfind(')').is_some_and(|end| !stat[end + 2..].starts_with(['Z', 'X']))
        })
    })
}

/// The state and parent of process `pid`, from /proc.
fn stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 2..].split(' ');
    let state = fields.next()?.to_owned();
    Some((state, fields.next()?.parse().ok()?))
}

#[test]
fn http_clients_that_hang_up_mid_call_cost_the_pool_no_worker() {
    let service = HttpService::start(&binary(), &[], false);
    // as many as the pool has workers
    service.hang_up_mid_call();
    service.hang_up_mid_call();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let workers = children(service.child.id());
    let answer = service.get("/whoami/9", std::time::Duration::from_secs(15));
    assert!(
        answer.as_ref().is_ok_and(|(status, _)| *status == 200),
        "worker processes left: {workers:?}; answer: {answer:?}\n{}",
        service.logs()
    );
}

#[test]
fn a_call_given_to_a_worker_that_died_idle_runs_in_another() {
    let service = HttpService::start(&binary(), &[("MAX_WORKERS", "1")], false);
    let workers = children(service.child.id());
    assert_eq!(workers.len(), 1, "{workers:?}");
    let _ = Command::new("kill").args(["-KILL", &workers[0].to_string()]).status();
    // gone: its sockets close with the last of its threads
    while threads_running(workers[0]) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let answer = service.get("/whoami/5", std::time::Duration::from_secs(40));
    assert!(
        answer.as_ref().is_ok_and(|(status, _)| *status == 200),
        "a call that never ran failed: {answer:?}\n{}",
        service.logs()
    );
}

/// The flag file that makes a service's workers exit as they start ([`RefusingWorkers::start`]),
/// removed when dropped.
struct RefusingWorkers {
    flag: std::path::PathBuf,
}

impl RefusingWorkers {
    /// A service with one worker, recycled after `tasks_per_child` calls, whose stop gives up
    /// after 1 s, and whose workers exit as they start once [`RefusingWorkers::refuse`] is
    /// called.
    fn start(tasks_per_child: &str) -> (HttpService, RefusingWorkers) {
        let flag = std::env::temp_dir().join(common::unique("refuse-workers"));
        let flag_path = flag.to_string_lossy().into_owned();
        let extra = [
            ("MAX_WORKERS", "1"),
            ("MAX_TASKS_PER_CHILD", tasks_per_child),
            ("SHUTDOWN_TIMEOUT", "1"),
            ("REFUSE_WORKERS_WHILE", flag_path.as_str()),
        ];
        (HttpService::start(&binary(), &extra, false), RefusingWorkers { flag })
    }

    /// From now on, every worker exits as it starts.
    fn refuse(&self) {
        std::fs::write(&self.flag, b"").unwrap();
    }
}

impl Drop for RefusingWorkers {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.flag);
    }
}

/// A call waits for a worker that cannot start (the recycled one's replacement exits as it
/// starts): a graceful stop still ends the service.
#[test]
fn a_stop_while_a_call_waits_for_a_worker_ends_the_service() {
    let (mut service, workers) = RefusingWorkers::start("2");
    workers.refuse();
    // the worker's second call (the first was the start's): its replacement cannot start
    let last = service.get("/whoami/1", std::time::Duration::from_secs(15));
    let address = service.address;
    let waiting =
        std::thread::spawn(move || get(address, "/whoami/2", std::time::Duration::from_secs(30)));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = Command::new("kill").args(["-TERM", &service.child.id().to_string()]).status();
    let stopped = service.exits_within(std::time::Duration::from_secs(20));
    assert!(last.is_ok_and(|(status, _)| status == 200));
    assert!(stopped, "still running 20 s after SIGTERM:\n{}", service.logs());
    // answered as a crash once the stop ended the pool (or cut off), never run
    let waited = waiting.join().unwrap();
    assert!(
        waited.as_ref().is_ok_and(|(status, _)| *status == 500) || waited.is_err(),
        "{waited:?}"
    );
}

/// Workers can never start again (each exits as it starts: a set-up that fails, a program
/// file replaced by an incompatible one): the service does not wait for them for ever,
/// holding its calls' messages while it looks alive; it stops by itself with an error naming
/// the cause, for its supervisor to restart it.
#[test]
fn a_service_whose_workers_can_never_start_again_stops_with_an_error() {
    let (mut service, workers) = RefusingWorkers::start("1");
    workers.refuse();
    // the worker that answers it (if one started since the start's call) is recycled
    let address = service.address;
    std::thread::spawn(move || get(address, "/whoami/1", std::time::Duration::from_secs(60)));
    let stopped = service.exits_within(std::time::Duration::from_secs(60));
    let logs = service.logs();
    assert!(stopped, "still running 60 s after its workers could no longer start:\n{logs}");
    let status = service.child.wait().unwrap();
    assert!(!status.success(), "{status}:\n{logs}");
    assert!(logs.contains("Error: cannot start a worker process ("), "{logs}");
}

/// Ctrl-C in a terminal signals the whole foreground process group, workers included: the
/// service stops gracefully and its running call still finishes.
#[test]
fn ctrl_c_lets_the_running_calls_finish() {
    let service = HttpService::start(&binary(), &[], true);
    let address = service.address;
    let call =
        std::thread::spawn(move || get(address, "/sleep/2000", std::time::Duration::from_secs(20)));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let group = format!("-{}", service.child.id());
    let _ = Command::new("kill").args(["-INT", "--", &group]).status();
    let answer = call.join().unwrap();
    assert!(
        answer.as_ref().is_ok_and(|(status, _)| *status == 200),
        "the running call did not finish: {answer:?}\n{}",
        service.logs()
    );
}

#[test]
fn a_worker_does_not_outlive_its_killed_service() {
    let mut service = HttpService::start(&binary(), &[("TASK_TIME_LIMIT", "120")], false);
    let address = service.address;
    let workers = children(service.child.id());
    std::thread::spawn(move || get(address, "/sleep/60000", std::time::Duration::from_secs(90)));
    std::thread::sleep(std::time::Duration::from_millis(500));
    service.child.kill().unwrap();
    service.child.wait().unwrap();
    let mut survivors = workers.clone();
    for _ in 0..100 {
        survivors.retain(|pid| alive(*pid));
        if survivors.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for pid in &survivors {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    assert!(!workers.is_empty());
    assert!(survivors.is_empty(), "workers {survivors:?} outlived their SIGKILLed service");
}

/// A deploy renames a new version of the program over the running one's file: workers
/// still start (here one for each call).
#[test]
fn workers_still_start_after_the_program_file_is_replaced() {
    let dir = std::env::temp_dir().join(common::unique("procexe"));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("process_service");
    std::fs::copy(binary(), &exe).unwrap();
    let service =
        HttpService::start(&exe, &[("MAX_WORKERS", "1"), ("MAX_TASKS_PER_CHILD", "1")], false);
    let new = dir.join("process_service.new");
    std::fs::copy(binary(), &new).unwrap();
    std::fs::rename(&new, &exe).unwrap();
    let first = service.get("/whoami/1", std::time::Duration::from_secs(15));
    let second = service.get("/whoami/2", std::time::Duration::from_secs(15));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        [&first, &second]
            .iter()
            .all(|answer| answer.as_ref().is_ok_and(|(status, _)| *status == 200)),
        "first: {first:?}, second: {second:?}\n{}",
        service.logs()
    );
}

/// A recycled worker's replacement hangs in its set-up (a dependency): it is given up on
/// after the start-up limit (30 s), and another replaces it.
#[test]
fn a_worker_whose_set_up_hangs_is_replaced() {
    let hang = std::env::temp_dir().join(common::unique("hang-worker"));
    let hang_path = hang.to_string_lossy().into_owned();
    let extra = [
        ("MAX_WORKERS", "1"),
        ("MAX_TASKS_PER_CHILD", "2"),
        ("HANG_ONE_WORKER", hang_path.as_str()),
    ];
    let service = HttpService::start(&binary(), &extra, false);
    std::fs::write(&hang, b"").unwrap();
    // the worker's second call (the first was the start's): its replacement hangs
    let last = service.get("/whoami/1", std::time::Duration::from_secs(15));
    let next = service.get("/whoami/2", std::time::Duration::from_secs(90));
    let _ = std::fs::remove_file(&hang);
    assert!(last.is_ok_and(|(status, _)| status == 200));
    assert!(next.as_ref().is_ok_and(|(status, _)| *status == 200), "{next:?}\n{}", service.logs());
}

/// A temp dir whose path is too long for a Unix socket path (108 bytes on Linux, 104 on
/// macOS, where the default `TMPDIR` is already about 50): workers still start.
#[test]
fn workers_start_when_the_temp_dirs_path_is_long() {
    /// Removes the directory when dropped, also by a failed assertion.
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let long = std::env::temp_dir().join(format!("{}-{}", common::unique("long"), "x".repeat(80)));
    std::fs::create_dir_all(&long).unwrap();
    let long = Removed(long);
    let tmpdir = long.0.to_string_lossy().into_owned();
    let mut service = HttpService::start(&binary(), &[("TMPDIR", tmpdir.as_str())], false);
    let answer = service.get("/whoami/3", std::time::Duration::from_secs(15));
    // Stopped gracefully, not killed as `HttpService` is when dropped: its workers' sockets
    // are in folders of /tmp (the long TMPDIR cannot hold a socket's path), which only the
    // service's own stop removes, and a kill would leave behind.
    let _ = Command::new("kill").args(["-INT", &service.child.id().to_string()]).status();
    service.exits_within(std::time::Duration::from_secs(10));
    assert!(answer.as_ref().is_ok_and(|(status, _)| *status == 200), "{answer:?}");
}

/// The command of a one-worker process-mode service named `name` on an in-process broker of
/// its own, whose workers sleep `start_ms` in the program's own set-up before their runner
/// starts (the example's `SLOW_WORKER_START_MS`).
fn slow_starting_service(name: &str, start_ms: &str) -> Command {
    let mut command = Command::new(binary());
    command
        .env("AMQP_URI", format!("memory://{name}"))
        .env("SERVICE_NAME", name)
        .env("WORKER_MODE", "process")
        .env("MAX_WORKERS", "1")
        .env("SLOW_WORKER_START_MS", start_ms);
    command
}

/// The worker processes of the service `pid` once it has started one (within 30 s; none
/// after that).
fn first_workers(pid: u32) -> Vec<u32> {
    let since = std::time::Instant::now();
    let mut workers = children(pid);
    while workers.is_empty() && since.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        workers = children(pid);
    }
    workers
}

/// A service killed (SIGKILL: nothing of it runs on) while its workers are still in the
/// program's own set-up (a connection that hangs, here a sleep of 10 min) leaves no worker
/// behind: each watches its service from before `main`.
#[test]
fn workers_in_their_set_up_do_not_outlive_a_killed_service() {
    let name = common::unique("procorphan");
    let child = slow_starting_service(&name, "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("process_service starts (built by cargo test)");
    let mut child = Supervised(child);
    // the first worker: the next start after it is ready
    let workers = first_workers(child.0.id());
    assert_eq!(workers.len(), 1, "{workers:?}");
    let _ = child.0.kill();
    let _ = child.0.wait();
    let since = std::time::Instant::now();
    while workers.iter().any(|worker| alive(*worker))
        && since.elapsed() < std::time::Duration::from_secs(20)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left: Vec<_> = workers.iter().copied().filter(|worker| alive(*worker)).collect();
    for worker in &left {
        let _ = Command::new("kill").args(["-KILL", &worker.to_string()]).status();
    }
    assert!(left.is_empty(), "workers still running 20 s after their service was killed: {left:?}");
}

/// Ctrl-C while worker processes are still starting (in the program's own set-up, before
/// their runner starts) stops the service once started, as any signal during a start does:
/// the starting workers, which get the signal too, must not die of it and fail the start.
#[test]
fn ctrl_c_while_workers_start_stops_the_service_once_started() {
    use std::os::unix::process::CommandExt;
    let name = common::unique("procsigstart");
    let log = std::env::temp_dir().join(format!("{name}.log"));
    let child = slow_starting_service(&name, "2000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .process_group(0)
        .spawn()
        .expect("process_service starts (built by cargo test)");
    let mut child = Supervised(child);
    let pid = child.0.id();
    let since = std::time::Instant::now();
    assert!(!first_workers(pid).is_empty(), "no worker process started");
    // the worker sleeps in its set-up for 2 s: the terminal's Ctrl-C reaches it there
    let _ = Command::new("kill").args(["-INT", "--", &format!("-{pid}")]).status();
    let mut status = None;
    while status.is_none() && since.elapsed() < std::time::Duration::from_secs(60) {
        status = child.0.try_wait().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let status = status.expect("the service ends after Ctrl-C");
    assert!(status.success(), "{status}:\n{logs}");
}

/// A start-up warning (here: TASK_TIME_LIMIT cannot stop the thread-mode context's functions) is the
/// service's to log, once: its worker processes, which plan the same routes, and every worker
/// that replaces one (with MAX_TASKS_PER_CHILD=1, after each call) do not repeat it.
#[test]
fn start_up_warnings_are_logged_once_not_by_every_worker() {
    let extra = [("TASK_TIME_LIMIT", "1"), ("MAX_TASKS_PER_CHILD", "1")];
    let service = HttpService::start(&binary(), &extra, false);
    let answer = service.get("/whoami/4", std::time::Duration::from_secs(15));
    assert!(answer.is_ok_and(|(status, _)| status == 200));
    // the replacement of the worker that answered is ready once the next call is answered
    let answer = service.get("/whoami/5", std::time::Duration::from_secs(15));
    assert!(answer.is_ok_and(|(status, _)| status == 200));
    let logs = service.logs();
    let warned = logs.matches("TASK_TIME_LIMIT (1s) cannot stop").count();
    assert_eq!(warned, 1, "{logs}");
}

/// A worker that dies while idle (the OOM killer, an operator) is noticed at once: it is
/// waited for (no zombie is left) and replaced, without waiting for a call to find it dead.
#[test]
fn a_worker_that_dies_idle_is_reaped_and_replaced_without_a_call() {
    let service = HttpService::start(&binary(), &[], false);
    let workers = children(service.child.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    let _ = Command::new("kill").args(["-KILL", &workers[0].to_string()]).status();
    let since = std::time::Instant::now();
    let done = || {
        let now = children(service.child.id());
        stat(workers[0]).is_none() && now.len() == 2 && !now.contains(&workers[0])
    };
    while !done() && since.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let state = stat(workers[0]);
    let now = children(service.child.id());
    assert!(state.is_none(), "worker {} left as {state:?}; workers {now:?}", workers[0]);
    assert_eq!(now.len(), 2, "not replaced: {now:?}\n{}", service.logs());
}

/// A service killed while a worker process starts leaves no socket directory behind: the
/// worker, which finds its service gone when it dials, removes it.
#[test]
fn a_service_killed_while_a_worker_starts_leaves_no_socket_directory() {
    let tmpdir = std::env::temp_dir().join(common::unique("sockdir"));
    std::fs::create_dir_all(&tmpdir).unwrap();
    let name = common::unique("procsockdir");
    let mut child = Supervised(
        slow_starting_service(&name, "1000")
            .env("TMPDIR", &tmpdir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("process_service starts (built by cargo test)"),
    );
    let since = std::time::Instant::now();
    let workers = first_workers(child.0.id());
    assert!(!workers.is_empty(), "no worker process started");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // the worker sleeps in its set-up, then dials a service that is gone, and exits
    while workers.iter().any(|pid| alive(*pid))
        && since.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left: Vec<_> =
        std::fs::read_dir(&tmpdir).unwrap().flatten().map(|entry| entry.path()).collect();
    let _ = std::fs::remove_dir_all(&tmpdir);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A program that starts another `Runner` before its process-mode service's: in each worker
/// process (the program started again) that one takes the worker's part. The worker now
/// finds that its routes are not the service's context's and says so, and the service's start
/// fails with that message; the workers died and were replaced in a loop while the service
/// never started.
#[test]
fn another_runner_before_a_process_mode_service_fails_its_start_saying_so() {
    let service = common::unique("two_runners");
    let log_file = std::env::temp_dir().join(format!("{service}.log"));
    let mut child = Command::new(binary())
        .env("AMQP_URI", format!("memory://{service}"))
        .env("SERVICE_NAME", &service)
        .env("WORKER_MODE", "process")
        .env("MAX_WORKERS", "2")
        .env("OTHER_RUNNER_FIRST", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_file).unwrap()))
        .spawn()
        .expect("process_service starts (built by cargo test)");
    let deadline = std::time::Instant::now() + SCENARIO_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let logs = std::fs::read_to_string(&log_file).unwrap_or_default();
            panic!("the service neither started nor failed: {logs}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let logs = std::fs::read_to_string(&log_file).unwrap();
    std::fs::remove_file(&log_file).unwrap();
    assert!(!status.success(), "{logs}");
    assert!(logs.contains("found another Runner than the service's"), "{logs}");
    assert!(logs.contains("other_echo"), "the other Runner's routes named: {logs}");
}
