//! A service under the operating system's limits, as an operator running it in a container
//! meets them: the `http_service` example (metrics on) started with a low file descriptor
//! limit (`RLIMIT_NOFILE`, `ulimit -n`), then held by more connections than it may open.
//! Run `cargo build --examples` first.
#![cfg(all(unix, feature = "http", feature = "metrics"))]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The `http_service` example, started with a soft and a hard `RLIMIT_NOFILE`, its HTTP
/// routes and its metrics server on free loopback ports, its log in a file; killed when
/// dropped.
struct Limited {
    started: Started,
    http: SocketAddr,
    metrics: SocketAddr,
}

impl Limited {
    fn start(soft: u64, hard: u64) -> Limited {
        Limited::start_with(soft, hard, &[])
    }

    /// [`Limited::start`], with `vars` in its environment.
    fn start_with(soft: u64, hard: u64, vars: &[(&str, &str)]) -> Limited {
        let example = common::example("http_service");
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (http, metrics) = (free(), free());
        let mut command = std::process::Command::new(example);
        command
            .env_remove("AMQP_URI")
            .env_remove("RUST_LOG")
            .env("WEB_SERVER_ADDRESS", http.to_string())
            .env("ENABLE_METRICS", "true")
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", metrics.port().to_string())
            .stdout(std::process::Stdio::null())
            .envs(vars.iter().copied());
        with_file_limit(&mut command, soft, hard);
        let limited = Limited { started: Started::spawn(command), http, metrics };
        let started = Instant::now();
        // ready, not live: live answers once the metrics port is bound, before the broker
        // connect and the HTTP routes' listener, which `hold` would then find closed
        while get(limited.metrics, "/health/ready", Duration::from_secs(1)) != Some(200) {
            assert!(started.elapsed() < Duration::from_secs(20), "{}", limited.logged());
            std::thread::sleep(Duration::from_millis(50));
        }
        limited
    }

    /// `count` connections to the HTTP routes' port, which send nothing.
    fn hold(&self, count: usize) -> Vec<TcpStream> {
        (0..count).map(|_| TcpStream::connect(self.http).unwrap()).collect()
    }

    fn logged(&self) -> String {
        self.started.logged()
    }
}

/// `command` to start with a soft and a hard `RLIMIT_NOFILE`.
fn with_file_limit(command: &mut std::process::Command, soft: u64, hard: u64) {
    // SAFETY: setrlimit is async-signal-safe
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft as _, rlim_max: hard as _ };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
}

/// An example started with `command`, its log (stderr) in a file; killed when dropped.
struct Started {
    child: std::process::Child,
    log: PathBuf,
}

impl Started {
    fn spawn(mut command: std::process::Command) -> Started {
        let log = std::env::temp_dir().join(format!("{}.log", common::unique("os_limits")));
        command.stderr(std::fs::File::create(&log).unwrap());
        Started { child: command.spawn().unwrap(), log }
    }

    fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The status of a `GET path`, or `None` if no answer came within `limit`.
fn get(address: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&address, limit).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = [0; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Out of file descriptors, the accept loop neither spins nor floods the log: it warns once
/// (naming the limit to raise), not ten times a second, and serves again once descriptors
/// are freed, saying so.
#[test]
fn out_of_file_descriptors_the_http_server_warns_now_and_then_and_recovers() {
    let service = Limited::start(48, 48);
    let held = service.hold(80);
    std::thread::sleep(Duration::from_secs(3));
    let logged = service.logged();
    let warnings: Vec<&str> =
        logged.lines().filter(|line| line.contains("cannot accept an HTTP connection")).collect();
    assert!(!warnings.is_empty(), "{logged}");
    assert!(warnings.len() <= 2, "{} warnings in 3 s:\n{logged}", warnings.len());
    assert!(warnings[0].contains("ulimit -n"), "{logged}");
    drop(held);
    let started = Instant::now();
    while get(service.http, "/hello/ada", Duration::from_secs(1)) != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(5), "{}", service.logged());
    }
    let logged = service.logged();
    assert!(logged.contains("accepted an HTTP connection again"), "{logged}");
}

