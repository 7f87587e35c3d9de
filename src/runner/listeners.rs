//! The servers a service opens (HTTP, WebSocket, metrics), checked before start-up for two
//! on one port: the second would fail to bind with only "Address already in use", as if
//! another process held the port (HTTP and metrics both default to port 8000).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

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
    /// the same address, or on addresses one of which is a wildcard covering the other. A
    /// host is compared as the address it resolves to first, the one a bind tries first
    /// (`localhost` is `127.0.0.1` here); hosts that do not resolve are compared as written,
    /// their bind failing with its own error.
    fn clashes_with(&self, other: &Listener<'_>) -> bool {
        if self.port == 0 || self.port != other.port {
            return false;
        }
        match (self.address(), other.address()) {
            (Some(a), Some(b)) => a == b || covers(a, b) || covers(b, a),
            _ => unbracketed(&self.host).eq_ignore_ascii_case(unbracketed(&other.host)),
        }
    }

    /// The first address the host resolves to, if it resolves.
    fn address(&self) -> Option<IpAddr> {
        let mut addresses = (unbracketed(&self.host), self.port).to_socket_addrs().ok()?;
        addresses.next().map(|address| address.ip())
    }
}

/// Whether a server on `wildcard` takes the port on `address` too: `0.0.0.0` on every IPv4
/// address, `::` on every address (it is dual-stack on Linux).
fn covers(wildcard: IpAddr, address: IpAddr) -> bool {
    wildcard == Ipv6Addr::UNSPECIFIED || (wildcard == Ipv4Addr::UNSPECIFIED && address.is_ipv4())
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

    #[test]
    fn a_host_name_clashes_with_the_address_a_bind_takes_for_it() {
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 8000))
            .expect("localhost resolves")
            .next()
            .expect("an address");
        let address = resolved.ip().to_string();
        assert!(on("localhost", 8000).clashes_with(&on(&address, 8000)), "{address}");
        assert!(on(&address, 8000).clashes_with(&on("LOCALHOST", 8000)), "{address}");
    }
}
