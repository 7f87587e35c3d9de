//! HTTP calls through a hook: [`HttpCall`] in, [`HttpResponse`] out, answered as the service's
//! HTTP server answers, without a socket.

use axum::body::{Body, Bytes};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::pipeline::entrypoint_kind::Kind;
use crate::testing::{EntrypointHook, HookError};

/// An HTTP request for [`EntrypointHook::http`].
///
/// ```
/// use micro_framework::testing::HttpCall;
/// use serde_json::json;
///
/// let get = HttpCall::get("/orders/7?expand=lines").header("accept-language", "fr");
/// let post = HttpCall::post("/orders").json(&json!({"id": 7}));
/// let raw = HttpCall::new("PATCH", "/orders/7").header("content-type", "text/plain").body("paid");
/// ```
#[derive(Clone, Debug)]
pub struct HttpCall {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: Result<Bytes, String>,
}

impl HttpCall {
    /// A request `method uri` (path and query, e.g. `/orders?page=2`) without a body.
    pub fn new(method: &str, uri: impl Into<String>) -> Self {
        HttpCall {
            method: method.to_ascii_uppercase(),
            uri: uri.into(),
            headers: Vec::new(),
            body: Ok(Bytes::new()),
        }
    }

    /// `GET uri`.
    pub fn get(uri: impl Into<String>) -> Self {
        HttpCall::new("GET", uri)
    }

    /// `POST uri`.
    pub fn post(uri: impl Into<String>) -> Self {
        HttpCall::new("POST", uri)
    }

    /// `PUT uri`.
    pub fn put(uri: impl Into<String>) -> Self {
        HttpCall::new("PUT", uri)
    }

    /// `DELETE uri`.
    pub fn delete(uri: impl Into<String>) -> Self {
        HttpCall::new("DELETE", uri)
    }

    /// Add the header `name: value`.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The body `value` as JSON, with `content-type: application/json`. A value that cannot
    /// be serialized fails the call ([`HookError::Request`]).
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Self {
        let body = serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|error| format!("body cannot be serialized: {error}"));
        HttpCall { body, ..self.header("content-type", "application/json") }
    }

    /// The raw body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Ok(body.into());
        self
    }

    /// The request as the HTTP server reads it.
    fn into_request(self) -> Result<axum::http::Request<Body>, String> {
        let mut request =
            axum::http::Request::builder().method(self.method.as_str()).uri(&self.uri);
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request
            .body(Body::from(self.body?))
            .map_err(|error| format!("invalid request {} {}: {error}", self.method, self.uri))
    }
}

/// The answer to an [`HttpCall`]: what the service's HTTP server would have sent.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpResponse {
    /// The status, e.g. 200.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl HttpResponse {
    /// The first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body, read as JSON into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    async fn read(response: axum::response::Response) -> Result<Self, String> {
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .map_err(|error| format!("cannot read the response body: {error}"))?;
        Ok(HttpResponse { status, headers, body })
    }
}

impl EntrypointHook {
    /// Call an [`HttpEntrypoint`](crate::http::HttpEntrypoint)'s route with `request`, as
    /// the service's HTTP server would: the same path parameters, query, headers and body
    /// limit, and the same response (a failure is a 400 or 500 response, not an error). A
    /// request for another path or method is [`HookError::Request`].
    ///
    /// ```
    /// use micro_framework::prelude::*;
    /// use micro_framework::http::{HttpEntrypoint, Path};
    /// use micro_framework::testing::{test_config, HttpCall, TestService};
    ///
    /// fn order(Path(id): Path<u64>) -> serde_json::Value { serde_json::json!({"id": id}) }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let config = test_config("orders");
    /// let routes = vec![Route::new(order).entrypoint(HttpEntrypoint::get("/orders/{id}"))];
    /// let service = TestService::start(routes, config).await.unwrap();
    /// let hook = service.hook("order").unwrap();
    /// let response = hook.http(HttpCall::get("/orders/7")).await.unwrap();
    /// assert_eq!(response.status, 200);
    /// assert_eq!(response.json::<serde_json::Value>().unwrap()["id"], 7);
    /// assert_eq!(hook.http(HttpCall::get("/orders/x")).await.unwrap().status, 400);
    /// service.stop().await.unwrap();
    /// # });
    /// ```
    pub async fn http(&self, request: HttpCall) -> Result<HttpResponse, HookError> {
        let route = self.route.name().to_owned();
        let Some(Kind::Http { method, path }) = self.kind() else {
            return Err(self.wrong_entrypoint("an HttpEntrypoint"));
        };
        let asked = format!("{} {}", request.method, request.uri);
        let request =
            request.into_request().map_err(|reason| HookError::request(&route, reason))?;
        let answered = crate::http::answer_directly(self.route.clone(), method, path, request)
            .await
            .map_err(|error| HookError::request(&route, error.to_string()))?;
        let Some(response) = answered else {
            let reason = format!("{asked} is not for the route's {method} {path}");
            return Err(HookError::request(&route, reason));
        };
        HttpResponse::read(response).await.map_err(|reason| HookError::request(&route, reason))
    }
}
