//! [`WsRegistry`]: the WebSocket commands of one service instance and its listening socket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pipeline::RouteHandle;
use crate::transport::connection_local::ConnectionLocal;
use crate::transport::SharedTransport;

static REGISTRIES: ConnectionLocal<WsRegistry> = ConnectionLocal::new();

/// The WebSocket routes of a service instance by command name, and the socket they are served
/// on. Every `WebSocketEntrypoint` registers its route at set-up (the first one binds the
/// socket); the first one to run serves the socket for all.
#[derive(Debug, Default)]
pub(crate) struct WsRegistry {
    commands: Mutex<BTreeMap<String, RouteHandle>>,
    listener: Mutex<Option<std::net::TcpListener>>,
    address: OnceLock<SocketAddr>,
    serving: AtomicBool,
}

impl WsRegistry {
    /// The registry of the service instance connected through `transport`.
    pub(crate) fn of(transport: &SharedTransport) -> Arc<WsRegistry> {
        REGISTRIES.get_or_init(transport, WsRegistry::default)
    }

    /// Drop the registry of `transport` (its service stopped): the socket is closed.
    pub(crate) fn forget(transport: &SharedTransport) {
        REGISTRIES.remove(transport);
    }

    /// The address the service of `transport` listens on, while it is set up or running.
    pub(crate) fn address_of(transport: &SharedTransport) -> Option<SocketAddr> {
        REGISTRIES.get(transport)?.address.get().copied()
    }

    fn commands(&self) -> MutexGuard<'_, BTreeMap<String, RouteHandle>> {
        self.commands.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Listen on `WEBSOCKET_IP:WEBSOCKET_PORT` unless already listening; the address bound.
    pub(crate) fn bind(&self, config: &Config) -> Result<SocketAddr> {
        let mut listener = self.listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(address) = self.address.get() {
            return Ok(*address);
        }
        let (ip, port) = (config.websocket_ip.as_str(), config.websocket_port);
        let cannot = |error: std::io::Error| {
            Error::Startup(format!(
                "cannot listen for WebSocket connections on {ip}:{port} \
                 (WEBSOCKET_IP, WEBSOCKET_PORT): {error}"
            ))
        };
        let socket = std::net::TcpListener::bind((ip, port)).map_err(cannot)?;
        socket.set_nonblocking(true).map_err(cannot)?;
        let address = socket.local_addr().map_err(cannot)?;
        *listener = Some(socket);
        Ok(*self.address.get_or_init(|| address))
    }

    /// The bound socket, for the entrypoint that serves it.
    pub(crate) fn take_listener(&self) -> Option<std::net::TcpListener> {
        self.listener.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    /// Serve `route` as the command named after it.
    pub(crate) fn register(&self, route: RouteHandle) {
        self.commands().insert(route.name().to_owned(), route);
    }

    /// Stop serving `command` on `transport`'s service instance; the registry (and its
    /// socket) goes when its last command does.
    pub(crate) fn unregister(transport: &SharedTransport, command: &str) {
        let registry = WsRegistry::of(transport);
        let mut commands = registry.commands();
        commands.remove(command);
        if commands.is_empty() {
            WsRegistry::forget(transport);
        }
    }

    /// The route of `command`.
    pub(crate) fn route(&self, command: &str) -> Option<RouteHandle> {
        self.commands().get(command).cloned()
    }

    /// What `__list_targets__` and `__get_target__` describe of a command (the Python
    /// original lists parameter names and docstrings, which a Rust route does not know).
    pub(crate) fn target_detail(&self, command: &str) -> Option<Value> {
        self.commands().contains_key(command).then(|| detail(command))
    }

    /// Every command's detail, by name.
    pub(crate) fn target_details(&self) -> Vec<Value> {
        self.commands().keys().map(|command| detail(command)).collect()
    }

    /// True for the first caller only: it serves the socket.
    pub(crate) fn claim_server(&self) -> bool {
        !self.serving.swap(true, Ordering::AcqRel)
    }
}

fn detail(command: &str) -> Value {
    json!({ "target": command, "args": null, "kwargs": null, "docstring": null })
}
