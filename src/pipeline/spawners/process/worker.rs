//! The worker side: a re-executed service binary that runs calls sent by its service, and
//! sends its broker traffic back through it.
//!
//! Its call thread reads the calls link itself, with blocking reads, runs each call there
//! and writes the outcome: one wake-up a call, where a reader on the runtime handing calls
//! to that thread cost two. The control link is read on the runtime, so the answers to a
//! call's broker operations arrive while the call thread waits for them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

use super::parent_transport::ParentTransport;
use super::protocol::{
    CallRequest, FrameReader, FrameSink, FrameWriter, Greeting, NotReady, Ready, ToWorker,
};
use crate::data::{Failure, FailureKind, Outcome};
use crate::error::{Chain, Error, Result};
use crate::handler::blocking::run_sync_targets_here;
use crate::pipeline::{Attempt, RouteHandle};

/// The environment variable that makes a service binary a worker: the socket to dial.
pub const WORKER_SOCKET_ENV: &str = "MF_WORKER_SOCKET";

/// The environment variable that gives a worker process the pid of its service: the
/// service may be gone before the worker's watch starts, its parent then another.
pub(super) const SERVICE_PID_ENV: &str = "MF_WORKER_SERVICE_PID";

/// The environment variable that gives a worker process the name of its service: the
/// worker's own set-up may name it otherwise (a test's unique name is new at every run).
pub(super) const SERVICE_NAME_ENV: &str = "MF_WORKER_SERVICE_NAME";

/// The environment variable that gives a worker process the context (its `metric_label`)
/// whose calls it runs: the program declares every context, and a worker sets up only the
/// routes of its own (another context's dependencies may hold what only one copy can).
pub(super) const CONTEXT_ENV: &str = "MF_WORKER_CONTEXT";

/// The environment variable that gives a worker process a digest of its context's route
/// names ([`routes_digest`]): the program's `main` runs again in a worker, and a program that
/// started another `Runner` before the service's would have that one take the worker's part.
pub(super) const ROUTES_ENV: &str = "MF_WORKER_ROUTES";

/// The environment variable a worker process sets on itself, to its own pid, before `main`:
/// a program it starts inherits its environment, and finds there a pid not its own.
const WORKER_PID_ENV: &str = "MF_WORKER_PID";

/// Before `main`, while the process has one thread: in a worker process, mark the worker's
/// environment as its own; in a program that inherited it (started by a target running in a
/// worker), remove it, so that the program runs as itself, not as a worker of the service
/// (which exited at once, orphaned, and ignored SIGTERM).
pub(crate) fn claim_worker_environment() {
    if std::env::var_os(WORKER_SOCKET_ENV).is_none() {
        return;
    }
    let own = std::process::id().to_string();
    match std::env::var(WORKER_PID_ENV) {
        Ok(pid) if pid != own => {
            let names = [
                WORKER_SOCKET_ENV,
                SERVICE_PID_ENV,
                SERVICE_NAME_ENV,
                CONTEXT_ENV,
                ROUTES_ENV,
                WORKER_PID_ENV,
            ];
            for name in names {
                std::env::remove_var(name);
            }
        }
        _ => std::env::set_var(WORKER_PID_ENV, own),
    }
}

/// How the name of the directory of a worker's socket begins.
pub(super) const SOCKET_DIR_PREFIX: &str = "mf-worker-";

/// Whether this process is a worker process of a service (the program re-executed by
/// `Runner::start` or `Runner::run` in a process worker mode): the program's own set-up runs
/// there again up to the runner, so what only the service should do (print a banner, start a
/// helper thread) can be skipped.
///
/// ```
/// if !micro_framework::spawners::process::is_worker_process() {
///     eprintln!("starting the service");
/// }
/// ```
pub fn is_worker_process() -> bool {
    worker_socket().is_some()
}

/// The socket to dial when this process is a worker.
pub(crate) fn worker_socket() -> Option<String> {
    std::env::var(WORKER_SOCKET_ENV).ok().filter(|path| !path.is_empty())
}

/// The name of the service this worker process serves, as the service gave it.
pub(crate) fn served_service_name() -> Option<String> {
    std::env::var(SERVICE_NAME_ENV).ok().filter(|name| !name.is_empty())
}

/// The context whose calls this worker process runs, as the service gave it.
pub(crate) fn served_context() -> Option<String> {
    std::env::var(CONTEXT_ENV).ok()
}

/// The digest of the route names of the context this worker process runs, as the service
/// gave it ([`routes_digest`]).
pub(crate) fn served_routes() -> Option<String> {
    std::env::var(ROUTES_ENV).ok().filter(|digest| !digest.is_empty())
}

