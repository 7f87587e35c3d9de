//! A service whose log pipe closed (a log shipper restarted, `| tee` killed) goes on and
//! stops on SIGTERM: the `rpc_service` example on the in-process broker, its stderr a pipe
//! whose reading end is closed once it started. Run `cargo build --examples` first.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `rpc_service` started with `vars`, once its log says it started, its stderr's reading
/// end closed.
fn started_then_log_pipe_closed(vars: &[(&str, &str)]) -> Child {
    let mut child = Command::new(common::example("rpc_service"))
        .env_remove("AMQP_URI")
        .env_remove("RUST_LOG")
        .env_remove("LOG_FORMAT")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("started with") {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the service ended before it started");
    }
    drop(log);
    child
}

/// Send SIGTERM and wait for the service to end (20 s at most); its exit status.
fn stopped(mut child: Child) -> std::process::ExitStatus {
    // a call or two logged meanwhile: the in-process demo calls once a second
    std::thread::sleep(Duration::from_millis(1500));
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("still running 20 s after SIGTERM, its log pipe closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_service_whose_log_pipe_closed_stops_on_sigterm() {
    let status = stopped(started_then_log_pipe_closed(&[("RUST_LOG", "info")]));
    assert!(status.success(), "{status}");
}

#[test]
fn a_service_logging_json_whose_log_pipe_closed_stops_on_sigterm() {
    let vars = [("RUST_LOG", "info"), ("LOG_FORMAT", "json")];
    let status = stopped(started_then_log_pipe_closed(&vars));
    assert!(status.success(), "{status}");
}

#[cfg(feature = "process")]
#[test]
fn a_service_in_process_mode_whose_log_pipe_closed_stops_on_sigterm() {
    let vars = [("RUST_LOG", "info"), ("WORKER_MODE", "process"), ("MAX_WORKERS", "2")];
    let status = stopped(started_then_log_pipe_closed(&vars));
    assert!(status.success(), "{status}");
}
