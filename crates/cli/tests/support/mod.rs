//! What the CLI's test files share: running the binary, reaching RabbitMQ (skipped loudly
//! outside CI, a failure under `CI=true`), unique names and cleanup.

// each test file uses its own part of these helpers
#![allow(dead_code)]

use std::time::Duration;

use std::io::Read;

use micro_framework::prelude::*;
use micro_framework::transport::{
    Headers, OutgoingMessage, Properties, PublishOptions, SharedTransport,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_micro-framework");
pub const DOWN_URI: &str = "amqp://guest:guest@127.0.0.1:1/";

/// What a run of the binary gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Assert a failure reported as exactly one `error: ...` line, without a panic.
    pub fn one_error_line(&self, code: i32, contains: &str) {
        assert_eq!(self.code, code, "{self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "{self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        assert!(self.stderr.contains(contains), "{contains:?} not in {self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// Run the binary with `args` and, when given, `AMQP_URI=uri`.
pub async fn cli(uri: Option<&str>, args: &[&str]) -> Run {
    cli_env(uri, args, &[]).await
}

pub async fn cli_env(uri: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).env_remove("AMQP_URI").env_remove("SERVICE_NAME").env("RUST_BACKTRACE", "1");
    if let Some(uri) = uri {
        command.env("AMQP_URI", uri);
    }
    command.envs(env.iter().copied());
    let output = command.output().await.expect("the binary runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// RabbitMQ for tests (`MF_TEST_AMQP_URI`, default local); `None` (after `SKIPPED:`) when
/// unreachable, a failure under `CI=true`.
pub fn rabbitmq() -> Option<String> {
    let uri = std::env::var("MF_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".to_owned());
    let address = uri
        .rsplit_once('@')
        .map_or(uri.as_str(), |(_, rest)| rest)
        .trim_start_matches("amqp://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let address = if address.contains(':') { address } else { format!("{address}:5672") };
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .ok()
        .and_then(|mut addresses| addresses.next())
        .is_some_and(|socket| {
            std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2)).is_ok()
        });
    if reachable {
        return Some(uri);
    }
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("RabbitMQ is unreachable at {address} and CI=true");
    }
    eprintln!("SKIPPED: RabbitMQ unreachable at {address}");
    None
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

pub fn config(uri: &str, service: &str) -> Config {
    Config::new(service).with_amqp_uri(uri.to_owned())
}

pub async fn connect(uri: &str) -> SharedTransport {
    micro_framework::transport::connect(&config(uri, "cli_tests")).await.expect("connects")
}

/// Delete what a test declared.
pub async fn cleanup(uri: &str, queues: &[String], exchanges: &[String]) {
    let transport = connect(uri).await;
    for queue in queues {
        let _ = transport.delete_queue(queue).await;
    }
    for exchange in exchanges {
        let _ = transport.delete_exchange(exchange).await;
    }
    transport.close().await;
}

/// Run `body`, then delete `queues` and `exchanges`, even when `body` panics.
pub async fn cleaned(
    uri: &str,
    queues: Vec<String>,
    exchanges: Vec<String>,
    body: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let outcome = tokio::spawn(body).await;
    cleanup(uri, &queues, &exchanges).await;
    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("{error}"),
        }
    }
}

/// Publish a message straight into `queue` (default exchange).
pub async fn put(transport: &SharedTransport, queue: &str, headers: Headers, body: &[u8]) {
    let properties = Properties { headers, ..Properties::default() };
    let message = OutgoingMessage { body: bytes::Bytes::copy_from_slice(body), properties };
    transport.publish("", queue, message, PublishOptions::default()).await.expect("published");
}

/// Run the binary to its end; its stdout and its peak resident set (KiB, from `wait4`).
// the child is reaped by wait4, which gives its own rusage (std's wait does not)
#[allow(clippy::zombie_processes)]
pub fn run_measured(uri: &str, args: &[&str]) -> (String, i64) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .env("AMQP_URI", uri)
        .env_remove("SERVICE_NAME")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid, and wait4 reaps only our own child
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status}");
    (reader.join().unwrap().unwrap(), usage.ru_maxrss)
}
