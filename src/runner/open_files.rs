//! The process's limit on open files (`RLIMIT_NOFILE`), at start: its soft limit raised to
//! the hard one, and a limit still too low for `HTTP_MAX_CONNECTIONS` named.
//!
//! Containers commonly start a process with a soft limit of 1024 under a far higher hard one
//! (Docker 25+, containerd 2, systemd's default): below the default `HTTP_MAX_CONNECTIONS`
//! (1024) plus the descriptors the service holds itself, so its connections would use every
//! descriptor before the cap engages, and `/health/live`, broker reconnects and worker
//! processes could no longer get one. The soft limit is only a default that a process may
//! raise itself up to the hard one, as Go's runtime does at every start.

use crate::config::Config;
use crate::pipeline::entrypoint_kind::Kind;

/// Descriptors a service holds besides its HTTP connections (listeners, broker connections,
/// worker processes' links, the runtime's own), with room to spare.
const OWN_DESCRIPTORS: u64 = 64;

/// Raise the soft limit to the hard one; then, if the service serves HTTP (routes among the
/// entrypoints' `kinds`, or metrics), warn when the limit leaves no room for
/// `HTTP_MAX_CONNECTIONS`.
pub(super) fn raise_and_check(config: &Config, kinds: &[Kind]) {
    #[cfg(feature = "http")]
    let http_routes = kinds.iter().any(|kind| matches!(kind, Kind::Http { .. }));
    #[cfg(not(feature = "http"))]
    let http_routes = {
        let _ = kinds;
        false
    };
    let serves_http = http_routes || config.enable_metrics;
    #[cfg(unix)]
    {
        let Some(soft) = raise() else { return };
        let connections = config.http_max_connections as u64;
        if serves_http && soft < connections.saturating_add(OWN_DESCRIPTORS) {
            tracing::warn!(
                "this process may open at most {soft} files (RLIMIT_NOFILE, `ulimit -n`), too \
                 few for HTTP_MAX_CONNECTIONS ({connections}) plus its own: out of \
                 descriptors it cannot accept connections (/health/live included), reconnect \
                 to the broker or start worker processes; raise the limit (`docker run \
                 --ulimit nofile=N`, LimitNOFILE=) or lower HTTP_MAX_CONNECTIONS"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = serves_http;
}

/// The soft limit, raised to the hard one if it can be; `None` if it cannot be read.
#[cfg(unix)]
fn raise() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given. It fails where the hard limit
        // is unlimited yet the kernel caps files per process (macOS): the soft limit stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!("RLIMIT_NOFILE raised from {} to {}", limit.rlim_cur, limit.rlim_max);
            limit = raised;
        }
    }
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
    Some(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
}
