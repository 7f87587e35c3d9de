//! [`Response`]: a target's HTTP answer, and how a call's outcome becomes one.
//!
//! A target answers with any serializable value (200, JSON), or a [`Response`] for another
//! status, a text body or headers. Bad input is 400, any other failure 500, both with a JSON
//! body `{"error": ..., "message": ...}`, as have the answers given without a call (404, 405,
//! 413, 503).

use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::bounded;
use crate::data::Handled;
use crate::data::{Failure, FailureKind};
use crate::handler::targets::{IntoOutcome, TargetError, TargetResult};

/// The key under which a [`Response`] travels as a call's result (a call's result is plain
/// JSON so that it can come back from a worker process).
const RESPONSE_KEY: &str = "$micro_framework.http_response";

/// An HTTP response with a status, headers and a JSON, text or empty body. A 204 or 304
/// response goes out without a body or `content-type`, whatever body it was given: HTTP
/// allows none there (RFC 9110).
///
/// ```
/// use micro_framework::http::Response;
/// use serde_json::json;
///
/// fn create() -> Response {
///     Response::status(201).header("location", "/orders/7").json(json!({"id": 7}))
/// }
/// fn missing() -> Response {
///     Response::status(404).text("no such order")
/// }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Response(Parts);

/// What a [`Response`] carries. `Response` itself is not `Serialize`, so that targets
/// returning `Result<Response, E>` answer with the response, not a JSON value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Parts {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
    /// Why the body given has no JSON form: the call then fails, as that of a plain value
    /// with none does.
    #[serde(skip)]
    unserializable: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Body {
    Empty,
    Json(Value),
    Text(String),
}

impl Response {
    /// An empty response with `status` (e.g. 204).
    pub fn status(status: u16) -> Response {
        Response(Parts { status, headers: Vec::new(), body: Body::Empty, unserializable: None })
    }

    /// The body `value` as JSON. A value that cannot be serialized fails the call (a 500
    /// with kind `unserializable`, and the dependencies see a failure), as a plain value
    /// returned without a `Response` does.
    pub fn json(mut self, value: impl Serialize) -> Response {
        match serde_json::to_value(value) {
            Ok(value) => self.0.body = Body::Json(value),
            Err(error) => self.0.unserializable = Some(error.to_string()),
        }
        self
    }

    /// The body `text`, as `text/plain; charset=utf-8`.
    pub fn text(mut self, text: impl Into<String>) -> Response {
        self.0.body = Body::Text(text.into());
        self
    }

    /// Add the header `name: value` (an invalid name or value is dropped, with a warning).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        self.0.headers.push((name.into(), value.into()));
        self
    }

    /// The response carried by a call's result, if the target answered with one.
    fn from_result(value: &Value) -> Option<Response> {
        let carried = value.as_object().filter(|object| object.len() == 1)?.get(RESPONSE_KEY)?;
        serde_json::from_value(carried.clone()).ok().map(Response)
    }

    fn into_axum(self) -> axum::response::Response {
        let Response(parts) = self;
        // a target's invalid status failed its call (`into_outcome`)
        let status =
            StatusCode::from_u16(parts.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // HTTP forbids a body (and so its length) in these: the client would read the body
        // as the start of the next response, or hyper sends a length without the body
        let body = match status {
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED => Body::Empty,
            _ => parts.body,
        };
        let mut response = match body {
            Body::Empty => axum::response::Response::new(axum::body::Body::empty()),
            Body::Json(value) => json_response(&value),
            Body::Text(text) => {
                let mut response = axum::response::Response::new(axum::body::Body::from(text));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                response
            }
        };
        *response.status_mut() = status;
        // The target's first value of a header replaces the default (a content type); its
        // later values of the same header add to it (several `set-cookie`s).
        let mut named = Vec::new();
        for (name, value) in parts.headers {
            match (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) {
                (Ok(name), Ok(value)) if named.contains(&name) => {
                    response.headers_mut().append(name, value);
                }
                (Ok(name), Ok(value)) => {
                    response.headers_mut().insert(name.clone(), value);
                    named.push(name);
                }
                // its value may be a secret (a cookie, a token): only its length is logged
                _ => tracing::warn!(
                    "invalid response header {name:?} (a value of {} bytes); dropped",
                    value.len()
                ),
            }
        }
        response
    }
}

