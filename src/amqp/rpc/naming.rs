//! Names and flags of the RPC exchange and queues, as Nameko declares them.

use crate::amqp::naming::work_queue;
use crate::config::Config;
use crate::transport::{BindingSpec, ExchangeSpec, HeaderValue, Headers, QueueSpec};

/// How long an unused reply queue lives (`x-expires`, milliseconds), as Nameko declares it.
pub const REPLY_QUEUE_EXPIRES_MS: i64 = 300_000;

/// The service name of standalone callers (Nameko's `ClusterRpcProxy`).
pub const STANDALONE_SERVICE: &str = "standalone_rpc_proxy";

/// The RPC exchange `RPC_EXCHANGE` (`nameko-rpc`): topic, durable.
pub fn rpc_exchange(config: &Config) -> ExchangeSpec {
    ExchangeSpec::topic(config.rpc_exchange.clone())
}

/// The request queue `rpc-{service}` of the service: durable, no arguments (classic queues).
pub fn rpc_queue(config: &Config) -> QueueSpec {
    work_queue(config, format!("rpc-{}", config.service_name))
}

/// The binding of the request queue: routing key `{service}.*`.
pub fn rpc_binding(config: &Config) -> BindingSpec {
    BindingSpec {
        queue: rpc_queue(config).name,
        exchange: config.rpc_exchange.clone(),
        routing_key: format!("{}.*", config.service_name),
        arguments: Headers::new(),
    }
}

/// The reply queue `rpc.reply-{service}-{id}` of a caller, with `x-expires: 300000`: durable
/// and not exclusive, as Nameko declares it, so replies sent while the caller's connection is
/// down wait for it to come back. The caller consumes it with an exclusive consumer (no other
/// connection can read it) and deletes it when it stops; `x-expires` removes it otherwise.
pub fn reply_queue(service: &str, id: &str) -> QueueSpec {
    let mut arguments = Headers::new();
    arguments.insert("x-expires".into(), HeaderValue::Int(REPLY_QUEUE_EXPIRES_MS));
    QueueSpec {
        name: format!("rpc.reply-{service}-{id}"),
        durable: true,
        exclusive: false,
        auto_delete: false,
        arguments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameko_names() {
        let config = Config::new("math");
        assert_eq!(rpc_exchange(&config).name, "nameko-rpc");
        let queue = rpc_queue(&config);
        assert_eq!(queue.name, "rpc-math");
        assert!(queue.durable && queue.arguments.is_empty());
        assert_eq!(rpc_binding(&config).routing_key, "math.*");
        let reply = reply_queue(STANDALONE_SERVICE, "abc");
        assert_eq!(reply.name, "rpc.reply-standalone_rpc_proxy-abc");
        assert!(reply.durable && !reply.exclusive && !reply.auto_delete, "as Nameko's");
        assert_eq!(reply.arguments.get("x-expires"), Some(&HeaderValue::Int(300_000)));
    }
}