/// A digest of route `names`, in any order: the same in a service and in its workers, which
/// are the same program. A digest, not the names: an environment variable holds at most
/// 128 KiB on Linux, fewer than the names of a few thousand routes.
pub(crate) fn routes_digest<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    use std::hash::{Hash, Hasher};
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    // the std hasher with its fixed keys: one program computes the same digest everywhere
    let mut hasher = std::hash::DefaultHasher::new();
    names.hash(&mut hasher);
    format!("{}-{:016x}", names.len(), hasher.finish())
}

/// The two links to the service, once connected.
pub(crate) struct WorkerLink {
    /// Calls and their outcomes.
    calls: UnixStream,
    /// The broker traffic of the calls.
    control: FrameReader<OwnedReadHalf>,
    transport: Arc<ParentTransport>,
}

impl WorkerLink {
    /// Dial the service at `socket`: the calls link first, as the service takes the first
    /// connection for it, then the control link.
    pub(crate) async fn connect(socket: &str) -> Result<Self> {
        ignore_stop_signals();
        let dial = || async {
            UnixStream::connect(socket).await.map_err(|error| {
                Error::Startup(format!("worker cannot reach its service: {error}"))
            })
        };
        let dialed = async { Ok::<_, Error>((dial().await?, dial().await?)) }.await;
        remove_socket(socket);
        let (calls, control) = dialed?;
        Ok(WorkerLink::over(calls, control))
    }

    /// The links over `calls` and `control`, connected to the service.
    fn over(calls: UnixStream, control: UnixStream) -> Self {
        let (reader, writer) = control.into_split();
        let transport = Arc::new(ParentTransport::new(FrameSink::new(writer)));
        WorkerLink { calls, control: FrameReader::new(reader), transport }
    }

    /// The transport that forwards broker operations to the service.
    pub(crate) fn transport(&self) -> Arc<ParentTransport> {
        self.transport.clone()
    }

    /// Hands the RPC calls the targets make to the service, whose metrics are served (a
    /// worker's own are not).
    #[cfg(feature = "metrics")]
    pub(crate) fn rpc_call_sink(&self) -> crate::metrics::RpcCallSink {
        self.transport.rpc_call_sink()
    }

    /// Tell the service why this worker cannot serve, in place of saying ready, and log it:
    /// the service's start, or its replacement of a worker, then fails with the reason.
    /// Returns `error`.
    pub(crate) async fn refuse(self, error: Error) -> Error {
        tracing::error!("this worker process cannot serve: {}", Chain(&error));
        let mut calls = self.calls;
        if let Err(unsent) = greet(&mut calls, &Greeting::Err(NotReady::from_error(&error))).await {
            tracing::debug!("cannot tell the service why: {unsent}");
        }
        error
    }

    /// Say ready, then run the calls the service sends until it hangs up their link; then run
    /// `finish` (the teardown of the worker's dependencies) while the control link still
    /// carries its broker traffic, which the service serves until this process exits.
    ///
    /// The calls run one at a time on a thread of their own, which reads each call, runs it
    /// (a sync target right there) and writes its outcome; a task on the runtime reads the
    /// control link meanwhile.
    pub(crate) async fn serve(
        self,
        routes: HashMap<String, RouteHandle>,
        finish: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let WorkerLink { mut calls, control, transport } = self;
        let mut reading = None;
        let served = async {
            let ready = Greeting::Ok(Ready { pid: std::process::id() });
            greet(&mut calls, &ready)
                .await
                .map_err(|_| Error::Startup("service hung up".into()))?;
            let calls = calls.into_std()?;
            let _hang_up = HangUpOnDrop(calls.try_clone()?);
            let control = read_control(control, transport.clone(), calls.try_clone()?);
            reading = Some(tokio::spawn(control));
            let runtime = tokio::runtime::Handle::current();
            let served = match runtime.runtime_flavor() {
                // sync targets cannot block a current-thread runtime's only thread
                tokio::runtime::RuntimeFlavor::CurrentThread => {
                    serve_calls(UnixStream::from_std(calls)?, &routes).await
                }
                _ => {
                    calls.set_nonblocking(false)?;
                    tokio::task::spawn_blocking(move || {
                        run_sync_targets_here(|| serve_calls_blocking(&calls, &routes, &runtime))
                    })
                    .await
                    .map_err(|error| {
                        Error::WorkerProcess(format!("the call thread failed: {error}"))
                    })?
                }
            };
            Ok::<_, Error>(served?)
        }
        .await;
        finish.await;
        // no call and no teardown runs any more, so none waits for the control link
        if let Some(reading) = reading {
            reading.abort();
        }
        transport.link_ended();
        served
    }
}

