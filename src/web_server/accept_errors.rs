//! Failed `accept`s of a server's listener. Out of file descriptors (`EMFILE`), tokio's
//! listener fails every `accept` at once for as long as the connection waits in the backlog:
//! the loop pauses between tries so as not to spin, and logs the failure now and then, not at
//! every try (ten times a second, for hours, on a service held at its limit).

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// How long to wait after a failed `accept` before the next: the connections waiting are
/// served this soon once descriptors are freed.
const PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per this long while `accept` keeps failing.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// The failed `accept`s of one server, for its log.
pub(crate) struct AcceptErrors {
    /// What the server accepts, for its log: "an HTTP connection".
    what: &'static str,
    /// Failed since the last accepted connection.
    failed: u64,
    /// Failed since the last warning.
    unlogged: u64,
    /// Kept across accepted connections: a server at its limit accepts one connection each
    /// time another closes, and fails again right after.
    last_warning: Option<Instant>,
    /// Whether an accepted connection was logged since the last warning: once is enough.
    recovery_logged: bool,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> Self {
        AcceptErrors { what, failed: 0, unlogged: 0, last_warning: None, recovery_logged: false }
    }

    /// `accept` failed with `error`: warn, unless a warning was given in the last
    /// `WARN_EVERY`, then pause before the next try.
    pub(crate) async fn failed(&mut self, error: io::Error) {
        self.failed += 1;
        let now = Instant::now();
        if self.last_warning.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.unlogged += 1;
        } else {
            let what = self.what;
            let more = match self.unlogged {
                0 => String::new(),
                unlogged => format!(" ({unlogged} more failed since the last warning)"),
            };
            let hint = match out_of_descriptors(&error) {
                true => {
                    "; the process is out of file descriptors: raise its limit (`ulimit -n`, \
                     RLIMIT_NOFILE) or lower the connections it serves"
                }
                false => "",
            };
            tracing::warn!(
                "cannot accept {what}: {error}{more}{hint}; trying again every {PAUSE:?}, \
                 warning at most every {WARN_EVERY:?}"
            );
            self.last_warning = Some(now);
            self.unlogged = 0;
            self.recovery_logged = false;
        }
        tokio::time::sleep(PAUSE).await;
    }

    /// A connection was accepted: say so, once after a warning, if `accept` failed before.
    pub(crate) fn accepted(&mut self) {
        if self.failed > 0 && !self.recovery_logged {
            let (what, failed) = (self.what, self.failed);
            tracing::info!("accepted {what} again, after {failed} failed accepts");
            self.recovery_logged = true;
        }
        self.failed = 0;
    }
}

/// Whether `error` says the process (`EMFILE`) or the system (`ENFILE`) has no file
/// descriptor left.
fn out_of_descriptors(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = error;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::captured_logs::Captured;

    #[tokio::test(start_paused = true)]
    async fn a_failing_accept_is_paused_after_and_counted_until_one_succeeds() {
        let logs = Captured::start(tracing::Level::INFO);
        let mut errors = AcceptErrors::new("a test connection");
        let started = Instant::now();
        for _ in 0..3 {
            errors.failed(io::Error::from_raw_os_error(24)).await;
        }
        assert_eq!(started.elapsed(), 3 * PAUSE);
        assert_eq!((errors.failed, errors.unlogged), (3, 2));
        tokio::time::advance(WARN_EVERY).await;
        errors.failed(io::Error::from_raw_os_error(24)).await;
        assert_eq!((errors.failed, errors.unlogged), (4, 0), "warned again");
        errors.accepted();
        assert_eq!((errors.failed, errors.recovery_logged), (0, true));
        let logged = logs.logged();
        let warnings: Vec<&str> = logged.lines().filter(|line| line.contains(" WARN ")).collect();
        assert_eq!(warnings.len(), 2, "{logged}");
        assert!(warnings[0].contains("cannot accept a test connection: "), "{logged}");
        assert!(warnings[0].contains("out of file descriptors"), "{logged}");
        assert!(!warnings[0].contains("more failed"), "{logged}");
        assert!(warnings[1].contains("(2 more failed since the last warning)"), "{logged}");
        assert!(logged.contains("accepted a test connection again, after 4 failed accepts"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_at_its_limit_accepting_and_failing_in_turn_warns_once_per_period() {
        // captured throughout: a log macro first reached on a thread without a subscriber
        // would be cached as never enabled, for every test of this binary (tracing-core)
        let logs = Captured::start(tracing::Level::INFO);
        let mut errors = AcceptErrors::new("a test connection");
        errors.failed(io::Error::from_raw_os_error(24)).await;
        let warned = errors.last_warning;
        for _ in 0..10 {
            errors.accepted();
            errors.failed(io::Error::from_raw_os_error(24)).await;
        }
        assert_eq!((errors.last_warning, errors.unlogged), (warned, 10));
        assert!(errors.recovery_logged, "logged once");
        let logged = logs.logged();
        assert_eq!(logged.matches("accepted a test connection again").count(), 1, "{logged}");
        // the next warning's period logs the recovery again
        tokio::time::advance(WARN_EVERY).await;
        errors.failed(io::Error::from_raw_os_error(24)).await;
        assert_ne!(errors.last_warning, warned, "warned again");
        assert!(!errors.recovery_logged, "to be logged after this warning");
    }

    #[test]
    fn an_accept_that_never_failed_is_no_recovery() {
        let mut errors = AcceptErrors::new("a test connection");
        errors.accepted();
        assert_eq!((errors.failed, errors.recovery_logged), (0, false));
    }

    #[cfg(unix)]
    #[test]
    fn the_process_or_the_system_out_of_descriptors_is_told_from_other_failures() {
        for (code, out) in [(libc::EMFILE, true), (libc::ENFILE, true), (libc::ECONNABORTED, false)]
        {
            assert_eq!(out_of_descriptors(&io::Error::from_raw_os_error(code)), out, "{code}");
        }
        assert!(!out_of_descriptors(&io::Error::other("no OS error")));
    }
}
