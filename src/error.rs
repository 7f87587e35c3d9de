//! The crate's error type.

use crate::config::ConfigError;
use crate::transport::TransportError;

pub use crate::data::BoxError;

/// How many route names an unknown route's error lists.
const LISTED_ROUTES: usize = 20;

/// The routes an unknown route's error names: each of a service of up to [`LISTED_ROUTES`];
/// of a bigger one, how many there are and the names closest to the one asked for (the whole
/// list of a service of thousands of routes made an error of tens of kilobytes, the likely
/// name lost in it).
pub(crate) fn known_routes(asked: &str, known: &[String]) -> String {
    if known.len() <= LISTED_ROUTES {
        return format!("routes: {}", known.join(", "));
    }
    let mut closest: Vec<&str> = known.iter().map(String::as_str).collect();
    closest.sort_by_cached_key(|name| (strsim::damerau_levenshtein(asked, name), *name));
    closest.truncate(LISTED_ROUTES);
    format!("{} routes, the closest: {}", known.len(), closest.join(", "))
}

/// Errors that stop a service from starting or running, and errors of the framework's own
/// calls. The variant says what happened; [`Error::Startup`] is only for a service that
/// cannot be declared or started, for a reason no other variant names.
///
/// An error that wraps another ([`Error::RouteStopped`], [`Error::Dependency`],
/// [`Error::Encode`]) says what failed in its own message and returns the error it wraps from
/// [`source`](std::error::Error::source), as the Rust API guidelines ask: a reporter that walks
/// the sources (`anyhow`'s `{:#}` and `{:?}`, `eyre`) shows each once.
///
/// Its `Debug` is its message followed by its sources' (`route 'paid' stopped: closed: ...`):
/// a `main` returning [`Result`] prints a returned error with `Debug`, and an operator should
/// read `invalid config WORKER_MODE="fibers": ...`, not the variant's fields. Match on the
/// variant to tell errors apart:
///
/// ```
/// use micro_framework::{Config, Error};
///
/// fn load() -> micro_framework::Result<Config> {
///     Ok(Config::from_vars([("WORKER_MODE".to_owned(), "fibers".to_owned())])?)
/// }
///
/// let error = load().unwrap_err();
/// assert!(matches!(error, Error::Config(_)));
/// assert!(error.to_string().contains("WORKER_MODE"), "{error}");
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker refused an operation or could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The service cannot start as declared (duplicate route names, unprovidable
    /// parameters, missing entrypoints, an address in use, ...), or a part of it cannot be
    /// declared (a cron expression that does not parse, a test's configuration that cannot
    /// be made). Returned while a service is declared or starts, never once it runs.
    #[error("cannot start: {0}")]
    Startup(String),
    /// A server of the service cannot listen on its address, which its configuration keys
    /// set: the address is in use (`source.kind()` is `AddrInUse`), not one of this host's,
    /// or not allowed. Returned while the service starts, before the broker is touched.
    #[error("cannot start: cannot {what} on {address} ({keys})")]
    #[non_exhaustive]
    Listen {
        /// What the server does: `serve metrics`, `serve HTTP`, `listen for WebSocket
        /// connections`.
        what: &'static str,
        /// The address it was to listen on, as configured.
        address: String,
        /// The configuration keys that set the address.
        keys: &'static str,
        /// Why it cannot.
        source: std::io::Error,
    },
    /// A route's entrypoint failed while the service ran; the service stopped.
    #[error("route '{route}' stopped")]
    RouteStopped {
        /// The route's name.
        route: String,
        /// Why its entrypoint failed.
        source: Box<Error>,
    },
    /// An entrypoint panicked while the service ran; the service stopped.
    #[error("an entrypoint panicked: {0}")]
    EntrypointPanicked(String),
    /// The task supervising a running service panicked or was cancelled.
    #[error("service supervisor failed: {0}")]
    SupervisorFailed(String),
    /// A worker process (process worker modes) could not be started or did not get ready,
    /// when the service starts or when a worker is replaced.
    #[error("{0}")]
    WorkerProcess(String),
    /// A blocking call (e.g. `dispatch_blocking`) was made where it cannot block: outside a
    /// tokio runtime, or on a current-thread runtime outside a sync target.
    #[error("cannot block: {0}")]
    Blocking(String),
    /// No running route has this name.
    #[error("no route named '{route}' ({})", known_routes(route, known))]
    UnknownRoute {
        /// The name asked for.
        route: String,
        /// The names of the service's routes.
        known: Vec<String>,
    },
    /// A dependency failed in `setup`.
    #[error("dependency {name} failed to set up")]
    Dependency {
        /// The dependency's type name.
        name: String,
        /// What went wrong.
        source: BoxError,
    },
    /// An event or message could not be encoded.
    #[error("cannot encode message")]
    Encode(#[from] serde_json::Error),
    /// A wait in a test helper or client ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// What a test helper waited for cannot come any more: the service or route it came
    /// from stopped.
    #[error("stopped: {0}")]
    Stopped(String),
    /// An operating-system error (signals, runtime).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&Chain(self), f)
    }
}

/// An error followed by the messages of its sources, `outer: inner: innermost`, as `anyhow`'s
/// `{:#}` shows one: what the framework's logs print of an error, whose own message does not
/// repeat its source's.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