/// The WebSocket server's accept loop out of file descriptors, as the HTTP server's: one
/// warning naming the limit, not ten a second, and serving again once descriptors are freed.
#[test]
fn out_of_file_descriptors_the_websocket_server_warns_now_and_then_and_recovers() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut command = std::process::Command::new(common::example("websocket_service"));
    command
        .arg("--serve")
        .env_remove("AMQP_URI")
        .env_remove("RUST_LOG")
        .env_remove("ENABLE_METRICS")
        .env("WEBSOCKET_IP", "127.0.0.1")
        .env("WEBSOCKET_PORT", free.port().to_string())
        .stdout(std::process::Stdio::null());
    with_file_limit(&mut command, 48, 48);
    let service = Started::spawn(command);
    let logged = || service.logged();
    let started = Instant::now();
    while !logged().contains("serving ws://") {
        assert!(started.elapsed() < Duration::from_secs(20), "{}", logged());
        std::thread::sleep(Duration::from_millis(50));
    }
    let held: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(free).unwrap()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let all = logged();
    let warnings: Vec<&str> =
        all.lines().filter(|line| line.contains("cannot accept a WebSocket connection")).collect();
    assert!(!warnings.is_empty(), "{all}");
    assert!(warnings.len() <= 2, "{} warnings in 3 s:\n{all}", warnings.len());
    assert!(warnings[0].contains("ulimit -n"), "{all}");
    drop(held);
    let started = Instant::now();
    while !logged().contains("accepted a WebSocket connection again") {
        assert!(started.elapsed() < Duration::from_secs(5), "{}", logged());
        drop(TcpStream::connect_timeout(&free, Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The soft and hard limits on open files of the process `pid`, as Linux shows them.
fn open_files_limits(pid: u32) -> [String; 2] {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    let words: Vec<&str> = open_files.split_whitespace().collect();
    [words[3].to_owned(), words[4].to_owned()]
}

/// This process's hard `RLIMIT_NOFILE` (only a privileged process may raise it), if it is
/// 4096 at least, as the tests raising a service's soft limit need; `None`, said, if not.
fn own_hard_limit() -> Option<u64> {
    let mut own = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
    let hard = u64::try_from(own.rlim_max).unwrap();
    if hard < 4096 {
        eprintln!("SKIPPED: this test needs a hard RLIMIT_NOFILE of 4096 at least, not {hard}");
        return None;
    }
    Some(hard)
}

/// A container's usual limit, a soft limit of 1024 under a far higher hard one (Docker 25+,
/// containerd 2, systemd), is below `HTTP_MAX_CONNECTIONS` (1024) plus the service's own
/// descriptors: the connections would use them all before the cap engages, and
/// `/health/live` (a liveness probe restarting the service), broker reconnects and worker
/// processes with them. The service raises its soft limit towards the hard one at start, as
/// Go programs do, but not past 65,536 (the default `HTTP_MAX_CONNECTIONS` needs far less).
#[test]
fn a_soft_file_limit_below_the_hard_one_is_raised_so_health_answers_under_many_connections() {
    let Some(hard) = own_hard_limit() else { return };
    let service = Limited::start(48, hard);
    if cfg!(target_os = "linux") {
        let expected = [hard.min(65_536).to_string(), hard.to_string()];
        assert_eq!(open_files_limits(service.started.child.id()), expected);
    }
    // raised far enough: nothing to warn of
    let logged = service.logged();
    assert!(!logged.contains("RLIMIT_NOFILE"), "{logged}");
    let held = service.hold(120);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        get(service.metrics, "/health/live", Duration::from_secs(2)),
        Some(200),
        "{}",
        service.logged()
    );
    assert_eq!(get(service.http, "/hello/ada", Duration::from_secs(2)), Some(200));
    drop(held);
}

/// An `HTTP_MAX_CONNECTIONS` that needs more than 65,536 descriptors raises the soft limit
/// that far (its connections on each of the two servers, HTTP routes and metrics, plus the
/// service's own 64), where the hard limit allows; where it does not, the limit reached is
/// named at start.
#[test]
fn the_soft_file_limit_is_raised_as_far_as_http_max_connections_needs() {
    let Some(hard) = own_hard_limit() else { return };
    let needed = 2 * 70_000 + 64;
    let service = Limited::start_with(48, hard, &[("HTTP_MAX_CONNECTIONS", "70000")]);
    if cfg!(target_os = "linux") {
        assert_eq!(open_files_limits(service.started.child.id())[0], hard.min(needed).to_string());
    }
    let logged = service.logged();
    let warned = logged.contains("too few for HTTP_MAX_CONNECTIONS (70000)");
    assert_eq!(warned, hard < needed, "hard limit {hard}:\n{logged}");
}

/// A hard limit below `HTTP_MAX_CONNECTIONS` on each server that serves HTTP (the HTTP
/// routes' and the metrics server: each takes that many connections) plus the service's own
/// descriptors is named at start, with what to do.
#[test]
fn a_file_limit_too_low_for_http_max_connections_is_named_at_start() {
    let service = Limited::start(48, 48);
    let logged = service.logged();
    let warning = logged.lines().find(|line| line.contains("RLIMIT_NOFILE"));
    let warning = warning.unwrap_or_else(|| panic!("no warning:\n{logged}"));
    let each = "HTTP_MAX_CONNECTIONS (1024) on each of the HTTP and metrics servers";
    assert!(warning.contains("48") && warning.contains(each), "{warning}");
    // the limit needed: HTTP_MAX_CONNECTIONS (1024) twice plus the service's own 64
    let service = Limited::start(2111, 2111);
    let logged = service.logged();
    assert!(logged.contains("at most 2111 files (RLIMIT_NOFILE"), "{logged}");
    let service = Limited::start(2112, 2112);
    let logged = service.logged();
    assert!(!logged.contains("RLIMIT_NOFILE"), "{logged}");
}

/// A service that serves no HTTP (no HTTP route, metrics off) is not warned about
/// `HTTP_MAX_CONNECTIONS`, whatever its file limit; with its metrics server on, it is.
#[test]
fn only_a_service_serving_http_is_warned_of_its_file_limit() {
    use std::io::BufRead;
    for metrics in [false, true] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = std::process::Command::new(common::example("timer_service"));
        command
            .env_remove("AMQP_URI")
            .env_remove("RUST_LOG")
            .env("ENABLE_METRICS", metrics.to_string())
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", port.to_string())
            .stdout(std::process::Stdio::piped());
        with_file_limit(&mut command, 48, 48);
        let mut service = Started::spawn(command);
        // its first timer run: started
        let mut stdout = std::io::BufReader::new(service.child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("report:") {
            line.clear();
            assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "it ended: {}", service.logged());
        }
        let logged = service.logged();
        assert_eq!(logged.contains("HTTP_MAX_CONNECTIONS (1024)"), metrics, "{logged}");
    }
}

/// A WebSocket service's limit counts `WEBSOCKET_MAX_CONNECTIONS` and the 64 handshakes it
/// may be refusing past them (`503`), besides its own 64: named at start when too low, with
/// `HTTP_MAX_CONNECTIONS` beside it once its metrics server serves HTTP too.
#[test]
fn a_file_limit_too_low_for_websocket_max_connections_is_named_at_start() {
    let start = |limit: u64, metrics: bool| {
        let (service, _) = websocket_service(limit, &[("ENABLE_METRICS", &metrics.to_string())]);
        service.logged()
    };
    let logged = start(48, false);
    let warning = logged.lines().find(|line| line.contains("RLIMIT_NOFILE"));
    let warning = warning.unwrap_or_else(|| panic!("no warning:\n{logged}"));
    assert!(warning.contains("too few for WEBSOCKET_MAX_CONNECTIONS (1024) plus"), "{warning}");
    assert!(!warning.contains("HTTP_MAX_CONNECTIONS"), "{warning}");
    let logged = start(48, true);
    let both = "too few for HTTP_MAX_CONNECTIONS (1024) and WEBSOCKET_MAX_CONNECTIONS (1024) plus";
    assert!(logged.contains(both), "{logged}");
    // the limit needed: 1024 connections, 64 refusals and the service's own 64
    assert!(start(1151, false).contains("at most 1151 files (RLIMIT_NOFILE"));
    let logged = start(1152, false);
    assert!(!logged.contains("RLIMIT_NOFILE"), "{logged}");
}

/// The `websocket_service` example serving on a free loopback port with `vars` (its metrics
/// server, if they turn it on, on another), under a file limit of `limit`, once it serves.
fn websocket_service(limit: u64, vars: &[(&str, &str)]) -> (Started, SocketAddr) {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (address, metrics) = (free(), free());
    let mut command = std::process::Command::new(common::example("websocket_service"));
    command
        .arg("--serve")
        .env_remove("AMQP_URI")
        .env_remove("RUST_LOG")
        .env("WEBSOCKET_IP", "127.0.0.1")
        .env("WEBSOCKET_PORT", address.port().to_string())
        .env("METRICS_HOST", "127.0.0.1")
        .env("METRICS_PORT", metrics.port().to_string())
        .envs(vars.iter().copied())
        .stdout(std::process::Stdio::null());
    with_file_limit(&mut command, limit, limit);
    let service = Started::spawn(command);
    let started = Instant::now();
    while !service.logged().contains("serving WebSocket commands on") {
        assert!(started.elapsed() < Duration::from_secs(20), "{}", service.logged());
        std::thread::sleep(Duration::from_millis(50));
    }
    (service, address)
}

/// The descriptors process `pid` holds, once their count stops changing (its accept loop
/// has taken what it takes).
fn settled_descriptors(pid: u32) -> usize {
    let count = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        match count() {
            now if now == last => return now,
            now => last = now,
        }
    }
}

