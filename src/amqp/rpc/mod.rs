//! RPC, wire-compatible with Nameko 2.14.
//!
//! - Serving: a route with the [`RPCListener`](crate::amqp::entrypoints::RPCListener)
//!   entrypoint is the RPC method `{route name}` of the service; its target takes the
//!   request's arguments through [`Args<T>`] and its return value is the result.
//! - Calling: [`RpcProxy`](crate::amqp::dependencies::RpcProxy) inside a target, or the
//!   standalone [`Client`] anywhere else. Errors are values ([`RpcError`]); a remote error is
//!   only described, never evaluated.
//!
//! ```
//! use micro_framework::prelude::*;
//! use micro_framework::amqp::entrypoints::RPCListener;
//! use micro_framework::amqp::rpc::{Args, Client};
//! use serde_json::json;
//!
//! #[derive(serde::Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! fn add(Args(Add { a, b }): Args<Add>) -> i64 { a + b }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = "memory://doc-rpc"; // or amqp://guest:guest@localhost:5672/
//! let routes = vec![Route::new(add).entrypoint(RPCListener::new())];
//! let config = Config::new("math").with_amqp_uri(broker.into());
//! let service = Runner::new(routes, config).spawn().await?;
//!
//! let client = Client::connect(&Config::new("caller").with_amqp_uri(broker.into())).await?;
//! let sum: i64 = client.call("math", "add", json!([1]), json!({"b": 2})).await?;
//! assert_eq!(sum, 3);
//! client.close().await;
//! service.stop().await?;
//! # Ok(()) }
//! ```

mod args;
mod binding;
mod caller;
mod client;
mod error;
#[cfg(test)]
mod fuzz;
pub mod naming;
mod pending;
mod replies;
#[cfg(test)]
mod replies_tests;
mod request;
mod respond;
mod server;
#[cfg(test)]
mod server_logs_tests;
pub(crate) mod service_proxy;
mod ufw_server;
mod unfinished;

pub use crate::data::nameko_wire::RemoteException;
pub use crate::data::ufw_wire::RemoteError;
pub use args::Args;
pub use client::Client;
pub use error::RpcError;
pub(crate) use pending::typed;
pub use pending::RpcReply;

pub(crate) use caller::Caller;
pub(crate) use replies::ReplyListener;
pub(crate) use request::{RpcBackend, RpcRequest};
pub(crate) use respond::reply_fits;
pub(crate) use server::RpcServer;
pub(crate) use ufw_server::UfwRpcServer;
