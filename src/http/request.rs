//! [`HttpRequest`] and the extractors [`Path`] and [`Query`]: what a target sees of an HTTP
//! request. The JSON body is read with [`Payload<T>`](crate::Payload) as for any message.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::handler::extract::{ExtractError, FromContext};
use crate::handler::WorkerContext;

/// The name under which the HTTP entrypoint attaches the request to its message.
pub(crate) const EXTENSION: &str = "http";

/// The HTTP request behind a call, carried by its [`Message`](crate::Message) (plain data, so
/// the call can run in a worker process).
///
/// ```
/// use micro_framework::http::HttpRequest;
/// fn agent(request: HttpRequest) -> String {
///     request.header("user-agent").unwrap_or("unknown").to_owned()
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path, e.g. `/hello/ada`.
    pub path: String,
    /// The raw query string, without `?` (empty when there is none).
    pub query: String,
    /// The path parameters, percent-decoded, in the order of the route's path.
    pub params: Vec<(String, String)>,
    /// The headers, names in lower case (values that are not UTF-8 are decoded lossily).
    pub headers: Vec<(String, String)>,
}

impl HttpRequest {
    /// The first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The path parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    fn of(ctx: &WorkerContext, extractor: &str) -> Result<HttpRequest, ExtractError> {
        let unavailable = || {
            ExtractError::Unavailable(format!(
                "{extractor} needs an HTTP request: the route's entrypoint is not an HttpEntrypoint"
            ))
        };
        match ctx.message().extensions.get::<HttpRequest>(EXTENSION) {
            Ok(Some(request)) => Ok(request),
            Ok(None) => Err(unavailable()),
            Err(error) => Err(ExtractError::BadInput(format!("malformed HTTP request: {error}"))),
        }
    }
}

impl FromContext for HttpRequest {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        HttpRequest::of(ctx, "HttpRequest")
    }
}

/// The path parameters, deserialized into `T`: a struct (or map) with a field per parameter,
/// or a single value when the path has one parameter. A value that does not fit is bad input
/// (400).
///
/// ```
/// use micro_framework::http::Path;
///
/// // route path "/users/{id}"
/// fn user(Path(id): Path<u64>) -> u64 { id }
///
/// // route path "/users/{id}/posts/{slug}"
/// #[derive(serde::Deserialize)]
/// struct PostPath { id: u64, slug: String }
/// fn post(Path(PostPath { id, slug }): Path<PostPath>) -> String { format!("{id}/{slug}") }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromContext for Path<T> {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        let request = HttpRequest::of(ctx, "Path")?;
        from_params(&request.params).map(Path).map_err(|error| {
            ExtractError::BadInput(format!(
                "path parameters do not fit {}: {error}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// The query string, deserialized into `T` (a struct or a map; use `Option` fields for
/// optional parameters). A query that does not fit is bad input (400).
///
/// ```
/// use micro_framework::http::Query;
///
/// #[derive(serde::Deserialize)]
/// struct Page { page: Option<u32> }
/// fn list(Query(Page { page }): Query<Page>) -> u32 { page.unwrap_or(1) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromContext for Query<T> {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        let request = HttpRequest::of(ctx, "Query")?;
        serde_urlencoded::from_str(&request.query).map(Query).map_err(|error| {
            ExtractError::BadInput(format!(
                "query string does not fit {}: {error}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// Deserialize path parameters as a struct or map, else (one parameter) as its value alone.
fn from_params<T: DeserializeOwned>(params: &[(String, String)]) -> Result<T, String> {
    let encoded = serde_urlencoded::to_string(params).map_err(|error| error.to_string())?;
    let as_struct = serde_urlencoded::from_str::<T>(&encoded);
    match (as_struct, params) {
        (Ok(value), _) => Ok(value),
        (Err(_), [(_, value)]) => {
            #[derive(Deserialize)]
            struct Single<T> {
                value: T,
            }
            let encoded = serde_urlencoded::to_string([("value", value)])
                .map_err(|error| error.to_string())?;
            serde_urlencoded::from_str::<Single<T>>(&encoded)
                .map(|single| single.value)
                .map_err(|error| error.to_string())
        }
        (Err(error), _) => Err(format!(
            "{error} (with several path parameters, take a struct with a field per parameter)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Two {
        id: u64,
        slug: String,
    }

    #[test]
    fn single_values_structs_and_maps() {
        assert_eq!(from_params::<u64>(&params(&[("id", "42")])), Ok(42));
        assert_eq!(from_params::<String>(&params(&[("name", "a b/é")])), Ok("a b/é".to_string()));
        let two = params(&[("id", "7"), ("slug", "x")]);
        assert_eq!(from_params::<Two>(&two), Ok(Two { id: 7, slug: "x".into() }));
        let map: BTreeMap<String, String> = from_params(&two).unwrap();
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn values_that_do_not_fit_are_errors() {
        assert!(from_params::<u64>(&params(&[("id", "x")])).is_err());
        let error = from_params::<(u64, u64)>(&params(&[("a", "1"), ("b", "2")])).unwrap_err();
        assert!(error.contains("take a struct"), "{error}");
        assert!(from_params::<Two>(&params(&[("id", "-1"), ("slug", "x")])).is_err());
    }

    #[test]
    fn headers_are_case_insensitive() {
        let request = HttpRequest {
            headers: vec![("content-type".into(), "text/plain".into())],
            params: params(&[("id", "1")]),
            ..HttpRequest::default()
        };
        assert_eq!(request.header("Content-Type"), Some("text/plain"));
        assert_eq!(request.param("id"), Some("1"));
        assert_eq!(request.param("other"), None);
    }
}
