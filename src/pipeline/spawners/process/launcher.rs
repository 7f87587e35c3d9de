//! Starting a worker process: the service's own program re-executed, dialing a socket in a
//! private directory, and ready (or given up on) within a time limit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use super::control::{ControlLink, Sink};
use super::pool::ProcessPool;
use super::protocol::{BorrowedCall, FrameReader, FrameSink, FrameWriter, Greeting, Ready};
use super::worker::{
    CONTEXT_ENV, ROUTES_ENV, SERVICE_NAME_ENV, SERVICE_PID_ENV, SOCKET_DIR_PREFIX,
    WORKER_SOCKET_ENV,
};
use crate::data::Outcome;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::transport::SharedTransport;

/// How long a worker process may take to start, its program's own set-up included.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a worker process that exited during its start-up is given to have its reason for
/// not serving read: written before it exited, it is there already, unless it never dialed.
const LAST_WORDS: Duration = Duration::from_millis(250);

/// One worker process and its two links. Dropping it closes them, and the worker exits.
pub(super) struct Worker {
    pub child: Child,
    pub links: Links,
}

/// What a call uses of a worker: its links. While the worker is lent to a call, its process
/// stays with the pool, so that the shutdown can kill and wait for it.
pub(super) struct Links {
    pub pid: u32,
    pub calls: CallLink,
    /// The control link's only strong reference (its tasks hold weak ones).
    pub control: Arc<Sink>,
    pub done: u32,
    /// When it said it was ready.
    pub started: std::time::Instant,
}

/// The service's end of a worker's calls link: the calling task writes the call and reads
/// the outcome itself.
pub(super) struct CallLink {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
}

impl CallLink {
    /// Send `call`; one that cannot be encoded is refused (`InvalidData`) and the link stays
    /// usable, any other error means the link is broken.
    pub(super) async fn send(&mut self, call: &BorrowedCall<'_>) -> std::io::Result<()> {
        self.writer.push(call)?;
        self.writer.flush().await
    }

    /// The call's outcome; `None` if the worker hung up or sent something else.
    pub(super) async fn outcome(&mut self) -> Option<Outcome> {
        self.reader.next::<Outcome>().await.ok().flatten()
    }
}

/// A worker process that said it was ready, with its links.
struct Started {
    child: Child,
    pid: u32,
    calls: CallLink,
    control: UnixStream,
    /// The calls link's socket again, to shut it down from the control link's task.
    calls_socket: std::os::unix::net::UnixStream,
}

/// Starts worker processes: the service's own binary, re-executed with the worker socket in
/// its environment, so the program's `main` (and its set-up) runs there too.
#[derive(Clone)]
pub(super) struct Launcher {
    pub transport: SharedTransport,
    /// The service's metrics, where the RPC calls its workers' targets make are recorded.
    pub metrics: Metrics,
    /// The name of the service, which its workers run as.
    pub service: Arc<str>,
    /// The context whose calls its workers run: they set up only its routes' dependencies.
    pub context: Arc<str>,
    /// The digest of that context's route names, which a worker checks its own against.
    pub routes: Arc<str>,
    /// The arguments of a worker process: `None` for the program's own.
    pub args: Option<Vec<OsString>>,
    /// The pool its workers are for, told when one's control link ends.
    pub pool: Weak<ProcessPool>,
}

impl Launcher {
    /// Start a worker process, and the task that serves its control link.
    pub(super) async fn launch(&self) -> Result<Worker> {
        let socket = PrivateSocket::new().map_err(|error| {
            Error::WorkerProcess(format!("cannot make the directory of a worker's socket: {error}"))
        })?;
        let started = self.start(&socket.0).await;
        drop(socket);
        let Started { child, pid, calls, control, calls_socket } = started?;
        let (reader, writer) = control.into_split();
        let control = Arc::new(FrameSink::new(writer));
        let pool = self.pool.clone();
        let link = ControlLink {
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
            replies: Arc::downgrade(&control),
            calls_socket,
            ended: Box::new(move || {
                if let Some(pool) = pool.upgrade() {
                    pool.gone(pid);
                }
            }),
        };
        tokio::spawn(link.serve(FrameReader::new(reader)));
        tracing::debug!("worker process {pid} started");
        let started = std::time::Instant::now();
        Ok(Worker { child, links: Links { pid, calls, control, done: 0, started } })
    }

