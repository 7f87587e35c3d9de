//! Names and flags of the RPC exchange and queues, as Nameko declares them and as the Python
//! micro-framework declares them (`ufw_*`).

use crate::amqp::naming::work_queue;
use crate::config::Config;
use crate::transport::{BindingSpec, ExchangeSpec, HeaderValue, Headers, QueueSpec};

/// How long an unused reply queue lives (`x-expires`, milliseconds), as Nameko declares it.
pub(crate) const REPLY_QUEUE_EXPIRES_MS: i64 = 300_000;

/// The service name of standalone callers (Nameko's `ClusterRpcProxy`).
pub(crate) const STANDALONE_SERVICE: &str = "standalone_rpc_proxy";

/// The RPC exchange `RPC_EXCHANGE` (`nameko-rpc`): topic, durable.
pub fn rpc_exchange(config: &Config) -> ExchangeSpec {
    ExchangeSpec::topic(config.rpc_exchange.clone())
}

/// The request queue `rpc-{service}` of the service: durable, no arguments (classic queues).
pub fn rpc_queue(config: &Config) -> QueueSpec {
    work_queue(config, format!("rpc-{}", config.service_name))
}

/// The binding of the request queue: routing key `{service}.*`.
pub(crate) fn rpc_binding(config: &Config) -> BindingSpec {
    BindingSpec {
        queue: rpc_queue(config).name,
        exchange: config.rpc_exchange.clone(),
        routing_key: format!("{}.*", config.service_name),
        arguments: Headers::new(),
    }
}

/// The reply queue `rpc.reply-{service}-{id}` of a caller, with `x-expires: 300000`, durable
/// and not exclusive, as Nameko declares it: replies sent while the caller's connection is
/// down wait for it to come back, and RabbitMQ 4.3 and later refuse by default a queue both
/// transient and shared (`transient_nonexcl_queues`, closing the connection). The replies
/// themselves are transient (see `respond`), so none is written to disk. The caller consumes
/// it with an exclusive consumer (no other connection can read it) and deletes it when it
/// stops; `x-expires` removes it otherwise.
pub(crate) fn reply_queue(service: &str, id: &str) -> QueueSpec {
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

/// The Python micro-framework's RPC exchange (fixed there: `RPC_EXCHANGE` names Nameko's).
pub(crate) const UFW_RPC_EXCHANGE: &str = "ufw-rpc";

/// How long an unused micro-framework reply queue lives (`x-expires`, ms: 12 hours).
const UFW_REPLY_QUEUE_EXPIRES_MS: i64 = 43_200_000;
/// How long a reply waits in a micro-framework reply queue (`x-message-ttl`, ms: a day).
const UFW_REPLY_MESSAGE_TTL_MS: i64 = 86_400_000;

/// The micro-framework RPC exchange `ufw-rpc`: topic, durable.
pub(crate) fn ufw_rpc_exchange() -> ExchangeSpec {
    ExchangeSpec::topic(UFW_RPC_EXCHANGE)
}

/// The request queue of one micro-framework RPC target: `rpc-{service}-{target}`, durable,
/// bound with `{service}.{target}`.
pub(crate) fn ufw_target_queue(config: &Config, target: &str) -> (QueueSpec, BindingSpec) {
    let service = &config.service_name;
    ufw_bound_queue(config, format!("rpc-{service}-{target}"), format!("{service}.{target}"))
}

/// The queue of a service's built-in commands (`__list_targets__`, `__get_target__`):
/// `rpc-{service}-broadcast` bound with `{service}._broadcast.*`. Despite its name it is one
/// queue that every instance of the service shares, as the Python original declares it.
pub(crate) fn ufw_builtin_queue(config: &Config) -> (QueueSpec, BindingSpec) {
    let service = &config.service_name;
    ufw_bound_queue(config, format!("rpc-{service}-broadcast"), format!("{service}._broadcast.*"))
}

/// The routing key of a micro-framework RPC request: `{service}.{command}`, or
/// `{service}._broadcast.{command}` for a built-in command.
pub(crate) fn ufw_routing_key(service: &str, command: &str, builtin: bool) -> String {
    if builtin {
        format!("{service}._broadcast.{command}")
    } else {
        format!("{service}.{command}")
    }
}

fn ufw_bound_queue(config: &Config, name: String, routing_key: String) -> (QueueSpec, BindingSpec) {
    let queue = work_queue(config, name);
    let binding = BindingSpec {
        queue: queue.name.clone(),
        exchange: UFW_RPC_EXCHANGE.to_owned(),
        routing_key,
        arguments: Headers::new(),
    };
    (queue, binding)
}

/// The reply queue `ufw-reply-{id}` of a micro-framework caller, bound with its own name as
/// routing key: durable, `x-message-ttl` a day, `x-expires` 12 hours, as the Python original
/// declares it.
pub(crate) fn ufw_reply_queue(id: &str) -> QueueSpec {
    let arguments = Headers::from([
        ("x-expires".to_owned(), HeaderValue::Int(UFW_REPLY_QUEUE_EXPIRES_MS)),
        ("x-message-ttl".to_owned(), HeaderValue::Int(UFW_REPLY_MESSAGE_TTL_MS)),
    ]);
    QueueSpec { arguments, ..QueueSpec::durable(format!("ufw-reply-{id}")) }
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
        // a transient queue must be exclusive on RabbitMQ 4.3 and later
        assert!(reply.durable && !reply.exclusive && !reply.auto_delete, "Nameko's flags");
        assert_eq!(reply.arguments.get("x-expires"), Some(&HeaderValue::Int(300_000)));
    }

    #[test]
    fn micro_framework_names() {
        let config = Config::new("math");
        assert_eq!(ufw_rpc_exchange().name, "ufw-rpc");
        let (queue, binding) = ufw_target_queue(&config, "add");
        assert_eq!(
            (queue.name.as_str(), binding.routing_key.as_str()),
            ("rpc-math-add", "math.add")
        );
        assert!(queue.durable && queue.arguments.is_empty());
        let (queue, binding) = ufw_builtin_queue(&config);
        assert_eq!(queue.name, "rpc-math-broadcast");
        assert_eq!(binding.routing_key, "math._broadcast.*");
        assert_eq!(
            ufw_routing_key("math", "__list_targets__", true),
            "math._broadcast.__list_targets__"
        );
        let reply = ufw_reply_queue("abc");
        assert_eq!(reply.name, "ufw-reply-abc");
        assert!(reply.durable && !reply.exclusive && !reply.auto_delete);
        assert_eq!(reply.arguments.get("x-expires"), Some(&HeaderValue::Int(43_200_000)));
        assert_eq!(reply.arguments.get("x-message-ttl"), Some(&HeaderValue::Int(86_400_000)));
    }
}