/// Send the service the first frame of the calls link: ready, or why not.
async fn greet(calls: &mut UnixStream, greeting: &Greeting) -> std::io::Result<()> {
    let mut writer = FrameWriter::new(calls);
    writer.push(greeting)?;
    writer.flush().await
}

/// Remove the socket this worker dialed and its directory, once dialed or not: of no use any
/// more either way, and a service killed while this worker started cannot remove them. Only
/// a directory of a worker's socket, and only when empty.
fn remove_socket(socket: &str) {
    let socket = std::path::Path::new(socket);
    let _ = std::fs::remove_file(socket);
    let dir = socket.parent().filter(|dir| {
        dir.file_name().is_some_and(|name| name.to_string_lossy().starts_with(SOCKET_DIR_PREFIX))
    });
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Block (`libc::SIG_BLOCK`) or unblock (`libc::SIG_UNBLOCK`) SIGINT and SIGTERM for the
/// calling thread. A worker is started with them blocked (the mask survives `exec`): a Ctrl-C
/// to the whole process group between its start and its first instruction, where it catches
/// them, then waits instead of killing it, and is caught once they are unblocked.
///
/// Async-signal-safe (called between `fork` and `exec`).
pub(crate) fn stop_signals(how: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a zeroed sigset_t is a valid one to fill; the calls only read and write the set
    // and this thread's mask.
    let failed = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut()) != 0
    };
    match failed {
        true => Err(std::io::Error::last_os_error()),
        false => Ok(()),
    }
}

/// Make SIGINT and SIGTERM do nothing here: sent to a whole process group (Ctrl-C in a
/// terminal) or control group (systemd), they are meant for the service, which stops
/// gracefully, letting the running calls finish, and then ends its workers by closing
/// their links.
fn ignore_stop_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
        // tokio's handler, once installed, replaces the default action (termination) for the
        // rest of the process's life, so the stream need not be kept
        if let Err(error) = signal(kind) {
            tracing::warn!("a worker process cannot ignore {kind:?}: {error}");
        }
    }
}

/// How often a worker checks that its service is still there.
const PARENT_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Exit once the service is gone (its process ended, even killed, so this one was handed to
/// another parent), even while a call runs: the service enforces the time limit, and
/// nobody waits for the call's outcome any more. Started before `main`, so that a worker
/// still in the program's own set-up (a connection that hangs) does not outlive its service.
pub(crate) fn exit_when_orphaned() {
    let named = std::env::var(SERVICE_PID_ENV).ok().and_then(|pid| pid.parse().ok());
    let service = named.unwrap_or_else(std::os::unix::process::parent_id);
    // the socket the worker has not dialed yet, whose folder nobody else would remove
    let socket = worker_socket();
    let watching = std::thread::Builder::new().name("service-watch".into()).spawn(move || loop {
        std::thread::sleep(PARENT_CHECK);
        if std::os::unix::process::parent_id() != service {
            if let Some(socket) = &socket {
                remove_socket(socket);
            }
            tracing::error!("the service (process {service}) is gone: this worker exits");
            std::process::exit(1);
        }
    });
    if let Err(error) = watching {
        tracing::warn!("a worker process cannot watch its service: {error}");
    }
}

/// Shuts the calls link down when dropped: when a program drops the future that serves the
/// calls, the call thread's blocking read (or its next write) then fails and the thread ends,
/// rather than holding up the runtime's drop until the service hangs up. Once the thread has
/// ended, shutting the link down again changes nothing.
struct HangUpOnDrop(std::os::unix::net::UnixStream);

impl Drop for HangUpOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Run `request` here, on `route` (the route it names, if the worker has it), and add its
/// outcome to what `writer` sends. The function's value is encoded into `writer` before the
/// call's dependencies are told (see [`RouteHandle::run_here`]): a value the link cannot
/// carry fails the call they are told of, where it failed after a session was committed, and
/// a value that fits is encoded once.
async fn run_call<W: Send>(
    request: CallRequest,
    route: Option<&RouteHandle>,
    writer: &mut FrameWriter<W>,
) -> std::io::Result<()> {
    let CallRequest { route: name, call_id, role, message, failure, retry } = request;
    let Some(route) = route else {
        let failure = Failure::new(FailureKind::Error, format!("the worker has no route '{name}'"));
        return push_outcome(writer, &Err(failure), || retries_unmatched(None));
    };
    let mark = writer.mark();
    let mut encoded = false;
    let mut encode = |value: &serde_json::Value| {
        // the bytes of the `Outcome` `Ok(value)`, as the service reads it
        writer.push(&Ok::<_, &Failure>(value))?;
        encoded = true;
        Ok(())
    };
    // the service kills this process past the call's time limit
    let message = Arc::new(message);
    let attempt = Attempt { role, message: &message, failure, retry: &retry };
    let outcome = route.run_here(attempt, Some(call_id), None, Some(&mut encode)).await;
    match outcome {
        Ok(_) if encoded => Ok(()),
        outcome => {
            // a value encoded, then failed by its dependencies, goes as that failure
            writer.truncate_to(mark);
            push_outcome(writer, &outcome, || retries_unmatched(Some(route)))
        }
    }
}

/// Add `outcome` to what `writer` sends; one that cannot be encoded (a failure whose message
/// alone is too large: a value is checked before the dependencies are told) is sent as the
/// failure that says so.
///
/// An outcome that cannot be sent becomes a failure with no error of the call's for the
/// route's retry filter to match, as a crash: retryable only where the route's backoff
/// accepts such failures ([`retries_unmatched`]; with a filter it fails at once).
fn push_outcome<W>(
    writer: &mut FrameWriter<W>,
    outcome: &Outcome,
    retries_unmatched: impl FnOnce() -> bool,
) -> std::io::Result<()> {
    match writer.push(outcome) {
        Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
            let mut failure = Failure::new(
                FailureKind::Error,
                format!("the call's outcome cannot be sent to the service: {error}"),
            );
            failure.retryable = failure.retryable && retries_unmatched();
            writer.push(&Err::<serde_json::Value, _>(failure))
        }
        pushed => pushed,
    }
}