/// A flood of WebSocket connections that send nothing holds one descriptor each, the slots'
/// and the refusals' alike: at most `WEBSOCKET_MAX_CONNECTIONS` plus 64, within the limit
/// the start finds enough. A handshake's second handle on its socket (to answer a request
/// that is no handshake) held two, so such a flood ran a process the start had found a
/// limit enough for out of descriptors.
#[cfg(target_os = "linux")]
#[test]
fn a_flood_of_silent_websocket_connections_holds_one_descriptor_each() {
    let cap = 16;
    // what the start counts: the cap, 64 refusals, 64 of its own
    let limit = cap + 64 + 64;
    let vars = [("WEBSOCKET_MAX_CONNECTIONS", "16"), ("ENABLE_METRICS", "false")];
    let (service, address) = websocket_service(limit as u64, &vars);
    assert!(!service.logged().contains("RLIMIT_NOFILE"), "{}", service.logged());
    let pid = service.child.id();
    let before = settled_descriptors(pid);
    // the slots and the refusals, and more that wait in the listen backlog
    let flood: Vec<_> = (0..cap + 64 + 20).map(|_| TcpStream::connect(address).unwrap()).collect();
    let during = settled_descriptors(pid);
    drop(flood);
    let logged = service.logged();
    assert!(!logged.contains("out of file descriptors"), "{logged}");
    let held = during - before;
    assert!(held <= cap + 64, "a flood holds {held} descriptors ({before} -> {during})");
    assert!(held >= cap, "the slots are taken: {held} descriptors ({before} -> {during})");
}

