//! [`HttpEntrypoint`]: serve a route on an HTTP method and path.

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, RawPathParamsRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, RawPathParams};
use axum::http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Extension, Router};
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::body_budget::BodyBudget;
use super::media_type;
use super::request::{HttpRequest, EXTENSION};
use super::response::{refusal, respond};
use super::site::{add_route, WebSite};
use crate::data::Message;
use crate::error::{Error, Result};
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;

/// Serves the route on `method path` of the service's HTTP server (`WEB_SERVER_ADDRESS`).
///
/// Paths use axum's syntax: `/users/{id}` for a parameter, `/files/{*rest}` for the rest of
/// the path. Targets take [`Path<T>`](super::Path), [`Query<T>`](super::Query), the JSON
/// body as [`Payload<T>`](crate::Payload), [`HttpRequest`] (method, headers, ...) and any
/// dependency. A call waits for a free worker like any other (the pool bounds how many run
/// at once); while the service stops, new requests get 503. Bodies over `MAX_MESSAGE_SIZE`
/// get 413, before they are read when their `content-length` says so; with
/// `HTTP_REQUIRE_JSON_CONTENT_TYPE`, a body not declared JSON gets 415 before it is read.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::http::{HttpEntrypoint, Path};
/// use serde_json::{json, Value};
///
/// fn hello(Path(name): Path<String>) -> Value {
///     json!({ "hello": name })
/// }
///
/// let route = Route::new(hello).entrypoint(HttpEntrypoint::get("/hello/{name}"));
/// ```
#[derive(Debug)]
pub struct HttpEntrypoint {
    method: String,
    path: String,
}

impl HttpEntrypoint {
    /// Serve `method` (e.g. `"GET"`, case-insensitive) on `path`.
    pub fn new(method: &str, path: impl Into<String>) -> Self {
        HttpEntrypoint { method: method.to_ascii_uppercase(), path: path.into() }
    }

    /// `GET path`.
    pub fn get(path: impl Into<String>) -> Self {
        HttpEntrypoint::new("GET", path)
    }

    /// `POST path`.
    pub fn post(path: impl Into<String>) -> Self {
        HttpEntrypoint::new("POST", path)
    }

    /// `PUT path`.
    pub fn put(path: impl Into<String>) -> Self {
        HttpEntrypoint::new("PUT", path)
    }

    /// `DELETE path`.
    pub fn delete(path: impl Into<String>) -> Self {
        HttpEntrypoint::new("DELETE", path)
    }

    fn method_filter(&self) -> Result<MethodFilter> {
        Method::from_bytes(self.method.as_bytes())
            .ok()
            .and_then(|method| MethodFilter::try_from(method).ok())
            .ok_or_else(|| {
                Error::Startup(format!(
                    "{}: unsupported HTTP method (expected GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS or TRACE)",
                    self.describe()
                ))
            })
    }
}

#[async_trait]
impl Entrypoint for HttpEntrypoint {
    fn describe(&self) -> String {
        format!("HttpEntrypoint({} {})", self.method, self.path)
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        let filter = self.checked()?;
        let site = route.shared_extension(|| WebSite::new(route.clone()));
        let served = handler(route.clone(), filter, site.calls());
        site.add(&self.method, &self.path, route.name(), served)?;
        tracing::info!(route = route.name(), "serving HTTP {} {}", self.method, self.path);
        Ok(())
    }

    /// The service's HTTP site (a shared extension) serves every HTTP route.
    async fn run(self: Box<Self>, _route: RouteHandle) -> Result<()> {
        Ok(())
    }

    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::Http { method: self.method.clone(), path: self.path.clone() })
    }
}

impl HttpEntrypoint {
    /// The methods served, once the method and the path are checked.
    fn checked(&self) -> Result<MethodFilter> {
        let filter = self.method_filter()?;
        if !self.path.starts_with('/') {
            return Err(Error::Startup(format!(
                "{}: the path must start with '/'",
                self.describe()
            )));
        }
        Ok(filter)
    }
}

/// What serves `route` for the methods of `filter` on the site, its calls run in `calls`.
fn handler(route: RouteHandle, filter: MethodFilter, calls: TaskTracker) -> MethodRouter {
    let budget = BodyBudget::of(&route);
    on(
        filter,
        move |method: Method,
              uri: Uri,
              headers: HeaderMap,
              params: Result<RawPathParams, RawPathParamsRejection>,
              whole: Request<Body>| {
            let route = route.clone();
            let calls = calls.clone();
            let budget = budget.clone();
            async move {
                // axum's own answers to these are plain text; every other error is JSON
                let params = match params {
                    Ok(params) => params,
                    Err(rejection) => {
                        route.refused("bad_input");
                        return params_refusal(&rejection);
                    }
                };
                // A body announced over the limit is refused before any of it is read: its
                // client is not told to send it (`100 Continue`), nor does it hold room in
                // the budget while it comes.
                let Ok(body_room) = budget.room_for(&headers) else {
                    return too_large(&route);
                };
                // A body not declared JSON, which a page of any site can send without a
                // preflight, is refused as early when JSON is required; a request without a
                // body (needing no room) is not concerned.
                let carries_body = body_room > 0;
                if carries_body
                    && route.config().http_require_json_content_type
                    && !media_type::declares_json(&headers)
                {
                    return unsupported_media_type(&route, &headers);
                }
                // Room for the body before it is read, held until the answer: the bodies
                // read, waiting for a worker or in a call stay within the route's budget,
                // not HTTP_MAX_CONNECTIONS of MAX_MESSAGE_SIZE (40 of 8 MiB waiting for one
                // worker held 335 MB). The worker is waited for after the body is read, so a
                // client that leaves meanwhile is seen, and its request never runs; a slow
                // upload holds room, not a worker that other routes and consumers need.
                let room = tokio::select! {
                    biased;
                    room = budget.reserve(body_room) => room,
                    () = route.closed_to_new_calls() => return stopping(&route),
                };
                // A body still arriving when the service stops would be read to its end (as
                // slowly as its client sends it, holding the stop up) only to be refused
                // then: it is refused at once.
                let body = tokio::select! {
                    biased;
                    body = Bytes::from_request(whole, &()) => body,
                    () = route.closed_to_new_calls() => return stopping(&route),
                };
                let body = match body {
                    Ok(body) => body,
                    Err(rejection) => return body_refusal(&rejection, &route),
                };
                let request = request(&method, &uri, &headers, &params);
                let answer = call(route, calls, request, body).await;
                drop(room);
                answer
            }
        },
    )
}