/// Run each call received on `calls` and send its outcome, until the service hangs up; with
/// blocking reads and writes on this thread, outside the runtime.
fn serve_calls_blocking(
    calls: &std::os::unix::net::UnixStream,
    routes: &HashMap<String, RouteHandle>,
    runtime: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    let (mut reader, mut writer) = (FrameReader::new(calls), FrameWriter::new(calls));
    while let Some(request) = reader.next_blocking::<CallRequest>()? {
        let route = routes.get(&request.route);
        runtime.block_on(run_call(request, route, &mut writer))?;
        writer.flush_blocking()?;
    }
    Ok(())
}

/// Whether `route` retries a failure with no error to match (see [`push_outcome`]).
fn retries_unmatched(route: Option<&RouteHandle>) -> bool {
    route.and_then(RouteHandle::backoff).is_none_or(|policy| policy.accepts(None))
}

/// [`serve_calls_blocking`] on the runtime's thread, for a current-thread runtime.
async fn serve_calls(
    calls: UnixStream,
    routes: &HashMap<String, RouteHandle>,
) -> std::io::Result<()> {
    let (reader, writer) = calls.into_split();
    let (mut reader, mut writer) = (FrameReader::new(reader), FrameWriter::new(writer));
    while let Some(request) = reader.next::<CallRequest>().await? {
        let route = routes.get(&request.route);
        run_call(request, route, &mut writer).await?;
        writer.flush().await?;
    }
    Ok(())
}

