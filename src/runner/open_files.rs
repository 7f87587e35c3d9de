//! The process's limit on open files (`RLIMIT_NOFILE`), at start: its soft limit raised
//! towards the hard one (to 65,536, or what `HTTP_MAX_CONNECTIONS` and
//! `WEBSOCKET_MAX_CONNECTIONS` need), and a limit still too low for them named.
//!
//! Containers commonly start a process with a soft limit of 1024 under a far higher hard one
//! (Docker 25+, containerd 2, systemd's default): below the default `HTTP_MAX_CONNECTIONS`
//! (1024) plus the descriptors the service holds itself, so its connections would use every
//! descriptor before the cap engages, and `/health/live`, broker reconnects and worker
//! processes could no longer get one. The soft limit is only a default that a process may
//! raise itself up to the hard one, as Go's runtime does at every start.

use crate::config::Config;
use crate::pipeline::entrypoint_kind::Kind;

/// Descriptors a service holds besides its HTTP and WebSocket connections (listeners, broker
/// connections, worker processes' links, the runtime's own), with room to spare.
const OWN_DESCRIPTORS: u64 = 64;

/// How far the soft limit is raised at least (if the hard one allows): a common server
/// limit. Not to the hard one whatever it is: a container's can be a billion, and a program
/// a target starts (inheriting the limit) may close every descriptor up to it one by one.
const ENOUGH: u64 = 65_536;

/// Raise the soft limit towards the hard one (to [`ENOUGH`], or more if the connection caps
/// of the servers the service runs need it: `HTTP_MAX_CONNECTIONS` for the HTTP routes' server
/// (with HTTP routes among the entrypoints' `kinds`) and for the metrics server (metrics on),
/// `WEBSOCKET_MAX_CONNECTIONS` with WebSocket routes);
/// then warn when the limit leaves no room for them.
pub(super) fn raise_and_check(config: &Config, kinds: &[Kind]) {
    #[cfg(feature = "http")]
    let http_routes = kinds.iter().any(|kind| matches!(kind, Kind::Http { .. }));
    #[cfg(not(feature = "http"))]
    let http_routes = false;
    #[cfg(feature = "websocket")]
    let websocket_routes = kinds.iter().any(|kind| matches!(kind, Kind::WebSocket));
    #[cfg(not(feature = "websocket"))]
    let websocket_routes = false;
    // a WebSocket server answers a few connections past its cap (`503`) as well
    #[cfg(feature = "websocket")]
    let refusals = if websocket_routes { crate::websocket::REFUSING } else { 0 };
    #[cfg(not(feature = "websocket"))]
    let refusals = 0;
    let _ = kinds; // read only with the features
                   // the HTTP routes' server and the metrics server each take HTTP_MAX_CONNECTIONS
    let http_servers = usize::from(http_routes) + usize::from(config.enable_metrics);
    let caps = [
        (http_servers, "HTTP_MAX_CONNECTIONS", config.http_max_connections),
        (
            usize::from(websocket_routes),
            "WEBSOCKET_MAX_CONNECTIONS",
            config.websocket_max_connections,
        ),
    ];
    let served: Vec<(usize, &str, usize)> =
        caps.into_iter().filter(|(servers, ..)| *servers > 0).collect();
    #[cfg(unix)]
    {
        let needed = served.iter().fold(
            OWN_DESCRIPTORS.saturating_add(refusals as u64),
            |needed, (servers, _, cap)| {
                needed.saturating_add((*servers as u64).saturating_mul(*cap as u64))
            },
        );
        let Some(soft) = raise(ENOUGH.max(needed)) else { return };
        if !served.is_empty() && soft < needed {
            let caps: Vec<String> = served
                .iter()
                .map(|(servers, key, cap)| match servers {
                    1 => format!("{key} ({cap})"),
                    _ => format!("{key} ({cap}) on each of the HTTP and metrics servers"),
                })
                .collect();
            let keys: Vec<&str> = served.iter().map(|(_, key, _)| *key).collect();
            tracing::warn!(
                "this process may open at most {soft} files (RLIMIT_NOFILE, `ulimit -n`), too \
                 few for {} plus its own: out of descriptors it cannot accept connections \
                 (/health/live included), reconnect to the broker or start worker processes; \
                 raise the limit (`docker run --ulimit nofile=N`, LimitNOFILE=) or lower {}",
                caps.join(" and "),
                keys.join(" or ")
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (served, refusals);
}

/// The soft limit, raised to `wanted` (or to the hard one if lower) if it can be; `None` if
/// it cannot be read.
#[cfg(unix)]
#[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
fn raise(wanted: u64) -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let wanted = libc::rlim_t::try_from(wanted).unwrap_or(libc::rlim_t::MAX).min(limit.rlim_max);
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given. It fails where the hard limit
        // is unlimited yet the kernel caps files per process (macOS): the soft limit stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!("RLIMIT_NOFILE raised from {} to {wanted}", limit.rlim_cur);
            limit = raised;
        }
    }
    Some(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
}
