//! Names and flags of exchanges and queues, per wire profile (Nameko, micro-framework).

use std::time::Duration;

use crate::config::{Config, Protocol, QueueType};
use crate::transport::{ExchangeSpec, HeaderValue, QueueSpec};

/// How an event handler shares its queue (Nameko's handler types).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HandlerType {
    /// One queue per service and method: each event goes to one instance (the default).
    #[default]
    ServicePool,
    /// One queue for every service listening: each event goes to one handler in the cluster.
    Singleton,
    /// One queue per instance: every instance gets every event. With an identifier the queue
    /// is durable and reused across restarts; without, each start makes a new exclusive queue.
    Broadcast(Option<String>),
}

/// The exchange `{source}.events` that `source` dispatches its events to.
pub fn event_exchange(config: &Config, source: &str) -> ExchangeSpec {
    let mut exchange = ExchangeSpec::topic(format!("{source}.events"));
    exchange.auto_delete = match config.protocol {
        Protocol::Nameko => config.auto_delete_event_exchanges,
        Protocol::MicroFramework => true,
    };
    exchange
}

/// The queue of an event handler `method` of `service` for `source`'s `event`.
pub fn event_queue(
    config: &Config,
    handler: &HandlerType,
    source: &str,
    event: &str,
    method: &str,
) -> QueueSpec {
    let service = &config.service_name;
    // The micro-framework has service-pool handlers only: the other handler types take
    // Nameko's queues under its profile too (events come through the same exchange).
    match (config.protocol, handler) {
        (Protocol::MicroFramework, HandlerType::ServicePool) => {
            work_queue(config, format!("{source}.{event}__{service}.{method}"))
        }
        (Protocol::Nameko, HandlerType::ServicePool) => {
            work_queue(config, format!("evt-{source}-{event}--{service}.{method}"))
        }
        (_, HandlerType::Singleton) => work_queue(config, format!("evt-{source}-{event}")),
        (_, HandlerType::Broadcast(Some(id))) => {
            work_queue(config, format!("evt-{source}-{event}--{service}.{method}-{id}"))
        }
        (_, HandlerType::Broadcast(None)) => {
            // 32 hex digits, as Nameko's `uuid.uuid4().hex`
            let id = uuid::Uuid::new_v4().simple();
            QueueSpec {
                exclusive: true,
                auto_delete: true,
                ..QueueSpec::durable(format!("evt-{source}-{event}--{service}.{method}-{id}"))
            }
        }
    }
}

/// A durable work queue of the configured queue type. Classic queues get no arguments, as the
/// Python peers declare them, so an existing queue can be taken over.
pub fn work_queue(config: &Config, name: String) -> QueueSpec {
    let mut queue = QueueSpec::durable(name);
    if config.queue_type == QueueType::Quorum {
        queue.arguments.insert("x-queue-type".into(), HeaderValue::from("quorum"));
    }
    queue
}

/// Whether `queue` is declared as a quorum queue.
pub(crate) fn is_quorum(queue: &QueueSpec) -> bool {
    queue.arguments.get("x-queue-type").and_then(HeaderValue::as_str) == Some("quorum")
}

/// The dead-letter queue of a work queue: `{queue}.dlq`, same queue type.
pub fn dead_letter_queue(config: &Config, queue: &str) -> QueueSpec {
    work_queue(config, format!("{queue}.dlq"))
}

/// How long the dead-letter queue of an exclusive queue lasts past its last use.
pub(crate) const EXCLUSIVE_DEAD_LETTER_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The dead-letter queue of `queue` ([`dead_letter_queue`]). That of an exclusive queue (an
/// anonymous broadcast listener's, named anew at each start) has a lease, `x-expires` =
/// [`EXCLUSIVE_DEAD_LETTER_LEASE`]: its queue goes with its connection and no later start
/// declares the same names again, so without a lease each start would leave a durable queue
/// behind for ever. Each declaration renews the lease; the service declares it again before
/// each dead letter it publishes there, so it lasts a week past the last one, long enough to
/// read them.
pub(crate) fn dead_letter_queue_of(config: &Config, queue: &QueueSpec) -> QueueSpec {
    let mut dlq = dead_letter_queue(config, &queue.name);
    if queue.exclusive {
        let lease = i64::try_from(EXCLUSIVE_DEAD_LETTER_LEASE.as_millis()).unwrap_or(i64::MAX);
        dlq.arguments.insert("x-expires".into(), HeaderValue::Int(lease));
    }
    dlq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameko_and_micro_framework_names() {
        let mut config = Config::new("orders");
        let pool = event_queue(&config, &HandlerType::ServicePool, "shop", "paid", "on_paid");
        assert_eq!(pool.name, "evt-shop-paid--orders.on_paid");
        assert!(pool.durable && pool.arguments.is_empty());
        assert_eq!(
            event_queue(&config, &HandlerType::Singleton, "shop", "paid", "m").name,
            "evt-shop-paid"
        );
        let broadcast = HandlerType::Broadcast(Some("b1".into()));
        assert_eq!(
            event_queue(&config, &broadcast, "shop", "paid", "m").name,
            "evt-shop-paid--orders.m-b1"
        );
        assert!(!event_exchange(&config, "shop").auto_delete);

        config.protocol = Protocol::MicroFramework;
        assert_eq!(
            event_queue(&config, &HandlerType::ServicePool, "shop", "paid", "on_paid").name,
            "shop.paid__orders.on_paid"
        );
        assert!(event_exchange(&config, "shop").auto_delete);
        // its profile has service-pool handlers only: the others take Nameko's queues
        assert_eq!(
            event_queue(&config, &HandlerType::Singleton, "shop", "paid", "m").name,
            "evt-shop-paid"
        );
        let named = event_queue(&config, &broadcast, "shop", "paid", "m");
        assert_eq!(named.name, "evt-shop-paid--orders.m-b1");
        let anonymous = event_queue(&config, &HandlerType::Broadcast(None), "shop", "paid", "m");
        assert!(anonymous.exclusive && anonymous.name.starts_with("evt-shop-paid--orders.m-"));
    }

    #[test]
    fn quorum_queues_are_declared_as_such() {
        let config = Config::new("svc").with_queue_type(QueueType::Quorum);
        let dlq = dead_letter_queue(&config, "q");
        assert_eq!(dlq.name, "q.dlq");
        assert_eq!(dlq.arguments.get("x-queue-type"), Some(&HeaderValue::from("quorum")));
    }

    #[test]
    fn only_the_dead_letter_queue_of_an_exclusive_queue_has_a_lease() {
        let config = Config::new("svc");
        let anonymous = event_queue(&config, &HandlerType::Broadcast(None), "shop", "paid", "m");
        let id = anonymous.name.rsplit('-').next().unwrap_or_default();
        assert!(id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()), "{}", anonymous.name);
        let leased = dead_letter_queue_of(&config, &anonymous);
        assert_eq!(leased.name, format!("{}.dlq", anonymous.name));
        assert!(leased.durable && !leased.exclusive);
        assert_eq!(leased.arguments.get("x-expires"), Some(&HeaderValue::Int(604_800_000)));
        for handler in [HandlerType::ServicePool, HandlerType::Broadcast(Some("b1".into()))] {
            let queue = event_queue(&config, &handler, "shop", "paid", "m");
            assert_eq!(
                dead_letter_queue_of(&config, &queue),
                dead_letter_queue(&config, &queue.name)
            );
        }
    }
}
