//! Python peers (tests/interop/*.py) run as subprocesses by the interop tests: finding the
//! venv interpreter (`.ci/python-env.sh`), and reading the peers' JSON lines.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

pub const NAMEKO: &str = "nameko_peer.py";
pub const UFW: &str = "ufw_peer.py";
/// The peers' own limit (`--timeout`); they exit 3 when it passes.
pub const PEER_TIMEOUT_SECS: u64 = 30;
/// How long a test waits for one line of a peer (a bit more than the peer's own limit).
pub const LINE_WAIT: Duration = Duration::from_secs(PEER_TIMEOUT_SECS + 10);

pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// The venv interpreter for `script`'s package, or `None` (after a loud `SKIPPED:` line)
/// when there is none; under `CI=true` a missing venv fails the test.
pub fn interop_python(script: &str) -> Option<PathBuf> {
    let (variable, own_venv) = if script == NAMEKO {
        ("MF_INTEROP_PYTHON_NAMEKO", ".venv-nameko")
    } else {
        ("MF_INTEROP_PYTHON_UFW", ".venv-ufw")
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => vec![PathBuf::from(path)],
        _ => vec![root.join(own_venv).join("bin/python"), root.join(".venv/bin/python")],
    };
    if let Some(python) = candidates.iter().find(|path| path.is_file()) {
        return Some(python.clone());
    }
    let message = format!(
        "no Python interop venv for {script} (looked at {candidates:?}; \
         run `bash .ci/python-env.sh` or set {variable})"
    );
    if is_ci() {
        panic!("{message} and CI=true: the interop tests must run in CI");
    }
    // straight to stderr, past the test harness's capture, so the skip is seen
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}; this interop test did not run");
    None
}

/// RabbitMQ and the interpreter for `script`, or `None` when the test is skipped.
pub fn prerequisites(script: &str) -> Option<(String, PathBuf)> {
    let uri = super::rabbitmq_uri()?;
    let python = interop_python(script)?;
    Some((uri, python))
}

/// A running Python peer: one JSON object per stdout line.
pub struct Peer {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    pub fn spawn(python: &Path, script: &str, uri: &str, args: &[&str]) -> Peer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
        let timeout = PEER_TIMEOUT_SECS.to_string();
        let mut child = Command::new(python)
            .arg(&path)
            .args(args)
            .args(["--uri", uri, "--timeout", &timeout])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {python:?} {path:?}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = String::new();
            let _ = stderr_pipe.read_to_string(&mut buffer).await;
            sink.lock().unwrap().push_str(&buffer);
        });
        Peer {
            name: format!("{script} {}", args.join(" ")),
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
        }
    }

    /// The peer's process id (e.g. to stop it with SIGTERM mid-test).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_else(|| self.fail("has exited already"))
    }

    pub fn fail(&self, what: &str) -> ! {
        // give the stderr reader a moment to collect the traceback
        std::thread::sleep(Duration::from_millis(200));
        panic!("peer `{}`: {what}\n--- its stderr:\n{}", self.name, self.stderr.lock().unwrap())
    }

    /// The next line, or `None` at the end of its output.
    pub async fn next_line(&mut self) -> Option<Value> {
        let line = match tokio::time::timeout(LINE_WAIT, self.lines.next_line()).await {
            Err(_) => self.fail("printed nothing in time"),
            Ok(Err(error)) => self.fail(&format!("stdout unreadable: {error}")),
            Ok(Ok(line)) => line?,
        };
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| self.fail(&format!("printed a non-JSON line: {line}")));
        if value.get("failed").is_some() || value.get("timeout").is_some() {
            self.fail(&format!("reported {value}"));
        }
        Some(value)
    }

    /// Read lines until one has `key`; returns that line.
    pub async fn expect(&mut self, key: &str) -> Value {
        loop {
            match self.next_line().await {
                Some(line) if line.get(key).is_some() => return line,
                Some(_) => continue,
                None => self.fail(&format!("ended without a `{key}` line")),
            }
        }
    }

    /// Read the rest of the output and require exit code 0; returns the lines read.
    pub async fn finish(self) -> Vec<Value> {
        let (lines, status, peer) = self.read_to_exit().await;
        if !status.success() {
            peer.fail(&format!("exited with {status}; its lines: {lines:?}"));
        }
        lines
    }

    /// Read the rest of the output, whatever the peer's exit (e.g. a peer killed on purpose).
    pub async fn lines_until_exit(self) -> Vec<Value> {
        self.read_to_exit().await.0
    }

    async fn read_to_exit(mut self) -> (Vec<Value>, std::process::ExitStatus, Peer) {
        let mut lines = Vec::new();
        while let Some(line) = self.next_line().await {
            lines.push(line);
        }
        let status = match tokio::time::timeout(LINE_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => self.fail(&format!("cannot be waited for: {error}")),
            Err(_) => self.fail("did not exit in time"),
        };
        (lines, status, self)
    }
}

impl Drop for Peer {
    /// A test that gives up (a failed assertion) asks a still running peer to stop: on
    /// SIGTERM the peers delete what they declared and exit by themselves (their own
    /// `--timeout` bounds them anyway), where a SIGKILL would leave durable queues behind.
    fn drop(&mut self) {
        if let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What the peers' `--python-types` adds (a datetime, date, time, Decimal, UUID and two
/// bytes, which kombu writes as `{"__type__", "__value__"}` envelopes), read as text.
#[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct PythonTypes {
    pub at: String,
    pub day: String,
    pub clock: String,
    pub amount: String,
    pub id: String,
    pub text: String,
    pub blob: String,
}

/// The text each value of `--python-types` must arrive as: Python's `isoformat()` and `str()`
/// of it; the bytes as kombu writes them (UTF-8 text, else base64).
pub fn python_types_as_text() -> Value {
    serde_json::json!({
        "at": "2026-01-02T03:04:05.123456",
        "day": "2026-01-02",
        "clock": "03:04:05",
        "amount": "10.50",
        "id": "12345678-1234-5678-1234-567812345678",
        "text": "hi",
        "blob": "/w==",
    })
}
