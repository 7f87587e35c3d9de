//! [`RpcRequest`]: one call, its arguments already JSON, and the [`RpcBackend`] that sends
//! it (the broker, or a fake that answers stubs).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::amqp::rpc::error::RpcError;
use crate::amqp::rpc::pending::RpcReply;
use crate::config::Protocol;
use crate::data::{nameko_wire, ufw_wire};
use crate::transport::limits::check_size;

/// A call of `service.method(*args, **kwargs)` in `protocol`'s wire format.
#[derive(Clone, Debug)]
pub(crate) struct RpcRequest {
    pub protocol: Protocol,
    pub service: String,
    pub method: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// The caller's own timeout, when it set one.
    pub timeout: Option<Duration>,
}

impl RpcRequest {
    /// A request whose `args` serialize to an array and `kwargs` to an object (`()` and
    /// `null` stand for none); anything else is `InvalidArguments`.
    pub(crate) fn new(
        protocol: Protocol,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
        timeout: Option<Duration>,
    ) -> Result<Self, RpcError> {
        let (args, kwargs) =
            nameko_wire::call_arguments(args, kwargs).map_err(RpcError::InvalidArguments)?;
        Ok(RpcRequest {
            protocol,
            service: service.to_owned(),
            method: method.to_owned(),
            args,
            kwargs,
            timeout,
        })
    }

    /// The body in the request's wire format, refused when larger than `max_size`.
    pub(crate) fn into_body(self, max_size: usize) -> Result<Bytes, RpcError> {
        let RpcRequest { protocol, service, method, args, kwargs, .. } = self;
        let body = match protocol {
            Protocol::Nameko => nameko_wire::request_body(args, kwargs),
            Protocol::MicroFramework => ufw_wire::request_body(&method, args, kwargs),
        };
        check_size(format_args!("RPC request {service}.{method}"), body.len(), max_size)?;
        Ok(body)
    }
}

/// Sends requests and hands back their replies.
#[async_trait]
pub(crate) trait RpcBackend: Send + Sync + fmt::Debug {
    /// The wire protocol calls use unless told otherwise.
    fn protocol(&self) -> Protocol;

    /// Send `request`; its reply is awaited through the result.
    async fn send(&self, request: RpcRequest) -> Result<RpcReply, RpcError>;

    /// Send `request` and wait for its reply.
    async fn call(&self, request: RpcRequest) -> Result<Value, RpcError> {
        self.send(request).await?.value().await
    }
}
