//! [`WebSocketServer`]: the WebSocket server of a service instance, shared by its WebSocket
//! routes: it listens once every route is set up, accepts connections (at most
//! `WEBSOCKET_MAX_CONNECTIONS` served at once) until the service stops, then lets every
//! connection finish its calls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::pipeline::{RouteHandle, Serving, SharedExtension};
use crate::web_server::AcceptErrors;
use crate::websocket::admission::Admissions;
use crate::websocket::connection::{serve_client, ClientTerms};
use crate::websocket::origin::OriginPolicy;
use crate::websocket::registry::WsRegistry;

/// The WebSocket server of one service instance and the commands it serves.
#[derive(Debug)]
pub(crate) struct WebSocketServer {
    /// The route that made the server: its config and stop token are the service's.
    service: RouteHandle,
    registry: Arc<WsRegistry>,
    address: Mutex<Option<SocketAddr>>,
}

impl WebSocketServer {
    /// The server of `service`'s instance, serving no command yet.
    pub(crate) fn new(service: RouteHandle) -> Self {
        WebSocketServer { service, registry: Arc::default(), address: Mutex::default() }
    }

    /// Serve `route` as the command named after it.
    pub(crate) fn register(&self, route: RouteHandle) {
        self.registry.register(route);
    }

    /// Where the server listens, once started.
    pub(crate) fn address(&self) -> Option<SocketAddr> {
        *self.address.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl SharedExtension for WebSocketServer {
    /// Listen on `WEBSOCKET_IP:WEBSOCKET_PORT`, then accept connections until the service
    /// stops; running calls then get `SHUTDOWN_TIMEOUT` to finish.
    async fn start(self: Arc<Self>) -> Result<Serving> {
        let config = self.service.config();
        let (ip, port) = (config.websocket_ip.as_str(), config.websocket_port);
        let cannot = |source| Error::Listen {
            what: "listen for WebSocket connections",
            address: format!("{ip}:{port}"),
            keys: "WEBSOCKET_IP, WEBSOCKET_PORT",
            source,
        };
        let listener = std::net::TcpListener::bind((ip, port)).map_err(cannot)?;
        listener.set_nonblocking(true).map_err(cannot)?;
        let address = listener.local_addr().map_err(cannot)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(cannot)?;
        tracing::info!("serving WebSocket commands on ws://{address}");
        *self.address.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(address);
        Ok(Box::pin(self.serve(listener)))
    }
}

impl WebSocketServer {
    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<()> {
        let stopping = self.service.stopping().clone();
        let terms = Arc::new(ClientTerms {
            metrics: self.service.metrics().clone(),
            registry: self.registry.clone(),
            origins: OriginPolicy::of(self.service.config()),
            idle: self.service.config().websocket_idle_timeout,
            stopping: stopping.clone(),
        });
        let connections = TaskTracker::new();
        let mut admissions = Admissions::new(self.service.config().websocket_max_connections);
        let mut accept_errors = AcceptErrors::new("a WebSocket connection");
        loop {
            let admission = tokio::select! {
                biased;
                _ = stopping.cancelled() => break,
                admission = admissions.next() => match admission {
                    Ok(admission) => admission,
                    Err(_) => break, // the semaphores are never closed
                },
            };
            let (stream, peer) = tokio::select! {
                biased;
                _ = stopping.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => {
                        accept_errors.accepted();
                        accepted
                    }
                    Err(error) => {
                        accept_errors.failed(error).await;
                        continue;
                    }
                },
            };
            let admission = admissions.decide(admission, peer);
            connections.spawn(serve_client(terms.clone(), admission, stream, peer));
        }
        drop(listener);
        connections.close();
        let limit = self.service.config().shutdown_timeout;
        if tokio::time::timeout(limit, connections.wait()).await.is_err() {
            tracing::warn!(
                "WebSocket calls still running after SHUTDOWN_TIMEOUT ({limit:?}); their clients get no reply"
            );
        }
        Ok(())
    }
}
