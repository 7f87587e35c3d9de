//! HTTP entrypoints on axum: [`HttpEntrypoint`] serves a route on a method and path of the
//! service's HTTP server (`WEB_SERVER_ADDRESS`, Nameko's key, default `0.0.0.0:8000`).
//!
//! Targets take [`Path<T>`], [`Query<T>`], the JSON body as [`Payload<T>`](crate::Payload),
//! the whole [`HttpRequest`], and dependencies, like any target; they share the service's
//! worker pool. They answer with a serializable value (200, JSON) or a [`Response`]; bad
//! input is 400 and a failure 500, both with a JSON body `{"error": ..., "message": ...}`.
//!
//! ```no_run
//! use micro_framework::prelude::*;
//! use micro_framework::http::{HttpEntrypoint, Path};
//! use serde_json::{json, Value};
//!
//! #[derive(serde::Deserialize)]
//! struct Sum { a: i64, b: i64 }
//!
//! fn hello(Path(name): Path<String>) -> Value { json!({ "hello": name }) }
//! fn sum(Payload(Sum { a, b }): Payload<Sum>) -> Value { json!({ "sum": a + b }) }
//!
//! fn main() -> micro_framework::Result<()> {
//!     let routes = vec![
//!         Route::new(hello).entrypoint(HttpEntrypoint::get("/hello/{name}")),
//!         Route::new(sum).entrypoint(HttpEntrypoint::post("/sum")),
//!     ];
//!     Runner::new(routes, Config::from_env()?).start()
//! }
//! ```

mod body_budget;
mod entrypoint;
mod media_type;
mod request;
mod response;
mod site;

pub use entrypoint::HttpEntrypoint;
pub use request::{HttpRequest, Path, Query};
pub use response::Response;

pub(crate) use entrypoint::answer_directly;
pub(crate) use site::WebSite;