impl IntoOutcome for Response {
    const CARRIES_RESPONSE: bool = true;

    /// A response that cannot be sent fails the call before its dependencies are told
    /// (a session is rolled back, not committed for a call answered 500).
    fn into_outcome(self) -> TargetResult {
        if let Some(reason) = self.0.unserializable {
            return Err(TargetError::Unserializable(reason));
        }
        // an informational status (1xx) is no final answer: hyper sends a bare 500 instead
        if !(200..=999).contains(&self.0.status) {
            let reason = format!("HTTP status {} cannot answer (one is 200 to 999)", self.0.status);
            return Err(TargetError::Unserializable(reason));
        }
        serde_json::to_value(&self.0)
            .map(|response| json!({ RESPONSE_KEY: response }))
            .map_err(|error| TargetError::Unserializable(error.to_string()))
    }
}

/// `Result<Response, E>` targets: `Ok` is the response, `Err` a failure (500).
impl<E: Into<crate::BoxError>> IntoOutcome for Result<Response, E> {
    const CARRIES_RESPONSE: bool = true;

    fn into_outcome(self) -> TargetResult {
        match self {
            Ok(response) => response.into_outcome(),
            Err(error) => Err(TargetError::Error {
                error: error.into(),
                type_name: std::any::type_name::<E>(),
            }),
        }
    }
}

/// The HTTP response for how a route handled a request. A result is read as a
/// [`Response`] only when the target is declared to return one (`carries_response`): the
/// value of any other target, however it looks, is the body.
pub(crate) fn respond(handled: &Handled, carries_response: bool) -> axum::response::Response {
    match handled {
        Handled::Succeeded(value) => match carries_response.then(|| Response::from_result(value)) {
            Some(Some(response)) => response.into_axum(),
            _ => json_response(value),
        },
        Handled::Failed(failure)
        | Handled::CalledBack(failure)
        | Handled::Retry { failure, .. } => failure_response(failure),
    }
}

/// 400 for bad input, 500 otherwise, with the failure as JSON.
fn failure_response(failure: &Failure) -> axum::response::Response {
    let (status, error) = match failure.kind {
        FailureKind::BadInput => (StatusCode::BAD_REQUEST, "bad_input".to_owned()),
        _ if !failure.error_type.is_empty() => {
            (StatusCode::INTERNAL_SERVER_ERROR, failure.error_type.clone())
        }
        kind => (StatusCode::INTERNAL_SERVER_ERROR, kind.as_str().to_owned()),
    };
    let mut response = json_response(&failure_body(&error, &failure.full_message()));
    *response.status_mut() = status;
    response
}

/// A response the service gives without calling the target (e.g. 503 while stopping).
pub(crate) fn refusal(status: StatusCode, error: &str, message: &str) -> axum::response::Response {
    let mut response = json_response(&failure_body(error, message));
    *response.status_mut() = status;
    response
}

/// The longest request path an error response quotes, in bytes (a path is the client's).
const QUOTED_PATH: usize = 256;

/// The answer to a request for a path no route serves (the site's fallback).
pub(crate) async fn not_found(method: Method, uri: Uri) -> axum::response::Response {
    let path = bounded(uri.path(), QUOTED_PATH);
    refusal(StatusCode::NOT_FOUND, "not_found", &format!("no route serves {method} {path}"))
}

/// The answer to a request for a path served for other methods only; axum adds the `Allow`
/// header listing them.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> axum::response::Response {
    let path = bounded(uri.path(), QUOTED_PATH);
    let message =
        format!("no route serves {method} {path}: its methods are listed in the Allow header");
    refusal(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &message)
}

/// The JSON body of an error response. A failure's message is already bounded (see
/// [`Failure::full_message`]), even when it quotes a megabyte request.
fn failure_body(error: &str, message: &str) -> Value {
    json!({ "error": error, "message": message })
}

