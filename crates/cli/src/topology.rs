//! `topology`: run a service binary with `MF_PRINT_TOPOLOGY=1` and show what it declares.

use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use clap::Args;
use micro_framework::logging::escape_wire_text;
use micro_framework::transport::topology::TOPOLOGY_MARKER;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::CliError;
use crate::table;

/// Arguments of `topology`.
#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// Print the service's JSON document as is instead of tables.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the binary to print its topology; the binary and all it started
    /// are ended once it is printed, or then.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
    /// The service binary (built with micro-framework).
    #[arg(value_name = "SERVICE_BINARY")]
    binary: PathBuf,
    /// Arguments for the binary.
    #[arg(value_name = "ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// What a service declares, as `MF_PRINT_TOPOLOGY=1` prints it.
#[derive(Debug, Deserialize)]
struct Topology {
    service: String,
    #[serde(default)]
    exchanges: Vec<Exchange>,
    #[serde(default)]
    queues: Vec<Queue>,
    #[serde(default)]
    bindings: Vec<Binding>,
}

#[derive(Debug, Deserialize)]
struct Exchange {
    name: String,
    kind: String,
    durable: bool,
    auto_delete: bool,
}

#[derive(Debug, Deserialize)]
struct Queue {
    name: String,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Binding {
    queue: String,
    exchange: String,
    routing_key: String,
}

/// How long the output is read after the binary has exited, when something outside its
/// group (a daemon that left it) still holds the output open: what the binary printed is in
/// the pipe by then.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Run the binary, read its topology and print it.
pub async fn run(args: TopologyArgs) -> Result<ExitCode, CliError> {
    let shown = args.binary.display().to_string();
    // Listened to before the binary starts, so that no signal that ends this command (Ctrl-C,
    // a supervisor's or `timeout`'s SIGTERM, a closed terminal's SIGHUP, none of which
    // reaches the binary's own group) leaves that group running.
    let mut signals = Signals::listen()?;
    // Its own process group: whatever the binary starts (a wrapper script's service, a
    // helper left in the background) is ended with it.
    let mut child = tokio::process::Command::new(&args.binary)
        .args(&args.args)
        .env("MF_PRINT_TOPOLOGY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| CliError::failure(format!("cannot run '{shown}': {error}")))?;
    let group = ProcessGroup(child.id());
    let printed = Arc::new(Mutex::new(Printed::default()));
    let complete = Arc::new(Notify::new());
    let mut readers = JoinSet::new();
    if let Some(stdout) = child.stdout.take() {
        readers.spawn(document_after_marker(stdout, printed.clone(), complete.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.spawn(last_line(stderr, printed.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    // The document, once read, is all the command needs: a wrapper that goes on after its
    // service printed it (a restart loop's pause, a cleanup step) is not waited for.
    let status = tokio::select! {
        status = child.wait() => Some(status),
        () = complete.notified() => None,
        () = tokio::time::sleep_until(deadline) => None,
        signal = signals.next() => {
            group.end();
            return Err(signal.ended(&shown));
        }
    };
    group.end();
    let status = match status {
        Some(status) => status?,
        None => {
            let printed = printed.lock().unwrap_or_else(PoisonError::into_inner);
            // a document read as the timeout came is used too
            return match marked_document(&printed.document) {
                Ok((topology, document)) => show(&topology, document, args.json),
                Err(_) => Err(CliError::failure(format!(
                    "'{shown}' printed no topology within {}s: is it built with a \
                     micro-framework that supports MF_PRINT_TOPOLOGY?",
                    args.timeout
                ))),
            };
        }
    };
    let read = async {
        while let Some(done) = readers.join_next().await {
            done.map_err(std::io::Error::other)??;
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        read = tokio::time::timeout_at(deadline.min(Instant::now() + OUTPUT_GRACE), read) => {
            // past the grace, what was read is what the binary printed before it exited
            if let Ok(read) = read {
                read?;
            }
        }
        signal = signals.next() => return Err(signal.ended(&shown)),
    }
    let printed = std::mem::take(&mut *printed.lock().unwrap_or_else(PoisonError::into_inner));
    if !status.success() {
        let last = String::from_utf8_lossy(printed.last_error_line.trim_ascii());
        return Err(CliError::failure(format!("'{shown}' failed ({status}): {last}")));
    }
    let (topology, document) = marked_document(&printed.document).map_err(|error| {
        CliError::failure(format!(
            "'{shown}' did not print a topology document ({error}): is it built with a \
             micro-framework that supports MF_PRINT_TOPOLOGY?"
        ))
    })?;
    show(&topology, document, args.json)
}

/// Print `topology`: its `document` as printed with `json`, else tables.
fn show(topology: &Topology, document: &str, json: bool) -> Result<ExitCode, CliError> {
    if json {
        writeln!(std::io::stdout(), "{}", document.trim_end())?;
    } else {
        write!(std::io::stdout(), "{}", render(topology))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The signals that end this command, listened to.
struct Signals {
    interrupts: Signal,
    terminations: Signal,
    hang_ups: Signal,
}

/// A signal that ended this command.
enum Ending {
    Interrupt,
    Termination,
    HangUp,
}

impl Signals {
    fn listen() -> std::io::Result<Signals> {
        Ok(Signals {
            interrupts: signal(SignalKind::interrupt())?,
            terminations: signal(SignalKind::terminate())?,
            hang_ups: signal(SignalKind::hangup())?,
        })
    }

    /// The next one to come.
    async fn next(&mut self) -> Ending {
        tokio::select! {
            _ = self.interrupts.recv() => Ending::Interrupt,
            _ = self.terminations.recv() => Ending::Termination,
            _ = self.hang_ups.recv() => Ending::HangUp,
        }
    }
}

impl Ending {
    /// The error of this command ended so while it ran the binary `shown`: exit 130 for
    /// Ctrl-C, 128 plus the signal's number for the others, as a shell reports them.
    fn ended(self, shown: &str) -> CliError {
        let message = format!("'{shown}' was ended");
        match self {
            Ending::Interrupt => CliError::interrupted(message),
            Ending::Termination => CliError::signalled("SIGTERM", 15, message),
            Ending::HangUp => CliError::signalled("SIGHUP", 1, message),
        }
    }
}

/// What the binary printed that the command reads.
#[derive(Default)]
struct Printed {
    /// Its output from the runner's marker line on.
    document: Vec<u8>,
    /// The last line of its error output that is not blank.
    last_error_line: Vec<u8>,
}

/// The process group of the binary run (its id is the binary's process id).
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    /// Kill every process left in the group. Its id cannot name another group meanwhile:
    /// Linux does not hand out a process id while a group of that id has a member.
    fn end(&self) {
        let Some(group) = self.0.and_then(|id| libc::pid_t::try_from(id).ok()) else { return };
        // SAFETY: kill(2) takes plain integers; a group already gone gives ESRCH, ignored
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// Read the binary's output into `printed` as it comes, from the runner's marker line on
/// (what comes before it, a banner or a service's logs however long, is not kept), until the
/// document after the marker is whole: then `complete` is notified.
async fn document_after_marker(
    stdout: ChildStdout,
    printed: Arc<Mutex<Printed>>,
    complete: Arc<Notify>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if line.trim_ascii_end() == TOPOLOGY_MARKER.as_bytes() {
            break;
        }
    }
    let mut chunk = line;
    loop {
        {
            let mut printed = printed.lock().unwrap_or_else(PoisonError::into_inner);
            printed.document.extend_from_slice(&chunk);
            if marked_document(&printed.document).is_ok() {
                // a permit kept if nobody waits yet
                complete.notify_one();
                return Ok(());
            }
        }
        chunk.clear();
        if reader.read_buf(&mut chunk).await? == 0 {
            return Ok(());
        }
    }
}

/// Keep in `printed` the last line of the binary's error output that is not blank.
async fn last_line(stderr: ChildStderr, printed: Arc<Mutex<Printed>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).await? > 0 {
        if !line.trim_ascii().is_empty() {
            let mut printed = printed.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut printed.last_error_line, &mut line);
        }
        line.clear();
    }
    Ok(())
}

/// The topology document that follows the runner's marker line on `stdout`, parsed and as
/// printed: what the program printed before the marker (a banner, any JSON) or after the
/// document is not read.
fn marked_document(stdout: &[u8]) -> Result<(Topology, &str), String> {
    let mut start = None;
    let mut offset = 0;
    for line in stdout.split_inclusive(|&byte| byte == b'\n') {
        offset += line.len();
        if line.trim_ascii_end() == TOPOLOGY_MARKER.as_bytes() {
            start = Some(offset);
            break;
        }
    }
    let rest = &stdout[start.ok_or(format!("no line '{TOPOLOGY_MARKER}'"))?..];
    let mut documents = serde_json::Deserializer::from_slice(rest).into_iter::<Topology>();
    let topology = match documents.next() {
        Some(parsed) => parsed.map_err(|error| error.to_string())?,
        None => return Err(format!("nothing after the line '{TOPOLOGY_MARKER}'")),
    };
    let document =
        std::str::from_utf8(&rest[..documents.byte_offset()]).map_err(|error| error.to_string())?;
    Ok((topology, document.trim_start()))
}

fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_owned()
}

/// The topology as three tables.
fn render(topology: &Topology) -> String {
    let exchanges: Vec<Vec<String>> = topology
        .exchanges
        .iter()
        .map(|e| vec![e.name.clone(), e.kind.clone(), yes_no(e.durable), yes_no(e.auto_delete)])
        .collect();
    let queues: Vec<Vec<String>> = topology
        .queues
        .iter()
        .map(|q| {
            let arguments: Vec<String> =
                q.arguments.iter().map(|(key, value)| format!("{key}={value}")).collect();
            vec![
                q.name.clone(),
                yes_no(q.durable),
                yes_no(q.exclusive),
                yes_no(q.auto_delete),
                arguments.join(" "),
            ]
        })
        .collect();
    let bindings: Vec<Vec<String>> = topology
        .bindings
        .iter()
        .map(|b| vec![b.exchange.clone(), b.routing_key.clone(), b.queue.clone()])
        .collect();
    format!(
        "service {}\n\nexchanges ({})\n{}\nqueues ({})\n{}\nbindings ({})\n{}",
        escape_wire_text(&topology.service),
        exchanges.len(),
        table::render(&["NAME", "KIND", "DURABLE", "AUTO_DELETE"], &exchanges),
        queues.len(),
        table::render(&["NAME", "DURABLE", "EXCLUSIVE", "AUTO_DELETE", "ARGUMENTS"], &queues),
        bindings.len(),
        table::render(&["EXCHANGE", "ROUTING_KEY", "QUEUE"], &bindings),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tables() {
        let topology: Topology = serde_json::from_str(
            r#"{"service": "s", "exchanges": [{"name": "a.events", "kind": "topic",
                "durable": true, "auto_delete": false}],
                "queues": [{"name": "q", "durable": true, "exclusive": false,
                "auto_delete": false, "arguments": {"x-queue-type": "quorum"}}],
                "bindings": [{"queue": "q", "exchange": "a.events", "routing_key": "e"}]}"#,
        )
        .unwrap();
        let text = render(&topology);
        assert!(text.contains("a.events  topic  yes      no"), "{text}");
        assert!(text.contains("x-queue-type=\"quorum\""), "{text}");
        assert!(text.contains("a.events  e            q"), "{text}");
    }
}
