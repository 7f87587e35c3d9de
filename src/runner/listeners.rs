//! The servers a service opens (HTTP, WebSocket, metrics), checked before start-up for two
//! on one port: the second would fail to bind with only "Address already in use", as if
//! another process held the port (HTTP and metrics both default to port 8000).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pipeline::entrypoint_kind::Kind;

/// One server: the keys that place it, its host and port.
struct Listener<'a> {
    keys: &'static str,
    host: std::borrow::Cow<'a, str>,
    port: u16,
}

impl Listener<'_> {
    /// Whether `self` and `other` cannot both bind: the same port (0 picks a free one) on
    /// the same host, or on hosts one of which is a wildcard covering the other.
    fn clashes_with(&self, other: &Listener<'_>) -> bool {
        let (a, b) = (unbracketed(&self.host), unbracketed(&other.host));
        // `::` is dual-stack on Linux: it takes the port on IPv4 too
        let covers = |wildcard: &str, host: &str| {
            wildcard == "::" || (wildcard == "0.0.0.0" && !host.contains(':'))
        };
        self.port != 0
            && self.port == other.port
            && (a.eq_ignore_ascii_case(b) || covers(a, b) || covers(b, a))
    }
}

/// `host` without the brackets of an IPv6 address (`[::1]` is `::1`).
fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host)
}

/// Refuses two of the servers that `kinds` (the entrypoints that start) and `config` open
/// on one port, naming the keys of both.
#[cfg_attr(
    not(all(feature = "http", feature = "websocket", feature = "metrics")),
    allow(unused_mut, unused_variables)
)]
pub(super) fn check(config: &Config, kinds: &[Kind]) -> Result<()> {
    let mut listeners: Vec<Listener<'_>> = Vec::new();
    #[cfg(feature = "http")]
    if kinds.iter().any(|kind| matches!(kind, Kind::Http { .. })) {
        // validate() checked the shape: a port, or `host:port`
        let address = config.web_server_bind_address();
        if let Some((host, Ok(port))) = address.rsplit_once(':').map(|(h, p)| (h, p.parse())) {
            let host = host.to_owned().into();
            listeners.push(Listener { keys: "WEB_SERVER_ADDRESS", host, port });
        }
    }
    #[cfg(feature = "websocket")]
    if kinds.iter().any(|kind| matches!(kind, Kind::WebSocket)) {
        let (host, port) = (config.websocket_ip.as_str(), config.websocket_port);
        listeners.push(Listener { keys: "WEBSOCKET_IP, WEBSOCKET_PORT", host: host.into(), port });
    }
    #[cfg(feature = "metrics")]
    if config.enable_metrics {
        let (host, port) = (config.metrics.host.as_str(), config.metrics.port);
        listeners.push(Listener { keys: "METRICS_HOST, METRICS_PORT", host: host.into(), port });
    }
    for (index, first) in listeners.iter().enumerate() {
        if let Some(second) = listeners[index + 1..].iter().find(|other| first.clashes_with(other))
        {
            return Err(Error::Startup(format!(
                "{} ({}:{}) and {} ({}:{}) listen on the same port: give one of them another \
                 port",
                first.keys, first.host, first.port, second.keys, second.host, second.port
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Listener;

    fn on(host: &str, port: u16) -> Listener<'_> {
        Listener { keys: "K", host: host.into(), port }
    }

    #[test]
    fn clashes_need_one_port_and_overlapping_hosts() {
        assert!(on("0.0.0.0", 8000).clashes_with(&on("0.0.0.0", 8000)));
        assert!(on("127.0.0.1", 8000).clashes_with(&on("0.0.0.0", 8000)));
        assert!(on("::", 8000).clashes_with(&on("127.0.0.1", 8000)));
        assert!(on("[::1]", 8000).clashes_with(&on("::1", 8000)));
        assert!(!on("0.0.0.0", 8000).clashes_with(&on("0.0.0.0", 8001)));
        assert!(!on("0.0.0.0", 0).clashes_with(&on("0.0.0.0", 0)), "0 picks a free port");
        assert!(!on("127.0.0.1", 8000).clashes_with(&on("10.0.0.5", 8000)));
        assert!(!on("0.0.0.0", 8000).clashes_with(&on("::1", 8000)), "other families");
    }
}
