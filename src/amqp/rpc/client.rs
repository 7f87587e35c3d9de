//! [`Client`]: a standalone RPC caller (Nameko's `ClusterRpcProxy`).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::amqp::dependencies::ServiceProxy;
use crate::amqp::rpc::caller::Caller;
use crate::amqp::rpc::error::RpcError;
use crate::amqp::rpc::naming::STANDALONE_SERVICE;
use crate::amqp::rpc::replies::ReplyListener;
use crate::config::Config;
use crate::error::Result;
use crate::transport::{Headers, SharedTransport};

/// Calls RPC methods from outside any service, on its own connection, as service
/// `standalone_rpc_proxy` (reply queue `rpc.reply-standalone_rpc_proxy-{uuid}`). Uses the
/// config's broker, `RPC_EXCHANGE` and `RPC_TIMEOUT`; requests carry no context headers.
///
/// ```no_run
/// use micro_framework::amqp::rpc::Client;
/// use micro_framework::Config;
/// use serde_json::{json, Value};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::connect(&Config::from_env()?).await?;
/// let echoed: Value = client.call("bench_rpc", "echo", json!([{"a": 1}]), ()).await?;
/// let sum: i64 = client.service("bench_rpc").call("add", (), json!({"a": 1, "b": 2})).await?;
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Client {
    caller: Arc<Caller>,
}

impl Client {
    /// Connect to `config.amqp_uri`. The reply queue is declared on the first call.
    pub async fn connect(config: &Config) -> Result<Client> {
        let config = config.clone().with_service_name(STANDALONE_SERVICE.to_owned());
        let transport = crate::transport::connect(&config).await?;
        let listener = Arc::new(ReplyListener::new(STANDALONE_SERVICE));
        Ok(Client { caller: Arc::new(Caller::new(transport, listener, &config, Headers::new())) })
    }

    /// The methods of `service`.
    pub fn service(&self, service: impl Into<String>) -> ServiceProxy {
        ServiceProxy::new(self.caller.clone(), service.into())
    }

    /// Call `service.method(*args, **kwargs)` and deserialize the result into `T`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> std::result::Result<T, RpcError> {
        self.service(service).call(method, args, kwargs).await
    }

    /// The client's connection.
    pub fn transport(&self) -> &SharedTransport {
        &self.caller.transport
    }

    /// Delete the reply queue and close the connection.
    pub async fn close(self) {
        self.caller.listener.delete_queues(&self.caller.transport).await;
        self.caller.transport.close().await;
    }
}
