//! [`WebSite`]: the one HTTP server of a service instance, shared by its HTTP routes.
//!
//! The first `HttpEntrypoint` set up binds `WEB_SERVER_ADDRESS` (so a taken address stops the
//! start); each adds its route to the router; the first one to run serves them all until the
//! service stops.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::DefaultBodyLimit;
use axum::routing::MethodRouter;
use axum::Router;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::runner::RunningService;
use crate::transport::connection_local::ConnectionLocal;
use crate::transport::SharedTransport;

static SITES: ConnectionLocal<WebSite> = ConnectionLocal::new();

/// The HTTP server of one service instance.
#[derive(Debug, Default)]
pub(crate) struct WebSite {
    state: Mutex<SiteState>,
    serving: AtomicBool,
}

#[derive(Debug, Default)]
struct SiteState {
    listener: Option<std::net::TcpListener>,
    address: Option<SocketAddr>,
    router: Router,
    routes: Vec<(String, String, String)>,
}

impl WebSite {
    /// The site of the service instance connected through `transport`.
    pub(crate) fn of(transport: &SharedTransport) -> Arc<WebSite> {
        SITES.get_or_init(transport, WebSite::default)
    }

    /// Forget the site of `transport` and free its address.
    pub(crate) fn close(transport: &SharedTransport) {
        SITES.remove(transport);
    }

    fn state(&self) -> MutexGuard<'_, SiteState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bind `WEB_SERVER_ADDRESS` unless bound already.
    pub(crate) fn bind(&self, config: &Config) -> Result<()> {
        let mut state = self.state();
        if state.listener.is_some() {
            return Ok(());
        }
        let address = &config.web_server_address;
        let listener = std::net::TcpListener::bind(address)
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            .map_err(|error| {
                Error::Startup(format!(
                    "cannot serve HTTP on {address} (WEB_SERVER_ADDRESS): {error}"
                ))
            })?;
        state.address = Some(listener.local_addr()?);
        state.listener = Some(listener);
        Ok(())
    }

    /// Serve `method path` with `handler` for the route `route`. Two routes with the same
    /// method and path, or paths axum cannot tell apart, are refused.
    pub(crate) fn add(
        &self,
        method: &str,
        path: &str,
        route: &str,
        handler: MethodRouter,
    ) -> Result<()> {
        let mut state = self.state();
        if let Some((_, _, other)) = state.routes.iter().find(|(m, p, _)| m == method && p == path)
        {
            return Err(Error::Startup(format!(
                "routes {other} and {route} both serve HTTP {method} {path}"
            )));
        }
        let router = state.router.clone();
        let added = std::panic::catch_unwind(AssertUnwindSafe(|| router.route(path, handler)))
            .map_err(|panic| {
                let reason = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("rejected by the router");
                Error::Startup(format!(
                    "route {route}: cannot serve HTTP {method} {path}: {reason}"
                ))
            })?;
        state.router = added;
        state.routes.push((method.to_owned(), path.to_owned(), route.to_owned()));
        Ok(())
    }

    /// True for the first caller only: it runs the server.
    pub(crate) fn claim_server(&self) -> bool {
        !self.serving.swap(true, Ordering::AcqRel)
    }

    /// The bound listener and the router of every route, bodies limited to `max_body` bytes.
    pub(crate) fn take_server(&self, max_body: usize) -> Result<(tokio::net::TcpListener, Router)> {
        let mut state = self.state();
        let listener = state
            .listener
            .take()
            .ok_or_else(|| Error::Startup("the HTTP server was not bound".into()))?;
        let router = std::mem::take(&mut state.router).layer(DefaultBodyLimit::max(max_body));
        Ok((tokio::net::TcpListener::from_std(listener)?, router))
    }

    fn address(&self) -> Option<SocketAddr> {
        self.state().address
    }
}

impl RunningService {
    /// Where the service's HTTP entrypoints are served (`WEB_SERVER_ADDRESS`; port 0 picks a
    /// free one), while it runs.
    pub fn web_address(&self) -> Option<SocketAddr> {
        SITES.get(self.transport()).and_then(|site| site.address())
    }
}