fn json_response(value: &Value) -> axum::response::Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut response = axum::response::Response::new(axum::body::Body::from(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use axum::body::HttpBody;

    use super::*;
    use crate::data::captured_logs::warnings_of;

    fn handled(response: Response) -> Handled {
        Handled::Succeeded(response.into_outcome().unwrap())
    }

    /// The response for a target declared to return a [`Response`].
    fn respond_with(response: Response) -> axum::response::Response {
        respond(&handled(response), true)
    }

    /// The response for a target that returns a plain value.
    fn respond_plain(handled: &Handled) -> axum::response::Response {
        respond(handled, false)
    }

    #[test]
    fn responses_survive_the_trip_through_json() {
        let response = Response::status(201).header("x-id", "7").json(json!({"id": 7}));
        let http = respond_with(response);
        assert_eq!(http.status(), StatusCode::CREATED);
        assert_eq!(http.headers()["x-id"], "7");
        assert_eq!(http.headers()[header::CONTENT_TYPE], "application/json");
        let text = respond_with(Response::status(404).text("gone"));
        assert_eq!(text.status(), StatusCode::NOT_FOUND);
        assert_eq!(text.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }

    #[test]
    fn plain_values_are_200_json_and_failures_400_or_500() {
        assert_eq!(respond_plain(&Handled::Succeeded(json!({"a": 1}))).status(), StatusCode::OK);
        let bad = respond_plain(&Handled::Failed(Failure::bad_input("no")));
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        let error = Failure::new(FailureKind::Error, "boom");
        assert_eq!(
            respond_plain(&Handled::Failed(error)).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn no_content_and_not_modified_responses_drop_their_body() {
        for status in [204, 304] {
            let http = respond_with(Response::status(status).json(json!({"x": 1})));
            assert!(http.headers().get(header::CONTENT_TYPE).is_none(), "{status}");
            assert_eq!(http.body().size_hint().exact(), Some(0), "{status}");
        }
    }

    #[test]
    fn a_status_that_cannot_answer_fails_the_call() {
        for status in [0, 42, 100, 101, 199, 1000, u16::MAX] {
            let refused = Response::status(status).text("t").into_outcome();
            let reason = format!("HTTP status {status} cannot answer (one is 200 to 999)");
            assert!(
                matches!(&refused, Err(TargetError::Unserializable(said)) if *said == reason),
                "{status}"
            );
        }
        for status in [200, 999] {
            assert!(Response::status(status).into_outcome().is_ok(), "{status}");
        }
    }

    #[test]
    fn a_dropped_header_is_logged_without_its_value() {
        let cookie = "session=s3ss10n-T0ken; Path=/; \u{7f}";
        let response = Response::status(200).header("set-cookie", cookie).text("t");
        let (answer, logged) = warnings_of(|| respond_with(response));
        assert!(answer.headers().get("set-cookie").is_none());
        assert!(logged.contains("set-cookie") && logged.contains("dropped"), "{logged}");
        assert!(!logged.contains("s3ss10n"), "{logged}");
    }

    #[test]
    fn objects_that_only_look_like_responses_stay_values() {
        let value = json!({ RESPONSE_KEY: "not a response" });
        assert_eq!(respond(&Handled::Succeeded(value), true).status(), StatusCode::OK);
    }

    #[test]
    fn a_plain_value_cannot_pass_for_a_response() {
        // what an echo target returns when a client sends a response's shape
        let forged = json!({ RESPONSE_KEY: {
            "status": 302,
            "headers": [["location", "https://evil.example/"], ["set-cookie", "session=x"]],
            "body": "empty",
        }});
        let http = respond_plain(&Handled::Succeeded(forged));
        assert_eq!(http.status(), StatusCode::OK);
        assert!(http.headers().get(header::LOCATION).is_none());
        assert!(http.headers().get(header::SET_COOKIE).is_none());
    }

    #[test]
    fn a_header_given_twice_is_sent_twice() {
        let response = Response::status(200)
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("content-type", "text/csv")
            .text("a,b");
        let http = respond_with(response);
        let cookies: Vec<_> = http.headers().get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        let types: Vec<_> = http.headers().get_all(header::CONTENT_TYPE).iter().collect();
        assert_eq!(types, ["text/csv"], "the target's content type replaces the default");
    }
}