    /// Start a worker process that dials `socket`, and wait until it is ready. The whole
    /// start-up is limited, the program's set-up in the worker included (a dependency whose
    /// set-up hangs would otherwise hang the service's start, or a replacement, for good),
    /// and a worker that exits meanwhile fails it at once. A worker given up on is killed
    /// when its `Child` is dropped.
    async fn start(&self, socket: &Path) -> Result<Started> {
        let listener = UnixListener::bind(socket).map_err(|error| {
            let socket = socket.display();
            Error::WorkerProcess(format!("cannot listen for a worker process at {socket}: {error}"))
        })?;
        let args = match &self.args {
            Some(args) => args.clone(),
            None => std::env::args_os().skip(1).collect(),
        };
        let mut command = Command::new(program()?);
        if let Some(name) = std::env::args_os().next() {
            command.arg0(name);
        }
        command.args(args).env(WORKER_SOCKET_ENV, socket);
        command.env(SERVICE_PID_ENV, std::process::id().to_string());
        command.env(SERVICE_NAME_ENV, &*self.service);
        command.env(CONTEXT_ENV, &*self.context);
        command.env(ROUTES_ENV, &*self.routes);
        // SAFETY: between `fork` and `exec` the closure makes async-signal-safe calls only.
        unsafe {
            command.pre_exec(|| super::worker::stop_signals(libc::SIG_BLOCK));
        }
        let mut child = command.kill_on_drop(true).spawn().map_err(|error| {
            Error::WorkerProcess(format!("cannot start a worker process: {error}"))
        })?;
        let ready = async {
            // the worker dials its calls link first
            let (calls, _) = listener.accept().await?;
            let (control, _) = listener.accept().await?;
            let calls = calls.into_std()?;
            let calls_socket = calls.try_clone()?;
            let (reader, writer) = UnixStream::from_std(calls)?.into_split();
            let mut calls =
                CallLink { reader: FrameReader::new(reader), writer: FrameWriter::new(writer) };
            let greeting = calls.reader.next::<Greeting>().await?;
            Ok::<_, std::io::Error>(
                greeting.map(|greeting| (greeting, calls, control, calls_socket)),
            )
        };
        tokio::pin!(ready);
        let ready = tokio::select! {
            ready = tokio::time::timeout(START_LIMIT, &mut ready) => ready,
            status = child.wait() => {
                // a worker that could not serve said why before it exited
                if let Ok(Ok(Some((Err(not_ready), ..)))) =
                    tokio::time::timeout(LAST_WORDS, &mut ready).await
                {
                    return Err(not_ready.into());
                }
                let status = status.map_or_else(|error| error.to_string(), |s| s.to_string());
                let message = format!("a worker process exited before it was ready ({status})");
                return Err(Error::WorkerProcess(message));
            }
        };
        match ready {
            Ok(Ok(Some((Ok(Ready { pid }), calls, control, calls_socket)))) => {
                Ok(Started { child, pid, calls, control, calls_socket })
            }
            Ok(Ok(Some((Err(not_ready), ..)))) => Err(not_ready.into()),
            Ok(Ok(None)) => {
                Err(Error::WorkerProcess("a worker process did not say it was ready".into()))
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(Error::WorkerProcess(format!(
                "a worker process was not ready in {START_LIMIT:?}: killed"
            ))),
        }
    }
}

/// The program to start as a worker process: the running one. On Linux through
/// /proc/self/exe, which stays valid when a deploy replaced or removed the program's file,
/// whose path is then reported with " (deleted)" appended, naming no file.
fn program() -> std::io::Result<PathBuf> {
    if cfg!(target_os = "linux") {
        Ok(PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe()
    }
}

/// A socket path in a new directory only this user may enter (mode 0700), so no other local
/// user can connect to the socket before the worker does, whatever the umask. Dropped, it
/// removes the socket and the directory, also when a start-up is abandoned midway (its
/// future dropped as the service stops).
struct PrivateSocket(PathBuf);

/// The longest socket path every Unix takes: `sun_path` holds 108 bytes on Linux and 104 on
/// macOS and the BSDs, the final NUL included.
const MAX_SOCKET_PATH: usize = 103;

impl PrivateSocket {
    fn new() -> std::io::Result<Self> {
        Self::under(&std::env::temp_dir())
    }

    /// In a new directory under `base`, or under `/tmp` when a socket path under `base`
    /// would be too long (a deep `TMPDIR`: macOS's own is about 50 bytes).
    fn under(base: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let name =
            format!("{SOCKET_DIR_PREFIX}{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let socket = |base: &Path| base.join(&name).join("sock");
        let path = match socket(base) {
            path if path.as_os_str().len() <= MAX_SOCKET_PATH => path,
            _ => socket(Path::new("/tmp")),
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        }
        Ok(PrivateSocket(path))
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_worker_socket_under_a_deep_directory_goes_to_tmp() {
        let deep = std::env::temp_dir().join("d".repeat(100));
        let socket = PrivateSocket::under(&deep).unwrap();
        assert!(socket.0.starts_with("/tmp"), "{}", socket.0.display());
        let _listening = std::os::unix::net::UnixListener::bind(&socket.0).unwrap();
    }

    #[test]
    fn worker_sockets_live_in_a_private_directory() {
        let socket = PrivateSocket::new().unwrap();
        let dir = socket.0.parent().unwrap().to_owned();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let _listening = std::os::unix::net::UnixListener::bind(&socket.0).unwrap();
        drop(socket);
        assert!(!dir.exists());
    }
}