/// Read the control link: each frame goes to whom waits for it. Once it ends (the service
/// hung up, or sent a frame that cannot be read), the calls link is shut down too: without
/// the service's answers to its broker operations the worker is no use, so it stops.
async fn read_control(
    mut reader: FrameReader<OwnedReadHalf>,
    transport: Arc<ParentTransport>,
    calls: std::os::unix::net::UnixStream,
) -> std::io::Result<()> {
    let read = loop {
        let frame = match reader.next::<ToWorker>().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        match frame {
            ToWorker::Delivery(forwarded) => transport.deliver(*forwarded).await,
            ToWorker::ConsumerEnded { consumer } => transport.consumer_ended(consumer),
            ToWorker::Reconnected { reconnects } => transport.reconnected(reconnects),
            ToWorker::TransportReply { id, result } => transport.answer(id, result),
        }
    };
    transport.link_ended();
    if let Err(error) = &read {
        tracing::error!("cannot read the service's control link: {error}; this worker stops");
    }
    let _ = calls.shutdown(std::net::Shutdown::Both);
    read
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spawners::process::protocol::FromWorker;
    use crate::transport::{Transport, TransportError};

    #[tokio::test]
    async fn a_broker_operation_waiting_when_the_service_hangs_up_fails_at_once() {
        let (calls, _service_calls) = UnixStream::pair().unwrap();
        let (worker_end, service_end) = UnixStream::pair().unwrap();
        let WorkerLink { control, transport, calls } = WorkerLink::over(calls, worker_end);
        let reading =
            tokio::spawn(read_control(control, transport.clone(), calls.into_std().unwrap()));
        let asking = transport.clone();
        let waiting = tokio::spawn(async move { asking.queue_info("q").await });
        let mut service = FrameReader::new(service_end);
        let sent = tokio::time::timeout(std::time::Duration::from_secs(5), service.next());
        let sent: Option<FromWorker> = sent.await.expect("the operation is sent").unwrap();
        assert!(matches!(sent, Some(FromWorker::Transport { .. })), "{sent:?}");
        drop(service);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the operation ends once the link does")
            .unwrap();
        assert!(matches!(answer, Err(TransportError::Closed { .. })), "{answer:?}");
        let _read = reading.await.expect("the reader ends with the link");
        assert!(!transport.is_connected());
    }

    /// The service stopped writing to the control link but still reads it (as while it ends
    /// a worker): a broker operation asked after that fails at once, rather than waiting for
    /// an answer nobody sends.
    #[tokio::test]
    async fn a_broker_operation_asked_once_the_service_hung_up_fails_at_once() {
        let (calls, _service_calls) = UnixStream::pair().unwrap();
        let (worker_end, service_end) = UnixStream::pair().unwrap();
        let WorkerLink { control, transport, calls } = WorkerLink::over(calls, worker_end);
        let (_service_reads, service_writes) = service_end.into_split();
        drop(service_writes);
        let reading = read_control(control, transport.clone(), calls.into_std().unwrap());
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), reading).await;
        assert!(matches!(read, Ok(Ok(()))), "the reader ends with the link: {read:?}");
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(5), transport.queue_info("q"))
                .await
                .expect("the operation fails at once");
        assert!(matches!(answer, Err(TransportError::Closed { .. })), "{answer:?}");
    }

    #[tokio::test]
    async fn a_frame_from_the_service_that_cannot_be_read_stops_the_worker() {
        let (calls, service_calls) = UnixStream::pair().unwrap();
        let (worker_end, service_end) = UnixStream::pair().unwrap();
        let WorkerLink { control, transport, calls } = WorkerLink::over(calls, worker_end);
        // the calls link stays open here, as the call thread keeps it
        let calls = calls.into_std().unwrap();
        let reading = tokio::spawn(read_control(control, transport, calls.try_clone().unwrap()));
        let mut service = FrameWriter::new(service_end);
        service.push(&"not a frame for a worker").unwrap();
        service.flush().await.unwrap();
        let mut calls = FrameReader::new(service_calls);
        let ended =
            tokio::time::timeout(std::time::Duration::from_secs(5), calls.next::<Outcome>())
                .await
                .expect("the worker hangs up its calls link");
        assert!(matches!(ended, Ok(None)), "{ended:?}");
        assert!(reading.await.unwrap().is_err());
        drop(calls);
    }

    #[test]
    fn an_outcome_too_large_for_the_link_is_retryable_only_where_unmatched_failures_are() {
        // the route's retry filter was applied where the call ran, to its own error; this
        // failure is the link's, with no error to match (was: retried past the filter)
        let too_large: Outcome = Ok(serde_json::Value::String("x".repeat(256 << 20)));
        for retries_unmatched in [false, true] {
            let mut writer = FrameWriter::new(());
            push_outcome(&mut writer, &too_large, || retries_unmatched).unwrap();
            let sent: Outcome = rmp_serde::from_slice(&writer.pushed()[4..]).unwrap();
            let failure = sent.unwrap_err();
            assert!(failure.message.contains("cannot be sent to the service"), "{failure:?}");
            assert_eq!(failure.retryable, retries_unmatched);
        }
    }

    #[test]
    fn a_runtime_whose_worker_was_dropped_mid_wait_shuts_down_though_the_service_stays() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (link, service_calls, service_control) = runtime.block_on(async {
            let (calls, service_calls) = UnixStream::pair().unwrap();
            let (control, service_control) = UnixStream::pair().unwrap();
            (WorkerLink::over(calls, control), service_calls, service_control)
        });
        let serving = runtime.spawn(link.serve(HashMap::new(), async {}));
        // the worker says ready, then its call thread waits in its blocking read
        let mut ready = [0u8; 1];
        let service_calls = service_calls.into_std().unwrap();
        service_calls.set_nonblocking(false).unwrap();
        std::io::Read::read_exact(&mut &service_calls, &mut ready).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        serving.abort();
        let (dropped, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(runtime);
            let _ = dropped.send(());
        });
        // the service still holds both links open
        done.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the runtime shuts down while the service keeps the links open");
        drop((service_calls, service_control));
    }
}
