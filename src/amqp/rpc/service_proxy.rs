//! [`ServiceProxy`]: the methods of one service, for [`RpcProxy`](crate::amqp::dependencies::RpcProxy)
//! and [`Client`](crate::amqp::rpc::Client).

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::amqp::rpc::{typed, RpcBackend, RpcError, RpcReply, RpcRequest};
use crate::config::Protocol;
use crate::data::ufw_wire::LIST_TARGETS;

/// The methods of one service, reached through an
/// [`RpcProxy`](crate::amqp::dependencies::RpcProxy) or a [`Client`](crate::amqp::rpc::Client).
#[derive(Clone, Debug)]
pub struct ServiceProxy {
    backend: Arc<dyn RpcBackend>,
    service: String,
    timeout: Option<Duration>,
    protocol: Protocol,
}

impl ServiceProxy {
    pub(crate) fn new(backend: Arc<dyn RpcBackend>, service: String) -> Self {
        let protocol = backend.protocol();
        ServiceProxy { backend, service, timeout: None, protocol }
    }

    /// The service called.
    pub fn name(&self) -> &str {
        &self.service
    }

    /// Wait `timeout` for replies instead of `RPC_TIMEOUT`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Call in `protocol`'s wire format instead of the config's `PROTOCOL`, e.g. a Python
    /// micro-framework service from a service that speaks Nameko.
    ///
    /// ```
    /// use micro_framework::amqp::dependencies::RpcProxy;
    /// use micro_framework::amqp::rpc::RpcError;
    /// use micro_framework::config::Protocol;
    ///
    /// async fn total(rpc: RpcProxy) -> Result<i64, RpcError> {
    ///     let billing = rpc.service("billing").protocol(Protocol::MicroFramework);
    ///     let targets = billing.list_targets().await?;
    ///     println!("billing serves {targets:?}");
    ///     billing.call("total", (), ()).await
    /// }
    /// ```
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The targets the service serves, as its `__list_targets__` command describes them
    /// (`{"target", "args", "kwargs", "docstring"}` each). The Python micro-framework's
    /// built-in command: fails with `MethodNotFound` under the Nameko protocol.
    pub async fn list_targets(&self) -> Result<Vec<serde_json::Value>, RpcError> {
        if self.protocol == Protocol::Nameko {
            return Err(RpcError::MethodNotFound(
                "__list_targets__ is a micro-framework command: call with \
                 .protocol(Protocol::MicroFramework)"
                    .into(),
            ));
        }
        self.call(LIST_TARGETS, (), ()).await
    }

    /// Call `method(*args, **kwargs)` and deserialize the result into `T` (use
    /// `serde_json::Value` to take anything).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, RpcError> {
        let request =
            RpcRequest::new(self.protocol, &self.service, method, args, kwargs, self.timeout)?;
        typed(self.backend.call(request).await?)
    }

    /// Send the call now and await its [`RpcReply`] later. The call's timeout runs from
    /// now: a request not confirmed within it fails with [`RpcError::Timeout`].
    pub async fn call_async(
        &self,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<RpcReply, RpcError> {
        let request =
            RpcRequest::new(self.protocol, &self.service, method, args, kwargs, self.timeout)?;
        self.backend.send(request).await
    }

    /// [`ServiceProxy::call`] for sync targets (which run on worker threads). Fails with
    /// `Unavailable` outside a tokio runtime, and on a current-thread runtime outside a sync
    /// target (its one thread would wait for itself).
    pub fn call_blocking<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, RpcError> {
        crate::handler::blocking::block_on("call_blocking", self.call(method, args, kwargs))
            .map_err(RpcError::Unavailable)?
    }
}
