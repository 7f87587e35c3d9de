//! [`RpcProxy`]: call RPC methods of other services (Nameko's `RpcProxy`).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::amqp::rpc::service_proxy::ServiceProxy;
use crate::amqp::rpc::{Caller, ReplyListener, RpcBackend, RpcError};
use crate::handler::extract::{ExtractError, FromContext};
use crate::handler::WorkerContext;
use crate::metrics::Metrics;

/// Calls RPC methods, as a target's parameter. Requests carry the call's context headers, so
/// the callee's call-id stack continues the caller's. Replies come back on one reply queue
/// per service instance (`rpc.reply-{service}-{uuid}`), shared by every proxy and removed
/// when the service stops. Calls wait `RPC_TIMEOUT` unless told otherwise. In the
/// `process` worker modes each worker process has its own reply queue, consumed by the
/// service on its behalf.
///
/// A dependency whose `Output` is `RpcProxy` (on the route or the runner) replaces the one
/// built from the broker, e.g. `testing::FakeRpc` in tests.
///
/// ```
/// use micro_framework::amqp::dependencies::RpcProxy;
/// use micro_framework::amqp::rpc::RpcError;
/// use serde_json::json;
/// use std::time::Duration;
///
/// async fn total(rpc: RpcProxy) -> Result<i64, RpcError> {
///     let math = rpc.service("math");
///     let sum: i64 = math.call("add", json!([1, 2]), json!({})).await?;
///     let later = math.call_async("add", json!([sum]), json!({"b": 4})).await?;
///     let quick: i64 = math.timeout(Duration::from_secs(1)).call("add", (5, 6), ()).await?;
///     Ok(later.result::<i64>().await? + quick)
/// }
///
/// fn total_sync(rpc: RpcProxy) -> Result<i64, RpcError> {
///     rpc.service("math").call_blocking("add", (1, 2), ())
/// }
/// ```
#[derive(Clone, Debug)]
pub struct RpcProxy {
    backend: Arc<dyn RpcBackend>,
}

impl RpcProxy {
    /// A proxy whose calls `backend` sends.
    pub(crate) fn new(backend: Arc<dyn RpcBackend>) -> Self {
        RpcProxy { backend }
    }

    /// The methods of `service`.
    pub fn service(&self, service: impl Into<String>) -> ServiceProxy {
        ServiceProxy::new(self.backend.clone(), service.into())
    }

    /// Call `service.method(*args, **kwargs)` and deserialize the result into `T`. `args`
    /// must serialize to a JSON array (a tuple, `Vec`, `json!([...])`) and `kwargs` to an
    /// object; `()` stands for none.
    pub async fn call<T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, RpcError> {
        self.service(service).call(method, args, kwargs).await
    }
}

impl FromContext for RpcProxy {
    /// The call's dependency of type `RpcProxy` if there is one, else a proxy on the call's
    /// broker connection.
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        if let Some(provided) = ctx.dependency::<RpcProxy>() {
            return Ok(provided);
        }
        let transport = ctx.transport().clone();
        let state = ctx.service_state();
        let listener = state.get_or_insert_with(|| {
            ReplyListener::new(ctx.service_name(), ctx.config().max_message_size)
        });
        let mut caller =
            Caller::new(transport, listener, ctx.config(), ctx.call().outgoing_headers());
        if let Some(metrics) = state.get::<Metrics>() {
            caller = caller.with_metrics(Metrics::clone(&metrics));
        }
        Ok(RpcProxy::new(Arc::new(caller)))
    }
}