/// The answer to a request for `route` no call will run for: the service is stopping.
fn stopping(route: &RouteHandle) -> axum::response::Response {
    route.refused("stopping");
    refusal(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the service is stopping")
}

/// The answer to path parameters that cannot be read (not UTF-8 once percent-decoded).
fn params_refusal(rejection: &RawPathParamsRejection) -> axum::response::Response {
    let message = format!("path parameters do not fit: {}", rejection.body_text());
    refusal(rejection.status(), "bad_input", &message)
}

/// The answer to a body that cannot be read: over `MAX_MESSAGE_SIZE` (413), or cut short.
fn body_refusal(rejection: &BytesRejection, route: &RouteHandle) -> axum::response::Response {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(route),
        status => {
            route.refused("bad_input");
            refusal(status, "bad_input", &rejection.body_text())
        }
    }
}

/// The answer to a body over `MAX_MESSAGE_SIZE`, announced or read.
fn too_large(route: &RouteHandle) -> axum::response::Response {
    route.refused("too_large");
    let limit = route.config().max_message_size;
    let message = format!("the request body is over MAX_MESSAGE_SIZE ({limit} bytes)");
    refusal(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &message)
}

/// The answer to a body not declared JSON under `HTTP_REQUIRE_JSON_CONTENT_TYPE`.
fn unsupported_media_type(route: &RouteHandle, headers: &HeaderMap) -> axum::response::Response {
    route.refused("unsupported_media_type");
    let message = format!(
        "the request body must be declared JSON (content-type: application/json), not {} \
         (HTTP_REQUIRE_JSON_CONTENT_TYPE)",
        media_type::declared(headers)
    );
    refusal(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", &message)
}

/// Marks the answer to a request that is not for the route (another path or method).
#[derive(Clone, Copy, Debug)]
struct NotForRoute;

/// Answer `request` as the service's HTTP site answers it when `route` is served on `method
/// path`, without a socket (for test hooks): the same body limit, request and response.
/// `None` when the request is for another path or method.
pub(crate) async fn answer_directly(
    route: RouteHandle,
    method: &str,
    path: &str,
    request: Request<Body>,
) -> Result<Option<axum::response::Response>> {
    let entrypoint = HttpEntrypoint::new(method, path);
    let filter = entrypoint.checked()?;
    let not_for_route = || async { (StatusCode::NOT_FOUND, Extension(NotForRoute)) };
    let limit = DefaultBodyLimit::max(route.config().max_message_size);
    let name = route.name().to_owned();
    // the caller awaits the answer: no stop waits for these calls
    let served = handler(route, filter, TaskTracker::new()).fallback(not_for_route);
    let mut router = add_route(Router::new(), &entrypoint.method, path, &name, served)?
        .fallback(not_for_route)
        .layer(limit);
    std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut router, cx))
        .await
        .unwrap_or_else(|never| match never {});
    let response = router.call(request).await.unwrap_or_else(|never| match never {});
    Ok(response.extensions().get::<NotForRoute>().is_none().then_some(response))
}

/// The plain-data form of a request, for the worker.
fn request(method: &Method, uri: &Uri, headers: &HeaderMap, params: &RawPathParams) -> HttpRequest {
    HttpRequest {
        method: method.as_str().to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        params: params.iter().map(|(key, value)| (key.to_owned(), value.to_owned())).collect(),
        headers: headers
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect(),
    }
}

/// Handle one request on `route`: wait for a worker, call (in a task of `calls`), answer.
async fn call(
    route: RouteHandle,
    calls: TaskTracker,
    request: HttpRequest,
    body: Bytes,
) -> axum::response::Response {
    let Some(permit) = route.acquire().await else {
        return stopping(&route);
    };
    let mut message = Message { body, ..Message::default() };
    message.properties.content_type =
        request.header(header::CONTENT_TYPE.as_str()).map(str::to_owned);
    if let Err(error) = message.extensions.insert(EXTENSION, &request) {
        return refusal(StatusCode::INTERNAL_SERVER_ERROR, "request", &error.to_string());
    }
    // The call runs in a task of its own, to its end, as a WebSocket call does: hyper drops
    // this future when the client hangs up, which would cancel an async target midway, and
    // free the slot of a sync one still running in its thread (more calls would then run
    // than `MAX_WORKERS`, as many as clients that hang up). The site's stop waits for it.
    let call = calls.spawn(async move {
        let handled = route.handle(permit, message).await;
        route.settled(&handled);
        respond(&handled, route.target_carries_response())
    });
    call.await.unwrap_or_else(|error| {
        refusal(StatusCode::INTERNAL_SERVER_ERROR, "crashed", &format!("the call's task: {error}"))
    })
}
