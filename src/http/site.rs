//! [`WebSite`]: the one HTTP server of a service instance, shared by its HTTP routes.
//!
//! Each `HttpEntrypoint` adds its route to the site at set-up; once every route is set up the
//! runner starts the site, which binds `WEB_SERVER_ADDRESS` (a taken address stops the start),
//! then serves every route until the service stops, with the limits of
//! [`web_server`](crate::web_server) (timeouts, `HTTP_MAX_CONNECTIONS`).

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use axum::extract::DefaultBodyLimit;
use axum::routing::MethodRouter;
use axum::Router;
use tokio_util::task::TaskTracker;

use super::response::{method_not_allowed, not_found};
use crate::error::{Error, Result};
use crate::pipeline::{RouteHandle, Serving, SharedExtension};
use crate::web_server::{serve, WebLimits};

/// The HTTP server of one service instance.
#[derive(Debug)]
pub(crate) struct WebSite {
    /// The route that made the site: its config and stop token are the service's.
    service: RouteHandle,
    state: Mutex<SiteState>,
    /// The running calls, each in a task of its own that may outlive its connection (its
    /// client hung up): the site waits for them too when the service stops.
    calls: TaskTracker,
}

#[derive(Debug, Default)]
struct SiteState {
    address: Option<SocketAddr>,
    router: Router,
    routes: Vec<(String, String, String)>,
    /// The paths of `routes` as axum's router matches them, to find a conflict before axum
    /// (which panics on it, its message on stderr even when caught).
    paths: matchit::Router<()>,
}

impl WebSite {
    /// The site of `service`'s instance, serving nothing yet.
    pub(crate) fn new(service: RouteHandle) -> Self {
        WebSite { service, state: Mutex::default(), calls: TaskTracker::new() }
    }

    /// Where the routes' calls run (see [`WebSite::calls`]).
    pub(crate) fn calls(&self) -> TaskTracker {
        self.calls.clone()
    }

    fn state(&self) -> MutexGuard<'_, SiteState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        // a second method on a known path joins its route; a new path must not conflict
        if !state.routes.iter().any(|(_, known, _)| known == path) {
            state
                .paths
                .insert(path, ())
                .map_err(|conflict| refused(method, path, route, conflict))?;
        }
        state.router = add_route(state.router.clone(), method, path, route, handler)?;
        state.routes.push((method.to_owned(), path.to_owned(), route.to_owned()));
        Ok(())
    }

    /// Where the site listens, once started.
    pub(crate) fn address(&self) -> Option<SocketAddr> {
        self.state().address
    }
}

/// `router` serving `method path` with `handler` for the route `route`; a path axum refuses
/// is an error. Axum panics on such a path, and its panic message reaches stderr even when
/// the panic is caught, so the paths it is known to refuse are refused first: a segment
/// starting with `:` or `*` (axum 0.7's captures) here, a conflict in [`WebSite::add`].
pub(super) fn add_route(
    router: Router,
    method: &str,
    path: &str,
    route: &str,
    handler: MethodRouter,
) -> Result<Router> {
    if path.split('/').any(|segment| segment.starts_with([':', '*'])) {
        let reason = "a segment starts with `:` or `*`: captures are written `{name}` and \
                      `{*rest}`";
        return Err(refused(method, path, route, reason));
    }
    std::panic::catch_unwind(AssertUnwindSafe(|| router.route(path, handler))).map_err(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("rejected by the router");
        refused(method, path, route, reason)
    })
}

/// The start-up error of a route whose path cannot be served, for `reason`.
fn refused(method: &str, path: &str, route: &str, reason: impl std::fmt::Display) -> Error {
    Error::Startup(format!("route {route}: cannot serve HTTP {method} {path}: {reason}"))
}

#[async_trait]
impl SharedExtension for WebSite {
    /// Bind `WEB_SERVER_ADDRESS`, then serve until the service stops and let running calls
    /// finish, those whose client hung up too (at most `SHUTDOWN_TIMEOUT`).
    async fn start(self: Arc<Self>) -> Result<Serving> {
        let config = self.service.config().clone();
        let address = &config.web_server_bind_address();
        let listener = std::net::TcpListener::bind(address)
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| Error::Listen {
                what: "serve HTTP",
                address: address.clone(),
                keys: "WEB_SERVER_ADDRESS",
                source,
            })?;
        let router = {
            let mut state = self.state();
            state.address = Some(listener.local_addr()?);
            // after every route is added: the 405 fallback applies to the routes added before
            std::mem::take(&mut state.router)
                .fallback(not_found)
                .method_not_allowed_fallback(method_not_allowed)
                .layer(DefaultBodyLimit::max(config.max_message_size))
        };
        tracing::info!("HTTP server listening on http://{}", listener.local_addr()?);
        let stopping = self.service.stopping().clone();
        let limits = WebLimits::from_config(&config);
        Ok(Box::pin(serve(listener, router, limits, stopping, self.calls.clone())))
    }
}
