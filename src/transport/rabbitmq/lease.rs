//! What the transport knows of the queues the broker deletes by itself: a queue with
//! `x-expires` goes once it has been unused for that long (no consumer, no declare, no
//! `basic.get`), a shared auto-delete queue once its last consumer leaves. Replaying such a
//! queue after a reconnect would create it again, so the replay needs to know which ones
//! may be gone.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::{HeaderValue, QueueSpec};

/// The `x-expires` of a queue, if it has a usable one (a positive integer of milliseconds;
/// the broker refuses any other value, so the declaration never got recorded).
pub(crate) fn expires(spec: &QueueSpec) -> Option<Duration> {
    match spec.arguments.get("x-expires") {
        Some(HeaderValue::Int(ms)) => u64::try_from(*ms).ok().map(Duration::from_millis),
        _ => None,
    }
}

/// True when the broker may delete the queue while this transport still records it. An
/// exclusive queue is not one: it belongs to the connection and dies with it, so every
/// reconnect must declare it again.
pub(crate) fn may_vanish(spec: &QueueSpec) -> bool {
    !spec.exclusive && (spec.auto_delete || expires(spec).is_some())
}

/// An `x-expires` lease as this transport renewed it.
#[derive(Debug)]
struct Lease {
    ttl: Duration,
    renewed: Instant,
}

/// The leases of the recorded `x-expires` queues and this transport's live consumers per
/// queue (a consumer keeps a queue in use: neither expiry nor auto-delete applies).
#[derive(Debug, Default)]
pub(crate) struct Usage {
    leases: HashMap<String, Lease>,
    consumers: HashMap<String, usize>,
}

impl Usage {
    /// A queue was declared (which renews its lease) or its declaration replaced.
    pub(crate) fn declared(&mut self, spec: &QueueSpec) {
        match expires(spec).filter(|_| !spec.exclusive) {
            Some(ttl) => {
                self.leases.insert(spec.name.clone(), Lease { ttl, renewed: Instant::now() });
            }
            None => {
                self.leases.remove(&spec.name);
            }
        }
    }

    /// The queue was used in a way that renews its lease (`basic.get`, a passive declare).
    pub(crate) fn renew(&mut self, queue: &str) {
        if let Some(lease) = self.leases.get_mut(queue) {
            lease.renewed = Instant::now();
        }
    }

    /// The queue is no longer recorded.
    pub(crate) fn forget(&mut self, queue: &str) {
        self.leases.remove(queue);
    }

    /// A consumer of this transport started on the queue.
    pub(crate) fn consumer_started(&mut self, queue: &str) {
        *self.consumers.entry(queue.to_owned()).or_default() += 1;
    }

    /// A consumer of this transport ended: the lease runs again from now.
    pub(crate) fn consumer_ended(&mut self, queue: &str) {
        if let Some(count) = self.consumers.get_mut(queue) {
            *count -= 1;
            if *count == 0 {
                self.consumers.remove(queue);
            }
        }
        self.renew(queue);
    }

    /// True while a consumer of this transport uses the queue.
    pub(crate) fn consumed(&self, queue: &str) -> bool {
        self.consumers.contains_key(queue)
    }

    /// True when no lease is recorded (nothing can expire).
    pub(crate) fn no_leases(&self) -> bool {
        self.leases.is_empty()
    }

    /// The queues whose lease ran out at `now` without a consumer of this transport: the
    /// broker deleted them, unless another client used them (then they exist without this
    /// transport's help).
    pub(crate) fn expired(&self, now: Instant) -> Vec<String> {
        self.leases
            .iter()
            .filter(|(queue, lease)| lease.renewed + lease.ttl <= now && !self.consumed(queue))
            .map(|(queue, _)| queue.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expiring(name: &str, ms: i64) -> QueueSpec {
        let mut spec = QueueSpec::durable(name);
        spec.arguments.insert("x-expires".into(), HeaderValue::Int(ms));
        spec
    }

    #[test]
    fn which_queues_may_vanish() {
        assert!(!may_vanish(&QueueSpec::durable("q")));
        assert!(may_vanish(&expiring("q", 1000)));
        assert!(may_vanish(&QueueSpec { auto_delete: true, ..QueueSpec::durable("q") }));
        let exclusive = QueueSpec { exclusive: true, auto_delete: true, ..expiring("q", 1000) };
        assert!(!may_vanish(&exclusive));
        assert_eq!(expires(&expiring("q", -1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_runs_out_unless_renewed_or_consumed() {
        let mut usage = Usage::default();
        usage.declared(&expiring("a", 1000));
        usage.declared(&expiring("b", 1000));
        usage.declared(&expiring("c", 1000));
        usage.consumer_started("b");
        tokio::time::advance(Duration::from_millis(600)).await;
        usage.renew("c");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(usage.expired(Instant::now()), vec!["a".to_owned()]);
        usage.forget("a");
        usage.consumer_ended("b");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(usage.expired(Instant::now()), vec!["c".to_owned()]);
        usage.declared(&QueueSpec::durable("c"));
        assert_eq!(usage.expired(Instant::now() + Duration::from_secs(9)), vec!["b".to_owned()]);
    }
}
