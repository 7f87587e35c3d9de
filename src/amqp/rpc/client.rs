//! [`Client`]: a standalone RPC caller (Nameko's `ClusterRpcProxy`).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::amqp::rpc::caller::{Caller, CloseOnDrop};
use crate::amqp::rpc::error::RpcError;
use crate::amqp::rpc::naming::STANDALONE_SERVICE;
use crate::amqp::rpc::replies::ReplyListener;
use crate::amqp::rpc::service_proxy::ServiceProxy;
use crate::config::{Config, ConfigError};
use crate::data::CallContext;
use crate::error::Result;
use crate::transport::{Headers, SharedTransport};

/// Calls RPC methods from outside any service, on its own connection, as service
/// `standalone_rpc_proxy` (reply queue `rpc.reply-standalone_rpc_proxy-{uuid}`). Uses the
/// config's broker, `RPC_EXCHANGE` and `RPC_TIMEOUT`. Like Nameko's `ClusterRpcProxy`, its
/// requests carry a call-id stack (`nameko.call_id_stack`) holding one id of the client's own,
/// `standalone_rpc_proxy.call.{uuid}`, and the context data given with
/// [`Client::context_data`].
///
/// ```no_run
/// use micro_framework::amqp::rpc::Client;
/// use micro_framework::Config;
/// use serde_json::{json, Value};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // AMQP_URI, RPC_EXCHANGE, RPC_TIMEOUT, ... from the environment; no SERVICE_NAME needed
/// let client = Client::from_env().await?;
/// // or from a config of your own:
/// let other = Client::connect(&Config::new("unused").with_amqp_uri("amqp://mq/".into())).await?;
/// let echoed: Value = client.call("bench_rpc", "echo", json!([{"a": 1}]), ()).await?;
/// let sum: i64 = client.service("bench_rpc").call("add", (), json!({"a": 1, "b": 2})).await?;
/// client.close().await;
/// other.close().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Client {
    caller: Arc<Caller>,
    /// `PARENT_CALLS_TRACKED`: how many parents the call-id stack of context data keeps.
    parent_calls_tracked: usize,
}

impl Client {
    /// Connect to `config.amqp_uri`. The reply queue is declared on the first call. A
    /// config the runner would refuse (an empty `RPC_EXCHANGE`, a zero `RPC_TIMEOUT`) is
    /// refused here too, before the broker is touched.
    pub async fn connect(config: &Config) -> Result<Client> {
        let config = config.clone().with_service_name(STANDALONE_SERVICE.to_owned());
        config.validate()?;
        let transport = crate::transport::connect(&config).await?;
        let listener = Arc::new(ReplyListener::new(STANDALONE_SERVICE, config.max_message_size));
        let headers = call_headers(&Headers::new(), config.parent_calls_tracked);
        let _closer = Some(Arc::new(CloseOnDrop::new(transport.clone(), listener.clone())));
        let caller =
            Arc::new(Caller { _closer, ..Caller::new(transport, listener, &config, headers) });
        Ok(Client { caller, parent_calls_tracked: config.parent_calls_tracked })
    }

    /// Connect with the configuration of the environment, as [`Config::from_env`] reads it,
    /// but for `SERVICE_NAME`, which a client does not need: it calls as
    /// `standalone_rpc_proxy`, as Nameko's `ClusterRpcProxy` does.
    pub async fn from_env() -> Result<Client> {
        Client::connect(&client_config(crate::config::process_env()?)?).await
    }

    /// Send `data` with every request as context, as Nameko's
    /// `ClusterRpcProxy(config, context_data=data)` does: each key `k` (`auth_token`,
    /// `language`, `user_id`, ...) as header `nameko.k`, which Python services read as their
    /// context data. The call-id stack then starts with the `call_id_stack` of `data` (the
    /// caller's parents, if any), before the client's own id.
    ///
    /// ```no_run
    /// use micro_framework::amqp::rpc::Client;
    /// use micro_framework::{Config, HeaderValue, Headers};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let data = Headers::from([
    ///     ("auth_token".to_owned(), HeaderValue::from("t0k3n")),
    ///     ("language".to_owned(), HeaderValue::from("fr")),
    /// ]);
    /// let client = Client::connect(&Config::from_env()?).await?.context_data(data);
    /// let greeting: String = client.call("greeter", "hello", ["Ada"], ()).await?;
    /// # Ok(()) }
    /// ```
    pub fn context_data(self, data: Headers) -> Client {
        let headers = call_headers(&data, self.parent_calls_tracked);
        let caller = Caller { headers, ..Caller::clone(&self.caller) };
        Client { caller: Arc::new(caller), ..self }
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

    /// Delete the reply queues and close the connection. Calls still running fail, and set
    /// up no new reply queue.
    ///
    /// A client dropped without `close` does the same in the background, on the runtime it
    /// connected on, once the [`ServiceProxy`]s taken from it (and the clients
    /// [`context_data`](Client::context_data) made of it) are dropped too; dropped with that
    /// runtime, it leaves its reply queue to `x-expires` (5 minutes).
    pub async fn close(self) {
        self.caller.listener.close(&self.caller.transport).await;
        self.caller.transport.close().await;
    }
}

/// A client's configuration from `vars`, which need no `SERVICE_NAME`: a client calls as
/// [`STANDALONE_SERVICE`] whatever the environment's is (blank, or no valid service name,
/// in a shell that set it for something else).
fn client_config(mut vars: Vec<(String, String)>) -> Result<Config, ConfigError> {
    vars.retain(|(name, _)| name != "SERVICE_NAME");
    vars.push(("SERVICE_NAME".into(), STANDALONE_SERVICE.into()));
    Config::from_vars(vars)
}

/// The headers a standalone call sends: `data` as context, and a call-id stack ending with
/// one id of this client's own, the same for all its calls (a Nameko proxy's worker context
/// lives as long as the proxy).
fn call_headers(data: &Headers, parent_calls_tracked: usize) -> Headers {
    CallContext::for_call(data, STANDALONE_SERVICE, "call", parent_calls_tracked).outgoing_headers()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
    }

    #[tokio::test]
    async fn a_config_the_runner_refuses_is_refused_before_connecting() {
        let config = Config::new("unused").with_amqp_uri("memory://".into());
        let error = Client::connect(&config.with_rpc_exchange(String::new())).await.unwrap_err();
        assert!(
            matches!(&error, crate::Error::Config(refused) if refused.key == "RPC_EXCHANGE"),
            "{error}"
        );
    }

    #[test]
    fn a_clients_environment_needs_no_service_name() {
        let config = client_config(vars(&[("RPC_TIMEOUT", "7")])).expect("no SERVICE_NAME needed");
        assert_eq!(config.rpc_timeout, std::time::Duration::from_secs(7));
        assert_eq!(config.service_name, STANDALONE_SERVICE);
        for name in ["orders", "", "  ", "my svc"] {
            // the environment's name, valid or not, is not the client's
            let named = client_config(vars(&[("SERVICE_NAME", name)])).expect("not read");
            assert_eq!(named.service_name, STANDALONE_SERVICE, "{name:?}");
        }
        let broken = client_config(vars(&[("RPC_TIMEOUT", "soon")])).unwrap_err();
        assert_eq!(broken.key, "RPC_TIMEOUT");
    }
}