/// A broker connection lost while the process is out of file descriptors is made again once
/// one is free, and nothing panics: lapin's I/O thread drops its socket outside any tokio
/// runtime, where async-compat built a global runtime of its own at that first drop, which
/// failed out of descriptors and left it poisoned, every later connection's end panicking too.
#[test]
fn a_broker_connection_lost_out_of_file_descriptors_comes_back_without_a_panic() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let user = common::TemporaryUser::create("os_limits");
    let service = Limited::start_with(48, 48, &[("AMQP_URI", &user.uri(&uri))]);
    let held = service.hold(80);
    std::thread::sleep(Duration::from_millis(500));
    user.close_connections();
    std::thread::sleep(Duration::from_secs(1));
    drop(held);
    let started = Instant::now();
    while !service.logged().contains("generation=2") {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", service.logged());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let logged = service.logged();
    assert!(!logged.contains("panicked"), "{logged}");
}

/// The soft `RLIMIT_NOFILE` of a program a target starts: `ulimit -Sn`.
fn soft_limit_of_a_child() -> Result<String, String> {
    let output = std::process::Command::new("sh").args(["-c", "ulimit -Sn"]).output();
    let output = output.map_err(|error| error.to_string())?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The raised limit is the process's own, not the servers': a program a target starts
/// inherits it, as the README says (a worker process does too). This test's own process is
/// set just below the limit the service raises it to, as a container starts a process below
/// its hard limit, then a service starts in it.
#[tokio::test]
async fn programs_the_targets_start_inherit_the_raised_soft_limit() {
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::prelude::*;
    use micro_framework::testing::{memory_test_config, TestService};

    let mut own = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
    let hard = u64::try_from(own.rlim_max).unwrap();
    // what the service raises it to: 65,536 (HTTP_MAX_CONNECTIONS at its default needs less)
    let raised = hard.min(65_536);
    if raised < 1024 {
        eprintln!("SKIPPED: this test needs a hard RLIMIT_NOFILE of 1024 at least, not {hard}");
        return;
    }
    let below = libc::rlimit { rlim_cur: (raised - 1) as _, rlim_max: own.rlim_max };
    // SAFETY: setrlimit reads the struct it is given; lowered by one, no test here runs short
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &below) }, 0);
    assert_eq!(soft_limit_of_a_child().unwrap(), (raised - 1).to_string(), "set below");

    let route = Route::new(soft_limit_of_a_child).entrypoint(RPCListener::new());
    let config = memory_test_config(&common::unique("os_limits_child"));
    let service = TestService::start(vec![route], config).await.unwrap();
    let seen: String = service.hook("soft_limit_of_a_child").unwrap().rpc((), ()).await.unwrap();
    assert_eq!(seen, raised.to_string());
    service.stop().await.unwrap();
}
